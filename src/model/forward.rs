//! `dsv3 forward`: logits of one token sequence from a model directory, and with `--mtp` the
//! multi-token-prediction modules' logits (V3 eqs. (21)–(23)) and their loss (eqs. (24)–(25)).

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use ndarray::{s, Array2};

use dsv3_reference::linear::Precision;
use dsv3_reference::model::{AttnImpl, Ffn, Logits, MainHidden, Model};
use dsv3_reference::train::mtp_loss::{mtp_lambda, mtp_loss, mtp_module_loss};

use crate::model::checkpoint::Checkpoint;
use crate::model::fast_linear;
use crate::registry::config::Choice;
use crate::registry::error::{Error, Result};
use crate::registry::io::{self, TensorMap};
use crate::registry::tensor::Tensor;

crate::choice! {
    /// `--precision` as asked: [`Precision`] without the FP8 path's activation scale format,
    /// which comes from the checkpoint ([`Checkpoint::fp8_scale_fmt`]).
    pub enum PrecisionChoice { F32 = "f32", Bf16 = "bf16", Fp8 = "fp8" }
}

/// `--attn`: the MLA form of a prefill.
impl Choice for AttnImpl {
    const VALUES: &'static [&'static str] = &["naive", "absorbed"];
    const HELP: &'static [&'static str] = &[
        "Per-head keys and values (HF eager attention)",
        "Latent cache (OFF default)",
    ];
    fn from_index(i: usize) -> Self {
        [AttnImpl::Naive, AttnImpl::Absorbed][i]
    }
    fn name(self) -> &'static str {
        Self::VALUES[self as usize]
    }
}

/// `--mtp-hidden`: the main model's hidden state MTP module 1 reads.
impl Choice for MainHidden {
    const VALUES: &'static [&'static str] = &["before_final_norm", "after_final_norm"];
    fn from_index(i: usize) -> Self {
        [MainHidden::BeforeFinalNorm, MainHidden::AfterFinalNorm][i]
    }
    fn name(self) -> &'static str {
        Self::VALUES[self as usize]
    }
}

