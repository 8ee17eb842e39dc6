//! A model-free bound on Tensor Core FP8 accumulation (`accumulation: "tensor_core_bound"`):
//! how far the partial of one promotion window may be from the exact window dot for **any**
//! kernel whose Tensor Core works as V3 §3.3.2 describes, whatever its exact rounding choices.
//!
//! # The kernels it covers
//! A window of `N_C` products (V3: 128) is accumulated from zero in steps of `L` consecutive
//! products (the last step of a window may be shorter). One step, as in
//! [`accumulate`](super::accumulate) but with every choice left open:
//! 1. the terms are the step's products and the incoming accumulator `c` (none in a window's
//!    first step); each nonzero term has a nominal exponent (`ea + eb` for a product, as in
//!    MMA-Sim: a subnormal factor counts as −6; `⌊log2|c|⌋`, at least −126, for `c`);
//! 2. every term is cut to a multiple of the quantum `q = 2^(e_max − F')`, `e_max` the largest
//!    nominal exponent, `F' ≥ F` fraction bits, toward zero, toward −∞ or to nearest;
//! 3. the exact sum `S` of the cut terms is written to a register holding `F_out ≥ F` fraction
//!    bits below its own exponent (`≥ −126`), truncated or to nearest.
//!
//! Hopper `wgmma` is F = 13, L = 32 (MMA-Sim's model, [`HOPPER_FP8_WGMMA`](super::HOPPER_FP8_WGMMA));
//! Ada's FP8 `mma` L = 16; a kernel with more fraction bits (Blackwell `tcgen05`, F = 25) or
//! exact dots is covered by the same (F, L). Steps are the consecutive L-chunks of a window: a
//! kernel fusing fewer products per step is checked with its own `acc_group`.
//!
//! # The bound of one step ([`TensorCoreBound::step`])
//! Let `C` be the exact partial before the step and `Δ` the bound so far, so any admissible
//! accumulator has `|c − C| ≤ Δ`. With `e_p` the largest nominal exponent of the step's nonzero
//! products and `e_c = max(⌊log2(|C| + Δ)⌋, −126)`:
//! - `e_max ≤ e_u = max(e_p, e_c)`, so the quantum is at most `q_u = 2^(e_u − F)`;
//! - a product of two E4M3 values is `Sa·Sb·2^(ea+eb−6)` (significands of 4 bits: at most 8
//!   significant bits), a multiple of `2^(ea+eb−6)`: when `ea + eb − 6 ≥ e_u − F` it is a
//!   multiple of every admissible quantum and is cut **exactly** (with F = 13: every product
//!   within 7 binades of the step's largest). Any other nonzero product loses less than `q_u`
//!   (toward zero: at most `min(|p|, q)`; toward −∞ a negative one up to `q`; nearest `q/2`);
//! - the accumulator `c` (after the first step) loses less than `q_u`;
//! - `|S| ≤ |C + Σp| + Δ + (the cuts above)`; the write-back keeps `F_out ≥ F` bits below
//!   `e_S = max(⌊log2|S|⌋, −126)`, a quantum of at most `2^(e_S − F)`. `S` is a multiple of the
//!   step's quantum `2^(e_max − F')`, so it is written **exactly** when `e_S ≤ e_max`; we know
//!   `e_max ≥ e_p` and `e_max ≥ ⌊log2(|C| − Δ)⌋` (when `|C| > Δ`), so the write-back costs
//!   nothing when the upper bound of `e_S` is at most the larger of those; else up to
//!   `2^(e_S,u − F)`.
//!
//! `Δ` after the step is `Δ + q_u·(#inexact products + [c present]) + write-back`. Every quantity
//! is a power of two times a small integer, summed in f64 (`C` is exact in f64: a window of at
//! most [`MAX_EXACT_BLOCK`](super::fp8_gemm::MAX_EXACT_BLOCK) products).
//!
//! The tolerance of a whole output element (promotion, scales, output rounding) is built on
//! these window bounds in the registry's policy (SPEC.md "Tensor Core bound").

use crate::error::{Error, Result};

/// The parameters of the bound: the least fraction bits F any covered kernel keeps, and the
/// products L fused per step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorCoreBound {
    /// F: fraction bits kept below the step's largest exponent (at least).
    pub frac_bits: u32,
    /// L: products per Tensor Core step.
    pub group: usize,
}

