//! Wrapper of `kernels/act_quant.cu` (reference: `dsv3_reference::fp8::act_quant`).

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use crate::error::{Error, Result};
use crate::kernels::ACT_QUANT;
use crate::runtime::{grid_1d, DeviceFloats, Gpu, HostFloats};

/// E4M3 codes and their scales (`[M, K]` and `[M, K/B]` here).
pub struct Output {
    pub y: Vec<u8>,
    pub s: Vec<f32>,
}

const WARPS_PER_BLOCK: u32 = 4;

/// Quantize `x: [M, K]` with 1×`block_size` tiles (`K % block_size == 0`).
pub fn act_quant(
    gpu: &Gpu,
    x: HostFloats<'_>,
    m: usize,
    k: usize,
    block_size: usize,
    ue8m0: bool,
) -> Result<Output> {
    const OP: &str = "act_quant";
    if x.len() != m * k {
        return Err(Error::Argument {
            op: OP,
            msg: format!("x has {} elements, expected M·K = {m}·{k}", x.len()),
        });
    }
    if block_size == 0 || k % block_size != 0 || block_size > i32::MAX as usize {
        return Err(Error::Argument {
            op: OP,
            msg: format!("K = {k} is not a multiple of block_size = {block_size}"),
        });
    }
    let n_tiles = m * k / block_size;
    if n_tiles == 0 {
        return Ok(Output {
            y: Vec::new(),
            s: Vec::new(),
        });
    }
    let stream = gpu.stream();
    let d_x = x.upload(stream)?;
    let mut d_y = stream.alloc_zeros::<u8>(m * k)?;
    let mut d_s = stream.alloc_zeros::<f32>(n_tiles)?;
    act_quant_launch(gpu, &d_x, &mut d_y, &mut d_s, m * k, block_size, ue8m0)?;
    Ok(Output {
        y: stream.clone_dtoh(&d_y)?,
        s: stream.clone_dtoh(&d_s)?,
    })
}

/// Launch the kernel on device buffers (`len` elements, a multiple of `block_size`, checked by
/// the caller); nothing is copied.
pub fn act_quant_launch(
    gpu: &Gpu,
    x: &DeviceFloats,
    y: &mut CudaSlice<u8>,
    s: &mut CudaSlice<f32>,
    len: usize,
    block_size: usize,
    ue8m0: bool,
) -> Result<()> {
    let n_tiles = len / block_size;
    let cfg = LaunchConfig {
        grid_dim: grid_1d("act_quant", n_tiles.div_ceil(WARPS_PER_BLOCK as usize))?,
        block_dim: (32 * WARPS_PER_BLOCK, 1, 1),
        shared_mem_bytes: 0,
    };
    let (n_tiles_arg, block_arg, ue8m0_arg) = (n_tiles as i64, block_size as i32, i32::from(ue8m0));
    let f = gpu.function(&ACT_QUANT, &format!("act_quant_{}", x.suffix()))?;
    let mut launch = gpu.stream().launch_builder(&f);
    x.push(&mut launch);
    launch
        .arg(y)
        .arg(s)
        .arg(&n_tiles_arg)
        .arg(&block_arg)
        .arg(&ue8m0_arg);
    // SAFETY: argument types and order match `act_quant_{f32,bf16}`; the buffers hold `len`
    // inputs, `len` codes and `len / block_size` scales, and every thread stays inside its tile.
    unsafe { launch.launch(cfg) }?;
    Ok(())
}
