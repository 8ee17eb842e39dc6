//! FP8 numerics of DeepSeek-V3 (V3 §3.3): the formats and the tile quantization around them.
//!
//! - [`format`]: E4M3, E5M2 and E5M6 codes ↔ f32 (round-to-nearest-even, saturating or not).
//! - [`ue8m0`]: power-of-two scales.
//! - [`scale`]: the scale of one tile, `max(amax, 1e-4)/448`.
//! - [`act_quant`]: 1×128 activation tiles and the 128×1 re-tiling of backward.
//! - [`weight_quant`] / [`weight_dequant`]: 128×128 weight blocks.
//! - [`fp8_gemm`]: the block-scaled GEMM (exact or through [`accumulate`]'s Tensor Core model),
//!   [`grouped_gemm`] its MoE variants, [`linear_fp8`] the three training GEMMs.
//! - [`tc_bound`]: the model-free bound on any Tensor Core kernel's window partials.

pub mod accumulate;
pub mod act_quant;
pub mod format;
pub mod fp8_gemm;
pub mod grouped_gemm;
pub mod linear_fp8;
pub mod scale;
pub mod tc_bound;
mod tile;
pub mod ue8m0;
pub mod weight_dequant;
pub mod weight_quant;

pub use accumulate::{TensorCoreModel, TermCut, WriteBack, HOPPER_FP8_WGMMA};
pub use act_quant::{act_quant, act_quant_128x1, act_quant_any_k, retile_128x1};
pub use format::{Format, Saturation, Specials, E4M3, E5M2, E5M6};
pub use fp8_gemm::{fp8_gemm, Accumulation, BlockScaled, ScaleLayout};
pub use grouped_gemm::{
    m_grouped_fp8_gemm_contiguous, m_grouped_fp8_gemm_masked, ExpertWeights, GroupRows,
};
pub use linear_fp8::{LinearFp8, LinearFp8Cache};
pub use scale::{tile_scale, ScaleFmt, AMAX_FLOOR, E4M3_MAX};
pub use tc_bound::{TensorCoreBound, HOPPER_FP8_BOUND};
pub use tile::Quantized;
pub use weight_dequant::weight_dequant;
pub use weight_quant::weight_quant;
