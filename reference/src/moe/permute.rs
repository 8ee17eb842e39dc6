//! MoE dispatch and combine on one rank, in DeepGEMM's contiguous layout (the input of
//! `m_grouped_fp8_gemm_nt_contiguous`; vLLM's `moe_permute`/`moe_unpermute`, DeepEP's
//! dispatch/combine around them): the `K` copies of every token are grouped by expert, each
//! expert's segment padded to a multiple of `block_m` rows, and `m_indices` names each row's
//! expert (−1 on padding rows).

use ndarray::{Array2, ArrayView2};

use crate::error::{Error, Result};

/// Rows of the permuted buffer for `T` tokens, `K` slots and `E` experts: the worst case
/// `Σ_e ⌈c_e / block_m⌉·block_m ≤ T·K + E·(block_m − 1)`, rounded up to a multiple of `block_m`
/// (vLLM's `compute_aligned_M`), so that the size does not depend on the routing. The rows past
/// the last segment are padding too.
pub fn permuted_rows(tokens: usize, top_k: usize, experts: usize, block_m: usize) -> usize {
    (tokens * top_k + experts * (block_m - 1)).div_ceil(block_m) * block_m
}

/// The contiguous layout of one routing.
#[derive(Debug, Clone, PartialEq)]
pub struct Permutation {
    /// `[M]`: the expert of each row, −1 on padding rows.
    pub m_indices: Vec<i32>,
    /// `[T, K]`: the row holding the copy of token t for slot k; −1 where `topk_ids` is −1.
    pub token_row: Array2<i64>,
    /// `[E]`: the first row of each expert's segment (segments in expert order).
    pub segment_start: Vec<usize>,
    /// `[E]`: the tokens routed to each expert (the segment's valid rows come first).
    pub counts: Vec<usize>,
}

/// Group the `(token, slot)` pairs of `topk_ids [T, K]` by expert: expert e's segment starts at
/// `Σ_{e' < e} ⌈c_{e'}/block_m⌉·block_m` and holds its `c_e` tokens in token order, then
/// padding. A slot with id −1 (a token routed to an expert of another rank, DeepEP's
/// convention) gets no row. Shapes: `topk_ids [T, K]` → [`Permutation`] of
/// [`permuted_rows`] rows.
pub fn moe_permute(
    topk_ids: ArrayView2<i64>,
    experts: usize,
    block_m: usize,
) -> Result<Permutation> {
    const OP: &str = "moe_permute";
    if block_m == 0 {
        return Err(Error::Argument {
            op: OP,
            name: "block_m",
            value: "0".into(),
            why: "segments are padded to a multiple of block_m ≥ 1".into(),
        });
    }
    let (tokens, top_k) = topk_ids.dim();
    let mut counts = vec![0usize; experts];
    for ((t, k), &id) in topk_ids.indexed_iter() {
        if id == -1 {
            continue;
        }
        if id < 0 || id as usize >= experts {
            return Err(Error::Value {
                op: OP,
                tensor: "topk_ids",
                index: vec![t, k],
                value: id.to_string(),
                why: "expert ids must be in 0..num_experts (or −1: not on this rank)",
            });
        }
        counts[id as usize] += 1;
    }
    let mut segment_start = Vec::with_capacity(experts);
    let mut next = 0usize;
    for &c in &counts {
        segment_start.push(next);
        next += c.div_ceil(block_m) * block_m;
    }
    let rows = permuted_rows(tokens, top_k, experts, block_m);
    let mut m_indices = vec![-1i32; rows];
    for (e, (&start, &c)) in segment_start.iter().zip(&counts).enumerate() {
        m_indices[start..start + c].fill(e as i32);
    }
    let mut filled = vec![0usize; experts];
    let mut token_row = Array2::<i64>::from_elem((tokens, top_k), -1);
    for ((t, k), &id) in topk_ids.indexed_iter() {
        if id >= 0 {
            let e = id as usize;
            token_row[[t, k]] = (segment_start[e] + filled[e]) as i64;
            filled[e] += 1;
        }
    }
    Ok(Permutation {
        m_indices,
        token_row,
        segment_start,
        counts,
    })
}

/// `y[t] = Σ_k w[t, k] · expert_out[token_row[t, k]]` over the slots with a row (≥ 0): the
/// combine after the experts (V3 eq. (12)'s routed sum, scaled weights included). Shapes:
/// `expert_out [M, D]`, `token_row [T, K]`, `topk_weights [T, K]` → `[T, D]` in f64 (the
/// caller rounds).
pub fn moe_combine(
    expert_out: ArrayView2<f32>,
    token_row: ArrayView2<i64>,
    topk_weights: ArrayView2<f32>,
) -> Result<Array2<f64>> {
    const OP: &str = "moe_combine";
    let (rows, d) = expert_out.dim();
    let (tokens, top_k) = token_row.dim();
    if topk_weights.dim() != (tokens, top_k) {
        return Err(Error::Shape {
            op: OP,
            tensor: "topk_weights",
            got: topk_weights.shape().to_vec(),
            expected: format!("[{tokens}, {top_k}] (the shape of token_row)"),
        });
    }
    let mut y = Array2::<f64>::zeros((tokens, d));
    for ((t, k), &r) in token_row.indexed_iter() {
        if r == -1 {
            continue;
        }
        if r < 0 || r as usize >= rows {
            return Err(Error::Value {
                op: OP,
                tensor: "token_row",
                index: vec![t, k],
                value: r.to_string(),
                why: "rows must be in 0..M (expert_out's rows) or −1 (no row)",
            });
        }
        let w = f64::from(topk_weights[[t, k]]);
        for c in 0..d {
            y[[t, c]] += w * f64::from(expert_out[[r as usize, c]]);
        }
    }
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn segments_are_padded_to_block_m_in_expert_order() {
        // 3 tokens, top-2 of 3 experts, block_m 4: expert 0 gets 1 token, 1 none, 2 four.
        let ids = array![[2i64, 0], [2, -1], [2, 2]];
        // a repeated id in one row is two copies (a dispatch does not dedupe)
        let p = moe_permute(ids.view(), 3, 4).unwrap();
        assert_eq!(p.counts, vec![1, 0, 4]);
        assert_eq!(p.segment_start, vec![0, 4, 4]);
        // M = ⌈(6 + 3·3)/4⌉·4 = 16
        assert_eq!(p.m_indices.len(), 16);
        assert_eq!(&p.m_indices[..8], &[0, -1, -1, -1, 2, 2, 2, 2]);
        assert!(p.m_indices[8..].iter().all(|&m| m == -1));
        assert_eq!(p.token_row, array![[4, 0], [5, -1], [6, 7]]);
    }

    #[test]
    fn combine_is_the_weighted_sum_of_the_rows() {
        let out = array![[1.0f32, 2.0], [10.0, 20.0], [100.0, 200.0]];
        let rows = array![[2i64, 0], [1, -1]];
        let w = array![[0.5f32, 2.0], [3.0, 9.0]];
        let y = moe_combine(out.view(), rows.view(), w.view()).unwrap();
        assert_eq!(y, array![[52.0, 104.0], [30.0, 60.0]]);
        let bad = array![[3i64, 0], [1, -1]];
        let e = moe_combine(out.view(), bad.view(), w.view())
            .unwrap_err()
            .to_string();
        assert!(e.contains("token_row[0, 0]") && e.contains("is 3"), "{e}");
    }
}
