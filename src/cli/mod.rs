//! The `dsv3` command line: one module per subcommand, each with its own `clap::Args` and
//! `run` (`Ok(pass)` or a bad-input error; `main` turns them into exit codes 0, 1, 2).

mod accum_study;
mod calibration;
mod check;
mod forward;
mod gpu_bench;
mod model_stats;
mod ops;
mod run;
mod sims;
mod verify;

use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
use clap::{Parser, Subcommand};

use dsv3::registry::config::Choice;
use dsv3::Result;

#[derive(Parser)]
#[command(
    name = "dsv3",
    version,
    about = "Reference oracle for DeepSeek-V3's math: is this output right?"
)]
pub struct Cli {
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
    Verify(verify::Args),
    /// Recompute OP's outputs from your inputs with the reference and judge your outputs.
    /// Exit 0 = pass, 1 = mismatch, 2 = bad input.
    #[command(
        after_help = "Examples:\n  dsv3 check act_quant --inputs in.safetensors --outputs out.safetensors\n  dsv3 check fp8_gemm --inputs io.safetensors --outputs io.safetensors --config '{\"out_dtype\":\"f32\"}' --junit check.xml --save-failures failures/"
    )]
    Check(check::Args),
    /// List the registered ops with their tensor contracts and configs.
    #[command(
        after_help = "Examples:\n  dsv3 ops\n  dsv3 ops moe_gate\n  dsv3 ops --json > ops.json"
    )]
    Ops(ops::Args),
    /// Write random inputs for OP (from its generator) to a safetensors file.
    #[command(
        after_help = "Examples:\n  dsv3 gen act_quant --out in.safetensors\n  dsv3 gen fp8_gemm --out in.safetensors --size M=128 --size N=7168 --size K=2048 --seed 3"
    )]
    Gen(run::GenArgs),
    /// Logits of one token sequence (positions 0..T−1) from a model directory in the hub
    /// layout (config.json + *.safetensors [+ model.safetensors.index.json]).
    #[command(
        after_help = "Examples:\n  dsv3 forward --model DeepSeek-V3/ --tokens 0,100,200 --layers 0-3 --out logits.safetensors\n  dsv3 forward --model tiny/ --tokens 1,2,3,4 --decode --precision fp8 --mtp"
    )]
    Forward(forward::Args),
    /// V3 §3.3.2's experiment: error of the FP8 Tensor Core accumulation model vs K, without
    /// promotion and with promotion every N_C elements; tables and SVG plots.
    #[command(
        after_help = "Examples:\n  dsv3 accum-study --plot-dir plots/\n  dsv3 accum-study --k 4096 --intervals 128 --dist gauss --metric max --plot-dir -"
    )]
    AccumStudy(accum_study::Args),
    /// Time the GPU kernels at DeepSeek-V3 shapes (fp8_gemm TFLOPS, act_quant GB/s beside the
    /// device-to-device copy bandwidth). Prints SKIP without a device.
    #[command(after_help = "Examples:\n  dsv3 gpu-bench\n  dsv3 gpu-bench --quick --require")]
    GpuBench(gpu_bench::Args),
    /// Route synthetic skewed tokens for N steps with and without the aux-loss-free bias
    /// update (V3 §2.1.2); print max/mean expert load per step, optionally an SVG plot.
    #[command(
        after_help = "Examples:\n  dsv3 balance-sim --steps 300 --svg balance.svg\n  dsv3 balance-sim --experts 256 --top-k 8 --nodes 8 --max-nodes 4 --gamma 0.001"
    )]
    BalanceSim(sims::BalanceSimArgs),
    /// Redundant-expert placement (EPLB) on skewed loads: GPU/node imbalance before and after.
    #[command(after_help = "Examples:\n  dsv3 eplb\n  dsv3 eplb --example")]
    Eplb(sims::EplbArgs),
    /// Simulate a pipeline schedule (1f1b, zb1p, dualpipe) against V3 Table 2 and draw its
    /// timeline (SVG); `table` prints the bubble/memory table for PP ∈ {4, 8, 16}.
    #[command(
        after_help = "Examples:\n  dsv3 schedule table\n  dsv3 schedule dualpipe --pp 8 --micro 20"
    )]
    Schedule(sims::ScheduleArgs),
    /// AdamW with FP32 master weights and BF16 moments against f64: drift over many steps.
    #[command(
        after_help = "Examples:\n  dsv3 adamw-drift\n  dsv3 adamw-drift --steps 10000 --n 1024"
    )]
    AdamwDrift(sims::AdamwDriftArgs),
    /// Run OP's reference (or, with --backend, one of its GPU kernels) on your inputs and write its outputs.
    #[command(
        after_help = "Examples:\n  dsv3 run act_quant --inputs in.safetensors --out expected.safetensors\n  dsv3 run moe_gate --inputs router.safetensors --out ids.safetensors --config '{\"top_k\":8}'\n  dsv3 run fp8_gemm --inputs ab.safetensors --out wgmma.safetensors --backend wgmma --config '{\"accumulation\":\"tensor_core\"}'"
    )]
    Run(run::Args),
    /// A DeepSeek-V3-style model's arithmetic from its config: parameters by component (total,
    /// activated), KV-cache bytes (MLA vs MHA), FLOPs per token, training compute and cost,
    /// dispatch/combine bytes.
    #[command(
        after_help = "Examples:\n  dsv3 model-stats --config fixtures/configs/deepseek-v3/config.json\n  dsv3 model-stats --config DeepSeek-V3/ --json\n  dsv3 model-stats --config DeepSeek-V3/ --svg-dir plots/"
    )]
    ModelStats(model_stats::Args),
    /// Judge the GPU calibration dumps of benches/calibrate.py: every kernel's output under
    /// exact, tensor_core_bound and the tensor_core parameter grid (which parameters the
    /// hardware follows).
    #[command(
        after_help = "Examples:\n  dsv3 judge-calibration gpu-out/calib\n  dsv3 judge-calibration gpu-out/calib --full"
    )]
    JudgeCalibration(calibration::Args),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    #[command(
        after_help = "Examples:\n  dsv3 completions bash > ~/.local/share/bash-completion/completions/dsv3\n  dsv3 completions zsh > ~/.zfunc/_dsv3"
    )]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// Run the parsed command line: `Ok(pass)` or a bad-input error.
