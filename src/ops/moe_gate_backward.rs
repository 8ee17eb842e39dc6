//! `moe_gate_backward`: the gradient of the router logits from `d topk_weights`, the experts
//! having been selected (`topk_ids` is an input: the selection has no gradient).
//!
//! Tolerance (SPEC.md "Backward tolerances"), an f32 kernel in any order, `u = 2^-24`, per
//! token: the scores `s` carry `n_s` units (sigmoid: 6 — expf ≤ 2 ulp, the addition, the
//! division, one spare; softmax: `E + 8 + 2·max_e|u_e − max u|` — the sum of E exps and each
//! exp's argument), `S = Σ_sel s` `n_s + K`, `ds` (normalised, ρ = routed_scaling_factor)
//! `n_B = n_s + K + 6` with magnitude `B_i = ρ(|dw_i| + Σ_j|dw_j|s_j/S)/S` (`ρ|dw_i|` and 1 unit
//! without normalisation). Then
//! - sigmoid: `|Δdu_e| ≤ γ_{n_B+n_s+4}·B_e s_e(1 − s_e) + γ_{n_s+1}·B_e s_e² + 2^-125·B_e`
//!   (the second term: `1 − ŝ` is off by `γ_{n_s}·s` where s → 1), 0 for experts no slot holds;
//! - softmax: `|Δdu_e| ≤ γ_{n_B+2n_s+K+4}·s_e(B_e + Σ_sel s_j B_j) + 2^-125·(B_e + Σ B_j)`;
//!
//! then one rounding to the output dtype.

use ndarray::Array2;

use dsv3_reference::moe::gate::{moe_gate_backward, GateConfig, ScoringFunc, TopkMethod};

use super::bound_policy::{derived_bound_policy, put_bounded};
use super::{float_input, gen_fits, get, require_finite};
use crate::registry::compare::Policy;
use crate::registry::config::{Config, ConfigSchema, FieldKind};
use crate::registry::contract::{Constraint, Dim, TensorSpec};
use crate::registry::error::Result;
use crate::registry::io::TensorMap;
use crate::registry::rng::Rng;
use crate::registry::tensor::{DType, Tensor};
use crate::registry::tolerance::gamma;
use crate::registry::{OpEntry, PolicyCtx, Sizes};

crate::op_config! {
    /// `moe_gate_backward`'s config: the router fields that shape the weights (config.json names).
    pub struct MoeGateBackwardConfig {
        scoring_func: ScoringFunc = "\"sigmoid\"", FieldKind::choice::<ScoringFunc>(), "affinity (sigmoid: V3, softmax: V2)";
        norm_topk_prob: bool = "true", FieldKind::Bool, "the selected weights were normalised to sum 1";
        routed_scaling_factor: f64 = "2.5", FieldKind::PositiveFloat, "weight multiplier";
    }
}

