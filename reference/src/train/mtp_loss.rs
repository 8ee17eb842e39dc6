//! The multi-token-prediction loss, V3 eqs. (24)–(25), and its weight λ (V3 §4.2). The MTP
//! modules themselves (eqs. (21)–(23): projection, transformer block, shared head) are
//! [`crate::mtp`]; `Model::forward_mtp` gives the logits this loss reads.
//!
//! Indices as in the paper (1-based): the input has tokens `t_1..t_T`, and `t_{T+1}` is the
//! main model's last target. Module `k` (1 ≤ k ≤ D) produces, for `i = 1..T−k`, the
//! distribution `P^k_{i+k+1}` over the token at position `i+k+1`, so
//! `L^k = −(1/T) Σ_{i=2+k}^{T+1} log P^k_i[t_i]` — `T − k` terms, divided by `T` (not `T − k`):
//! eq. (24) as printed. `L_MTP = (λ/D) Σ_k L^k`.

use ndarray::ArrayView2;

use crate::error::{Error, Result};

/// λ for the first 10T tokens.
pub const MTP_LAMBDA_EARLY: f64 = 0.3;
/// λ for the remaining 4.8T tokens.
pub const MTP_LAMBDA_LATE: f64 = 0.1;
/// Tokens after which λ drops.
pub const MTP_LAMBDA_SWITCH_TOKENS: f64 = 10e12;

/// λ after `tokens_seen` tokens: 0.3 before 10T, 0.1 from 10T on.
pub fn mtp_lambda(tokens_seen: f64) -> f64 {
    if tokens_seen < MTP_LAMBDA_SWITCH_TOKENS {
        MTP_LAMBDA_EARLY
    } else {
        MTP_LAMBDA_LATE
    }
}

/// Eq. (24) for module `k`.
///
/// Shapes: `logits: [T−k, V]`, row `i−1` holds module k's logits for position `i+k+1`
/// (`i = 1..T−k`); `tokens: [T+1]` = `t_1..t_{T+1}` (0-based slice: `tokens[j] = t_{j+1}`).
/// Log-softmax in f64 (max-shifted). Errors: shapes, `k = 0`, a target id ≥ V, non-finite logits.
pub fn mtp_module_loss(logits: ArrayView2<f32>, tokens: &[u32], k: usize) -> Result<f64> {
    const OP: &str = "mtp_module_loss";
    let t_len = tokens.len().checked_sub(1).ok_or(Error::Shape {
        op: OP,
        tensor: "tokens",
        got: vec![0],
        expected: "[T+1] with T ≥ 1".into(),
    })?;
    if k == 0 || k >= t_len {
        return Err(Error::Argument {
            op: OP,
            name: "k",
            value: k.to_string(),
            why: format!("the depth must be in 1..T = 1..{t_len}"),
        });
    }
    let v = logits.ncols();
    if logits.nrows() != t_len - k || v == 0 {
        return Err(Error::Shape {
            op: OP,
            tensor: "logits",
            got: logits.shape().to_vec(),
            expected: format!("[T−k, V] = [{}, V ≥ 1]", t_len - k),
        });
    }
    let mut sum = 0.0f64;
    for i in 1..=t_len - k {
        let row = logits.row(i - 1);
        // target t_{i+k+1} = tokens[i+k]
        let target = tokens[i + k] as usize;
        if target >= v {
            return Err(Error::Value {
                op: OP,
                tensor: "tokens",
                index: vec![i + k],
                value: target.to_string(),
                why: "target id outside the vocabulary of the logits",
            });
        }
        if let Some(j) = row.iter().position(|x| !x.is_finite()) {
            return Err(Error::Value {
                op: OP,
                tensor: "logits",
                index: vec![i - 1, j],
                value: row[j].to_string(),
                why: "logits must be finite",
            });
        }
        // log P[t] = x_t − max − ln Σ exp(x − max)
        let max = row
            .iter()
            .fold(f64::NEG_INFINITY, |m, &x| m.max(f64::from(x)));
        let lse = row
            .iter()
            .map(|&x| (f64::from(x) - max).exp())
            .sum::<f64>()
            .ln()
            + max;
        sum += f64::from(row[target]) - lse;
    }
    // eq. (24): divided by T, not by the T − k terms
    Ok(-sum / t_len as f64)
}

