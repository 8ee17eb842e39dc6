//! Wrapper of `kernels/rope.cu` (reference: `dsv3_reference::rope::rope`).

use cudarc::driver::{LaunchConfig, PushKernelArg};

use crate::error::{Error, Result};
use crate::kernels::ROPE;
use crate::runtime::{grid_1d, DeviceFloats, Floats, Gpu, HostFloats};

/// Rotate the pairs of `x: [S, H, D]` (f32 or bf16; `y` has x's dtype): row `s` by the angles
/// `f32(positions[s]) · inv_freq[i]`, pairs `(2i, 2i+1)` (`interleaved`) or `(i, i + D/2)`.
/// `inv_freq` (`D/2` values) comes from `dsv3_reference::rope::RopeConfig::inv_freqs`.
pub fn rope(
    gpu: &Gpu,
    x: HostFloats<'_>,
    positions: &[i64],
    inv_freq: &[f32],
    (s, h, d): (usize, usize, usize),
    interleaved: bool,
) -> Result<Floats> {
    const OP: &str = "rope";
    let bad = |msg: String| Err(Error::Argument { op: OP, msg });
    if x.len() != s * h * d || positions.len() != s || d != 2 * inv_freq.len() {
        return bad(format!(
            "x has {} values, positions {}, inv_freq {}; expected S·H·D = {s}·{h}·{d}, S and D/2",
            x.len(),
            positions.len(),
            inv_freq.len()
        ));
    }
    if [s, h, d].iter().any(|&v| v > i32::MAX as usize) {
        return bad("dimensions must fit in i32".into());
    }
    if let Some(i) = positions.iter().position(|&p| p < 0) {
        return bad(format!("positions[{i}] = {} is negative", positions[i]));
    }
    let pairs = s * h * d / 2;
    if pairs == 0 {
        return Ok(Floats::zeros(x.is_bf16(), s * h * d));
    }
    let stream = gpu.stream();
    let d_x = x.upload(stream)?;
    let d_pos = stream.clone_htod(positions)?;
    let d_freq = stream.clone_htod(inv_freq)?;
    let mut d_y = DeviceFloats::zeros(stream, x.is_bf16(), s * h * d)?;
    // a grid-stride loop: at most 65536 blocks of 256 threads
    let cfg = LaunchConfig {
        grid_dim: grid_1d(OP, pairs.div_ceil(256).min(1 << 16))?,
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let (s_arg, h_arg, d_arg, i_arg) = (s as i32, h as i32, d as i32, i32::from(interleaved));
    let f = gpu.function(&ROPE, &format!("rope_{}", d_x.suffix()))?;
    let mut launch = stream.launch_builder(&f);
    d_x.push(&mut launch);
    launch.arg(&d_pos).arg(&d_freq);
    d_y.push_mut(&mut launch);
    launch.arg(&s_arg).arg(&h_arg).arg(&d_arg).arg(&i_arg);
    // SAFETY: argument types and order match `rope_{f32,bf16}` (y has x's dtype); the loop covers
    // the S·H·D/2 pairs, positions has S entries and inv_freq D/2.
    unsafe { launch.launch(cfg) }?;
    d_y.download(stream, s * h * d)
}
