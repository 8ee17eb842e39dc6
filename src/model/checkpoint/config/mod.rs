//! `config.json` of a DeepSeek-V3 model directory → [`ModelConfig`].
//!
//! Both spellings are read: the hub's (`rope_scaling` with `type: yarn`, `rope_theta` at the
//! top level, as published for DeepSeek-V3) and transformers ≥ 5's `save_pretrained`
//! (`rope_parameters` with `rope_type` and `rope_theta` inside). The model's sizes are required;
//! other fields default as transformers' `DeepseekV3Config` does. Every bad value is an error
//! naming the field.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use dsv3_reference::fp8::ScaleFmt;
use dsv3_reference::mla::MlaConfig;
use dsv3_reference::model::ModelConfig;
use dsv3_reference::moe::{GateConfig, ScoringFunc, TopkMethod};

use crate::registry::error::{Error, Result};

mod rope;
use rope::parse_rope;

/// FP8 weight storage (`quantization_config`).
#[derive(Debug, Clone, PartialEq)]
pub struct Fp8Storage {
    /// B of the B×B weight blocks (`weight_block_size`, [128, 128]).
    pub block: usize,
    /// `scale_fmt`: how activation tiles are scaled on the FP8 path (`"ue8m0"` in V3.1 →
    /// [`ScaleFmt::Ue8m0`]; absent or null → [`ScaleFmt::F32`]).
    pub scale_fmt: ScaleFmt,
}

/// A parsed `config.json`.
#[derive(Debug, Clone)]
pub struct Parsed {
    pub model: ModelConfig,
    /// Present when the config declares FP8 weights.
    pub fp8: Option<Fp8Storage>,
    /// Things the config says that dsv3 reads differently from transformers (see SPEC.md).
    pub warnings: Vec<String>,
}

/// One JSON object with the path and key prefix its errors name.
struct Obj<'a> {
    path: &'a Path,
    prefix: &'a str,
    map: &'a Map<String, Value>,
}

impl<'a> Obj<'a> {
    fn err(&self, field: &str, msg: impl std::fmt::Display) -> Error {
        Error::Checkpoint {
            path: self.path.to_path_buf(),
            msg: format!("`{}{field}`: {msg}", self.prefix),
        }
    }

    /// The value of `field`, `None` when absent or null.
    fn get(&self, field: &str) -> Option<&'a Value> {
        self.map.get(field).filter(|v| !v.is_null())
    }

    /// A non-negative integer within the field's ceiling ([`ceiling`]): counts of layers,
    /// experts and heads at most 2^16, dimensions at most 2^24, so that no config value drives
    /// an absurd allocation (a RoPE table, a layer list) before the tensors are read.
    fn usize_of(&self, field: &str, v: &Value) -> Result<usize> {
        let n = v
            .as_u64()
            .ok_or_else(|| self.err(field, format!("{v} is not a non-negative integer")))?;
        let (max, what) = ceiling(field);
        if n > max {
            return Err(self.err(field, format!("{n} is over the ceiling {max} ({what})")));
        }
        usize::try_from(n)
            .map_err(|_| self.err(field, format!("{n} does not fit this machine's usize")))
    }

    fn usize_req(&self, field: &str) -> Result<usize> {
        match self.get(field) {
            Some(v) => self.usize_of(field, v),
            None => Err(self.err(field, "missing (the model's sizes must be given)")),
        }
    }

    fn usize_or(&self, field: &str, default: usize) -> Result<usize> {
        self.get(field)
            .map_or(Ok(default), |v| self.usize_of(field, v))
    }

    /// Absent → `default`; null → `None`.
    fn usize_nullable(&self, field: &str, default: Option<usize>) -> Result<Option<usize>> {
        match self.map.get(field) {
            None => Ok(default),
            Some(Value::Null) => Ok(None),
            Some(v) => self.usize_of(field, v).map(Some),
        }
    }

    fn f64_or(&self, field: &str, default: f64) -> Result<f64> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .ok_or_else(|| self.err(field, format!("{v} is not a number"))),
        }
    }

    fn bool_or(&self, field: &str, default: bool) -> Result<bool> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.err(field, format!("{v} is not true or false"))),
        }
    }

    fn str_or(&self, field: &str, default: &'a str) -> Result<&'a str> {
        match self.get(field) {
            None => Ok(default),
            Some(v) => v
                .as_str()
                .ok_or_else(|| self.err(field, format!("{v} is not a string"))),
        }
    }

    fn choice<T: Copy>(&self, field: &str, default: &'a str, options: &[(&str, T)]) -> Result<T> {
        let got = self.str_or(field, default)?;
        options
            .iter()
            .find(|(name, _)| *name == got)
            .map(|(_, v)| *v)
            .ok_or_else(|| {
                let names: Vec<String> = options.iter().map(|(n, _)| format!("\"{n}\"")).collect();
                self.err(
                    field,
                    format!(
                        "\"{got}\" is not supported; expected {}",
                        names.join(" or ")
                    ),
                )
            })
    }

    fn object(&self, field: &str) -> Result<Option<&'a Map<String, Value>>> {
        match self.get(field) {
            None => Ok(None),
            Some(Value::Object(m)) => Ok(Some(m)),
            Some(v) => Err(self.err(field, format!("{v} is not a JSON object"))),
        }
    }
}

