//! `grpo_loss`: the GRPO objective (V3 eqs. (26)–(28), DeepSeekMath eq. (3), per token) of
//! every question's group, its advantages and its gradient w.r.t. the policy log-probabilities.

use dsv3_reference::train::grpo::{self, GrpoConfig, RewardStd};
use ndarray::Array2;

use super::bound_policy::bound_policy;
use super::gen_fits;
use super::{get, outputs};
use crate::registry::compare::Policy;
use crate::registry::config::{Choice, Config, ConfigSchema, FieldKind};
use crate::registry::contract::{Constraint, Dim, TensorSpec};
use crate::registry::error::Result;
use crate::registry::io::TensorMap;
use crate::registry::rng::Rng;
use crate::registry::tensor::{DType, Tensor};
use crate::registry::tolerance::unit_roundoff;
use crate::registry::{OpEntry, PolicyCtx, Sizes};

const LOGP: &[DType] = &[DType::F32, DType::F64];
const QGL: &[Dim] = &[Dim::Var("Q"), Dim::Var("G"), Dim::Var("L")];

/// `std`: the standard deviation of eq. (28).
impl Choice for RewardStd {
    const VALUES: &'static [&'static str] = &["sample", "population"];
    fn from_index(i: usize) -> Self {
        [RewardStd::Sample, RewardStd::Population][i]
    }
    fn name(self) -> &'static str {
        match self {
            RewardStd::Sample => "sample",
            RewardStd::Population => "population",
        }
    }
}

crate::op_config! {
    /// `grpo_loss`'s config.
    pub struct GrpoLossConfig {
        clip_eps: f64 = "0.2", FieldKind::PositiveFloat, "ε of the clipped ratio (not stated in V3)";
        kl_beta: f64 = "0.04", FieldKind::NonNegativeFloat, "β (DeepSeekMath: 0.04; not stated in V3)";
        std: RewardStd = "\"sample\"", FieldKind::choice::<RewardStd>(),
            "std of eq. (28): sample (G−1, torch.std) or population (G); all-equal rewards give A = 0";
    }
}

