//! Helpers shared by the integration tests: the model-level fixture tests
//! (`forward_fixtures.rs`, `mtp_fixtures.rs`, `model_fast.rs`), the CLI tests (`reliability.rs`,
//! `ci_conventions.rs`, `fuzz.rs`) and the fast-path identities (`fp8_gemm_fast.rs`).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use ndarray::Array2;

use dsv3::registry::io::SafeFile;

/// The bar of the model fixtures (issue 4), defined beside `dsv3 verify`'s model cases.
#[allow(unused_imports)]
pub use dsv3::verify::models::LOGITS_REL_TOL;

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

/// `fixtures/REL`.
pub fn fixture(rel: &str) -> PathBuf {
    fixtures().join(rel)
}

/// A fresh scratch directory for test `tag` of this process.
pub fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dsv3-test-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A path as the `&str` an argument list takes.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `dsv3 ARGS` from the crate root: (exit code, stdout, stderr). A panic or a death by signal
/// fails the calling test.
pub fn run(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_dsv3"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run dsv3");
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    );
    assert!(!err.contains("panicked"), "dsv3 {args:?} panicked: {err}");
    let code = o
        .status
        .code()
        .unwrap_or_else(|| panic!("dsv3 {args:?} died of a signal: {:?}\n{err}", o.status));
    (code, out, err)
}

/// The bytes of a safetensors file from a raw header (padded to 8 bytes) and data.
pub fn safetensors_bytes(header: &str, data: &[u8]) -> Vec<u8> {
    let mut h = header.as_bytes().to_vec();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend(h);
    bytes.extend(data);
    bytes
}

/// `dsv3 check OP --inputs FILE --outputs FILE EXTRA…` (inputs and outputs in one file).
pub fn check_file(op: &str, file: &Path, extra: &[&str]) -> (i32, String, String) {
    let mut args = vec!["check", op, "--inputs", s(file), "--outputs", s(file)];
    args.extend_from_slice(extra);
    run(&args)
}

/// A tiny xorshift stream: the seed decides everything a test draws.
pub struct Stream(pub u64);

impl Stream {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}
