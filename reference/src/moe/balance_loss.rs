//! Complementary sequence-wise balance loss, V3 eqs. (17)–(20), α = 0.0001.
//!
//! Eq. (18)'s indicator is `1(s_{i,t} ∈ Topk({s_{j,t}}, K_r))`: read literally, the *unbiased*
//! top-k of the affinities. The experts a token is actually sent to are the *biased* (and
//! node-limited) selection of eq. (16). V3 does not say which one its training used, so the
//! functions here take the selection as an argument: pass the plain top-k of `s` for the literal
//! reading, or the routed selection for the other (the registered op offers both).
//!
//! `f_i` is a count (no gradient); the gradient reaches the router only through `P_i`.

use ndarray::{Array2, ArrayView2};

use crate::error::{Error, Result};

/// α of V3 §4.2 ("an extremely small value").
pub const BALANCE_ALPHA: f64 = 0.0001;

/// The pieces of eqs. (17)–(20) for one sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct BalanceLoss {
    /// Eq. (18): `f_i = N_r/(K_r·T) · Σ_t 1(i selected for t)`; `Σ_i f_i = N_r`.
    pub f: Vec<f64>,
    /// Eq. (20): `P_i = (1/T) Σ_t s'_{i,t}`; `Σ_i P_i = 1`.
    pub p: Vec<f64>,
    /// Eq. (17): `L_Bal = α Σ_i f_i P_i`.
    pub loss: f64,
}

/// Shapes, values, distinct ids; returns (T, E, K).
fn check(
    op: &'static str,
    s: ArrayView2<f64>,
    selected: ArrayView2<usize>,
) -> Result<(usize, usize, usize)> {
    let (t_len, e) = s.dim();
    if t_len == 0 || e == 0 {
        return Err(Error::Shape {
            op,
            tensor: "s",
            got: vec![t_len, e],
            expected: "[T, E] with T ≥ 1 and E ≥ 1".into(),
        });
    }
    if selected.nrows() != t_len || selected.ncols() == 0 || selected.ncols() > e {
        return Err(Error::Shape {
            op,
            tensor: "selected",
            got: selected.shape().to_vec(),
            expected: format!("[T, K] with T = {t_len} and 1 ≤ K ≤ E = {e}"),
        });
    }
    if let Some(((t, i), v)) = s
        .indexed_iter()
        .find(|(_, v)| !(v.is_finite() && **v >= 0.0))
    {
        return Err(Error::Value {
            op,
            tensor: "s",
            index: vec![t, i],
            value: v.to_string(),
            why: "affinities are sigmoid outputs: finite and ≥ 0",
        });
    }
    for (t, row) in s.outer_iter().enumerate() {
        if row.sum() <= 0.0 {
            return Err(Error::Value {
                op,
                tensor: "s",
                index: vec![t],
                value: "0".into(),
                why: "eq. (19) divides by Σ_j s_{j,t}, which is 0 for this token",
            });
        }
    }
    for ((t, k), &i) in selected.indexed_iter() {
        let dup = selected.row(t).iter().take(k).any(|&j| j == i);
        if i >= e || dup {
            return Err(Error::Value {
                op,
                tensor: "selected",
                index: vec![t, k],
                value: i.to_string(),
                why: if dup {
                    "an expert selected twice for one token"
                } else {
                    "expert id out of range"
                },
            });
        }
    }
    Ok((t_len, e, selected.ncols()))
}

/// Eqs. (17)–(20) for one sequence of `T` tokens.
///
/// Shapes: `s: [T, E]` affinities `s_{i,t}` (eq. (15)), `selected: [T, K]` the experts whose
/// indicator is 1 for each token → `f: [E]`, `P: [E]`, `L_Bal`.
/// Order of operations (the tolerance in SPEC.md counts it): `S_t = Σ_j s_{j,t}` left to right,
/// `s' = s/S_t`, `P_i = (Σ_t s'_{i,t})/T`, `f_i = count_i · (N_r/(K_r T))`, `L = α·Σ_i f_i P_i`.
pub fn balance_loss(
    s: ArrayView2<f64>,
    selected: ArrayView2<usize>,
    alpha: f64,
) -> Result<BalanceLoss> {
    let (t_len, e, k) = check("balance_loss", s, selected)?;
    // eq. (18): f_i, the selection counts scaled so that perfect balance gives 1
    let mut count = vec![0u64; e];
    for &i in selected.iter() {
        count[i] += 1;
    }
    let scale = e as f64 / (k as f64 * t_len as f64);
    let f: Vec<f64> = count.iter().map(|&c| c as f64 * scale).collect();
    // eqs. (19)-(20): P_i = mean over tokens of s_{i,t} / Σ_j s_{j,t}
    let mut p_sum = vec![0.0f64; e];
    for row in s.outer_iter() {
        let s_t: f64 = row.iter().sum();
        for (i, &s_it) in row.iter().enumerate() {
            p_sum[i] += s_it / s_t;
        }
    }
    let p: Vec<f64> = p_sum.iter().map(|&x| x / t_len as f64).collect();
    // eq. (17): L = α Σ_i f_i P_i
    let dot: f64 = f.iter().zip(&p).map(|(f_i, p_i)| f_i * p_i).sum();
    Ok(BalanceLoss {
        f,
        p,
        loss: alpha * dot,
    })
}

