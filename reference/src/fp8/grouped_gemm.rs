//! M-grouped FP8 GEMMs for the routed experts (V3 §2.1.2, §3.3; DeepGEMM
//! `m_grouped_fp8_gemm_nt_contiguous` and `m_grouped_fp8_gemm_nt_masked`): every expert `g`
//! has its own weight `b[g]: [N, K]`; the rows of `a` are grouped by expert. Each output row is
//! exactly [`fp8_gemm`](super::fp8_gemm::fp8_gemm)'s row against its expert's weight.
//!
//! - **Contiguous** (training, prefill): `a: [M, K]` holds all experts' rows; `m_indices[m]`
//!   names row m's expert, −1 a padding row. DeepGEMM requires each expert's segment to be
//!   padded to 128 rows; the math does not, and neither does this reference.
//! - **Masked** (decode under CUDA graphs): `a: [G, M_max, K]`; only the first `masked_m[g]`
//!   rows of group g are real.
//!
//! Padding rows (`m_indices = −1`, rows past `masked_m`) are **undefined** in DeepGEMM: neither
//! read meaningfully nor written. Here their inputs are not validated (they may hold NaN codes
//! or garbage scales), the reference writes 0, and `dsv3 check` does not judge them.

use ndarray::{Array2, Array3, ArrayView3, Axis};

use super::fp8_gemm::{
    check_codes, check_scales, check_setup, check_shape, e4m3_values, output_row, row,
    Accumulation, BlockScaled, ScaleLayout,
};
use crate::error::{Error, Result};

/// The experts' weights of an M-grouped GEMM, B×B blocks per expert.
///
/// Shapes: `codes: [G, N, K]` E4M3, `scales: [G, ⌈N/B⌉, ⌈K/B⌉]`.
#[derive(Debug, Clone, Copy)]
pub struct ExpertWeights<'a> {
    pub codes: ArrayView3<'a, u8>,
    pub scales: ArrayView3<'a, f32>,
}

impl<'a> ExpertWeights<'a> {
    pub fn new(codes: ArrayView3<'a, u8>, scales: ArrayView3<'a, f32>) -> Self {
        ExpertWeights { codes, scales }
    }

    /// The number of experts G.
    pub fn groups(&self) -> usize {
        self.codes.shape()[0]
    }

    /// Expert `g`'s weight as a dense GEMM's `b`.
    pub fn expert(&self, g: usize) -> BlockScaled<'_> {
        BlockScaled::blocks(
            self.codes.index_axis(Axis(0), g),
            self.scales.index_axis(Axis(0), g),
        )
    }
}

/// Which rows of `a` (its leading dims flattened: `[R, K]`) each expert multiplies, in output
/// order: the one gather/scatter of the grouped GEMMs (this reference, `dsv3`'s fast path and
/// its GPU backends). Rows of no group are padding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupRows {
    per_group: Vec<Vec<usize>>,
    rows: usize,
}

impl GroupRows {
    /// Contiguous layout: row `m` belongs to expert `m_indices[m]`, none when it is −1
    /// (validated: every other index is in `0..groups`).
    pub fn contiguous(m_indices: &[i64], groups: usize) -> Self {
        let mut per_group = vec![Vec::new(); groups];
        for (m, &g) in m_indices.iter().enumerate() {
            if let Some(rows) = usize::try_from(g).ok().and_then(|g| per_group.get_mut(g)) {
                rows.push(m);
            }
        }
        GroupRows {
            per_group,
            rows: m_indices.len(),
        }
    }

    /// Masked layout: `a: [G, M_max, K]` flattened; group `g` owns its first `masked_m[g]` rows
    /// `g·M_max + m` (validated: `0 ≤ masked_m[g] ≤ M_max`).
    pub fn masked(masked_m: &[i64], m_max: usize) -> Self {
        let per_group = masked_m
            .iter()
            .enumerate()
            .map(|(g, &n)| {
                (0..n.clamp(0, m_max as i64) as usize)
                    .map(|m| g * m_max + m)
                    .collect()
            })
            .collect();
        GroupRows {
            per_group,
            rows: masked_m.len() * m_max,
        }
    }

    /// The rows of group `g`, ascending.
    pub fn of(&self, g: usize) -> &[usize] {
        &self.per_group[g]
    }

    /// The number of groups.
    pub fn groups(&self) -> usize {
        self.per_group.len()
    }

