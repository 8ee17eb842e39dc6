//! `rmsnorm_backward`: `dy, x, weight → dx, dweight`, the gradient of [`super::rmsnorm`].
//!
//! Tolerance (SPEC.md "Backward tolerances"): an f32 kernel in any summation order, inputs as
//! given (BF16 inputs are exact in f32). Per row, `r = (mean(x²) + eps)^(-1/2)` carries
//! `n_r = C/2 + 6` units of `u = 2^-24` (γ_{C+3} halved by the square root, rsqrtf ≤ 2 ulp, one
//! spare), `x̂ = x·r` one more, `g = dy ⊙ w` one, and `proj = mean(g ⊙ x̂)` the `C + 1` of its sum
//! and division. `dx = r·g − r·x̂·proj` holds r three times (r, x̂, proj), so
//! `|Δdx| ≤ γ_{3n_r + C + 12} · r · (|g| + |x̂|·mean|g ⊙ x̂|)`; `dweight = Σ_m dy ⊙ x̂` (M tokens)
//! `|Δdweight| ≤ γ_{M + n_r + 3} · Σ_m |dy ⊙ x̂|`; each plus `2^-120` for products that underflow,
//! and one rounding to the output dtype.

use dsv3_reference::norm::rms_norm_backward;

use super::bound_policy::{derived_bound_policy, put_bounded};
use super::rmsnorm::RmsNormConfig;
use super::{float_input, gen_fits, get, require_finite};
use crate::registry::compare::Policy;
use crate::registry::config::{Config, ConfigSchema};
use crate::registry::contract::{Dim, TensorSpec};
use crate::registry::error::Result;
use crate::registry::io::TensorMap;
use crate::registry::rng::Rng;
use crate::registry::tensor::{DType, Tensor};
use crate::registry::tolerance::gamma;
use crate::registry::{OpEntry, PolicyCtx, Sizes};

