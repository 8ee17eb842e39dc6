//! Rotary position embedding on interleaved pairs, with YaRN frequency scaling (V3 eqs. (3) and
//! (8), "RoPE(·)"; V3 §4.3 context extension; YaRN paper §3).
//!
//! Layout: the official one. The pair `(x[2i], x[2i+1])` is rotated by the angle `p·f'_i`
//! (OFF `apply_rotary_emb` views the last dim as complex numbers). The checkpoint's rope rows
//! (`q_b_proj` per head, the last `qk_rope_head_dim` rows of `kv_a_proj_with_mqa`) are in this
//! layout. transformers (`rope_interleave = true`) de-interleaves: its output is
//! `[even outputs…, odd outputs…]`, a permutation that leaves every `q·k` unchanged.

use ndarray::{Array3, ArrayView3};

use crate::error::{Error, Result};

/// YaRN parameters (HF `rope_scaling` with `type: yarn`; OFF `rope_factor`, `original_seq_len`,
/// `beta_fast`, `beta_slow`, `mscale`).
#[derive(Debug, Clone, PartialEq)]
pub struct Yarn {
    /// s: the context extension factor (40 in V3).
    pub factor: f64,
    /// L0: the pre-training context (4096 in V3).
    pub original_max_position_embeddings: usize,
    /// Rotations at which extrapolation ends (32).
    pub beta_fast: f64,
    /// Rotations at which interpolation starts (1).
    pub beta_slow: f64,
    /// The `mscale_all_dim` of the softmax-scale factor (OFF `mscale`; 1.0 in V3). 0 = no factor.
    pub mscale_all_dim: f64,
}

/// The rotary embedding of one model: `dim` rotated features per head, base θ, optional YaRN.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    /// `qk_rope_head_dim` (64 in V3); even.
    pub dim: usize,
    /// θ (`rope_theta`, 10000 in V3).
    pub theta: f64,
    /// `None` = plain RoPE (a config without `rope_scaling`).
    pub yarn: Option<Yarn>,
    /// `true` (DeepSeek's checkpoints, HF `rope_interleave`): pair i is `(x[2i], x[2i+1])`;
    /// `false`: pair i is `(x[i], x[i + d/2])` (weights permuted to the rotate-half layout).
    pub interleaved: bool,
}

/// YaRN's correction dimension for `r` rotations: `d · ln(L0 / (2π r)) / (2 ln θ)`.
/// OFF `find_correction_dim`.
pub fn correction_dim(rotations: f64, dim: usize, theta: f64, original_len: usize) -> f64 {
    dim as f64 * (original_len as f64 / (rotations * 2.0 * std::f64::consts::PI)).ln()
        / (2.0 * theta.ln())
}

/// `(low, high)` = `(max(⌊c(β_fast)⌋, 0), min(⌈c(β_slow)⌉, d − 1))`, pair indices between which
/// the ramp runs. OFF `find_correction_range`; V3: (10, 23).
pub fn correction_range(yarn: &Yarn, dim: usize, theta: f64) -> (f64, f64) {
    let low = correction_dim(
        yarn.beta_fast,
        dim,
        theta,
        yarn.original_max_position_embeddings,
    )
    .floor()
    .max(0.0);
    let high = correction_dim(
        yarn.beta_slow,
        dim,
        theta,
        yarn.original_max_position_embeddings,
    )
    .ceil()
    .min(dim as f64 - 1.0);
    (low, high)
}

impl RopeConfig {
    /// Check the parameters (names as in `config.json`).
    pub fn validate(&self) -> Result<()> {
        let bad = |field, value: String, why: &str| {
            Err(Error::Config {
                field,
                value,
                why: why.into(),
            })
        };
        if self.dim == 0 || self.dim % 2 != 0 {
            return bad(
                "qk_rope_head_dim",
                self.dim.to_string(),
                "must be even and > 0 (RoPE rotates pairs)",
            );
        }
        if !(self.theta > 1.0 && self.theta.is_finite()) {
            return bad("rope_theta", self.theta.to_string(), "must be > 1");
        }
        if let Some(y) = &self.yarn {
            if !(y.factor > 0.0 && y.factor.is_finite()) {
                return bad("rope_scaling.factor", y.factor.to_string(), "must be > 0");
            }
            if y.original_max_position_embeddings == 0 {
                return bad(
                    "rope_scaling.original_max_position_embeddings",
                    "0".into(),
                    "must be > 0",
                );
            }
            for (field, v) in [
                ("rope_scaling.beta_fast", y.beta_fast),
                ("rope_scaling.beta_slow", y.beta_slow),
            ] {
                if !(v > 0.0 && v.is_finite()) {
                    return bad(field, v.to_string(), "must be > 0");
                }
            }
            if !(y.mscale_all_dim >= 0.0 && y.mscale_all_dim.is_finite()) {
                return bad(
                    "rope_scaling.mscale_all_dim",
                    y.mscale_all_dim.to_string(),
                    "must be ≥ 0",
                );
            }
        }
        Ok(())
    }

