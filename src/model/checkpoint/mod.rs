//! Loading a DeepSeek-V3 model directory in the hub layout into a
//! [`dsv3_reference::model::Model`].
//!
//! A directory holds `config.json` ([`config`]) and one or many `*.safetensors` shards, with
//! `model.safetensors.index.json` (`weight_map`: tensor → shard) when sharded. Tensors keep
//! their hub names (`model.layers.3.mlp.experts.17.down_proj.weight`). Shards are mapped into
//! memory and opened only when a tensor in them is needed; weights are borrowed from the
//! mapping and decoded on use, so loading one layer of the 671B checkpoint reads that layer's
//! headers and nothing else (`--layers`).
//!
//! Dtypes: F32, BF16, and F8_E4M3 with `weight_scale_inv` (F32, `[⌈N/B⌉, ⌈K/B⌉]`, partial edge
//! blocks allowed). Every malformed input is an [`Error::Checkpoint`] naming the file and the
//! tensor or config field.

pub mod config;
mod shards;

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use ndarray::Array2;

use dsv3_reference::fp8::ScaleFmt;
use dsv3_reference::linear::{Linear, Stored, Weight};
use dsv3_reference::mla::{Mla, QProj};
use dsv3_reference::mlp::Mlp;
use dsv3_reference::model::{Block, Ffn, Model, ModelConfig, Mtp};
use dsv3_reference::moe::{Moe, TopkMethod};

use crate::registry::error::{Error, Result};
use crate::registry::io::SafeFile;
use crate::registry::tensor::DType;
pub use config::Fp8Storage;
use shards::{read_index, scan_shards, Shard};

/// The index file of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// The block edge of FP8 weights when `config.json` has no `quantization_config` (OFF's
/// `block_size`).
const DEFAULT_FP8_BLOCK: usize = 128;

/// An opened model directory: its config and where each tensor lives.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub fp8: Option<Fp8Storage>,
    /// Things `config.json` says that dsv3 reads differently from transformers.
    pub warnings: Vec<String>,
    /// `model.safetensors.index.json` when the checkpoint has one.
    pub index: Option<PathBuf>,
    shards: Vec<Shard>,
    location: BTreeMap<String, usize>,
    used: RefCell<BTreeSet<String>>,
}

/// One tensor found in a shard.
struct Entry<'a> {
    file: &'a SafeFile,
    dtype: DType,
    shape: Vec<usize>,
}

fn bad(path: impl Into<PathBuf>, msg: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.into(),
        msg: msg.into(),
    }
}

