//! `dsv3 judge-calibration DIR`: judge the GPU calibration dumps of `benches/calibrate.py`
//! (issue 16) on any machine. Each `calib_*.safetensors` holds one block-scaled GEMM's inputs
//! (`a`, `a_s`, `b`, `b_s`) and the f32 outputs of several kernels (`c_triton`, `c_scaled_mm`,
//! `c_wgmma`, `c_simt`). Every output is checked as `fp8_gemm` under `exact` (the policy),
//! `tensor_core_bound`, and bit for bit against the `tensor_core` model with each parameter set
//! of a grid (F, the term cut, the register's write-back; L = 32); the report says which sets
//! the hardware follows.

use std::path::PathBuf;

use dsv3::registry::check::{self, Mode};
use dsv3::registry::io::{self, TensorMap};
use dsv3::{Error, Result};

#[derive(clap::Args)]
pub struct Args {
    /// The folder with benches/calibrate.py's dumps (calib_*.safetensors).
    dir: PathBuf,
    /// Sweep the Tensor Core parameter grid also on cases of more than 2^27 products (slow:
    /// seconds per parameter set); otherwise they get the Hopper default only.
    #[arg(long)]
    full: bool,
}

/// The Tensor Core parameter sets tried bit for bit: (label, config fields).
fn grid(sweep: bool) -> Vec<(String, String)> {
    let fs: &[u32] = if sweep { &[12, 13, 14, 23] } else { &[13] };
    let cuts: &[&str] = if sweep {
        &["toward_zero", "floor", "nearest"]
    } else {
        &["toward_zero"]
    };
    let rounds: &[&str] = if sweep {
        &["toward_zero", "nearest_even"]
    } else {
        &["toward_zero"]
    };
    let mut v = Vec::new();
    for &f in fs {
        for &cut in cuts {
            for &round in rounds {
                v.push((
                    format!("F={f} L=32 cut={cut} write-back={round}"),
                    format!(
                        r#""accumulation":"tensor_core","acc_frac_bits":{f},"acc_group":32,"term_cut":"{cut}","acc_out_frac_bits":{},"acc_out_round":"{round}""#,
                        f.min(23)
                    ),
                ));
            }
        }
    }
    v
}

pub fn run(a: Args) -> Result<bool> {
    let op = dsv3::ops::find("fp8_gemm")?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(&a.dir)
        .map_err(|e| Error::Usage(format!("{}: {e}", a.dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("calib_") && n.ends_with(".safetensors"))
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::Usage(format!(
            "{}: no calib_*.safetensors (benches/calibrate.py writes them)",
            a.dir.display()
        )));
    }
    println!("case | kernel | exact (policy) | tensor_core_bound | tensor_core parameter sets matched bit for bit");
    for path in &files {
        let all = io::load(path)?;
        let inputs: TensorMap = ["a", "a_s", "b", "b_s"]
            .iter()
            .filter_map(|k| all.get(*k).map(|t| (k.to_string(), t.clone())))
            .collect();
        let products =
            all.get("a").map_or(0, |t| t.numel()) * all.get("b").map_or(0, |t| t.shape[0]);
        let sets = grid(a.full || products <= 1 << 27);
        let case = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("?")
            .trim_start_matches("calib_");
        for (name, c) in all.iter().filter(|(k, _)| k.starts_with("c_")) {
            let candidate: TensorMap = [("c".to_string(), c.clone())].into();
            let place = format!("{}: {name}", path.display());
            let verdict = |fields: &str, mode: Mode| -> Result<(bool, usize)> {
                let cfg = check::read_config(
                    op,
                    Some(&format!(
                        r#"{{"out_dtype":"f32"{}{fields}}}"#,
                        if fields.is_empty() { "" } else { "," }
                    )),
                )?;
                let r = check::check(op, &inputs, &candidate, &cfg, mode, (&place, &place))?;
                Ok((r.pass, r.tensors.iter().map(|t| t.violations).sum()))
            };
            let show = |(pass, bad): (bool, usize)| {
                if pass {
                    "PASS".to_string()
                } else {
                    format!("FAIL ({bad} bad)")
                }
            };
            let exact = show(verdict("", Mode::Policy)?);
            let bound = show(verdict(
                r#""accumulation":"tensor_core_bound""#,
                Mode::Policy,
            )?);
            let mut matched = Vec::new();
            for (label, fields) in &sets {
                if verdict(fields, Mode::Exact)?.0 {
                    matched.push(label.clone());
                }
            }
            let matched = if matched.is_empty() {
                format!("none of {} sets", sets.len())
            } else {
                matched.join("; ")
            };
            println!(
                "{case} | {} | {exact} | {bound} | {matched}",
                name.trim_start_matches("c_")
            );
        }
    }
    println!(
        "A kernel follows the model when it matches one parameter set on every case (probes included); \
         HOPPER_FP8_WGMMA is F=13 L=32 cut=toward_zero write-back=toward_zero (reference/src/fp8/accumulate.rs)."
    );
    Ok(true)
}
