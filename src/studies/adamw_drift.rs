//! `dsv3 adamw-drift`: how far AdamW with FP32 master weights and BF16 moments (V3 §3.3.3)
//! drifts from an all-f64 AdamW over many steps on a small problem.
//!
//! Two experiments, V3's β1 = 0.9, β2 = 0.95, wd = 0.1:
//! - **open loop**: every variant sees the same f32 gradient stream `g_t,i = μ_i + σ_i z_t,i`
//!   (independent of the parameters), so the drift is the optimizer's rounding alone; a
//!   first-order error bound is propagated next to it, element by element ([`DriftBound`]);
//! - **closed loop**: a quadratic `L(θ) = ½ Σ h_i (θ_i − θ*_i)²` with noisy gradients computed
//!   at each variant's own parameters (drift can feed back); final losses are reported.
//!
//! Variants: f64 everything (yardstick), f32 master + f32 moments, f32 master + BF16 moments.

use dsv3_reference::train::adamw::{
    adamw_element_f32, adamw_step_bf16, adamw_step_f32, adamw_step_f64, AdamWConfig,
    StepCoefficients,
};
use half::bf16;
use std::io::Write;

use crate::registry::error::{Error, Result};
use crate::registry::rng::Rng;
use crate::registry::table::Table;

#[derive(Debug, Clone)]
pub struct AdamwDriftParams {
    /// Optimizer steps.
    pub steps: u64,
    /// Parameters.
    pub n: usize,
    /// Learning rate (constant).
    pub lr: f64,
    /// Seed of the random draws (the same seed gives the same run).
    pub seed: u64,
}

impl Default for AdamwDriftParams {
    fn default() -> Self {
        AdamwDriftParams {
            steps: 1000,
            n: 256,
            lr: 2.2e-4,
            seed: 0,
        }
    }
}

/// Running first-order bound on `|x̃ − x|` for one element of a low-precision AdamW `x̃` against
/// the exact one `x`, from the low-precision state alone (SPEC.md "AdamW drift bound").
#[derive(Debug, Clone, Copy, Default)]
pub struct DriftBound {
    pub p: f64,
    pub m: f64,
    pub v: f64,
}

const U32: f64 = f32::EPSILON as f64 / 2.0;
const U64: f64 = f64::EPSILON / 2.0;

impl DriftBound {
    /// Advance over one step from the low-precision state `(p, m, v)` (the values *before* the
    /// step, as stored) with gradient `g`; `store_u` is the unit roundoff of the moment storage
    /// (2^-9 for BF16, 0 for f32: the f32 moments are already counted).
    pub fn step(&mut self, p: f64, g: f64, m: f64, v: f64, c: &StepCoefficients, store_u: f64) {
        // the low-precision quantities of the step (f32 arithmetic, unrounded moments)
        let (p1, m1, v1) = adamw_element_f32(p as f32, g as f32, m as f32, v as f32, c);
        let (p1, m1, v1) = (f64::from(p1), f64::from(m1), f64::from(v1));
        // moments: the old error decays, each step adds the f32 (and f64) rounding of the formula
        let e_m = (1.0 - c.w1) * self.m + (U32 + U64) * (m1.abs() + 4.0 * c.w1 * (g - m).abs());
        let e_v = c.beta2 * self.v
            + (U32 + U64) * (v1.abs() + 2.0 * c.beta2 * v.abs() + 4.0 * c.w2 * g * g);
        // denominator D = √v/c + ε
        let sq = v1.sqrt();
        let e_sq = if sq > 0.0 {
            (e_v / (2.0 * sq)).min(e_v.sqrt())
        } else {
            e_v.sqrt()
        };
        let d = sq / c.bc2_sqrt + c.eps;
        let e_d = e_sq / c.bc2_sqrt + 3.0 * (U32 + U64) * sq / c.bc2_sqrt + (U32 + U64) * d;
        let d_lo = (d - e_d).max(c.eps * (1.0 - 4.0 * U32));
        // |m̃/D̃ − m/D| ≤ |m̃ − m|/D + |m̃|·|D̃ − D|/(D̃·D), with D ≥ d_lo
        let ns = c.neg_step_size.abs();
        let e_upd =
            ns * (e_m / d_lo + m1.abs() * e_d / (d * d_lo)) + 3.0 * (U32 + U64) * ns * m1.abs() / d;
        // parameters: the old error shrinks by the decay factor
        self.p = c.decay * self.p + e_upd + (U32 + U64) * (2.0 * (p * c.decay).abs() + p1.abs());
        // storage rounding of the moments reaches the next step
        self.m = e_m + store_u * m1.abs();
        self.v = e_v + store_u * v1.abs();
    }
}