pub static GRPO_LOSS: OpEntry = OpEntry {
    name: "grpo_loss",
    source: "V3 eqs. (26)-(28); DeepSeekMath (2402.03300) eq. (3), outcome supervision, KL estimator eq. (4)",
    summary: "per question: A_i = (r_i − mean r)/std r; ρ = exp(logp − logp_old); loss = −(1/G) Σ_i (1/|o_i|) Σ_t [min(ρA, clip(ρ,1±ε)A) − β(e^Δ − Δ − 1)], Δ = logp_ref − logp; grad = ∂loss/∂logp",
    inputs: &[
        TensorSpec { name: "logp", dtypes: LOGP, shape: QGL, doc: "log π_θ of each sampled token" },
        TensorSpec { name: "logp_old", dtypes: LOGP, shape: QGL, doc: "log π_old (the sampling policy)" },
        TensorSpec { name: "logp_ref", dtypes: LOGP, shape: QGL, doc: "log π_ref" },
        TensorSpec {
            name: "mask",
            dtypes: &[DType::Bool, DType::U8, DType::I32, DType::I64, DType::F32, DType::F64],
            shape: QGL,
            doc: "non-zero at the |o_i| real tokens of output i (≥ 1 each)",
        },
        TensorSpec { name: "rewards", dtypes: LOGP, shape: &[Dim::Var("Q"), Dim::Var("G")], doc: "r_i of each output" },
    ],
    outputs: &[
        TensorSpec { name: "loss", dtypes: &[DType::F64], shape: &[Dim::Var("Q")], doc: "−J per question" },
        TensorSpec { name: "advantages", dtypes: &[DType::F64], shape: &[Dim::Var("Q"), Dim::Var("G")], doc: "A_i, eq. (28)" },
        TensorSpec { name: "grad_logp", dtypes: &[DType::F64], shape: QGL, doc: "∂loss/∂logp (0 where masked)" },
    ],
    constraints: &[
        Constraint::NonEmpty("G", "the advantages normalise over the group's outputs"),
        Constraint::NonEmpty("L", "every output needs a token: J divides by |o_i|"),
    ],
    config: ConfigSchema::of::<GrpoLossConfig>(),
    adapt: None,
    reference: grpo_loss_ref,
    reference_fn: "reference/src/train/grpo.rs::grpo_loss",
    gpu: &[],
    policy: grpo_loss_policy,
    policy_doc: "per element, twice the first-order f64 rounding bound of exp/sub/mul/sums in the formula (SPEC.md \"grpo_loss tolerance\"); at a clip boundary (ρ within rounding of 1±ε) either branch of the min",
    generate: grpo_loss_gen,
    test_configs: &[r#"{"std":"population"}"#, r#"{"clip_eps":0.05,"kl_beta":1.0}"#, r#"{"kl_beta":0.0}"#],
    v3_sizes: &[&[("Q", 2), ("G", 64), ("L", 1024)]],
};

/// The reference's config of the op's.
fn config(cfg: &Config) -> GrpoConfig {
    let c = cfg.get::<GrpoLossConfig>();
    GrpoConfig {
        clip_eps: c.clip_eps,
        kl_beta: c.kl_beta,
        std: c.std,
    }
}

/// The question-`q` slices as `[G, L]` arrays.
struct Group {
    logp: Array2<f64>,
    old: Array2<f64>,
    reference: Array2<f64>,
    mask: Array2<bool>,
    rewards: Vec<f64>,
}

fn groups(inputs: &TensorMap) -> Vec<Group> {
    let shape = get(inputs, "logp").shape.clone();
    let (q_len, g, l) = (shape[0], shape[1], shape[2]);
    let [lp, lo, lr, r] =
        ["logp", "logp_old", "logp_ref", "rewards"].map(|k| (get(inputs, k)).values());
    let m = (get(inputs, "mask")).bools();
    let slice = |v: &[f64], q: usize| {
        Array2::from_shape_vec((g, l), v[q * g * l..(q + 1) * g * l].to_vec()).expect("[G, L]")
    };
    (0..q_len)
        .map(|q| Group {
            logp: slice(&lp, q),
            old: slice(&lo, q),
            reference: slice(&lr, q),
            mask: Array2::from_shape_vec((g, l), m[q * g * l..(q + 1) * g * l].to_vec())
                .expect("[G, L]"),
            rewards: r[q * g..(q + 1) * g].to_vec(),
        })
        .collect()
}

fn run(gr: &Group, cfg: &GrpoConfig) -> Result<grpo::GrpoGroup> {
    Ok(grpo::grpo_loss(
        gr.logp.view(),
        gr.old.view(),
        gr.reference.view(),
        gr.mask.view(),
        &gr.rewards,
        cfg,
    )?)
}

fn grpo_loss_ref(inputs: &TensorMap, cfg: &Config) -> Result<TensorMap> {
    let shape = get(inputs, "logp").shape.clone();
    let c = config(cfg);
    let (mut loss, mut adv, mut grad) = (Vec::new(), Vec::new(), Vec::new());
    for gr in groups(inputs) {
        let r = run(&gr, &c)?;
        loss.push(r.loss);
        adv.extend(r.advantages);
        grad.extend(r.grad_logp);
    }
    Ok(outputs([
        ("loss", Tensor::from_f64(vec![shape[0]], &loss)),
        (
            "advantages",
            Tensor::from_f64(vec![shape[0], shape[1]], &adv),
        ),
        ("grad_logp", Tensor::from_f64(shape, &grad)),
    ]))
}

/// Per-token error terms of one side (first order, u = 2^-53): `(value error, magnitude)`.
fn token_bounds(
    lp: f64,
    lo: f64,
    lr: f64,
    a: f64,
    e_a: f64,
    c: &GrpoConfig,
    u: f64,
) -> (f64, f64, bool) {
    let rho = (lp - lo).exp();
    let delta = lr - lp;
    // ρ: the subtraction's absolute error u(|lp|+|lo|) becomes relative through exp, plus exp's own
    let e_rho = rho * u * (2.0 + lp.abs() + lo.abs());
    // ρA with A's own error
    let e_surr = e_rho * a.abs() + rho * e_a + u * rho * a.abs();
    // e^Δ − Δ − 1: exp of an inexact Δ, three adds
    let e_kl = c.kl_beta
        * ((delta.exp()) * u * (2.0 + lr.abs() + lp.abs())
            + 3.0 * u * (delta.abs() + 1.0 + delta.exp()));
    let magnitude = rho * a.abs() + c.kl_beta * (delta.exp() + delta.abs() + 1.0);
    // near a clip boundary the other branch of the min is also a rounding away
    let at_boundary = [1.0 - c.clip_eps, 1.0 + c.clip_eps]
        .iter()
        .any(|b| (rho - b).abs() <= 2.0 * e_rho + 4.0 * u * rho);
    (e_surr + e_kl, magnitude, at_boundary)
}

fn grpo_loss_policy<'a>(ctx: &PolicyCtx<'a>) -> Policy<'a> {
    let u = unit_roundoff(DType::F64);
    let c = config(ctx.config);
    let mut bound = Vec::new();
    for gr in groups(ctx.inputs) {
        let (g, l) = gr.logp.dim();
        let rmax = gr.rewards.iter().fold(0.0f64, |m, r| m.max(r.abs()));
        let adv = grpo::group_advantages(&gr.rewards, c.std).unwrap_or_else(|_| vec![0.0; g]);
        let mean = gr.rewards.iter().sum::<f64>() / g as f64;
        let dof = if c.std == RewardStd::Sample {
            g.saturating_sub(1).max(1)
        } else {
            g
        } as f64;
        let sd = (gr.rewards.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / dof).sqrt();
        // A_i = (r_i − r̄)/sd: the mean's and sd's sums (G terms each) and the division
        let e_adv: Vec<f64> = adv
            .iter()
            .map(|a| {
                if *a == 0.0 && sd == 0.0 {
                    0.0
                } else {
                    (g as f64 + 2.0) * u * rmax / sd + (g as f64 + 8.0) * u * a.abs()
                }
            })
            .collect();
        if ctx.output == "advantages" {
            bound.extend(e_adv.iter().map(|e| 2.0 * e));
            continue;
        }
        let mut loss_bound = 0.0;
        for i in 0..g {
            let len = gr.mask.row(i).iter().filter(|&&m| m).count().max(1) as f64;
            let w = 1.0 / (g as f64 * len);
            for t in 0..l {
                if !gr.mask[[i, t]] {
                    bound.push(0.0);
                    continue;
                }
                let (lp, lo, lr) = (gr.logp[[i, t]], gr.old[[i, t]], gr.reference[[i, t]]);
                let (e, mag, boundary) = token_bounds(lp, lo, lr, adv[i], e_adv[i], &c, u);
                // the sums over L tokens and G outputs
                loss_bound += w * (e + (l + g + 2) as f64 * u * mag);
                let rho_a = (lp - lo).exp() * adv[i].abs();
                bound.push(2.0 * w * (e + 2.0 * u * mag) + if boundary { w * rho_a } else { 0.0 });
            }
        }
        if ctx.output == "loss" {
            bound.truncate(bound.len() - g * l);
            bound.push(2.0 * loss_bound);
        }
    }
    bound_policy(
        ctx,
        "within twice the f64 rounding bound of the GRPO formula",
        &bound,
    )
}

