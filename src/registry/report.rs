//! Machine-readable reports for CI: the JSON envelope (`--report`) and JUnit XML (`--junit`).
//!
//! Every JSON report carries [`SCHEMA_VERSION`], the dsv3 version and the sha256 of each file
//! the verdict was computed from, so a stored report says exactly what it judged. JUnit XML is
//! the format CI systems (GitHub Actions, GitLab, Jenkins) read test results from: one
//! `<testcase>` per judged tensor (`check`) or fixture case (`verify`), a `<failure>` for a
//! mismatch, an `<error>` for bad input.

use std::path::{Path, PathBuf};

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::registry::check::CheckReport;
use crate::registry::error::{Error, Result};
use crate::verify::VerifyReport;

/// Version of the JSON report layout: bumped when a field changes meaning or disappears.
pub const SCHEMA_VERSION: u32 = 1;

/// A file a verdict was computed from.
#[derive(Debug, Clone, Serialize)]
pub struct FileDigest {
    pub path: String,
    pub sha256: String,
}

/// The sha256 of a file (hex), read through a memory map.
pub fn sha256_file(path: &Path) -> Result<String> {
    crate::registry::io::require_regular_file(path)?;
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    if len == 0 {
        return Ok(hex(&Sha256::digest([])));
    }
    // SAFETY: read-only mapping of a file dsv3 does not modify while it is mapped.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    Ok(hex(&Sha256::digest(&map[..])))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The digests of `paths`, each file once (inputs and outputs may be one file).
pub fn digests(paths: &[PathBuf]) -> Result<Vec<FileDigest>> {
    let mut out: Vec<FileDigest> = Vec::new();
    for p in paths {
        let path = p.display().to_string();
        if out.iter().any(|d| d.path == path) {
            continue;
        }
        out.push(FileDigest {
            sha256: sha256_file(p)?,
            path,
        });
    }
    Ok(out)
}

/// A JSON report: the envelope's fields, then the report's own (flattened).
#[derive(Debug, Serialize)]
pub struct Envelope<'a, T: Serialize> {
    pub schema_version: u32,
    pub dsv3_version: &'static str,
    /// The subcommand (`check`, `verify`).
    pub command: &'static str,
    /// The files the verdict was computed from, with their sha256.
    pub input_files: Vec<FileDigest>,
    #[serde(flatten)]
    pub report: &'a T,
}

impl<'a, T: Serialize> Envelope<'a, T> {
    pub fn new(command: &'static str, input_files: Vec<FileDigest>, report: &'a T) -> Self {
        Envelope {
            schema_version: SCHEMA_VERSION,
            dsv3_version: env!("CARGO_PKG_VERSION"),
            command,
            input_files,
            report,
        }
    }

    /// Pretty JSON with a final newline.
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self)
            .map(|s| s + "\n")
            .map_err(|e| Error::Internal(format!("serializing a report: {e}")))
    }
}

/// One JUnit test case.
pub struct TestCase {
    pub classname: String,
    pub name: String,
    pub seconds: f64,
    pub outcome: Outcome,
    /// Extra text (`<system-out>`): the table row, the policy.
    pub detail: String,
}

/// What happened to a JUnit test case.
pub enum Outcome {
    Passed,
    /// A mismatch: short message, long text.
    Failure(String, String),
    /// Bad input (exit 2).
    Error(String),
    /// Not run, with the reason (a GPU backend without a device).
    Skipped(String),
}

/// A JUnit XML document of one test suite.
pub fn junit(suite: &str, cases: &[TestCase]) -> String {
    let count = |f: fn(&Outcome) -> bool| cases.iter().filter(|c| f(&c.outcome)).count();
    let failures = count(|o| matches!(o, Outcome::Failure(..)));
    let errors = count(|o| matches!(o, Outcome::Error(_)));
    let skipped = count(|o| matches!(o, Outcome::Skipped(_)));
    let time: f64 = cases.iter().map(|c| c.seconds).sum();
    let mut x = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    x += &format!(
        "<testsuites name=\"dsv3\" tests=\"{}\" failures=\"{failures}\" errors=\"{errors}\" skipped=\"{skipped}\" time=\"{time:.3}\">\n",
        cases.len()
    );
    x += &format!(
        "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{failures}\" errors=\"{errors}\" skipped=\"{skipped}\" time=\"{time:.3}\">\n",
        esc(suite),
        cases.len()
    );
    for c in cases {
        x += &format!(
            "    <testcase classname=\"{}\" name=\"{}\" time=\"{:.3}\">\n",
            esc(&c.classname),
            esc(&c.name),
            c.seconds
        );
        match &c.outcome {
            Outcome::Passed => {}
            Outcome::Failure(msg, text) => {
                x += &format!(
                    "      <failure message=\"{}\" type=\"mismatch\">{}</failure>\n",
                    esc(msg),
                    esc(text)
                )
            }
            Outcome::Error(msg) => {
                x += &format!(
                    "      <error message=\"{}\" type=\"bad input\">{}</error>\n",
                    esc(msg),
                    esc(msg)
                )
            }
            Outcome::Skipped(why) => x += &format!("      <skipped message=\"{}\"/>\n", esc(why)),
        }
        if !c.detail.is_empty() {
            x += &format!("      <system-out>{}</system-out>\n", esc(&c.detail));
        }
        x += "    </testcase>\n";
    }
    x += "  </testsuite>\n</testsuites>\n";
    x
}

