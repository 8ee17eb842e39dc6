//! Wrappers of `kernels/fp8_gemm.cu` (CUDA cores, exact per-block semantics) and
//! `kernels/fp8_gemm_wgmma.cu` (Tensor Cores, promotion to FP32 every 128).

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use crate::error::{Error, Result};
use crate::kernels::{FP8_GEMM, FP8_GEMM_WGMMA};
use crate::runtime::{grid_1d, Floats, Gpu};

/// Which kernel computes the GEMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// CUDA cores, exact block dots (bit-identical to the reference's exact mode).
    Simt,
    /// Tensor Cores (`wgmma`), FP32 promotion every 128.
    Wgmma,
}

/// `c[M, N]` (f32 values or bf16 bit patterns) with
/// `c[m,n] = Σ_kb (Σ_{k∈kb} a[m,k]·b[n,k]) · a_s[m,kb] · b_s[n/B,kb]` for E4M3 codes
/// `a: [M, K]`, `b: [N, K]`, `a_s: [M, ⌈K/B⌉]`, `b_s: [⌈N/B⌉, ⌈K/B⌉]`, `B = block_size`
/// (any `B` for [`Backend::Simt`], 128 for [`Backend::Wgmma`]).
pub fn fp8_gemm(
    gpu: &Gpu,
    backend: Backend,
    (a, a_s): (&[u8], &[f32]),
    (b, b_s): (&[u8], &[f32]),
    (m, n, k): (usize, usize, usize),
    block_size: usize,
    bf16_out: bool,
) -> Result<Floats> {
    const OP: &str = "fp8_gemm";
    if block_size == 0 || (backend == Backend::Wgmma && block_size != 128) {
        return Err(Error::Argument {
            op: OP,
            msg: format!("block_size {block_size} is not supported by the {backend:?} kernel"),
        });
    }
    let kb = k.div_ceil(block_size);
    if a.len() != m * k
        || b.len() != n * k
        || a_s.len() != m * kb
        || b_s.len() != n.div_ceil(block_size) * kb
    {
        return Err(Error::Argument {
            op: OP,
            msg: format!(
                "sizes do not match M = {m}, N = {n}, K = {k}: a {}, a_s {}, b {}, b_s {}",
                a.len(),
                a_s.len(),
                b.len(),
                b_s.len()
            ),
        });
    }
    if [m, n, k + block_size]
        .iter()
        .any(|&d| d > i32::MAX as usize)
    {
        return Err(Error::Argument {
            op: OP,
            msg: "dimensions must fit in i32".into(),
        });
    }
    if m * n == 0 || k == 0 {
        // no K blocks: every output is the empty sum, +0
        return Ok(if bf16_out {
            Floats::Bf16(vec![0; m * n])
        } else {
            Floats::F32(vec![0.0; m * n])
        });
    }
    let stream = gpu.stream();
    let d_a = stream.clone_htod(a)?;
    let d_b = stream.clone_htod(b)?;
    let d_as = stream.clone_htod(a_s)?;
    let d_bs = stream.clone_htod(b_s)?;
    let mut d_f32 = stream.alloc_zeros::<f32>(if bf16_out { 1 } else { m * n })?;
    let mut d_bf16 = stream.alloc_zeros::<u16>(if bf16_out { m * n } else { 1 })?;
    let operands = Operands {
        a: &d_a,
        a_s: &d_as,
        b: &d_b,
        b_s: &d_bs,
    };
    fp8_gemm_launch(
        gpu,
        backend,
        &operands,
        (&mut d_f32, &mut d_bf16),
        (m, n, k),
        block_size,
        bf16_out,
    )?;
    Ok(if bf16_out {
        Floats::Bf16(stream.clone_dtoh(&d_bf16)?)
    } else {
        Floats::F32(stream.clone_dtoh(&d_f32)?)
    })
}

/// The four device operands of the GEMM.
pub struct Operands<'a> {
    pub a: &'a CudaSlice<u8>,
    pub a_s: &'a CudaSlice<f32>,
    pub b: &'a CudaSlice<u8>,
    pub b_s: &'a CudaSlice<f32>,
}

/// Launch one backend on device buffers (sizes checked by the caller, `block_size` 128 for
/// [`Backend::Wgmma`]; `c_f32` or `c_bf16` holds M·N elements, the other at least one); nothing
/// is copied.
pub fn fp8_gemm_launch(
    gpu: &Gpu,
    backend: Backend,
    x: &Operands<'_>,
    (c_f32, c_bf16): (&mut CudaSlice<f32>, &mut CudaSlice<u16>),
    (m, n, k): (usize, usize, usize),
    block_size: usize,
    bf16_out: bool,
) -> Result<()> {
    const OP: &str = "fp8_gemm";
    let (kernel, function, cfg) = match backend {
        Backend::Simt => (
            &FP8_GEMM,
            "fp8_gemm_simt",
            LaunchConfig {
                grid_dim: grid_1d(OP, m.div_ceil(16) * n.div_ceil(16))?,
                block_dim: (16, 16, 1),
                shared_mem_bytes: 0,
            },
        ),
        Backend::Wgmma => (
            &FP8_GEMM_WGMMA,
            "fp8_gemm_wgmma",
            LaunchConfig {
                grid_dim: grid_1d(OP, m.div_ceil(64) * n.div_ceil(128))?,
                block_dim: (128, 1, 1),
                shared_mem_bytes: 0,
            },
        ),
    };
    let f = gpu.function(kernel, function)?;
    let (m_arg, n_arg, k_arg, bf16_arg) = (m as i32, n as i32, k as i32, i32::from(bf16_out));
    let block_arg = block_size as i32;
    let mut launch = gpu.stream().launch_builder(&f);
    launch
        .arg(x.a)
        .arg(x.a_s)
        .arg(x.b)
        .arg(x.b_s)
        .arg(c_f32)
        .arg(c_bf16)
        .arg(&m_arg)
        .arg(&n_arg)
        .arg(&k_arg);
    if backend == Backend::Simt {
        launch.arg(&block_arg);
    }
    launch.arg(&bf16_arg);
    // SAFETY: argument types and order match both kernels' signatures (block_size only for
    // fp8_gemm_simt); the grids cover [M, N]
    // and every access is bounds-checked against M, N, K inside the kernels; the unused output
    // buffer is never written.
    unsafe { launch.launch(cfg) }?;
    Ok(())
}
