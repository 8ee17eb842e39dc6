//! What a CI user expects of the CLI (issue 10): JUnit XML, versioned JSON reports with the
//! inputs' sha256, `ops --json`, `--save-failures` with a command that reproduces the failure,
//! shell completions, help with examples, no progress noise in logs.

mod common;

use std::path::{Path, PathBuf};

use common::{check_file, fixture, run, s, scratch};
use serde_json::Value;

fn dsv3(args: &[&str]) -> (i32, String, String) {
    common::run(args)
}

/// The sha256 the fixture manifest records for `rel`.
fn manifest_sha(rel: &str) -> String {
    let m: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("manifest.json")).unwrap()).unwrap();
    m["files"][rel].as_str().unwrap().to_string()
}

/// An act_quant case with y[3, 100] moved by one code (a planted fault).
fn planted_fault(dir: &Path) -> PathBuf {
    let mut t = dsv3::registry::io::load(fixture("act_quant/f32_randn.safetensors")).unwrap();
    let y = t.get_mut("y").unwrap();
    let i = 3 * 512 + 100;
    y.data[i] = if y.data[i] & 0x7F == 0x7E {
        y.data[i] - 1
    } else {
        y.data[i] + 1
    };
    let p = dir.join("fault.safetensors");
    dsv3::registry::io::save(&p, &t, None).unwrap();
    p
}

