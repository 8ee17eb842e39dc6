//! The model: checkpoints in the hub layout ([`checkpoint`]) and the forward of `dsv3 forward`
//! ([`forward`]); `dsv3 verify` runs it on the model fixtures ([`crate::verify::models`]).

pub mod checkpoint;
pub mod fast_linear;
pub mod forward;
