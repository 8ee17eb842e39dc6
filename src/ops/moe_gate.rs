//! `moe_gate`: the router of a MoE layer, `x` → `top_k` experts and gate weights per token.
//!
//! Expert ids are compared as sets per token (transformers' `topk(sorted=False)` returns them in
//! any order). A token whose set differs is accepted only as a **near-tie**: every swapped pair
//! of experts (and, when groups differ, of groups) has selection scores within the sum of their
//! error bounds; such tokens are counted apart (`allowed as near-tie`) and their weights are not
//! compared. Bounds per expert e (f64 reference, candidate in f32 or bf16):
//! `δu_e = D·2^-24·Σ_i|x_i w_ei| + ρ|u_e|` (any summation order; ρ = 2^-9 with BF16 inputs, for
//! a bf16 GEMM output, 2^-24 otherwise), `δs_e = s_e(1−s_e)·(δu_e + 4u) + 2ρ' s_e` (sigmoid) or
//! `s_e·(δu_e + max_j δu_j + (8+E)u) + 2ρ' s_e` (softmax), ρ' = 2^-9 (bf16) or 2^-24, u = 2^-24
//! (the `4u`, `(8+E)u` terms: an f32 candidate's exp, ≤ 2 ulp, and its sum of E exps), and
//! `δb_e = δs_e + 2^-24|b_e|` for the biased score.

use std::collections::BTreeSet;

use ndarray::Array2;

use dsv3_reference::linear::{linear, Linear, Precision, Weight};
use dsv3_reference::moe::gate::{route, token_scores, GateConfig, ScoringFunc, TopkMethod};

use super::gen_fits;
use super::{float_input, get, outputs, require_finite};
use crate::registry::compare::Policy;
use crate::registry::config::{ceil, Choice, Config, ConfigSchema, FieldKind};
use crate::registry::contract::Param;
use crate::registry::contract::{Constraint, Dim, TensorSpec};
use crate::registry::error::Result;
use crate::registry::io::TensorMap;
use crate::registry::rng::Rng;
use crate::registry::tensor::{DType, Tensor};
use crate::registry::tolerance::U32;
use crate::registry::{every_config, GpuImpl, OpEntry, PolicyCtx, Sizes};

impl Choice for ScoringFunc {
    const VALUES: &'static [&'static str] = &["sigmoid", "softmax"];
    fn from_index(i: usize) -> Self {
        [ScoringFunc::Sigmoid, ScoringFunc::Softmax][i]
    }
    fn name(self) -> &'static str {
        Self::VALUES[self as usize]
    }
}

impl Choice for TopkMethod {
    const VALUES: &'static [&'static str] = &["noaux_tc", "greedy", "group_limited_greedy"];
    fn from_index(i: usize) -> Self {
        [
            TopkMethod::NoauxTc,
            TopkMethod::Greedy,
            TopkMethod::GroupLimitedGreedy,
        ][i]
    }
    fn name(self) -> &'static str {
        Self::VALUES[self as usize]
    }
}

const COUNT: FieldKind = FieldKind::Int {
    min: 1,
    max: ceil::COUNT,
};

crate::op_config! {
    /// `moe_gate`'s config: the checkpoint's router fields (config.json names).
    pub struct MoeGateConfig {
        top_k: usize = "8", COUNT, "num_experts_per_tok";
        n_group: usize = "8", COUNT, "expert groups (nodes)";
        topk_group: usize = "4", COUNT, "groups kept per token";
        scoring_func: ScoringFunc = "\"sigmoid\"", FieldKind::choice::<ScoringFunc>(), "affinity";
        topk_method: TopkMethod = "\"noaux_tc\"", FieldKind::choice::<TopkMethod>(),
            "noaux_tc: bias + top-2-sum groups (V3); greedy: no groups; group_limited_greedy: max groups, no bias";
        norm_topk_prob: bool = "true", FieldKind::Bool, "normalise the selected weights to sum 1";
        routed_scaling_factor: f64 = "2.5", FieldKind::PositiveFloat, "weight multiplier";
    }
}

/// `top_k`, the width of the outputs.
const TOP_K: Param = Param {
    name: "top_k",
    get: |c| c.get::<MoeGateConfig>().top_k,
};
/// `n_group`, which must divide the number of experts.
const N_GROUP: Param = Param {
    name: "n_group",
    get: |c| c.get::<MoeGateConfig>().n_group,
};

