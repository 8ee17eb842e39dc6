//! The tolerance policy of the quantization ops (`act_quant`, `act_quant_128x1`,
//! `weight_quant`), derived from how real kernels compute `x / s`.
//!
//! Official Triton kernels divide with `div.full.f32` (≤ 2 ulp error, Triton issue #10661), both
//! for `s = amax / 448` and for `x / s`. So:
//! - `s` (f32 scales): within 2 ulp of `max(amax, 1e-4)/448`. With `ue8m0`, the power of two
//!   must be the ceiling of some value within 2 ulp of `max(amax, 1e-4)/448` (usually unique).
//! - `y` (codes): judged against the candidate's *own* scale `s'` (already checked above). A code
//!   must equal `e4m3(x / s')`, except that it may be the neighbouring code when the exact
//!   quotient `x/s'` lies within 2.5 f32-ulps of the midpoint between the two codes: 2 ulp of
//!   approximate division plus ½ ulp of the quotient's own rounding. Any other difference is a
//!   bug. For a kernel with IEEE division (`__fdiv_rn`, ours) everything is bit-exact.
//!
//! With Gaussian data the expected share of such near-ties is about 2·2.5·2^-23 / 2^-3 ≈ 5e-6
//! of the codes; the report lists how many were used (`allowed`).

use dsv3_reference::fp8::{ue8m0, Saturation, AMAX_FLOOR, E4M3, E4M3_MAX};
use dsv3_reference::numeric::f32_ulp;
use ndarray::Array2;

use crate::registry::compare::Policy;
use crate::registry::PolicyCtx;

use super::{get, QuantConfig};

/// Max ulp distance of an f32 scale (approximate division of amax by 448).
pub const SCALE_ULPS: u64 = 2;
/// Half-width of the near-tie window around a rounding midpoint, in f32 ulps of the quotient.
pub const TIE_WINDOW_ULPS: f64 = 2.5;

/// Policy for output `ctx.output` of a quantization op whose input `x_name` is viewed as
/// `[rows, cols]` with `tr × tc` tiles.
pub(crate) fn quant_policy<'a>(
    ctx: &PolicyCtx<'a>,
    x_name: &str,
    tr: usize,
    tc: usize,
) -> Policy<'a> {
    let x = (get(ctx.inputs, x_name)).matrix_f32();
    let cols = x.ncols();
    let s_tensor = get(ctx.candidate, "s");
    let grid = (x.nrows().div_ceil(tr), cols.div_ceil(tc));
    let s_cand = Array2::from_shape_vec(grid, s_tensor.to_f32().expect("F32 scales"))
        .expect("validated shape");
    match ctx.output {
        "y" => {
            let y_cand = get(ctx.candidate, "y");
            // relational: every code is judged against the candidate's own scale, so a code
            // equal to the reference's is still wrong if the candidate's scale differs
            Policy::Relational {
                why: "e4m3(x/s') with s' the candidate's scale (itself within policy), or a neighbouring code where x/s' is within 2.5 f32-ulp of a rounding midpoint",
                judge: Box::new(move |i| {
                    let (r, c) = (i / cols, i % cols);
                    let s = s_cand[[r / tr, c / tc]];
                    let got = y_cand.bits(i) as u16;
                    code_ok(x[[r, c]], s, got).then_some("the candidate's own scale, or a near-tie")
                }),
            }
        }
        _ if ctx.config.get::<QuantConfig>().scale_fmt == dsv3_reference::fp8::ScaleFmt::F32 => {
            Policy::Ulps {
                max: SCALE_ULPS,
                why: "amax/448 by approximate division (div.full.f32 ≤ 2 ulp)",
            }
        }
        _ => {
            // amax per tile, to rebuild the set of admissible power-of-two scales
            let mut amax = Array2::<f32>::zeros(grid);
            for ((r, c), v) in x.indexed_iter() {
                let a = &mut amax[[r / tr, c / tc]];
                *a = a.max(v.abs());
            }
            Policy::ExactUnless {
                why: "the power-of-two ceiling of a value within 2 ulp of amax/448",
                allow: Box::new(move |i| {
                    let (r, c) = (i / grid.1, i % grid.1);
                    ue8m0_scale_ok(amax[[r, c]], s_cand[[r, c]])
                }),
            }
        }
    }
}

/// Whether `got` is the power-of-two ceiling of some value within 2 ulp of
/// `max(amax, 1e-4)/448`: an acceptable UE8M0 scale of a tile whose largest magnitude is `amax`.
pub(crate) fn ue8m0_scale_ok(amax: f32, got: f32) -> bool {
    let raw = amax.max(AMAX_FLOOR) / E4M3_MAX;
    (-(SCALE_ULPS as i64)..=SCALE_ULPS as i64).any(|d| {
        let near = f32::from_bits((raw.to_bits() as i64 + d) as u32);
        ue8m0::ceil_pow2(near) == Some(got)
    })
}

/// Whether code `got` is an acceptable quantization of `x` under the scale `s`.
pub(crate) fn code_ok(x: f32, s: f32, got: u16) -> bool {
    if !(s.is_finite() && s > 0.0) || E4M3.is_nan(got) {
        return false;
    }
    let want = E4M3.encode(x / s, Saturation::SatFinite);
    if got == want {
        return true;
    }
    let (g, w) = (f64::from(E4M3.decode(got)), f64::from(E4M3.decode(want)));
    let ordinal = |c: u16| {
        if c & 0x80 != 0 {
            -i32::from(c & 0x7F)
        } else {
            i32::from(c)
        }
    };
    if (ordinal(got) - ordinal(want)).abs() != 1 {
        return false;
    }
    let t = f64::from(x) / f64::from(s);
    let midpoint = (g + w) / 2.0;
    (t - midpoint).abs() <= TIE_WINDOW_ULPS * f32_ulp(t as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_code_flip_is_allowed_only_at_a_near_tie() {
        // s = 1: 1.0625 is the exact midpoint between 1.0 (0x38) and 1.125 (0x39).
        assert!(code_ok(1.0625, 1.0, 0x38));
        assert!(code_ok(1.0625, 1.0, 0x39));
        // 1.07 is far from the midpoint: only 0x39 (nearest) is acceptable.
        assert!(code_ok(1.07, 1.0, 0x39));
        assert!(!code_ok(1.07, 1.0, 0x38));
        // within 2 ulp of the midpoint: either code
        let near = f32::from_bits(1.0625f32.to_bits() + 2);
        assert!(code_ok(near, 1.0, 0x38));
        // 4 ulp away: no longer a near-tie
        let far = f32::from_bits(1.0625f32.to_bits() + 4);
        assert!(!code_ok(far, 1.0, 0x38));
        // two codes away is never allowed
        assert!(!code_ok(1.0625, 1.0, 0x3A));
    }
}
