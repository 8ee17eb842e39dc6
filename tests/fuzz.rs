//! Bounded mutation fuzzing of the safetensors loader and of `check` (issue 10).
//!
//! Seeds are the committed fixture cases whose inputs and outputs share one file. Each case
//! mutates one of them (bit flips, overwritten or truncated bytes, header edits: shapes, dtypes,
//! offsets, duplicated or renamed tensors; planted faults in the outputs; hostile config values)
//! and runs it:
//! - in-process (`loader_and_check_never_panic`): `SafeFile::open`, `load_all` and `check` of
//!   the op must return `Ok` or `Err`, never panic;
//! - through the binary (`cli_never_panics_or_dies`): `dsv3 check` / `dsv3 run` / `dsv3 gen`
//!   must exit 0, 1 or 2 — never 101 (a panic), never a signal (an allocation abort), never
//!   hang. It prints the tally. `DSV3_FUZZ_CASES` sets the number of cases (CI: the default),
//!   `DSV3_FUZZ_BIN` runs another `dsv3` binary (to measure an older build), `DSV3_FUZZ_SEED`
//!   the seed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use dsv3::registry::check::{self, Mode};
use dsv3::registry::io::SafeFile;
use dsv3::registry::rng::Rng;
use serde_json::{json, Value};

mod common;
use common::{fixtures, scratch};

/// A fixture case usable as a seed: (op, file bytes, config).
struct Seed {
    op: String,
    bytes: Vec<u8>,
    config: Value,
}

/// The manifest's cases whose inputs and outputs are one file under their contract names, one
/// per op (the first), so that every op with such a case is fuzzed.
fn seeds() -> Vec<Seed> {
    let text = std::fs::read_to_string(fixtures().join("manifest.json")).unwrap();
    let m: Value = serde_json::from_str(&text).unwrap();
    let mut by_op: BTreeMap<String, Seed> = BTreeMap::new();
    for c in m["cases"].as_array().unwrap() {
        let (inp, out) = (&c["inputs"], &c["outputs"]);
        let same_file = inp["file"] == out["file"];
        let plain_names = [inp, out].iter().all(|t| {
            t["tensors"]
                .as_object()
                .unwrap()
                .iter()
                .all(|(k, v)| v.as_str() == Some(k))
        });
        let op = c["op"].as_str().unwrap().to_string();
        if !same_file || !plain_names || by_op.contains_key(&op) {
            continue;
        }
        let bytes = std::fs::read(fixtures().join(inp["file"].as_str().unwrap())).unwrap();
        // skip the largest files (the fuzz runs many cases): 2 MB
        if bytes.len() > 2 << 20 {
            continue;
        }
        by_op.insert(
            op.clone(),
            Seed {
                op,
                bytes,
                config: c["config"].clone(),
            },
        );
    }
    by_op.into_values().collect()
}

/// The header JSON and the data of a safetensors file.
fn split(bytes: &[u8]) -> (Value, Vec<u8>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (header, bytes[8 + n..].to_vec())
}

fn join(header: &str, data: &[u8]) -> Vec<u8> {
    common::safetensors_bytes(header, data)
}

/// A hostile integer: 0, small, off-by-one of a real value, huge, overflowing.
fn hostile_int(rng: &mut Rng, real: u64) -> Value {
    match rng.range(0, 9) {
        0 => json!(0),
        1 => json!(real.saturating_add(1)),
        2 => json!(real.saturating_sub(1)),
        3 => json!(1u64 << 40),
        4 => json!(u64::MAX),
        5 => json!((1u64 << 32) + real),
        6 => json!(-1),
        7 => json!(1.5),
        8 => json!(rng.range(0, 1 << 20)),
        _ => json!("7"),
    }
}

