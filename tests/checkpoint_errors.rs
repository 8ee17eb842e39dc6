//! Every malformed model directory is refused by `dsv3 forward` with exit code 2, no panic, and
//! a message naming the culprit (file, tensor, config field).

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

use dsv3::registry::io::{self, TensorMap};
use dsv3::registry::tensor::{DType, Tensor};

fn fixture_model(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/models")
        .join(name)
}

/// A fresh copy of fixture model `name` in a temp dir.
fn copy_model(name: &str, case: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dsv3-ckerr-{}-{name}-{case}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(fixture_model(name)).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    dir
}

fn forward(dir: &Path, extra: &[&str]) -> (i32, String) {
    let mut args = vec![
        "forward",
        "--model",
        dir.to_str().unwrap(),
        "--tokens",
        "1,2,3",
    ];
    args.extend_from_slice(extra);
    let o = Command::new(env!("CARGO_BIN_EXE_dsv3"))
        .args(&args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!err.contains("panicked"), "{err}");
    (o.status.code().unwrap(), err)
}

/// Run on `dir` and expect exit 2 with every `needle` in the message.
fn refused(dir: &Path, extra: &[&str], needles: &[&str]) {
    let (code, err) = forward(dir, extra);
    assert_eq!(code, 2, "{err}");
    for n in needles {
        assert!(err.contains(n), "expected `{n}` in: {err}");
    }
    println!("{}", err.trim_end().lines().last().unwrap_or_default());
}

