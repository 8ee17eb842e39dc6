//! Helpers shared by the model-level fixture tests (`forward_fixtures.rs`, `mtp_fixtures.rs`).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use ndarray::Array2;

use dsv3::io::SafeFile;

/// The bar of the model fixtures (issue 4): max|Δ|/max|ref| ≤ 1e-4 over all logits. Both sides
/// compute in f32 (ours sums in f64); what is left is f32 rounding through a few layers, ~1e-6
/// measured.
pub const LOGITS_REL_TOL: f64 = 1e-4;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// `dsv3 ARGS`: exit code and stderr (which must not show a panic).
pub fn dsv3(args: &[&str]) -> (i32, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_dsv3"))
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!err.contains("panicked"), "{err}");
    (o.status.code().unwrap(), err)
}

/// A 2-D tensor of a safetensors file as f32.
pub fn read_matrix(file: &SafeFile, name: &str) -> Array2<f32> {
    let t = file.tensor(name).unwrap();
    Array2::from_shape_vec((t.shape[0], t.shape[1]), t.to_f32().unwrap()).unwrap()
}