pub static MOE_GATE_BACKWARD: OpEntry = OpEntry {
    name: "moe_gate_backward",
    source: "the gradient of V3 eqs. (13)-(15) (OFF Gate.forward: weights = s[ids] / Σ · route_scale) with the selection of \
eq. (16) held: the bias only selects",
    summary: "ds_i = ρ·(dw_i − Σ_j dw_j s_j/S)/S on the selected ids (S = Σ_sel s; ρ·dw_i without normalisation), 0 elsewhere; \
sigmoid: d_logits = ds ⊙ s(1 − s); softmax: d_logits = s ⊙ (ds − Σ s ds)",
    inputs: &[
        TensorSpec { name: "logits", dtypes: &[DType::F32, DType::BF16], shape: &[Dim::Var("N"), Dim::Var("E")], doc: "router logits u = x·Wᵀ" },
        TensorSpec { name: "topk_ids", dtypes: &[DType::I64, DType::I32], shape: &[Dim::Var("N"), Dim::Var("K")], doc: "the selected experts (distinct per token, in 0..E)" },
        TensorSpec { name: "d_topk_weights", dtypes: &[DType::F32, DType::BF16], shape: &[Dim::Var("N"), Dim::Var("K")], doc: "∂L/∂topk_weights, slot by slot" },
    ],
    outputs: &[TensorSpec { name: "d_logits", dtypes: &[DType::F32, DType::BF16], shape: &[Dim::Var("N"), Dim::Var("E")], doc: "∂L/∂logits (dtype of logits)" }],
    constraints: &[Constraint::NonEmpty("E", "the ids select among them")],
    config: ConfigSchema::of::<MoeGateBackwardConfig>(),
    adapt: None,
    reference: moe_gate_backward_ref,
    reference_fn: "reference/src/moe/gate.rs::moe_gate_backward",
    gpu: &[],
    policy: moe_gate_backward_policy,
    policy_doc: "per element, an f32 kernel in any order: sigmoid |Δ| ≤ γ_{n_B+n_s+4}·B_e s_e(1−s_e) + γ_{n_s+1}·B_e s_e² \
+ 2^-125·B_e (exactly 0 off the selected experts), softmax |Δ| ≤ γ_{n_B+2n_s+K+4}·s_e(B_e + Σ s_j B_j) + 2^-125·(B_e + ΣB_j), \
B = the magnitude of ∂L/∂s; then one rounding (module doc of src/ops/moe_gate_backward.rs, SPEC.md)",
    generate: moe_gate_backward_gen,
    test_configs: &[
        r#"{"norm_topk_prob":false,"routed_scaling_factor":1.0}"#,
        r#"{"scoring_func":"softmax","norm_topk_prob":false,"routed_scaling_factor":1.0}"#,
        r#"{"scoring_func":"softmax","norm_topk_prob":true,"routed_scaling_factor":16.0}"#,
    ],
    v3_sizes: &[&[("N", 4), ("E", 256), ("K", 8)]],
};

/// The smallest sum of the selected scores the normalised gradient is judged at (2^-60).
const MIN_SELECTED_SUM: f64 = 8.673_617_379_884_035e-19;

fn gate_config(cfg: &Config, top_k: usize) -> GateConfig {
    let c = cfg.get::<MoeGateBackwardConfig>();
    GateConfig {
        top_k,
        n_group: 1,
        topk_group: 1,
        scoring_func: c.scoring_func,
        topk_method: TopkMethod::Greedy,
        norm_topk_prob: c.norm_topk_prob,
        routed_scaling_factor: c.routed_scaling_factor,
    }
}

