//! `attention_backward`: `q, k, v, out, lse, dout → dq, dk, dv`, the gradient of [`super::mla`]'s
//! attention core (the naive MLA form: one key head per query head, `D_qk = 192`, `D_v = 128`
//! in V3), in FlashAttention's convention: a kernel reads the forward's `out` and `lse`,
//! `P = exp(scale·q·k − lse)` and `delta = rowsum(dout ⊙ out)`.
//!
//! The reference recomputes everything from q, k, v in f64 ([`attention_backward`]); `out` and
//! `lse` must be the forward's for these q, k, v (else exit 2, naming the element: more than
//! `2^-6·(1 + |lse|)` or `2^-6·(max|v| + |out|)` away), and their own rounding is part of the
//! tolerance, since a kernel legitimately computes from them.
//!
//! Tolerance (SPEC.md "Backward tolerances"), per head and query row s with `T_s` visible keys,
//! `u = 2^-24`, `γ_n = nu/(1 − nu)`, `β = 2^-8` for BF16 inputs (FlashAttention rounds P and dS
//! to bf16 for its Tensor Core GEMMs) and 0 for F32 (f32 arithmetic, no TF32):
//! - `η_t = scale·γ_{Dqk}·Σ|q k_t| + 3u(|z_t| + |lse|) + |lse − lse*|` (the score's dot, the
//!   scale and the subtraction of lse in any association, exp2 with log2 e folded in, lse's
//!   distance from the exact `lse*`), `ρ_t = e^{η_t}(1 + 4u) − 1 + β` (expf ≤ 2 ulp), so
//!   `|ΔP_t| ≤ e_P = ρ_t P_t + 2^-126` (flushed to zero);
//! - `|ΔdP_t| ≤ γ_{Dv}·A_t`, `A_t = Σ|dout ⊙ v_t|`;
//!   `|Δdelta| ≤ e_δ = γ_{Dv}·Σ|dout ⊙ out| + Σ|dout|·(|out − out*| + u|out*|)`;
//! - `dS_t = P_t(dP_t − delta)`: with `c_t = |dP_t − delta*| + γ_{Dv}A_t + e_δ`,
//!   `|ΔdS_t| ≤ e_S = e_P·c_t + P_t(γ_{Dv}A_t + e_δ) + (γ_2 + β)(P_t + e_P)·c_t`, `|dS_t| ≤ P_t c_t`;
//! - `dq = scale·Σ_t dS_t k_t`: `|Δ| ≤ scale·((1 + γ_{T_s+1})·Σ_t e_S|k_t| + γ_{T_s+1}·Σ_t|dS_t||k_t|)`;
//!   `dk_t` the same over the `N_t` queries that see key t, with `q_s`; `dv_t = Σ_s P dout_s`:
//!   `(1 + γ_{N_t})·Σ_s e_P|dout_s| + γ_{N_t}·Σ_s P|dout_s|`;
//!
//! each plus `2^-120`, then one rounding to the output dtype.

use ndarray::{s, Array3, ArrayView3};

use dsv3_reference::mla::{attention, attention_backward, visible_keys};

use super::bound_policy::{derived_bound_policy, put_bounded};
use super::mla::{normal_input, AttentionConfig};
use super::{gen_fits, get, outputs, require_finite};
use crate::registry::compare::Policy;
use crate::registry::config::{Config, ConfigSchema};
use crate::registry::contract::{Dim, TensorSpec};
use crate::registry::error::{Error, Result};
use crate::registry::io::TensorMap;
use crate::registry::rng::Rng;
use crate::registry::tensor::{DType, Tensor};
use crate::registry::tolerance::{gamma, U32};
use crate::registry::{OpEntry, PolicyCtx, Sizes};

const B: Dim = Dim::Var("B");
const SQ: Dim = Dim::Var("Sq");
const SK: Dim = Dim::Var("Sk");
const H: Dim = Dim::Var("H");
const DQK: Dim = Dim::Var("Dqk");
const DV: Dim = Dim::Var("Dv");
const FLOATS: &[DType] = &[DType::F32, DType::BF16];

