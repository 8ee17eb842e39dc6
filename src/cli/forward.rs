//! `dsv3 forward`: a model's logits (and MTP logits) for one token sequence.

use std::path::PathBuf;

use dsv3::model::forward::{self, PrecisionChoice};
use dsv3::Result;
use dsv3_reference::model::{AttnImpl, MainHidden};

#[derive(clap::Args)]
pub struct Args {
    /// Model directory.
    #[arg(long)]
    model: PathBuf,
    /// Token ids, comma-separated: --tokens 1,2,3
    #[arg(long)]
    tokens: String,
    /// Write `logits` F32 [T, vocab] to this safetensors file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Feed the tokens one at a time through the absorbed MLA and its latent cache.
    #[arg(long)]
    decode: bool,
    /// f32; bf16 (weights and GEMM operands in bf16); fp8 (the blocks' Linears through
    /// act_quant + the block-scaled FP8 GEMM, activation scales as the checkpoint's
    /// quantization_config.scale_fmt; the rest in bf16). Not f32: the distance of the
    /// logits to an f32 run is printed.
    #[arg(long, value_parser = super::choice::<PrecisionChoice>(), default_value = "f32")]
    precision: PrecisionChoice,
    /// Load only these layers, e.g. --layers 0 or --layers 0,3-5 (embedding, final norm and
    /// head are always loaded); the logits are then those of the truncated model.
    #[arg(long)]
    layers: Option<String>,
    /// MLA form of a prefill: naive (per-head K/V) or absorbed (latent cache).
    #[arg(long, value_parser = super::choice::<AttnImpl>(), default_value = "naive")]
    attn: AttnImpl,
    /// Also run the multi-token-prediction module(s) (checkpoint layer num_hidden_layers..):
    /// print their next-next-token predictions and L_MTP, write `mtp_logits` F32
    /// [T−1, vocab] (row i predicts token i+2) with --out.
    #[arg(long)]
    mtp: bool,
    /// The main-model hidden state MTP module 1 reads: before the final norm (default) or
    /// after it (what vLLM passes).
    #[arg(long, value_parser = super::choice::<MainHidden>(), default_value = "before-final-norm")]
    mtp_hidden: MainHidden,
    /// Run every Linear through the readable single-threaded reference loops instead of the
    /// fast path (vectorised, multi-threaded, bit-identical: SPEC.md "Model forward").
    #[arg(long)]
    readable: bool,
}

pub fn run(a: Args) -> Result<bool> {
    let args = forward::ForwardArgs {
        model: a.model,
        tokens: forward::parse_tokens(&a.tokens)?,
        out: a.out,
        decode: a.decode,
        precision: a.precision,
        layers: a.layers.as_deref().map(forward::parse_layers).transpose()?,
        attn: a.attn,
        mtp: a.mtp,
        mtp_hidden: a.mtp_hidden,
        readable: a.readable,
    };
    forward::run(&args, &mut std::io::stderr())?;
    Ok(true)
}
