//! Multi-head Latent Attention (V3 eqs. (1)–(11); OFF `MLA`), in both forms:
//!
//! - **naive**: expand the latent `c_kv` through `kv_b_proj` into per-head keys `k^C` and values
//!   `v^C` (eqs. (2), (5)), then ordinary multi-head attention with `d_qk = nope + rope`;
//! - **absorbed**: fold `W^{UK}` into the query and `W^{UV}` into the output (V2 App. C) and
//!   attend over the latent cache `[c_kv | k_pe]` (`kv_lora_rank + qk_rope_head_dim` values per
//!   token, shared by all heads).
//!
//! Both end in [`attention`], the softmax core (FlashMLA's contract for the absorbed form:
//! `q [s_q, h, 576]` against one shared key/value head `[T, 576]`, values = first 512).
//!
//! Shapes: `S` new tokens, `T` keys (cache length after appending), `H` heads, `D` model width,
//! `dn` = `qk_nope_head_dim`, `dr` = `qk_rope_head_dim`, `dv` = `v_head_dim`, `dc` = `kv_lora_rank`.

use ndarray::{s, Array2, Array3, ArrayView2, ArrayView3};

use crate::error::{Error, Result};
use crate::linear::{linear, Linear, Precision};
use crate::norm::{rms_norm, LATENT_NORM_EPS};
use crate::rope::rope;

/// The attention hyper-parameters of one model.
#[derive(Debug, Clone, PartialEq)]
pub struct MlaConfig {
    /// H (`num_attention_heads`).
    pub n_heads: usize,
    /// d'_c (`q_lora_rank`); `None` = one `q_proj` (DeepSeek-V2-Lite style).
    pub q_lora_rank: Option<usize>,
    /// d_c (`kv_lora_rank`, 512 in V3).
    pub kv_lora_rank: usize,
    /// d_h of the non-rotated part (`qk_nope_head_dim`, 128).
    pub qk_nope_head_dim: usize,
    /// d^R_h (`qk_rope_head_dim`, 64).
    pub qk_rope_head_dim: usize,
    /// d_h of the values (`v_head_dim`, 128).
    pub v_head_dim: usize,
    /// `(dn + dr)^(-1/2)` times the YaRN factor m² (V3: 0.1352337788608801).
    pub softmax_scale: f64,
    /// RoPE inverse frequencies `[dr/2]` ([`crate::rope::RopeConfig::inv_freqs`]).
    pub inv_freq: Vec<f32>,
    /// RoPE pair layout ([`crate::rope::RopeConfig::interleaved`]).
    pub rope_interleaved: bool,
}

impl MlaConfig {
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }
}

/// The query projection: `wq_b(q_norm(wq_a(x)))` (eqs. (6)–(8)) or one `wq(x)`.
#[derive(Debug, Clone)]
pub enum QProj<'a> {
    /// `q_a_proj` `[d'_c, D]`, `q_a_layernorm` `[d'_c]`, `q_b_proj` `[H·(dn+dr), d'_c]`.
    Lora {
        wq_a: Linear<'a>,
        q_norm: Vec<f32>,
        wq_b: Linear<'a>,
    },
    /// `q_proj` `[H·(dn+dr), D]` (`q_lora_rank: null`).
    Direct { wq: Linear<'a> },
}

/// The weights of one MLA layer (HF names in brackets).
#[derive(Debug, Clone)]
pub struct Mla<'a> {
    pub q: QProj<'a>,
    /// `[dc + dr, D]` (`kv_a_proj_with_mqa`): rows `0..dc` give `c_kv` (eq. (1)), the last `dr`
    /// rows give the shared rope key (eq. (3), interleaved layout).
    pub wkv_a: Linear<'a>,
    /// `[dc]` (`kv_a_layernorm`).
    pub kv_norm: Vec<f32>,
    /// `[H·(dn+dv), dc]` (`kv_b_proj`): row `h·(dn+dv) + j` is head h's key-nope dim j (`W^{UK}`)
    /// for j < dn, its value dim j − dn (`W^{UV}`) otherwise.
    pub wkv_b: Linear<'a>,
    /// `[D, H·dv]` (`o_proj`, eq. (11)).
    pub wo: Linear<'a>,
}

