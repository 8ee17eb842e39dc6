//! Errors of the `dsv3` crate. Every one of them is "bad input" (exit code 2 from the CLI) and
//! names the culprit: the file, the op, the tensor, the config field.

use std::path::PathBuf;

/// `Result` with the crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Whether a tensor is an input or an output of an op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Input,
    Output,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Input => "input",
            Role::Output => "output",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid safetensors file: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path}: tensor `{name}` has dtype {dtype}, which dsv3 does not read")]
    UnsupportedDType {
        path: PathBuf,
        name: String,
        dtype: String,
    },
    #[error("unknown op `{name}`; known ops: {known}")]
    UnknownOp { name: String, known: String },
    #[error("{op}: missing {role} tensor `{name}` ({spec}){place}")]
    MissingTensor {
        op: &'static str,
        role: Role,
        name: &'static str,
        spec: String,
        place: String,
    },
    #[error("{op}: unexpected {role} tensor `{name}`{place}; the {role}s of {op} are: {known}")]
    ExtraTensor {
        op: &'static str,
        role: Role,
        name: String,
        place: String,
        known: String,
    },
    #[error("{op}: {role} `{name}` has dtype {got}; expected {expected}{hint}")]
    DType {
        op: &'static str,
        role: Role,
        name: String,
        got: String,
        expected: String,
        hint: String,
    },
    #[error("{op}: {role} `{name}` has shape {got:?}; expected {expected}")]
    Shape {
        op: &'static str,
        role: Role,
        name: String,
        got: Vec<usize>,
        expected: String,
    },
    #[error("{op}: config: {msg}")]
    Config { op: &'static str, msg: String },
    #[error(transparent)]
    Reference(#[from] dsv3_reference::Error),
    #[cfg(feature = "cuda")]
    #[error("GPU: {0}")]
    Gpu(#[from] dsv3_gpu::Error),
    #[error("fixtures: {msg}\nHINT: {hint}")]
    Fixture { msg: String, hint: String },
    /// A model directory that cannot be loaded: a bad `config.json` field, a missing or
    /// misshaped tensor, an unsupported dtype, a missing shard. `path` is the file at fault.
    #[error("{path}: {msg}")]
    Checkpoint { path: PathBuf, msg: String },
    #[error("{0}")]
    Usage(String),
    /// An input or request too large for this machine (or over a documented ceiling), refused
    /// before allocating.
    #[error("{what}: too large: {need}; {limit}")]
    TooLarge {
        what: String,
        need: String,
        limit: String,
    },
    /// A broken invariant of dsv3 itself (a bug: please report it), never a panic.
    #[error("internal error (a dsv3 bug, please report it with the inputs): {0}")]
    Internal(String),
}

impl Error {
    /// Wrap an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
