//! The fused kernel of the `tensor_core_bound` mode: the exact mode's fused GEMM
//! ([`super::fused`]) with the bound's step recurrence
//! ([`TensorCoreBound::step_exponents`], [`TensorCoreBound::step_finish`]) run on each 6×16
//! micro-tile between its Tensor Core steps, while the window's exact partials are still in
//! registers — no M×N intermediate per step.
//!
//! Per micro-tile, K-block and window, step by step (L products each):
//! 1. the largest pair exponent of every element's step (`e_p`): a max-plus scan over the step's
//!    k of the row's and the column's nominal exponents, 128 i8 lanes (96 used) at once;
//! 2. the exponent bounds from the window so far (`e_c`, `e_u`, the lower bound of `e_max`) and the
//!    threshold below which a product may be cut inexactly;
//! 3. the count of nonzero products below the threshold (a second i8 scan);
//! 4. the step's products added to the window's exact partial (the f64 FMAs of the exact mode:
//!    exact in any order, so the partial is `before.exact + dot` bit for bit);
//! 5. the cut and the write-back added to `Δ`.
//!
//! Every quantity is computed with the reference's IEEE operations in the reference's order
//! (exponents from the f64 bits, which equals `floor_log2` for the values that occur: every
//! nonzero partial and bound of a window is a multiple of at least 2^-95), so the window bounds,
//! and from them the window magnitudes and slacks, are the readable `scaled_dot`'s bit for bit
//! (`tests/fp8_gemm_fast.rs`). The block dots are the windows' exact partials summed (exact), and
//! are promoted as in the exact mode.
//!
//! Exponents are encoded so that one i8 sum serves both scans: a row's nonzero code as
//! `e + 40`, a column's as `e`, a zero code as −64 on both sides. A pair of nonzero codes sums to
//! 28…56 (positive), a pair with a zero to −128…−16 (negative as i8, at least 128 as u8): the
//! signed max finds `e_p + 40`, and an unsigned compare with the threshold (+40, at most 127)
//! never counts a zero product.
//!
//! Taken when the windows tile the K-blocks (`W ≤ B`, `B mod W = 0`, `B ≤ 1024`) and a step has
//! at most 255 products; else the blocked-GEMM path with [`super::lanes`].

use dsv3_reference::fp8::fp8_gemm::e4m3_values;
use dsv3_reference::fp8::tc_bound::{e4m3_exponent, TensorCoreBound};

use crate::registry::tolerance::TcBoundTolerance;
use rayon::prelude::*;

use super::fused::{pack, promote, MAX_FUSED_BLOCK, MR, NC, NR};
use super::lanes::{exponents_lane, finish_lane, NONE};
use super::Operands;
use crate::isa::{isa, Isa};

/// Output elements of one micro-tile: the lanes of the recurrence.
const LANES: usize = MR * NR;
/// The exponent lanes of a micro-tile: [`LANES`] and 32 spare ones (zero codes), so that a
/// step's scans run on two 64-byte vectors.
const EXP_LANES: usize = 128;
/// Rows of one task (a multiple of [`MR`]; 192 measured a little faster than 96 or 288).
const MC: usize = 192;
/// The row side's exponent bias (module docs).
const BIAS: i32 = 40;
/// The exponent code of a zero.
const ZERO: i8 = -64;

/// Whether the fused bound kernel takes a GEMM with these blocks, windows and steps.
pub(super) fn fits(block_size: usize, window: usize, group: usize) -> bool {
    block_size <= MAX_FUSED_BLOCK
        && window <= block_size
        && block_size % window == 0
        && group.min(window) <= 255
}

/// The bound mode, fused (validated inputs, [`fits`]): `c [M·N]` f32 accumulators, `magnitude`,
/// `window_magnitude` (`Σ_w |P_w|·a_s·b_s`) and `slack` (`Σ_w Δ_w·a_s·b_s`), all zero on entry.
pub(super) fn bound_fused(
    ops: &Operands,
    (bound, window): (&TensorCoreBound, usize),
    c: &mut [f32],
    magnitude: &mut [f64],
    (window_magnitude, slack): (&mut [f64], &mut [f64]),
) {
    let out = Out {
        c: c.as_mut_ptr(),
        extras: Extras::Sums {
            magnitude: magnitude.as_mut_ptr(),
            window_magnitude: window_magnitude.as_mut_ptr(),
            slack: slack.as_mut_ptr(),
        },
    };
    bound_fused_into(ops, (bound, window), out)
}

