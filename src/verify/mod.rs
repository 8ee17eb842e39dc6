//! `dsv3 verify`: every registered op against the committed fixtures of external oracles, and
//! (where a device is present) every GPU implementation against the reference.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub mod models;

use crate::ops;
use crate::registry::check::{check, fmt_num, Mode};
use crate::registry::error::{Error, Result};
use crate::registry::gpu::{self, GpuMode};
use crate::registry::io::{SafeFile, TensorMap};
use models::{run_model_case, ModelCase};

/// The manifest format this build reads.
pub const FORMAT_VERSION: u32 = 1;

const REGEN_HINT: &str =
    "restore the committed fixtures (`git checkout -- fixtures/`) or regenerate them with \
`python fixtures/gen/gen_fixtures.py` using the pinned oracles of fixtures/gen/requirements.txt";

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Manifest {
    pub format_version: u32,
    pub generator: String,
    pub command: String,
    pub seed: u64,
    pub oracles: BTreeMap<String, String>,
    /// Relative path → sha256.
    pub files: BTreeMap<String, String>,
    pub cases: Vec<Case>,
    /// The model fixtures (checkpoints with transformers' logits): [`crate::verify::models`].
    #[serde(default)]
    pub models: Vec<ModelCase>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Case {
    pub name: String,
    pub op: String,
    pub config: serde_json::Value,
    pub inputs: FileRef,
    pub outputs: FileRef,
    /// `"exact"` (bitwise against the oracle) or `"policy"` (the op's tolerance policy).
    pub compare: Mode,
    pub oracle: String,
    #[serde(default)]
    pub note: Option<String>,
    /// `"fail"`: the outputs hold a planted bug (a kernel that never promotes, a wrong scale)
    /// and the case passes when `check` rejects them; absent or `"pass"`: they must pass.
    #[serde(default)]
    pub expect: Option<String>,
}

impl Case {
    /// Whether `check` must reject the case's outputs.
    pub fn expects_failure(&self) -> bool {
        self.expect.as_deref() == Some("fail")
    }
}

/// Tensors of one file: contract name → name in the file.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct FileRef {
    pub file: String,
    pub tensors: BTreeMap<String, String>,
}

/// The fixtures directory: `fixtures/` under the working directory if it has a manifest, else
/// the one of the source tree this binary was built from.
pub fn default_fixtures_dir() -> PathBuf {
    let local = PathBuf::from("fixtures");
    if local.join("manifest.json").is_file() {
        local
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
    }
}

/// The fixture files a verify run reads, with their sha256 (the manifest's, which
/// [`load_manifest`] has checked), the manifest first.
pub fn fixture_digests(dir: &Path) -> Result<Vec<crate::registry::report::FileDigest>> {
    let manifest = dir.join("manifest.json");
    let mut out = vec![crate::registry::report::FileDigest {
        path: manifest.display().to_string(),
        sha256: crate::registry::report::sha256_file(&manifest)?,
    }];
    for (rel, sha) in load_manifest(dir)?.files {
        out.push(crate::registry::report::FileDigest {
            path: dir.join(rel).display().to_string(),
            sha256: sha,
        });
    }
    Ok(out)
}

/// Read the manifest and check its version and every file's sha256.
pub fn load_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::Fixture {
        msg: format!("{}: {e}", path.display()),
        hint: REGEN_HINT.into(),
    })?;
    let m: Manifest = serde_json::from_str(&text).map_err(|e| Error::Fixture {
        msg: format!("{}: {e}", path.display()),
        hint: REGEN_HINT.into(),
    })?;
    if m.format_version != FORMAT_VERSION {
        return Err(Error::Fixture {
            msg: format!(
                "{} has format_version {}, this dsv3 reads {FORMAT_VERSION}",
                path.display(),
                m.format_version
            ),
            hint: REGEN_HINT.into(),
        });
    }
    for (rel, want) in &m.files {
        let p = dir.join(rel);
        let bytes = std::fs::read(&p).map_err(|e| Error::Fixture {
            msg: format!("{}: {e}", p.display()),
            hint: REGEN_HINT.into(),
        })?;
        let got: String = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if &got != want {
            return Err(Error::Fixture {
                msg: format!("{} has sha256 {got}, the manifest says {want} (modified or regenerated with other oracle versions?)", p.display()),
                hint: REGEN_HINT.into(),
            });
        }
    }
    Ok(m)
}