impl Checkpoint {
    /// Read `dir/config.json` and locate every tensor (from the index, or from the headers of
    /// all `*.safetensors` files when there is no index).
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.is_dir() {
            return Err(bad(
                &dir,
                "not a directory (a model directory holds config.json and *.safetensors)",
            ));
        }
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            return Err(bad(
                &config_path,
                "missing: a model directory needs config.json",
            ));
        }
        let parsed = config::read(&config_path)?;
        let index_path = dir.join(INDEX_FILE);
        let (shards, location, index) = if index_path.is_file() {
            let (shards, location) = read_index(&dir, &index_path)?;
            (shards, location, Some(index_path))
        } else {
            let (shards, location) = scan_shards(&dir)?;
            (shards, location, None)
        };
        Ok(Checkpoint {
            dir,
            config: parsed.model,
            fp8: parsed.fp8,
            warnings: parsed.warnings,
            index,
            shards,
            location,
            used: RefCell::new(BTreeSet::new()),
        })
    }

    /// How the FP8 path scales activation tiles: `quantization_config.scale_fmt` (`"ue8m0"` in
    /// V3.1), f32 scales when absent or when the checkpoint is not FP8.
    pub fn fp8_scale_fmt(&self) -> ScaleFmt {
        self.fp8.as_ref().map_or(ScaleFmt::F32, |q| q.scale_fmt)
    }

    /// Every tensor name the checkpoint has.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.location.keys().map(String::as_str)
    }

    /// Tensors no loaded part of the model used (after [`Checkpoint::load`]).
    pub fn unused(&self) -> Vec<String> {
        let used = self.used.borrow();
        self.location
            .keys()
            .filter(|k| !used.contains(*k))
            .cloned()
            .collect()
    }

    /// Shards opened so far (mapped, header parsed).
    pub fn opened_shards(&self) -> Vec<&Path> {
        self.shards
            .iter()
            .filter(|s| s.file.get().is_some())
            .map(|s| s.path.as_path())
            .collect()
    }

    /// Whether any tensor name starts with `prefix` (`model.layers.62.`).
    pub fn has_prefix(&self, prefix: &str) -> bool {
        self.location
            .range(prefix.to_string()..)
            .next()
            .is_some_and(|(k, _)| k.starts_with(prefix))
    }

    fn shard(&self, i: usize, wanted: &str) -> Result<&SafeFile> {
        let s = &self.shards[i];
        if let Some(f) = s.file.get() {
            return Ok(f);
        }
        if !s.path.is_file() {
            let why = match &self.index {
                Some(ix) => format!(
                    "missing shard: {} names it for `{wanted}`",
                    ix.file_name()
                        .map_or(String::new(), |n| n.to_string_lossy().into_owned())
                ),
                None => "missing shard".to_string(),
            };
            return Err(bad(&s.path, why));
        }
        let f = SafeFile::open(&s.path)?;
        Ok(s.file.get_or_init(|| f))
    }

    fn find(&self, name: &str) -> Result<Option<Entry<'_>>> {
        let Some(&i) = self.location.get(name) else {
            return Ok(None);
        };
        let file = self.shard(i, name)?;
        let (dtype, shape) = match file.info(name) {
            None => {
                return Err(bad(
                    file.path(),
                    format!("has no tensor `{name}`, but {} says it does", INDEX_FILE),
                ))
            }
            Some(r) => r?,
        };
        self.used.borrow_mut().insert(name.to_string());
        Ok(Some(Entry { file, dtype, shape }))
    }

    fn require(&self, name: &str, why: &str) -> Result<Entry<'_>> {
        self.find(name)?.ok_or_else(|| self.missing(name, why))
    }

    fn missing(&self, name: &str, why: &str) -> Error {
        bad(
            self.index.clone().unwrap_or_else(|| self.dir.clone()),
            format!("missing tensor `{name}` ({why})"),
        )
    }

    /// A `[rows, cols]` matrix: F32, BF16, or F8_E4M3 with its `weight_scale_inv`.
    fn weight(&self, name: &str, rows: usize, cols: usize, why: &str) -> Result<Weight<'_>> {
        let e = self.require(name, why)?;
        if e.shape != [rows, cols] {
            return Err(bad(
                e.file.path(),
                format!(
                    "tensor `{name}` has shape {:?}; expected [{rows}, {cols}] ({why})",
                    e.shape
                ),
            ));
        }
        let bytes = e.file.bytes(name).ok_or_else(|| {
            bad(
                e.file.path(),
                format!("tensor `{name}` lies outside the file"),
            )
        })?;
        let stored = match e.dtype {
            DType::F32 => Stored::F32(Cow::Borrowed(bytes)),
            DType::BF16 => Stored::Bf16(Cow::Borrowed(bytes)),
            DType::F8E4M3 => {
                let block = self.fp8.as_ref().map_or(DEFAULT_FP8_BLOCK, |q| q.block);
                let scale_inv = self.scale_inv(name, rows, cols, block)?;
                Stored::Fp8 {
                    codes: Cow::Borrowed(bytes),
                    scale_inv,
                    block,
                }
            }
            other => {
                return Err(bad(
                    e.file.path(),
                    format!(
                        "tensor `{name}` has dtype {other}; dsv3 reads weights as F32, BF16 or F8_E4M3 (with weight_scale_inv)"
                    ),
                ))
            }
        };
        let w = Weight {
            name: name.to_string(),
            rows,
            cols,
            stored,
        };
        w.validate()?;
        Ok(w)
    }

    /// The block scales of the FP8 weight `name` (`….weight` → `….weight_scale_inv`).
    fn scale_inv(&self, name: &str, rows: usize, cols: usize, block: usize) -> Result<Array2<f32>> {
        let sname = format!("{name}_scale_inv");
        let e = self.require(
            &sname,
            &format!("the block scales of the F8_E4M3 weight `{name}`"),
        )?;
        let grid = [rows.div_ceil(block), cols.div_ceil(block)];
        if e.shape != grid {
            return Err(bad(
                e.file.path(),
                format!(
                    "tensor `{sname}` has shape {:?}; expected {grid:?} = [⌈{rows}/{block}⌉, ⌈{cols}/{block}⌉] (weight_block_size {block})",
                    e.shape
                ),
            ));
        }
        if e.dtype != DType::F32 {
            return Err(bad(
                e.file.path(),
                format!(
                    "tensor `{sname}` has dtype {}; block scales are F32",
                    e.dtype
                ),
            ));
        }
        let values = e.file.tensor(&sname)?.to_f32().expect("F32");
        if let Some(i) = values.iter().position(|s| !(s.is_finite() && *s > 0.0)) {
            return Err(bad(
                e.file.path(),
                format!(
                    "tensor `{sname}`[{}, {}] is {}; block scales must be finite and > 0",
                    i / grid[1],
                    i % grid[1],
                    values[i]
                ),
            ));
        }
        Ok(Array2::from_shape_vec((grid[0], grid[1]), values).expect("checked shape"))
    }

    /// A `[len]` vector (norm weights, biases): F32 or BF16.
    fn vector(&self, name: &str, len: usize, why: &str) -> Result<Vec<f32>> {
        let e = self.require(name, why)?;
        if e.shape != [len] {
            return Err(bad(
                e.file.path(),
                format!(
                    "tensor `{name}` has shape {:?}; expected [{len}] ({why})",
                    e.shape
                ),
            ));
        }
        if !matches!(e.dtype, DType::F32 | DType::BF16) {
            return Err(bad(
                e.file.path(),
                format!(
                    "tensor `{name}` has dtype {}; dsv3 reads vectors as F32 or BF16",
                    e.dtype
                ),
            ));
        }
        Ok(e.file.tensor(name)?.to_f32().expect("F32 or BF16"))
    }

    /// `prefix.weight` `[rows, cols]` and, when `bias`, `prefix.bias` `[rows]`.
    fn linear(
        &self,
        prefix: &str,
        rows: usize,
        cols: usize,
        bias: bool,
        why: &str,
    ) -> Result<Linear<'_>> {
        let weight = self.weight(&format!("{prefix}.weight"), rows, cols, why)?;
        let bias = if bias {
            Some(self.vector(&format!("{prefix}.bias"), rows, "attention_bias: true")?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    fn mlp(&self, prefix: &str, inter: usize, why: &str) -> Result<Mlp<'_>> {
        let d = self.config.hidden_size;
        Ok(Mlp {
            w1: self.linear(&format!("{prefix}gate_proj"), inter, d, false, why)?,
            w3: self.linear(&format!("{prefix}up_proj"), inter, d, false, why)?,
            w2: self.linear(&format!("{prefix}down_proj"), d, inter, false, why)?,
        })
    }

    /// The decoder block of checkpoint layer `layer` (main or MTP).
    pub fn block(&self, layer: usize) -> Result<Block<'_>> {
        let c = &self.config;
        let m = &c.mla;
        let p = format!("model.layers.{layer}.");
        let d = c.hidden_size;
        let (h, dn, dr, dv, dc) = (
            m.n_heads,
            m.qk_nope_head_dim,
            m.qk_rope_head_dim,
            m.v_head_dim,
            m.kv_lora_rank,
        );
        let q_out = h * (dn + dr);
        let q = match m.q_lora_rank {
            Some(dq) => QProj::Lora {
                wq_a: self.linear(
                    &format!("{p}self_attn.q_a_proj"),
                    dq,
                    d,
                    c.attention_bias,
                    "[q_lora_rank, hidden_size]",
                )?,
                q_norm: self.vector(
                    &format!("{p}self_attn.q_a_layernorm.weight"),
                    dq,
                    "[q_lora_rank]",
                )?,
                wq_b: self.linear(
                    &format!("{p}self_attn.q_b_proj"),
                    q_out,
                    dq,
                    false,
                    "[num_attention_heads·(qk_nope_head_dim + qk_rope_head_dim), q_lora_rank]",
                )?,
            },
            None => QProj::Direct {
                wq: self.linear(
                    &format!("{p}self_attn.q_proj"),
                    q_out,
                    d,
                    false,
                    "q_lora_rank is null: [num_attention_heads·(qk_nope_head_dim + qk_rope_head_dim), hidden_size]",
                )?,
            },
        };
        let attn = Mla {
            q,
            wkv_a: self.linear(
                &format!("{p}self_attn.kv_a_proj_with_mqa"),
                dc + dr,
                d,
                c.attention_bias,
                "[kv_lora_rank + qk_rope_head_dim, hidden_size]",
            )?,
            kv_norm: self.vector(
                &format!("{p}self_attn.kv_a_layernorm.weight"),
                dc,
                "[kv_lora_rank]",
            )?,
            wkv_b: self.linear(
                &format!("{p}self_attn.kv_b_proj"),
                h * (dn + dv),
                dc,
                false,
                "[num_attention_heads·(qk_nope_head_dim + v_head_dim), kv_lora_rank]",
            )?,
            wo: self.linear(
                &format!("{p}self_attn.o_proj"),
                d,
                h * dv,
                c.attention_bias,
                "[hidden_size, num_attention_heads·v_head_dim]",
            )?,
        };
        let ffn = if c.is_moe_layer(layer) {
            let e = c.n_routed_experts;
            let bias = if c.gate.topk_method == TopkMethod::NoauxTc {
                Some(self.vector(
                    &format!("{p}mlp.gate.e_score_correction_bias"),
                    e,
                    "topk_method noaux_tc: [n_routed_experts]",
                )?)
            } else {
                None
            };
            let experts = (0..e)
                .map(|i| {
                    self.mlp(
                        &format!("{p}mlp.experts.{i}."),
                        c.moe_intermediate_size,
                        "routed expert: moe_intermediate_size × hidden_size",
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            let shared = if c.n_shared_experts > 0 {
                Some(self.mlp(
                    &format!("{p}mlp.shared_experts."),
                    c.n_shared_experts * c.moe_intermediate_size,
                    "shared experts: n_shared_experts·moe_intermediate_size × hidden_size",
                )?)
            } else {
                None
            };
            Ffn::Moe(Box::new(Moe {
                gate: self.linear(
                    &format!("{p}mlp.gate"),
                    e,
                    d,
                    false,
                    "router: [n_routed_experts, hidden_size]",
                )?,
                bias,
                experts,
                shared,
            }))
        } else {
            Ffn::Dense(Box::new(self.mlp(
                &format!("{p}mlp."),
                c.intermediate_size,
                "dense FFN (layer < first_k_dense_replace): intermediate_size × hidden_size",
            )?))
        };
        Ok(Block {
            layer,
            attn_norm: self.vector(&format!("{p}input_layernorm.weight"), d, "[hidden_size]")?,
            attn,
            ffn_norm: self.vector(
                &format!("{p}post_attention_layernorm.weight"),
                d,
                "[hidden_size]",
            )?,
            ffn,
        })
    }

    /// The MTP module of checkpoint layer `layer` (≥ `num_hidden_layers`).
    pub fn mtp(&self, layer: usize) -> Result<Mtp<'_>> {
        let c = &self.config;
        let (d, v) = (c.hidden_size, c.vocab_size);
        let p = format!("model.layers.{layer}.");
        let shared_head = match self.find(&format!("{p}shared_head.head.weight"))? {
            Some(_) => Some(self.linear(
                &format!("{p}shared_head.head"),
                v,
                d,
                false,
                "MTP head: [vocab_size, hidden_size]",
            )?),
            None => None,
        };
        let embed = match self.find(&format!("{p}embed_tokens.weight"))? {
            Some(_) => Some(self.weight(
                &format!("{p}embed_tokens.weight"),
                v,
                d,
                "MTP embedding: [vocab_size, hidden_size]",
            )?),
            None => None,
        };
        Ok(Mtp {
            layer,
            enorm: self.vector(&format!("{p}enorm.weight"), d, "MTP: [hidden_size]")?,
            hnorm: self.vector(&format!("{p}hnorm.weight"), d, "MTP: [hidden_size]")?,
            eh_proj: self.linear(
                &format!("{p}eh_proj"),
                d,
                2 * d,
                false,
                "MTP: [hidden_size, 2·hidden_size]",
            )?,
            block: self.block(layer)?,
            shared_head_norm: self.vector(
                &format!("{p}shared_head.norm.weight"),
                d,
                "MTP: [hidden_size]",
            )?,
            shared_head,
            embed,
        })
    }

    /// Build the model: embedding, final norm, head, and the blocks of `layers` (all main
    /// layers when `None`). MTP layers (≥ `num_hidden_layers`) are loaded when present and
    /// selected (all when `None`).
    pub fn load(&self, layers: Option<&[usize]>) -> Result<Model<'_>> {
        let c = &self.config;
        let (d, v) = (c.hidden_size, c.vocab_size);
        let total = c.total_layers();
        let selected: Vec<usize> = match layers {
            None => (0..total).collect(),
            Some(ls) => {
                if let Some(&l) = ls.iter().find(|&&l| l >= total) {
                    return Err(Error::Usage(format!(
                        "--layers: layer {l} does not exist ({} has {} layers + {} MTP)",
                        self.dir.display(),
                        c.num_hidden_layers,
                        c.num_nextn_predict_layers
                    )));
                }
                let mut ls = ls.to_vec();
                ls.sort_unstable();
                ls.dedup();
                ls
            }
        };
        let embed = self.weight(
            "model.embed_tokens.weight",
            v,
            d,
            "[vocab_size, hidden_size]",
        )?;
        let head = match self.find("lm_head.weight")? {
            Some(_) => self.linear("lm_head", v, d, false, "[vocab_size, hidden_size]")?,
            None if c.tie_word_embeddings => Linear::new(embed.clone()),
            None => {
                return Err(self.missing(
                    "lm_head.weight",
                    "[vocab_size, hidden_size]; tie_word_embeddings is false",
                ))
            }
        };
        let norm = self.vector("model.norm.weight", d, "[hidden_size]")?;
        let mut blocks = Vec::new();
        let mut mtp = Vec::new();
        for &l in &selected {
            if l < c.num_hidden_layers {
                blocks.push(self.block(l)?);
            } else if layers.is_some() || self.has_prefix(&format!("model.layers.{l}.")) {
                mtp.push(self.mtp(l)?);
            }
        }
        Ok(Model {
            config: c.clone(),
            embed,
            blocks,
            norm,
            head,
            mtp,
        })
    }
}
