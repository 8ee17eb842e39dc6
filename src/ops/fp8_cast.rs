//! `fp8_cast` (f32 → codes) and `fp8_decode` (codes → f32) for E4M3, E5M2, E5M6 and UE8M0.

use dsv3_reference::fp8::{ue8m0, Format, Saturation, E4M3, E5M2, E5M6};

use super::gen_fits;
use super::{get, outputs};
use crate::registry::compare::Policy;
use crate::registry::config::{Config, ConfigSchema, FieldKind, NoConfig};
use crate::registry::contract::{Dim, TensorSpec};
use crate::registry::error::{Error, Result};
use crate::registry::io::TensorMap;
use crate::registry::rng::Rng;
use crate::registry::tensor::{DType, Tensor};
use crate::registry::{OpEntry, PolicyCtx, Sizes};

const CODE_DTYPES: &[DType] = &[DType::F8E4M3, DType::F8E5M2, DType::F8E8M0, DType::U16];

crate::choice! {
    /// The target format of `fp8_cast`.
    pub enum CastFormat { E4m3 = "e4m3", E5m2 = "e5m2", E5m6 = "e5m6", Ue8m0 = "ue8m0" }
}

crate::choice! {
    /// UE8M0 rounding: the cast's nearest power of two, or the next one up (DeepSeek's scales).
    pub enum Ue8m0Rounding { Nearest = "nearest", Ceil = "ceil" }
}

crate::op_config! {
    /// `fp8_cast`'s config.
    pub struct CastConfig {
        format: CastFormat = "\"e4m3\"", FieldKind::choice::<CastFormat>(), "target format";
        saturate: bool = "true", FieldKind::Bool,
            "e4m3/e5m2/e5m6: clamp overflow and ±inf to ±max (satfinite) instead of inf/NaN";
        rounding: Ue8m0Rounding = "\"nearest\"", FieldKind::choice::<Ue8m0Rounding>(),
            "ue8m0 only: nearest power of two (the ml_dtypes/torch cast) or the next one up (scale rounding)";
    }
}

pub static FP8_CAST: OpEntry = OpEntry {
    name: "fp8_cast",
    source: "OCP FP8 (E4M3 \"FN\", E5M2), OCP MX E8M0, V3 §3.3.3 E5M6 (our 12-bit definition, SPEC.md)",
    summary: "f32 → code, round-to-nearest-even; saturate: overflow/inf → ±max (CUDA satfinite) or inf/NaN (ml_dtypes); \
ue8m0 rounding nearest (the cast) or ceil (DeepSeek's scale rounding); E5M6 codes are stored in U16",
    inputs: &[TensorSpec { name: "x", dtypes: &[DType::F32], shape: &[Dim::Batch], doc: "values" }],
    outputs: &[TensorSpec { name: "y", dtypes: CODE_DTYPES, shape: &[Dim::Batch], doc: "codes (dtype from format)" }],
    constraints: &[],
    config: ConfigSchema::of::<CastConfig>(),
    adapt: None,
    reference: fp8_cast_ref,
    reference_fn: "reference/src/fp8/format.rs::Format::encode",
    gpu: &[],
    policy: exact,
    policy_doc: "exact: the formats define every bit (RNE of the exact value, a fixed overflow and NaN rule)",
    generate: fp8_cast_gen,
    test_configs: &[
        r#"{"saturate":false}"#,
        r#"{"format":"e5m2"}"#,
        r#"{"format":"e5m2","saturate":false}"#,
        r#"{"format":"e5m6"}"#,
        r#"{"format":"e5m6","saturate":false}"#,
        r#"{"format":"ue8m0"}"#,
        r#"{"format":"ue8m0","rounding":"ceil"}"#,
    ],
    v3_sizes: &[],
};

/// The format and code dtype of a minifloat target (`None`: UE8M0, which has its own rounding).
fn format_of(format: CastFormat) -> Option<(Format, DType)> {
    match format {
        CastFormat::E4m3 => Some((E4M3, DType::F8E4M3)),
        CastFormat::E5m2 => Some((E5M2, DType::F8E5M2)),
        CastFormat::E5m6 => Some((E5M6, DType::U16)),
        CastFormat::Ue8m0 => None,
    }
}

fn fp8_cast_ref(inputs: &TensorMap, cfg: &Config) -> Result<TensorMap> {
    let x = get(inputs, "x");
    let v = x.to_f32().expect("F32");
    let shape = x.shape.clone();
    let cfg = cfg.get::<CastConfig>();
    let y = match format_of(cfg.format) {
        Some((format, dtype)) => {
            if cfg.rounding != Ue8m0Rounding::Nearest {
                return Err(Error::Config {
                    op: "fp8_cast",
                    msg: "`rounding` = \"ceil\" applies to ue8m0 only".into(),
                });
            }
            let sat = if cfg.saturate {
                Saturation::SatFinite
            } else {
                Saturation::NonSat
            };
            let codes: Vec<u16> = v.iter().map(|&x| format.encode(x, sat)).collect();
            if dtype == DType::U16 {
                Tensor::from_u16(shape, &codes)
            } else {
                Tensor::from_codes(dtype, shape, codes.iter().map(|&c| c as u8).collect())
            }
        }
        None => {
            let codes = match cfg.rounding {
                Ue8m0Rounding::Ceil => v
                    .iter()
                    .map(|&x| ue8m0::encode_ceil(x).unwrap_or(ue8m0::NAN_CODE))
                    .collect(),
                Ue8m0Rounding::Nearest => v.iter().map(|&x| ue8m0::encode_nearest(x)).collect(),
            };
            Tensor::from_codes(DType::F8E8M0, shape, codes)
        }
    };
    Ok(outputs([("y", y)]))
}

