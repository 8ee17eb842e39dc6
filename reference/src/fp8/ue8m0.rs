//! UE8M0: an unsigned power-of-two scale, `value = 2^(code − 127)` for code 0..=254, 0xFF = NaN.
//! No sign, no zero, no infinity (OCP MX `E8M0`, `ml_dtypes.float8_e8m0fnu`, DeepGEMM's scales).
//!
//! Two different roundings exist and must not be confused:
//! - [`encode_nearest`]: the *cast* of ml_dtypes / torch `.to(float8_e8m0fnu)`: the nearest power
//!   of two in linear distance, halfway cases upward. For a normal f32 with biased exponent `E`
//!   and mantissa field `M` that is `E + (M ≥ 2^22)`. Zero, negatives, inf and NaN → 0xFF (NaN),
//!   as ml_dtypes (torch instead casts `|x|`). f32 subnormals follow ml_dtypes too: `≤ 2^-127`
//!   → code 0, above → code 1.
//! - [`encode_ceil`]: the *scale rounding* of DeepSeek's `scale_fmt = "ue8m0"` (OFF
//!   `act_quant`, DeepGEMM `ceil_to_ue8m0`): the smallest power of two `≥ s`, computed on the
//!   bits (`E + (M ≠ 0)`), never through `2^ceil(log2 s)` in f32, which returns a value below `s`
//!   for 196 of 419M inputs on CPU (`docs/fp8-accumulation.md` §3).

/// The NaN code.
pub const NAN_CODE: u8 = 0xFF;

/// Exact value `2^(code − 127)` as f32 (code 0 is the f32 subnormal 2^-127); 0xFF → NaN.
pub fn decode(code: u8) -> f32 {
    match code {
        NAN_CODE => f32::from_bits(0x7FC0_0000),
        0 => f32::from_bits(0x0040_0000),
        _ => f32::from_bits(u32::from(code) << 23),
    }
}

/// Nearest power of two, ties upward (the ml_dtypes / torch cast). See the module docs.
pub fn encode_nearest(x: f32) -> u8 {
    if x.is_nan() || x.is_infinite() || x <= 0.0 {
        return NAN_CODE;
    }
    let bits = x.to_bits();
    let biased = bits >> 23;
    let mantissa = bits & 0x7F_FFFF;
    let code = if biased == 0 {
        // Subnormal f32: ml_dtypes maps values ≤ 2^-127 (bits 0x400000) to code 0 and
        // everything above, up to 2^-126, to code 1 (measured on all subnormals; it is not the
        // nearest power of two there: 0x400001 → 2^-126).
        u32::from(mantissa > 0x40_0000)
    } else {
        biased + u32::from(mantissa >= 0x40_0000)
    };
    if code >= u32::from(NAN_CODE) {
        NAN_CODE
    } else {
        code as u8
    }
}

/// Smallest power of two `≥ s` (DeepSeek's ue8m0 scale rounding), for `s > 0` finite.
/// Returns `None` for NaN, ±inf, zero, negatives, and for `s > 2^127` (no code is large enough).
pub fn encode_ceil(s: f32) -> Option<u8> {
    if !s.is_finite() || s <= 0.0 {
        return None;
    }
    let bits = s.to_bits();
    let biased = bits >> 23;
    let mantissa = bits & 0x7F_FFFF;
    let code = if biased == 0 {
        // Subnormal: 2^-127 (code 0) covers s ≤ 2^-127, i.e. bits ≤ 0x400000; else 2^-126.
        u32::from(mantissa > 0x40_0000)
    } else {
        biased + u32::from(mantissa != 0)
    };
    (code < u32::from(NAN_CODE)).then_some(code as u8)
}

/// `s` rounded up to a power of two, as f32 (see [`encode_ceil`]).
pub fn ceil_pow2(s: f32) -> Option<f32> {
    encode_ceil(s).map(decode)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_is_a_power_of_two() {
        assert_eq!(decode(127), 1.0);
        assert_eq!(decode(128), 2.0);
        assert_eq!(decode(0), 2f32.powi(-127));
        assert_eq!(decode(254), 2f32.powi(127));
        assert!(decode(255).is_nan());
    }

    #[test]
    fn nearest_rounds_halfway_up_and_ceil_rounds_any_excess_up() {
        assert_eq!(encode_nearest(1.0), 127);
        assert_eq!(encode_nearest(1.4999999), 127);
        assert_eq!(encode_nearest(1.5), 128);
        assert_eq!(encode_nearest(3.0), 129);
        assert_eq!(encode_nearest(0.0), NAN_CODE);
        assert_eq!(encode_nearest(-1.0), NAN_CODE);
        assert_eq!(encode_ceil(1.0), Some(127));
        assert_eq!(encode_ceil(1.0000001), Some(128));
        assert_eq!(encode_ceil(0.75), Some(127));
        assert_eq!(encode_ceil(0.0), None);
    }

    #[test]
    fn ceil_is_never_below_its_input() {
        // The f32 values just above powers of two are where log2-based rounding fails.
        for e in -126..127 {
            let p = 2f32.powi(e);
            let above = f32::from_bits(p.to_bits() + 1);
            assert_eq!(ceil_pow2(p), Some(p));
            assert_eq!(ceil_pow2(above), Some(2.0 * p), "2^{e}·(1+2^-23)");
        }
    }
}
