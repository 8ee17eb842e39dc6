//! Tile quantization of a matrix with rectangular `tr × tc` tiles (partial tiles at the bottom and
//! right edges allowed) and its inverse. [`act_quant`](super::act_quant) (1×B),
//! [`act_quant_128x1`](super::act_quant::act_quant_128x1) (B×1) and
//! [`weight_quant`](super::weight_quant) (B×B) are this one loop with different tile shapes.

use ndarray::{Array2, ArrayView2};

use super::format::{Saturation, E4M3};
use super::scale::{tile_scale, ScaleFmt};
use crate::error::{Error, Result};

/// E4M3 codes and their per-tile scales.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantized {
    /// E4M3 codes, same shape as the input: `[R, C]`.
    pub y: Array2<u8>,
    /// One scale per tile: `[⌈R/tr⌉, ⌈C/tc⌉]`. The input is `x ≈ f32(y) · s`.
    pub s: Array2<f32>,
}

/// Reject NaN and ±inf: a non-finite element would silently turn its tile's scale into NaN/inf.
pub(crate) fn check_finite(
    op: &'static str,
    tensor: &'static str,
    x: ArrayView2<f32>,
) -> Result<()> {
    match x.indexed_iter().find(|(_, v)| !v.is_finite()) {
        None => Ok(()),
        Some(((r, c), v)) => Err(Error::Value {
            op,
            tensor,
            index: vec![r, c],
            value: v.to_string(),
            why: "quantization needs finite inputs (a NaN or inf would poison the tile's scale)",
        }),
    }
}

/// Quantize `x: [R, C]` with `tr × tc` tiles: per tile, `amax = max|x|` (f32),
/// `s = max(amax, 1e-4) / 448` (optionally rounded up to a power of two), `y = e4m3(x / s)`
/// with round-to-nearest-even and saturation. The caller has checked that `x` is finite.
pub(crate) fn quantize_tiles(
    x: ArrayView2<f32>,
    tr: usize,
    tc: usize,
    scale_fmt: ScaleFmt,
) -> Quantized {
    let (rows, cols) = x.dim();
    let (tile_rows, tile_cols) = (rows.div_ceil(tr), cols.div_ceil(tc));
    let mut y = Array2::<u8>::zeros((rows, cols));
    let mut s = Array2::<f32>::zeros((tile_rows, tile_cols));
    for i in 0..tile_rows {
        for j in 0..tile_cols {
            let r_range = i * tr..((i + 1) * tr).min(rows);
            let c_range = j * tc..((j + 1) * tc).min(cols);
            // pass 1: absolute maximum over the tile (exact in f32)
            let mut amax = 0f32;
            for r in r_range.clone() {
                for c in c_range.clone() {
                    amax = amax.max(x[[r, c]].abs());
                }
            }
            // pass 2: the tile's scale
            let scale = tile_scale(amax, scale_fmt);
            s[[i, j]] = scale;
            // pass 3: divide (IEEE f32) and round to E4M3, saturating
            for r in r_range.clone() {
                for c in c_range.clone() {
                    y[[r, c]] = E4M3.encode(x[[r, c]] / scale, Saturation::SatFinite) as u8;
                }
            }
        }
    }
    Quantized { y, s }
}

/// `x[r, c] = f32(y[r, c]) · s[r / tr, c / tc]`: one IEEE f32 multiply per element.
/// The caller has checked the shapes (and that no code is NaN).
pub(crate) fn dequantize_tiles(
    y: ArrayView2<u8>,
    s: ArrayView2<f32>,
    tr: usize,
    tc: usize,
) -> Array2<f32> {
    // each code's value, decoded once (E4M3 values are exact in f32)
    let values: [f32; 256] = std::array::from_fn(|code| E4M3.decode(code as u16));
    let mut x = Array2::<f32>::zeros(y.dim());
    for ((mut x_row, y_row), r) in x.rows_mut().into_iter().zip(y.rows()).zip(0..) {
        let s_row = s.row(r / tr);
        for (c, (x, &code)) in x_row.iter_mut().zip(y_row).enumerate() {
            *x = values[usize::from(code)] * s_row[c / tc];
        }
    }
    x
}

/// Check that `s` has the tile grid shape `[⌈R/tr⌉, ⌈C/tc⌉]` of a `[R, C]` tensor and that every
/// scale is finite and positive, and that no code is NaN.
pub(crate) fn check_quantized(
    op: &'static str,
    y: ArrayView2<u8>,
    s: ArrayView2<f32>,
    tr: usize,
    tc: usize,
) -> Result<()> {
    let (rows, cols) = y.dim();
    let grid = [rows.div_ceil(tr), cols.div_ceil(tc)];
    if s.shape() != grid {
        return Err(Error::Shape {
            op,
            tensor: "s",
            got: s.shape().to_vec(),
            expected: format!(
                "expected {grid:?}: one scale per {tr}×{tc} tile of y {:?}",
                [rows, cols]
            ),
        });
    }
    if let Some(((i, j), v)) = s
        .indexed_iter()
        .find(|(_, v)| !(v.is_finite() && **v > 0.0))
    {
        return Err(Error::Value {
            op,
            tensor: "s",
            index: vec![i, j],
            value: v.to_string(),
            why: "scales must be finite and positive",
        });
    }
    if let Some(((r, c), v)) = y.indexed_iter().find(|(_, v)| E4M3.is_nan(u16::from(**v))) {
        return Err(Error::Value {
            op,
            tensor: "y",
            index: vec![r, c],
            value: format!("the E4M3 NaN code {v:#04x}"),
            why: "quantized tensors hold no NaN codes",
        });
    }
    Ok(())
}

pub(crate) fn check_block_size(op: &'static str, block_size: usize) -> Result<()> {
    if block_size == 0 {
        return Err(Error::Argument {
            op,
            name: "block_size",
            value: "0".into(),
            why: "must be at least 1".into(),
        });
    }
    Ok(())
}
