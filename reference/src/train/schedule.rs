//! Pre-training schedules of V3 §4.2 as functions of the optimizer step and the tokens seen.
//!
//! Learning rate: "linearly increase it from 0 to 2.2×10⁻⁴ during the first 2K steps. Then, we
//! keep a constant learning rate of 2.2×10⁻⁴ until the model consumes 10T training tokens.
//! Subsequently, we gradually decay the learning rate to 2.2×10⁻⁵ in 4.3T tokens, following a
//! cosine decay curve. During the training of the final 500B tokens, we keep a constant learning
//! rate of 2.2×10⁻⁵ in the first 333B tokens, and switch to another constant learning rate of
//! 7.3×10⁻⁶ in the remaining 167B tokens."
//!
//! Batch size: "gradually increased from 3072 to 15360 in the training of the first 469B tokens,
//! and then keeps 15360". The ramp's shape is not stated. We take Megatron-LM's
//! `--rampup-batch-size START INCREMENT SAMPLES` rule (the common one for such ramps, and the
//! one V2's "2304 → 9216 over 225B" reads naturally as): the batch grows by a fixed increment
//! each time an equal share of the ramp has been consumed. Increment: 768 sequences, so
//! 16 equal steps of 469B/16 = 29.3125B tokens each (3072, 3840, …, 14592, then 15360).
//! Sequences are 4096 tokens long.

/// Peak learning rate.
pub const PEAK_LR: f64 = 2.2e-4;
/// Linear warm-up length in optimizer steps.
pub const WARMUP_STEPS: u64 = 2000;
/// Tokens at which the cosine decay starts.
pub const DECAY_START_TOKENS: f64 = 10e12;
/// Length of the cosine decay in tokens.
pub const DECAY_TOKENS: f64 = 4.3e12;
/// Learning rate at the end of the cosine and during the next 333B tokens.
pub const DECAYED_LR: f64 = 2.2e-5;
/// Tokens trained at [`DECAYED_LR`] after the cosine.
pub const DECAYED_PHASE_TOKENS: f64 = 333e9;
/// Learning rate of the last 167B tokens (and of the context-extension phases, V3 §4.3).
pub const FINAL_LR: f64 = 7.3e-6;
/// All pre-training tokens: 10T + 4.3T + 333B + 167B.
pub const TOTAL_TOKENS: f64 = 14.8e12;

/// Batch size (sequences) at the start of training.
pub const BATCH_START: u64 = 3072;
/// Batch size after the ramp.
pub const BATCH_END: u64 = 15360;
/// Tokens over which the batch size ramps up.
pub const BATCH_RAMP_TOKENS: f64 = 469e9;
/// Our choice (not in V3): the batch grows in steps of this many sequences.
pub const BATCH_INCREMENT: u64 = 768;
/// Tokens per sequence in pre-training.
pub const SEQ_LEN: u64 = 4096;

/// Learning rate of the step with 1-based index `step`, when `tokens` tokens have been consumed
/// before it: `min(1, step/2000) × lr(tokens)` where `lr(tokens)` is the token-indexed phase
/// (2.2e-4; cosine to 2.2e-5 over [10T, 14.3T); 2.2e-5 until 14.633T; 7.3e-6 after, also past
/// 14.8T). The warm-up ends after ≈25B tokens, long before the first token breakpoint.
pub fn learning_rate(step: u64, tokens: f64) -> f64 {
    // linear warm-up over the first 2K steps (step 1 → PEAK/2000, step 2000 → PEAK)
    let warmup = (step as f64 / WARMUP_STEPS as f64).min(1.0);
    let decay_end = DECAY_START_TOKENS + DECAY_TOKENS;
    let lr = if tokens < DECAY_START_TOKENS {
        PEAK_LR
    } else if tokens < decay_end {
        // cosine from PEAK (at 10T) to DECAYED (at 14.3T)
        let progress = (tokens - DECAY_START_TOKENS) / DECAY_TOKENS;
        DECAYED_LR + (PEAK_LR - DECAYED_LR) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    } else if tokens < decay_end + DECAYED_PHASE_TOKENS {
        DECAYED_LR
    } else {
        FINAL_LR
    };
    warmup * lr
}