pub static RMSNORM_BACKWARD: OpEntry = OpEntry {
    name: "rmsnorm_backward",
    source: "the gradient of V3's RMSNorm (OFF RMSNorm / F.rms_norm; HF DeepseekV3RMSNorm) as torch autograd computes it",
    summary: "x̂ = x·r, r = (mean_c(x²) + eps)^-1/2, g = dy ⊙ w: dx = r·(g − x̂·mean_c(g ⊙ x̂)); \
dweight[c] = Σ_tokens dy ⊙ x̂; dx has x's dtype, dweight weight's",
    inputs: &[
        TensorSpec { name: "dy", dtypes: &[DType::F32, DType::BF16], shape: &[Dim::Batch, Dim::Var("D")], doc: "∂L/∂y" },
        TensorSpec { name: "x", dtypes: &[DType::F32, DType::BF16], shape: &[Dim::Batch, Dim::Var("D")], doc: "the forward's input" },
        TensorSpec { name: "weight", dtypes: &[DType::F32, DType::BF16], shape: &[Dim::Var("D")], doc: "norm weight" },
    ],
    outputs: &[
        TensorSpec { name: "dx", dtypes: &[DType::F32, DType::BF16], shape: &[Dim::Batch, Dim::Var("D")], doc: "∂L/∂x (dtype of x)" },
        TensorSpec { name: "dweight", dtypes: &[DType::F32, DType::BF16], shape: &[Dim::Var("D")], doc: "∂L/∂weight, summed over tokens (dtype of weight)" },
    ],
    constraints: &[],
    config: ConfigSchema::of::<RmsNormConfig>(),
    adapt: None,
    reference: rmsnorm_backward_ref,
    reference_fn: "reference/src/norm.rs::rms_norm_backward",
    gpu: &[],
    policy: rmsnorm_backward_policy,
    policy_doc: "per element, an f32 kernel in any order: |Δdx| ≤ γ_{3n_r+D+12}·r·(|g| + |x̂|·mean|g ⊙ x̂|), \
|Δdweight| ≤ γ_{M+n_r+3}·Σ_m|dy ⊙ x̂| with n_r = D/2 + 6 (the units of u = 2^-24 in r), each + 2^-120, then one \
rounding to the output dtype (module doc of src/ops/rmsnorm_backward.rs, SPEC.md)",
    generate: rmsnorm_backward_gen,
    test_configs: &[r#"{"eps":1e-5}"#],
    v3_sizes: &[&[("M", 4), ("D", 7168)], &[("M", 4), ("D", 1536)], &[("M", 4), ("D", 512)]],
};

fn rmsnorm_backward_ref(inputs: &TensorMap, cfg: &Config) -> Result<TensorMap> {
    let (dy, x, w) = (get(inputs, "dy"), get(inputs, "x"), get(inputs, "weight"));
    for (name, t) in [("dy", dy), ("x", x), ("weight", w)] {
        require_finite(
            "rmsnorm_backward",
            name,
            t,
            "the gradient of a non-finite input is not defined",
        )?;
    }
    let eps = cfg.get::<RmsNormConfig>().eps;
    let (xm, dym, wv) = (x.matrix_f32(), dy.matrix_f32(), w.floats());
    let grad = rms_norm_backward(dym.view(), xm.view(), &wv, eps)?;
    let (rows, c) = xm.dim();
    // the tolerances (module doc)
    let n_r = c as f64 / 2.0 + 6.0;
    let gamma_dx = gamma(3.0 * n_r + c as f64 + 12.0);
    let gamma_dw = gamma(rows as f64 + n_r + 3.0);
    let tiny = 2f64.powi(-120);
    let mut tol_dx = Vec::with_capacity(rows * c);
    let mut mag_dw = vec![0f64; c];
    for m in 0..rows {
        let ss: f64 = (0..c).map(|k| f64::from(xm[[m, k]]).powi(2)).sum();
        let r = 1.0 / (ss / c as f64 + eps).sqrt();
        let x_hat = |k: usize| f64::from(xm[[m, k]]) * r;
        let g = |k: usize| f64::from(dym[[m, k]]) * f64::from(wv[k]);
        let proj_mag = (0..c).map(|k| (g(k) * x_hat(k)).abs()).sum::<f64>() / c as f64;
        for (k, mag) in mag_dw.iter_mut().enumerate() {
            tol_dx.push(gamma_dx * r * (g(k).abs() + x_hat(k).abs() * proj_mag) + tiny);
            *mag += (f64::from(dym[[m, k]]) * x_hat(k)).abs();
        }
    }
    let tol_dw: Vec<f64> = mag_dw.iter().map(|m| gamma_dw * m + tiny).collect();
    let mut out = TensorMap::new();
    let dx: Vec<f64> = grad.dx.iter().copied().collect();
    put_bounded(&mut out, "dx", x.dtype, x.shape.clone(), &dx, &tol_dx);
    put_bounded(
        &mut out,
        "dweight",
        w.dtype,
        w.shape.clone(),
        &grad.dweight,
        &tol_dw,
    );
    Ok(out)
}

fn rmsnorm_backward_policy<'a>(ctx: &PolicyCtx<'a>) -> Policy<'a> {
    derived_bound_policy(
        ctx,
        "within the f32-kernel bound of the exact gradient, then one rounding (SPEC.md \"Backward tolerances\")",
    )
}

