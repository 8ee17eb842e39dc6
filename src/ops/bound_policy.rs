//! The per-element policies of derived bounds: an interval or a distance per element,
//! computed from the inputs by the op's derivation (training-side ops, balance loss).

use crate::registry::compare::Policy;
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
