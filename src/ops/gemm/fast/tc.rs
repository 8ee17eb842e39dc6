//! The Tensor Core model's step, fast and bit-identical to the readable
//! [`TensorCoreModel::fdpa_step`]: the same integer algorithm (products of E4M3 significands
//! aligned to the step's largest exponent, cut by `term_cut`, summed exactly, written back to
//! `out_frac_bits`) with the codes decoded by table or arithmetic, the sum in an i64 — which holds
//! it whenever `F ≤ 40` (every term is below `2^(F+2)`, at most 2^20 + 1 of them) — and the
//! write-back's `2^e` built from its bits. A full step of 32 products with the cut toward zero
//! or by floor runs branch-free over its 32 lanes, compiled for AVX-512 ([`step32`]); other
//! parameters use the scalar [`step`], and `F > 40` the readable step. Tests: 20,000 random
//! steps against `fdpa_step` below, and the tensor_core mode against the readable loop in
//! `tests/fp8_gemm_fast.rs`.

use dsv3_reference::fp8::accumulate::{e4m3_parts, register_value};
use dsv3_reference::fp8::{TensorCoreModel, TermCut, WriteBack};

/// Largest F the i64 sum covers.
const MAX_FAST_FRAC_BITS: u32 = 40;

/// `(|significand|, nominal exponent, negative)` of every E4M3 code (`|v| = sig·2^(exp − 3)`,
/// subnormals at −6); NaN codes never reach here (validated inputs).
pub struct Codes {
    sig: [i64; 256],
    exp: [i32; 256],
    neg: [bool; 256],
}

impl Codes {
    pub fn new() -> Self {
        let mut c = Codes {
            sig: [0; 256],
            exp: [0; 256],
            neg: [false; 256],
        };
        for code in 0..=255u8 {
            let i = usize::from(code);
            (c.sig[i], c.exp[i]) = e4m3_parts(code);
            c.neg[i] = code & 0x80 != 0;
        }
        c
    }
}

/// `sig · 2^-drop` cut to an integer as [`TermCut`] says (`drop ≥ 1`), on i64.
#[inline(always)]
fn cut(term_cut: TermCut, sig: i64, drop: u32) -> i64 {
    match term_cut {
        TermCut::TowardZero => {
            if drop >= 63 {
                0
            } else {
                let magnitude = sig.abs() >> drop;
                if sig < 0 {
                    -magnitude
                } else {
                    magnitude
                }
            }
        }
        TermCut::Floor => sig >> drop.min(63),
        TermCut::Nearest => {
            if drop >= 63 {
                // |sig| < 2^40 < half: rounds to 0
                return 0;
            }
            let magnitude = sig.unsigned_abs();
            let (whole, rest) = (magnitude >> drop, magnitude & ((1u64 << drop) - 1));
            let half = 1u64 << (drop - 1);
            let up = rest > half || (rest == half && whole % 2 == 1);
            let rounded = (whole + u64::from(up)) as i64;
            if sig < 0 {
                -rounded
            } else {
                rounded
            }
        }
    }
}

/// [`TensorCoreModel::accumulate_e4m3`], fast: consecutive steps of `group` products from
/// `c = 0`.
pub fn accumulate_e4m3(model: &TensorCoreModel, codes: &Codes, a: &[u8], b: &[u8]) -> f32 {
    if model.frac_bits > MAX_FAST_FRAC_BITS {
        return model.accumulate_e4m3(a, b);
    }
    let mut c = 0f32;
    for (sa, sb) in a.chunks(model.group).zip(b.chunks(model.group)) {
        c = step(model, codes, sa, sb, c);
    }
    c
}

/// The accumulator as a term: its signed 24-bit significand and exponent (−126 for zero and
/// subnormals), the significand's binary point 23 bits up.
#[inline(always)]
fn accumulator_term(c: f32) -> (i64, i32) {
    let bits = c.to_bits();
    let field = ((bits >> 23) & 0xFF) as i32;
    let mantissa = i64::from(bits & 0x7F_FFFF);
    let (sig, exp) = if field == 0 {
        (mantissa, -126)
    } else {
        (mantissa | (1 << 23), field - 127)
    };
    (if c.is_sign_negative() { -sig } else { sig }, exp)
}

