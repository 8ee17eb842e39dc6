//! `act_quant` (1×B tiles) and `act_quant_128x1` (B×1 tiles).

use dsv3_reference::fp8;

use super::gen_fits;
use super::quant_policy::quant_policy;
use super::{float_input, get, outputs, quant_values, QuantConfig, QUANT_BLOCK};
use crate::registry::compare::Policy;
use crate::registry::config::{Config, ConfigSchema};
use crate::registry::contract::{Constraint, Dim, TensorSpec};
use crate::registry::error::Result;
use crate::registry::io::TensorMap;
use crate::registry::rng::Rng;
use crate::registry::tensor::{DType, Tensor};
use crate::registry::{every_config, GpuImpl, OpEntry, PolicyCtx, Sizes};

const QUANT_POLICY_DOC: &str = "y: exact, except a neighbouring E4M3 code where x/s' lies within 2.5 f32-ulp of the \
midpoint between the two codes (s' = the candidate's scale; approximate division div.full.f32 ≤ 2 ulp + ½ ulp quotient \
rounding); s: ≤ 2 ulp of max(amax,1e-4)/448 (approximate division), with ue8m0 the power-of-two ceiling of such a value. \
An IEEE-division kernel (ours) is bit-exact.";

pub static ACT_QUANT: OpEntry = OpEntry {
    name: "act_quant",
    source: "V3 §3.3.2 (1×128 activation tiles, online scales); OFF kernel.py act_quant",
    summary:
        "per 1×B tile: s = max(amax,1e-4)/448 [ue8m0: next power of two], y = e4m3_satfinite(x/s)",
    inputs: &[TensorSpec {
        name: "x",
        dtypes: &[DType::F32, DType::BF16],
        shape: &[Dim::Batch, Dim::Var("K")],
        doc: "activations",
    }],
    outputs: &[
        TensorSpec {
            name: "y",
            dtypes: &[DType::F8E4M3],
            shape: &[Dim::Batch, Dim::Var("K")],
            doc: "E4M3 codes",
        },
        TensorSpec {
            name: "s",
            dtypes: &[DType::F32],
            shape: &[Dim::Batch, Dim::Div("K", QUANT_BLOCK)],
            doc: "one scale per tile",
        },
    ],
    constraints: &[Constraint::MultipleOf("K", QUANT_BLOCK)],
    config: ConfigSchema::of::<QuantConfig>(),
    adapt: None,
    reference: act_quant_ref,
    reference_fn: "reference/src/fp8/act_quant.rs::act_quant",
    gpu: &[GpuImpl {
        backend: "cuda",
        run: crate::gpu_fn!(act_quant_gpu),
        kernel: "gpu/kernels/act_quant.cu",
        supports: every_config,
    }],
    policy: act_quant_policy,
    policy_doc: QUANT_POLICY_DOC,
    generate: act_quant_gen,
    test_configs: &[
        r#"{"scale_fmt":"ue8m0"}"#,
        r#"{"block_size":64}"#,
        r#"{"block_size":32,"scale_fmt":"ue8m0"}"#,
    ],
    v3_sizes: &[
        &[("M", 4), ("K", 7168)],
        &[("M", 4), ("K", 1536)],
        &[("M", 4), ("K", 512)],
        &[("M", 4), ("K", 2048)],
        &[("M", 2), ("K", 16384)],
    ],
};

fn act_quant_ref(inputs: &TensorMap, cfg: &Config) -> Result<TensorMap> {
    let x = get(inputs, "x");
    let q = fp8::act_quant(
        x.matrix_f32().view(),
        cfg.get::<QuantConfig>().block_size,
        cfg.get::<QuantConfig>().scale_fmt,
    )?;
    let mut s_shape = x.shape.clone();
    *s_shape.last_mut().expect("rank ≥ 1") /= cfg.get::<QuantConfig>().block_size;
    Ok(outputs([
        (
            "y",
            Tensor::from_code_matrix(DType::F8E4M3, x.shape.clone(), q.y.view()),
        ),
        ("s", Tensor::from_matrix(s_shape, q.s.view())),
    ]))
}

