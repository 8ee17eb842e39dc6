//! Fast paths of the FP8 GEMM ops, **bit-identical** to the readable reference
//! (`dsv3_reference::fp8::fp8_gemm`), which stays the definition. `tests/fp8_gemm_fast.rs`
//! proves the identity on random shapes, K not a multiple of the block, zero tiles and outliers.
//!
//! Why the exact mode can be fast and still identical: a block dot of E4M3 products is exact in
//! f64 in any order (at most 43 significant bits for B = 128), so a blocked f64 GEMM
//! (`matrixmultiply::dgemm`, SIMD and FMA, any internal order) yields the very same f64 block
//! dots as the reference's plain loop. Everything after that (the rounding to f32, `(p·a_s)·b_s`,
//! the f32 accumulation in ascending block order) is done element by element with the same
//! expressions in the same order. Rows are spread over threads with rayon; each output element
//! is computed by exactly one thread.
//!
//! The Tensor Core mode calls the reference's per-element [`scaled_dot`] itself, rows in
//! parallel: identical by construction.
//!
//! Callers validate inputs first with the reference's `check_*` functions.

use ndarray::{Array2, ArrayView2, ArrayView3, Axis};
use rayon::prelude::*;

use dsv3_reference::fp8::fp8_gemm::{
    e4m3_values, scaled_dot, window_len, Accumulation, ScaleLayout,
};
use dsv3_reference::fp8::tc_bound::{e4m3_exponent, TensorCoreBound, WindowBound};

/// Rows of the output per parallel task.
const ROWS_PER_TASK: usize = 64;
/// Output columns per f64 block-dot tile.
const COLS_PER_TILE: usize = 512;

/// The f32 accumulators of a GEMM and, on request, each element's promotion magnitude
/// `Σ |p|·a_s·b_s` (what the tolerance policy scales with).
#[derive(Debug, Clone, PartialEq)]
pub struct GemmOut {
    /// `[M, N]` f32 accumulators.
    pub c: Array2<f32>,
    /// `[M, N]` magnitudes, or an empty `[0, 0]` array when not requested.
    pub magnitude: Array2<f64>,
    /// `tensor_core_bound` with magnitudes: `[M, N]` `Σ_w |P_w|·a_s·b_s` over the exact window
    /// dots (else empty).
    pub window_magnitude: Array2<f64>,
    /// `tensor_core_bound` with magnitudes: `[M, N]` slack `D = Σ_w Δ_w·a_s·b_s` (else empty).
    pub slack: Array2<f64>,
}

impl GemmOut {
    /// Zeros of `[m, n]`, with magnitude (and bound) arrays when asked for.
    pub fn zeros(m: usize, n: usize, with_magnitude: bool, with_bound: bool) -> Self {
        let shape = |on: bool| if on { (m, n) } else { (0, 0) };
        GemmOut {
            c: Array2::zeros((m, n)),
            magnitude: Array2::zeros(shape(with_magnitude)),
            window_magnitude: Array2::zeros(shape(with_bound)),
            slack: Array2::zeros(shape(with_bound)),
        }
    }

    /// Copy `part`'s row `r` into row `i` (grouped layouts scatter their experts' rows).
    fn assign_row(&mut self, i: usize, part: &GemmOut, r: usize) {
        self.c.row_mut(i).assign(&part.c.row(r));
        for (dst, src) in [
            (&mut self.magnitude, &part.magnitude),
            (&mut self.window_magnitude, &part.window_magnitude),
            (&mut self.slack, &part.slack),
        ] {
            if dst.nrows() > i && src.nrows() > r {
                dst.row_mut(i).assign(&src.row(r));
            }
        }
    }
}

