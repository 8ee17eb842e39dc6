//! The reference agrees with every committed oracle case (the same run as `dsv3 verify`), and
//! every registered op has at least one oracle case.

use std::path::Path;

use dsv3::ops::REGISTRY;
use dsv3::registry::gpu::GpuMode;
use dsv3::verify::{load_manifest, verify};

fn fixtures() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

#[test]
fn every_fixture_case_matches_its_external_oracle() {
    let mut log = Vec::new();
    let r = verify(&fixtures(), None, GpuMode::Off, &mut log).unwrap();
    let log = String::from_utf8(log).unwrap();
    println!("{log}");
    let failed: Vec<String> = r
        .cases
        .iter()
        .filter(|c| !c.pass)
        .map(|c| format!("{}: {:?}", c.case, c.detail))
        .collect();
    assert!(
        failed.is_empty(),
        "cases failing against their oracle:\n{}",
        failed.join("\n")
    );
    assert!(r.pass);
}

#[test]
fn every_registered_op_has_an_oracle_case() {
    let m = load_manifest(&fixtures()).unwrap();
    for op in REGISTRY {
        assert!(
            m.cases.iter().any(|c| c.op == op.name),
            "{} has no fixture case in fixtures/manifest.json",
            op.name
        );
    }
}

#[test]
fn fp8_format_tables_cover_a_million_patterns_and_every_code() {
    let m = load_manifest(&fixtures()).unwrap();
    let enc = dsv3::registry::io::SafeFile::open(fixtures().join("fp8_formats/encode.safetensors"))
        .unwrap();
    let (_, shape) = enc.info("x").unwrap().unwrap();
    assert!(shape[0] >= 1 << 20, "only {} encode inputs", shape[0]);
    // every 8-bit code of each format, every 12-bit E5M6 code
    let dec = dsv3::registry::io::SafeFile::open(fixtures().join("fp8_formats/decode.safetensors"))
        .unwrap();
    for (name, n) in [("e4m3", 256), ("e5m2", 256), ("ue8m0", 256), ("e5m6", 4096)] {
        let (_, s) = dec.info(&format!("{name}_codes")).unwrap().unwrap();
        assert_eq!(s, vec![n], "{name}");
    }
    for fmt in [
        "e4m3_satfinite",
        "e4m3_nonsat",
        "e5m2_satfinite",
        "e5m2_nonsat",
        "e5m6_satfinite",
        "e5m6_nonsat",
        "ue8m0_nearest",
        "ue8m0_ceil",
    ] {
        assert!(
            m.cases.iter().any(|c| c.name == format!("fp8_cast/{fmt}")),
            "{fmt}"
        );
    }
}

#[test]
fn a_modified_fixture_is_refused_with_a_hint() {
    let dir = std::env::temp_dir().join(format!("dsv3-fixture-hash-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("act_quant")).unwrap();
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("manifest.json")).unwrap())
            .unwrap();
    m["files"] = serde_json::json!({"act_quant/f32_block64.safetensors": "0".repeat(64)});
    m["cases"] = serde_json::json!([]);
    std::fs::write(dir.join("manifest.json"), m.to_string()).unwrap();
    std::fs::copy(
        fixtures().join("act_quant/f32_block64.safetensors"),
        dir.join("act_quant/f32_block64.safetensors"),
    )
    .unwrap();
    let e = load_manifest(&dir).unwrap_err().to_string();
    assert!(
        e.contains("sha256") && e.contains("HINT") && e.contains("gen_fixtures.py"),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// `dsv3 verify` covers every oracle we ship: each model fixture gives prefill (both MLA forms)
/// and decode rows, and each with an MTP layer four MTP rows (prefill and decode, `h^0` before
/// and after the final norm), all within the model fixtures' bar.
#[test]
fn verify_runs_the_model_and_mtp_fixtures() {
    let m = load_manifest(&fixtures()).unwrap();
    let mut log = Vec::new();
    let r = verify(&fixtures(), Some("model/"), GpuMode::Off, &mut log).unwrap();
    let with_mtp = m.models.iter().filter(|c| c.mtp.is_some()).count();
    assert!(m.models.len() >= 5 && with_mtp >= 2);
    assert_eq!(r.cases.len(), 3 * m.models.len() + 4 * with_mtp);
    for c in &r.cases {
        assert!(c.pass && c.elements > 0, "{}: {:?}", c.case, c.detail);
        assert!(
            c.max_abs > 0.0,
            "{}: f32 rounding differs somewhere",
            c.case
        );
    }
    assert!(r
        .cases
        .iter()
        .any(|c| c.case == "model/fp8_sharded/mtp_decode/mtp_logits"));
    assert!(r.pass);
}
