//! CUDA context, NVRTC compilation for `sm_90a`, and the per-module cache.
//!
//! Environment:
//! - `DSV3_CUDA_INCLUDE`: colon-separated include directories holding `cuda_fp8.h` & co. When
//!   unset, `$CUDA_HOME/include`, `$CUDA_PATH/include`, `/usr/local/cuda/include` and the pip
//!   wheels that `.ci/run` installs (`target/cuda-pip/nvidia/cu13/include`) are tried.
//! - `LD_LIBRARY_PATH`: must reach `libnvrtc.so.13` (and `libcuda.so.1` for a device); cudarc
//!   loads both by name at run time.

use std::collections::HashMap;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, LaunchArgs, PushKernelArg,
};
use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys, Ptx};

use crate::error::{Error, Result};
use crate::kernels::{Kernel, HEADERS};

/// The architecture every kernel is compiled for (wgmma and setmaxnreg need the `a` variant).
pub const ARCH: &str = "sm_90a";

/// Whether `libnvrtc` can be loaded (cudarc would panic on first use otherwise).
pub fn nvrtc_available() -> bool {
    // SAFETY: only probes the dynamic loader for the library.
    unsafe { nvrtc_sys::is_culib_present() }
}

/// Whether `libcuda` (the driver) can be loaded.
pub fn driver_available() -> bool {
    // SAFETY: only probes the dynamic loader for the library.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// A device buffer of floating values: f32, or bf16 bit patterns.
pub enum DeviceFloats {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<u16>),
}

impl DeviceFloats {
    /// The kernel-name suffix of the element type (`act_quant_f32`, `act_quant_bf16`).
    pub fn suffix(&self) -> &'static str {
        match self {
            DeviceFloats::F32(_) => "f32",
            DeviceFloats::Bf16(_) => "bf16",
        }
    }

    /// Push the buffer as the next kernel argument (read by the kernel).
    pub fn push<'a>(&'a self, launch: &mut LaunchArgs<'a>) {
        match self {
            DeviceFloats::F32(s) => launch.arg(s),
            DeviceFloats::Bf16(s) => launch.arg(s),
        };
    }

    /// Push the buffer as the next kernel argument (written by the kernel).
    pub fn push_mut<'a>(&'a mut self, launch: &mut LaunchArgs<'a>) {
        match self {
            DeviceFloats::F32(s) => launch.arg(s),
            DeviceFloats::Bf16(s) => launch.arg(s),
        };
    }

    /// `len` zeros (at least one element, so that empty outputs still have a pointer), bf16 or f32.
    pub fn zeros(stream: &Arc<CudaStream>, bf16: bool, len: usize) -> Result<DeviceFloats> {
        Ok(if bf16 {
            DeviceFloats::Bf16(stream.alloc_zeros::<u16>(len.max(1))?)
        } else {
            DeviceFloats::F32(stream.alloc_zeros::<f32>(len.max(1))?)
        })
    }

    /// Copy the first `len` values back to the host.
    pub fn download(&self, stream: &Arc<CudaStream>, len: usize) -> Result<Floats> {
        Ok(match self {
            DeviceFloats::F32(s) => {
                let mut v = stream.clone_dtoh(s)?;
                v.truncate(len);
                Floats::F32(v)
            }
            DeviceFloats::Bf16(s) => {
                let mut v = stream.clone_dtoh(s)?;
                v.truncate(len);
                Floats::Bf16(v)
            }
        })
    }
}

/// Floating values copied back from the device: f32, or bf16 bit patterns.
#[derive(Debug, Clone, PartialEq)]
pub enum Floats {
    F32(Vec<f32>),
    Bf16(Vec<u16>),
}

impl Floats {
    /// The values as a host buffer to upload.
    pub fn as_host(&self) -> HostFloats<'_> {
        match self {
            Floats::F32(v) => HostFloats::F32(v),
            Floats::Bf16(v) => HostFloats::Bf16(v),
        }
    }

    /// `len` zeros of the given dtype.
    pub fn zeros(bf16: bool, len: usize) -> Floats {
        if bf16 {
            Floats::Bf16(vec![0; len])
        } else {
            Floats::F32(vec![0.0; len])
        }
    }
}

