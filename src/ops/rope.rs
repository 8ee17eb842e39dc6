//! `rope`: rotary embedding of `q_pe` / `k_pe` on interleaved pairs, with YaRN frequencies.

use ndarray::Array3;

use dsv3_reference::rope::{angle, rope, RopeConfig, Yarn};

use super::gen_fits;
use super::{float_input, get, outputs};
use crate::registry::compare::Policy;
use crate::registry::config::{ceil, Config, ConfigSchema, FieldKind};
use crate::registry::contract::{Constraint, Dim, TensorSpec};
use crate::registry::error::{Error, Result};
use crate::registry::io::TensorMap;
use crate::registry::rng::Rng;
use crate::registry::tensor::{DType, Tensor};
use crate::registry::tolerance::{half_bf16_ulp, U32};
use crate::registry::{every_config, GpuImpl, OpEntry, PolicyCtx, Sizes};

crate::choice! {
    /// `rope_type`: plain RoPE or YaRN (the checkpoint's `rope_scaling.type`).
    pub enum RopeType { Default = "default", Yarn = "yarn" }
}

crate::op_config! {
    /// `rope`'s config: the checkpoint's RoPE fields (config.json names).
    pub struct RopeOpConfig {
        rope_theta: f64 = "10000", FieldKind::PositiveFloat, "θ";
        rope_type: RopeType = "\"yarn\"", FieldKind::choice::<RopeType>(), "\"default\" = plain RoPE (no rope_scaling)";
        factor: f64 = "40", FieldKind::PositiveFloat, "YaRN s";
        original_max_position_embeddings: usize = "4096", FieldKind::Int { min: 1, max: ceil::I32 }, "YaRN L0";
        beta_fast: f64 = "32", FieldKind::PositiveFloat, "YaRN β_fast";
        beta_slow: f64 = "1", FieldKind::PositiveFloat, "YaRN β_slow";
        rope_interleave: bool = "true", FieldKind::Bool, "pairs (2i, 2i+1) (DeepSeek); false: (i, i + D/2)";
    }
}

pub static ROPE: OpEntry = OpEntry {
    name: "rope",
    source: "V3 eqs. (3), (8) RoPE(·), §4.3 YaRN; OFF precompute_freqs_cis + apply_rotary_emb; HF DeepseekV3RotaryEmbedding",
    summary: "pair i of each head, (x[2i], x[2i+1]), rotated by φ = p·f'_i (f' = YaRN-blended 1/θ^(2i/d)); y has x's dtype",
    inputs: &[
        TensorSpec { name: "x", dtypes: &[DType::F32, DType::BF16], shape: &[Dim::Var("S"), Dim::Var("H"), Dim::Var("D")], doc: "q_pe [S, H, D] or k_pe [S, 1, D], D even" },
        TensorSpec { name: "positions", dtypes: &[DType::I32, DType::I64], shape: &[Dim::Var("S")], doc: "position of each row" },
    ],
    outputs: &[TensorSpec { name: "y", dtypes: &[DType::F32, DType::BF16], shape: &[Dim::Var("S"), Dim::Var("H"), Dim::Var("D")], doc: "rotated (official interleaved layout)" }],
    constraints: &[Constraint::EvenNonEmpty("D", "RoPE rotates pairs of features")],
    config: ConfigSchema::of::<RopeOpConfig>(),
    adapt: None,
    reference: rope_ref,
    reference_fn: "reference/src/rope.rs::rope",
    gpu: &[GpuImpl {
        backend: "cuda",
        run: crate::gpu_fn!(rope_gpu),
        kernel: "gpu/kernels/rope.cu",
        supports: every_config,
    }],
    policy: rope_policy,
    policy_doc: "per element, with (a, b) its pair and φ its angle: F32 |Δ| ≤ (|a|+|b|)·(|φ|·2^-21 + 2^-21); BF16 \
|Δ| ≤ (|a|+|b|)·(|φ|·2^-21 + 3·2^-9) + 1 bf16 ulp. |φ|·2^-21: f' may differ by 2 f32 ulp between implementations \
(pow is not correctly rounded; HF evaluates the interpolated branch as 1/(s·θ^(2i/d)) instead of OFF's f/s) and φ = p·f' \
is rounded to f32; 2^-21: cos, sin, two products and a sum in f32; 3·2^-9: HF rounds cos and sin to bf16 and computes in \
bf16",
    generate: rope_gen,
    test_configs: &[
        r#"{"rope_type":"default"}"#,
        r#"{"rope_interleave":false}"#,
        r#"{"factor":8,"original_max_position_embeddings":32,"rope_theta":500}"#,
    ],
    v3_sizes: &[&[("S", 4), ("H", 128), ("D", 64)], &[("S", 4), ("H", 1), ("D", 64)]],
};

/// The reference's RoPE config of the op's, for features of width `dim`.
fn rope_config(cfg: &Config, dim: usize) -> RopeConfig {
    let c = cfg.get::<RopeOpConfig>();
    RopeConfig {
        dim,
        theta: c.rope_theta,
        yarn: (c.rope_type == RopeType::Yarn).then_some(Yarn {
            factor: c.factor,
            original_max_position_embeddings: c.original_max_position_embeddings,
            beta_fast: c.beta_fast,
            beta_slow: c.beta_slow,
            mscale_all_dim: 0.0,
        }),
        interleaved: c.rope_interleave,
    }
}

