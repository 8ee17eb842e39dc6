//! Multi-token prediction (V3 §2.2, eqs. (21)–(23)): the MTP modules of checkpoint layers
//! `num_hidden_layers..num_hidden_layers + num_nextn_predict_layers` (layer 61 in V3) and their
//! logits. The loss, eqs. (24)–(25), is [`crate::train::mtp_loss`].
//!
//! Module `k` (1 ≤ k ≤ D) for the input `t_1..t_T`, at `i = 1..T−k` (row `i − 1` here):
//!
//! - eq. (21) `h'^k_i = M_k [RMSNorm(h^{k−1}_i); RMSNorm(Emb(t_{i+k}))]`, with the released
//!   weights' order: `eh_proj(cat[enorm(Emb(t_{i+k})), hnorm(h^{k−1}_i)])`, **embedding half
//!   first** (columns `0..D` of `eh_proj` multiply the embedding; official-code.md §8.2, vLLM
//!   `deepseek_mtp.py`); the paper prints the hidden state first;
//! - eq. (22) `h^k_{1:T−k} = TRM_k(h'^k_{1:T−k})`: one decoder block (a MoE block in V3:
//!   layer 61 ≥ `first_k_dense_replace`), causal over the `T − k` rows at positions `0..T−k−1`;
//! - eq. (23) `P^k_{i+k+1} = softmax(OutHead(h^k_i))`, `OutHead = shared_head.head ∘
//!   shared_head.norm` (the module's own final norm, then the head shared with the main model);
//!   row `i − 1` of module k's logits predicts `t_{i+k+1}`: module 1 gives the next-next token.
//!
//! `h^0` (module 1's input) is the main model's last hidden state **before** the final norm by
//! default ([`MainHidden::BeforeFinalNorm`]); `h^{k−1}` for k ≥ 2 is module k−1's block output
//! before its `shared_head.norm`. SPEC.md "Multi-token prediction" gives the sources.

use ndarray::{concatenate, s, Array2, ArrayView2, Axis};

use crate::error::{Error, Result};
use crate::linear::{linear, Linear, Precision, Weight};
use crate::mla::LatentCache;
use crate::model::{embed, AttnImpl, Block, ModelConfig};
use crate::norm::rms_norm;

/// Which hidden state of the main model feeds module 1 (`h^0` of eq. (21)); V3 does not say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MainHidden {
    /// The last block's output, before `model.norm` (V3 Fig. 3 takes it before the output head,
    /// which includes a norm, as `shared_head.norm` shows; DeepSeek-V4's official `MTPBlock`
    /// receives the pre-head residual streams).
    #[default]
    BeforeFinalNorm,
    /// `model.norm` of it: what vLLM passes to its MTP drafter (`DeepseekV2Model.forward`
    /// returns the normed states).
    AfterFinalNorm,
}

/// The multi-token-prediction module of checkpoint layer `num_hidden_layers + k − 1`.
#[derive(Debug, Clone)]
pub struct Mtp<'a> {
    pub layer: usize,
    /// `enorm` `[D]`: RMSNorm of the embedding `Emb(t_{i+k})`.
    pub enorm: Vec<f32>,
    /// `hnorm` `[D]`: RMSNorm of the previous depth's hidden state `h^{k−1}_i`.
    pub hnorm: Vec<f32>,
    /// `eh_proj` `[D, 2D]` (M_k): columns `0..D` take `enorm(Emb)`, `D..2D` take `hnorm(h)`.
    pub eh_proj: Linear<'a>,
    /// TRM_k: the module's decoder block (`self_attn.*`, `mlp.*`, its two norms).
    pub block: Block<'a>,
    /// `shared_head.norm` `[D]`.
    pub shared_head_norm: Vec<f32>,
    /// `shared_head.head` `[V, D]` (a copy of `lm_head` in the release), when stored.
    pub shared_head: Option<Linear<'a>>,
    /// `embed_tokens` `[V, D]` (a copy of the embedding in the release), when stored.
    pub embed: Option<Weight<'a>>,
}