/// Hopper `wgmma` FP8: F = 13, L = 32.
pub const HOPPER_FP8_BOUND: TensorCoreBound = TensorCoreBound {
    frac_bits: 13,
    group: 32,
};

/// One promotion window: its exact dot and the bound on any kernel's partial around it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WindowBound {
    /// `Σ a·b` over the window, exact.
    pub exact: f64,
    /// `Δ`: every covered kernel's partial `p̃` has `|p̃ − exact| ≤ delta`.
    pub delta: f64,
}

/// The nominal exponent of a finite E4M3 code (subnormals: −6), `None` for ±0.
pub fn e4m3_exponent(code: u8) -> Option<i32> {
    let field = i32::from((code >> 3) & 0x0F);
    match (field, code & 0x07) {
        (0, 0) => None,
        (0, _) => Some(-6),
        _ => Some(field - 7),
    }
}

/// `⌊log2 x⌋` of a positive finite f64, from its bits (exact, subnormals included).
pub fn floor_log2(x: f64) -> i32 {
    debug_assert!(x > 0.0 && x.is_finite());
    let bits = x.to_bits();
    let field = ((bits >> 52) & 0x7FF) as i32;
    if field == 0 {
        // subnormal: value = mantissa · 2^-1074
        63 - (bits & 0x000F_FFFF_FFFF_FFFF).leading_zeros() as i32 - 1074
    } else {
        field - 1023
    }
}

/// `2^e` as an f64 (e within the normal and subnormal range of f64).
pub fn pow2(e: i32) -> f64 {
    2f64.powi(e)
}

