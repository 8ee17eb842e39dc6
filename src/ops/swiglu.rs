//! `swiglu`: `y = silu(gate) ⊙ up`, the middle of every DeepSeek-V3 FFN.

use dsv3_reference::mlp::swiglu;

use super::gen_fits;
use super::{float_input, get, outputs};
use crate::registry::compare::Policy;
use crate::registry::config::{Config, ConfigSchema, NoConfig};
use crate::registry::contract::{Dim, TensorSpec};
use crate::registry::error::Result;
use crate::registry::io::TensorMap;
use crate::registry::rng::Rng;
use crate::registry::tensor::{DType, Tensor};
use crate::registry::tolerance::gamma;
use crate::registry::{every_config, GpuImpl, OpEntry, PolicyCtx, Sizes};

pub static SWIGLU: OpEntry = OpEntry {
    name: "swiglu",
    source: "V3 eq. (12) FFN(·) = w2(silu(w1 u) ⊙ w3 u); OFF MLP.forward / Expert.forward; HF DeepseekV3MLP",
    summary: "y = silu(gate) ⊙ up = gate·σ(gate)·up, elementwise; y has gate's dtype",
    inputs: &[
        TensorSpec { name: "gate", dtypes: &[DType::F32, DType::BF16], shape: &[Dim::Batch, Dim::Var("I")], doc: "w1 x (gate_proj output)" },
        TensorSpec { name: "up", dtypes: &[DType::F32, DType::BF16], shape: &[Dim::Batch, Dim::Var("I")], doc: "w3 x (up_proj output)" },
    ],
    outputs: &[TensorSpec { name: "y", dtypes: &[DType::F32, DType::BF16], shape: &[Dim::Batch, Dim::Var("I")], doc: "input of w2 (dtype of gate)" }],
    constraints: &[],
    config: ConfigSchema::of::<NoConfig>(),
    adapt: None,
    reference: swiglu_ref,
    reference_fn: "reference/src/mlp.rs::swiglu",
    gpu: &[GpuImpl {
        backend: "cuda",
        run: crate::gpu_fn!(swiglu_gpu),
        kernel: "gpu/kernels/swiglu.cu",
        supports: every_config,
    }],
    policy: swiglu_policy,
    policy_doc: "F32 y: |Δ| ≤ γ_8·|y| + 2^-100, γ_8 = 8u/(1 − 8u), u = 2^-24 (expf ≤ 2 ulp = 4u, 1 + e, a division and \
a product in f32, the reference's rounding: 8 roundings of u, γ_8 with the second-order terms; the 2^-100 covers silu \
underflowing to ±0 in f32 for gate < −88); BF16 y: ≤ 2 bf16 ulp (torch rounds silu and the product to bf16: two \
roundings against our one)",
    generate: swiglu_gen,
    test_configs: &[],
    v3_sizes: &[&[("M", 4), ("I", 2048)], &[("M", 4), ("I", 18432)]],
};

fn swiglu_ref(inputs: &TensorMap, _cfg: &Config) -> Result<TensorMap> {
    let (g, u) = (get(inputs, "gate"), get(inputs, "up"));
    let y = swiglu(g.matrix_f32().view(), u.matrix_f32().view())?;
    let values: Vec<f32> = y.iter().copied().collect();
    Ok(outputs([(
        "y",
        Tensor::from_f32_as(g.dtype, g.shape.clone(), &values),
    )]))
}

fn swiglu_policy<'a>(ctx: &PolicyCtx<'a>) -> Policy<'a> {
    match get(ctx.inputs, "gate").dtype {
        DType::BF16 => Policy::Ulps {
            max: 2,
            why: "silu and the product each rounded to bf16 against our one rounding",
        },
        _ => Policy::Close {
            atol: 2f64.powi(-100),
            rtol: gamma(8.0),
            why: "f32: γ_8 (expf ≤ 2 ulp, 1 + e, division, product, the reference's rounding)",
        },
    }
}

