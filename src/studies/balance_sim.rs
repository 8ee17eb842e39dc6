//! `dsv3 balance-sim`: synthetic skewed tokens routed for N steps with and without the
//! auxiliary-loss-free bias update (V3 §2.1.2), reporting max/mean expert load per step.
//!
//! Tokens: expert `i` has a fixed popularity `o_i ~ N(0, skew²)`; token `t` of a step has
//! affinities `s_{i,t} = σ(o_i + z_{i,t})`, `z ~ N(0, 1)`. Routing is node-limited (eq. (16));
//! the load of a step is `c_i` over its tokens. Both runs see the same tokens; "without" keeps
//! `b = 0`, "with" applies `b_i ← b_i + γ·sign(c̄ − c_i)` after every step.

use std::io::Write;
use std::path::PathBuf;

use dsv3_reference::moe::{bias_update, expert_load, node_limited_topk};
use ndarray::{Array2, ArrayView1};

use crate::registry::error::{Error, Result};
use crate::registry::rng::Rng;
use crate::registry::table::Table;
use crate::studies::plot::{LineChart, Scale, Series};

/// The simulation's knobs.
#[derive(Debug, Clone)]
pub struct BalanceSimParams {
    /// Routed experts E (a multiple of --nodes).
    pub experts: usize,
    /// Experts per token K_r.
    pub top_k: usize,
    /// Nodes the experts are spread over.
    pub nodes: usize,
    /// Nodes per token M (divides top_k).
    pub max_nodes: usize,
    /// Tokens per training step.
    pub tokens: usize,
    /// Training steps.
    pub steps: usize,
    /// Bias update speed γ (V3: 0.001).
    pub gamma: f64,
    /// Standard deviation of the experts' popularity offsets (in logits).
    pub skew: f64,
    /// Seed of the random draws (the same seed gives the same run).
    pub seed: u64,
    /// Write the max/mean-load curves as an SVG image here.
    pub svg: Option<PathBuf>,
}

impl Default for BalanceSimParams {
    fn default() -> Self {
        BalanceSimParams {
            experts: 64,
            top_k: 8,
            nodes: 8,
            max_nodes: 4,
            tokens: 1024,
            steps: 1000,
            gamma: 0.001,
            skew: 1.0,
            seed: 0,
            svg: None,
        }
    }
}

/// max/mean load of every step, both runs.
#[derive(Debug, Clone)]
pub struct BalanceSim {
    /// `max_i c_i / c̄` per step, bias frozen at 0.
    pub without: Vec<f64>,
    /// `max_i c_i / c̄` per step, bias updated after each step.
    pub with: Vec<f64>,
    /// The popularity offsets `o_i`.
    pub popularity: Vec<f64>,
    /// The bias after the last step of the "with" run.
    pub bias: Vec<f32>,
}

impl BalanceSim {
    /// Mean of `series` over the last `frac` of the steps.
    pub fn tail_mean(series: &[f64], frac: f64) -> f64 {
        let n = ((series.len() as f64 * frac).ceil() as usize).clamp(1, series.len());
        series[series.len() - n..].iter().sum::<f64>() / n as f64
    }
}

fn max_over_mean(load: &[u64]) -> f64 {
    let mean = load.iter().sum::<u64>() as f64 / load.len() as f64;
    load.iter().copied().max().unwrap_or(0) as f64 / mean
}

/// Run both simulations.
pub fn simulate(a: &BalanceSimParams) -> Result<BalanceSim> {
    if a.steps == 0 || a.tokens == 0 || !(a.skew >= 0.0 && a.skew.is_finite()) {
        return Err(Error::Usage(
            "balance-sim: --steps and --tokens must be ≥ 1 and --skew a finite number ≥ 0".into(),
        ));
    }
    // the step's scores (f64) for each of the two runs
    crate::registry::limits::ensure_elements(
        &format!(
            "balance-sim: --tokens {} × --experts {}",
            a.tokens, a.experts
        ),
        &[a.tokens, a.experts, 2],
        8,
    )?;
    let mut rng = Rng::new(a.seed);
    let popularity: Vec<f64> = (0..a.experts).map(|_| rng.normal() * a.skew).collect();
    let no_bias = vec![0.0f32; a.experts];
    let mut bias = vec![0.0f32; a.experts];
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for _ in 0..a.steps {
        // the step's tokens
        let scores = Array2::from_shape_fn((a.tokens, a.experts), |(_, i)| {
            (1.0 / (1.0 + (-(popularity[i] + rng.normal())).exp())) as f32
        });
        let route = |b: &[f32]| -> Result<Vec<u64>> {
            let sel = node_limited_topk(
                scores.view(),
                Some(ArrayView1::from(b)),
                a.top_k,
                a.nodes,
                a.max_nodes,
            )?;
            Ok(expert_load(sel.view(), a.experts)?)
        };
        // frozen bias
        without.push(max_over_mean(&route(&no_bias)?));
        // updated bias: route, measure, update at the end of the step
        let load = route(&bias)?;
        with.push(max_over_mean(&load));
        bias_update(&mut bias, &load, a.gamma)?;
    }
    Ok(BalanceSim {
        without,
        with,
        popularity,
        bias,
    })
}

