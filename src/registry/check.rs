//! `dsv3 check`: recompute an op's outputs with the reference and judge a candidate's outputs.

use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use crate::registry::compare::{compare, TensorReport};
use crate::registry::config::Config;
use crate::registry::error::{Error, Result};
use crate::registry::io::{SafeFile, TensorMap};
use crate::registry::table::Table;
use crate::registry::{OpEntry, PolicyCtx};

/// How outputs are judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Each output under its op's tolerance policy.
    Policy,
    /// Every output bit-identical to the reference.
    Exact,
}

impl Mode {
    /// The manifest's and the JSON report's spelling (`"policy"`, `"exact"`).
    pub fn name(self) -> &'static str {
        match self {
            Mode::Policy => "policy",
            Mode::Exact => "exact",
        }
    }
}

/// The verdict on one set of outputs.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub op: String,
    pub config: serde_json::Value,
    pub mode: Mode,
    pub tensors: Vec<TensorReport>,
    pub reference_seconds: f64,
    pub pass: bool,
}

/// Validate `inputs` and `candidate` against `op`'s contract, run the reference, and compare.
/// `places` name where inputs and outputs came from, for error messages.
pub fn check(
    op: &OpEntry,
    inputs: &TensorMap,
    candidate: &TensorMap,
    config: &Config,
    mode: Mode,
    places: (&str, &str),
) -> Result<CheckReport> {
    let contract = op.contract();
    // the layouts kernels emit (packed or MN-major scales, int32 ids): src/registry/adapt.rs
    let adapted = op.adapt_inputs(inputs, config, places.0)?;
    let inputs = adapted.as_ref().unwrap_or(inputs);
    let bindings = contract.check_inputs(inputs, config, places.0)?;
    let start = Instant::now();
    let reference = op.run_reference(inputs, config, &bindings)?;
    let reference_seconds = start.elapsed().as_secs_f64();
    let widened = crate::registry::adapt::adapt_outputs(candidate, &reference);
    let candidate = widened.as_ref().unwrap_or(candidate);
    contract.check_outputs(candidate, &reference, &bindings, config, places.1)?;
    let tensors = judge(op, inputs, candidate, &reference, config, mode);
    let pass = tensors.iter().all(|t| t.pass);
    Ok(CheckReport {
        op: op.name.to_string(),
        config: config.as_json(),
        mode,
        tensors,
        reference_seconds,
        pass,
    })
}

/// Compare every output of `candidate` with `reference` (both validated).
pub fn judge(
    op: &OpEntry,
    inputs: &TensorMap,
    candidate: &TensorMap,
    reference: &TensorMap,
    config: &Config,
    mode: Mode,
) -> Vec<TensorReport> {
    op.outputs
        .iter()
        .map(|spec| {
            let ctx = PolicyCtx {
                output: spec.name,
                inputs,
                candidate,
                reference,
                config,
            };
            // --exact keeps the contract's undefined elements out of the comparison
            let policy = match mode {
                Mode::Exact => (op.policy)(&ctx).into_exact(),
                Mode::Policy => (op.policy)(&ctx),
            };
            compare(
                spec.name,
                &candidate[spec.name],
                &reference[spec.name],
                &policy,
            )
        })
        .collect()
}

/// Load the tensors of `inputs` and `outputs` (the same file may hold both: its tensors are
/// split by the contract's input names).
pub fn load_pair(op: &OpEntry, inputs: &Path, outputs: &Path) -> Result<(TensorMap, TensorMap)> {
    let same = inputs == outputs
        || std::fs::canonicalize(inputs)
            .ok()
            .zip(std::fs::canonicalize(outputs).ok())
            .is_some_and(|(a, b)| a == b);
    let a = SafeFile::open(inputs)?.load_all()?;
    if same {
        let (ins, outs): (TensorMap, TensorMap) = a
            .into_iter()
            .partition(|(k, _)| op.inputs.iter().any(|s| s.name == k));
        return Ok((ins, outs));
    }
    let b = SafeFile::open(outputs)?.load_all()?;
    Ok((a, b))
}

