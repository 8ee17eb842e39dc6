//! RMSNorm (OFF `RMSNorm`, HF `DeepseekV3RMSNorm`): the pre-norms of every block, the final norm
//! and the norms of the compressed latents `c^Q` (`q_norm`) and `c^{KV}` (`kv_norm`).

use ndarray::{Array2, ArrayView2};

use crate::error::{Error, Result};

/// The eps of `q_norm` and `kv_norm`: both OFF (constructor default) and HF
/// (`DeepseekV3RMSNorm(q_lora_rank)`) build them with 1e-6 whatever `rms_norm_eps` says.
pub const LATENT_NORM_EPS: f64 = 1e-6;

/// `y[m, c] = w[c] · x[m, c] / sqrt(mean_c(x[m, c]²) + eps)`.
///
/// OFF `RMSNorm.forward` (`F.rms_norm`), HF `DeepseekV3RMSNorm.forward`.
/// Shapes: `x: [M, C]`, `w: [C]` → `y: [M, C]`.
/// Arithmetic: the mean, the reciprocal square root and both products in f64, one rounding to
/// f32 at the end (= torch ≥ 2.7 `F.rms_norm`; HF rounds `x·r` to the input dtype before `·w`,
/// which is the same in f32 up to one extra f32 rounding).
pub fn rms_norm(x: ArrayView2<f32>, w: &[f32], eps: f64) -> Result<Array2<f32>> {
    let (rows, c) = x.dim();
    if w.len() != c {
        return Err(Error::Shape {
            op: "rms_norm",
            tensor: "w",
            got: vec![w.len()],
            expected: format!("[{c}] (the last dim of x)"),
        });
    }
    let mut y = Array2::<f32>::zeros((rows, c));
    for m in 0..rows {
        // pass 1: mean of squares over the row
        let mut ss = 0f64;
        for k in 0..c {
            let v = f64::from(x[[m, k]]);
            ss += v * v;
        }
        let r = 1.0 / (ss / c as f64 + eps).sqrt();
        // pass 2: normalize and scale
        for k in 0..c {
            y[[m, k]] = (f64::from(x[[m, k]]) * r * f64::from(w[k])) as f32;
        }
    }
    Ok(y)
}

/// The gradients of [`rms_norm`] (f64, unrounded): `dx [M, C]` and `dweight [C]`.
#[derive(Debug, Clone, PartialEq)]
pub struct RmsNormGrad {
    pub dx: Array2<f64>,
    pub dweight: Vec<f64>,
}

