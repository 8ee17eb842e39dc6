//! Small floating-point formats: E4M3 ("FN"), E5M2 and the 12-bit E5M6, with exact decoding and
//! round-to-nearest-even encoding from f32, saturating or not.
//!
//! A code is `sign | exponent | mantissa` (sign in the top bit). With `e` exponent bits, `m`
//! mantissa bits and bias `b`:
//! - exponent field 0: subnormal, value `mantissa · 2^(1 − b − m)`;
//! - otherwise: normal, value `(2^m + mantissa) · 2^(exponent − b − m)`;
//! - the all-ones exponent is special as [`Specials`] says.
//!
//! | format | e, m, b | max finite | min subnormal | inf | NaN |
//! |---|---|---|---|---|---|
//! | E4M3 (`float8_e4m3fn`) | 4, 3, 7 | 448 (0x7E) | 2^-9 | none | 0x7F, 0xFF |
//! | E5M2 (`float8_e5m2`) | 5, 2, 15 | 57344 (0x7B) | 2^-16 | 0x7C, 0xFC | 0x7D–0x7F, 0xFD–0xFF |
//! | E5M6 (ours, 12 bits) | 5, 6, 15 | 65024 (0x7BF) | 2^-20 | 0x7C0, 0xFC0 | exponent 31, mantissa ≠ 0 |
//!
//! E5M6: the paper (V3 §3.3.3) names "a customized E5M6 data format" for the cached inputs of the
//! Linear after attention without defining its bits. We choose the IEEE-style layout with bias 15
//! (the top 12 bits of an FP16 value), with inf and NaN at exponent 31.
//!
//! # Encoding (f32 → code)
//! The f32 input is exact in f64. Let `e = ⌊log2|x|⌋` and the quantum `q = 2^(max(e, 1−b) − m)`;
//! the magnitude `|x|/q` is rounded to the nearest integer with ties to even (one rounding, no
//! detour through f16/bf16). If the rounded value exceeds the largest finite value, the
//! [`Saturation`] mode decides:
//!
//! | input | `SatFinite` (CUDA `__NV_SATFINITE`, torch ≥ 2.12 E4M3) | `NonSat` (ml_dtypes, CUDA `__NV_NOSAT`) |
//! |---|---|---|
//! | finite, rounds above max | ±max | E4M3: NaN (0x7F\|s); E5M2/E5M6: ±inf |
//! | ±inf | ±max | E4M3: NaN (0x7F\|s); E5M2/E5M6: ±inf |
//! | NaN | the format's canonical NaN with the input's sign | same |
//!
//! Canonical NaN codes (those ml_dtypes produces): E4M3 0x7F\|s, E5M2 0x7E\|s, E5M6 0x7E0\|s.
//! `-0.0` encodes to the negative zero code; values that round to zero keep their sign.

/// Which codes of the all-ones exponent are special.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Specials {
    /// OCP "FN" (E4M3): no infinities; only the all-ones exponent *and* mantissa is NaN, so the
    /// all-ones exponent still holds finite values (up to 448 for E4M3).
    FiniteAndNan,
    /// IEEE 754 style: all-ones exponent with mantissa 0 is ±inf, any other mantissa is NaN.
    Ieee,
}

/// What to do with values beyond the largest finite value (see the module table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Saturation {
    /// Clamp finite overflow and ±inf to ±max (CUDA `__NV_SATFINITE`, PTX `cvt.rn.satfinite`).
    SatFinite,
    /// Overflow becomes inf where the format has one, else NaN (ml_dtypes, `__NV_NOSAT`).
    NonSat,
}

/// A sign-exponent-mantissa format of at most 16 bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Format {
    /// Name as ml_dtypes / safetensors spell it.
    pub name: &'static str,
    /// Exponent bits `e`.
    pub exp_bits: u32,
    /// Mantissa (fraction) bits `m`.
    pub man_bits: u32,
    /// Exponent bias `b`.
    pub bias: i32,
    /// Meaning of the all-ones exponent.
    pub specials: Specials,
    /// The canonical positive NaN code this crate writes.
    pub nan_code: u16,
}

/// E4M3 "FN" (OCP, `torch.float8_e4m3fn`, `ml_dtypes.float8_e4m3fn`, CUDA `__nv_fp8_e4m3`).
pub const E4M3: Format = Format {
    name: "float8_e4m3fn",
    exp_bits: 4,
    man_bits: 3,
    bias: 7,
    specials: Specials::FiniteAndNan,
    nan_code: 0x7F,
};

/// E5M2 (`torch.float8_e5m2`, `ml_dtypes.float8_e5m2`, CUDA `__nv_fp8_e5m2`).
pub const E5M2: Format = Format {
    name: "float8_e5m2",
    exp_bits: 5,
    man_bits: 2,
    bias: 15,
    specials: Specials::Ieee,
    nan_code: 0x7E,
};

/// E5M6, 12 bits: our definition of the paper's "customized E5M6" (module docs).
pub const E5M6: Format = Format {
    name: "e5m6",
    exp_bits: 5,
    man_bits: 6,
    bias: 15,
    specials: Specials::Ieee,
    nan_code: 0x7E0,
};

