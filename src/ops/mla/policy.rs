//! The tolerance of `mla` and `mla_decode` (both ops, per query row `(b, s, h)` with `T` visible keys; SPEC.md "Attention
//! tolerance" derives it). The candidate computes in f32, in any order: scores by any-order dot
//! products, exponentials of the scores minus a running or final maximum (`expf` ≤ 2 ulp),
//! rescaled up to `R = T − 1` times (online softmax), numerator and denominator summed in any
//! order, one division; `u = 2^-24`, `γ_n = n·u/(1 − n·u)`.
//! - scores: `δσ = scale·γ_{D+2}·max_t Σ_d |q_d k_td|` (the dot, f32(scale), the product);
//! - weights: key t's log-error is `≤ δσ + 2u(m − σ_t) + 4u(1 + R)`; under the softmax weights
//!   `w_t`, `Σ_t w_t (m − σ_t) ≤ ln T` (the computed scores add `2δσ` per key), so
//!   `L̄ = (1 + 4u)·δσ + (2 ln T + 4(1 + R))·u` bounds the mean log-error and
//!   `Λ = 3δσ + 4(1 + R)·u` the largest; `Σ_t |ŵ_t − w_t| ≤ 2·L̄·e^{2Λ}`;
//! - `|Δout| ≤ V·(2·L̄·e^{2Λ} + 2·γ_{T+R}/(1 − γ_{T+R}) + 3u)` with `V = max |v_t|` over the
//!   visible keys (numerator and denominator sums, division, the reference's rounding);
//! - `|Δlse| ≤ L̄·e^{2Λ} + γ_{T+R}/(1 − γ_{T+R}) + 2u(ln T + 1) + 2u·|lse|` (logf ≤ 1 ulp, the
//!   final addition, the reference's rounding).
//!
//! With BF16 inputs the output is BF16: add `2^-8·V` (FlashMLA rounds the probabilities to bf16
//! for the P·V product) and one bf16 ulp of the output.

use ndarray::ArrayView3;

use dsv3_reference::mla::visible_keys;

use super::{AttentionConfig, Batch};
use crate::ops::get;
use crate::registry::compare::Policy;
use crate::registry::tensor::DType;
use crate::registry::tolerance::{gamma, half_bf16_ulp, U32};
use crate::registry::PolicyCtx;

/// Per query row `(b, s, h)`: the output and lse bounds of the module doc (the lse bound
/// without its `2u·|lse|` term, which the judge adds).
fn row_bounds(
    q: ArrayView3<f32>,
    k: ArrayView3<f32>,
    v: ArrayView3<f32>,
    scale: f64,
    causal: bool,
    bf16: bool,
) -> Vec<(f64, f64)> {
    let (s_len, h, d) = q.dim();
    let t_len = k.dim().0;
    let mut rows = Vec::with_capacity(s_len * h);
    for si in 0..s_len {
        let visible = visible_keys(t_len, s_len, si, causal);
        for hi in 0..h {
            let kh = if k.dim().1 == 1 { 0 } else { hi };
            let mut qk_abs = 0f64;
            let mut vmax = 0f64;
            for t in 0..visible {
                let a: f64 = (0..d)
                    .map(|c| (f64::from(q[[si, hi, c]]) * f64::from(k[[t, kh, c]])).abs())
                    .sum();
                qk_abs = qk_abs.max(a);
                for c in 0..v.dim().2 {
                    vmax = vmax.max(f64::from(v[[t, kh, c]].abs()));
                }
            }
            rows.push(attention_bounds(
                visible,
                scale * gamma(d as f64 + 2.0) * qk_abs,
                vmax,
                bf16,
            ));
        }
    }
    rows
}

/// `(out, lse)` tolerances of one row with `visible` keys, score error `dsig` and value bound
/// `vmax` (module doc).
pub(super) fn attention_bounds(visible: usize, dsig: f64, vmax: f64, bf16: bool) -> (f64, f64) {
    if visible == 0 {
        // no keys: out 0 and lse +inf exactly
        return (0.0, 0.0);
    }
    let t = visible as f64;
    let rescales = t - 1.0;
    // mean and largest log-error of the softmax weights
    let mean_log = dsig * (1.0 + 4.0 * U32) + (2.0 * t.ln() + 4.0 * (1.0 + rescales)) * U32;
    let max_log = 3.0 * dsig + 4.0 * (1.0 + rescales) * U32;
    let weights = mean_log * (2.0 * max_log).exp();
    // numerator and denominator: each T terms summed with R rescaling products
    let g = gamma(t + rescales);
    let sums = g / (1.0 - g);
    let mut out_tol = vmax * (2.0 * weights + 2.0 * sums + 3.0 * U32);
    if bf16 {
        out_tol += 2f64.powi(-8) * vmax;
    }
    let lse_tol = weights + sums + 2.0 * U32 * (t.ln() + 1.0);
    (out_tol, lse_tol)
}

pub(super) fn attention_policy<'a>(ctx: &PolicyCtx<'a>, batch: Option<Batch>) -> Policy<'a> {
    let bf16 = get(ctx.inputs, "q").dtype == DType::BF16;
    let c = ctx.config.get::<AttentionConfig>();
    let (scale, causal) = (c.softmax_scale, c.causal);
    let batch = batch.unwrap_or(Batch {
        q: vec![],
        k: vec![],
        v: vec![],
    });
    // bounds[b][s·H + h]
    let bounds: Vec<Vec<(f64, f64)>> = (0..batch.q.len())
        .map(|i| {
            row_bounds(
                batch.q[i].view(),
                batch.k[i].view(),
                batch.v[i].view(),
                scale,
                causal,
                bf16,
            )
        })
        .collect();
    let (s_len, h) = batch.q.first().map_or((0, 0), |q| (q.dim().0, q.dim().1));
    let got = get(ctx.candidate, ctx.output);
    let want = get(ctx.reference, ctx.output);
    let is_out = ctx.output == "out";
    let dv = want.shape.last().copied().unwrap_or(1);
    Policy::Judged {
        why: "within the softmax-attention error bound of its query row (SPEC.md)",
        judge: Box::new(move |i| {
            let (g, w) = (got.value(i), want.value(i));
            if !(g.is_finite() && w.is_finite()) {
                return None;
            }
            let tol = if is_out {
                // out [B, S, H, Dv]: row (b, s·H + h)
                let r = i / dv;
                let (b, sh) = (r / (s_len * h), r % (s_len * h));
                bounds.get(b)?.get(sh)?.0 + if bf16 { 2.0 * half_bf16_ulp(w) } else { 0.0 }
            } else {
                // lse [B, H, S]
                let (b, hs) = (i / (h * s_len), i % (h * s_len));
                let (hi, si) = (hs / s_len, hs % s_len);
                bounds.get(b)?.get(si * h + hi)?.1 + 2.0 * U32 * w.abs()
            };
            ((g - w).abs() <= tol).then_some("within the attention error bound")
        }),
    }
}
