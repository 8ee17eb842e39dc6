//! The RoPE fields of `config.json`: `rope_scaling` (the hub's spelling) or `rope_parameters`
//! (transformers ≥ 5), plain RoPE or YaRN with its attention scale.

use dsv3_reference::rope::{RopeConfig, Yarn};

use super::Obj;
use crate::registry::error::Result;

/// `rope_scaling` / `rope_parameters` → [`RopeConfig`].
pub(super) fn parse_rope(o: &Obj, dim: usize, warnings: &mut Vec<String>) -> Result<RopeConfig> {
    let (key, params) = match o.object("rope_scaling")? {
        Some(m) => ("rope_scaling", Some(m)),
        None => ("rope_parameters", o.object("rope_parameters")?),
    };
    let prefix = format!("{key}.");
    let r = params.map(|map| Obj {
        path: o.path,
        prefix: &prefix,
        map,
    });
    let top_theta = o.f64_or("rope_theta", 10000.0)?;
    let theta = match &r {
        Some(r) => r.f64_or("rope_theta", top_theta)?,
        None => top_theta,
    };
    let interleaved = o.bool_or("rope_interleave", true)?;
    let Some(r) = r else {
        return Ok(RopeConfig {
            dim,
            theta,
            yarn: None,
            interleaved,
        });
    };
    let kind = match r.get("rope_type") {
        Some(_) => r.str_or("rope_type", "default")?,
        None => r.str_or("type", "default")?,
    };
    let yarn = match kind {
        "default" => None,
        "yarn" => {
            let max_pos = o.usize_or("max_position_embeddings", 4096)?;
            let original = r.usize_or(
                "original_max_position_embeddings",
                o.usize_or("original_max_position_embeddings", max_pos)?,
            )?;
            let factor = match r.get("factor") {
                Some(_) => r.f64_or("factor", 1.0)?,
                None => max_pos as f64 / original as f64,
            };
            // HF: `beta_fast or 32`, `beta_slow or 1` (0 means the default)
            let beta_fast = Some(r.f64_or("beta_fast", 32.0)?).filter(|&b| b != 0.0);
            let beta_slow = Some(r.f64_or("beta_slow", 1.0)?).filter(|&b| b != 0.0);
            let mscale = r.f64_or("mscale", 0.0)?;
            let mscale_all_dim = r.f64_or("mscale_all_dim", 0.0)?;
            let hf_cos_sin_factor = match r.get("attention_factor") {
                Some(_) => r.f64_or("attention_factor", 1.0)?,
                None if mscale != 0.0 && mscale_all_dim != 0.0 => {
                    yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
                }
                None => yarn_mscale(factor, 1.0),
            };
            if (hf_cos_sin_factor - 1.0).abs() > 1e-12 {
                warnings.push(format!(
                    "{key}: transformers multiplies cos/sin by an attention factor of {hf_cos_sin_factor} (from factor, mscale, mscale_all_dim); the official code and dsv3 do not (SPEC.md, RoPE differences)"
                ));
            }
            if !r.bool_or("truncate", true)? {
                warnings.push(format!(
                    "{key}.truncate = false: transformers does not round the YaRN correction range; the official code and dsv3 do"
                ));
            }
            Some(Yarn {
                factor,
                original_max_position_embeddings: original,
                beta_fast: beta_fast.unwrap_or(32.0),
                beta_slow: beta_slow.unwrap_or(1.0),
                mscale_all_dim,
            })
        }
        other => {
            return Err(r.err(
                if r.get("rope_type").is_some() {
                    "rope_type"
                } else {
                    "type"
                },
                format!("\"{other}\" is not supported; DeepSeek-V3 uses \"yarn\" (or none)"),
            ))
        }
    };
    Ok(RopeConfig {
        dim,
        theta,
        yarn,
        interleaved,
    })
}

/// YaRN's `0.1 · m · ln s + 1` (1 for `s ≤ 1`), HF `get_mscale`.
fn yarn_mscale(factor: f64, m: f64) -> f64 {
    if factor <= 1.0 {
        1.0
    } else {
        0.1 * m * factor.ln() + 1.0
    }
}
