//! Wrapper of `kernels/rmsnorm.cu` (reference: `dsv3_reference::norm::rms_norm`).

use cudarc::driver::{LaunchConfig, PushKernelArg};

use crate::error::{Error, Result};
use crate::kernels::RMSNORM;
use crate::runtime::{grid_1d, DeviceFloats, Floats, Gpu, HostFloats};

/// `y[r, c] = w[c] · x[r, c] / sqrt(mean_c(x[r, c]²) + eps)` for `x: [rows, D]` (f32 or bf16;
/// `y` has x's dtype) and `w: [D]`.
pub fn rmsnorm(
    gpu: &Gpu,
    x: HostFloats<'_>,
    w: &[f32],
    (rows, d): (usize, usize),
    eps: f32,
) -> Result<Floats> {
    const OP: &str = "rmsnorm";
    if x.len() != rows * d || w.len() != d || d > i32::MAX as usize {
        return Err(Error::Argument {
            op: OP,
            msg: format!(
                "x has {} values and w {}; expected rows·D = {rows}·{d} and D",
                x.len(),
                w.len()
            ),
        });
    }
    if rows * d == 0 {
        return Ok(Floats::zeros(x.is_bf16(), 0));
    }
    let stream = gpu.stream();
    let d_x = x.upload(stream)?;
    let d_w = stream.clone_htod(w)?;
    let mut d_y = DeviceFloats::zeros(stream, x.is_bf16(), rows * d)?;
    let cfg = LaunchConfig {
        grid_dim: grid_1d(OP, rows)?,
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let d_arg = d as i32;
    let f = gpu.function(&RMSNORM, &format!("rmsnorm_{}", d_x.suffix()))?;
    let mut launch = stream.launch_builder(&f);
    d_x.push(&mut launch);
    launch.arg(&d_w);
    d_y.push_mut(&mut launch);
    launch.arg(&d_arg).arg(&eps);
    // SAFETY: argument types and order match `rmsnorm_{f32,bf16}` (y has x's dtype); one block
    // per row of D values, every access inside the row.
    unsafe { launch.launch(cfg) }?;
    d_y.download(stream, rows * d)
}
