//! Tolerance arithmetic: the rounding-error quantities every derived policy is built from
//! (SPEC.md "Tolerance policies" derives each use). The policies themselves live with their ops;
//! the numbers they combine live here.

use crate::registry::tensor::DType;

/// f32 unit roundoff `u = 2^-24`.
pub const U32: f64 = 1.0 / 16_777_216.0;

/// Higham's `γ_n = n·u/(1 − n·u)` for f32 (`u = 2^-24`): the relative error of n roundings.
pub fn gamma(n: f64) -> f64 {
    n * U32 / (1.0 - n * U32)
}

/// Unit roundoff of a floating dtype (half an ulp of 1).
pub fn unit_roundoff(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => f64::EPSILON / 2.0,
        DType::BF16 => 2f64.powi(-8),
        DType::F16 => 2f64.powi(-11),
        _ => f64::from(f32::EPSILON) / 2.0,
    }
}

/// Half the spacing of bf16 values at `|x|` (the largest error of one bf16 rounding).
pub fn half_bf16_ulp(x: f64) -> f64 {
    let a = x.abs().max(f64::from(f32::MIN_POSITIVE));
    2f64.powi(a.log2().floor() as i32 - 8)
}

/// Half the distance from the bf16 value `got` to its neighbour in the direction of `r`:
/// every real within it rounds (RNE) to `got`, ties included at worst.
pub fn bf16_half_gap_toward(got: f64, r: f64) -> f64 {
    let bits = (got as f32).to_bits();
    let exponent = ((bits >> 23) & 0xFF) as i32;
    if exponent == 0 {
        // zero and subnormals: spacing 2^-133
        return 2f64.powi(-134);
    }
    let e = exponent - 127;
    let toward_zero = if got > 0.0 { r < got } else { r > got };
    let power_of_two = bits & 0x7F_FFFF == 0;
    if power_of_two && toward_zero {
        2f64.powi(e - 9)
    } else {
        2f64.powi(e - 8)
    }
}

/// Half the distance from `got` (a value of `dtype`: F32 or BF16) to its neighbour in the
/// direction of `r`: a real value that rounds to `got` lies within it on that side.
pub fn half_gap_toward(dtype: DType, got: f64, r: f64) -> f64 {
    if dtype == DType::BF16 {
        return bf16_half_gap_toward(got, r);
    }
    let g = got as f32;
    if !g.is_finite() || got == r {
        return 0.0;
    }
    // the neighbouring f32 (MSRV 1.85: no f32::next_up), by the bits of |g|
    let away = (r > got) == (g > 0.0) || g == 0.0;
    let next = if g == 0.0 {
        f32::from_bits(1).copysign(if r > got { 1.0 } else { -1.0 })
    } else if away {
        f32::from_bits(g.to_bits() + 1)
    } else {
        f32::from_bits(g.to_bits() - 1)
    };
    (f64::from(next) - got).abs() / 2.0
}

/// [`crate::registry::compare::Policy::Bounded`]'s measure of an output that is the `dtype`
/// rounding of a value within `tolerance` of the exact `r`: the excess over one half gap,
/// as a fraction of `tolerance` (0 when the difference is rounding alone; +∞ for a
/// non-finite `got`, or any excess over a zero tolerance).
pub fn rounded_bound_use(dtype: DType, got: f64, r: f64, tolerance: f64) -> f64 {
    if !got.is_finite() || !r.is_finite() {
        return if got.to_bits() == r.to_bits() {
            0.0
        } else {
            f64::INFINITY
        };
    }
    let excess = ((got - r).abs() - half_gap_toward(dtype, got, r)).max(0.0);
    if excess == 0.0 {
        0.0
    } else if tolerance > 0.0 {
        excess / tolerance
    } else {
        f64::INFINITY
    }
}