pub static ATTENTION_BACKWARD: OpEntry = OpEntry {
    name: "attention_backward",
    source: "the gradient of V3 eq. (10) (naive MLA: per-head keys [k^C; k^R], d_qk 192, d_v 128) as torch autograd \
computes it; FlashAttention-2 Algorithm 2 (delta = rowsum(dout ⊙ out)); FlashMLA's dense MHA backward",
    summary: "P = softmax(scale·q·kᵀ) (causal: t ≤ Sk − Sq + s), dv = Pᵀ·dout, dP = dout·vᵀ, delta = rowsum(dout ⊙ out), \
dS = P ⊙ (dP − delta), dq = scale·dS·k, dk = scale·dSᵀ·q; a query without keys has no gradient",
    inputs: &[
        TensorSpec { name: "q", dtypes: FLOATS, shape: &[B, SQ, H, DQK], doc: "[q^C | q^R] per head" },
        TensorSpec { name: "k", dtypes: FLOATS, shape: &[B, SK, H, DQK], doc: "[k^C | k^R] per head" },
        TensorSpec { name: "v", dtypes: FLOATS, shape: &[B, SK, H, DV], doc: "v^C per head" },
        TensorSpec { name: "out", dtypes: FLOATS, shape: &[B, SQ, H, DV], doc: "the forward's output (mla's `out`)" },
        TensorSpec { name: "lse", dtypes: &[DType::F32], shape: &[B, H, SQ], doc: "the forward's natural-log lse (+inf without keys)" },
        TensorSpec { name: "dout", dtypes: FLOATS, shape: &[B, SQ, H, DV], doc: "∂L/∂out" },
    ],
    outputs: &[
        TensorSpec { name: "dq", dtypes: FLOATS, shape: &[B, SQ, H, DQK], doc: "∂L/∂q (dtype of q)" },
        TensorSpec { name: "dk", dtypes: FLOATS, shape: &[B, SK, H, DQK], doc: "∂L/∂k (dtype of q)" },
        TensorSpec { name: "dv", dtypes: FLOATS, shape: &[B, SK, H, DV], doc: "∂L/∂v (dtype of q)" },
    ],
    constraints: &[],
    config: ConfigSchema::of::<AttentionConfig>(),
    adapt: None,
    reference: attention_backward_ref,
    reference_fn: "reference/src/mla.rs::attention_backward",
    gpu: &[],
    policy: attention_backward_policy,
    policy_doc: "per element, an f32 kernel in any order reading the given out and lse (BF16 inputs: P and dS rounded to \
bf16 for the GEMMs, as FlashAttention does): bounds on P (the score's dot, exp, lse's distance from exact), dP, delta \
(out's distance from exact), dS, carried through the sums of dq, dk, dv; then one rounding (module doc of \
src/ops/attention_backward.rs, SPEC.md)",
    generate: attention_backward_gen,
    test_configs: &[r#"{"causal":false}"#, r#"{"softmax_scale":0.5}"#],
    v3_sizes: &[&[("B", 1), ("Sq", 64), ("Sk", 64), ("H", 128), ("Dqk", 192), ("Dv", 128)]],
};

/// One batch entry's `[S, H, D]` slice of a `[B, S, H, D]` tensor.
fn entry(t: &ndarray::Array4<f32>, b: usize) -> ArrayView3<'_, f32> {
    t.slice(s![b, .., .., ..])
}

