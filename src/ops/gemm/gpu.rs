//! The GEMM ops on the GPU: `simt` (gpu/kernels/fp8_gemm.cu, exact block dots on CUDA cores)
//! and `wgmma` (gpu/kernels/fp8_gemm_wgmma.cu, Hopper Tensor Cores), the configs each
//! implements, and the one host-side gather/scatter of the grouped layouts.

#[cfg(feature = "cuda")]
use dsv3_gpu::fp8_gemm::Backend;
#[cfg(feature = "cuda")]
use dsv3_gpu::Floats;
use dsv3_reference::fp8::fp8_gemm::Accumulation;
#[cfg(feature = "cuda")]
use dsv3_reference::fp8::fp8_gemm::BlockScaled;
#[cfg(feature = "cuda")]
use dsv3_reference::fp8::grouped_gemm::{ExpertWeights, GroupRows};
use dsv3_reference::fp8::HOPPER_FP8_WGMMA;

use super::GemmConfig;
#[cfg(feature = "cuda")]
use crate::ops::OutDtype;
use crate::registry::config::Config;
#[cfg(feature = "cuda")]
use crate::registry::error::Result;

pub(super) const SIMT_KERNEL: &str = "gpu/kernels/fp8_gemm.cu";
pub(super) const WGMMA_KERNEL: &str = "gpu/kernels/fp8_gemm_wgmma.cu";

/// `simt` computes exact block dots on the CUDA cores: it is the exact mode, any block size.
pub(super) fn simt_supports(cfg: &Config) -> std::result::Result<(), &'static str> {
    match cfg.get::<GemmConfig>().accumulation() {
        // exact block dots: the exact mode, and inside every Tensor Core bound
        Accumulation::Exact | Accumulation::TensorCoreBound { .. } => Ok(()),
        Accumulation::TensorCore { .. } => {
            Err("tensor_core config: its block dots are exact, not a Tensor Core's")
        }
    }
}

/// `wgmma` runs the block dots on Hopper's Tensor Cores and promotes every 128 products: the
/// only config that describes its partials is the Hopper model with promote_interval 128.
pub(super) fn wgmma_supports(cfg: &Config) -> std::result::Result<(), &'static str> {
    let cfg = cfg.get::<GemmConfig>();
    match cfg.accumulation() {
        Accumulation::Exact => Err("exact mode: Tensor Core block dots are not exact"),
        Accumulation::TensorCore {
            model,
            promote_interval,
        } => {
            if cfg.block_size != 128 {
                Err("block_size ≠ 128 (the kernel's K and N tiles)")
            } else if promote_interval != 128 {
                Err("promote_interval ≠ 128 (the kernel promotes every 4 k32 steps)")
            } else if model != HOPPER_FP8_WGMMA {
                Err("model parameters ≠ HOPPER_FP8_WGMMA (they do not describe this hardware)")
            } else {
                Ok(())
            }
        }
        Accumulation::TensorCoreBound {
            bound,
            promote_interval,
        } => {
            if cfg.block_size != 128 || promote_interval != 128 {
                Err("block_size or promote_interval ≠ 128 (the kernel's tiles and promotion)")
            } else if bound.group != HOPPER_FP8_WGMMA.group
                || bound.frac_bits > HOPPER_FP8_WGMMA.frac_bits
            {
                Err("the bound's acc_group ≠ 32 or acc_frac_bits > 13: Hopper's wgmma is outside it")
            } else {
                Ok(())
            }
        }
    }
}

#[cfg(feature = "cuda")]
/// One GEMM on the GPU: contiguous copies of the operands (scales as f32: F8_E8M0 decodes
/// exactly; a transposed view, as Dgrad's `wᵀ`, copied in its logical order), the f32
/// accumulators or their bf16 rounding as the config asks. The kernels read `b`'s scales in
/// B×B blocks.
pub(super) fn gemm_on_gpu(
    gpu: &dsv3_gpu::Gpu,
    backend: Backend,
    a: BlockScaled,
    b: BlockScaled,
    cfg: &GemmConfig,
) -> Result<Floats> {
    let (m, k, n) = (a.codes.nrows(), a.codes.ncols(), b.codes.nrows());
    let codes = |x: &BlockScaled| x.codes.iter().copied().collect::<Vec<u8>>();
    let scales = |x: &BlockScaled| x.scales.iter().copied().collect::<Vec<f32>>();
    Ok(dsv3_gpu::fp8_gemm::fp8_gemm(
        gpu,
        backend,
        (&codes(&a), &scales(&a)),
        (&codes(&b), &scales(&b)),
        (m, n, k),
        cfg.block_size,
        cfg.out_dtype == OutDtype::Bf16,
    )?)
}

#[cfg(feature = "cuda")]
/// A grouped GEMM on the GPU, one launch per group: the group's rows of `a` gathered, run
/// against its weight and scattered back ([`GroupRows`], the reference's gather/scatter);
/// undefined rows are 0, as the reference writes them. Rows in output order: `[R, N]`.
pub(super) fn grouped_on_gpu(
    gpu: &dsv3_gpu::Gpu,
    backend: Backend,
    (a, b): (BlockScaled, ExpertWeights),
    rows: &GroupRows,
    cfg: &GemmConfig,
) -> Result<Floats> {
    let n = b.codes.shape()[1];
    let total = a.codes.nrows() * n;
    let mut out = match cfg.out_dtype {
        OutDtype::F32 => Floats::F32(vec![0.0; total]),
        OutDtype::Bf16 => Floats::Bf16(vec![0; total]),
    };
    for g in 0..rows.groups() {
        let group = rows.of(g);
        if group.is_empty() {
            continue;
        }
        let codes = a.codes.select(ndarray::Axis(0), group);
        let scales = a.scales.select(ndarray::Axis(0), group);
        let part = gemm_on_gpu(
            gpu,
            backend,
            BlockScaled::tiles(codes.view(), scales.view()),
            b.expert(g),
            cfg,
        )?;
        for (i, &r) in group.iter().enumerate() {
            let (src, dst) = (i * n..(i + 1) * n, r * n..(r + 1) * n);
            match (&mut out, &part) {
                (Floats::F32(o), Floats::F32(p)) => o[dst].copy_from_slice(&p[src]),
                (Floats::Bf16(o), Floats::Bf16(p)) => o[dst].copy_from_slice(&p[src]),
                _ => unreachable!("one out_dtype for every group"),
            }
        }
    }
    Ok(out)
}
