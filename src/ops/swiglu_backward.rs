//! `swiglu_backward`: `dy, gate, up → dgate, dup`, the gradient of [`super::swiglu`].
//!
//! Tolerance (SPEC.md "Backward tolerances"), an f32 kernel, `u = 2^-24`: `σ = 1/(1 + e^{−g})`
//! carries 6 units (expf ≤ 2 ulp, the addition, the division, one spare), so `1 − σ` is off by
//! at most `γ_6·σ + u(1 − σ)`. With `a = |dy·up|`:
//! - `|Δdgate| ≤ a·σ·(γ_14·(1 + |g|(1 − σ)) + γ_7·|g|·σ) + 4·2^-126·a·(1 + |g|)` — the
//!   magnitudes of `dy·up·σ·(1 + g(1 − σ))`, whichever way a kernel writes `silu'` (also
//!   `σ + silu·(1 − σ)`); near `g ≈ −1.2785`, where `silu'` crosses zero, the bound stays the
//!   size of the terms that cancel, not of the result;
//! - `|Δdup| ≤ γ_9·|dy·g·σ| + 2^-126·|dy·g|`;
//!
//! the `2^-126` terms cover `σ` or the products flushed to zero (FTZ) for `g < −87`; then one
//! rounding to the output dtype.

use dsv3_reference::mlp::swiglu_backward;

use super::bound_policy::{derived_bound_policy, put_bounded};
use super::{float_input, gen_fits, get, require_finite};
use crate::registry::compare::Policy;
use crate::registry::config::{Config, ConfigSchema, NoConfig};
use crate::registry::contract::{Dim, TensorSpec};
use crate::registry::error::Result;
use crate::registry::io::TensorMap;
use crate::registry::rng::Rng;
use crate::registry::tensor::{DType, Tensor};
use crate::registry::tolerance::gamma;
use crate::registry::{OpEntry, PolicyCtx, Sizes};

pub static SWIGLU_BACKWARD: OpEntry = OpEntry {
    name: "swiglu_backward",
    source: "the gradient of V3 eq. (12)'s silu(w1 x) ⊙ w3 x (OFF MLP/Expert, HF DeepseekV3MLP) as torch autograd computes it",
    summary: "σ = σ(gate): dgate = dy·up·σ·(1 + gate·(1 − σ)), dup = dy·gate·σ; both in gate's dtype",
    inputs: &[
        TensorSpec { name: "dy", dtypes: &[DType::F32, DType::BF16], shape: &[Dim::Batch, Dim::Var("I")], doc: "∂L/∂y (y = silu(gate) ⊙ up)" },
        TensorSpec { name: "gate", dtypes: &[DType::F32, DType::BF16], shape: &[Dim::Batch, Dim::Var("I")], doc: "w1 x" },
        TensorSpec { name: "up", dtypes: &[DType::F32, DType::BF16], shape: &[Dim::Batch, Dim::Var("I")], doc: "w3 x" },
    ],
    outputs: &[
        TensorSpec { name: "dgate", dtypes: &[DType::F32, DType::BF16], shape: &[Dim::Batch, Dim::Var("I")], doc: "∂L/∂gate (dtype of gate)" },
        TensorSpec { name: "dup", dtypes: &[DType::F32, DType::BF16], shape: &[Dim::Batch, Dim::Var("I")], doc: "∂L/∂up (dtype of gate)" },
    ],
    constraints: &[],
    config: ConfigSchema::of::<NoConfig>(),
    adapt: None,
    reference: swiglu_backward_ref,
    reference_fn: "reference/src/mlp.rs::swiglu_backward",
    gpu: &[],
    policy: swiglu_backward_policy,
    policy_doc: "per element, an f32 kernel (any form of silu'): |Δdgate| ≤ |dy·up|·σ·(γ_14·(1 + |g|(1−σ)) + γ_7·|g|σ) \
+ 4·2^-126·|dy·up|(1+|g|), |Δdup| ≤ γ_9·|dy·g·σ| + 2^-126·|dy·g|, then one rounding to the output dtype (module doc \
of src/ops/swiglu_backward.rs, SPEC.md)",
    generate: swiglu_backward_gen,
    test_configs: &[],
    v3_sizes: &[&[("M", 4), ("I", 2048)], &[("M", 4), ("I", 18432)]],
};

/// The zero of `silu'`: `1 + g(1 − σ(g)) = 0` at g ≈ −1.2785 (where dgate cancels).
const SILU_PRIME_ZERO: f64 = -1.278_464_542_761_074;

fn swiglu_backward_ref(inputs: &TensorMap, _cfg: &Config) -> Result<TensorMap> {
    let (dy, g, u) = (get(inputs, "dy"), get(inputs, "gate"), get(inputs, "up"));
    for (name, t) in [("dy", dy), ("gate", g), ("up", u)] {
        require_finite(
            "swiglu_backward",
            name,
            t,
            "the gradient of a non-finite input is not defined",
        )?;
    }
    let (dym, gm, um) = (dy.matrix_f32(), g.matrix_f32(), u.matrix_f32());
    let (dgate, dup) = swiglu_backward(dym.view(), gm.view(), um.view())?;
    let flush = 2f64.powi(-126);
    let (mut tol_g, mut tol_u) = (Vec::new(), Vec::new());
    for ((i, j), &gv) in gm.indexed_iter() {
        let (z, d, up) = (f64::from(gv), f64::from(dym[[i, j]]), f64::from(um[[i, j]]));
        let sigma = 1.0 / (1.0 + (-z).exp());
        let a = (d * up).abs();
        tol_g.push(
            a * sigma
                * (gamma(14.0) * (1.0 + z.abs() * (1.0 - sigma)) + gamma(7.0) * z.abs() * sigma)
                + 4.0 * flush * a * (1.0 + z.abs()),
        );
        tol_u.push(gamma(9.0) * (d * z * sigma).abs() + flush * (d * z).abs());
    }
    let mut out = TensorMap::new();
    let dg: Vec<f64> = dgate.iter().copied().collect();
    let du: Vec<f64> = dup.iter().copied().collect();
    put_bounded(&mut out, "dgate", g.dtype, g.shape.clone(), &dg, &tol_g);
    put_bounded(&mut out, "dup", g.dtype, g.shape.clone(), &du, &tol_u);
    Ok(out)
}

