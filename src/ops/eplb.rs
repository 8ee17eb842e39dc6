//! `eplb`: redundant-expert replication and placement (deepseek-ai/EPLB `rebalance_experts`).

use dsv3_reference::moe::eplb;

use super::gen_fits;
use super::{get, outputs};
use crate::registry::compare::Policy;
use crate::registry::config::{ceil, Config, ConfigSchema, FieldKind};
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
    /// `eplb`'s config (deepseek-ai/EPLB `rebalance_experts`' arguments).
    pub struct EplbConfig {
        num_replicas: usize = "288", COUNT, "physical experts P (V3 prefill: 256 + 32 redundant)";
        num_groups: usize = "8", COUNT, "expert groups";
        num_nodes: usize = "4", COUNT, "server nodes (V3 prefill unit: 4)";
        num_gpus: usize = "32", COUNT, "GPUs, a multiple of num_nodes (V3 prefill unit: 32)";
    }
}

/// `num_replicas`, the width of the placement outputs.
const NUM_REPLICAS: Param = Param {
    name: "num_replicas",
    get: |c| c.get::<EplbConfig>().num_replicas,
};

pub static EPLB: OpEntry = OpEntry {
    name: "eplb",
    source: "V3 §3.4.1 redundant experts; deepseek-ai/EPLB eplb.py rebalance_experts (d52c72d)",
    summary: "per layer: pack groups onto nodes (balanced), replicate the heaviest load/replica within each node, pack replicas onto GPUs; global policy (1 group, 1 node) when nodes ∤ groups",
    inputs: &[TensorSpec {
        name: "weight",
        dtypes: &[DType::F32, DType::F64, DType::I32, DType::I64],
        shape: &[Dim::Var("L"), Dim::Var("E")],
        doc: "estimated load of each logical expert, per MoE layer",
    }],
    outputs: &[
        TensorSpec { name: "phy2log", dtypes: &[DType::I64], shape: &[Dim::Var("L"), Dim::Field(NUM_REPLICAS)], doc: "logical expert of each physical slot (slot s on GPU s / (P/num_gpus))" },
        TensorSpec { name: "phyrank", dtypes: &[DType::I64], shape: &[Dim::Var("L"), Dim::Field(NUM_REPLICAS)], doc: "replica index of each slot" },
        TensorSpec { name: "logcnt", dtypes: &[DType::I64], shape: &[Dim::Var("L"), Dim::Var("E")], doc: "replicas per logical expert" },
    ],
    constraints: &[Constraint::NonEmpty("E", "logical experts to replicate")],
    config: ConfigSchema::of::<EplbConfig>(),
    adapt: None,
    reference: eplb_ref,
    reference_fn: "reference/src/moe/eplb.rs::rebalance_experts",
    gpu: &[],
    policy: eplb_policy,
    policy_doc: "exact: a deterministic greedy algorithm with fixed tie rules (stable heaviest-first order, lowest pack / expert index on ties)",
    generate: eplb_gen,
    test_configs: &[
        r#"{"num_replicas":16,"num_groups":4,"num_nodes":2,"num_gpus":8}"#,
        r#"{"num_replicas":16,"num_groups":3,"num_nodes":2,"num_gpus":4}"#,
    ],
    v3_sizes: &[&[("L", 4), ("E", 256)]],
};

fn eplb_ref(inputs: &TensorMap, cfg: &Config) -> Result<TensorMap> {
    let w = get(inputs, "weight");
    let (layers, e) = (w.shape[0], w.shape[1]);
    let all = w.values();
    let cfg = cfg.get::<EplbConfig>();
    let p = cfg.num_replicas;
    let (mut phy2log, mut phyrank, mut logcnt) = (Vec::new(), Vec::new(), Vec::new());
    for l in 0..layers {
        let placement = eplb::rebalance_experts(
            &all[l * e..(l + 1) * e],
            p,
            cfg.num_groups,
            cfg.num_nodes,
            cfg.num_gpus,
        )?;
        phy2log.extend(placement.phy2log.iter().map(|&i| i as i64));
        phyrank.extend(placement.phyrank.iter().map(|&i| i as i64));
        logcnt.extend(placement.logcnt.iter().map(|&i| i as i64));
    }
    Ok(outputs([
        ("phy2log", Tensor::from_i64(vec![layers, p], &phy2log)),
        ("phyrank", Tensor::from_i64(vec![layers, p], &phyrank)),
        ("logcnt", Tensor::from_i64(vec![layers, e], &logcnt)),
    ]))
}

fn eplb_policy<'a>(_: &PolicyCtx<'a>) -> Policy<'a> {
    Policy::Exact
}

/// Loads for a config: `E` a multiple of `num_groups` (and of `num_nodes`), at most
/// `num_replicas`; log-normal loads, sometimes integer token counts.
fn eplb_gen(rng: &mut Rng, cfg: &Config, sizes: &Sizes) -> Result<TensorMap> {
    let cfg = cfg.get::<EplbConfig>();
    let (p, groups, nodes) = (cfg.num_replicas, cfg.num_groups, cfg.num_nodes);
    // the global policy ignores groups and nodes: any E multiple of num_groups works
    let unit = if groups % nodes == 0 {
        groups
    } else {
        groups * nodes / gcd(groups, nodes)
    };
    let layers = sizes.get("L").copied().unwrap_or_else(|| rng.range(1, 3));
    let e = sizes
        .get("E")
        .copied()
        .unwrap_or_else(|| unit * rng.range(1, (p / unit).max(1)));
    gen_fits(&[&[layers, e]])?;
    let loads: Vec<f64> = (0..layers * e)
        .map(|_| (rng.normal() * 1.2).exp() * 100.0)
        .collect();
    let t = if rng.chance(0.5) {
        let ints: Vec<i64> = loads.iter().map(|&x| x.round() as i64).collect();
        Tensor::from_i64(vec![layers, e], &ints)
    } else {
        Tensor::from_f32(
            vec![layers, e],
            &loads.iter().map(|&x| x as f32).collect::<Vec<_>>(),
        )
    };
    Ok(outputs([("weight", t)]))
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}
