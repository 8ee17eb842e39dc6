//! `mla` (prefill attention of the naive MLA form: per-head q, k with `D_qk = nope + rope`, v with
//! `D_v`) and `mla_decode` (the absorbed form against a paged latent cache: FlashMLA's
//! `flash_mla_with_kvcache` contract).
//!
//! The tolerance policy and its derivation: [`policy`].

mod fp8_cache;
mod policy;

use ndarray::{s, Array3};

use dsv3_reference::mla::attention;

use super::gen_fits;
use super::{get, outputs};
use crate::registry::compare::Policy;
use crate::registry::config::{Config, ConfigSchema, FieldKind};
use crate::registry::contract::{Dim, TensorSpec};
use crate::registry::error::{Error, Result};
use crate::registry::io::TensorMap;
use crate::registry::rng::Rng;
use crate::registry::tensor::{DType, Tensor};
use crate::registry::{every_config, GpuImpl, OpEntry, PolicyCtx, Sizes};

crate::op_config! {
    /// The attention ops' config (`mla`, `mla_decode`).
    pub struct AttentionConfig {
        softmax_scale: f64 = "0.1352337788608801", FieldKind::PositiveFloat,
            "V3: 192^-1/2 · (0.1·ln 40 + 1)² (the absorbed form keeps the 192-dim scale)";
        causal: bool = "true", FieldKind::Bool,
            "query s of S_q sees keys t ≤ T − S_q + s (the queries are the last positions)";
    }
}

const POLICY_DOC: &str = "per query row (T visible keys, R = T − 1 rescales, u = 2^-24): \
|Δout| ≤ V·(2·L̄·e^{2Λ} + 2γ_{T+R}/(1 − γ_{T+R}) + 3u) [+ 2^-8·V + 1 bf16 ulp for BF16], \
|Δlse| ≤ L̄·e^{2Λ} + γ_{T+R}/(1 − γ_{T+R}) + 2u(ln T + 1) + 2u|lse|, with L̄ = (1+4u)δσ + (2 ln T + 4(1+R))u, \
Λ = 3δσ + 4(1+R)u, δσ = scale·γ_{D+2}·max_t Σ|q k_t|, V = max visible |v| (an f32 kernel in any order, online \
softmax allowed; module doc of src/ops/mla/policy.rs, SPEC.md); ±inf and NaN must match";