/// XML-escape text and attribute values (and drop the control characters XML 1.0 forbids).
fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => o += "&amp;",
            '<' => o += "&lt;",
            '>' => o += "&gt;",
            '"' => o += "&quot;",
            '\'' => o += "&apos;",
            '\n' | '\t' | '\r' => o.push(ch),
            c if (c as u32) < 0x20 => {}
            c => o.push(c),
        }
    }
    o
}

/// JUnit cases of a `check` report: one per output tensor.
pub fn check_cases(r: &CheckReport) -> Vec<TestCase> {
    let per = r.reference_seconds / r.tensors.len().max(1) as f64;
    r.tensors
        .iter()
        .map(|t| TestCase {
            classname: format!("dsv3.check.{}", r.op),
            name: t.name.clone(),
            seconds: per,
            outcome: if t.pass {
                Outcome::Passed
            } else {
                let worst = t.worst.as_ref().map_or("-".into(), |w| {
                    format!("{:?}: got {} vs ref {}", w.index, w.got, w.want)
                });
                Outcome::Failure(
                    format!(
                        "{}: Mismatched elements: {} / {} ({:.6}%); worst {worst}",
                        t.name,
                        t.violations,
                        t.numel - t.ignored,
                        100.0 * t.violations as f64 / (t.numel - t.ignored).max(1) as f64
                    ),
                    t.first_violations
                        .iter()
                        .map(|v| {
                            format!(
                                "{:?}: got {} vs ref {} (|Δ| {})",
                                v.index, v.got, v.want, v.abs_err
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("\n"),
                )
            },
            detail: format!(
                "{} {:?}: exact {}/{}; policy {}",
                t.dtype,
                t.shape,
                t.exact,
                t.numel - t.ignored,
                t.policy
            ),
        })
        .collect()
}

/// JUnit cases of a `verify` report: one per fixture case and GPU verdict.
pub fn verify_cases(r: &VerifyReport) -> Vec<TestCase> {
    let mut out = Vec::new();
    for c in &r.cases {
        out.push(TestCase {
            classname: format!("dsv3.verify.{}", c.op),
            name: c.case.clone(),
            seconds: 0.0,
            outcome: match (&c.pass, &c.detail) {
                (true, _) => Outcome::Passed,
                (false, Some(d)) if d.starts_with("error:") => Outcome::Error(d.clone()),
                (false, d) => Outcome::Failure(
                    format!("{}: oracle vs reference mismatch", c.case),
                    d.clone().unwrap_or_default(),
                ),
            },
            detail: format!("oracle: {}; compare: {}", c.oracle, c.compare),
        });
        if !c.gpu.is_empty() && c.gpu != "-" {
            out.push(TestCase {
                classname: format!("dsv3.verify.gpu.{}", c.op),
                name: c.case.clone(),
                seconds: 0.0,
                outcome: match c.gpu_pass {
                    Some(true) => Outcome::Passed,
                    Some(false) => {
                        Outcome::Failure(format!("{}: GPU vs reference", c.case), c.gpu.clone())
                    }
                    None => Outcome::Skipped(c.gpu.clone()),
                },
                detail: String::new(),
            });
        }
    }
    out
}

/// Write `text` to `path` ([`crate::registry::io::write_file`]) and say so on stderr.
pub fn write_text(path: &Path, text: &str, what: &str) -> Result<()> {
    crate::registry::io::write_file(path, text.as_bytes())?;
    eprintln!("{what} written to {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn junit_counts_and_escapes() {
        let x = junit(
            "dsv3 check",
            &[
                TestCase {
                    classname: "dsv3.check.op".into(),
                    name: "y".into(),
                    seconds: 0.5,
                    outcome: Outcome::Passed,
                    detail: String::new(),
                },
                TestCase {
                    classname: "dsv3.check.op".into(),
                    name: "s".into(),
                    seconds: 0.25,
                    outcome: Outcome::Failure("a < b & \"c\"".into(), "x\u{1}y".into()),
                    detail: String::new(),
                },
                TestCase {
                    classname: "dsv3.check.op".into(),
                    name: "z".into(),
                    seconds: 0.0,
                    outcome: Outcome::Skipped("no device".into()),
                    detail: String::new(),
                },
            ],
        );
        assert!(
            x.contains(r#"tests="3" failures="1" errors="0" skipped="1" time="0.750""#),
            "{x}"
        );
        assert!(
            x.contains(r#"message="a &lt; b &amp; &quot;c&quot;""#),
            "{x}"
        );
        assert!(x.contains(">xy</failure>"), "{x}");
        assert!(x.contains(r#"<skipped message="no device"/>"#), "{x}");
    }

    #[test]
    fn sha256_of_a_known_file() {
        let p = std::env::temp_dir().join(format!("dsv3-sha-{}", std::process::id()));
        std::fs::write(&p, b"abc").unwrap();
        // FIPS 180-2, appendix B.1
        assert_eq!(
            sha256_file(&p).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        let _ = std::fs::remove_file(&p);
    }
}
