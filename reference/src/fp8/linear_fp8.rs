//! The three GEMMs of a Linear layer in FP8 training (V3 §3.3.1, Fig. 6; §3.3.2; App. B.2) and
//! [`LinearFp8`], a forward + backward that quantizes as the paper says.
//!
//! For `y = x·Wᵀ` with `x: [M, K]` (M tokens), `W: [N, K]`:
//!
//! | GEMM | computes | `a` (1×B tiles along the reduction) | `b` | reduction |
//! |---|---|---|---|---|
//! | Fprop | `y = x·Wᵀ` | `x`, 1×128 tiles | `W`, 128×128 blocks | K |
//! | Dgrad | `dx = dy·W` | `dy`, 1×128 tiles along N | `Wᵀ` (the stored W read transposed, with the **transposed** block scales) | N |
//! | Wgrad | `dW = dyᵀ·x` | `dyᵀ` (dy quantized in 128×1 tiles) | `xᵀ` (x re-tiled 1×128 → 128×1) | M (tokens) |
//!
//! Each is the block-scaled GEMM of [`fp8_gemm`](super::fp8_gemm) with the same accumulation
//! rules; Wgrad's `b` carries one scale per row and 128-token block ([`ScaleLayout::Row`](super::fp8_gemm::ScaleLayout::Row)),
//! DeepGEMM's "1D1D" recipe. Fprop and Dgrad outputs are stored in BF16, the weight gradient in
//! FP32 (Fig. 6).

use ndarray::{Array2, ArrayView2};

use super::act_quant::{act_quant, act_quant_128x1, retile_128x1};
use super::fp8_gemm::{gemm, Accumulation, BlockScaled, GemmNames};
use super::scale::ScaleFmt;
use super::tile::Quantized;
use super::weight_quant::weight_quant;
use crate::error::Result;
use crate::numeric::bf16_round_f32;

/// Fprop, V3 Fig. 6: `y[m, n] = Σ_kb (Σ_{k∈kb} x[m,k]·w[n,k]) · x_s[m,kb] · w_s[n/B, kb]`.
///
/// Shapes: `x: [M, K]` E4M3, `x_s: [M, ⌈K/B⌉]`, `w: [N, K]` E4M3, `w_s: [⌈N/B⌉, ⌈K/B⌉]`
/// → `y: [M, N]` (f32 accumulator; stored as bf16 in training).
pub fn fprop(
    x: ArrayView2<u8>,
    x_s: ArrayView2<f32>,
    w: ArrayView2<u8>,
    w_s: ArrayView2<f32>,
    block_size: usize,
    accumulation: &Accumulation,
) -> Result<Array2<f32>> {
    let names = GemmNames {
        a: "x",
        a_s: "x_s",
        b: "w",
        b_s: "w_s",
    };
    let (x, w) = (BlockScaled::tiles(x, x_s), BlockScaled::blocks(w, w_s));
    gemm("linear_fp8_fprop", &names, x, w, block_size, accumulation)
}

/// Dgrad, V3 Fig. 6: `dx[m, k] = Σ_nb (Σ_{n∈nb} dy[m,n]·w[n,k]) · dy_s[m,nb] · w_s[nb, k/B]`:
/// the stored weight is read as `Wᵀ: [K, N]`, whose B×B block scales are `w_sᵀ`.
///
/// Shapes: `dy: [M, N]` E4M3, `dy_s: [M, ⌈N/B⌉]`, `w: [N, K]` E4M3, `w_s: [⌈N/B⌉, ⌈K/B⌉]`
/// → `dx: [M, K]`. Error indices into `wᵀ`/`w_sᵀ` are in the transposed view.
pub fn dgrad(
    dy: ArrayView2<u8>,
    dy_s: ArrayView2<f32>,
    w: ArrayView2<u8>,
    w_s: ArrayView2<f32>,
    block_size: usize,
    accumulation: &Accumulation,
) -> Result<Array2<f32>> {
    let names = GemmNames {
        a: "dy",
        a_s: "dy_s",
        b: "wᵀ",
        b_s: "w_sᵀ",
    };
    let (dy, w) = (BlockScaled::tiles(dy, dy_s), BlockScaled::blocks(w, w_s));
    gemm(
        "linear_fp8_dgrad",
        &names,
        dy,
        w.t(),
        block_size,
        accumulation,
    )
}

/// Wgrad, V3 Fig. 6 / App. B.2: `dw[n, k] = Σ_mb (Σ_{m∈mb} dy[m,n]·x[m,k]) · dy_s[mb,n] · x_s[mb,k]`
/// with both operands in B×1 tiles (B tokens of one channel share a scale).
///
/// Shapes: `x: [M, K]` E4M3, `x_s: [⌈M/B⌉, K]`, `dy: [M, N]` E4M3, `dy_s: [⌈M/B⌉, N]`
/// → `dw: [N, K]` f32. Error indices are in the transposed views `dyᵀ`, `xᵀ`.
pub fn wgrad(
    x: ArrayView2<u8>,
    x_s: ArrayView2<f32>,
    dy: ArrayView2<u8>,
    dy_s: ArrayView2<f32>,
    block_size: usize,
    accumulation: &Accumulation,
) -> Result<Array2<f32>> {
    let names = GemmNames {
        a: "dyᵀ",
        a_s: "dy_sᵀ",
        b: "xᵀ",
        b_s: "x_sᵀ",
    };
    // both operands in B×1 tiles: read transposed, each row one channel with its own scales
    let (dy, x) = (
        BlockScaled::tiles(dy.t(), dy_s.t()),
        BlockScaled::tiles(x.t(), x_s.t()),
    );
    gemm("linear_fp8_wgrad", &names, dy, x, block_size, accumulation)
}