impl PrecisionChoice {
    /// The arithmetic for `ck`: `Fp8` scales activations as `quantization_config.scale_fmt`.
    pub fn resolve(self, ck: &Checkpoint) -> Precision {
        match self {
            PrecisionChoice::F32 => Precision::F32,
            PrecisionChoice::Bf16 => Precision::Bf16,
            PrecisionChoice::Fp8 => Precision::Fp8 {
                scale_fmt: ck.fp8_scale_fmt(),
            },
        }
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct ForwardArgs {
    pub model: PathBuf,
    pub tokens: Vec<usize>,
    pub out: Option<PathBuf>,
    /// Feed the tokens one at a time through the absorbed MLA and its latent cache.
    pub decode: bool,
    pub precision: PrecisionChoice,
    /// Main (and MTP) layers to load; `None` = all.
    pub layers: Option<Vec<usize>>,
    /// The MLA form of a prefill (ignored with `decode`).
    pub attn: AttnImpl,
    /// Also run the MTP modules (`mtp_logits`).
    pub mtp: bool,
    /// `h^0` of MTP module 1.
    pub mtp_hidden: MainHidden,
    /// Run the readable single-threaded Linears instead of the fast path
    /// ([`crate::model::fast_linear`], bit-identical).
    pub readable: bool,
}

/// What happened.
#[derive(Debug, Clone)]
pub struct ForwardReport {
    /// `[T, vocab]`.
    pub logits: Array2<f32>,
    /// With `--mtp`: module k's logits `[T − k, vocab]` (row i predicts token i + k + 1).
    pub mtp_logits: Vec<Array2<f32>>,
    pub seconds: f64,
    /// `max|Δ| / max|ref|` of the logits against an f32 run, for other precisions.
    pub vs_f32: Option<f64>,
    /// The same for each MTP module's logits.
    pub mtp_vs_f32: Vec<f64>,
    /// (token, MoE layer) expert selections that differ from f32 (naive prefill), for other
    /// precisions.
    pub selection_changes: Option<usize>,
    /// `L^k_MTP` (eq. (24)) of each module, the input being all tokens but the last
    /// (`T = n − 1`, `t_{T+1}` = the last token); `None` when there are too few tokens.
    pub mtp_module_losses: Option<Vec<f64>>,
}

/// Name of module k's logits in the output file: `mtp_logits` (k = 1), `mtp_logits_2`, ….
pub fn mtp_tensor_name(k: usize) -> String {
    if k == 1 {
        "mtp_logits".to_string()
    } else {
        format!("mtp_logits_{k}")
    }
}

/// `"1,2,3"` → token ids.
pub fn parse_tokens(s: &str) -> Result<Vec<usize>> {
    let tokens: Vec<usize> = s
        .split(',')
        .map(str::trim)
        .enumerate()
        .map(|(i, t)| {
            t.parse::<usize>().map_err(|_| {
                Error::Usage(format!(
                    "--tokens: item {i} is `{t}`, not a token id (expected e.g. --tokens 1,2,3)"
                ))
            })
        })
        .collect::<Result<_>>()?;
    Ok(tokens)
}

/// `"0,3-5"` → `[0, 3, 4, 5]`.
pub fn parse_layers(s: &str) -> Result<Vec<usize>> {
    let bad = |item: &str| {
        Error::Usage(format!(
            "--layers: `{item}` is not a layer or a range (expected e.g. --layers 0,3-5)"
        ))
    };
    let mut v = Vec::new();
    for item in s.split(',').map(str::trim) {
        match item.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (
                    a.trim().parse().map_err(|_| bad(item))?,
                    b.trim().parse().map_err(|_| bad(item))?,
                );
                if a > b {
                    return Err(bad(item));
                }
                // layers are checked against the model later; refuse a range no model has
                // before listing it
                crate::registry::limits::ensure_at_most(
                    &format!("--layers {item}"),
                    b as u64,
                    crate::registry::limits::MAX_MODEL_COUNT,
                    "the largest layer index a model config may declare",
                )?;
                v.extend(a..=b);
            }
            None => v.push(item.parse().map_err(|_| bad(item))?),
        }
    }
    Ok(v)
}

/// `max|a − b| / max|b|` (0 when both are all zero).
pub fn max_rel_diff(a: &Array2<f32>, b: &Array2<f32>) -> f64 {
    let scale = b.iter().fold(0f64, |m, v| m.max(f64::from(v.abs())));
    let diff = a.iter().zip(b.iter()).fold(0f64, |m, (x, y)| {
        m.max((f64::from(*x) - f64::from(*y)).abs())
    });
    if scale == 0.0 {
        diff
    } else {
        diff / scale
    }
}

/// Logits of `tokens` under `precision` (the main model's and, with `mtp`, the MTP modules').
pub fn logits(
    model: &Model,
    tokens: &[usize],
    decode: bool,
    attn: AttnImpl,
    precision: Precision,
    mtp: Option<MainHidden>,
) -> Result<Logits> {
    let run = if decode { None } else { Some(attn) };
    Ok(match mtp {
        Some(h0) => model.forward_mtp(tokens, run, precision, h0)?,
        None => Logits {
            main: match run {
                None => model.decode(tokens, precision)?,
                Some(attn) => model.forward(tokens, attn, precision)?,
            },
            mtp: Vec::new(),
        },
    })
}

/// Eq. (24) for every module from the logits of `tokens` (n tokens): the first `n − 1` are the
/// input `t_1..t_T` and the last is `t_{T+1}`. By causality, rows `0..T−k` of module k's logits
/// on all n tokens are its logits on the first `T`. `None` when some module has no row left.
pub fn mtp_module_losses(mtp_logits: &[Array2<f32>], tokens: &[usize]) -> Result<Option<Vec<f64>>> {
    let t_len = tokens.len().saturating_sub(1);
    if mtp_logits.len() >= t_len {
        return Ok(None);
    }
    let ids: Vec<u32> = tokens.iter().map(|&t| t as u32).collect();
    let mut losses = Vec::new();
    for (j, l) in mtp_logits.iter().enumerate() {
        let k = j + 1;
        losses.push(mtp_module_loss(l.slice(s![..t_len - k, ..]), &ids, k)?);
    }
    Ok(Some(losses))
}

