//! `swiglu`: `y = silu(gate) ⊙ up`, the middle of every DeepSeek-V3 FFN.

use dsv3_reference::mlp::swiglu;

use super::{float_input, float_like, get, matrix_f32, outputs};
use crate::compare::Policy;
use crate::config::Config;
use crate::contract::{Dim, TensorSpec};
use crate::error::Result;
use crate::io::TensorMap;
use crate::registry::{OpEntry, PolicyCtx, Sizes};
use crate::rng::Rng;
use crate::tensor::DType;

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
    config: &[],
    reference: swiglu_ref,
    reference_fn: "reference/src/mlp.rs::swiglu",
    gpu: &[],
    policy: swiglu_policy,
    policy_doc: "F32 y: |Δ| ≤ 2^-21·|y| + 2^-100 (exp ≤ 2 ulp, 1 + e, a division and two products: ≤ 8 roundings of \
2^-24; the 2^-100 covers silu underflowing to ±0 in f32 for gate < −88); BF16 y: ≤ 2 bf16 ulp (torch rounds silu and \
the product to bf16: two roundings against our one)",
    generate: swiglu_gen,
    test_configs: &[],
    v3_sizes: &[&[("M", 4), ("I", 2048)], &[("M", 4), ("I", 18432)]],
};

fn swiglu_ref(inputs: &TensorMap, _cfg: &Config) -> Result<TensorMap> {
    let (g, u) = (get(inputs, "gate"), get(inputs, "up"));
    let y = swiglu(matrix_f32(g).view(), matrix_f32(u).view())?;
    let values: Vec<f32> = y.iter().copied().collect();
    Ok(outputs([(
        "y",
        float_like(g.dtype, g.shape.clone(), &values),
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
            rtol: 2f64.powi(-21),
            why: "f32: ≤ 8 roundings of 2^-24 (exp, 1+e, division, two products)",
        },
    }
}

fn swiglu_gen(rng: &mut Rng, _cfg: &Config, sizes: &Sizes) -> TensorMap {
    let i = sizes.get("I").copied().unwrap_or_else(|| rng.range(1, 200));
    let m = sizes.get("M").copied().unwrap_or_else(|| rng.range(1, 5));
    let wide = rng.chance(0.3);
    let g: Vec<f32> = (0..m * i)
        .map(|_| (rng.normal() * if wide { 30.0 } else { 2.0 }) as f32)
        .collect();
    let u: Vec<f32> = (0..m * i).map(|_| rng.normal() as f32).collect();
    let gate = float_input(rng, vec![m, i], &g);
    // up in the same dtype as gate (one GEMM output dtype)
    let up = match gate.dtype {
        DType::BF16 => float_like(DType::BF16, vec![m, i], &u),
        _ => crate::tensor::Tensor::from_f32(vec![m, i], &u),
    };
    outputs([("gate", gate), ("up", up)])
}
