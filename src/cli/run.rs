//! `dsv3 run` (the reference's outputs of your inputs) and `dsv3 gen` (random inputs).

use std::collections::BTreeMap;
use std::path::PathBuf;

use dsv3::registry::{self, check, io};
use dsv3::Result;

#[derive(clap::Args)]
pub struct Args {
    /// Op name (see `dsv3 ops`).
    op: String,
    /// safetensors file with the op's inputs.
    #[arg(long)]
    inputs: PathBuf,
    /// The safetensors file to write the reference's outputs to.
    #[arg(long)]
    out: PathBuf,
    /// Op config: a JSON file, or inline JSON such as '{"scale_fmt":"ue8m0"}'.
    #[arg(long)]
    config: Option<String>,
    /// Run this GPU backend of the op (`dsv3 ops OP` lists them: cuda, simt, wgmma) instead of
    /// the reference, and write its outputs (the GPU calibration dumps them this way).
    #[arg(long)]
    backend: Option<String>,
}

pub fn run(a: Args) -> Result<bool> {
    let op = dsv3::ops::find(&a.op)?;
    let cfg = check::read_config(op, a.config.as_deref())?;
    // a backend that cannot run is refused before the inputs are read
    let backend = match &a.backend {
        None => None,
        Some(name) => Some(backend(op, name, &cfg)?),
    };
    let place = format!(" in {}", a.inputs.display());
    let loaded = io::load(&a.inputs)?;
    let ins = op.adapt_inputs(&loaded, &cfg, &place)?.unwrap_or(loaded);
    let bindings = op.contract().check_inputs(&ins, &cfg, &place)?;
    let outs = match backend {
        None => registry::without_aux(op.run_reference(&ins, &cfg, &bindings)?),
        Some((imp, device)) => (imp.run)(device, &ins, &cfg)?,
    };
    io::save(&a.out, &outs, None)?;
    for (name, t) in &outs {
        println!("{name}: {} {:?}", t.dtype, t.shape);
    }
    println!("wrote {}", a.out.display());
    Ok(true)
}

/// `op`'s GPU backend `name` and the device it runs on (exit 2 when the op has no such backend,
/// the backend declines the config, or there is no device).
fn backend(
    op: &'static registry::OpEntry,
    name: &str,
    cfg: &registry::config::Config,
) -> Result<(&'static registry::GpuImpl, &'static registry::gpu::Device)> {
    let usage =
        |why: String| dsv3::Error::Usage(format!("dsv3 run {} --backend {name}: {why}", op.name));
    let Some(imp) = op.gpu.iter().find(|g| g.backend == name) else {
        let known: Vec<&str> = op.gpu.iter().map(|g| g.backend).collect();
        return Err(usage(if known.is_empty() {
            "this op has no GPU backend".into()
        } else {
            format!("no such backend; this op has {}", known.join(", "))
        }));
    };
    if let Some(why) = imp.declines(cfg) {
        return Err(usage(format!("the backend declines this config: {why}")));
    }
    let device = registry::gpu::device().map_err(|why| usage(format!("no GPU: {why}")))?;
    Ok((imp, device))
}

#[derive(clap::Args)]
pub struct GenArgs {
    /// Op name (see `dsv3 ops`).
    op: String,
    /// The safetensors file to write.
    #[arg(long)]
    out: PathBuf,
    /// Op config: a JSON file, or inline JSON such as '{"block_size":64}'.
    #[arg(long)]
    config: Option<String>,
    /// Seed of the generator (the same seed, config and sizes give the same file).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Pin a named size, e.g. --size M=4096 --size K=7168 (`dsv3 ops OP --json` lists
    /// the op's generator_sizes); the others are drawn small.
    #[arg(long = "size", value_parser = super::parse_size)]
    sizes: Vec<(String, usize)>,
}

pub fn generate(a: GenArgs) -> Result<bool> {
    let op = dsv3::ops::find(&a.op)?;
    let cfg = check::read_config(op, a.config.as_deref())?;
    let mut pinned = registry::Sizes::new();
    for (k, v) in a.sizes {
        pinned.insert(k, v);
    }
    let inputs = op.generate_inputs(&mut dsv3::registry::rng::Rng::new(a.seed), &cfg, &pinned)?;
    let metadata = BTreeMap::from([
        ("dsv3_op".to_string(), op.name.to_string()),
        ("dsv3_config".to_string(), cfg.as_json().to_string()),
    ]);
    io::save(&a.out, &inputs, Some(metadata.into_iter().collect()))?;
    for (name, t) in &inputs {
        println!("{name}: {} {:?}", t.dtype, t.shape);
    }
    println!("wrote {}", a.out.display());
    Ok(true)
}
