//! `weight_dequant`: E4M3 codes × block scales → f32 or bf16.

use dsv3_reference::fp8::{self, Saturation, E4M3};
use dsv3_reference::numeric::round_to_bf16;

use super::gen_fits;
use super::{get, outputs, quant_values, OutDtype, BLOCK_KIND};
use crate::registry::compare::Policy;
use crate::registry::config::{Config, ConfigSchema, FieldKind};
use crate::registry::contract::Param;
use crate::registry::contract::{Dim, TensorSpec};
use crate::registry::error::Result;
use crate::registry::io::TensorMap;
use crate::registry::rng::Rng;
use crate::registry::tensor::{DType, Tensor};
use crate::registry::{every_config, GpuImpl, OpEntry, PolicyCtx, Sizes};

crate::op_config! {
    /// `weight_dequant`'s config.
    pub struct DequantConfig {
        block_size: usize = "128", BLOCK_KIND, "tile edge; 128 in DeepSeek-V3";
        out_dtype: OutDtype = "\"bf16\"", FieldKind::choice::<OutDtype>(),
            "bf16 as OFF (default dtype of the official run), f32 to see the exact product";
    }
}

const BLOCK: Param = Param {
    name: "block_size",
    get: |c| c.get::<DequantConfig>().block_size,
};

pub static WEIGHT_DEQUANT: OpEntry = OpEntry {
    name: "weight_dequant",
    source: "OFF kernel.py weight_dequant, fp8_cast_bf16.py; checkpoint weight × weight_scale_inv",
    summary: "w[n,k] = f32(y[n,k]) · s[n/B, k/B] (one f32 multiply); out_dtype bf16 rounds that product to bf16 (RNE)",
    inputs: &[
        TensorSpec { name: "y", dtypes: &[DType::F8E4M3], shape: &[Dim::Var("N"), Dim::Var("K")], doc: "E4M3 codes" },
        TensorSpec {
            name: "s",
            dtypes: &[DType::F32],
            shape: &[Dim::CeilDiv("N", BLOCK), Dim::CeilDiv("K", BLOCK)],
            doc: "block scales (weight_scale_inv)",
        },
    ],
    outputs: &[TensorSpec { name: "w", dtypes: &[DType::F32, DType::BF16], shape: &[Dim::Var("N"), Dim::Var("K")], doc: "dequantized weight (dtype = out_dtype)" }],
    constraints: &[],
    config: ConfigSchema::of::<DequantConfig>(),
    adapt: None,
    reference: weight_dequant_ref,
    reference_fn: "reference/src/fp8/weight_dequant.rs::weight_dequant",
    gpu: &[GpuImpl { backend: "cuda", run: crate::gpu_fn!(weight_dequant_gpu), kernel: "gpu/kernels/weight_dequant.cu", supports: every_config }],
    policy: weight_dequant_policy,
    policy_doc: "exact: one IEEE f32 multiply (then one RNE to bf16); there is no approximate step to allow for",
    generate: weight_dequant_gen,
    test_configs: &[r#"{"out_dtype":"f32"}"#, r#"{"block_size":16}"#],
    v3_sizes: &[&[("N", 576), ("K", 7168)]],
};

fn weight_dequant_ref(inputs: &TensorMap, cfg: &Config) -> Result<TensorMap> {
    let y = get(inputs, "y");
    let s = get(inputs, "s");
    let s2 = ndarray::Array2::from_shape_vec((s.shape[0], s.shape[1]), s.to_f32().expect("F32"))
        .expect("validated");
    let cfg = cfg.get::<DequantConfig>();
    let w = fp8::weight_dequant(y.matrix_u8().view(), s2.view(), cfg.block_size)?;
    let values: Vec<f32> = w.iter().copied().collect();
    let out = match cfg.out_dtype {
        OutDtype::F32 => Tensor::from_f32(y.shape.clone(), &values),
        OutDtype::Bf16 => Tensor::from_bf16(
            y.shape.clone(),
            &values.iter().map(|&v| round_to_bf16(v)).collect::<Vec<_>>(),
        ),
    };
    Ok(outputs([("w", out)]))
}

#[cfg(feature = "cuda")]
fn weight_dequant_gpu(gpu: &dsv3_gpu::Gpu, inputs: &TensorMap, cfg: &Config) -> Result<TensorMap> {
    use dsv3_gpu::weight_dequant::weight_dequant;
    let y = get(inputs, "y");
    let s = get(inputs, "s");
    let (n, k) = (y.shape[0], y.shape[1]);
    let cfg = cfg.get::<DequantConfig>();
    let bf16_out = cfg.out_dtype == OutDtype::Bf16;
    let w = weight_dequant(
        gpu,
        &y.data,
        &s.to_f32().expect("F32"),
        n,
        k,
        cfg.block_size,
        bf16_out,
    )?;
    Ok(outputs([("w", Tensor::from_floats(vec![n, k], w))]))
}

fn weight_dequant_policy<'a>(_: &PolicyCtx<'a>) -> Policy<'a> {
    Policy::Exact
}

fn weight_dequant_gen(rng: &mut Rng, cfg: &Config, sizes: &Sizes) -> Result<TensorMap> {
    let block = cfg.get::<DequantConfig>().block_size;
    let n = sizes
        .get("N")
        .copied()
        .unwrap_or_else(|| rng.range(1, 2 * block + 5));
    let k = sizes
        .get("K")
        .copied()
        .unwrap_or_else(|| rng.range(1, 2 * block + 5));
    gen_fits(&[&[n, k]])?;
    let codes: Vec<u8> = quant_values(rng, n, k, block)
        .iter()
        .map(|&v| E4M3.encode(v.clamp(-448.0, 448.0), Saturation::SatFinite) as u8)
        .collect();
    let grid = n.div_ceil(block) * k.div_ceil(block);
    let scales: Vec<f32> = (0..grid)
        .map(|_| ((rng.normal() * 4.0).exp() * 1e-3) as f32)
        .collect();
    Ok(outputs([
        ("y", Tensor::from_codes(DType::F8E4M3, vec![n, k], codes)),
        (
            "s",
            Tensor::from_f32(vec![n.div_ceil(block), k.div_ceil(block)], &scales),
        ),
    ]))
}