/// `∂L_Bal/∂s_{j,t}` with the selection held fixed (the indicator has no gradient):
/// `(α/T)·( f_j/S_t − Σ_i f_i s_{i,t}/S_t² )` with `S_t = Σ_i s_{i,t}`.
///
/// Derivation: `L = (α/T) Σ_t Σ_i f_i s_{i,t}/S_t`; for one token, with `A_t = Σ_i f_i s_{i,t}`,
/// `∂(A_t/S_t)/∂s_{j,t} = f_j/S_t − A_t/S_t²`.
///
/// Shapes: `s: [T, E]`, `selected: [T, K]` → `[T, E]`.
pub fn balance_loss_grad(
    s: ArrayView2<f64>,
    selected: ArrayView2<usize>,
    alpha: f64,
) -> Result<Array2<f64>> {
    let (t_len, e, _) = check("balance_loss_grad", s, selected)?;
    let f = balance_loss(s, selected, alpha)?.f;
    let mut grad = Array2::zeros((t_len, e));
    for (t, row) in s.outer_iter().enumerate() {
        // per token: S_t and A_t = Σ_i f_i s_{i,t}
        let s_t: f64 = row.iter().sum();
        let a_t: f64 = row.iter().zip(&f).map(|(s_it, f_i)| f_i * s_it).sum();
        for j in 0..e {
            grad[[t, j]] = alpha / t_len as f64 * (f[j] / s_t - a_t / (s_t * s_t));
        }
    }
    Ok(grad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::moe::node_routing::topk_desc;
    use crate::rng::Rng;
    use ndarray::array;

    fn literal_topk(s: &Array2<f64>, k: usize) -> Array2<usize> {
        let mut out = Array2::zeros((s.nrows(), k));
        for (t, row) in s.outer_iter().enumerate() {
            let v: Vec<f32> = row.iter().map(|&x| x as f32).collect();
            for (slot, i) in topk_desc(&v, k).into_iter().enumerate() {
                out[[t, slot]] = i;
            }
        }
        out
    }

    #[test]
    fn hand_derived_two_experts() {
        // T = 2, E = 2, K = 1. Token 0: s = (0.6, 0.2) picks 0; token 1: s = (0.3, 0.3) picks 1.
        // f = 2/(1·2)·(1, 1) = (1, 1). s'_0 = (0.75, 0.25), s'_1 = (0.5, 0.5).
        // P = (0.625, 0.375). L = α·(0.625 + 0.375) = α.
        let s = array![[0.6, 0.2], [0.3, 0.3]];
        let sel = array![[0usize], [1]];
        let r = balance_loss(s.view(), sel.view(), 0.5).unwrap();
        assert_eq!(r.f, vec![1.0, 1.0]);
        assert!((r.p[0] - 0.625).abs() < 1e-15 && (r.p[1] - 0.375).abs() < 1e-15);
        assert!((r.loss - 0.5).abs() < 1e-15);
        // Both tokens on expert 0: f = (2, 0), L = α·2·0.625 = 1.25α
        let r = balance_loss(s.view(), array![[0usize], [0]].view(), 0.5).unwrap();
        assert_eq!(r.f, vec![2.0, 0.0]);
        assert!((r.loss - 0.625).abs() < 1e-15);
    }

    #[test]
    fn perfect_balance_gives_alpha() {
        // f_i = 1 for all i makes L = α·Σ_i P_i = α, whatever the affinities (Σ_i s'_{i,t} = 1).
        // E = 8, K = 2, T = 12: expert i picked exactly 3 times (slots cycle through experts).
        let mut rng = Rng::new(3);
        let (t_len, e, k) = (12, 8, 2);
        let s = Array2::from_shape_fn((t_len, e), |_| rng.uniform() + 0.01);
        let sel = Array2::from_shape_fn((t_len, k), |(t, slot)| (t * k + slot) % e);
        let r = balance_loss(s.view(), sel.view(), BALANCE_ALPHA).unwrap();
        assert!(r.f.iter().all(|&f| f == 1.0), "{:?}", r.f);
        // rounding: P_i sums T·E quotients (≤ (T+E+2)·u relative), L adds E more: 64·u is ample
        let tol = 64.0 * f64::EPSILON * BALANCE_ALPHA;
        assert!((r.loss - BALANCE_ALPHA).abs() <= tol, "{}", r.loss);
        assert!((r.p.iter().sum::<f64>() - 1.0).abs() < 64.0 * f64::EPSILON);
        assert!((r.f.iter().sum::<f64>() - e as f64).abs() == 0.0);
    }

    #[test]
    fn imbalance_raises_the_loss_above_alpha() {
        // all tokens agree on the same experts with high affinity there: L > α
        let mut rng = Rng::new(8);
        let s = Array2::from_shape_fn((16, 8), |(_, i)| {
            if i < 2 {
                0.9
            } else {
                0.1 + 0.01 * rng.uniform()
            }
        });
        let sel = literal_topk(&s, 2);
        let r = balance_loss(s.view(), sel.view(), BALANCE_ALPHA).unwrap();
        // f = (4, 4, 0, …), P_0 = P_1 ≈ 0.9/2.4: L = α·8·0.375 ≈ 3α
        assert!(
            r.loss > 2.9 * BALANCE_ALPHA && r.loss < 3.1 * BALANCE_ALPHA,
            "{}",
            r.loss
        );
    }

    #[test]
    fn gradient_matches_central_differences() {
        let mut rng = Rng::new(21);
        let (t_len, e, k) = (6, 10, 3);
        let s = Array2::from_shape_fn((t_len, e), |_| 1.0 / (1.0 + (-rng.normal()).exp()));
        let sel = literal_topk(&s, k);
        let alpha = 0.3;
        let g = balance_loss_grad(s.view(), sel.view(), alpha).unwrap();
        let f = balance_loss(s.view(), sel.view(), alpha).unwrap().f;
        let h = 1e-5;
        for t in 0..t_len {
            let s_t: f64 = s.row(t).sum();
            let a_t: f64 = s.row(t).iter().zip(&f).map(|(x, f)| x * f).sum();
            for j in 0..e {
                // selection held fixed, as in the analytic gradient
                let mut up = s.clone();
                up[[t, j]] += h;
                let mut dn = s.clone();
                dn[[t, j]] -= h;
                let fd = (balance_loss(up.view(), sel.view(), alpha).unwrap().loss
                    - balance_loss(dn.view(), sel.view(), alpha).unwrap().loss)
                    / (2.0 * h);
                // Bound. Along s_{j,t}: L = c + (α/T)(A + f_j δ)/(S + δ) = c' + (α/T)(A − f_j S)/(S + δ),
                // whose third derivative is −6(α/T)(A − f_j S)/(S+δ)⁴: the central difference is off
                // by ≤ h²/6·6(α/T)|A − f_j S|/(S−h)⁴. Rounding: each loss carries ≤ 64u·L
                // (T·E + E terms, see perfect_balance_gives_alpha), divided by 2h.
                let loss = balance_loss(s.view(), sel.view(), alpha).unwrap().loss;
                let trunc =
                    h * h * alpha / t_len as f64 * (a_t - f[j] * s_t).abs() / (s_t - h).powi(4);
                let round = 2.0 * 64.0 * f64::EPSILON * loss / (2.0 * h);
                assert!(
                    (fd - g[[t, j]]).abs() <= trunc + round,
                    "t={t} j={j}: fd {fd} vs analytic {} (bound {})",
                    g[[t, j]],
                    trunc + round
                );
            }
        }
    }

    #[test]
    fn bad_inputs_name_the_culprit() {
        let s = array![[0.5, 0.5], [0.0, 0.0]];
        let e = balance_loss(s.view(), array![[0usize], [1]].view(), 1.0).unwrap_err();
        assert!(e.to_string().contains("Σ_j s_{j,t}"), "{e}");
        let s = array![[0.5, -0.5]];
        assert!(balance_loss(s.view(), array![[0usize]].view(), 1.0).is_err());
        let s = array![[0.5, 0.5]];
        let e = balance_loss(s.view(), array![[1usize, 1]].view(), 1.0).unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
        let e = balance_loss(s.view(), array![[0usize], [1]].view(), 1.0).unwrap_err();
        assert!(e.to_string().contains("selected"), "{e}");
    }
}