/// `reference::fp8::fp8_gemm::gemm` (validated inputs), fast and bit-identical.
///
/// Shapes: `a: [M, K]`, `a_s: [M, ⌈K/B⌉]`, `b: [N, K]`, `b_s` by `b_layout` → `[M, N]`.
pub fn gemm(
    a: ArrayView2<u8>,
    a_s: ArrayView2<f32>,
    b: ArrayView2<u8>,
    b_s: ArrayView2<f32>,
    (b_layout, block_size): (ScaleLayout, usize),
    accumulation: &Accumulation,
    with_magnitude: bool,
) -> GemmOut {
    let (m, n) = (a.nrows(), b.nrows());
    let with_bound = with_magnitude && matches!(accumulation, Accumulation::TensorCoreBound { .. });
    let mut c = vec![0f32; m * n];
    let mut magnitude = vec![0f64; if with_magnitude { m * n } else { 0 }];
    let mut bounds = vec![(0f64, 0f64); if with_bound { m * n } else { 0 }];
    if m > 0 && n > 0 {
        let (a, a_s) = (a.as_standard_layout(), a_s.as_standard_layout());
        let (b, b_s) = (b.as_standard_layout(), b_s.as_standard_layout());
        let ops = Operands {
            a: a.view(),
            a_s: a_s.view(),
            b: b.view(),
            b_s: b_s.view(),
            b_layout,
            block_size,
        };
        match accumulation {
            Accumulation::Exact => exact(&ops, &mut c, &mut magnitude, None),
            Accumulation::TensorCoreBound {
                bound,
                promote_interval,
            } if with_bound => exact(
                &ops,
                &mut c,
                &mut magnitude,
                Some((bound, *promote_interval, &mut bounds)),
            ),
            // without magnitudes the bound mode's output is the exact mode's
            Accumulation::TensorCoreBound { .. } => exact(&ops, &mut c, &mut magnitude, None),
            Accumulation::TensorCore { .. } => {
                per_element(&ops, accumulation, &mut c, &mut magnitude)
            }
        }
    }
    let shape = |on: bool| if on { (m, n) } else { (0, 0) };
    let (window_magnitude, slack): (Vec<f64>, Vec<f64>) = bounds.into_iter().unzip();
    GemmOut {
        c: Array2::from_shape_vec((m, n), c).expect("m·n elements"),
        magnitude: Array2::from_shape_vec(shape(with_magnitude), magnitude).expect("matching size"),
        window_magnitude: Array2::from_shape_vec(shape(with_bound), window_magnitude)
            .expect("matching size"),
        slack: Array2::from_shape_vec(shape(with_bound), slack).expect("matching size"),
    }
}

/// The operands in standard layout.
struct Operands<'a> {
    a: ArrayView2<'a, u8>,
    a_s: ArrayView2<'a, f32>,
    b: ArrayView2<'a, u8>,
    b_s: ArrayView2<'a, f32>,
    b_layout: ScaleLayout,
    block_size: usize,
}

impl Operands<'_> {
    fn b_scale_row(&self, j: usize) -> usize {
        match self.b_layout {
            ScaleLayout::Block => j / self.block_size,
            ScaleLayout::Row => j,
        }
    }
}

/// One parallel task: its index, its rows of `c`, and of the magnitudes if wanted.
type Task<'a> = (
    usize,
    &'a mut [f32],
    Option<&'a mut [f64]>,
    Option<&'a mut [(f64, f64)]>,
);

/// The bound mode's extra work for [`exact`]: the bound, the promotion interval and, per
/// element, `(Σ_w |P_w|·a_s·b_s, Σ_w Δ_w·a_s·b_s)`.
type BoundJob<'a> = Option<(&'a TensorCoreBound, usize, &'a mut [(f64, f64)])>;

/// A run of K over which one f64 GEMM computes partial dots: the K-blocks, cut further at the
/// bound's Tensor Core steps.
#[derive(Debug, Clone, Copy)]
struct Segment {
    k0: usize,
    k1: usize,
    /// The K-block it lies in.
    block: usize,
    ends_block: bool,
    /// Bound mode: the step and the window it lies in.
    step_k0: usize,
    window_k0: usize,
    ends_step: bool,
    ends_window: bool,
}

/// The segments of `0..k`: block boundaries, and (with `steps = Some((window, group))`) the
/// Tensor Core steps of every promotion window.
fn segments(k: usize, block_size: usize, steps: Option<(usize, usize)>) -> Vec<Segment> {
    let mut cuts: Vec<usize> = (0..=k.div_ceil(block_size))
        .map(|b| (b * block_size).min(k))
        .collect();
    if let Some((window, group)) = steps {
        for w0 in (0..k).step_by(window) {
            let w1 = (w0 + window).min(k);
            cuts.extend((w0..w1).step_by(group));
            cuts.push(w1);
        }
    }
    cuts.sort_unstable();
    cuts.dedup();
    cuts.windows(2)
        .map(|c| {
            let (k0, k1) = (c[0], c[1]);
            let (window, group) = steps.unwrap_or((k.max(1), k.max(1)));
            let window_k0 = k0 / window * window;
            let window_k1 = (window_k0 + window).min(k);
            let step_k0 = window_k0 + (k0 - window_k0) / group * group;
            Segment {
                k0,
                k1,
                block: k0 / block_size,
                ends_block: k1 % block_size == 0 || k1 == k,
                step_k0,
                window_k0,
                ends_step: (k1 - window_k0) % group == 0 || k1 == window_k1,
                ends_window: k1 == window_k1,
            }
        })
        .collect()
}

