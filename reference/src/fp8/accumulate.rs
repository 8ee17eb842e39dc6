//! The Tensor Core accumulation model of Hopper FP8 `wgmma` (V3 §3.3.2 "Increasing Accumulation
//! Precision", §3.5.2), as a parameterised truncated fused dot-product-add (T-FDPA).
//!
//! The paper: "the FP8 GEMM accumulation on NVIDIA H800 GPUs is limited to retaining around 14
//! bits"; "after aligning 32 mantissa products by right-shifting based on the maximum exponent,
//! the Tensor Core only uses the highest 14 bits of each mantissa product for addition, and
//! truncates bits exceeding this range. The accumulation of addition results into registers also
//! employs 14-bit precision." MMA-Sim (Xie et al., arXiv 2511.10909), validated on Hopper by its
//! authors, models one `wgmma ... k32` FP8 instruction exactly that way; [`HOPPER_FP8_WGMMA`]
//! holds its parameters (`docs/fp8-accumulation.md` §4–5).
//!
//! # One fused step ([`TensorCoreModel::fdpa_step`])
//! Inputs: up to `group` (L) pairs of FP8 codes and the f32 accumulator `c`.
//! 1. Every term is exact: a product `a·b` has the integer significand `Sa·Sb` and the *nominal*
//!    exponent `ea + eb` (a subnormal factor uses the format's emin, so a product's value lies
//!    in `[0, 4)·2^(ea+eb)`); `c` has its 24-bit significand and exponent `⌊log2|c|⌋` (−126 when
//!    subnormal). Zero terms take no part in the alignment.
//! 2. `emax` = the largest nominal exponent; the quantum is `2^(emax − F)` (F = `frac_bits`, 13
//!    on Hopper: "14 bits" counting the leading bit).
//! 3. Every term is cut to a multiple of the quantum: toward zero (MMA-Sim's NVIDIA model),
//!    toward −∞ ([`TermCut::Floor`], the literal reading of the paper's "sign-fill right shift")
//!    or to nearest ([`TermCut::Nearest`]).
//! 4. The cut terms are summed exactly; the sum is written back to the accumulator register
//!    with `out_frac_bits` fraction bits (13 on Hopper, "e8m13") by [`WriteBack`]; values below
//!    the normal range keep the quantum `2^(−126 − out_frac_bits)`. A zero result is `+0`.
//!
//! Consecutive steps over a K range pass `c` along ([`TensorCoreModel::accumulate_e4m3`]); inside
//! one step the order of the terms does not matter (the sum is exact).
//!
//! MMA-Sim gives zero terms the exponent −133; with E4M3 products (nominal exponents ≥ −12) and
//! an f32 accumulator (≥ −126 when non-zero) that value can never be the maximum, so zero terms
//! are simply skipped here.

use crate::error::{Error, Result};

/// How a term's bits below the quantum are dropped (step 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TermCut {
    /// Truncate the magnitude (MMA-Sim's Hopper model; measured on hardware by its authors).
    TowardZero,
    /// Two's-complement arithmetic right shift ("sign-fill right shift"): negative terms move
    /// one quantum away from zero when bits are dropped.
    Floor,
    /// Round to the nearest multiple of the quantum, ties to even (a hypothetical kernel that
    /// rounds while aligning; the error bound of `tensor_core_bound` covers it).
    Nearest,
}

/// How the exact sum of a step is rounded into the accumulator register (step 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteBack {
    /// Truncate the magnitude (Hopper FP8 `wgmma`: "RZ-E8M13").
    TowardZero,
    /// Round to nearest, ties to even.
    NearestEven,
}

/// The parameters of the T-FDPA model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorCoreModel {
    /// F: fraction bits kept below the largest nominal exponent when aligning terms.
    pub frac_bits: u32,
    /// L: products fused in one step (32 = one `wgmma` k-step for FP8).
    pub group: usize,
    /// How aligned terms are cut.
    pub term_cut: TermCut,
    /// Fraction bits of the accumulator register (13 on Hopper FP8; 23 = a full f32).
    pub out_frac_bits: u32,
    /// How the step's sum is written back.
    pub out_round: WriteBack,
}

/// Hopper `wgmma.mma_async ... .f32.e4m3.e4m3` (MMA-Sim `WGMMA('Hopper', 'm64nNk32.f32.e4m3.e4m3')`):
/// F = 13, L = 32, terms truncated toward zero, written back truncated to e8m13.
pub const HOPPER_FP8_WGMMA: TensorCoreModel = TensorCoreModel {
    frac_bits: 13,
    group: 32,
    term_cut: TermCut::TowardZero,
    out_frac_bits: 13,
    out_round: WriteBack::TowardZero,
};