/// Read and parse `path` (a `config.json`).
pub fn read(path: &Path) -> Result<Parsed> {
    let text = crate::registry::io::read_text(path)?;
    let v: Value = serde_json::from_str(&text).map_err(|e| Error::Checkpoint {
        path: path.to_path_buf(),
        msg: format!("not valid JSON: {e}"),
    })?;
    parse(path, &v)
}

/// The ceiling of an integer config field and what it covers.
fn ceiling(field: &str) -> (u64, &'static str) {
    match field {
        "num_hidden_layers"
        | "num_nextn_predict_layers"
        | "first_k_dense_replace"
        | "n_routed_experts"
        | "n_shared_experts"
        | "num_experts_per_tok"
        | "n_group"
        | "topk_group"
        | "num_attention_heads"
        | "num_key_value_heads"
        | "moe_layer_freq" => (
            crate::registry::limits::MAX_MODEL_COUNT,
            "counts of layers, experts and heads; DeepSeek-V3 has 61 layers, 256 experts, 128 heads",
        ),
        _ => (
            MAX_MODEL_DIM,
            "dimensions and lengths; DeepSeek-V3's largest is the vocabulary, 129280",
        ),
    }
}

/// The ceiling of a dimension in a model config: 2^24.
pub const MAX_MODEL_DIM: u64 = 1 << 24;

