//! Redundant experts for inference (V3 §3.4.1: "we introduce a deployment strategy of redundant
//! experts, which duplicates high-load experts and deploys them redundantly"), placed the way the
//! open-sourced load balancer deepseek-ai/EPLB (`eplb.py`, `d52c72d`) does it.
//!
//! Hierarchical policy (when the node count divides the group count), per MoE layer:
//! 1. pack the expert groups onto nodes so node loads are balanced (each node gets G/N groups);
//! 2. within each node, add replicas one at a time to the expert with the largest load per
//!    replica, until the node has P/N physical slots;
//! 3. pack each node's replicas (load = expert load / replica count) onto its GPUs, P/M each.
//!
//! Global policy (otherwise): the same with one group and one node (EPLB since `e1100fe`).
//!
//! Tie rules (torch's unstable sort leaves them open in EPLB; we fix them): items are sorted by
//! load, heaviest first, equal loads in index order; an item goes to the lightest pack that has
//! room, equal packs → the lowest pack index; a replica goes to the expert with the largest
//! load/count, equal → the lowest index. Loads are f64 (EPLB uses f32).

use crate::error::{Error, Result};

/// The placement of one layer's experts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    /// `[P]`: the logical expert held by each physical slot; slot `s` lives on GPU
    /// `s / (P/num_gpus)`, node `s / (P/num_nodes)`.
    pub phy2log: Vec<usize>,
    /// `[P]`: which replica of its expert each slot holds (0 = the original, in creation order).
    pub phyrank: Vec<usize>,
    /// `[E]`: replicas per logical expert (≥ 1, sums to `P`).
    pub logcnt: Vec<usize>,
}

/// EPLB `balanced_packing`: pack `weights.len()` items into `num_packs` packs of exactly
/// `n/num_packs` items each, heaviest item first into the lightest pack with room.
/// Returns `(pack of each item, rank of the item inside its pack)`. With one item per pack the
/// mapping is the identity (as EPLB).
pub fn balanced_packing(weights: &[f64], num_packs: usize) -> (Vec<usize>, Vec<usize>) {
    let n = weights.len();
    let per_pack = n / num_packs;
    if per_pack == 1 {
        return ((0..n).collect(), vec![0; n]);
    }
    // items heaviest first; equal loads keep index order (stable sort)
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| weights[b].total_cmp(&weights[a]));
    let mut pack_weight = vec![0.0f64; num_packs];
    let mut pack_items = vec![0usize; num_packs];
    let mut pack_of = vec![0usize; n];
    let mut rank_of = vec![0usize; n];
    for item in order {
        // the lightest pack with room; ties → lowest pack index
        let mut best: Option<usize> = None;
        for p in 0..num_packs {
            if pack_items[p] < per_pack && best.is_none_or(|b| pack_weight[p] < pack_weight[b]) {
                best = Some(p);
            }
        }
        let p = best.expect("n = per_pack · num_packs leaves room for every item");
        pack_of[item] = p;
        rank_of[item] = pack_items[p];
        pack_weight[p] += weights[item];
        pack_items[p] += 1;
    }
    (pack_of, rank_of)
}

/// EPLB `replicate_experts`: `num_phy − E` extra replicas, each for the expert with the largest
/// load per replica. Returns `(phy2log, phyrank, logcnt)`; slots `0..E` are the originals.
pub fn replicate_experts(weights: &[f64], num_phy: usize) -> (Vec<usize>, Vec<usize>, Vec<usize>) {
    let n_log = weights.len();
    let mut phy2log: Vec<usize> = (0..n_log).collect();
    let mut phyrank = vec![0usize; n_log];
    let mut logcnt = vec![1usize; n_log];
    for _ in n_log..num_phy {
        // the expert with the largest load per replica; ties → lowest index
        let mut best = 0;
        for i in 1..n_log {
            if weights[i] / logcnt[i] as f64 > weights[best] / logcnt[best] as f64 {
                best = i;
            }
        }
        phy2log.push(best);
        phyrank.push(logcnt[best]);
        logcnt[best] += 1;
    }
    (phy2log, phyrank, logcnt)
}

fn arg(name: &'static str, value: usize, why: String) -> Error {
    Error::Argument {
        op: "rebalance_experts",
        name,
        value: value.to_string(),
        why,
    }
}