pub static MOE_GATE: OpEntry = OpEntry {
    name: "moe_gate",
    source: "V3 eqs. (13)-(16), §2.1.2 node-limited routing; OFF Gate.forward; HF DeepseekV3TopkRouter",
    summary: "u = x·Wᵀ; s = σ(u) | softmax(u); b = s + bias (noaux_tc); groups by top-2 sum (noaux_tc) or max, keep \
topk_group, others −inf; ids = top_k(b); w = s[ids] (/Σ if norm_topk_prob) · routed_scaling_factor",
    inputs: &[
        TensorSpec { name: "x", dtypes: &[DType::F32, DType::BF16], shape: &[Dim::Var("N"), Dim::Var("D")], doc: "FFN input (after post_attention_layernorm)" },
        TensorSpec { name: "weight", dtypes: &[DType::F32, DType::BF16], shape: &[Dim::Var("E"), Dim::Var("D")], doc: "expert centroids (mlp.gate.weight)" },
        TensorSpec { name: "e_score_correction_bias", dtypes: &[DType::F32, DType::BF16], shape: &[Dim::Var("E")], doc: "selection bias (used by noaux_tc only)" },
    ],
    outputs: &[
        TensorSpec { name: "topk_weights", dtypes: &[DType::F32], shape: &[Dim::Var("N"), Dim::Field(TOP_K)], doc: "gate weights, by descending selection score" },
        TensorSpec { name: "topk_ids", dtypes: &[DType::I64], shape: &[Dim::Var("N"), Dim::Field(TOP_K)], doc: "expert indices (compared as sets per token)" },
    ],
    constraints: &[Constraint::NonEmpty("E", "top_k experts are chosen among them"), Constraint::MultipleOf("E", N_GROUP)],
    config: ConfigSchema::of::<MoeGateConfig>(),
    adapt: None,
    reference: moe_gate_ref,
    reference_fn: "reference/src/moe/gate.rs::route",
    gpu: &[GpuImpl {
        backend: "cuda",
        run: crate::gpu_fn!(moe_gate_gpu),
        kernel: "gpu/kernels/moe_gate.cu",
        supports: every_config,
    }],
    policy: moe_gate_policy,
    policy_doc: "topk_ids: the same set per token in any order, or a near-tie (every swapped expert pair, and group pair, \
within the sum of their score-error bounds), reported apart; topk_weights: matched by expert id, |Δw| ≤ scale·(δs_c/Σs + \
s_c·Σδs/Σs²) (normalised) or scale·δs_c, plus 4·2^-24|w| (2^-8|w| with BF16 inputs); not compared on near-tie tokens. \
Score bounds δs: module doc of src/ops/moe_gate.rs and SPEC.md",
    generate: moe_gate_gen,
    test_configs: &[
        r#"{"n_group":1,"topk_group":1,"top_k":4,"norm_topk_prob":false,"routed_scaling_factor":1.0}"#,
        r#"{"scoring_func":"softmax","topk_method":"greedy","top_k":6,"norm_topk_prob":false,"routed_scaling_factor":1.0}"#,
        r#"{"scoring_func":"softmax","topk_method":"group_limited_greedy","n_group":8,"topk_group":3,"top_k":6,"norm_topk_prob":false,"routed_scaling_factor":16.0}"#,
        r#"{"topk_method":"group_limited_greedy","n_group":4,"topk_group":2,"top_k":4}"#,
        r#"{"top_k":1,"n_group":2,"topk_group":1}"#,
    ],
    v3_sizes: &[&[("N", 4), ("D", 7168), ("E", 256)]],
};

/// The reference's router config of the op's.
pub(crate) fn gate_config(cfg: &Config) -> GateConfig {
    let c = cfg.get::<MoeGateConfig>();
    GateConfig {
        top_k: c.top_k,
        n_group: c.n_group,
        topk_group: c.topk_group,
        scoring_func: c.scoring_func,
        topk_method: c.topk_method,
        norm_topk_prob: c.norm_topk_prob,
        routed_scaling_factor: c.routed_scaling_factor,
    }
}

fn logits(inputs: &TensorMap) -> Result<Array2<f32>> {
    let w = Linear::new(Weight::from_values(
        "weight",
        (get(inputs, "weight")).matrix_f32(),
    ));
    Ok(linear(
        (get(inputs, "x")).matrix_f32().view(),
        &w,
        Precision::F32,
    )?)
}

