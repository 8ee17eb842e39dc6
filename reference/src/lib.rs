//! `dsv3-reference`: a readable, single-threaded implementation of DeepSeek-V3's math.
//!
//! Every public function cites the equation it implements (paper numbering, "V3 (n)") or the
//! official-code symbol it matches (`OFF kernel.py act_quant`), states the shapes of its
//! arguments, and returns a [`Result`] whose error names the culprit.
//!
//! # Dimension legend
//! Shapes in doc comments use these letters:
//!
//! | letter | meaning |
//! |---|---|
//! | `M` | rows of an activation matrix (tokens) |
//! | `N` | output features of a Linear (rows of a weight `[N, K]`) |
//! | `K` | input features / GEMM reduction dimension |
//! | `B` | quantization block size (128 in DeepSeek-V3) |
//!
//! # Modules
//! - [`fp8`]: FP8 formats (E4M3, E5M2, UE8M0, E5M6), 1×128 / 128×1 / 128×128 tile quantization.
//! - [`moe`]: expert selection (group- and node-limited), the aux-loss-free bias update, the
//!   sequence-wise balance loss, redundant-expert placement (EPLB).
//! - [`numeric`]: BF16 rounding and ULP helpers shared by every module.
//! - [`rng`]: the seeded SplitMix64 generator (simulations, FIM).
//! - [`train`]: optimizer, schedules, MTP loss, GRPO, FIM/packing, pipeline schedules.

pub mod error;
pub mod fp8;
pub mod moe;
pub mod numeric;
pub mod rng;
pub mod train;

pub use error::{Error, Result};