fn attention_backward_ref(inputs: &TensorMap, cfg: &Config) -> Result<TensorMap> {
    const OP: &str = "attention_backward";
    for name in ["q", "k", "v", "out", "dout"] {
        require_finite(
            OP,
            name,
            get(inputs, name),
            "the gradient of a non-finite input is not defined",
        )?;
    }
    let c = cfg.get::<AttentionConfig>();
    let (scale, causal) = (c.softmax_scale, c.causal);
    let qt = get(inputs, "q");
    let [q, k, v, out, dout] = ["q", "k", "v", "out", "dout"].map(|n| get(inputs, n).floats4());
    let lse = get(inputs, "lse").floats();
    let (batch, s_len, heads, d_qk) = q.dim();
    let (t_len, d_v) = (k.dim().1, v.dim().3);
    let beta = if qt.dtype == DType::BF16 {
        2f64.powi(-8)
    } else {
        0.0
    };
    let mut grads = [Vec::new(), Vec::new(), Vec::new()];
    let mut tols = [Vec::new(), Vec::new(), Vec::new()];
    for b in 0..batch {
        let (qb, kb, vb, ob, db) = (
            entry(&q, b),
            entry(&k, b),
            entry(&v, b),
            entry(&out, b),
            entry(&dout, b),
        );
        let lse_b = &lse[b * heads * s_len..(b + 1) * heads * s_len];
        check_forward(b, (qb, kb, vb), (ob, lse_b), scale, causal)?;
        let g = attention_backward(qb, kb, vb, db, scale, causal)?;
        let t = tolerances(
            Row {
                q: qb,
                k: kb,
                v: vb,
                out: ob,
                dout: db,
                lse: lse_b,
            },
            scale,
            causal,
            beta,
        );
        for (i, (grad, tol)) in [(&g.dq, &t[0]), (&g.dk, &t[1]), (&g.dv, &t[2])]
            .into_iter()
            .enumerate()
        {
            grads[i].extend(grad.iter().copied());
            tols[i].extend(tol.iter().copied());
        }
    }
    let mut map = TensorMap::new();
    let shapes = [
        vec![batch, s_len, heads, d_qk],
        vec![batch, t_len, heads, d_qk],
        vec![batch, t_len, heads, d_v],
    ];
    for (i, name) in ["dq", "dk", "dv"].into_iter().enumerate() {
        put_bounded(
            &mut map,
            name,
            qt.dtype,
            shapes[i].clone(),
            &grads[i],
            &tols[i],
        );
    }
    Ok(map)
}

/// Refuse an `out` or `lse` that is not the forward's for these q, k, v (module doc).
fn check_forward(
    b: usize,
    (q, k, v): (ArrayView3<f32>, ArrayView3<f32>, ArrayView3<f32>),
    (out, lse): (ArrayView3<f32>, &[f32]),
    scale: f64,
    causal: bool,
) -> Result<()> {
    const WHY: &str =
        "out and lse must be the forward's outputs for these q, k, v (mla with the same config): \
the backward reads them";
    let fwd = attention(q, k, v, scale, causal)?;
    let (s_len, heads, d_v) = out.dim();
    let value = |tensor: &'static str, index: Vec<usize>, got: f32, want: f32| {
        Error::from(dsv3_reference::Error::Value {
            op: "attention_backward",
            tensor,
            index,
            value: format!("{got} (the forward gives {want})"),
            why: WHY,
        })
    };
    for h in 0..heads {
        for si in 0..s_len {
            if visible_keys(k.dim().0, s_len, si, causal) == 0 {
                continue;
            }
            let (got, want) = (lse[h * s_len + si], fwd.lse[[h, si]]);
            let close = (f64::from(got) - f64::from(want)).abs()
                <= 2f64.powi(-6) * (1.0 + f64::from(want).abs());
            if !close {
                return Err(value("lse", vec![b, h, si], got, want));
            }
            let v_max = (0..k.dim().0)
                .flat_map(|t| (0..d_v).map(move |d| (t, d)))
                .fold(0f64, |m, (t, d)| m.max(f64::from(v[[t, h, d]]).abs()));
            for d in 0..d_v {
                let (got, want) = (out[[si, h, d]], fwd.out[[si, h, d]]);
                if (f64::from(got) - f64::from(want)).abs()
                    > 2f64.powi(-6) * (v_max + f64::from(want).abs())
                {
                    return Err(value("out", vec![b, si, h, d], got, want));
                }
            }
        }
    }
    Ok(())
}

/// One batch entry's tensors, for [`tolerances`].
struct Row<'a> {
    q: ArrayView3<'a, f32>,
    k: ArrayView3<'a, f32>,
    v: ArrayView3<'a, f32>,
    out: ArrayView3<'a, f32>,
    dout: ArrayView3<'a, f32>,
    /// `[H, S]`
    lse: &'a [f32],
}

