//! AdamW (V3 §4.2: β1 = 0.9, β2 = 0.95, weight_decay = 0.1) in three precisions:
//! - [`adamw_step_f64`]: everything f64, the accuracy yardstick;
//! - [`adamw_step_f32`]: f32 master weights and f32 moments (torch.optim.AdamW on f32);
//! - [`adamw_step_bf16`]: f32 master weights, moments *stored* in BF16 (V3 §3.3.3: "we adopt the
//!   BF16 data format instead of FP32 to track the first and second moments in the AdamW
//!   optimizer, without incurring observable performance degradation").
//!
//! One step, torch.optim.AdamW's single-tensor algorithm (the order of operations is part of the
//! definition; step `t` counts from 1):
//! ```text
//! p ← p·(1 − lr·wd)                                  decoupled weight decay
//! m ← m + (1 − β1)·(g − m)                           first moment (torch: lerp)
//! v ← v·β2 + (1 − β2)·g·g                            second moment (torch: addcmul)
//! d ← √v / √(1 − β2^t) + ε                           bias-corrected denominator
//! p ← p + (−lr / (1 − β1^t))·m / d                  (torch: addcdiv, left to right)
//! ```
//! Scalar coefficients (`1 − lr·wd`, `1 − β1`, `lr/(1 − β1^t)`, `√(1 − β2^t)`, ...) are computed in
//! f64 and rounded once to the working precision, as torch does with Python floats.
//!
//! BF16 moments: each step upcasts `m`, `v` to f32 (exact), updates them in f32, uses the f32
//! values for this step's parameter update, and stores them rounded to BF16 (RNE). A fused
//! kernel keeps the fresh moments in registers, so the rounding only reaches the *next* step.
//! V3 does not say; rounding before use would add a 2^-9 relative error to every update.
//!
//! ε is not stated in V3; [`AdamWConfig::V3`] uses torch's default 1e-8.

use half::bf16;

use crate::error::{Error, Result};

/// AdamW hyper-parameters (`lr` is the current step's learning rate, see `schedule`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamWConfig {
    /// V3 §4.2 at the peak learning rate 2.2e-4; ε = 1e-8 (torch default; V3 gives none).
    pub const V3: AdamWConfig = AdamWConfig {
        lr: 2.2e-4,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };

    fn validate(&self, op: &'static str) -> Result<()> {
        let fields = [
            ("lr", self.lr, self.lr >= 0.0),
            ("beta1", self.beta1, (0.0..1.0).contains(&self.beta1)),
            ("beta2", self.beta2, (0.0..1.0).contains(&self.beta2)),
            ("eps", self.eps, self.eps > 0.0),
            ("weight_decay", self.weight_decay, self.weight_decay >= 0.0),
        ];
        for (name, value, ok) in fields {
            if !(ok && value.is_finite()) {
                return Err(Error::Argument {
                    op,
                    name,
                    value: value.to_string(),
                    why: "lr, weight_decay ≥ 0; β1, β2 in [0, 1); ε > 0; all finite".into(),
                });
            }
        }
        Ok(())
    }
}

/// The per-step scalars, in f64 (rounded to f32 by the f32 paths).
#[derive(Debug, Clone, Copy)]
pub struct StepCoefficients {
    /// `1 − lr·wd`
    pub decay: f64,
    /// `1 − β1` (the lerp weight)
    pub w1: f64,
    pub beta2: f64,
    /// `1 − β2`
    pub w2: f64,
    /// `−lr / (1 − β1^t)`
    pub neg_step_size: f64,
    /// `√(1 − β2^t)`
    pub bc2_sqrt: f64,
    pub eps: f64,
}

impl StepCoefficients {
    /// The scalars of step `t ≥ 1`.
    pub fn new(cfg: &AdamWConfig, step: u64) -> Result<Self> {
        const OP: &str = "adamw_step";
        cfg.validate(OP)?;
        if step == 0 {
            return Err(Error::Argument {
                op: OP,
                name: "step",
                value: "0".into(),
                why: "steps count from 1 (bias correction divides by 1 − β^t)".into(),
            });
        }
        let t = i32::try_from(step).unwrap_or(i32::MAX);
        Ok(StepCoefficients {
            decay: 1.0 - cfg.lr * cfg.weight_decay,
            w1: 1.0 - cfg.beta1,
            beta2: cfg.beta2,
            w2: 1.0 - cfg.beta2,
            neg_step_size: -(cfg.lr / (1.0 - cfg.beta1.powi(t))),
            bc2_sqrt: (1.0 - cfg.beta2.powi(t)).sqrt(),
            eps: cfg.eps,
        })
    }
}

