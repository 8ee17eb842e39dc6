//! The model forward's fast path: every Linear of `dsv3 forward` computed by vectorised,
//! multi-threaded kernels **bit-identical** to the readable `dsv3_reference::linear::linear`,
//! which stays the definition (`dsv3 forward --readable` runs it).
//!
//! Why the plain precisions (`f32`, `bf16`) can be identical: the reference sums
//! `f64(x[m, k]) · f64(W[n, k])` over k in ascending order, one f64 addition per k, then rounds
//! once to f32. Both factors are f32 values (bf16 ones under `bf16`), so each product is exact in
//! f64 (at most 24 + 24 significant bits): a fused multiply-add computes the very same sum, and
//! so does any kernel that keeps the order of k within each output element. This one runs 16
//! output features in the 16 lanes of two f64 vectors, k in order in every lane: each strip of
//! 16 weight rows is decoded once (FP8 codes × `weight_scale_inv` with the reference's one f32
//! multiply, BF16 widened, F32 as stored; rounded to bf16 under `bf16` as the reference's
//! `rows_f32`) into an L2-resident panel `[K][16]`, which every token then reads; strips run in
//! parallel (rayon), and the weight is never materialised as a whole. Decoding an FP8 code
//! places E4M3's exponent and mantissa bits in f32's fields with the bias moved (subnormal codes
//! through one exact subtraction, never an f32 subnormal: they are slow on x86), tested against
//! the reference's decoder on every code.
//!
//! The `fp8` precision runs the reference's [`fp8_linear_with`] with the registry's fast
//! block-scaled GEMM (`crate::ops::gemm::fast`, itself bit-identical to `fp8_gemm`) after the
//! reference's own validation of the operands.
//!
//! Anything the kernels do not take (a NaN code, a non-positive scale, a shape mismatch, no rows)
//! is left to the readable loops, which produce their errors word for word. `tests/model_fast.rs`
//! checks the identity on every stored form and precision, and the whole forward (prefill,
//! decode, MTP) against the readable one.

use half::bf16;
use ndarray::{Array2, ArrayView2};
use rayon::prelude::*;

use dsv3_reference::error::Result;
use dsv3_reference::fp8::fp8_gemm::{check_gemm, BlockScaled, OFF_NAMES};
use dsv3_reference::fp8::Accumulation;
use dsv3_reference::linear::{fp8_linear_with, with_backend, Linear, Precision, Stored};
use dsv3_reference::numeric::bf16_round_f32;

use crate::ops::gemm::fast;

/// Output features per strip: the lanes of two f64 vectors.
const LANES: usize = 16;
/// Strips per parallel task.
const STRIPS_PER_TASK: usize = 4;

/// Run `f` (a forward) with every Linear on this thread computed by the fast kernels.
pub fn install<R>(f: impl FnOnce() -> R) -> R {
    with_backend(Some(backend), f)
}

/// The backend: `None` leaves the call to the readable loops.
fn backend(x: ArrayView2<f32>, l: &Linear, precision: Precision) -> Option<Result<Array2<f32>>> {
    let w = &l.weight;
    let bias_fits = l.bias.as_ref().is_none_or(|b| b.len() == w.rows);
    let empty = x.nrows() == 0 || w.rows == 0 || w.cols == 0;
    if x.ncols() != w.cols || empty || !bias_fits || w.validate().is_err() {
        return None;
    }
    match precision {
        Precision::Fp8 { scale_fmt } => Some(fp8_linear_with(x, l, scale_fmt, &fp8_gemm_fast)),
        _ => plain(x, l, precision.rounds_to_bf16()).map(Ok),
    }
}

/// `fp8_gemm` with exact block dots: the reference's checks, then the fast path.
fn fp8_gemm_fast(
    a: ArrayView2<u8>,
    a_s: ArrayView2<f32>,
    b: ArrayView2<u8>,
    b_s: ArrayView2<f32>,
    block: usize,
) -> Result<Array2<f32>> {
    let (a, b) = (BlockScaled::tiles(a, a_s), BlockScaled::blocks(b, b_s));
    check_gemm("fp8_gemm", &OFF_NAMES, a, b, block, &Accumulation::Exact)?;
    Ok(fast::gemm(a, b, block, &Accumulation::Exact, false).c)
}

