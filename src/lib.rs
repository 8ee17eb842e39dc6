//! `dsv3`: the op registry and the tools around it (`dsv3 check`, `dsv3 verify`, `dsv3 ops`).
//!
//! The math lives in [`dsv3_reference`]; the CUDA kernels in [`dsv3_gpu`]. This crate describes
//! every operation once ([`registry::OpEntry`]: tensor contract, config, reference, GPU
//! implementation, tolerance policy, input generator) and judges outputs against it.

pub mod accum_study;
pub mod adapt;
pub mod check;
pub mod checkpoint;
pub mod compare;
pub mod config;
pub mod contract;
pub mod error;
pub mod fast;
pub mod forward;
pub mod gpu;
pub mod io;
pub mod limits;
pub mod ops;
pub mod plot;
pub mod progress;
pub mod registry;
pub mod report;
pub mod rng;
pub mod sim;
pub mod table;
pub mod tensor;
pub mod tolerance;
pub mod verify;
pub mod verify_models;

pub use error::{Error, Result};