fn positions(t: &Tensor) -> Result<Vec<usize>> {
    (0..t.numel())
        .map(|i| {
            let p = t.value(i);
            if p < 0.0 {
                Err(Error::Reference(dsv3_reference::Error::Value {
                    op: "rope",
                    tensor: "positions",
                    index: vec![i],
                    value: p.to_string(),
                    why: "positions must be ≥ 0",
                }))
            } else {
                Ok(p as usize)
            }
        })
        .collect()
}

fn rope_ref(inputs: &TensorMap, cfg: &Config) -> Result<TensorMap> {
    let x = get(inputs, "x");
    let (s, h, d) = (x.shape[0], x.shape[1], x.shape[2]);
    let rc = rope_config(cfg, d);
    let f = rc.inv_freqs()?;
    let xa = Array3::from_shape_vec((s, h, d), x.floats()).expect("validated shape");
    let y = rope(
        xa.view(),
        &positions(get(inputs, "positions"))?,
        &f,
        rc.interleaved,
    )?;
    let values: Vec<f32> = y.iter().copied().collect();
    Ok(outputs([(
        "y",
        Tensor::from_f32_as(x.dtype, x.shape.clone(), &values),
    )]))
}

#[cfg(feature = "cuda")]
/// The kernel takes the inverse frequencies from the host: the reference's own f32 table (a
/// `D/2`-entry table per model, as OFF precomputes `freqs_cis`), so the angle `f32(p)·f'` is
/// bit-identical to the reference's and only sincos and the rotation differ.
fn rope_gpu(gpu: &dsv3_gpu::Gpu, inputs: &TensorMap, cfg: &Config) -> Result<TensorMap> {
    let x = get(inputs, "x");
    let (s, h, d) = (x.shape[0], x.shape[1], x.shape[2]);
    let rc = rope_config(cfg, d);
    let inv_freq = rc.inv_freqs()?;
    let pos: Vec<i64> = positions(get(inputs, "positions"))?
        .iter()
        .map(|&p| p as i64)
        .collect();
    let y = dsv3_gpu::rope::rope(
        gpu,
        x.kernel_values().as_host(),
        &pos,
        &inv_freq,
        (s, h, d),
        rc.interleaved,
    )?;
    Ok(outputs([("y", Tensor::from_floats(x.shape.clone(), y))]))
}

fn rope_policy<'a>(ctx: &PolicyCtx<'a>) -> Policy<'a> {
    let x = get(ctx.inputs, "x");
    let (h, d) = (x.shape[1], x.shape[2]);
    let xs = x.floats();
    let want = (get(ctx.reference, "y")).floats();
    let got = (get(ctx.candidate, "y")).floats();
    let pos = positions(get(ctx.inputs, "positions")).unwrap_or_default();
    let rc = rope_config(ctx.config, d);
    let f = rc.inv_freqs().unwrap_or_default();
    let bf16 = x.dtype == DType::BF16;
    Policy::Judged {
        why: "within the angle and rounding bound of its pair (SPEC.md)",
        judge: Box::new(move |i| {
            let (s, c) = (i / (h * d), i % d);
            let base = i - c;
            // the pair of feature c and its frequency
            let (pair, i0, i1) = if rc.interleaved {
                (c / 2, base + c / 2 * 2, base + c / 2 * 2 + 1)
            } else {
                let p = c % (d / 2);
                (p, base + p, base + p + d / 2)
            };
            let (Some(&p), Some(&fi)) = (pos.get(s), f.get(pair)) else {
                return None;
            };
            let (g, w) = (f64::from(got[i]), f64::from(want[i]));
            if !(g.is_finite() && w.is_finite()) {
                return None;
            }
            let phi = f64::from(angle(p, fi)).abs();
            let ab = f64::from(xs[i0].abs()) + f64::from(xs[i1].abs());
            let bound = if bf16 {
                ab * (phi * 2f64.powi(-21) + 3.0 * 2f64.powi(-9)) + 2.0 * half_bf16_ulp(w)
            } else {
                ab * (phi * 2f64.powi(-21) + 8.0 * U32)
            };
            ((g - w).abs() <= bound).then_some("within the angle/rounding bound")
        }),
    }
}

fn rope_gen(rng: &mut Rng, _cfg: &Config, sizes: &Sizes) -> Result<TensorMap> {
    let s = sizes.get("S").copied().unwrap_or_else(|| rng.range(1, 6));
    let h = sizes.get("H").copied().unwrap_or_else(|| rng.range(1, 3));
    let d = sizes
        .get("D")
        .copied()
        .unwrap_or_else(|| 2 * rng.range(1, 16));
    gen_fits(&[&[s, h, d], &[s]])?;
    let x: Vec<f32> = (0..s * h * d).map(|_| rng.normal() as f32).collect();
    let pos: Vec<i64> = (0..s)
        .map(|_| {
            if rng.chance(0.5) {
                rng.range(0, 16) as i64
            } else {
                rng.range(0, 163_839) as i64
            }
        })
        .collect();
    let positions = if rng.chance(0.5) {
        Tensor::from_i64(vec![s], &pos)
    } else {
        Tensor::from_bytes(
            DType::I32,
            vec![s],
            pos.iter().flat_map(|&p| (p as i32).to_le_bytes()).collect(),
        )
        .expect("one value per element")
    };
    Ok(outputs([
        ("x", float_input(rng, vec![s, h, d], &x)),
        ("positions", positions),
    ]))
}
