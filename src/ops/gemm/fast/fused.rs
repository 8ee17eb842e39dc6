//! The fused exact kernel: each 128-deep block dot computed in registers by a 6×16 f64
//! micro-kernel and promoted at once, `acc + (p·a_s)·b_s` in f32 (the reference's expression),
//! before the next block — no M×N intermediate. Loop order (GotoBLAS with K-blocks as the
//! depth of one pass): a task owns `MC` rows × `NC` columns of the output; per K-block it decodes
//! its `MC × kc` and `kc × NC` E4M3 codes into packed f64 panels (`MR` rows or `NR` columns
//! interleaved per k), then runs the micro-kernel over every `MR × NR` tile and promotes.
//!
//! Why it is bit-identical to the reference: a block dot of E4M3 products is exact in f64 in any
//! order and with or without FMA (products of ≤ 4+4 significant bits, sums within 2^-18 …
//! 2^26 for blocks ≤ 1024: < 53 bits), so the micro-kernel's dot equals the reference's; the
//! promotion then performs the same f32 operations in the same order, block after block
//! (`tests/fp8_gemm_fast.rs`).
//!
//! Dispatch at run time: AVX-512F → AVX2+FMA → portable (the same code compiled three times; the
//! compiler keeps the 6×16 accumulators in registers).

use dsv3_reference::fp8::fp8_gemm::e4m3_values;
use dsv3_reference::numeric::round_to_bf16;
use rayon::prelude::*;

use super::Operands;
use crate::isa::{isa, Isa};

/// Micro-tile: rows × columns of the output per kernel call.
pub(super) const MR: usize = 6;
pub(super) const NR: usize = 16;
/// Rows and columns of one task.
const MC: usize = 256;
pub(super) const NC: usize = 256;
/// The largest block the fused path takes (larger: the blocked-GEMM path).
pub const MAX_FUSED_BLOCK: usize = 1024;

/// `dot[i][j] = Σ_k a[k·MR + i]·b[k·NR + j]`, `k < kc` (packed panels).
#[inline(always)]
fn kernel_body(kc: usize, a: &[f64], b: &[f64]) -> [[f64; NR]; MR] {
    let mut acc = [[0f64; NR]; MR];
    let (a, b) = (&a[..kc * MR], &b[..kc * NR]);
    for (ak, bk) in a.chunks_exact(MR).zip(b.chunks_exact(NR)) {
        for i in 0..MR {
            let x = ak[i];
            for j in 0..NR {
                acc[i][j] = x.mul_add(bk[j], acc[i][j]);
            }
        }
    }
    acc
}

/// Exact mode, fused: `c [M·N]` f32 accumulators (zero on entry), and each element's
/// `Σ |p|·a_s·b_s` into `magnitude` when it is not empty. Block size ≤ [`MAX_FUSED_BLOCK`].
pub(super) fn exact_fused(ops: &Operands, c: &mut [f32], magnitude: &mut [f64]) {
    exact_fused_into(ops, Sink::F32(c.as_mut_ptr()), magnitude)
}

/// Exact mode, fused, the accumulators written as little-endian bytes as they leave their tiles
/// (`bf16`: rounded to bf16, RNE, `[2·M·N]` bytes; else f32, `[4·M·N]`), no f32 M×N array.
pub(super) fn exact_fused_bytes(ops: &Operands, bytes: &mut [u8], bf16: bool) {
    let width = if bf16 { 2 } else { 4 };
    debug_assert_eq!(bytes.len(), width * ops.a.nrows() * ops.b.nrows());
    let sink = if bf16 {
        Sink::Bf16(bytes.as_mut_ptr())
    } else {
        Sink::F32Le(bytes.as_mut_ptr())
    };
    exact_fused_into(ops, sink, &mut [])
}