/// The nominal exponent of every code as i8, zero codes as [`ZERO_EXPONENT`].
fn exponents(codes: ArrayView2<u8>) -> Vec<i8> {
    codes
        .iter()
        .map(|&c| e4m3_exponent(c).map_or(ZERO_EXPONENT, |e| e as i8))
        .collect()
}

/// The exponent given to a zero code: a pair with a zero sums to at most −56, below every
/// nonzero pair (≥ −12) and below [`PAIR_FLOOR`].
const ZERO_EXPONENT: i8 = -64;
/// Pair sums above it are nonzero products.
const PAIR_FLOOR: i8 = -40;

/// The largest nominal exponent `ea + eb` of the nonzero products of a step (`None`: all zero).
fn pair_max(ea: &[i8], eb: &[i8]) -> Option<i32> {
    let m = ea
        .iter()
        .zip(eb)
        .map(|(&x, &y)| x + y)
        .fold(i8::MIN, i8::max);
    (m > PAIR_FLOOR).then_some(i32::from(m))
}

/// The nonzero products of a step whose nominal exponent is below `threshold`.
fn pair_count_below(ea: &[i8], eb: &[i8], threshold: i32) -> usize {
    let t = threshold.clamp(i32::from(PAIR_FLOOR), 127) as i8;
    ea.iter()
        .zip(eb)
        .map(|(&x, &y)| {
            let e = x + y;
            usize::from(e > PAIR_FLOOR && e < t)
        })
        .sum()
}