/// One mutation of a seed file (the kinds the fuzzing used).
fn mutate(rng: &mut Rng, bytes: &[u8]) -> (Vec<u8>, &'static str) {
    let (mut header, data) = split(bytes);
    let names: Vec<String> = header
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| *k != "__metadata__")
        .cloned()
        .collect();
    let name = rng.pick(&names).clone();
    let kind = rng.range(0, 11);
    let mut out = bytes.to_vec();
    let what = match kind {
        0 => {
            for _ in 0..rng.range(1, 8) {
                let i = rng.range(0, out.len() - 1);
                out[i] ^= 1 << rng.range(0, 7);
            }
            "bit flips"
        }
        1 => {
            let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            let at = rng.range(8, 8 + n - 1);
            for b in out.iter_mut().skip(at).take(rng.range(1, 16)) {
                *b = *rng.pick(b"{}[]\",:0123456789-eE.aFx ");
            }
            "header bytes overwritten"
        }
        2 => {
            out.truncate(rng.range(0, bytes.len()));
            "truncated"
        }
        3 => {
            out.extend((0..rng.range(1, 64)).map(|_| rng.next_u64() as u8));
            "bytes appended"
        }
        4 => {
            let t = &mut header[&name]["shape"];
            let dims = t.as_array().map_or(0, Vec::len);
            if dims > 0 {
                let d = rng.range(0, dims - 1);
                let real = t[d].as_u64().unwrap_or(1);
                t[d] = hostile_int(rng, real);
            } else {
                *t = json!([rng.range(0, 3)]);
            }
            out = join(&header.to_string(), &data);
            "shape edited"
        }
        5 => {
            header[&name]["dtype"] = json!(*rng.pick(&[
                "F32", "BF16", "F16", "F64", "I64", "I32", "U8", "F8_E4M3", "F8_E5M2", "F8_E8M0",
                "BOOL", "F4", "X"
            ]));
            out = join(&header.to_string(), &data);
            "dtype edited"
        }
        6 => {
            let o = &mut header[&name]["data_offsets"];
            let i = rng.range(0, 1);
            let real = o[i].as_u64().unwrap_or(0);
            o[i] = hostile_int(rng, real);
            out = join(&header.to_string(), &data);
            "offsets edited"
        }
        7 => {
            // the same name twice: a second entry over the same bytes with another shape
            let entry = header[&name].clone();
            let text = header.to_string();
            let mut dup = entry.clone();
            if let Some(s) = dup["shape"].as_array_mut() {
                s.reverse();
            }
            let extra = format!(",\"{name}\":{dup}}}");
            let text = format!("{}{}", &text[..text.len() - 1], extra);
            out = join(&text, &data);
            "duplicate name"
        }
        8 => {
            let obj = header.as_object_mut().unwrap();
            let e = obj.remove(&name).unwrap();
            if rng.chance(0.5) {
                obj.insert(format!("{name}_"), e);
            }
            out = join(&header.to_string(), &data);
            "tensor removed or renamed"
        }
        9 => {
            // a planted fault in the data: one element's bytes replaced
            let info = &header[&name];
            let (a, b) = (
                info["data_offsets"][0].as_u64().unwrap() as usize,
                info["data_offsets"][1].as_u64().unwrap() as usize,
            );
            if b > a {
                let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
                let i = 8 + n + rng.range(a, b - 1);
                out[i] = rng.next_u64() as u8;
            }
            "planted fault"
        }
        _ => {
            // special values in a float tensor: NaN, inf, huge
            let info = &header[&name];
            let (a, b) = (
                info["data_offsets"][0].as_u64().unwrap() as usize,
                info["data_offsets"][1].as_u64().unwrap() as usize,
            );
            if info["dtype"] == "F32" && b >= a + 4 {
                let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
                let i = 8 + n + a + 4 * rng.range(0, (b - a) / 4 - 1);
                let v = *rng.pick(&[f32::NAN, f32::INFINITY, -f32::INFINITY, f32::MAX, 0.0, -0.0]);
                out[i..i + 4].copy_from_slice(&v.to_le_bytes());
            }
            "special value"
        }
    };
    (out, what)
}