    /// The inverse frequency of every pair, `f'_i` (f32, `dim/2` values). OFF
    /// `precompute_freqs_cis`, evaluated as OFF does in f32:
    /// 1. `f_i = 1 / θ^(2i/d)` (the power rounded to f32, then an f32 reciprocal);
    /// 2. YaRN: `ramp_i = clamp((i − low)/(high − low), 0, 1)`, `smooth = 1 − ramp`,
    ///    `f'_i = f_i/s · (1 − smooth) + f_i · smooth` (pairs below `low` keep `f_i`, pairs from
    ///    `high` on use `f_i/s`, a linear blend between).
    ///
    /// HF computes the interpolated branch as `1/(s·θ^(2i/d))`: ≤ 1 f32 ulp away.
    pub fn inv_freqs(&self) -> Result<Vec<f32>> {
        self.validate()?;
        let half = self.dim / 2;
        // step 1: base frequencies
        let base: Vec<f32> = (0..half)
            .map(|i| {
                let power = self.theta.powf((2 * i) as f64 / self.dim as f64) as f32;
                1.0f32 / power
            })
            .collect();
        let Some(yarn) = &self.yarn else {
            return Ok(base);
        };
        // step 2: linear ramp between the correction dims, blended frequencies (f32 as OFF)
        let (low, mut high) = correction_range(yarn, self.dim, self.theta);
        if low == high {
            high += 0.001; // OFF/HF: "prevent singularity"
        }
        let factor = yarn.factor as f32;
        Ok((0..half)
            .map(|i| {
                let ramp = ((i as f32 - low as f32) / (high - low) as f32).clamp(0.0, 1.0);
                let smooth = 1.0 - ramp;
                base[i] / factor * (1.0 - smooth) + base[i] * smooth
            })
            .collect())
    }

    /// The factor YaRN puts on the softmax scale: `m²` with `m = 0.1 · mscale_all_dim · ln s + 1`
    /// (1 when `s ≤ 1` or without YaRN). OFF `MLA.__init__`; HF `yarn_apply_mscale`.
    /// V3: m² = 1.8738542070926265.
    pub fn softmax_scale_factor(&self) -> f64 {
        match &self.yarn {
            Some(y) if y.factor > 1.0 => {
                let m = 0.1 * y.mscale_all_dim * y.factor.ln() + 1.0;
                m * m
            }
            _ => 1.0,
        }
    }
}

/// The rotation angle `φ = p · f'` as OFF and HF compute it: the position converted to f32 and
/// one f32 multiply (the exact product rounded once).
pub fn angle(position: usize, inv_freq: f32) -> f32 {
    (f64::from(position as f32) * f64::from(inv_freq)) as f32
}

