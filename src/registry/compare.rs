//! Comparing a candidate tensor with the reference: metrics, tolerance policies, verdicts.
//!
//! Every element is judged on its own: one element outside its policy fails the tensor, whatever
//! the global metrics say. The report always carries the exact-match fraction, max abs / rel
//! error, the ULP distances, DeepGEMM's global similarity `1 − 2Σxy/Σ(x²+y²)` (for orientation
//! only) and the worst element with its index.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::registry::tensor::{unravel, DType, Tensor};

/// How far a candidate element may be from the reference element.
pub enum Policy<'a> {
    /// Bit-identical (a NaN matches only the same NaN bits).
    Exact,
    /// At most `max` representable values apart (same dtype); NaN must face NaN.
    Ulps { max: u64, why: &'static str },
    /// `|got − want| ≤ atol + rtol·|want|`; NaN must face NaN, ±inf the same inf.
    Close {
        atol: f64,
        rtol: f64,
        why: &'static str,
    },
    /// Bit-identical, except elements `allow(flat index)` accepts; `why` says what it accepts.
    ExactUnless {
        why: &'static str,
        allow: Box<dyn Fn(usize) -> bool + 'a>,
    },
    /// Each element that is not bit-identical is judged by `judge(flat index)`: `Some(reason)`
    /// accepts it and counts it under `reason` in [`TensorReport::allowed_by`] (so that, e.g.,
    /// routing near-ties are reported apart from rounding differences), `None` is a violation.
    Judged {
        why: &'static str,
        judge: Box<dyn Fn(usize) -> Option<&'static str> + 'a>,
    },
    /// Like [`Policy::Judged`], but `judge` sees **every** element, bit-identical ones included:
    /// for policies that judge one tensor through another (gate weights matched by their expert
    /// id, codes against the candidate's own scale, ids as sets per token), where an element can
    /// be wrong although its bits equal the reference's (a weight left in place while its expert
    /// id moved). A bit-identical element the judge accepts counts as exact.
    Relational {
        why: &'static str,
        judge: Box<dyn Fn(usize) -> Option<&'static str> + 'a>,
    },
    /// Every element (bit-identical ones included) is measured against its own tolerance:
    /// `measure(flat index)` is the fraction of the tolerance it uses, above 1 a violation. The
    /// report carries the largest and the median fraction ([`TensorReport::bound_use`]), so a
    /// user sees the margin (`tensor_core_bound`).
    Bounded {
        why: &'static str,
        measure: Box<dyn Fn(usize) -> f64 + 'a>,
    },
    /// `inner` on the elements `judged(flat index)` accepts; the others are undefined by the
    /// op's contract (DeepGEMM's padding rows) and are neither judged nor measured.
    Partial {
        why: &'static str,
        judged: Box<dyn Fn(usize) -> bool + 'a>,
        inner: Box<Policy<'a>>,
    },
}

impl<'a> Policy<'a> {
    /// One line for reports.
    pub fn describe(&self) -> String {
        match self {
            Policy::Exact => "exact (bitwise)".into(),
            Policy::Ulps { max, why } => format!("≤ {max} ulp ({why})"),
            Policy::Close { atol, rtol, why } => format!("|Δ| ≤ {atol:e} + {rtol:e}·|ref| ({why})"),
            Policy::ExactUnless { why, .. } => format!("exact, except {why}"),
            Policy::Judged { why, .. }
            | Policy::Relational { why, .. }
            | Policy::Bounded { why, .. } => why.to_string(),
            Policy::Partial { why, inner, .. } => {
                format!("{}; not judged: {why}", inner.describe())
            }
        }
    }

    /// Whether element `i` is judged at all (false only for [`Policy::Partial`]'s exclusions).
    pub fn judges(&self, i: usize) -> bool {
        match self {
            Policy::Partial { judged, .. } => judged(i),
            _ => true,
        }
    }

    /// The same exclusions with bitwise equality everywhere else (`check --exact`).
    pub fn into_exact(self) -> Policy<'a> {
        match self {
            Policy::Partial { why, judged, .. } => Policy::Partial {
                why,
                judged,
                inner: Box::new(Policy::Exact),
            },
            _ => Policy::Exact,
        }
    }
}