/// A hostile edit of a config: one field set to a hostile value, or an unknown field.
fn mutate_config(rng: &mut Rng, config: &Value) -> Value {
    let mut c = config.clone();
    let Some(obj) = c.as_object_mut() else {
        return c;
    };
    let keys: Vec<String> = obj.keys().cloned().collect();
    if keys.is_empty() || rng.chance(0.1) {
        obj.insert("bogus".into(), json!(1));
        return c;
    }
    let k = rng.pick(&keys).clone();
    let real = obj[&k].as_u64().unwrap_or(1);
    obj[&k] = match rng.range(0, 3) {
        0 => json!(null),
        1 => json!(f64::MAX),
        2 => json!("e4m3"),
        _ => hostile_int(rng, real),
    };
    c
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn loader_and_check_never_panic() {
    let seeds = seeds();
    assert!(
        seeds.len() >= 20,
        "only {} ops have a seed case",
        seeds.len()
    );
    let cases = env_usize("DSV3_FUZZ_CASES", 600);
    let mut rng = Rng::new(env_usize("DSV3_FUZZ_SEED", 10) as u64);
    let dir = scratch("inproc");
    let mut outcomes: BTreeMap<&str, usize> = BTreeMap::new();
    for i in 0..cases {
        let seed = &seeds[i % seeds.len()];
        let (bytes, what) = mutate(&mut rng, &seed.bytes);
        let path = dir.join(format!("{i}.safetensors"));
        std::fs::write(&path, &bytes).unwrap();
        let config = if rng.chance(0.2) {
            mutate_config(&mut rng, &seed.config)
        } else {
            seed.config.clone()
        };
        let result = std::panic::catch_unwind(|| -> dsv3::Result<bool> {
            let f = SafeFile::open(&path)?;
            for n in f.names() {
                let _ = f.info(&n);
            }
            let op = dsv3::ops::find(&seed.op)?;
            let cfg = op.parse_config(&config)?;
            let (ins, outs) = check::load_pair(op, &path, &path)?;
            let r = check::check(op, &ins, &outs, &cfg, Mode::Policy, ("", ""))?;
            Ok(r.pass)
        });
        let _ = std::fs::remove_file(&path);
        match result {
            Ok(Ok(true)) => *outcomes.entry("pass").or_default() += 1,
            Ok(Ok(false)) => *outcomes.entry("mismatch").or_default() += 1,
            Ok(Err(_)) => *outcomes.entry("bad input").or_default() += 1,
            Err(_) => panic!(
                "case {i}: {} {what} (config {config}) panicked; seed DSV3_FUZZ_SEED={}",
                seed.op,
                env_usize("DSV3_FUZZ_SEED", 10)
            ),
        }
    }
    println!(
        "in-process fuzz: {cases} cases over {} ops: {outcomes:?}",
        seeds.len()
    );
}

/// Exit classes of the CLI tally.
#[derive(Default, Debug)]
struct Tally {
    tried: usize,
    exit0: usize,
    exit1: usize,
    exit2: usize,
    panic: usize,
    signal: usize,
    timeout: usize,
    other: usize,
}

/// Run `bin ARGS` with a time limit: `Some(code)`, or `None` for a signal; `Err` on timeout.
fn run_with_timeout(
    bin: &Path,
    args: &[String],
    limit: Duration,
) -> Result<(Option<i32>, String), ()> {
    // a 1 GiB budget: a request that is merely large (not absurd) is refused at once rather
    // than generated for minutes; the fuzz is about surviving hostile input, not throughput
    let mut child = Command::new(bin)
        .args(args)
        .env("DSV3_MEMORY_LIMIT", "1G")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn dsv3");
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            let _ = child.stderr.take().unwrap().read_to_string(&mut err);
            return Ok((status.code(), err));
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return Err(());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn cli_never_panics_or_dies() {
    let bin = std::env::var("DSV3_FUZZ_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_BIN_EXE_dsv3")));
    let seeds = seeds();
    let cases = env_usize("DSV3_FUZZ_CASES", 240);
    let mut rng = Rng::new(env_usize("DSV3_FUZZ_SEED", 20) as u64);
    let dir = scratch("cli");
    let mut tally = Tally::default();
    let mut bad = Vec::new();
    let ops: Vec<&str> = dsv3::ops::REGISTRY.iter().map(|op| op.name).collect();
    for i in 0..cases {
        let seed = &seeds[i % seeds.len()];
        let file = dir.join(format!("{i}.safetensors"));
        let out = dir.join(format!("{i}.out.safetensors"));
        let s = |p: &Path| p.to_str().unwrap().to_string();
        // one hostile request: a mutated file, a hostile config, or hostile generator sizes
        let (args, what): (Vec<String>, String) = match rng.range(0, 5) {
            0..=2 => {
                let (bytes, what) = mutate(&mut rng, &seed.bytes);
                std::fs::write(&file, bytes).unwrap();
                let cmd = if rng.chance(0.8) { "check" } else { "run" };
                let mut a = vec![
                    cmd.to_string(),
                    seed.op.clone(),
                    "--inputs".into(),
                    s(&file),
                ];
                if cmd == "check" {
                    a.extend(["--outputs".into(), s(&file)]);
                } else {
                    a.extend(["--out".into(), s(&out)]);
                }
                a.extend(["--config".into(), seed.config.to_string()]);
                (a, format!("{cmd} {} {what}", seed.op))
            }
            3 => {
                std::fs::write(&file, &seed.bytes).unwrap();
                let c = mutate_config(&mut rng, &seed.config);
                (
                    vec![
                        "check".into(),
                        seed.op.clone(),
                        "--inputs".into(),
                        s(&file),
                        "--outputs".into(),
                        s(&file),
                        "--config".into(),
                        c.to_string(),
                    ],
                    format!("check {} config {c}", seed.op),
                )
            }
            _ => {
                let op = *rng.pick(&ops);
                let size = *rng.pick(&[
                    "M", "N", "K", "E", "D", "T", "L", "G", "B", "H", "S", "Sq", "I", "Q",
                ]);
                let v = hostile_int(&mut rng, 4);
                let v = v.as_u64().map_or(v.to_string(), |n| n.to_string());
                (
                    vec![
                        "gen".into(),
                        op.into(),
                        "--out".into(),
                        s(&out),
                        "--size".into(),
                        format!("{size}={v}"),
                    ],
                    format!("gen {op} {size}={v}"),
                )
            }
        };
        tally.tried += 1;
        match run_with_timeout(&bin, &args, Duration::from_secs(20)) {
            Err(()) => {
                tally.timeout += 1;
                bad.push(format!("case {i}: {what}: timeout"));
            }
            Ok((None, err)) => {
                tally.signal += 1;
                bad.push(format!(
                    "case {i}: {what}: signal: {}",
                    err.lines().next().unwrap_or("")
                ));
            }
            Ok((Some(code), err)) => match code {
                0 => tally.exit0 += 1,
                1 => tally.exit1 += 1,
                2 => tally.exit2 += 1,
                101 => {
                    tally.panic += 1;
                    bad.push(format!(
                        "case {i}: {what}: panic: {}",
                        err.lines().find(|l| l.contains("panicked")).unwrap_or("")
                    ));
                }
                _ => {
                    tally.other += 1;
                    bad.push(format!("case {i}: {what}: exit {code}"));
                }
            },
        }
        let _ = std::fs::remove_file(&file);
        let _ = std::fs::remove_file(&out);
    }
    println!(
        "CLI fuzz ({}): tried {} / exit 0 {} / exit 1 {} / exit 2 {} / panic {} / signal {} / timeout {} / other {}",
        bin.display(),
        tally.tried, tally.exit0, tally.exit1, tally.exit2, tally.panic, tally.signal, tally.timeout, tally.other
    );
    for b in &bad {
        println!("  {b}");
    }
    assert!(
        bad.is_empty(),
        "{} of {} cases panicked, died or hung",
        bad.len(),
        tally.tried
    );
}
