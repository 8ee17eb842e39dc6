//! Fast paths of the FP8 GEMM ops, **bit-identical** to the readable reference
//! (`dsv3_reference::fp8::fp8_gemm`), which stays the definition. `tests/fp8_gemm_fast.rs`
//! proves the identity on random shapes, K not a multiple of the block, zero tiles and outliers.
//!
//! Why the exact mode can be fast and still identical: a block dot of E4M3 products is exact in
//! f64 in any order (at most 43 significant bits for B = 128), so a blocked f64 GEMM yields the
//! very same f64 block dots as the reference's plain loop. Blocks up to 1024 deep go through the
//! fused kernel ([`fused`]: a 6×16 register-tiled micro-kernel whose block dots are promoted at
//! once, no M×N intermediate; on CPUs with AMX-INT8 the same tasks compute the block dots as
//! int8 digit products on the tile unit, `amx.rs`, exactly: [`ExactKernel`]); the bound mode
//! and larger blocks through `matrixmultiply::dgemm` per K-segment. Everything after that (the rounding to f32, `(p·a_s)·b_s`,
//! the f32 accumulation in ascending block order) is done element by element with the same
//! expressions in the same order. Rows are spread over threads with rayon; each output element
//! is computed by exactly one thread.
//!
//! The Tensor Core mode calls the reference's per-element [`scaled_dot`] itself, rows in
//! parallel: identical by construction.
//!
//! Callers validate inputs first with the reference's `check_*` functions.

use ndarray::{Array2, ArrayView2, Axis};
use rayon::prelude::*;

use dsv3_reference::fp8::fp8_gemm::{
    e4m3_values, scaled_dot, window_len, Accumulation, BlockScaled, ScaleLayout,
};
use dsv3_reference::fp8::grouped_gemm::{ExpertWeights, GroupRows};
use dsv3_reference::fp8::tc_bound::{e4m3_exponent, TensorCoreBound};

use crate::registry::tolerance::TcBoundTolerance;

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
/// Shapes: `a.codes: [M, K]`, `b.codes: [N, K]`, scales by their layouts → `[M, N]`.
pub fn gemm(
    a: BlockScaled,
    b: BlockScaled,
    block_size: usize,
    accumulation: &Accumulation,
    with_magnitude: bool,
) -> GemmOut {
    let (m, n) = (a.codes.nrows(), b.codes.nrows());
    let with_bound = with_magnitude && matches!(accumulation, Accumulation::TensorCoreBound { .. });
    let mut c = vec![0f32; m * n];
    let mut magnitude = vec![0f64; if with_magnitude { m * n } else { 0 }];
    let bound_len = if with_bound { m * n } else { 0 };
    let (mut window_magnitude, mut slack) = (vec![0f64; bound_len], vec![0f64; bound_len]);
    if m > 0 && n > 0 {
        with_operands(a, b, block_size, |ops| match accumulation {
            Accumulation::Exact if block_size <= fused::MAX_FUSED_BLOCK => {
                fused::exact_fused(ops, &mut c, &mut magnitude)
            }
            Accumulation::Exact => exact(ops, &mut c, &mut magnitude, None),
            Accumulation::TensorCoreBound {
                bound,
                promote_interval,
            } if with_bound => {
                let window = window_len(*promote_interval, a.codes.ncols());
                if fused_bound::fits(block_size, window, bound.group) {
                    fused_bound::bound_fused(
                        ops,
                        (bound, window),
                        &mut c,
                        &mut magnitude,
                        (&mut window_magnitude, &mut slack),
                    )
                } else {
                    exact(
                        ops,
                        &mut c,
                        &mut magnitude,
                        Some((bound, *promote_interval, &mut window_magnitude, &mut slack)),
                    )
                }
            }
            // without magnitudes the bound mode's output is the exact mode's
            Accumulation::TensorCoreBound { .. } if block_size <= fused::MAX_FUSED_BLOCK => {
                fused::exact_fused(ops, &mut c, &mut magnitude)
            }
            Accumulation::TensorCoreBound { .. } => exact(ops, &mut c, &mut magnitude, None),
            Accumulation::TensorCore { .. } => {
                per_element(ops, accumulation, &mut c, &mut magnitude)
            }
        });
    }
    let shape = |on: bool| if on { (m, n) } else { (0, 0) };
    GemmOut {
        c: Array2::from_shape_vec((m, n), c).expect("m·n elements"),
        magnitude: Array2::from_shape_vec(shape(with_magnitude), magnitude).expect("matching size"),
        window_magnitude: Array2::from_shape_vec(shape(with_bound), window_magnitude)
            .expect("matching size"),
        slack: Array2::from_shape_vec(shape(with_bound), slack).expect("matching size"),
    }
}