impl Format {
    /// Total bits of a code: sign + exponent + mantissa.
    pub fn bits(&self) -> u32 {
        1 + self.exp_bits + self.man_bits
    }

    fn sign_bit(&self) -> u16 {
        1 << (self.exp_bits + self.man_bits)
    }

    fn exp_all_ones(&self) -> u16 {
        (1 << self.exp_bits) - 1
    }

    fn man_mask(&self) -> u16 {
        (1 << self.man_bits) - 1
    }

    /// Smallest normal exponent, `1 − b`.
    pub fn emin(&self) -> i32 {
        1 - self.bias
    }

    /// The positive code of the largest finite value (0x7E for E4M3, 0x7B for E5M2).
    pub fn max_code(&self) -> u16 {
        match self.specials {
            // All-ones exponent, mantissa all ones minus one.
            Specials::FiniteAndNan => {
                (self.exp_all_ones() << self.man_bits) | (self.man_mask() - 1)
            }
            // Exponent one below all-ones, mantissa all ones.
            Specials::Ieee => ((self.exp_all_ones() - 1) << self.man_bits) | self.man_mask(),
        }
    }

    /// The largest finite value (448 for E4M3, 57344 for E5M2, 65024 for E5M6).
    pub fn max_finite(&self) -> f64 {
        f64::from(self.decode(self.max_code()))
    }

    /// The positive infinity code, if the format has one.
    pub fn inf_code(&self) -> Option<u16> {
        match self.specials {
            Specials::FiniteAndNan => None,
            Specials::Ieee => Some(self.exp_all_ones() << self.man_bits),
        }
    }

    /// Whether `code` is a NaN of this format.
    pub fn is_nan(&self, code: u16) -> bool {
        let exponent = (code >> self.man_bits) & self.exp_all_ones();
        let mantissa = code & self.man_mask();
        match self.specials {
            Specials::FiniteAndNan => {
                exponent == self.exp_all_ones() && mantissa == self.man_mask()
            }
            Specials::Ieee => exponent == self.exp_all_ones() && mantissa != 0,
        }
    }

    /// Whether `code` is ±inf in this format.
    pub fn is_inf(&self, code: u16) -> bool {
        self.inf_code() == Some(code & !self.sign_bit())
    }

    /// Exact value of `code` as f32 (every value of these formats is an f32). NaN codes give the
    /// quiet NaN `0x7FC00000` with the code's sign, as ml_dtypes does.
    pub fn decode(&self, code: u16) -> f32 {
        let negative = code & self.sign_bit() != 0;
        let exponent = i32::from((code >> self.man_bits) & self.exp_all_ones());
        let mantissa = f64::from(code & self.man_mask());
        if self.is_nan(code) {
            return f32::from_bits(0x7FC0_0000 | (u32::from(negative) << 31));
        }
        let sign = if negative { -1.0 } else { 1.0 };
        if self.is_inf(code) {
            return (sign * f64::INFINITY) as f32;
        }
        let m = self.man_bits as i32;
        let magnitude = if exponent == 0 {
            // Subnormal: mantissa · 2^(emin − m).
            mantissa * 2f64.powi(self.emin() - m)
        } else {
            // Normal: (2^m + mantissa) · 2^(exponent − bias − m).
            (2f64.powi(m) + mantissa) * 2f64.powi(exponent - self.bias - m)
        };
        (sign * magnitude) as f32
    }

    /// Encode `x` with round-to-nearest-even and the given overflow rule (module docs).
    pub fn encode(&self, x: f32, saturation: Saturation) -> u16 {
        let sign = if x.is_sign_negative() {
            self.sign_bit()
        } else {
            0
        };
        if x.is_nan() {
            return self.nan_code | sign;
        }
        let overflow = |sign: u16| match (saturation, self.inf_code()) {
            (Saturation::SatFinite, _) => self.max_code() | sign,
            (Saturation::NonSat, Some(inf)) => inf | sign,
            (Saturation::NonSat, None) => self.nan_code | sign,
        };
        if x.is_infinite() {
            return overflow(sign);
        }
        let a = f64::from(x.abs());
        if a == 0.0 {
            return sign;
        }
        let m = self.man_bits as i32;
        // Step 1: the quantum. Below the normal range the quantum stays at 2^(emin − m).
        let e = exponent_of(a);
        let mut q_exp = e.max(self.emin()) - m;
        // Step 2: round |x| / quantum to an integer, ties to even (exact in f64).
        let mut n = round_half_even(a * 2f64.powi(-q_exp));
        if n == 0 {
            return sign;
        }
        // A carry out of the mantissa (e.g. 1.1111·2^e → 2^(e+1)) moves to the next binade.
        if n >= 1u64 << (m + 1) {
            n >>= 1;
            q_exp += 1;
        }
        // Step 3: overflow rule.
        let value = n as f64 * 2f64.powi(q_exp);
        if value > self.max_finite() {
            return overflow(sign);
        }
        // Step 4: pack. n < 2^m only happens in the subnormal range (exponent field 0).
        let exponent_field = if n < 1u64 << m {
            0
        } else {
            (q_exp + m + self.bias) as u16
        };
        let mantissa_field = (n as u16) & self.man_mask();
        sign | (exponent_field << self.man_bits) | mantissa_field
    }
}

