//! Wrapper of `kernels/weight_dequant.cu` (reference: `dsv3_reference::fp8::weight_dequant`).

use cudarc::driver::{LaunchConfig, PushKernelArg};

use crate::error::{Error, Result};
use crate::kernels::WEIGHT_DEQUANT;
use crate::runtime::{DeviceFloats, Floats, Gpu};

/// The dequantized weight (f32 values or bf16 bit patterns):
/// `w = f32(y) · s[n/B, k/B]` for `y: [N, K]` codes and `s: [⌈N/B⌉, ⌈K/B⌉]`; bf16 output rounds
/// the product (RNE).
pub fn weight_dequant(
    gpu: &Gpu,
    y: &[u8],
    s: &[f32],
    n: usize,
    k: usize,
    block_size: usize,
    bf16_out: bool,
) -> Result<Floats> {
    const OP: &str = "weight_dequant";
    let (grid_rows, grid_cols) = (n.div_ceil(block_size.max(1)), k.div_ceil(block_size.max(1)));
    if block_size == 0
        || y.len() != n * k
        || s.len() != grid_rows * grid_cols
        || k > i32::MAX as usize
        || block_size > i32::MAX as usize
    {
        return Err(Error::Argument {
            op: OP,
            msg: format!("y has {} codes and s {} scales; expected N·K = {n}·{k} and {grid_rows}·{grid_cols}", y.len(), s.len()),
        });
    }
    let count = n * k;
    let stream = gpu.stream();
    let d_y = stream.clone_htod(if y.is_empty() { &[0u8][..] } else { y })?;
    let d_s = stream.clone_htod(if s.is_empty() { &[1f32][..] } else { s })?;
    let cfg = LaunchConfig {
        grid_dim: (count.div_ceil(256).clamp(1, 65535) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let (count_arg, k_arg, b_arg, cols_arg) =
        (count as i64, k as i32, block_size as i32, grid_cols as i32);
    let mut d_w = DeviceFloats::zeros(stream, bf16_out, count)?;
    let f = gpu.function(&WEIGHT_DEQUANT, &format!("weight_dequant_{}", d_w.suffix()))?;
    let mut launch = stream.launch_builder(&f);
    launch.arg(&d_y).arg(&d_s);
    d_w.push_mut(&mut launch);
    launch
        .arg(&count_arg)
        .arg(&k_arg)
        .arg(&b_arg)
        .arg(&cols_arg);
    // SAFETY: argument types and order match `weight_dequant_{f32,bf16}` (bf16 stored as u16);
    // the grid-stride loop stays below `count`, scale indices below grid_rows·grid_cols.
    unsafe { launch.launch(cfg) }?;
    d_w.download(stream, count)
}
