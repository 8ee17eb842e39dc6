//! The scale of one quantization tile (OFF `kernel.py act_quant`, V3 §3.3.2 "online quantization").
//!
//! `amax = max(max|x|, 1e-4)` (f32), `s = amax / 448` (IEEE f32 division), and with
//! `scale_fmt = "ue8m0"` (DeepSeek-V3.1) `s ← 2^⌈log2 s⌉`, computed exactly on the bits.
//! The floor of 1e-4 keeps an all-zero tile from producing `s = 0` and `0/0 = NaN` codes; OFF
//! added it on 2025-08-27 (commit `adecc0e`).

use super::format::E4M3;
use super::ue8m0;

/// Lower bound applied to a tile's absolute maximum before the scale is derived.
pub const AMAX_FLOOR: f32 = 1e-4;

/// The E4M3 maximum, 448: the tile's amax maps onto it.
pub const E4M3_MAX: f32 = 448.0;

/// How a tile scale is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleFmt {
    /// `s = amax / 448` as computed (DeepSeek-V3, `scale_fmt = None`).
    F32,
    /// `s` rounded up to a power of two (DeepSeek-V3.1, `scale_fmt = "ue8m0"`).
    Ue8m0,
}

/// Scale of a tile whose absolute maximum is `amax` (finite, ≥ 0).
pub fn tile_scale(amax: f32, scale_fmt: ScaleFmt) -> f32 {
    debug_assert!(E4M3.max_finite() == f64::from(E4M3_MAX));
    let s = amax.max(AMAX_FLOOR) / E4M3_MAX;
    match scale_fmt {
        ScaleFmt::F32 => s,
        // s ≥ 1e-4/448 > 2^-127 and ≤ f32::MAX/448 < 2^127, so a code always exists.
        ScaleFmt::Ue8m0 => ue8m0::ceil_pow2(s).unwrap_or(s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_tile_uses_the_floor() {
        assert_eq!(tile_scale(0.0, ScaleFmt::F32), 1e-4f32 / 448.0);
        // 1e-4/448 ≈ 2.23e-7 lies in [2^-23, 2^-22): rounded up to 2^-22.
        assert_eq!(tile_scale(0.0, ScaleFmt::Ue8m0), 2f32.powi(-22));
    }

    #[test]
    fn ue8m0_scale_is_the_next_power_of_two() {
        assert_eq!(tile_scale(448.0, ScaleFmt::Ue8m0), 1.0);
        assert_eq!(tile_scale(449.0, ScaleFmt::Ue8m0), 2.0);
        assert_eq!(tile_scale(224.0, ScaleFmt::Ue8m0), 0.5);
    }
}