/// [`gemm`]'s accumulators without magnitudes as little-endian bytes, written from the fused
/// kernel's tiles with no f32 M×N array: rounded to bf16 (RNE, `[2·M·N]`) when `bf16`, else f32
/// (`[4·M·N]`). `None` where the fused kernel does not compute the output (not the exact mode
/// or the bound mode's output, blocks over 1024, an empty output): then convert [`gemm`]'s.
pub fn gemm_bytes(
    a: BlockScaled,
    b: BlockScaled,
    block_size: usize,
    accumulation: &Accumulation,
    bf16: bool,
) -> Option<Vec<u8>> {
    let (m, n) = (a.codes.nrows(), b.codes.nrows());
    let exact_output = matches!(
        accumulation,
        Accumulation::Exact | Accumulation::TensorCoreBound { .. }
    );
    if !(exact_output && block_size <= fused::MAX_FUSED_BLOCK && m > 0 && n > 0) {
        return None;
    }
    let mut bytes = vec![0u8; if bf16 { 2 } else { 4 } * m * n];
    with_operands(a, b, block_size, |ops| {
        fused::exact_fused_bytes(ops, &mut bytes, bf16)
    });
    Some(bytes)
}

/// The bound mode's accumulators and each element's tolerance, `tolerance.of(M_b, M_w, D)` on
/// the magnitude, window magnitude and slack [`gemm`] returns (bit for bit), as little-endian
/// f64 bytes `[8·M·N]`, without those three M×N sums; `None` when the fused bound kernel does
/// not take the configuration (then use [`gemm`]).
pub fn gemm_bound_tolerances(
    a: BlockScaled,
    b: BlockScaled,
    block_size: usize,
    accumulation: &Accumulation,
    tolerance: &TcBoundTolerance,
) -> Option<(Array2<f32>, Vec<u8>)> {
    let Accumulation::TensorCoreBound {
        bound,
        promote_interval,
    } = accumulation
    else {
        return None;
    };
    let (m, n, k) = (a.codes.nrows(), b.codes.nrows(), a.codes.ncols());
    let window = window_len(*promote_interval, k);
    if m == 0 || n == 0 || !fused_bound::fits(block_size, window, bound.group) {
        return None;
    }
    let (mut c, mut bytes) = (vec![0f32; m * n], vec![0u8; 8 * m * n]);
    with_operands(a, b, block_size, |ops| {
        fused_bound::bound_fused_tolerance(ops, (bound, window), &mut c, (tolerance, &mut bytes))
    });
    Some((
        Array2::from_shape_vec((m, n), c).expect("m·n elements"),
        bytes,
    ))
}

/// `f` on the operands in standard layout (a transposed view is copied once).
fn with_operands<R>(
    a: BlockScaled,
    b: BlockScaled,
    block_size: usize,
    f: impl FnOnce(&Operands) -> R,
) -> R {
    let (a_codes, a_s) = (a.codes.as_standard_layout(), a.scales.as_standard_layout());
    let (b_codes, b_s) = (b.codes.as_standard_layout(), b.scales.as_standard_layout());
    f(&Operands {
        a: a_codes.view(),
        a_s: a_s.view(),
        b: b_codes.view(),
        b_s: b_s.view(),
        layouts: (a.layout, b.layout),
        block_size,
    })
}

/// The operands in standard layout.
struct Operands<'a> {
    a: ArrayView2<'a, u8>,
    a_s: ArrayView2<'a, f32>,
    b: ArrayView2<'a, u8>,
    b_s: ArrayView2<'a, f32>,
    /// The scale layouts of `a` and `b`.
    layouts: (ScaleLayout, ScaleLayout),
    block_size: usize,
}