fn moe_gate_ref(inputs: &TensorMap, cfg: &Config) -> Result<TensorMap> {
    for name in ["x", "weight", "e_score_correction_bias"] {
        require_finite(
            "moe_gate",
            name,
            get(inputs, name),
            "the router's inputs must be finite",
        )?;
    }
    let u = logits(inputs)?;
    let bias = (get(inputs, "e_score_correction_bias")).floats();
    let r = route(u.view(), Some(&bias), &gate_config(cfg))?;
    let (n, k) = r.ids.dim();
    let ids: Vec<i64> = r.ids.iter().map(|&i| i as i64).collect();
    let w: Vec<f32> = r.weights.iter().copied().collect();
    Ok(outputs([
        ("topk_weights", Tensor::from_f32(vec![n, k], &w)),
        ("topk_ids", Tensor::from_i64(vec![n, k], &ids)),
    ]))
}

#[cfg(feature = "cuda")]
/// The kernel: f32 logits (any order within a warp), then the reference's routing in f64.
fn moe_gate_gpu(gpu: &dsv3_gpu::Gpu, inputs: &TensorMap, cfg: &Config) -> Result<TensorMap> {
    use dsv3_gpu::moe_gate::{moe_gate, Method, Params};
    let (x, w) = (get(inputs, "x"), get(inputs, "weight"));
    let (n, d, e) = (x.shape[0], x.shape[1], w.shape[0]);
    let g = gate_config(cfg);
    g.validate(e)?;
    let params = Params {
        top_k: g.top_k,
        n_group: g.n_group,
        topk_group: g.topk_group,
        sigmoid: g.scoring_func == ScoringFunc::Sigmoid,
        method: match g.topk_method {
            TopkMethod::NoauxTc => Method::NoauxTc,
            TopkMethod::Greedy => Method::Greedy,
            TopkMethod::GroupLimitedGreedy => Method::GroupLimitedGreedy,
        },
        norm_topk_prob: g.norm_topk_prob,
        routed_scaling_factor: g.routed_scaling_factor,
    };
    let r = moe_gate(
        gpu,
        &x.floats(),
        &w.floats(),
        &(get(inputs, "e_score_correction_bias")).floats(),
        (n, e, d),
        &params,
    )?;
    Ok(outputs([
        (
            "topk_weights",
            Tensor::from_f32(vec![n, g.top_k], &r.weights),
        ),
        ("topk_ids", Tensor::from_i64(vec![n, g.top_k], &r.ids)),
    ]))
}

/// Per token: whether the candidate's expert set differs from the reference's but only by a
/// near-tie, and the tolerance of each candidate weight slot (`None`: no comparable weight).
struct TokenVerdict {
    near_tie: bool,
    weight_tol: Vec<Option<(f64, f64)>>, // (reference weight, tolerance) per candidate slot
}

