//! The training-side simulators: `balance-sim`, `eplb`, `schedule`, `adamw-drift`. Their
//! flags map one to one onto the library's parameter structs (`dsv3::studies`), whose defaults
//! they show.

use std::path::PathBuf;

use dsv3::studies::adamw_drift::{self, AdamwDriftParams};
use dsv3::studies::balance_sim::{self, BalanceSimParams};
use dsv3::studies::eplb::{self, EplbParams};
use dsv3::studies::schedule::{self, ScheduleKind, ScheduleParams};
use dsv3::Result;

#[derive(clap::Args)]
pub struct BalanceSimArgs {
    /// Routed experts E (a multiple of --nodes).
    #[arg(long, default_value_t = BalanceSimParams::default().experts)]
    experts: usize,
    /// Experts per token K_r.
    #[arg(long, default_value_t = BalanceSimParams::default().top_k)]
    top_k: usize,
    /// Nodes the experts are spread over.
    #[arg(long, default_value_t = BalanceSimParams::default().nodes)]
    nodes: usize,
    /// Nodes per token M (divides top_k).
    #[arg(long, default_value_t = BalanceSimParams::default().max_nodes)]
    max_nodes: usize,
    /// Tokens per training step.
    #[arg(long, default_value_t = BalanceSimParams::default().tokens)]
    tokens: usize,
    /// Training steps.
    #[arg(long, default_value_t = BalanceSimParams::default().steps)]
    steps: usize,
    /// Bias update speed γ (V3: 0.001).
    #[arg(long, default_value_t = BalanceSimParams::default().gamma)]
    gamma: f64,
    /// Standard deviation of the experts' popularity offsets (in logits).
    #[arg(long, default_value_t = BalanceSimParams::default().skew)]
    skew: f64,
    /// Seed of the random draws (the same seed gives the same run).
    #[arg(long, default_value_t = BalanceSimParams::default().seed)]
    seed: u64,
    /// Write the max/mean-load curves as an SVG image here.
    #[arg(long)]
    svg: Option<PathBuf>,
}

pub fn balance_sim(a: BalanceSimArgs) -> Result<bool> {
    let p = BalanceSimParams {
        experts: a.experts,
        top_k: a.top_k,
        nodes: a.nodes,
        max_nodes: a.max_nodes,
        tokens: a.tokens,
        steps: a.steps,
        gamma: a.gamma,
        skew: a.skew,
        seed: a.seed,
        svg: a.svg,
    };
    balance_sim::report(&p, &mut std::io::stdout())
}

#[derive(clap::Args)]
pub struct EplbArgs {
    /// Logical experts per layer.
    #[arg(long, default_value_t = EplbParams::default().experts)]
    experts: usize,
    /// Redundant (extra) physical experts per layer.
    #[arg(long, default_value_t = EplbParams::default().redundant)]
    redundant: usize,
    /// Expert groups.
    #[arg(long, default_value_t = EplbParams::default().groups)]
    groups: usize,
    /// Nodes (V3 prefill unit: 4).
    #[arg(long, default_value_t = EplbParams::default().nodes)]
    nodes: usize,
    /// GPUs (V3 prefill unit: 32).
    #[arg(long, default_value_t = EplbParams::default().gpus)]
    gpus: usize,
    /// MoE layers to simulate.
    #[arg(long, default_value_t = EplbParams::default().layers)]
    layers: usize,
    /// σ of the log-normal expert loads.
    #[arg(long, default_value_t = EplbParams::default().skew)]
    skew: f64,
    /// Seed of the random draws (the same seed gives the same run).
    #[arg(long, default_value_t = EplbParams::default().seed)]
    seed: u64,
    /// Run the deepseek-ai/EPLB README example instead (12 experts, 16 slots, 4 groups, 2 nodes,
    /// 8 GPUs) and print its placement.
    #[arg(long)]
    example: bool,
}

pub fn eplb(a: EplbArgs) -> Result<bool> {
    let p = EplbParams {
        experts: a.experts,
        redundant: a.redundant,
        groups: a.groups,
        nodes: a.nodes,
        gpus: a.gpus,
        layers: a.layers,
        skew: a.skew,
        seed: a.seed,
        example: a.example,
    };
    eplb::report(&p, &mut std::io::stdout())
}

#[derive(clap::Args)]
pub struct ScheduleArgs {
    /// The schedule to simulate, or `table` for the bubble/memory table of all three.
    #[arg(value_parser = super::choice::<ScheduleKind>())]
    kind: ScheduleKind,
    /// Pipeline ranks PP.
    #[arg(long, default_value_t = ScheduleParams::default().pp)]
    pp: usize,
    /// Micro-batches (DualPipe: both directions together).
    #[arg(long, default_value_t = ScheduleParams::default().micro)]
    micro: usize,
    /// Forward chunk time F.
    #[arg(long, default_value_t = ScheduleParams::default().f)]
    f: f64,
    /// Full backward chunk time B (input + weights).
    #[arg(long, default_value_t = ScheduleParams::default().b)]
    b: f64,
    /// Backward-for-weights time W (part of B).
    #[arg(long, default_value_t = ScheduleParams::default().w)]
    w: f64,
    /// Overlapped forward+backward pair time F&B.
    #[arg(long, default_value_t = ScheduleParams::default().fb)]
    fb: f64,
    /// Timeline image path (default: <kind>_pp<PP>_micro<M>.svg in the current directory).
    #[arg(long)]
    svg: Option<PathBuf>,
}

pub fn schedule(a: ScheduleArgs) -> Result<bool> {
    let p = ScheduleParams {
        kind: a.kind,
        pp: a.pp,
        micro: a.micro,
        f: a.f,
        b: a.b,
        w: a.w,
        fb: a.fb,
        svg: a.svg,
    };
    schedule::report(&p, &mut std::io::stdout())
}

#[derive(clap::Args)]
pub struct AdamwDriftArgs {
    /// Optimizer steps.
    #[arg(long, default_value_t = AdamwDriftParams::default().steps)]
    steps: u64,
    /// Parameters.
    #[arg(long, default_value_t = AdamwDriftParams::default().n)]
    n: usize,
    /// Learning rate (constant).
    #[arg(long, default_value_t = AdamwDriftParams::default().lr)]
    lr: f64,
    /// Seed of the random draws (the same seed gives the same run).
    #[arg(long, default_value_t = AdamwDriftParams::default().seed)]
    seed: u64,
}

pub fn adamw_drift(a: AdamwDriftArgs) -> Result<bool> {
    let p = AdamwDriftParams {
        steps: a.steps,
        n: a.n,
        lr: a.lr,
        seed: a.seed,
    };
    adamw_drift::report(&p, &mut std::io::stdout())
}
