//! Regressions of issue 10 (faults found by fuzzing the CLI as a hostile user would): each test
//! is the exact reproduction, asserting the exit code and the culprit named in the message.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{check_file, fixture, run, s, scratch};
use dsv3::registry::io::{self, TensorMap};

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
        check_file("moe_gate", &f, &["--config", MOE_GATE_V3_CONFIG])
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
        let (code, out, _) = check_file("moe_gate", &p, &["--config", MOE_GATE_V3_CONFIG]);
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
    use dsv3::ops::REGISTRY;
    use dsv3::registry::check::{check, Mode};
    use dsv3::registry::rng::Rng;
    use dsv3::registry::Sizes;
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
                            Ok(r) => dsv3::registry::without_aux(r),
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

/// `sh -c 'ulimit -v KiB; exec dsv3 ARGS'`: (exit code, stderr, seconds). A large allocation
/// under the 1 GiB address-space limit would abort (a signal), failing the caller's assert.
fn run_limited(args: &[&str]) -> (i32, String, f64) {
    let start = std::time::Instant::now();
    let o = Command::new("sh")
        .arg("-c")
        .arg("ulimit -v 1048576; exec \"$0\" \"$@\"")
        .arg(env!("CARGO_BIN_EXE_dsv3"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run dsv3 under ulimit");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!err.contains("panicked"), "dsv3 {args:?} panicked: {err}");
    let code = o
        .status
        .code()
        .unwrap_or_else(|| panic!("dsv3 {args:?} died of a signal: {:?}\n{err}", o.status));
    (code, err, start.elapsed().as_secs_f64())
}

const HUGE: &str = "1099511627776"; // 2^40

#[test]
fn huge_generator_sizes_exit_2_at_once_without_allocating() {
    use dsv3::ops::REGISTRY;
    let out = scratch("huge").join("x.st");
    let mut n = 0;
    for op in REGISTRY {
        for name in op.size_names(&op.default_config()) {
            let (code, err, secs) = run_limited(&[
                "gen",
                op.name,
                "--out",
                s(&out),
                "--size",
                &format!("{name}={HUGE}"),
            ]);
            assert_eq!(code, 2, "gen {} {name}=2^40: {err}", op.name);
            assert!(
                err.contains("too large") && err.contains(&format!("{name} = {HUGE}")),
                "{err}"
            );
            assert!(secs < 3.0, "gen {} {name}=2^40 took {secs:.2} s", op.name);
            n += 1;
        }
    }
    // a huge size beside a zero one still drives 2^40 rows of work
    let (code, err, _) = run_limited(&[
        "gen",
        "act_quant",
        "--out",
        s(&out),
        "--size",
        &format!("M={HUGE}"),
        "--size",
        "K=0",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(n >= 60, "only {n} generator sizes");
    assert!(!out.exists());
}

#[test]
fn huge_counts_in_configs_and_arguments_exit_2() {
    let d = scratch("huge-config");
    let inp = d.join("eplb.st");
    assert_eq!(run(&["gen", "eplb", "--out", s(&inp)]).0, 0);
    let cfg = format!(r#"{{"num_replicas":{HUGE}}}"#);
    let (code, err, _) = run_limited(&[
        "run",
        "eplb",
        "--inputs",
        s(&inp),
        "--out",
        s(&d.join("o.st")),
        "--config",
        &cfg,
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("num_replicas") && err.contains(HUGE), "{err}");
    let (code, err, _) = run_limited(&["gen", "eplb", "--out", s(&inp), "--config", &cfg]);
    assert_eq!(code, 2, "{err}");
    // an integer config is range-checked in its own type, never truncated (2^32 + 13 ≠ 13)
    let f = fixture("fp8_gemm/bf16_randn.safetensors");
    let (code, _, err) = check_file(
        "fp8_gemm",
        &f,
        &[
            "--config",
            r#"{"accumulation":"tensor_core","acc_frac_bits":4294967309}"#,
        ],
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("acc_frac_bits") && err.contains("4294967309") && err.contains("1..=64"),
        "{err}"
    );
    // model configs: counts and dimensions over their ceilings
    for (field, value) in [
        ("num_hidden_layers", HUGE),
        ("num_nextn_predict_layers", "4294967297"),
        ("qk_rope_head_dim", HUGE),
    ] {
        let model = copy_model("v3_yarn_qlora", &format!("huge-{field}"), |c| {
            c[field] = serde_json::Value::from(value.parse::<u64>().unwrap());
        });
        let (code, err, secs) = run_limited(&["forward", "--model", s(&model), "--tokens", "1,2"]);
        assert_eq!(code, 2, "{field}: {err}");
        assert!(
            err.contains(field) && err.contains(value) && err.contains("ceiling"),
            "{err}"
        );
        assert!(secs < 3.0);
    }
    // the studies' and simulations' counts
    for args in [
        vec!["balance-sim", "--tokens", HUGE],
        vec!["balance-sim", "--experts", HUGE],
        vec!["eplb", "--layers", HUGE],
        vec!["eplb", "--redundant", HUGE],
        vec!["adamw-drift", "--n", HUGE],
        vec!["accum-study", "--m", HUGE, "--plot-dir", "-"],
        vec!["accum-study", "--k", HUGE, "--plot-dir", "-"],
        vec!["schedule", "1f1b", "--micro", HUGE],
    ] {
        let (code, err, secs) = run_limited(&args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(
            err.contains("too large") && err.contains(HUGE) && secs < 3.0,
            "{args:?}: {err}"
        );
    }
    let model = fixture("models/v3_yarn_qlora");
    for layers in ["0-4000000000", "0-18446744073709551615"] {
        let (code, err, _) = run_limited(&[
            "forward",
            "--model",
            s(&model),
            "--tokens",
            "1",
            "--layers",
            layers,
        ]);
        assert_eq!(code, 2, "{layers}: {err}");
        assert!(err.contains("--layers") && err.contains("ceiling"), "{err}");
    }
}

/// A copy of fixture model `name` with its config.json edited.
fn copy_model(name: &str, tag: &str, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let src = fixture(&format!("models/{name}"));
    let dst = scratch(tag).join(name);
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    let cfg = dst.join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    edit(&mut c);
    std::fs::write(&cfg, serde_json::to_string_pretty(&c).unwrap()).unwrap();
    dst
}

/// A safetensors file from a raw header (padded to 8 bytes) and data.
fn raw_safetensors(path: &Path, header: &str, data: &[u8]) {
    std::fs::write(path, common::safetensors_bytes(header, data)).unwrap();
}

#[test]
fn silently_accepted_inputs_are_refused() {
    let d = scratch("accepted");
    // the same tensor name twice in a header (different shapes over the same bytes)
    let p = d.join("dup.st");
    raw_safetensors(
        &p,
        r#"{"x":{"dtype":"F32","shape":[1,128],"data_offsets":[0,512]},"x":{"dtype":"F32","shape":[2,64],"data_offsets":[0,512]}}"#,
        &[0u8; 512],
    );
    let (code, _, err) = run(&["check", "act_quant", "--inputs", s(&p), "--outputs", s(&p)]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("`x` twice") && err.contains("dup.st"), "{err}");
    // generator sizes the op does not use
    for (op, size) in [
        ("clip_grad_norm", "M"),
        ("mla_decode", "NB"),
        ("mla_decode", "MB"),
    ] {
        let (code, _, err) = run(&[
            "gen",
            op,
            "--out",
            s(&d.join("g.st")),
            "--size",
            &format!("{size}=4"),
        ]);
        assert_eq!(code, 2, "{op} {size}: {err}");
        assert!(err.contains(&format!("no size named `{size}`")), "{err}");
    }
    // --mtp on a config declaring 5 MTP modules with one on disk
    let model = copy_model("v3_yarn_qlora", "mtp5", |c| {
        c["num_nextn_predict_layers"] = 5.into()
    });
    let (code, _, err) = run(&[
        "forward",
        "--model",
        s(&model),
        "--tokens",
        "1,2,3",
        "--mtp",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("num_nextn_predict_layers = 5") && err.contains("model.layers.4."),
        "{err}"
    );
    // a NaN in moe_gate's inputs names the input element
    let p = edited(MOE_GATE_V3, "gate-nan", |m| {
        let x = m.get_mut("x").unwrap();
        let d = x.shape[1];
        let i = (d + 3) * x.dtype.size();
        let nan = match x.dtype {
            dsv3::registry::tensor::DType::BF16 => 0x7FC0u16.to_le_bytes().to_vec(),
            _ => f32::NAN.to_le_bytes().to_vec(),
        };
        x.data[i..i + nan.len()].copy_from_slice(&nan);
    });
    let (code, _, err) = check_file("moe_gate", &p, &["--config", MOE_GATE_V3_CONFIG]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("x[1, 3] is NaN"), "{err}");
}

#[cfg(unix)]
#[test]
fn output_files_follow_links_keep_devices_and_use_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let d = scratch("outputs");
    let inp = d.join("in.st");
    assert_eq!(run(&["gen", "act_quant", "--out", s(&inp)]).0, 0);
    let dsv3_umask = |umask: &str, out: &Path| {
        let o = Command::new("sh")
            .arg("-c")
            .arg(format!("umask {umask}; exec \"$0\" \"$@\""))
            .arg(env!("CARGO_BIN_EXE_dsv3"))
            .args(["run", "act_quant", "--inputs", s(&inp), "--out", s(out)])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    // a symlink is written through: the link stays a link, its target holds the tensors
    let (link, target) = (d.join("link.st"), d.join("target.st"));
    std::os::unix::fs::symlink(&target, &link).unwrap();
    dsv3_umask("022", &link);
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(io::load(&target).unwrap().contains_key("y"));
    // a character device is written to, not replaced
    dsv3_umask("022", Path::new("/dev/null"));
    let m = std::fs::metadata("/dev/null").unwrap();
    use std::os::unix::fs::FileTypeExt;
    assert!(m.file_type().is_char_device());
    // new files get 0666 less the umask; a replaced file keeps its permissions
    let new = d.join("new.st");
    dsv3_umask("022", &new);
    assert_eq!(
        std::fs::metadata(&new).unwrap().permissions().mode() & 0o777,
        0o644
    );
    let other = d.join("other.st");
    dsv3_umask("027", &other);
    assert_eq!(
        std::fs::metadata(&other).unwrap().permissions().mode() & 0o777,
        0o640
    );
    std::fs::set_permissions(&new, std::fs::Permissions::from_mode(0o600)).unwrap();
    dsv3_umask("022", &new);
    assert_eq!(
        std::fs::metadata(&new).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // no temporary file is left behind
    let left: Vec<_> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("tmp"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[cfg(unix)]
#[test]
fn fifo_and_sparse_huge_inputs_exit_2() {
    let d = scratch("special");
    let fifo = d.join("fifo");
    let made = Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .map(|s| s.success());
    if made.is_ok_and(|ok| ok) {
        let (code, err, secs) = run_limited(&[
            "check",
            "act_quant",
            "--inputs",
            s(&fifo),
            "--outputs",
            s(&fifo),
        ]);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("FIFO") && secs < 3.0, "{err}");
        let f = fixture("act_quant/f32_randn.safetensors");
        let (code, err, _) = run_limited(&[
            "check",
            "act_quant",
            "--inputs",
            s(&f),
            "--outputs",
            s(&f),
            "--config",
            s(&fifo),
        ]);
        assert_eq!(code, 2, "{err}");
        assert!(err.contains("FIFO"), "{err}");
    } else {
        println!("SKIP fifo input: mkfifo unavailable");
    }
    // a sparse file whose header claims a 64 GiB tensor
    let p = d.join("sparse.st");
    let n: u64 = 1 << 34;
    let header = format!(
        r#"{{"x":{{"dtype":"F32","shape":[{},128],"data_offsets":[0,{}]}}}}"#,
        n / 128,
        4 * n
    );
    raw_safetensors(&p, &header, &[]);
    let len = std::fs::metadata(&p).unwrap().len();
    let sparse = std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(len + 4 * n);
    if sparse.is_err() {
        println!("SKIP sparse 64 GiB input: this filesystem cannot hold it");
        return;
    }
    let (code, err, secs) =
        run_limited(&["check", "act_quant", "--inputs", s(&p), "--outputs", s(&p)]);
    let _ = std::fs::remove_file(&p);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("too large") && err.contains("64.0 GiB") && secs < 3.0,
        "{err}"
    );
}