/// Eq. (25): `L_MTP = (λ/D) Σ_{k=1..D} L^k` from the per-module losses.
pub fn mtp_loss(module_losses: &[f64], lambda: f64) -> Result<f64> {
    if module_losses.is_empty() {
        return Err(Error::Shape {
            op: "mtp_loss",
            tensor: "module_losses",
            got: vec![0],
            expected: "[D] with D ≥ 1".into(),
        });
    }
    Ok(lambda / module_losses.len() as f64 * module_losses.iter().sum::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    #[test]
    fn uniform_logits_give_ln_v_times_the_covered_fraction() {
        // every P is uniform over V: each term is ln V, T − k terms, divided by T
        let (t_len, v, k) = (10, 7, 1);
        let logits = Array2::<f32>::zeros((t_len - k, v));
        let tokens: Vec<u32> = (0..=t_len as u32).map(|j| j % v as u32).collect();
        let l = mtp_module_loss(logits.view(), &tokens, k).unwrap();
        let want = (t_len - k) as f64 / t_len as f64 * (v as f64).ln();
        assert!((l - want).abs() < 1e-14, "{l} vs {want}");
        // depth 2: T − 2 terms
        let l2 = mtp_module_loss(Array2::<f32>::zeros((t_len - 2, v)).view(), &tokens, 2).unwrap();
        assert!((l2 - 8.0 / 10.0 * (v as f64).ln()).abs() < 1e-14);
    }

    #[test]
    fn targets_are_shifted_by_k_plus_one() {
        // T = 3, k = 1: rows predict positions 3 and 4, i.e. tokens[2] and tokens[3].
        // Row 0 puts logit 20 on token 2, row 1 on token 0: confident and right.
        let mut logits = Array2::<f32>::zeros((2, 3));
        logits[[0, 2]] = 20.0;
        logits[[1, 0]] = 20.0;
        let right = mtp_module_loss(logits.view(), &[0, 1, 2, 0], 1).unwrap();
        // each term: −log(e^20/(e^20 + 2)) = ln(1 + 2e^−20)
        let term = (2.0 * (-20f64).exp()).ln_1p();
        assert!((right - 2.0 * term / 3.0).abs() < 1e-15, "{right}");
        // targets shifted by one more position would be wrong: a large loss
        let wrong = mtp_module_loss(logits.view(), &[0, 2, 0, 1], 1).unwrap();
        assert!(wrong > 13.0, "{wrong}");
    }

    #[test]
    fn total_is_lambda_over_d_times_the_sum_and_lambda_switches_at_10t() {
        assert!((mtp_loss(&[2.0, 4.0], 0.3).unwrap() - 0.9).abs() < 1e-15);
        assert_eq!(mtp_lambda(0.0), 0.3);
        assert_eq!(mtp_lambda(10e12 - 1.0), 0.3);
        assert_eq!(mtp_lambda(10e12), 0.1);
        assert_eq!(mtp_lambda(14.8e12), 0.1);
        assert!(mtp_loss(&[], 0.3).is_err());
    }

    #[test]
    fn bad_shapes_are_refused() {
        let logits = Array2::<f32>::zeros((3, 4));
        assert!(mtp_module_loss(logits.view(), &[0, 1, 2, 3, 0], 2)
            .unwrap_err()
            .to_string()
            .contains("logits"));
        assert!(mtp_module_loss(logits.view(), &[0, 1, 2, 3], 0).is_err());
        assert!(
            mtp_module_loss(Array2::<f32>::zeros((2, 4)).view(), &[0, 1, 9, 3], 1)
                .unwrap_err()
                .to_string()
                .contains("vocabulary")
        );
    }
}
