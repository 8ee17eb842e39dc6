//! The reference outputs and the tolerance policy of every GEMM op (the module docs of
//! [`super`] and SPEC.md "FP8 GEMM tolerance" / "Tensor Core bound" derive them).

use std::borrow::Cow;
use std::cell::OnceCell;

use dsv3_reference::fp8::fp8_gemm::Accumulation;
use rayon::prelude::*;

use super::{compute, windows, GemmConfig, Layout};
use crate::ops::gemm::fast::GemmOut;
use crate::ops::{get, outputs};
use crate::registry::compare::Policy;
use crate::registry::error::Result;
use crate::registry::io::TensorMap;
use crate::registry::tensor::{DType, Tensor};
use crate::registry::tolerance::{bound_use, within_bound, TcBoundTolerance};
use crate::registry::PolicyCtx;

/// Names of the auxiliary tensors a bound-mode reference hands its policy.
const AUX_ACCUMULATOR: &str = "aux:accumulator";
const AUX_TOLERANCE: &str = "aux:tolerance";

/// Each element's `tensor_core_bound` tolerance as little-endian f64 bytes, from the
/// accumulators' magnitudes, window magnitudes and slack, over a reduction of length `k`.
fn tolerance_bytes(out: &GemmOut, cfg: &GemmConfig, k: usize, promote_interval: usize) -> Vec<u8> {
    let tolerance = TcBoundTolerance::new((cfg.partials(k), windows(promote_interval, k)));
    let mut bytes = vec![0u8; 8 * out.magnitude.len()];
    match (
        out.magnitude.as_slice(),
        out.window_magnitude.as_slice(),
        out.slack.as_slice(),
    ) {
        // row-major arrays (every layout's today): in parallel
        (Some(m), Some(mw), Some(d)) => bytes
            .par_chunks_mut(8)
            .enumerate()
            .for_each(|(i, b)| b.copy_from_slice(&tolerance.of(m[i], mw[i], d[i]).to_le_bytes())),
        _ => {
            let values = out
                .magnitude
                .iter()
                .zip(&out.window_magnitude)
                .zip(&out.slack);
            for (b, ((&m, &mw), &d)) in bytes.chunks_exact_mut(8).zip(values) {
                b.copy_from_slice(&tolerance.of(m, mw, d).to_le_bytes());
            }
        }
    }
    bytes
}

/// The f32 accumulators as a tensor (row-major).
fn accumulators(c: &ndarray::Array2<f32>) -> Tensor {
    let c = c.as_standard_layout();
    Tensor::from_f32(c.shape().to_vec(), c.as_slice().expect("standard layout"))
}

/// The reference outputs of `L`: its output under `out_dtype`; in bound mode also the f32
/// accumulators and each element's tolerance as auxiliary tensors (the policy reads them in
/// place instead of computing everything again).
pub(super) fn reference<L: Layout>(inputs: &TensorMap, cfg: &GemmConfig) -> Result<TensorMap> {
    let (shape, k) = L::shape(inputs);
    let ops = L::operands(inputs, cfg)?;
    let Accumulation::TensorCoreBound {
        promote_interval, ..
    } = cfg.accumulation()
    else {
        return Ok(outputs([(L::OUTPUT, L::output(&ops, cfg, shape))]));
    };
    let folded = TcBoundTolerance::new((cfg.partials(k), windows(promote_interval, k)));
    let (c, tolerance) = match L::bound_output(&ops, cfg, &folded) {
        Some(folded) => folded,
        None => {
            let out = L::compute(&ops, cfg, true);
            let tolerance = tolerance_bytes(&out, cfg, k, promote_interval);
            // the magnitudes are spent: only the accumulators are needed from here
            (out.c, tolerance)
        }
    };
    let flat = vec![c.nrows(), c.ncols()];
    let aux_tolerance =
        Tensor::from_bytes(DType::F64, flat.clone(), tolerance).expect("one f64 per element");
    let aux_accumulator = accumulators(&c);
    Ok(outputs([
        (L::OUTPUT, cfg.out_tensor(shape, &c)),
        (AUX_ACCUMULATOR, aux_accumulator),
        (AUX_TOLERANCE, aux_tolerance),
    ]))
}

