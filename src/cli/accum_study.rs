//! `dsv3 accum-study`: V3 §3.3.2's accumulation experiment on the Tensor Core model.

use std::path::PathBuf;

use dsv3::studies::accum_study::{Dist, Metric, Study};
use dsv3::Result;
use dsv3_reference::fp8::{TensorCoreModel, TermCut, WriteBack};

#[derive(clap::Args)]
pub struct Args {
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
    #[arg(long, value_parser = super::choice::<Dist>(), value_delimiter = ',', default_value = "gauss,uniform")]
    dist: Vec<Dist>,
    /// Error metrics: one table and plot each.
    #[arg(long, value_parser = super::choice::<Metric>(), value_delimiter = ',', default_value = "max,p99")]
    metric: Vec<Metric>,
    /// Model: fraction bits kept when aligning (Hopper: 13).
    #[arg(long, default_value_t = 13)]
    frac_bits: u32,
    /// Model: products aligned together (Hopper wgmma k32: 32).
    #[arg(long, default_value_t = 32)]
    group: usize,
    /// Model: how aligned terms are cut.
    #[arg(long, value_parser = super::choice::<TermCut>(), default_value = "toward-zero")]
    term_cut: TermCut,
    /// Model: fraction bits of the accumulator register (Hopper: 13).
    #[arg(long, default_value_t = 13)]
    out_frac_bits: u32,
    /// Model: rounding of the register write-back.
    #[arg(long, value_parser = super::choice::<WriteBack>(), default_value = "toward-zero")]
    out_round: WriteBack,
    /// Seed of the random operands.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Directory for accum_study_<dist>.svg ("-" for no plot).
    #[arg(long, default_value = ".")]
    plot_dir: String,
}

pub fn run(a: Args) -> Result<bool> {
    let study = Study {
        m: a.m,
        n: a.n,
        ks: a.k,
        intervals: a.intervals,
        dists: a.dist,
        metrics: a.metric,
        model: TensorCoreModel {
            frac_bits: a.frac_bits,
            group: a.group,
            term_cut: a.term_cut,
            out_frac_bits: a.out_frac_bits,
            out_round: a.out_round,
        },
        seed: a.seed,
        plot_dir: (a.plot_dir != "-").then(|| PathBuf::from(a.plot_dir)),
    };
    dsv3::studies::accum_study::run(&study, &mut std::io::stdout())?;
    Ok(true)
}