#[test]
fn check_writes_junit_and_a_versioned_report_with_input_digests() {
    let d = scratch("check");
    let f = fixture("act_quant/f32_randn.safetensors");
    let (junit, report) = (d.join("check.xml"), d.join("check.json"));
    let (code, _, err) = check_file(
        "act_quant",
        &f,
        &["--junit", s(&junit), "--report", s(&report)],
    );
    assert_eq!(code, 0, "{err}");
    let x = std::fs::read_to_string(&junit).unwrap();
    assert!(
        x.starts_with("<?xml") && x.contains(r#"tests="2" failures="0" errors="0""#),
        "{x}"
    );
    assert!(
        x.contains(r#"classname="dsv3.check.act_quant" name="y""#),
        "{x}"
    );
    let j: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(j["schema_version"], 1);
    assert_eq!(j["dsv3_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(j["command"], "check");
    // inputs and outputs are one file: one digest, the manifest's
    assert_eq!(j["input_files"].as_array().unwrap().len(), 1);
    assert_eq!(
        j["input_files"][0]["sha256"],
        manifest_sha("act_quant/f32_randn.safetensors")
    );
    assert_eq!(j["pass"], true);

    // a mismatch is a <failure> naming the tensor, the count and the worst index
    let p = planted_fault(&d);
    let (code, _, _) = check_file("act_quant", &p, &["--junit", s(&junit)]);
    assert_eq!(code, 1);
    let x = std::fs::read_to_string(&junit).unwrap();
    assert!(
        x.contains(r#"failures="1""#)
            && x.contains("Mismatched elements: 1 / 32768")
            && x.contains("[3, 100]"),
        "{x}"
    );
    // bad input is an <error> (and still exit 2)
    let (code, _, _) = run(&[
        "check",
        "act_quant",
        "--inputs",
        "missing.safetensors",
        "--outputs",
        s(&p),
        "--junit",
        s(&junit),
    ]);
    assert_eq!(code, 2);
    let x = std::fs::read_to_string(&junit).unwrap();
    assert!(
        x.contains(r#"errors="1""#) && x.contains("missing.safetensors"),
        "{x}"
    );
}

#[test]
fn save_failures_writes_a_reproducible_case() {
    let d = scratch("save");
    let p = planted_fault(&d);
    let dir = d.join("failures");
    let (code, _, err) = check_file("act_quant", &p, &["--save-failures", s(&dir)]);
    assert_eq!(code, 1, "{err}");
    for f in [
        "inputs.safetensors",
        "outputs.safetensors",
        "config.json",
        "reproduce.sh",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing");
    }
    // the printed command reproduces the verdict
    let command = err
        .lines()
        .skip_while(|l| !l.contains("reproduce with"))
        .nth(1)
        .unwrap()
        .trim()
        .to_string();
    assert!(
        command.starts_with("dsv3 check act_quant --inputs"),
        "{command}"
    );
    let args: Vec<&str> = command.split_whitespace().skip(1).collect();
    let (code, out, _) = dsv3(&args);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("[3, 100]"), "{out}");
    // a passing check saves nothing
    let f = fixture("act_quant/f32_randn.safetensors");
    let none = d.join("none");
    assert_eq!(
        check_file("act_quant", &f, &["--save-failures", s(&none)]).0,
        0
    );
    assert!(!none.exists());
}

#[test]
fn verify_writes_junit_and_a_report_with_fixture_digests() {
    let d = scratch("verify");
    let (junit, report) = (d.join("verify.xml"), d.join("verify.json"));
    let (code, out, err) = run(&[
        "verify",
        "--filter",
        "act_quant",
        "--junit",
        s(&junit),
        "--report",
        s(&report),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let x = std::fs::read_to_string(&junit).unwrap();
    assert!(
        x.contains(r#"classname="dsv3.verify.act_quant" name="act_quant/f32_randn""#),
        "{x}"
    );
    assert!(x.contains(r#"failures="0" errors="0""#), "{x}");
    let j: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(j["schema_version"], 1);
    assert_eq!(j["command"], "verify");
    let files = j["input_files"].as_array().unwrap();
    assert!(files[0]["path"]
        .as_str()
        .unwrap()
        .ends_with("manifest.json"));
    let rel = "act_quant/f32_randn.safetensors";
    let entry = files
        .iter()
        .find(|f| f["path"].as_str().unwrap().ends_with(rel))
        .unwrap();
    assert_eq!(entry["sha256"], manifest_sha(rel));
}

#[test]
fn ops_json_lists_every_op_with_its_contract() {
    let (code, out, _) = dsv3(&["ops", "--json"]);
    assert_eq!(code, 0);
    let j: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["schema_version"], 1);
    let ops = j["ops"].as_array().unwrap();
    assert_eq!(ops.len(), dsv3::ops::REGISTRY.len());
    let gate = ops.iter().find(|o| o["name"] == "moe_gate").unwrap();
    assert_eq!(gate["inputs"][0]["name"], "x");
    assert_eq!(gate["inputs"][0]["shape"], "[N, D]");
    let top_k = gate["config"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "top_k")
        .unwrap();
    assert_eq!(top_k["default"], 8);
    assert_eq!(top_k["domain"], "int in 1..=65536");
    let (code, one, _) = dsv3(&["ops", "moe_gate", "--json"]);
    assert_eq!(code, 0);
    assert_eq!(serde_json::from_str::<Value>(&one).unwrap(), *gate);
}

#[test]
fn completions_help_examples_and_no_progress_in_logs() {
    for shell in ["bash", "zsh", "fish"] {
        let (code, out, _) = dsv3(&["completions", shell]);
        assert_eq!(code, 0);
        assert!(out.contains("dsv3") && out.contains("check"), "{shell}");
    }
    let (code, _, err) = dsv3(&["completions", "tcsh"]);
    assert_eq!(code, 2, "{err}");
    let (code, out, _) = dsv3(&["check", "--help"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("Examples:") && out.contains("--save-failures"),
        "{out}"
    );
    // stderr is a pipe here: no progress line (no carriage returns) however long the check
    let f = fixture("fp8_gemm/bf16_randn.safetensors");
    let (_, _, err) = dsv3(&["check", "fp8_gemm", "--inputs", s(&f), "--outputs", s(&f)]);
    assert!(!err.contains('\r'), "{err:?}");
}

/// `dsv3 ops --json | head -c 100`: the reader closes the pipe early and dsv3 ends quietly
/// (SIGPIPE's default), not with a "failed printing to stdout" panic.
#[test]
fn a_closed_pipe_ends_output_without_a_panic() {
    use std::io::Read;
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_dsv3"))
        .args(["ops", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 100];
    child.stdout.take().unwrap().read_exact(&mut first).unwrap(); // dropped: the pipe closes
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(String::from_utf8_lossy(&first).contains("dsv3_version"));
}