/// The `f32`/`bf16` Linear (module docs); `None` when a weight value cannot be decoded (a NaN
/// code or a scale that is not finite and positive: the readable path names it).
fn plain(x: ArrayView2<f32>, l: &Linear, to_bf16: bool) -> Option<Array2<f32>> {
    let w = &l.weight;
    let (m, k, n) = (x.nrows(), w.cols, w.rows);
    if let Stored::Fp8 { scale_inv, .. } = &w.stored {
        if scale_inv.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            return None;
        }
    }
    // the activations as the reference reads them: [M, K] f64
    let x64: Vec<f64> = x
        .iter()
        .map(|&v| f64::from(if to_bf16 { bf16_round_f32(v) } else { v }))
        .collect();
    let strips = n.div_ceil(LANES);
    // y transposed, [N (padded to the strips), M]: each strip writes its own run
    let mut yt = vec![0f32; strips * LANES * m];
    let ok = yt
        .par_chunks_mut(STRIPS_PER_TASK * LANES * m)
        .enumerate()
        .map_init(
            || Scratch {
                rows: vec![0f32; LANES * k],
                panel: vec![0f64; k * LANES],
            },
            |scratch, (t, out)| {
                for (i, out) in out.chunks_mut(LANES * m).enumerate() {
                    let n0 = (t * STRIPS_PER_TASK + i) * LANES;
                    if !strip(l, (n0, to_bf16), (&x64, m), scratch, out) {
                        return false;
                    }
                }
                true
            },
        )
        .all(|ok| ok);
    if !ok {
        return None;
    }
    Some(Array2::from_shape_fn((m, n), |(r, c)| yt[c * m + r]))
}

/// One strip: [`decode_strip`], then [`strip_dots`], compiled for the best instruction set
/// this CPU has (AVX-512F, AVX2, or portable; chosen at run time). `false` on a NaN code.
fn strip(
    l: &Linear,
    at: (usize, bool),
    x: (&[f64], usize),
    scratch: &mut Scratch,
    out: &mut [f32],
) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::isa::{isa, Isa};
        match isa() {
            // SAFETY: the level's detected features include every one the function enables.
            Isa::Avx512 => return unsafe { strip_avx512(l, at, x, scratch, out) },
            // SAFETY: as above.
            Isa::Avx2 => return unsafe { strip_avx2(l, at, x, scratch, out) },
            Isa::Portable => {}
        }
    }
    strip_here(l, at, x, scratch, out)
}

/// [`strip_here`] compiled for AVX-512F.
///
/// SAFETY (for callers): the CPU must support every feature enabled here.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2")]
unsafe fn strip_avx512(
    l: &Linear,
    at: (usize, bool),
    x: (&[f64], usize),
    scratch: &mut Scratch,
    out: &mut [f32],
) -> bool {
    strip_here(l, at, x, scratch, out)
}

/// [`strip_here`] compiled for AVX2.
///
/// SAFETY (for callers): the CPU must support every feature enabled here.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn strip_avx2(
    l: &Linear,
    at: (usize, bool),
    x: (&[f64], usize),
    scratch: &mut Scratch,
    out: &mut [f32],
) -> bool {
    strip_here(l, at, x, scratch, out)
}

#[inline(always)]
fn strip_here(
    l: &Linear,
    (n0, to_bf16): (usize, bool),
    x: (&[f64], usize),
    scratch: &mut Scratch,
    out: &mut [f32],
) -> bool {
    decode_strip(l, n0, to_bf16, scratch) && {
        strip_dots(l, (n0, to_bf16), x, &scratch.panel, out);
        true
    }
}

/// A task's buffers: a strip's 16 decoded rows `[16][K]` (f32) and its panel `[K][16]` (f64).
struct Scratch {
    rows: Vec<f32>,
    panel: Vec<f64>,
}

