//! Errors of the reference crate. Every variant names the operation and the culprit.

/// `Result` with the reference crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// An input that the reference refuses to compute on.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// A tensor's shape does not satisfy the operation's contract.
    #[error("{op}: {tensor} has shape {got:?}; {expected}")]
    Shape {
        op: &'static str,
        tensor: &'static str,
        got: Vec<usize>,
        expected: String,
    },
    /// A value the operation forbids (NaN, ±inf, a non-positive scale, a NaN code, ...).
    #[error("{op}: {tensor}{index:?} is {value}; {why}")]
    Value {
        op: &'static str,
        tensor: &'static str,
        index: Vec<usize>,
        value: String,
        why: &'static str,
    },
    /// A scalar argument outside its domain (block size 0, unknown format, ...).
    #[error("{op}: argument {name} = {value} is invalid: {why}")]
    Argument {
        op: &'static str,
        name: &'static str,
        value: String,
        why: String,
    },
    /// A model configuration that cannot describe a DeepSeek-V3-style model.
    #[error("model config: `{field}` = {value}: {why}")]
    Config {
        field: &'static str,
        value: String,
        why: String,
    },
    /// An error while computing with one named weight or input (the tensor's checkpoint name).
    #[error("{tensor}: {source}")]
    InTensor { tensor: String, source: Box<Error> },
}
