//! `rmsnorm`: `y = w ⊙ x / sqrt(mean(x²) + eps)` over the last dim.

use dsv3_reference::norm::rms_norm;

use super::{float_input, float_like, get, matrix_f32, outputs, values_f32, U32};
use crate::compare::Policy;
use crate::config::{Config, ConfigField, FieldKind};
use crate::contract::{Dim, TensorSpec};
use crate::error::Result;
use crate::io::TensorMap;
use crate::registry::{OpEntry, PolicyCtx, Sizes};
use crate::rng::Rng;
use crate::tensor::DType;

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
    config: &[ConfigField {
        name: "eps",
        kind: FieldKind::PositiveFloat,
        default: "1e-6",
        doc: "rms_norm_eps (1e-6 in V3; q_norm and kv_norm always use 1e-6)",
    }],
    reference: rmsnorm_ref,
    reference_fn: "reference/src/norm.rs::rms_norm",
    gpu: &[],
    policy: rmsnorm_policy,
    policy_doc: RMSNORM_POLICY_DOC,
    generate: rmsnorm_gen,
    test_configs: &[r#"{"eps":1e-5}"#],
    v3_sizes: &[&[("D", 7168)], &[("D", 1536)], &[("D", 512)]],
};

const RMSNORM_POLICY_DOC: &str = "F32 y: |Δ| ≤ (D/2 + 4)·2^-24·|y| (a sum of D squares in any order: γ_D = D·2^-24 \
relative, halved by the square root, plus the rsqrt and two products); BF16 y: ≤ 2 bf16 ulp (HF rounds x·r to bf16 \
before ·w: two roundings of ½ ulp against our one)";

fn rmsnorm_ref(inputs: &TensorMap, cfg: &Config) -> Result<TensorMap> {
    let x = get(inputs, "x");
    let w = values_f32(get(inputs, "weight"));
    let y = rms_norm(matrix_f32(x).view(), &w, cfg.f64("eps"))?;
    let values: Vec<f32> = y.iter().copied().collect();
    Ok(outputs([(
        "y",
        float_like(x.dtype, x.shape.clone(), &values),
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
            Policy::Close {
                atol: 0.0,
                rtol: (d / 2.0 + 4.0) * U32,
                why: "f32: sum of D squares in any order (γ_D), rsqrt, two products",
            }
        }
    }
}

fn rmsnorm_gen(rng: &mut Rng, _cfg: &Config, sizes: &Sizes) -> TensorMap {
    let d = sizes.get("D").copied().unwrap_or_else(|| rng.range(1, 300));
    let m = sizes.get("M").copied().unwrap_or_else(|| rng.range(1, 5));
    let mut x = Vec::with_capacity(m * d);
    for _ in 0..m {
        // rows of very different magnitudes: eps matters for the small ones
        let scale = (rng.normal() * 3.0).exp() * if rng.chance(0.2) { 1e-4 } else { 1.0 };
        x.extend((0..d).map(|_| (rng.normal() * scale) as f32));
    }
    let w: Vec<f32> = (0..d).map(|_| (1.0 + 0.3 * rng.normal()) as f32).collect();
    outputs([
        ("x", float_input(rng, vec![m, d], &x)),
        ("weight", float_input(rng, vec![d], &w)),
    ])
}