/// Parse a config object (`path` only names the file in errors).
pub fn parse(path: &Path, v: &Value) -> Result<Parsed> {
    let Value::Object(map) = v else {
        return Err(Error::Checkpoint {
            path: path.to_path_buf(),
            msg: "the config is not a JSON object".into(),
        });
    };
    let o = Obj {
        path,
        prefix: "",
        map,
    };
    let mut warnings = Vec::new();
    // fields dsv3 cannot honour
    let act = o.str_or("hidden_act", "silu")?;
    if act != "silu" {
        return Err(o.err(
            "hidden_act",
            format!("\"{act}\": DeepSeek-V3's FFNs are SwiGLU (\"silu\")"),
        ));
    }
    let n_heads = o.usize_req("num_attention_heads")?;
    if let Some(kv) = o.get("num_key_value_heads") {
        // MLA gives every head its own key/value (kv_b_proj); transformers then "repeats" them
        // num_attention_heads / num_key_value_heads times, which only works when that is 1.
        let kv = o.usize_of("num_key_value_heads", kv)?;
        if kv == 0 || n_heads / kv != 1 {
            return Err(o.err(
                "num_key_value_heads",
                format!(
                    "{kv} with num_attention_heads = {n_heads}: MLA expands one latent into every head (transformers needs num_attention_heads / num_key_value_heads = 1 too)"
                ),
            ));
        }
    }
    // sizes
    let vocab_size = o.usize_req("vocab_size")?;
    let hidden_size = o.usize_req("hidden_size")?;
    let num_hidden_layers = o.usize_req("num_hidden_layers")?;
    let intermediate_size = o.usize_req("intermediate_size")?;
    let n_routed_experts = o
        .usize_nullable("n_routed_experts", Some(256))?
        .unwrap_or(0);
    let moe_intermediate_size = if n_routed_experts > 0 {
        o.usize_req("moe_intermediate_size")?
    } else {
        o.usize_or("moe_intermediate_size", 0)?
    };
    let kv_lora_rank = o.usize_req("kv_lora_rank")?;
    let qk_nope_head_dim = o.usize_req("qk_nope_head_dim")?;
    let qk_rope_head_dim = o.usize_req("qk_rope_head_dim")?;
    let v_head_dim = o.usize_req("v_head_dim")?;
    let q_lora_rank = o.usize_nullable("q_lora_rank", Some(1536))?;
    // rotary embedding
    let rope = parse_rope(&o, qk_rope_head_dim, &mut warnings)?;
    let mla = MlaConfig::new(
        n_heads,
        q_lora_rank,
        kv_lora_rank,
        qk_nope_head_dim,
        v_head_dim,
        &rope,
    )
    .map_err(|e| reference_error(path, e))?;
    // routing
    let gate = GateConfig {
        top_k: o.usize_or("num_experts_per_tok", 8)?,
        n_group: o.usize_nullable("n_group", Some(8))?.unwrap_or(1),
        topk_group: o.usize_nullable("topk_group", Some(4))?.unwrap_or(1),
        scoring_func: o.choice(
            "scoring_func",
            "sigmoid",
            &[
                ("sigmoid", ScoringFunc::Sigmoid),
                ("softmax", ScoringFunc::Softmax),
            ],
        )?,
        topk_method: o.choice(
            "topk_method",
            "noaux_tc",
            &[
                ("noaux_tc", TopkMethod::NoauxTc),
                ("greedy", TopkMethod::Greedy),
                ("group_limited_greedy", TopkMethod::GroupLimitedGreedy),
            ],
        )?,
        norm_topk_prob: o.bool_or("norm_topk_prob", true)?,
        routed_scaling_factor: o.f64_or("routed_scaling_factor", 2.5)?,
    };
    let model = ModelConfig {
        vocab_size,
        hidden_size,
        intermediate_size,
        moe_intermediate_size,
        num_hidden_layers,
        num_nextn_predict_layers: o
            .usize_nullable("num_nextn_predict_layers", Some(1))?
            .unwrap_or(0),
        n_routed_experts,
        n_shared_experts: o.usize_nullable("n_shared_experts", Some(1))?.unwrap_or(0),
        first_k_dense_replace: o
            .usize_nullable("first_k_dense_replace", Some(3))?
            .unwrap_or(0),
        rms_norm_eps: o.f64_or("rms_norm_eps", 1e-6)?,
        attention_bias: o.bool_or("attention_bias", false)?,
        tie_word_embeddings: o.bool_or("tie_word_embeddings", false)?,
        rope,
        mla,
        gate,
    };
    let freq = o.usize_or("moe_layer_freq", 1)?;
    if freq != 1 {
        warnings.push(format!(
            "moe_layer_freq = {freq} is ignored, as the official code and transformers ignore it (the hub's remote code would make layers with layer % {freq} ≠ 0 dense)"
        ));
    }
    if model.rms_norm_eps < 0.0 {
        return Err(o.err("rms_norm_eps", "must be ≥ 0"));
    }
    model.validate().map_err(|e| reference_error(path, e))?;
    let fp8 = parse_quantization(&o)?;
    Ok(Parsed {
        model,
        fp8,
        warnings,
    })
}

