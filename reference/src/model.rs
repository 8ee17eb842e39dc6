//! The DeepSeek-V3 forward pass: embedding, pre-norm decoder blocks (MLA + dense FFN or MoE),
//! final RMSNorm, output head (V3 §2; OFF `Block`, `Transformer`; HF `DeepseekV3DecoderLayer`,
//! `DeepseekV3ForCausalLM`).
//!
//! The structs hold weights as a checkpoint stores them ([`Weight`]); `dsv3::checkpoint` builds
//! them from a model directory, tests build them in memory. The multi-token-prediction modules
//! ([`Mtp`], checkpoint layer 61) run in [`Model::forward_mtp`], not in [`Model::forward`].

use ndarray::{s, Array2, ArrayView2};

use crate::error::{Error, Result};
use crate::linear::{linear, Linear, Precision, Weight};
use crate::mla::{LatentCache, Mla, MlaConfig};
use crate::mlp::Mlp;
use crate::moe::{GateConfig, Moe, Routing};
pub use crate::mtp::{MainHidden, Mtp};
use crate::norm::rms_norm;
use crate::rope::RopeConfig;

/// Everything a forward pass needs from `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// V (`vocab_size`, 129280).
    pub vocab_size: usize,
    /// D (`hidden_size`, 7168).
    pub hidden_size: usize,
    /// Dense FFN width (`intermediate_size`, 18432).
    pub intermediate_size: usize,
    /// Routed/shared expert width (`moe_intermediate_size`, 2048).
    pub moe_intermediate_size: usize,
    /// Main decoder layers (`num_hidden_layers`, 61).
    pub num_hidden_layers: usize,
    /// MTP modules after them (`num_nextn_predict_layers`, 1: checkpoint layer 61).
    pub num_nextn_predict_layers: usize,
    /// N_r (`n_routed_experts`, 256); 0 = no MoE layers.
    pub n_routed_experts: usize,
    /// N_s (`n_shared_experts`, 1).
    pub n_shared_experts: usize,
    /// Layers `0..first_k_dense_replace` use the dense FFN (3).
    pub first_k_dense_replace: usize,
    /// eps of the block and final norms (`rms_norm_eps`, 1e-6); `q_norm`/`kv_norm` use 1e-6.
    pub rms_norm_eps: f64,
    /// Whether `attention_bias` adds biases to `q_a_proj`, `kv_a_proj_with_mqa`, `o_proj`.
    pub attention_bias: bool,
    /// Whether the head reuses the embedding (`tie_word_embeddings`).
    pub tie_word_embeddings: bool,
    pub rope: RopeConfig,
    pub mla: MlaConfig,
    pub gate: GateConfig,
}

impl MlaConfig {
    /// Attention hyper-parameters with the derived softmax scale
    /// `(dn + dr)^(-1/2) · m²` and RoPE frequencies of `rope`.
    pub fn new(
        n_heads: usize,
        q_lora_rank: Option<usize>,
        kv_lora_rank: usize,
        qk_nope_head_dim: usize,
        v_head_dim: usize,
        rope: &RopeConfig,
    ) -> Result<Self> {
        for (field, v) in [
            ("num_attention_heads", n_heads),
            ("kv_lora_rank", kv_lora_rank),
            ("qk_nope_head_dim", qk_nope_head_dim),
            ("v_head_dim", v_head_dim),
        ] {
            if v == 0 {
                return Err(Error::Config {
                    field,
                    value: "0".into(),
                    why: "must be > 0".into(),
                });
            }
        }
        let qk = (qk_nope_head_dim + rope.dim) as f64;
        Ok(MlaConfig {
            n_heads,
            q_lora_rank: q_lora_rank.filter(|&r| r > 0),
            kv_lora_rank,
            qk_nope_head_dim,
            qk_rope_head_dim: rope.dim,
            v_head_dim,
            softmax_scale: qk.powf(-0.5) * rope.softmax_scale_factor(),
            inv_freq: rope.inv_freqs()?,
            rope_interleaved: rope.interleaved,
        })
    }
}

