//! `dsv3 model-stats` on the published DeepSeek-V3 config: the report's figures in the text
//! and JSON outputs, the SVG figures, and a bad config exiting 2.

use std::process::{Command, Output};

fn dsv3(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dsv3"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run dsv3")
}

#[test]
fn model_stats_prints_the_papers_figures() {
    let o = dsv3(&[
        "model-stats",
        "--config",
        "fixtures/configs/deepseek-v3/config.json",
    ]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{text}");
    for needle in [
        "total 671.03B (≈ 671B)",
        "activated per token 36.63B (≈ 37B",
        "hub count 684.53B (≈ 685B = 671B main + 14B MTP)",
        "2664K pre-training + 119K context extension + 5K post-training = 2788K, $5.576M",
        "180K GPU-hours per trillion tokens (3.7 days on 2048 H800s)",
        "MLA 576 values",
        "1152 B BF16",
        "81920 B BF16",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
}

#[test]
fn model_stats_json_and_plots_from_a_model_directory() {
    let dir = std::env::temp_dir().join(format!("dsv3-model-stats-{}", std::process::id()));
    let o = dsv3(&[
        "model-stats",
        "--config",
        "fixtures/configs/deepseek-v3",
        "--json",
        "--svg-dir",
        dir.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON");
    assert_eq!(v["total"], 671_026_419_200u64);
    assert_eq!(v["activated"], 36_625_618_432u64);
    assert_eq!(v["kv_cache"]["mla_values"], 576);
    assert_eq!(v["training"]["total_gpu_hours"], 2_788_000.0);
    for name in ["model-stats-params.svg", "model-stats-kv.svg"] {
        let svg = std::fs::read_to_string(dir.join(name)).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("</svg>"), "{name}");
    }
    let params = std::fs::read_to_string(dir.join("model-stats-params.svg")).unwrap();
    assert!(params.contains("routed experts") && params.contains("653.91B"));
}

#[test]
fn a_bad_config_exits_2_naming_the_field() {
    let dir = std::env::temp_dir().join(format!("dsv3-model-stats-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/configs/deepseek-v3/config.json"
    ))
    .unwrap();
    std::fs::write(
        dir.join("config.json"),
        text.replace("\"num_attention_heads\": 128", "\"num_attention_heads\": 0"),
    )
    .unwrap();
    let o = dsv3(&["model-stats", "--config", dir.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("num_attention_heads"));
    let o = dsv3(&["model-stats", "--config", "/nonexistent/config.json"]);
    assert_eq!(o.status.code(), Some(2));
}