pub fn run(cli: Cli) -> Result<bool> {
    match cli.command {
        Command::Verify(a) => verify::run(a),
        Command::Check(a) => check::run(a),
        Command::Ops(a) => ops::run(a),
        Command::Gen(a) => run::generate(a),
        Command::Forward(a) => forward::run(a),
        Command::AccumStudy(a) => accum_study::run(a),
        Command::GpuBench(a) => gpu_bench::run(a),
        Command::BalanceSim(a) => sims::balance_sim(a),
        Command::Eplb(a) => sims::eplb(a),
        Command::Schedule(a) => sims::schedule(a),
        Command::AdamwDrift(a) => sims::adamw_drift(a),
        Command::Run(a) => run::run(a),
        Command::JudgeCalibration(a) => calibration::run(a),
        Command::ModelStats(a) => model_stats::run(a),
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "dsv3", &mut std::io::stdout());
            Ok(true)
        }
    }
}

/// The parser of a [`Choice`] enum's values, spelled as the CLI writes them (kebab-case; the
/// config spelling with underscores is accepted too), with each value's help where it has one.
pub fn choice<T: Choice + Clone + Send + Sync>() -> impl TypedValueParser<Value = T> {
    let values = T::VALUES.iter().enumerate().map(|(i, v)| {
        let mut value = PossibleValue::new(v.replace('_', "-"));
        if v.contains('_') {
            value = value.alias(*v);
        }
        if let Some(help) = T::HELP.get(i) {
            value = value.help(*help);
        }
        value
    });
    PossibleValuesParser::new(values)
        .map(|s: String| T::from_name(&s.replace('-', "_")).expect("one of the listed values"))
}

/// `NAME=VALUE` of `--size`.
pub fn parse_size(s: &str) -> std::result::Result<(String, usize), String> {
    let (k, v) = s.split_once('=').ok_or("expected NAME=VALUE")?;
    Ok((k.to_string(), v.parse().map_err(|e| format!("{v}: {e}"))?))
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

    /// Choice values parse in both spellings and keep their help.
    #[test]
    fn choice_values_take_both_spellings() {
        let cli = Cli::try_parse_from([
            "dsv3",
            "forward",
            "--model",
            "m",
            "--tokens",
            "1",
            "--mtp-hidden",
            "after_final_norm",
        ]);
        assert!(cli.is_ok());
        let cli = Cli::try_parse_from([
            "dsv3",
            "forward",
            "--model",
            "m",
            "--tokens",
            "1",
            "--mtp-hidden",
            "after-final-norm",
        ]);
        assert!(cli.is_ok());
        let e = Cli::try_parse_from(["dsv3", "verify", "--gpu", "maybe"])
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("auto") && e.contains("require") && e.contains("off"),
            "{e}"
        );
    }
}