    /// Whether each of the `R` rows belongs to a group (the rows a checker judges).
    pub fn defined(&self) -> Vec<bool> {
        let mut defined = vec![false; self.rows];
        for &r in self.per_group.iter().flatten() {
            defined[r] = true;
        }
        defined
    }
}

/// `c[r] = fp8_gemm(a[r], b[g])` for every row `r` of every group `g`, 0 for the other rows.
/// Shapes: `a.codes: [R, K]` (1×B tiles), `b: [G, N, K]` → `c: [R, N]`.
fn grouped(
    a: BlockScaled,
    b: ExpertWeights,
    rows: &GroupRows,
    block_size: usize,
    accumulation: &Accumulation,
) -> Array2<f32> {
    let (a_codes, a_s) = (a.codes.as_standard_layout(), a.scales.as_standard_layout());
    let values = e4m3_values();
    let mut c = Array2::<f32>::zeros((a.codes.nrows(), b.codes.shape()[1]));
    for g in 0..rows.groups() {
        let expert = b.expert(g);
        let (b_g, b_s_g) = (
            expert.codes.as_standard_layout(),
            expert.scales.as_standard_layout(),
        );
        for &r in rows.of(g) {
            let mut c_row = c.row_mut(r);
            output_row(
                c_row.as_slice_mut().expect("a fresh array is contiguous"),
                row(&a_codes, r),
                row(&a_s, r),
                (&b_g, &b_s_g, ScaleLayout::Block),
                block_size,
                accumulation,
                &values,
            );
        }
    }
    c
}

/// Contiguous layout: `c[m] = fp8_gemm(a[m], b[m_indices[m]])` for rows with an expert, 0 for
/// padding rows (`m_indices[m] = −1`).
///
/// Shapes: `a.codes: [M, K]`, `a.scales: [M, ⌈K/B⌉]` (1×B tiles), `b: [G, N, K]`,
/// `m_indices: [M]` → `c: [M, N]` (f32 accumulator).
pub fn m_grouped_fp8_gemm_contiguous(
    a: BlockScaled,
    b: ExpertWeights,
    m_indices: &[i64],
    block_size: usize,
    accumulation: &Accumulation,
) -> Result<Array2<f32>> {
    check_m_grouped_contiguous(a, b, m_indices, block_size, accumulation)?;
    let rows = GroupRows::contiguous(m_indices, b.groups());
    Ok(grouped(a, b, &rows, block_size, accumulation))
}

/// Masked layout: `c[g, m] = fp8_gemm(a[g, m], b[g])` for `m < masked_m[g]`, 0 past it.
///
/// Shapes: `a: [G, M_max, K]`, `a_s: [G, M_max, ⌈K/B⌉]`, `b: [G, N, K]`, `masked_m: [G]`
/// → `c: [G, M_max, N]`.
pub fn m_grouped_fp8_gemm_masked(
    a: ArrayView3<u8>,
    a_s: ArrayView3<f32>,
    b: ExpertWeights,
    masked_m: &[i64],
    block_size: usize,
    accumulation: &Accumulation,
) -> Result<Array3<f32>> {
    check_m_grouped_masked(a, a_s, b, masked_m, block_size, accumulation)?;
    let (groups, m_max, k) = a.dim();
    let (a2, a_s2) = (flatten(a), flatten(a_s));
    let rows = GroupRows::masked(masked_m, m_max);
    let tiles = BlockScaled::tiles(a2.view(), a_s2.view());
    let c = grouped(tiles, b, &rows, block_size, accumulation);
    let n = c.ncols();
    debug_assert_eq!(a2.ncols(), k);
    Ok(c.into_shape_with_order((groups, m_max, n))
        .expect("[G·M_max, N] rows in order"))
}

/// `[G, M, X]` as `[G·M, X]` (a copy in standard layout).
pub fn flatten<T: Copy>(x: ArrayView3<T>) -> Array2<T> {
    let (g, m, c) = x.dim();
    x.as_standard_layout()
        .to_owned()
        .into_shape_with_order((g * m, c))
        .expect("standard layout")
}

