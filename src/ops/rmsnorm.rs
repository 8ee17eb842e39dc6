//! `rmsnorm`: `y = w ⊙ x / sqrt(mean(x²) + eps)` over the last dim.

#[cfg(feature = "cuda")]
use dsv3_gpu::rmsnorm::rmsnorm;
use dsv3_reference::norm::rms_norm;

use super::gen_fits;
use super::{float_input, get, outputs};
use crate::registry::compare::Policy;
use crate::registry::config::{Config, ConfigSchema, FieldKind};
use crate::registry::contract::{Dim, TensorSpec};
use crate::registry::error::Result;
use crate::registry::io::TensorMap;
use crate::registry::rng::Rng;
use crate::registry::tensor::{DType, Tensor};
use crate::registry::tolerance::U32;
use crate::registry::{every_config, GpuImpl, OpEntry, PolicyCtx, Sizes};

crate::op_config! {
    /// `rmsnorm`'s config.
    pub struct RmsNormConfig {
        eps: f64 = "1e-6", FieldKind::PositiveFloat, "rms_norm_eps (1e-6 in V3; q_norm and kv_norm always use 1e-6)";
    }
}

pub static RMSNORM: OpEntry = OpEntry {
    name: "rmsnorm",
    source: "V3 §2 (RMSNorm before attention and FFN, after the compressed latents); OFF RMSNorm; HF DeepseekV3RMSNorm",
    summary: "y[..., c] = w[c] · x[..., c] / sqrt(mean_c(x²) + eps); y has x's dtype",
    inputs: &[
        TensorSpec { name: "x", dtypes: &[DType::F32, DType::BF16], shape: &[Dim::Batch, Dim::Var("D")], doc: "activations" },
        TensorSpec { name: "weight", dtypes: &[DType::F32, DType::BF16], shape: &[Dim::Var("D")], doc: "norm weight" },
    ],
    outputs: &[TensorSpec { name: "y", dtypes: &[DType::F32, DType::BF16], shape: &[Dim::Batch, Dim::Var("D")], doc: "normalized (dtype of x)" }],
    constraints: &[],
    config: ConfigSchema::of::<RmsNormConfig>(),
    adapt: None,
    reference: rmsnorm_ref,
    reference_fn: "reference/src/norm.rs::rms_norm",
    gpu: &[GpuImpl {
        backend: "cuda",
        run: crate::gpu_fn!(rmsnorm_gpu),
        kernel: "gpu/kernels/rmsnorm.cu",
        supports: every_config,
    }],
    policy: rmsnorm_policy,
    policy_doc: RMSNORM_POLICY_DOC,
    generate: rmsnorm_gen,
    test_configs: &[r#"{"eps":1e-5}"#],
    v3_sizes: &[&[("D", 7168)], &[("D", 1536)], &[("D", 512)]],
};

const RMSNORM_POLICY_DOC: &str = "F32 y: |Δ| ≤ (D/2 + 9)·u/(1 − 2(D+3)·u)·|y| + (max|w| + 2)·2^-150, u = 2^-24 \
(an f32 kernel: D squares summed in any order, the mean, f32(eps) and its addition — γ_{D+3}, halved by the square root — \
a reciprocal square root of ≤ 2 ulp (rsqrtf), two products, and the reference's own rounding; the absolute term covers \
products that underflow); BF16 y: ≤ 2 bf16 ulp (HF rounds x·r to bf16 before ·w: two roundings of ½ ulp against our one)";

fn rmsnorm_ref(inputs: &TensorMap, cfg: &Config) -> Result<TensorMap> {
    let x = get(inputs, "x");
    let w = (get(inputs, "weight")).floats();
    let y = rms_norm(x.matrix_f32().view(), &w, cfg.get::<RmsNormConfig>().eps)?;
    let values: Vec<f32> = y.iter().copied().collect();
    Ok(outputs([(
        "y",
        Tensor::from_f32_as(x.dtype, x.shape.clone(), &values),
    )]))
}

fn rmsnorm_policy<'a>(ctx: &PolicyCtx<'a>) -> Policy<'a> {
    let x = get(ctx.inputs, "x");
    match x.dtype {
        DType::BF16 => Policy::Ulps {
            max: 2,
            why: "HF rounds x·r to bf16 before ·w: two roundings against one",
        },
        _ => {
            let d = *x.shape.last().expect("rank ≥ 1") as f64;
            let w_max = (get(ctx.inputs, "weight"))
                .floats()
                .iter()
                .fold(0f64, |m, &v| m.max(f64::from(v).abs()));
            Policy::Close {
                atol: (w_max + 2.0) * 2f64.powi(-150),
                rtol: f32_rel_bound(d),
                why: "f32: D squares in any order, mean, eps, rsqrt (≤ 2 ulp), two products (SPEC.md)",
            }
        }
    }
}

/// The relative bound of an f32 RMSNorm against the reference (SPEC.md "RMSNorm tolerance"):
/// `v̂ = v(1+θ)`, `|θ| ≤ γ_{D+3}` (D squares and sums, the mean, f32(eps) and the addition),
/// `(1+θ)^(-1/2)` deviates by ≤ γ_{D+3}/(2(1−γ_{D+3})) = (D+3)u/(2(1 − 2(D+3)u)); rsqrtf adds
/// ≤ 2 ulp = 4u, the two products 2u, the reference's rounding u, and 0.5u absorbs the
/// second-order products (valid for D < 2^20).
fn f32_rel_bound(d: f64) -> f64 {
    (d / 2.0 + 9.0) * U32 / (1.0 - 2.0 * (d + 3.0) * U32)
}

