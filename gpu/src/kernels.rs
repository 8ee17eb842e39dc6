//! The kernel sources, one per op, embedded at build time.

/// Headers the kernels `#include` by name, registered with NVRTC (no file system needed at run
/// time, so the compiled test binaries work on a machine without the source tree).
pub const HEADERS: &[(&str, &str)] = &[("common.cuh", include_str!("../kernels/common.cuh"))];

/// One `.cu` file: its stem (the op name) and the `extern "C"` functions it defines.
#[derive(Debug, Clone, Copy)]
pub struct Kernel {
    pub name: &'static str,
    pub source: &'static str,
    pub functions: &'static [&'static str],
}

pub const ACT_QUANT: Kernel = Kernel {
    name: "act_quant",
    source: include_str!("../kernels/act_quant.cu"),
    functions: &["act_quant_f32", "act_quant_bf16"],
};

pub const WEIGHT_QUANT: Kernel = Kernel {
    name: "weight_quant",
    source: include_str!("../kernels/weight_quant.cu"),
    functions: &["weight_quant_f32", "weight_quant_bf16"],
};

pub const WEIGHT_DEQUANT: Kernel = Kernel {
    name: "weight_dequant",
    source: include_str!("../kernels/weight_dequant.cu"),
    functions: &["weight_dequant_f32", "weight_dequant_bf16"],
};

pub const FP8_GEMM: Kernel = Kernel {
    name: "fp8_gemm",
    source: include_str!("../kernels/fp8_gemm.cu"),
    functions: &["fp8_gemm_simt"],
};

pub const FP8_GEMM_WGMMA: Kernel = Kernel {
    name: "fp8_gemm_wgmma",
    source: include_str!("../kernels/fp8_gemm_wgmma.cu"),
    functions: &["fp8_gemm_wgmma"],
};

/// Every kernel of the crate: the compile test builds all of them for `sm_90a`.
pub const ALL: &[Kernel] = &[
    ACT_QUANT,
    WEIGHT_QUANT,
    WEIGHT_DEQUANT,
    FP8_GEMM,
    FP8_GEMM_WGMMA,
];