/// Drift of one variant against f64.
#[derive(Debug, Clone)]
pub struct Drift {
    pub variant: &'static str,
    /// max_i |θ_i − θ^f64_i| after the last step.
    pub max: f64,
    /// mean_i |θ_i − θ^f64_i|.
    pub mean: f64,
    /// max_i of the propagated bound (open loop only).
    pub bound: Option<f64>,
    /// Elements whose drift exceeds their own bound (open loop; must be 0).
    pub over_bound: usize,
    /// max_i |θ^f64_i(T) − θ_i(0)|: how far the parameters moved.
    pub movement: f64,
    /// Closed loop: final loss.
    pub loss: Option<f64>,
}

struct Variant32 {
    p: Vec<f32>,
    m32: Vec<f32>,
    v32: Vec<f32>,
    mb: Vec<bf16>,
    vb: Vec<bf16>,
    bound: Vec<DriftBound>,
}

impl Variant32 {
    fn new(p0: &[f64]) -> Self {
        let n = p0.len();
        Variant32 {
            p: p0.iter().map(|&x| x as f32).collect(),
            m32: vec![0.0; n],
            v32: vec![0.0; n],
            mb: vec![bf16::ZERO; n],
            vb: vec![bf16::ZERO; n],
            bound: vec![DriftBound::default(); n],
        }
    }
}

fn summarize(
    variant: &'static str,
    p: &[f32],
    exact: &[f64],
    p0: &[f64],
    bound: Option<&[DriftBound]>,
    loss: Option<f64>,
) -> Drift {
    let d: Vec<f64> = p
        .iter()
        .zip(exact)
        .map(|(&a, &b)| (f64::from(a) - b).abs())
        .collect();
    Drift {
        variant,
        max: d.iter().copied().fold(0.0, f64::max),
        mean: d.iter().sum::<f64>() / d.len() as f64,
        bound: bound.map(|b| b.iter().map(|x| x.p).fold(0.0, f64::max)),
        over_bound: bound.map_or(0, |b| d.iter().zip(b).filter(|(d, b)| **d > b.p).count()),
        movement: exact
            .iter()
            .zip(p0)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max),
        loss,
    }
}

fn config(a: &AdamwDriftParams) -> AdamWConfig {
    AdamWConfig {
        lr: a.lr,
        ..AdamWConfig::V3
    }
}

/// Open loop: the same gradient stream for every variant; bounds propagated.
pub fn open_loop(a: &AdamwDriftParams) -> Result<Vec<Drift>> {
    let cfg = config(a);
    let mut rng = Rng::new(a.seed);
    let p0: Vec<f64> = (0..a.n)
        .map(|_| f64::from((rng.normal() * 0.02) as f32))
        .collect();
    // per-element gradient mean and noise: signal-to-noise from 0.1 to 10, scales over 2 decades
    let mu: Vec<f64> = (0..a.n).map(|_| rng.normal() * 1e-3).collect();
    let sigma: Vec<f64> = (0..a.n).map(|_| (rng.normal()).exp() * 1e-3).collect();
    let (mut p, mut m, mut v) = (p0.clone(), vec![0.0; a.n], vec![0.0; a.n]);
    let mut f = Variant32::new(&p0);
    let mut h = Variant32::new(&p0);
    for t in 1..=a.steps {
        let g32: Vec<f32> = (0..a.n)
            .map(|i| (mu[i] + sigma[i] * rng.normal()) as f32)
            .collect();
        let g64: Vec<f64> = g32.iter().map(|&x| f64::from(x)).collect();
        let c = StepCoefficients::new(&cfg, t)?;
        // bounds use the state before the step
        for (i, &g) in g64.iter().enumerate() {
            f.bound[i].step(
                f64::from(f.p[i]),
                g,
                f64::from(f.m32[i]),
                f64::from(f.v32[i]),
                &c,
                0.0,
            );
            let (mh, vh) = (f64::from(h.mb[i].to_f32()), f64::from(h.vb[i].to_f32()));
            h.bound[i].step(f64::from(h.p[i]), g, mh, vh, &c, 2f64.powi(-9));
        }
        adamw_step_f64(&mut p, &g64, &mut m, &mut v, t, &cfg)?;
        adamw_step_f32(&mut f.p, &g32, &mut f.m32, &mut f.v32, t, &cfg)?;
        adamw_step_bf16(&mut h.p, &g32, &mut h.mb, &mut h.vb, t, &cfg)?;
    }
    Ok(vec![
        summarize(
            "f32 master + f32 moments",
            &f.p,
            &p,
            &p0,
            Some(&f.bound),
            None,
        ),
        summarize(
            "f32 master + BF16 moments (V3)",
            &h.p,
            &p,
            &p0,
            Some(&h.bound),
            None,
        ),
    ])
}