/// The `n` largest entries of a row, largest first (ties → lower id).
fn top(row: ndarray::ArrayView1<f32>, n: usize) -> Vec<(usize, f32)> {
    let mut v: Vec<(usize, f32)> = row.iter().copied().enumerate().collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    v.truncate(n);
    v
}

/// Load, run, write `logits` F32 `[T, vocab]`; progress lines go to `log`. The Linears run on
/// the fast path unless `args.readable`.
pub fn run(args: &ForwardArgs, log: &mut dyn Write) -> Result<ForwardReport> {
    if args.readable {
        run_here(args, log)
    } else {
        fast_linear::install(|| run_here(args, log))
    }
}

fn run_here(args: &ForwardArgs, log: &mut dyn Write) -> Result<ForwardReport> {
    if args.tokens.is_empty() {
        return Err(Error::Usage("--tokens: no tokens given".into()));
    }
    let ck = Checkpoint::open(&args.model)?;
    for w in &ck.warnings {
        let _ = writeln!(log, "warning: {w}");
    }
    let model = ck.load(args.layers.as_deref())?;
    let precision = args.precision.resolve(&ck);
    let c = &model.config;
    let moe = model
        .blocks
        .iter()
        .filter(|b| matches!(b.ffn, Ffn::Moe(_)))
        .count();
    let _ = writeln!(
        log,
        "dsv3 forward: {}: {} of {} layers loaded ({} dense, {moe} MoE), {} MTP module(s) loaded{}; hidden {}, vocab {}, {} shard(s) opened",
        args.model.display(),
        model.blocks.len(),
        c.num_hidden_layers,
        model.blocks.len() - moe,
        model.mtp.len(),
        if args.mtp { "" } else { " and not run" },
        c.hidden_size,
        c.vocab_size,
        ck.opened_shards().len()
    );
    if args.mtp && model.mtp.is_empty() {
        return Err(Error::Usage(format!(
            "--mtp: {} has no MTP module loaded (num_nextn_predict_layers = {}; its tensors are model.layers.{}.*{})",
            args.model.display(),
            c.num_nextn_predict_layers,
            c.num_hidden_layers,
            if args.layers.is_some() { ", which --layers must select" } else { "" }
        )));
    }
    if args.mtp && args.layers.is_none() && model.mtp.len() < c.num_nextn_predict_layers {
        let missing = (c.num_hidden_layers..c.total_layers())
            .find(|l| !ck.has_prefix(&format!("model.layers.{l}.")))
            .unwrap_or(c.num_hidden_layers);
        return Err(Error::Usage(format!(
            "--mtp: {} declares num_nextn_predict_layers = {} but holds {} MTP module(s): no tensors model.layers.{missing}.* (run the modules present with --layers, or fix the config)",
            args.model.display(),
            c.num_nextn_predict_layers,
            model.mtp.len(),
        )));
    }
    if args.layers.is_none() {
        let unused = ck.unused();
        if !unused.is_empty() {
            let _ = writeln!(
                log,
                "warning: {} tensor(s) of the checkpoint are not used by the model, e.g. `{}`",
                unused.len(),
                unused[0]
            );
        }
    }
    let mode = if args.decode {
        "decode (absorbed MLA, latent cache, one token at a time)".to_string()
    } else {
        format!(
            "prefill ({} MLA)",
            match args.attn {
                AttnImpl::Naive => "naive",
                AttnImpl::Absorbed => "absorbed",
            }
        )
    };
    let mtp = args.mtp.then_some(args.mtp_hidden);
    let start = Instant::now();
    let out = logits(&model, &args.tokens, args.decode, args.attn, precision, mtp)?;
    let seconds = start.elapsed().as_secs_f64();
    let _ = writeln!(
        log,
        "{mode}, precision {}, {} token(s): {seconds:.3} s ({} Linears)",
        precision_name(precision),
        args.tokens.len(),
        if args.readable {
            "readable"
        } else {
            "fast, bit-identical"
        }
    );
    let (vs_f32, mtp_vs_f32, selection_changes) = if precision == Precision::F32 {
        (None, Vec::new(), None)
    } else {
        let f32_out = logits(
            &model,
            &args.tokens,
            args.decode,
            args.attn,
            Precision::F32,
            mtp,
        )?;
        let d = max_rel_diff(&out.main, &f32_out.main);
        let _ = writeln!(
            log,
            "{} vs f32: max|Δ|/max|ref| = {d:.3e} over {} logits",
            precision_name(precision),
            out.main.len()
        );
        let mut dm = Vec::new();
        for (j, (a, b)) in out.mtp.iter().zip(&f32_out.mtp).enumerate() {
            let r = max_rel_diff(a, b);
            let _ = writeln!(
                log,
                "{} vs f32, MTP module {}: max|Δ|/max|ref| = {r:.3e} over {} logits",
                precision_name(precision),
                j + 1,
                a.len()
            );
            dm.push(r);
        }
        let changed = report_selection_changes(&model, &args.tokens, precision, mtp, log)?;
        (Some(d), dm, Some(changed))
    };
    let losses = if args.mtp {
        report_mtp(&model, &out, &args.tokens, args.mtp_hidden, log)?
    } else {
        None
    };
    if let Some(path) = &args.out {
        let mut tensors = TensorMap::new();
        for (name, l) in std::iter::once(("logits".to_string(), &out.main)).chain(
            out.mtp
                .iter()
                .enumerate()
                .map(|(j, l)| (mtp_tensor_name(j + 1), l)),
        ) {
            let values: Vec<f32> = l.iter().copied().collect();
            tensors.insert(name, Tensor::from_f32(vec![l.nrows(), l.ncols()], &values));
        }
        let meta = serde_json::json!({
            "model": args.model.display().to_string(),
            "tokens": args.tokens,
            "precision": precision_name(precision),
            "mode": mode,
            "layers": args.layers,
            "mtp_hidden": args.mtp.then(|| format!("{:?}", args.mtp_hidden)),
        });
        io::save(
            path,
            &tensors,
            Some(HashMap::from([(
                "dsv3_forward".to_string(),
                meta.to_string(),
            )])),
        )?;
        let names: Vec<String> = tensors
            .iter()
            .map(|(n, t)| format!("{n} {:?}", t.shape))
            .collect();
        let _ = writeln!(log, "{} written to {}", names.join(", "), path.display());
    }
    Ok(ForwardReport {
        logits: out.main,
        mtp_logits: out.mtp,
        seconds,
        vs_f32,
        mtp_vs_f32,
        selection_changes,
        mtp_module_losses: losses,
    })
}