impl ModelConfig {
    /// Whether layer `layer` (main or MTP) has a MoE FFN: OFF `Block` (`layer_id >=
    /// n_dense_layers`) and transformers 5 `DeepseekV3DecoderLayer`. The hub's remote code also
    /// reads `moe_layer_freq` (1 in every published config); OFF and transformers do not.
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        self.n_routed_experts > 0 && layer >= self.first_k_dense_replace
    }

    /// Check sizes and routing against each other.
    pub fn validate(&self) -> Result<()> {
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
        ] {
            if v == 0 {
                return Err(Error::Config {
                    field,
                    value: "0".into(),
                    why: "must be > 0".into(),
                });
            }
        }
        if (0..self.num_hidden_layers).any(|l| !self.is_moe_layer(l)) && self.intermediate_size == 0
        {
            return Err(Error::Config {
                field: "intermediate_size",
                value: "0".into(),
                why: "dense layers need a width > 0".into(),
            });
        }
        if self.n_routed_experts > 0 {
            if self.moe_intermediate_size == 0 {
                return Err(Error::Config {
                    field: "moe_intermediate_size",
                    value: "0".into(),
                    why: "experts need a width > 0".into(),
                });
            }
            self.gate.validate(self.n_routed_experts)?;
        }
        self.rope.validate()
    }

    /// Total number of checkpoint layers (main + MTP).
    pub fn total_layers(&self) -> usize {
        self.num_hidden_layers + self.num_nextn_predict_layers
    }
}

/// The FFN of a block.
#[derive(Debug, Clone)]
pub enum Ffn<'a> {
    /// Both boxed: the variants differ in size by hundreds of bytes.
    Dense(Box<Mlp<'a>>),
    Moe(Box<Moe<'a>>),
}

/// One pre-norm decoder block (OFF `Block`, HF `DeepseekV3DecoderLayer`).
#[derive(Debug, Clone)]
pub struct Block<'a> {
    /// Checkpoint layer index.
    pub layer: usize,
    /// `input_layernorm` `[D]`.
    pub attn_norm: Vec<f32>,
    pub attn: Mla<'a>,
    /// `post_attention_layernorm` `[D]`.
    pub ffn_norm: Vec<f32>,
    pub ffn: Ffn<'a>,
}

impl Block<'_> {
    /// `h ← h + attn(attn_norm(h))`, then `h ← h + ffn(ffn_norm(h))`.
    ///
    /// `cache: None` runs the naive MLA on a whole sequence at positions `0..S`; `Some` runs the
    /// absorbed MLA for positions `cache.len()..` and appends to the cache.
    /// Shapes: `h: [S, D]` → `[S, D]`.
    pub fn forward(
        &self,
        h: ArrayView2<f32>,
        cache: Option<&mut LatentCache>,
        cfg: &ModelConfig,
        precision: Precision,
    ) -> Result<Array2<f32>> {
        Ok(self.forward_routed(h, cache, cfg, precision)?.0)
    }

    /// [`Block::forward`] and, for a MoE block, the router's decision.
    pub fn forward_routed(
        &self,
        h: ArrayView2<f32>,
        cache: Option<&mut LatentCache>,
        cfg: &ModelConfig,
        precision: Precision,
    ) -> Result<(Array2<f32>, Option<Routing>)> {
        // attention sub-layer
        let x = rms_norm(h, &self.attn_norm, cfg.rms_norm_eps)?;
        let a = match cache {
            None => self.attn.forward_naive(x.view(), &cfg.mla, precision)?,
            Some(c) => self
                .attn
                .forward_absorbed(x.view(), c, &cfg.mla, precision)?,
        };
        let h = &h + &a;
        // feed-forward sub-layer
        let x = rms_norm(h.view(), &self.ffn_norm, cfg.rms_norm_eps)?;
        let (f, routing) = match &self.ffn {
            Ffn::Dense(mlp) => (mlp.forward(x.view(), precision)?, None),
            Ffn::Moe(moe) => {
                let (f, r) = moe.forward_routed(x.view(), &cfg.gate, precision)?;
                (f, Some(r))
            }
        };
        Ok((h + f, routing))
    }
}

/// A model (or the layers of one that were loaded).
#[derive(Debug, Clone)]
pub struct Model<'a> {
    pub config: ModelConfig,
    /// `model.embed_tokens.weight` `[V, D]`.
    pub embed: Weight<'a>,
    /// The loaded main blocks, by ascending layer index.
    pub blocks: Vec<Block<'a>>,
    /// `model.norm.weight` `[D]`.
    pub norm: Vec<f32>,
    /// `lm_head.weight` `[V, D]`.
    pub head: Linear<'a>,
    /// The MTP modules that were loaded, by ascending layer.
    pub mtp: Vec<Mtp<'a>>,
}

