//! Kernel timings on the device (CUDA events around repeated launches on resident buffers; no
//! host transfers inside the timed region). Used by `dsv3 gpu-bench`; performance claims come
//! from here, never from tests.

use cudarc::driver::sys::CUevent_flags;

use crate::act_quant::act_quant_launch;
use crate::error::Result;
use crate::fp8_gemm::{fp8_gemm_launch, Backend, Operands};
use crate::mla_decode::{mla_decode_launch, Buffers, Dims, D_QK, D_V, PAGE};
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
        fp8_gemm_launch(
            gpu,
            backend,
            &ops,
            (&mut c_f32, &mut c_bf16),
            (m, n, k),
            128,
            true,
        )
    })?;
    Ok(BenchRow {
        kernel: format!("fp8_gemm {backend:?}"),
        shape: format!("M={m} N={n} K={k}"),
        ms,
        tflops: Some(2.0 * m as f64 * n as f64 * k as f64 / ms / 1e9),
        gbps: Some((m * k + n * k + 2 * m * n) as f64 / ms / 1e6),
    })
}

/// `mla_decode` with bf16 q, cache and output at FlashMLA's decode benchmark shape: `batch`
/// sequences of `len` cached tokens each (blocks in a shuffled order), `s_q` queries of `heads`
/// heads. GB/s by FlashMLA's napkin math (bytes = Q + KV + O in bf16: the cache read once,
/// however often a kernel re-reads it), TFLOP/s = B·H·S_q·(2·576·T + 2·512·T) / t with T = len.
pub fn bench_mla_decode(
    gpu: &Gpu,
    (batch, s_q, heads, len): (usize, usize, usize, usize),
    reps: usize,
) -> Result<BenchRow> {
    let stream = gpu.stream();
    let pages = len.div_ceil(PAGE);
    let n_blocks = batch * pages;
    // values in [−0.5, 0.5) as bf16 bit patterns (the upper half of an f32)
    let bf16 = |n: usize, seed: u64| -> Vec<u16> {
        bytes(n, seed, 0xFF)
            .iter()
            .map(|&b| ((f32::from(b) / 256.0 - 0.5).to_bits() >> 16) as u16)
            .collect()
    };
    let q = DeviceFloats::Bf16(stream.clone_htod(&bf16(batch * s_q * heads * D_QK, 5))?);
    let k_cache = DeviceFloats::Bf16(stream.clone_htod(&bf16(n_blocks * PAGE * D_QK, 6))?);
    // sequence b's page p lives in block (p·batch + b): the pages of one sequence are scattered
    let table: Vec<i32> = (0..batch)
        .flat_map(|b| (0..pages).map(move |p| (p * batch + b) as i32))
        .collect();
    let block_table = stream.clone_htod(&table)?;
    let cache_seqlens = stream.clone_htod(&vec![len as i32; batch])?;
    let mut out = DeviceFloats::Bf16(stream.alloc_zeros::<u16>(batch * s_q * heads * D_V)?);
    let mut lse = stream.alloc_zeros::<f32>(batch * heads * s_q)?;
    let dims = Dims {
        batch,
        s_q,
        heads,
        n_blocks,
        max_blocks: pages,
    };
    let buffers = Buffers {
        q: &q,
        k_cache: &k_cache,
        block_table: &block_table,
        cache_seqlens: &cache_seqlens,
    };
    let ms = time_ms(gpu, 1, reps, || {
        mla_decode_launch(gpu, &buffers, &mut out, &mut lse, &dims, 0.135_233_78, true)
    })?;
    let rows = (batch * s_q * heads) as f64;
    let moved = 2.0 * (rows * D_QK as f64 + (batch * len * D_QK) as f64 + rows * D_V as f64);
    let flops = rows * len as f64 * 2.0 * (D_QK + D_V) as f64;
    Ok(BenchRow {
        kernel: "mla_decode bf16".into(),
        shape: format!("b={batch} s_q={s_q} h={heads} T={len}"),
        ms,
        tflops: Some(flops / ms / 1e9),
        gbps: Some(moved / ms / 1e6),
    })
}
