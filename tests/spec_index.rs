//! SPEC.md stays the index: every registered op has a row naming its reference function, and
//! every repository path SPEC.md mentions exists.

use std::path::Path;

use dsv3::ops::REGISTRY;

fn spec() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("SPEC.md")).unwrap()
}

#[test]
fn every_op_has_a_spec_row_with_its_reference_and_kernel() {
    let spec = spec();
    for op in REGISTRY {
        let row = spec
            .lines()
            .find(|l| l.starts_with(&format!("| `{}` |", op.name)))
            .unwrap_or_else(|| panic!("SPEC.md has no row for `{}`", op.name));
        let (path, _) = op.reference_fn.split_once("::").unwrap();
        assert!(
            row.contains(path),
            "SPEC.md row of `{}` does not name {path}",
            op.name
        );
        for k in op.gpu.iter().map(|g| g.kernel) {
            assert!(
                row.contains(k),
                "SPEC.md row of `{}` does not name its kernel {k}",
                op.name
            );
        }
    }
}

#[test]
fn every_path_in_spec_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let spec = spec();
    let mut checked = 0;
    for chunk in spec.split('`').skip(1).step_by(2) {
        let path = chunk.split("::").next().unwrap();
        let roots = [
            "reference/",
            "gpu/",
            "src/",
            "tests/",
            "fixtures/",
            "benches/",
            "scripts/",
            ".ci/",
            "python/",
            "docs/",
        ];
        let looks_like_path = !path.contains(' ') && roots.iter().any(|r| path.starts_with(r));
        if looks_like_path {
            assert!(
                root.join(path).exists(),
                "SPEC.md mentions `{path}`, which does not exist"
            );
            checked += 1;
        }
    }
    assert!(
        checked >= 10,
        "only {checked} paths found: the SPEC.md format changed?"
    );
}