/// Batch size in sequences when `tokens` tokens have been consumed: the staircase
/// `3072 + 768·⌊tokens / 29.3125B⌋`, capped at 15360 (reached at exactly 469B).
pub fn batch_size(tokens: f64) -> u64 {
    let increments = (BATCH_END - BATCH_START) / BATCH_INCREMENT;
    let tokens_per_increment = BATCH_RAMP_TOKENS / increments as f64;
    let done = (tokens.max(0.0) / tokens_per_increment).floor() as u64;
    BATCH_START + BATCH_INCREMENT * done.min(increments)
}

/// Tokens consumed after `steps` optimizer steps, each taking `batch_size(tokens so far)`
/// sequences of 4096 tokens.
pub fn tokens_after_steps(steps: u64) -> f64 {
    let mut tokens = 0.0;
    for _ in 0..steps {
        tokens += (batch_size(tokens) * SEQ_LEN) as f64;
    }
    tokens
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 4.0 * f64::EPSILON * b.abs()
    }

    #[test]
    fn lr_warmup_is_linear_over_2k_steps() {
        assert!(close(learning_rate(1, 0.0), 2.2e-4 / 2000.0));
        assert!(close(learning_rate(1000, 1e9), 1.1e-4));
        assert_eq!(learning_rate(2000, 2e10), PEAK_LR);
        assert_eq!(learning_rate(2001, 2e10), PEAK_LR);
        // warm-up ends after 2000·3072·4096 ≈ 25.2B tokens, inside the first batch stair
        assert_eq!(tokens_after_steps(2000), 2000.0 * 3072.0 * 4096.0);
        assert!(tokens_after_steps(2000) < 469e9 / 16.0);
    }

    #[test]
    fn lr_breakpoints_in_tokens() {
        let s = 1_000_000;
        assert_eq!(learning_rate(s, 10e12 - 1.0), PEAK_LR);
        assert_eq!(learning_rate(s, 10e12), PEAK_LR); // cos(0) = 1
                                                      // half-way through the cosine: the mean of the two levels
        assert!(close(learning_rate(s, 12.15e12), (2.2e-4 + 2.2e-5) / 2.0));
        // a quarter in: 2.2e-5 + 1.98e-4·(1 + cos(π/4))/2
        let q = 2.2e-5 + 1.98e-4 * (1.0 + std::f64::consts::FRAC_1_SQRT_2) / 2.0;
        assert!(close(learning_rate(s, 11.075e12), q));
        // the cosine ends at 2.2e-5 (continuous at 14.3T) and stays there for 333B tokens
        assert!((learning_rate(s, 14.3e12 - 1.0) - DECAYED_LR).abs() < 1e-18);
        assert_eq!(learning_rate(s, 14.3e12), DECAYED_LR);
        assert_eq!(learning_rate(s, 14.633e12 - 1e3), DECAYED_LR);
        assert_eq!(learning_rate(s, 14.633e12), FINAL_LR);
        assert_eq!(learning_rate(s, 14.8e12), FINAL_LR);
        // 10 + 4.3 + 0.333 + 0.167 = 14.8T
        assert!(
            (DECAY_START_TOKENS + DECAY_TOKENS + DECAYED_PHASE_TOKENS + 167e9 - TOTAL_TOKENS).abs()
                < 1.0
        );
    }

    #[test]
    fn lr_never_increases_after_warmup() {
        let mut prev = f64::INFINITY;
        for i in 0..=1480 {
            let lr = learning_rate(10_000, i as f64 * 1e10);
            assert!(lr <= prev, "at {}T", i as f64 / 100.0);
            prev = lr;
        }
    }

    #[test]
    fn batch_size_staircase() {
        let stair = 469e9 / 16.0; // 29.3125B
        assert_eq!(batch_size(0.0), 3072);
        assert_eq!(batch_size(stair - 1.0), 3072);
        assert_eq!(batch_size(stair), 3840);
        assert_eq!(batch_size(8.0 * stair), 9216);
        assert_eq!(batch_size(469e9 - 1e3), 14592);
        assert_eq!(batch_size(469e9), 15360);
        assert_eq!(batch_size(14.8e12), 15360);
        // 15360 sequences × 4096 tokens ≈ 62.9M tokens per step (paper.md §7)
        assert_eq!(BATCH_END * SEQ_LEN, 62_914_560);
    }
}