/// Validate the contiguous layout: shapes, `m_indices ∈ −1..G`, the rows with an expert, and
/// every expert's weight. Padding rows are not looked at.
pub fn check_m_grouped_contiguous(
    a: BlockScaled,
    b: ExpertWeights,
    m_indices: &[i64],
    block_size: usize,
    accumulation: &Accumulation,
) -> Result<()> {
    const OP: &str = "m_grouped_fp8_gemm_contiguous";
    check_setup(OP, block_size, accumulation)?;
    let (m, k) = a.codes.dim();
    let kb = k.div_ceil(block_size);
    check_shape(OP, "a_s", a.scales.shape(), &[m, kb], "[M, ceil(K/B)]")?;
    check_shape(OP, "m_indices", &[m_indices.len()], &[m], "[M]")?;
    check_weights(OP, b, k, block_size, accumulation)?;
    for (i, &g) in m_indices.iter().enumerate() {
        if g == -1 {
            continue;
        }
        if g < -1 || g >= b.groups() as i64 {
            return Err(Error::Value {
                op: OP,
                tensor: "m_indices",
                index: vec![i],
                value: g.to_string(),
                why: "an expert index must be in 0..G, or −1 for a padding row",
            });
        }
        check_codes(OP, "a", a.codes.row(i), &[i])?;
        check_scales(
            OP,
            "a_s",
            a.scales.row(i),
            &[i],
            block_size,
            k,
            accumulation,
        )?;
    }
    Ok(())
}

/// Validate the masked layout: shapes, `masked_m ∈ 0..=M_max`, the real rows, the weights.
pub fn check_m_grouped_masked(
    a: ArrayView3<u8>,
    a_s: ArrayView3<f32>,
    b: ExpertWeights,
    masked_m: &[i64],
    block_size: usize,
    accumulation: &Accumulation,
) -> Result<()> {
    const OP: &str = "m_grouped_fp8_gemm_masked";
    check_setup(OP, block_size, accumulation)?;
    let (groups, m_max, k) = a.dim();
    let kb = k.div_ceil(block_size);
    check_shape(
        OP,
        "a_s",
        a_s.shape(),
        &[groups, m_max, kb],
        "[G, M_max, ceil(K/B)]",
    )?;
    check_shape(
        OP,
        "b",
        &b.codes.shape()[..1],
        &[groups],
        "[G, N, K] with G from a",
    )?;
    check_shape(OP, "masked_m", &[masked_m.len()], &[groups], "[G]")?;
    check_weights(OP, b, k, block_size, accumulation)?;
    for (g, &rows) in masked_m.iter().enumerate() {
        if rows < 0 || rows > m_max as i64 {
            return Err(Error::Value {
                op: OP,
                tensor: "masked_m",
                index: vec![g],
                value: rows.to_string(),
                why: "the number of real rows of a group must be in 0..=M_max",
            });
        }
        for m in 0..rows as usize {
            check_codes(OP, "a", a.slice(ndarray::s![g, m, ..]), &[g, m])?;
            let s = a_s.slice(ndarray::s![g, m, ..]);
            check_scales(OP, "a_s", s, &[g, m], block_size, k, accumulation)?;
        }
    }
    Ok(())
}

