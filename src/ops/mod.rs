//! The ops: one registry entry per op, one module per op family (each adapts tensors to the
//! reference function, states the tolerance policy and generates random inputs), and their
//! list, [`REGISTRY`].

pub mod act_quant;
pub mod attention_backward;
pub mod balance_loss;
mod bound_policy;
pub mod eplb;
pub mod fp8_cast;
pub mod gemm;
pub mod grpo;
pub mod mla;
pub mod moe_gate;
pub mod moe_gate_backward;
pub mod moe_permute;
pub mod optim;
mod quant_policy;
pub mod rmsnorm;
pub mod rmsnorm_backward;
pub mod rope;
pub mod routing;
pub mod swiglu;
pub mod swiglu_backward;
pub mod weight_dequant;
pub mod weight_quant;

/// Every op, in listing order.
pub static REGISTRY: &[&OpEntry] = &[
    &fp8_cast::FP8_CAST,
    &fp8_cast::FP8_DECODE,
    &act_quant::ACT_QUANT,
    &act_quant::ACT_QUANT_128X1,
    &weight_quant::WEIGHT_QUANT,
    &weight_dequant::WEIGHT_DEQUANT,
    &rmsnorm::RMSNORM,
    &rope::ROPE,
    &swiglu::SWIGLU,
    &rmsnorm_backward::RMSNORM_BACKWARD,
    &swiglu_backward::SWIGLU_BACKWARD,
    &moe_gate::MOE_GATE,
    &moe_gate_backward::MOE_GATE_BACKWARD,
    &moe_permute::MOE_PERMUTE,
    &moe_permute::MOE_PERMUTE_FP8,
    &moe_permute::MOE_COMBINE,
    &mla::MLA,
    &mla::MLA_DECODE,
    &attention_backward::ATTENTION_BACKWARD,
    &gemm::FP8_GEMM,
    &gemm::M_GROUPED_CONTIGUOUS,
    &gemm::M_GROUPED_MASKED,
    &gemm::LINEAR_FP8_FPROP,
    &gemm::LINEAR_FP8_DGRAD,
    &gemm::LINEAR_FP8_WGRAD,
    &routing::NODE_LIMITED_ROUTING,
    &routing::BIAS_UPDATE,
    &balance_loss::BALANCE_LOSS,
    &eplb::EPLB,
    &optim::ADAMW_STEP,
    &optim::PARAM_EMA,
    &optim::CLIP_GRAD_NORM,
    &grpo::GRPO_LOSS,
];

/// The op called `name`.
pub fn find(name: &str) -> crate::Result<&'static OpEntry> {
    REGISTRY
        .iter()
        .copied()
        .find(|op| op.name == name)
        .ok_or_else(|| Error::UnknownOp {
            name: name.to_string(),
            known: REGISTRY
                .iter()
                .map(|op| op.name)
                .collect::<Vec<_>>()
                .join(", "),
        })
}

use crate::registry::OpEntry;
use crate::Error;
use dsv3_reference::fp8::ScaleFmt;

use crate::registry::config::{ceil, FieldKind, FieldValue};
use crate::registry::contract::Param;
use crate::registry::io::TensorMap;
use crate::registry::rng::Rng;
use crate::registry::tensor::Tensor;

/// The tensor `name` of a map the contract has validated.
pub(crate) fn get<'a>(m: &'a TensorMap, name: &str) -> &'a Tensor {
    m.get(name)
        .unwrap_or_else(|| panic!("tensor `{name}` was validated by the contract"))
}

/// Refuse a NaN or ±inf anywhere in input `name` of `op`, naming the element (for ops whose
/// result a non-finite input makes meaningless rather than non-finite, such as a routing).
pub(crate) fn require_finite(
    op: &'static str,
    name: &'static str,
    t: &Tensor,
    why: &'static str,
) -> crate::Result<()> {
    match (0..t.numel()).find(|&i| !t.value(i).is_finite()) {
        None => Ok(()),
        Some(i) => Err(dsv3_reference::Error::Value {
            op,
            tensor: name,
            index: crate::registry::tensor::unravel(i, &t.shape),
            value: format!("{}", t.value(i)),
            why,
        }
        .into()),
    }
}

