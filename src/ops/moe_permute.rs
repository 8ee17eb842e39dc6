//! `moe_permute`, `moe_permute_fp8` and `moe_combine`: MoE dispatch and combine on one rank in
//! DeepGEMM's contiguous layout ([`dsv3_reference::moe::permute`]).
//!
//! Permutations are judged as what they are. `m_indices` (the expert of each row, −1 on
//! padding) is exact: segments in expert order, each `⌈c_e/block_m⌉·block_m` rows, its valid
//! rows first. `token_row` (where each `(token, slot)` went) may order a segment's tokens any
//! way: each pair must name a distinct row inside its expert's valid rows (−1 for id −1). The
//! rows' contents are judged through the candidate's own map: the row claimed by `(t, k)` must
//! hold `x[t]` bit for bit (`moe_permute`), or its 1×128 E4M3 quantization with a power-of-two
//! scale (`moe_permute_fp8`: the scale the ceiling of `amax/448` within 2 ulp, each code
//! `e4m3(x/s)` or its neighbour at a near-tie — the `act_quant` ue8m0 policy); padding rows
//! are not judged.
//!
//! `moe_combine`: `y[t] = Σ_k w[t,k]·expert_out[token_row[t,k]]`, products and sums in f32 in
//! any order, `|Δ| ≤ γ_{K+1}·Σ_k|w e| + 2^-120`, then one rounding to `out_dtype` (BF16 as V3
//! combines).

use std::collections::BTreeMap;

use ndarray::Array2;

use dsv3_reference::fp8::{act_quant::act_quant_any_k, ScaleFmt};
use dsv3_reference::moe::permute::{moe_combine, moe_permute, permuted_rows, Permutation};

use super::bound_policy::{derived_bound_policy, put_bounded};
use super::quant_policy::{code_ok, ue8m0_scale_ok};
use super::{float_input, gen_fits, get, outputs, require_finite, OutDtype};
use crate::registry::compare::Policy;
use crate::registry::config::{ceil, Config, ConfigSchema, FieldKind};
use crate::registry::contract::{Bindings, Dim, Rule, TensorSpec};
use crate::registry::error::Result;
use crate::registry::io::TensorMap;
use crate::registry::rng::Rng;
use crate::registry::tensor::{DType, Tensor};
use crate::registry::tolerance::gamma;
use crate::registry::{OpEntry, PolicyCtx, Sizes};

crate::op_config! {
    /// `moe_permute`'s and `moe_permute_fp8`'s config.
    pub struct PermuteConfig {
        num_experts: usize = "256", FieldKind::Int { min: 1, max: ceil::COUNT }, "experts on this rank (256 routed experts in V3 on one rank; fewer under EP)";
        block_m: usize = "128", FieldKind::Int { min: 1, max: ceil::BLOCK }, "segment alignment (DeepGEMM's M block: 128)";
    }
}

crate::op_config! {
    /// `moe_combine`'s config.
    pub struct CombineConfig {
        out_dtype: OutDtype = "\"bf16\"", FieldKind::choice::<OutDtype>(), "the combined output's dtype (BF16 in V3)";
    }
}

/// The FP8 dispatch's scale tile: 1×128 (V3 §3.3.3).
const QUANT_TILE: usize = 128;

/// `M`, the rows of the permuted buffer: [`permuted_rows`] of `T`, `K` and the config.
const ROWS: Rule = Rule {
    name: "M = ⌈(T·K + num_experts·(block_m − 1))/block_m⌉·block_m",
    get: |b: &Bindings, c: &Config| {
        let p = c.get::<PermuteConfig>();
        permuted_rows(b.get("T"), b.get("K"), p.num_experts, p.block_m)
    },
};
const SCALE_COLS: crate::registry::contract::Param = crate::registry::contract::Param {
    name: "128",
    get: |_| QUANT_TILE,
};