/// Closed loop on a noisy quadratic; gradients from each variant's own parameters.
pub fn closed_loop(a: &AdamwDriftParams) -> Result<(f64, Vec<Drift>)> {
    let cfg = AdamWConfig {
        weight_decay: 0.0,
        ..config(a)
    };
    let mut rng = Rng::new(a.seed ^ 0x5eed);
    let p0: Vec<f64> = (0..a.n)
        .map(|_| f64::from((rng.normal() * 0.02) as f32))
        .collect();
    let target: Vec<f64> = (0..a.n).map(|_| rng.normal() * 0.05).collect();
    let curv: Vec<f64> = (0..a.n)
        .map(|_| 10f64.powf(rng.uniform() * 2.0 - 1.0))
        .collect();
    let loss = |p: &[f64]| {
        0.5 * p
            .iter()
            .zip(&target)
            .zip(&curv)
            .map(|((x, t), h)| h * (x - t) * (x - t))
            .sum::<f64>()
    };
    let (mut p, mut m, mut v) = (p0.clone(), vec![0.0; a.n], vec![0.0; a.n]);
    let mut f = Variant32::new(&p0);
    let mut h = Variant32::new(&p0);
    for t in 1..=a.steps {
        let noise: Vec<f64> = (0..a.n).map(|_| rng.normal() * 1e-3).collect();
        let grad64 = |q: &[f64]| -> Vec<f64> {
            (0..a.n)
                .map(|i| curv[i] * (q[i] - target[i]) + noise[i])
                .collect()
        };
        let grad32 = |q: &[f32]| -> Vec<f32> {
            (0..a.n)
                .map(|i| (curv[i] as f32) * (q[i] - target[i] as f32) + noise[i] as f32)
                .collect()
        };
        let g = grad64(&p);
        adamw_step_f64(&mut p, &g, &mut m, &mut v, t, &cfg)?;
        let g = grad32(&f.p);
        adamw_step_f32(&mut f.p, &g, &mut f.m32, &mut f.v32, t, &cfg)?;
        let g = grad32(&h.p);
        adamw_step_bf16(&mut h.p, &g, &mut h.mb, &mut h.vb, t, &cfg)?;
    }
    let l = |q: &[f32]| loss(&q.iter().map(|&x| f64::from(x)).collect::<Vec<_>>());
    Ok((
        loss(&p),
        vec![
            summarize(
                "f32 master + f32 moments",
                &f.p,
                &p,
                &p0,
                None,
                Some(l(&f.p)),
            ),
            summarize(
                "f32 master + BF16 moments (V3)",
                &h.p,
                &p,
                &p0,
                None,
                Some(l(&h.p)),
            ),
        ],
    ))
}

pub fn render(open: &[Drift], closed_f64_loss: f64, closed: &[Drift]) -> String {
    let mut t = Table::new(&[
        "experiment",
        "variant",
        "max |θ − θ_f64|",
        "mean |θ − θ_f64|",
        "bound (max)",
        "elements over bound",
        "max movement",
        "final loss (f64: same row)",
    ]);
    for d in open {
        t.row(vec![
            "open loop".into(),
            d.variant.into(),
            format!("{:.3e}", d.max),
            format!("{:.3e}", d.mean),
            d.bound.map_or("-".into(), |b| format!("{b:.3e}")),
            d.over_bound.to_string(),
            format!("{:.3e}", d.movement),
            "-".into(),
        ]);
    }
    for d in closed {
        t.row(vec![
            "closed loop".into(),
            d.variant.into(),
            format!("{:.3e}", d.max),
            format!("{:.3e}", d.mean),
            "-".into(),
            "-".into(),
            format!("{:.3e}", d.movement),
            format!(
                "{:.6e} (f64 {closed_f64_loss:.6e})",
                d.loss.unwrap_or(f64::NAN)
            ),
        ]);
    }
    t.render()
}

/// `dsv3 adamw-drift`: the run and its report, written to `out`.
pub fn report(a: &AdamwDriftParams, out: &mut dyn Write) -> Result<bool> {
    if a.n == 0 || a.steps == 0 {
        return Err(Error::Usage(
            "adamw-drift: --n and --steps must be ≥ 1".into(),
        ));
    }
    // about a dozen f32/f64/bf16 state vectors and a bound per parameter
    crate::registry::limits::ensure_elements(&format!("adamw-drift: --n {}", a.n), &[a.n, 16], 8)?;
    let _ = writeln!(out,
        "adamw-drift: {} parameters, {} steps, lr {}, β1 0.9, β2 0.95, wd 0.1 (closed loop: wd 0), ε 1e-8, seed {}",
        a.n, a.steps, a.lr, a.seed
    );
    let open = open_loop(a)?;
    let (l64, closed) = closed_loop(a)?;
    let _ = write!(out, "{}", render(&open, l64, &closed));
    Ok(open.iter().all(|d| d.over_bound == 0))
}