#[cfg(feature = "cuda")]
fn act_quant_gpu(gpu: &dsv3_gpu::Gpu, inputs: &TensorMap, cfg: &Config) -> Result<TensorMap> {
    use dsv3_gpu::{act_quant::act_quant, HostFloats};
    let x = get(inputs, "x");
    let (m, k) = x.rows_cols();
    let block = cfg.get::<QuantConfig>().block_size;
    let ue8m0 = cfg.get::<QuantConfig>().scale_fmt == fp8::ScaleFmt::Ue8m0;
    let out = match x.dtype {
        DType::BF16 => act_quant(gpu, HostFloats::Bf16(&x.to_u16_bits()), m, k, block, ue8m0)?,
        _ => act_quant(
            gpu,
            HostFloats::F32(&x.to_f32().expect("F32")),
            m,
            k,
            block,
            ue8m0,
        )?,
    };
    let mut s_shape = x.shape.clone();
    *s_shape.last_mut().expect("rank ≥ 1") /= block;
    Ok(outputs([
        (
            "y",
            Tensor::from_codes(DType::F8E4M3, x.shape.clone(), out.y),
        ),
        ("s", Tensor::from_f32(s_shape, &out.s)),
    ]))
}

fn act_quant_policy<'a>(ctx: &PolicyCtx<'a>) -> Policy<'a> {
    quant_policy(ctx, "x", 1, ctx.config.get::<QuantConfig>().block_size)
}

fn act_quant_gen(rng: &mut Rng, cfg: &Config, sizes: &Sizes) -> Result<TensorMap> {
    let block = cfg.get::<QuantConfig>().block_size;
    let m = sizes.get("M").copied().unwrap_or_else(|| rng.range(1, 9));
    let k = sizes
        .get("K")
        .copied()
        .unwrap_or_else(|| block * rng.range(1, 4));
    gen_fits(&[&[m, k]])?;
    let values = quant_values(rng, m, k, block);
    Ok(outputs([("x", float_input(rng, vec![m, k], &values))]))
}

pub static ACT_QUANT_128X1: OpEntry = OpEntry {
    name: "act_quant_128x1",
    source: "V3 §3.3.2 & App. B.2 (activations re-tiled 1×128 → 128×1 for Wgrad)",
    summary: "per B×1 tile (B tokens of one channel): s = max(amax,1e-4)/448, y = e4m3_satfinite(x/s); partial last tile allowed",
    inputs: &[TensorSpec { name: "x", dtypes: &[DType::F32, DType::BF16], shape: &[Dim::Var("M"), Dim::Var("K")], doc: "activations or activation gradients" }],
    outputs: &[
        TensorSpec { name: "y", dtypes: &[DType::F8E4M3], shape: &[Dim::Var("M"), Dim::Var("K")], doc: "E4M3 codes" },
        TensorSpec { name: "s", dtypes: &[DType::F32], shape: &[Dim::CeilDiv("M", QUANT_BLOCK), Dim::Var("K")], doc: "one scale per tile" },
    ],
    constraints: &[],
    config: ConfigSchema::of::<QuantConfig>(),
    adapt: None,
    reference: act_quant_128x1_ref,
    reference_fn: "reference/src/fp8/act_quant.rs::act_quant_128x1",
    gpu: &[],
    policy: act_quant_128x1_policy,
    policy_doc: QUANT_POLICY_DOC,
    generate: act_quant_128x1_gen,
    test_configs: &[r#"{"scale_fmt":"ue8m0"}"#, r#"{"block_size":16}"#],
    v3_sizes: &[&[("M", 4096), ("K", 4)]],
};

fn act_quant_128x1_ref(inputs: &TensorMap, cfg: &Config) -> Result<TensorMap> {
    let x = get(inputs, "x");
    let q = fp8::act_quant_128x1(
        x.matrix_f32().view(),
        cfg.get::<QuantConfig>().block_size,
        cfg.get::<QuantConfig>().scale_fmt,
    )?;
    Ok(outputs([
        (
            "y",
            Tensor::from_code_matrix(DType::F8E4M3, x.shape.clone(), q.y.view()),
        ),
        ("s", Tensor::from_matrix(q.s.shape().to_vec(), q.s.view())),
    ]))
}

fn act_quant_128x1_policy<'a>(ctx: &PolicyCtx<'a>) -> Policy<'a> {
    quant_policy(ctx, "x", ctx.config.get::<QuantConfig>().block_size, 1)
}

fn act_quant_128x1_gen(rng: &mut Rng, cfg: &Config, sizes: &Sizes) -> Result<TensorMap> {
    let block = cfg.get::<QuantConfig>().block_size;
    let m = sizes
        .get("M")
        .copied()
        .unwrap_or_else(|| rng.range(1, 2 * block + 3));
    let k = sizes.get("K").copied().unwrap_or_else(|| rng.range(1, 6));
    gen_fits(&[&[m, k]])?;
    let values = quant_values(rng, m, k, block);
    Ok(outputs([("x", float_input(rng, vec![m, k], &values))]))
}