/// A host buffer of floating values to upload: f32, or bf16 bit patterns.
#[derive(Debug, Clone, Copy)]
pub enum HostFloats<'a> {
    F32(&'a [f32]),
    Bf16(&'a [u16]),
}

impl HostFloats<'_> {
    pub fn is_bf16(&self) -> bool {
        matches!(self, HostFloats::Bf16(_))
    }

    pub fn len(&self) -> usize {
        match self {
            HostFloats::F32(v) => v.len(),
            HostFloats::Bf16(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copy to the device (an empty buffer becomes one zero, so that it has a pointer).
    pub fn upload(&self, stream: &Arc<CudaStream>) -> Result<DeviceFloats> {
        Ok(match self {
            HostFloats::F32([]) => DeviceFloats::F32(stream.clone_htod(&[0f32])?),
            HostFloats::Bf16([]) => DeviceFloats::Bf16(stream.clone_htod(&[0u16])?),
            HostFloats::F32(v) => DeviceFloats::F32(stream.clone_htod(*v)?),
            HostFloats::Bf16(v) => DeviceFloats::Bf16(stream.clone_htod(*v)?),
        })
    }
}

/// The largest `gridDim.x` (2^31 − 1); `gridDim.y` and `.z` stop at 65535, so the crate's
/// kernels use 1-D grids only.
pub const MAX_GRID_X: usize = (1 << 31) - 1;

/// A 1-D grid of `blocks` thread blocks, or an error naming `op` when the launch would exceed
/// [`MAX_GRID_X`].
pub fn grid_1d(op: &'static str, blocks: usize) -> Result<(u32, u32, u32)> {
    if blocks > MAX_GRID_X {
        return Err(Error::Argument {
            op,
            msg: format!("{blocks} thread blocks exceed the grid limit {MAX_GRID_X}"),
        });
    }
    Ok((blocks.max(1) as u32, 1, 1))
}

/// Resource use of one compiled `__global__` function, parsed from ptxas' `-v` output.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FunctionStats {
    pub name: String,
    pub registers: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
    pub stack_bytes: u32,
    pub smem_bytes: u32,
}

/// NVRTC's output for one kernel file.
#[derive(Debug, Clone)]
pub struct Compiled {
    pub kernel: &'static str,
    pub ptx: String,
    pub cubin: Vec<u8>,
    pub log: String,
    pub stats: Vec<FunctionStats>,
}

/// Include directories for NVRTC (see the module docs).
pub fn include_dirs() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Some(v) = std::env::var_os("DSV3_CUDA_INCLUDE") {
        roots.extend(std::env::split_paths(&v));
    } else {
        for var in ["CUDA_HOME", "CUDA_PATH"] {
            if let Some(v) = std::env::var_os(var) {
                roots.push(Path::new(&v).join("include"));
            }
        }
        roots.push(PathBuf::from("/usr/local/cuda/include"));
        roots.push(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/cuda-pip/nvidia/cu13/include"),
        );
    }
    let mut dirs = Vec::new();
    for r in roots.into_iter().filter(|r| r.join("cuda_fp8.h").is_file()) {
        let cccl = r.join("cccl");
        dirs.push(r);
        if cccl.is_dir() {
            dirs.push(cccl);
        }
    }
    dirs
}

/// An NVRTC program owned by [`compile`]: destroyed exactly once when dropped, whichever way
/// `compile` returns (an early `?` used to leak it).
struct ProgramGuard(nvrtc_sys::nvrtcProgram);

impl Drop for ProgramGuard {
    fn drop(&mut self) {
        // SAFETY: the handle came from a successful nvrtcCreateProgram and is destroyed only
        // here; nothing uses it after the guard is dropped. A failure to destroy is ignored:
        // the handle is gone either way.
        let _ = unsafe { nvrtc::destroy_program(self.0) };
    }
}

/// Compile `kernel` with NVRTC for [`ARCH`], returning PTX, CUBIN, the log and ptxas' stats.
pub fn compile(kernel: &Kernel) -> Result<Compiled> {
    if !nvrtc_available() {
        return Err(Error::NoNvrtc(
            "libnvrtc.so.13 not found on LD_LIBRARY_PATH or in the loader cache".into(),
        ));
    }
    let includes = include_dirs();
    if includes.is_empty() {
        return Err(Error::NoNvrtc(
            "no CUDA include directory with cuda_fp8.h: set DSV3_CUDA_INCLUDE (e.g. to the pip wheel's nvidia/cu13/include)".into(),
        ));
    }
    let mut opts = vec![
        format!("--gpu-architecture={ARCH}"),
        "--std=c++17".into(),
        "--ptxas-options=-v".into(),
    ];
    opts.extend(
        includes
            .iter()
            .map(|d| format!("--include-path={}", d.display())),
    );
    let src = CString::new(kernel.source).map_err(|_| Error::Compile {
        kernel: kernel.name,
        log: "source contains a NUL byte".into(),
    })?;
    let name = CString::new(format!("{}.cu", kernel.name)).expect("kernel names have no NUL");
    // the embedded headers (`#include "common.cuh"`), kept alive until the program is destroyed
    let header_names: Vec<CString> = HEADERS
        .iter()
        .map(|(n, _)| CString::new(*n).expect("no NUL"))
        .collect();
    let header_srcs: Vec<CString> = HEADERS
        .iter()
        .map(|(_, s)| CString::new(*s).expect("no NUL"))
        .collect();
    let name_ptrs: Vec<*const std::ffi::c_char> = header_names.iter().map(|c| c.as_ptr()).collect();
    let src_ptrs: Vec<*const std::ffi::c_char> = header_srcs.iter().map(|c| c.as_ptr()).collect();
    let mut prog = std::mem::MaybeUninit::uninit();
    // SAFETY: every pointer refers to a NUL-terminated string that outlives the program (the
    // guard below destroys it before they are dropped).
    unsafe {
        nvrtc_sys::nvrtcCreateProgram(
            prog.as_mut_ptr(),
            src.as_ptr(),
            name.as_ptr(),
            HEADERS.len() as i32,
            src_ptrs.as_ptr(),
            name_ptrs.as_ptr(),
        )
        .result()?;
    }
    // SAFETY: nvrtcCreateProgram succeeded, so `prog` is initialised; the guard owns it from
    // here and destroys it on every path out of this function, errors included.
    let prog = ProgramGuard(unsafe { prog.assume_init() });
    // SAFETY: `prog.0` is a live program handle (the guard destroys it only when dropped).
    let outcome = unsafe { nvrtc::compile_program(prog.0, &opts) };
    // SAFETY: as above; the log of a compiled or failed program.
    let log = unsafe { nvrtc::get_program_log(prog.0) }
        .map(|v| c_chars_to_string(&v))
        .unwrap_or_default();
    if outcome.is_err() {
        return Err(Error::Compile {
            kernel: kernel.name,
            log,
        });
    }
    // SAFETY: `prog.0` is live and compiled, so its PTX exists.
    let ptx = c_chars_to_string(&unsafe { nvrtc::get_ptx(prog.0) }?);
    let mut size = 0usize;
    // SAFETY: `prog.0` compiled for a real architecture, so a CUBIN exists.
    unsafe { nvrtc_sys::nvrtcGetCUBINSize(prog.0, &mut size) }.result()?;
    let mut cubin = vec![0u8; size];
    // SAFETY: the buffer has the `size` bytes NVRTC reported for this program's CUBIN.
    unsafe { nvrtc_sys::nvrtcGetCUBIN(prog.0, cubin.as_mut_ptr().cast()) }.result()?;
    drop(prog);
    let stats = parse_ptxas_stats(&log);
    Ok(Compiled {
        kernel: kernel.name,
        ptx,
        cubin,
        log,
        stats,
    })
}

fn c_chars_to_string(v: &[std::ffi::c_char]) -> String {
    let bytes: Vec<u8> = v
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Parse ptxas `-v` lines (NVRTC log or standalone ptxas) into per-function stats.
pub fn parse_ptxas_stats(log: &str) -> Vec<FunctionStats> {
    let mut out: Vec<FunctionStats> = Vec::new();
    let number_before = |line: &str, unit: &str| -> Option<u32> {
        let i = line.find(unit)?;
        line[..i].split_whitespace().last()?.parse().ok()
    };
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or_default().to_string();
            out.push(FunctionStats {
                name,
                ..Default::default()
            });
            continue;
        }
        let Some(cur) = out.last_mut() else { continue };
        if line.contains("bytes stack frame") {
            cur.stack_bytes = number_before(line, "bytes stack frame").unwrap_or(0);
            cur.spill_stores = number_before(line, "bytes spill stores").unwrap_or(0);
            cur.spill_loads = number_before(line, "bytes spill loads").unwrap_or(0);
        }
        if line.contains("Used") && line.contains("registers") {
            cur.registers = number_before(line, "registers").unwrap_or(0);
            cur.smem_bytes = number_before(line, "bytes smem").unwrap_or(0);
        }
    }
    out
}