/// FP8 GEMM, exact and tensor_core modes: `E = 2·γ_{W+2}·magnitude + (W+2)·2^-147`, how far two
/// f32 evaluations of the same W scaled partials may drift apart (SPEC.md "FP8 GEMM
/// tolerance").
pub fn gemm_bound(magnitude: f64, partials: usize) -> f64 {
    let n = (partials + 2) as f64;
    2.0 * gamma(n) * magnitude + n * 2f64.powi(-147)
}

/// Whether `got` (an f32 or bf16 value) is acceptable against the reference accumulator `r`
/// under [`gemm_bound`].
pub fn within_bound(got: f64, r: f32, magnitude: f64, partials: usize, bf16_out: bool) -> bool {
    let r = f64::from(r);
    if !got.is_finite() || !r.is_finite() {
        return false;
    }
    let e = gemm_bound(magnitude, partials);
    let d = (got - r).abs();
    if bf16_out {
        d <= e + bf16_half_gap_toward(got, r)
    } else {
        d <= e
    }
}

/// `tensor_core_bound`: the tolerance of one element around the exact mode's accumulator
/// (SPEC.md "Tensor Core bound"): the reference's own f32 evaluation over `w_b` K-blocks
/// (`γ_{W_b+3}·M_b`, one more rounding than exact mode's for the f32 block dots), the
/// kernel's f32 promotion of `w_w` window partials no larger than `|P_w| + Δ_w`
/// (`γ_{W_w+2}·(M_w + D)`), the Tensor Core slack itself (`D`) and underflow, all times
/// `1 + 2^-40` for the f64 evaluation of this sum.
pub fn tc_bound_tolerance(
    magnitude: f64,
    window_magnitude: f64,
    slack: f64,
    partials: (usize, usize),
) -> f64 {
    TcBoundTolerance::new(partials).of(magnitude, window_magnitude, slack)
}

/// [`tc_bound_tolerance`] for many elements of one GEMM: its constants computed once.
#[derive(Debug, Clone, Copy)]
pub struct TcBoundTolerance {
    gamma_blocks: f64,
    gamma_windows: f64,
    underflow: f64,
}

impl TcBoundTolerance {
    /// The constants for `w_b` K-blocks and `w_w` windows.
    pub fn new((w_b, w_w): (usize, usize)) -> Self {
        TcBoundTolerance {
            gamma_blocks: gamma((w_b + 3) as f64),
            gamma_windows: gamma((w_w + 2) as f64),
            underflow: (w_b + w_w + 4) as f64 * 2f64.powi(-147),
        }
    }

    /// The tolerance of one element (the same operations as [`tc_bound_tolerance`]'s doc).
    pub fn of(&self, magnitude: f64, window_magnitude: f64, slack: f64) -> f64 {
        let e = self.gamma_blocks * magnitude
            + self.gamma_windows * (window_magnitude + slack)
            + slack
            + self.underflow;
        e * (1.0 + 2f64.powi(-40))
    }
}

