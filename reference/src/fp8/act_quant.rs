//! Activation quantization: 1×B tiles (forward, V3 §3.3.2) and the B×1 re-tiling of backward
//! (V3 §3.3.2 / App. B.2: "re-tiled from 1×128 into 128×1 tiles").

use ndarray::ArrayView2;

use super::scale::ScaleFmt;
use super::tile::{
    check_block_size, check_finite, check_quantized, dequantize_tiles, quantize_tiles, Quantized,
};
use crate::error::{Error, Result};

/// OFF `kernel.py act_quant`; V3 §3.3.2 "per-token, per-128-channel" tiles.
///
/// For every row `m` and tile `kb`: `amax = max_{k∈kb} |x[m,k]|`, `s[m,kb] = max(amax, 1e-4)/448`
/// (power of two ≥ that with [`ScaleFmt::Ue8m0`]), `y[m,k] = e4m3_satfinite(x[m,k] / s[m,kb])`.
///
/// Shapes: `x: [M, K]` with `K % B == 0` → `y: [M, K]` (E4M3 codes), `s: [M, K/B]`.
/// Errors: `B = 0`, `K` not a multiple of `B`, a NaN or ±inf in `x`.
pub fn act_quant(x: ArrayView2<f32>, block_size: usize, scale_fmt: ScaleFmt) -> Result<Quantized> {
    const OP: &str = "act_quant";
    check_block_size(OP, block_size)?;
    let k = x.ncols();
    if k % block_size != 0 {
        return Err(Error::Shape {
            op: OP,
            tensor: "x",
            got: x.shape().to_vec(),
            expected: format!("last dim must be a multiple of block_size {block_size}"),
        });
    }
    check_finite(OP, "x", x)?;
    Ok(quantize_tiles(x, 1, block_size, scale_fmt))
}

/// [`act_quant`] for any `K`: the last 1×B tile of a row may be partial (`K mod B` elements).
/// Its scale comes from its real elements, which is what zero-padding `K` to a multiple of `B`
/// gives (zeros change neither amax nor the dot products): the activation side of a GEMM whose
/// last K-block is partial (OFF's Triton `fp8_gemm` masks it, DeepGEMM pads). Equal to
/// [`act_quant`] when `K % B == 0`.
///
/// Shapes: `x: [M, K]` → `y: [M, K]`, `s: [M, ⌈K/B⌉]`.
pub fn act_quant_any_k(
    x: ArrayView2<f32>,
    block_size: usize,
    scale_fmt: ScaleFmt,
) -> Result<Quantized> {
    const OP: &str = "act_quant";
    check_block_size(OP, block_size)?;
    check_finite(OP, "x", x)?;
    Ok(quantize_tiles(x, 1, block_size, scale_fmt))
}

/// B×1 tiles (one scale per channel per B tokens): the layout Wgrad needs for `x` and `dy`
/// (V3 App. B.2). Partial tiles at the bottom edge are allowed.
///
/// Shapes: `x: [M, K]` → `y: [M, K]`, `s: [⌈M/B⌉, K]`.
pub fn act_quant_128x1(
    x: ArrayView2<f32>,
    block_size: usize,
    scale_fmt: ScaleFmt,
) -> Result<Quantized> {
    const OP: &str = "act_quant_128x1";
    check_block_size(OP, block_size)?;
    check_finite(OP, "x", x)?;
    Ok(quantize_tiles(x, block_size, 1, scale_fmt))
}