fn judge_tokens(ctx: &PolicyCtx) -> Option<Vec<TokenVerdict>> {
    let cfg = gate_config(ctx.config);
    let x = (get(ctx.inputs, "x")).matrix_f32();
    let w = (get(ctx.inputs, "weight")).matrix_f32();
    let bias = (get(ctx.inputs, "e_score_correction_bias")).floats();
    let bf16 = [get(ctx.inputs, "x"), get(ctx.inputs, "weight")]
        .iter()
        .any(|t| t.dtype == DType::BF16);
    let (rho, rho_s) = if bf16 {
        (2f64.powi(-9), 2f64.powi(-9))
    } else {
        (U32, U32)
    };
    let u = logits(ctx.inputs).ok()?;
    let (n_len, d) = x.dim();
    let e_len = w.nrows();
    let k = cfg.top_k;
    let ref_ids = get(ctx.reference, "topk_ids");
    let ref_w = (get(ctx.reference, "topk_weights")).floats();
    let cand_ids = get(ctx.candidate, "topk_ids");
    let scale = cfg.routed_scaling_factor;
    let mut out = Vec::with_capacity(n_len);
    for n in 0..n_len {
        let urow: Vec<f32> = u.row(n).to_vec();
        let sc = token_scores(&urow, Some(&bias), &cfg).ok()?;
        // step 1: error bounds of logits, affinities and selection scores
        let du: Vec<f64> = (0..e_len)
            .map(|e| {
                let a: f64 = (0..d)
                    .map(|i| (f64::from(x[[n, i]]) * f64::from(w[[e, i]])).abs())
                    .sum();
                d as f64 * U32 * a + rho * f64::from(urow[e]).abs()
            })
            .collect();
        let du_max = du.iter().fold(0f64, |m, &v| m.max(v));
        let ds: Vec<f64> = (0..e_len)
            .map(|e| {
                let s = sc.affinity[e];
                let prop = match cfg.scoring_func {
                    ScoringFunc::Sigmoid => s * (1.0 - s) * du[e],
                    ScoringFunc::Softmax => s * (du[e] + du_max),
                };
                // an f32 candidate's own exp (≤ 2 ulp = 4u relative, CUDA expf; SLEEF ≤ 1 ulp)
                // and, for softmax, its sum of E exps (γ_E) and the exp in the numerator
                let evaluation = match cfg.scoring_func {
                    ScoringFunc::Sigmoid => 4.0 * U32 * s * (1.0 - s),
                    ScoringFunc::Softmax => (8.0 + e_len as f64) * U32 * s,
                };
                prop + evaluation + 2.0 * rho_s * s
            })
            .collect();
        let biased: Vec<f64> = (0..e_len)
            .map(|e| {
                sc.affinity[e]
                    + if cfg.topk_method == TopkMethod::NoauxTc {
                        f64::from(bias[e])
                    } else {
                        0.0
                    }
            })
            .collect();
        let db: Vec<f64> = (0..e_len).map(|e| ds[e] + U32 * biased[e].abs()).collect();
        // step 2: the two sets
        let r_set: Vec<usize> = (0..k).map(|j| ref_ids.value(n * k + j) as usize).collect();
        let c_raw: Vec<f64> = (0..k).map(|j| cand_ids.value(n * k + j)).collect();
        let valid = c_raw
            .iter()
            .all(|&c| c >= 0.0 && c < e_len as f64 && c.fract() == 0.0);
        let c_set: BTreeSet<usize> = c_raw.iter().map(|&c| c as usize).collect();
        let r_sorted: BTreeSet<usize> = r_set.iter().copied().collect();
        if !valid || c_set.len() != k {
            out.push(TokenVerdict {
                near_tie: false,
                weight_tol: vec![None; k],
            });
            continue;
        }
        if c_set != r_sorted {
            // step 3: near-tie? every swapped pair within the sum of its bounds
            let per = e_len / cfg.n_group.max(1);
            let group_bound =
                |g: usize| 2.0 * (g * per..(g + 1) * per).fold(0f64, |m, e| m.max(db[e]));
            let kept_min = sc
                .kept_groups
                .iter()
                .map(|&g| (sc.groups[g], g))
                .fold((f64::INFINITY, 0), |m, v| if v.0 < m.0 { v } else { m });
            let mut near = true;
            for &c in c_set.difference(&r_sorted) {
                for &r in r_sorted.difference(&c_set) {
                    near &= biased[c] + db[c] >= biased[r] - db[r];
                }
                if cfg.grouped() && !sc.kept_groups.contains(&(c / per)) {
                    let g = c / per;
                    near &= sc.groups[g] + group_bound(g) >= kept_min.0 - group_bound(kept_min.1);
                }
            }
            out.push(TokenVerdict {
                near_tie: near,
                weight_tol: vec![None; k],
            });
            continue;
        }
        // step 4: weight tolerances, matched by expert id
        let sum: f64 = r_set.iter().map(|&e| sc.affinity[e]).sum();
        let sum_ds: f64 = r_set.iter().map(|&e| ds[e]).sum();
        let eps_w = if bf16 { 2f64.powi(-8) } else { 4.0 * U32 };
        let tol = c_raw
            .iter()
            .map(|&c| {
                let c = c as usize;
                let pos = r_set.iter().position(|&r| r == c)?;
                let want = f64::from(ref_w[n * k + pos]);
                let t = if cfg.norm_topk_prob {
                    scale * (ds[c] / sum + sc.affinity[c] * sum_ds / (sum * sum))
                } else {
                    scale * ds[c]
                };
                Some((want, t + eps_w * want.abs()))
            })
            .collect();
        out.push(TokenVerdict {
            near_tie: false,
            weight_tol: tol,
        });
    }
    Some(out)
}

fn moe_gate_policy<'a>(ctx: &PolicyCtx<'a>) -> Policy<'a> {
    let k = ctx.config.get::<MoeGateConfig>().top_k;
    let verdicts = judge_tokens(ctx).unwrap_or_default();
    let got = get(ctx.candidate, "topk_weights");
    let is_ids = ctx.output == "topk_ids";
    // relational: a weight is judged through the candidate's id in its slot, so a weight left
    // in place while its id moved must fail although its bits equal the reference's
    Policy::Relational {
        why: "ids as sets per token (near-ties apart); weights matched by expert id within the score-error bound",
        judge: Box::new(move |i| {
            let v = verdicts.get(i / k)?;
            if v.near_tie {
                return Some("near-tie");
            }
            let (want, tol) = v.weight_tol[i % k]?;
            if is_ids {
                return Some("same expert set, another order");
            }
            let g = got.value(i);
            (g.is_finite() && (g - want).abs() <= tol).then_some("within the score-error bound")
        }),
    }
}