const PERMUTE_INPUTS: &[TensorSpec] = &[
    TensorSpec {
        name: "x",
        dtypes: &[DType::F32, DType::BF16],
        shape: &[Dim::Var("T"), Dim::Var("D")],
        doc: "tokens",
    },
    TensorSpec {
        name: "topk_ids",
        dtypes: &[DType::I64, DType::I32],
        shape: &[Dim::Var("T"), Dim::Var("K")],
        doc: "experts per token (−1: on another rank)",
    },
];
const M_INDICES: TensorSpec = TensorSpec {
    name: "m_indices",
    dtypes: &[DType::I64],
    shape: &[Dim::Rule(ROWS)],
    doc: "expert of each row, −1 on padding (int32 accepted)",
};
const TOKEN_ROW: TensorSpec = TensorSpec {
    name: "token_row",
    dtypes: &[DType::I64],
    shape: &[Dim::Var("T"), Dim::Var("K")],
    doc: "row of each (token, slot), −1 for id −1 (int32 accepted)",
};
const PERMUTE_SOURCE: &str = "V3 §3.3.3 (dispatch after the router, FP8 with 1×128 power-of-two scales); DeepGEMM \
m_grouped_fp8_gemm_nt_contiguous's layout (m_indices, segments aligned to block_m); vLLM moe_permute / compute_aligned_M";
const PERMUTE_POLICY: &str = "m_indices exact; token_row: each (t, k) a distinct row of its expert's valid rows \
(any order inside a segment); row contents judged through the candidate's map (moe_permute: x[t] bit for bit; \
moe_permute_fp8: the act_quant ue8m0 policy against x[t]); padding rows not judged";