/// The absorbed form's per-layer cache: the normalized latent `c_kv` `[T, dc]` and the rotated
/// shared key `k_pe` `[T, dr]` (the "blue-boxed" vectors of V3 Fig. 2).
#[derive(Debug, Clone, Default)]
pub struct LatentCache {
    pub c_kv: Vec<Vec<f32>>,
    pub k_pe: Vec<Vec<f32>>,
}

impl LatentCache {
    /// Tokens cached so far (= the position of the next token).
    pub fn len(&self) -> usize {
        self.c_kv.len()
    }

    pub fn is_empty(&self) -> bool {
        self.c_kv.is_empty()
    }
}

/// Softmax attention output `[S, H, Dv]` and its log-sum-exp `[H, S]` (natural log).
#[derive(Debug, Clone, PartialEq)]
pub struct Attention {
    pub out: Array3<f32>,
    pub lse: Array2<f32>,
}

/// How many of `t_len` keys query `si` of `s_len` sees: all, or with `causal` the keys
/// `t ≤ t_len − s_len + si` (the queries are the last `s_len` positions).
pub fn visible_keys(t_len: usize, s_len: usize, si: usize, causal: bool) -> usize {
    if causal {
        (t_len + si + 1).saturating_sub(s_len).min(t_len)
    } else {
        t_len
    }
}

/// `o[s,h] = Σ_t softmax_t(scale · q[s,h]·k[t]) · v[t]`, `lse[h,s] = ln Σ_t exp(scale · q[s,h]·k[t])`.
///
/// V3 eq. (10); FlashMLA `flash_mla_with_kvcache` (absorbed form, one key head) and the dense MHA
/// prefill (naive form). Shapes: `q: [S, H, Dqk]`, `k: [T, Hk, Dqk]`, `v: [T, Hk, Dv]` with
/// `Hk = H` (one key head per query head) or `Hk = 1` (shared by all heads) → [`Attention`].
/// Causal: query s sees keys `t ≤ T − S + s` (the S queries are the last S positions). A query
/// that sees no key gets `o = 0`, `lse = +∞` (FlashMLA's convention). Sums in f64.
pub fn attention(
    q: ArrayView3<f32>,
    k: ArrayView3<f32>,
    v: ArrayView3<f32>,
    softmax_scale: f64,
    causal: bool,
) -> Result<Attention> {
    const OP: &str = "attention";
    let (s_len, heads, d_qk) = q.dim();
    let (t_len, hk, dk) = k.dim();
    let (tv, hv, d_v) = v.dim();
    if dk != d_qk || (hk != heads && hk != 1) {
        return Err(Error::Shape {
            op: OP,
            tensor: "k",
            got: k.shape().to_vec(),
            expected: format!("[T, {heads} or 1, {d_qk}] (q is {:?})", q.shape()),
        });
    }
    if tv != t_len || hv != hk {
        return Err(Error::Shape {
            op: OP,
            tensor: "v",
            got: v.shape().to_vec(),
            expected: format!("[{t_len}, {hk}, Dv] (k is {:?})", k.shape()),
        });
    }
    let mut out = Array3::<f32>::zeros((s_len, heads, d_v));
    let mut lse = Array2::<f32>::zeros((heads, s_len));
    let mut scores = vec![0f64; t_len];
    for si in 0..s_len {
        let visible = visible_keys(t_len, s_len, si, causal);
        for h in 0..heads {
            let kh = if hk == 1 { 0 } else { h };
            if visible == 0 {
                lse[[h, si]] = f32::INFINITY;
                continue;
            }
            // pass 1: scaled scores and their max
            let mut max = f64::NEG_INFINITY;
            for (t, score) in scores.iter_mut().enumerate().take(visible) {
                let mut dot = 0f64;
                for d in 0..d_qk {
                    dot += f64::from(q[[si, h, d]]) * f64::from(k[[t, kh, d]]);
                }
                *score = dot * softmax_scale;
                max = max.max(*score);
            }
            // pass 2: exponentials and their sum
            let mut sum = 0f64;
            for score in scores.iter_mut().take(visible) {
                *score = (*score - max).exp();
                sum += *score;
            }
            // pass 3: weighted sum of the values
            for d in 0..d_v {
                let mut acc = 0f64;
                for (t, p) in scores.iter().enumerate().take(visible) {
                    acc += p * f64::from(v[[t, kh, d]]);
                }
                out[[si, h, d]] = (acc / sum) as f32;
            }
            lse[[h, si]] = (max + sum.ln()) as f32;
        }
    }
    Ok(Attention { out, lse })
}

