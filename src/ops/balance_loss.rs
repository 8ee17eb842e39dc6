//! `balance_loss`: the complementary sequence-wise balance loss (V3 eqs. (17)–(20)) of every
//! sequence and its gradient w.r.t. the affinities.

use dsv3_reference::moe::{self, RoutingConfig};
use ndarray::{Array1, Array2, ArrayView2};

use super::bound_policy::bound_policy;
use super::gen_fits;
use super::routing::{affinities, n_experts, random_bias, NodeLimited, NodeLimits};
use super::{float_input, get, outputs};
use crate::registry::compare::Policy;
use crate::registry::config::{ceil, Config, ConfigSchema, FieldKind};
use crate::registry::contract::{Constraint, Dim, TensorSpec};
use crate::registry::error::Result;
use crate::registry::io::TensorMap;
use crate::registry::rng::Rng;
use crate::registry::tensor::{DType, Tensor};
use crate::registry::tolerance::unit_roundoff;
use crate::registry::{OpEntry, PolicyCtx, Sizes};

crate::choice! {
    /// The indicator of eq. (18).
    pub enum Selection {
        /// the literal unbiased Topk(s, K_r)
        Topk = "topk",
        /// the experts the token is sent to (s + b, node-limited)
        Routed = "routed",
    }
}

const COUNT: FieldKind = FieldKind::Int {
    min: 1,
    max: ceil::COUNT,
};

crate::op_config! {
    /// `balance_loss`'s config.
    pub struct BalanceLossConfig {
        top_k: usize = "8", COUNT, "K_r, experts per token (8 in V3)";
        alpha: f64 = "0.0001", FieldKind::NonNegativeFloat, "α (V3: 0.0001)";
        selection: Selection = "\"topk\"", FieldKind::choice::<Selection>(),
            "indicator of eq. (18): \"topk\" = the literal unbiased Topk(s, K_r); \"routed\" = the experts the token is sent to (s+b, node-limited)";
        n_nodes: usize = "8", COUNT, "nodes the experts are spread over, E/n_nodes each (= n_group; 8 in V3)";
        max_nodes: usize = "4", COUNT, "M, nodes per token (= topk_group; 4 in V3); must divide top_k";
    }
}

impl NodeLimited for BalanceLossConfig {
    fn limits(&self) -> NodeLimits {
        NodeLimits {
            top_k: self.top_k,
            n_nodes: self.n_nodes,
            max_nodes: self.max_nodes,
        }
    }
}