pub static MOE_PERMUTE: OpEntry = OpEntry {
    name: "moe_permute",
    source: PERMUTE_SOURCE,
    summary: "rows grouped by expert: expert e's segment starts at Σ_{e'<e} ⌈c_e'/block_m⌉·block_m and holds its c_e tokens, \
then padding; permuted[token_row[t,k]] = x[t]; m_indices = expert per row (−1 padding)",
    inputs: PERMUTE_INPUTS,
    outputs: &[
        TensorSpec { name: "permuted", dtypes: &[DType::F32, DType::BF16], shape: &[Dim::Rule(ROWS), Dim::Var("D")], doc: "token copies by expert (dtype of x)" },
        M_INDICES,
        TOKEN_ROW,
    ],
    constraints: &[],
    config: ConfigSchema::of::<PermuteConfig>(),
    adapt: None,
    reference: moe_permute_ref,
    reference_fn: "reference/src/moe/permute.rs::moe_permute",
    gpu: &[],
    policy: permute_policy,
    policy_doc: PERMUTE_POLICY,
    generate: permute_gen,
    test_configs: &[r#"{"num_experts":4,"block_m":16}"#, r#"{"num_experts":6,"block_m":1}"#],
    v3_sizes: &[&[("T", 64), ("D", 7168), ("K", 8)]],
};

pub static MOE_PERMUTE_FP8: OpEntry = OpEntry {
    name: "moe_permute_fp8",
    source: PERMUTE_SOURCE,
    summary: "moe_permute with each row quantized for FP8 dispatch: 1×128 tiles, s = 2^⌈log2(max(amax, 1e-4)/448)⌉ (ue8m0), \
codes e4m3(x/s)",
    inputs: PERMUTE_INPUTS,
    outputs: &[
        TensorSpec { name: "permuted", dtypes: &[DType::F8E4M3], shape: &[Dim::Rule(ROWS), Dim::Var("D")], doc: "E4M3 codes" },
        TensorSpec { name: "permuted_scales", dtypes: &[DType::F32], shape: &[Dim::Rule(ROWS), Dim::CeilDiv("D", SCALE_COLS)], doc: "power-of-two scale per 1×128 tile" },
        M_INDICES,
        TOKEN_ROW,
    ],
    constraints: &[],
    config: ConfigSchema::of::<PermuteConfig>(),
    adapt: None,
    reference: moe_permute_fp8_ref,
    reference_fn: "reference/src/moe/permute.rs::moe_permute",
    gpu: &[],
    policy: permute_policy,
    policy_doc: PERMUTE_POLICY,
    generate: permute_gen,
    test_configs: &[r#"{"num_experts":4,"block_m":16}"#],
    v3_sizes: &[&[("T", 64), ("D", 7168), ("K", 8)]],
};

pub static MOE_COMBINE: OpEntry = OpEntry {
    name: "moe_combine",
    source: "V3 eq. (12)'s routed sum Σ g_{i,t} FFN_i(u_t) after the experts; §3.3.3 (combine in BF16); DeepEP combine, vLLM moe_unpermute",
    summary: "y[t] = Σ_k topk_weights[t,k] · expert_out[token_row[t,k]] over the slots with a row (≥ 0); y in out_dtype",
    inputs: &[
        TensorSpec { name: "expert_out", dtypes: &[DType::F32, DType::BF16], shape: &[Dim::Var("M"), Dim::Var("D")], doc: "expert outputs in the permuted layout" },
        TensorSpec { name: "token_row", dtypes: &[DType::I64, DType::I32], shape: &[Dim::Var("T"), Dim::Var("K")], doc: "moe_permute's map (−1: no row)" },
        TensorSpec { name: "topk_weights", dtypes: &[DType::F32, DType::BF16], shape: &[Dim::Var("T"), Dim::Var("K")], doc: "gate weights" },
    ],
    outputs: &[TensorSpec { name: "y", dtypes: &[DType::BF16, DType::F32], shape: &[Dim::Var("T"), Dim::Var("D")], doc: "combined (out_dtype)" }],
    constraints: &[],
    config: ConfigSchema::of::<CombineConfig>(),
    adapt: None,
    reference: moe_combine_ref,
    reference_fn: "reference/src/moe/permute.rs::moe_combine",
    gpu: &[],
    policy: combine_policy,
    policy_doc: "|Δy| ≤ γ_{K+1}·Σ_k|w e| + 2^-120 (f32 products and sums in any order), then one rounding to out_dtype \
(module doc of src/ops/moe_permute.rs, SPEC.md)",
    generate: combine_gen,
    test_configs: &[r#"{"out_dtype":"f32"}"#],
    v3_sizes: &[&[("T", 64), ("D", 7168), ("K", 8), ("E", 256)]],
};

/// The routing of the inputs and its canonical layout.
fn permutation(inputs: &TensorMap, cfg: &Config) -> Result<(Array2<i64>, Permutation)> {
    let ids = get(inputs, "topk_ids");
    let ids = Array2::from_shape_vec((ids.shape[0], ids.shape[1]), ids.indices())
        .expect("validated shape");
    let p = cfg.get::<PermuteConfig>();
    let perm = moe_permute(ids.view(), p.num_experts, p.block_m)?;
    Ok((ids, perm))
}

/// The tensors every permute op returns besides the rows.
fn index_outputs(perm: &Permutation) -> [(&'static str, Tensor); 2] {
    let m: Vec<i64> = perm.m_indices.iter().map(|&v| i64::from(v)).collect();
    let rows: Vec<i64> = perm.token_row.iter().copied().collect();
    [
        ("m_indices", Tensor::from_i64(vec![m.len()], &m)),
        (
            "token_row",
            Tensor::from_i64(perm.token_row.shape().to_vec(), &rows),
        ),
    ]
}

fn moe_permute_ref(inputs: &TensorMap, cfg: &Config) -> Result<TensorMap> {
    let x = get(inputs, "x");
    let (_, perm) = permutation(inputs, cfg)?;
    let (_, d) = x.rows_cols();
    let size = x.dtype.size();
    // padding rows hold zeros (not judged)
    let mut data = vec![0u8; perm.m_indices.len() * d * size];
    for ((t, _), &r) in perm.token_row.indexed_iter() {
        if r >= 0 {
            let r = r as usize;
            data[r * d * size..(r + 1) * d * size]
                .copy_from_slice(&x.data[t * d * size..(t + 1) * d * size]);
        }
    }
    let permuted = Tensor::from_bytes(x.dtype, vec![perm.m_indices.len(), d], data)
        .expect("rows · D elements");
    let [m, rows] = index_outputs(&perm);
    Ok(outputs([("permuted", permuted), m, rows]))
}

fn moe_permute_fp8_ref(inputs: &TensorMap, cfg: &Config) -> Result<TensorMap> {
    let x = get(inputs, "x");
    require_finite(
        "moe_permute_fp8",
        "x",
        x,
        "a non-finite value has no FP8 code",
    )?;
    let (_, perm) = permutation(inputs, cfg)?;
    let xm = x.matrix_f32();
    let d = xm.ncols();
    let q = act_quant_any_k(xm.view(), QUANT_TILE, ScaleFmt::Ue8m0)?;
    let (rows, cols) = (perm.m_indices.len(), d.div_ceil(QUANT_TILE));
    let mut codes = vec![0u8; rows * d];
    let mut scales = vec![1f32; rows * cols];
    for ((t, _), &r) in perm.token_row.indexed_iter() {
        if r >= 0 {
            let r = r as usize;
            codes[r * d..(r + 1) * d]
                .copy_from_slice(q.y.row(t).as_slice().expect("standard layout"));
            scales[r * cols..(r + 1) * cols]
                .copy_from_slice(q.s.row(t).as_slice().expect("standard layout"));
        }
    }
    let [m, map] = index_outputs(&perm);
    Ok(outputs([
        (
            "permuted",
            Tensor::from_codes(DType::F8E4M3, vec![rows, d], codes),
        ),
        (
            "permuted_scales",
            Tensor::from_f32(vec![rows, cols], &scales),
        ),
        m,
        map,
    ]))
}

/// The candidate's map, checked: `owner[r]` = the token whose copy row r holds, for the rows
/// some `(t, k)` claims inside its expert's valid rows and no other pair claims.
struct Claims {
    /// per `(t, k)` flat: whether its row is acceptable
    pair_ok: Vec<bool>,
    owner: BTreeMap<usize, usize>,
}

fn claims(ids: &Array2<i64>, perm: &Permutation, cand_rows: &Tensor) -> Claims {
    let k = ids.ncols();
    let rows = cand_rows.indices();
    let mut count: BTreeMap<i64, usize> = BTreeMap::new();
    for &r in &rows {
        *count.entry(r).or_default() += 1;
    }
    let mut pair_ok = Vec::with_capacity(rows.len());
    let mut owner = BTreeMap::new();
    for (i, &r) in rows.iter().enumerate() {
        let id = ids[[i / k, i % k]];
        let ok = if id < 0 {
            r == -1
        } else {
            let e = id as usize;
            let valid =
                perm.segment_start[e] as i64..(perm.segment_start[e] + perm.counts[e]) as i64;
            valid.contains(&r) && count[&r] == 1
        };
        if ok && r >= 0 {
            owner.insert(r as usize, i / k);
        }
        pair_ok.push(ok);
    }
    Claims { pair_ok, owner }
}

/// A row-wise output (`width` values per row) judged through the candidate's map: the rows some
/// `(t, k)` claims by `judge(t, flat index)`, the padding rows not at all.
fn through_map<'a>(
    owner: BTreeMap<usize, usize>,
    width: usize,
    why: &'static str,
    judge: impl Fn(usize, usize) -> Option<&'static str> + 'a,
) -> Policy<'a> {
    let judged = owner.clone();
    Policy::Partial {
        why: "padding rows",
        judged: Box::new(move |i| judged.contains_key(&(i / width))),
        inner: Box::new(Policy::Relational {
            why,
            judge: Box::new(move |i| judge(*owner.get(&(i / width))?, i)),
        }),
    }
}

fn permute_policy<'a>(ctx: &PolicyCtx<'a>) -> Policy<'a> {
    let Ok((ids, perm)) = permutation(ctx.inputs, ctx.config) else {
        return Policy::Exact;
    };
    let c = claims(&ids, &perm, get(ctx.candidate, "token_row"));
    match ctx.output {
        "m_indices" => Policy::Exact,
        "token_row" => Policy::Relational {
            why: "each (token, slot) a distinct row of its expert's valid rows, any order inside the segment",
            judge: Box::new(move |i| c.pair_ok[i].then_some("a row of its expert's segment")),
        },
        "permuted" if ctx.candidate["permuted"].dtype == DType::F8E4M3 => {
            let x = get(ctx.inputs, "x").matrix_f32();
            let d = x.ncols().max(1);
            let got = get(ctx.candidate, "permuted");
            let scales = get(ctx.candidate, "permuted_scales");
            let cols = d.div_ceil(QUANT_TILE);
            through_map(
                c.owner,
                d,
                "e4m3(x[t]/s') with s' the candidate's scale for the row, or a neighbouring code at a near-tie",
                move |t, i| {
                    let (r, col) = (i / d, i % d);
                    let s = scales.value(r * cols + col / QUANT_TILE) as f32;
                    code_ok(x[[t, col]], s, got.bits(i) as u16).then_some("the row's own scale")
                },
            )
        }
        "permuted_scales" => {
            let x = get(ctx.inputs, "x").matrix_f32();
            let d = x.ncols();
            let cols = d.div_ceil(QUANT_TILE).max(1);
            let got = get(ctx.candidate, "permuted_scales");
            through_map(
                c.owner,
                cols,
                "the power-of-two ceiling of x[t]'s tile amax/448 (within 2 ulp)",
                move |t, i| {
                    let tile = i % cols;
                    let cols_of = tile * QUANT_TILE..((tile + 1) * QUANT_TILE).min(d);
                    let amax = cols_of.map(|col| x[[t, col]].abs()).fold(0f32, f32::max);
                    ue8m0_scale_ok(amax, got.value(i) as f32).then_some("an admissible power of two")
                },
            )
        }
        _ => {
            // moe_permute's rows: x[t] bit for bit
            let x = get(ctx.inputs, "x");
            let d = x.shape.get(1).copied().unwrap_or(1).max(1);
            let got = get(ctx.candidate, "permuted");
            through_map(
                c.owner,
                d,
                "the row holds x[t] of the (t, k) the candidate's token_row puts there, bit for bit",
                move |t, i| (got.bits(i) == x.bits(t * d + i % d)).then_some("x[t] of the row's (t, k)"),
            )
        }
    }
}