/// Largest `frac_bits` the exact integer sum supports (terms stay below 2^100 in an i128).
pub const MAX_FRAC_BITS: u32 = 64;
/// Largest `group`.
pub const MAX_GROUP: usize = 1 << 20;

/// One exact term: `value = sig · 2^(exp − frac)`, aligned by its nominal exponent `exp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Term {
    sig: i64,
    exp: i32,
    frac: i32,
}

/// Sign-free integer significand and nominal exponent of a finite E4M3 code:
/// `|value| = sig · 2^(exp − 3)`; subnormals use emin = −6.
pub fn e4m3_parts(code: u8) -> (i64, i32) {
    let exponent_field = i32::from((code >> 3) & 0x0F);
    let mantissa = i64::from(code & 0x07);
    if exponent_field == 0 {
        (mantissa, -6)
    } else {
        (8 + mantissa, exponent_field - 7)
    }
}

/// The exact product of two finite E4M3 codes: `(Sa·Sb) · 2^(ea + eb − 6)`, nominal exponent
/// `ea + eb`.
fn e4m3_product(a: u8, b: u8) -> Term {
    let (sa, ea) = e4m3_parts(a);
    let (sb, eb) = e4m3_parts(b);
    let negative = (a ^ b) & 0x80 != 0;
    let sig = sa * sb;
    Term {
        sig: if negative { -sig } else { sig },
        exp: ea + eb,
        frac: 6,
    }
}

/// The accumulator as an exact term: 24-bit significand, exponent `⌊log2|c|⌋` or −126.
fn f32_term(c: f32) -> Term {
    let bits = c.to_bits();
    let exponent_field = ((bits >> 23) & 0xFF) as i32;
    let mantissa = i64::from(bits & 0x7F_FFFF);
    let (sig, exp) = if exponent_field == 0 {
        (mantissa, -126)
    } else {
        (mantissa | (1 << 23), exponent_field - 127)
    };
    Term {
        sig: if c.is_sign_negative() { -sig } else { sig },
        exp,
        frac: 23,
    }
}

impl TensorCoreModel {
    /// Reject parameters the model cannot represent, naming the field.
    pub fn validate(&self, op: &'static str) -> Result<()> {
        let bad = |name: &'static str, value: String, why: &str| Error::Argument {
            op,
            name,
            value,
            why: why.to_string(),
        };
        if self.frac_bits == 0 || self.frac_bits > MAX_FRAC_BITS {
            return Err(bad(
                "acc_frac_bits",
                self.frac_bits.to_string(),
                &format!("must be in 1..={MAX_FRAC_BITS}"),
            ));
        }
        if self.group == 0 || self.group > MAX_GROUP {
            return Err(bad(
                "acc_group",
                self.group.to_string(),
                &format!("must be in 1..={MAX_GROUP}"),
            ));
        }
        if self.out_frac_bits > 23 {
            return Err(bad(
                "acc_out_frac_bits",
                self.out_frac_bits.to_string(),
                "must be at most 23 (the accumulator is an f32 register)",
            ));
        }
        Ok(())
    }

    /// One T-FDPA step (module docs): `c + Σ_j a[j]·b[j]` over at most `group` pairs of finite
    /// E4M3 codes, with every term cut to `frac_bits` below the largest exponent and the result
    /// written back with `out_frac_bits`. Shapes: `a, b: [L]`, `c` scalar → scalar.
    pub fn fdpa_step(&self, a: &[u8], b: &[u8], c: f32) -> f32 {
        debug_assert!(a.len() == b.len() && a.len() <= self.group);
        let terms = a
            .iter()
            .zip(b)
            .map(|(&x, &y)| e4m3_product(x, y))
            .chain(std::iter::once(f32_term(c)));
        // step 2: the largest nominal exponent among the non-zero terms
        let Some(emax) = terms.clone().filter(|t| t.sig != 0).map(|t| t.exp).max() else {
            return 0.0;
        };
        // step 3: the quantum 2^q, q = emax − F; cut every term to a multiple of it
        let q = emax - self.frac_bits as i32;
        let mut sum: i128 = 0;
        for t in terms {
            // value = sig · 2^(exp − frac) = sig · 2^shift · 2^q
            let shift = t.exp - t.frac - q;
            sum += if shift >= 0 {
                i128::from(t.sig) << shift
            } else {
                self.cut(t.sig, (-shift) as u32)
            };
        }
        // step 4: write sum · 2^q back into the accumulator register
        write_back(sum, q, self.out_frac_bits, self.out_round)
    }

    /// `sig · 2^-drop` cut to an integer by `term_cut`.
    fn cut(&self, sig: i64, drop: u32) -> i128 {
        let drop = drop.min(127);
        let sig = i128::from(sig);
        match self.term_cut {
            TermCut::TowardZero => {
                let magnitude = sig.abs() >> drop;
                if sig < 0 {
                    -magnitude
                } else {
                    magnitude
                }
            }
            // arithmetic shift of the two's-complement integer: rounds toward −∞
            TermCut::Floor => sig >> drop,
            TermCut::Nearest => {
                // drop ∈ 1..=127, |sig| < 2^64: exact in u128
                let magnitude = sig.unsigned_abs();
                let (whole, rest) = (magnitude >> drop, magnitude & ((1u128 << drop) - 1));
                let half = 1u128 << (drop - 1);
                let up = rest > half || (rest == half && whole % 2 == 1);
                let rounded = (whole + u128::from(up)) as i128;
                if sig < 0 {
                    -rounded
                } else {
                    rounded
                }
            }
        }
    }

    /// `Σ_k a[k]·b[k]` as the Tensor Core accumulates it from `c = 0`: consecutive steps of
    /// `group` products, each carrying the accumulator into the next. Shapes: `a, b: [n]`.
    pub fn accumulate_e4m3(&self, a: &[u8], b: &[u8]) -> f32 {
        debug_assert_eq!(a.len(), b.len());
        let mut c = 0f32;
        for (a_step, b_step) in a.chunks(self.group).zip(b.chunks(self.group)) {
            c = self.fdpa_step(a_step, b_step, c);
        }
        c
    }
}

