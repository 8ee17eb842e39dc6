//! The bound's Tensor Core step for one row of a tile and a run of its columns (lanes), in the
//! form a compiler vectorizes: every quantity of [`TensorCoreBound::step_exponents`](dsv3_reference::fp8::tc_bound::TensorCoreBound::step_exponents) and
//! [`TensorCoreBound::step_finish`](dsv3_reference::fp8::tc_bound::TensorCoreBound::step_finish) computed lane by lane with the same IEEE operations
//! (exponents from the f64 bits, which equals `floor_log2` for the normal values that occur:
//! every nonzero partial and bound is a multiple of at least 2^-190), `None` as a very negative
//! sentinel. `tests/fp8_gemm_fast.rs` checks it against `scaled_dot` bit for bit.

/// `None` for an exponent: below every real one, and `max` with it is the `Option` max.
pub(super) const NONE: i32 = i32::MIN / 2;
/// Lanes whose i8 running maximum or count stays in one register (AVX-512: 64 bytes).
const CHUNK: usize = 64;

/// Per-lane temporaries, allocated once per task.
pub struct Scratch {
    emax: Vec<i8>,
    count: Vec<u32>,
    e_p: Vec<i32>,
    e_u: Vec<i32>,
    e_max_lower: Vec<i32>,
    has_c: Vec<bool>,
    threshold: Vec<i8>,
}

impl Scratch {
    pub fn new(lanes: usize) -> Self {
        Scratch {
            emax: vec![0; lanes],
            count: vec![0; lanes],
            e_p: vec![0; lanes],
            e_u: vec![0; lanes],
            e_max_lower: vec![0; lanes],
            has_c: vec![false; lanes],
            threshold: vec![0; lanes],
        }
    }
}

/// `⌊log2 x⌋` of a positive normal f64.
#[inline(always)]
fn log2_normal(x: f64) -> i32 {
    ((x.to_bits() >> 52) & 0x7FF) as i32 - 1023
}

/// `2^e`, e in the normal range.
#[inline(always)]
fn pow2(e: i32) -> f64 {
    f64::from_bits(((e + 1023) as u64) << 52)
}

/// One lane of [`TensorCoreBound::step_exponents`](dsv3_reference::fp8::tc_bound::TensorCoreBound::step_exponents): `(e_u, e_max_lower, has_c)` from the
/// step's largest pair exponent `e_p` ([`NONE`]: no nonzero product) and the window so far.
#[inline(always)]
pub(super) fn exponents_lane(has_c: bool, e_p: i32, exact: f64, delta: f64) -> (i32, i32, bool) {
    let c_upper = exact.abs() + delta;
    let e_c = if has_c && c_upper > 0.0 {
        log2_normal(c_upper).max(-126)
    } else {
        NONE
    };
    let c_lower = exact.abs() - delta;
    let e_cl = if has_c && c_lower > 0.0 {
        log2_normal(c_lower).max(-126)
    } else {
        NONE
    };
    (e_p.max(e_c), e_p.max(e_cl), e_c != NONE)
}

/// One lane of [`TensorCoreBound::step_finish`](dsv3_reference::fp8::tc_bound::TensorCoreBound::step_finish): `Δ` after the step, from `Δ` before, the
/// exponents `(e_p, e_u, e_max_lower)`, the terms that may be cut inexactly (products below the
/// threshold, and the accumulator) and the window's partial after the step.
#[inline(always)]
pub(super) fn finish_lane(
    f: i32,
    (e_p, e_u, e_max_lower): (i32, i32, i32),
    terms: u32,
    delta: f64,
    new_exact: f64,
) -> f64 {
    let d = delta;
    let q = pow2(e_u - f);
    let cut = f64::from(terms) * q;
    let write_back = if e_p == NONE {
        // no product: S is the accumulator cut to its own quantum, stored exactly
        0.0
    } else if d + cut == 0.0 {
        // every term exact: the sum is stored exactly iff it fits F bits
        if new_exact == 0.0 {
            0.0
        } else {
            let e_s = log2_normal(new_exact.abs()).max(-126);
            if (new_exact * pow2(f - e_s)).fract() == 0.0 {
                0.0
            } else {
                pow2(e_s - f)
            }
        }
    } else {
        // |S| ≤ |exact| + Δ + cut, in the reference's order
        let e_s = log2_normal(new_exact.abs() + d + cut).max(-126);
        if e_max_lower != NONE && e_s <= e_max_lower {
            0.0
        } else {
            pow2(e_s - f)
        }
    };
    // no term at all: the step adds exactly nothing
    if e_u == NONE {
        d
    } else {
        d + cut + write_back
    }
}

/// The row's exponents over the step, zeros encoded for the max and for the count.
pub type Row<'a> = (&'a [i8], &'a [i8]);
/// The columns' exponents of one step, `[step][stride]` for the max and for the count,
/// `cols` lanes used.
pub type Columns<'a> = (&'a [i8], &'a [i8], usize, usize);
/// The windows so far (`exact`, `delta`), one per lane.
pub type Windows<'a> = (&'a mut [f64], &'a mut [f64]);
/// The step dots (taken), and the block dots they are added to (when steps lie in blocks).
pub type Dots<'a> = (&'a mut [f64], Option<&'a mut [f64]>);

/// One step for `cols` lanes, the windows updated, the step dots taken.
pub fn step_row(
    f: i32,
    has_c: bool,
    ea: Row,
    eb: Columns,
    window: Windows,
    dots: Dots,
    s: &mut Scratch,
) {
    #[cfg(target_arch = "x86_64")]
    {
        use crate::isa::{isa, Isa};
        match isa() {
            // SAFETY: the level's detected features include every one the function enables.
            Isa::Avx512 => return unsafe { step_row_avx512(f, has_c, ea, eb, window, dots, s) },
            // SAFETY: as above.
            Isa::Avx2 => return unsafe { step_row_avx2(f, has_c, ea, eb, window, dots, s) },
            Isa::Portable => {}
        }
    }
    step_row_generic(f, has_c, ea, eb, window, dots, s)
}