/// A CUDA device ready to run the crate's kernels.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    /// Device name and compute capability, e.g. `NVIDIA H200 (sm_90)`.
    pub description: String,
}

impl Gpu {
    /// Open device 0. `Ok(None)` with the reason when there is no usable device: no driver
    /// library, no device, or a device that cannot run `sm_90a` code.
    pub fn open() -> Result<std::result::Result<Gpu, String>> {
        if !driver_available() {
            return Ok(Err(
                "no CUDA driver library (libcuda.so.1) on this machine".into()
            ));
        }
        match CudaContext::device_count() {
            Ok(n) if n > 0 => {}
            Ok(_) => return Ok(Err("the CUDA driver reports no device".into())),
            Err(e) => {
                return Ok(Err(format!(
                    "the CUDA driver reports no usable device ({e})"
                )))
            }
        }
        let ctx = CudaContext::new(0)?;
        let (major, minor) = ctx.compute_capability()?;
        let name = ctx.name().unwrap_or_else(|_| "unknown device".into());
        if (major, minor) != (9, 0) {
            return Ok(Err(format!("{name} has compute capability {major}.{minor}; the kernels are built for {ARCH} (Hopper, 9.0)")));
        }
        if !nvrtc_available() {
            return Ok(Err(format!(
                "{name} is present but NVRTC (libnvrtc.so.13) is not"
            )));
        }
        let stream = ctx.default_stream();
        Ok(Ok(Gpu {
            ctx,
            stream,
            modules: Mutex::new(HashMap::new()),
            description: format!("{name} (sm_{major}{minor})"),
        }))
    }

