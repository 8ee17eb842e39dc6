//! Parameter EMA (V3 §3.2.3: "we maintain the Exponential Moving Average (EMA) of the model
//! parameters for early estimation of the model performance after learning rate decay"; kept in
//! CPU memory, updated asynchronously after each step).
//!
//! `ema ← ema + (1 − decay)·(θ − ema)` (= `decay·ema + (1 − decay)·θ`; torch's
//! `swa_utils.get_ema_multi_avg_fn` writes it as `lerp(ema, θ, 1 − decay)`). V3 gives no decay.

use crate::error::{Error, Result};

/// One EMA update, evaluated in f64 (callers round the result once to their storage dtype).
///
/// Shapes: `ema: [N]`, `param: [N]` → `[N]`. Errors: `decay ∉ [0, 1)`, length mismatch,
/// non-finite values.
pub fn ema_update(ema: &[f64], param: &[f64], decay: f64) -> Result<Vec<f64>> {
    const OP: &str = "param_ema";
    if !(0.0..1.0).contains(&decay) {
        return Err(Error::Argument {
            op: OP,
            name: "decay",
            value: decay.to_string(),
            why: "must be in [0, 1)".into(),
        });
    }
    if param.len() != ema.len() {
        return Err(Error::Shape {
            op: OP,
            tensor: "param",
            got: vec![param.len()],
            expected: format!("[N] with N = {} (the length of ema)", ema.len()),
        });
    }
    for (name, x) in [("ema", ema), ("param", param)] {
        if let Some(i) = x.iter().position(|v| !v.is_finite()) {
            return Err(Error::Value {
                op: OP,
                tensor: name,
                index: vec![i],
                value: x[i].to_string(),
                why: "the EMA refuses non-finite values",
            });
        }
    }
    let w = 1.0 - decay;
    Ok(ema
        .iter()
        .zip(param)
        .map(|(&e, &p)| e + w * (p - e))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ema_of_a_constant_is_the_constant_and_of_a_step_is_geometric() {
        // θ jumps from 0 to 1 at step 1: after n updates ema = 1 − decayⁿ
        let decay = 0.9;
        let mut e = vec![0.0];
        for n in 1..=20 {
            e = ema_update(&e, &[1.0], decay).unwrap();
            // ≤ 2 roundings per update plus powi's n roundings: 3·20 ulps of 1 is a safe bound
            assert!(
                (e[0] - (1.0 - decay.powi(n))).abs() < 64.0 * f64::EPSILON,
                "n = {n}"
            );
        }
        assert_eq!(ema_update(&[2.5], &[2.5], 0.999).unwrap(), vec![2.5]);
    }

    #[test]
    fn bad_inputs_are_refused() {
        assert!(ema_update(&[0.0], &[1.0], 1.0)
            .unwrap_err()
            .to_string()
            .contains("decay"));
        assert!(ema_update(&[0.0], &[1.0, 2.0], 0.5)
            .unwrap_err()
            .to_string()
            .contains("param"));
        assert!(ema_update(&[f64::NAN], &[1.0], 0.5)
            .unwrap_err()
            .to_string()
            .contains("ema"));
    }
}
