//! Properties every registered op must have, driven by the registry (new ops are covered as soon
//! as they are registered):
//! - its generator's inputs satisfy its contract under every test config;
//! - its reference outputs satisfy the output contract and pass `check` against themselves;
//! - corrupting one element of one output by a huge factor makes `check` fail (a policy that
//!   cannot fail is a bug).

use dsv3::ops::REGISTRY;
use dsv3::registry::check::{check, Mode};
use dsv3::registry::rng::Rng;
use dsv3::registry::{PolicyCtx, Sizes};
use proptest::prelude::*;

/// Corrupt element `i` by a huge factor: for F64/F32/BF16/F16 set the highest clear bit of the
/// exponent (|v| grows by 2^(2^j), at least 2^64 for every |v| below 2^64; all ones is ±inf or
/// NaN), so the corruption never lands inside a wide tolerance (flipping the exponent's top bit
/// of a value ≥ 2 shrinks it towards 0, which a bound on a heavily cancelling element may allow);
/// for other dtypes flip the second-highest bit (a large jump for integers and FP8 codes).
fn corrupt(t: &mut dsv3::registry::tensor::Tensor, i: usize) {
    use dsv3::registry::tensor::DType;
    let size = t.dtype.size();
    let (exponent_bits, mantissa_bits) = match t.dtype {
        DType::F64 => (11, 52),
        DType::F32 => (8, 23),
        DType::BF16 => (8, 7),
        DType::F16 => (5, 10),
        _ => {
            let bit = size * 8 - 2;
            t.data[i * size + bit / 8] ^= 1 << (bit % 8);
            return;
        }
    };
    let bytes = &mut t.data[i * size..(i + 1) * size];
    let mut word = [0u8; 8];
    word[..size].copy_from_slice(bytes);
    let mut bits = u64::from_le_bytes(word);
    let exponent = (bits >> mantissa_bits) & ((1 << exponent_bits) - 1);
    match (0..exponent_bits).rev().find(|j| exponent & (1 << j) == 0) {
        Some(j) => bits |= 1 << (mantissa_bits + j),
        // already ±inf or NaN: make it finite and different
        None => bits &= !(1 << (mantissa_bits + exponent_bits - 1)),
    }
    bytes.copy_from_slice(&bits.to_le_bytes()[..size]);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn every_op_is_self_consistent_and_detects_one_corrupted_element(seed in any::<u64>(), pick in any::<u64>()) {
        for op in REGISTRY {
            for cfg in op.configs() {
                let mut rng = Rng::new(seed);
                let inputs = (op.generate)(&mut rng, &cfg, &Sizes::new()).expect("generated inputs");
                let contract = op.contract();
                let bindings = contract.check_inputs(&inputs, &cfg, "");
                prop_assert!(bindings.is_ok(), "{} {}: generated inputs break the contract: {}", op.name, cfg.as_json(), bindings.unwrap_err());
                let reference = op.run_reference(&inputs, &cfg, bindings.as_ref().unwrap()).map(dsv3::registry::without_aux);
                prop_assert!(reference.is_ok(), "{} {}: reference failed on generated inputs: {}", op.name, cfg.as_json(), reference.unwrap_err());
                let reference = reference.unwrap();
                let report = check(op, &inputs, &reference, &cfg, Mode::Policy, ("", "")).unwrap();
                prop_assert!(report.pass, "{} {}: reference does not pass against itself", op.name, cfg.as_json());

                // one corrupted element must fail
                let names: Vec<&String> = reference.iter().filter(|(_, t)| t.numel() > 0).map(|(k, _)| k).collect();
                if names.is_empty() {
                    continue;
                }
                let name = names[(pick % names.len() as u64) as usize].clone();
                // an element the contract defines (grouped GEMMs leave padding rows undefined)
                let ctx = PolicyCtx { output: &name, inputs: &inputs, candidate: &reference, reference: &reference, config: &cfg };
                let policy = (op.policy)(&ctx);
                let numel = reference[&name].numel();
                let start = ((pick >> 8) % numel as u64) as usize;
                let Some(i) = (0..numel).map(|d| (start + d) % numel).find(|&i| policy.judges(i)) else {
                    continue;
                };
                drop(policy);
                let mut bad = reference.clone();
                let t = bad.get_mut(&name).unwrap();
                corrupt(t, i);
                let report = check(op, &inputs, &bad, &cfg, Mode::Policy, ("", "")).unwrap();
                prop_assert!(!report.pass, "{} {}: corrupting {name}[{i}] was not detected", op.name, cfg.as_json());
                let failing: Vec<&str> = report.tensors.iter().filter(|r| !r.pass).map(|r| r.name.as_str()).collect();
                prop_assert!(failing.contains(&name.as_str()), "{}: the failure is not reported on {name}: {failing:?}", op.name);
            }
        }
    }
}

#[test]
fn every_op_has_a_unique_name_and_a_reference_path() {
    let mut names: Vec<&str> = REGISTRY.iter().map(|o| o.name).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), REGISTRY.len(), "duplicate op names");
    for op in REGISTRY {
        let (path, func) = op.reference_fn.split_once("::").expect("path::function");
        let text =
            std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path))
                .unwrap_or_else(|e| panic!("{}: {path}: {e}", op.name));
        let last = func.rsplit("::").next().unwrap();
        assert!(
            text.contains(&format!("fn {last}")),
            "{}: {path} has no fn {last}",
            op.name
        );
        for g in op.gpu {
            let k = g.kernel;
            assert!(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join(k)
                    .is_file(),
                "{}: kernel {k} missing",
                op.name
            );
        }
    }
}

#[test]
fn v3_sized_inputs_satisfy_the_contract() {
    for op in REGISTRY {
        for sizes in op.v3_sizes() {
            let cfg = op.default_config();
            // generate_inputs refuses a size its generator does not read
            let inputs = op
                .generate_inputs(&mut Rng::new(7), &cfg, &sizes)
                .unwrap_or_else(|e| panic!("{}: {e}", op.name));
            let b = op
                .contract()
                .check_inputs(&inputs, &cfg, "")
                .unwrap_or_else(|e| panic!("{}: {e}", op.name));
            for (k, v) in sizes.pinned() {
                if let Some(bound) = b.vars.get(k.as_str()) {
                    assert_eq!(bound, v, "{}: size {k}", op.name);
                }
            }
        }
    }
}
