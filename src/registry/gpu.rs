//! Running an op's GPU implementation and diffing it against the reference under the op's
//! tolerance policy (the same policy `dsv3 check` applies to user outputs).

use std::time::Instant;

use crate::registry::check::{judge, Mode};
use crate::registry::compare::TensorReport;
use crate::registry::config::Config;
use crate::registry::error::{Error, Result};
use crate::registry::io::TensorMap;
use crate::registry::{GpuImpl, OpEntry};

/// Whether GPU runs are wanted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuMode {
    /// Use a device when one is present.
    Auto,
    /// Fail when no device is present.
    Require,
    /// Never touch the GPU.
    Off,
}

impl crate::registry::config::Choice for GpuMode {
    const VALUES: &'static [&'static str] = &["auto", "require", "off"];
    const HELP: &'static [&'static str] = &[
        "Use a device when one is present",
        "Fail when no device is present",
        "Never touch the GPU",
    ];
    fn from_index(i: usize) -> Self {
        [GpuMode::Auto, GpuMode::Require, GpuMode::Off][i]
    }
    fn name(self) -> &'static str {
        Self::VALUES[self as usize]
    }
}

/// The device a GPU backend runs on (`dsv3_gpu::Gpu`).
#[cfg(feature = "cuda")]
pub use dsv3_gpu::Gpu as Device;

/// Without the `cuda` feature there is no device: a type with no value, so no backend runs.
#[cfg(not(feature = "cuda"))]
pub enum Device {}

/// The process-wide device, or why there is none.
pub fn device() -> std::result::Result<&'static Device, String> {
    #[cfg(feature = "cuda")]
    {
        dsv3_gpu::Gpu::shared()
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err("this dsv3 was built without the `cuda` feature".into())
    }
}

/// The device's description (name, memory, driver).
pub fn describe(device: &Device) -> String {
    #[cfg(feature = "cuda")]
    {
        device.description.clone()
    }
    #[cfg(not(feature = "cuda"))]
    {
        match *device {}
    }
}

/// A GPU backend's run function in a build without the `cuda` feature (never called: there is
/// no [`Device`] to call it with).
#[cfg(not(feature = "cuda"))]
pub fn not_compiled(device: &Device, _: &TensorMap, _: &Config) -> Result<TensorMap> {
    match *device {}
}

/// An op's GPU run function, or [`not_compiled`] in a build without the `cuda` feature (the
/// function itself is compiled only with it).
#[cfg(feature = "cuda")]
#[macro_export]
macro_rules! gpu_fn {
    ($f:path) => {
        $f
    };
}

/// An op's GPU run function, or [`not_compiled`] in a build without the `cuda` feature (the
/// function itself is compiled only with it).
#[cfg(not(feature = "cuda"))]
#[macro_export]
macro_rules! gpu_fn {
    ($f:path) => {
        $crate::registry::gpu::not_compiled
    };
}

/// `REQUIRE_GPU=1` in the environment.
pub fn required_by_env() -> bool {
    std::env::var_os("REQUIRE_GPU").is_some_and(|v| v != "0" && !v.is_empty())
}

/// GPU outputs judged against the reference.
pub struct GpuDiff {
    pub tensors: Vec<TensorReport>,
    pub gpu_seconds: f64,
    pub pass: bool,
}

/// Run `imp` (one of `op`'s GPU implementations) and the reference on the same
/// (contract-valid) inputs; compare under the op's policy. A config the backend declines
/// ([`GpuImpl::declines`]) is an error here: callers skip it first and report the reason.
pub fn diff(
    op: &OpEntry,
    imp: &GpuImpl,
    gpu: &Device,
    inputs: &TensorMap,
    config: &Config,
) -> Result<GpuDiff> {
    if let Some(why) = imp.declines(config) {
        return Err(Error::Config {
            op: op.name,
            msg: format!(
                "GPU backend `{}` declines {}: {why}",
                imp.backend,
                config.as_json()
            ),
        });
    }
    let contract = op.contract();
    let bindings = contract.check_inputs(inputs, config, "")?;
    let reference = op.run_reference(inputs, config, &bindings)?;
    let start = Instant::now();
    let got = (imp.run)(gpu, inputs, config)?;
    let gpu_seconds = start.elapsed().as_secs_f64();
    contract.check_outputs(
        &got,
        &reference,
        &bindings,
        config,
        " (from the GPU implementation)",
    )?;
    let tensors = judge(op, inputs, &got, &reference, config, Mode::Policy);
    let pass = tensors.iter().all(|t| t.pass);
    Ok(GpuDiff {
        tensors,
        gpu_seconds,
        pass,
    })
}

/// A floating tensor's values for a GPU kernel: bf16 bit patterns for BF16 (the kernels read
/// bf16 natively), f32 otherwise (F16 widens exactly).
#[cfg(feature = "cuda")]
impl crate::registry::tensor::Tensor {
    pub fn kernel_values(&self) -> dsv3_gpu::Floats {
        match self.dtype {
            crate::registry::tensor::DType::BF16 => dsv3_gpu::Floats::Bf16(self.to_u16_bits()),
            _ => dsv3_gpu::Floats::F32(self.floats()),
        }
    }

    /// Values a GPU kernel returned (f32, or bf16 bit patterns) as a tensor of `shape`.
    pub fn from_floats(shape: Vec<usize>, values: dsv3_gpu::Floats) -> Self {
        match values {
            dsv3_gpu::Floats::F32(v) => Self::from_f32(shape, &v),
            dsv3_gpu::Floats::Bf16(v) => {
                let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                Self::from_bytes(crate::registry::tensor::DType::BF16, shape, bytes)
                    .expect("one bf16 value per element")
            }
        }
    }
}
