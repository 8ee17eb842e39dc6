//! `dsv3-gpu`: DeepSeek-V3 ops as CUDA kernels for Hopper (`sm_90a`).
//!
//! Each op is one `.cu` file under `gpu/kernels/` (embedded with `include_str!`, compiled at run
//! time by NVRTC, cached per module) and one Rust wrapper module here with the same stem. The
//! wrappers take host slices and return host vectors; the root crate's registry adapts them to
//! tensors and diffs them against the reference.
//!
//! Nothing here panics when CUDA is absent: [`runtime::nvrtc_available`] and [`Gpu::open`] report
//! what is missing (cudarc itself panics if a library is missing, so every entry point checks
//! first).

pub mod act_quant;
pub mod bench;
pub mod error;
pub mod fp8_gemm;
pub mod kernels;
pub mod mla_decode;
pub mod moe_gate;
pub mod rmsnorm;
pub mod rope;
pub mod runtime;
pub mod swiglu;
pub mod weight_dequant;
pub mod weight_quant;

pub use error::{Error, Result};
pub use runtime::{
    compile, driver_available, nvrtc_available, Compiled, Floats, FunctionStats, Gpu, HostFloats,
};