/// The tensors a case names, renamed to the contract's names.
pub fn case_tensors(dir: &Path, r: &FileRef) -> Result<TensorMap> {
    let f = SafeFile::open(dir.join(&r.file))?;
    r.tensors
        .iter()
        .map(|(contract_name, file_name)| {
            if !f.contains(file_name) {
                return Err(Error::Fixture {
                    msg: format!("{}: no tensor `{file_name}`", f.path().display()),
                    hint: REGEN_HINT.into(),
                });
            }
            Ok((contract_name.clone(), f.tensor(file_name)?))
        })
        .collect()
}

/// One row of the verify table.
#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    pub case: String,
    pub op: String,
    pub oracle: String,
    pub compare: String,
    pub elements: usize,
    pub exact_fraction: f64,
    pub max_abs: f64,
    pub max_ulp: u64,
    pub pass: bool,
    pub detail: Option<String>,
    pub gpu: String,
    pub gpu_pass: Option<bool>,
}

impl CaseResult {
    /// A row not yet run: failing, nothing compared, no GPU.
    pub fn new(case: &str, op: &str, oracle: &str, compare: &str) -> Self {
        CaseResult {
            case: case.to_string(),
            op: op.to_string(),
            oracle: oracle.to_string(),
            compare: compare.to_string(),
            elements: 0,
            exact_fraction: 0.0,
            max_abs: 0.0,
            max_ulp: 0,
            pass: false,
            detail: None,
            gpu: "-".into(),
            gpu_pass: None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub fixtures: String,
    pub oracles: BTreeMap<String, String>,
    pub gpu_device: Option<String>,
    pub gpu_unavailable: Option<String>,
    pub cases: Vec<CaseResult>,
    pub pass: bool,
}

/// Run every case (those whose name contains `filter`), printing rows to `out` as they finish.
pub fn verify(
    dir: &Path,
    filter: Option<&str>,
    gpu_mode: GpuMode,
    out: &mut dyn Write,
) -> Result<VerifyReport> {
    let m = load_manifest(dir)?;
    for case in &m.cases {
        ops::find(&case.op).map_err(|e| Error::Fixture {
            msg: format!("case {}: {e}", case.name),
            hint: REGEN_HINT.into(),
        })?;
    }
    let device = match gpu_mode {
        GpuMode::Off => Err("disabled (--gpu off)".to_string()),
        _ => gpu::device(),
    };
    if gpu_mode == GpuMode::Require {
        if let Err(why) = &device {
            return Err(Error::Usage(format!("--gpu require: no usable GPU: {why}")));
        }
    }
    let oracles: Vec<String> = m.oracles.iter().map(|(k, v)| format!("{k} {v}")).collect();
    let models: Vec<&ModelCase> = m
        .models
        .iter()
        .filter(|c| {
            filter.is_none_or(|f| format!("model/{}", c.name).contains(f) || f == "forward")
        })
        .collect();
    let _ = writeln!(
        out,
        "dsv3 verify: {} cases and {} models from {} (oracles: {})",
        m.cases.len(),
        m.models.len(),
        dir.display(),
        oracles.join(", ")
    );
    let _ = writeln!(
        out,
        "GPU: {}",
        match &device {
            Ok(g) => gpu::describe(g),
            Err(why) => format!("not used: {why}"),
        }
    );
    let header = [
        "case",
        "oracle vs reference",
        "elements",
        "exact",
        "max|Δ|",
        "max ulp",
        "verdict",
        "GPU vs reference",
    ];
    let _ = writeln!(out, "{}", header.join(" | "));
    let mut results = Vec::new();
    let op_rows = m
        .cases
        .iter()
        .filter(|c| filter.is_none_or(|f| c.name.contains(f) || c.op == f))
        .map(|case| vec![run_case(dir, case, device.as_ref().ok().copied())]);
    let model_rows = models.into_iter().map(|c| run_model_case(dir, c));
    for r in op_rows.chain(model_rows).flatten() {
        let _ = writeln!(
            out,
            "{} | {} | {} | {:.6}% | {} | {} | {} | {}",
            r.case,
            r.compare,
            r.elements,
            100.0 * r.exact_fraction,
            fmt_num(r.max_abs),
            if r.max_ulp == u64::MAX {
                "NaN".into()
            } else {
                r.max_ulp.to_string()
            },
            if r.pass {
                r.detail
                    .as_ref()
                    .map_or("PASS".to_string(), |d| format!("PASS ({d})"))
            } else {
                format!("FAIL {}", r.detail.clone().unwrap_or_default())
            },
            r.gpu
        );
        results.push(r);
    }
    let pass = !results.is_empty() && results.iter().all(|r| r.pass && r.gpu_pass != Some(false));
    Ok(VerifyReport {
        fixtures: dir.display().to_string(),
        oracles: m.oracles.clone(),
        gpu_device: device.as_ref().ok().map(|g| gpu::describe(g)),
        gpu_unavailable: device.err(),
        cases: results,
        pass,
    })
}

fn run_case(dir: &Path, case: &Case, device: Option<&gpu::Device>) -> CaseResult {
    let mut r = CaseResult::new(&case.name, &case.op, &case.oracle, case.compare.name());
    let op = ops::find(&case.op).expect("checked in verify");
    let outcome = (|| -> Result<_> {
        let config = op.parse_config(&case.config)?;
        let inputs = case_tensors(dir, &case.inputs)?;
        let outputs = case_tensors(dir, &case.outputs)?;
        let report = check(op, &inputs, &outputs, &config, case.compare, ("", ""))?;
        Ok((config, inputs, report))
    })();
    let (config, inputs, report) = match outcome {
        Ok(x) => x,
        Err(e) => {
            r.detail = Some(format!("error: {e}"));
            return r;
        }
    };
    // elements the contract defines (grouped GEMMs leave padding rows undefined)
    r.elements = report.tensors.iter().map(|t| t.numel - t.ignored).sum();
    let exact: usize = report.tensors.iter().map(|t| t.exact).sum();
    r.exact_fraction = if r.elements == 0 {
        1.0
    } else {
        exact as f64 / r.elements as f64
    };
    r.max_abs = report.tensors.iter().map(|t| t.max_abs).fold(0.0, f64::max);
    r.max_ulp = report.tensors.iter().map(|t| t.max_ulp).max().unwrap_or(0);
    r.pass = report.pass != case.expects_failure();
    if case.expects_failure() {
        let bad: usize = report.tensors.iter().map(|t| t.violations).sum();
        r.detail = Some(if report.pass {
            "a planted bug passed: the check must reject these outputs".to_string()
        } else {
            format!("planted bug rejected as expected ({bad} bad elements)")
        });
        r.compare = format!("{} (expect fail)", r.compare);
    } else if !report.pass {
        let bad: Vec<String> = report
            .tensors
            .iter()
            .filter(|t| !t.pass)
            .map(|t| {
                format!(
                    "{}: {} bad, worst {}",
                    t.name,
                    t.violations,
                    t.worst.as_ref().map_or("-".into(), |w| format!(
                        "{:?} {} vs {}",
                        w.index, w.got, w.want
                    ))
                )
            })
            .collect();
        r.detail = Some(bad.join("; "));
    }
    let cells: Vec<String> = op
        .gpu
        .iter()
        .map(|imp| {
            if let Some(why) = imp.declines(&config) {
                return format!("{}: declined ({why})", imp.backend);
            }
            let Some(g) = device else {
                return format!("{}: no device", imp.backend);
            };
            match gpu::diff(op, imp, g, &inputs, &config) {
                Ok(d) => {
                    r.gpu_pass = Some(r.gpu_pass.unwrap_or(true) && d.pass);
                    let exact: usize = d.tensors.iter().map(|t| t.exact).sum();
                    let max_abs = d.tensors.iter().map(|t| t.max_abs).fold(0.0, f64::max);
                    format!(
                        "{}: {} exact {:.4}% max|Δ| {} {:.3} ms",
                        imp.backend,
                        if d.pass { "PASS" } else { "FAIL" },
                        100.0 * exact as f64 / r.elements.max(1) as f64,
                        fmt_num(max_abs),
                        1e3 * d.gpu_seconds
                    )
                }
                Err(e) => {
                    r.gpu_pass = Some(false);
                    format!("{}: FAIL error: {e}", imp.backend)
                }
            }
        })
        .collect();
    if !cells.is_empty() {
        r.gpu = cells.join("; ");
    }
    r
}