/// Round `sum · 2^q` to an f32 with `out_frac_bits` fraction bits (quantum never below
/// `2^(−126 − out_frac_bits)`); a zero sum gives `+0`. Overflow saturates to the largest
/// such value under truncation and gives ±inf under nearest-even.
fn write_back(sum: i128, q: i32, out_frac_bits: u32, round: WriteBack) -> f32 {
    if sum == 0 {
        return 0.0;
    }
    let negative = sum < 0;
    let magnitude = sum.unsigned_abs();
    // the exponent of the leading bit of |sum · 2^q|
    let lead = 127 - magnitude.leading_zeros() as i32;
    let e = lead + q;
    // the register's quantum at that exponent
    let out_q = e.max(-126) - out_frac_bits as i32;
    let (mut kept, mut kept_q) = (magnitude, q);
    if out_q > q {
        let drop = (out_q - q) as u32;
        let (whole, rest) = if drop >= 128 {
            (0, magnitude)
        } else {
            (magnitude >> drop, magnitude & ((1u128 << drop) - 1))
        };
        let round_up = match round {
            WriteBack::TowardZero => false,
            WriteBack::NearestEven => {
                let half = if drop > 128 {
                    u128::MAX
                } else {
                    1u128 << (drop - 1)
                };
                rest > half || (rest == half && whole % 2 == 1)
            }
        };
        kept = whole + u128::from(round_up);
        kept_q = out_q;
    }
    // |value| = kept · 2^kept_q with at most out_frac_bits + 2 significant bits: exact in f64
    register_value(
        kept as f64 * 2f64.powi(kept_q),
        out_frac_bits,
        round,
        negative,
    )
}

