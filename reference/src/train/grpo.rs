//! Group Relative Policy Optimization (V3 §5.2.2, eqs. (26)–(28); token-level form of
//! DeepSeekMath eq. (3), which V3's sequence-level notation abbreviates).
//!
//! For one question `q` with `G` sampled outputs `o_1..o_G` (from π_old) and rewards `r_i`:
//! ```text
//! A_i        = (r_i − mean(r)) / std(r)                               eq. (28), every token of o_i
//! ρ_{i,t}    = π_θ(o_{i,t}|q,o_{i,<t}) / π_old(o_{i,t}|q,o_{i,<t})
//! D_{i,t}    = π_ref/π_θ − log(π_ref/π_θ) − 1                          eq. (27), per token
//! J          = (1/G) Σ_i (1/|o_i|) Σ_t [ min(ρ_{i,t} A_i, clip(ρ_{i,t}, 1−ε, 1+ε) A_i) − β D_{i,t} ]
//! ```
//! We work with log-probabilities of the sampled tokens: `ρ = exp(logp − logp_old)`,
//! `D = exp(logp_ref − logp) − (logp_ref − logp) − 1`. The loss to minimise is `−J`.
//!
//! `std(r)`: neither paper says population or sample. Default: the sample std (divide by G−1),
//! which is what `torch.std` returns and what common GRPO trainers use; the population std is
//! available. All-equal rewards (std = 0) give `A_i = 0` (no signal; no ε is added to std).
//! V3 gives neither ε nor β; DeepSeekMath uses β = 0.04.

use ndarray::{Array2, ArrayView2};

use crate::error::{Error, Result};

/// Which standard deviation normalises the group's rewards in eq. (28).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RewardStd {
    /// `√(Σ(r − r̄)²/(G − 1))` (Bessel; `torch.std` default). Needs G ≥ 2.
    Sample,
    /// `√(Σ(r − r̄)²/G)`.
    Population,
}

/// GRPO hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GrpoConfig {
    /// ε of the clipped ratio.
    pub clip_eps: f64,
    /// β, the KL coefficient.
    pub kl_beta: f64,
    pub std: RewardStd,
}

impl GrpoConfig {
    /// ε = 0.2 (PPO's usual value) and DeepSeekMath's β = 0.04; V3 states neither.
    pub const DEFAULT: GrpoConfig = GrpoConfig {
        clip_eps: 0.2,
        kl_beta: 0.04,
        std: RewardStd::Sample,
    };
}

/// The objective of one group and its gradient.
#[derive(Debug, Clone, PartialEq)]
pub struct GrpoGroup {
    /// `−J` (to minimise).
    pub loss: f64,
    /// `A_i`, eq. (28).
    pub advantages: Vec<f64>,
    /// `∂(−J)/∂logp_{i,t}` (0 at masked positions). `[G, L]`.
    pub grad_logp: Array2<f64>,
}

/// Eq. (28): group-relative advantages. Errors: fewer than 2 rewards for the sample std, a
/// non-finite reward.
pub fn group_advantages(rewards: &[f64], std: RewardStd) -> Result<Vec<f64>> {
    const OP: &str = "group_advantages";
    let g = rewards.len();
    let min_g = if std == RewardStd::Sample { 2 } else { 1 };
    if g < min_g {
        return Err(Error::Shape {
            op: OP,
            tensor: "rewards",
            got: vec![g],
            expected: format!("[G] with G ≥ {min_g} for the {std:?} std"),
        });
    }
    if let Some(i) = rewards.iter().position(|r| !r.is_finite()) {
        return Err(Error::Value {
            op: OP,
            tensor: "rewards",
            index: vec![i],
            value: rewards[i].to_string(),
            why: "rewards must be finite",
        });
    }
    // all rewards equal (exactly): no preference, zero advantage. Tested on the rewards, not on
    // the computed std, which rounding can leave slightly above 0 (e.g. three rewards of 0.1).
    if rewards.iter().all(|&r| r == rewards[0]) {
        return Ok(vec![0.0; g]);
    }
    // mean and (sample or population) standard deviation of the group
    let mean = rewards.iter().sum::<f64>() / g as f64;
    let ss: f64 = rewards.iter().map(|r| (r - mean) * (r - mean)).sum();
    let dof = match std {
        RewardStd::Sample => (g - 1) as f64,
        RewardStd::Population => g as f64,
    };
    let sd = (ss / dof).sqrt();
    Ok(rewards.iter().map(|r| (r - mean) / sd).collect())
}

/// Eq. (27), the unbiased, non-negative KL estimator for one token, from log-probabilities:
/// `exp(Δ) − Δ − 1` with `Δ = logp_ref − logp` (0 when π_θ = π_ref).
pub fn kl_estimator(logp: f64, logp_ref: f64) -> f64 {
    let delta = logp_ref - logp;
    delta.exp() - delta - 1.0
}