/// The gradients of [`attention`] (f64, unrounded): `dq [S, H, Dqk]`, `dk [T, H, Dqk]`,
/// `dv [T, H, Dv]`.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionGrad {
    pub dq: Array3<f64>,
    pub dk: Array3<f64>,
    pub dv: Array3<f64>,
}

/// The backward of [`attention`] with one key head per query head (the naive MLA form's
/// `[k^C; k^R]`), given `dout = ∂L/∂out`. Per head and query `s`, with `P_t` the softmax of
/// `scale · q_s·k_t` over the visible keys:
///
/// - `dv_t = Σ_s P_{s,t} · dout_s`;
/// - `dP_{s,t} = dout_s · v_t`, and `delta_s = Σ_t P_{s,t} dP_{s,t} = rowsum(dout_s ⊙ out_s)`
///   (FlashAttention's convention: kernels read `delta` from the forward's `out`);
/// - `dS_{s,t} = P_{s,t} · (dP_{s,t} − delta_s)`;
/// - `dq_s = scale · Σ_t dS_{s,t} k_t`, `dk_t = scale · Σ_s dS_{s,t} q_s`.
///
/// Causal as the forward (query s sees keys `t ≤ T − S + s`); a query without keys has no
/// gradient. P and delta are recomputed here in f64 from q, k, v (not read from a forward's
/// rounded `out`/`lse`). Shapes: `q: [S, H, Dqk]`, `k: [T, H, Dqk]`, `v: [T, H, Dv]`,
/// `dout: [S, H, Dv]` → [`AttentionGrad`].
pub fn attention_backward(
    q: ArrayView3<f32>,
    k: ArrayView3<f32>,
    v: ArrayView3<f32>,
    dout: ArrayView3<f32>,
    softmax_scale: f64,
    causal: bool,
) -> Result<AttentionGrad> {
    const OP: &str = "attention_backward";
    let (s_len, heads, d_qk) = q.dim();
    let (t_len, d_v) = (k.dim().0, v.dim().2);
    let shape_err = |tensor: &'static str, got: &[usize], expected: String| Error::Shape {
        op: OP,
        tensor,
        got: got.to_vec(),
        expected,
    };
    if k.dim() != (t_len, heads, d_qk) {
        return Err(shape_err("k", k.shape(), format!("[T, {heads}, {d_qk}]")));
    }
    if v.dim() != (t_len, heads, d_v) {
        return Err(shape_err("v", v.shape(), format!("[{t_len}, {heads}, Dv]")));
    }
    if dout.dim() != (s_len, heads, d_v) {
        return Err(shape_err(
            "dout",
            dout.shape(),
            format!("[{s_len}, {heads}, {d_v}]"),
        ));
    }
    let mut dq = Array3::<f64>::zeros((s_len, heads, d_qk));
    let mut dk = Array3::<f64>::zeros((t_len, heads, d_qk));
    let mut dv = Array3::<f64>::zeros((t_len, heads, d_v));
    let mut p = vec![0f64; t_len];
    for h in 0..heads {
        for si in 0..s_len {
            let visible = visible_keys(t_len, s_len, si, causal);
            if visible == 0 {
                continue;
            }
            // the softmax row, as in the forward
            let mut max = f64::NEG_INFINITY;
            for (t, pt) in p.iter_mut().enumerate().take(visible) {
                let dot: f64 = (0..d_qk)
                    .map(|d| f64::from(q[[si, h, d]]) * f64::from(k[[t, h, d]]))
                    .sum();
                *pt = dot * softmax_scale;
                max = max.max(*pt);
            }
            let mut sum = 0f64;
            for pt in p.iter_mut().take(visible) {
                *pt = (*pt - max).exp();
                sum += *pt;
            }
            p.iter_mut().take(visible).for_each(|pt| *pt /= sum);
            // dP_t = dout·v_t; delta = Σ_t P_t dP_t (= dout·out)
            let dp: Vec<f64> = (0..visible)
                .map(|t| {
                    (0..d_v)
                        .map(|d| f64::from(dout[[si, h, d]]) * f64::from(v[[t, h, d]]))
                        .sum()
                })
                .collect();
            let delta: f64 = (0..visible).map(|t| p[t] * dp[t]).sum();
            for t in 0..visible {
                let ds = p[t] * (dp[t] - delta);
                for d in 0..d_v {
                    dv[[t, h, d]] += p[t] * f64::from(dout[[si, h, d]]);
                }
                for d in 0..d_qk {
                    dq[[si, h, d]] += softmax_scale * ds * f64::from(k[[t, h, d]]);
                    dk[[t, h, d]] += softmax_scale * ds * f64::from(q[[si, h, d]]);
                }
            }
        }
    }
    Ok(AttentionGrad { dq, dk, dv })
}

