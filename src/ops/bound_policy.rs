//! The per-element policies of derived bounds: an interval or a distance per element,
//! computed from the inputs by the op's derivation (training-side ops, balance loss).

use crate::registry::compare::Policy;
use crate::registry::io::TensorMap;
use crate::registry::tensor::{DType, Tensor};
use crate::registry::tolerance::rounded_bound_use;
use crate::registry::PolicyCtx;

use super::get;

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
    let want = (get(ctx.reference, ctx.output)).values();
    let lo = want.iter().zip(bound).map(|(w, b)| w - b).collect();
    let hi = want.iter().zip(bound).map(|(w, b)| w + b).collect();
    interval_policy(ctx, why, lo, hi)
}

/// The reference's auxiliary tensor holding output `name`'s exact (unrounded) values.
fn aux_exact(name: &str) -> String {
    format!("aux:exact:{name}")
}

/// The reference's auxiliary tensor holding output `name`'s tolerances.
fn aux_tolerance(name: &str) -> String {
    format!("aux:tolerance:{name}")
}

/// Put output `name` into a reference map: `exact` rounded to `dtype` (RNE), and the exact
/// values and per-element `tolerance`s as auxiliary tensors for [`derived_bound_policy`].
pub(crate) fn put_bounded(
    map: &mut TensorMap,
    name: &str,
    dtype: DType,
    shape: Vec<usize>,
    exact: &[f64],
    tolerance: &[f64],
) {
    let rounded = match dtype {
        DType::BF16 => Tensor::from_bf16(
            shape.clone(),
            &exact.iter().map(|&v| bf16_rne(v)).collect::<Vec<_>>(),
        ),
        _ => Tensor::from_f64_as(dtype, shape.clone(), exact),
    };
    map.insert(name.into(), rounded);
    map.insert(aux_exact(name), Tensor::from_f64(shape.clone(), exact));
    map.insert(aux_tolerance(name), Tensor::from_f64(shape, tolerance));
}

/// `v` rounded to bf16 once, to nearest even (`half`'s `from_f64` goes through f32: a double
/// rounding that can land half an ulp off).
fn bf16_rne(v: f64) -> half::bf16 {
    if !v.is_finite() || v.abs() < f64::from(f32::MIN_POSITIVE) {
        return half::bf16::from_f32(v as f32);
    }
    // keep 8 significant bits of the f64 significand (52 stored → 7 stored), ties to even
    let bits = v.to_bits();
    let shift = 52 - 7;
    let half_ulp = 1u64 << (shift - 1);
    let rounded = (bits + half_ulp - 1 + ((bits >> shift) & 1)) & !((1u64 << shift) - 1);
    half::bf16::from_f32(f64::from_bits(rounded) as f32)
}

/// Every element within its own derived tolerance of the exact value, plus one rounding to the
/// output's dtype ([`rounded_bound_use`]): the policy of the outputs [`put_bounded`] wrote.
pub(crate) fn derived_bound_policy<'a>(ctx: &PolicyCtx<'a>, why: &'static str) -> Policy<'a> {
    let got = get(ctx.candidate, ctx.output);
    let exact = ctx.reference.get(&aux_exact(ctx.output));
    let tolerance = ctx.reference.get(&aux_tolerance(ctx.output));
    Policy::Bounded {
        why,
        measure: Box::new(move |i| match (exact, tolerance) {
            (Some(e), Some(t)) => {
                rounded_bound_use(got.dtype, got.value(i), e.value(i), t.value(i))
            }
            // a reference without its tolerances is a bug of ours: nothing passes
            _ => f64::INFINITY,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_is_single() {
        // 1 + 2^-8 + 2^-30: above the bf16 midpoint 1 + 2^-8, so it rounds up to 1 + 2^-7; through
        // f32 it first becomes the midpoint 1 + 2^-8 (2^-30 is below f32's half ulp), then ties
        // to even: 1.0
        let v = 1.0 + 2f64.powi(-8) + 2f64.powi(-30);
        assert_eq!(bf16_rne(v).to_f64(), 1.0 + 2f64.powi(-7));
        assert_eq!(
            half::bf16::from_f64(v).to_f64(),
            1.0,
            "half's double rounding (why bf16_rne exists)"
        );
        assert_eq!(bf16_rne(1.0 + 2f64.powi(-8)).to_f64(), 1.0);
        assert_eq!(bf16_rne(-3.0).to_f64(), -3.0);
        assert_eq!(bf16_rne(1e300).to_f64(), f64::INFINITY);
    }
}
