//! `dsv3 check` on the FP8 GEMM ops: one planted wrong element fails (exit 1, index named), what
//! real kernels legitimately do differently passes (another block order, FMA, DeepGEMM's scale
//! association), undefined padding rows are not judged, bad grouping indices are bad input.

use std::path::{Path, PathBuf};
use std::process::Command;

use dsv3::registry::io::{self, TensorMap};
use dsv3::registry::tensor::{DType, Tensor};
use half::bf16;

fn dsv3(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_dsv3"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run dsv3");
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    );
    assert!(!err.contains("panicked"), "dsv3 panicked: {err}");
    (o.status.code().unwrap(), out, err)
}

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(rel)
}

fn scratch(name: &str, t: &TensorMap) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dsv3-gemm-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let p = d.join("case.safetensors");
    io::save(&p, t, None).unwrap();
    p
}

fn check(op: &str, file: &Path, extra: &[&str]) -> (i32, String, String) {
    let f = file.to_str().unwrap();
    let mut args = vec!["check", op, "--inputs", f, "--outputs", f];
    args.extend_from_slice(extra);
    dsv3(&args)
}

#[test]
fn fp8_gemm_check_fails_on_one_planted_wrong_element() {
    let mut t = io::load(fixture("fp8_gemm/bf16_randn.safetensors")).unwrap();
    let (code, out, _) = check("fp8_gemm", &scratch("clean", &t), &[]);
    assert_eq!(code, 0, "{out}");
    // c[3, 5] two bf16 steps away from the oracle's value (a bug, not a rounding difference)
    let c = t.get_mut("c").unwrap();
    let n = c.shape[1];
    let i = 3 * n + 5;
    let v = u16::from_le_bytes([c.data[2 * i], c.data[2 * i + 1]]);
    c.data[2 * i..2 * i + 2].copy_from_slice(&(v + 2).to_le_bytes());
    let p = scratch("planted", &t);
    let report = p.with_extension("json");
    let (code, out, _) = check("fp8_gemm", &p, &["--report", report.to_str().unwrap()]);
    println!("{out}");
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("FAIL (1 bad)") && out.contains("violation at [3, 5]"),
        "{out}"
    );
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(j["tensors"][0]["violations"], 1);
    assert_eq!(j["tensors"][0]["worst"]["index"], serde_json::json!([3, 5]));
}

#[test]
fn fp8_gemm_check_fails_on_a_small_error_in_an_f32_output() {
    // f32 output: c[2, 7] off by a relative 1e-4 (≈ 800 ulp), far below bf16 resolution
    let mut t = io::load(fixture("fp8_gemm/f32_partial_k.safetensors")).unwrap();
    let c = t.get_mut("c").unwrap();
    let i = 2 * c.shape[1] + 7;
    let v = f32::from_le_bytes(c.data[4 * i..4 * i + 4].try_into().unwrap());
    c.data[4 * i..4 * i + 4].copy_from_slice(&(v * (1.0 + 1e-4)).to_le_bytes());
    let cfg = ["--config", r#"{"out_dtype":"f32"}"#];
    let (code, out, _) = check("fp8_gemm", &scratch("f32", &t), &cfg);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("violation at [2, 7]"), "{out}");
}

/// E4M3 code → value.
fn e4m3(c: u8) -> f64 {
    f64::from(dsv3_reference::fp8::E4M3.decode(u16::from(c)))
}

