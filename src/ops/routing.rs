//! `node_limited_routing` (which experts each token goes to) and `bias_update` (the
//! auxiliary-loss-free bias step that follows a step's routing).

use dsv3_reference::moe::{self, node_routing::topk_desc};
use ndarray::{Array1, Array2};

use super::gen_fits;
use super::{float_input, get, outputs};
use crate::registry::compare::Policy;
use crate::registry::config::{ceil, Config, ConfigSchema, FieldKind, OpConfig};
use crate::registry::contract::Param;
use crate::registry::contract::{Constraint, Dim, TensorSpec};
use crate::registry::error::Result;
use crate::registry::io::TensorMap;
use crate::registry::rng::Rng;
use crate::registry::tensor::{DType, Tensor};
use crate::registry::{OpEntry, PolicyCtx, Sizes};

const COUNT: FieldKind = FieldKind::Int {
    min: 1,
    max: ceil::COUNT,
};

crate::op_config! {
    /// `node_limited_routing`'s config.
    pub struct RoutingConfig {
        top_k: usize = "8", COUNT, "K_r, experts per token (8 in V3)";
        n_nodes: usize = "8", COUNT, "nodes the experts are spread over, E/n_nodes each (= n_group; 8 in V3)";
        max_nodes: usize = "4", COUNT, "M, nodes per token (= topk_group; 4 in V3); must divide top_k";
    }
}

crate::op_config! {
    /// `bias_update`'s config: the routing's, and the update speed.
    pub struct BiasUpdateConfig {
        top_k: usize = "8", COUNT, "K_r, experts per token (8 in V3)";
        n_nodes: usize = "8", COUNT, "nodes the experts are spread over, E/n_nodes each (= n_group; 8 in V3)";
        max_nodes: usize = "4", COUNT, "M, nodes per token (= topk_group; 4 in V3); must divide top_k";
        gamma: f64 = "0.001", FieldKind::NonNegativeFloat, "γ, the bias update speed (0.001 until 14.3T tokens)";
    }
}

/// The node-limited routing a config asks for: K_r experts per token on at most M of the nodes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NodeLimits {
    pub top_k: usize,
    pub n_nodes: usize,
    pub max_nodes: usize,
}

/// A config that routes tokens node-limited (`node_limited_routing`, `bias_update`,
/// `balance_loss`).
pub(crate) trait NodeLimited: OpConfig {
    fn limits(&self) -> NodeLimits;
}

impl NodeLimited for RoutingConfig {
    fn limits(&self) -> NodeLimits {
        NodeLimits {
            top_k: self.top_k,
            n_nodes: self.n_nodes,
            max_nodes: self.max_nodes,
        }
    }
}

impl NodeLimited for BiasUpdateConfig {
    fn limits(&self) -> NodeLimits {
        NodeLimits {
            top_k: self.top_k,
            n_nodes: self.n_nodes,
            max_nodes: self.max_nodes,
        }
    }
}

const SCORES: TensorSpec = TensorSpec {
    name: "scores",
    dtypes: &[DType::F32, DType::BF16],
    shape: &[Dim::Var("T"), Dim::Var("E")],
    doc: "affinities s_{i,t} = σ(u_tᵀ e_i), eq. (15)",
};
const BIAS: TensorSpec = TensorSpec {
    name: "bias",
    dtypes: &[DType::F32, DType::BF16],
    shape: &[Dim::Var("E")],
    doc: "b_i of eq. (16) (e_score_correction_bias, fp32); zeros for no bias",
};

/// `scores` as `[T, E]` and `bias` as `[E]`.
pub(crate) fn scores_bias(inputs: &TensorMap) -> (Array2<f32>, Array1<f32>) {
    let s = get(inputs, "scores");
    let scores = Array2::from_shape_vec((s.shape[0], s.shape[1]), s.to_f32().expect("F32 or BF16"))
        .expect("validated [T, E]");
    let bias = Array1::from(get(inputs, "bias").to_f32().expect("F32 or BF16"));
    (scores, bias)
}