/// Main-model logits and the MTP modules' logits of one sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct Logits {
    /// `[T, V]`: row `i` predicts token `i + 1`.
    pub main: Array2<f32>,
    /// Module `k` (index `k − 1`): `[T − k, V]`, row `i` predicts token `i + k + 1` (0-based).
    pub mtp: Vec<Array2<f32>>,
}

/// Embedding rows of `tokens` from `weight` `[V, D]`: `[S, D]`, rounded to bf16 unless
/// `precision` is f32. OFF `ParallelEmbedding`.
pub fn embed(weight: &Weight, tokens: &[usize], precision: Precision) -> Result<Array2<f32>> {
    let mut h = Array2::<f32>::zeros((tokens.len(), weight.cols));
    for (s, &t) in tokens.iter().enumerate() {
        if t >= weight.rows {
            return Err(Error::Value {
                op: "embedding",
                tensor: "tokens",
                index: vec![s],
                value: t.to_string(),
                why: "token id ≥ vocab_size",
            });
        }
        let row = weight.rows_f32(t, t + 1, precision.outside_fp8() != Precision::F32)?;
        h.row_mut(s).assign(&row.row(0));
    }
    Ok(h)
}

/// The latent caches of every loaded block (absorbed MLA).
#[derive(Debug, Clone, Default)]
pub struct Cache {
    pub layers: Vec<LatentCache>,
}

impl Cache {
    /// Tokens cached so far.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, LatentCache::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Which MLA form a prefill runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttnImpl {
    /// Per-head keys and values (HF eager attention).
    Naive,
    /// Latent cache (OFF default).
    Absorbed,
}