/// The lengths of `grad`, `exp_avg`, `exp_avg_sq` against `param` (`n`), then the step's
/// coefficients.
fn prepare(
    n: usize,
    grad: usize,
    m: usize,
    v: usize,
    step: u64,
    cfg: &AdamWConfig,
) -> Result<StepCoefficients> {
    for (name, len) in [("grad", grad), ("exp_avg", m), ("exp_avg_sq", v)] {
        if len != n {
            return Err(Error::Shape {
                op: "adamw_step",
                tensor: name,
                got: vec![len],
                expected: format!("[N] with N = {n} (the length of param)"),
            });
        }
    }
    StepCoefficients::new(cfg, step)
}

fn check_finite32(op: &'static str, name: &'static str, x: &[f32]) -> Result<()> {
    match x.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(Error::Value {
            op,
            tensor: name,
            index: vec![i],
            value: x[i].to_string(),
            why: "the optimizer refuses non-finite values (clip or skip the step first)",
        }),
    }
}

/// One element of the f32 step: `(p, g, m, v) → (p', m', v')`, every operation rounded to f32.
pub fn adamw_element_f32(p: f32, g: f32, m: f32, v: f32, c: &StepCoefficients) -> (f32, f32, f32) {
    // decoupled weight decay
    let p = p * c.decay as f32;
    // first moment: lerp towards g
    let m = m + c.w1 as f32 * (g - m);
    // second moment
    let v = v * c.beta2 as f32 + c.w2 as f32 * g * g;
    // bias-corrected denominator and the update
    let d = v.sqrt() / c.bc2_sqrt as f32 + c.eps as f32;
    (p + c.neg_step_size as f32 * m / d, m, v)
}

/// AdamW step in f64 (the yardstick). Shapes: all `[N]`; `step ≥ 1`.
pub fn adamw_step_f64(
    param: &mut [f64],
    grad: &[f64],
    m: &mut [f64],
    v: &mut [f64],
    step: u64,
    cfg: &AdamWConfig,
) -> Result<()> {
    let c = prepare(param.len(), grad.len(), m.len(), v.len(), step, cfg)?;
    for i in 0..param.len() {
        let g = grad[i];
        // same five lines as adamw_element_f32, in f64
        let p = param[i] * c.decay;
        m[i] += c.w1 * (g - m[i]);
        v[i] = v[i] * c.beta2 + c.w2 * g * g;
        let d = v[i].sqrt() / c.bc2_sqrt + c.eps;
        param[i] = p + c.neg_step_size * m[i] / d;
    }
    Ok(())
}

/// AdamW step with f32 master weights and f32 moments. Shapes: all `[N]`.
/// Errors: length mismatch, non-finite gradient or state, bad hyper-parameters.
pub fn adamw_step_f32(
    param: &mut [f32],
    grad: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    step: u64,
    cfg: &AdamWConfig,
) -> Result<()> {
    const OP: &str = "adamw_step";
    for (name, x) in [
        ("param", &*param),
        ("grad", grad),
        ("exp_avg", &*m),
        ("exp_avg_sq", &*v),
    ] {
        check_finite32(OP, name, x)?;
    }
    let c = prepare(param.len(), grad.len(), m.len(), v.len(), step, cfg)?;
    for i in 0..param.len() {
        (param[i], m[i], v[i]) = adamw_element_f32(param[i], grad[i], m[i], v[i], &c);
    }
    Ok(())
}

