//! `dsv3 eplb`: redundant-expert placement on synthetic skewed loads, GPU and node imbalance
//! (max/mean load) before and after.
//!
//! "Before": every expert once, experts placed contiguously (`E/num_gpus` per GPU, as plain EP
//! does). "After": [`rebalance_experts`] with `E + redundant` slots.

use dsv3_reference::moe::eplb::{
    gpu_loads, identity_placement, imbalance, rebalance_experts, Placement,
};

use crate::registry::error::{Error, Result};
use crate::registry::rng::Rng;
use crate::registry::table::Table;
use std::io::Write;

#[derive(Debug, Clone)]
pub struct EplbParams {
    /// Logical experts per layer.
    pub experts: usize,
    /// Redundant (extra) physical experts per layer.
    pub redundant: usize,
    /// Expert groups.
    pub groups: usize,
    /// Nodes (V3 prefill unit: 4).
    pub nodes: usize,
    /// GPUs (V3 prefill unit: 32).
    pub gpus: usize,
    /// MoE layers to simulate.
    pub layers: usize,
    /// σ of the log-normal expert loads.
    pub skew: f64,
    /// Seed of the random draws (the same seed gives the same run).
    pub seed: u64,
    /// Run the deepseek-ai/EPLB README example instead (12 experts, 16 slots, 4 groups, 2 nodes,
    /// 8 GPUs) and print its placement.
    pub example: bool,
}

impl Default for EplbParams {
    /// V3's prefill unit: 256 experts + 32 redundant in 8 groups on 4 nodes of 8 GPUs.
    fn default() -> Self {
        EplbParams {
            experts: 256,
            redundant: 32,
            groups: 8,
            nodes: 4,
            gpus: 32,
            layers: 4,
            skew: 1.0,
            seed: 0,
            example: false,
        }
    }
}

/// Imbalance of one layer.
#[derive(Debug, Clone)]
pub struct EplbRow {
    /// max/mean GPU load without redundancy (`None` when GPUs do not divide the experts).
    pub gpu_before: Option<f64>,
    pub gpu_after: f64,
    pub node_before: Option<f64>,
    pub node_after: f64,
    /// Replicas of the hottest expert.
    pub hottest_replicas: usize,
    pub placement: Placement,
}

fn node_loads(gpu: &[f64], nodes: usize) -> Vec<f64> {
    let per = gpu.len() / nodes;
    (0..nodes)
        .map(|n| gpu[n * per..(n + 1) * per].iter().sum())
        .collect()
}

/// Place one layer's loads and measure.
pub fn layer(
    weight: &[f64],
    slots: usize,
    groups: usize,
    nodes: usize,
    gpus: usize,
) -> Result<EplbRow> {
    let e = weight.len();
    let placement = rebalance_experts(weight, slots, groups, nodes, gpus)?;
    let after = gpu_loads(weight, &placement, gpus);
    let before = (e % gpus == 0).then(|| gpu_loads(weight, &identity_placement(e), gpus));
    let hottest = (0..e).fold(0, |h, i| if weight[i] > weight[h] { i } else { h });
    Ok(EplbRow {
        gpu_before: before.as_ref().map(|l| imbalance(l)),
        gpu_after: imbalance(&after),
        node_before: before.as_ref().map(|l| imbalance(&node_loads(l, nodes))),
        node_after: imbalance(&node_loads(&after, nodes)),
        hottest_replicas: placement.logcnt[hottest],
        placement,
    })
}

/// Log-normal loads `exp(σ z)·1000`, one row per layer.
pub fn synthetic_loads(layers: usize, experts: usize, skew: f64, seed: u64) -> Vec<Vec<f64>> {
    let mut rng = Rng::new(seed);
    (0..layers)
        .map(|_| {
            (0..experts)
                .map(|_| (rng.normal() * skew).exp() * 1000.0)
                .collect()
        })
        .collect()
}

/// The README example's loads.
pub const README_LOADS: [[f64; 12]; 2] = [
    [
        90., 132., 40., 61., 104., 165., 39., 4., 73., 56., 183., 86.,
    ],
    [
        20., 107., 104., 64., 19., 197., 187., 157., 172., 86., 16., 27.,
    ],
];

fn fmt(x: Option<f64>) -> String {
    x.map_or("n/a (GPUs ∤ experts)".into(), |v| format!("{v:.3}"))
}

/// `dsv3 eplb`: the run and its report, written to `out`.
pub fn report(a: &EplbParams, out: &mut dyn Write) -> Result<bool> {
    let (loads, slots, groups, nodes, gpus) = if a.example {
        (
            README_LOADS.iter().map(|r| r.to_vec()).collect::<Vec<_>>(),
            16,
            4,
            2,
            8,
        )
    } else {
        if !(a.skew >= 0.0 && a.skew.is_finite()) || a.layers == 0 {
            return Err(Error::Usage(
                "eplb: --skew must be a finite number ≥ 0 and --layers ≥ 1".into(),
            ));
        }
        // loads and placements per layer, about four f64/i64 per physical expert
        crate::registry::limits::ensure_elements(
            &format!(
                "eplb: --layers {} × (--experts {} + --redundant {})",
                a.layers, a.experts, a.redundant
            ),
            &[a.layers, a.experts.saturating_add(a.redundant), 4],
            8,
        )?;
        (
            synthetic_loads(a.layers, a.experts, a.skew, a.seed),
            a.experts + a.redundant,
            a.groups,
            a.nodes,
            a.gpus,
        )
    };
    let e = loads[0].len();
    let _ = writeln!(out,
        "eplb: {e} experts, {slots} physical slots ({} per GPU), {groups} groups, {nodes} nodes, {gpus} GPUs; {}",
        slots / gpus.max(1),
        if a.example { "deepseek-ai/EPLB README loads".to_string() } else { format!("log-normal loads σ = {}, seed {}", a.skew, a.seed) }
    );
    let mut t = Table::new(&[
        "layer",
        "GPU max/mean before",
        "GPU max/mean after",
        "node max/mean before",
        "node max/mean after",
        "hottest expert replicas",
    ]);
    for (l, w) in loads.iter().enumerate() {
        let r = layer(w, slots, groups, nodes, gpus)?;
        t.row(vec![
            l.to_string(),
            fmt(r.gpu_before),
            format!("{:.3}", r.gpu_after),
            fmt(r.node_before),
            format!("{:.3}", r.node_after),
            r.hottest_replicas.to_string(),
        ]);
        if a.example {
            let _ = writeln!(out, "layer {l} phy2log: {:?}", r.placement.phy2log);
        }
    }
    let _ = write!(out, "{}", t.render());
    Ok(true)
}