pub static MLA: OpEntry = OpEntry {
    name: "mla",
    source: "V3 eq. (10) with eqs. (4), (9) (naive MLA: per-head keys [k^C; k^R]); OFF MLA attn_impl=\"naive\"; \
HF eager_attention_forward; FlashMLA dense MHA prefill (d_qk 192, d_v 128)",
    summary: "out[b,s,h] = Σ_t softmax_t(scale·q[b,s,h]·k[b,t,h]) v[b,t,h], lse[b,h,s] = ln Σ_t exp(scale·q·k); \
causal: t ≤ S_k − S_q + s; a query without keys: out 0, lse +inf",
    inputs: &[
        TensorSpec { name: "q", dtypes: &[DType::F32, DType::BF16], shape: &[Dim::Var("B"), Dim::Var("Sq"), Dim::Var("H"), Dim::Var("Dqk")], doc: "[q^C | q^R] per head" },
        TensorSpec { name: "k", dtypes: &[DType::F32, DType::BF16], shape: &[Dim::Var("B"), Dim::Var("Sk"), Dim::Var("H"), Dim::Var("Dqk")], doc: "[k^C | k^R] per head" },
        TensorSpec { name: "v", dtypes: &[DType::F32, DType::BF16], shape: &[Dim::Var("B"), Dim::Var("Sk"), Dim::Var("H"), Dim::Var("Dv")], doc: "v^C per head" },
    ],
    outputs: &[
        TensorSpec { name: "out", dtypes: &[DType::F32, DType::BF16], shape: &[Dim::Var("B"), Dim::Var("Sq"), Dim::Var("H"), Dim::Var("Dv")], doc: "dtype of q" },
        TensorSpec { name: "lse", dtypes: &[DType::F32], shape: &[Dim::Var("B"), Dim::Var("H"), Dim::Var("Sq")], doc: "natural-log log-sum-exp of the scaled scores" },
    ],
    constraints: &[],
    config: ConfigSchema::of::<AttentionConfig>(),
    adapt: None,
    reference: mla_ref,
    reference_fn: "reference/src/mla.rs::attention",
    gpu: &[],
    policy: mla_policy,
    policy_doc: POLICY_DOC,
    generate: mla_gen,
    test_configs: &[r#"{"causal":false}"#, r#"{"softmax_scale":0.5}"#],
    v3_sizes: &[&[("B", 1), ("Sq", 64), ("Sk", 64), ("H", 128), ("Dqk", 192), ("Dv", 128)]],
};

pub static MLA_DECODE: OpEntry = OpEntry {
    name: "mla_decode",
    source: "V3 eq. (10) in the absorbed form (V2 App. C): one shared latent key/value head; OFF MLA attn_impl=\"absorb\"; \
FlashMLA flash_mla_with_kvcache (tests/ref.py)",
    summary: "per sequence b: keys t < cache_seqlens[b] read from k_cache[block_table[b, t/64], t%64, 0, :]; \
out = softmax(scale·q·kᵀ)·k[:, :512], lse natural log; causal (s_q > 1, MTP): t ≤ len − s_q + s; no keys: out 0, lse +inf",
    inputs: &[
        TensorSpec { name: "q", dtypes: &[DType::F32, DType::BF16], shape: &[Dim::Var("B"), Dim::Var("Sq"), Dim::Var("H"), Dim::Fixed(576)], doc: "[q_abs (512) | q_pe (64)]" },
        TensorSpec { name: "k_cache", dtypes: &[DType::F32, DType::BF16], shape: &[Dim::Var("NB"), Dim::Fixed(64), Dim::Fixed(1), Dim::Fixed(576)], doc: "paged [c_kv (512) | k_pe (64)], 64 tokens per block; FlashMLA's FP8 layout accepted: U8 or F8_E4M3 [NB, 64, 1, 656] (src/ops/mla/fp8_cache.rs)" },
        TensorSpec { name: "block_table", dtypes: &[DType::I32], shape: &[Dim::Var("B"), Dim::Var("MB")], doc: "block of each 64-token page per sequence (unused entries are not read)" },
        TensorSpec { name: "cache_seqlens", dtypes: &[DType::I32], shape: &[Dim::Var("B")], doc: "tokens in each sequence's cache (the new ones included)" },
    ],
    outputs: &[
        TensorSpec { name: "out", dtypes: &[DType::F32, DType::BF16], shape: &[Dim::Var("B"), Dim::Var("Sq"), Dim::Var("H"), Dim::Fixed(512)], doc: "latent output (dtype of q)" },
        TensorSpec { name: "lse", dtypes: &[DType::F32], shape: &[Dim::Var("B"), Dim::Var("H"), Dim::Var("Sq")], doc: "natural-log log-sum-exp" },
    ],
    constraints: &[],
    config: ConfigSchema::of::<AttentionConfig>(),
    adapt: Some(fp8_cache::adapt_inputs),
    reference: mla_decode_ref,
    reference_fn: "reference/src/mla.rs::attention",
    gpu: &[GpuImpl {
        backend: "cuda",
        run: crate::gpu_fn!(mla_decode_gpu),
        kernel: "gpu/kernels/mla_decode.cu",
        supports: every_config,
    }],
    policy: mla_decode_policy,
    policy_doc: POLICY_DOC,
    generate: mla_decode_gen,
    test_configs: &[r#"{"causal":false}"#],
    v3_sizes: &[&[("B", 2), ("Sq", 1), ("H", 128)], &[("B", 1), ("Sq", 2), ("H", 128)]],
};

/// FlashMLA's page size and the latent/value widths.
pub(crate) const PAGE: usize = 64;
pub(crate) const D_QK: usize = 576;
pub(crate) const D_V: usize = 512;

/// Keys (and values) of every batch entry as `[T, Hk, D]` arrays, with the queries `[S, H, D]`.
struct Batch {
    q: Vec<Array3<f32>>,
    k: Vec<Array3<f32>>,
    /// The values: `k[.., .., ..dv]` for the latent form, separate for `mla`.
    v: Vec<Array3<f32>>,
}

fn mla_batch(inputs: &TensorMap) -> Batch {
    let (q, k, v) = (
        (get(inputs, "q")).floats4(),
        (get(inputs, "k")).floats4(),
        (get(inputs, "v")).floats4(),
    );
    let b = q.shape()[0];
    Batch {
        q: (0..b)
            .map(|i| q.slice(s![i, .., .., ..]).to_owned())
            .collect(),
        k: (0..b)
            .map(|i| k.slice(s![i, .., .., ..]).to_owned())
            .collect(),
        v: (0..b)
            .map(|i| v.slice(s![i, .., .., ..]).to_owned())
            .collect(),
    }
}

fn decode_error(
    tensor: &'static str,
    index: Vec<usize>,
    value: String,
    why: &'static str,
) -> Error {
    Error::Reference(dsv3_reference::Error::Value {
        op: "mla_decode",
        tensor,
        index,
        value,
        why,
    })
}

/// Gather each sequence's keys from the paged cache (FlashMLA layout), checking the block table
/// entries that are read.
fn decode_batch(inputs: &TensorMap) -> Result<Batch> {
    let q = (get(inputs, "q")).floats4();
    let cache = (get(inputs, "k_cache")).floats4();
    let table = get(inputs, "block_table");
    let lens = get(inputs, "cache_seqlens");
    let (b, max_blocks) = (table.shape[0], table.shape[1]);
    let n_blocks = cache.shape()[0];
    let mut batch = Batch {
        q: Vec::new(),
        k: Vec::new(),
        v: Vec::new(),
    };
    for bi in 0..b {
        let len = lens.value(bi);
        if len < 0.0 || len as usize > max_blocks * PAGE {
            return Err(decode_error(
                "cache_seqlens",
                vec![bi],
                len.to_string(),
                "must be in 0..=64·(block_table columns)",
            ));
        }
        let len = len as usize;
        let mut kv = Array3::<f32>::zeros((len, 1, D_QK));
        for t in 0..len {
            let blk = table.value(bi * max_blocks + t / PAGE);
            if blk < 0.0 || blk as usize >= n_blocks {
                return Err(decode_error(
                    "block_table",
                    vec![bi, t / PAGE],
                    blk.to_string(),
                    "a block the sequence reads must index k_cache",
                ));
            }
            kv.slice_mut(s![t, 0, ..])
                .assign(&cache.slice(s![blk as usize, t % PAGE, 0, ..]));
        }
        batch.q.push(q.slice(s![bi, .., .., ..]).to_owned());
        batch.v.push(kv.slice(s![.., .., ..D_V]).to_owned());
        batch.k.push(kv);
    }
    Ok(batch)
}

/// Run the attention core per batch entry: `out [B, S, H, Dv]` (dtype of `q [B, S, H, D]`),
/// `lse [B, H, S]`. Sizes come from `q`'s shape, so an empty batch keeps S and H.
fn run(batch: &Batch, q: &Tensor, dv: usize, cfg: &Config) -> Result<TensorMap> {
    let (b, s_len, h, q_dtype) = (q.shape[0], q.shape[1], q.shape[2], q.dtype);
    let mut out = Vec::with_capacity(b * s_len * h * dv);
    let mut lse = Vec::with_capacity(b * h * s_len);
    for i in 0..b {
        let a = attention(
            batch.q[i].view(),
            batch.k[i].view(),
            batch.v[i].view(),
            cfg.get::<AttentionConfig>().softmax_scale,
            cfg.get::<AttentionConfig>().causal,
        )?;
        out.extend(a.out.iter().copied());
        lse.extend(a.lse.iter().copied());
    }
    Ok(outputs([
        (
            "out",
            Tensor::from_f32_as(q_dtype, vec![b, s_len, h, dv], &out),
        ),
        ("lse", Tensor::from_f32(vec![b, h, s_len], &lse)),
    ]))
}

fn mla_ref(inputs: &TensorMap, cfg: &Config) -> Result<TensorMap> {
    run(
        &mla_batch(inputs),
        get(inputs, "q"),
        get(inputs, "v").shape[3],
        cfg,
    )
}

fn mla_decode_ref(inputs: &TensorMap, cfg: &Config) -> Result<TensorMap> {
    run(&decode_batch(inputs)?, get(inputs, "q"), D_V, cfg)
}

#[cfg(feature = "cuda")]
/// The kernel reads the paged cache itself (FlashMLA's layout); the wrapper checks every
/// sequence length and every block-table entry a sequence reads.
fn mla_decode_gpu(gpu: &dsv3_gpu::Gpu, inputs: &TensorMap, cfg: &Config) -> Result<TensorMap> {
    use dsv3_gpu::mla_decode::{mla_decode, Dims, PagedCache};
    let (q, k_cache) = (get(inputs, "q"), get(inputs, "k_cache"));
    let (table, lens) = (get(inputs, "block_table"), get(inputs, "cache_seqlens"));
    let ints = |t: &Tensor| -> Vec<i32> { (0..t.numel()).map(|i| t.value(i) as i32).collect() };
    let dims = Dims {
        batch: q.shape[0],
        s_q: q.shape[1],
        heads: q.shape[2],
        n_blocks: k_cache.shape[0],
        max_blocks: table.shape[1],
    };
    let (q_values, cache_values) = (q.kernel_values(), k_cache.kernel_values());
    let (table_values, len_values) = (ints(table), ints(lens));
    let cache = PagedCache {
        k_cache: cache_values.as_host(),
        block_table: &table_values,
        cache_seqlens: &len_values,
    };
    let r = mla_decode(
        gpu,
        q_values.as_host(),
        &cache,
        &dims,
        cfg.get::<AttentionConfig>().softmax_scale as f32,
        cfg.get::<AttentionConfig>().causal,
    )?;
    let (b, s_len, h) = (dims.batch, dims.s_q, dims.heads);
    Ok(outputs([
        ("out", Tensor::from_floats(vec![b, s_len, h, D_V], r.out)),
        ("lse", Tensor::from_f32(vec![b, h, s_len], &r.lse)),
    ]))
}

fn mla_policy<'a>(ctx: &PolicyCtx<'a>) -> Policy<'a> {
    policy::attention_policy(ctx, Some(mla_batch(ctx.inputs)))
}