fn moe_combine_ref(inputs: &TensorMap, cfg: &Config) -> Result<TensorMap> {
    const OP: &str = "moe_combine";
    let (e, rows, w) = (
        get(inputs, "expert_out"),
        get(inputs, "token_row"),
        get(inputs, "topk_weights"),
    );
    require_finite(OP, "topk_weights", w, "gate weights must be finite")?;
    let em = e.matrix_f32();
    let (t, k) = (rows.shape[0], rows.shape[1]);
    let map = Array2::from_shape_vec((t, k), rows.indices()).expect("validated shape");
    let wm = Array2::from_shape_vec((t, k), w.floats()).expect("validated shape");
    let y = moe_combine(em.view(), map.view(), wm.view())?;
    // expert rows a token reads must be finite (padding rows may hold anything)
    let d = em.ncols();
    let mut tol = vec![0f64; t * d];
    for ((ti, ki), &r) in map.indexed_iter() {
        if r >= 0 {
            let row = em.row(r as usize);
            if let Some(c) = row.iter().position(|v| !v.is_finite()) {
                return Err(dsv3_reference::Error::Value {
                    op: OP,
                    tensor: "expert_out",
                    index: vec![r as usize, c],
                    value: format!("{}", row[c]),
                    why: "a row some token reads must be finite",
                }
                .into());
            }
            let wv = f64::from(wm[[ti, ki]]).abs();
            for c in 0..d {
                tol[ti * d + c] += wv * f64::from(row[c]).abs();
            }
        }
    }
    let g = gamma(k as f64 + 1.0);
    tol.iter_mut().for_each(|v| *v = g * *v + 2f64.powi(-120));
    let dtype = match cfg.get::<CombineConfig>().out_dtype {
        OutDtype::Bf16 => DType::BF16,
        OutDtype::F32 => DType::F32,
    };
    let mut out = TensorMap::new();
    let exact: Vec<f64> = y.iter().copied().collect();
    put_bounded(&mut out, "y", dtype, vec![t, d], &exact, &tol);
    Ok(out)
}