fn edit_tensors(dir: &Path, file: &str, edit: impl FnOnce(&mut TensorMap)) {
    let p = dir.join(file);
    let mut t = io::load(&p).unwrap();
    edit(&mut t);
    io::save(&p, &t, None).unwrap();
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut Value)) {
    let p = dir.join("config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&p, v.to_string()).unwrap();
}

fn edit_index(dir: &Path, edit: impl FnOnce(&mut Value)) {
    let p = dir.join("model.safetensors.index.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(&p, v.to_string()).unwrap();
}

/// An edit of config.json.
type ConfigEdit = Box<dyn Fn(&mut Value)>;

const SINGLE: &str = "v3_yarn_qlora";
const SHARDED: &str = "fp8_sharded";

#[test]
fn the_unmodified_copies_load() {
    for m in [SINGLE, SHARDED] {
        let (code, err) = forward(&copy_model(m, "ok"), &[]);
        assert_eq!(code, 0, "{err}");
    }
}

#[test]
fn missing_tensor_is_named() {
    let dir = copy_model(SINGLE, "missing");
    let name = "model.layers.1.self_attn.kv_b_proj.weight";
    edit_tensors(&dir, "model.safetensors", |t| {
        t.remove(name);
    });
    refused(&dir, &[], &["missing tensor", name]);
}

#[test]
fn wrong_shape_is_named_with_the_expected_shape() {
    let dir = copy_model(SINGLE, "shape");
    let name = "model.layers.0.self_attn.q_a_proj.weight";
    edit_tensors(&dir, "model.safetensors", |t| {
        t.insert(name.into(), Tensor::from_f32(vec![31, 64], &[0.0; 31 * 64]));
    });
    refused(
        &dir,
        &[],
        &[name, "[31, 64]", "expected [32, 64]", "q_lora_rank"],
    );
    let dir = copy_model(SINGLE, "shape_norm");
    let name = "model.norm.weight";
    edit_tensors(&dir, "model.safetensors", |t| {
        t.insert(name.into(), Tensor::from_f32(vec![65], &[1.0; 65]));
    });
    refused(&dir, &[], &[name, "[65]", "expected [64]"]);
}

#[test]
fn unsupported_dtypes_are_named() {
    let dir = copy_model(SINGLE, "dtype");
    let name = "model.layers.2.mlp.experts.5.up_proj.weight";
    edit_tensors(&dir, "model.safetensors", |t| {
        let n = t[name].numel();
        let shape = t[name].shape.clone();
        t.insert(
            name.into(),
            Tensor::from_bytes(DType::F16, shape, vec![0; 2 * n]).unwrap(),
        );
    });
    refused(&dir, &[], &[name, "dtype F16", "F32, BF16 or F8_E4M3"]);
    let dir = copy_model(SINGLE, "dtype_norm");
    let name = "model.layers.0.input_layernorm.weight";
    edit_tensors(&dir, "model.safetensors", |t| {
        t.insert(
            name.into(),
            Tensor::from_bytes(DType::I32, vec![64], vec![0; 256]).unwrap(),
        );
    });
    refused(&dir, &[], &[name, "dtype I32"]);
}

#[test]
fn bad_configs_name_the_field() {
    let cases: Vec<(&str, ConfigEdit, Vec<&str>)> = vec![
        (
            "missing",
            Box::new(|v: &mut Value| {
                v.as_object_mut().unwrap().remove("hidden_size");
            }),
            vec!["config.json", "`hidden_size`: missing"],
        ),
        (
            "type",
            Box::new(|v: &mut Value| v["num_hidden_layers"] = json!("three")),
            vec!["`num_hidden_layers`"],
        ),
        (
            "groups",
            Box::new(|v: &mut Value| v["n_group"] = json!(3)),
            vec!["`n_group` = 3", "divide"],
        ),
        (
            "topk",
            Box::new(|v: &mut Value| v["num_experts_per_tok"] = json!(99)),
            vec!["`num_experts_per_tok` = 99"],
        ),
        (
            "rope",
            Box::new(|v: &mut Value| v["rope_scaling"]["type"] = json!("linear")),
            vec!["`rope_scaling.type`", "linear"],
        ),
        (
            "act",
            Box::new(|v: &mut Value| v["hidden_act"] = json!("gelu")),
            vec!["`hidden_act`"],
        ),
        (
            "scoring",
            Box::new(|v: &mut Value| v["scoring_func"] = json!("relu")),
            vec!["`scoring_func`"],
        ),
        (
            "quant",
            Box::new(|v: &mut Value| {
                v["quantization_config"] =
                    json!({"quant_method": "fp8", "weight_block_size": [128, 64]})
            }),
            vec!["`quantization_config.weight_block_size`"],
        ),
    ];
    for (case, edit, needles) in cases {
        let dir = copy_model(SINGLE, &format!("cfg_{case}"));
        edit_config(&dir, edit);
        refused(&dir, &[], &needles);
    }
    let dir = copy_model(SINGLE, "cfg_json");
    std::fs::write(dir.join("config.json"), "{ not json").unwrap();
    refused(&dir, &[], &["config.json", "not valid JSON"]);
    let dir = copy_model(SINGLE, "cfg_none");
    std::fs::remove_file(dir.join("config.json")).unwrap();
    refused(&dir, &[], &["config.json", "missing"]);
}

#[test]
fn missing_shard_and_bad_index_entries_are_named() {
    // a shard the index names does not exist
    let dir = copy_model(SHARDED, "no_shard");
    std::fs::remove_file(dir.join("model-00003-of-00003.safetensors")).unwrap();
    refused(
        &dir,
        &[],
        &[
            "model-00003-of-00003.safetensors",
            "missing shard",
            "model.safetensors.index.json",
        ],
    );
    // the index points a tensor to a file that is not there
    let dir = copy_model(SHARDED, "index_file");
    edit_index(&dir, |v| {
        v["weight_map"]["model.norm.weight"] = json!("model-00009-of-00003.safetensors")
    });
    refused(
        &dir,
        &[],
        &["model-00009-of-00003.safetensors", "model.norm.weight"],
    );
    // the index points a tensor to a shard that does not hold it
    let dir = copy_model(SHARDED, "index_wrong");
    edit_index(&dir, |v| {
        v["weight_map"]["model.norm.weight"] = json!("model-00002-of-00003.safetensors")
    });
    refused(
        &dir,
        &[],
        &[
            "model-00002-of-00003.safetensors",
            "has no tensor `model.norm.weight`",
        ],
    );
    // an index without weight_map
    let dir = copy_model(SHARDED, "index_empty");
    std::fs::write(dir.join("model.safetensors.index.json"), "{}").unwrap();
    refused(&dir, &[], &["model.safetensors.index.json", "weight_map"]);
    // no shard at all
    let dir = copy_model(SINGLE, "no_files");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    refused(&dir, &[], &["no *.safetensors file"]);
}

#[test]
fn fp8_scales_are_checked() {
    let w = "model.layers.1.mlp.experts.3.down_proj.weight";
    let shard = |dir: &Path| -> String {
        let v: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap(),
        )
        .unwrap();
        v["weight_map"][format!("{w}_scale_inv")]
            .as_str()
            .unwrap()
            .to_string()
    };
    // missing scale
    let dir = copy_model(SHARDED, "fp8_noscale");
    let f = shard(&dir);
    edit_tensors(&dir, &f, |t| {
        t.remove(&format!("{w}_scale_inv"));
    });
    refused(&dir, &[], &[&format!("{w}_scale_inv"), "has no tensor"]);
    edit_index(&dir, |v| {
        v["weight_map"]
            .as_object_mut()
            .unwrap()
            .remove(&format!("{w}_scale_inv"));
    });
    refused(
        &dir,
        &[],
        &[
            &format!("missing tensor `{w}_scale_inv`"),
            "block scales of the F8_E4M3 weight",
        ],
    );
    // wrong scale grid: down_proj [144, 32] with 128-blocks needs [2, 1]
    let dir = copy_model(SHARDED, "fp8_grid");
    let f = shard(&dir);
    edit_tensors(&dir, &f, |t| {
        t.insert(
            format!("{w}_scale_inv"),
            Tensor::from_f32(vec![1, 1], &[1.0]),
        );
    });
    refused(&dir, &[], &[&format!("{w}_scale_inv"), "expected [2, 1]"]);
    // a zero scale
    let dir = copy_model(SHARDED, "fp8_zero");
    let f = shard(&dir);
    edit_tensors(&dir, &f, |t| {
        t.insert(
            format!("{w}_scale_inv"),
            Tensor::from_f32(vec![2, 1], &[1.0, 0.0]),
        );
    });
    refused(
        &dir,
        &[],
        &[&format!("{w}_scale_inv`[1, 0]"), "finite and > 0"],
    );
}

#[test]
fn corrupt_files_and_bad_arguments_exit_2() {
    let dir = copy_model(SINGLE, "truncated");
    let p = dir.join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    refused(
        &dir,
        &[],
        &["model.safetensors", "not a valid safetensors file"],
    );
    let dir = copy_model(SINGLE, "args");
    refused(
        &dir,
        &["--layers", "7"],
        &["--layers", "layer 7 does not exist"],
    );
    refused(&dir.join("nope"), &[], &["not a directory"]);
    let o = Command::new(env!("CARGO_BIN_EXE_dsv3"))
        .args([
            "forward",
            "--model",
            dir.to_str().unwrap(),
            "--tokens",
            "1,999",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("token id ≥ vocab_size") && err.contains("999"),
        "{err}"
    );
    let o = Command::new(env!("CARGO_BIN_EXE_dsv3"))
        .args([
            "forward",
            "--model",
            dir.to_str().unwrap(),
            "--tokens",
            "1,x",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("`x`"));
}