/// What both forms compute before attending (eqs. (1), (3), (6)–(9)).
struct Projected {
    /// `q^C` `[S, H, dn]`.
    q_nope: Array3<f32>,
    /// `q^R` after RoPE `[S, H, dr]`.
    q_pe: Array3<f32>,
    /// `kv_norm(c^{KV})` `[S, dc]`.
    c_kv: Array2<f32>,
    /// `k^R` after RoPE `[S, dr]`.
    k_pe: Array2<f32>,
}

impl Mla<'_> {
    fn project(
        &self,
        x: ArrayView2<f32>,
        positions: &[usize],
        cfg: &MlaConfig,
        precision: Precision,
    ) -> Result<Projected> {
        let (s_len, h) = (x.nrows(), cfg.n_heads);
        let (dn, dr, dc) = (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank);
        // eqs. (6)-(8): queries, [S, H·(dn+dr)] viewed [S, H, dn+dr]
        let q = match &self.q {
            QProj::Lora { wq_a, q_norm, wq_b } => {
                let c_q = linear(x, wq_a, precision)?;
                let c_q = rms_norm(c_q.view(), q_norm, LATENT_NORM_EPS)?;
                linear(c_q.view(), wq_b, precision)?
            }
            QProj::Direct { wq } => linear(x, wq, precision)?,
        };
        let q = q
            .into_shape_with_order((s_len, h, dn + dr))
            .map_err(|_| shape_error("q_proj", s_len, h * (dn + dr)))?;
        let q_nope = q.slice(s![.., .., ..dn]).to_owned();
        let q_pe = rope(
            q.slice(s![.., .., dn..]),
            positions,
            &cfg.inv_freq,
            cfg.rope_interleaved,
        )?;
        // eqs. (1), (3): latent and shared rope key, [S, dc + dr]
        let kv = linear(x, &self.wkv_a, precision)?;
        if kv.ncols() != dc + dr {
            return Err(shape_error("kv_a_proj_with_mqa", s_len, dc + dr));
        }
        let c_kv = rms_norm(kv.slice(s![.., ..dc]), &self.kv_norm, LATENT_NORM_EPS)?;
        let k_pe = kv
            .slice(s![.., dc..])
            .to_owned()
            .insert_axis(ndarray::Axis(1));
        let k_pe = rope(k_pe.view(), positions, &cfg.inv_freq, cfg.rope_interleaved)?
            .remove_axis(ndarray::Axis(1));
        Ok(Projected {
            q_nope,
            q_pe,
            c_kv,
            k_pe,
        })
    }

    /// The naive form for a whole sequence at positions `0..S` (causal): `kv_b_proj` expands
    /// `c_kv` into per-head `k^C` (`[S, H, dn]`) and `v^C` (`[S, H, dv]`); keys are
    /// `[k^C | k^R]`, queries `[q^C | q^R]` (eqs. (4), (9)); attention (eq. (10)); `o_proj`
    /// (eq. (11)). OFF `attn_impl = "naive"`, HF `DeepseekV3Attention` (eager).
    /// Shapes: `x: [S, D]` → `[S, D]`. Deviation: with [`Precision::Fp8`] `kv_b_proj` runs at
    /// bf16, as in the absorbed form (OFF's naive form sends it through the FP8 GEMM).
    pub fn forward_naive(
        &self,
        x: ArrayView2<f32>,
        cfg: &MlaConfig,
        precision: Precision,
    ) -> Result<Array2<f32>> {
        let (s_len, h) = (x.nrows(), cfg.n_heads);
        let (dn, dr, dv) = (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim);
        let positions: Vec<usize> = (0..s_len).collect();
        let p = self.project(x, &positions, cfg, precision)?;
        // eqs. (2), (5): per-head keys and values from the latent; `kv_b_proj` stays out of
        // FP8 as in the absorbed form, which folds it into the attention (OFF dequantizes it)
        let kvb = linear(p.c_kv.view(), &self.wkv_b, precision.outside_fp8())?;
        let kvb = kvb
            .into_shape_with_order((s_len, h, dn + dv))
            .map_err(|_| shape_error("kv_b_proj", s_len, h * (dn + dv)))?;
        let mut q = Array3::<f32>::zeros((s_len, h, dn + dr));
        let mut k = Array3::<f32>::zeros((s_len, h, dn + dr));
        q.slice_mut(s![.., .., ..dn]).assign(&p.q_nope);
        q.slice_mut(s![.., .., dn..]).assign(&p.q_pe);
        k.slice_mut(s![.., .., ..dn])
            .assign(&kvb.slice(s![.., .., ..dn]));
        for hi in 0..h {
            k.slice_mut(s![.., hi, dn..]).assign(&p.k_pe);
        }
        let v = kvb.slice(s![.., .., dn..]);
        // eq. (10)
        let a = attention(q.view(), k.view(), v, cfg.softmax_scale, true)?;
        // eq. (11)
        let o = a
            .out
            .into_shape_with_order((s_len, h * dv))
            .expect("contiguous [S, H, dv]");
        linear(o.view(), &self.wo, precision)
    }

    /// The absorbed form for `S` new tokens at positions `cache.len()..`: appends their
    /// `c_kv` and `k_pe` to `cache`, then
    /// `q_abs[s,h,c] = Σ_d q^C[s,h,d] · W^{UK}[h,d,c]`, attention of `[q_abs | q^R]` over the
    /// cache `[c_kv | k_pe]` with the values `c_kv`, `o[s,h,d] = Σ_c o_lat[s,h,c] · W^{UV}[h,d,c]`,
    /// `o_proj`. OFF `attn_impl = "absorb"` (the default). Shapes: `x: [S, D]` → `[S, D]`.
    pub fn forward_absorbed(
        &self,
        x: ArrayView2<f32>,
        cache: &mut LatentCache,
        cfg: &MlaConfig,
        precision: Precision,
    ) -> Result<Array2<f32>> {
        let (s_len, h) = (x.nrows(), cfg.n_heads);
        let (dn, dr, dv, dc) = (
            cfg.qk_nope_head_dim,
            cfg.qk_rope_head_dim,
            cfg.v_head_dim,
            cfg.kv_lora_rank,
        );
        let start = cache.len();
        let positions: Vec<usize> = (start..start + s_len).collect();
        let p = self.project(x, &positions, cfg, precision)?;
        // the cache is written before attending: the new tokens see themselves
        for si in 0..s_len {
            cache.c_kv.push(p.c_kv.row(si).to_vec());
            cache.k_pe.push(p.k_pe.row(si).to_vec());
        }
        // W = [W^{UK}; W^{UV}] per head, [H·(dn+dv), dc] (OFF dequantizes wkv_b for this)
        let w = self
            .wkv_b
            .weight
            .to_f32(precision.outside_fp8() != Precision::F32)?;
        if w.dim() != (h * (dn + dv), dc) {
            return Err(shape_error("kv_b_proj", h * (dn + dv), dc));
        }
        // absorb W^{UK}: q = [q_abs | q^R], [S, H, dc + dr]
        let mut q = Array3::<f32>::zeros((s_len, h, dc + dr));
        for si in 0..s_len {
            for hi in 0..h {
                for c in 0..dc {
                    let mut acc = 0f64;
                    for d in 0..dn {
                        acc += f64::from(p.q_nope[[si, hi, d]])
                            * f64::from(w[[hi * (dn + dv) + d, c]]);
                    }
                    q[[si, hi, c]] = acc as f32;
                }
                for r in 0..dr {
                    q[[si, hi, dc + r]] = p.q_pe[[si, hi, r]];
                }
            }
        }
        // the latent cache as one shared key head [T, 1, dc + dr]; values are its first dc
        let t_len = cache.len();
        let mut kv = Array3::<f32>::zeros((t_len, 1, dc + dr));
        for t in 0..t_len {
            for c in 0..dc {
                kv[[t, 0, c]] = cache.c_kv[t][c];
            }
            for r in 0..dr {
                kv[[t, 0, dc + r]] = cache.k_pe[t][r];
            }
        }
        let a = attention(
            q.view(),
            kv.view(),
            kv.slice(s![.., .., ..dc]),
            cfg.softmax_scale,
            true,
        )?;
        // absorb W^{UV}: o[s, h, d] = Σ_c o_lat[s, h, c] · W^{UV}[h, d, c]
        let mut o = Array2::<f32>::zeros((s_len, h * dv));
        for si in 0..s_len {
            for hi in 0..h {
                for d in 0..dv {
                    let mut acc = 0f64;
                    for c in 0..dc {
                        acc += f64::from(a.out[[si, hi, c]])
                            * f64::from(w[[hi * (dn + dv) + dn + d, c]]);
                    }
                    o[[si, hi * dv + d]] = acc as f32;
                }
            }
        }
        linear(o.view(), &self.wo, precision)
    }
}

