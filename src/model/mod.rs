//! The model: checkpoints in the hub layout ([`checkpoint`]), the forward of `dsv3 forward`
//! ([`forward`]), and `dsv3 verify`'s model cases against transformers' logits ([`verify`]).

pub mod checkpoint;
pub mod forward;
pub mod verify;