/// One step, `F ≤ 40`: the readable step's algorithm on i64.
#[inline]
fn step(model: &TensorCoreModel, codes: &Codes, a: &[u8], b: &[u8], c: f32) -> f32 {
    let (c_sig, c_exp) = accumulator_term(c);
    // the largest nominal exponent among the non-zero terms
    let mut emax = if c_sig != 0 { c_exp } else { i32::MIN };
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (usize::from(x), usize::from(y));
        if codes.sig[x] != 0 && codes.sig[y] != 0 {
            emax = emax.max(codes.exp[x] + codes.exp[y]);
        }
    }
    if emax == i32::MIN {
        return 0.0;
    }
    let q = emax - model.frac_bits as i32;
    let mut sum: i64 = 0;
    let mut add = |sig: i64, shift: i32| {
        sum += if shift >= 0 {
            sig << shift
        } else {
            cut(model.term_cut, sig, (-shift) as u32)
        };
    };
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (usize::from(x), usize::from(y));
        let sig = codes.sig[x] * codes.sig[y];
        let sig = if codes.neg[x] != codes.neg[y] {
            -sig
        } else {
            sig
        };
        // value = sig · 2^(ea + eb − 6) = sig · 2^shift · 2^q
        add(sig, codes.exp[x] + codes.exp[y] - 6 - q);
    }
    add(c_sig, c_exp - 23 - q);
    write_back_i64(sum, q, model.out_frac_bits, model.out_round)
}

/// Products per vectorised step (one `wgmma` k32 step).
const GROUP32: usize = 32;

/// [`step`] for a full step of 32 products with the cut toward zero or by floor, written
/// branch-free over the 32 lanes so that the compiler vectorises it (the caller compiles it for
/// AVX-512): every lane computes the readable step's term, the same integer sum results.
#[inline(always)]
fn step32(model: &TensorCoreModel, a: &[u8], b: &[u8], c: f32) -> f32 {
    let (a, b) = (&a[..GROUP32], &b[..GROUP32]);
    let mut sig = [0i64; GROUP32];
    let mut exp = [0i32; GROUP32];
    for k in 0..GROUP32 {
        let (x, y) = (i32::from(a[k]), i32::from(b[k]));
        let (ex, ey) = ((x >> 3) & 0x0F, (y >> 3) & 0x0F);
        // significand 8 + mantissa, or the mantissa alone for a subnormal (exponent field 0)
        let sx = (x & 7) + 8 * i32::from(ex != 0);
        let sy = (y & 7) + 8 * i32::from(ey != 0);
        let s = i64::from(sx * sy);
        let negative = ((x ^ y) >> 7) & 1 == 1;
        sig[k] = if negative { -s } else { s };
        // nominal exponents max(e, 1) − 7 (subnormals at −6); zero products at −10^6
        let e = ex.max(1) + ey.max(1) - 14;
        exp[k] = if s != 0 { e } else { -1_000_000 };
    }
    let (c_sig, c_exp) = accumulator_term(c);
    let mut emax = if c_sig != 0 { c_exp } else { -1_000_000 };
    for &e in &exp {
        emax = emax.max(e);
    }
    if emax == -1_000_000 {
        return 0.0;
    }
    let q = emax - model.frac_bits as i32;
    let floor = model.term_cut == TermCut::Floor;
    let mut sum = 0i64;
    for k in 0..GROUP32 {
        // value = sig · 2^(exp − 6 − q); zero terms are 0 whatever the (clamped) shift
        let shift = (exp[k] - 6 - q).clamp(-63, 63);
        let left = sig[k] << shift.max(0);
        let drop = (-shift).max(0);
        let toward_zero = {
            let m = sig[k].abs() >> drop;
            if sig[k] < 0 {
                -m
            } else {
                m
            }
        };
        let right = if floor { sig[k] >> drop } else { toward_zero };
        sum += if shift >= 0 { left } else { right };
    }
    sum += shifted_scalar(model.term_cut, c_sig, c_exp - 23 - q);
    write_back_i64(sum, q, model.out_frac_bits, model.out_round)
}

