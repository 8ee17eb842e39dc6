//! The `dsv3` command line. Exit codes: 0 pass, 1 mismatch, 2 bad input.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use dsv3::check::{self, Mode};
use dsv3::gpu::GpuMode;
use dsv3::registry;
use dsv3::{forward, io, report, verify, Error, Result};

#[derive(Parser)]
#[command(
    name = "dsv3",
    version,
    about = "Reference oracle for DeepSeek-V3's math: is this output right?"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every op against the committed fixtures (external oracles) and, with a GPU, every
    /// GPU kernel against the reference. Exit 0 when all pass.
    #[command(
        after_help = "Examples:\n  dsv3 verify\n  dsv3 verify --filter fp8_gemm --junit verify.xml --report verify.json"
    )]
    Verify {
        /// Fixtures directory (default: ./fixtures, else the source tree's).
        #[arg(long)]
        fixtures: Option<PathBuf>,
        /// Only cases whose name contains this (or whose op is this).
        #[arg(long)]
        filter: Option<String>,
        /// Use the GPU when present (auto), insist on one (require), or not (off).
        #[arg(long, value_enum, default_value = "auto")]
        gpu: GpuMode,
        /// Also write the results as JSON (schema version, dsv3 version, fixture sha256s).
        #[arg(long)]
        report: Option<PathBuf>,
        /// Also write the results as JUnit XML for CI (one test case per fixture case).
        #[arg(long)]
        junit: Option<PathBuf>,
    },
    /// Recompute OP's outputs from your inputs with the reference and judge your outputs.
    /// Exit 0 = pass, 1 = mismatch, 2 = bad input.
    #[command(
        after_help = "Examples:\n  dsv3 check act_quant --inputs in.safetensors --outputs out.safetensors\n  dsv3 check fp8_gemm --inputs io.safetensors --outputs io.safetensors --config '{\"out_dtype\":\"f32\"}' --junit check.xml --save-failures failures/"
    )]
    Check {
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
    },
    /// List the registered ops with their tensor contracts and configs.
    #[command(
        after_help = "Examples:\n  dsv3 ops\n  dsv3 ops moe_gate\n  dsv3 ops --json > ops.json"
    )]
    Ops {
        /// One op in detail (contract, config, tolerance policy).
        op: Option<String>,
        /// Print JSON (every field of the listing) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Write random inputs for OP (from its generator) to a safetensors file.
    #[command(
        after_help = "Examples:\n  dsv3 gen act_quant --out in.safetensors\n  dsv3 gen fp8_gemm --out in.safetensors --size M=128 --size N=7168 --size K=2048 --seed 3"
    )]
    Gen {
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
        #[arg(long = "size", value_parser = parse_size)]
        sizes: Vec<(String, usize)>,
    },
    /// Logits of one token sequence (positions 0..T−1) from a model directory in the hub
    /// layout (config.json + *.safetensors [+ model.safetensors.index.json]).
    #[command(
        after_help = "Examples:\n  dsv3 forward --model DeepSeek-V3/ --tokens 0,100,200 --layers 0-3 --out logits.safetensors\n  dsv3 forward --model tiny/ --tokens 1,2,3,4 --decode --precision fp8 --mtp"
    )]
    Forward {
        /// Model directory.
        #[arg(long)]
        model: PathBuf,
        /// Token ids, comma-separated: --tokens 1,2,3
        #[arg(long)]
        tokens: String,
        /// Write `logits` F32 [T, vocab] to this safetensors file.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Feed the tokens one at a time through the absorbed MLA and its latent cache.
        #[arg(long)]
        decode: bool,
        /// f32; bf16 (weights and GEMM operands in bf16); fp8 (the blocks' Linears through
        /// act_quant + the block-scaled FP8 GEMM, activation scales as the checkpoint's
        /// quantization_config.scale_fmt; the rest in bf16). Not f32: the distance of the
        /// logits to an f32 run is printed.
        #[arg(long, value_enum, default_value = "f32")]
        precision: PrecisionArg,
        /// Load only these layers, e.g. --layers 0 or --layers 0,3-5 (embedding, final norm and
        /// head are always loaded); the logits are then those of the truncated model.
        #[arg(long)]
        layers: Option<String>,
        /// MLA form of a prefill: naive (per-head K/V) or absorbed (latent cache).
        #[arg(long, value_enum, default_value = "naive")]
        attn: AttnArg,
        /// Also run the multi-token-prediction module(s) (checkpoint layer num_hidden_layers..):
        /// print their next-next-token predictions and L_MTP, write `mtp_logits` F32
        /// [T−1, vocab] (row i predicts token i+2) with --out.
        #[arg(long)]
        mtp: bool,
        /// The main-model hidden state MTP module 1 reads: before the final norm (default) or
        /// after it (what vLLM passes).
        #[arg(long, value_enum, default_value = "before-final-norm")]
        mtp_hidden: MtpHiddenArg,
    },
    /// V3 §3.3.2's experiment: error of the FP8 Tensor Core accumulation model vs K, without
    /// promotion and with promotion every N_C elements; tables and SVG plots.
    #[command(
        after_help = "Examples:\n  dsv3 accum-study --plot-dir plots/\n  dsv3 accum-study --k 4096 --intervals 128 --dist gauss --metric max --plot-dir -"
    )]
    AccumStudy {
        /// Output rows per K.
        #[arg(long, default_value_t = 64)]
        m: usize,
        /// Output columns per K.
        #[arg(long, default_value_t = 64)]
        n: usize,
        /// Reduction lengths.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "512,1024,2048,4096,8192,16384"
        )]
        k: Vec<usize>,
        /// Promotion intervals N_C (no promotion is always included).
        #[arg(long, value_delimiter = ',', default_value = "32,64,128,256")]
        intervals: Vec<usize>,
        /// Input distributions.
        #[arg(
            long,
            value_enum,
            value_delimiter = ',',
            default_value = "gauss,uniform"
        )]
        dist: Vec<dsv3::accum_study::Dist>,
        /// Error metrics: one table and plot each.
        #[arg(long, value_enum, value_delimiter = ',', default_value = "max,p99")]
        metric: Vec<dsv3::accum_study::Metric>,
        /// Model: fraction bits kept when aligning (Hopper: 13).
        #[arg(long, default_value_t = 13)]
        frac_bits: u32,
        /// Model: products aligned together (Hopper wgmma k32: 32).
        #[arg(long, default_value_t = 32)]
        group: usize,
        /// Model: how aligned terms are cut.
        #[arg(long, value_enum, default_value = "toward-zero")]
        term_cut: TermCutArg,
        /// Model: fraction bits of the accumulator register (Hopper: 13).
        #[arg(long, default_value_t = 13)]
        out_frac_bits: u32,
        /// Model: rounding of the register write-back.
        #[arg(long, value_enum, default_value = "toward-zero")]
        out_round: OutRoundArg,
        /// Seed of the random operands.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Directory for accum_study_<dist>.svg ("-" for no plot).
        #[arg(long, default_value = ".")]
        plot_dir: String,
    },
    /// Time the GPU kernels at DeepSeek-V3 shapes (fp8_gemm TFLOPS, act_quant GB/s beside the
    /// device-to-device copy bandwidth). Prints SKIP without a device.
    #[command(after_help = "Examples:\n  dsv3 gpu-bench\n  dsv3 gpu-bench --quick --require")]
    GpuBench {
        /// Fail (exit 2) when no device is present.
        #[arg(long)]
        require: bool,
        /// Fewer shapes and repetitions.
        #[arg(long)]
        quick: bool,
    },
    /// Route synthetic skewed tokens for N steps with and without the aux-loss-free bias
    /// update (V3 §2.1.2); print max/mean expert load per step, optionally an SVG plot.
    #[command(
        after_help = "Examples:\n  dsv3 balance-sim --steps 300 --svg balance.svg\n  dsv3 balance-sim --experts 256 --top-k 8 --nodes 8 --max-nodes 4 --gamma 0.001"
    )]
    BalanceSim(dsv3::sim::balance_sim::BalanceSimArgs),
    /// Redundant-expert placement (EPLB) on skewed loads: GPU/node imbalance before and after.
    #[command(after_help = "Examples:\n  dsv3 eplb\n  dsv3 eplb --example")]
    Eplb(dsv3::sim::eplb::EplbArgs),
    /// Simulate a pipeline schedule (1f1b, zb1p, dualpipe) against V3 Table 2 and draw its
    /// timeline (SVG); `table` prints the bubble/memory table for PP ∈ {4, 8, 16}.
    #[command(
        after_help = "Examples:\n  dsv3 schedule table\n  dsv3 schedule dualpipe --pp 8 --micro 20"
    )]
    Schedule(dsv3::sim::schedule::ScheduleArgs),
    /// AdamW with FP32 master weights and BF16 moments against f64: drift over many steps.
    #[command(
        after_help = "Examples:\n  dsv3 adamw-drift\n  dsv3 adamw-drift --steps 10000 --n 1024"
    )]
    AdamwDrift(dsv3::sim::adamw_drift::AdamwDriftArgs),
    /// Run OP's reference on your inputs and write its outputs.
    #[command(
        after_help = "Examples:\n  dsv3 run act_quant --inputs in.safetensors --out expected.safetensors\n  dsv3 run moe_gate --inputs router.safetensors --out ids.safetensors --config '{\"top_k\":8}'"
    )]
    Run {
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
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    #[command(
        after_help = "Examples:\n  dsv3 completions bash > ~/.local/share/bash-completion/completions/dsv3\n  dsv3 completions zsh > ~/.zfunc/_dsv3"
    )]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum PrecisionArg {
    F32,
    Bf16,
    Fp8,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum MtpHiddenArg {
    BeforeFinalNorm,
    AfterFinalNorm,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum AttnArg {
    Naive,
    Absorbed,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum TermCutArg {
    TowardZero,
    Floor,
    Nearest,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum OutRoundArg {
    TowardZero,
    NearestEven,
}

fn parse_size(s: &str) -> std::result::Result<(String, usize), String> {
    let (k, v) = s.split_once('=').ok_or("expected NAME=VALUE")?;
    Ok((k.to_string(), v.parse().map_err(|e| format!("{v}: {e}"))?))
}

fn main() -> ExitCode {
    // Rust ignores SIGPIPE, so a closed pipe (`dsv3 ops --json | head`) would make `println!`
    // panic; with the default disposition the process ends quietly, like any Unix filter.
    #[cfg(unix)]
    // SAFETY: called first thing in main, before any thread exists; SIG_DFL is a valid handler.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    match run(cli) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

/// `Ok(pass)` or a bad-input error.
fn run(cli: Cli) -> Result<bool> {
    match cli.command {
        Command::Verify {
            fixtures,
            filter,
            gpu,
            report,
            junit,
        } => {
            let dir = fixtures.unwrap_or_else(verify::default_fixtures_dir);
            let mut stdout = std::io::stdout();
            let r = verify::verify(&dir, filter.as_deref(), gpu, &mut stdout)?;
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
            if let Some(p) = report {
                let files = verify::fixture_digests(&dir)?;
                let text = report::Envelope::new("verify", files, &r).to_json()?;
                report::write_text(&p, &text, "report")?;
            }
            if let Some(p) = junit {
                let text = report::junit("dsv3 verify", &report::verify_cases(&r));
                report::write_text(&p, &text, "JUnit report")?;
            }
            println!(
                "{}",
                if r.pass {
                    "overall: PASS"
                } else {
                    "overall: FAIL"
                }
            );
            Ok(r.pass)
        }
        Command::Check {
            op,
            inputs,
            outputs,
            config,
            report,
            exact,
            junit,
            save_failures,
        } => {
            let args = CheckArgs {
                op,
                inputs,
                outputs,
                config,
                report,
                exact,
                save_failures,
            };
            match check_command(&args) {
                Err(e) => {
                    if let Some(p) = &junit {
                        let case = report::TestCase {
                            classname: format!("dsv3.check.{}", args.op),
                            name: "inputs".into(),
                            seconds: 0.0,
                            outcome: report::Outcome::Error(e.to_string()),
                            detail: String::new(),
                        };
                        report::write_text(
                            p,
                            &report::junit("dsv3 check", &[case]),
                            "JUnit report",
                        )?;
                    }
                    Err(e)
                }
                Ok(r) => {
                    if let Some(p) = &junit {
                        let text = report::junit("dsv3 check", &report::check_cases(&r));
                        report::write_text(p, &text, "JUnit report")?;
                    }
                    Ok(r.pass)
                }
            }
        }
        Command::Ops { op: None, json } => {
            if json {
                let ops: Vec<serde_json::Value> = registry::REGISTRY
                    .iter()
                    .map(|op| op.describe_json())
                    .collect();
                let v = serde_json::json!({
                    "schema_version": report::SCHEMA_VERSION,
                    "dsv3_version": env!("CARGO_PKG_VERSION"),
                    "ops": ops,
                });
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                print!("{}", verify::ops_table());
            }
            Ok(true)
        }
        Command::Ops {
            op: Some(name),
            json: true,
        } => {
            let op = registry::find(&name)?;
            println!(
                "{}",
                serde_json::to_string_pretty(&op.describe_json()).unwrap_or_default()
            );
            Ok(true)
        }
        Command::Ops {
            op: Some(name),
            json: false,
        } => {
            let op = registry::find(&name)?;
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
            Ok(true)
        }
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "dsv3", &mut std::io::stdout());
            Ok(true)
        }
        Command::Gen {
            op,
            out,
            config,
            seed,
            sizes,
        } => {
            let op = registry::find(&op)?;
            let cfg = check::read_config(op, config.as_deref())?;
            let mut pinned = registry::Sizes::new();
            for (k, v) in sizes {
                pinned.insert(k, v);
            }
            let inputs = op.generate_inputs(&mut dsv3::rng::Rng::new(seed), &cfg, &pinned)?;
            io::save(
                &out,
                &inputs,
                Some(
                    BTreeMap::from([
                        ("dsv3_op".to_string(), op.name.to_string()),
                        ("dsv3_config".to_string(), cfg.as_json().to_string()),
                    ])
                    .into_iter()
                    .collect(),
                ),
            )?;
            for (name, t) in &inputs {
                println!("{name}: {} {:?}", t.dtype, t.shape);
            }
            println!("wrote {}", out.display());
            Ok(true)
        }
        Command::Forward {
            model,
            tokens,
            out,
            decode,
            precision,
            layers,
            attn,
            mtp,
            mtp_hidden,
        } => {
            use dsv3_reference::model::{AttnImpl, MainHidden};
            use forward::PrecisionChoice;
            let args = forward::ForwardArgs {
                model,
                tokens: forward::parse_tokens(&tokens)?,
                out,
                decode,
                precision: match precision {
                    PrecisionArg::F32 => PrecisionChoice::F32,
                    PrecisionArg::Bf16 => PrecisionChoice::Bf16,
                    PrecisionArg::Fp8 => PrecisionChoice::Fp8,
                },
                layers: layers.as_deref().map(forward::parse_layers).transpose()?,
                attn: match attn {
                    AttnArg::Naive => AttnImpl::Naive,
                    AttnArg::Absorbed => AttnImpl::Absorbed,
                },
                mtp,
                mtp_hidden: match mtp_hidden {
                    MtpHiddenArg::BeforeFinalNorm => MainHidden::BeforeFinalNorm,
                    MtpHiddenArg::AfterFinalNorm => MainHidden::AfterFinalNorm,
                },
            };
            forward::run(&args, &mut std::io::stderr())?;
            Ok(true)
        }
        Command::AccumStudy {
            m,
            n,
            k,
            intervals,
            dist,
            metric,
            frac_bits,
            group,
            term_cut,
            out_frac_bits,
            out_round,
            seed,
            plot_dir,
        } => {
            use dsv3_reference::fp8::{TensorCoreModel, TermCut, WriteBack};
            let study = dsv3::accum_study::Study {
                m,
                n,
                ks: k,
                intervals,
                dists: dist,
                metrics: metric,
                model: TensorCoreModel {
                    frac_bits,
                    group,
                    term_cut: match term_cut {
                        TermCutArg::TowardZero => TermCut::TowardZero,
                        TermCutArg::Floor => TermCut::Floor,
                        TermCutArg::Nearest => TermCut::Nearest,
                    },
                    out_frac_bits,
                    out_round: match out_round {
                        OutRoundArg::TowardZero => WriteBack::TowardZero,
                        OutRoundArg::NearestEven => WriteBack::NearestEven,
                    },
                },
                seed,
                plot_dir: (plot_dir != "-").then(|| PathBuf::from(plot_dir)),
            };
            dsv3::accum_study::run(&study, &mut std::io::stdout())?;
            Ok(true)
        }
        Command::GpuBench { require, quick } => gpu_bench(require, quick),
        Command::BalanceSim(a) => dsv3::sim::balance_sim::main(a),
        Command::Eplb(a) => dsv3::sim::eplb::main(a),
        Command::Schedule(a) => dsv3::sim::schedule::main(a),
        Command::AdamwDrift(a) => dsv3::sim::adamw_drift::main(a),
        Command::Run {
            op,
            inputs,
            out,
            config,
        } => {
            let op = registry::find(&op)?;
            let cfg = check::read_config(op, config.as_deref())?;
            let place = format!(" in {}", inputs.display());
            let loaded = io::load(&inputs)?;
            let ins = dsv3::adapt::adapt_inputs(op, &loaded, &cfg, &place)?.unwrap_or(loaded);
            let bindings = op.contract().check_inputs(&ins, &cfg, &place)?;
            let outs = registry::without_aux(op.run_reference(&ins, &cfg, &bindings)?);
            io::save(&out, &outs, None)?;
            for (name, t) in &outs {
                println!("{name}: {} {:?}", t.dtype, t.shape);
            }
            println!("wrote {}", out.display());
            Ok(true)
        }
    }
}

/// The arguments of `dsv3 check` that shape its verdict.
struct CheckArgs {
    op: String,
    inputs: PathBuf,
    outputs: PathBuf,
    config: Option<String>,
    report: Option<PathBuf>,
    exact: bool,
    save_failures: Option<PathBuf>,
}

/// `dsv3 check`: load, judge, print the table, write the JSON report and, on a mismatch, the
/// failure directory.
fn check_command(a: &CheckArgs) -> Result<check::CheckReport> {
    let op = registry::find(&a.op)?;
    let cfg = check::read_config(op, a.config.as_deref())?;
    let progress = dsv3::progress::Progress::start(&format!("dsv3 check {}", op.name));
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
    let r = check::check(
        op,
        &ins,
        &outs,
        &cfg,
        if a.exact { Mode::Exact } else { Mode::Policy },
        (&places.0, &places.1),
    )?;
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

fn gpu_bench(require: bool, quick: bool) -> Result<bool> {
    use dsv3_gpu::bench::{
        bench_act_quant, bench_copy, bench_fp8_gemm, bench_mla_decode, BenchRow,
    };
    use dsv3_gpu::fp8_gemm::Backend;
    let gpu = match dsv3::gpu::device() {
        Ok(g) => g,
        Err(why) if require => {
            return Err(Error::Usage(format!(
                "gpu-bench --require: no usable GPU: {why}"
            )))
        }
        Err(why) => {
            println!("SKIP gpu-bench: {why}");
            return Ok(true);
        }
    };
    println!("gpu-bench on {}", gpu.description);
    // (N, K) of DeepSeek-V3's Linears (DeepGEMM's test shapes), M tokens
    let nk: &[(usize, usize)] = if quick {
        &[(7168, 2048), (4096, 7168)]
    } else {
        &[
            (2112, 7168),
            (24576, 1536),
            (32768, 512),
            (7168, 16384),
            (4096, 7168),
            (7168, 2048),
        ]
    };
    let ms: &[usize] = if quick {
        &[128, 4096]
    } else {
        &[64, 128, 4096]
    };
    let mut rows: Vec<BenchRow> = vec![bench_copy(gpu, 1 << 30)?];
    for &(m, k) in &[(4096usize, 7168usize), (4096, 16384)] {
        rows.push(bench_act_quant(gpu, m, k)?);
    }
    for &(n, k) in nk {
        for &m in ms {
            rows.push(bench_fp8_gemm(
                gpu,
                Backend::Wgmma,
                (m, n, k),
                if m >= 4096 { 5 } else { 20 },
            )?);
        }
        rows.push(bench_fp8_gemm(gpu, Backend::Simt, (128, n, k), 2)?);
    }
    // FlashMLA's decode benchmark: b = 128, h_q = 128, s_q ∈ {1, 2}, T cached tokens
    let lens: &[usize] = if quick { &[4096] } else { &[4096, 16384] };
    for &len in lens {
        for s_q in [1, 2] {
            rows.push(bench_mla_decode(gpu, (128, s_q, 128, len), 5)?);
        }
    }
    let mut t = dsv3::table::Table::new(&["kernel", "shape", "ms", "TFLOP/s", "GB/s"]);
    for r in rows {
        t.row(vec![
            r.kernel,
            r.shape,
            format!("{:.4}", r.ms),
            r.tflops.map_or("-".into(), |v| format!("{v:.1}")),
            r.gbps.map_or("-".into(), |v| format!("{v:.0}")),
        ]);
    }
    print!("{}", t.render());
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every argument of every subcommand has help text, and every subcommand an example.
    #[test]
    fn every_argument_has_help_and_every_subcommand_an_example() {
        let cli = Cli::command();
        let mut missing = Vec::new();
        for sub in cli.get_subcommands() {
            let name = sub.get_name();
            if name == "help" {
                continue;
            }
            let examples = sub
                .get_after_help()
                .map(|h| h.to_string())
                .unwrap_or_default();
            if !examples.contains("Example") {
                missing.push(format!("{name}: no example (after_help)"));
            }
            for arg in sub.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{name} {id}: no help"));
                }
            }
        }
        assert!(missing.is_empty(), "{}", missing.join("\n"));
    }
}
