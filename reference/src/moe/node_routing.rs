//! Which routed experts a token goes to: the selection of eq. (16) restricted to a few expert
//! groups (official code) or nodes (paper).
//!
//! Both functions return the selected experts of every token in descending order of the
//! *selection* score `s_{i,t} + b_i`; ties go to the lower expert index (and, for groups/nodes,
//! to the lower group index). The gate values (unbiased `s`, normalised, × route_scale) are not
//! computed here: this is a pure selection, so the model's MoE gate can call it.

use ndarray::{Array2, ArrayView1, ArrayView2};

use crate::error::{Error, Result};

/// The routing hyper-parameters of the selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoutingConfig {
    /// `K_r`: experts per token (8 in V3).
    pub top_k: usize,
    /// Expert groups; experts `[g·E/G, (g+1)·E/G)` form group `g` (8 in V3 = nodes of EP64).
    pub n_group: usize,
    /// Groups a token may use (`M` = 4 in V3).
    pub topk_group: usize,
    /// A group's score is the sum of its this-many highest selection scores. OFF hard-codes 2
    /// with a bias and uses the group max (= 1) without one; the paper's node-limited routing
    /// uses `K_r/M` (= 2 in V3).
    pub group_score_topk: usize,
}

impl RoutingConfig {
    /// DeepSeek-V3: 256 experts in 8 groups, 4 groups per token, top-8, group score = top-2 sum.
    pub const V3: RoutingConfig = RoutingConfig {
        top_k: 8,
        n_group: 8,
        topk_group: 4,
        group_score_topk: 2,
    };

    /// Plain top-k over all experts (eq. (14)/(16) without a group limit).
    pub fn plain(top_k: usize) -> Self {
        RoutingConfig {
            top_k,
            n_group: 1,
            topk_group: 1,
            group_score_topk: 1,
        }
    }

    /// Check the config against `n_experts`; `op` names the caller in the error.
    pub fn validate(&self, op: &'static str, n_experts: usize) -> Result<()> {
        let bad = |name: &'static str, value: usize, why: String| Error::Argument {
            op,
            name,
            value: value.to_string(),
            why,
        };
        if self.n_group == 0 || n_experts % self.n_group != 0 {
            return Err(bad(
                "n_group",
                self.n_group,
                format!("must divide the number of experts {n_experts}"),
            ));
        }
        let group_size = n_experts / self.n_group;
        if self.topk_group == 0 || self.topk_group > self.n_group {
            return Err(bad(
                "topk_group",
                self.topk_group,
                format!("must be in 1..={} (n_group)", self.n_group),
            ));
        }
        if self.group_score_topk == 0 || self.group_score_topk > group_size {
            return Err(bad(
                "group_score_topk",
                self.group_score_topk,
                format!("must be in 1..={group_size} (experts per group)"),
            ));
        }
        let reachable = self.topk_group * group_size;
        if self.top_k == 0 || self.top_k > reachable {
            return Err(bad(
                "top_k",
                self.top_k,
                format!(
                    "must be in 1..={reachable} (topk_group · experts per group); \
                     OFF would select −inf-masked experts beyond that"
                ),
            ));
        }
        Ok(())
    }
}

/// Indices of the `k` largest `values`, largest first; equal values keep index order (the lower
/// index wins a tie). Values must not be NaN (callers validate).
pub fn topk_desc(values: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    // stable sort: equal values stay in ascending index order
    idx.sort_by(|&a, &b| values[b].total_cmp(&values[a]));
    idx.truncate(k);
    idx
}