/// The routed selection of every token (descending score order).
pub(crate) fn route(inputs: &TensorMap, l: NodeLimits) -> Result<Array2<usize>> {
    let (scores, bias) = scores_bias(inputs);
    Ok(moe::node_limited_topk(
        scores.view(),
        Some(bias.view()),
        l.top_k,
        l.n_nodes,
        l.max_nodes,
    )?)
}

pub static NODE_LIMITED_ROUTING: OpEntry = OpEntry {
    name: "node_limited_routing",
    source: "V3 §2.1.2 node-limited routing, eq. (16); = OFF Gate.forward group-limited selection (n_group = nodes, topk_group = M, top-2 group score = K_r/M)",
    summary: "per token: affinity s+b; node score = sum of its top K_r/M affinities; keep the M best nodes; the top_k best experts on them (ids ascending)",
    inputs: &[SCORES, BIAS],
    outputs: &[TensorSpec {
        name: "topk_idx",
        dtypes: &[DType::I64],
        shape: &[Dim::Var("T"), Dim::Field(Param { name: "top_k", get: |c| c.get::<RoutingConfig>().top_k })],
        doc: "selected expert ids, ascending (a set per token)",
    }],
    constraints: &[Constraint::NonEmpty("E", "top_k experts are chosen among them")],
    config: ConfigSchema::of::<RoutingConfig>(),
    adapt: None,
    reference: node_limited_routing_ref,
    reference_fn: "reference/src/moe/node_routing.rs::node_limited_topk",
    gpu: &[],
    policy: node_limited_routing_policy,
    policy_doc: "exact; a token whose selection is not unique (an exact tie of s+b at the K-th expert, or of node scores at the M-th node) may pick any of the tied candidates",
    generate: routing_gen::<RoutingConfig>,
    test_configs: &[
        r#"{"top_k":6,"n_nodes":6,"max_nodes":3}"#,
        r#"{"top_k":4,"n_nodes":4,"max_nodes":1}"#,
        r#"{"top_k":2,"n_nodes":1,"max_nodes":1}"#,
    ],
    v3_sizes: &[&[("T", 64), ("E", 256)]],
};

fn node_limited_routing_ref(inputs: &TensorMap, cfg: &Config) -> Result<TensorMap> {
    let sel = route(inputs, cfg.get::<RoutingConfig>().limits())?;
    let (t, k) = sel.dim();
    let mut ids = Vec::with_capacity(t * k);
    for row in sel.outer_iter() {
        let mut r: Vec<i64> = row.iter().map(|&i| i as i64).collect();
        r.sort_unstable();
        ids.extend(r);
    }
    Ok(outputs([("topk_idx", Tensor::from_i64(vec![t, k], &ids))]))
}

fn node_limited_routing_policy<'a>(ctx: &PolicyCtx<'a>) -> Policy<'a> {
    let (scores, bias) = scores_bias(ctx.inputs);
    let l = ctx.config.get::<RoutingConfig>().limits();
    let (k, nodes, m) = (l.top_k, l.n_nodes, l.max_nodes);
    let want = (get(ctx.reference, "topk_idx")).values();
    let got = (get(ctx.candidate, "topk_idx")).values();
    // per token: None when the selection is unique (judged bitwise), else whether the
    // candidate's whole row is one of the selections a tie resolution could make
    let verdicts: Vec<Option<bool>> = scores
        .outer_iter()
        .enumerate()
        .map(|(t, s_t)| {
            let sel: Vec<f32> = (0..s_t.len()).map(|i| s_t[i] + bias[i]).collect();
            let row = |v: &[f64]| v[t * k..(t + 1) * k].to_vec();
            let tie = Ties::of(&sel, &row(&want), k, nodes, m)?;
            Some(tie.admits(&row(&got)))
        })
        .collect();
    // relational: a token's ids are judged together (a tied id may replace another only if
    // the whole row stays a valid selection), so every element is seen
    Policy::Relational {
        why: "a tied candidate, in tokens whose selection is not unique (the row must stay a valid selection, ascending)",
        judge: Box::new(move |i| match verdicts.get(i / k)? {
            None => (got[i].to_bits() == want[i].to_bits()).then_some("exact"),
            Some(true) => Some("another resolution of an exact tie"),
            Some(false) => None,
        }),
    }
}

