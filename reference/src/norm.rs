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
}