fn exact_fused_into(ops: &Operands, c: Sink, magnitude: &mut [f64]) {
    let values = e4m3_values();
    let (m, n) = (ops.a.nrows(), ops.b.nrows());
    let bs = ops.block_size;
    debug_assert!(bs <= MAX_FUSED_BLOCK);
    let (a, b) = (
        ops.a.as_slice().expect("standard layout"),
        ops.b.as_slice().expect("standard layout"),
    );
    let with_magnitude = !magnitude.is_empty();
    let isa = isa();
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    let amx = super::amx_chosen();
    let out = Out {
        c,
        magnitude: with_magnitude.then_some(magnitude.as_mut_ptr()),
    };
    // tasks: MC rows × NC columns of the output (the AMX kernel's own sizes), disjoint
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    let (mc, nc) = if amx {
        (super::amx::MC, super::amx::NC)
    } else {
        (MC, NC)
    };
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    let (mc, nc) = (MC, NC);
    let tiles: Vec<(usize, usize)> = (0..m.div_ceil(mc))
        .flat_map(|rt| (0..n.div_ceil(nc)).map(move |ct| (rt * mc, ct * nc)))
        .collect();
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    let a_digits = if amx {
        super::amx::ADigits::of(a, (m, ops.a.ncols(), n), bs)
    } else {
        None
    };
    let job = Job {
        ops,
        a,
        b,
        values: &values,
        out: &out,
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        a_digits: a_digits.as_ref(),
    };
    tiles.into_par_iter().for_each(|(r0, n0)| match isa {
        // SAFETY: chosen only where `amx::available()`.
        #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
        _ if amx => unsafe { super::amx::tile(&job, r0, n0) },
        // SAFETY: each variant is chosen only after detecting the features it is compiled for.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { tile_avx512(&job, r0, n0) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { tile_avx2(&job, r0, n0) },
        Isa::Portable => tile(&job, r0, n0),
    });
}

