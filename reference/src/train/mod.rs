//! Training-side equations of DeepSeek-V3 (§3.2, §4.1–4.2, §5.2).
//!
//! - [`adamw`]: AdamW with FP32 master weights and BF16 moments (§3.3.3, §4.2); [`ema`]: the
//!   parameter EMA (§3.2.3); [`clip`]: gradient clipping at global norm 1.0.
//! - [`schedule`]: learning-rate and batch-size schedules as functions of steps and tokens.
//! - [`mtp_loss`]: the MTP loss of eqs. (24)–(25) and its weight λ (the modules: [`crate::mtp`]).
//! - [`grpo`]: the GRPO objective, eqs. (26)–(28), per token.
//! - [`fim`]: Fill-in-Middle (PSM) and document packing (§4.1).
//! - [`dualpipe`]: 1F1B, ZB1P and DualPipe schedules, simulated against Table 2 (§3.2.1).

pub mod adamw;
pub mod clip;
pub mod dualpipe;
pub mod ema;
pub mod fim;
pub mod grpo;
pub mod mtp_loss;
pub mod schedule;