/// EPLB `rebalance_experts` for one layer: hierarchical when `num_nodes` divides `num_groups`,
/// global otherwise.
///
/// Shapes: `weight: [E]` estimated load per logical expert (finite, ≥ 0) → [`Placement`] with
/// `P = num_replicas` slots. Requirements (EPLB's asserts): `num_groups | E`,
/// `num_nodes | num_gpus`, `num_gpus | P`, `P ≥ E`, and for the hierarchical policy
/// `num_nodes | num_groups` and every node holding at least as many slots as experts.
pub fn rebalance_experts(
    weight: &[f64],
    num_replicas: usize,
    num_groups: usize,
    num_nodes: usize,
    num_gpus: usize,
) -> Result<Placement> {
    let e = weight.len();
    if let Some(i) = weight.iter().position(|w| !(w.is_finite() && *w >= 0.0)) {
        return Err(Error::Value {
            op: "rebalance_experts",
            tensor: "weight",
            index: vec![i],
            value: weight[i].to_string(),
            why: "expert loads must be finite and ≥ 0",
        });
    }
    if num_groups == 0 || e == 0 || e % num_groups != 0 {
        return Err(arg(
            "num_groups",
            num_groups,
            format!("must divide the expert count {e}"),
        ));
    }
    if num_nodes == 0 || num_gpus == 0 || num_gpus % num_nodes != 0 {
        return Err(arg(
            "num_gpus",
            num_gpus,
            format!("must be a positive multiple of num_nodes = {num_nodes}"),
        ));
    }
    if num_replicas < e || num_replicas % num_gpus != 0 {
        return Err(arg(
            "num_replicas",
            num_replicas,
            format!("must be ≥ the expert count {e} and a multiple of num_gpus = {num_gpus}"),
        ));
    }
    // the global policy is the hierarchical one with a single group on a single node
    let (groups, nodes) = if num_groups % num_nodes == 0 {
        (num_groups, num_nodes)
    } else {
        (1, 1)
    };
    if num_replicas / nodes < e / nodes {
        return Err(arg(
            "num_replicas",
            num_replicas,
            "fewer slots per node than experts per node".into(),
        ));
    }
    Ok(hierarchical(weight, num_replicas, groups, nodes, num_gpus))
}

/// EPLB `rebalance_experts_hierarchical` for one layer (arguments validated).
fn hierarchical(
    weight: &[f64],
    num_phy: usize,
    groups: usize,
    nodes: usize,
    gpus: usize,
) -> Placement {
    let e = weight.len();
    let group_size = e / groups;
    let groups_per_node = groups / nodes;
    let log_per_node = e / nodes;
    let phy_per_node = num_phy / nodes;
    let phy_per_gpu = num_phy / gpus;
    let gpus_per_node = gpus / nodes;

    // step 1: pack groups onto nodes by group load; renumber experts node-major ("mlog"):
    // mlog = (node · groups_per_node + rank of the group in its node) · group_size + offset
    let group_load: Vec<f64> = (0..groups)
        .map(|g| weight[g * group_size..(g + 1) * group_size].iter().sum())
        .collect();
    let (group_node, group_rank) = balanced_packing(&group_load, nodes);
    let mut mlog2log = vec![0usize; e];
    for i in 0..e {
        let g = i / group_size;
        let mlog = (group_node[g] * groups_per_node + group_rank[g]) * group_size + i % group_size;
        mlog2log[mlog] = i;
    }

    let mut placement = Placement {
        phy2log: vec![0; num_phy],
        phyrank: vec![0; num_phy],
        logcnt: vec![0; e],
    };
    for node in 0..nodes {
        // step 2: replicate the node's experts into its phy_per_node slots
        let local: Vec<f64> = (0..log_per_node)
            .map(|j| weight[mlog2log[node * log_per_node + j]])
            .collect();
        let (phy2mlog, phyrank, mlogcnt) = replicate_experts(&local, phy_per_node);
        // step 3: pack the node's replicas onto its GPUs by load per replica
        let replica_load: Vec<f64> = phy2mlog
            .iter()
            .map(|&j| local[j] / mlogcnt[j] as f64)
            .collect();
        let (gpu_of, rank_on_gpu) = balanced_packing(&replica_load, gpus_per_node);
        for (r, &j) in phy2mlog.iter().enumerate() {
            // slot = node's first slot + GPU within node · slots per GPU + rank on that GPU
            let slot = node * phy_per_node + gpu_of[r] * phy_per_gpu + rank_on_gpu[r];
            let log = mlog2log[node * log_per_node + j];
            placement.phy2log[slot] = log;
            placement.phyrank[slot] = phyrank[r];
        }
        for (j, &c) in mlogcnt.iter().enumerate() {
            placement.logcnt[mlog2log[node * log_per_node + j]] = c;
        }
    }
    placement
}

/// Load of each GPU: every slot carries its expert's load divided by the expert's replica count
/// (tokens are spread evenly over replicas). Shapes: `weight: [E]` → `[num_gpus]`.
pub fn gpu_loads(weight: &[f64], placement: &Placement, num_gpus: usize) -> Vec<f64> {
    let per_gpu = placement.phy2log.len() / num_gpus;
    let mut loads = vec![0.0f64; num_gpus];
    for (slot, &i) in placement.phy2log.iter().enumerate() {
        loads[slot / per_gpu] += weight[i] / placement.logcnt[i] as f64;
    }
    loads
}