/// Save a failing check so it can be reproduced anywhere (`--save-failures DIR`, Python's
/// `save_to`): `DIR/inputs.safetensors`, `DIR/outputs.safetensors`, `DIR/config.json` and
/// `DIR/reproduce.sh`. Returns the one-line command that reproduces the verdict.
pub fn save_failure(
    dir: &Path,
    op: &OpEntry,
    inputs: &TensorMap,
    outputs: &TensorMap,
    config: &Config,
) -> Result<String> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let (i, o, c) = (
        dir.join("inputs.safetensors"),
        dir.join("outputs.safetensors"),
        dir.join("config.json"),
    );
    crate::registry::io::save(&i, inputs, None)?;
    crate::registry::io::save(&o, outputs, None)?;
    let cfg = serde_json::to_string_pretty(&config.as_json()).unwrap_or_default() + "\n";
    crate::registry::io::write_file(&c, cfg.as_bytes())?;
    let command = format!(
        "dsv3 check {} --inputs {} --outputs {} --config {}",
        op.name,
        shell_quote(&i),
        shell_quote(&o),
        shell_quote(&c)
    );
    crate::registry::io::write_file(
        &dir.join("reproduce.sh"),
        format!("#!/bin/sh\n# reproduces a failing `dsv3 check` (exit 1)\n{command}\n").as_bytes(),
    )?;
    Ok(command)
}

/// A path as one shell word.
fn shell_quote(p: &Path) -> String {
    let s = p.display().to_string();
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+=:,@".contains(c))
    {
        s
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Read `--config`: a path to a JSON file, or inline JSON starting with `{`.
pub fn read_config(op: &OpEntry, arg: Option<&str>) -> Result<Config> {
    let raw = match arg {
        None => serde_json::Value::Null,
        Some(s) if s.trim_start().starts_with('{') => {
            serde_json::from_str(s).map_err(|e| Error::Config {
                op: op.name,
                msg: format!("inline JSON: {e}"),
            })?
        }
        Some(path) => {
            let text = crate::registry::io::read_text(Path::new(path))?;
            serde_json::from_str(&text).map_err(|e| Error::Config {
                op: op.name,
                msg: format!("{path}: {e}"),
            })?
        }
    };
    op.parse_config(&raw)
}

/// Human-readable report: one table row per output tensor, then the worst elements.
pub fn render(report: &CheckReport) -> String {
    let mut t = Table::new(&[
        "tensor",
        "dtype",
        "shape",
        "exact",
        "max|Δ|",
        "max rel",
        "max ulp",
        "ulp 0/1/2/>2",
        "1-2Σxy/Σ(x²+y²)",
        "worst (index: got vs ref)",
        "verdict",
    ]);
    for r in &report.tensors {
        t.row(vec![
            r.name.clone(),
            r.dtype.clone(),
            format!("{:?}", r.shape),
            format!(
                "{}/{} ({:.6}%)",
                r.exact,
                r.numel - r.ignored,
                100.0 * r.exact_fraction
            ),
            fmt_num(r.max_abs),
            fmt_num(r.max_rel),
            if r.max_ulp == u64::MAX {
                "NaN".into()
            } else {
                r.max_ulp.to_string()
            },
            format!(
                "{}/{}/{}/{}",
                r.ulp_counts[0], r.ulp_counts[1], r.ulp_counts[2], r.ulp_counts[3]
            ),
            format!("{:.3e}", r.similarity_diff),
            r.worst.as_ref().map_or("-".into(), |w| {
                format!("{:?}: {} vs {}", w.index, w.got, w.want)
            }),
            if r.pass {
                "PASS".into()
            } else {
                format!("FAIL ({} bad)", r.violations)
            },
        ]);
    }
    let mut out = format!(
        "{} {} (mode: {:?}, reference {:.3}s)\n",
        report.op, report.config, report.mode, report.reference_seconds
    );
    out += &t.render();
    for r in &report.tensors {
        out += &format!(
            "  {}: policy {}; {} differing elements allowed by it\n",
            r.name, r.policy, r.allowed
        );
        if let Some(b) = &r.bound_use {
            out += &format!(
                "  {}: the worst element uses {:.4} of its bound (at {:?}), the median {:.4}\n",
                r.name, b.max, b.max_index, b.median
            );
        }
        for (reason, n) in &r.allowed_by {
            out += &format!("  {}: {n} allowed as {reason}\n", r.name);
        }
        if r.ignored > 0 {
            out += &format!(
                "  {}: {} elements not judged (undefined by the contract)\n",
                r.name, r.ignored
            );
        }
        if r.nan_mismatch > 0 {
            out += &format!(
                "  {}: {} elements are NaN on one side only\n",
                r.name, r.nan_mismatch
            );
        }
        for v in &r.first_violations {
            out += &format!(
                "  {}: violation at {:?}: got {} vs ref {} (|Δ| {}, {} ulp)\n",
                r.name,
                v.index,
                v.got,
                v.want,
                fmt_num(v.abs_err),
                v.ulp.map_or("NaN".into(), |u| u.to_string())
            );
        }
    }
    out += if report.pass {
        "verdict: PASS\n"
    } else {
        "verdict: FAIL\n"
    };
    out
}

pub fn fmt_num(x: f64) -> String {
    if x == 0.0 {
        "0".into()
    } else if x.is_infinite() {
        "inf".into()
    } else {
        format!("{x:.3e}")
    }
}