/// Exact mode: f64 block dots from a blocked GEMM, then the reference's promotion per element.
/// With a [`BoundJob`], the GEMM runs over the bound's steps and each element's window bounds
/// are computed with the reference's own step functions ([`TensorCoreBound::step_exponents`],
/// [`TensorCoreBound::step_finish`]): bit-identical to `scaled_dot`.
fn exact(ops: &Operands, c: &mut [f32], magnitude: &mut [f64], bound: BoundJob) {
    let values = e4m3_values();
    let (k, n) = (ops.a.ncols(), ops.b.nrows());
    let bs = ops.block_size;
    let (bound, out_bounds) = match bound {
        Some((b, interval, out)) => (Some((b, window_len(interval, k))), out),
        None => (None, &mut [][..]),
    };
    let plan = segments(k, bs, bound.map(|(b, window)| (window, b.group)));
    // every code of b decoded once: [N, K] f64 (and its exponents in bound mode)
    let b64: Vec<f64> = ops.b.iter().map(|&x| values[usize::from(x)]).collect();
    let eb: Vec<i8> = if bound.is_some() {
        exponents(ops.b)
    } else {
        Vec::new()
    };
    let with_magnitude = !magnitude.is_empty();
    let chunk = ROWS_PER_TASK * n;
    let mut mags = magnitude.chunks_mut(chunk);
    let mut outs = out_bounds.chunks_mut(chunk);
    let tasks: Vec<Task> = c
        .chunks_mut(chunk)
        .enumerate()
        .map(|(t, c)| {
            (
                t,
                c,
                if with_magnitude { mags.next() } else { None },
                outs.next(),
            )
        })
        .collect();
    tasks
        .into_par_iter()
        .for_each(|(t, c_rows, mut mag_rows, mut bound_rows)| {
            let r0 = t * ROWS_PER_TASK;
            let rows = c_rows.len() / n;
            let a_rows = ops.a.slice(ndarray::s![r0..r0 + rows, ..]);
            // this task's rows of a, decoded: [rows, K] f64
            let a64: Vec<f64> = a_rows.iter().map(|&x| values[usize::from(x)]).collect();
            let ea: Vec<i8> = if bound.is_some() {
                exponents(a_rows)
            } else {
                Vec::new()
            };
            let mut dots = vec![0f64; rows * COLS_PER_TILE];
            let mut block_dot = vec![0f64; rows * COLS_PER_TILE];
            // bound mode: the step's dot and the window so far, per element
            let mut step_dot = vec![
                0f64;
                if bound.is_some() {
                    rows * COLS_PER_TILE
                } else {
                    0
                }
            ];
            let mut window = vec![
                WindowBound {
                    exact: 0.0,
                    delta: 0.0
                };
                step_dot.len()
            ];
            for n0 in (0..n).step_by(COLS_PER_TILE) {
                let cols = COLS_PER_TILE.min(n - n0);
                for seg in &plan {
                    let (k0, k1) = (seg.k0, seg.k1);
                    // dots[i, j] = Σ_{k∈seg} a[r0+i, k]·b[n0+j, k], exact in f64 in any order
                    // SAFETY: a64 is [rows, k] row-major, b64 is [n, k] row-major; the views
                    // (rows × (k1−k0) from a64[.., k0..], (k1−k0) × cols from b64[n0.., k0..] read
                    // transposed) and dots ([rows, cols], row stride cols) lie inside their buffers.
                    unsafe {
                        matrixmultiply::dgemm(
                            rows,
                            k1 - k0,
                            cols,
                            1.0,
                            a64.as_ptr().add(k0),
                            k as isize,
                            1,
                            b64.as_ptr().add(n0 * k + k0),
                            1,
                            k as isize,
                            0.0,
                            dots.as_mut_ptr(),
                            cols as isize,
                            1,
                        );
                    }
                    // partial sums of one block's (or step's) products: exact in f64
                    for (d, &x) in block_dot.iter_mut().zip(&dots).take(rows * cols) {
                        *d += x;
                    }
                    if let Some((b, _)) = bound {
                        for (d, &x) in step_dot.iter_mut().zip(&dots).take(rows * cols) {
                            *d += x;
                        }
                        if seg.ends_step {
                            let has_c = seg.step_k0 > seg.window_k0;
                            for i in 0..rows {
                                let ea_step = &ea[i * k + seg.step_k0..i * k + k1];
                                for j in 0..cols {
                                    let jb = (n0 + j) * k;
                                    let eb_step = &eb[jb + seg.step_k0..jb + k1];
                                    let w = &mut window[i * cols + j];
                                    let dot = std::mem::take(&mut step_dot[i * cols + j]);
                                    *w = match b.step_exponents(
                                        *w,
                                        pair_max(ea_step, eb_step),
                                        has_c,
                                    ) {
                                        None => WindowBound {
                                            exact: w.exact + dot,
                                            delta: w.delta,
                                        },
                                        Some(e) => {
                                            let inexact =
                                                pair_count_below(ea_step, eb_step, e.threshold);
                                            b.step_finish(*w, &e, inexact, dot)
                                        }
                                    };
                                }
                            }
                        }
                        if seg.ends_window {
                            let kb = seg.window_k0 / bs;
                            let out = bound_rows.as_deref_mut().expect("bound mode");
                            for i in 0..rows {
                                let sa = f64::from(ops.a_s[[r0 + i, kb]]);
                                for j in 0..cols {
                                    let sb = f64::from(ops.b_s[[ops.b_scale_row(n0 + j), kb]]);
                                    let w = std::mem::replace(
                                        &mut window[i * cols + j],
                                        WindowBound {
                                            exact: 0.0,
                                            delta: 0.0,
                                        },
                                    );
                                    let o = &mut out[i * n + n0 + j];
                                    o.0 += w.exact.abs() * (sa * sb);
                                    o.1 += w.delta * (sa * sb);
                                }
                            }
                        }
                    }
                    if !seg.ends_block {
                        continue;
                    }
                    // the reference's promotion, element by element, blocks in ascending order
                    let kb = seg.block;
                    for i in 0..rows {
                        let sa = ops.a_s[[r0 + i, kb]];
                        let out = &mut c_rows[i * n + n0..i * n + n0 + cols];
                        for (j, acc) in out.iter_mut().enumerate() {
                            let p = std::mem::take(&mut block_dot[i * cols + j]) as f32;
                            let sb = ops.b_s[[ops.b_scale_row(n0 + j), kb]];
                            *acc += p * sa * sb;
                            if let Some(mag) = mag_rows.as_deref_mut() {
                                mag[i * n + n0 + j] +=
                                    f64::from(p.abs()) * f64::from(sa) * f64::from(sb);
                            }
                        }
                    }
                }
            }
        });
}

