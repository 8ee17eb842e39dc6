//! The `dsv3` command line. Exit codes: 0 pass, 1 mismatch, 2 bad input.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use dsv3::check::{self, Mode};
use dsv3::gpu::GpuMode;
use dsv3::registry;
use dsv3::{forward, io, verify, Error, Result};

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
        /// Also write the results as JSON.
        #[arg(long)]
        report: Option<PathBuf>,
    },
    /// Recompute OP's outputs from your inputs with the reference and judge your outputs.
    /// Exit 0 = pass, 1 = mismatch, 2 = bad input.
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
    },
    /// List the registered ops with their tensor contracts and configs.
    Ops {
        /// One op in detail (contract, config, tolerance policy).
        op: Option<String>,
    },
    /// Write random inputs for OP (from its generator) to a safetensors file.
    Gen {
        op: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        config: Option<String>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Pin a named size, e.g. --size M=4096 --size K=7168.
        #[arg(long = "size", value_parser = parse_size)]
        sizes: Vec<(String, usize)>,
    },
    /// Logits of one token sequence (positions 0..T−1) from a model directory in the hub
    /// layout (config.json + *.safetensors [+ model.safetensors.index.json]).
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
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Directory for accum_study_<dist>.svg ("-" for no plot).
        #[arg(long, default_value = ".")]
        plot_dir: String,
    },
    /// Time the GPU kernels at DeepSeek-V3 shapes (fp8_gemm TFLOPS, act_quant GB/s beside the
    /// device-to-device copy bandwidth). Prints SKIP without a device.
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
    BalanceSim(dsv3::sim::balance_sim::BalanceSimArgs),
    /// Redundant-expert placement (EPLB) on skewed loads: GPU/node imbalance before and after.
    Eplb(dsv3::sim::eplb::EplbArgs),
    /// Simulate a pipeline schedule (1f1b, zb1p, dualpipe) against V3 Table 2 and draw its
    /// timeline (SVG); `table` prints the bubble/memory table for PP ∈ {4, 8, 16}.
    Schedule(dsv3::sim::schedule::ScheduleArgs),
    /// AdamW with FP32 master weights and BF16 moments against f64: drift over many steps.
    AdamwDrift(dsv3::sim::adamw_drift::AdamwDriftArgs),
    /// Run OP's reference on your inputs and write its outputs.
    Run {
        op: String,
        #[arg(long)]
        inputs: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        config: Option<String>,
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
        } => {
            let dir = fixtures.unwrap_or_else(verify::default_fixtures_dir);
            let mut stdout = std::io::stdout();
            let r = verify::verify(&dir, filter.as_deref(), gpu, &mut stdout)?;
            let failed = r
                .cases
                .iter()
                .filter(|c| !c.pass || c.gpu_pass == Some(false))
                .count();
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
            write_json(report, &r)?;
            println!(
                "{}",
                if r.pass {
                    "overall: PASS"
                } else {
                    "overall: FAIL"
                }
            );
            let _ = failed;
            Ok(r.pass)
        }
        Command::Check {
            op,
            inputs,
            outputs,
            config,
            report,
            exact,
        } => {
            let op = registry::find(&op)?;
            let cfg = check::read_config(op, config.as_deref())?;
            let (ins, outs) = check::load_pair(op, &inputs, &outputs)?;
            let places = (
                format!(" in {}", inputs.display()),
                format!(" in {}", outputs.display()),
            );
            eprintln!(
                "dsv3 check {}: running the reference on {} input tensor(s)…",
                op.name,
                ins.len()
            );
            let r = check::check(
                op,
                &ins,
                &outs,
                &cfg,
                if exact { Mode::Exact } else { Mode::Policy },
                (&places.0, &places.1),
            )?;
            print!("{}", check::render(&r));
            write_json(report, &r)?;
            Ok(r.pass)
        }
        Command::Ops { op: None } => {
            print!("{}", verify::ops_table());
            Ok(true)
        }
        Command::Ops { op: Some(name) } => {
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
            for f in op.config {
                println!("config {}  -- {}", f.describe(), f.doc);
            }
            println!("tolerance: {}", op.policy_doc);
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
            let ins = io::load(&inputs)?;
            let bindings =
                op.contract()
                    .check_inputs(&ins, &cfg, &format!(" in {}", inputs.display()))?;
            let outs = op.run_reference(&ins, &cfg, &bindings)?;
            io::save(&out, &outs, None)?;
            for (name, t) in &outs {
                println!("{name}: {} {:?}", t.dtype, t.shape);
            }
            println!("wrote {}", out.display());
            Ok(true)
        }
    }
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

fn write_json<T: serde::Serialize>(path: Option<PathBuf>, value: &T) -> Result<()> {
    if let Some(p) = path {
        let text = serde_json::to_string_pretty(value).map_err(|e| Error::Usage(e.to_string()))?;
        io::write_file(&p, (text + "\n").as_bytes())?;
        eprintln!("report written to {}", p.display());
    }
    Ok(())
}
