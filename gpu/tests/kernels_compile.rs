//! Every kernel compiles for sm_90a with NVRTC, with 0 spills; prints registers and spills.
//! Without NVRTC this prints SKIP, unless REQUIRE_NVRTC=1 (CI sets it).

use dsv3_gpu::{compile, kernels, nvrtc_available};

#[test]
fn every_kernel_compiles_for_sm_90a_without_spills() {
    if !nvrtc_available() || dsv3_gpu::runtime::include_dirs().is_empty() {
        let why = if nvrtc_available() {
            "no CUDA headers (set DSV3_CUDA_INCLUDE)"
        } else {
            "libnvrtc.so.13 not found"
        };
        assert!(
            std::env::var_os("REQUIRE_NVRTC").is_none(),
            "REQUIRE_NVRTC=1 but {why}"
        );
        eprintln!("SKIP every_kernel_compiles_for_sm_90a_without_spills: {why}");
        return;
    }
    let mut failures = Vec::new();
    for k in kernels::ALL {
        let c = match compile(k) {
            Ok(c) => c,
            Err(e) => {
                failures.push(format!("{}: {e}", k.name));
                continue;
            }
        };
        assert!(!c.cubin.is_empty(), "{}: NVRTC returned no CUBIN", k.name);
        assert!(
            c.ptx.contains(".target sm_90a"),
            "{}: PTX is not for sm_90a",
            k.name
        );
        for f in k.functions {
            let Some(s) = c.stats.iter().find(|s| s.name == *f) else {
                failures.push(format!(
                    "{}: ptxas reported nothing for `{f}`; log:\n{}",
                    k.name, c.log
                ));
                continue;
            };
            println!(
                "kernel {:<16} {:<24} registers {:>3}  spill stores {:>3} B  spill loads {:>3} B  stack {:>3} B  smem {:>6} B",
                k.name, s.name, s.registers, s.spill_stores, s.spill_loads, s.stack_bytes, s.smem_bytes
            );
            if s.spill_stores != 0 || s.spill_loads != 0 {
                failures.push(format!(
                    "{}::{f} spills ({} B stores, {} B loads)",
                    k.name, s.spill_stores, s.spill_loads
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_cu_file_is_registered_for_compilation() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        eprintln!(
            "SKIP every_cu_file_is_registered_for_compilation: no source tree at {}",
            dir.display()
        );
        return;
    };
    for e in entries {
        let path = e.unwrap().path();
        if path.extension().is_some_and(|x| x == "cu") {
            let stem = path.file_stem().unwrap().to_str().unwrap().to_string();
            assert!(
                kernels::ALL.iter().any(|k| k.name == stem),
                "{} is not in kernels::ALL",
                path.display()
            );
        }
    }
}