/// AdamW step with f32 master weights and BF16-stored moments (V3 §3.3.3); see the module doc
/// for where the BF16 rounding happens. Shapes: all `[N]`.
pub fn adamw_step_bf16(
    param: &mut [f32],
    grad: &[f32],
    m: &mut [bf16],
    v: &mut [bf16],
    step: u64,
    cfg: &AdamWConfig,
) -> Result<()> {
    const OP: &str = "adamw_step";
    check_finite32(OP, "param", param)?;
    check_finite32(OP, "grad", grad)?;
    let c = prepare(param.len(), grad.len(), m.len(), v.len(), step, cfg)?;
    for i in 0..param.len() {
        // upcast the stored moments (exact), update in f32, store rounded to BF16
        let (p, m32, v32) = adamw_element_f32(param[i], grad[i], m[i].to_f32(), v[i].to_f32(), &c);
        if !(m32.is_finite() && v32.is_finite()) {
            return Err(Error::Value {
                op: OP,
                tensor: if m32.is_finite() {
                    "exp_avg_sq"
                } else {
                    "exp_avg"
                },
                index: vec![i],
                value: format!("{}", if m32.is_finite() { v[i] } else { m[i] }),
                why: "the optimizer refuses non-finite values",
            });
        }
        param[i] = p;
        m[i] = bf16::from_f32(m32);
        v[i] = bf16::from_f32(v32);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_step_moves_each_weight_by_lr_against_the_gradient_sign() {
        // t = 1, m = v = 0: m' = (1−β1)g, v' = (1−β2)g², m̂ = g, √v̂ = |g| → update = lr·g/(|g|+ε).
        let cfg = AdamWConfig {
            weight_decay: 0.0,
            ..AdamWConfig::V3
        };
        let mut p = vec![1.0f64, -2.0, 0.5];
        let g = vec![0.3, -4.0, 1e-3];
        let (mut m, mut v) = (vec![0.0; 3], vec![0.0; 3]);
        adamw_step_f64(&mut p, &g, &mut m, &mut v, 1, &cfg).unwrap();
        for (i, (&p1, &p0)) in p.iter().zip(&[1.0, -2.0, 0.5]).enumerate() {
            let want = p0 - cfg.lr * g[i] / (g[i].abs() + cfg.eps);
            assert!((p1 - want).abs() < 1e-15, "{i}: {p1} vs {want}");
        }
        assert!((m[1] - 0.1 * -4.0).abs() < 1e-15 && (v[1] - 0.05 * 16.0).abs() < 1e-14);
    }

    #[test]
    fn weight_decay_is_decoupled() {
        // zero gradient and state: only the decay acts, p·(1 − lr·wd), no Adam update
        let cfg = AdamWConfig::V3;
        let mut p = vec![3.0f64];
        adamw_step_f64(&mut p, &[0.0], &mut [0.0], &mut [0.0], 5, &cfg).unwrap();
        assert_eq!(p[0], 3.0 * (1.0 - 2.2e-4 * 0.1));
    }

    #[test]
    fn constant_gradient_converges_to_unit_steps() {
        // constant g: m̂_t = g and v̂_t = g² exactly (the bias corrections undo the EMAs), so every
        // step moves p by lr·|g|/(|g| + ε) (wd = 0).
        let cfg = AdamWConfig {
            weight_decay: 0.0,
            lr: 0.01,
            ..AdamWConfig::V3
        };
        let (mut p, mut m, mut v) = (vec![0.0f64], vec![0.0], vec![0.0]);
        for t in 1..=50 {
            let before = p[0];
            adamw_step_f64(&mut p, &[2.0], &mut m, &mut v, t, &cfg).unwrap();
            let want = 0.01 * 2.0 / (2.0 + 1e-8);
            assert!((before - p[0] - want).abs() < 1e-12, "step {t}");
        }
    }

    #[test]
    fn bf16_moments_are_stored_rounded_and_f32_path_agrees() {
        let cfg = AdamWConfig::V3;
        let g = vec![0.123456f32, -7.5, 3e-3];
        let (mut p32, mut m32, mut v32) =
            (vec![0.5f32, 1.0, -1.0], vec![0.0f32; 3], vec![0.0f32; 3]);
        let (mut pb, mut mb, mut vb) = (p32.clone(), vec![bf16::ZERO; 3], vec![bf16::ZERO; 3]);
        adamw_step_f32(&mut p32, &g, &mut m32, &mut v32, 1, &cfg).unwrap();
        adamw_step_bf16(&mut pb, &g, &mut mb, &mut vb, 1, &cfg).unwrap();
        // step 1 from zero state: same f32 arithmetic, so the parameters agree bit for bit and
        // the stored moments are the f32 moments rounded to BF16
        assert_eq!(pb, p32);
        for i in 0..3 {
            assert_eq!(mb[i], bf16::from_f32(m32[i]));
            assert_eq!(vb[i], bf16::from_f32(v32[i]));
        }
    }

    #[test]
    fn bad_inputs_are_refused() {
        let cfg = AdamWConfig::V3;
        let e =
            adamw_step_f32(&mut [0.0], &[1.0, 2.0], &mut [0.0], &mut [0.0], 1, &cfg).unwrap_err();
        assert!(e.to_string().contains("grad"), "{e}");
        let e =
            adamw_step_f32(&mut [0.0], &[f32::NAN], &mut [0.0], &mut [0.0], 1, &cfg).unwrap_err();
        assert!(e.to_string().contains("grad"), "{e}");
        let e = adamw_step_f32(&mut [0.0], &[1.0], &mut [0.0], &mut [0.0], 0, &cfg).unwrap_err();
        assert!(e.to_string().contains("step"), "{e}");
        let bad = AdamWConfig { beta2: 1.0, ..cfg };
        let e = adamw_step_f64(&mut [0.0], &[1.0], &mut [0.0], &mut [0.0], 1, &bad).unwrap_err();
        assert!(e.to_string().contains("beta2"), "{e}");
    }
}