fn combine_policy<'a>(ctx: &PolicyCtx<'a>) -> Policy<'a> {
    derived_bound_policy(
        ctx,
        "γ_{K+1}·Σ|w e| (f32 products and sums in any order), then one rounding to out_dtype",
    )
}

/// Routings with hazards: ids −1 (another rank), experts without tokens, an expert with more
/// than one block of tokens, the same expert twice in a row (two copies).
fn draw_ids(rng: &mut Rng, t: usize, k: usize, e: usize) -> Vec<i64> {
    let hot = rng.range(0, e - 1) as i64;
    let few = rng.range(1, e);
    (0..t * k)
        .map(|_| match rng.range(0, 9) {
            0 => -1,
            1 | 2 => hot,
            _ => rng.range(0, few - 1) as i64,
        })
        .collect()
}

fn ids_tensor(rng: &mut Rng, shape: Vec<usize>, ids: &[i64]) -> Tensor {
    if rng.chance(0.5) {
        Tensor::from_i64(shape, ids)
    } else {
        Tensor::from_i32(shape, &ids.iter().map(|&v| v as i32).collect::<Vec<_>>())
    }
}

fn permute_gen(rng: &mut Rng, cfg: &Config, sizes: &Sizes) -> Result<TensorMap> {
    let p = cfg.get::<PermuteConfig>();
    let t = sizes.or_draw("T", rng, 1, 40);
    let k = sizes.or_draw("K", rng, 1, 8);
    let d = sizes.or_draw("D", rng, 1, 300);
    let rows = permuted_rows(t, k, p.num_experts, p.block_m);
    gen_fits(&[&[t, d], &[t, k], &[rows, d]])?;
    let x: Vec<f32> = (0..t * d)
        .map(|_| (rng.normal() * (rng.normal() * 2.0).exp()) as f32)
        .collect();
    let ids = draw_ids(rng, t, k, p.num_experts);
    Ok(outputs([
        ("x", float_input(rng, vec![t, d], &x)),
        ("topk_ids", ids_tensor(rng, vec![t, k], &ids)),
    ]))
}