impl Mtp<'_> {
    /// Eqs. (21)–(22): `h^k = TRM_k(eh_proj(cat[enorm(Emb(t_{i+k})), hnorm(h^{k−1}_i)]))`.
    ///
    /// `h_prev: [S, D]` (`h^{k−1}_i`, `i = 1..S`), `next_tokens: [S]` (`t_{i+k}`), positions
    /// `0..S`. `embed_main`: the main model's embedding, used when the module stores no copy.
    /// `run`: the block's MLA form on the whole sequence, or `None` to feed the rows one at a
    /// time through the absorbed MLA and a latent cache. Shapes: → `h^k: [S, D]`.
    pub fn forward(
        &self,
        h_prev: ArrayView2<f32>,
        next_tokens: &[usize],
        embed_main: &Weight,
        cfg: &ModelConfig,
        run: Option<AttnImpl>,
        precision: Precision,
    ) -> Result<Array2<f32>> {
        let x = self.project(h_prev, next_tokens, embed_main, cfg, precision)?;
        // eq. (22): the module's transformer block, causal over its S rows
        match run {
            Some(AttnImpl::Naive) => self.block.forward(x.view(), None, cfg, precision),
            Some(AttnImpl::Absorbed) => {
                let mut cache = LatentCache::default();
                self.block
                    .forward(x.view(), Some(&mut cache), cfg, precision)
            }
            None => {
                let mut cache = LatentCache::default();
                let mut out = Array2::<f32>::zeros(x.dim());
                for i in 0..x.nrows() {
                    let row = self.block.forward(
                        x.slice(s![i..i + 1, ..]),
                        Some(&mut cache),
                        cfg,
                        precision,
                    )?;
                    out.row_mut(i).assign(&row.row(0));
                }
                Ok(out)
            }
        }
    }

    /// Eq. (21): `h'^k_i = eh_proj(cat[enorm(Emb(t_{i+k})), hnorm(h^{k−1}_i)])`, the block's
    /// input. Shapes: `h_prev: [S, D]`, `next_tokens: [S]` → `[S, D]`.
    pub fn project(
        &self,
        h_prev: ArrayView2<f32>,
        next_tokens: &[usize],
        embed_main: &Weight,
        cfg: &ModelConfig,
        precision: Precision,
    ) -> Result<Array2<f32>> {
        let s_len = h_prev.nrows();
        if next_tokens.len() != s_len {
            return Err(Error::Shape {
                op: "mtp",
                tensor: "next_tokens",
                got: vec![next_tokens.len()],
                expected: format!("[{s_len}] (one token per row of h_prev)"),
            });
        }
        // both halves normalized, the embedding half first
        let e = embed(
            self.embed.as_ref().unwrap_or(embed_main),
            next_tokens,
            precision,
        )?;
        let e = rms_norm(e.view(), &self.enorm, cfg.rms_norm_eps)?;
        let h = rms_norm(h_prev, &self.hnorm, cfg.rms_norm_eps)?;
        let eh = concatenate(Axis(1), &[e.view(), h.view()]).expect("both [S, D]");
        // M_k stays out of FP8: the release stores eh_proj in BF16, like the router and head
        linear(eh.view(), &self.eh_proj, precision.outside_fp8())
    }

    /// Eq. (23) before the softmax: `shared_head.head(shared_head.norm(h^k))` `[S, V]`; the
    /// module's stored head, else the main model's `lm_head` (shared, V3 §2.2).
    pub fn logits(
        &self,
        h: ArrayView2<f32>,
        head_main: &Linear,
        cfg: &ModelConfig,
        precision: Precision,
    ) -> Result<Array2<f32>> {
        let x = rms_norm(h, &self.shared_head_norm, cfg.rms_norm_eps)?;
        linear(
            x.view(),
            self.shared_head.as_ref().unwrap_or(head_main),
            precision.outside_fp8(),
        )
    }
}
