//! Tensor ↔ value helpers for the training-side ops (f64, i64 and bool tensors), and the
//! per-element interval policy their derived tolerances use.

use crate::compare::Policy;
use crate::registry::PolicyCtx;
use crate::tensor::{DType, Tensor};

use super::get;

/// An F64 tensor.
pub(crate) fn f64_tensor(shape: Vec<usize>, values: &[f64]) -> Tensor {
    let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    Tensor::from_bytes(DType::F64, shape, data).expect("numel matches the shape")
}

/// An I64 tensor.
pub(crate) fn i64_tensor(shape: Vec<usize>, values: &[i64]) -> Tensor {
    let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    Tensor::from_bytes(DType::I64, shape, data).expect("numel matches the shape")
}

/// A BOOL tensor.
pub(crate) fn bool_tensor(shape: Vec<usize>, values: &[bool]) -> Tensor {
    let data = values.iter().map(|&b| u8::from(b)).collect();
    Tensor::from_bytes(DType::Bool, shape, data).expect("numel matches the shape")
}

/// Values rounded to `dtype` (F32 by RNE, F64 as is, BF16 by RNE).
pub(crate) fn float_tensor(dtype: DType, shape: Vec<usize>, values: &[f64]) -> Tensor {
    match dtype {
        DType::F64 => f64_tensor(shape, values),
        DType::BF16 => Tensor::from_bf16(
            shape,
            &values
                .iter()
                .map(|&v| half::bf16::from_f64(v))
                .collect::<Vec<_>>(),
        ),
        _ => Tensor::from_f32(shape, &values.iter().map(|&v| v as f32).collect::<Vec<_>>()),
    }
}

/// Every element as f64 (exact for floats and integers up to 2^53).
pub(crate) fn values(t: &Tensor) -> Vec<f64> {
    (0..t.numel()).map(|i| t.value(i)).collect()
}

/// Every element as bool (non-zero = true).
pub(crate) fn bools(t: &Tensor) -> Vec<bool> {
    (0..t.numel()).map(|i| t.value(i) != 0.0).collect()
}

/// Unit roundoff of a floating dtype (half an ulp of 1).
pub(crate) fn unit_roundoff(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => f64::EPSILON / 2.0,
        DType::BF16 => 2f64.powi(-8),
        DType::F16 => 2f64.powi(-11),
        _ => f64::from(f32::EPSILON) / 2.0,
    }
}

/// Bit-exact, or inside `[lo[i], hi[i]]` (computed from the inputs by the op's derivation).
pub(crate) fn interval_policy<'a>(
    ctx: &PolicyCtx<'a>,
    why: &'static str,
    lo: Vec<f64>,
    hi: Vec<f64>,
) -> Policy<'a> {
    let got = get(ctx.candidate, ctx.output);
    Policy::ExactUnless {
        why,
        allow: Box::new(move |i| {
            let v = got.value(i);
            v >= lo[i] && v <= hi[i]
        }),
    }
}

/// Bit-exact, or `|got − ref| ≤ bound[i]`.
pub(crate) fn bound_policy<'a>(
    ctx: &PolicyCtx<'a>,
    why: &'static str,
    bound: &[f64],
) -> Policy<'a> {
    let want = values(get(ctx.reference, ctx.output));
    let lo = want.iter().zip(bound).map(|(w, b)| w - b).collect();
    let hi = want.iter().zip(bound).map(|(w, b)| w + b).collect();
    interval_policy(ctx, why, lo, hi)
}