/// Shapes and finiteness of the routing inputs; returns `E`.
pub(crate) fn check_routing_inputs(
    op: &'static str,
    scores: ArrayView2<f32>,
    bias: Option<ArrayView1<f32>>,
) -> Result<usize> {
    let e = scores.ncols();
    if let Some(b) = bias {
        if b.len() != e {
            return Err(Error::Shape {
                op,
                tensor: "bias",
                got: vec![b.len()],
                expected: format!("[E] with E = {e} (the columns of scores)"),
            });
        }
        if let Some(i) = b.iter().position(|v| !v.is_finite()) {
            return Err(Error::Value {
                op,
                tensor: "bias",
                index: vec![i],
                value: b[i].to_string(),
                why: "routing needs finite biases",
            });
        }
    }
    if let Some(((t, i), v)) = scores.indexed_iter().find(|(_, v)| !v.is_finite()) {
        return Err(Error::Value {
            op,
            tensor: "scores",
            index: vec![t, i],
            value: v.to_string(),
            why: "routing needs finite affinities",
        });
    }
    Ok(e)
}

/// Eq. (16) with group-limited routing, as OFF `Gate.forward` steps 4–6 (HF `noaux_tc`).
///
/// Per token `t`: selection scores `s_{i,t} + b_i` (f32 add; `b = 0` without a bias); group score
/// = sum of the `group_score_topk` highest selection scores of the group, added largest first
/// in f32; keep the `topk_group` best groups; the `top_k` best experts of the kept groups.
///
/// Shapes: `scores: [T, E]` (sigmoid affinities `s`), `bias: [E]` → `[T, top_k]` expert ids.
pub fn group_limited_topk(
    scores: ArrayView2<f32>,
    bias: Option<ArrayView1<f32>>,
    cfg: &RoutingConfig,
) -> Result<Array2<usize>> {
    const OP: &str = "group_limited_topk";
    let e = check_routing_inputs(OP, scores, bias)?;
    cfg.validate(OP, e)?;
    let group_size = e / cfg.n_group;
    let mut out = Array2::zeros((scores.nrows(), cfg.top_k));
    for (t, s_t) in scores.outer_iter().enumerate() {
        // step 1: selection scores s + b (the bias only steers selection)
        let sel: Vec<f32> = (0..e)
            .map(|i| s_t[i] + bias.map_or(0.0, |b| b[i]))
            .collect();
        // step 2: group scores, the sum of the group's top `group_score_topk` selection scores
        let group_score: Vec<f32> = (0..cfg.n_group)
            .map(|g| {
                let members = &sel[g * group_size..(g + 1) * group_size];
                topk_desc(members, cfg.group_score_topk)
                    .iter()
                    .fold(0.0f32, |acc, &j| acc + members[j])
            })
            .collect();
        // step 3: keep the best `topk_group` groups, mask the others with −inf
        let kept = topk_desc(&group_score, cfg.topk_group);
        let masked: Vec<f32> = (0..e)
            .map(|i| {
                if kept.contains(&(i / group_size)) {
                    sel[i]
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
        // step 4: top-k experts over the kept groups
        for (slot, i) in topk_desc(&masked, cfg.top_k).into_iter().enumerate() {
            out[[t, slot]] = i;
        }
    }
    Ok(out)
}

/// V3 §2.1.2 node-limited routing: the routed experts are spread uniformly over `n_nodes`
/// nodes (expert `i` on node `i / (E/n_nodes)`); a token is sent to at most `max_nodes` (`M`)
/// nodes, chosen by "the sum of the highest `K_r/M` affinity scores of the experts distributed
/// on each node", then to its `K_r` best experts on those nodes.
///
/// Written the way the paper says it (rank the nodes, then walk all experts best first and take
/// those on chosen nodes) rather than as a mask, so that the test comparing it with
/// [`group_limited_topk`] compares two algorithms. It equals group-limited routing with
/// `n_group = n_nodes`, `topk_group = M`, `group_score_topk = K_r/M` (V3: 8, 4, 2 = OFF's
/// hard-coded top-2).
///
/// Affinities are the selection scores `s + b`: the paper does not say whether node selection
/// sees the bias; OFF adds it.
///
/// Shapes: `scores: [T, E]`, `bias: [E]` → `[T, top_k]`. `M` must divide `K_r`.
pub fn node_limited_topk(
    scores: ArrayView2<f32>,
    bias: Option<ArrayView1<f32>>,
    top_k: usize,
    n_nodes: usize,
    max_nodes: usize,
) -> Result<Array2<usize>> {
    const OP: &str = "node_limited_topk";
    let e = check_routing_inputs(OP, scores, bias)?;
    if max_nodes == 0 || top_k % max_nodes != 0 {
        return Err(Error::Argument {
            op: OP,
            name: "max_nodes",
            value: max_nodes.to_string(),
            why: format!("M must divide K_r = {top_k}: a node scores by its top K_r/M affinities"),
        });
    }
    let cfg = RoutingConfig {
        top_k,
        n_group: n_nodes,
        topk_group: max_nodes,
        group_score_topk: top_k / max_nodes,
    };
    cfg.validate(OP, e)?;
    let per_node = e / n_nodes;
    let mut out = Array2::zeros((scores.nrows(), top_k));
    for (t, s_t) in scores.outer_iter().enumerate() {
        // pass 1: affinity of every expert, s + b
        let aff: Vec<f32> = (0..e)
            .map(|i| s_t[i] + bias.map_or(0.0, |b| b[i]))
            .collect();
        // pass 2: every expert, best first (ties: lower id)
        let order = topk_desc(&aff, e);
        // pass 3: node affinity = sum of its K_r/M best experts, met in that order
        let mut node_aff = vec![0.0f32; n_nodes];
        let mut counted = vec![0usize; n_nodes];
        for &i in &order {
            let n = i / per_node;
            if counted[n] < cfg.group_score_topk {
                node_aff[n] += aff[i];
                counted[n] += 1;
            }
        }
        // pass 4: the M nodes with the highest affinity
        let nodes = topk_desc(&node_aff, max_nodes);
        // pass 5: the K_r best experts living on those nodes
        let mut slot = 0;
        for &i in &order {
            if slot == top_k {
                break;
            }
            if nodes.contains(&(i / per_node)) {
                out[[t, slot]] = i;
                slot += 1;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use ndarray::{array, Array1};

    fn random_scores(rng: &mut Rng, t: usize, e: usize) -> Array2<f32> {
        Array2::from_shape_fn((t, e), |_| (1.0 / (1.0 + (-rng.normal()).exp())) as f32)
    }

    #[test]
    fn topk_desc_breaks_ties_by_lower_index() {
        assert_eq!(topk_desc(&[0.5, 0.9, 0.5, 0.9, 0.1], 3), vec![1, 3, 0]);
        assert_eq!(topk_desc(&[1.0, f32::NEG_INFINITY, 2.0], 3), vec![2, 0, 1]);
    }

    #[test]
    fn group_limit_excludes_experts_of_weak_groups() {
        // 2 groups of 3; group 0 holds the single best expert but group 1 has the best top-2
        // sum: 0.9 + 0.1 = 1.0 < 0.6 + 0.6 = 1.2, so with one group the 0.9 is not reachable.
        let s = array![[0.9f32, 0.1, 0.0, 0.6, 0.6, 0.5]];
        let cfg = RoutingConfig {
            top_k: 2,
            n_group: 2,
            topk_group: 1,
            group_score_topk: 2,
        };
        assert_eq!(
            group_limited_topk(s.view(), None, &cfg).unwrap(),
            array![[3, 4]]
        );
        // with the group max as the score (OFF without bias) group 0 wins
        let max_cfg = RoutingConfig {
            group_score_topk: 1,
            ..cfg
        };
        assert_eq!(
            group_limited_topk(s.view(), None, &max_cfg).unwrap(),
            array![[0, 1]]
        );
    }

    #[test]
    fn bias_changes_selection_only_through_s_plus_b() {
        let s = array![[0.5f32, 0.4, 0.3]];
        let b = Array1::from(vec![0.0f32, 0.0, 0.25]);
        let cfg = RoutingConfig::plain(1);
        assert_eq!(
            group_limited_topk(s.view(), None, &cfg).unwrap(),
            array![[0]]
        );
        // 0.3 + 0.25 = 0.55 > 0.5
        assert_eq!(
            group_limited_topk(s.view(), Some(b.view()), &cfg).unwrap(),
            array![[2]]
        );
    }

    #[test]
    fn node_limited_equals_group_limited_with_groups_as_nodes() {
        let mut rng = Rng::new(11);
        // (E, K_r, nodes, M): V3-like and a few other divisible shapes
        for &(e, k, nodes, m) in &[
            (64, 8, 8, 4),
            (256, 8, 8, 4),
            (48, 6, 6, 3),
            (32, 4, 4, 2),
            (16, 4, 4, 4),
            (24, 3, 3, 1),
        ] {
            let s = random_scores(&mut rng, 40, e);
            let b = Array1::from_shape_fn(e, |_| (rng.normal() * 0.05) as f32);
            let node = node_limited_topk(s.view(), Some(b.view()), k, nodes, m).unwrap();
            let cfg = RoutingConfig {
                top_k: k,
                n_group: nodes,
                topk_group: m,
                group_score_topk: k / m,
            };
            let group = group_limited_topk(s.view(), Some(b.view()), &cfg).unwrap();
            assert_eq!(node, group, "E={e} K={k} nodes={nodes} M={m}");
            // at most M distinct nodes per token
            for row in node.outer_iter() {
                let mut used: Vec<usize> = row.iter().map(|&i| i / (e / nodes)).collect();
                used.sort();
                used.dedup();
                assert!(used.len() <= m);
            }
        }
    }

    #[test]
    fn node_limited_equals_group_limited_on_exact_ties() {
        // scores on a coarse grid: many exact ties, both must resolve them the same way
        let mut rng = Rng::new(5);
        let s = Array2::from_shape_fn((200, 32), |_| rng.range(0, 4) as f32 * 0.25);
        let node = node_limited_topk(s.view(), None, 4, 4, 2).unwrap();
        let cfg = RoutingConfig {
            top_k: 4,
            n_group: 4,
            topk_group: 2,
            group_score_topk: 2,
        };
        assert_eq!(node, group_limited_topk(s.view(), None, &cfg).unwrap());
    }

    #[test]
    fn v3_node_score_is_offs_top2() {
        let c = RoutingConfig::V3;
        assert_eq!(c.top_k / c.topk_group, c.group_score_topk);
    }

    #[test]
    fn errors_name_the_culprit() {
        let s = Array2::<f32>::zeros((2, 12));
        let e = group_limited_topk(
            s.view(),
            None,
            &RoutingConfig {
                top_k: 2,
                n_group: 5,
                topk_group: 1,
                group_score_topk: 1,
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("n_group"), "{e}");
        let e = group_limited_topk(
            s.view(),
            None,
            &RoutingConfig {
                top_k: 7,
                n_group: 4,
                topk_group: 2,
                group_score_topk: 1,
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("top_k = 7"), "{e}");
        let e = node_limited_topk(s.view(), None, 4, 4, 3).unwrap_err();
        assert!(e.to_string().contains("max_nodes"), "{e}");
        let mut bad = s.clone();
        bad[[1, 3]] = f32::NAN;
        let e = group_limited_topk(bad.view(), None, &RoutingConfig::plain(2)).unwrap_err();
        assert!(
            matches!(e, Error::Value { ref index, .. } if index == &vec![1, 3]),
            "{e}"
        );
        let b = Array1::<f32>::zeros(5);
        let e = group_limited_topk(s.view(), Some(b.view()), &RoutingConfig::plain(2)).unwrap_err();
        assert!(e.to_string().contains("bias"), "{e}");
    }
}