pub static BALANCE_LOSS: OpEntry = OpEntry {
    name: "balance_loss",
    source: "V3 eqs. (17)-(20), α = 0.0001 (§4.2)",
    summary: "per sequence: f_i = E/(K·T)·#{t: i selected}, s' = s/Σ_j s_j, P_i = mean_t s'_{i,t}, L = α Σ f_i P_i; grad = ∂L/∂s with the selection fixed",
    inputs: &[
        TensorSpec { name: "scores", dtypes: &[DType::F32, DType::BF16], shape: &[Dim::Var("S"), Dim::Var("T"), Dim::Var("E")], doc: "affinities s_{i,t} of S sequences of T tokens" },
        TensorSpec { name: "bias", dtypes: &[DType::F32, DType::BF16], shape: &[Dim::Var("E")], doc: "b_i, used only by selection = \"routed\"" },
    ],
    outputs: &[
        TensorSpec { name: "loss", dtypes: &[DType::F64], shape: &[Dim::Var("S")], doc: "L_Bal of each sequence" },
        TensorSpec { name: "grad", dtypes: &[DType::F64], shape: &[Dim::Var("S"), Dim::Var("T"), Dim::Var("E")], doc: "∂L_Bal/∂s_{i,t}" },
    ],
    constraints: &[
        Constraint::NonEmpty("T", "P_i averages over the sequence's tokens"),
        Constraint::NonEmpty("E", "top_k experts are chosen among them"),
    ],
    config: ConfigSchema::of::<BalanceLossConfig>(),
    adapt: None,
    reference: balance_loss_ref,
    reference_fn: "reference/src/moe/balance_loss.rs::balance_loss",
    gpu: &[],
    policy: balance_loss_policy,
    policy_doc: "f64 rounding bounds: loss within 2(2E+T+4)·u·L; grad within 8(E+T+4)·u·(α/T)(f_j/S_t + A_t/S_t²) + 4u·|g| (u = 2^-53; SPEC.md derives both)",
    generate: balance_loss_gen,
    test_configs: &[r#"{"selection":"routed"}"#, r#"{"top_k":1,"n_nodes":1,"max_nodes":1}"#, r#"{"alpha":0.0}"#],
    v3_sizes: &[&[("S", 1), ("T", 512), ("E", 256)]],
};

/// Sequence `q` of `scores` as `[T, E]`.
fn sequence(scores: &Tensor, q: usize) -> Array2<f32> {
    let (t, e) = (scores.shape[1], scores.shape[2]);
    let all = scores.to_f32().expect("F32 or BF16");
    Array2::from_shape_vec((t, e), all[q * t * e..(q + 1) * t * e].to_vec()).expect("[T, E]")
}

/// The indicator's selection for one sequence under `cfg`.
fn selection(
    s: ArrayView2<f32>,
    bias: &Array1<f32>,
    cfg: &BalanceLossConfig,
) -> Result<Array2<usize>> {
    let k = cfg.top_k;
    Ok(match cfg.selection {
        Selection::Routed => {
            moe::node_limited_topk(s, Some(bias.view()), k, cfg.n_nodes, cfg.max_nodes)?
        }
        Selection::Topk => moe::group_limited_topk(s, None, &RoutingConfig::plain(k))?,
    })
}

fn balance_loss_ref(inputs: &TensorMap, cfg: &Config) -> Result<TensorMap> {
    let scores = get(inputs, "scores");
    let bias = Array1::from(get(inputs, "bias").to_f32().expect("F32 or BF16"));
    let cfg = cfg.get::<BalanceLossConfig>();
    let alpha = cfg.alpha;
    let mut loss = Vec::new();
    let mut grad = Vec::new();
    for q in 0..scores.shape[0] {
        // selection on the f32 affinities, the loss in f64
        let s32 = sequence(scores, q);
        let sel = selection(s32.view(), &bias, cfg)?;
        let s = s32.mapv(f64::from);
        loss.push(moe::balance_loss(s.view(), sel.view(), alpha)?.loss);
        grad.extend(moe::balance_loss_grad(s.view(), sel.view(), alpha)?);
    }
    Ok(outputs([
        ("loss", Tensor::from_f64(vec![scores.shape[0]], &loss)),
        ("grad", Tensor::from_f64(scores.shape.clone(), &grad)),
    ]))
}

/// Per-element bounds (SPEC.md, "balance_loss tolerance"): two f64 evaluations in different
/// orders each stay within their rounding bound of the exact value.
fn balance_loss_policy<'a>(ctx: &PolicyCtx<'a>) -> Policy<'a> {
    let u = unit_roundoff(DType::F64);
    let scores = get(ctx.inputs, "scores");
    let (n_seq, t_len, e) = (scores.shape[0], scores.shape[1], scores.shape[2]);
    let cfg = ctx.config.get::<BalanceLossConfig>();
    let alpha = cfg.alpha;
    let bias = Array1::from(get(ctx.inputs, "bias").to_f32().expect("F32 or BF16"));
    let reference = get(ctx.reference, ctx.output);
    let mut bound = Vec::new();
    for q in 0..n_seq {
        let s32 = sequence(scores, q);
        if ctx.output == "loss" {
            // a sum of non-negative terms through ≤ 2E+T+4 roundings, on each side
            bound.push(2.0 * (2 * e + t_len + 4) as f64 * u * reference.value(q).abs());
            continue;
        }
        let Ok(sel) = selection(s32.view(), &bias, cfg) else {
            bound.extend(std::iter::repeat_n(0.0, t_len * e));
            continue;
        };
        let s = s32.mapv(f64::from);
        let f = match moe::balance_loss(s.view(), sel.view(), alpha) {
            Ok(r) => r.f,
            Err(_) => vec![0.0; e],
        };
        for (t, row) in s.outer_iter().enumerate() {
            let s_t: f64 = row.sum();
            let a_t: f64 = row.iter().zip(&f).map(|(x, f)| x * f).sum();
            for (j, f_j) in f.iter().enumerate() {
                // the two terms of (α/T)(f_j/S_t − A_t/S_t²), each with ≤ 2E+T+… roundings per side
                let g = reference.value((q * t_len + t) * e + j).abs();
                let terms = alpha / t_len as f64 * (f_j / s_t + a_t / (s_t * s_t));
                bound.push(8.0 * (e + t_len + 4) as f64 * u * terms + 4.0 * u * g);
            }
        }
    }
    bound_policy(
        ctx,
        "within the f64 rounding bound of the loss / gradient formula",
        &bound,
    )
}

fn balance_loss_gen(rng: &mut Rng, cfg: &Config, sizes: &Sizes) -> Result<TensorMap> {
    let n_seq = sizes.get("S").copied().unwrap_or_else(|| rng.range(1, 3));
    let t = sizes.get("T").copied().unwrap_or_else(|| rng.range(1, 10));
    let e = n_experts(rng, cfg.get::<BalanceLossConfig>().limits(), sizes);
    gen_fits(&[&[n_seq, t, e], &[e]])?;
    let s = affinities(rng, n_seq * t * e);
    Ok(outputs([
        ("scores", float_input(rng, vec![n_seq, t, e], &s)),
        ("bias", Tensor::from_f32(vec![e], &random_bias(rng, e))),
    ]))
}