/// What every tile reads, and where it writes.
pub(super) struct Job<'a, 'b> {
    pub(super) ops: &'a Operands<'b>,
    pub(super) a: &'a [u8],
    pub(super) b: &'a [u8],
    values: &'a [f64; 256],
    pub(super) out: &'a Out,
    /// The AMX kernel's digit tiles of A, when decoded once for the whole GEMM.
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    pub(super) a_digits: Option<&'a super::amx::ADigits>,
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn tile_avx512(job: &Job, r0: usize, n0: usize) {
    tile(job, r0, n0)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2(job: &Job, r0: usize, n0: usize) {
    tile(job, r0, n0)
}

/// One task: rows `r0..r0 + MC` × columns `n0..n0 + NC` of the output (clipped), every K-block.
#[inline(always)]
fn tile(job: &Job, r0: usize, n0: usize) {
    let Job {
        ops,
        a,
        b,
        values,
        out,
        ..
    } = *job;
    let (m, k, n) = (ops.a.nrows(), ops.a.ncols(), ops.b.nrows());
    let bs = ops.block_size;
    let mr = MC.min(m - r0);
    let nc = NC.min(n - n0);
    let panels_b = nc.div_ceil(NR);
    let panels_a = mr.div_ceil(MR);
    let mut apack = vec![0f64; panels_a * MR * bs];
    let mut bpack = vec![0f64; panels_b * NR * bs];
    let mut sa = vec![0f32; mr];
    let mut sb = vec![0f32; nc];
    // the tile's accumulators (and magnitudes), contiguous while the blocks pass (the output's
    // rows lie N apart: a page per row), written out at the end
    let mut c_tile = vec![0f32; mr * nc];
    let mut mag_tile = vec![0f64; if out.magnitude.is_some() { mr * nc } else { 0 }];
    for (kb, k0) in (0..k).step_by(bs).enumerate() {
        let kc = bs.min(k - k0);
        // pack once per block, k outer (contiguous writes; the panel's source rows stay in L1):
        // apack[p][kk][i] = a[r0 + p·MR + i][k0 + kk], bpack[p][kk][j] = b[n0 + p·NR + j][k0 + kk]
        pack(&mut apack, a, (r0, mr, MR), (k, k0, kc), values);
        pack(&mut bpack, b, (n0, nc, NR), (k, k0, kc), values);
        for (i, s) in sa.iter_mut().enumerate() {
            *s = ops.a_scale(r0 + i, kb);
        }
        for (j, s) in sb.iter_mut().enumerate() {
            *s = ops.b_scale(n0 + j, kb);
        }
        // B panel outer: it stays in L1 while every A panel passes
        for pb in 0..panels_b {
            let bp = &bpack[pb * NR * kc..(pb + 1) * NR * kc];
            let cols = NR.min(nc - pb * NR);
            let sbs = &sb[pb * NR..pb * NR + cols];
            for pa in 0..panels_a {
                let ap = &apack[pa * MR * kc..(pa + 1) * MR * kc];
                let dot = kernel_body(kc, ap, bp);
                for (i, dot_row) in dot.iter().enumerate().take(MR.min(mr - pa * MR)) {
                    let r = pa * MR + i;
                    let at = r * nc + pb * NR;
                    let mag_run = (!mag_tile.is_empty()).then(|| &mut mag_tile[at..at + cols]);
                    promote(
                        &mut c_tile[at..at + cols],
                        mag_run,
                        &dot_row[..cols],
                        sa[r],
                        sbs,
                    );
                }
            }
        }
    }
    // SAFETY: the task's rows and columns, clipped to the output; tasks are disjoint.
    unsafe { write_tile(out, (r0, n0, n), (mr, nc), &c_tile, &mag_tile) };
}

/// Write a task's accumulators `c_tile [mr·nc]` (and magnitudes, if kept) to rows
/// `r0..r0 + mr`, columns `n0..n0 + nc` of the `[_, n]` output.
///
/// # Safety
/// Those rows and columns lie inside the output and belong to the calling task alone.
#[inline(always)]
pub(super) unsafe fn write_tile(
    out: &Out,
    (r0, n0, n): (usize, usize, usize),
    (mr, nc): (usize, usize),
    c_tile: &[f32],
    mag_tile: &[f64],
) {
    for r in 0..mr {
        // SAFETY: row r0 + r, columns n0 .. n0 + nc: inside c (and magnitude, same shape), and
        // this task's alone (the caller's contract).
        let (c_run, mag_run) = unsafe { out.run((r0 + r) * n + n0, nc) };
        let acc = &c_tile[r * nc..(r + 1) * nc];
        match c_run {
            Run::F32(c) => c.copy_from_slice(acc),
            Run::F32Le(bytes) => {
                for (b, &v) in bytes.chunks_exact_mut(4).zip(acc) {
                    b.copy_from_slice(&v.to_le_bytes());
                }
            }
            Run::Bf16(bytes) => {
                for (b, &v) in bytes.chunks_exact_mut(2).zip(acc) {
                    b.copy_from_slice(&round_to_bf16(v).to_le_bytes());
                }
            }
        }
        if let Some(mag) = mag_run {
            mag.copy_from_slice(&mag_tile[r * nc..(r + 1) * nc]);
        }
    }
}

/// Decode rows `r0..r0 + rows` of `codes` (`[_, k]` row-major), K-range `k0..k0 + kc`, into
/// panels of `width` rows interleaved per k: `dst[p][kk][i]` (rows past the end as 0).
#[inline(always)]
pub(super) fn pack(
    dst: &mut [f64],
    codes: &[u8],
    (r0, rows, width): (usize, usize, usize),
    (k, k0, kc): (usize, usize, usize),
    values: &[f64; 256],
) {
    for p in 0..rows.div_ceil(width) {
        let panel = &mut dst[p * width * kc..(p + 1) * width * kc];
        let here = width.min(rows - p * width);
        for (kk, slot) in panel.chunks_exact_mut(width).enumerate() {
            for (i, x) in slot.iter_mut().enumerate() {
                *x = if i < here {
                    values[usize::from(codes[(r0 + p * width + i) * k + k0 + kk])]
                } else {
                    0.0
                };
            }
        }
    }
}

/// The reference's promotion of one block for a run of columns: `p = f32(dot)`,
/// `acc += (p·a_s)·b_s`, and `magnitude += |p|·a_s·b_s` (f64).
#[inline(always)]
pub(super) fn promote(
    c: &mut [f32],
    magnitude: Option<&mut [f64]>,
    dots: &[f64],
    s_a: f32,
    s_b: &[f32],
) {
    for ((acc, &d), &sb) in c.iter_mut().zip(dots).zip(s_b) {
        let p = d as f32;
        *acc += p * s_a * sb;
    }
    if let Some(mag) = magnitude {
        for ((mg, &d), &sb) in mag.iter_mut().zip(dots).zip(s_b) {
            let p = d as f32;
            *mg += f64::from(p.abs()) * f64::from(s_a) * f64::from(sb);
        }
    }
}

/// Where the accumulators go: f32 values, or as little-endian bytes, f32 or rounded to bf16.
#[derive(Clone, Copy)]
enum Sink {
    F32(*mut f32),
    F32Le(*mut u8),
    Bf16(*mut u8),
}

/// A run of the accumulators' [`Sink`].
enum Run<'a> {
    F32(&'a mut [f32]),
    F32Le(&'a mut [u8]),
    Bf16(&'a mut [u8]),
}

/// The output buffers, written by the tasks through disjoint tiles.
pub(super) struct Out {
    c: Sink,
    magnitude: Option<*mut f64>,
}

// SAFETY: the tasks write disjoint tiles (see `run`'s callers); the buffers outlive the parallel
// loop, which borrows them mutably for its whole duration.
unsafe impl Sync for Out {}

impl Out {
    /// Whether the magnitudes are wanted.
    pub(super) fn magnitude_kept(&self) -> bool {
        self.magnitude.is_some()
    }

    /// The run `at..at + len` of the accumulators and of the magnitudes.
    ///
    /// # Safety
    /// The run must lie inside the buffers and be written by no one else meanwhile.
    #[allow(clippy::mut_from_ref)]
    unsafe fn run(&self, at: usize, len: usize) -> (Run<'_>, Option<&mut [f64]>) {
        (
            match self.c {
                Sink::F32(p) => Run::F32(std::slice::from_raw_parts_mut(p.add(at), len)),
                Sink::F32Le(p) => {
                    Run::F32Le(std::slice::from_raw_parts_mut(p.add(4 * at), 4 * len))
                }
                Sink::Bf16(p) => Run::Bf16(std::slice::from_raw_parts_mut(p.add(2 * at), 2 * len)),
            },
            self.magnitude
                .map(|p| std::slice::from_raw_parts_mut(p.add(at), len)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The micro-kernel computes the panel dots exactly (every E4M3 product pair summed in
    /// any order is exact in f64), here against a plain loop over all 256² code pairs; and its
    /// throughput on L1-resident panels is printed (SPEC.md "Fast path" quotes it).
    #[test]
    fn kernel_dots_are_exact_and_its_throughput_is_printed() {
        let values = e4m3_values();
        let kc = 128;
        let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        let pick = |i: usize| finite[(i * 2_654_435_761) % finite.len()];
        let a: Vec<f64> = (0..MR * kc).map(|i| pick(i + 1)).collect();
        let b: Vec<f64> = (0..NR * kc).map(|i| pick(7 * i + 3)).collect();
        let dot = kernel_body(kc, &a, &b);
        for (i, row) in dot.iter().enumerate() {
            for (j, &d) in row.iter().enumerate() {
                let want: f64 = (0..kc).rev().map(|k| a[k * MR + i] * b[k * NR + j]).sum();
                assert_eq!(d.to_bits(), want.to_bits(), "[{i}, {j}]");
            }
        }
        let isa = isa();
        let calls = 200_000;
        let t = std::time::Instant::now();
        let mut sink = 0.0;
        for _ in 0..calls {
            let d = match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: Avx512 is chosen only where the CPU has the features.
                Isa::Avx512 => unsafe { kernel_avx512_probe(kc, &a, &b) },
                _ => kernel_body(kc, &a, &b),
            };
            sink += d[0][0];
        }
        let flops = 2.0 * (MR * NR * kc) as f64 * calls as f64;
        println!(
            "micro-kernel: {:.1} GFLOP/s on one core (checksum {sink})",
            flops / t.elapsed().as_secs_f64() / 1e9
        );
    }

    /// The AVX-512 build of the kernel, as the tiles call it.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,fma")]
    unsafe fn kernel_avx512_probe(kc: usize, a: &[f64], b: &[f64]) -> [[f64; NR]; MR] {
        kernel_body(kc, a, b)
    }
}