fn rmsnorm_backward_gen(rng: &mut Rng, _cfg: &Config, sizes: &Sizes) -> Result<TensorMap> {
    let d = sizes.or_draw("D", rng, 1, 300);
    let m = sizes.or_draw("M", rng, 1, 6);
    gen_fits(&[&[m, d], &[m, d], &[d]])?;
    let (mut x, mut dy) = (Vec::with_capacity(m * d), Vec::with_capacity(m * d));
    for _ in 0..m {
        // rows of very different magnitudes: eps matters for the small ones
        let scale = (rng.normal() * 3.0).exp() * if rng.chance(0.2) { 1e-4 } else { 1.0 };
        let row: Vec<f64> = (0..d).map(|_| rng.normal() * scale).collect();
        let kind = rng.range(0, 3);
        for (k, &v) in row.iter().enumerate() {
            x.push(v as f32);
            // dy ∥ x: dx cancels to ~0 (the normalisation removes that direction)
            dy.push(match kind {
                0 => (v / scale * 0.7) as f32,
                1 if k % 2 == 0 => 0.0,
                _ => rng.normal() as f32,
            });
        }
    }
    let w: Vec<f32> = (0..d).map(|_| (1.0 + 0.3 * rng.normal()) as f32).collect();
    let x = float_input(rng, vec![m, d], &x);
    let dy = Tensor::from_f32_as(x.dtype, vec![m, d], &dy);
    let weight = float_input(rng, vec![d], &w);
    Ok(super::outputs([("dy", dy), ("x", x), ("weight", weight)]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::{outputs, policy_report};

    /// An f32 kernel: squares in `order`, rsqrt `ulps` off, the fused form `r·(g − x̂·proj)`
    /// or the expanded `r·g − r³·x·mean(g·x)`; dweight summed over tokens in reverse.
    fn f32_kernel(
        x: &[f32],
        dy: &[f32],
        w: &[f32],
        eps: f32,
        reverse: bool,
        ulps: i32,
        expanded: bool,
    ) -> (Vec<f32>, Vec<f32>) {
        let c = w.len();
        let (mut dx, mut dw) = (Vec::with_capacity(x.len()), vec![0f32; c]);
        let rows: Vec<(&[f32], &[f32])> = x.chunks(c).zip(dy.chunks(c)).collect();
        let order: Vec<usize> = if reverse {
            (0..c).rev().collect()
        } else {
            (0..c).collect()
        };
        let mut xhats = Vec::new();
        for (xr, dr) in &rows {
            let mut ss = 0f32;
            order.iter().for_each(|&k| ss = xr[k].mul_add(xr[k], ss));
            let r = 1.0 / (ss / c as f32 + eps).sqrt();
            let r = f32::from_bits((r.to_bits() as i32 + ulps) as u32);
            let xhat: Vec<f32> = xr.iter().map(|v| v * r).collect();
            let mut proj = 0f32;
            order
                .iter()
                .for_each(|&k| proj += dr[k] * w[k] * if expanded { xr[k] } else { xhat[k] });
            proj /= c as f32;
            for k in 0..c {
                let g = dr[k] * w[k];
                dx.push(if expanded {
                    r * g - r * r * r * xr[k] * proj
                } else {
                    r * (g - xhat[k] * proj)
                });
            }
            xhats.push(xhat);
        }
        for (i, (_, dr)) in rows.iter().enumerate().rev() {
            for k in 0..c {
                dw[k] += dr[k] * xhats[i][k];
            }
        }
        (dx, dw)
    }

    #[test]
    fn f32_kernels_pass_and_planted_faults_fail() {
        let op = &RMSNORM_BACKWARD;
        let cfg = op.default_config();
        let mut worst = 0f64;
        for seed in 0..150u64 {
            let mut rng = Rng::new(seed);
            let inputs = rmsnorm_backward_gen(&mut rng, &cfg, &Sizes::new()).unwrap();
            let (x, dy, w) = (
                get(&inputs, "x"),
                get(&inputs, "dy"),
                get(&inputs, "weight"),
            );
            let (xv, dyv, wv) = (x.floats(), dy.floats(), w.floats());
            for (reverse, ulps, expanded) in [(false, 2, false), (true, -2, true), (false, 0, true)]
            {
                let (dx, dw) = f32_kernel(&xv, &dyv, &wv, 1e-6, reverse, ulps, expanded);
                let cand = outputs([
                    ("dx", Tensor::from_f32_as(x.dtype, x.shape.clone(), &dx)),
                    (
                        "dweight",
                        Tensor::from_f32_as(w.dtype, w.shape.clone(), &dw),
                    ),
                ]);
                let rep = policy_report(op, &inputs, &cand, &cfg);
                for t in &rep.tensors {
                    worst = worst.max(t.bound_use.as_ref().map_or(0.0, |b| b.max));
                }
                assert!(
                    rep.pass,
                    "seed {seed} {reverse} {ulps} {expanded}: {:?}",
                    rep.tensors
                );
            }
            // a fault of 1 % on one element of dx and of dweight (where they are not ~0)
            let (dx, dw) = f32_kernel(&xv, &dyv, &wv, 1e-6, false, 0, false);
            let at = (0..dx.len())
                .max_by(|&a, &b| dx[a].abs().total_cmp(&dx[b].abs()))
                .unwrap();
            let mut bad = dx.clone();
            bad[at] *= 1.01;
            let cand = outputs([
                ("dx", Tensor::from_f32_as(x.dtype, x.shape.clone(), &bad)),
                (
                    "dweight",
                    Tensor::from_f32_as(w.dtype, w.shape.clone(), &dw),
                ),
            ]);
            if x.dtype == DType::F32 {
                assert!(
                    !policy_report(op, &inputs, &cand, &cfg).pass,
                    "seed {seed}: a 1 % fault in dx passed"
                );
            }
        }
        println!("worst f32 kernel uses {worst:.3} of its bound");
        assert!(worst < 1.0);
    }
}
