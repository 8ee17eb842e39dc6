//! `dsv3 forward`: logits of one token sequence from a model directory.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use ndarray::Array2;

use dsv3_reference::linear::Precision;
use dsv3_reference::model::{AttnImpl, Ffn, Model};

use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::io::{self, TensorMap};
use crate::tensor::Tensor;

/// What to run.
#[derive(Debug, Clone)]
pub struct ForwardArgs {
    pub model: PathBuf,
    pub tokens: Vec<usize>,
    pub out: Option<PathBuf>,
    /// Feed the tokens one at a time through the absorbed MLA and its latent cache.
    pub decode: bool,
    pub precision: Precision,
    /// Main (and MTP) layers to load; `None` = all.
    pub layers: Option<Vec<usize>>,
    /// The MLA form of a prefill (ignored with `decode`).
    pub attn: AttnImpl,
}

/// What happened.
#[derive(Debug, Clone)]
pub struct ForwardReport {
    /// `[T, vocab]`.
    pub logits: Array2<f32>,
    pub seconds: f64,
    /// `max|Δ| / max|ref|` of the logits against an f32 run, for other precisions.
    pub vs_f32: Option<f64>,
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

/// Logits of `tokens` under `precision`.
pub fn logits(
    model: &Model,
    tokens: &[usize],
    decode: bool,
    attn: AttnImpl,
    precision: Precision,
) -> Result<Array2<f32>> {
    Ok(if decode {
        model.decode(tokens, precision)?
    } else {
        model.forward(tokens, attn, precision)?
    })
}

/// Load, run, write `logits` F32 `[T, vocab]`; progress lines go to `log`.
pub fn run(args: &ForwardArgs, log: &mut dyn Write) -> Result<ForwardReport> {
    if args.tokens.is_empty() {
        return Err(Error::Usage("--tokens: no tokens given".into()));
    }
    let ck = Checkpoint::open(&args.model)?;
    for w in &ck.warnings {
        let _ = writeln!(log, "warning: {w}");
    }
    let model = ck.load(args.layers.as_deref())?;
    let c = &model.config;
    let moe = model
        .blocks
        .iter()
        .filter(|b| matches!(b.ffn, Ffn::Moe(_)))
        .count();
    let _ = writeln!(
        log,
        "dsv3 forward: {}: {} of {} layers loaded ({} dense, {moe} MoE), {} MTP module(s) loaded and not run; hidden {}, vocab {}, {} shard(s) opened",
        args.model.display(),
        model.blocks.len(),
        c.num_hidden_layers,
        model.blocks.len() - moe,
        model.mtp.len(),
        c.hidden_size,
        c.vocab_size,
        ck.opened_shards().len()
    );
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
    let start = Instant::now();
    let out = logits(&model, &args.tokens, args.decode, args.attn, args.precision)?;
    let seconds = start.elapsed().as_secs_f64();
    let _ = writeln!(
        log,
        "{mode}, precision {:?}, {} token(s): {seconds:.3} s",
        args.precision,
        args.tokens.len()
    );
    let vs_f32 = if args.precision == Precision::F32 {
        None
    } else {
        let f32_logits = logits(&model, &args.tokens, args.decode, args.attn, Precision::F32)?;
        let d = max_rel_diff(&out, &f32_logits);
        let _ = writeln!(
            log,
            "{:?} vs f32: max|Δ|/max|ref| = {d:.3e} over {} logits",
            args.precision,
            out.len()
        );
        Some(d)
    };
    if let Some(path) = &args.out {
        let shape = vec![out.nrows(), out.ncols()];
        let values: Vec<f32> = out.iter().copied().collect();
        let tensors = TensorMap::from([("logits".to_string(), Tensor::from_f32(shape, &values))]);
        let meta = serde_json::json!({
            "model": args.model.display().to_string(),
            "tokens": args.tokens,
            "precision": format!("{:?}", args.precision).to_lowercase(),
            "mode": mode,
            "layers": args.layers,
        });
        io::save(
            path,
            &tensors,
            Some(HashMap::from([(
                "dsv3_forward".to_string(),
                meta.to_string(),
            )])),
        )?;
        let _ = writeln!(
            log,
            "logits [{}, {}] written to {}",
            out.nrows(),
            out.ncols(),
            path.display()
        );
    }
    Ok(ForwardReport {
        logits: out,
        seconds,
        vs_f32,
    })
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