/// The tolerances of dq, dk, dv for one batch entry (module doc).
fn tolerances(r: Row, scale: f64, causal: bool, beta: f64) -> [Array3<f64>; 3] {
    let (s_len, heads, d_qk) = r.q.dim();
    let (t_len, d_v) = (r.k.dim().0, r.v.dim().2);
    let f = |x: f32| f64::from(x);
    let (g_dqk, g_dv, g2) = (gamma(d_qk as f64), gamma(d_v as f64), gamma(2.0));
    // per element: (sum of e·|x|, sum of magnitude·|x|), combined once the counts are known
    let mut dq = Array3::<(f64, f64)>::from_elem((s_len, heads, d_qk), (0.0, 0.0));
    let mut dk = Array3::<(f64, f64)>::from_elem((t_len, heads, d_qk), (0.0, 0.0));
    let mut dv = Array3::<(f64, f64)>::from_elem((t_len, heads, d_v), (0.0, 0.0));
    let mut seen_by = vec![0usize; t_len];
    let (mut z, mut p) = (vec![0f64; t_len], vec![0f64; t_len]);
    for h in 0..heads {
        seen_by.iter_mut().for_each(|n| *n = 0);
        for si in 0..s_len {
            let vis = visible_keys(t_len, s_len, si, causal);
            if vis == 0 {
                continue;
            }
            let lse_g = f(r.lse[h * s_len + si]);
            let mut max = f64::NEG_INFINITY;
            for (t, zt) in z.iter_mut().enumerate().take(vis) {
                *zt = scale
                    * (0..d_qk)
                        .map(|d| f(r.q[[si, h, d]]) * f(r.k[[t, h, d]]))
                        .sum::<f64>();
                max = max.max(*zt);
            }
            let sum: f64 = (0..vis).map(|t| (z[t] - max).exp()).sum();
            let lse_x = max + sum.ln();
            let dout = |d: usize| f(r.dout[[si, h, d]]);
            // exact out*, delta*, and the bound on delta
            let mut out_x = vec![0f64; d_v];
            for t in 0..vis {
                p[t] = (z[t] - lse_x).exp();
                for (d, o) in out_x.iter_mut().enumerate() {
                    *o += p[t] * f(r.v[[t, h, d]]);
                }
            }
            let delta: f64 = (0..d_v).map(|d| dout(d) * out_x[d]).sum();
            let e_delta: f64 = (0..d_v)
                .map(|d| {
                    let og = f(r.out[[si, h, d]]);
                    g_dv * (dout(d) * og).abs()
                        + dout(d).abs() * ((og - out_x[d]).abs() + U32 * out_x[d].abs())
                })
                .sum();
            for t in 0..vis {
                let qk_abs: f64 = (0..d_qk)
                    .map(|d| (f(r.q[[si, h, d]]) * f(r.k[[t, h, d]])).abs())
                    .sum();
                let eta = scale * g_dqk * qk_abs
                    + 3.0 * U32 * (z[t].abs() + lse_g.abs())
                    + (lse_g - lse_x).abs();
                let rho = eta.exp() * (1.0 + 4.0 * U32) - 1.0 + beta;
                let e_p = rho * p[t] + 2f64.powi(-126);
                let (mut dp, mut a) = (0f64, 0f64);
                for d in 0..d_v {
                    let x = dout(d) * f(r.v[[t, h, d]]);
                    dp += x;
                    a += x.abs();
                }
                let c = (dp - delta).abs() + g_dv * a + e_delta;
                let e_s = e_p * c + p[t] * (g_dv * a + e_delta) + (g2 + beta) * (p[t] + e_p) * c;
                let m_s = p[t] * (dp - delta).abs();
                for d in 0..d_qk {
                    let kq = &mut dq[[si, h, d]];
                    kq.0 += scale * e_s * f(r.k[[t, h, d]]).abs();
                    kq.1 += scale * m_s * f(r.k[[t, h, d]]).abs();
                    let kk = &mut dk[[t, h, d]];
                    kk.0 += scale * e_s * f(r.q[[si, h, d]]).abs();
                    kk.1 += scale * m_s * f(r.q[[si, h, d]]).abs();
                }
                for d in 0..d_v {
                    let kv = &mut dv[[t, h, d]];
                    kv.0 += e_p * dout(d).abs();
                    kv.1 += p[t] * dout(d).abs();
                }
                seen_by[t] += 1;
            }
            let gq = gamma(vis as f64 + 1.0);
            for d in 0..d_qk {
                let (e, m) = dq[[si, h, d]];
                dq[[si, h, d]] = ((1.0 + gq) * e + gq * m, 0.0);
            }
        }
        for (t, &n) in seen_by.iter().enumerate() {
            let gk = gamma(n as f64 + 1.0);
            for d in 0..d_qk {
                let (e, m) = dk[[t, h, d]];
                dk[[t, h, d]] = ((1.0 + gk) * e + gk * m, 0.0);
            }
            for d in 0..d_v {
                let (e, m) = dv[[t, h, d]];
                dv[[t, h, d]] = ((1.0 + gk) * e + gk * m, 0.0);
            }
        }
    }
    let tiny = 2f64.powi(-120);
    [dq, dk, dv].map(|a| a.mapv(|(e, _)| e + tiny))
}