fn moe_gate_backward_ref(inputs: &TensorMap, cfg: &Config) -> Result<TensorMap> {
    const OP: &str = "moe_gate_backward";
    let (logits, ids, dw) = (
        get(inputs, "logits"),
        get(inputs, "topk_ids"),
        get(inputs, "d_topk_weights"),
    );
    require_finite(
        OP,
        "logits",
        logits,
        "scores of non-finite logits have no gradient",
    )?;
    require_finite(OP, "d_topk_weights", dw, "the gradient must be finite")?;
    let u = logits.matrix_f32();
    let (n, e) = u.dim();
    let k = ids.shape[1];
    let ids = Array2::from_shape_vec((n, k), ids.indices()).expect("validated shape");
    let dw = Array2::from_shape_vec((n, k), dw.floats()).expect("validated shape");
    let g = gate_config(cfg, k);
    let du = moe_gate_backward(u.view(), ids.view(), dw.view(), &g)?;
    // the tolerances (module doc)
    let rho = g.routed_scaling_factor;
    let mut tol = Vec::with_capacity(n * e);
    for t in 0..n {
        let row: Vec<f64> = u.row(t).iter().map(|&v| f64::from(v)).collect();
        let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let (s, n_s): (Vec<f64>, f64) = match g.scoring_func {
            ScoringFunc::Sigmoid => (row.iter().map(|v| 1.0 / (1.0 + (-v).exp())).collect(), 6.0),
            ScoringFunc::Softmax => {
                let ex: Vec<f64> = row.iter().map(|v| (v - max).exp()).collect();
                let sum: f64 = ex.iter().sum();
                let spread = row.iter().map(|v| (v - max).abs()).fold(0.0, f64::max);
                (
                    ex.iter().map(|v| v / sum).collect(),
                    e as f64 + 8.0 + 2.0 * spread,
                )
            }
        };
        let sel: Vec<usize> = ids.row(t).iter().map(|&i| i as usize).collect();
        let mut b = vec![0f64; e];
        let n_b = if g.norm_topk_prob {
            let sum: f64 = sel.iter().map(|&i| s[i]).sum();
            if k > 0 && sum < MIN_SELECTED_SUM {
                return Err(dsv3_reference::Error::Value {
                    op: OP,
                    tensor: "topk_ids",
                    index: vec![t, 0],
                    value: format!("experts whose scores sum to {sum:e}"),
                    why: "the normalisation divides by that sum (below 2^-60): the gradient grows as its inverse \
square, beyond what an f32 kernel computes meaningfully; a router selects its largest scores",
                }
                .into());
            }
            let along: f64 = (0..k)
                .map(|j| f64::from(dw[[t, j]]).abs() * s[sel[j]])
                .sum::<f64>()
                / sum;
            for (j, &i) in sel.iter().enumerate() {
                b[i] = rho * (f64::from(dw[[t, j]]).abs() + along) / sum;
            }
            n_s + k as f64 + 6.0
        } else {
            for (j, &i) in sel.iter().enumerate() {
                b[i] = rho * f64::from(dw[[t, j]]).abs();
            }
            1.0
        };
        let tiny = 2f64.powi(-125);
        match g.scoring_func {
            ScoringFunc::Sigmoid => tol.extend((0..e).map(|i| {
                gamma(n_b + n_s + 4.0) * b[i] * s[i] * (1.0 - s[i])
                    + gamma(n_s + 1.0) * b[i] * s[i] * s[i]
                    + tiny * b[i]
            })),
            ScoringFunc::Softmax => {
                let along: f64 = sel.iter().map(|&j| s[j] * b[j]).sum();
                let b_sum: f64 = sel.iter().map(|&j| b[j]).sum();
                let gam = gamma(n_b + 2.0 * n_s + k as f64 + 4.0);
                tol.extend((0..e).map(|i| gam * s[i] * (b[i] + along) + tiny * (b[i] + b_sum)));
            }
        }
    }
    let mut out = TensorMap::new();
    let exact: Vec<f64> = du.iter().copied().collect();
    put_bounded(&mut out, "d_logits", logits.dtype, vec![n, e], &exact, &tol);
    Ok(out)
}

fn moe_gate_backward_policy<'a>(ctx: &PolicyCtx<'a>) -> Policy<'a> {
    derived_bound_policy(
        ctx,
        "within the f32-kernel bound of the exact gradient, then one rounding (SPEC.md \"Backward tolerances\")",
    )
}

