//! The SwiGLU feed-forward network: the dense FFN of the first `first_k_dense_replace` layers,
//! every routed expert and the shared experts (V3 eq. (12) `FFN(·)`; OFF `MLP`, `Expert`).

use ndarray::{Array2, ArrayView2};

use crate::error::{Error, Result};
use crate::linear::{linear, Linear, Precision};

/// `silu(z) = z · σ(z)`, in f64.
pub fn silu(z: f64) -> f64 {
    z / (1.0 + (-z).exp())
}

/// `y = silu(gate) ⊙ up`, elementwise (f64, one rounding to f32).
///
/// OFF `MLP.forward` middle step `F.silu(w1(x)) * w3(x)`; HF `act_fn(gate_proj(x)) * up_proj(x)`.
/// Shapes: `gate: [M, I]`, `up: [M, I]` → `[M, I]`.
pub fn swiglu(gate: ArrayView2<f32>, up: ArrayView2<f32>) -> Result<Array2<f32>> {
    if gate.dim() != up.dim() {
        return Err(Error::Shape {
            op: "swiglu",
            tensor: "up",
            got: up.shape().to_vec(),
            expected: format!("{:?} (the shape of gate)", gate.shape()),
        });
    }
    let mut y = Array2::<f32>::zeros(gate.dim());
    for ((i, j), g) in gate.indexed_iter() {
        y[[i, j]] = (silu(f64::from(*g)) * f64::from(up[[i, j]])) as f32;
    }
    Ok(y)
}

/// The gradients of [`swiglu`] given `dy = ∂L/∂y` (f64, unrounded), with `σ = σ(gate)`:
///
/// - `dgate = dy · up · σ · (1 + gate·(1 − σ))` (`silu'(z) = σ(z)(1 + z(1 − σ(z)))`);
/// - `dup = dy · silu(gate) = dy · gate · σ`.
///
/// Shapes: `dy, gate, up: [M, I]` → `(dgate, dup)`, both `[M, I]`.
pub fn swiglu_backward(
    dy: ArrayView2<f32>,
    gate: ArrayView2<f32>,
    up: ArrayView2<f32>,
) -> Result<(Array2<f64>, Array2<f64>)> {
    for (name, t) in [("dy", &dy), ("up", &up)] {
        if t.dim() != gate.dim() {
            return Err(Error::Shape {
                op: "swiglu_backward",
                tensor: name,
                got: t.shape().to_vec(),
                expected: format!("{:?} (the shape of gate)", gate.shape()),
            });
        }
    }
    let mut dgate = Array2::<f64>::zeros(gate.dim());
    let mut dup = Array2::<f64>::zeros(gate.dim());
    for ((i, j), &g) in gate.indexed_iter() {
        let (z, d, u) = (f64::from(g), f64::from(dy[[i, j]]), f64::from(up[[i, j]]));
        let sigma = 1.0 / (1.0 + (-z).exp());
        dgate[[i, j]] = d * u * sigma * (1.0 + z * (1.0 - sigma));
        dup[[i, j]] = d * z * sigma;
    }
    Ok((dgate, dup))
}

/// A SwiGLU MLP: `w1` = `gate_proj` `[I, D]`, `w3` = `up_proj` `[I, D]`, `w2` = `down_proj` `[D, I]`.
#[derive(Debug, Clone)]
pub struct Mlp<'a> {
    pub w1: Linear<'a>,
    pub w2: Linear<'a>,
    pub w3: Linear<'a>,
}

impl Mlp<'_> {
    /// `y = w2( silu(w1 x) ⊙ w3 x )`. Shapes: `x: [M, D]` → `[M, D]`.
    pub fn forward(&self, x: ArrayView2<f32>, precision: Precision) -> Result<Array2<f32>> {
        let gate = linear(x, &self.w1, precision)?;
        let up = linear(x, &self.w3, precision)?;
        let mut h = swiglu(gate.view(), up.view())?;
        if precision != Precision::F32 {
            // the product is a bf16 tensor in OFF (input of the w2 GEMM)
            h.mapv_inplace(crate::numeric::bf16_round_f32);
        }
        linear(h.view(), &self.w2, precision)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linear::Weight;
    use ndarray::array;

    #[test]
    fn silu_values() {
        assert_eq!(silu(0.0), 0.0);
        assert!((silu(1.0) - 0.7310585786300049).abs() < 1e-15);
        assert!((silu(-20.0) + 20.0 * (20f64).exp().recip()).abs() < 1e-12);
    }

    #[test]
    fn mlp_is_down_of_silu_gate_times_up() {
        // D = 1, I = 2: gate = [x, −x], up = [2x, x], down = [1, 1].
        let mlp = Mlp {
            w1: Linear::new(Weight::from_values("w1", array![[1.0f32], [-1.0]])),
            w3: Linear::new(Weight::from_values("w3", array![[2.0f32], [1.0]])),
            w2: Linear::new(Weight::from_values("w2", array![[1.0f32, 1.0]])),
        };
        let y = mlp
            .forward(array![[1.5f32]].view(), Precision::F32)
            .unwrap();
        let want = silu(1.5) * 3.0 + silu(-1.5) * 1.5;
        assert!((f64::from(y[[0, 0]]) - want).abs() < 1e-6);
    }

    #[test]
    fn swiglu_rejects_mismatched_shapes() {
        let a = Array2::<f32>::zeros((2, 3));
        let b = Array2::<f32>::zeros((3, 2));
        assert!(swiglu(a.view(), b.view()).is_err());
    }

    /// Central differences of `L = Σ dy ⊙ silu(gate) ⊙ up` in f64.
    #[test]
    fn swiglu_backward_is_the_gradient_by_central_differences() {
        let gate = array![[-30.0f32, -1.2785, -0.3, 0.0], [0.7, 2.5, 9.0, 40.0]];
        let up = gate.mapv(|g| 0.3 - 0.2 * g.sin());
        let dy = gate.mapv(|g| 1.0 + 0.5 * g.cos());
        let (dgate, dup) = swiglu_backward(dy.view(), gate.view(), up.view()).unwrap();
        let h = 1e-6;
        for ((i, j), &g) in gate.indexed_iter() {
            let (z, u, d) = (f64::from(g), f64::from(up[[i, j]]), f64::from(dy[[i, j]]));
            let f = |z: f64, u: f64| d * silu(z) * u;
            let fd_g = (f(z + h, u) - f(z - h, u)) / (2.0 * h);
            let fd_u = (f(z, u + h) - f(z, u - h)) / (2.0 * h);
            assert!(
                (fd_g - dgate[[i, j]]).abs() < 1e-8,
                "dgate[{i}, {j}]: {fd_g} vs {}",
                dgate[[i, j]]
            );
            assert!(
                (fd_u - dup[[i, j]]).abs() < 1e-8,
                "dup[{i}, {j}]: {fd_u} vs {}",
                dup[[i, j]]
            );
        }
    }
}