/// [`bound_fused`] with each element's tolerance `tolerance.of(M_b, M_w, D)` written as
/// little-endian f64 bytes (`[8·M·N]`) from the tile, instead of the three sums: no M×N arrays
/// beyond the accumulators and the tolerances.
pub(super) fn bound_fused_tolerance(
    ops: &Operands,
    (bound, window): (&TensorCoreBound, usize),
    c: &mut [f32],
    (tolerance, bytes): (&TcBoundTolerance, &mut [u8]),
) {
    debug_assert_eq!(bytes.len(), 8 * c.len());
    let out = Out {
        c: c.as_mut_ptr(),
        extras: Extras::Tolerance {
            bytes: bytes.as_mut_ptr(),
            tolerance: *tolerance,
        },
    };
    bound_fused_into(ops, (bound, window), out)
}

fn bound_fused_into(ops: &Operands, (bound, window): (&TensorCoreBound, usize), out: Out) {
    let values = e4m3_values();
    let (m, n) = (ops.a.nrows(), ops.b.nrows());
    debug_assert!(fits(ops.block_size, window, bound.group));
    let enc = |bias: i32| -> [i8; 256] {
        std::array::from_fn(|code| e4m3_exponent(code as u8).map_or(ZERO, |e| (e + bias) as i8))
    };
    let job = Job {
        ops,
        a: ops.a.as_slice().expect("standard layout"),
        b: ops.b.as_slice().expect("standard layout"),
        values: &values,
        enc: (enc(BIAS), enc(0)),
        frac_bits: bound.frac_bits as i32,
        window,
        group: bound.group.min(window),
        out,
    };
    let tiles: Vec<(usize, usize)> = (0..m.div_ceil(MC))
        .flat_map(|rt| (0..n.div_ceil(NC)).map(move |ct| (rt * MC, ct * NC)))
        .collect();
    let isa = isa();
    tiles.into_par_iter().for_each(|(r0, n0)| match isa {
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
struct Job<'a, 'b> {
    ops: &'a Operands<'b>,
    a: &'a [u8],
    b: &'a [u8],
    values: &'a [f64; 256],
    /// Exponent codes of a row's and a column's E4M3 codes.
    enc: ([i8; 256], [i8; 256]),
    frac_bits: i32,
    window: usize,
    /// Products per step (at most the window).
    group: usize,
    out: Out,
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,fma,bmi1,bmi2,lzcnt,popcnt")]
unsafe fn tile_avx512(job: &Job, r0: usize, n0: usize) {
    tile(job, r0, n0)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,bmi1,bmi2,lzcnt,popcnt")]
unsafe fn tile_avx2(job: &Job, r0: usize, n0: usize) {
    tile(job, r0, n0)
}

/// One task: rows `r0..r0 + MC` × columns `n0..n0 + NC` of the output (clipped), every K-block.
#[inline(always)]
fn tile(job: &Job, r0: usize, n0: usize) {
    let ops = job.ops;
    let (m, k, n) = (ops.a.nrows(), ops.a.ncols(), ops.b.nrows());
    let bs = ops.block_size;
    let (mr, nc) = (MC.min(m - r0), NC.min(n - n0));
    let (panels_a, panels_b) = (mr.div_ceil(MR), nc.div_ceil(NR));
    let mut apack = vec![0f64; panels_a * MR * bs];
    let mut bpack = vec![0f64; panels_b * NR * bs];
    // exponents per micro-tile lane: a row's repeated over the tile's 16 columns, a column's
    // over its 6 rows, [panel][k][lane]
    let mut aexp = vec![[ZERO; EXP_LANES]; panels_a * bs];
    let mut bexp = vec![[ZERO; EXP_LANES]; panels_b * bs];
    let mut sa = vec![0f32; mr];
    let mut sb = vec![0f32; nc];
    let len = mr * nc;
    let (mut c_tile, mut mag_tile) = (vec![0f32; len], vec![0f64; len]);
    let (mut wmag_tile, mut slack_tile) = (vec![0f64; len], vec![0f64; len]);
    for (kb, k0) in (0..k).step_by(bs).enumerate() {
        let kc = bs.min(k - k0);
        pack(&mut apack, job.a, (r0, mr, MR), (k, k0, kc), job.values);
        pack(&mut bpack, job.b, (n0, nc, NR), (k, k0, kc), job.values);
        pack_exponents(
            &mut aexp,
            job.a,
            (r0, mr),
            (k, k0, kc),
            &job.enc.0,
            Side::Row,
        );
        pack_exponents(
            &mut bexp,
            job.b,
            (n0, nc),
            (k, k0, kc),
            &job.enc.1,
            Side::Column,
        );
        for (i, s) in sa.iter_mut().enumerate() {
            *s = ops.a_scale(r0 + i, kb);
        }
        for (j, s) in sb.iter_mut().enumerate() {
            *s = ops.b_scale(n0 + j, kb);
        }
        for pb in 0..panels_b {
            let bp = &bpack[pb * NR * kc..(pb + 1) * NR * kc];
            let be = &bexp[pb * kc..(pb + 1) * kc];
            let cols = NR.min(nc - pb * NR);
            for pa in 0..panels_a {
                let ap = &apack[pa * MR * kc..(pa + 1) * MR * kc];
                let ae = &aexp[pa * kc..(pa + 1) * kc];
                let rows = MR.min(mr - pa * MR);
                let mut block_dot = [0f64; LANES];
                for w0 in (0..kc).step_by(job.window) {
                    let w1 = (w0 + job.window).min(kc);
                    let (exact, delta) = window(job, (ap, bp), (ae, be), w0..w1);
                    // the window's scale pair (its K-block's), exact in f64; its bound
                    for i in 0..rows {
                        let r = pa * MR + i;
                        let s_a = f64::from(sa[r]);
                        let at = r * nc + pb * NR;
                        let lanes = i * NR..i * NR + cols;
                        for ((((wm, sl), &x), &d), &s_b) in wmag_tile[at..at + cols]
                            .iter_mut()
                            .zip(&mut slack_tile[at..at + cols])
                            .zip(&exact[lanes.clone()])
                            .zip(&delta[lanes])
                            .zip(&sb[pb * NR..pb * NR + cols])
                        {
                            let s = s_a * f64::from(s_b);
                            *wm += x.abs() * s;
                            *sl += d * s;
                        }
                    }
                    // the windows tile the block: their exact partials sum to its exact dot
                    for (bd, &x) in block_dot.iter_mut().zip(&exact) {
                        *bd += x;
                    }
                }
                for i in 0..rows {
                    let r = pa * MR + i;
                    let at = r * nc + pb * NR;
                    promote(
                        &mut c_tile[at..at + cols],
                        Some(&mut mag_tile[at..at + cols]),
                        &block_dot[i * NR..i * NR + cols],
                        sa[r],
                        &sb[pb * NR..pb * NR + cols],
                    );
                }
            }
        }
    }
    for r in 0..mr {
        let at = (r0 + r) * n + n0;
        // SAFETY: row r0 + r < m, columns n0 .. n0 + nc ≤ n: inside every output (all M·N), and
        // inside this task's tile, which no other task touches.
        let (c_run, extras) = unsafe { job.out.runs(at, nc) };
        let here = r * nc..(r + 1) * nc;
        c_run.copy_from_slice(&c_tile[here.clone()]);
        match extras {
            ExtraRuns::Sums(m, wm, sl) => {
                m.copy_from_slice(&mag_tile[here.clone()]);
                wm.copy_from_slice(&wmag_tile[here.clone()]);
                sl.copy_from_slice(&slack_tile[here]);
            }
            ExtraRuns::Tolerance(bytes, tolerance) => {
                for (((b, &m), &wm), &sl) in bytes
                    .chunks_exact_mut(8)
                    .zip(&mag_tile[here.clone()])
                    .zip(&wmag_tile[here.clone()])
                    .zip(&slack_tile[here])
                {
                    b.copy_from_slice(&tolerance.of(m, wm, sl).to_le_bytes());
                }
            }
        }
    }
}

/// One promotion window `ks` (K-offsets inside the block) of one micro-tile, step by step:
/// every lane's exact partial and `Δ` ([`TensorCoreBound::window`]).
#[inline(always)]
fn window(
    job: &Job,
    (ap, bp): (&[f64], &[f64]),
    (ae, be): (&[[i8; EXP_LANES]], &[[i8; EXP_LANES]]),
    ks: std::ops::Range<usize>,
) -> ([f64; LANES], [f64; LANES]) {
    let f = job.frac_bits;
    let mut acc = [[0f64; NR]; MR];
    let mut delta = [0f64; LANES];
    for s0 in ks.clone().step_by(job.group) {
        let s1 = (s0 + job.group).min(ks.end);
        let has_c = s0 > ks.start;
        let emax = max_scan(&ae[s0..s1], &be[s0..s1]);
        let before = Exponents::of(f, has_c, &emax, acc.as_flattened(), &delta);
        let count = count_scan(&ae[s0..s1], &be[s0..s1], &before.threshold);
        kernel_into(&mut acc, &ap[s0 * MR..s1 * MR], &bp[s0 * NR..s1 * NR]);
        finish(f, &before, &count, acc.as_flattened(), &mut delta);
    }
    let mut exact = [0f64; LANES];
    exact.copy_from_slice(acc.as_flattened());
    (exact, delta)
}

/// `acc[i][j] += Σ_k a[k·MR + i]·b[k·NR + j]` over packed panels (the exact mode's kernel,
/// continuing a window's partial).
#[inline(always)]
fn kernel_into(acc_io: &mut [[f64; NR]; MR], a: &[f64], b: &[f64]) {
    let mut acc = *acc_io;
    for (ak, bk) in a.chunks_exact(MR).zip(b.chunks_exact(NR)) {
        for i in 0..MR {
            let x = ak[i];
            for j in 0..NR {
                acc[i][j] = x.mul_add(bk[j], acc[i][j]);
            }
        }
    }
    *acc_io = acc;
}

/// Every lane's largest pair code over the step: `e_p + 40`, or negative when every product is
/// zero.
#[inline(always)]
fn max_scan(ae: &[[i8; EXP_LANES]], be: &[[i8; EXP_LANES]]) -> [i8; EXP_LANES] {
    let mut m = [i8::MIN; EXP_LANES];
    for (a, b) in ae.iter().zip(be) {
        for l in 0..EXP_LANES {
            m[l] = m[l].max(a[l].wrapping_add(b[l]));
        }
    }
    m
}

/// Every lane's nonzero products with a pair code below its threshold.
#[inline(always)]
fn count_scan(
    ae: &[[i8; EXP_LANES]],
    be: &[[i8; EXP_LANES]],
    threshold: &[u8; EXP_LANES],
) -> [u8; EXP_LANES] {
    let mut n = [0u8; EXP_LANES];
    for (a, b) in ae.iter().zip(be) {
        for l in 0..EXP_LANES {
            n[l] += u8::from((a[l].wrapping_add(b[l]) as u8) < threshold[l]);
        }
    }
    n
}

/// The first half of a step for every lane ([`TensorCoreBound::step_exponents`]).
struct Exponents {
    e_p: [i32; LANES],
    e_u: [i32; LANES],
    e_max_lower: [i32; LANES],
    has_c: [u8; LANES],
    /// The count's threshold, `e_u − F + 6 + 40` clamped to 0…127.
    threshold: [u8; EXP_LANES],
}

impl Exponents {
    #[inline(always)]
    fn of(
        f: i32,
        has_c: bool,
        emax: &[i8; EXP_LANES],
        exact: &[f64],
        delta: &[f64; LANES],
    ) -> Self {
        let mut x = Exponents {
            e_p: [0; LANES],
            e_u: [0; LANES],
            e_max_lower: [0; LANES],
            has_c: [0; LANES],
            threshold: [0; EXP_LANES],
        };
        for l in 0..LANES {
            let ep = if emax[l] > 0 {
                i32::from(emax[l]) - BIAS
            } else {
                NONE
            };
            let (eu, eml, hc) = exponents_lane(has_c, ep, exact[l], delta[l]);
            x.e_p[l] = ep;
            x.e_u[l] = eu;
            x.e_max_lower[l] = eml;
            x.has_c[l] = u8::from(hc);
            // a product of nominal exponent e is inexact iff e − 6 < e_u − F
            x.threshold[l] = (eu - f + 6 + BIAS).clamp(0, 127) as u8;
        }
        x
    }
}

/// The second half of a step for every lane ([`TensorCoreBound::step_finish`]): `exact` is the
/// partial after the step, `delta` is updated.
#[inline(always)]
fn finish(f: i32, x: &Exponents, count: &[u8; EXP_LANES], exact: &[f64], delta: &mut [f64; LANES]) {
    for l in 0..LANES {
        delta[l] = finish_lane(
            f,
            (x.e_p[l], x.e_u[l], x.e_max_lower[l]),
            u32::from(count[l] + x.has_c[l]),
            delta[l],
            exact[l],
        );
    }
}

/// Which side of the product a panel of exponents is.
#[derive(Clone, Copy, PartialEq)]
enum Side {
    /// `MR` rows, each repeated over the micro-tile's `NR` columns.
    Row,
    /// `NR` columns, each repeated over the micro-tile's `MR` rows.
    Column,
}

/// The exponent codes of rows `r0..r0 + rows` of `codes` (`[_, k]`), K-range `k0..k0 + kc`,
/// as micro-tile lanes: `dst[p·kc + kk][i·NR + j]` is the code of row/column `p·width + i`
/// (rows) or `p·width + j` (columns); past the end: zero.
#[inline(always)]
fn pack_exponents(
    dst: &mut [[i8; EXP_LANES]],
    codes: &[u8],
    (r0, rows): (usize, usize),
    (k, k0, kc): (usize, usize, usize),
    enc: &[i8; 256],
    side: Side,
) {
    let width = if side == Side::Row { MR } else { NR };
    for p in 0..rows.div_ceil(width) {
        let here = width.min(rows - p * width);
        let panel = &mut dst[p * kc..(p + 1) * kc];
        for (kk, lanes) in panel.iter_mut().enumerate() {
            let mut e = [ZERO; NR];
            for (r, x) in e.iter_mut().enumerate().take(here) {
                *x = enc[usize::from(codes[(r0 + p * width + r) * k + k0 + kk])];
            }
            for i in 0..MR {
                for j in 0..NR {
                    lanes[i * NR + j] = if side == Side::Row { e[i] } else { e[j] };
                }
            }
        }
    }
}

/// What goes out beside the accumulators.
enum Extras {
    /// `Σ|p|·a_s·b_s`, `Σ_w |P_w|·a_s·b_s` and `Σ_w Δ_w·a_s·b_s`, each `[M·N]` f64.
    Sums {
        magnitude: *mut f64,
        window_magnitude: *mut f64,
        slack: *mut f64,
    },
    /// Each element's tolerance from those sums, `[8·M·N]` little-endian bytes.
    Tolerance {
        bytes: *mut u8,
        tolerance: TcBoundTolerance,
    },
}

/// A run of the [`Extras`].
enum ExtraRuns<'a> {
    Sums(&'a mut [f64], &'a mut [f64], &'a mut [f64]),
    Tolerance(&'a mut [u8], TcBoundTolerance),
}

/// The output buffers, written by the tasks through disjoint tiles.
struct Out {
    c: *mut f32,
    extras: Extras,
}

// SAFETY: the tasks write disjoint tiles (see `runs`' caller); the buffers outlive the parallel
// loop, which borrows them mutably for its whole duration.
unsafe impl Sync for Out {}

impl Out {
    /// The run `at..at + len` of every output (elements; the tolerance bytes `8·at..8·(at + len)`).
    ///
    /// # Safety
    /// The run must lie inside the buffers (each M·N elements long) and be written by no one
    /// else meanwhile.
    #[allow(clippy::mut_from_ref)]
    unsafe fn runs(&self, at: usize, len: usize) -> (&mut [f32], ExtraRuns<'_>) {
        let part = |p: *mut f64| std::slice::from_raw_parts_mut(p.add(at), len);
        (
            std::slice::from_raw_parts_mut(self.c.add(at), len),
            match &self.extras {
                Extras::Sums {
                    magnitude,
                    window_magnitude,
                    slack,
                } => ExtraRuns::Sums(part(*magnitude), part(*window_magnitude), part(*slack)),
                Extras::Tolerance { bytes, tolerance } => ExtraRuns::Tolerance(
                    std::slice::from_raw_parts_mut(bytes.add(8 * at), 8 * len),
                    *tolerance,
                ),
            },
        )
    }
}
