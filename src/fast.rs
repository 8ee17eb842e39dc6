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

use dsv3_reference::fp8::fp8_gemm::{e4m3_values, scaled_dot, Accumulation, ScaleLayout};

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
    let mut c = vec![0f32; m * n];
    let mut magnitude = vec![0f64; if with_magnitude { m * n } else { 0 }];
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
            Accumulation::Exact => exact(&ops, &mut c, &mut magnitude),
            Accumulation::TensorCore { .. } => {
                per_element(&ops, accumulation, &mut c, &mut magnitude)
            }
        }
    }
    let shape = if with_magnitude { (m, n) } else { (0, 0) };
    GemmOut {
        c: Array2::from_shape_vec((m, n), c).expect("m·n elements"),
        magnitude: Array2::from_shape_vec(shape, magnitude).expect("matching size"),
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
type Task<'a> = (usize, &'a mut [f32], Option<&'a mut [f64]>);

/// Exact mode: f64 block dots from a blocked GEMM, then the reference's promotion per element.
fn exact(ops: &Operands, c: &mut [f32], magnitude: &mut [f64]) {
    let values = e4m3_values();
    let (k, n) = (ops.a.ncols(), ops.b.nrows());
    let blocks = ops.a_s.ncols();
    let bs = ops.block_size;
    // every code of b decoded once: [N, K] f64
    let b64: Vec<f64> = ops.b.iter().map(|&x| values[usize::from(x)]).collect();
    let with_magnitude = !magnitude.is_empty();
    let chunk = ROWS_PER_TASK * n;
    let tasks: Vec<Task> = if with_magnitude {
        c.chunks_mut(chunk)
            .zip(magnitude.chunks_mut(chunk))
            .enumerate()
            .map(|(t, (c, m))| (t, c, Some(m)))
            .collect()
    } else {
        c.chunks_mut(chunk)
            .enumerate()
            .map(|(t, c)| (t, c, None))
            .collect()
    };
    tasks.into_par_iter().for_each(|(t, c_rows, mut mag_rows)| {
        let r0 = t * ROWS_PER_TASK;
        let rows = c_rows.len() / n;
        // this task's rows of a, decoded: [rows, K] f64
        let a64: Vec<f64> = ops
            .a
            .slice(ndarray::s![r0..r0 + rows, ..])
            .iter()
            .map(|&x| values[usize::from(x)])
            .collect();
        let mut dots = vec![0f64; rows * COLS_PER_TILE];
        for n0 in (0..n).step_by(COLS_PER_TILE) {
            let cols = COLS_PER_TILE.min(n - n0);
            for kb in 0..blocks {
                let (k0, k1) = (kb * bs, ((kb + 1) * bs).min(k));
                // dots[i, j] = Σ_{k∈kb} a[r0+i, k]·b[n0+j, k], exact in f64 in any order
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
                // the reference's promotion, element by element, blocks in ascending order
                for i in 0..rows {
                    let sa = ops.a_s[[r0 + i, kb]];
                    let out = &mut c_rows[i * n + n0..i * n + n0 + cols];
                    for (j, acc) in out.iter_mut().enumerate() {
                        let p = dots[i * cols + j] as f32;
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
    let mut out = GemmOut {
        c: Array2::zeros((m, n)),
        magnitude: Array2::zeros(if with_magnitude { (m, n) } else { (0, 0) }),
    };
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
            out.c.row_mut(i).assign(&part.c.row(r));
            if with_magnitude {
                out.magnitude.row_mut(i).assign(&part.magnitude.row(r));
            }
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
    let mut out = GemmOut {
        c: Array2::zeros((groups * m_max, n)),
        magnitude: Array2::zeros(if with_magnitude {
            (groups * m_max, n)
        } else {
            (0, 0)
        }),
    };
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
        let span = g * m_max..g * m_max + rows;
        out.c
            .slice_mut(ndarray::s![span.clone(), ..])
            .assign(&part.c);
        if with_magnitude {
            out.magnitude
                .slice_mut(ndarray::s![span, ..])
                .assign(&part.magnitude);
        }
    }
    out
}