/// One element in a report.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Element {
    pub index: Vec<usize>,
    pub got: String,
    pub want: String,
    /// The values of `got` and `want` (FP8 codes decoded, integers as numbers).
    pub got_value: f64,
    pub want_value: f64,
    pub abs_err: f64,
    pub ulp: Option<u64>,
}

/// Comparison of one output tensor.
#[derive(Debug, Clone, Serialize)]
pub struct TensorReport {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub numel: usize,
    pub policy: String,
    /// Elements bit-identical to the reference.
    pub exact: usize,
    pub exact_fraction: f64,
    /// Elements that differ but are within the policy.
    pub allowed: usize,
    /// The allowed elements by the reason a [`Policy::Judged`] gave (empty for other policies).
    pub allowed_by: BTreeMap<String, usize>,
    /// Elements the policy does not judge (undefined by the contract); not in any metric.
    pub ignored: usize,
    /// Elements outside the policy.
    pub violations: usize,
    /// Elements where exactly one side is NaN.
    pub nan_mismatch: usize,
    pub max_abs: f64,
    /// Max of `|Δ| / |ref|` over elements with a non-zero reference.
    pub max_rel: f64,
    /// Max distance in representable values (ULPs of the output dtype; FP8 codes count as ULPs).
    pub max_ulp: u64,
    /// How many elements are 0, 1, 2 and more than 2 ULPs away.
    pub ulp_counts: [usize; 4],
    /// DeepGEMM's `calc_diff` = 1 − 2Σxy/Σ(x²+y²) over pairs of finite values (0 = identical).
    pub similarity_diff: f64,
    /// The worst violation, or (when everything passes) the largest difference.
    pub worst: Option<Element>,
    /// The first few violations in index order.
    pub first_violations: Vec<Element>,
    /// [`Policy::Bounded`] only: how much of their tolerance the elements use.
    pub bound_use: Option<BoundUse>,
    pub pass: bool,
}

/// The fractions of their tolerance that the judged elements use (1 = at the bound).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BoundUse {
    /// The largest fraction, and where.
    pub max: f64,
    pub max_index: Vec<usize>,
    /// The median fraction.
    pub median: f64,
}