#[cfg(feature = "cuda")]
fn swiglu_gpu(gpu: &dsv3_gpu::Gpu, inputs: &TensorMap, _cfg: &Config) -> Result<TensorMap> {
    let (g, u) = (get(inputs, "gate"), get(inputs, "up"));
    let (gate, up) = (g.kernel_values(), u.kernel_values());
    let y = dsv3_gpu::swiglu::swiglu(gpu, gate.as_host(), up.as_host())?;
    Ok(outputs([("y", Tensor::from_floats(g.shape.clone(), y))]))
}

fn swiglu_gen(rng: &mut Rng, _cfg: &Config, sizes: &Sizes) -> Result<TensorMap> {
    let i = sizes.get("I").copied().unwrap_or_else(|| rng.range(1, 200));
    let m = sizes.get("M").copied().unwrap_or_else(|| rng.range(1, 5));
    gen_fits(&[&[m, i], &[m, i]])?;
    let wide = rng.chance(0.3);
    let g: Vec<f32> = (0..m * i)
        .map(|_| (rng.normal() * if wide { 30.0 } else { 2.0 }) as f32)
        .collect();
    let u: Vec<f32> = (0..m * i).map(|_| rng.normal() as f32).collect();
    let gate = float_input(rng, vec![m, i], &g);
    // up in the same dtype as gate (one GEMM output dtype)
    let up = match gate.dtype {
        DType::BF16 => Tensor::from_f32_as(DType::BF16, vec![m, i], &u),
        _ => crate::registry::tensor::Tensor::from_f32(vec![m, i], &u),
    };
    Ok(outputs([("gate", gate), ("up", up)]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::policy_report;
    use crate::registry::tensor::Tensor;

    /// The kernel's f32 arithmetic with an `expf` `ulps` steps off (CUDA's expf: ≤ 2 ulp).
    fn f32_kernel(g: &[f32], u: &[f32], ulps: i32) -> Vec<f32> {
        g.iter()
            .zip(u)
            .map(|(&g, &u)| {
                let e = (-g).exp();
                let e = if e.is_finite() && e >= f32::MIN_POSITIVE {
                    f32::from_bits((e.to_bits() as i32 + ulps) as u32)
                } else {
                    e
                };
                g / (1.0 + e) * u
            })
            .collect()
    }

    #[test]
    fn f32_kernels_with_a_2_ulp_exp_pass_and_a_sign_slip_fails() {
        let op = &SWIGLU;
        let cfg = op.default_config();
        for seed in 0..100u64 {
            let mut rng = Rng::new(seed);
            let n = rng.range(1, 400);
            let g: Vec<f32> = (0..n).map(|_| (rng.normal() * 30.0) as f32).collect();
            let u: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
            let inputs = outputs([
                ("gate", Tensor::from_f32(vec![n], &g)),
                ("up", Tensor::from_f32(vec![n], &u)),
            ]);
            for ulps in [-2, 0, 2] {
                let y = Tensor::from_f32(vec![n], &f32_kernel(&g, &u, ulps));
                let rep = policy_report(op, &inputs, &outputs([("y", y)]), &cfg);
                assert!(
                    rep.pass,
                    "seed {seed} ulps {ulps}: {:?}",
                    rep.tensors[0].first_violations
                );
            }
            // σ(−g) instead of σ(g) is a bug the policy sees
            let neg: Vec<f32> = g.iter().map(|v| -v).collect();
            let wrong: Vec<f32> = f32_kernel(&neg, &u, 0)
                .iter()
                .zip(&g)
                .map(|(y, &gv)| if gv != 0.0 { -y } else { *y })
                .collect();
            let y = Tensor::from_f32(vec![n], &wrong);
            let rep = policy_report(op, &inputs, &outputs([("y", y)]), &cfg);
            assert!(!rep.pass, "seed {seed}: σ(−g) went unnoticed");
        }
    }
}