/// The exact ties of one token's selection: node scores tied at the M-th node, or selection
/// scores tied at the K-th expert of the kept nodes.
struct Ties {
    sel: Vec<f32>,
    node_aff: Vec<f32>,
    /// The M-th best node score.
    m_th: f32,
    per_node: usize,
    k: usize,
    m: usize,
}

impl Ties {
    /// `None` when the token's selection is unique.
    fn of(sel: &[f32], want: &[f64], k: usize, nodes: usize, m: usize) -> Option<Ties> {
        let e = sel.len();
        let per_node = e / nodes;
        let node_aff: Vec<f32> = (0..nodes)
            .map(|n| {
                let members = &sel[n * per_node..(n + 1) * per_node];
                topk_desc(members, k / m)
                    .iter()
                    .fold(0.0f32, |a, &j| a + members[j])
            })
            .collect();
        let m_th = node_aff[*topk_desc(&node_aff, m).last()?];
        let eligible = |i: usize| node_aff[i / per_node] >= m_th;
        let node_tie = node_aff.iter().filter(|&&a| a >= m_th).count() > m;
        let v_k = want
            .iter()
            .map(|&i| sel[i as usize])
            .fold(f32::INFINITY, f32::min);
        let expert_tie = (0..e).filter(|&i| eligible(i) && sel[i] >= v_k).count() > k;
        (node_tie || expert_tie).then(|| Ties {
            sel: sel.to_vec(),
            node_aff,
            m_th,
            per_node,
            k,
            m,
        })
    }

    /// Whether `row` (candidate ids) is a selection some resolution of the ties makes: k
    /// distinct ids, ascending, on at most M nodes that a top-M node choice can hold (every
    /// node scoring above the M-th, the rest tied with it), and a top-k of the experts on
    /// those nodes. The nodes added to reach M are the tied nodes whose best expert is
    /// weakest: adding a node only adds competitors, so that choice admits the most rows.
    fn admits(&self, row: &[f64]) -> bool {
        let e = self.sel.len();
        if row.len() != self.k
            || row
                .iter()
                .any(|&c| !(c >= 0.0 && c < e as f64 && c.fract() == 0.0))
            || row.windows(2).any(|w| w[0] >= w[1])
        {
            return false;
        }
        let ids: Vec<usize> = row.iter().map(|&c| c as usize).collect();
        let node = |i: usize| i / self.per_node;
        if ids.iter().any(|&i| self.node_aff[node(i)] < self.m_th) {
            return false;
        }
        let mut kept: Vec<usize> = (0..self.node_aff.len())
            .filter(|&n| self.node_aff[n] > self.m_th || ids.iter().any(|&i| node(i) == n))
            .collect();
        if kept.len() > self.m {
            return false;
        }
        let best = |n: usize| {
            self.sel[n * self.per_node..(n + 1) * self.per_node]
                .iter()
                .fold(f32::NEG_INFINITY, |a, &v| a.max(v))
        };
        let mut tied: Vec<usize> = (0..self.node_aff.len())
            .filter(|&n| self.node_aff[n] == self.m_th && !kept.contains(&n))
            .collect();
        tied.sort_by(|&a, &b| best(a).total_cmp(&best(b)));
        kept.extend(tied.into_iter().take(self.m - kept.len()));
        let weakest = ids
            .iter()
            .map(|&i| self.sel[i])
            .fold(f32::INFINITY, f32::min);
        (0..e)
            .filter(|&i| kept.contains(&node(i)) && !ids.contains(&i))
            .all(|i| self.sel[i] <= weakest)
    }
}

/// Random affinities; `E = n_nodes · per_node` with room for the config; sometimes a coarse grid
/// (exact ties) and sometimes no bias.
fn routing_gen<C: NodeLimited>(rng: &mut Rng, cfg: &Config, sizes: &Sizes) -> Result<TensorMap> {
    let t = sizes.get("T").copied().unwrap_or_else(|| rng.range(1, 12));
    let e = n_experts(rng, cfg.get::<C>().limits(), sizes);
    gen_fits(&[&[t, e], &[e]])?;
    let s = affinities(rng, t * e);
    Ok(outputs([
        ("scores", float_input(rng, vec![t, e], &s)),
        ("bias", Tensor::from_f32(vec![e], &random_bias(rng, e))),
    ]))
}