fn attention_backward_policy<'a>(ctx: &PolicyCtx<'a>) -> Policy<'a> {
    derived_bound_policy(
        ctx,
        "within the bound of an f32 kernel reading the given out and lse, then one rounding (SPEC.md \"Backward tolerances\")",
    )
}

fn attention_backward_gen(rng: &mut Rng, cfg: &Config, sizes: &Sizes) -> Result<TensorMap> {
    let b = sizes.or_draw("B", rng, 1, 2);
    let sq = sizes.or_draw("Sq", rng, 1, 5);
    let sk = sizes
        .get("Sk")
        .copied()
        .unwrap_or_else(|| (sq + rng.range(0, 4)).saturating_sub(rng.range(0, 1)));
    let h = sizes.or_draw("H", rng, 1, 3);
    let dqk = sizes.or_draw("Dqk", rng, 1, 24);
    let dv = sizes.or_draw("Dv", rng, 1, 16);
    gen_fits(&[
        &[b, sq, h, dqk],
        &[b, sk, h, dqk],
        &[b, sk, h, dv],
        &[b, sq, h, dv],
        &[b, sq, h, dv],
    ])?;
    let bf16 = rng.chance(0.4);
    // peaked softmax rows now and then (large scores)
    let qs = if rng.chance(0.3) { 6.0 } else { 1.5 };
    let q = normal_input(rng, vec![b, sq, h, dqk], qs, bf16);
    let k = normal_input(rng, vec![b, sk, h, dqk], 1.5, bf16);
    let v = normal_input(rng, vec![b, sk, h, dv], 1.0, bf16);
    let c = cfg.get::<AttentionConfig>();
    let (q4, k4, v4) = (q.floats4(), k.floats4(), v.floats4());
    let (mut out, mut lse) = (Vec::new(), Vec::new());
    for i in 0..b {
        let fwd = attention(
            entry(&q4, i),
            entry(&k4, i),
            entry(&v4, i),
            c.softmax_scale,
            c.causal,
        )?;
        out.extend(fwd.out.iter().copied());
        lse.extend(fwd.lse.iter().copied());
    }
    let dtype = q.dtype;
    // dout ∥ out sometimes: dP − delta cancels
    let parallel = rng.chance(0.2);
    let dout: Vec<f32> = out
        .iter()
        .map(|&o| {
            if parallel {
                o * 0.5
            } else {
                rng.normal() as f32
            }
        })
        .collect();
    Ok(outputs([
        ("q", q),
        ("k", k),
        ("v", v),
        ("out", Tensor::from_f32_as(dtype, vec![b, sq, h, dv], &out)),
        ("lse", Tensor::from_f32(vec![b, h, sq], &lse)),
        (
            "dout",
            Tensor::from_f32_as(dtype, vec![b, sq, h, dv], &dout),
        ),
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::policy_report;
    use dsv3_reference::numeric::bf16_round_f32;

    /// A FlashAttention-style f32 kernel over the given out and lse: `P = exp2(z·log2 e −
    /// lse·log2 e)`, delta from `out`; with BF16 inputs P and dS rounded to bf16 before their
    /// GEMMs. `forget_delta`: the classic bug of dropping delta.
    fn fa_kernel(
        inputs: &TensorMap,
        scale: f32,
        causal: bool,
        forget_delta: bool,
    ) -> [Vec<f32>; 3] {
        let [q, k, v, out, dout] = ["q", "k", "v", "out", "dout"].map(|n| get(inputs, n).floats4());
        let lse = get(inputs, "lse").floats();
        let bf16 = get(inputs, "q").dtype == DType::BF16;
        let lo = |x: f32| if bf16 { bf16_round_f32(x) } else { x };
        let (batch, s_len, heads, d_qk) = q.dim();
        let (t_len, d_v) = (k.dim().1, v.dim().3);
        let mut dq = Array3::<f32>::zeros((batch * s_len, heads, d_qk));
        let mut dk = Array3::<f32>::zeros((batch * t_len, heads, d_qk));
        let mut dvv = Array3::<f32>::zeros((batch * t_len, heads, d_v));
        let log2e = std::f32::consts::LOG2_E;
        for b in 0..batch {
            for h in 0..heads {
                for si in (0..s_len).rev() {
                    let vis = visible_keys(t_len, s_len, si, causal);
                    let l = lse[(b * heads + h) * s_len + si];
                    let delta: f32 = if forget_delta {
                        0.0
                    } else {
                        (0..d_v)
                            .map(|d| dout[[b, si, h, d]] * out[[b, si, h, d]])
                            .sum()
                    };
                    for t in 0..vis {
                        let z: f32 = (0..d_qk).map(|d| q[[b, si, h, d]] * k[[b, t, h, d]]).sum();
                        let p = (z * (scale * log2e) - l * log2e).exp2();
                        let dp: f32 = (0..d_v)
                            .map(|d| dout[[b, si, h, d]] * v[[b, t, h, d]])
                            .sum();
                        let ds = lo(p * (dp - delta));
                        for d in 0..d_v {
                            dvv[[b * t_len + t, h, d]] += lo(p) * dout[[b, si, h, d]];
                        }
                        for d in 0..d_qk {
                            dq[[b * s_len + si, h, d]] += scale * ds * k[[b, t, h, d]];
                            dk[[b * t_len + t, h, d]] += scale * ds * q[[b, si, h, d]];
                        }
                    }
                }
            }
        }
        [dq, dk, dvv].map(|a| a.iter().copied().collect())
    }

    #[test]
    fn flash_attention_style_kernels_pass_and_planted_faults_fail() {
        let op = &ATTENTION_BACKWARD;
        let mut worst = 0f64;
        let (mut cases, mut caught) = (0, 0);
        for cfg in op.configs() {
            let c = cfg.get::<AttentionConfig>();
            for seed in 0..60u64 {
                let inputs =
                    attention_backward_gen(&mut Rng::new(seed), &cfg, &Sizes::new()).unwrap();
                let q = get(&inputs, "q");
                let (kk, vv) = (get(&inputs, "k"), get(&inputs, "v"));
                let shapes = [q.shape.clone(), kk.shape.clone(), vv.shape.clone()];
                let cand = |g: &[Vec<f32>; 3]| -> TensorMap {
                    ["dq", "dk", "dv"]
                        .into_iter()
                        .enumerate()
                        .map(|(i, n)| {
                            (
                                n.to_string(),
                                Tensor::from_f32_as(q.dtype, shapes[i].clone(), &g[i]),
                            )
                        })
                        .collect()
                };
                let g = fa_kernel(&inputs, c.softmax_scale as f32, c.causal, false);
                let rep = policy_report(op, &inputs, &cand(&g), &cfg);
                for t in &rep.tensors {
                    let used = t.bound_use.as_ref().map_or(0.0, |b| b.max);
                    worst = worst.max(used);
                }
                assert!(rep.pass, "{} seed {seed}: {:?}", cfg.as_json(), rep.tensors);
                let bad = fa_kernel(&inputs, c.softmax_scale as f32, c.causal, true);
                if bad != g {
                    cases += 1;
                    caught += usize::from(!policy_report(op, &inputs, &cand(&bad), &cfg).pass);
                }
            }
        }
        println!("worst kernel uses {worst:.3} of its bound; a dropped delta caught in {caught} of {cases}");
        assert!(worst < 1.0);
        assert!(caught * 100 >= cases * 90, "{caught} of {cases}");
    }
}