/// Rows `n0..n0 + 16` of the weight (past the end: 0) into `scratch.panel[k][lane]` as the
/// reference's `rows_f32` yields them (f32, rounded to bf16 when `to_bf16`), widened to f64:
/// each row decoded into `scratch.rows` (contiguous, vectorised), then 16 × 16 tiles
/// transposed into the panel. `false` on a NaN code.
#[inline(always)]
fn decode_strip(l: &Linear, n0: usize, to_bf16: bool, scratch: &mut Scratch) -> bool {
    let w = &l.weight;
    let k = w.cols;
    for (lane, row) in scratch.rows.chunks_exact_mut(k).enumerate() {
        let n = n0 + lane;
        if n >= w.rows {
            row.fill(0.0);
            continue;
        }
        match &w.stored {
            Stored::Values(v) => {
                for (x, &v) in row.iter_mut().zip(v.row(n)) {
                    *x = v;
                }
            }
            Stored::F32(b) => {
                for (x, c) in row
                    .iter_mut()
                    .zip(b[4 * n * k..4 * (n + 1) * k].chunks_exact(4))
                {
                    *x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            Stored::Bf16(b) => {
                for (x, c) in row
                    .iter_mut()
                    .zip(b[2 * n * k..2 * (n + 1) * k].chunks_exact(2))
                {
                    *x = bf16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            Stored::Fp8 {
                codes,
                scale_inv,
                block,
            } => {
                let codes = &codes[n * k..(n + 1) * k];
                // every code read, no early exit: the loop vectorises
                let nan = codes
                    .iter()
                    .fold(0u8, |a, &c| a | u8::from(c & 0x7F == 0x7F));
                if nan != 0 {
                    return false;
                }
                let scales = scale_inv.row(n / block);
                for ((xs, cs), &s) in row
                    .chunks_mut(*block)
                    .zip(codes.chunks(*block))
                    .zip(scales.iter())
                {
                    for (x, &c) in xs.iter_mut().zip(cs) {
                        *x = e4m3_to_f32(c) * s;
                    }
                }
            }
        }
        if to_bf16 {
            row.iter_mut().for_each(|x| *x = bf16_round_f32(*x));
        }
    }
    let (rows, panel) = (&scratch.rows, &mut scratch.panel);
    for kk0 in (0..k).step_by(LANES) {
        let width = LANES.min(k - kk0);
        let mut tile = [[0f32; LANES]; LANES];
        for (lane, t) in tile.iter_mut().enumerate() {
            t[..width].copy_from_slice(&rows[lane * k + kk0..lane * k + kk0 + width]);
        }
        let dst = &mut panel[kk0 * LANES..(kk0 + width) * LANES];
        if width == LANES {
            for i in 0..LANES {
                for lane in 0..LANES {
                    dst[i * LANES + lane] = f64::from(tile[lane][i]);
                }
            }
        } else {
            for i in 0..width {
                for lane in 0..LANES {
                    dst[i * LANES + lane] = f64::from(tile[lane][i]);
                }
            }
        }
    }
    true
}

/// `out[lane·M + m] = f32(Σ_k x[m, k]·W[n0 + lane, k] (+ b))` (rounded to bf16 when the
/// reference rounds its output), k in ascending order in every lane; `acc + x·w` with the
/// product exact, so with or without a fused multiply-add.
#[inline(always)]
fn strip_dots(
    l: &Linear,
    (n0, to_bf16): (usize, bool),
    (x64, m): (&[f64], usize),
    panel: &[f64],
    out: &mut [f32],
) {
    let k = l.weight.cols;
    for t in 0..m {
        let xt = &x64[t * k..(t + 1) * k];
        let mut acc = [0f64; LANES];
        for (&xv, p) in xt.iter().zip(panel.chunks_exact(LANES)) {
            for j in 0..LANES {
                acc[j] += xv * p[j];
            }
        }
        for (j, &a) in acc.iter().enumerate() {
            let n = n0 + j;
            let a = match &l.bias {
                Some(b) if n < b.len() => a + f64::from(b[n]),
                _ => a,
            };
            out[j * m + t] = if to_bf16 {
                bf16_round_f32(a as f32)
            } else {
                a as f32
            };
        }
    }
}

/// An E4M3 code's value (not NaN), without touching f32 subnormals (slow on x86): a normal
/// code's exponent and mantissa bits placed in f32's fields with the bias moved from 7 to 127
/// (`2^(e−7)·1.m` exactly); a subnormal one (`2^-6·0.m`) as `2^-6·1.m − 2^-6`, exact; the
/// sign moved.
#[inline(always)]
fn e4m3_to_f32(c: u8) -> f32 {
    let bits = u32::from(c & 0x7F) << 20;
    let magnitude = if c & 0x78 == 0 {
        f32::from_bits(bits + (121 << 23)) - f32::from_bits(121 << 23)
    } else {
        f32::from_bits(bits + (120 << 23))
    };
    f32::from_bits(magnitude.to_bits() | (u32::from(c & 0x80) << 24))
}

#[cfg(test)]
mod tests {
    use super::*;
    use dsv3_reference::fp8::E4M3;

    #[test]
    fn e4m3_decodes_as_the_reference_on_every_code() {
        for c in 0..=255u8 {
            if c & 0x7F == 0x7F {
                continue; // NaN: the readable path reports it
            }
            let want = E4M3.decode(u16::from(c));
            assert_eq!(e4m3_to_f32(c).to_bits(), want.to_bits(), "code {c:#04x}");
        }
    }
}
