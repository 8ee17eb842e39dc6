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
//! | `S` | new tokens of one sequence; `T` keys attended (cache length) |
//! | `D` | model width (`hidden_size`, 7168) |
//! | `H` | attention heads (128); `dn`/`dr`/`dv` nope/rope/value head dims, `dc` = `kv_lora_rank` |
//! | `E` | routed experts (256); `I` an FFN's intermediate width |
//!
//! # Modules
//! - [`fp8`]: FP8 formats (E4M3, E5M2, UE8M0, E5M6), 1×128 / 128×1 / 128×128 tile quantization.
//! - [`moe`]: expert selection (group- and node-limited), the aux-loss-free bias update, the
//!   sequence-wise balance loss, redundant-expert placement (EPLB).
//! - [`numeric`]: BF16 rounding and ULP helpers shared by every module.
//! - [`norm`]: RMSNorm. [`rope`]: RoPE on interleaved pairs and YaRN.
//! - [`linear`]: Linear layers over stored (F32/BF16/FP8) weights, and [`linear::Precision`].
//! - [`mlp`]: SwiGLU. [`mla`]: Multi-head Latent Attention (naive and absorbed).
//! - [`moe`]: the router ([`moe::gate`]), the expert mixture, load balancing and expert placement.
//! - [`model`]: decoder blocks, the model, the latent caches.
//! - [`mtp`]: the multi-token-prediction modules (eqs. (21)–(23)) and their logits.
//! - [`rng`]: the seeded SplitMix64 generator (simulations, FIM).
//! - [`train`]: optimizer, schedules, MTP loss, GRPO, FIM/packing, pipeline schedules.

pub mod error;
pub mod fp8;
pub mod linear;
pub mod mla;
pub mod mlp;
pub mod model;
pub mod moe;
pub mod mtp;
pub mod norm;
pub mod numeric;
pub mod rng;
pub mod rope;
pub mod train;

pub use error::{Error, Result};