impl TensorCoreBound {
    /// Reject parameters the bound cannot use, naming the config field.
    pub fn validate(&self, op: &'static str) -> Result<()> {
        let bad = |name: &'static str, value: String, why: &str| Error::Argument {
            op,
            name,
            value,
            why: why.to_string(),
        };
        if self.frac_bits == 0 || self.frac_bits > super::accumulate::MAX_FRAC_BITS {
            return Err(bad(
                "acc_frac_bits",
                self.frac_bits.to_string(),
                &format!("must be in 1..={}", super::accumulate::MAX_FRAC_BITS),
            ));
        }
        if self.group == 0 || self.group > super::accumulate::MAX_GROUP {
            return Err(bad(
                "acc_group",
                self.group.to_string(),
                &format!("must be in 1..={}", super::accumulate::MAX_GROUP),
            ));
        }
        Ok(())
    }

    /// The bound of one promotion window (module docs). Shapes: `a, b: [n]` finite E4M3 codes,
    /// `n` ≤ `MAX_EXACT_BLOCK`; `values` is [`e4m3_values`](super::fp8_gemm::e4m3_values).
    pub fn window(&self, a: &[u8], b: &[u8], values: &[f64; 256]) -> WindowBound {
        debug_assert_eq!(a.len(), b.len());
        let mut w = WindowBound {
            exact: 0.0,
            delta: 0.0,
        };
        for (s, (a_step, b_step)) in a.chunks(self.group).zip(b.chunks(self.group)).enumerate() {
            let exponents: Vec<Option<i32>> = a_step
                .iter()
                .zip(b_step)
                .map(|(&x, &y)| Some(e4m3_exponent(x)? + e4m3_exponent(y)?))
                .collect();
            // the step's dot, exact in f64
            let dot: f64 = a_step
                .iter()
                .zip(b_step)
                .map(|(&x, &y)| values[usize::from(x)] * values[usize::from(y)])
                .sum();
            w = self.step(w, &exponents, dot, s > 0);
        }
        w
    }

    /// One step (module docs): `before` is the window so far, `exponents[k]` the nominal
    /// exponent `ea + eb` of each product (`None`: a zero product), `dot` the step's exact dot,
    /// `has_c` whether an accumulator enters (every step but a window's first).
    pub fn step(
        &self,
        before: WindowBound,
        exponents: &[Option<i32>],
        dot: f64,
        has_c: bool,
    ) -> WindowBound {
        let e_p = exponents.iter().flatten().copied().max();
        let Some(bounds) = self.step_exponents(before, e_p, has_c) else {
            // no nonzero term: the step adds exactly nothing
            return WindowBound {
                exact: before.exact + dot,
                delta: before.delta,
            };
        };
        let inexact = exponents
            .iter()
            .flatten()
            .filter(|&&e| e < bounds.threshold)
            .count();
        self.step_finish(before, &bounds, inexact, dot)
    }

    /// The first half of a step: the exponent bounds, from the window so far and the largest
    /// nominal exponent `e_p` of the step's products (`None`: all zero). `None` when no term of
    /// the step can be nonzero.
    pub fn step_exponents(
        &self,
        before: WindowBound,
        e_p: Option<i32>,
        has_c: bool,
    ) -> Option<StepExponents> {
        let f = self.frac_bits as i32;
        let c_upper = before.exact.abs() + before.delta;
        let e_c = (has_c && c_upper > 0.0).then(|| floor_log2(c_upper).max(-126));
        let e_u = e_p.max(e_c)?;
        let c_lower = before.exact.abs() - before.delta;
        let e_c_lower = (has_c && c_lower > 0.0).then(|| floor_log2(c_lower).max(-126));
        Some(StepExponents {
            e_p,
            e_u,
            has_c: e_c.is_some(),
            e_max_lower: e_p.max(e_c_lower),
            // a product of nominal exponent e sits on the grid 2^(e−6): inexact iff e − 6 < e_u − F
            threshold: e_u - f + 6,
        })
    }

    /// The second half of a step: the cuts (`inexact` products below `bounds.threshold`, and
    /// the accumulator) and the write-back; returns the window after the step.
    pub fn step_finish(
        &self,
        before: WindowBound,
        bounds: &StepExponents,
        inexact: usize,
        dot: f64,
    ) -> WindowBound {
        let f = self.frac_bits as i32;
        let exact = before.exact + dot;
        let q = pow2(bounds.e_u - f);
        let cut = (inexact + usize::from(bounds.has_c)) as f64 * q;
        // the write-back of S, |S| ≤ |exact| + Δ + cut
        let s_upper = exact.abs() + before.delta + cut;
        let write_back = if bounds.e_p.is_none() {
            // no product: S is the accumulator cut to its own quantum, stored exactly
            0.0
        } else if before.delta + cut == 0.0 {
            // every term was exact: S is the exact sum, stored exactly iff it fits F bits
            if exact == 0.0 || multiple_of_pow2(exact, floor_log2(exact.abs()).max(-126) - f) {
                0.0
            } else {
                pow2(floor_log2(exact.abs()).max(-126) - f)
            }
        } else {
            let e_s = floor_log2(s_upper).max(-126);
            match bounds.e_max_lower {
                Some(e) if e_s <= e => 0.0,
                _ => pow2(e_s - f),
            }
        };
        WindowBound {
            exact,
            delta: before.delta + cut + write_back,
        }
    }
}

/// What the first half of a step found ([`TensorCoreBound::step_exponents`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepExponents {
    /// The largest nominal exponent of the step's nonzero products.
    pub e_p: Option<i32>,
    /// An upper bound of the step's largest nominal exponent (products and accumulator).
    pub e_u: i32,
    /// Whether a possibly nonzero accumulator enters the step.
    pub has_c: bool,
    /// A lower bound of the step's largest nominal exponent.
    pub e_max_lower: Option<i32>,
    /// Products with a nominal exponent below it may be cut inexactly.
    pub threshold: i32,
}