/// The steps shown in the table: 1, 2, 5, 10, 20, 50, … and the last.
fn shown_steps(n: usize) -> Vec<usize> {
    let mut v = Vec::new();
    let mut decade = 1;
    while decade <= n {
        for m in [1, 2, 5] {
            if m * decade <= n {
                v.push(m * decade);
            }
        }
        decade *= 10;
    }
    if v.last() != Some(&n) {
        v.push(n);
    }
    v
}

/// The table printed by the command.
pub fn table(sim: &BalanceSim) -> String {
    let mut t = Table::new(&["step", "max/mean load, b = 0", "max/mean load, bias update"]);
    for s in shown_steps(sim.with.len()) {
        t.row(vec![
            s.to_string(),
            format!("{:.3}", sim.without[s - 1]),
            format!("{:.3}", sim.with[s - 1]),
        ]);
    }
    t.row(vec![
        "mean of last 10%".into(),
        format!("{:.3}", BalanceSim::tail_mean(&sim.without, 0.1)),
        format!("{:.3}", BalanceSim::tail_mean(&sim.with, 0.1)),
    ]);
    t.render()
}

/// The max/mean-load curves.
pub fn chart(sim: &BalanceSim, a: &BalanceSimParams) -> LineChart {
    let pts = |v: &[f64]| {
        v.iter()
            .enumerate()
            .map(|(i, &y)| ((i + 1) as f64, y))
            .collect()
    };
    LineChart {
        title: format!(
            "max/mean expert load: E={} K={} M={}/{} nodes, {} tokens/step, γ={}",
            a.experts, a.top_k, a.max_nodes, a.nodes, a.tokens, a.gamma
        ),
        x_label: "training step".into(),
        y_label: "max / mean load".into(),
        x_scale: Scale::Log10,
        y_scale: Scale::Linear,
        series: vec![
            Series {
                label: "b = 0".into(),
                points: pts(&sim.without),
            },
            Series {
                label: "bias update".into(),
                points: pts(&sim.with),
            },
        ],
    }
}

/// `dsv3 balance-sim`: the run and its report, written to `out`.
pub fn report(a: &BalanceSimParams, out: &mut dyn Write) -> Result<bool> {
    let sim = simulate(a)?;
    let _ = writeln!(out,
        "balance-sim: {} experts on {} nodes, top-{} over ≤ {} nodes, {} tokens/step, {} steps, γ = {}, popularity σ = {}",
        a.experts, a.nodes, a.top_k, a.max_nodes, a.tokens, a.steps, a.gamma, a.skew
    );
    let _ = write!(out, "{}", table(&sim));
    // where the bias went: against the popularity
    let corr = correlation(
        &sim.popularity,
        &sim.bias.iter().map(|&b| f64::from(b)).collect::<Vec<_>>(),
    );
    let _ = writeln!(
        out,
        "correlation(popularity o_i, final bias b_i) = {corr:.3}"
    );
    if let Some(p) = &a.svg {
        crate::registry::io::write_file(p, chart(&sim, a).to_svg().as_bytes())?;
        let _ = writeln!(out, "wrote {}", p.display());
    }
    Ok(true)
}

/// Pearson correlation.
pub fn correlation(x: &[f64], y: &[f64]) -> f64 {
    let n = x.len() as f64;
    let (mx, my) = (x.iter().sum::<f64>() / n, y.iter().sum::<f64>() / n);
    let cov: f64 = x.iter().zip(y).map(|(a, b)| (a - mx) * (b - my)).sum();
    let vx: f64 = x.iter().map(|a| (a - mx).powi(2)).sum();
    let vy: f64 = y.iter().map(|b| (b - my).powi(2)).sum();
    cov / (vx * vy).sqrt()
}
