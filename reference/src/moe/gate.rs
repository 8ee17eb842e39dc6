//! The MoE router: affinities, auxiliary-loss-free bias, node(group)-limited top-k, gate weights
//! (V3 eqs. (13)–(16) and §2.1.2 "node-limited routing"; OFF `Gate.forward`; HF
//! `DeepseekV3TopkRouter`).

use ndarray::{Array2, ArrayView2};

use crate::error::{Error, Result};

/// How affinities come from the router logits `u = x·eᵀ`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoringFunc {
    /// V3 eq. (15): `s_i = σ(u_i)`.
    Sigmoid,
    /// V2 eq. (22): `s_i = softmax_i(u)` over all routed experts.
    Softmax,
}

/// How experts are selected (HF/HUB `topk_method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopkMethod {
    /// V3: `e_score_correction_bias` added for selection only (eq. (16)); group score = sum of
    /// the top-2 biased scores of the group.
    NoauxTc,
    /// Plain top-k over all experts (no groups, no bias).
    Greedy,
    /// V2 device-limited routing: group score = the group's max score (no bias).
    GroupLimitedGreedy,
}

/// The routing hyper-parameters of one model.
#[derive(Debug, Clone, PartialEq)]
pub struct GateConfig {
    /// K_r (`num_experts_per_tok`, 8).
    pub top_k: usize,
    /// Expert groups (`n_group`, 8 = nodes).
    pub n_group: usize,
    /// Groups kept per token (`topk_group`, M = 4).
    pub topk_group: usize,
    pub scoring_func: ScoringFunc,
    pub topk_method: TopkMethod,
    /// Normalise the selected weights to sum 1 (eq. (13)).
    pub norm_topk_prob: bool,
    /// Multiplies the gate weights (`routed_scaling_factor`, 2.5).
    pub routed_scaling_factor: f64,
}

impl GateConfig {
    /// Whether selection is group-limited.
    pub fn grouped(&self) -> bool {
        self.n_group > 1 && self.topk_method != TopkMethod::Greedy
    }

    /// Check the config against `n_experts` routed experts.
    pub fn validate(&self, n_experts: usize) -> Result<()> {
        let bad = |field, value: usize, why: String| {
            Err(Error::Config {
                field,
                value: value.to_string(),
                why,
            })
        };
        if self.top_k == 0 || self.top_k > n_experts {
            return bad(
                "num_experts_per_tok",
                self.top_k,
                format!("must be in 1..={n_experts} (n_routed_experts)"),
            );
        }
        if self.n_group == 0 || n_experts % self.n_group != 0 {
            return bad(
                "n_group",
                self.n_group,
                format!("must divide n_routed_experts = {n_experts}"),
            );
        }
        if self.grouped() {
            let per_group = n_experts / self.n_group;
            if self.topk_group == 0 || self.topk_group > self.n_group {
                return bad(
                    "topk_group",
                    self.topk_group,
                    format!("must be in 1..={} (n_group)", self.n_group),
                );
            }
            if self.top_k > self.topk_group * per_group {
                return bad(
                    "num_experts_per_tok",
                    self.top_k,
                    format!(
                        "exceeds the {} experts of the {} kept groups",
                        self.topk_group * per_group,
                        self.topk_group
                    ),
                );
            }
            if self.topk_method == TopkMethod::NoauxTc && per_group < 2 {
                return bad(
                    "n_group",
                    self.n_group,
                    "noaux_tc scores a group by its top-2 experts: needs ≥ 2 experts per group"
                        .into(),
                );
            }
        }
        if !(self.routed_scaling_factor.is_finite() && self.routed_scaling_factor > 0.0) {
            return Err(Error::Config {
                field: "routed_scaling_factor",
                value: self.routed_scaling_factor.to_string(),
                why: "must be > 0".into(),
            });
        }
        Ok(())
    }
}

/// The routing of `N` tokens: `top_k` experts per token, best first.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    /// Gate weights `g_{i,t}` `[N, top_k]`.
    pub weights: Array2<f32>,
    /// Expert indices `[N, top_k]`, sorted by descending selection score (ties: lower index).
    pub ids: Array2<usize>,
}