fn mla_decode_policy<'a>(ctx: &PolicyCtx<'a>) -> Policy<'a> {
    policy::attention_policy(ctx, decode_batch(ctx.inputs).ok())
}

pub(crate) fn normal_input(rng: &mut Rng, shape: Vec<usize>, scale: f64, bf16: bool) -> Tensor {
    let n = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| (rng.normal() * scale) as f32).collect();
    Tensor::from_f32_as(if bf16 { DType::BF16 } else { DType::F32 }, shape, &v)
}

fn mla_gen(rng: &mut Rng, _cfg: &Config, sizes: &Sizes) -> Result<TensorMap> {
    let b = sizes.or_draw("B", rng, 1, 2);
    let sq = sizes.or_draw("Sq", rng, 1, 5);
    let sk = sizes
        .get("Sk")
        .copied()
        .unwrap_or_else(|| sq.saturating_add(rng.range(0, 4)));
    let h = sizes.or_draw("H", rng, 1, 3);
    let dqk = sizes.or_draw("Dqk", rng, 1, 24);
    let dv = sizes.or_draw("Dv", rng, 1, 16);
    gen_fits(&[&[b, sq, h, dqk], &[b, sk, h, dqk], &[b, sk, h, dv]])?;
    let bf16 = rng.chance(0.4);
    Ok(outputs([
        ("q", normal_input(rng, vec![b, sq, h, dqk], 1.5, bf16)),
        ("k", normal_input(rng, vec![b, sk, h, dqk], 1.5, bf16)),
        ("v", normal_input(rng, vec![b, sk, h, dv], 1.0, bf16)),
    ]))
}

