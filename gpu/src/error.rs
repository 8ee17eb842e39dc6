//! Errors of the GPU crate. NVRTC's log always reaches the user.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("NVRTC is not available: {0}")]
    NoNvrtc(String),
    #[error("no CUDA device: {0}")]
    NoDevice(String),
    #[error("compiling kernel `{kernel}` failed:\n{log}")]
    Compile { kernel: &'static str, log: String },
    #[error("kernel `{kernel}` has no function `{function}`")]
    MissingFunction {
        kernel: &'static str,
        function: String,
    },
    #[error("{op}: {msg}")]
    Argument { op: &'static str, msg: String },
    #[error("CUDA driver: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    #[error("NVRTC: {0}")]
    Nvrtc(#[from] cudarc::nvrtc::result::NvrtcError),
}

pub type Result<T> = std::result::Result<T, Error>;
