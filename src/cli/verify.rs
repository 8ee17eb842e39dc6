//! `dsv3 verify`: every op and model against the committed fixtures, and the GPU kernels.

use std::path::PathBuf;

use dsv3::registry::gpu::GpuMode;
use dsv3::registry::report;
use dsv3::verify;
use dsv3::Result;

#[derive(clap::Args)]
pub struct Args {
    /// Fixtures directory (default: ./fixtures, else the source tree's).
    #[arg(long)]
    fixtures: Option<PathBuf>,
    /// Only cases whose name contains this (or whose op is this).
    #[arg(long)]
    filter: Option<String>,
    /// Use the GPU when present (auto), insist on one (require), or not (off).
    #[arg(long, value_parser = super::choice::<GpuMode>(), default_value = "auto")]
    gpu: GpuMode,
    /// Also write the results as JSON (schema version, dsv3 version, fixture sha256s).
    #[arg(long)]
    report: Option<PathBuf>,
    /// Also write the results as JUnit XML for CI (one test case per fixture case).
    #[arg(long)]
    junit: Option<PathBuf>,
}

pub fn run(a: Args) -> Result<bool> {
    let dir = a.fixtures.unwrap_or_else(verify::default_fixtures_dir);
    let mut stdout = std::io::stdout();
    let r = verify::verify(&dir, a.filter.as_deref(), a.gpu, &mut stdout)?;
    let gpu_ran = r.cases.iter().filter(|c| c.gpu_pass.is_some()).count();
    println!(
        "verify: {}/{} cases pass against their oracles; GPU: {}",
        r.cases.iter().filter(|c| c.pass).count(),
        r.cases.len(),
        match &r.gpu_device {
            Some(d) => format!("{gpu_ran} cases diffed on {d}"),
            None => format!(
                "not run ({})",
                r.gpu_unavailable.clone().unwrap_or_default()
            ),
        }
    );
    if r.cases.is_empty() {
        println!("verify: no case matched the filter");
    }
    if let Some(p) = a.report {
        let files = verify::fixture_digests(&dir)?;
        let text = report::Envelope::new("verify", files, &r).to_json()?;
        report::write_text(&p, &text, "report")?;
    }
    if let Some(p) = a.junit {
        let text = report::junit("dsv3 verify", &report::verify_cases(&r));
        report::write_text(&p, &text, "JUnit report")?;
    }
    println!("overall: {}", if r.pass { "PASS" } else { "FAIL" });
    Ok(r.pass)
}