impl Model<'_> {
    /// Embedding rows of `tokens`: `[S, D]`. OFF `ParallelEmbedding`.
    pub fn embed_tokens(&self, tokens: &[usize], precision: Precision) -> Result<Array2<f32>> {
        embed(&self.embed, tokens, precision)
    }

    /// Final norm and output head: `logits = head(norm(h))`, `[S, V]` (every position, as HF;
    /// OFF returns the last one only).
    pub fn logits(&self, h: ArrayView2<f32>, precision: Precision) -> Result<Array2<f32>> {
        let x = rms_norm(h, &self.norm, self.config.rms_norm_eps)?;
        linear(x.view(), &self.head, precision.outside_fp8())
    }

    /// Hidden states after the last loaded block (before the final norm), `[S, D]`. With a
    /// cache: absorbed MLA at positions `cache.len()..`; without: naive MLA at `0..S`.
    pub fn hidden_states(
        &self,
        tokens: &[usize],
        mut cache: Option<&mut Cache>,
        precision: Precision,
    ) -> Result<Array2<f32>> {
        let mut h = self.embed_tokens(tokens, precision)?;
        for (i, block) in self.blocks.iter().enumerate() {
            let layer_cache = match cache.as_deref_mut() {
                Some(c) => {
                    if c.layers.len() < self.blocks.len() {
                        c.layers
                            .resize_with(self.blocks.len(), LatentCache::default);
                    }
                    Some(&mut c.layers[i])
                }
                None => None,
            };
            h = block.forward(h.view(), layer_cache, &self.config, precision)?;
        }
        Ok(h)
    }

    /// The experts every loaded MoE block's router picks for each token of a naive prefill:
    /// `(layer, ids [S, top_k])`, each row's ids ascending (the selection as a set); with `mtp`,
    /// the MTP modules' blocks too (their `T − k` rows, `h^0` as given). Used to tell whether a
    /// lower precision moved a token across a routing decision.
    pub fn expert_selection(
        &self,
        tokens: &[usize],
        precision: Precision,
        mtp: Option<MainHidden>,
    ) -> Result<Vec<(usize, Array2<usize>)>> {
        let c = &self.config;
        let mut out = Vec::new();
        let mut keep = |block: &Block, routing: Option<Routing>| {
            if let Some(r) = routing {
                let mut ids = r.ids;
                for mut row in ids.rows_mut() {
                    row.as_slice_mut().expect("a fresh array").sort_unstable();
                }
                out.push((block.layer, ids));
            }
        };
        let mut h = self.embed_tokens(tokens, precision)?;
        for block in &self.blocks {
            let (next, routing) = block.forward_routed(h.view(), None, c, precision)?;
            keep(block, routing);
            h = next;
        }
        if let Some(h0) = mtp {
            if h0 == MainHidden::AfterFinalNorm {
                h = rms_norm(h.view(), &self.norm, c.rms_norm_eps)?;
            }
            for (j, module) in self.mtp.iter().enumerate() {
                let k = j + 1;
                if tokens.len() <= k {
                    break;
                }
                let x = module.project(
                    h.slice(s![..tokens.len() - k, ..]),
                    &tokens[k..],
                    &self.embed,
                    c,
                    precision,
                )?;
                let (next, routing) = module.block.forward_routed(x.view(), None, c, precision)?;
                keep(&module.block, routing);
                h = next;
            }
        }
        Ok(out)
    }

    /// Logits `[S, V]` of one sequence at positions `0..S`, all tokens at once.
    pub fn forward(
        &self,
        tokens: &[usize],
        attn: AttnImpl,
        precision: Precision,
    ) -> Result<Array2<f32>> {
        let h = match attn {
            AttnImpl::Naive => self.hidden_states(tokens, None, precision)?,
            AttnImpl::Absorbed => {
                self.hidden_states(tokens, Some(&mut Cache::default()), precision)?
            }
        };
        self.logits(h.view(), precision)
    }

    /// Hidden states of `tokens` fed one at a time through the absorbed MLA and its latent
    /// caches (positions `0..S`), before the final norm: `[S, D]`.
    pub fn hidden_states_decode(
        &self,
        tokens: &[usize],
        precision: Precision,
    ) -> Result<Array2<f32>> {
        let mut cache = Cache::default();
        let mut h = Array2::<f32>::zeros((tokens.len(), self.config.hidden_size));
        for (s, &t) in tokens.iter().enumerate() {
            let row = self.hidden_states(&[t], Some(&mut cache), precision)?;
            h.row_mut(s).assign(&row.row(0));
        }
        Ok(h)
    }

    /// Logits of `tokens` fed one at a time through the absorbed MLA and its latent cache
    /// (positions `0..S`): the same function as [`Model::forward`].
    pub fn decode(&self, tokens: &[usize], precision: Precision) -> Result<Array2<f32>> {
        let h = self.hidden_states_decode(tokens, precision)?;
        self.logits(h.view(), precision)
    }

    /// The main model's logits and, chained, every loaded MTP module's (V3 eqs. (21)–(23);
    /// [`crate::mtp`]). Module `k` takes `h^{k−1}` at rows `0..T−k` (`h^0` chosen by `h0`) and
    /// the tokens `t[k..T]`. `run`: the MLA form of a prefill, or `None` to feed every token
    /// (and every MTP row) one at a time through the latent caches.
    /// Errors: MTP modules that are not layers `num_hidden_layers, +1, …` in order, `T ≤ k`.
    pub fn forward_mtp(
        &self,
        tokens: &[usize],
        run: Option<AttnImpl>,
        precision: Precision,
        h0: MainHidden,
    ) -> Result<Logits> {
        let c = &self.config;
        let t_len = tokens.len();
        let h = match run {
            Some(AttnImpl::Naive) => self.hidden_states(tokens, None, precision)?,
            Some(AttnImpl::Absorbed) => {
                self.hidden_states(tokens, Some(&mut Cache::default()), precision)?
            }
            None => self.hidden_states_decode(tokens, precision)?,
        };
        let main = self.logits(h.view(), precision)?;
        // h^0: the main model's representation of each token
        let mut prev = match h0 {
            MainHidden::BeforeFinalNorm => h,
            MainHidden::AfterFinalNorm => rms_norm(h.view(), &self.norm, c.rms_norm_eps)?,
        };
        let mut mtp = Vec::with_capacity(self.mtp.len());
        for (j, module) in self.mtp.iter().enumerate() {
            let k = j + 1;
            if module.layer != c.num_hidden_layers + j {
                return Err(Error::Argument {
                    op: "mtp",
                    name: "layers",
                    value: module.layer.to_string(),
                    why: format!(
                        "MTP module {k} is checkpoint layer {}: modules chain from layer {} on, in order",
                        c.num_hidden_layers + j,
                        c.num_hidden_layers
                    ),
                });
            }
            if t_len <= k {
                return Err(Error::Shape {
                    op: "mtp",
                    tensor: "tokens",
                    got: vec![t_len],
                    expected: format!("[T] with T > {k}: MTP module {k} predicts from t_(i+{k})"),
                });
            }
            // eqs. (21)-(23) on rows i = 0..T−k
            let hk = module.forward(
                prev.slice(s![..t_len - k, ..]),
                &tokens[k..],
                &self.embed,
                c,
                run,
                precision,
            )?;
            mtp.push(module.logits(hk.view(), &self.head, c, precision)?);
            prev = hk;
        }
        Ok(Logits { main, mtp })
    }
}
