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

/// The process-wide device, or why there is none.
pub fn device() -> std::result::Result<&'static dsv3_gpu::Gpu, String> {
    dsv3_gpu::Gpu::shared()
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
    gpu: &dsv3_gpu::Gpu,
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
