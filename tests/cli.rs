//! The `dsv3` binary: exit codes (0 pass, 1 mismatch, 2 bad input), messages that name the
//! culprit, and no panics on malformed input.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use dsv3::registry::io::{self, TensorMap};
use dsv3::registry::tensor::{DType, Tensor};

fn dsv3(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dsv3"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run dsv3")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dsv3-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(rel)
}

/// Check `act_quant` on `file` (holding x, y, s) and return (exit code, stdout, stderr).
fn check_act_quant(file: &Path, extra: &[&str]) -> (i32, String, String) {
    let f = file.to_str().unwrap();
    let mut args = vec!["check", "act_quant", "--inputs", f, "--outputs", f];
    args.extend_from_slice(extra);
    let o = dsv3(&args);
    let (out, err) = text(&o);
    assert!(!err.contains("panicked"), "dsv3 panicked: {err}");
    (o.status.code().unwrap(), out, err)
}

/// `check act_quant` on `file` must exit 2 with every `needle` in its message.
fn expect_bad_input(file: &Path, needles: &[&str]) {
    let (code, _, err) = check_act_quant(file, &[]);
    assert_eq!(code, 2, "{err}");
    for needle in needles {
        assert!(err.contains(needle), "missing {needle:?} in: {err}");
    }
}

fn with_tensors(name: &str, edit: impl FnOnce(&mut TensorMap)) -> PathBuf {
    let mut t = io::load(fixture("act_quant/f32_randn.safetensors")).unwrap();
    edit(&mut t);
    let p = scratch(name).join("case.safetensors");
    io::save(&p, &t, None).unwrap();
    p
}

#[test]
fn check_passes_on_the_oracle_outputs() {
    let (code, out, _) = check_act_quant(&fixture("act_quant/f32_randn.safetensors"), &[]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("verdict: PASS") && out.contains("32768/32768 (100.000000%)"),
        "{out}"
    );
}

