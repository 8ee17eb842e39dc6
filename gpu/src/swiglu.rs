//! Wrapper of `kernels/swiglu.cu` (reference: `dsv3_reference::mlp::swiglu`).

use cudarc::driver::{LaunchConfig, PushKernelArg};

use crate::error::{Error, Result};
use crate::kernels::SWIGLU;
use crate::runtime::{grid_1d, DeviceFloats, Floats, Gpu, HostFloats};

/// `y = silu(gate) ⊙ up` elementwise; `y` has gate's dtype (`up` may be the other one).
pub fn swiglu(gpu: &Gpu, gate: HostFloats<'_>, up: HostFloats<'_>) -> Result<Floats> {
    const OP: &str = "swiglu";
    let n = gate.len();
    if up.len() != n {
        return Err(Error::Argument {
            op: OP,
            msg: format!("gate has {n} values, up {}", up.len()),
        });
    }
    if n == 0 {
        return Ok(Floats::zeros(gate.is_bf16(), 0));
    }
    let stream = gpu.stream();
    let (d_gate, d_up) = (gate.upload(stream)?, up.upload(stream)?);
    let mut d_y = DeviceFloats::zeros(stream, gate.is_bf16(), n)?;
    let function = match (gate, up) {
        (HostFloats::F32(_), HostFloats::F32(_)) => "swiglu_f32",
        (HostFloats::Bf16(_), HostFloats::Bf16(_)) => "swiglu_bf16",
        (HostFloats::F32(_), HostFloats::Bf16(_)) => "swiglu_f32_bf16up",
        (HostFloats::Bf16(_), HostFloats::F32(_)) => "swiglu_bf16_f32up",
    };
    // a grid-stride loop: at most 65536 blocks of 256 threads
    let cfg = LaunchConfig {
        grid_dim: grid_1d(OP, n.div_ceil(256).min(1 << 16))?,
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let n_arg = n as i64;
    let f = gpu.function(&SWIGLU, function)?;
    let mut launch = stream.launch_builder(&f);
    d_gate.push(&mut launch);
    d_up.push(&mut launch);
    d_y.push_mut(&mut launch);
    launch.arg(&n_arg);
    // SAFETY: argument types and order match the chosen `swiglu_*` kernel (y has gate's dtype);
    // the grid-stride loop stays below n, the length of all three buffers.
    unsafe { launch.launch(cfg) }?;
    d_y.download(stream, n)
}