/// `f32`, `bf16`, `fp8` (`fp8 (ue8m0 scales)` with V3.1's activation scales).
pub fn precision_name(p: Precision) -> String {
    match p {
        Precision::F32 => "f32".into(),
        Precision::Bf16 => "bf16".into(),
        Precision::Fp8 { scale_fmt } => match scale_fmt {
            dsv3_reference::fp8::ScaleFmt::F32 => "fp8".into(),
            dsv3_reference::fp8::ScaleFmt::Ue8m0 => "fp8 (ue8m0 scales)".into(),
        },
    }
}

/// Print which (token, MoE layer) expert selections `precision` changes against f32 (naive
/// prefill; the MTP blocks too with `mtp`): a changed selection is a discontinuity that no
/// rounding-error bound on the logits covers.
fn report_selection_changes(
    model: &Model,
    tokens: &[usize],
    precision: Precision,
    mtp: Option<MainHidden>,
    log: &mut dyn Write,
) -> Result<usize> {
    let low = model.expert_selection(tokens, precision, mtp)?;
    let reference = model.expert_selection(tokens, Precision::F32, mtp)?;
    let (mut changed, mut total, mut where_) = (0, 0, Vec::new());
    for ((layer, a), (_, b)) in low.iter().zip(&reference) {
        for (t, (ra, rb)) in a.rows().into_iter().zip(b.rows()).enumerate() {
            total += 1;
            if ra != rb {
                changed += 1;
                where_.push(format!("layer {layer} token {t}: {rb} → {ra}"));
            }
        }
    }
    if total > 0 {
        let _ = writeln!(
            log,
            "expert selection vs f32 (naive prefill): {changed} of {total} (token, MoE layer) selections differ{}{}",
            if where_.is_empty() { "" } else { ": " },
            where_.join("; ")
        );
    }
    Ok(changed)
}