fn moe_gate_backward_gen(rng: &mut Rng, cfg: &Config, sizes: &Sizes) -> Result<TensorMap> {
    let e = sizes.or_draw("E", rng, 1, 40);
    let k = sizes
        .get("K")
        .copied()
        .unwrap_or_else(|| if e == 0 { 0 } else { rng.range(1, e.min(9)) });
    let n = sizes.or_draw("N", rng, 1, 8);
    gen_fits(&[&[n, e], &[n, k], &[n, k]])?;
    if k > e {
        return Err(crate::registry::error::Error::Usage(format!(
            "moe_gate_backward: K = {k} distinct experts cannot be chosen among E = {e}"
        )));
    }
    let spread = *rng.pick(&[1.0, 4.0, 20.0]);
    // at least −40: σ(−40) ≈ 4e-18 keeps every selected sum above MIN_SELECTED_SUM (2^-60), where
    // the reference refuses the normalised gradient
    let logits: Vec<f32> = (0..n * e)
        .map(|_| ((rng.normal() * spread) as f32).max(-40.0))
        .collect();
    let mut ids = Vec::with_capacity(n * k);
    let mut dw = Vec::with_capacity(n * k);
    let norm = cfg.get::<MoeGateBackwardConfig>().norm_topk_prob;
    for t in 0..n {
        let mut pool: Vec<i64> = (0..e as i64).collect();
        if spread > 4.0 {
            // wide logits: the router's own choice (its k largest scores), as a kernel sees them
            let row = &logits[t * e..(t + 1) * e];
            pool.sort_by(|&x, &y| row[y as usize].total_cmp(&row[x as usize]));
        } else {
            for j in 0..k {
                let at = rng.range(j, e - 1);
                pool.swap(j, at);
            }
        }
        ids.extend_from_slice(&pool[..k]);
        // a constant dw makes the normalised gradient cancel to 0 exactly
        let constant = norm && rng.chance(0.2);
        let c = rng.normal();
        dw.extend((0..k).map(|_| {
            if constant {
                c as f32
            } else {
                rng.normal() as f32
            }
        }));
    }
    let logits = float_input(rng, vec![n, e], &logits);
    let ids = if rng.chance(0.5) {
        Tensor::from_i64(vec![n, k], &ids)
    } else {
        Tensor::from_i32(
            vec![n, k],
            &ids.iter().map(|&v| v as i32).collect::<Vec<_>>(),
        )
    };
    let dw = Tensor::from_f32_as(logits.dtype, vec![n, k], &dw);
    Ok(super::outputs([
        ("logits", logits),
        ("topk_ids", ids),
        ("d_topk_weights", dw),
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::{outputs, policy_report};

    /// An f32 kernel: scores with expf `ulps` off, sums in `reverse` order.
    /// With `bug`, the kernel drops one term: the normalisation's `Σ dw s / S` when normalising,
    /// else the sigmoid's `(1 − s)` or the softmax's `Σ s ds`.
    fn f32_kernel(
        u: &[f32],
        ids: &[i64],
        dw: &[f32],
        e: usize,
        g: &GateConfig,
        (ulps, reverse, bug): (i32, bool, bool),
    ) -> Vec<f32> {
        let k = g.top_k;
        let rho = g.routed_scaling_factor as f32;
        let bump = |x: f32| {
            if x.is_finite() && x >= f32::MIN_POSITIVE {
                f32::from_bits((x.to_bits() as i32 + ulps) as u32)
            } else {
                x
            }
        };
        let mut out = Vec::new();
        for (t, row) in u.chunks(e).enumerate() {
            let s: Vec<f32> = match g.scoring_func {
                ScoringFunc::Sigmoid => row
                    .iter()
                    .map(|&v| 1.0 / (1.0 + bump((-v).exp())))
                    .collect(),
                ScoringFunc::Softmax => {
                    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let ex: Vec<f32> = row.iter().map(|&v| bump((v - m).exp())).collect();
                    let mut sum = 0f32;
                    let order: Vec<usize> = if reverse {
                        (0..e).rev().collect()
                    } else {
                        (0..e).collect()
                    };
                    order.iter().for_each(|&i| sum += ex[i]);
                    ex.iter().map(|v| v / sum).collect()
                }
            };
            let sel = &ids[t * k..(t + 1) * k];
            let d = &dw[t * k..(t + 1) * k];
            let mut ds = vec![0f32; e];
            if g.norm_topk_prob {
                let mut sum = 0f32;
                let mut along = 0f32;
                for j in 0..k {
                    let jj = if reverse { k - 1 - j } else { j };
                    sum += s[sel[jj] as usize];
                    along += d[jj] * s[sel[jj] as usize];
                }
                along = if bug { 0.0 } else { along / sum };
                for j in 0..k {
                    ds[sel[j] as usize] = rho * (d[j] - along) / sum;
                }
            } else {
                for j in 0..k {
                    ds[sel[j] as usize] = rho * d[j];
                }
            }
            match g.scoring_func {
                ScoringFunc::Sigmoid if bug && !g.norm_topk_prob => {
                    out.extend((0..e).map(|i| ds[i] * s[i]))
                }
                ScoringFunc::Sigmoid => out.extend((0..e).map(|i| ds[i] * s[i] * (1.0 - s[i]))),
                ScoringFunc::Softmax => {
                    let dropped = bug && !g.norm_topk_prob;
                    let along: f32 = if dropped {
                        0.0
                    } else {
                        (0..e).map(|i| s[i] * ds[i]).sum()
                    };
                    out.extend((0..e).map(|i| s[i] * (ds[i] - along)));
                }
            }
        }
        out
    }

    #[test]
    fn f32_kernels_pass_and_planted_faults_fail() {
        let op = &MOE_GATE_BACKWARD;
        let mut worst = 0f64;
        let (mut cases, mut caught) = (0, 0);
        for cfg in op.configs() {
            for seed in 0..80u64 {
                let inputs =
                    moe_gate_backward_gen(&mut Rng::new(seed), &cfg, &Sizes::new()).unwrap();
                let (u, ids, dw) = (
                    get(&inputs, "logits"),
                    get(&inputs, "topk_ids"),
                    get(&inputs, "d_topk_weights"),
                );
                let (n, e) = (u.shape[0], u.shape[1]);
                let g = gate_config(&cfg, ids.shape[1]);
                let cand = |v: &[f32]| {
                    outputs([("d_logits", Tensor::from_f32_as(u.dtype, vec![n, e], v))])
                };
                for (ulps, reverse) in [(2, false), (-2, true), (0, false)] {
                    let got = f32_kernel(
                        &u.floats(),
                        &ids.indices(),
                        &dw.floats(),
                        e,
                        &g,
                        (ulps, reverse, false),
                    );
                    let rep = policy_report(op, &inputs, &cand(&got), &cfg);
                    worst = worst.max(rep.tensors[0].bound_use.as_ref().map_or(0.0, |b| b.max));
                    assert!(
                        rep.pass,
                        "{} seed {seed} ulps {ulps}: {:?}",
                        cfg.as_json(),
                        rep.tensors
                    );
                }
                // a kernel that drops one term of the chain rule
                let got = f32_kernel(
                    &u.floats(),
                    &ids.indices(),
                    &dw.floats(),
                    e,
                    &g,
                    (0, false, true),
                );
                let rep = policy_report(op, &inputs, &cand(&got), &cfg);
                cases += 1;
                caught += usize::from(!rep.pass);
            }
        }
        println!("worst f32 kernel uses {worst:.3} of its bound");
        assert!(worst < 1.0);
        println!("a dropped term was caught in {caught} of {cases} cases");
        // a few cases where the dropped term is ~0 (softmax over E = 1, a gradient that vanishes)
        assert!(caught * 100 >= cases * 90, "{caught} of {cases}");
    }

    #[test]
    fn a_normalisation_over_vanishing_scores_is_refused_by_name() {
        let op = &MOE_GATE_BACKWARD;
        let cfg = op
            .parse_config(&serde_json::json!({"scoring_func": "softmax"}))
            .unwrap();
        // expert 1's softmax score is e^-100: normalising by it is not computable in f32
        let inputs = outputs([
            ("logits", Tensor::from_f32(vec![1, 3], &[0.0, -100.0, -1.0])),
            ("topk_ids", Tensor::from_i64(vec![1, 1], &[1])),
            ("d_topk_weights", Tensor::from_f32(vec![1, 1], &[1.0])),
        ]);
        let e = moe_gate_backward_ref(&inputs, &cfg)
            .unwrap_err()
            .to_string();
        assert!(e.contains("topk_ids[0, 0]") && e.contains("2^-60"), "{e}");
    }
}