/// One token's routing scores (f64).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenScores {
    /// Affinities `s_i` (eq. (15)): the gate weights come from these.
    pub affinity: Vec<f64>,
    /// Selection scores `s_i + b_i` (eq. (16); `s_i` without bias), `−∞` in dropped groups.
    pub selection: Vec<f64>,
    /// Group scores before the group choice (empty when not grouped).
    pub groups: Vec<f64>,
    /// The kept groups.
    pub kept_groups: Vec<usize>,
}

/// Indices of the `k` largest values, largest first; ties go to the lower index.
pub fn top_k_indices(values: &[f64], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// Affinities, selection scores and group choice of one token from its logits `u` `[E]`.
///
/// 1. `s = σ(u)` (or `softmax(u)`);
/// 2. `b = s + e_score_correction_bias` for `noaux_tc`, else `b = s`;
/// 3. grouped: group score = sum of the top-2 `b` of the group (`noaux_tc`) or its max
///    (`group_limited_greedy`); keep the `topk_group` best groups; `b = −∞` elsewhere (OFF; TF
///    5.24 too, older HF fills 0.0).
pub fn token_scores(u: &[f32], bias: Option<&[f32]>, cfg: &GateConfig) -> Result<TokenScores> {
    let e = u.len();
    if let Some(i) = u.iter().position(|v| !v.is_finite()) {
        return Err(Error::Value {
            op: "gate",
            tensor: "logits",
            index: vec![i],
            value: u[i].to_string(),
            why: "router logits must be finite",
        });
    }
    // step 1: affinities
    let affinity: Vec<f64> = match cfg.scoring_func {
        ScoringFunc::Sigmoid => u
            .iter()
            .map(|&v| 1.0 / (1.0 + (-f64::from(v)).exp()))
            .collect(),
        ScoringFunc::Softmax => {
            let max = u
                .iter()
                .fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
            let ex: Vec<f64> = u.iter().map(|&v| (f64::from(v) - max).exp()).collect();
            let sum: f64 = ex.iter().sum();
            ex.iter().map(|v| v / sum).collect()
        }
    };
    // step 2: selection scores (the bias only ever touches selection)
    let mut selection = affinity.clone();
    if cfg.topk_method == TopkMethod::NoauxTc {
        let bias = bias.ok_or(Error::Argument {
            op: "gate",
            name: "e_score_correction_bias",
            value: "absent".into(),
            why: "topk_method noaux_tc adds it to the scores for selection".into(),
        })?;
        if bias.len() != e {
            return Err(Error::Shape {
                op: "gate",
                tensor: "e_score_correction_bias",
                got: vec![bias.len()],
                expected: format!("[{e}] (one per routed expert)"),
            });
        }
        for (sel, &b) in selection.iter_mut().zip(bias) {
            *sel += f64::from(b);
        }
    }
    // step 3: group-limited selection
    let (mut groups, mut kept_groups) = (Vec::new(), Vec::new());
    if cfg.grouped() {
        let per = e / cfg.n_group;
        for g in 0..cfg.n_group {
            let members = &selection[g * per..(g + 1) * per];
            groups.push(match cfg.topk_method {
                TopkMethod::NoauxTc => top_k_indices(members, 2).iter().map(|&i| members[i]).sum(),
                _ => members.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v)),
            });
        }
        kept_groups = top_k_indices(&groups, cfg.topk_group);
        for g in 0..cfg.n_group {
            if !kept_groups.contains(&g) {
                for v in &mut selection[g * per..(g + 1) * per] {
                    *v = f64::NEG_INFINITY;
                }
            }
        }
    }
    Ok(TokenScores {
        affinity,
        selection,
        groups,
        kept_groups,
    })
}