#[cfg(feature = "cuda")]
fn rmsnorm_gpu(gpu: &dsv3_gpu::Gpu, inputs: &TensorMap, cfg: &Config) -> Result<TensorMap> {
    let x = get(inputs, "x");
    let (rows, d) = x.rows_cols();
    let w = (get(inputs, "weight")).floats();
    let eps = cfg.get::<RmsNormConfig>().eps as f32;
    let y = rmsnorm(gpu, x.kernel_values().as_host(), &w, (rows, d), eps)?;
    Ok(outputs([("y", Tensor::from_floats(x.shape.clone(), y))]))
}

fn rmsnorm_gen(rng: &mut Rng, _cfg: &Config, sizes: &Sizes) -> Result<TensorMap> {
    let d = sizes.get("D").copied().unwrap_or_else(|| rng.range(1, 300));
    let m = sizes.get("M").copied().unwrap_or_else(|| rng.range(1, 5));
    gen_fits(&[&[m, d], &[d]])?;
    let mut x = Vec::with_capacity(m * d);
    for _ in 0..m {
        // rows of very different magnitudes: eps matters for the small ones
        let scale = (rng.normal() * 3.0).exp() * if rng.chance(0.2) { 1e-4 } else { 1.0 };
        x.extend((0..d).map(|_| (rng.normal() * scale) as f32));
    }
    let w: Vec<f32> = (0..d).map(|_| (1.0 + 0.3 * rng.normal()) as f32).collect();
    Ok(outputs([
        ("x", float_input(rng, vec![m, d], &x)),
        ("weight", float_input(rng, vec![d], &w)),
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::policy_report;
    use crate::registry::tensor::Tensor;

    /// The worst f32 kernel the policy admits, emulated on the CPU: squares summed in `order`,
    /// the mean, f32(eps), a reciprocal square root `ulps` f32 steps off (rsqrtf ≤ 2 ulp),
    /// then `(x·r)·w`.
    fn f32_kernel(x: &[f32], w: &[f32], eps: f32, reverse: bool, ulps: i32) -> Vec<f32> {
        let d = w.len();
        let mut y = Vec::with_capacity(x.len());
        for row in x.chunks(d) {
            let mut ss = 0f32;
            let mut add = |v: f32| ss = v.mul_add(v, ss);
            if reverse {
                row.iter().rev().for_each(|&v| add(v));
            } else {
                row.iter().for_each(|&v| add(v));
            }
            let r = 1.0 / (ss / d as f32 + eps).sqrt();
            let r = f32::from_bits((r.to_bits() as i32 + ulps) as u32);
            y.extend(row.iter().zip(w).map(|(&v, &wc)| v * r * wc));
        }
        y
    }

    #[test]
    fn f32_kernels_with_a_2_ulp_rsqrt_pass_and_a_wrong_eps_fails() {
        let op = &RMSNORM;
        let mut worst = 0f64; // largest |Δ|/|ref| in units of 2^-24, minus D/2
        for seed in 0..200u64 {
            let mut rng = Rng::new(seed);
            let cfg = op.default_config();
            let (m, d) = (rng.range(1, 6), rng.range(1, 40));
            let x: Vec<f32> = (0..m * d).map(|_| rng.normal() as f32).collect();
            let w: Vec<f32> = (0..d).map(|_| (1.0 + 0.3 * rng.normal()) as f32).collect();
            let inputs = outputs([
                ("x", Tensor::from_f32(vec![m, d], &x)),
                ("weight", Tensor::from_f32(vec![d], &w)),
            ]);
            let reference = rmsnorm_ref(&inputs, &cfg).unwrap();
            let want = (get(&reference, "y")).floats();
            for (reverse, ulps) in [(false, 2), (true, -2), (false, 0)] {
                let y = f32_kernel(&x, &w, 1e-6, reverse, ulps);
                for (g, r) in y.iter().zip(&want) {
                    if *r != 0.0 {
                        let rel = (f64::from(*g) - f64::from(*r)).abs() / f64::from(*r).abs();
                        worst = worst.max(rel / U32 - d as f64 / 2.0);
                    }
                }
                let cand = outputs([("y", Tensor::from_f32(vec![m, d], &y))]);
                let rep = policy_report(op, &inputs, &cand, &cfg);
                assert!(
                    rep.pass,
                    "seed {seed} reverse {reverse} ulps {ulps}: {rep:?}"
                );
            }
            // a kernel that forgets eps is an error the policy sees on small rows
            if seed == 0 {
                let tiny: Vec<f32> = x.iter().map(|v| v * 1e-4).collect();
                let inputs = outputs([
                    ("x", Tensor::from_f32(vec![m, d], &tiny)),
                    ("weight", Tensor::from_f32(vec![d], &w)),
                ]);
                let y = f32_kernel(&tiny, &w, 0.0, false, 0);
                let cand = outputs([("y", Tensor::from_f32(vec![m, d], &y))]);
                let rep = policy_report(op, &inputs, &cand, &cfg);
                assert!(!rep.pass, "eps = 0 went unnoticed");
            }
        }
        // the old bound (D/2 + 4)·2^-24 rejects such a kernel: its error exceeds D/2 + 4 units
        println!("worst f32 kernel error: D/2 + {worst:.2} units of 2^-24");
        assert!(worst > 4.0 && worst <= 9.0, "{worst}");
    }
}