/// The fraction of its tolerance that `got` (an f32 or bf16 value) uses around the reference
/// accumulator `r`: the distance from `r` to the reals that round to `got` (for bf16, `got`
/// less half the gap to its neighbour towards `r`), over the tolerance. Above 1 is a
/// violation; non-finite values are infinitely far. An exact-mode bf16 output uses 0.
pub fn bound_use(got: f64, r: f32, tolerance: f64, bf16_out: bool) -> f64 {
    let r = f64::from(r);
    if !got.is_finite() || !r.is_finite() {
        return f64::INFINITY;
    }
    let rounding = if bf16_out {
        bf16_half_gap_toward(got, r)
    } else {
        0.0
    };
    ((got - r).abs() - rounding).max(0.0) / tolerance
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_half_gap_is_half_an_ulp_toward_the_reference() {
        // 1.0: the gap above is 2^-7, below 2^-8 (the binade below is finer)
        assert_eq!(bf16_half_gap_toward(1.0, 1.5), 2f64.powi(-8));
        assert_eq!(bf16_half_gap_toward(1.0, 0.5), 2f64.powi(-9));
        assert_eq!(bf16_half_gap_toward(-1.0, -0.5), 2f64.powi(-9));
        assert_eq!(bf16_half_gap_toward(-1.0, -1.5), 2f64.powi(-8));
        assert_eq!(bf16_half_gap_toward(1.5, 1.0), 2f64.powi(-8));
        assert_eq!(bf16_half_gap_toward(0.0, 1.0), 2f64.powi(-134));
    }

    #[test]
    fn the_bound_accepts_one_rounding_step_and_rejects_two() {
        // f32: magnitude 1, W = 1 → E = 2·3u/(1−3u) ≈ 6u
        let e = gemm_bound(1.0, 1);
        assert!((e - 6.0 * U32).abs() < 1e-12, "{e}");
        // (3 f32 ulps of 1.0 = 6u: accepted; 4 ulps: rejected)
        let three_up = f64::from(f32::from_bits(1.0f32.to_bits() + 3));
        assert!(within_bound(three_up, 1.0, 1.0, 1, false));
        let four_up = f64::from(f32::from_bits(1.0f32.to_bits() + 4));
        assert!(!within_bound(four_up, 1.0, 1.0, 1, false));
        // bf16: the reference 1 + 2^-8 + 2^-23 lies one f32 ulp above a rounding midpoint:
        // both neighbours 1 and 1 + 2^-7 are acceptable, 1 + 2^-6 is not.
        let r = 1.0 + 2f32.powi(-8) + 2f32.powi(-23);
        assert!(within_bound(1.0, r, 1.0, 1, true));
        assert!(within_bound(1.0 + 2f64.powi(-7), r, 1.0, 1, true));
        assert!(!within_bound(1.0 + 2f64.powi(-6), r, 1.0, 1, true));
        assert!(!within_bound(f64::NAN, r, 1.0, 1, true));
    }

    #[test]
    fn gamma_and_roundoffs() {
        assert_eq!(unit_roundoff(DType::F32), U32);
        assert_eq!(unit_roundoff(DType::F64), 2f64.powi(-53));
        assert!((gamma(1.0) - U32 / (1.0 - U32)).abs() < 1e-30);
        // bf16 spacing at 1 is 2^-7: half of it 2^-8; at 3 (binade [2, 4)) 2^-7
        assert_eq!(half_bf16_ulp(1.0), 2f64.powi(-8));
        assert_eq!(half_bf16_ulp(-3.0), 2f64.powi(-7));
    }

    #[test]
    fn rounded_bound_use_allows_one_rounding_beyond_the_tolerance() {
        // f32 1.0: the gap above is 2^-23 (half 2^-24), below 2^-24 (half 2^-25)
        assert_eq!(half_gap_toward(DType::F32, 1.0, 2.0), 2f64.powi(-24));
        assert_eq!(half_gap_toward(DType::F32, 1.0, 0.0), 2f64.powi(-25));
        // exact 1 + 2^-20, tolerance 2^-21: got 1.0 is 2^-20 away, less a half gap of 2^-24
        let r = 1.0 + 2f64.powi(-20);
        let used = rounded_bound_use(DType::F32, 1.0, r, 2f64.powi(-21));
        assert!((used - (2f64.powi(-20) - 2f64.powi(-24)) / 2f64.powi(-21)).abs() < 1e-12);
        // zero tolerance: only the rounding of the exact value itself passes
        assert_eq!(rounded_bound_use(DType::F32, 0.0, 0.0, 0.0), 0.0);
        assert_eq!(
            rounded_bound_use(DType::F32, 1e-30, 0.0, 0.0),
            f64::INFINITY
        );
        assert_eq!(
            rounded_bound_use(DType::F32, f64::NAN, 1.0, 1.0),
            f64::INFINITY
        );
    }
}
