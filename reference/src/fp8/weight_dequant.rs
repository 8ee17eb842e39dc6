//! Dequantization of a block-quantized weight (OFF `kernel.py weight_dequant`, used by
//! `fp8_cast_bf16.py` and by the absorbed MLA for `wkv_b`).

use ndarray::{Array2, ArrayView2};

use super::tile::{check_block_size, check_quantized, dequantize_tiles};
use crate::error::Result;

/// `w[n, k] = f32(y[n, k]) · s[n/B, k/B]`: one IEEE f32 multiply, no other rounding. OFF stores
/// the result in the default dtype (bf16): round the returned f32 with
/// [`round_to_bf16`](crate::numeric::round_to_bf16) for that (RNE of the f32 product).
///
/// Shapes: `y: [N, K]` E4M3 codes, `s: [⌈N/B⌉, ⌈K/B⌉]` → `w: [N, K]`.
/// Errors: a scale that is not finite and positive, a NaN code, a wrongly shaped `s`.
pub fn weight_dequant(
    y: ArrayView2<u8>,
    s: ArrayView2<f32>,
    block_size: usize,
) -> Result<Array2<f32>> {
    const OP: &str = "weight_dequant";
    check_block_size(OP, block_size)?;
    check_quantized(OP, y, s, block_size, block_size)?;
    Ok(dequantize_tiles(y, s, block_size, block_size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fp8::{scale::ScaleFmt, weight_quant::weight_quant};
    use ndarray::array;

    #[test]
    fn weight_dequant_multiplies_code_by_block_scale() {
        let y = array![[0x38u8, 0xB8], [0x40, 0x7E]]; // 1, −1, 2, 448
        let s = array![[0.5f32]];
        let w = weight_dequant(y.view(), s.view(), 2).unwrap();
        assert_eq!(w, array![[0.5f32, -0.5], [1.0, 224.0]]);
    }

    #[test]
    fn weight_dequant_rejects_wrong_scale_grid() {
        let y = ndarray::Array2::<u8>::zeros((3, 5));
        let s = ndarray::Array2::<f32>::ones((1, 3));
        let err = weight_dequant(y.view(), s.view(), 2).unwrap_err();
        assert!(err.to_string().contains("expected [2, 3]"), "{err}");
    }

    #[test]
    fn weight_round_trip_error_is_within_half_a_code() {
        let w = ndarray::Array2::from_shape_fn((5, 7), |(n, k)| ((n * 7 + k) as f32).sin() * 3.0);
        let q = weight_quant(w.view(), 4, ScaleFmt::F32).unwrap();
        let back = weight_dequant(q.y.view(), q.s.view(), 4).unwrap();
        for ((n, k), &v) in w.indexed_iter() {
            let s = q.s[[n / 4, k / 4]];
            // |x/s| ≤ 448 lies in a binade whose code spacing is at most 32 (2^-3 relative).
            let t = (v / s).abs();
            let spacing = if t < 2f32.powi(-6) {
                2f32.powi(-9)
            } else {
                2f32.powi(t.log2().floor() as i32 - 3)
            };
            assert!(
                (back[[n, k]] - v).abs() <= s * spacing / 2.0 * 1.0001,
                "({n},{k})"
            );
        }
    }
}
