//! `dsv3 accum-study` on small sizes: the signatures the model must show, and the CLI output.

use std::process::Command;

use dsv3::studies::accum_study::{run, Dist, Metric, Study};
use dsv3_reference::fp8::{TensorCoreModel, TermCut, WriteBack, HOPPER_FP8_WGMMA};

fn study(model: TensorCoreModel, ks: Vec<usize>) -> Study {
    Study {
        m: 8,
        n: 8,
        ks,
        intervals: vec![32, 128],
        dists: vec![Dist::Uniform],
        metrics: vec![Metric::Max],
        model,
        seed: 3,
        plot_dir: None,
    }
}

#[test]
fn accum_study_truncation_shrinks_positive_sums_and_promotion_fixes_it() {
    let r = run(&study(HOPPER_FP8_WGMMA, vec![512, 4096]), &mut Vec::new()).unwrap();
    let errs = |k: usize| &r.rows.iter().find(|(_, kk, _)| *kk == k).unwrap().2;
    for k in [512, 4096] {
        let none = errs(k)[0];
        // every product positive, every cut toward zero: the result is never above the exact
        // sum, so the mean signed error is −(mean |error|) < 0
        assert!(none.mean < 0.0 && (none.mean.abs() - none.median).abs() < none.max);
        // promotion restarts the register: windows of 128, then 32 products hold smaller sums,
        // hence smaller quanta
        assert!(errs(k)[2].max < none.max, "{k}: {:?}", errs(k));
        assert!(errs(k)[1].max < errs(k)[2].max, "{k}: {:?}", errs(k));
    }
    // without promotion the relative error grows about linearly with K: the quantum grows with
    // the running sum, and so does the number of products that lose up to one quantum each
    // (8× more products: require at least 4×)
    assert!(errs(4096)[0].max > 4.0 * errs(512)[0].max);
    // while promotion every 128 keeps it flat
    assert!(errs(4096)[2].max < 2.0 * errs(512)[2].max);
}

#[test]
fn accum_study_with_a_wide_register_is_f32_accurate() {
    // F = 60 keeps every product bit, the register rounds to 23 bits to nearest: each k32 step
    // is one f32 rounding of a sum of positive terms, so the relative error stays below
    // γ_n = n·2^-24/(1 − n·2^-24) with n = K/32 steps (+1 for the promotion adds).
    let wide = TensorCoreModel {
        frac_bits: 60,
        group: 32,
        term_cut: TermCut::TowardZero,
        out_frac_bits: 23,
        out_round: WriteBack::NearestEven,
    };
    let k = 2048;
    let r = run(&study(wide, vec![k]), &mut Vec::new()).unwrap();
    let n = (k / 32 + 1) as f64 * 2f64.powi(-24);
    for e in &r.rows[0].2 {
        assert!(e.max <= n / (1.0 - n), "{e:?}");
    }
}

#[test]
fn accum_study_cli_prints_the_k4096_row_and_writes_plots() {
    let dir = std::env::temp_dir().join(format!("dsv3-accum-{}", std::process::id()));
    let o = Command::new(env!("CARGO_BIN_EXE_dsv3"))
        .args([
            "accum-study",
            "--m",
            "4",
            "--n",
            "4",
            "--k",
            "512,4096",
            "--intervals",
            "128",
            "--dist",
            "uniform",
            "--plot-dir",
            dir.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("U[0,1) K = 4096, no promotion: max"), "{out}");
    assert!(out.contains("nearly 2%"), "{out}");
    for metric in ["max", "p99"] {
        let svg =
            std::fs::read_to_string(dir.join(format!("accum_study_uniform_{metric}.svg"))).unwrap();
        // the model and its bound, for no promotion and N_C = 128
        assert_eq!(svg.matches("<polyline").count(), 4, "{metric}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn accum_study_bound_covers_the_model_and_separates_no_promotion() {
    let r = run(&study(HOPPER_FP8_WGMMA, vec![512, 4096]), &mut Vec::new()).unwrap();
    // the bound dominates every output's error, so every order statistic of it
    for ((_, k, errs), (_, _, bounds)) in r.rows.iter().zip(&r.bounds) {
        for (e, b) in errs.iter().zip(bounds) {
            assert!(
                e.max <= b.max && e.median <= b.median && e.p99 <= b.p99,
                "K={k}: {e:?} vs {b:?}"
            );
        }
    }
    // U[0,1), K = 4096: a kernel that never promotes errs far beyond the bound of one that
    // promotes every 128 (column 2)
    let (_, _, errs) = r.rows.iter().find(|(_, k, _)| *k == 4096).unwrap();
    let (_, _, bounds) = r.bounds.iter().find(|(_, k, _)| *k == 4096).unwrap();
    assert!(
        errs[0].median > 10.0 * bounds[2].max,
        "{:?} vs {:?}",
        errs[0],
        bounds[2]
    );
}