/// GRPO loss `−J` of one group (DeepSeekMath eq. (3)) and `∂(−J)/∂logp`.
///
/// Shapes: `logp`, `logp_old`, `logp_ref`: `[G, L]` log-probabilities of the sampled tokens
/// under π_θ, π_old, π_ref; `mask: [G, L]` true at the `|o_i|` real tokens of output `i`;
/// `rewards: [G]`. Errors: shape mismatch, an output with no tokens, non-finite values at
/// unmasked positions.
///
/// Gradient per unmasked token, with `w = 1/(G·|o_i|)`:
/// `∂J/∂logp = w·( ρA·1[ρA ≤ clip(ρ)A] − β(1 − exp(logp_ref − logp)) )`: the surrogate's
/// derivative is `ρA` where `min` takes the unclipped term (including ties, where both terms
/// have that derivative) and 0 where the clipped constant wins.
pub fn grpo_loss(
    logp: ArrayView2<f64>,
    logp_old: ArrayView2<f64>,
    logp_ref: ArrayView2<f64>,
    mask: ArrayView2<bool>,
    rewards: &[f64],
    cfg: &GrpoConfig,
) -> Result<GrpoGroup> {
    const OP: &str = "grpo_loss";
    let (g, l) = logp.dim();
    for (name, dim) in [
        ("logp_old", logp_old.dim()),
        ("logp_ref", logp_ref.dim()),
        ("mask", mask.dim()),
    ] {
        if dim != (g, l) {
            return Err(Error::Shape {
                op: OP,
                tensor: name,
                got: vec![dim.0, dim.1],
                expected: format!("[G, L] = [{g}, {l}] (the shape of logp)"),
            });
        }
    }
    if rewards.len() != g {
        return Err(Error::Shape {
            op: OP,
            tensor: "rewards",
            got: vec![rewards.len()],
            expected: format!("[G] with G = {g}"),
        });
    }
    for (name, x) in [
        ("logp", logp),
        ("logp_old", logp_old),
        ("logp_ref", logp_ref),
    ] {
        if let Some(((i, t), v)) = x
            .indexed_iter()
            .find(|((i, t), v)| mask[[*i, *t]] && !v.is_finite())
        {
            return Err(Error::Value {
                op: OP,
                tensor: name,
                index: vec![i, t],
                value: v.to_string(),
                why: "log-probabilities of real tokens must be finite",
            });
        }
    }
    let advantages = group_advantages(rewards, cfg.std)?;
    let (lo, hi) = (1.0 - cfg.clip_eps, 1.0 + cfg.clip_eps);
    let mut objective = 0.0;
    let mut grad_logp = Array2::zeros((g, l));
    for i in 0..g {
        // |o_i|: the real tokens of output i
        let len = mask.row(i).iter().filter(|&&m| m).count();
        if len == 0 {
            return Err(Error::Value {
                op: OP,
                tensor: "mask",
                index: vec![i],
                value: "all false".into(),
                why: "every output needs at least one token (J divides by |o_i|)",
            });
        }
        let a = advantages[i];
        let w = 1.0 / (g as f64 * len as f64);
        let mut sum_i = 0.0;
        for t in (0..l).filter(|&t| mask[[i, t]]) {
            // clipped surrogate
            let rho = (logp[[i, t]] - logp_old[[i, t]]).exp();
            let unclipped = rho * a;
            let clipped = rho.clamp(lo, hi) * a;
            // KL penalty, eq. (27)
            let kl = kl_estimator(logp[[i, t]], logp_ref[[i, t]]);
            sum_i += unclipped.min(clipped) - cfg.kl_beta * kl;
            // ∂J/∂logp: dρ/dlogp = ρ; dD/dlogp = 1 − exp(logp_ref − logp)
            let d_surrogate = if unclipped <= clipped { unclipped } else { 0.0 };
            let d_kl = 1.0 - (logp_ref[[i, t]] - logp[[i, t]]).exp();
            grad_logp[[i, t]] = -w * (d_surrogate - cfg.kl_beta * d_kl);
        }
        objective += sum_i / len as f64;
    }
    Ok(GrpoGroup {
        loss: -objective / g as f64,
        advantages,
        grad_logp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{array, Array2};

    #[test]
    fn advantages_population_and_sample() {
        // r = (1, 0, 0, 1): mean ½, Σ(r−r̄)² = 1 → population std ½, sample std 1/√3
        let r = [1.0, 0.0, 0.0, 1.0];
        assert_eq!(
            group_advantages(&r, RewardStd::Population).unwrap(),
            vec![1.0, -1.0, -1.0, 1.0]
        );
        let s = group_advantages(&r, RewardStd::Sample).unwrap();
        let want = 0.5 * 3f64.sqrt();
        assert!((s[0] - want).abs() < 1e-15 && (s[1] + want).abs() < 1e-15);
        assert_eq!(
            group_advantages(&[2.0, 2.0, 2.0], RewardStd::Sample).unwrap(),
            vec![0.0; 3]
        );
        assert!(group_advantages(&[1.0], RewardStd::Sample).is_err());
    }

    #[test]
    fn kl_estimator_is_zero_at_reference_and_positive_elsewhere() {
        assert_eq!(kl_estimator(-1.3, -1.3), 0.0);
        // Δ = ln 2: 2 − ln 2 − 1
        assert!((kl_estimator(-1.0, -1.0 + 2f64.ln()) - (1.0 - 2f64.ln())).abs() < 1e-15);
        for d in [-3.0, -0.1, 0.1, 3.0] {
            assert!(kl_estimator(0.0, d) > 0.0);
        }
    }

    #[test]
    fn hand_computed_loss_two_outputs() {
        // G = 2, r = (1, 0) → population A = (1, −1). Output 0: one token, ρ = e^0.5 > 1.2 →
        // min(ρ, 1.2) = 1.2; output 1: two tokens with ρ = 1 → −1 each. β = 0, ε = 0.2.
        // J = ½(1.2 + (−1 − 1)/2) = 0.1.
        let logp = array![[0.0, 0.0], [-1.0, -2.0]];
        let old = array![[-0.5, 0.0], [-1.0, -2.0]];
        let mask = array![[true, false], [true, true]];
        let cfg = GrpoConfig {
            clip_eps: 0.2,
            kl_beta: 0.0,
            std: RewardStd::Population,
        };
        let r = grpo_loss(
            logp.view(),
            old.view(),
            logp.view(),
            mask.view(),
            &[1.0, 0.0],
            &cfg,
        )
        .unwrap();
        assert!((r.loss + 0.1).abs() < 1e-15, "{}", r.loss);
        // clipped token has no gradient; output 1's tokens: −(1/(2·2))·(1·(−1)) = 0.25
        assert_eq!(r.grad_logp, array![[0.0, 0.0], [0.25, 0.25]]);
    }

    /// Toy policy: one softmax over V tokens, outputs of one token, π_old = π_θ (on-policy),
    /// π_ref = the starting policy. ∂logp(o)/∂θ_v = 1[v = o] − π_v.
    fn theta_grad(
        theta: &[f64],
        samples: &[usize],
        rewards: &[f64],
        theta_ref: &[f64],
        cfg: &GrpoConfig,
    ) -> (f64, Vec<f64>) {
        let logsm = |th: &[f64]| {
            let z = th.iter().map(|x| x.exp()).sum::<f64>().ln();
            th.iter().map(|x| x - z).collect::<Vec<_>>()
        };
        let lp = logsm(theta);
        let lr = logsm(theta_ref);
        let g = samples.len();
        let logp = Array2::from_shape_fn((g, 1), |(i, _)| lp[samples[i]]);
        let logp_ref = Array2::from_shape_fn((g, 1), |(i, _)| lr[samples[i]]);
        let mask = Array2::from_elem((g, 1), true);
        let r = grpo_loss(
            logp.view(),
            logp.view(),
            logp_ref.view(),
            mask.view(),
            rewards,
            cfg,
        )
        .unwrap();
        let mut grad = vec![0.0; theta.len()];
        for (i, &o) in samples.iter().enumerate() {
            for v in 0..theta.len() {
                let dlogp = f64::from(u8::from(v == o)) - lp[v].exp();
                grad[v] += r.grad_logp[[i, 0]] * dlogp;
            }
        }
        (r.loss, grad)
    }

    #[test]
    fn gradient_sign_on_a_toy_policy() {
        let theta = vec![0.0, 0.3, -0.2, 0.1, 0.0];
        // 6 samples; token 2 is rewarded, token 1 punished
        let samples = [0, 1, 2, 2, 1, 3];
        let rewards = [0.5, 0.0, 1.0, 1.0, 0.0, 0.5];
        let cfg = GrpoConfig::DEFAULT;
        let (loss0, grad) = theta_grad(&theta, &samples, &rewards, &theta, &cfg);
        // descent on −J raises the rewarded token's logit and lowers the punished one's
        assert!(grad[2] < 0.0 && grad[1] > 0.0, "{grad:?}");
        // one small step: π(rewarded) up, π(punished) down, loss down
        let step: Vec<f64> = theta.iter().zip(&grad).map(|(t, g)| t - 0.1 * g).collect();
        let p = |th: &[f64], v: usize| th[v].exp() / th.iter().map(|x| x.exp()).sum::<f64>();
        assert!(p(&step, 2) > p(&theta, 2) && p(&step, 1) < p(&theta, 1));
        // (π_old stays the sampling policy θ: the ratio moves, not the baseline)
        let loss1 = loss_at(&step, &theta, &samples, &rewards, &cfg);
        assert!(loss1 < loss0, "{loss1} vs {loss0}");
        assert_eq!(loss0, loss_at(&theta, &theta, &samples, &rewards, &cfg));
        // the analytic θ-gradient agrees with central differences (J is smooth away from the
        // clip boundaries; ρ = 1 here). Truncation h²/6·|∂³| is below 1e-9 for h = 1e-5.
        for v in 0..theta.len() {
            let mut up = theta.clone();
            up[v] += 1e-5;
            let mut dn = theta.clone();
            dn[v] -= 1e-5;
            // π_old moves with θ in theta_grad (on-policy), so hold it fixed: evaluate with old = θ
            let fd = (loss_at(&up, &theta, &samples, &rewards, &cfg)
                - loss_at(&dn, &theta, &samples, &rewards, &cfg))
                / 2e-5;
            assert!((fd - grad[v]).abs() < 1e-8, "θ_{v}: fd {fd} vs {}", grad[v]);
        }
    }

    fn loss_at(
        theta: &[f64],
        theta_old: &[f64],
        samples: &[usize],
        rewards: &[f64],
        cfg: &GrpoConfig,
    ) -> f64 {
        let logsm = |th: &[f64]| {
            let z = th.iter().map(|x| x.exp()).sum::<f64>().ln();
            th.iter().map(|x| x - z).collect::<Vec<_>>()
        };
        let (lp, lo) = (logsm(theta), logsm(theta_old));
        let g = samples.len();
        let logp = Array2::from_shape_fn((g, 1), |(i, _)| lp[samples[i]]);
        let old = Array2::from_shape_fn((g, 1), |(i, _)| lo[samples[i]]);
        let mask = Array2::from_elem((g, 1), true);
        // π_ref = π_old = the starting policy here
        grpo_loss(
            logp.view(),
            old.view(),
            old.view(),
            mask.view(),
            rewards,
            cfg,
        )
        .unwrap()
        .loss
    }

    #[test]
    fn kl_term_pulls_towards_the_reference() {
        // equal rewards: A = 0, only −β·KL acts; descent must reduce KL(π_θ‖π_ref) per token
        let theta_ref = vec![0.0, 0.0, 0.0];
        let theta = vec![1.0, -0.5, 0.0];
        let samples = [0, 1, 2, 0];
        let rewards = [1.0; 4];
        let cfg = GrpoConfig {
            kl_beta: 0.5,
            ..GrpoConfig::DEFAULT
        };
        let (_, grad) = theta_grad(&theta, &samples, &rewards, &theta_ref, &cfg);
        let step: Vec<f64> = theta.iter().zip(&grad).map(|(t, g)| t - 0.2 * g).collect();
        let dist = |th: &[f64]| {
            th.iter()
                .zip(&theta_ref)
                .map(|(a, b)| (a - b).abs())
                .sum::<f64>()
        };
        // logits move towards the reference (softmax is shift-invariant: compare centred logits)
        let centre = |th: &[f64]| {
            let m = th.iter().sum::<f64>() / th.len() as f64;
            th.iter().map(|x| x - m).collect::<Vec<_>>()
        };
        assert!(dist(&centre(&step)) < dist(&centre(&theta)), "{step:?}");
    }

    #[test]
    fn errors_name_the_culprit() {
        let z = Array2::<f64>::zeros((2, 3));
        let mut mask = Array2::from_elem((2, 3), true);
        let cfg = GrpoConfig::DEFAULT;
        assert!(
            grpo_loss(z.view(), z.view(), z.view(), mask.view(), &[1.0], &cfg)
                .unwrap_err()
                .to_string()
                .contains("rewards")
        );
        mask.row_mut(1).fill(false);
        let e =
            grpo_loss(z.view(), z.view(), z.view(), mask.view(), &[1.0, 0.0], &cfg).unwrap_err();
        assert!(e.to_string().contains("mask"), "{e}");
        let mut bad = z.clone();
        bad[[0, 2]] = f64::NEG_INFINITY;
        let e = grpo_loss(
            bad.view(),
            z.view(),
            z.view(),
            Array2::from_elem((2, 3), true).view(),
            &[1.0, 0.0],
            &cfg,
        )
        .unwrap_err();
        assert!(matches!(e, Error::Value { tensor: "logp", .. }), "{e}");
    }
}