/// `quantization_config` → FP8 block size (`None` when absent).
fn parse_quantization(o: &Obj) -> Result<Option<Fp8Storage>> {
    let Some(map) = o.object("quantization_config")? else {
        return Ok(None);
    };
    let q = Obj {
        path: o.path,
        prefix: "quantization_config.",
        map,
    };
    let method = q.str_or("quant_method", "fp8")?;
    if method != "fp8" {
        return Err(q.err(
            "quant_method",
            format!("\"{method}\" is not supported; dsv3 reads \"fp8\" (block-scaled E4M3)"),
        ));
    }
    let fmt = q.str_or("fmt", "e4m3")?;
    if fmt != "e4m3" {
        return Err(q.err(
            "fmt",
            format!("\"{fmt}\" is not supported; expected \"e4m3\""),
        ));
    }
    let block = match q.get("weight_block_size") {
        None => 128,
        Some(v) => {
            let dims: Option<Vec<u64>> = v
                .as_array()
                .and_then(|a| a.iter().map(Value::as_u64).collect());
            match dims.as_deref() {
                Some([a, b]) if a == b && *a > 0 => *a as usize,
                _ => {
                    return Err(q.err(
                        "weight_block_size",
                        format!("{v}: expected two equal positive integers such as [128, 128]"),
                    ))
                }
            }
        }
    };
    let scale_fmt = match q.str_or("scale_fmt", "")? {
        "" => ScaleFmt::F32,
        "ue8m0" => ScaleFmt::Ue8m0,
        other => {
            return Err(q.err(
                "scale_fmt",
                format!("\"{other}\" is not supported; expected \"ue8m0\" or null (f32 scales)"),
            ))
        }
    };
    Ok(Some(Fp8Storage { block, scale_fmt }))
}