/// Tensor Core mode: the reference's per-element function, rows in parallel.
fn per_element(ops: &Operands, accumulation: &Accumulation, c: &mut [f32], magnitude: &mut [f64]) {
    let values = e4m3_values();
    let n = ops.b.nrows();
    let with_magnitude = !magnitude.is_empty();
    let compute_row = |i: usize, c_row: &mut [f32], mut mag_row: Option<&mut [f64]>| {
        let a = ops.a.row(i);
        let a_s = ops.a_s.row(i);
        let (a, a_s) = (
            a.as_slice().expect("standard layout"),
            a_s.as_slice().expect("standard layout"),
        );
        for j in 0..n {
            let d = scaled_dot(
                a,
                a_s,
                ops.b.row(j).to_slice().expect("standard layout"),
                ops.b_s
                    .row(ops.b_scale_row(j))
                    .to_slice()
                    .expect("standard layout"),
                ops.block_size,
                accumulation,
                &values,
            );
            c_row[j] = d.c;
            if let Some(mag) = mag_row.as_deref_mut() {
                mag[j] = d.magnitude;
            }
        }
    };
    if with_magnitude {
        c.par_chunks_mut(n)
            .zip(magnitude.par_chunks_mut(n))
            .enumerate()
            .for_each(|(i, (c_row, mag_row))| compute_row(i, c_row, Some(mag_row)));
    } else {
        c.par_chunks_mut(n)
            .enumerate()
            .for_each(|(i, c_row)| compute_row(i, c_row, None));
    }
}

/// Contiguous grouped layout (validated inputs): each expert's rows gathered, multiplied by
/// its weight with [`gemm`], scattered back; padding rows (`m_indices = −1`) stay 0.
///
/// Shapes: `a: [M, K]`, `a_s: [M, ⌈K/B⌉]`, `b: [G, N, K]`, `b_s: [G, ⌈N/B⌉, ⌈K/B⌉]`,
/// `m_indices: [M]` → `[M, N]`.
#[allow(clippy::too_many_arguments)]
pub fn m_grouped_contiguous(
    a: ArrayView2<u8>,
    a_s: ArrayView2<f32>,
    b: ArrayView3<u8>,
    b_s: ArrayView3<f32>,
    m_indices: &[i64],
    block_size: usize,
    accumulation: &Accumulation,
    with_magnitude: bool,
) -> GemmOut {
    let (m, n) = (a.nrows(), b.shape()[1]);
    let with_bound = with_magnitude && matches!(accumulation, Accumulation::TensorCoreBound { .. });
    let mut out = GemmOut::zeros(m, n, with_magnitude, with_bound);
    for g in 0..b.shape()[0] {
        let rows: Vec<usize> = (0..m).filter(|&i| m_indices[i] == g as i64).collect();
        if rows.is_empty() {
            continue;
        }
        let part = gemm(
            a.select(Axis(0), &rows).view(),
            a_s.select(Axis(0), &rows).view(),
            b.index_axis(Axis(0), g),
            b_s.index_axis(Axis(0), g),
            (ScaleLayout::Block, block_size),
            accumulation,
            with_magnitude,
        );
        for (r, &i) in rows.iter().enumerate() {
            out.assign_row(i, &part, r);
        }
    }
    out
}

/// Masked grouped layout (validated inputs): group `g`'s first `masked_m[g]` rows times
/// `b[g]`; the rest stays 0. Shapes: `a: [G, M_max, K]` … → `[G·M_max, N]` (flattened rows).
#[allow(clippy::too_many_arguments)]
pub fn m_grouped_masked(
    a: ArrayView3<u8>,
    a_s: ArrayView3<f32>,
    b: ArrayView3<u8>,
    b_s: ArrayView3<f32>,
    masked_m: &[i64],
    block_size: usize,
    accumulation: &Accumulation,
    with_magnitude: bool,
) -> GemmOut {
    let (groups, m_max, _) = a.dim();
    let n = b.shape()[1];
    let with_bound = with_magnitude && matches!(accumulation, Accumulation::TensorCoreBound { .. });
    let mut out = GemmOut::zeros(groups * m_max, n, with_magnitude, with_bound);
    for (g, &rows) in masked_m.iter().enumerate() {
        let rows = rows as usize;
        if rows == 0 {
            continue;
        }
        let part = gemm(
            a.slice(ndarray::s![g, ..rows, ..]),
            a_s.slice(ndarray::s![g, ..rows, ..]),
            b.index_axis(Axis(0), g),
            b_s.index_axis(Axis(0), g),
            (ScaleLayout::Block, block_size),
            accumulation,
            with_magnitude,
        );
        for r in 0..rows {
            out.assign_row(g * m_max + r, &part, r);
        }
    }
    out
}
