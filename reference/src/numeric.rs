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
}