/// A reference-side validation error, located in the config file.
pub(crate) fn reference_error(path: &Path, e: dsv3_reference::Error) -> Error {
    Error::Checkpoint {
        path: PathBuf::from(path),
        msg: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The published DeepSeek-V3 `config.json` (hub `deepseek-ai/DeepSeek-V3`), as listed in
    /// official-code.md §1.
    pub(crate) fn v3_config() -> Value {
        json!({
            "architectures": ["DeepseekV3ForCausalLM"],
            "attention_bias": false, "attention_dropout": 0.0,
            "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1,
            "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168,
            "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512,
            "max_position_embeddings": 163840, "model_type": "deepseek_v3",
            "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8,
            "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": true,
            "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61,
            "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "q_lora_rank": 1536,
            "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
            "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                                    "quant_method": "fp8", "weight_block_size": [128, 128]},
            "rms_norm_eps": 1e-06,
            "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                             "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                             "type": "yarn"},
            "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid",
            "tie_word_embeddings": false, "topk_group": 4, "topk_method": "noaux_tc",
            "torch_dtype": "bfloat16", "use_cache": true, "v_head_dim": 128,
            "vocab_size": 129280
        })
    }

    fn parse_v(v: &Value) -> Result<Parsed> {
        parse(Path::new("config.json"), v)
    }

    #[test]
    fn the_published_v3_config_parses_to_the_official_constants() {
        let p = parse_v(&v3_config()).unwrap();
        let m = &p.model;
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
        assert_eq!(
            p.fp8,
            Some(Fp8Storage {
                block: 128,
                scale_fmt: ScaleFmt::F32
            })
        );
        assert_eq!(m.mla.q_lora_rank, Some(1536));
        assert_eq!(m.mla.qk_head_dim(), 192);
        // official-code.md §4.2
        assert!((m.mla.softmax_scale - 0.1352337788608801).abs() < 1e-15);
        assert_eq!(m.gate.topk_method, TopkMethod::NoauxTc);
        assert_eq!((m.gate.n_group, m.gate.topk_group, m.gate.top_k), (8, 4, 8));
        assert!((0..3).all(|l| !m.is_moe_layer(l)) && (3..62).all(|l| m.is_moe_layer(l)));
        assert_eq!(m.total_layers(), 62);
    }

    #[test]
    fn v3_1_scale_fmt_ue8m0_is_read_and_unknown_formats_are_refused() {
        let mut v = v3_config();
        v["quantization_config"]["scale_fmt"] = json!("ue8m0");
        let p = parse_v(&v).unwrap();
        assert_eq!(p.fp8.unwrap().scale_fmt, ScaleFmt::Ue8m0);
        v["quantization_config"]["scale_fmt"] = json!(null);
        assert_eq!(parse_v(&v).unwrap().fp8.unwrap().scale_fmt, ScaleFmt::F32);
        v["quantization_config"]["scale_fmt"] = json!("e8m0");
        let e = parse_v(&v).unwrap_err().to_string();
        assert!(e.contains("scale_fmt") && e.contains("e8m0"), "{e}");
    }

    #[test]
    fn transformers_5_rope_parameters_are_read_too() {
        let mut v = v3_config();
        let rope = v["rope_scaling"].clone();
        v.as_object_mut().unwrap().remove("rope_scaling");
        v.as_object_mut().unwrap().remove("rope_theta");
        let mut params = rope.as_object().unwrap().clone();
        params.remove("type");
        params.insert("rope_type".into(), json!("yarn"));
        params.insert("rope_theta".into(), json!(10000.0));
        v["rope_parameters"] = Value::Object(params);
        let a = parse_v(&v).unwrap().model;
        let b = parse_v(&v3_config()).unwrap().model;
        assert_eq!(a.rope, b.rope);
        assert_eq!(a.mla, b.mla);
    }

    #[test]
    fn no_rope_scaling_means_plain_rope() {
        let mut v = v3_config();
        v.as_object_mut().unwrap().remove("rope_scaling");
        let m = parse_v(&v).unwrap().model;
        assert_eq!(m.rope.yarn, None);
        assert!((m.mla.softmax_scale - 192f64.powf(-0.5)).abs() < 1e-15);
    }

    #[test]
    fn bad_fields_are_named() {
        let cases: Vec<(&str, Value, &str)> = vec![
            ("hidden_size", json!("big"), "`hidden_size`"),
            ("hidden_act", json!("gelu"), "`hidden_act`"),
            ("n_group", json!(3), "n_group"),
            ("topk_group", json!(9), "topk_group"),
            ("scoring_func", json!("relu"), "`scoring_func`"),
            ("num_key_value_heads", json!(1), "`num_key_value_heads`"),
            ("qk_rope_head_dim", json!(63), "qk_rope_head_dim"),
            (
                "rope_scaling",
                json!({"type": "dynamic", "factor": 2}),
                "`rope_scaling.type`",
            ),
            (
                "quantization_config",
                json!({"quant_method": "fp8", "weight_block_size": [128, 64]}),
                "`quantization_config.weight_block_size`",
            ),
            (
                "quantization_config",
                json!({"quant_method": "awq"}),
                "`quantization_config.quant_method`",
            ),
        ];
        for (field, value, want) in cases {
            let mut v = v3_config();
            v[field] = value;
            let e = parse_v(&v).unwrap_err().to_string();
            assert!(e.contains(want), "{field}: {e}");
        }
        let mut v = v3_config();
        v.as_object_mut().unwrap().remove("vocab_size");
        let e = parse_v(&v).unwrap_err().to_string();
        assert!(e.contains("`vocab_size`: missing"), "{e}");
        assert!(parse_v(&json!([1])).is_err());
    }

    #[test]
    fn hf_cos_sin_scaling_is_reported() {
        let mut v = v3_config();
        v["rope_scaling"]["mscale"] = json!(0.707);
        let p = parse_v(&v).unwrap();
        assert_eq!(p.warnings.len(), 1, "{:?}", p.warnings);
        assert!(p.warnings[0].contains("cos/sin"));
    }
}
