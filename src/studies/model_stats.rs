//! `dsv3 model-stats`: the arithmetic of a DeepSeek-V3-style model from its `config.json` —
//! parameters by component (total, activated per token, the MTP module, the hub's count),
//! KV-cache bytes (MLA against an MHA with the same heads), forward FLOPs per token, the
//! training compute of V3 §4 / Table 1 and what it implies, and MoE dispatch/combine bytes under
//! node-limited routing (§2.1.2, §3.3.3).
//!
//! Conventions (the ones under which the report's figures come out): a parameter is *activated*
//! when a token's forward multiplies with it — the input embedding is a lookup and is not
//! (Kaplan et al.'s non-embedding count), the head is; the shared experts and the `top_k` routed
//! experts of every MoE layer are. Billions are rounded to nearest (671.03B → "671B"). The hub's
//! count is every tensor element of the published checkpoint: the main model, the MTP module
//! with its stored copies of the embedding and head, and the FP8 `weight_scale_inv` tensors
//! (one f32 per 128×128 block of every FP8 Linear weight).

use serde::Serialize;

use dsv3_reference::model::ModelConfig;

/// V3 Table 1: H800 GPU-hours of pre-training, context extension and post-training.
pub const PRETRAIN_GPU_HOURS: f64 = 2_664_000.0;
pub const CONTEXT_EXTENSION_GPU_HOURS: f64 = 119_000.0;
pub const POST_TRAINING_GPU_HOURS: f64 = 5_000.0;
/// V3 §4.1: pre-training tokens.
pub const TRAINING_TOKENS: f64 = 14.8e12;
/// V3 Table 1: dollars per H800 GPU-hour.
pub const DOLLARS_PER_GPU_HOUR: f64 = 2.0;
/// V3 §3.1: GPUs in the training cluster.
pub const CLUSTER_GPUS: f64 = 2048.0;
/// H800 SXM5 dense peaks (the H100 SXM5's SMs and clocks): BF16 and FP8 Tensor Core TFLOP/s.
pub const H800_BF16_TFLOPS: f64 = 989.5;
pub const H800_FP8_TFLOPS: f64 = 1979.0;
/// The contexts the KV-cache and attention figures are given at by default (4K, 32K, 128K).
pub const CONTEXTS: [usize; 3] = [4096, 32768, 131072];

/// One component's parameters.
#[derive(Debug, Clone, Serialize)]
pub struct Component {
    pub name: &'static str,
    /// In the whole model (every layer that has it).
    pub params: u64,
    /// Of those, the ones a token's forward uses.
    pub activated: u64,
    pub layers: usize,
}