/// [`step_row_generic`] compiled for AVX-512.
///
/// SAFETY (for callers): the CPU must support every feature enabled here.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,bmi1,bmi2,lzcnt,popcnt")]
unsafe fn step_row_avx512(
    f: i32,
    has_c: bool,
    ea: Row,
    eb: Columns,
    window: Windows,
    dots: Dots,
    s: &mut Scratch,
) {
    step_row_generic(f, has_c, ea, eb, window, dots, s)
}

/// [`step_row_generic`] compiled for AVX2.
///
/// SAFETY (for callers): the CPU must support every feature enabled here.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,bmi1,bmi2,lzcnt,popcnt")]
unsafe fn step_row_avx2(
    f: i32,
    has_c: bool,
    ea: Row,
    eb: Columns,
    window: Windows,
    dots: Dots,
    s: &mut Scratch,
) {
    step_row_generic(f, has_c, ea, eb, window, dots, s)
}

#[inline(always)]
fn step_row_generic(
    f: i32,
    has_c: bool,
    (ea_max, ea_count): Row,
    (ebt_max, ebt_count, stride, cols): Columns,
    (exact, delta): Windows,
    (dots, block): Dots,
    s: &mut Scratch,
) {
    let (exact, delta, dots) = (&mut exact[..cols], &mut delta[..cols], &mut dots[..cols]);
    // the largest pair exponent of every lane (pairs with a zero sum to ≤ −56), a chunk of
    // lanes at a time so that the running maxima stay in a register
    let emax = &mut s.emax[..cols];
    for c0 in (0..cols).step_by(CHUNK) {
        let mut m = [i8::MIN; CHUNK];
        if c0 + CHUNK <= cols {
            for (k, &a) in ea_max.iter().enumerate() {
                let row: &[i8; CHUNK] = ebt_max[k * stride + c0..][..CHUNK]
                    .try_into()
                    .expect("a full chunk");
                for l in 0..CHUNK {
                    m[l] = m[l].max(a.wrapping_add(row[l]));
                }
            }
            emax[c0..c0 + CHUNK].copy_from_slice(&m);
        } else {
            let width = cols - c0;
            for (k, &a) in ea_max.iter().enumerate() {
                let row = &ebt_max[k * stride + c0..k * stride + c0 + width];
                for (m, &b) in m.iter_mut().zip(row) {
                    *m = (*m).max(a.wrapping_add(b));
                }
            }
            emax[c0..].copy_from_slice(&m[..width]);
        }
    }
    // step_exponents
    let (e_p, e_u, e_ml, hc, thr) = (
        &mut s.e_p[..cols],
        &mut s.e_u[..cols],
        &mut s.e_max_lower[..cols],
        &mut s.has_c[..cols],
        &mut s.threshold[..cols],
    );
    for j in 0..cols {
        let ep = if emax[j] > super::PAIR_FLOOR {
            i32::from(emax[j])
        } else {
            NONE
        };
        let (eu, eml, has) = exponents_lane(has_c, ep, exact[j], delta[j]);
        e_p[j] = ep;
        e_u[j] = eu;
        e_ml[j] = eml;
        hc[j] = has;
        // every nonzero pair (≤ 16) is below the ceiling, every zero pair (≥ 54) above
        thr[j] = (eu - f + 6).clamp(-128, i32::from(super::PAIR_CEILING)) as i8;
    }
    // the nonzero products of every lane that may be cut inexactly
    let count = &mut s.count[..cols];
    count.fill(0);
    // u8 counters over at most 255 products at a time (a step may hold more: L up to 2^20)
    for k0 in (0..ea_count.len()).step_by(255) {
        let ks = k0..(k0 + 255).min(ea_count.len());
        for c0 in (0..cols).step_by(CHUNK) {
            let mut n = [0u8; CHUNK];
            let mut t = [i8::MIN; CHUNK];
            let width = CHUNK.min(cols - c0);
            if width == CHUNK {
                t.copy_from_slice(&thr[c0..c0 + CHUNK]);
                for k in ks.clone() {
                    let a = ea_count[k];
                    let row: &[i8; CHUNK] = ebt_count[k * stride + c0..][..CHUNK]
                        .try_into()
                        .expect("a full chunk");
                    for l in 0..CHUNK {
                        n[l] += u8::from(a.wrapping_add(row[l]) < t[l]);
                    }
                }
            } else {
                t[..width].copy_from_slice(&thr[c0..]);
                for k in ks.clone() {
                    let a = ea_count[k];
                    let row = &ebt_count[k * stride + c0..k * stride + c0 + width];
                    for ((n, &b), &t) in n.iter_mut().zip(row).zip(t.iter()) {
                        *n += u8::from(a.wrapping_add(b) < t);
                    }
                }
            }
            for (c, &n) in count[c0..c0 + width].iter_mut().zip(&n) {
                *c += u32::from(n);
            }
        }
    }
    // the step's dots into their blocks'
    if let Some(block) = block {
        for (b, &d) in block[..cols].iter_mut().zip(dots.iter()) {
            *b += d;
        }
    }
    // step_finish
    for j in 0..cols {
        let (x, d) = (exact[j], delta[j]);
        let new_exact = x + std::mem::take(&mut dots[j]);
        exact[j] = new_exact;
        delta[j] = finish_lane(
            f,
            (e_p[j], e_u[j], e_ml[j]),
            count[j] + u32::from(hc[j]),
            d,
            new_exact,
        );
    }
}
