#![cfg(feature = "cuda")]
//! GPU implementations against the reference, under each op's tolerance policy (the policy
//! `dsv3 check` uses): random shapes and adversarial values from the op's generator, every test
//! config, and DeepSeek-V3's real shapes at reduced M.
//!
//! Without a usable device every test prints `SKIP <test>: <reason>` and passes, unless
//! `REQUIRE_GPU=1`, which turns the skip into a failure. A backend runs only on the configs it
//! implements; the (op, backend, config) triples it declines are listed with their reason by
//! `every_gpu_backend_implements_a_test_config` (which needs no device).

use dsv3::ops::REGISTRY;
use dsv3::registry::config::Config;
use dsv3::registry::gpu::{device, diff, required_by_env};
use dsv3::registry::rng::Rng;
use dsv3::registry::{OpEntry, Sizes};
use proptest::prelude::*;
use proptest::test_runner::TestRunner;

fn gpu_or_skip(test: &str) -> Option<&'static dsv3_gpu::Gpu> {
    match device() {
        Ok(g) => Some(g),
        Err(why) => {
            assert!(!required_by_env(), "REQUIRE_GPU=1 but no usable GPU: {why}");
            eprintln!("SKIP {test}: {why}");
            None
        }
    }
}

/// Every GPU implementation of `op` on one generated input set.
fn run_one(
    gpu: &dsv3_gpu::Gpu,
    op: &OpEntry,
    cfg: &Config,
    seed: u64,
    sizes: &Sizes,
) -> Result<(), String> {
    let inputs = (op.generate)(&mut Rng::new(seed), cfg, sizes).expect("generated inputs");
    for imp in op.gpu.iter().filter(|imp| imp.declines(cfg).is_none()) {
        let context = format!(
            "{} [{}] {} seed {seed} sizes {sizes:?}",
            op.name,
            imp.backend,
            cfg.as_json()
        );
        let d = diff(op, imp, gpu, &inputs, cfg).map_err(|e| format!("{context}: {e}"))?;
        if !d.pass {
            let bad: Vec<String> = d
                .tensors
                .iter()
                .filter(|t| !t.pass)
                .map(|t| {
                    format!(
                        "{}: {}/{} bad, first {:?}",
                        t.name, t.violations, t.numel, t.first_violations
                    )
                })
                .collect();
            return Err(format!("{context}: {}", bad.join("; ")));
        }
    }
    Ok(())
}

#[test]
fn gpu_matches_reference_on_random_inputs() {
    let Some(gpu) = gpu_or_skip("gpu_matches_reference_on_random_inputs") else {
        return;
    };
    // proptest drives the seeds (and shrinks nothing: the seed is the whole case)
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 32,
        ..ProptestConfig::default()
    });
    runner
        .run(&any::<u64>(), |seed| {
            for op in REGISTRY.iter().filter(|o| !o.gpu.is_empty()) {
                for cfg in op.configs() {
                    let r = run_one(gpu, op, &cfg, seed, &Sizes::new());
                    prop_assert!(r.is_ok(), "{}", r.unwrap_err());
                }
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn gpu_matches_reference_on_deepseek_v3_shapes() {
    let Some(gpu) = gpu_or_skip("gpu_matches_reference_on_deepseek_v3_shapes") else {
        return;
    };
    for op in REGISTRY.iter().filter(|o| !o.gpu.is_empty()) {
        for cfg in op.configs() {
            for sizes in op.v3_sizes() {
                run_one(gpu, op, &cfg, 1, &sizes).unwrap();
            }
        }
    }
}

#[test]
fn every_gpu_backend_implements_a_test_config() {
    // runs without a device: a backend that declined every config would never be tested
    for op in REGISTRY.iter().filter(|o| !o.gpu.is_empty()) {
        for imp in op.gpu {
            let mut supported = 0;
            // the default config, then the test configs as written
            let labels = std::iter::once("defaults").chain(op.test_configs.iter().copied());
            for (cfg, label) in op.configs().iter().zip(labels) {
                match imp.declines(cfg) {
                    None => {
                        supported += 1;
                        println!("GPU {} [{}] {label}: runs", op.name, imp.backend);
                    }
                    Some(why) => {
                        println!(
                            "GPU {} [{}] {label}: declined ({why})",
                            op.name, imp.backend
                        )
                    }
                }
            }
            assert!(
                supported > 0,
                "{} [{}] declines every test config",
                op.name,
                imp.backend
            );
        }
    }
}