/// Every expert's weight: `b.codes: [G, N, K]`, `b.scales: [G, ⌈N/B⌉, ⌈K/B⌉]`.
fn check_weights(
    op: &'static str,
    b: ExpertWeights,
    k: usize,
    block_size: usize,
    accumulation: &Accumulation,
) -> Result<()> {
    let (groups, n, k_b) = b.codes.dim();
    if k_b != k {
        return Err(Error::Shape {
            op,
            tensor: "b",
            got: b.codes.shape().to_vec(),
            expected: format!("[G, N, K] with K = {k} (the last dim of a)"),
        });
    }
    let grid = [groups, n.div_ceil(block_size), k.div_ceil(block_size)];
    check_shape(
        op,
        "b_s",
        b.scales.shape(),
        &grid,
        "[G, ceil(N/B), ceil(K/B)]",
    )?;
    for g in 0..groups {
        for j in 0..n {
            check_codes(op, "b", b.codes.slice(ndarray::s![g, j, ..]), &[g, j])?;
        }
        for j in 0..grid[1] {
            let s = b.scales.slice(ndarray::s![g, j, ..]);
            check_scales(op, "b_s", s, &[g, j], block_size, k, accumulation)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fp8::fp8_gemm::fp8_gemm;
    use ndarray::{s, Array2, Array3};

    /// Codes in 0x00..0x7E with both signs, deterministic.
    fn codes(n: usize, seed: usize) -> Vec<u8> {
        (0..n)
            .map(|i| {
                let v = ((i * 7919 + seed * 104729) % 251) as u8;
                if v == 0x7F {
                    0x7E
                } else {
                    v
                }
            })
            .collect()
    }

    #[test]
    fn contiguous_rows_equal_the_dense_gemm_of_their_expert() {
        let (m, n, k, g, bs) = (5, 3, 6, 2, 4);
        let a = Array2::from_shape_vec((m, k), codes(m * k, 1)).unwrap();
        let a_s = Array2::from_shape_fn((m, 2), |(i, j)| 0.5 + (i + j) as f32);
        let b = Array3::from_shape_vec((g, n, k), codes(g * n * k, 2)).unwrap();
        let b_s = Array3::from_shape_fn((g, 1, 2), |(e, _, j)| 1.0 + (e * 2 + j) as f32 * 0.25);
        let mut a_bad = a.clone();
        a_bad[[2, 0]] = 0xFF; // a padding row may hold anything
        let idx = [1i64, 0, -1, 1, 0];
        let w = ExpertWeights::new(b.view(), b_s.view());
        let c = m_grouped_fp8_gemm_contiguous(
            BlockScaled::tiles(a_bad.view(), a_s.view()),
            w,
            &idx,
            bs,
            &Accumulation::Exact,
        )
        .unwrap();
        for e in 0..g {
            let dense = fp8_gemm(
                a.view(),
                a_s.view(),
                b.slice(s![e, .., ..]),
                b_s.slice(s![e, .., ..]),
                bs,
                &Accumulation::Exact,
            )
            .unwrap();
            for (row, &i) in idx.iter().enumerate() {
                if i == e as i64 {
                    assert_eq!(c.row(row), dense.row(row), "row {row}");
                }
            }
        }
        assert!(c.row(2).iter().all(|&v| v == 0.0));
        let e = m_grouped_fp8_gemm_contiguous(
            BlockScaled::tiles(a.view(), a_s.view()),
            w,
            &[1, 0, 2, 1, 0],
            bs,
            &Accumulation::Exact,
        )
        .unwrap_err();
        assert!(
            matches!(e, Error::Value { tensor: "m_indices", ref index, .. } if index == &vec![2]),
            "{e}"
        );
    }

    #[test]
    fn masked_rows_past_masked_m_are_zero_and_unchecked() {
        let (g, m_max, n, k, bs) = (2, 3, 2, 5, 4);
        let mut a = Array3::from_shape_vec((g, m_max, k), codes(g * m_max * k, 3)).unwrap();
        let mut a_s = Array3::from_elem((g, m_max, 2), 0.75f32);
        let b = Array3::from_shape_vec((g, n, k), codes(g * n * k, 4)).unwrap();
        let b_s = Array3::from_elem((g, 1, 2), 2.0f32);
        a[[1, 2, 3]] = 0x7F; // past masked_m[1] = 2: ignored
        a_s[[0, 1, 0]] = f32::NAN; // past masked_m[0] = 1
        let w = ExpertWeights::new(b.view(), b_s.view());
        let c =
            m_grouped_fp8_gemm_masked(a.view(), a_s.view(), w, &[1, 2], bs, &Accumulation::Exact)
                .unwrap();
        for e in 0..g {
            let dense = fp8_gemm(
                a.slice(s![e, 0..1, ..]),
                a_s.slice(s![e, 0..1, ..]),
                b.slice(s![e, .., ..]),
                b_s.slice(s![e, .., ..]),
                bs,
                &Accumulation::Exact,
            )
            .unwrap();
            assert_eq!(c.slice(s![e, 0, ..]), dense.row(0));
        }
        assert!(c.slice(s![0, 1.., ..]).iter().all(|&v| v == 0.0));
        assert!(c.slice(s![1, 2.., ..]).iter().all(|&v| v == 0.0));
        let e =
            m_grouped_fp8_gemm_masked(a.view(), a_s.view(), w, &[1, 4], bs, &Accumulation::Exact)
                .unwrap_err();
        assert!(
            matches!(e, Error::Value { tensor: "masked_m", ref index, .. } if index == &vec![1]),
            "{e}"
        );
    }

    #[test]
    fn group_rows_list_each_expert_s_rows_in_order() {
        let c = GroupRows::contiguous(&[1, 0, -1, 1, 0], 3);
        assert_eq!(
            (c.of(0), c.of(1), c.of(2)),
            (&[1, 4][..], &[0, 3][..], &[][..])
        );
        assert_eq!(c.defined(), vec![true, true, false, true, true]);
        let m = GroupRows::masked(&[1, 3, 0], 3);
        assert_eq!(
            (m.of(0), m.of(1), m.of(2)),
            (&[0][..], &[3, 4, 5][..], &[][..])
        );
        assert_eq!(m.defined().iter().filter(|&&d| d).count(), 4);
    }
}
