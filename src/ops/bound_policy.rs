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
    map.insert(
        name.into(),
        Tensor::from_f64_as(dtype, shape.clone(), exact),
    );
    map.insert(aux_exact(name), Tensor::from_f64(shape.clone(), exact));
    map.insert(aux_tolerance(name), Tensor::from_f64(shape, tolerance));
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