/// A Linear layer trained in FP8 as V3 §3.3 describes: inputs and output gradients quantized
/// online in 1×B tiles, weights in B×B blocks, GEMM outputs in BF16 except the FP32 weight
/// gradient; Wgrad re-tiles the cached FP8 input into B×1 tiles instead of keeping it in BF16.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinearFp8 {
    pub block_size: usize,
    pub scale_fmt: ScaleFmt,
    pub accumulation: Accumulation,
}

/// What the forward pass keeps for the backward pass: the FP8 input and weight.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearFp8Cache {
    /// `x` in 1×B tiles: `y: [M, K]`, `s: [M, K/B]`.
    pub x: Quantized,
    /// `W` in B×B blocks: `y: [N, K]`, `s: [⌈N/B⌉, ⌈K/B⌉]`.
    pub w: Quantized,
}

impl LinearFp8 {
    /// `y = bf16(Fprop(act_quant(x), weight_quant(w)))`.
    ///
    /// Shapes: `x: [M, K]` with `K % B == 0`, `w: [N, K]` (FP32 master weight) → `y: [M, N]`
    /// (bf16 values held in f32).
    pub fn forward(
        &self,
        x: ArrayView2<f32>,
        w: ArrayView2<f32>,
    ) -> Result<(Array2<f32>, LinearFp8Cache)> {
        // quantize the input per token and 128 channels, the weight per 128×128 block
        let xq = act_quant(x, self.block_size, self.scale_fmt)?;
        let wq = weight_quant(w, self.block_size, self.scale_fmt)?;
        // Fprop, output rounded to bf16
        let y = fprop(
            xq.y.view(),
            xq.s.view(),
            wq.y.view(),
            wq.s.view(),
            self.block_size,
            &self.accumulation,
        )?
        .mapv(bf16_round_f32);
        Ok((y, LinearFp8Cache { x: xq, w: wq }))
    }

    /// `dx = bf16(Dgrad(act_quant(dy), W))`, `dW = Wgrad(act_quant_128x1(dy), retile(x))`.
    ///
    /// Shapes: `dy: [M, N]` with `N % B == 0` → `dx: [M, K]` (bf16 values in f32),
    /// `dw: [N, K]` f32.
    pub fn backward(
        &self,
        dy: ArrayView2<f32>,
        cache: &LinearFp8Cache,
    ) -> Result<(Array2<f32>, Array2<f32>)> {
        let b = self.block_size;
        // Dgrad: dy in 1×B tiles along N, the cached FP8 weight read transposed
        let dy_rows = act_quant(dy, b, self.scale_fmt)?;
        let dx = dgrad(
            dy_rows.y.view(),
            dy_rows.s.view(),
            cache.w.y.view(),
            cache.w.s.view(),
            b,
            &self.accumulation,
        )?
        .mapv(bf16_round_f32);
        // Wgrad: dy in B×1 tiles (B tokens per scale), the cached input re-tiled 1×B → B×1
        let dy_cols = act_quant_128x1(dy, b, self.scale_fmt)?;
        let x_cols = retile_128x1(cache.x.y.view(), cache.x.s.view(), b, self.scale_fmt)?;
        let dw = wgrad(
            x_cols.y.view(),
            x_cols.s.view(),
            dy_cols.y.view(),
            dy_cols.s.view(),
            b,
            &self.accumulation,
        )?;
        Ok((dx, dw))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fp8::format::{Saturation, E4M3};
    use ndarray::array;

    fn codes(v: &[f32], rows: usize) -> Array2<u8> {
        let c: Vec<u8> = v
            .iter()
            .map(|&x| E4M3.encode(x, Saturation::NonSat) as u8)
            .collect();
        Array2::from_shape_vec((rows, v.len() / rows), c).unwrap()
    }

    #[test]
    fn dgrad_reads_the_weight_and_its_scales_transposed() {
        // B = 1: every element is its own block, so dx[m,k] = Σ_n dy·dy_s[m,n]·w·w_s[n,k].
        let dy = codes(&[1.0, 2.0], 1);
        let dy_s = array![[1.0f32, 0.5]];
        let w = codes(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2); // [N = 2, K = 3]
        let w_s = array![[1.0f32, 2.0, 4.0], [0.5, 0.25, 1.0]];
        let dx = dgrad(
            dy.view(),
            dy_s.view(),
            w.view(),
            w_s.view(),
            1,
            &Accumulation::Exact,
        )
        .unwrap();
        // k = 0: 1·1·1·1 + 2·0.5·4·0.5 = 3; k = 1: 1·2·2 + 2·0.5·5·0.25 = 5.25;
        // k = 2: 1·3·4 + 2·0.5·6·1 = 18
        assert_eq!(dx, array![[3.0f32, 5.25, 18.0]]);
    }

    #[test]
    fn wgrad_reduces_over_tokens_with_per_channel_scales() {
        // M = 3 tokens, B = 2: token blocks {0, 1} and {2}. x: [3, 1], dy: [3, 2].
        let x = codes(&[1.0, 2.0, 3.0], 3);
        let x_s = array![[2.0f32], [0.5]];
        let dy = codes(&[1.0, -1.0, 1.0, 0.5, 2.0, 4.0], 3);
        let dy_s = array![[1.0f32, 4.0], [0.25, 1.0]];
        let dw = wgrad(
            x.view(),
            x_s.view(),
            dy.view(),
            dy_s.view(),
            2,
            &Accumulation::Exact,
        )
        .unwrap();
        // n = 0: (1·1 + 1·2)·1·2 + (2·3)·0.25·0.5 = 6 + 0.75 = 6.75
        // n = 1: (−1·1 + 0.5·2)·4·2 + (4·3)·1·0.5 = 0 + 6 = 6
        assert_eq!(dw, array![[6.75f32], [6.0]]);
    }
}