/// Whether `x` (finite, nonzero) is a multiple of `2^e`.
fn multiple_of_pow2(x: f64, e: i32) -> bool {
    (x / pow2(e)).fract() == 0.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fp8::accumulate::{TensorCoreModel, TermCut, WriteBack};
    use crate::fp8::format::{Saturation, E4M3};
    use crate::fp8::fp8_gemm::e4m3_values;
    use crate::rng::Rng;

    fn code(x: f32) -> u8 {
        E4M3.encode(x, Saturation::SatFinite) as u8
    }

    #[test]
    fn exponents_and_logs() {
        assert_eq!(e4m3_exponent(code(1.0)), Some(0));
        assert_eq!(e4m3_exponent(code(448.0)), Some(8));
        assert_eq!(e4m3_exponent(0x01), Some(-6)); // 2^-9, subnormal
        assert_eq!(e4m3_exponent(0x00), None);
        assert_eq!(e4m3_exponent(0x80), None);
        assert_eq!(floor_log2(1.0), 0);
        assert_eq!(floor_log2(0.75), -1);
        assert_eq!(floor_log2(f64::from_bits(1)), -1074);
        assert_eq!(floor_log2(3.0 * 2f64.powi(-1030)), -1029);
    }

    #[test]
    fn equal_products_are_exact_and_a_lone_tiny_one_costs_one_quantum() {
        let values = e4m3_values();
        let bound = HOPPER_FP8_BOUND;
        // 32 products of 1·1: every product within 7 binades of the largest, the sum 32 is a
        // multiple of the write-back quantum: exact
        let ones = vec![code(1.0); 32];
        let w = bound.window(&ones, &ones, &values);
        assert_eq!((w.exact, w.delta), (32.0, 0.0));
        // one product 2^-9·2^-9 (subnormals) beside 448·448 = 1.53·2^17 (nominal exponent
        // 16): 2^-18 is below the quantum 2^(16 − 13) and may be cut (one quantum, 8); the sum
        // lies in the binade 2^17 above the largest nominal exponent, so its write-back may
        // drop up to 2^(17 − 13) = 16
        let a = [code(448.0), 0x01];
        let w = bound.window(&a, &a, &values);
        assert_eq!(w.delta, 8.0 + 16.0);
        assert_eq!(w.exact, 448.0 * 448.0 + 2f64.powi(-18));
    }

    /// The bound holds for every combination of the model's choices (F' ≥ F, cut, register
    /// rounding and width) on random, all-positive, cancelling and subnormal-rich windows; it is
    /// also not absurdly loose (the worst use is reported).
    #[test]
    fn every_model_stays_within_the_bound() {
        let values = e4m3_values();
        let mut rng = Rng::new(11);
        let mut worst: f64 = 0.0;
        for trial in 0..400 {
            let n = rng.range(1, 300);
            let kind = trial % 4;
            let draw = |rng: &mut Rng| -> u8 {
                match kind {
                    0 => code((rng.normal() * 30.0) as f32),
                    1 => code((rng.uniform() * 100.0) as f32),
                    2 => code((rng.normal() * 2f64.powi(rng.range(0, 16) as i32 - 8)) as f32),
                    _ => rng.next_u64() as u8 & 0x87, // subnormals and ±0
                }
            };
            let a: Vec<u8> = (0..n).map(|_| draw(&mut rng)).collect();
            let mut b: Vec<u8> = (0..n).map(|_| draw(&mut rng)).collect();
            if kind == 2 {
                // heavy cancellation: b's second half negates the first's products
                for i in n / 2..n {
                    b[i] = b[i - n / 2] ^ 0x80;
                }
            }
            for l in [8usize, 16, 32] {
                let bound = TensorCoreBound {
                    frac_bits: 13,
                    group: l,
                };
                let w = bound.window(&a, &b, &values);
                for f in [13u32, 14, 23] {
                    for cut in [TermCut::TowardZero, TermCut::Floor, TermCut::Nearest] {
                        for (out_f, round) in [
                            (f, WriteBack::TowardZero),
                            (f, WriteBack::NearestEven),
                            (23, WriteBack::TowardZero),
                        ] {
                            let model = TensorCoreModel {
                                frac_bits: f,
                                group: l,
                                term_cut: cut,
                                out_frac_bits: out_f.max(f),
                                out_round: round,
                            };
                            let got = f64::from(model.accumulate_e4m3(&a, &b));
                            let err = (got - w.exact).abs();
                            assert!(err <= w.delta, "trial {trial} L={l} F={f} {cut:?} {round:?}: |{got} − {}| = {err} > {}", w.exact, w.delta);
                            if w.delta > 0.0 {
                                worst = worst.max(err / w.delta);
                            }
                        }
                    }
                }
            }
        }
        println!("worst use of the window bound: {worst:.3}");
        assert!(
            worst > 0.05,
            "the bound is never approached: worst use {worst}"
        );
    }
}