/// Refuse to generate tensors of `shapes` beyond the memory budget ([`crate::registry::limits`]: zero
/// dims counted as 1, [`crate::registry::limits::WORKING_BYTES`] per element), before allocating them.
/// Every generator calls it once its sizes are drawn.
pub(crate) fn gen_fits(shapes: &[&[usize]]) -> crate::Result<()> {
    let need = shapes.iter().try_fold(0u64, |a, s| {
        a.checked_add(
            crate::registry::limits::extent(s)?
                .checked_mul(crate::registry::limits::WORKING_BYTES)?,
        )
    });
    crate::registry::limits::ensure_fits(&format!("generating inputs of shapes {shapes:?}"), need)
}

pub(crate) fn outputs<const N: usize>(pairs: [(&str, Tensor); N]) -> TensorMap {
    pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
}

/// The domain of a tile edge (`block_size`).
pub(crate) const BLOCK_KIND: FieldKind = FieldKind::Int {
    min: 1,
    max: ceil::BLOCK,
};

/// `scale_fmt`: `null` (an f32 scale, V3) or `"ue8m0"` (a power of two, V3.1).
impl FieldValue for ScaleFmt {
    fn read(v: &serde_json::Value) -> Self {
        match v.as_str() {
            Some("ue8m0") => ScaleFmt::Ue8m0,
            _ => ScaleFmt::F32,
        }
    }
}

crate::op_config! {
    /// The config of the quantization ops (`act_quant`, `act_quant_128x1`, `weight_quant`).
    pub struct QuantConfig {
        block_size: usize = "128", BLOCK_KIND, "tile edge; 128 in DeepSeek-V3";
        scale_fmt: ScaleFmt = "null", FieldKind::Choice { values: &["ue8m0"], nullable: true },
            "null: s = amax/448 (V3); \"ue8m0\": s rounded up to a power of two (V3.1)";
    }
}

crate::choice! {
    /// The dtype an op writes its f32 results in.
    pub enum OutDtype {
        /// rounded to nearest even
        Bf16 = "bf16",
        F32 = "f32",
    }
}

/// `block_size` of a quantization op, for its shape rules.
pub(crate) const QUANT_BLOCK: Param = Param {
    name: "block_size",
    get: |c| c.get::<QuantConfig>().block_size,
};

/// Random values for quantization tests: Gaussian rows with a random magnitude, and with some
/// probability a hazard tile (all zero, constant, one outlier over tiny values, below the amax
/// floor, huge, exact E4M3 ties at scale 1).
pub(crate) fn quant_values(rng: &mut Rng, rows: usize, cols: usize, tile: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(rows * cols);
    for _ in 0..rows {
        let row_scale = (rng.normal() * 2.0).exp();
        for _ in 0..cols {
            v.push((rng.normal() * row_scale) as f32);
        }
    }
    let tiles = (rows * cols).div_ceil(tile);
    for t in 0..tiles {
        if !rng.chance(0.3) {
            continue;
        }
        let span = t * tile..((t + 1) * tile).min(v.len());
        let kind = rng.range(0, 5);
        let c = (rng.normal() * 3.0) as f32;
        for (j, x) in v[span].iter_mut().enumerate() {
            *x = match kind {
                0 => 0.0,
                1 => c,
                2 => {
                    if j == 0 {
                        1e4
                    } else {
                        *x * 1e-3
                    }
                }
                3 => *x * 1e-6,
                4 => *x * 1e30,
                _ => *rng.pick(&[
                    448.0,
                    1.0625,
                    -1.1875,
                    2.125,
                    13.0,
                    -15.0,
                    0.0,
                    2f32.powi(-10),
                    3.0 * 2f32.powi(-10),
                ]),
            };
        }
    }
    v
}

/// F32 or BF16 (drawn) tensor of `shape` from f32 values (BF16 by RNE).
pub(crate) fn float_input(rng: &mut Rng, shape: Vec<usize>, values: &[f32]) -> Tensor {
    if rng.chance(0.5) {
        Tensor::from_f32(shape, values)
    } else {
        let b: Vec<half::bf16> = values
            .iter()
            .map(|&x| dsv3_reference::numeric::round_to_bf16(x))
            .collect();
        Tensor::from_bf16(shape, &b)
    }
}

/// `check` of a candidate under the op's policy (tests of what a policy admits and rejects).
#[cfg(test)]
pub(crate) fn policy_report(
    op: &crate::registry::OpEntry,
    inputs: &TensorMap,
    candidate: &TensorMap,
    cfg: &crate::registry::config::Config,
) -> crate::registry::check::CheckReport {
    let mode = crate::registry::check::Mode::Policy;
    crate::registry::check::check(op, inputs, candidate, cfg, mode, ("", ""))
        .expect("contract-valid tensors")
}