/// `sig · 2^shift`, cut when the shift is negative (the accumulator's term).
#[inline(always)]
fn shifted_scalar(term_cut: TermCut, sig: i64, shift: i32) -> i64 {
    if shift >= 0 {
        sig << shift.min(63)
    } else {
        cut(term_cut, sig, shift.unsigned_abs())
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl")]
unsafe fn steps32_avx512(model: &TensorCoreModel, codes: &Codes, a: &[u8], b: &[u8]) -> f32 {
    steps32_body(model, codes, a, b)
}

/// The steps of one window with [`step32`] for every full step of 32 and [`step`] for a shorter
/// last one.
#[inline(always)]
fn steps32_body(model: &TensorCoreModel, codes: &Codes, a: &[u8], b: &[u8]) -> f32 {
    let mut c = 0f32;
    for (sa, sb) in a.chunks(GROUP32).zip(b.chunks(GROUP32)) {
        c = if sa.len() == GROUP32 {
            step32(model, sa, sb, c)
        } else {
            step(model, codes, sa, sb, c)
        };
    }
    c
}

/// [`accumulate_e4m3`], vectorised where it can be: a group of 32, a cut toward zero or by
/// floor, `F ≤ 40`, on a CPU with AVX-512.
pub fn accumulate_e4m3_fast(model: &TensorCoreModel, codes: &Codes, a: &[u8], b: &[u8]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        if model.group == GROUP32
            && model.frac_bits <= MAX_FAST_FRAC_BITS
            && model.term_cut != TermCut::Nearest
            && crate::isa::isa() == crate::isa::Isa::Avx512
        {
            // SAFETY: the CPU has the features the function is compiled for (checked above).
            return unsafe { steps32_avx512(model, codes, a, b) };
        }
    }
    accumulate_e4m3(model, codes, a, b)
}

/// [`write_back`] for a sum that fits an i64 (every sum here), the same arithmetic without
/// i128 and `powi`: `2^e` built from its bits (`e` stays in f64's normal range: `q ≥ −126 − 40`).
#[inline(always)]
fn write_back_i64(sum: i64, q: i32, out_frac_bits: u32, round: WriteBack) -> f32 {
    if sum == 0 {
        return 0.0;
    }
    let negative = sum < 0;
    let magnitude = sum.unsigned_abs();
    let lead = 63 - magnitude.leading_zeros() as i32;
    let e = lead + q;
    let out_q = e.max(-126) - out_frac_bits as i32;
    let (mut kept, mut kept_q) = (magnitude, q);
    if out_q > q {
        let drop = (out_q - q) as u32;
        let (whole, rest) = if drop >= 64 {
            (0, magnitude)
        } else {
            (magnitude >> drop, magnitude & ((1u64 << drop) - 1))
        };
        // a half of 2^63 or more exceeds every rest (|sum| < 2^63)
        let round_up = round == WriteBack::NearestEven
            && drop <= 63
            && (rest > 1u64 << (drop - 1) || (rest == 1u64 << (drop - 1) && whole % 2 == 1));
        kept = whole + u64::from(round_up);
        kept_q = out_q;
    }
    let value = kept as f64 * f64::from_bits(((kept_q + 1023) as u64) << 52);
    register_value(value, out_frac_bits, round, negative)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dsv3_reference::rng::Rng;

    /// A finite E4M3 code, with zeros, subnormals and ±448 often.
    fn code(rng: &mut Rng) -> u8 {
        let c = match rng.range(0, 9) {
            0 => 0,
            1 => rng.range(1, 7) as u8,
            2 => 0x7E,
            _ => rng.range(0, 0x7E) as u8,
        };
        if rng.chance(0.5) {
            c | 0x80
        } else {
            c
        }
    }

    /// An accumulator: zero, subnormal, or any f32 with full mantissa bits, either sign.
    fn accumulator(rng: &mut Rng) -> f32 {
        let bits = match rng.range(0, 5) {
            0 => 0,
            1 => rng.range(1, 0x7F_FFFF) as u32,
            _ => ((rng.range(90, 160) as u32) << 23) | rng.range(0, 0x7F_FFFF) as u32,
        };
        let c = f32::from_bits(bits);
        if rng.chance(0.5) {
            -c
        } else {
            c
        }
    }

    #[test]
    fn the_fast_steps_equal_the_readable_step_bit_for_bit() {
        // 100,000 random steps: every F ≤ 40, cut, write-back width and rounding
        let codes = Codes::new();
        let mut rng = Rng::new(11);
        for case in 0..100_000 {
            let model = TensorCoreModel {
                frac_bits: rng.range(1, 40) as u32,
                group: 32,
                term_cut: [TermCut::TowardZero, TermCut::Floor, TermCut::Nearest][rng.range(0, 2)],
                out_frac_bits: rng.range(0, 23) as u32,
                out_round: [WriteBack::TowardZero, WriteBack::NearestEven][rng.range(0, 1)],
            };
            let a: Vec<u8> = (0..32).map(|_| code(&mut rng)).collect();
            let b: Vec<u8> = (0..32).map(|_| code(&mut rng)).collect();
            let c = accumulator(&mut rng);
            let want = model.fdpa_step(&a, &b, c);
            let scalar = step(&model, &codes, &a, &b, c);
            assert_eq!(
                scalar.to_bits(),
                want.to_bits(),
                "case {case}: scalar {model:?} c {c:e}"
            );
            if model.term_cut != TermCut::Nearest {
                let lanes = step32(&model, &a, &b, c);
                assert_eq!(
                    lanes.to_bits(),
                    want.to_bits(),
                    "case {case}: step32 {model:?} c {c:e}"
                );
            }
        }
    }
}
