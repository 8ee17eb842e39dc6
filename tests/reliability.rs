//! Regressions of issue 10 (faults found by fuzzing the CLI as a hostile user would): each test
//! is the exact reproduction, asserting the exit code and the culprit named in the message.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use dsv3::io::{self, TensorMap};

fn dsv3(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dsv3"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run dsv3")
}

/// (exit code, stdout, stderr) of `dsv3 ARGS`; a panic or a signal fails the test.
fn run(args: &[&str]) -> (i32, String, String) {
    let o = dsv3(args);
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

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dsv3-rel-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(rel)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A fixture file with some tensors edited, saved under `name`.
fn edited(fixture_rel: &str, name: &str, edit: impl FnOnce(&mut TensorMap)) -> PathBuf {
    let mut t = io::load(fixture(fixture_rel)).unwrap();
    edit(&mut t);
    let p = scratch(name).join("case.safetensors");
    io::save(&p, &t, None).unwrap();
    p
}

const MOE_GATE_V3: &str = "moe_gate/v3_sigmoid_noaux_tc_8x4_top8.safetensors";
const MOE_GATE_V3_CONFIG: &str = r#"{"top_k":8,"n_group":8,"topk_group":4}"#;

#[test]
fn moe_gate_ids_swapped_within_a_row_fail_through_their_weights() {
    let (code, out, _) = {
        let f = fixture(MOE_GATE_V3);
        run(&[
            "check",
            "moe_gate",
            "--inputs",
            s(&f),
            "--outputs",
            s(&f),
            "--config",
            MOE_GATE_V3_CONFIG,
        ])
    };
    assert_eq!(code, 0, "the oracle's outputs pass: {out}");
    // swap topk_ids[t, 0] and [t, 1] of 5 tokens, weights untouched: each moved weight now
    // belongs to another expert
    for t in 0..5usize {
        let p = edited(MOE_GATE_V3, &format!("swap{t}"), |m| {
            let ids = m.get_mut("topk_ids").unwrap();
            let k = ids.shape[1];
            let (a, b) = (t * k * 8, (t * k + 1) * 8);
            let first: Vec<u8> = ids.data[a..a + 8].to_vec();
            ids.data.copy_within(b..b + 8, a);
            ids.data[b..b + 8].copy_from_slice(&first);
        });
        let (code, out, _) = run(&[
            "check",
            "moe_gate",
            "--inputs",
            s(&p),
            "--outputs",
            s(&p),
            "--config",
            MOE_GATE_V3_CONFIG,
        ]);
        assert_eq!(code, 1, "token {t}: {out}");
        assert!(
            out.contains(&format!("topk_weights: violation at [{t}, 0]"))
                && out.contains(&format!("topk_weights: violation at [{t}, 1]")),
            "token {t}: {out}"
        );
    }
}

/// Every op, every config branch, every generator size set to 0: generating, running the
/// reference and checking its own outputs either all succeed (the empty result has the
/// contract's shapes and passes) or one of them refuses with an error naming the size — never
/// a panic, never a wrong-shaped output.
#[test]
fn zero_sizes_give_a_consistent_verdict_or_a_named_refusal() {
    use dsv3::check::{check, Mode};
    use dsv3::registry::{Sizes, REGISTRY};
    use dsv3::rng::Rng;
    let (mut failures, mut refusals) = (Vec::new(), Vec::new());
    let mut tried = 0;
    for op in REGISTRY {
        for cfg in op.configs() {
            for name in op.size_names(&cfg) {
                for seed in 0..3u64 {
                    tried += 1;
                    let mut sizes = Sizes::new();
                    sizes.insert(name.clone(), 0);
                    let case = format!("{} {} {name}=0 seed {seed}", op.name, cfg.as_json());
                    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        let inputs = match op.generate_inputs(&mut Rng::new(seed), &cfg, &sizes) {
                            Ok(i) => i,
                            Err(e) => return Err(format!("gen: {e}")),
                        };
                        let b = match op.contract().check_inputs(&inputs, &cfg, "") {
                            Ok(b) => b,
                            Err(e) => return Err(format!("contract: {e}")),
                        };
                        let reference = match op.run_reference(&inputs, &cfg, &b) {
                            Ok(r) => r,
                            Err(e) => return Err(format!("reference: {e}")),
                        };
                        let r = check(op, &inputs, &reference, &cfg, Mode::Policy, ("", ""))
                            .map_err(|e| format!("check: {e}"))?;
                        if !r.pass {
                            return Err("MISMATCH: the reference fails against itself".into());
                        }
                        Ok(())
                    }));
                    match outcome {
                        Err(_) => failures.push(format!("{case}: PANIC")),
                        Ok(Err(e)) if e.starts_with("MISMATCH") || e.contains("internal") => {
                            failures.push(format!("{case}: {e}"))
                        }
                        Ok(Err(e)) => {
                            // a refusal must name the dimension
                            let named = e.contains(&format!("{name} = 0"));
                            if !named {
                                failures.push(format!("{case}: refusal does not name {name}: {e}"));
                            }
                            refusals.push(format!("{case}: {e}"));
                        }
                        Ok(Ok(())) => {}
                    }
                }
            }
        }
    }
    println!("{tried} zero-size cases; {} refused:", refusals.len());
    for r in &refusals {
        println!("  {r}");
    }
    assert!(
        failures.is_empty(),
        "{} of {tried} cases:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The issue's empty reproductions through the CLI: `gen` with the size 0, `run` writes the
/// empty result with the contract's shapes, and `check` of that result exits 0; or `gen`/`run`
/// and `check` all refuse with exit 2 naming the size.
#[test]
fn empty_inputs_through_gen_run_and_check() {
    let d = scratch("empty");
    for (op, size, refused) in [
        ("act_quant_128x1", "K", false),
        ("weight_quant", "K", false),
        ("mla", "B", false),
        ("mla_decode", "B", false),
        ("linear_fp8_fprop", "K", false),
        ("linear_fp8_dgrad", "N", false),
        ("fp8_gemm", "K", false),
        ("act_quant", "M", false),
        ("rmsnorm", "D", false),
        ("moe_gate", "N", false),
        ("grpo_loss", "L", true),
        ("moe_gate", "E", true),
    ] {
        let (inp, out) = (
            d.join(format!("{op}-in.st")),
            d.join(format!("{op}-out.st")),
        );
        let (code, _, err) = run(&["gen", op, "--out", s(&inp), "--size", &format!("{size}=0")]);
        assert_eq!(code, 0, "gen {op} {size}=0: {err}");
        let (code, stdout, err) = run(&["run", op, "--inputs", s(&inp), "--out", s(&out)]);
        if refused {
            assert_eq!(code, 2, "run {op} {size}=0: {stdout}");
            assert!(err.contains(&format!("{size} = 0")), "run {op}: {err}");
            let (code, _, err) = run(&["check", op, "--inputs", s(&inp), "--outputs", s(&inp)]);
            assert_eq!(code, 2, "check {op}: {err}");
            assert!(err.contains(&format!("{size} = 0")), "check {op}: {err}");
            continue;
        }
        assert_eq!(code, 0, "run {op} {size}=0: {err}");
        // `check` validates the output shapes against the contract before judging
        let (code, stdout, err) = run(&["check", op, "--inputs", s(&inp), "--outputs", s(&out)]);
        assert_eq!(code, 0, "check {op} {size}=0: {stdout}{err}");
        assert!(stdout.contains("verdict: PASS"), "{stdout}");
    }
}
