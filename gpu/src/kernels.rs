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

pub const RMSNORM: Kernel = Kernel {
    name: "rmsnorm",
    source: include_str!("../kernels/rmsnorm.cu"),
    functions: &["rmsnorm_f32", "rmsnorm_bf16"],
};

pub const ROPE: Kernel = Kernel {
    name: "rope",
    source: include_str!("../kernels/rope.cu"),
    functions: &["rope_f32", "rope_bf16"],
};

pub const SWIGLU: Kernel = Kernel {
    name: "swiglu",
    source: include_str!("../kernels/swiglu.cu"),
    functions: &[
        "swiglu_f32",
        "swiglu_bf16",
        "swiglu_f32_bf16up",
        "swiglu_bf16_f32up",
    ],
};

pub const MOE_GATE: Kernel = Kernel {
    name: "moe_gate",
    source: include_str!("../kernels/moe_gate.cu"),
    functions: &["moe_gate_logits", "moe_gate_route"],
};

pub const MLA_DECODE: Kernel = Kernel {
    name: "mla_decode",
    source: include_str!("../kernels/mla_decode.cu"),
    functions: &[
        "mla_decode_f32_f32",
        "mla_decode_bf16_bf16",
        "mla_decode_f32_bf16",
        "mla_decode_bf16_f32",
    ],
};

/// Every kernel of the crate: the compile test builds all of them for `sm_90a`.
pub const ALL: &[Kernel] = &[
    ACT_QUANT,
    WEIGHT_QUANT,
    WEIGHT_DEQUANT,
    FP8_GEMM,
    FP8_GEMM_WGMMA,
    RMSNORM,
    ROPE,
    SWIGLU,
    MOE_GATE,
    MLA_DECODE,
];
