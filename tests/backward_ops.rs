//! The backward ops, MoE permute/combine and the FP8 latent cache through the `dsv3` binary:
//! the oracle fixtures pass, a planted single-element fault fails `check` naming its index, and
//! bad inputs (mismatched shapes, ids out of range, NaN) exit 2 naming the culprit.

use std::path::{Path, PathBuf};
use std::process::Command;

use dsv3::registry::io::{self, TensorMap};
use dsv3::registry::tensor::{unravel, DType, Tensor};

/// Run `dsv3 check OP` on `file` (inputs and outputs in one file): (exit code, stdout + stderr).
fn check(op: &str, config: &str, file: &Path) -> (i32, String) {
    let f = file.to_str().unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_dsv3"))
        .args([
            "check",
            op,
            "--inputs",
            f,
            "--outputs",
            f,
            "--config",
            config,
        ])
        .output()
        .expect("run dsv3");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!text.contains("panicked"), "{op}: dsv3 panicked: {text}");
    (o.status.code().unwrap(), text)
}

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(rel)
}

/// `fixture` with `edit` applied, saved under a scratch name.
fn edited(rel: &str, tag: &str, edit: impl FnOnce(&mut TensorMap)) -> PathBuf {
    let mut t = io::load(fixture(rel)).unwrap();
    edit(&mut t);
    let dir = std::env::temp_dir().join(format!("dsv3-backward-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(format!("{}-{tag}.safetensors", rel.replace('/', "-")));
    io::save(&p, &t, None).unwrap();
    p
}

/// `t` with element `i` replaced by `f(value)`.
fn set(t: &Tensor, i: usize, f: impl Fn(f64) -> f64) -> Tensor {
    let mut v = t.values();
    v[i] = f(v[i]);
    match t.dtype {
        DType::I64 => Tensor::from_i64(
            t.shape.clone(),
            &v.iter().map(|&x| x as i64).collect::<Vec<_>>(),
        ),
        DType::I32 => Tensor::from_i32(
            t.shape.clone(),
            &v.iter().map(|&x| x as i32).collect::<Vec<_>>(),
        ),
        d => Tensor::from_f64_as(d, t.shape.clone(), &v),
    }
}

/// `t` without its last column (a mismatched shape).
fn narrower(t: &Tensor) -> Tensor {
    let cols = *t.shape.last().unwrap();
    let size = t.dtype.size();
    let data: Vec<u8> = t
        .data
        .chunks(cols * size)
        .flat_map(|row| row[..(cols - 1) * size].to_vec())
        .collect();
    let mut shape = t.shape.clone();
    *shape.last_mut().unwrap() -= 1;
    Tensor::from_bytes(t.dtype, shape, data).unwrap()
}

/// One fixture per op: (op, fixture, config, output to fault, input to narrow, input to poison with NaN).
const CASES: &[(&str, &str, &str, &str, &str, &str)] = &[
    (
        "rmsnorm_backward",
        "rmsnorm_backward/f32_3d.safetensors",
        r#"{"eps":1e-6}"#,
        "dx",
        "weight",
        "x",
    ),
    (
        "rmsnorm_backward",
        "rmsnorm_backward/bf16_7168.safetensors",
        r#"{"eps":1e-6}"#,
        "dweight",
        "dy",
        "dy",
    ),
    (
        "swiglu_backward",
        "swiglu_backward/f32.safetensors",
        "{}",
        "dgate",
        "up",
        "gate",
    ),
    (
        "swiglu_backward",
        "swiglu_backward/bf16_v3_expert.safetensors",
        "{}",
        "dup",
        "dy",
        "up",
    ),
    (
        "attention_backward",
        "attention_backward/f32_noncausal_batch2.safetensors",
        r#"{"softmax_scale":0.1352337788608801,"causal":false}"#,
        "dk",
        "v",
        "dout",
    ),
    (
        "attention_backward",
        "attention_backward/bf16_v3_dims_causal.safetensors",
        r#"{"softmax_scale":0.1352337788608801,"causal":true}"#,
        "dq",
        "dout",
        "q",
    ),
    (
        "moe_gate_backward",
        "moe_gate_backward/v3_sigmoid_noaux_tc_8x4_top8.safetensors",
        r#"{"scoring_func":"sigmoid","norm_topk_prob":true,"routed_scaling_factor":2.5}"#,
        "d_logits",
        "d_topk_weights",
        "logits",
    ),
    (
        "moe_combine",
        "moe_combine/bf16_v3_hidden.safetensors",
        r#"{"out_dtype":"bf16"}"#,
        "y",
        "topk_weights",
        "topk_weights",
    ),
    (
        "moe_permute",
        "moe_permute/bf16_ep16_rank3.safetensors",
        r#"{"num_experts":16,"block_m":128}"#,
        "permuted",
        "topk_ids",
        "",
    ),
    (
        "moe_permute_fp8",
        "moe_permute_fp8/fp8_ue8m0_ep32_rank0.safetensors",
        r#"{"num_experts":8,"block_m":128}"#,
        "permuted_scales",
        "topk_ids",
        "x",
    ),
    (
        "mla_decode",
        "mla_decode/fp8_cache_bf16_decode_v3.safetensors",
        r#"{"softmax_scale":0.1352337788608801,"causal":true}"#,
        "out",
        "q",
        "",
    ),
];

#[test]
fn oracle_fixtures_pass_and_one_faulted_element_fails_with_its_index() {
    for &(op, rel, config, output, _, _) in CASES {
        let (code, text) = check(op, config, &fixture(rel));
        assert_eq!(code, 0, "{rel}: {text}");
        let t = io::load(fixture(rel)).unwrap();
        let out = &t[output];
        // the element of largest magnitude (in a routed row, for the permutations), scaled
        let width = out.shape.last().copied().unwrap_or(1);
        let routed: Option<Vec<f64>> = t.get("token_row").map(|r| r.values());
        let (i, _) = (0..out.numel())
            .map(|i| (i, out.value(i)))
            .filter(|(_, v)| v.is_finite())
            .filter(|(i, _)| {
                !output.starts_with("permuted")
                    || routed
                        .as_ref()
                        .is_some_and(|r| r.contains(&((i / width) as f64)))
            })
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .unwrap();
        let bad = edited(rel, "fault", |m| {
            let faulted = set(&m[output], i, |v| v * 1.25 + 0.5);
            m.insert(output.into(), faulted);
        });
        let (code, text) = check(op, config, &bad);
        let index = format!("{:?}", unravel(i, &out.shape));
        assert_eq!(code, 1, "{rel}: a fault at {output}{index} passed: {text}");
        assert!(
            text.contains(&format!("violation at {index}")),
            "{rel}: {output}{index} not named: {text}"
        );
    }
}

#[test]
fn mismatched_shapes_and_nan_exit_2_naming_the_culprit() {
    for &(op, rel, config, _, narrow, poison) in CASES {
        let bad = edited(rel, "narrow", |m| {
            let n = narrower(&m[narrow]);
            m.insert(narrow.into(), n);
        });
        let (code, text) = check(op, config, &bad);
        assert_eq!(code, 2, "{rel}: narrowed {narrow}: {text}");
        assert!(text.contains(narrow), "{rel}: {narrow} not named: {text}");
        if poison.is_empty() {
            continue;
        }
        let bad = edited(rel, "nan", |m| {
            let p = set(&m[poison], 1, |_| f64::NAN);
            m.insert(poison.into(), p);
        });
        let (code, text) = check(op, config, &bad);
        let index = format!(
            "{poison}{:?}",
            unravel(1, &io::load(fixture(rel)).unwrap()[poison].shape)
        );
        assert_eq!(code, 2, "{rel}: NaN in {poison}: {text}");
        assert!(
            text.contains(&index) && text.contains("NaN"),
            "{rel}: {index} not named: {text}"
        );
    }
}

#[test]
fn ids_and_rows_out_of_range_exit_2_naming_the_element() {
    let cases: &[(&str, &str, &str, &str, f64)] = &[
        (
            "moe_gate_backward",
            "moe_gate_backward/sigmoid_no_norm.safetensors",
            r#"{"scoring_func":"sigmoid","norm_topk_prob":false,"routed_scaling_factor":1.0}"#,
            "topk_ids",
            16.0,
        ),
        (
            "moe_permute",
            "moe_permute/f32_all_local_block16.safetensors",
            r#"{"num_experts":8,"block_m":16}"#,
            "topk_ids",
            8.0,
        ),
        (
            "moe_permute",
            "moe_permute/f32_all_local_block16.safetensors",
            r#"{"num_experts":8,"block_m":16}"#,
            "topk_ids",
            -2.0,
        ),
        (
            "moe_combine",
            "moe_combine/f32_out_f32.safetensors",
            r#"{"out_dtype":"f32"}"#,
            "token_row",
            1e6,
        ),
    ];
    for &(op, rel, config, tensor, value) in cases {
        let bad = edited(rel, "ids", |m| {
            let t = set(&m[tensor], 1, |_| value);
            m.insert(tensor.into(), t);
        });
        let (code, text) = check(op, config, &bad);
        let shape = io::load(fixture(rel)).unwrap()[tensor].shape.clone();
        let index = format!("{tensor}{:?}", unravel(1, &shape));
        assert_eq!(code, 2, "{rel}: {tensor} = {value}: {text}");
        assert!(text.contains(&index), "{rel}: {index} not named: {text}");
    }
    // a repeated expert in one token's ids
    let rel = "moe_gate_backward/sigmoid_no_norm.safetensors";
    let bad = edited(rel, "dup", |m| {
        let first = m["topk_ids"].value(0);
        let t = set(&m["topk_ids"], 1, |_| first);
        m.insert("topk_ids".into(), t);
    });
    let (code, text) = check(
        "moe_gate_backward",
        r#"{"scoring_func":"sigmoid","norm_topk_prob":false,"routed_scaling_factor":1.0}"#,
        &bad,
    );
    assert_eq!(code, 2, "{text}");
    assert!(
        text.contains("topk_ids[0, 1]") && text.contains("distinct"),
        "{text}"
    );
}

#[test]
fn a_nan_code_or_a_bad_scale_in_the_fp8_cache_exits_2_naming_the_byte() {
    let rel = "mla_decode/fp8_cache_bf16_decode_v3.safetensors";
    let config = r#"{"softmax_scale":0.1352337788608801,"causal":true}"#;
    let t = io::load(fixture(rel)).unwrap();
    let block = t["block_table"].value(0) as usize; // sequence 0's first page: read
    for (byte, value, needle) in [
        (5usize, vec![0x7Fu8], "NaN"),
        (516, 0.75f32.to_le_bytes().to_vec(), "power of two"),
    ] {
        let bad = edited(rel, &format!("byte{byte}"), |m| {
            let c = &m["k_cache"];
            let mut data = c.data.to_vec();
            let at = block * 64 * 656 + byte;
            data[at..at + value.len()].copy_from_slice(&value);
            let edited = Tensor::from_bytes(c.dtype, c.shape.clone(), data).unwrap();
            m.insert("k_cache".into(), edited);
        });
        let (code, text) = check("mla_decode", config, &bad);
        assert_eq!(code, 2, "{text}");
        assert!(
            text.contains(&format!("k_cache[{block}, 0, 0, {byte}]")) && text.contains(needle),
            "{text}"
        );
    }
}
