//! Weight quantization with B×B blocks (V3 §3.3.2: "128 input channels × 128 output channels").
//! The released checkpoint stores the result as `weight` (E4M3) + `weight_scale_inv` (f32).

use ndarray::ArrayView2;

use super::scale::ScaleFmt;
use super::tile::{check_block_size, check_finite, quantize_tiles, Quantized};
use crate::error::Result;

/// Block quantization of a weight (DeepGEMM `per_block_cast_to_fp8`, with OFF `act_quant`'s
/// scale rule): per block, `s = max(amax, 1e-4)/448`, `y = e4m3_satfinite(w / s)`. Partial
/// blocks at the edges use only their real elements (zero padding does not change `amax`).
///
/// Shapes: `w: [N, K]` → `y: [N, K]`, `s: [⌈N/B⌉, ⌈K/B⌉]`.
pub fn weight_quant(
    w: ArrayView2<f32>,
    block_size: usize,
    scale_fmt: ScaleFmt,
) -> Result<Quantized> {
    const OP: &str = "weight_quant";
    check_block_size(OP, block_size)?;
    check_finite(OP, "w", w)?;
    Ok(quantize_tiles(w, block_size, block_size, scale_fmt))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    #[test]
    fn weight_quant_partial_edge_blocks() {
        // [3, 5] with B = 2: blocks of 2×2, the last row/column blocks are partial.
        let w = Array2::from_shape_fn((3, 5), |(n, k)| (n * 5 + k) as f32);
        let q = weight_quant(w.view(), 2, ScaleFmt::F32).unwrap();
        assert_eq!(q.s.dim(), (2, 3));
        // Block (1, 2) holds only w[2, 4] = 14.
        assert_eq!(q.s[[1, 2]], 14.0f32 / 448.0);
        assert_eq!(q.y[[2, 4]], 0x7E);
    }
}
