//! `dsv3`: the reference oracle for DeepSeek-V3's math, by job:
//!
//! - [`registry`]: the registry core — what an op is ([`registry::OpEntry`]: tensor contract,
//!   typed config, reference, GPU implementations, tolerance policy, input generator), tensors
//!   and files, and judging outputs against the reference (`check`, `verify`, reports);
//! - [`ops`]: every op's entry ([`ops::REGISTRY`]), the GEMM family in [`ops::gemm`];
//! - [`model`]: checkpoints in the hub layout and the model forward (`dsv3 forward`);
//! - [`studies`]: the accumulation study and the training-side simulators, with their plots;
//! - [`verify`]: `dsv3 verify`, every op and model against the committed oracle fixtures.
//!
//! The math lives in [`dsv3_reference`]; the CUDA kernels in `dsv3_gpu` (feature `cuda`). The
//! command line is the `dsv3` binary (`src/cli/`).

mod isa;
pub mod model;
pub mod ops;
pub mod registry;
pub mod studies;
pub mod verify;

pub use registry::error::{Error, Result};
