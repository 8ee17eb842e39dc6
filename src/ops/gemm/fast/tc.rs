//! The Tensor Core model's step, fast and bit-identical to the readable
//! [`TensorCoreModel::fdpa_step`]: the same integer algorithm (products of E4M3 significands
//! aligned to the step's largest exponent, cut by `term_cut`, summed exactly, written back by
//! [`write_back`]) with the codes' significands and exponents from tables and the sum in an
//! i64, which holds it whenever `F ≤ 40` (every term is below `2^(F+2)`, at most 2^20 + 1 of
//! them); other parameters use the readable step. `tests/fp8_gemm_fast.rs` compares the
//! tensor_core mode with the readable loop bit for bit.

use dsv3_reference::fp8::accumulate::write_back;
use dsv3_reference::fp8::{TensorCoreModel, TermCut};

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
        for code in 0..256usize {
            let e = ((code >> 3) & 0x0F) as i32;
            let m = (code & 0x07) as i64;
            (c.sig[code], c.exp[code]) = if e == 0 { (m, -6) } else { (8 + m, e - 7) };
            c.neg[code] = code & 0x80 != 0;
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

/// One step, `F ≤ 40`: the readable step's algorithm on i64.
#[inline]
fn step(model: &TensorCoreModel, codes: &Codes, a: &[u8], b: &[u8], c: f32) -> f32 {
    // the accumulator as a term: 24-bit significand at its exponent (or −126), frac 23
    let bits = c.to_bits();
    let field = ((bits >> 23) & 0xFF) as i32;
    let mantissa = i64::from(bits & 0x7F_FFFF);
    let (c_sig, c_exp) = if field == 0 {
        (mantissa, -126)
    } else {
        (mantissa | (1 << 23), field - 127)
    };
    let c_sig = if c.is_sign_negative() { -c_sig } else { c_sig };
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
    write_back(i128::from(sum), q, model.out_frac_bits, model.out_round)
}