fn mla_decode_gen(rng: &mut Rng, _cfg: &Config, sizes: &Sizes) -> Result<TensorMap> {
    let b = sizes.get("B").copied().unwrap_or_else(|| rng.range(1, 2));
    let sq = sizes.get("Sq").copied().unwrap_or_else(|| rng.range(1, 2));
    let h = sizes.get("H").copied().unwrap_or_else(|| rng.range(1, 4));
    gen_fits(&[&[b, sq, h, D_QK], &[b, 3 * PAGE * D_QK]])?;
    let lens: Vec<usize> = (0..b)
        .map(|_| {
            if rng.chance(0.1) {
                0
            } else {
                rng.range(1, 150)
            }
        })
        .collect();
    let pages: Vec<usize> = lens.iter().map(|l| l.div_ceil(PAGE)).collect();
    let max_blocks = pages.iter().copied().max().unwrap_or(0) + 1;
    let n_blocks = pages.iter().sum::<usize>() + 1;
    // a random permutation of the blocks
    let mut order: Vec<usize> = (0..n_blocks).collect();
    for i in (1..n_blocks).rev() {
        order.swap(i, rng.range(0, i));
    }
    let bf16 = rng.chance(0.5);
    let mut cache: Vec<f32> = (0..n_blocks * PAGE * D_QK)
        .map(|_| (rng.normal() * 0.5) as f32)
        .collect();
    // FlashMLA's poison: unused table entries point far outside, NaN past each sequence's end
    let mut table = vec![2_147_480_000i32; b * max_blocks];
    let mut next = 0;
    for bi in 0..b {
        for p in 0..pages[bi] {
            table[bi * max_blocks + p] = order[next] as i32;
            next += 1;
        }
        if pages[bi] > 0 {
            let last = order[next - 1];
            for t in lens[bi] - (pages[bi] - 1) * PAGE..PAGE {
                for c in 0..D_QK {
                    cache[(last * PAGE + t) * D_QK + c] = f32::NAN;
                }
            }
        }
    }
    let int32 = |shape: Vec<usize>, v: &[i32]| {
        Tensor::from_bytes(
            DType::I32,
            shape,
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        )
        .expect("one value per element")
    };
    let lens_i32: Vec<i32> = lens.iter().map(|&l| l as i32).collect();
    Ok(outputs([
        ("q", normal_input(rng, vec![b, sq, h, D_QK], 0.5, bf16)),
        (
            "k_cache",
            Tensor::from_f32_as(
                if bf16 { DType::BF16 } else { DType::F32 },
                vec![n_blocks, PAGE, 1, D_QK],
                &cache,
            ),
        ),
        ("block_table", int32(vec![b, max_blocks], &table)),
        ("cache_seqlens", int32(vec![b], &lens_i32)),
    ]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::policy_report;
    use dsv3_reference::mla::visible_keys;

    /// Attention of one batch entry in f32 as a kernel computes it: scores by sequential fmaf
    /// dots times f32(scale); `online`: a running max that rescales both sums at every new max
    /// (R = T − 1 in the worst case), else two passes against the final max (the GPU kernel).
    /// `skip_last`: a bug that drops each row's last visible key. Returns out `[S, H, Dv]`, lse
    /// `[H, S]`.
    fn f32_attention(
        batch: &Batch,
        i: usize,
        scale: f32,
        causal: bool,
        online: bool,
        skip_last: bool,
    ) -> (Vec<f32>, Vec<f32>) {
        let (q, k, v) = (&batch.q[i], &batch.k[i], &batch.v[i]);
        let (s_len, h, d) = q.dim();
        let (t_len, dv) = (k.dim().0, v.dim().2);
        let mut out = vec![0f32; s_len * h * dv];
        let mut lse = vec![f32::INFINITY; h * s_len];
        for si in 0..s_len {
            let visible = visible_keys(t_len, s_len, si, causal);
            let visible = if skip_last {
                visible.saturating_sub(1)
            } else {
                visible
            };
            for hi in 0..h {
                let score = |t: usize| {
                    let dot = (0..d).fold(0f32, |a, c| q[[si, hi, c]].mul_add(k[[t, 0, c]], a));
                    dot * scale
                };
                let (mut m, mut l, mut o) = (f32::NEG_INFINITY, 0f32, vec![0f32; dv]);
                if !online {
                    m = (0..visible).map(score).fold(f32::NEG_INFINITY, f32::max);
                }
                for t in 0..visible {
                    let sc = score(t);
                    if online && sc > m {
                        let alpha = if m == f32::NEG_INFINITY {
                            0.0
                        } else {
                            (m - sc).exp()
                        };
                        l *= alpha;
                        o.iter_mut().for_each(|x| *x *= alpha);
                        m = sc;
                    }
                    let p = (sc - m).exp();
                    l += p;
                    for (c, x) in o.iter_mut().enumerate() {
                        *x = p.mul_add(v[[t, 0, c]], *x);
                    }
                }
                if visible > 0 {
                    for c in 0..dv {
                        out[(si * h + hi) * dv + c] = o[c] / l;
                    }
                    lse[hi * s_len + si] = m + l.ln();
                }
            }
        }
        (out, lse)
    }

    #[test]
    fn f32_kernels_pass_the_attention_policy_and_a_dropped_key_fails() {
        let op = &MLA_DECODE;
        let (mut cases, mut caught) = (0, 0);
        for seed in 0..40u64 {
            for cfg in op.configs() {
                let inputs = (op.generate)(&mut Rng::new(seed), &cfg, &Sizes::new()).unwrap();
                let batch = decode_batch(&inputs).unwrap();
                let q = get(&inputs, "q");
                let (b, s_len, h) = (q.shape[0], q.shape[1], q.shape[2]);
                let c = cfg.get::<AttentionConfig>();
                let (scale, causal) = (c.softmax_scale as f32, c.causal);
                let candidate = |online: bool, skip_last: bool| {
                    let (mut out, mut lse) = (Vec::new(), Vec::new());
                    for i in 0..b {
                        let (o, l) = f32_attention(&batch, i, scale, causal, online, skip_last);
                        out.extend(o);
                        lse.extend(l);
                    }
                    outputs([
                        (
                            "out",
                            Tensor::from_f32_as(q.dtype, vec![b, s_len, h, D_V], &out),
                        ),
                        ("lse", Tensor::from_f32(vec![b, h, s_len], &lse)),
                    ])
                };
                for online in [false, true] {
                    let rep = policy_report(op, &inputs, &candidate(online, false), &cfg);
                    assert!(
                        rep.pass,
                        "seed {seed} {} online {online}: {:?}",
                        cfg.as_json(),
                        rep.tensors
                            .iter()
                            .map(|t| &t.first_violations)
                            .collect::<Vec<_>>()
                    );
                }
                if batch.k.iter().any(|k| k.dim().0 > 1) {
                    cases += 1;
                    let rep = policy_report(op, &inputs, &candidate(false, true), &cfg);
                    caught += usize::from(!rep.pass);
                }
            }
        }
        println!("a dropped key was caught in {caught} of {cases} cases");
        assert!(caught == cases, "{caught} of {cases}");
    }
}