#[test]
fn check_fails_on_one_corrupted_code_and_names_it() {
    // x[3, 100] is far from any rounding tie: move its code by one (not a near-tie flip).
    let p = with_tensors("corrupt", |t| {
        let y = t.get_mut("y").unwrap();
        let i = 3 * 512 + 100;
        y.data[i] = if y.data[i] & 0x7F == 0x7E {
            y.data[i] - 1
        } else {
            y.data[i] + 1
        };
    });
    let report = p.with_extension("json");
    let (code, out, _) = check_act_quant(&p, &["--report", report.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("FAIL (1 bad)") && out.contains("[3, 100]"),
        "{out}"
    );
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(j["pass"], false);
    assert_eq!(j["tensors"][0]["name"], "y");
    assert_eq!(j["tensors"][0]["violations"], 1);
    assert_eq!(
        j["tensors"][0]["worst"]["index"],
        serde_json::json!([3, 100])
    );
    // the global similarity alone would have passed it
    assert!(j["tensors"][0]["similarity_diff"].as_f64().unwrap() < 1e-4);
}

#[test]
fn check_fails_on_a_wrong_scale() {
    let p = with_tensors("scale", |t| {
        let s = t.get_mut("s").unwrap();
        let v = f32::from_le_bytes(s.data[0..4].try_into().unwrap());
        s.data[0..4].copy_from_slice(&f32::from_bits(v.to_bits() + 3).to_le_bytes());
    });
    let (code, out, _) = check_act_quant(&p, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("s ") && out.contains("FAIL"), "{out}");
}

#[test]
fn truncated_file_is_bad_input() {
    let bytes = std::fs::read(fixture("act_quant/f32_randn.safetensors")).unwrap();
    let p = scratch("trunc").join("t.safetensors");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    expect_bad_input(&p, &["t.safetensors", "truncated"]);
    // shorter than the header length field
    std::fs::write(&p, &bytes[..5]).unwrap();
    expect_bad_input(&p, &["truncated"]);
}

#[test]
fn garbage_and_missing_files_are_bad_input() {
    let p = scratch("garbage").join("g.safetensors");
    let mut junk = 40u64.to_le_bytes().to_vec();
    junk.extend_from_slice(b"{\"x\": {\"dtype\": \"F32\", \"shape\": [1]}}    ");
    std::fs::write(&p, &junk).unwrap();
    expect_bad_input(&p, &["g.safetensors", "not a valid safetensors file"]);
    let (code, _, err) = check_act_quant(Path::new("/nonexistent/in.safetensors"), &[]);
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/in.safetensors"), "{err}");
}

#[test]
fn missing_extra_and_mistyped_tensors_are_named() {
    let p = with_tensors("missing", |t| {
        t.remove("s");
    });
    expect_bad_input(&p, &["missing output tensor `s`"]);

    let p = with_tensors("extra", |t| {
        t.insert("bias".into(), Tensor::from_f32(vec![1], &[0.0]));
    });
    expect_bad_input(&p, &["unexpected output tensor `bias`"]);

    let p = with_tensors("u8codes", |t| {
        let y = t.get_mut("y").unwrap();
        y.dtype = DType::U8;
    });
    expect_bad_input(&p, &["`y` has dtype U8; expected F8_E4M3", "float8_e4m3fn"]);

    let p = with_tensors("f64x", |t| {
        let x = t.get("x").unwrap();
        let v: Vec<u8> = x
            .to_f32()
            .unwrap()
            .iter()
            .flat_map(|&v| f64::from(v).to_le_bytes())
            .collect();
        t.insert(
            "x".into(),
            Tensor::from_bytes(DType::F64, x.shape.clone(), v).unwrap(),
        );
    });
    expect_bad_input(&p, &["input `x` has dtype F64; expected F32 or BF16"]);
}

#[test]
fn wrong_shapes_are_named() {
    let p = with_tensors("shape_s", |t| {
        let s = t.get("s").unwrap().clone();
        t.insert("s".into(), s.reshaped(vec![32, 8]));
    });
    expect_bad_input(&p, &["output `s` has shape [32, 8]", "[64, 4]"]);

    // K = 500 is not a multiple of 128
    let mut t = TensorMap::new();
    t.insert("x".into(), Tensor::from_f32(vec![2, 500], &vec![1.0; 1000]));
    t.insert(
        "y".into(),
        Tensor::from_codes(DType::F8E4M3, vec![2, 500], vec![0; 1000]),
    );
    t.insert("s".into(), Tensor::from_f32(vec![2, 3], &[1.0; 6]));
    let p = scratch("k500").join("k.safetensors");
    io::save(&p, &t, None).unwrap();
    expect_bad_input(&p, &["K = 500 a multiple of block_size = 128"]);
}

#[test]
fn invalid_configs_are_named() {
    let f = fixture("act_quant/f32_randn.safetensors");
    for (cfg, needle) in [
        (r#"{"scale_fmt":"e8m0"}"#, "`scale_fmt`"),
        (r#"{"block_size":0}"#, "`block_size`"),
        (r#"{"blocksize":128}"#, "unknown field `blocksize`"),
        (r#"{"block_size":"#, "inline JSON"),
    ] {
        let (code, _, err) = check_act_quant(&f, &["--config", cfg]);
        assert_eq!(code, 2, "{cfg}");
        assert!(err.contains(needle), "{cfg}: {err}");
    }
    let (code, _, err) = check_act_quant(&f, &["--config", "/nonexistent/cfg.json"]);
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/cfg.json"), "{err}");
    // a config file that is valid JSON but the wrong config: ue8m0 scales differ → mismatch (1)
    let p = scratch("cfg").join("cfg.json");
    std::fs::write(&p, r#"{"scale_fmt": "ue8m0"}"#).unwrap();
    let (code, out, _) = check_act_quant(&f, &["--config", p.to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
}

#[test]
fn nan_input_is_refused_with_its_index() {
    let p = with_tensors("nan", |t| {
        let x = t.get_mut("x").unwrap();
        let i = 5 * 512 + 9;
        x.data[i * 4..i * 4 + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    expect_bad_input(&p, &["x[5, 9] is NaN"]);
}

#[test]
fn unknown_op_lists_the_known_ones() {
    let o = dsv3(&["check", "act_qaunt", "--inputs", "a", "--outputs", "b"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        err.contains("unknown op `act_qaunt`") && err.contains("act_quant"),
        "{err}"
    );
}

#[test]
fn ops_lists_every_registered_op() {
    let o = dsv3(&["ops"]);
    let (out, _) = text(&o);
    assert_eq!(o.status.code(), Some(0));
    for op in dsv3::ops::REGISTRY {
        assert!(out.contains(op.name), "{} not listed", op.name);
    }
    let o = dsv3(&["ops", "act_quant"]);
    let (out, _) = text(&o);
    assert!(
        out.contains("x: F32|BF16 [..., K]") && out.contains("tolerance:"),
        "{out}"
    );
}

#[test]
fn gen_run_check_round_trip() {
    let d = scratch("gen");
    let input = d.join("in.safetensors");
    let output = d.join("out.safetensors");
    let o = dsv3(&[
        "gen",
        "weight_quant",
        "--out",
        input.to_str().unwrap(),
        "--size",
        "N=200",
        "--size",
        "K=300",
        "--seed",
        "3",
    ]);
    assert_eq!(o.status.code(), Some(0), "{:?}", text(&o));
    let o = dsv3(&[
        "run",
        "weight_quant",
        "--inputs",
        input.to_str().unwrap(),
        "--out",
        output.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{:?}", text(&o));
    let o = dsv3(&[
        "check",
        "weight_quant",
        "--inputs",
        input.to_str().unwrap(),
        "--outputs",
        output.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{:?}", text(&o));
    let t = io::load(&output).unwrap();
    assert_eq!(t["s"].shape, vec![2, 3]);
    let o = dsv3(&[
        "gen",
        "weight_quant",
        "--out",
        input.to_str().unwrap(),
        "--size",
        "M=2",
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o).1.contains("no size named `M`"));
}

#[test]
fn verify_passes_and_gpu_require_fails_without_a_device() {
    let o = dsv3(&["verify", "--filter", "act_quant/f32_block64"]);
    let (out, _) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(out.contains("overall: PASS"), "{out}");
    if dsv3::registry::gpu::device().is_err() {
        let o = dsv3(&[
            "verify",
            "--gpu",
            "require",
            "--filter",
            "act_quant/f32_block64",
        ]);
        assert_eq!(o.status.code(), Some(2));
        assert!(text(&o).1.contains("--gpu require"), "{:?}", text(&o));
    }
}