/// The policy of `L`'s output (module docs): undefined rows of a grouped output are not
/// judged.
pub(super) fn policy<'a, L: Layout>(ctx: &PolicyCtx<'a>) -> Policy<'a> {
    let cfg = ctx.config.get::<GemmConfig>();
    let candidate = get(ctx.candidate, ctx.output);
    let n = *candidate.shape.last().unwrap_or(&1);
    let (_, k) = L::shape(ctx.inputs);
    let inner = match cfg.accumulation() {
        Accumulation::TensorCoreBound {
            promote_interval, ..
        } => bound_policy::<L>(ctx, cfg, k, promote_interval),
        _ => rounding_policy::<L>(ctx, cfg, k),
    };
    let defined = L::operands(ctx.inputs, cfg)
        .ok()
        .and_then(|ops| L::defined_rows(&ops));
    match defined {
        None => inner,
        Some(rows) => Policy::Partial {
            why: "padding rows (m_indices = −1, rows past masked_m): undefined, as in DeepGEMM",
            judged: Box::new(move |i| rows[i / n.max(1)]),
            inner: Box::new(inner),
        },
    }
}

/// `tensor_core_bound`: every element measured against its own tolerance.
fn bound_policy<'a, L: Layout>(
    ctx: &PolicyCtx<'a>,
    cfg: &'a GemmConfig,
    k: usize,
    promote_interval: usize,
) -> Policy<'a> {
    let candidate = get(ctx.candidate, ctx.output);
    let bf16_out = candidate.dtype == DType::BF16;
    // the reference handed over its accumulators and tolerances, read in place (else: compute
    // them); little-endian f32 and f64 bytes
    let (acc, tol): (Cow<[u8]>, Cow<[u8]>) = match (
        ctx.reference.get(AUX_ACCUMULATOR),
        ctx.reference.get(AUX_TOLERANCE),
    ) {
        (Some(a), Some(t)) if a.dtype == DType::F32 && t.dtype == DType::F64 => {
            (Cow::Borrowed(&a.data[..]), Cow::Borrowed(&t.data[..]))
        }
        _ => match compute::<L>(ctx.inputs, cfg, true) {
            Ok(out) => (
                Cow::Owned(accumulators(&out.c).data),
                Cow::Owned(tolerance_bytes(&out, cfg, k, promote_interval)),
            ),
            Err(_) => (Cow::Owned(Vec::new()), Cow::Owned(Vec::new())),
        },
    };
    Policy::Bounded {
        why: "tensor_core_bound: the out_dtype rounding of a value within the Tensor Core \
              bound of the exact accumulator (SPEC.md \"Tensor Core bound\")",
        measure: Box::new(move |i| {
            let (Some(r), Some(t)) = (acc.get(4 * i..4 * i + 4), tol.get(8 * i..8 * i + 8)) else {
                return f64::INFINITY;
            };
            let r = f32::from_le_bytes(r.try_into().expect("4 bytes"));
            let t = f64::from_le_bytes(t.try_into().expect("8 bytes"));
            bound_use(candidate.value(i), r, t, bf16_out)
        }),
    }
}

/// Exact and tensor_core modes: bit-exact, or the out_dtype rounding of a value within
/// [`crate::registry::tolerance::gemm_bound`] of the reference accumulator.
fn rounding_policy<'a, L: Layout>(
    ctx: &PolicyCtx<'a>,
    cfg: &'a GemmConfig,
    k: usize,
) -> Policy<'a> {
    let candidate = get(ctx.candidate, ctx.output);
    let bf16_out = candidate.dtype == DType::BF16;
    let n = *candidate.shape.last().unwrap_or(&1);
    let w = cfg.partials(k);
    let inputs = ctx.inputs;
    // the reference accumulators and magnitudes, computed once, only if some element differs
    let bounds: OnceCell<Option<GemmOut>> = OnceCell::new();
    Policy::ExactUnless {
        why: "the out_dtype rounding of an f32 value within E = 2·γ_{W+2}·Σ|p|·a_s·b_s of the \
              reference accumulator (other f32 order across blocks, FMA, scale association)",
        allow: Box::new(move |i| {
            let Some(b) = bounds
                .get_or_init(|| compute::<L>(inputs, cfg, true).ok())
                .as_ref()
            else {
                return false;
            };
            let (r, c) = (i / n.max(1), i % n.max(1));
            within_bound(
                candidate.value(i),
                b.c[[r, c]],
                b.magnitude[[r, c]],
                w,
                bf16_out,
            )
        }),
    }
}
