//! Every walkthrough in `examples/` runs and prints what it promises (`cargo test` builds the
//! examples before the tests, so they never rot).

use std::path::PathBuf;
use std::process::Command;

/// `target/<profile>/examples/NAME`, next to this test's `deps/` folder.
fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target/<profile>");
    profile_dir
        .join("examples")
        .join(format!("{name}{}", std::env::consts::EXE_SUFFIX))
}

#[test]
fn every_example_runs_and_shows_its_steps() {
    let cases: &[(&str, &[&str])] = &[
        (
            "mla",
            &[
                "eq. (1)",
                "latent cache holds c_kv 4×512 and k_pe 4×64",
                "576 values",
                "max |absorbed − naive|",
            ],
        ),
        (
            "moe_routing",
            &["eq. (15)", "kept groups (top 4)", "Σ g = 2.5000", "step 60"],
        ),
        (
            "fp8_gemm",
            &[
                "s = amax / 448",
                "one block dot",
                "no promotion",
                "promoted every 128",
            ],
        ),
    ];
    let listed: Vec<String> = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/examples"))
        .unwrap()
        .filter_map(|e| e.ok()?.path().file_stem()?.to_str().map(String::from))
        .collect();
    for name in &listed {
        assert!(
            cases.iter().any(|(n, _)| n == name),
            "examples/{name}.rs has no case here"
        );
    }
    for (name, needles) in cases {
        let path = example(name);
        assert!(
            path.exists(),
            "{} not built: run through `cargo test`, which builds the examples",
            path.display()
        );
        let out = Command::new(&path).output().expect("run the example");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{name} failed: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for needle in *needles {
            assert!(
                text.contains(needle),
                "{name}: missing {needle:?} in:\n{text}"
            );
        }
    }
}
