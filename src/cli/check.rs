//! `dsv3 check`: judge a kernel's outputs against the reference.

use std::path::PathBuf;

use dsv3::registry::check::{self, Mode};
use dsv3::registry::report;
use dsv3::Result;

#[derive(clap::Args)]
pub struct Args {
    /// Op name (see `dsv3 ops`).
    op: String,
    /// safetensors file with the op's inputs.
    #[arg(long)]
    inputs: PathBuf,
    /// safetensors file with your outputs (may be the same file as --inputs).
    #[arg(long)]
    outputs: PathBuf,
    /// Op config: a JSON file, or inline JSON such as '{"scale_fmt":"ue8m0"}'.
    #[arg(long)]
    config: Option<String>,
    /// Write the full report as JSON.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Require every output to be bit-identical to the reference (ignore the op's policy).
    #[arg(long)]
    exact: bool,
    /// Also write the verdict as JUnit XML for CI (one test case per output tensor; an
    /// error case for bad input).
    #[arg(long)]
    junit: Option<PathBuf>,
    /// On a mismatch, save the inputs, your outputs and the config to DIR with a
    /// reproduce.sh holding the one-line command that reproduces the failure.
    #[arg(long, value_name = "DIR")]
    save_failures: Option<PathBuf>,
}

/// The verdict, and the JUnit file (a failure per bad tensor, an error for bad input).
pub fn run(a: Args) -> Result<bool> {
    let outcome = judge(&a);
    if let Some(p) = &a.junit {
        let cases = match &outcome {
            Ok(r) => report::check_cases(r),
            Err(e) => vec![report::TestCase {
                classname: format!("dsv3.check.{}", a.op),
                name: "inputs".into(),
                seconds: 0.0,
                outcome: report::Outcome::Error(e.to_string()),
                detail: String::new(),
            }],
        };
        report::write_text(p, &report::junit("dsv3 check", &cases), "JUnit report")?;
    }
    Ok(outcome?.pass)
}

/// Load, judge, print the table, write the JSON report and, on a mismatch, the failure
/// directory.
fn judge(a: &Args) -> Result<check::CheckReport> {
    let op = dsv3::ops::find(&a.op)?;
    let cfg = check::read_config(op, a.config.as_deref())?;
    let progress = dsv3::registry::progress::Progress::start(&format!("dsv3 check {}", op.name));
    progress.phase("loading");
    let (ins, outs) = check::load_pair(op, &a.inputs, &a.outputs)?;
    let places = (
        format!(" in {}", a.inputs.display()),
        format!(" in {}", a.outputs.display()),
    );
    eprintln!(
        "dsv3 check {}: running the reference on {} input tensor(s)…",
        op.name,
        ins.len()
    );
    progress.phase("running the reference and comparing");
    let mode = if a.exact { Mode::Exact } else { Mode::Policy };
    let r = check::check(op, &ins, &outs, &cfg, mode, (&places.0, &places.1))?;
    drop(progress);
    print!("{}", check::render(&r));
    if let Some(p) = &a.report {
        let mut files = vec![a.inputs.clone(), a.outputs.clone()];
        if let Some(c) = a
            .config
            .as_deref()
            .filter(|c| !c.trim_start().starts_with('{'))
        {
            files.push(PathBuf::from(c));
        }
        let text = report::Envelope::new("check", report::digests(&files)?, &r).to_json()?;
        report::write_text(p, &text, "report")?;
    }
    if let (false, Some(dir)) = (r.pass, &a.save_failures) {
        let command = check::save_failure(dir, op, &ins, &outs, &cfg)?;
        eprintln!(
            "failure saved to {}; reproduce with:\n  {command}",
            dir.display()
        );
    }
    Ok(r)
}