fn shape_error(tensor: &'static str, rows: usize, cols: usize) -> Error {
    Error::Shape {
        op: "mla",
        tensor,
        got: vec![],
        expected: format!("a projection to [{rows}, {cols}]: the weight does not match the config"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linear::Weight;
    use crate::rope::{RopeConfig, Yarn};
    use ndarray::{Array, Array1};

    /// SplitMix64 → uniform(−a, a), for small deterministic weights.
    fn filled(shape: (usize, usize), seed: u64, a: f32) -> Array2<f32> {
        let mut z = seed;
        Array::from_shape_fn(shape, |_| {
            z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            x ^= x >> 31;
            ((x >> 11) as f64 * 2f64.powi(-53) * 2.0 - 1.0) as f32 * a
        })
    }

    fn lin(name: &str, shape: (usize, usize), seed: u64) -> Linear<'static> {
        let a = (1.0 / shape.1 as f32).sqrt() * 1.7;
        Linear::new(Weight::from_values(name, filled(shape, seed, a)))
    }

    fn tiny(q_lora: bool) -> (Mla<'static>, MlaConfig) {
        let (d, h, dn, dr, dv, dc, dq) = (24, 3, 8, 4, 6, 10, 12);
        let rope = RopeConfig {
            dim: dr,
            theta: 10000.0,
            yarn: Some(Yarn {
                factor: 40.0,
                original_max_position_embeddings: 16,
                beta_fast: 32.0,
                beta_slow: 1.0,
                mscale_all_dim: 1.0,
            }),
            interleaved: true,
        };
        let cfg = MlaConfig {
            n_heads: h,
            q_lora_rank: q_lora.then_some(dq),
            kv_lora_rank: dc,
            qk_nope_head_dim: dn,
            qk_rope_head_dim: dr,
            v_head_dim: dv,
            softmax_scale: ((dn + dr) as f64).powf(-0.5) * rope.softmax_scale_factor(),
            inv_freq: rope.inv_freqs().unwrap(),
            rope_interleaved: true,
        };
        let q = if q_lora {
            QProj::Lora {
                wq_a: lin("wq_a", (dq, d), 1),
                q_norm: Array1::linspace(0.5, 1.5, dq).to_vec(),
                wq_b: lin("wq_b", (h * (dn + dr), dq), 2),
            }
        } else {
            QProj::Direct {
                wq: lin("wq", (h * (dn + dr), d), 3),
            }
        };
        let mla = Mla {
            q,
            wkv_a: lin("wkv_a", (dc + dr, d), 4),
            kv_norm: Array1::linspace(0.8, 1.2, dc).to_vec(),
            wkv_b: lin("wkv_b", (h * (dn + dv), dc), 5),
            wo: lin("wo", (d, h * dv), 6),
        };
        (mla, cfg)
    }

    fn max_rel(a: &Array2<f32>, b: &Array2<f32>) -> f64 {
        let scale = b.iter().fold(0f64, |m, v| m.max(f64::from(v.abs())));
        a.iter()
            .zip(b.iter())
            .fold(0f64, |m, (x, y)| m.max(f64::from((x - y).abs())))
            / scale
    }

    #[test]
    fn mla_absorbed_equals_naive() {
        // Both forms compute the same function; they differ only in f32 roundings of the
        // intermediate products (a few 1e-7 relative here).
        for q_lora in [true, false] {
            let (mla, cfg) = tiny(q_lora);
            let x = filled((7, 24), 11, 1.0);
            let naive = mla.forward_naive(x.view(), &cfg, Precision::F32).unwrap();
            // all at once
            let mut cache = LatentCache::default();
            let prefill = mla
                .forward_absorbed(x.view(), &mut cache, &cfg, Precision::F32)
                .unwrap();
            assert_eq!(cache.len(), 7);
            assert!(max_rel(&prefill, &naive) < 1e-5, "q_lora {q_lora}");
            // one token at a time through the latent cache
            let mut cache = LatentCache::default();
            let mut rows = Vec::new();
            for t in 0..7 {
                let y = mla
                    .forward_absorbed(x.slice(s![t..t + 1, ..]), &mut cache, &cfg, Precision::F32)
                    .unwrap();
                rows.extend(y.iter().copied());
            }
            let decode = Array2::from_shape_vec((7, 24), rows).unwrap();
            assert!(max_rel(&decode, &naive) < 1e-5, "q_lora {q_lora}");
        }
    }

    #[test]
    fn attention_is_causal_and_lonely_queries_get_zero_and_inf() {
        // 2 queries, 3 keys, causal: query 0 sees keys 0..2, query 1 sees all 3.
        let q = Array3::from_shape_fn((2, 1, 1), |_| 1.0f32);
        let k = Array3::from_shape_fn((3, 1, 1), |_| 0.0f32);
        let v = Array3::from_shape_fn((3, 1, 1), |(t, _, _)| t as f32);
        let a = attention(q.view(), k.view(), v.view(), 1.0, true).unwrap();
        assert_eq!(a.out[[0, 0, 0]], 0.5); // mean of 0, 1
        assert_eq!(a.out[[1, 0, 0]], 1.0); // mean of 0, 1, 2
        assert_eq!(a.lse[[0, 0]], 2f64.ln() as f32);
        assert_eq!(a.lse[[0, 1]], 3f64.ln() as f32);
        // 3 queries, 1 key: query 0 and 1 see nothing
        let q3 = Array3::from_shape_fn((3, 1, 1), |_| 1.0f32);
        let a = attention(
            q3.view(),
            k.slice(s![..1, .., ..]),
            v.slice(s![..1, .., ..]),
            1.0,
            true,
        )
        .unwrap();
        assert_eq!(a.lse[[0, 0]], f32::INFINITY);
        assert_eq!(a.out[[1, 0, 0]], 0.0);
        assert_eq!(a.lse[[0, 2]], 0.0);
    }

    #[test]
    fn attention_rejects_mismatched_heads() {
        let q = Array3::<f32>::zeros((1, 2, 4));
        let k = Array3::<f32>::zeros((3, 3, 4));
        let e = attention(q.view(), k.view(), k.view(), 1.0, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("k has shape"), "{e}");
    }

    /// Central differences of `L = Σ dout ⊙ attention(q, k, v)` in f64, causal with S < T and
    /// with a query that sees no key (S > T).
    #[test]
    fn attention_backward_is_the_gradient_by_central_differences() {
        let val = |i: usize, s: f64| ((i as f64 * 0.61 + s).sin() * 1.5) as f32;
        for (s_len, t_len, causal) in [(2usize, 4usize, true), (3, 2, true), (2, 3, false)] {
            let (h, dqk, dv, scale) = (2usize, 3usize, 2usize, 0.7);
            let q =
                Array3::from_shape_fn((s_len, h, dqk), |(a, b, c)| val(a * 31 + b * 7 + c, 0.2));
            let k =
                Array3::from_shape_fn((t_len, h, dqk), |(a, b, c)| val(a * 29 + b * 5 + c, 1.3));
            let v = Array3::from_shape_fn((t_len, h, dv), |(a, b, c)| val(a * 23 + b * 3 + c, 2.9));
            let dout =
                Array3::from_shape_fn((s_len, h, dv), |(a, b, c)| val(a * 19 + b * 11 + c, 4.1));
            let g = attention_backward(q.view(), k.view(), v.view(), dout.view(), scale, causal)
                .unwrap();
            // the loss through the f64 forward: attention on f32 inputs rounds, so redo it in f64
            let loss = |q: &Array3<f64>, k: &Array3<f64>, v: &Array3<f64>| {
                let mut l = 0.0;
                for hh in 0..h {
                    for si in 0..s_len {
                        let vis = visible_keys(t_len, s_len, si, causal);
                        let z: Vec<f64> = (0..vis)
                            .map(|t| {
                                scale
                                    * (0..dqk)
                                        .map(|d| q[[si, hh, d]] * k[[t, hh, d]])
                                        .sum::<f64>()
                            })
                            .collect();
                        let sum: f64 = z.iter().map(|x| x.exp()).sum();
                        for d in 0..dv {
                            let o: f64 = (0..vis).map(|t| z[t].exp() / sum * v[[t, hh, d]]).sum();
                            l += f64::from(dout[[si, hh, d]]) * o;
                        }
                    }
                }
                l
            };
            let (q64, k64, v64) = (q.mapv(f64::from), k.mapv(f64::from), v.mapv(f64::from));
            let h_ = 1e-6;
            let fd = |which: usize, idx: (usize, usize, usize)| {
                let mut ts = [q64.clone(), k64.clone(), v64.clone()];
                ts[which][idx] += h_;
                let lp = loss(&ts[0], &ts[1], &ts[2]);
                ts[which][idx] -= 2.0 * h_;
                let lm = loss(&ts[0], &ts[1], &ts[2]);
                (lp - lm) / (2.0 * h_)
            };
            for (which, grad) in [(0, &g.dq), (1, &g.dk), (2, &g.dv)] {
                for (idx, &want) in grad.indexed_iter() {
                    let got = fd(which, idx);
                    assert!(
                        (got - want).abs() < 1e-7,
                        "S {s_len} T {t_len} tensor {which} {idx:?}: {got} vs {want}"
                    );
                }
            }
        }
    }
}