/// `⌊log2 a⌋` for a positive normal f64.
fn exponent_of(a: f64) -> i32 {
    ((a.to_bits() >> 52) & 0x7FF) as i32 - 1023
}

/// Round a non-negative f64 to the nearest integer, ties to even.
fn round_half_even(r: f64) -> u64 {
    let floor = r.floor();
    let frac = r - floor;
    let mut n = floor as u64;
    if frac > 0.5 || (frac == 0.5 && n % 2 == 1) {
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_constants_match_the_ocp_definition() {
        assert_eq!(E4M3.max_code(), 0x7E);
        assert_eq!(E4M3.max_finite(), 448.0);
        assert_eq!(E4M3.decode(0x01), 2f32.powi(-9));
        assert_eq!(E4M3.decode(0x08), 2f32.powi(-6));
        assert!(E4M3.decode(0x7F).is_nan() && E4M3.decode(0xFF).is_nan());
        assert_eq!(E4M3.inf_code(), None);
        assert!(!E4M3.is_nan(0x7E) && !E4M3.is_inf(0x7E));
    }

    #[test]
    fn e5m2_and_e5m6_constants() {
        assert_eq!(E5M2.max_finite(), 57344.0);
        assert_eq!(E5M2.decode(0x7C), f32::INFINITY);
        assert_eq!(E5M2.decode(0xFC), f32::NEG_INFINITY);
        assert_eq!(E5M2.decode(0x01), 2f32.powi(-16));
        for code in [0x7D, 0x7E, 0x7F, 0xFD, 0xFE, 0xFF] {
            assert!(E5M2.is_nan(code), "{code:#x}");
        }
        // E5M6: (2 − 2^-6)·2^15 = 65024, min subnormal 2^(−14−6).
        assert_eq!(E5M6.max_finite(), 65024.0);
        assert_eq!(E5M6.decode(0x001), 2f32.powi(-20));
        assert_eq!(E5M6.bits(), 12);
    }

    #[test]
    fn e4m3_rounding_ties_and_overflow() {
        // 464 is the midpoint between 448 (mantissa 110, even) and 480 (not finite): ties to 448.
        assert_eq!(E4M3.encode(464.0, Saturation::NonSat), 0x7E);
        assert_eq!(E4M3.encode(465.0, Saturation::NonSat), 0x7F);
        assert_eq!(E4M3.encode(465.0, Saturation::SatFinite), 0x7E);
        assert_eq!(E4M3.encode(-1e6, Saturation::SatFinite), 0xFE);
        assert_eq!(E4M3.encode(f32::INFINITY, Saturation::NonSat), 0x7F);
        assert_eq!(E4M3.encode(f32::NEG_INFINITY, Saturation::SatFinite), 0xFE);
        // 2^-10 is half the smallest subnormal: ties to even zero. 1.5·2^-10 rounds up to 2^-9.
        assert_eq!(E4M3.encode(2f32.powi(-10), Saturation::SatFinite), 0x00);
        assert_eq!(
            E4M3.encode(1.5 * 2f32.powi(-10), Saturation::SatFinite),
            0x01
        );
        assert_eq!(E4M3.encode(-0.0, Saturation::SatFinite), 0x80);
        // 1.0625 lies halfway between 1.0 (even) and 1.125.
        assert_eq!(E4M3.encode(1.0625, Saturation::SatFinite), 0x38);
        assert_eq!(E4M3.encode(1.1875, Saturation::SatFinite), 0x3A);
    }

    #[test]
    fn e5m2_overflow_tie_goes_to_infinity() {
        // 61440 is the midpoint between 57344 (odd mantissa 11) and 65536: ties away to inf.
        assert_eq!(E5M2.encode(61440.0, Saturation::NonSat), 0x7C);
        assert_eq!(E5M2.encode(61439.996, Saturation::NonSat), 0x7B);
        assert_eq!(E5M2.encode(61440.0, Saturation::SatFinite), 0x7B);
        assert_eq!(E5M2.encode(f32::NAN, Saturation::NonSat), 0x7E);
    }

    #[test]
    fn every_finite_code_round_trips() {
        for format in [E4M3, E5M2, E5M6] {
            for code in 0..(1u16 << format.bits()) {
                if format.is_nan(code) {
                    continue;
                }
                let value = format.decode(code);
                for sat in [Saturation::SatFinite, Saturation::NonSat] {
                    let back = format.encode(value, sat);
                    let expected = if format.is_inf(code) && sat == Saturation::SatFinite {
                        format.max_code() | (code & format.sign_bit())
                    } else {
                        code
                    };
                    assert_eq!(back, expected, "{} code {code:#x} = {value}", format.name);
                }
            }
        }
    }
}
