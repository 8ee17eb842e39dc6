//! The Python package (`python/`, issue 12): its pytest suite, run with the interpreter in
//! `DSV3_PYTHON` (a venv where `pip install ./python` installed this tree's package; `.ci/run`
//! makes one), the CLI comparisons against this build's `dsv3` binary.
//!
//! Without `DSV3_PYTHON` the test prints `SKIP` and passes, unless `REQUIRE_PYTHON=1`, which
//! turns the skip into a failure (CI sets both).

use std::process::Command;

#[test]
fn the_python_package_test_suite_passes() {
    let Some(python) = std::env::var_os("DSV3_PYTHON").filter(|p| !p.is_empty()) else {
        assert!(
            std::env::var("REQUIRE_PYTHON").as_deref() != Ok("1"),
            "REQUIRE_PYTHON=1 but DSV3_PYTHON is not set"
        );
        eprintln!(
            "SKIP python package tests: DSV3_PYTHON is not set (a Python with `pip install ./python` done; .ci/run sets it)"
        );
        return;
    };
    let out = Command::new(&python)
        .args([
            "-m",
            "pytest",
            "python/tests",
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("DSV3_BIN", env!("CARGO_BIN_EXE_dsv3"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.to_string_lossy()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}{stderr}");
    assert!(
        out.status.success(),
        "the Python package's tests failed ({}):\n{stdout}{stderr}",
        out.status
    );
    assert!(stdout.contains(" passed"), "pytest ran no test:\n{stdout}");
}