/// The register's value from the magnitude the write-back kept (exact in f64): above the largest
/// value `out_frac_bits` fraction bits hold below 2^128, truncation saturates to it and rounding
/// to nearest overflows to ∞; then f32 (exact: at most 24 significant bits), signed.
pub fn register_value(magnitude: f64, out_frac_bits: u32, round: WriteBack, negative: bool) -> f32 {
    // 2^e from its bits (−64 ≤ e ≤ 127: normal), cheaper than powi for the fast path's steps
    let pow2 = |e: i32| f64::from_bits(((e + 1023) as u64) << 52);
    let largest = (2.0 - pow2(-(out_frac_bits as i32))) * pow2(127);
    let value = if magnitude > largest {
        match round {
            WriteBack::TowardZero => largest,
            WriteBack::NearestEven => f64::INFINITY,
        }
    } else {
        magnitude
    };
    let value = value as f32;
    if negative {
        -value
    } else {
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fp8::format::{Saturation, E4M3};

    fn code(x: f32) -> u8 {
        let c = E4M3.encode(x, Saturation::NonSat) as u8;
        assert_eq!(E4M3.decode(u16::from(c)), x, "{x} is not an E4M3 value");
        c
    }

    /// One step with products `a[j]·b[j]` given as values, padded with zeros to L = 32.
    fn step(model: &TensorCoreModel, pairs: &[(f32, f32)], c: f32) -> f32 {
        let a: Vec<u8> = pairs.iter().map(|p| code(p.0)).collect();
        let b: Vec<u8> = pairs.iter().map(|p| code(p.1)).collect();
        model.fdpa_step(&a, &b, c)
    }

    #[test]
    fn p1_the_accumulator_keeps_13_fraction_bits() {
        // A = B = 0, c = 1 + (2^23 − 1)·2^-23: c is itself a term aligned to its own exponent,
        // so its 10 low mantissa bits are cut (SageAttention2's probe): 1 + (2^13 − 1)·2^-13,
        // whatever the write-back rounding.
        let c = f32::from_bits(0x3FFF_FFFF);
        let rne = TensorCoreModel {
            out_round: WriteBack::NearestEven,
            ..HOPPER_FP8_WGMMA
        };
        for model in [HOPPER_FP8_WGMMA, rne] {
            assert_eq!(step(&model, &[(0.0, 0.0)], c), 1.0 + 8191.0 / 8192.0);
            assert_eq!(step(&model, &[], -c), -(1.0 + 8191.0 / 8192.0));
        }
        // The write-back matters when the sum carries into the next binade: c = 2 − 2^-13 plus
        // 1.875·1 is 3.875 − 2^-13 (31743 quanta of 2^-13), but the register keeps 13 fraction
        // bits at exponent 1 (quantum 2^-12): truncation gives 3.875 − 2^-12, nearest-even
        // breaks the tie 15871.5 → 15872, i.e. 3.875.
        let c = 2.0 - 2f32.powi(-13);
        assert_eq!(
            step(&HOPPER_FP8_WGMMA, &[(1.875, 1.0)], c),
            3.875 - 2f32.powi(-12)
        );
        assert_eq!(step(&rne, &[(1.875, 1.0)], c), 3.875);
    }

    #[test]
    fn p2_a_product_survives_alignment_only_within_13_bits() {
        // c = 2^4 and one product 2^-6 · 2^(10−t) = 2^(4−t): the quantum is 2^(4−13), so the
        // product is kept exactly when t ≤ 13 and dropped for t ≥ 14.
        for t in 10..=16 {
            let p = 2f32.powi(4 - t);
            let d = step(
                &HOPPER_FP8_WGMMA,
                &[(2f32.powi(-6), 2f32.powi(10 - t))],
                16.0,
            );
            let want = if t <= 13 { 16.0 + p } else { 16.0 };
            assert_eq!(d, want, "t = {t}");
        }
    }

    #[test]
    fn p3_negative_terms_cut_toward_zero_or_floor() {
        // c = 2^4, product −1.5·2^-5 · 2^-5 = −1.5·2^-10 = −0.75 quanta of 2^(4−13).
        // Toward zero it vanishes: D = c. Floor makes it −1 quantum: D = 16 − 2^-9, which has
        // 12 fraction bits at exponent 3 and is written back exactly.
        let pair = [(-1.5 * 2f32.powi(-5), 2f32.powi(-5))];
        assert_eq!(step(&HOPPER_FP8_WGMMA, &pair, 16.0), 16.0);
        let floor = TensorCoreModel {
            term_cut: TermCut::Floor,
            ..HOPPER_FP8_WGMMA
        };
        assert_eq!(step(&floor, &pair, 16.0), 16.0 - 2f32.powi(-9));
    }

    #[test]
    fn p4_a_tiny_product_is_lost_only_inside_the_big_products_group() {
        // +B at k = 0, −B at k = 1 (B = 448·448), tiny = 2^-12 at k = p. In the same group the
        // tiny product is cut against 2^(16 − 13) = 8 (nominal exponent 8 + 8) and lost; in a
        // later group it is alone.
        for group in [32usize, 16] {
            let model = TensorCoreModel {
                group,
                ..HOPPER_FP8_WGMMA
            };
            for p in 2..64 {
                let mut a = vec![0u8; 64];
                let mut b = vec![0u8; 64];
                (a[0], b[0]) = (code(448.0), code(448.0));
                (a[1], b[1]) = (code(-448.0), code(448.0));
                (a[p], b[p]) = (code(2f32.powi(-6)), code(2f32.powi(-6)));
                let d = model.accumulate_e4m3(&a, &b);
                let want = if p < group { 0.0 } else { 2f32.powi(-12) };
                assert_eq!(d, want, "group {group}, p = {p}");
            }
        }
    }

    #[test]
    fn products_use_the_nominal_exponent_not_the_leading_bit() {
        // 1.875·1.875 = 225·2^-6 = 3.515625 has nominal exponent 0 although its value lies in
        // [2, 4); −1.75·1 has nominal exponent 0 too. With c = 2^-13: emax = 0, the quantum is
        // 2^-13 and c survives; the sum 1.765625 + 2^-13 lies in [1, 2), where the e8m13
        // register keeps 2^-13. Aligning to the leading bit (exponent 1) would have cut c.
        let pairs = [(1.875, 1.875), (-1.75, 1.0)];
        let d = step(&HOPPER_FP8_WGMMA, &pairs, 2f32.powi(-13));
        assert_eq!(d, 1.765625 + 2f32.powi(-13));
        // with F = 12 the quantum is 2^-12 and c is lost
        let f12 = TensorCoreModel {
            frac_bits: 12,
            ..HOPPER_FP8_WGMMA
        };
        assert_eq!(step(&f12, &pairs, 2f32.powi(-13)), 1.765625);
    }

    #[test]
    fn enough_bits_reproduce_the_correctly_rounded_sum() {
        // F = 60 keeps every bit of 128 E4M3 products (they span < 2^43 quanta of 2^-18), and
        // one group of 128 with a 23-bit nearest-even write-back rounds the exact sum once.
        let wide = TensorCoreModel {
            frac_bits: 60,
            group: 128,
            term_cut: TermCut::TowardZero,
            out_frac_bits: 23,
            out_round: WriteBack::NearestEven,
        };
        // codes 0..=126 and 128..=254: every code except the NaNs 0x7F and 0xFF
        let finite = |v: u32| if v >= 127 { v + 1 } else { v } as u8;
        let a: Vec<u8> = (0..128u32).map(|k| finite((k * 37 + 11) % 254)).collect();
        let b: Vec<u8> = (0..128u32).map(|k| finite((k * 91 + 5) % 254)).collect();
        let exact: f64 = a
            .iter()
            .zip(&b)
            .map(|(&x, &y)| {
                f64::from(E4M3.decode(u16::from(x))) * f64::from(E4M3.decode(u16::from(y)))
            })
            .sum();
        assert_eq!(wide.accumulate_e4m3(&a, &b), exact as f32);
    }

    #[test]
    fn subnormal_results_keep_the_quantum_of_the_normal_range() {
        // sum = 3·2^-140: below 2^-126 the quantum is 2^(−126−13) = 2^-139, so truncation gives
        // 2^-139 and nearest-even gives 2^-138 (1.5 quanta → 2, even).
        assert_eq!(
            write_back(3, -140, 13, WriteBack::TowardZero),
            2f32.powi(-139)
        );
        assert_eq!(
            write_back(3, -140, 13, WriteBack::NearestEven),
            2f32.powi(-138)
        );
        assert_eq!(
            write_back(-3, -140, 13, WriteBack::TowardZero),
            -2f32.powi(-139)
        );
        assert_eq!(write_back(0, 5, 13, WriteBack::TowardZero).to_bits(), 0);
    }

    #[test]
    fn a_cancelled_step_returns_positive_zero() {
        let d = step(&HOPPER_FP8_WGMMA, &[(1.0, 1.0), (-1.0, 1.0)], 0.0);
        assert_eq!(d.to_bits(), 0);
    }

    #[test]
    fn validate_names_the_bad_field() {
        let m = TensorCoreModel {
            out_frac_bits: 24,
            ..HOPPER_FP8_WGMMA
        };
        let e = m.validate("fp8_gemm").unwrap_err().to_string();
        assert!(e.contains("acc_out_frac_bits") && e.contains("24"), "{e}");
        let m = TensorCoreModel {
            group: 0,
            ..HOPPER_FP8_WGMMA
        };
        assert!(m
            .validate("x")
            .unwrap_err()
            .to_string()
            .contains("acc_group"));
    }
}