/// Re-tile a 1×B-quantized activation into B×1 tiles: dequantize (`f32(y)·s`, one f32 multiply)
/// and quantize again with [`act_quant_128x1`]. With power-of-two scales ([`ScaleFmt::Ue8m0`])
/// both steps only shift exponents, so re-tiling adds no error unless a value leaves E4M3's
/// normal range (V3 §3.3.3: "integral power of 2" scales "avoid introducing extra quantization
/// error").
///
/// Shapes: `y: [M, K]`, `s: [M, K/B]` → `y': [M, K]`, `s': [⌈M/B⌉, K]`.
pub fn retile_128x1(
    y: ArrayView2<u8>,
    s: ArrayView2<f32>,
    block_size: usize,
    scale_fmt: ScaleFmt,
) -> Result<Quantized> {
    const OP: &str = "retile_128x1";
    check_block_size(OP, block_size)?;
    check_quantized(OP, y, s, 1, block_size)?;
    let x = dequantize_tiles(y, s, 1, block_size);
    Ok(quantize_tiles(x.view(), block_size, 1, scale_fmt))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fp8::format::E4M3;
    use ndarray::{array, Array2};

    #[test]
    fn act_quant_maps_the_tile_max_to_448() {
        let x = Array2::from_shape_fn((2, 256), |(m, k)| {
            (k as f32 - 100.0) * (m as f32 + 1.0) * 0.01
        });
        let q = act_quant(x.view(), 128, ScaleFmt::F32).unwrap();
        assert_eq!(q.s.dim(), (2, 2));
        // Row 0, tile 0: amax = |0 − 100|·0.01 = 1.0 at k = 0 → s = 1/448, code of −448 = 0xFE.
        assert_eq!(q.s[[0, 0]], 1.0f32 / 448.0);
        assert_eq!(q.y[[0, 0]], 0xFE);
        // Row 1, tile 1: amax at k = 255: 155·2·0.01 = 3.1.
        assert_eq!(q.s[[1, 1]], (155.0f32 * 2.0 * 0.01) / 448.0);
        assert_eq!(q.y[[1, 255]], 0x7E);
    }

    #[test]
    fn act_quant_zero_tile_scale_is_clamped() {
        let x = Array2::<f32>::zeros((1, 128));
        let q = act_quant(x.view(), 128, ScaleFmt::F32).unwrap();
        assert_eq!(q.s[[0, 0]], 1e-4f32 / 448.0);
        assert!(q.y.iter().all(|&c| c == 0));
    }

    #[test]
    fn act_quant_rejects_nan_with_its_index() {
        let mut x = Array2::<f32>::ones((2, 128));
        x[[1, 7]] = f32::NAN;
        let err = act_quant(x.view(), 128, ScaleFmt::F32).unwrap_err();
        assert!(
            matches!(err, Error::Value { ref index, .. } if index == &vec![1, 7]),
            "{err}"
        );
    }

    #[test]
    fn act_quant_rejects_k_not_multiple_of_block() {
        let x = Array2::<f32>::ones((1, 100));
        let err = act_quant(x.view(), 128, ScaleFmt::F32).unwrap_err();
        assert!(
            err.to_string().contains("multiple of block_size 128"),
            "{err}"
        );
    }

    #[test]
    fn act_quant_any_k_equals_act_quant_of_the_zero_padded_rows() {
        // K = 5, B = 4: the second tile holds one real element; padded to K = 8 with zeros,
        // OFF's act_quant gives the same scales and codes.
        let x = array![[0.5f32, -3.0, 1.25, 2.0, -0.75], [8.0, 0.0, -1.0, 0.1, 6.0]];
        let q = act_quant_any_k(x.view(), 4, ScaleFmt::F32).unwrap();
        let mut padded = Array2::<f32>::zeros((2, 8));
        padded.slice_mut(ndarray::s![.., ..5]).assign(&x);
        let p = act_quant(padded.view(), 4, ScaleFmt::F32).unwrap();
        assert_eq!(q.s, p.s);
        assert_eq!(q.y, p.y.slice(ndarray::s![.., ..5]));
        // the partial tile's scale is its own amax / 448
        assert_eq!(q.s[[1, 1]], 6.0f32 / 448.0);
        // K a multiple of B: the same as act_quant
        let x = Array2::from_shape_fn((3, 8), |(m, k)| (m as f32 - 1.3) * (k as f32 + 0.7));
        assert_eq!(
            act_quant_any_k(x.view(), 4, ScaleFmt::Ue8m0).unwrap(),
            act_quant(x.view(), 4, ScaleFmt::Ue8m0).unwrap()
        );
    }

    #[test]
    fn act_quant_128x1_has_one_scale_per_channel() {
        let x = array![[1.0f32, -8.0], [2.0, 4.0], [-3.0, 0.5]];
        let q = act_quant_128x1(x.view(), 2, ScaleFmt::F32).unwrap();
        assert_eq!(
            q.s,
            array![[2.0f32 / 448.0, 8.0 / 448.0], [3.0 / 448.0, 0.5 / 448.0]]
        );
        assert_eq!(E4M3.decode(u16::from(q.y[[2, 0]])), -448.0);
    }

    #[test]
    fn retile_with_pow2_scales_is_exact() {
        let x = Array2::from_shape_fn((4, 8), |(m, k)| ((m * 8 + k) as f32 - 13.0) * 0.37);
        let q = act_quant(x.view(), 4, ScaleFmt::Ue8m0).unwrap();
        let r = retile_128x1(q.y.view(), q.s.view(), 4, ScaleFmt::Ue8m0).unwrap();
        let before = dequantize_tiles(q.y.view(), q.s.view(), 1, 4);
        let after = dequantize_tiles(r.y.view(), r.s.view(), 4, 1);
        assert_eq!(before, after);
    }
}