/// Print each MTP module's next-next-token predictions (top 5 per row) and its loss.
fn report_mtp(
    model: &Model,
    out: &Logits,
    tokens: &[usize],
    h0: MainHidden,
    log: &mut dyn Write,
) -> Result<Option<Vec<f64>>> {
    for (j, l) in out.mtp.iter().enumerate() {
        let k = j + 1;
        let _ = writeln!(
            log,
            "MTP module {k} (layer {}, h^0 {}): logits [{}, {}]; row i reads h^{}_i and t[i+{k}], predicts t[i+{}]",
            model.mtp[j].layer,
            match h0 {
                MainHidden::BeforeFinalNorm => "before the final norm",
                MainHidden::AfterFinalNorm => "after the final norm",
            },
            l.nrows(),
            l.ncols(),
            k - 1,
            k + 1
        );
        for (i, row) in l.rows().into_iter().enumerate() {
            let target = tokens
                .get(i + k + 1)
                .map_or("(beyond the input)".to_string(), |t| t.to_string());
            let best: Vec<String> = top(row, 5)
                .iter()
                .map(|(id, v)| format!("{id}:{v:.4}"))
                .collect();
            let _ = writeln!(
                log,
                "  row {i}: t[{}] = {} → t[{}] = {target}; top-5 {}",
                i + k,
                tokens[i + k],
                i + k + 1,
                best.join(" ")
            );
        }
    }
    let losses = mtp_module_losses(&out.mtp, tokens)?;
    match &losses {
        Some(ls) => {
            for (j, l) in ls.iter().enumerate() {
                let _ = writeln!(
                    log,
                    "L^{}_MTP = {l:.6} (eq. (24): input t[0..={}], targets t[{}..={}], sum over {} rows / T = {})",
                    j + 1,
                    tokens.len() - 2,
                    j + 2,
                    tokens.len() - 1,
                    tokens.len() - 2 - j,
                    tokens.len() - 1
                );
            }
            let lambda = mtp_lambda(0.0);
            let _ = writeln!(
                log,
                "L_MTP = λ/D·Σ_k L^k_MTP = {:.6} (eq. (25), λ = {lambda}: the first 10T tokens; 0.1 after)",
                mtp_loss(ls, lambda)?
            );
        }
        None => {
            let _ = writeln!(
                log,
                "L_MTP needs at least {} tokens (the last one is the target t_(T+1))",
                out.mtp.len() + 2
            );
        }
    }
    Ok(losses)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_and_layers_parse_and_name_bad_items() {
        assert_eq!(parse_tokens("1, 2,3").unwrap(), vec![1, 2, 3]);
        let e = parse_tokens("1,x").unwrap_err().to_string();
        assert!(e.contains("item 1 is `x`"), "{e}");
        assert_eq!(parse_layers("0,3-5").unwrap(), vec![0, 3, 4, 5]);
        assert!(parse_layers("5-3").is_err());
        assert!(parse_layers("a").is_err());
    }
}