#[test]
fn fp8_gemm_check_accepts_another_block_order_fma_and_deepgemm_scaling() {
    // A kernel that sums the blocks in reverse order with acc = fma(a_s·b_s, p, acc)
    // (DeepGEMM's promotion) differs from OFF's order in some elements but is correct.
    let mut t = io::load(fixture("fp8_gemm/bf16_randn.safetensors")).unwrap();
    let (a, b) = (&t["a"], &t["b"]);
    let (m, k, n) = (a.shape[0], a.shape[1], b.shape[0]);
    let a_s = t["a_s"].to_f32().unwrap();
    let b_s = t["b_s"].to_f32().unwrap();
    let kb_count = k.div_ceil(128);
    let mut f32_acc = vec![0f32; m * n];
    let mut c = vec![bf16::ZERO; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0f32;
            for kb in (0..kb_count).rev() {
                let dot: f64 = (kb * 128..((kb + 1) * 128).min(k))
                    .map(|x| e4m3(a.data[i * k + x]) * e4m3(b.data[j * k + x]))
                    .sum();
                let scale = a_s[i * kb_count + kb] * b_s[(j / 128) * kb_count + kb];
                acc = scale.mul_add(dot as f32, acc);
            }
            f32_acc[i * n + j] = acc;
            c[i * n + j] = bf16::from_f32(acc);
        }
    }
    t.insert("c".into(), Tensor::from_bf16(vec![m, n], &c));
    let (code, out, _) = check("fp8_gemm", &scratch("reordered", &t), &[]);
    assert_eq!(code, 0, "{out}");
    // the f32 accumulators differ from the reference in some elements: the policy, not luck,
    // lets them pass
    let mut t32 = t.clone();
    t32.insert("c".into(), Tensor::from_f32(vec![m, n], &f32_acc));
    let p = scratch("reordered_f32", &t32);
    let (code, out, _) = check("fp8_gemm", &p, &["--config", r#"{"out_dtype":"f32"}"#]);
    assert_eq!(code, 0, "{out}");
    let allowed: usize = out
        .lines()
        .find_map(|l| {
            l.split("policy")
                .nth(1)?
                .split("; ")
                .last()?
                .split(' ')
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0);
    assert!(
        allowed > 0,
        "no element differed, the test proves nothing:\n{out}"
    );
    let (code, out, _) = check(
        "fp8_gemm",
        &p,
        &["--config", r#"{"out_dtype":"f32"}"#, "--exact"],
    );
    assert_eq!(code, 1, "--exact must see the reordering:\n{out}");
}

#[test]
fn grouped_check_does_not_judge_padding_rows() {
    // the fixtures hold NaN (contiguous) and 1e30 (masked) in their undefined rows
    for (op, file) in [
        (
            "m_grouped_fp8_gemm_contiguous",
            "m_grouped_fp8_gemm_contiguous/bf16_padding_rows.safetensors",
        ),
        (
            "m_grouped_fp8_gemm_masked",
            "m_grouped_fp8_gemm_masked/f32_masked_m.safetensors",
        ),
    ] {
        for extra in [&[][..], &["--exact"][..]] {
            let mut args = extra.to_vec();
            let cfg = if op.ends_with("masked") {
                r#"{"out_dtype":"f32"}"#
            } else {
                "{}"
            };
            args.extend(["--config", cfg]);
            let (code, out, _) = check(op, &fixture(file), &args);
            assert_eq!(code, 0, "{op} {extra:?}: {out}");
            assert!(
                out.contains("not judged (undefined by the contract)"),
                "{out}"
            );
        }
    }
    // but a wrong value in a real row of the contiguous layout fails: row 0 is expert 0's
    let mut t = io::load(fixture(
        "m_grouped_fp8_gemm_contiguous/bf16_padding_rows.safetensors",
    ))
    .unwrap();
    let c = t.get_mut("c").unwrap();
    c.data[2..4].copy_from_slice(&bf16::from_f32(1e3).to_le_bytes());
    let (code, out, _) = check(
        "m_grouped_fp8_gemm_contiguous",
        &scratch("grouped", &t),
        &[],
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("violation at [0, 1]"), "{out}");
}

#[test]
fn grouped_indices_out_of_range_are_bad_input() {
    let mut t = io::load(fixture(
        "m_grouped_fp8_gemm_contiguous/bf16_padding_rows.safetensors",
    ))
    .unwrap();
    let idx = t.get_mut("m_indices").unwrap();
    assert_eq!(idx.dtype, DType::I32);
    idx.data[4..8].copy_from_slice(&7i32.to_le_bytes());
    let (code, _, err) = check("m_grouped_fp8_gemm_contiguous", &scratch("idx", &t), &[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("m_indices[1]") && err.contains("0..G"),
        "{err}"
    );
}

#[test]
fn a_window_spanning_blocks_with_different_scales_is_bad_input() {
    let t = io::load(fixture("fp8_gemm/bf16_randn.safetensors")).unwrap();
    let cfg = r#"{"accumulation":"tensor_core","promote_interval":0}"#;
    let (code, _, err) = check("fp8_gemm", &scratch("window", &t), &["--config", cfg]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("a_s[0, 1]") && err.contains("promote_interval"),
        "{err}"
    );
}
