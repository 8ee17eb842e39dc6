//! Kernel timings on the device (CUDA events around repeated launches on resident buffers; no
//! host transfers inside the timed region). Used by `dsv3 gpu-bench`; performance claims come
//! from here, never from tests.

use cudarc::driver::sys::CUevent_flags;

use crate::act_quant::act_quant_launch;
use crate::error::Result;
use crate::fp8_gemm::{fp8_gemm_launch, Backend, Operands};
use crate::runtime::{DeviceFloats, Gpu};

/// One timed kernel.
#[derive(Debug, Clone)]
pub struct BenchRow {
    pub kernel: String,
    pub shape: String,
    /// Mean time per launch.
    pub ms: f64,
    /// 2·M·N·K / time, for GEMMs.
    pub tflops: Option<f64>,
    /// Bytes read + written / time.
    pub gbps: Option<f64>,
}

/// Mean milliseconds of `f` over `reps` launches after `warmup` untimed ones.
pub fn time_ms(
    gpu: &Gpu,
    warmup: usize,
    reps: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    let stream = gpu.stream();
    let start = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    for _ in 0..reps {
        f()?;
    }
    let end = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
    Ok(f64::from(start.elapsed_ms(&end)?) / reps.max(1) as f64)
}

/// Deterministic pseudo-random bytes (xorshift), for operands whose values do not matter to speed.
fn bytes(n: usize, seed: u64, mask: u8) -> Vec<u8> {
    let mut state = seed | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state as u8) & mask
        })
        .collect()
}

/// Device-to-device copy of `len` bytes: the memory-bandwidth yardstick.
pub fn bench_copy(gpu: &Gpu, len: usize) -> Result<BenchRow> {
    let stream = gpu.stream();
    let src = stream.clone_htod(&bytes(len, 1, 0xFF))?;
    let mut dst = stream.alloc_zeros::<u8>(len)?;
    let ms = time_ms(gpu, 3, 20, || Ok(stream.memcpy_dtod(&src, &mut dst)?))?;
    Ok(BenchRow {
        kernel: "copy (device to device)".into(),
        shape: format!("{len} B"),
        ms,
        tflops: None,
        gbps: Some(2.0 * len as f64 / ms / 1e6),
    })
}

/// `act_quant` on f32 `[M, K]`: reads 4 B, writes 1 B per element and 4 B per 128-tile.
pub fn bench_act_quant(gpu: &Gpu, m: usize, k: usize) -> Result<BenchRow> {
    let stream = gpu.stream();
    let host: Vec<f32> = bytes(m * k, 2, 0xFF)
        .iter()
        .map(|&b| f32::from(b) - 127.5)
        .collect();
    let x = DeviceFloats::F32(stream.clone_htod(&host)?);
    let mut y = stream.alloc_zeros::<u8>(m * k)?;
    let mut s = stream.alloc_zeros::<f32>(m * k / 128)?;
    let ms = time_ms(gpu, 3, 20, || {
        act_quant_launch(gpu, &x, &mut y, &mut s, m * k, 128, false)
    })?;
    let moved = (m * k * 5 + m * k / 128 * 4) as f64;
    Ok(BenchRow {
        kernel: "act_quant f32".into(),
        shape: format!("{m}x{k}"),
        ms,
        tflops: None,
        gbps: Some(moved / ms / 1e6),
    })
}

/// `fp8_gemm` with bf16 output at `[M, K] × [N, K]ᵀ`.
pub fn bench_fp8_gemm(
    gpu: &Gpu,
    backend: Backend,
    (m, n, k): (usize, usize, usize),
    reps: usize,
) -> Result<BenchRow> {
    let stream = gpu.stream();
    let kb = k.div_ceil(128);
    // codes with the top exponent bit cleared: finite, moderate values (0x7F/0xFF NaNs excluded)
    let a = stream.clone_htod(&bytes(m * k, 3, 0xBF))?;
    let b = stream.clone_htod(&bytes(n * k, 4, 0xBF))?;
    let a_s = stream.clone_htod(&vec![1e-3f32; m * kb])?;
    let b_s = stream.clone_htod(&vec![1e-3f32; n.div_ceil(128) * kb])?;
    let mut c_f32 = stream.alloc_zeros::<f32>(1)?;
    let mut c_bf16 = stream.alloc_zeros::<u16>(m * n)?;
    let ops = Operands {
        a: &a,
        a_s: &a_s,
        b: &b,
        b_s: &b_s,
    };
    let ms = time_ms(gpu, 1, reps, || {
        fp8_gemm_launch(gpu, backend, &ops, &mut c_f32, &mut c_bf16, (m, n, k), true)
    })?;
    Ok(BenchRow {
        kernel: format!("fp8_gemm {backend:?}"),
        shape: format!("M={m} N={n} K={k}"),
        ms,
        tflops: Some(2.0 * m as f64 * n as f64 * k as f64 / ms / 1e9),
        gbps: Some((m * k + n * k + 2 * m * n) as f64 / ms / 1e6),
    })
}
