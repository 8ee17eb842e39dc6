//! `dsv3 ops`: the registered ops, their contracts, configs and tolerances.

use dsv3::ops::REGISTRY;
use dsv3::registry::report;
use dsv3::registry::table::Table;
use dsv3::Result;

#[derive(clap::Args)]
pub struct Args {
    /// One op in detail (contract, config, tolerance policy).
    op: Option<String>,
    /// Print JSON (every field of the listing) instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(a: Args) -> Result<bool> {
    let json = |v: &serde_json::Value| serde_json::to_string_pretty(v).unwrap_or_default();
    match (a.op, a.json) {
        (None, true) => {
            let ops: Vec<serde_json::Value> = dsv3::ops::REGISTRY
                .iter()
                .map(|op| op.describe_json())
                .collect();
            let v = serde_json::json!({
                "schema_version": report::SCHEMA_VERSION,
                "dsv3_version": env!("CARGO_PKG_VERSION"),
                "ops": ops,
            });
            println!("{}", json(&v));
        }
        (None, false) => print!("{}", ops_table()),
        (Some(name), true) => println!("{}", json(&dsv3::ops::find(&name)?.describe_json())),
        (Some(name), false) => {
            let op = dsv3::ops::find(&name)?;
            println!(
                "{}: {}\nsource: {}\nreference: {}",
                op.name, op.summary, op.source, op.reference_fn
            );
            for g in op.gpu {
                println!("kernel ({}): {}", g.backend, g.kernel);
            }
            for s in op.inputs {
                println!("input  {}  -- {}", s.describe(), s.doc);
            }
            for s in op.outputs {
                println!("output {}  -- {}", s.describe(), s.doc);
            }
            for c in op.constraints {
                println!("constraint {}", c.describe());
            }
            for f in op.config.fields() {
                println!("config {}  -- {}", f.describe(), f.doc);
            }
            println!(
                "generator sizes: {}",
                op.size_names(&op.default_config()).join(", ")
            );
            println!("tolerance: {}", op.policy_doc);
        }
    }
    Ok(true)
}

/// The list of ops as a table (`dsv3 ops`).
fn ops_table() -> String {
    let mut t = Table::new(&["op", "inputs", "outputs", "config", "GPU", "source"]);
    for op in REGISTRY {
        let ins: Vec<String> = op.inputs.iter().map(|s| s.describe()).collect();
        let outs: Vec<String> = op.outputs.iter().map(|s| s.describe()).collect();
        let mut cfg: Vec<String> = op.config.fields().map(|f| f.describe()).collect();
        cfg.extend(op.constraints.iter().map(|c| c.describe()));
        t.row(vec![
            op.name.into(),
            ins.join("; "),
            outs.join("; "),
            if cfg.is_empty() {
                "-".into()
            } else {
                cfg.join("; ")
            },
            if op.gpu.is_empty() {
                "-".into()
            } else {
                op.gpu
                    .iter()
                    .map(|g| g.backend)
                    .collect::<Vec<_>>()
                    .join(", ")
            },
            op.source.into(),
        ]);
    }
    t.render()
}