/// A number of experts the routing config accepts: `n_nodes · (K/M + 0..3)` (or `sizes["E"]`).
pub(crate) fn n_experts(rng: &mut Rng, l: NodeLimits, sizes: &Sizes) -> usize {
    let (k, nodes, m) = (l.top_k, l.n_nodes, l.max_nodes);
    sizes
        .get("E")
        .copied()
        .unwrap_or_else(|| nodes * (k.div_ceil(m) + rng.range(0, 3)))
}

/// `n` sigmoid affinities σ(1.5·z); one time in five rounded to multiples of 1/8 in [1/8, 1]
/// (exact ties, never all zero).
pub(crate) fn affinities(rng: &mut Rng, n: usize) -> Vec<f32> {
    let coarse = rng.chance(0.2);
    (0..n)
        .map(|_| {
            let v = 1.0 / (1.0 + (-1.5 * rng.normal()).exp());
            (if coarse {
                (v * 8.0).round().max(1.0) / 8.0
            } else {
                v
            }) as f32
        })
        .collect()
}

/// A small bias (σ = 0.05), or zeros three times in ten.
pub(crate) fn random_bias(rng: &mut Rng, e: usize) -> Vec<f32> {
    let with_bias = rng.chance(0.7);
    (0..e)
        .map(|_| {
            if with_bias {
                (rng.normal() * 0.05) as f32
            } else {
                0.0
            }
        })
        .collect()
}

pub static BIAS_UPDATE: OpEntry = OpEntry {
    name: "bias_update",
    source: "V3 §2.1.2 auxiliary-loss-free balancing (text after eq. (16)); LF Alg. 1",
    summary: "route the step's tokens (node_limited_routing), c_i = tokens per expert, b_i ← b_i + γ·sign(c̄ − c_i) (f32; sign(0) = 0, sign taken on integers)",
    inputs: &[SCORES, BIAS],
    outputs: &[
        TensorSpec { name: "load", dtypes: &[DType::I64], shape: &[Dim::Var("E")], doc: "c_i, tokens routed to expert i" },
        TensorSpec { name: "bias_out", dtypes: &[DType::F32], shape: &[Dim::Var("E")], doc: "updated b_i" },
    ],
    constraints: &[Constraint::NonEmpty("E", "top_k experts are chosen among them")],
    config: ConfigSchema::of::<BiasUpdateConfig>(),
    adapt: None,
    reference: bias_update_ref,
    reference_fn: "reference/src/moe/bias_update.rs::bias_update",
    gpu: &[],
    policy: exact,
    policy_doc: "exact: integer counts and one f32 add of ±γ (inputs with exact selection ties are ambiguous: check their routing with node_limited_routing)",
    generate: routing_gen::<BiasUpdateConfig>,
    test_configs: &[r#"{"top_k":2,"n_nodes":1,"max_nodes":1}"#, r#"{"gamma":0.25,"top_k":4,"n_nodes":4,"max_nodes":2}"#, r#"{"gamma":0.0}"#],
    v3_sizes: &[&[("T", 64), ("E", 256)]],
};

fn bias_update_ref(inputs: &TensorMap, cfg: &Config) -> Result<TensorMap> {
    let cfg = cfg.get::<BiasUpdateConfig>();
    let sel = route(inputs, cfg.limits())?;
    let (_, bias) = scores_bias(inputs);
    let e = bias.len();
    let load = moe::expert_load(sel.view(), e)?;
    let mut b = bias.to_vec();
    moe::bias_update(&mut b, &load, cfg.gamma)?;
    let load: Vec<i64> = load.iter().map(|&c| c as i64).collect();
    Ok(outputs([
        ("load", Tensor::from_i64(vec![e], &load)),
        ("bias_out", Tensor::from_f32(vec![e], &b)),
    ]))
}

fn exact<'a>(_: &PolicyCtx<'a>) -> Policy<'a> {
    Policy::Exact
}
