//! Gradient clipping by global norm (V3 §4.2: "the gradient clipping norm is set to 1.0").
//!
//! torch.nn.utils.clip_grad_norm_ semantics: `‖g‖ = √(Σ g²)` over *all* parameters' gradients
//! together, `c = max_norm / (‖g‖ + 1e-6)`, and every gradient is multiplied by `min(c, 1)`.
//! The norm is accumulated here in f64 (exact enough to be the yardstick); the scale is rounded
//! to f32 and applied with one f32 multiply, as torch applies its f32 `clip_coef_clamped`.

use crate::error::{Error, Result};

/// V3 §4.2.
pub const GRAD_CLIP_NORM: f64 = 1.0;
/// torch's guard against division by zero in `clip_coef`.
pub const CLIP_EPS: f64 = 1e-6;

/// Clip `grads` (all parameters' gradients, concatenated) in place; returns the norm before
/// clipping. Shapes: `grads: [N]`. Errors: a non-finite gradient (torch would propagate NaN),
/// `max_norm ≤ 0`.
pub fn clip_grad_norm(grads: &mut [f32], max_norm: f64) -> Result<f64> {
    const OP: &str = "clip_grad_norm";
    if !(max_norm > 0.0 && max_norm.is_finite()) {
        return Err(Error::Argument {
            op: OP,
            name: "max_norm",
            value: max_norm.to_string(),
            why: "must be a finite number > 0".into(),
        });
    }
    if let Some(i) = grads.iter().position(|g| !g.is_finite()) {
        return Err(Error::Value {
            op: OP,
            tensor: "grad",
            index: vec![i],
            value: grads[i].to_string(),
            why: "a non-finite gradient makes the global norm NaN/inf; skip the step instead",
        });
    }
    // global L2 norm, accumulated in f64
    let norm = grads
        .iter()
        .map(|&g| f64::from(g) * f64::from(g))
        .sum::<f64>()
        .sqrt();
    // clip coefficient, clamped to 1 (gradients below the threshold are left untouched)
    let coef = max_norm / (norm + CLIP_EPS);
    if coef < 1.0 {
        let c = coef as f32;
        for g in grads.iter_mut() {
            *g *= c;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_gradients_are_scaled_to_the_max_norm() {
        // ‖(3, 4)‖ = 5 → scaled by 1/(5 + 1e-6)
        let mut g = vec![3.0f32, 4.0];
        let n = clip_grad_norm(&mut g, GRAD_CLIP_NORM).unwrap();
        assert_eq!(n, 5.0);
        let c = (1.0 / (5.0 + 1e-6)) as f32;
        assert_eq!(g, vec![3.0 * c, 4.0 * c]);
        let after = (g.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>()).sqrt();
        assert!((after - 1.0).abs() < 1e-6, "{after}");
    }

    #[test]
    fn small_gradients_are_untouched() {
        let mut g = vec![0.3f32, -0.4, 0.0];
        assert!((clip_grad_norm(&mut g, 1.0).unwrap() - 0.5).abs() < 1e-7);
        assert_eq!(g, vec![0.3, -0.4, 0.0]);
    }

    #[test]
    fn bad_inputs_are_refused() {
        assert!(clip_grad_norm(&mut [1.0, f32::INFINITY], 1.0)
            .unwrap_err()
            .to_string()
            .contains("grad"));
        assert!(clip_grad_norm(&mut [1.0], 0.0)
            .unwrap_err()
            .to_string()
            .contains("max_norm"));
    }
}