/// G outputs of 1..L tokens; policies a small perturbation of each other (ratios near 1, some
/// outside the clip range); rewards 0/1 (sometimes all equal) or Gaussian.
fn grpo_loss_gen(rng: &mut Rng, _: &Config, sizes: &Sizes) -> Result<TensorMap> {
    let q_len = sizes.get("Q").copied().unwrap_or_else(|| rng.range(1, 3));
    let g = sizes.get("G").copied().unwrap_or_else(|| rng.range(2, 8));
    let l = sizes.get("L").copied().unwrap_or_else(|| rng.range(1, 12));
    gen_fits(&[
        &[q_len, g, l],
        &[q_len, g, l],
        &[q_len, g, l],
        &[q_len, g, l],
        &[q_len, g],
    ])?;
    let (mut lp, mut lo, mut lr, mut mask) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..q_len * g {
        let len = rng.range(l.min(1), l);
        for t in 0..l {
            let base = -(rng.uniform() * 6.0 + 1e-3);
            lp.push(base);
            lo.push(base + rng.normal() * 0.15);
            lr.push(base + rng.normal() * 0.3);
            mask.push(t < len);
        }
    }
    let binary = rng.chance(0.6);
    let r: Vec<f64> = (0..q_len * g)
        .map(|_| {
            if binary {
                f64::from(u8::from(rng.chance(0.5)))
            } else {
                rng.normal()
            }
        })
        .collect();
    let dt = *rng.pick(&[DType::F32, DType::F64]);
    let mask_dt = *rng.pick(&[DType::Bool, DType::Bool, DType::U8, DType::F32]);
    let mask = match mask_dt {
        DType::Bool => Tensor::from_bool(vec![q_len, g, l], &mask),
        DType::U8 => Tensor::from_codes(
            DType::U8,
            vec![q_len, g, l],
            mask.iter().map(|&b| u8::from(b)).collect(),
        ),
        _ => Tensor::from_f32(
            vec![q_len, g, l],
            &mask
                .iter()
                .map(|&b| f32::from(u8::from(b)))
                .collect::<Vec<_>>(),
        ),
    };
    Ok(outputs([
        ("logp", Tensor::from_f64_as(dt, vec![q_len, g, l], &lp)),
        ("logp_old", Tensor::from_f64_as(dt, vec![q_len, g, l], &lo)),
        ("logp_ref", Tensor::from_f64_as(dt, vec![q_len, g, l], &lr)),
        ("mask", mask),
        ("rewards", Tensor::from_f64_as(dt, vec![q_len, g], &r)),
    ]))
}
