//! `weight_quant`: B×B block quantization of a weight.

use dsv3_reference::fp8;

use super::gen_fits;
use super::quant_policy::quant_policy;
use super::{float_input, get, outputs, quant_values, QuantConfig, QUANT_BLOCK};
use crate::registry::compare::Policy;
use crate::registry::config::{Config, ConfigSchema};
use crate::registry::contract::{Dim, TensorSpec};
use crate::registry::error::Result;
use crate::registry::io::TensorMap;
use crate::registry::rng::Rng;
use crate::registry::tensor::{DType, Tensor};
use crate::registry::{every_config, GpuImpl, OpEntry, PolicyCtx, Sizes};
#[cfg(feature = "cuda")]
use dsv3_gpu::HostFloats;

pub static WEIGHT_QUANT: OpEntry = OpEntry {
    name: "weight_quant",
    source: "V3 §3.3.2 (128×128 weight blocks); checkpoint `weight` + `weight_scale_inv`; DeepGEMM per_block_cast_to_fp8",
    summary: "per B×B block (partial edges allowed): s = max(amax,1e-4)/448 [ue8m0: next power of two], y = e4m3_satfinite(w/s)",
    inputs: &[TensorSpec { name: "w", dtypes: &[DType::F32, DType::BF16], shape: &[Dim::Var("N"), Dim::Var("K")], doc: "weight [out, in]" }],
    outputs: &[
        TensorSpec { name: "y", dtypes: &[DType::F8E4M3], shape: &[Dim::Var("N"), Dim::Var("K")], doc: "E4M3 codes" },
        TensorSpec {
            name: "s",
            dtypes: &[DType::F32],
            shape: &[Dim::CeilDiv("N", QUANT_BLOCK), Dim::CeilDiv("K", QUANT_BLOCK)],
            doc: "one scale per block (the checkpoint's weight_scale_inv)",
        },
    ],
    constraints: &[],
    config: ConfigSchema::of::<QuantConfig>(),
    adapt: None,
    reference: weight_quant_ref,
    reference_fn: "reference/src/fp8/weight_quant.rs::weight_quant",
    gpu: &[GpuImpl { backend: "cuda", run: crate::gpu_fn!(weight_quant_gpu), kernel: "gpu/kernels/weight_quant.cu", supports: every_config }],
    policy: weight_quant_policy,
    policy_doc: "as act_quant (same division hazard), over B×B blocks",
    generate: weight_quant_gen,
    test_configs: &[r#"{"scale_fmt":"ue8m0"}"#, r#"{"block_size":16}"#],
    v3_sizes: &[&[("N", 576), ("K", 7168)], &[("N", 2112), ("K", 7168)]],
};

fn weight_quant_ref(inputs: &TensorMap, cfg: &Config) -> Result<TensorMap> {
    let w = get(inputs, "w");
    let q = fp8::weight_quant(
        w.matrix_f32().view(),
        cfg.get::<QuantConfig>().block_size,
        cfg.get::<QuantConfig>().scale_fmt,
    )?;
    Ok(outputs([
        (
            "y",
            Tensor::from_code_matrix(DType::F8E4M3, w.shape.clone(), q.y.view()),
        ),
        ("s", Tensor::from_matrix(q.s.shape().to_vec(), q.s.view())),
    ]))
}

#[cfg(feature = "cuda")]
fn weight_quant_gpu(gpu: &dsv3_gpu::Gpu, inputs: &TensorMap, cfg: &Config) -> Result<TensorMap> {
    let w = get(inputs, "w");
    let (n, k) = (w.shape[0], w.shape[1]);
    let block = cfg.get::<QuantConfig>().block_size;
    let ue8m0 = cfg.get::<QuantConfig>().scale_fmt == fp8::ScaleFmt::Ue8m0;
    let out = match w.dtype {
        DType::BF16 => dsv3_gpu::weight_quant::weight_quant(
            gpu,
            HostFloats::Bf16(&w.to_u16_bits()),
            n,
            k,
            block,
            ue8m0,
        )?,
        _ => dsv3_gpu::weight_quant::weight_quant(
            gpu,
            HostFloats::F32(&w.to_f32().expect("F32")),
            n,
            k,
            block,
            ue8m0,
        )?,
    };
    Ok(outputs([
        (
            "y",
            Tensor::from_codes(DType::F8E4M3, w.shape.clone(), out.y),
        ),
        (
            "s",
            Tensor::from_f32(vec![n.div_ceil(block), k.div_ceil(block)], &out.s),
        ),
    ]))
}

fn weight_quant_policy<'a>(ctx: &PolicyCtx<'a>) -> Policy<'a> {
    let b = ctx.config.get::<QuantConfig>().block_size;
    quant_policy(ctx, "w", b, b)
}

fn weight_quant_gen(rng: &mut Rng, cfg: &Config, sizes: &Sizes) -> Result<TensorMap> {
    let block = cfg.get::<QuantConfig>().block_size;
    let n = sizes
        .get("N")
        .copied()
        .unwrap_or_else(|| rng.range(1, 2 * block + 5));
    let k = sizes
        .get("K")
        .copied()
        .unwrap_or_else(|| rng.range(1, 2 * block + 5));
    gen_fits(&[&[n, k]])?;
    let values = quant_values(rng, n, k, block);
    Ok(outputs([("w", float_input(rng, vec![n, k], &values))]))
}