/// KV-cache bytes at one context length, for the whole model (all layers).
#[derive(Debug, Clone, Serialize)]
pub struct KvAtContext {
    pub context: usize,
    pub mla_bf16_bytes: u64,
    pub mla_fp8_bytes: u64,
    pub mha_bf16_bytes: u64,
    pub mha_fp8_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct KvCache {
    /// Values per token per layer: MLA's `c_kv` + `k_pe` (one latent head shared by all heads).
    pub mla_values: u64,
    /// An MHA with the same heads: keys `heads·(nope + rope)` + values `heads·v_head_dim`.
    pub mha_values: u64,
    /// FlashMLA's FP8 cache: 512 E4M3 + 4 f32 scales + 64 BF16 per token per layer.
    pub mla_flashmla_fp8_bytes: u64,
    pub per_context: Vec<KvAtContext>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Flops {
    /// 2 × the activated GEMM parameters (the head included, the embedding lookup not).
    pub gemm_per_token: f64,
    /// Attention scores and values of one new token against a context of T keys (naive form:
    /// `2·layers·heads·(d_qk + d_v)·T`), per requested context.
    pub attention_per_token: Vec<(usize, f64)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Training {
    pub tokens: f64,
    /// `6 · N_activated · D` (attention not included).
    pub flops: f64,
    pub pretrain_gpu_hours: f64,
    pub total_gpu_hours: f64,
    pub gpu_hours_per_trillion_tokens: f64,
    pub days_on_cluster_per_trillion_tokens: f64,
    pub cost_dollars: f64,
    /// Achieved TFLOP/s per GPU implied by the pre-training hours.
    pub implied_tflops_per_gpu: f64,
    pub utilization_of_bf16_peak: f64,
    pub utilization_of_fp8_peak: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Communication {
    /// Nodes a token is sent to (node-limited routing: `topk_group` groups = nodes).
    pub nodes: usize,
    /// Bytes per destination: FP8 hidden state plus its f32 1×128 scales; BF16 combine.
    pub dispatch_bytes_per_destination: u64,
    pub combine_bytes_per_destination: u64,
    /// Per token across nodes (IB: one copy per node) and to the experts' GPUs (NVLink: one per
    /// routed expert).
    pub dispatch_bytes_ib: u64,
    pub combine_bytes_ib: u64,
    pub dispatch_bytes_nvlink: u64,
    pub combine_bytes_nvlink: u64,
}

/// Everything `dsv3 model-stats` prints.
#[derive(Debug, Clone, Serialize)]
pub struct ModelStats {
    pub components: Vec<Component>,
    /// The main model (MTP excluded).
    pub total: u64,
    /// Activated per token (the input embedding excluded).
    pub activated: u64,
    pub activated_with_embedding: u64,
    /// The MTP modules' own parameters, and with the stored embedding/head copies.
    pub mtp: u64,
    pub mtp_with_copies: u64,
    /// FP8 `weight_scale_inv` elements (0 without `quantization_config`).
    pub fp8_scales: u64,
    /// Every tensor element of the published checkpoint: total + MTP with copies + scales.
    pub hub_count: u64,
    pub kv_cache: KvCache,
    pub flops: Flops,
    pub training: Training,
    pub communication: Communication,
}

/// `⌈n/128⌉·⌈k/128⌉`: the scale blocks of an FP8 `[n, k]` weight.
fn scale_blocks(n: u64, k: u64, block: u64) -> u64 {
    n.div_ceil(block) * k.div_ceil(block)
}

/// The model's arithmetic, the KV cache and attention FLOPs at `contexts`. `fp8_block`: the FP8 weight block edge when the checkpoint stores
/// FP8 weights (`quantization_config.weight_block_size`).
pub fn model_stats(c: &ModelConfig, fp8_block: Option<usize>, contexts: &[usize]) -> ModelStats {
    let u = |x: usize| x as u64;
    let (h, v) = (u(c.hidden_size), u(c.vocab_size));
    let m = &c.mla;
    let heads = u(m.n_heads);
    let (dn, dr, dv, rkv) = (
        u(m.qk_nope_head_dim),
        u(m.qk_rope_head_dim),
        u(m.v_head_dim),
        u(m.kv_lora_rank),
    );
    let dqk = dn + dr;
    let block = fp8_block.map(u);
    let scales = |n: u64, k: u64| block.map_or(0, |b| scale_blocks(n, k, b));
    // attention (eqs. (1)–(11)): (params, FP8 scale blocks) per layer
    let bias = |n: u64| if c.attention_bias { n } else { 0 };
    let (q_params, q_scales) = match m.q_lora_rank.map(u) {
        Some(rq) => (
            h * rq + bias(rq) + rq + rq * heads * dqk,
            scales(rq, h) + scales(heads * dqk, rq),
        ),
        None => (h * heads * dqk, scales(heads * dqk, h)),
    };
    let attention = q_params
        + h * (rkv + dr)
        + bias(rkv + dr)
        + rkv
        + rkv * heads * (dn + dv)
        + heads * dv * h
        + bias(h);
    let attention_scales =
        q_scales + scales(rkv + dr, h) + scales(heads * (dn + dv), rkv) + scales(h, heads * dv);
    let layers = c.num_hidden_layers;
    let moe_layers = if c.n_routed_experts > 0 {
        layers.saturating_sub(c.first_k_dense_replace)
    } else {
        0
    };
    let dense_layers = layers - moe_layers;
    let ffn = |i: u64| 3 * h * i;
    let ffn_scales = |i: u64| 2 * scales(i, h) + scales(h, i);
    let (i_dense, i_moe) = (u(c.intermediate_size), u(c.moe_intermediate_size));
    let (e, k, s) = (
        u(c.n_routed_experts),
        u(c.gate.top_k),
        u(c.n_shared_experts),
    );
    let router = e * h + e; // weight + e_score_correction_bias
    let norms_per_layer = 2 * h;
    let comp = |name, per: u64, act: u64, n: usize| Component {
        name,
        params: per * u(n),
        activated: act * u(n),
        layers: n,
    };
    let components = vec![
        comp("embedding", v * h, 0, 1),
        comp("attention (MLA)", attention, attention, layers),
        comp("dense FFN", ffn(i_dense), ffn(i_dense), dense_layers),
        comp("routed experts", e * ffn(i_moe), k * ffn(i_moe), moe_layers),
        comp("shared experts", s * ffn(i_moe), s * ffn(i_moe), moe_layers),
        comp("router", router, router, moe_layers),
        comp("norms", norms_per_layer, norms_per_layer, layers),
        comp("final norm", h, h, 1),
        comp(
            "head",
            if c.tie_word_embeddings { 0 } else { v * h },
            v * h,
            1,
        ),
    ];
    let total: u64 = components.iter().map(|x| x.params).sum();
    let activated: u64 = components.iter().map(|x| x.activated).sum();
    // MTP modules (eqs. (21)–(23)): enorm, hnorm, eh_proj, one block (MoE when the model has
    // experts), shared_head.norm; the checkpoint also stores the embedding and head per module
    let n_mtp = u(c.num_nextn_predict_layers);
    let mtp_ffn = if e > 0 {
        (e + s) * ffn(i_moe) + router
    } else {
        ffn(i_dense)
    };
    let mtp_module = 2 * h + 2 * h * h + attention + norms_per_layer + mtp_ffn + h;
    let mtp = n_mtp * mtp_module;
    let mtp_with_copies = mtp + n_mtp * 2 * v * h;
    let block_ffn_scales = |moe: bool| {
        if moe {
            (e + s) * ffn_scales(i_moe)
        } else {
            ffn_scales(i_dense)
        }
    };
    let fp8_scales = if block.is_some() {
        u(layers) * attention_scales
            + u(dense_layers) * block_ffn_scales(false)
            + u(moe_layers) * block_ffn_scales(true)
            + n_mtp * (attention_scales + block_ffn_scales(e > 0))
    } else {
        0
    };
    let hub_count = total + mtp_with_copies + fp8_scales;
    // KV cache
    let mla_values = rkv + dr;
    let mha_values = heads * (dqk + dv);
    let per_context = contexts
        .iter()
        .map(|&t| {
            let n = u(t) * u(layers);
            KvAtContext {
                context: t,
                mla_bf16_bytes: 2 * mla_values * n,
                mla_fp8_bytes: mla_values * n,
                mha_bf16_bytes: 2 * mha_values * n,
                mha_fp8_bytes: mha_values * n,
            }
        })
        .collect();
    let kv_cache = KvCache {
        mla_values,
        mha_values,
        mla_flashmla_fp8_bytes: rkv + 4 * rkv.div_ceil(128) + 2 * dr,
        per_context,
    };
    let non_embedding = activated as f64;
    let flops = Flops {
        gemm_per_token: 2.0 * non_embedding,
        attention_per_token: contexts
            .iter()
            .map(|&t| {
                (
                    t,
                    2.0 * layers as f64 * heads as f64 * (dqk + dv) as f64 * t as f64,
                )
            })
            .collect(),
    };
    let train_flops = 6.0 * non_embedding * TRAINING_TOKENS;
    let implied = train_flops / (PRETRAIN_GPU_HOURS * 3600.0) / 1e12;
    let total_hours = PRETRAIN_GPU_HOURS + CONTEXT_EXTENSION_GPU_HOURS + POST_TRAINING_GPU_HOURS;
    let per_trillion = PRETRAIN_GPU_HOURS / (TRAINING_TOKENS / 1e12);
    let training = Training {
        tokens: TRAINING_TOKENS,
        flops: train_flops,
        pretrain_gpu_hours: PRETRAIN_GPU_HOURS,
        total_gpu_hours: total_hours,
        gpu_hours_per_trillion_tokens: per_trillion,
        days_on_cluster_per_trillion_tokens: per_trillion / CLUSTER_GPUS / 24.0,
        cost_dollars: total_hours * DOLLARS_PER_GPU_HOUR,
        implied_tflops_per_gpu: implied,
        utilization_of_bf16_peak: implied / H800_BF16_TFLOPS,
        utilization_of_fp8_peak: implied / H800_FP8_TFLOPS,
    };
    let dispatch = h + 4 * h.div_ceil(128);
    let combine = 2 * h;
    let nodes = if c.gate.n_group > 1 {
        c.gate.topk_group
    } else {
        1
    };
    let communication = Communication {
        nodes,
        dispatch_bytes_per_destination: dispatch,
        combine_bytes_per_destination: combine,
        dispatch_bytes_ib: u(nodes) * dispatch,
        combine_bytes_ib: u(nodes) * combine,
        dispatch_bytes_nvlink: k * dispatch,
        combine_bytes_nvlink: k * combine,
    };
    ModelStats {
        components,
        total,
        activated,
        activated_with_embedding: activated + v * h,
        mtp,
        mtp_with_copies,
        fp8_scales,
        hub_count,
        kv_cache,
        flops,
        training,
        communication,
    }
}

/// `x` in billions, rounded to nearest (the report's convention).
pub fn billions(x: u64) -> u64 {
    (x as f64 / 1e9).round() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v3() -> ModelStats {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/configs/deepseek-v3/config.json");
        let parsed = crate::model::checkpoint::config::read(&path).unwrap();
        model_stats(&parsed.model, parsed.fp8.map(|f| f.block), &CONTEXTS)
    }

    /// V3 §4.2 / the abstract: "671B total parameters with 37B activated for each token".
    #[test]
    fn v3_has_671b_parameters_and_37b_activated() {
        let s = v3();
        assert_eq!(s.total, 671_026_419_200);
        assert_eq!(billions(s.total), 671);
        assert_eq!(s.activated, 36_625_618_432);
        assert_eq!(billions(s.activated), 37);
        // counting the embedding lookup would give 38: the report does not
        assert_eq!(billions(s.activated_with_embedding), 38);
    }

    /// The README: "685B … 671B of the Main Model weights and 14B of the MTP Module weights".
    #[test]
    fn the_hub_lists_685b_of_which_14b_are_the_mtp_module() {
        let s = v3();
        assert_eq!(billions(s.hub_count), 685);
        assert_eq!(billions(s.hub_count) - billions(s.total), 14);
        // the module itself is 11.6B; its stored embedding and head copies and the FP8 scales
        // make up the rest
        assert_eq!(billions(s.mtp), 12);
        assert_eq!(s.mtp_with_copies - s.mtp, 2 * 129_280 * 7168);
        assert_eq!(s.fp8_scales, 41_540_496);
    }

    /// V3 Table 1 and §1: 2.788M = 2.664M + 119K + 5K GPU-hours, $5.576M at $2/GPU-hour,
    /// 180K GPU-hours per trillion tokens = 3.7 days on 2048 H800s.
    #[test]
    fn the_training_figures_add_up_as_the_report_states() {
        let t = v3().training;
        assert_eq!(t.total_gpu_hours, 2_788_000.0);
        assert_eq!(t.cost_dollars, 5_576_000.0);
        assert_eq!(t.gpu_hours_per_trillion_tokens, 180_000.0);
        assert_eq!(
            (t.days_on_cluster_per_trillion_tokens * 10.0).round() / 10.0,
            3.7
        );
        // 6·N·D: 6 · 36.6B · 14.8T = 3.25e24 FLOPs, i.e. 339 TFLOP/s per GPU over 2.664M hours
        assert!((t.flops / 3.2524e24 - 1.0).abs() < 1e-4, "{}", t.flops);
        assert!((t.implied_tflops_per_gpu - 339.1).abs() < 0.1);
        assert!((t.utilization_of_bf16_peak - 0.3427).abs() < 1e-3);
    }

    /// MLA caches 576 values per token per layer (512 + 64) against 40,960 for an MHA with the
    /// same 128 heads (192-dim keys, 128-dim values): 1152 vs 81,920 bytes in BF16.
    #[test]
    fn mla_caches_576_values_per_token_and_layer() {
        let k = v3().kv_cache;
        assert_eq!((k.mla_values, k.mha_values), (576, 40_960));
        assert_eq!(k.mla_flashmla_fp8_bytes, 656);
        let at4k = &k.per_context[0];
        assert_eq!(at4k.mla_bf16_bytes, 4096 * 61 * 1152);
        assert_eq!(at4k.mha_bf16_bytes, 4096 * 61 * 81_920);
    }

    /// Node-limited routing: ≤ 4 nodes per token, FP8 hidden state + f32 1×128 scales out,
    /// BF16 back.
    #[test]
    fn dispatch_and_combine_bytes_per_token() {
        let c = v3().communication;
        assert_eq!(c.nodes, 4);
        assert_eq!(c.dispatch_bytes_per_destination, 7168 + 56 * 4);
        assert_eq!(
            (c.dispatch_bytes_ib, c.combine_bytes_ib),
            (4 * 7392, 4 * 14_336)
        );
        assert_eq!(
            (c.dispatch_bytes_nvlink, c.combine_bytes_nvlink),
            (8 * 7392, 8 * 14_336)
        );
    }

    /// The tiny fixture checkpoint: hand-counted parameters agree with the tensors on disk.
    #[test]
    fn the_count_equals_the_tensors_of_a_real_checkpoint() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/models/v3_yarn_qlora");
        let parsed = crate::model::checkpoint::config::read(&dir.join("config.json")).unwrap();
        let s = model_stats(&parsed.model, None, &CONTEXTS);
        let tensors = crate::registry::io::load(dir.join("model.safetensors")).unwrap();
        let on_disk: u64 = tensors.values().map(|t| t.numel() as u64).sum();
        assert_eq!(s.total + s.mtp_with_copies, on_disk);
    }
}