/// The placement without redundancy: expert `i` on GPU `i / (E/num_gpus)` (requires
/// `num_gpus | E`).
pub fn identity_placement(n_experts: usize) -> Placement {
    Placement {
        phy2log: (0..n_experts).collect(),
        phyrank: vec![0; n_experts],
        logcnt: vec![1; n_experts],
    }
}

/// `max / mean` of the loads (1 = perfectly balanced).
pub fn imbalance(loads: &[f64]) -> f64 {
    let mean = loads.iter().sum::<f64>() / loads.len() as f64;
    loads.iter().copied().fold(0.0, f64::max) / mean
}

#[cfg(test)]
mod tests {
    use super::*;

    /// deepseek-ai/EPLB README: 2 layers, 12 experts, 16 replicas, 4 groups, 2 nodes, 8 GPUs.
    #[test]
    fn eplb_readme_example_reproduces() {
        let weights: [[f64; 12]; 2] = [
            [
                90., 132., 40., 61., 104., 165., 39., 4., 73., 56., 183., 86.,
            ],
            [
                20., 107., 104., 64., 19., 197., 187., 157., 172., 86., 16., 27.,
            ],
        ];
        let want = [
            [5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
            [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1],
        ];
        for (w, want) in weights.iter().zip(want) {
            let p = rebalance_experts(w, 16, 4, 2, 8).unwrap();
            assert_eq!(p.phy2log, want.to_vec());
            assert_eq!(p.logcnt.iter().sum::<usize>(), 16);
            // replica ranks of each expert are 0..count
            for (i, &c) in p.logcnt.iter().enumerate() {
                let mut ranks: Vec<usize> = (0..16)
                    .filter(|&s| p.phy2log[s] == i)
                    .map(|s| p.phyrank[s])
                    .collect();
                ranks.sort();
                assert_eq!(ranks, (0..c).collect::<Vec<_>>(), "expert {i}");
            }
        }
    }

    #[test]
    fn packing_is_greedy_heaviest_first() {
        // loads 5,4,3,2 into 2 packs of 2: 5→A, 4→B, 3→B (4 < 5), 2→A
        let (pack, rank) = balanced_packing(&[3.0, 5.0, 2.0, 4.0], 2);
        assert_eq!(pack, vec![1, 0, 0, 1]);
        assert_eq!(rank, vec![1, 0, 1, 0]);
    }

    #[test]
    fn replication_goes_to_the_largest_load_per_replica() {
        // 10, 4, 3: 10→ replica (5), then 5 vs 4 → 10 again (3.33), then 4
        let (phy2log, rank, cnt) = replicate_experts(&[10.0, 4.0, 3.0], 6);
        assert_eq!(phy2log, vec![0, 1, 2, 0, 0, 1]);
        assert_eq!(rank, vec![0, 0, 0, 1, 2, 1]);
        assert_eq!(cnt, vec![3, 2, 1]);
    }

    #[test]
    fn redundancy_lowers_the_max_gpu_load() {
        let mut rng = crate::rng::Rng::new(4);
        let w: Vec<f64> = (0..64).map(|_| (rng.normal() * 1.0).exp()).collect();
        let before = imbalance(&gpu_loads(&w, &identity_placement(64), 16));
        let p = rebalance_experts(&w, 80, 8, 2, 16).unwrap();
        let after = imbalance(&gpu_loads(&w, &p, 16));
        assert!(after < before, "{after} vs {before}");
        // lower bound: no placement beats the mean, nor the heaviest single replica
        assert!(after >= 1.0);
    }

    #[test]
    fn global_policy_when_nodes_do_not_divide_groups() {
        let w: Vec<f64> = (0..12).map(|i| (i * 7 % 5) as f64 + 1.0).collect();
        let p = rebalance_experts(&w, 16, 3, 2, 4).unwrap();
        assert_eq!(p.logcnt.iter().sum::<usize>(), 16);
        // 1 group, 1 node: same as the hierarchical policy with those arguments
        assert_eq!(p, rebalance_experts(&w, 16, 1, 1, 4).unwrap());
    }

    #[test]
    fn bad_arguments_are_refused() {
        let w = vec![1.0; 12];
        assert!(rebalance_experts(&w, 16, 5, 2, 8)
            .unwrap_err()
            .to_string()
            .contains("num_groups"));
        assert!(rebalance_experts(&w, 14, 4, 2, 8)
            .unwrap_err()
            .to_string()
            .contains("num_replicas"));
        assert!(rebalance_experts(&w, 16, 4, 3, 8)
            .unwrap_err()
            .to_string()
            .contains("num_gpus"));
        let mut w = w;
        w[3] = f64::NAN;
        assert!(rebalance_experts(&w, 16, 4, 2, 8)
            .unwrap_err()
            .to_string()
            .contains("weight"));
    }
}