impl Operands<'_> {
    fn scale_row(&self, layout: ScaleLayout, r: usize) -> usize {
        match layout {
            ScaleLayout::Block => r / self.block_size,
            ScaleLayout::Row => r,
        }
    }

    /// The scale row of row `i` of `a`.
    fn a_scale_row(&self, i: usize) -> usize {
        self.scale_row(self.layouts.0, i)
    }

    /// The scale row of row `j` of `b`.
    fn b_scale_row(&self, j: usize) -> usize {
        self.scale_row(self.layouts.1, j)
    }

    /// `a_s` of row `i` of `a` in K-block `kb`.
    fn a_scale(&self, i: usize, kb: usize) -> f32 {
        self.a_s[[self.a_scale_row(i), kb]]
    }

    /// `b_s` of row `j` of `b` in K-block `kb`.
    fn b_scale(&self, j: usize, kb: usize) -> f32 {
        self.b_s[[self.b_scale_row(j), kb]]
    }
}

/// One parallel task: its index, its rows of `c`, and of the magnitudes if wanted.
type Task<'a> = (
    usize,
    &'a mut [f32],
    Option<&'a mut [f64]>,
    Option<(&'a mut [f64], &'a mut [f64])>,
);

/// The bound mode's extra work for [`exact`]: the bound, the promotion interval and, per
/// element, `(Σ_w |P_w|·a_s·b_s, Σ_w Δ_w·a_s·b_s)`.
type BoundJob<'a> = Option<(&'a TensorCoreBound, usize, &'a mut [f64], &'a mut [f64])>;

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

/// The nominal exponent of every code as i8, zero codes as `zero`.
fn exponents(codes: ArrayView2<u8>, zero: i8) -> Vec<i8> {
    codes
        .iter()
        .map(|&c| e4m3_exponent(c).map_or(zero, |e| e as i8))
        .collect()
}

/// The exponents of `codes [N, K]` transposed to `[K, N]`, zeros encoded for the max and for
/// the count (64×64 tiles: both sides stay in cache).
fn exponents_transposed(codes: ArrayView2<u8>) -> (Vec<i8>, Vec<i8>) {
    let (n, k) = codes.dim();
    let table: Vec<(i8, i8)> = (0..=255u8)
        .map(|c| e4m3_exponent(c).map_or((ZERO_FOR_MAX, ZERO_FOR_COUNT), |e| (e as i8, e as i8)))
        .collect();
    let (mut for_max, mut for_count) = (vec![0i8; n * k], vec![0i8; n * k]);
    let codes = codes.as_standard_layout();
    let codes = codes.as_slice().expect("standard layout");
    const T: usize = 64;
    for j0 in (0..n).step_by(T) {
        for k0 in (0..k).step_by(T) {
            for j in j0..(j0 + T).min(n) {
                for kk in k0..(k0 + T).min(k) {
                    let (x, y) = table[usize::from(codes[j * k + kk])];
                    for_max[kk * n + j] = x;
                    for_count[kk * n + j] = y;
                }
            }
        }
    }
    (for_max, for_count)
}

/// The exponent given to a zero code when looking for a step's largest pair: a pair with a
/// zero sums to at most −56, below every nonzero pair (≥ −12) and below [`PAIR_FLOOR`].
const ZERO_FOR_MAX: i8 = -64;
/// Pair sums above it are nonzero products (with [`ZERO_FOR_MAX`]).
const PAIR_FLOOR: i8 = -40;
/// The exponent given to a zero code when counting the pairs below a threshold: a pair with a
/// zero sums to at least 54, above every nonzero pair (≤ 16) and every threshold (clamped to
/// [`PAIR_CEILING`]).
const ZERO_FOR_COUNT: i8 = 60;
/// Thresholds are clamped to it: every nonzero pair (≤ 16) is below it, every zero pair above.
const PAIR_CEILING: i8 = 50;