/// Route `N` tokens from their router logits.
///
/// V3 eqs. (13)–(16); OFF `Gate.forward` after the logits GEMM. Shapes: `logits: [N, E]`,
/// `bias: [E]` (used by `noaux_tc` only) → [`Routing`] `[N, top_k]`.
/// After [`token_scores`]: `ids = top_k(b)`; `w = s[ids]`; `w ← w / Σw` when
/// `norm_topk_prob` (no epsilon: OFF; HF adds 1e-20, invisible in f32 for sums ≥ 2^-100);
/// `w ← w · routed_scaling_factor`. All in f64, weights rounded to f32 once.
pub fn route(logits: ArrayView2<f32>, bias: Option<&[f32]>, cfg: &GateConfig) -> Result<Routing> {
    let (n_len, e) = logits.dim();
    cfg.validate(e)?;
    let k = cfg.top_k;
    let mut weights = Array2::<f32>::zeros((n_len, k));
    let mut ids = Array2::<usize>::zeros((n_len, k));
    for n in 0..n_len {
        let u: Vec<f32> = logits.row(n).to_vec();
        let sc = token_scores(&u, bias, cfg)?;
        // top-k over the selection scores
        let chosen = top_k_indices(&sc.selection, k);
        // weights from the unbiased affinities
        let mut w: Vec<f64> = chosen.iter().map(|&i| sc.affinity[i]).collect();
        if cfg.norm_topk_prob {
            let sum: f64 = w.iter().sum();
            for v in &mut w {
                *v /= sum;
            }
        }
        for j in 0..k {
            ids[[n, j]] = chosen[j];
            weights[[n, j]] = (w[j] * cfg.routed_scaling_factor) as f32;
        }
    }
    Ok(Routing { weights, ids })
}