/// Judge `got` against `want` (same dtype and shape, checked by the caller) under `policy`.
pub fn compare(name: &str, got: &Tensor, want: &Tensor, policy: &Policy) -> TensorReport {
    assert_eq!(
        got.dtype, want.dtype,
        "{name}: dtype checked before comparing"
    );
    assert_eq!(
        got.shape, want.shape,
        "{name}: shape checked before comparing"
    );
    let n = got.numel();
    let mut r = TensorReport {
        name: name.to_string(),
        dtype: got.dtype.name().to_string(),
        shape: got.shape.clone(),
        numel: n,
        policy: policy.describe(),
        exact: 0,
        exact_fraction: 1.0,
        allowed: 0,
        allowed_by: BTreeMap::new(),
        ignored: 0,
        violations: 0,
        nan_mismatch: 0,
        max_abs: 0.0,
        max_rel: 0.0,
        max_ulp: 0,
        ulp_counts: [0; 4],
        similarity_diff: 0.0,
        worst: None,
        first_violations: Vec::new(),
        bound_use: None,
        pass: true,
    };
    let (mut sxy, mut sxx_yy) = (0f64, 0f64);
    // (is violation, ulp, abs, flat index) of the current worst element
    let mut worst: Option<(bool, u64, f64, usize)> = None;
    let (policy, judged) = match policy {
        Policy::Partial { judged, inner, .. } => (inner.as_ref(), Some(judged)),
        other => (other, None),
    };
    // Bounded: every judged element's fraction of its tolerance (f32 is plenty for a report)
    let mut uses: Vec<(f32, usize)> = Vec::new();
    for i in 0..n {
        if judged.is_some_and(|j| !j(i)) {
            r.ignored += 1;
            continue;
        }
        let (g, w) = (got.value(i), want.value(i));
        let bit_equal = got.bits(i) == want.bits(i);
        let (g_nan, w_nan) = (got.is_nan(i), want.is_nan(i));
        if g_nan != w_nan {
            r.nan_mismatch += 1;
        }
        let ulp = if g_nan || w_nan {
            if g_nan && w_nan {
                0
            } else {
                u64::MAX
            }
        } else {
            got.ordinal(i).abs_diff(want.ordinal(i)) as u64
        };
        let abs = if g_nan || w_nan || g == w {
            if g_nan == w_nan {
                0.0
            } else {
                f64::INFINITY
            }
        } else {
            (g - w).abs()
        };
        if g.is_finite() && w.is_finite() {
            sxy += g * w;
            sxx_yy += g * g + w * w;
            r.max_abs = r.max_abs.max(abs);
            if w != 0.0 {
                r.max_rel = r.max_rel.max(abs / w.abs());
            }
        } else if abs.is_infinite() || (g != w && !(g_nan && w_nan)) {
            r.max_abs = f64::INFINITY;
        }
        if ulp != u64::MAX {
            r.max_ulp = r.max_ulp.max(ulp);
        } else {
            r.max_ulp = u64::MAX;
        }
        r.ulp_counts[ulp.min(3) as usize] += 1;
        let ok = if let Policy::Bounded { measure, .. } = policy {
            // measured even when bit-identical (to the exact mode's output, here)
            let u = measure(i);
            uses.push((if u.is_nan() { f32::INFINITY } else { u as f32 }, i));
            if bit_equal && u <= 1.0 {
                r.exact += 1;
                continue;
            }
            u <= 1.0
        } else if bit_equal {
            // a relational judge must see the element even when its bits match
            let Policy::Relational { judge, .. } = policy else {
                r.exact += 1;
                continue;
            };
            if judge(i).is_some() {
                r.exact += 1;
                continue;
            }
            false
        } else {
            match policy {
                Policy::Judged { judge, .. } | Policy::Relational { judge, .. } => match judge(i) {
                    Some(reason) => {
                        *r.allowed_by.entry(reason.to_string()).or_default() += 1;
                        true
                    }
                    None => false,
                },
                Policy::Exact => false,
                Policy::Ulps { max, .. } => ulp <= *max,
                Policy::Close { atol, rtol, .. } => {
                    if g.is_finite() && w.is_finite() {
                        abs <= atol + rtol * w.abs()
                    } else {
                        (g_nan && w_nan) || g == w
                    }
                }
                Policy::ExactUnless { allow, .. } => allow(i),
                Policy::Bounded { .. } => unreachable!("measured above"),
                Policy::Partial { .. } => unreachable!("nested Partial policies"),
            }
        };
        if ok {
            r.allowed += 1;
        } else {
            r.violations += 1;
            if r.first_violations.len() < 5 {
                r.first_violations.push(element(got, want, i, abs, ulp));
            }
        }
        let better = match worst {
            None => true,
            Some((v, u, a, _)) => (!ok, ulp) > (v, u) || ((!ok, ulp) == (v, u) && abs > a),
        };
        if better {
            worst = Some((!ok, ulp, abs, i));
        }
    }
    let judged_count = n - r.ignored;
    r.exact_fraction = if judged_count == 0 {
        1.0
    } else {
        r.exact as f64 / judged_count as f64
    };
    r.similarity_diff = if sxx_yy > 0.0 {
        1.0 - 2.0 * sxy / sxx_yy
    } else {
        0.0
    };
    r.worst = worst.map(|(_, ulp, abs, i)| element(got, want, i, abs, ulp));
    if matches!(policy, Policy::Bounded { .. }) && !uses.is_empty() {
        let &(max, at) = uses
            .iter()
            .max_by(|a, b| a.0.total_cmp(&b.0))
            .expect("non-empty");
        let mid = uses.len() / 2;
        let (_, median, _) = uses.select_nth_unstable_by(mid, |a, b| a.0.total_cmp(&b.0));
        r.bound_use = Some(BoundUse {
            max: f64::from(max),
            max_index: unravel(at, &got.shape),
            median: f64::from(median.0),
        });
    }
    r.pass = r.violations == 0;
    r
}

fn element(got: &Tensor, want: &Tensor, i: usize, abs: f64, ulp: u64) -> Element {
    Element {
        index: unravel(i, &got.shape),
        got: show(got, i),
        want: show(want, i),
        got_value: got.value(i),
        want_value: want.value(i),
        abs_err: abs,
        ulp: (ulp != u64::MAX).then_some(ulp),
    }
}