/// Exact mode: f64 block dots from a blocked GEMM, then the reference's promotion per element.
/// With a [`BoundJob`], the GEMM runs over the bound's steps and each element's window bounds
/// are computed by [`lanes::step_row`], the reference's step
/// ([`TensorCoreBound::step_exponents`], [`TensorCoreBound::step_finish`]) for a run of columns
/// at once: bit-identical to `scaled_dot` (`tests/fp8_gemm_fast.rs`).
fn exact(ops: &Operands, c: &mut [f32], magnitude: &mut [f64], bound: BoundJob) {
    let values = e4m3_values();
    let (k, n) = (ops.a.ncols(), ops.b.nrows());
    let bs = ops.block_size;
    let (bound, out_wmag, out_slack) = match bound {
        Some((b, interval, wmag, slack)) => (Some((b, window_len(interval, k))), wmag, slack),
        None => (None, &mut [][..], &mut [][..]),
    };
    let plan = segments(k, bs, bound.map(|(b, window)| (window, b.group)));
    // every code of b decoded once: [N, K] f64 (and its exponents in bound mode)
    let b64: Vec<f64> = ops.b.iter().map(|&x| values[usize::from(x)]).collect();
    // b's exponents transposed, [K, N]: a step of one row of a meets a run of columns
    let (ebt_max, ebt_count) = if bound.is_some() {
        exponents_transposed(ops.b)
    } else {
        (Vec::new(), Vec::new())
    };
    // every step inside one block and every block made of steps: a step's dot is added to its
    // block's at the step's end
    let simple = plan.iter().all(|s| s.ends_step);
    let with_magnitude = !magnitude.is_empty();
    let chunk = ROWS_PER_TASK * n;
    let mut mags = magnitude.chunks_mut(chunk);
    let mut outs = out_wmag.chunks_mut(chunk).zip(out_slack.chunks_mut(chunk));
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
            let (ea_max, ea_count) = if bound.is_some() {
                (
                    exponents(a_rows, ZERO_FOR_MAX),
                    exponents(a_rows, ZERO_FOR_COUNT),
                )
            } else {
                (Vec::new(), Vec::new())
            };
            let mut dots = vec![0f64; rows * COLS_PER_TILE];
            let mut block_dot = vec![0f64; rows * COLS_PER_TILE];
            // bound mode: the step's dot and the window so far, per element
            let lanes_len = if bound.is_some() {
                rows * COLS_PER_TILE
            } else {
                0
            };
            let mut step_dot = vec![0f64; lanes_len];
            let mut window_exact = vec![0f64; lanes_len];
            let mut window_delta = vec![0f64; lanes_len];
            let mut scratch = lanes::Scratch::new(COLS_PER_TILE);
            // the tile's b scales of one K-block, per column
            let mut sb = vec![0f32; COLS_PER_TILE];
            for n0 in (0..n).step_by(COLS_PER_TILE) {
                let cols = COLS_PER_TILE.min(n - n0);
                for seg in &plan {
                    let (k0, k1) = (seg.k0, seg.k1);
                    // where this segment's dots go: straight into the block's (exact mode) or
                    // the step's (bound mode, steps inside blocks) running sums, else through
                    // `dots` into both
                    let (target, beta): (&mut Vec<f64>, f64) = match bound {
                        None => (&mut block_dot, 1.0),
                        Some(_) if simple => (&mut step_dot, 1.0),
                        Some(_) => (&mut dots, 0.0),
                    };
                    // target[i, j] (+)= Σ_{k∈seg} a[r0+i, k]·b[n0+j, k], exact in f64 in any
                    // order, and so are the running sums of a block's or step's products
                    // SAFETY: a64 is [rows, k] row-major, b64 is [n, k] row-major; the views
                    // (rows × (k1−k0) from a64[.., k0..], (k1−k0) × cols from b64[n0.., k0..] read
                    // transposed) and the target ([rows, cols], row stride cols) lie inside
                    // their buffers.
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
                            beta,
                            target.as_mut_ptr(),
                            cols as isize,
                            1,
                        );
                    }
                    if let Some((b, _)) = bound {
                        if !simple {
                            for (d, &x) in block_dot.iter_mut().zip(&dots).take(rows * cols) {
                                *d += x;
                            }
                            for (d, &x) in step_dot.iter_mut().zip(&dots).take(rows * cols) {
                                *d += x;
                            }
                        }
                        if seg.ends_step {
                            let has_c = seg.step_k0 > seg.window_k0;
                            let steps = seg.step_k0..k1;
                            for i in 0..rows {
                                let row = i * cols..(i + 1) * cols;
                                lanes::step_row(
                                    b.frac_bits as i32,
                                    has_c,
                                    (
                                        &ea_max[i * k + steps.start..i * k + steps.end],
                                        &ea_count[i * k + steps.start..i * k + steps.end],
                                    ),
                                    (
                                        &ebt_max[steps.start * n + n0..],
                                        &ebt_count[steps.start * n + n0..],
                                        n,
                                        cols,
                                    ),
                                    (
                                        &mut window_exact[row.clone()],
                                        &mut window_delta[row.clone()],
                                    ),
                                    (
                                        &mut step_dot[row.clone()],
                                        simple.then_some(&mut block_dot[row]),
                                    ),
                                    &mut scratch,
                                );
                            }
                        }
                        if seg.ends_window {
                            let kb = seg.window_k0 / bs;
                            for (j, x) in sb.iter_mut().enumerate().take(cols) {
                                *x = ops.b_s[[ops.b_scale_row(n0 + j), kb]];
                            }
                            let out = bound_rows.as_mut().expect("bound mode");
                            for i in 0..rows {
                                let sa = f64::from(ops.a_s[[ops.a_scale_row(r0 + i), kb]]);
                                let row = i * cols..(i + 1) * cols;
                                let at = i * n + n0..i * n + n0 + cols;
                                for ((((wm, sl), x), d), &sbj) in out.0[at.clone()]
                                    .iter_mut()
                                    .zip(&mut out.1[at])
                                    .zip(&mut window_exact[row.clone()])
                                    .zip(&mut window_delta[row])
                                    .zip(&sb)
                                {
                                    let s = sa * f64::from(sbj);
                                    *wm += std::mem::take(x).abs() * s;
                                    *sl += std::mem::take(d) * s;
                                }
                            }
                        }
                    }
                    if !seg.ends_block {
                        continue;
                    }
                    // the reference's promotion, element by element, blocks in ascending order
                    let kb = seg.block;
                    for (j, x) in sb.iter_mut().enumerate().take(cols) {
                        *x = ops.b_s[[ops.b_scale_row(n0 + j), kb]];
                    }
                    for i in 0..rows {
                        let sa = ops.a_s[[ops.a_scale_row(r0 + i), kb]];
                        let out = &mut c_rows[i * n + n0..i * n + n0 + cols];
                        let dots = &mut block_dot[i * cols..(i + 1) * cols];
                        match mag_rows.as_deref_mut() {
                            None => {
                                for ((acc, d), &sbj) in out.iter_mut().zip(dots).zip(&sb) {
                                    let p = std::mem::take(d) as f32;
                                    *acc += p * sa * sbj;
                                }
                            }
                            Some(mag) => {
                                let mag = &mut mag[i * n + n0..i * n + n0 + cols];
                                for (((acc, m), d), &sbj) in
                                    out.iter_mut().zip(mag).zip(dots).zip(&sb)
                                {
                                    let p = std::mem::take(d) as f32;
                                    *acc += p * sa * sbj;
                                    *m += f64::from(p.abs()) * f64::from(sa) * f64::from(sbj);
                                }
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
    let codes = tc::Codes::new();
    let n = ops.b.nrows();
    let with_magnitude = !magnitude.is_empty();
    let compute_row = |i: usize, c_row: &mut [f32], mut mag_row: Option<&mut [f64]>| {
        let a = ops.a.row(i);
        let a_s = ops.a_s.row(ops.a_scale_row(i));
        let (a, a_s) = (
            a.as_slice().expect("standard layout"),
            a_s.as_slice().expect("standard layout"),
        );
        for j in 0..n {
            let b = ops.b.row(j).to_slice().expect("standard layout");
            let b_s = ops
                .b_s
                .row(ops.b_scale_row(j))
                .to_slice()
                .expect("standard layout");
            let (c, m) = match accumulation {
                // scaled_dot's Tensor Core branch with the fast step (tc.rs), same order
                Accumulation::TensorCore {
                    model,
                    promote_interval,
                } => {
                    let k = a.len();
                    let window = window_len(*promote_interval, k);
                    let (mut acc, mut magnitude) = (0f32, 0f64);
                    for w0 in (0..k).step_by(window) {
                        let w1 = (w0 + window).min(k);
                        let p = tc::accumulate_e4m3_fast(model, &codes, &a[w0..w1], &b[w0..w1]);
                        let kb = w0 / ops.block_size;
                        acc += p * a_s[kb] * b_s[kb];
                        magnitude += f64::from(p.abs()) * f64::from(a_s[kb]) * f64::from(b_s[kb]);
                    }
                    (acc, magnitude)
                }
                _ => {
                    let d = scaled_dot(a, a_s, b, b_s, ops.block_size, accumulation, &values);
                    (d.c, d.magnitude)
                }
            };
            c_row[j] = c;
            if let Some(mag) = mag_row.as_deref_mut() {
                mag[j] = m;
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

/// The grouped GEMMs (validated inputs): each group's rows of `a` gathered, multiplied by the
/// group's weight with [`gemm`], scattered back; rows of no group stay 0
/// (`reference::fp8::grouped_gemm`, fast and bit-identical).
///
/// Shapes: `a.codes: [R, K]` (1×B tiles; the masked layout's `[G, M_max, K]` flattened),
/// `b: [G, N, K]` → `[R, N]`.
pub fn grouped(
    a: BlockScaled,
    b: ExpertWeights,
    rows: &GroupRows,
    block_size: usize,
    accumulation: &Accumulation,
    with_magnitude: bool,
) -> GemmOut {
    let (m, n) = (a.codes.nrows(), b.codes.shape()[1]);
    let with_bound = with_magnitude && matches!(accumulation, Accumulation::TensorCoreBound { .. });
    let mut out = GemmOut::zeros(m, n, with_magnitude, with_bound);
    for g in 0..rows.groups() {
        let group = rows.of(g);
        if group.is_empty() {
            continue;
        }
        let (codes, scales) = (
            a.codes.select(Axis(0), group),
            a.scales.select(Axis(0), group),
        );
        let part = gemm(
            BlockScaled::tiles(codes.view(), scales.view()),
            b.expert(g),
            block_size,
            accumulation,
            with_magnitude,
        );
        for (r, &i) in group.iter().enumerate() {
            out.assign_row(i, &part, r);
        }
    }
    out
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod amx;
mod fused;
mod fused_bound;
mod lanes;
mod tc;

/// Which kernel computes the exact mode's block dots (all bit-identical; see [`with_exact_kernel`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExactKernel {
    /// AMX where the CPU and OS allow it (unless `DSV3_EXACT_KERNEL=f64`), else f64.
    Auto,
    /// The f64 register-tiled micro-kernel (AVX-512, AVX2+FMA or portable).
    F64,
    /// The AMX int8 tiles (`amx.rs`); the f64 kernel where AMX is not available.
    Amx,
}

thread_local! {
    static EXACT_KERNEL: std::cell::Cell<ExactKernel> = const { std::cell::Cell::new(ExactKernel::Auto) };
}

/// Run `f` with the exact mode's block dots computed by `kernel` on this thread's GEMMs (tests
/// and benchmarks compare the kernels with it).
pub fn with_exact_kernel<R>(kernel: ExactKernel, f: impl FnOnce() -> R) -> R {
    let before = EXACT_KERNEL.with(|k| k.replace(kernel));
    let out = f();
    EXACT_KERNEL.with(|k| k.set(before));
    out
}

/// Whether the AMX kernel can run on this machine (CPU and OS).
pub fn amx_available() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        amx::available()
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    {
        false
    }
}

/// Whether this thread's exact GEMMs use AMX now.
fn amx_chosen() -> bool {
    match EXACT_KERNEL.with(|k| k.get()) {
        ExactKernel::F64 => false,
        ExactKernel::Amx => amx_available(),
        ExactKernel::Auto => {
            static ENV_F64: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
            let f64_asked = *ENV_F64
                .get_or_init(|| std::env::var("DSV3_EXACT_KERNEL").is_ok_and(|v| v == "f64"));
            !f64_asked && amx_available()
        }
    }
}