fn exact<'a>(_: &PolicyCtx<'a>) -> Policy<'a> {
    Policy::Exact
}

/// Random bit patterns (every class: normals, subnormals, ±0, inf, NaN) and values near each
/// format's ties and overflow threshold.
fn fp8_cast_gen(rng: &mut Rng, _cfg: &Config, sizes: &Sizes) -> Result<TensorMap> {
    let n = sizes.get("N").copied().unwrap_or_else(|| rng.range(1, 300));
    gen_fits(&[&[n]])?;
    let v: Vec<f32> = (0..n)
        .map(|_| match rng.range(0, 3) {
            0 => f32::from_bits(rng.next_u64() as u32),
            1 => (rng.normal() * 100.0) as f32,
            2 => *rng.pick(&[
                0.0,
                -0.0,
                f32::INFINITY,
                f32::NAN,
                464.0,
                465.0,
                61440.0,
                65280.0,
                2f32.powi(-10),
                1.5,
                3.0,
            ]),
            _ => (rng.normal() * 1e-3) as f32,
        })
        .collect();
    Ok(outputs([("x", Tensor::from_f32(vec![n], &v))]))
}

pub static FP8_DECODE: OpEntry = OpEntry {
    name: "fp8_decode",
    source: "OCP FP8 / MX definitions; E5M6 as in SPEC.md",
    summary: "code → exact f32 value; the format follows the dtype (F8_E4M3, F8_E5M2, F8_E8M0, U16 = E5M6); NaN codes → 0x7FC00000 with the code's sign",
    inputs: &[TensorSpec { name: "y", dtypes: CODE_DTYPES, shape: &[Dim::Batch], doc: "codes" }],
    outputs: &[TensorSpec { name: "x", dtypes: &[DType::F32], shape: &[Dim::Batch], doc: "values" }],
    constraints: &[],
    config: ConfigSchema::of::<NoConfig>(),
    adapt: None,
    reference: fp8_decode_ref,
    reference_fn: "reference/src/fp8/format.rs::Format::decode",
    gpu: &[],
    policy: exact,
    policy_doc: "exact: every code has one exact f32 value (NaN as the quiet NaN of the code's sign)",
    generate: fp8_decode_gen,
    test_configs: &[],
    v3_sizes: &[],
};

fn fp8_decode_ref(inputs: &TensorMap, _cfg: &Config) -> Result<TensorMap> {
    let y = get(inputs, "y");
    let values: Vec<f32> = match y.dtype {
        DType::F8E4M3 => y.data.iter().map(|&c| E4M3.decode(u16::from(c))).collect(),
        DType::F8E5M2 => y.data.iter().map(|&c| E5M2.decode(u16::from(c))).collect(),
        DType::F8E8M0 => y.data.iter().map(|&c| ue8m0::decode(c)).collect(),
        _ => {
            let codes = y.to_u16().expect("U16");
            if let Some((i, c)) = codes
                .iter()
                .enumerate()
                .find(|(_, &c)| c >= 1 << E5M6.bits())
            {
                return Err(dsv3_reference::Error::Value {
                    op: "fp8_decode",
                    tensor: "y",
                    index: crate::registry::tensor::unravel(i, &y.shape),
                    value: format!("{c:#x}"),
                    why: "E5M6 codes have 12 bits (U16 values below 0x1000)",
                }
                .into());
            }
            codes.iter().map(|&c| E5M6.decode(c)).collect()
        }
    };
    Ok(outputs([("x", Tensor::from_f32(y.shape.clone(), &values))]))
}

fn fp8_decode_gen(rng: &mut Rng, _cfg: &Config, sizes: &Sizes) -> Result<TensorMap> {
    let n = sizes.get("N").copied().unwrap_or_else(|| rng.range(1, 300));
    gen_fits(&[&[n]])?;
    let y = match rng.range(0, 3) {
        0 => Tensor::from_codes(
            DType::F8E4M3,
            vec![n],
            (0..n).map(|_| rng.next_u64() as u8).collect(),
        ),
        1 => Tensor::from_codes(
            DType::F8E5M2,
            vec![n],
            (0..n).map(|_| rng.next_u64() as u8).collect(),
        ),
        2 => Tensor::from_codes(
            DType::F8E8M0,
            vec![n],
            (0..n).map(|_| rng.next_u64() as u8).collect(),
        ),
        _ => Tensor::from_u16(
            vec![n],
            &(0..n)
                .map(|_| (rng.next_u64() & 0xFFF) as u16)
                .collect::<Vec<_>>(),
        ),
    };
    Ok(outputs([("y", y)]))
}