fn swiglu_backward_policy<'a>(ctx: &PolicyCtx<'a>) -> Policy<'a> {
    derived_bound_policy(
        ctx,
        "within the f32-kernel bound of the exact gradient, then one rounding (SPEC.md \"Backward tolerances\")",
    )
}

fn swiglu_backward_gen(rng: &mut Rng, _cfg: &Config, sizes: &Sizes) -> Result<TensorMap> {
    let i = sizes.or_draw("I", rng, 1, 200);
    let m = sizes.or_draw("M", rng, 1, 5);
    gen_fits(&[&[m, i], &[m, i], &[m, i]])?;
    let wide = rng.chance(0.3);
    let g: Vec<f32> = (0..m * i)
        .map(|_| match rng.range(0, 8) {
            // around the zero of silu' (dgate cancels), and far in both tails
            0 => (SILU_PRIME_ZERO + rng.normal() * 1e-3) as f32,
            1 => (rng.normal() * 60.0) as f32,
            _ => (rng.normal() * if wide { 30.0 } else { 2.0 }) as f32,
        })
        .collect();
    let u: Vec<f32> = (0..m * i).map(|_| rng.normal() as f32).collect();
    let d: Vec<f32> = (0..m * i)
        .map(|_| {
            if rng.chance(0.05) {
                0.0
            } else {
                rng.normal() as f32
            }
        })
        .collect();
    let gate = float_input(rng, vec![m, i], &g);
    let up = Tensor::from_f32_as(gate.dtype, vec![m, i], &u);
    let dy = Tensor::from_f32_as(gate.dtype, vec![m, i], &d);
    Ok(super::outputs([("dy", dy), ("gate", gate), ("up", up)]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::{outputs, policy_report};

    /// f32 kernels: expf `ulps` off, silu' as `σ(1 + g(1 − σ))` or `σ + silu·(1 − σ)`.
    fn f32_kernel(
        d: &[f32],
        g: &[f32],
        u: &[f32],
        ulps: i32,
        other_form: bool,
    ) -> (Vec<f32>, Vec<f32>) {
        let mut dg = Vec::new();
        let mut du = Vec::new();
        for ((&d, &g), &u) in d.iter().zip(g).zip(u) {
            let e = (-g).exp();
            let e = if e.is_finite() && e >= f32::MIN_POSITIVE {
                f32::from_bits((e.to_bits() as i32 + ulps) as u32)
            } else {
                e
            };
            let s = 1.0 / (1.0 + e);
            let silu = g * s;
            let prime = if other_form {
                s + silu * (1.0 - s)
            } else {
                s * (1.0 + g * (1.0 - s))
            };
            dg.push(d * u * prime);
            du.push(d * silu);
        }
        (dg, du)
    }

    #[test]
    fn f32_kernels_pass_and_planted_faults_fail() {
        let op = &SWIGLU_BACKWARD;
        let cfg = op.default_config();
        let mut worst = 0f64;
        for seed in 0..200u64 {
            let inputs = swiglu_backward_gen(&mut Rng::new(seed), &cfg, &Sizes::new()).unwrap();
            let (d, g, u) = (get(&inputs, "dy"), get(&inputs, "gate"), get(&inputs, "up"));
            let (dv, gv, uv) = (d.floats(), g.floats(), u.floats());
            let cand = |dg: &[f32], du: &[f32]| {
                outputs([
                    ("dgate", Tensor::from_f32_as(g.dtype, g.shape.clone(), dg)),
                    ("dup", Tensor::from_f32_as(g.dtype, g.shape.clone(), du)),
                ])
            };
            for (ulps, other) in [(2, false), (-2, true), (0, true)] {
                let (dg, du) = f32_kernel(&dv, &gv, &uv, ulps, other);
                let rep = policy_report(op, &inputs, &cand(&dg, &du), &cfg);
                for t in &rep.tensors {
                    worst = worst.max(t.bound_use.as_ref().map_or(0.0, |b| b.max));
                }
                assert!(
                    rep.pass,
                    "seed {seed} ulps {ulps} other {other}: {:?}",
                    rep.tensors
                );
            }
            // silu'(−g) instead of silu'(g) in one element is a bug the policy sees
            let (mut dg, du) = f32_kernel(&dv, &gv, &uv, 0, false);
            let neg: Vec<f32> = gv.iter().map(|v| -v).collect();
            let (flipped, _) = f32_kernel(&dv, &neg, &uv, 0, false);
            if let Some(at) = (0..dg.len()).find(|&k| {
                (f64::from(dg[k]) - f64::from(flipped[k])).abs()
                    > 0.05 * f64::from(dg[k]).abs().max(1e-3)
            }) {
                dg[at] = flipped[at];
                assert!(
                    !policy_report(op, &inputs, &cand(&dg, &du), &cfg).pass,
                    "seed {seed}: silu'(−g) at {at} passed"
                );
            }
        }
        println!("worst f32 kernel uses {worst:.3} of its bound");
        assert!(worst < 1.0);
    }
}