/// The gradient of the router logits `u [N, E]` from `d topk_weights [N, K]`, the experts
/// `topk_ids [N, K]` having been selected (V3 eqs. (13)–(16) backwards; OFF `Gate.forward`):
///
/// - the weights `w_k = ρ · s_{i_k} / Σ_j s_{i_j}` (`norm_topk_prob`, ρ = `routed_scaling_factor`)
///   or `w_k = ρ · s_{i_k}`, so `∂L/∂s_{i_k} = ρ · (dw_k − Σ_j dw_j w_j / ρ) / Σ_j s_{i_j}`
///   (normalised) or `ρ · dw_k`, and 0 for experts no slot holds;
/// - sigmoid (eq. (15)): `du_e = ds_e · s_e (1 − s_e)`; softmax (V2):
///   `du_e = s_e · (ds_e − Σ_j s_j ds_j)`, over every expert.
///
/// The selection itself (the bias `b_i` of eq. (16), the group limit, top-k) has no gradient:
/// the bias only chooses which `s` enter. Shapes: `logits [N, E]`, `topk_ids [N, K]` (distinct
/// per row, in `0..E`), `d_topk_weights [N, K]` → `d_logits [N, E]`, in f64 (the caller rounds).
pub fn moe_gate_backward(
    logits: ArrayView2<f32>,
    topk_ids: ArrayView2<i64>,
    d_topk_weights: ArrayView2<f32>,
    cfg: &GateConfig,
) -> Result<Array2<f64>> {
    const OP: &str = "moe_gate_backward";
    let (n, e) = logits.dim();
    let k = topk_ids.ncols();
    if topk_ids.nrows() != n || d_topk_weights.dim() != (n, k) {
        return Err(Error::Shape {
            op: OP,
            tensor: "d_topk_weights",
            got: d_topk_weights.shape().to_vec(),
            expected: format!("{:?} (the shape of topk_ids, {n} rows)", topk_ids.shape()),
        });
    }
    let mut du = Array2::<f64>::zeros((n, e));
    for t in 0..n {
        let u: Vec<f64> = logits.row(t).iter().map(|&v| f64::from(v)).collect();
        let s: Vec<f64> = match cfg.scoring_func {
            ScoringFunc::Sigmoid => u.iter().map(|&v| 1.0 / (1.0 + (-v).exp())).collect(),
            ScoringFunc::Softmax => {
                let max = u.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let ex: Vec<f64> = u.iter().map(|&v| (v - max).exp()).collect();
                let sum: f64 = ex.iter().sum();
                ex.iter().map(|v| v / sum).collect()
            }
        };
        let mut ids = Vec::with_capacity(k);
        for j in 0..k {
            let id = topk_ids[[t, j]];
            if id < 0 || id as usize >= e || ids.contains(&(id as usize)) {
                return Err(Error::Value {
                    op: OP,
                    tensor: "topk_ids",
                    index: vec![t, j],
                    value: id.to_string(),
                    why: "expert ids must be distinct per token and in 0..E",
                });
            }
            ids.push(id as usize);
        }
        let rho = cfg.routed_scaling_factor;
        let dw = |j: usize| f64::from(d_topk_weights[[t, j]]);
        // ∂L/∂s for every expert (0 where no slot holds it)
        let mut ds = vec![0f64; e];
        if cfg.norm_topk_prob {
            let sum: f64 = ids.iter().map(|&i| s[i]).sum();
            let along: f64 = (0..k).map(|j| dw(j) * s[ids[j]]).sum::<f64>() / sum;
            for (j, &i) in ids.iter().enumerate() {
                ds[i] = rho * (dw(j) - along) / sum;
            }
        } else {
            for (j, &i) in ids.iter().enumerate() {
                ds[i] = rho * dw(j);
            }
        }
        match cfg.scoring_func {
            ScoringFunc::Sigmoid => {
                for i in 0..e {
                    du[[t, i]] = ds[i] * s[i] * (1.0 - s[i]);
                }
            }
            ScoringFunc::Softmax => {
                let along: f64 = (0..e).map(|i| s[i] * ds[i]).sum();
                for i in 0..e {
                    du[[t, i]] = s[i] * (ds[i] - along);
                }
            }
        }
    }
    Ok(du)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    fn v3_like(top_k: usize, n_group: usize, topk_group: usize) -> GateConfig {
        GateConfig {
            top_k,
            n_group,
            topk_group,
            scoring_func: ScoringFunc::Sigmoid,
            topk_method: TopkMethod::NoauxTc,
            norm_topk_prob: true,
            routed_scaling_factor: 2.5,
        }
    }

    fn logit(s: f64) -> f32 {
        (s / (1.0 - s)).ln() as f32
    }

    #[test]
    fn gate_bias_affects_selection_not_weights() {
        // 4 experts, top-2, no groups: affinities 0.9, 0.8, 0.3, 0.2; bias favours expert 3.
        let u: Vec<f32> = [0.9, 0.8, 0.3, 0.2].iter().map(|&s| logit(s)).collect();
        let logits = ndarray::Array2::from_shape_vec((1, 4), u).unwrap();
        let r = route(
            logits.view(),
            Some(&[0.0, 0.0, 0.0, 0.65]),
            &v3_like(2, 1, 1),
        )
        .unwrap();
        assert_eq!(r.ids.row(0).to_vec(), vec![0, 3]); // 0.9 and 0.2 + 0.65 = 0.85 > 0.8
        let w = r.weights.row(0);
        // weights from unbiased s: 0.9/1.1 · 2.5 and 0.2/1.1 · 2.5
        assert!((f64::from(w[0]) - 0.9 / 1.1 * 2.5).abs() < 1e-6);
        assert!((f64::from(w[1]) - 0.2 / 1.1 * 2.5).abs() < 1e-6);
    }

    #[test]
    fn groups_are_scored_by_their_top2_sum_and_the_rest_masked() {
        // 4 groups of 2. Group scores (top-2 sums): g0 0.9+0.1=1.0, g1 0.6+0.6=1.2,
        // g2 0.95+0.0=0.95, g3 0.5+0.5=1.0 (tie with g0: lower index wins).
        let s = [0.9, 0.1, 0.6, 0.6, 0.95, 0.01, 0.5, 0.5];
        let u: Vec<f32> = s.iter().map(|&v| logit(v)).collect();
        let sc = token_scores(&u, Some(&[0.0; 8]), &v3_like(2, 4, 2)).unwrap();
        assert_eq!(sc.kept_groups, vec![1, 0]);
        // expert 4 (0.95, the best single score) sits in a dropped group
        assert_eq!(sc.selection[4], f64::NEG_INFINITY);
        let logits = ndarray::Array2::from_shape_vec((1, 8), u).unwrap();
        let r = route(logits.view(), Some(&[0.0; 8]), &v3_like(2, 4, 2)).unwrap();
        assert_eq!(r.ids.row(0).to_vec(), vec![0, 2]);
    }

    #[test]
    fn group_limited_greedy_scores_groups_by_their_max() {
        let cfg = GateConfig {
            topk_method: TopkMethod::GroupLimitedGreedy,
            ..v3_like(1, 2, 1)
        };
        // group 0 max 0.7 (sum 1.3), group 1 max 0.8 (sum 0.9): max picks group 1
        let u: Vec<f32> = [0.7, 0.6, 0.8, 0.1].iter().map(|&v| logit(v)).collect();
        let sc = token_scores(&u, None, &cfg).unwrap();
        assert_eq!(sc.kept_groups, vec![1]);
    }

    #[test]
    fn softmax_without_normalisation_scales_probabilities() {
        let cfg = GateConfig {
            scoring_func: ScoringFunc::Softmax,
            topk_method: TopkMethod::Greedy,
            norm_topk_prob: false,
            routed_scaling_factor: 16.0,
            ..v3_like(1, 1, 1)
        };
        let r = route(array![[0.0f32, 2f32.ln()]].view(), None, &cfg).unwrap();
        assert_eq!(r.ids[[0, 0]], 1);
        assert!((f64::from(r.weights[[0, 0]]) - 16.0 * 2.0 / 3.0).abs() < 1e-5);
    }

    #[test]
    fn invalid_configs_name_the_field() {
        let e = v3_like(2, 3, 1).validate(8).unwrap_err().to_string();
        assert!(e.contains("n_group"), "{e}");
        let e = v3_like(2, 4, 5).validate(8).unwrap_err().to_string();
        assert!(e.contains("topk_group"), "{e}");
        let e = v3_like(5, 4, 2).validate(8).unwrap_err().to_string();
        assert!(e.contains("num_experts_per_tok"), "{e}");
        let e = v3_like(1, 8, 2).validate(8).unwrap_err().to_string();
        assert!(e.contains("top-2"), "{e}");
        let e = route(array![[0.0f32, 1.0]].view(), None, &v3_like(1, 1, 1))
            .unwrap_err()
            .to_string();
        assert!(e.contains("e_score_correction_bias"), "{e}");
    }

    /// Central differences of `L = Σ dw ⊙ w(u)` with the selection held, for both scoring
    /// functions, with and without normalisation.
    #[test]
    fn moe_gate_backward_is_the_gradient_by_central_differences() {
        let (n, e) = (2usize, 6usize);
        let logits = Array2::from_shape_fn((n, e), |(t, i)| ((t * e + i) as f32 * 0.9).sin() * 2.0);
        let ids = ndarray::array![[4i64, 1, 2], [0, 5, 3]];
        let dw = ndarray::array![[0.3f32, -1.1, 0.7], [2.0, 0.1, -0.4]];
        for scoring_func in [ScoringFunc::Sigmoid, ScoringFunc::Softmax] {
            for norm_topk_prob in [true, false] {
                let cfg = GateConfig {
                    top_k: 3,
                    n_group: 1,
                    topk_group: 1,
                    scoring_func,
                    topk_method: TopkMethod::Greedy,
                    norm_topk_prob,
                    routed_scaling_factor: 2.5,
                };
                let loss = |u: &Array2<f64>| {
                    let mut l = 0.0;
                    for t in 0..n {
                        let s: Vec<f64> = match scoring_func {
                            ScoringFunc::Sigmoid => {
                                u.row(t).iter().map(|v| 1.0 / (1.0 + (-v).exp())).collect()
                            }
                            ScoringFunc::Softmax => {
                                let z: f64 = u.row(t).iter().map(|v| v.exp()).sum();
                                u.row(t).iter().map(|v| v.exp() / z).collect()
                            }
                        };
                        let sum: f64 = ids.row(t).iter().map(|&i| s[i as usize]).sum();
                        for j in 0..3 {
                            let w =
                                s[ids[[t, j]] as usize] / if norm_topk_prob { sum } else { 1.0 };
                            l += f64::from(dw[[t, j]]) * 2.5 * w;
                        }
                    }
                    l
                };
                let du = moe_gate_backward(logits.view(), ids.view(), dw.view(), &cfg).unwrap();
                let u = logits.mapv(f64::from);
                let h = 1e-6;
                for t in 0..n {
                    for i in 0..e {
                        let (mut up, mut um) = (u.clone(), u.clone());
                        up[[t, i]] += h;
                        um[[t, i]] -= h;
                        let fd = (loss(&up) - loss(&um)) / (2.0 * h);
                        assert!(
                            (fd - du[[t, i]]).abs() < 1e-8,
                            "{scoring_func:?} norm {norm_topk_prob} [{t}, {i}]: {fd} vs {}",
                            du[[t, i]]
                        );
                    }
                }
            }
        }
    }
}