fn combine_gen(rng: &mut Rng, _cfg: &Config, sizes: &Sizes) -> Result<TensorMap> {
    let t = sizes.or_draw("T", rng, 1, 40);
    let k = sizes.or_draw("K", rng, 1, 8);
    let d = sizes.or_draw("D", rng, 1, 300);
    let e = sizes.or_draw("E", rng, 1, 12).max(1);
    let block_m = *rng.pick(&[1usize, 4, 128]);
    let rows = permuted_rows(t, k, e, block_m);
    gen_fits(&[&[rows, d], &[t, k], &[t, k]])?;
    let ids = draw_ids(rng, t, k, e);
    let ids = Array2::from_shape_vec((t, k), ids).expect("t·k ids");
    let perm = moe_permute(ids.view(), e, block_m)?;
    let out: Vec<f32> = (0..rows * d).map(|_| (rng.normal() * 3.0) as f32).collect();
    let w: Vec<f32> = (0..t * k)
        .map(|_| (rng.normal().abs() * 0.5) as f32)
        .collect();
    let map: Vec<i64> = perm.token_row.iter().copied().collect();
    Ok(outputs([
        ("expert_out", float_input(rng, vec![rows, d], &out)),
        ("token_row", ids_tensor(rng, vec![t, k], &map)),
        ("topk_weights", Tensor::from_f32(vec![t, k], &w)),
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::policy_report;

    /// The reference's outputs with each segment's rows in reverse token order (a kernel whose
    /// atomics hand out rows in another order) and NaN-filled padding rows.
    fn reordered(op: &OpEntry, inputs: &TensorMap, cfg: &Config) -> TensorMap {
        let reference = crate::registry::without_aux(
            op.run_reference(
                inputs,
                cfg,
                &op.contract().check_inputs(inputs, cfg, "").unwrap(),
            )
            .unwrap(),
        );
        let (_, perm) = permutation(inputs, cfg).unwrap();
        let new_row = |r: usize| -> usize {
            let e = perm.m_indices[r] as usize;
            let (start, c) = (perm.segment_start[e], perm.counts[e]);
            start + (c - 1 - (r - start))
        };
        let mut out = reference.clone();
        for name in ["permuted", "permuted_scales"] {
            let Some(t) = reference.get(name) else {
                continue;
            };
            let width = t.shape[1];
            let size = t.dtype.size();
            let row_bytes = width * size;
            let mut data = t.data.to_vec();
            for r in 0..perm.m_indices.len() {
                let dst = &mut data[r * row_bytes..(r + 1) * row_bytes];
                if perm.m_indices[r] < 0 {
                    dst.fill(0xFF); // NaN in every float dtype: padding is not judged
                } else {
                    let src = new_row(r);
                    dst.copy_from_slice(&t.data[src * row_bytes..(src + 1) * row_bytes]);
                }
            }
            out.insert(
                name.into(),
                Tensor::from_bytes(t.dtype, t.shape.clone(), data).unwrap(),
            );
        }
        let rows: Vec<i64> = perm
            .token_row
            .iter()
            .map(|&r| if r < 0 { r } else { new_row(r as usize) as i64 })
            .collect();
        out.insert(
            "token_row".into(),
            Tensor::from_i32(
                perm.token_row.shape().to_vec(),
                &rows.iter().map(|&v| v as i32).collect::<Vec<_>>(),
            ),
        );
        out
    }

    #[test]
    fn any_order_inside_a_segment_passes_and_misplaced_rows_fail() {
        for op in [&MOE_PERMUTE, &MOE_PERMUTE_FP8] {
            for cfg in op.configs() {
                for seed in 0..30u64 {
                    let inputs = (op.generate)(&mut Rng::new(seed), &cfg, &Sizes::new()).unwrap();
                    let cand = reordered(op, &inputs, &cfg);
                    let rep = policy_report(op, &inputs, &cand, &cfg);
                    assert!(
                        rep.pass,
                        "{} {} seed {seed}: {:?}",
                        op.name,
                        cfg.as_json(),
                        rep.tensors
                    );
                    let (ids, perm) = permutation(&inputs, &cfg).unwrap();
                    let routed: Vec<usize> = (0..ids.len())
                        .filter(|&i| ids.as_slice().unwrap()[i] >= 0)
                        .collect();
                    // two pairs of different experts swap rows: both named in token_row
                    let rows = cand["token_row"].indices();
                    if let Some((&a, &b)) =
                        routed.iter().zip(routed.iter().skip(1)).find(|(&a, &b)| {
                            let s = ids.as_slice().unwrap();
                            s[a] != s[b]
                        })
                    {
                        let mut bad = rows.clone();
                        bad.swap(a, b);
                        let mut c2 = cand.clone();
                        c2.insert(
                            "token_row".into(),
                            Tensor::from_i64(cand["token_row"].shape.clone(), &bad),
                        );
                        let rep = policy_report(op, &inputs, &c2, &cfg);
                        let t = rep.tensors.iter().find(|t| t.name == "token_row").unwrap();
                        assert!(
                            !rep.pass && t.violations == 2,
                            "{} seed {seed}: {:?}",
                            op.name,
                            t
                        );
                    }
                    // one element of one routed row changed: named in permuted
                    if let Some(&pair) = routed.first() {
                        let r = rows[pair] as usize;
                        let p = &cand["permuted"];
                        let d = p.shape[1];
                        if d > 0 {
                            let mut data = p.data.to_vec();
                            let at = (r * d + d / 2) * p.dtype.size();
                            data[at] ^= 0x08;
                            let mut c2 = cand.clone();
                            c2.insert(
                                "permuted".into(),
                                Tensor::from_bytes(p.dtype, p.shape.clone(), data).unwrap(),
                            );
                            let rep = policy_report(op, &inputs, &c2, &cfg);
                            let t = rep.tensors.iter().find(|t| t.name == "permuted").unwrap();
                            assert!(
                                !rep.pass,
                                "{} seed {seed}: a changed element passed",
                                op.name
                            );
                            assert_eq!(
                                t.first_violations.first().map(|v| v.index.clone()),
                                Some(vec![r, d / 2]),
                                "{} seed {seed}",
                                op.name
                            );
                        }
                    }
                    // a padding row marked as an expert's
                    let mut m: Vec<i64> = perm.m_indices.iter().map(|&v| i64::from(v)).collect();
                    if let Some(pad) = m.iter().position(|&v| v < 0) {
                        m[pad] = 0;
                        let mut c2 = cand.clone();
                        c2.insert("m_indices".into(), Tensor::from_i64(vec![m.len()], &m));
                        assert!(!policy_report(op, &inputs, &c2, &cfg).pass);
                    }
                }
            }
        }
    }

    #[test]
    fn combine_in_any_f32_order_passes_and_a_dropped_slot_fails() {
        let op = &MOE_COMBINE;
        let mut worst = 0f64;
        for cfg in op.configs() {
            let bf16 = cfg.get::<CombineConfig>().out_dtype == OutDtype::Bf16;
            for seed in 0..60u64 {
                let inputs = combine_gen(&mut Rng::new(seed), &cfg, &Sizes::new()).unwrap();
                let e = get(&inputs, "expert_out").matrix_f32();
                let rows = get(&inputs, "token_row").indices();
                let w = get(&inputs, "topk_weights").floats();
                let (t, k) = (
                    get(&inputs, "token_row").shape[0],
                    get(&inputs, "token_row").shape[1],
                );
                let d = e.ncols();
                let kernel = |reverse: bool, drop: Option<usize>| {
                    let mut y = vec![0f32; t * d];
                    for ti in 0..t {
                        for j in 0..k {
                            let kk = if reverse { k - 1 - j } else { j };
                            if rows[ti * k + kk] < 0 || drop == Some(ti * k + kk) {
                                continue;
                            }
                            for c in 0..d {
                                y[ti * d + c] +=
                                    w[ti * k + kk] * e[[rows[ti * k + kk] as usize, c]];
                            }
                        }
                    }
                    let dtype = if bf16 { DType::BF16 } else { DType::F32 };
                    outputs([("y", Tensor::from_f32_as(dtype, vec![t, d], &y))])
                };
                for reverse in [false, true] {
                    let rep = policy_report(op, &inputs, &kernel(reverse, None), &cfg);
                    worst = worst.max(rep.tensors[0].bound_use.as_ref().map_or(0.0, |b| b.max));
                    assert!(rep.pass, "seed {seed}: {:?}", rep.tensors);
                }
                if let Some(slot) = (0..t * k).find(|&i| rows[i] >= 0 && w[i] > 0.05) {
                    if d > 0 {
                        assert!(
                            !policy_report(op, &inputs, &kernel(false, Some(slot)), &cfg).pass,
                            "seed {seed}: a dropped slot passed"
                        );
                    }
                }
            }
        }
        println!("worst f32 combine uses {worst:.3} of its bound");
        assert!(worst < 1.0);
    }
}