/// RoPE on interleaved pairs: for row `s` (at `positions[s]`), every head `h` and pair `i`,
/// `y[2i] = x[2i]·cos φ − x[2i+1]·sin φ`, `y[2i+1] = x[2i]·sin φ + x[2i+1]·cos φ`, `φ = p·f'_i`.
/// With `interleaved = false` the pair is `(x[i], x[i + d/2])` (HF `rotate_half`).
///
/// OFF `apply_rotary_emb` (complex multiply by `freqs_cis[p, i]`). Shapes: `x: [S, H, d]`,
/// `positions: [S]`, `inv_freq: [d/2]` → `[S, H, d]`. cos, sin and the rotation in f64, one
/// rounding to f32 (OFF: complex64, then one rounding to bf16).
pub fn rope(
    x: ArrayView3<f32>,
    positions: &[usize],
    inv_freq: &[f32],
    interleaved: bool,
) -> Result<Array3<f32>> {
    let (s_len, heads, d) = x.dim();
    if d != 2 * inv_freq.len() {
        return Err(Error::Shape {
            op: "rope",
            tensor: "x",
            got: vec![s_len, heads, d],
            expected: format!("last dim 2·{} (one pair per frequency)", inv_freq.len()),
        });
    }
    if positions.len() != s_len {
        return Err(Error::Shape {
            op: "rope",
            tensor: "positions",
            got: vec![positions.len()],
            expected: format!("[{s_len}] (one position per row of x)"),
        });
    }
    let mut y = Array3::<f32>::zeros((s_len, heads, d));
    for s in 0..s_len {
        for (i, &f) in inv_freq.iter().enumerate() {
            let phi = f64::from(angle(positions[s], f));
            let (sin, cos) = phi.sin_cos();
            // the two features of pair i
            let (i0, i1) = if interleaved {
                (2 * i, 2 * i + 1)
            } else {
                (i, i + d / 2)
            };
            for h in 0..heads {
                let (a, b) = (f64::from(x[[s, h, i0]]), f64::from(x[[s, h, i1]]));
                y[[s, h, i0]] = (a * cos - b * sin) as f32;
                y[[s, h, i1]] = (a * sin + b * cos) as f32;
            }
        }
    }
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array3;

    fn v3() -> RopeConfig {
        RopeConfig {
            dim: 64,
            theta: 10000.0,
            yarn: Some(Yarn {
                factor: 40.0,
                original_max_position_embeddings: 4096,
                beta_fast: 32.0,
                beta_slow: 1.0,
                mscale_all_dim: 1.0,
            }),
            interleaved: true,
        }
    }

    #[test]
    fn yarn_correction_range_of_v3_is_10_to_23() {
        // official-code.md §4.1: c(32) = 10.4722 → 10, c(1) = 22.5134 → 23.
        let y = v3().yarn.unwrap();
        let c32 = correction_dim(32.0, 64, 10000.0, 4096);
        let c1 = correction_dim(1.0, 64, 10000.0, 4096);
        assert!((c32 - 10.4722).abs() < 1e-4 && (c1 - 22.5134).abs() < 1e-4);
        assert_eq!(correction_range(&y, 64, 10000.0), (10.0, 23.0));
    }

    #[test]
    fn yarn_keeps_fast_pairs_divides_slow_pairs_and_blends_between() {
        let cfg = v3();
        let plain = RopeConfig {
            yarn: None,
            ..cfg.clone()
        }
        .inv_freqs()
        .unwrap();
        let f = cfg.inv_freqs().unwrap();
        for i in 0..=10 {
            assert_eq!(f[i], plain[i], "pair {i} extrapolates");
        }
        for i in 23..32 {
            assert_eq!(f[i], plain[i] / 40.0, "pair {i} interpolates");
        }
        // pair 16: ramp = 6/13, f' = f/40·(6/13) + f·(7/13)
        let want = f64::from(plain[16]) * (6.0 / 13.0 / 40.0 + 7.0 / 13.0);
        assert!((f64::from(f[16]) / want - 1.0).abs() < 1e-6);
    }

    #[test]
    fn v3_softmax_scale_is_0_1352337788608801() {
        // official-code.md §4.2: 192^-1/2 · m², m = 0.1·ln 40 + 1.
        let s = 192f64.powf(-0.5) * v3().softmax_scale_factor();
        assert!((s - 0.1352337788608801).abs() < 1e-15, "{s}");
        let plain = RopeConfig { yarn: None, ..v3() };
        assert_eq!(plain.softmax_scale_factor(), 1.0);
    }

    #[test]
    fn rope_rotates_pairs_and_keeps_dot_products_relative() {
        // One frequency f = 1 at position 1: (1, 0) → (cos 1, sin 1).
        let mut x = Array3::<f32>::zeros((1, 1, 2));
        x[[0, 0, 0]] = 1.0;
        let y = rope(x.view(), &[1], &[1.0], true).unwrap();
        assert_eq!(y[[0, 0, 0]], 1f64.cos() as f32);
        assert_eq!(y[[0, 0, 1]], 1f64.sin() as f32);
        // q at p and k at p' rotated: q·k depends on p − p' only.
        let f = v3().inv_freqs().unwrap();
        let q = Array3::from_shape_fn((1, 1, 64), |(_, _, i)| (i as f32 * 0.37).sin());
        let k = Array3::from_shape_fn((1, 1, 64), |(_, _, i)| (i as f32 * 0.11).cos());
        let dot = |a: usize, b: usize| {
            let (qa, kb) = (
                rope(q.view(), &[a], &f, true).unwrap(),
                rope(k.view(), &[b], &f, true).unwrap(),
            );
            qa.iter()
                .zip(kb.iter())
                .map(|(x, y)| f64::from(*x) * f64::from(*y))
                .sum::<f64>()
        };
        assert!((dot(7, 3) - dot(14, 10)).abs() < 1e-5);
    }

    #[test]
    fn half_split_layout_is_the_interleaved_one_permuted() {
        // rotate-half on P·x equals P·(interleaved on x), P = even/odd de-interleave.
        let f = v3().inv_freqs().unwrap();
        let x = Array3::from_shape_fn((2, 2, 64), |(s, h, i)| {
            ((s * 131 + h * 17 + i) as f32).sin()
        });
        let perm = |a: &Array3<f32>| {
            Array3::from_shape_fn((2, 2, 64), |(s, h, i)| {
                if i < 32 {
                    a[[s, h, 2 * i]]
                } else {
                    a[[s, h, 2 * (i - 32) + 1]]
                }
            })
        };
        let inter = rope(x.view(), &[5, 4000], &f, true).unwrap();
        let half = rope(perm(&x).view(), &[5, 4000], &f, false).unwrap();
        assert_eq!(half, perm(&inter));
    }

    #[test]
    fn rope_rejects_odd_dim_and_bad_positions() {
        let bad = RopeConfig { dim: 7, ..v3() };
        assert!(bad
            .inv_freqs()
            .unwrap_err()
            .to_string()
            .contains("qk_rope_head_dim"));
        let x = Array3::<f32>::zeros((2, 1, 4));
        let e = rope(x.view(), &[0], &[1.0, 0.5], true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("positions"), "{e}");
    }
}
