//! Wrapper of `kernels/weight_quant.cu` (reference: `dsv3_reference::fp8::weight_quant`).

use cudarc::driver::{LaunchConfig, PushKernelArg};

use crate::act_quant::Output;
use crate::error::{Error, Result};
use crate::kernels::WEIGHT_QUANT;
use crate::runtime::{grid_1d, Gpu, HostFloats};

/// Quantize `w: [N, K]` with `block_size`×`block_size` blocks (partial edge blocks allowed):
/// codes `[N, K]`, scales `[⌈N/B⌉, ⌈K/B⌉]`.
pub fn weight_quant(
    gpu: &Gpu,
    w: HostFloats<'_>,
    n: usize,
    k: usize,
    block_size: usize,
    ue8m0: bool,
) -> Result<Output> {
    const OP: &str = "weight_quant";
    if w.len() != n * k {
        return Err(Error::Argument {
            op: OP,
            msg: format!("w has {} elements, expected N·K = {n}·{k}", w.len()),
        });
    }
    let too_big = |v: usize| v > i32::MAX as usize;
    if block_size == 0 || too_big(n) || too_big(k) || too_big(block_size) {
        return Err(Error::Argument {
            op: OP,
            msg: format!("unsupported sizes N = {n}, K = {k}, block_size = {block_size}"),
        });
    }
    let (grid_rows, grid_cols) = (n.div_ceil(block_size), k.div_ceil(block_size));
    let stream = gpu.stream();
    let mut d_y = stream.alloc_zeros::<u8>((n * k).max(1))?;
    let mut d_s = stream.alloc_zeros::<f32>((grid_rows * grid_cols).max(1))?;
    if n * k > 0 {
        let cfg = LaunchConfig {
            grid_dim: grid_1d(OP, grid_rows * grid_cols)?,
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (n_arg, k_arg, b_arg, u_arg) =
            (n as i32, k as i32, block_size as i32, i32::from(ue8m0));
        let d_w = w.upload(stream)?;
        let f = gpu.function(&WEIGHT_QUANT, &format!("weight_quant_{}", d_w.suffix()))?;
        let mut launch = stream.launch_builder(&f);
        d_w.push(&mut launch);
        launch
            .arg(&mut d_y)
            .arg(&mut d_s)
            .arg(&n_arg)
            .arg(&k_arg)
            .arg(&b_arg)
            .arg(&u_arg);
        // SAFETY: argument types and order match `weight_quant_{f32,bf16}`; one thread block per
        // weight block of the [N, K] input (1-D grid of grid_rows·grid_cols), every access is
        // inside [N, K] and s[grid_rows·grid_cols].
        unsafe { launch.launch(cfg) }?;
    }
    let mut y = stream.clone_dtoh(&d_y)?;
    let mut s = stream.clone_dtoh(&d_s)?;
    y.truncate(n * k);
    s.truncate(grid_rows * grid_cols);
    Ok(Output { y, s })
}