    /// One process-wide device handle, opened on first use.
    pub fn shared() -> std::result::Result<&'static Gpu, String> {
        static GPU: OnceLock<std::result::Result<Gpu, String>> = OnceLock::new();
        GPU.get_or_init(|| match Gpu::open() {
            Ok(probe) => probe,
            Err(e) => Err(e.to_string()),
        })
        .as_ref()
        .map_err(Clone::clone)
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Load (compiling once) `kernel` and return its function `name`.
    pub fn function(&self, kernel: &Kernel, name: &str) -> Result<CudaFunction> {
        let module = {
            let mut cache = self.modules.lock().unwrap_or_else(|p| p.into_inner());
            match cache.get(kernel.name) {
                Some(m) => m.clone(),
                None => {
                    let compiled = compile(kernel)?;
                    let m = self.ctx.load_module(Ptx::from_binary(compiled.cubin))?;
                    cache.insert(kernel.name, m.clone());
                    m
                }
            }
        };
        module
            .load_function(name)
            .map_err(|_| Error::MissingFunction {
                kernel: kernel.name,
                function: name.into(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_nvrtc_ptxas_log() {
        let log = "ptxas info    : 0 bytes gmem\n\
                   ptxas info    : Compiling entry function 'act_quant_f32' for 'sm_90a'\n\
                   ptxas info    : Function properties for act_quant_f32\n\
                   ptxas         .     8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads\n\
                   ptxas info    : Used 24 registers, used 0 barriers, 4096 bytes smem, 384 bytes cmem[0]\n\
                   ptxas info    : Compiling entry function 'g' for 'sm_90a'\n\
                   ptxas info    : Used 16 registers, used 1 barriers\n";
        let s = parse_ptxas_stats(log);
        assert_eq!(s.len(), 2);
        assert_eq!(
            s[0],
            FunctionStats {
                name: "act_quant_f32".into(),
                registers: 24,
                spill_stores: 4,
                spill_loads: 4,
                stack_bytes: 8,
                smem_bytes: 4096
            }
        );
        assert_eq!(s[1].registers, 16);
        assert_eq!(s[1].spill_stores, 0);
    }
}
