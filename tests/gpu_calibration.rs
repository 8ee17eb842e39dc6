//! The GPU calibration's CPU side (issue 16): `dsv3 run --backend` refuses what it cannot run
//! with exit 2, and `dsv3 judge-calibration` names the Tensor Core parameters an output follows
//! (here outputs of the model itself with known parameters stand in for a GPU's).

use std::path::Path;
use std::process::{Command, Output};

use dsv3::registry::check::read_config;
use dsv3::registry::io::{self, TensorMap};
use dsv3::registry::rng::Rng;
use dsv3::registry::{without_aux, Sizes};

fn dsv3(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dsv3"))
        .args(args)
        .output()
        .expect("run dsv3")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn scratch(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("dsv3-calib-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn run_backend_refuses_unknown_backends_and_missing_devices() {
    let dir = scratch("backend");
    let input = dir.join("ab.safetensors");
    let i = input.to_str().unwrap();
    let out = dir.join("c.safetensors");
    let o = out.to_str().unwrap();
    assert!(dsv3(&["gen", "fp8_gemm", "--out", i]).status.success());
    // (op, backend, what the refusal says); no device: simt cannot run here
    let mut cases = vec![
        (
            "fp8_gemm",
            "nope",
            "no such backend; this op has simt, wgmma",
        ),
        ("fp8_gemm", "wgmma", "declines this config"),
        ("swiglu_backward", "cuda", "this op has no GPU backend"),
    ];
    if dsv3::registry::gpu::device().is_err() {
        cases.push(("fp8_gemm", "simt", "no GPU"));
    }
    for (op, backend, needle) in cases {
        let r = dsv3(&["run", op, "--inputs", i, "--out", o, "--backend", backend]);
        assert_eq!(r.status.code(), Some(2), "{op} {backend}: {}", text(&r));
        assert!(text(&r).contains(needle), "{op} {backend}: {}", text(&r));
    }
}

/// The reference's `c` for `fields` (f32 out).
fn model_output(inputs: &TensorMap, fields: &str) -> dsv3::registry::tensor::Tensor {
    let op = dsv3::ops::find("fp8_gemm").unwrap();
    let cfg = read_config(op, Some(&format!(r#"{{"out_dtype":"f32"{fields}}}"#))).unwrap();
    let b = op.contract().check_inputs(inputs, &cfg, "").unwrap();
    without_aux(op.run_reference(inputs, &cfg, &b).unwrap())["c"].clone()
}

#[test]
fn judge_calibration_names_the_parameters_an_output_follows() {
    let op = dsv3::ops::find("fp8_gemm").unwrap();
    let cfg = op.default_config();
    let sizes: Sizes = [("M", 16), ("N", 128), ("K", 512)].into_iter().collect();
    let mut dump = op.generate_inputs(&mut Rng::new(5), &cfg, &sizes).unwrap();
    let inputs = dump.clone();
    let tc = r#","accumulation":"tensor_core""#;
    dump.insert("c_wgmma".into(), model_output(&inputs, tc));
    dump.insert(
        "c_floor".into(),
        model_output(&inputs, &format!(r#"{tc},"term_cut":"floor""#)),
    );
    dump.insert("c_simt".into(), model_output(&inputs, ""));
    let dir = scratch("judge");
    io::save(dir.join("calib_small.safetensors"), &dump, None).unwrap();
    let r = dsv3(&["judge-calibration", dir.to_str().unwrap()]);
    let out = text(&r);
    assert!(r.status.success(), "{out}");
    let row = |k: &str| {
        out.lines()
            .find(|l| l.starts_with(&format!("small | {k} |")))
            .unwrap_or_else(|| panic!("no {k} row: {out}"))
            .to_string()
    };
    let hopper = "F=13 L=32 cut=toward_zero write-back=toward_zero";
    let wgmma = row("wgmma");
    assert!(
        wgmma.contains(hopper) && !wgmma.contains("cut=floor") && wgmma.contains("| PASS |"),
        "{wgmma}"
    );
    let floor = row("floor");
    assert!(
        floor.contains("F=13 L=32 cut=floor write-back=toward_zero") && !floor.contains(hopper),
        "{floor}"
    );
    let simt = row("simt");
    assert!(
        simt.starts_with("small | simt | PASS | PASS | none of 24 sets"),
        "{simt}"
    );
    // an empty folder is a usage error
    let empty = scratch("empty");
    let r = dsv3(&["judge-calibration", empty.to_str().unwrap()]);
    assert_eq!(r.status.code(), Some(2), "{}", text(&r));
    assert!(Path::new(&empty).exists());
}