fn moe_gate_gen(rng: &mut Rng, cfg: &Config, sizes: &Sizes) -> Result<TensorMap> {
    let g = gate_config(cfg);
    let groups = g.n_group;
    let per = if g.grouped() {
        let need = g.top_k.div_ceil(g.topk_group);
        need.max(if g.topk_method == TopkMethod::NoauxTc {
            2
        } else {
            1
        })
    } else {
        g.top_k.div_ceil(groups)
    };
    let e = sizes
        .get("E")
        .copied()
        .unwrap_or_else(|| groups * (per + rng.range(0, 2)));
    let d = sizes.get("D").copied().unwrap_or_else(|| rng.range(4, 48));
    let n = sizes.get("N").copied().unwrap_or_else(|| rng.range(1, 8));
    gen_fits(&[&[n, d], &[e, d], &[e]])?;
    let x: Vec<f32> = (0..n * d).map(|_| rng.normal() as f32).collect();
    let mut w: Vec<f32> = (0..e * d)
        .map(|_| (rng.normal() / (d as f64).sqrt()) as f32)
        .collect();
    let mut b: Vec<f32> = (0..e).map(|_| (0.05 * rng.normal()) as f32).collect();
    if rng.chance(0.2) && e >= 2 {
        // two identical experts: an exact tie
        let (a, c) = (rng.range(0, e - 1), rng.range(0, e - 1));
        let row: Vec<f32> = w[a * d..(a + 1) * d].to_vec();
        w[c * d..(c + 1) * d].copy_from_slice(&row);
        b[c] = b[a];
    }
    Ok(outputs([
        ("x", float_input(rng, vec![n, d], &x)),
        ("weight", float_input(rng, vec![e, d], &w)),
        ("e_score_correction_bias", Tensor::from_f32(vec![e], &b)),
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::policy_report;

    /// `gpu/kernels/moe_gate.cu`'s logits on the CPU: lane l sums x[c]·w[c] for c ≡ l (mod 32)
    /// with fmaf, then a butterfly of f32 additions.
    fn warp_logits(x: &[f32], w: &[f32], (n, e, d): (usize, usize, usize)) -> Array2<f32> {
        Array2::from_shape_fn((n, e), |(t, j)| {
            let mut lanes = [0f32; 32];
            for (l, acc) in lanes.iter_mut().enumerate() {
                for c in (l..d).step_by(32) {
                    *acc = x[t * d + c].mul_add(w[j * d + c], *acc);
                }
            }
            for offset in [16, 8, 4, 2, 1] {
                let prev = lanes;
                for (l, acc) in lanes.iter_mut().enumerate() {
                    *acc = prev[l] + prev[l ^ offset];
                }
            }
            lanes[0]
        })
    }

    #[test]
    fn the_kernels_f32_logits_with_f64_routing_pass_the_policy() {
        let op = &MOE_GATE;
        for seed in 0..30u64 {
            for cfg in op.configs() {
                let sizes = if seed % 10 == 0 {
                    [("N", 3), ("D", 7168), ("E", 256)].into_iter().collect()
                } else {
                    Sizes::new()
                };
                let inputs = (op.generate)(&mut Rng::new(seed), &cfg, &sizes).unwrap();
                let (x, w) = (get(&inputs, "x"), get(&inputs, "weight"));
                let (n, d, e) = (x.shape[0], x.shape[1], w.shape[0]);
                let u = warp_logits(&x.floats(), &w.floats(), (n, e, d));
                let bias = (get(&inputs, "e_score_correction_bias")).floats();
                let r = route(u.view(), Some(&bias), &gate_config(&cfg)).unwrap();
                let ids: Vec<i64> = r.ids.iter().map(|&i| i as i64).collect();
                let k = r.ids.ncols();
                let cand = outputs([
                    (
                        "topk_weights",
                        Tensor::from_f32(
                            vec![n, k],
                            &r.weights.iter().copied().collect::<Vec<_>>(),
                        ),
                    ),
                    ("topk_ids", Tensor::from_i64(vec![n, k], &ids)),
                ]);
                let rep = policy_report(op, &inputs, &cand, &cfg);
                assert!(rep.pass, "seed {seed} {}", cfg.as_json());
            }
        }
    }
}
