//! Auxiliary-loss-free load balancing (V3 §2.1.2): the expert bias `b_i` of eq. (16) and its
//! update at the end of every training step.
//!
//! V3: "at the end of each step, we will decrease the bias term by γ if its corresponding expert
//! is overloaded, and increase it by γ if its corresponding expert is underloaded", load counted
//! over the whole batch of the step, γ = 0.001 for the first 14.3T tokens and 0 for the last
//! 500B. The precise rule is the LF paper's Algorithm 1 (Wang et al. 2024):
//! `b_i ← b_i + γ·sign(c̄ − c_i)` with `c_i` the tokens routed to expert `i` and `c̄` their mean.

use ndarray::ArrayView2;

use crate::error::{Error, Result};

/// γ for the first 14.3T tokens (V3 §4.2).
pub const BIAS_UPDATE_SPEED: f64 = 0.001;
/// Tokens after which γ = 0 (14.3T of the 14.8T).
pub const BIAS_UPDATE_STOP_TOKENS: f64 = 14.3e12;

/// γ after `tokens_seen` training tokens: 0.001 before 14.3T, 0 from 14.3T on (V3 §4.2).
pub fn bias_update_speed(tokens_seen: f64) -> f64 {
    if tokens_seen < BIAS_UPDATE_STOP_TOKENS {
        BIAS_UPDATE_SPEED
    } else {
        0.0
    }
}

/// `c_i`: how many (token, slot) pairs of the step's selection chose expert `i`.
///
/// Shapes: `selected: [T, K]` expert ids (the biased top-k of eq. (16), every token of the
/// step's batch) → `[E]`. Errors: an id ≥ `n_experts`.
pub fn expert_load(selected: ArrayView2<usize>, n_experts: usize) -> Result<Vec<u64>> {
    let mut load = vec![0u64; n_experts];
    for ((t, k), &i) in selected.indexed_iter() {
        if i >= n_experts {
            return Err(Error::Value {
                op: "expert_load",
                tensor: "selected",
                index: vec![t, k],
                value: i.to_string(),
                why: "expert id out of range",
            });
        }
        load[i] += 1;
    }
    Ok(load)
}

/// One bias update: `b_i ← b_i + γ·sign(c̄ − c_i)` (f32 add of `±γ`, γ rounded to f32).
///
/// `sign(0) = 0`: an expert loaded exactly at the mean keeps its bias (V3 does not say; LF's
/// `sign` is the usual one). The sign is taken exactly, on integers:
/// `sign(c̄ − c_i) = sign(Σ_j c_j − E·c_i)`, so a mean like 1000/3 is never rounded.
///
/// Shapes: `bias: [E]` (updated in place), `load: [E]`. Errors: length mismatch, γ < 0 or not
/// finite.
pub fn bias_update(bias: &mut [f32], load: &[u64], gamma: f64) -> Result<()> {
    const OP: &str = "bias_update";
    if load.len() != bias.len() {
        return Err(Error::Shape {
            op: OP,
            tensor: "load",
            got: vec![load.len()],
            expected: format!("[E] with E = {} (the length of bias)", bias.len()),
        });
    }
    if !(gamma >= 0.0 && gamma.is_finite()) {
        return Err(Error::Argument {
            op: OP,
            name: "gamma",
            value: gamma.to_string(),
            why: "the bias update speed must be a finite number ≥ 0".into(),
        });
    }
    let n_experts = load.len() as i128;
    let total: i128 = load.iter().map(|&c| i128::from(c)).sum();
    let step = gamma as f32;
    for (b_i, &c_i) in bias.iter_mut().zip(load) {
        // sign(c̄ − c_i) = sign(Σc − E·c_i): +1 underloaded, −1 overloaded, 0 at the mean
        let sign = match total.cmp(&(n_experts * i128::from(c_i))) {
            std::cmp::Ordering::Greater => 1.0f32,
            std::cmp::Ordering::Less => -1.0,
            std::cmp::Ordering::Equal => 0.0,
        };
        *b_i += step * sign;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn overloaded_experts_go_down_underloaded_up_balanced_stay() {
        // loads 5, 3, 1, 3: mean 3
        let sel = array![[0usize, 1], [0, 3], [0, 2], [0, 1], [0, 3], [1, 3]];
        let load = expert_load(sel.view(), 4).unwrap();
        assert_eq!(load, vec![5, 3, 1, 3]);
        let mut b = vec![0.5f32, 0.0, -0.25, 1.0];
        bias_update(&mut b, &load, 0.001).unwrap();
        assert_eq!(b, vec![0.5 - 0.001f32, 0.0, -0.25 + 0.001f32, 1.0]);
    }

    #[test]
    fn sign_is_exact_for_fractional_means() {
        // Σc = 10 over 3 experts: c̄ = 3.33…; c = 3 is under, 4 is over, 3·c vs 10 decides
        let mut b = vec![0.0f32; 3];
        bias_update(&mut b, &[3, 3, 4], 0.5).unwrap();
        assert_eq!(b, vec![0.5, 0.5, -0.5]);
    }

    #[test]
    fn speed_is_zero_for_the_last_500b_tokens() {
        assert_eq!(bias_update_speed(0.0), 0.001);
        assert_eq!(bias_update_speed(14.3e12 - 1.0), 0.001);
        assert_eq!(bias_update_speed(14.3e12), 0.0);
        assert_eq!(bias_update_speed(14.8e12), 0.0);
        let mut b = vec![0.25f32; 2];
        bias_update(&mut b, &[9, 1], bias_update_speed(14.5e12)).unwrap();
        assert_eq!(b, vec![0.25, 0.25]);
    }

    #[test]
    fn bad_inputs_are_refused() {
        let mut b = vec![0.0f32; 3];
        assert!(bias_update(&mut b, &[1, 2], 0.001)
            .unwrap_err()
            .to_string()
            .contains("load"));
        assert!(bias_update(&mut b, &[1, 2, 3], -1.0)
            .unwrap_err()
            .to_string()
            .contains("gamma"));
        let e = expert_load(array![[0usize, 7]].view(), 4).unwrap_err();
        assert!(
            matches!(e, Error::Value { ref index, .. } if index == &vec![0, 1]),
            "{e}"
        );
    }
}