/// An element for humans: FP8 and integer codes in hex with their value.
pub fn show(t: &Tensor, i: usize) -> String {
    let v = t.value(i);
    let v = Short(v);
    match t.dtype {
        DType::F8E4M3 | DType::F8E5M2 | DType::F8E8M0 => format!("{:#04x} ({v})", t.bits(i)),
        DType::U16 => format!("{:#05x}", t.bits(i)),
        DType::F32 => format!("{}", Short(v.0 as f32 as f64)),
        DType::BF16 | DType::F16 => format!("{v} ({:#06x})", t.bits(i)),
        _ => format!("{v}"),
    }
}

/// A float printed compactly: plain decimals in [1e-4, 1e7), scientific notation elsewhere.
struct Short(f64);

impl std::fmt::Display for Short {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let a = self.0.abs();
        if a == 0.0 || !a.is_finite() || (1e-4..1e7).contains(&a) {
            write!(f, "{}", self.0)
        } else {
            write!(f, "{:e}", self.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32s(v: &[f32]) -> Tensor {
        Tensor::from_f32(vec![v.len()], v)
    }

    #[test]
    fn one_wrong_element_fails_exact_even_with_good_similarity() {
        let want: Vec<f32> = (0..1000).map(|i| i as f32).collect();
        let mut got = want.clone();
        got[500] = 500.5;
        let r = compare("c", &f32s(&got), &f32s(&want), &Policy::Exact);
        assert!(!r.pass);
        assert_eq!(r.violations, 1);
        assert!(
            r.similarity_diff < 1e-9,
            "global similarity cannot see it: {}",
            r.similarity_diff
        );
        assert_eq!(r.worst.as_ref().unwrap().index, vec![500]);
        assert_eq!(r.exact, 999);
    }

    #[test]
    fn ulps_policy_counts_representable_values() {
        let one_up = f32::from_bits(1.0f32.to_bits() + 1);
        let r = compare(
            "c",
            &f32s(&[one_up, 2.0]),
            &f32s(&[1.0, 2.0]),
            &Policy::Ulps { max: 1, why: "t" },
        );
        assert!(r.pass && r.allowed == 1 && r.max_ulp == 1);
        let two_up = f32::from_bits(1.0f32.to_bits() + 2);
        let r = compare(
            "c",
            &f32s(&[two_up]),
            &f32s(&[1.0]),
            &Policy::Ulps { max: 1, why: "t" },
        );
        assert!(!r.pass);
    }

    #[test]
    fn nan_must_face_nan() {
        let r = compare(
            "c",
            &f32s(&[f32::NAN]),
            &f32s(&[1.0]),
            &Policy::Close {
                atol: 1.0,
                rtol: 1.0,
                why: "t",
            },
        );
        assert!(!r.pass && r.nan_mismatch == 1);
        let r = compare(
            "c",
            &f32s(&[f32::NAN]),
            &f32s(&[f32::NAN]),
            &Policy::Close {
                atol: 0.0,
                rtol: 0.0,
                why: "t",
            },
        );
        assert!(r.pass);
    }

    #[test]
    fn partial_policy_ignores_undefined_elements() {
        let judged = |i: usize| i != 1;
        let p = Policy::Partial {
            why: "padding",
            judged: Box::new(judged),
            inner: Box::new(Policy::Exact),
        };
        let r = compare(
            "c",
            &f32s(&[1.0, f32::NAN, 3.0]),
            &f32s(&[1.0, 0.0, 3.0]),
            &p,
        );
        assert!(r.pass && r.ignored == 1 && r.exact == 2 && r.exact_fraction == 1.0);
        assert_eq!(r.max_abs, 0.0);
        let r = compare("c", &f32s(&[1.0, 5.0, 3.5]), &f32s(&[1.0, 0.0, 3.0]), &p);
        assert!(!r.pass && r.violations == 1 && r.worst.unwrap().index == vec![2]);
    }

    #[test]
    fn close_policy_is_per_element() {
        let r = compare(
            "c",
            &f32s(&[1.001, 100.1]),
            &f32s(&[1.0, 100.0]),
            &Policy::Close {
                atol: 0.0,
                rtol: 2e-3,
                why: "t",
            },
        );
        assert!(r.pass);
        let r = compare(
            "c",
            &f32s(&[1.01, 100.1]),
            &f32s(&[1.0, 100.0]),
            &Policy::Close {
                atol: 0.0,
                rtol: 2e-3,
                why: "t",
            },
        );
        assert!(!r.pass && r.violations == 1 && r.worst.unwrap().index == vec![0]);
    }
}
