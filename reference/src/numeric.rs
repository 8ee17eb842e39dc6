//! Rounding helpers shared by every module: BF16 round-to-nearest-even and ULP distances.
//!
//! BF16 is the top 16 bits of an f32; rounding keeps the nearest representable value with ties
//! to even, as PyTorch's `.to(torch.bfloat16)` and CUDA's `__float2bfloat16_rn` do. NaN stays a
//! (quiet) NaN of the same sign.

use half::bf16;

/// Round an f32 to the nearest BF16 value (ties to even).
pub fn round_to_bf16(x: f32) -> bf16 {
    bf16::from_f32(x)
}

/// Round an f64 to the nearest BF16 value (ties to even), **once**: `half`'s `bf16::from_f64`
/// goes through f32, a double rounding that can land half an ulp off (1 + 2^-8 + 2^-30 becomes
/// 1.0 instead of 1 + 2^-7). Normal values keep 8 significant bits of the f64 significand;
/// values below 2^-126 are rounded on bf16's subnormal grid 2^-133; overflow gives ±inf.
pub fn f64_to_bf16(x: f64) -> bf16 {
    if !x.is_finite() {
        return bf16::from_f64(x);
    }
    let rounded = if x.abs() < f64::from(f32::MIN_POSITIVE) {
        // the subnormal grid: an integer multiple of 2^-133, exact in f64
        (x * 2f64.powi(133)).round_ties_even() * 2f64.powi(-133)
    } else {
        // keep the top 7 of the 52 stored significand bits, ties to even
        let bits = x.to_bits();
        let shift = 52 - 7;
        let half_ulp = 1u64 << (shift - 1);
        f64::from_bits((bits + half_ulp - 1 + ((bits >> shift) & 1)) & !((1u64 << shift) - 1))
    };
    // a bf16 value (or beyond f32's range: ±inf): both conversions below are exact
    bf16::from_f32(rounded as f32)
}

/// Round an f32 to BF16 and return it widened back to f32 (exact widening).
pub fn bf16_round_f32(x: f32) -> f32 {
    round_to_bf16(x).to_f32()
}

/// Map an f32 onto a monotone integer line: adjacent finite floats differ by 1, `-0.0` and `+0.0`
/// both map to 0. Used to count ULPs between two floats.
pub fn f32_ordinal(x: f32) -> i64 {
    let bits = x.to_bits();
    let magnitude = i64::from(bits & 0x7FFF_FFFF);
    if bits >> 31 == 1 {
        -magnitude
    } else {
        magnitude
    }
}

/// Number of f32 values strictly between `a` and `b`, plus one (0 when equal, ±0 equal).
/// `None` if either is NaN.
pub fn f32_ulp_distance(a: f32, b: f32) -> Option<u64> {
    if a.is_nan() || b.is_nan() {
        return None;
    }
    Some(f32_ordinal(a).abs_diff(f32_ordinal(b)))
}

/// ULP distance between two BF16 values (same definition as [`f32_ulp_distance`]).
pub fn bf16_ulp_distance(a: bf16, b: bf16) -> Option<u64> {
    if a.is_nan() || b.is_nan() {
        return None;
    }
    let ord = |v: bf16| {
        let bits = v.to_bits();
        let magnitude = i64::from(bits & 0x7FFF);
        if bits >> 15 == 1 {
            -magnitude
        } else {
            magnitude
        }
    };
    Some(ord(a).abs_diff(ord(b)))
}

/// The spacing of f32 values at the magnitude of `x` (the ULP of `x`): `2^(e-23)` for a normal
/// `x` with exponent `e`, `2^-149` for subnormals and zero.
pub fn f32_ulp(x: f32) -> f64 {
    let biased = ((x.to_bits() >> 23) & 0xFF) as i32;
    let e = if biased == 0 { -126 } else { biased - 127 };
    2f64.powi(e - 23)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounds_ties_to_even() {
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties to the even significand, 1.
        assert_eq!(bf16_round_f32(1.0 + 2f32.powi(-8)), 1.0);
        // 1 + 3·2^-8 lies halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even).
        assert_eq!(
            bf16_round_f32(1.0 + 3.0 * 2f32.powi(-8)),
            1.0 + 2f32.powi(-6)
        );
        // Just above the first tie rounds up.
        assert_eq!(
            bf16_round_f32(1.0 + 2f32.powi(-8) + 2f32.powi(-20)),
            1.0 + 2f32.powi(-7)
        );
    }

    #[test]
    fn ulp_distance_counts_floats_between() {
        assert_eq!(f32_ulp_distance(1.0, 1.0), Some(0));
        assert_eq!(
            f32_ulp_distance(1.0, f32::from_bits(1.0f32.to_bits() + 3)),
            Some(3)
        );
        assert_eq!(f32_ulp_distance(0.0, -0.0), Some(0));
        // Across zero: the smallest positive and negative subnormals are 2 apart.
        assert_eq!(
            f32_ulp_distance(f32::from_bits(1), -f32::from_bits(1)),
            Some(2)
        );
        assert_eq!(f32_ulp_distance(f32::NAN, 1.0), None);
    }

    #[test]
    fn ulp_of_one_is_two_to_minus_23() {
        assert_eq!(f32_ulp(1.0), 2f64.powi(-23));
        assert_eq!(f32_ulp(1.5), 2f64.powi(-23));
        assert_eq!(f32_ulp(2.0), 2f64.powi(-22));
        assert_eq!(f32_ulp(0.0), 2f64.powi(-149));
    }

    #[test]
    fn f64_to_bf16_rounds_once() {
        // above the midpoint 1 + 2^-8 by 2^-30: rounds up; through f32 it would tie to 1.0
        let v = 1.0 + 2f64.powi(-8) + 2f64.powi(-30);
        assert_eq!(f64_to_bf16(v).to_f64(), 1.0 + 2f64.powi(-7));
        assert_eq!(
            bf16::from_f64(v).to_f64(),
            1.0,
            "half's double rounding (why this exists)"
        );
        assert_eq!(f64_to_bf16(1.0 + 2f64.powi(-8)).to_f64(), 1.0);
        assert_eq!(
            f64_to_bf16(1.0 + 3.0 * 2f64.powi(-8)).to_f64(),
            1.0 + 2f64.powi(-6)
        );
        assert_eq!(f64_to_bf16(-3.0).to_f64(), -3.0);
        assert_eq!(f64_to_bf16(1e300).to_f64(), f64::INFINITY);
        assert_eq!(f64_to_bf16(-1e300).to_f64(), f64::NEG_INFINITY);
        assert!(f64_to_bf16(f64::NAN).is_nan());
        // subnormal: 2^-133 + 2^-134 + 2^-160 is past the midpoint of 2^-133 and 2^-132
        let tiny = 2f64.powi(-133) + 2f64.powi(-134) + 2f64.powi(-160);
        assert_eq!(f64_to_bf16(tiny).to_f64(), 2f64.powi(-132));
        assert_eq!(f64_to_bf16(2f64.powi(-134)).to_f64(), 0.0); // a tie to even (0)
        assert_eq!(f64_to_bf16(-2f64.powi(-127)).to_f64(), -2f64.powi(-127));
    }
}