/// The backward of `y = w ⊙ x·r`, `r = (mean_c(x²) + eps)^(-1/2)`, given `dy = ∂L/∂y`:
///
/// - `x̂ = x·r`, `g = dy ⊙ w`;
/// - `dx[m, c] = r · (g[m, c] − x̂[m, c] · mean_j(g[m, j] · x̂[m, j]))` (∂r/∂x = −r³·x/C);
/// - `dweight[c] = Σ_m dy[m, c] · x̂[m, c]` (summed over tokens: one weight for all of them).
///
/// What torch autograd computes for `F.rms_norm` / HF `DeepseekV3RMSNorm`.
/// Shapes: `dy, x: [M, C]`, `w: [C]` → [`RmsNormGrad`]. Everything in f64; the caller rounds.
pub fn rms_norm_backward(
    dy: ArrayView2<f32>,
    x: ArrayView2<f32>,
    w: &[f32],
    eps: f64,
) -> Result<RmsNormGrad> {
    let (rows, c) = x.dim();
    if dy.dim() != x.dim() {
        return Err(Error::Shape {
            op: "rms_norm_backward",
            tensor: "dy",
            got: dy.shape().to_vec(),
            expected: format!("{:?} (the shape of x)", x.shape()),
        });
    }
    if w.len() != c {
        return Err(Error::Shape {
            op: "rms_norm_backward",
            tensor: "w",
            got: vec![w.len()],
            expected: format!("[{c}] (the last dim of x)"),
        });
    }
    let mut dx = Array2::<f64>::zeros((rows, c));
    let mut dweight = vec![0f64; c];
    for m in 0..rows {
        let ss: f64 = (0..c).map(|k| f64::from(x[[m, k]]).powi(2)).sum();
        let r = 1.0 / (ss / c as f64 + eps).sqrt();
        let x_hat = |k: usize| f64::from(x[[m, k]]) * r;
        let g = |k: usize| f64::from(dy[[m, k]]) * f64::from(w[k]);
        // mean_j(g_j · x̂_j): the part of dy along x̂ that the normalisation removes
        let proj = (0..c).map(|k| g(k) * x_hat(k)).sum::<f64>() / c as f64;
        for k in 0..c {
            dx[[m, k]] = r * (g(k) - x_hat(k) * proj);
            dweight[k] += f64::from(dy[[m, k]]) * x_hat(k);
        }
    }
    Ok(RmsNormGrad { dx, dweight })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn rms_norm_of_a_constant_row_is_the_weight() {
        // x = [3, 3, 3, 3]: mean(x²) = 9, r = 1/3 (eps 0) → y = w.
        let x = array![[3.0f32, 3.0, 3.0, 3.0]];
        let y = rms_norm(x.view(), &[1.0, 2.0, -0.5, 0.0], 0.0).unwrap();
        assert_eq!(y, array![[1.0f32, 2.0, -0.5, 0.0]]);
    }

    #[test]
    fn rms_norm_eps_matters_for_small_rows() {
        // x = [1e-3, -1e-3]: mean(x²) = 1e-6; with eps = 1e-6 the scale is 1/sqrt(2e-6).
        let x = array![[1e-3f32, -1e-3]];
        let y = rms_norm(x.view(), &[1.0, 1.0], 1e-6).unwrap();
        let want = 1e-3 / (2e-6f64).sqrt();
        assert!((f64::from(y[[0, 0]]) - want).abs() < 1e-6, "{}", y[[0, 0]]);
        assert!((f64::from(y[[0, 1]]) + want).abs() < 1e-6);
    }

    #[test]
    fn rms_norm_rejects_a_wrong_weight_length() {
        let x = Array2::<f32>::zeros((2, 3));
        let e = rms_norm(x.view(), &[1.0; 4], 1e-6).unwrap_err().to_string();
        assert!(e.contains("[3]"), "{e}");
    }

    /// Central differences of `L = Σ dy ⊙ rms_norm(x, w)` in f64 (the forward redone in f64).
    #[test]
    fn rms_norm_backward_is_the_gradient_by_central_differences() {
        let (m, c, eps) = (3usize, 7usize, 1e-3);
        let val = |i: usize, s: f64| ((i as f64 * 0.77 + s).sin() * 1.3) as f32;
        let x = Array2::from_shape_fn((m, c), |(i, k)| val(i * c + k, 0.1));
        let dy = Array2::from_shape_fn((m, c), |(i, k)| val(i * c + k, 2.0));
        let w: Vec<f32> = (0..c).map(|k| 1.0 + 0.5 * val(k, 5.0)).collect();
        let loss = |x: &Array2<f64>, w: &[f64]| {
            let mut l = 0.0;
            for i in 0..m {
                let ss: f64 = (0..c).map(|k| x[[i, k]].powi(2)).sum();
                let r = 1.0 / (ss / c as f64 + eps).sqrt();
                for k in 0..c {
                    l += f64::from(dy[[i, k]]) * x[[i, k]] * r * w[k];
                }
            }
            l
        };
        let g = rms_norm_backward(dy.view(), x.view(), &w, eps).unwrap();
        let x64 = x.mapv(f64::from);
        let w64: Vec<f64> = w.iter().map(|&v| f64::from(v)).collect();
        let h = 1e-6;
        for i in 0..m {
            for k in 0..c {
                let (mut xp, mut xm) = (x64.clone(), x64.clone());
                xp[[i, k]] += h;
                xm[[i, k]] -= h;
                let fd = (loss(&xp, &w64) - loss(&xm, &w64)) / (2.0 * h);
                assert!(
                    (fd - g.dx[[i, k]]).abs() < 1e-7,
                    "dx[{i}, {k}]: {fd} vs {}",
                    g.dx[[i, k]]
                );
            }
        }
        for k in 0..c {
            let (mut wp, mut wm) = (w64.clone(), w64.clone());
            wp[k] += h;
            wm[k] -= h;
            let fd = (loss(&x64, &wp) - loss(&x64, &wm)) / (2.0 * h);
            assert!(
                (fd - g.dweight[k]).abs() < 1e-7,
                "dweight[{k}]: {fd} vs {}",
                g.dweight[k]
            );
        }
    }
}
