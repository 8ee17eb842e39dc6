//! Multi-token prediction (V3 eqs. (21)–(25)) against the fixture generator's PyTorch oracle
//! (`fixtures/gen/gen_model.py::build_mtp`: transformers' `DeepseekV3DecoderLayer` and
//! `DeepseekV3RMSNorm`, torch ops for enorm/hnorm/concat/eh_proj/shared head), on the fixture
//! models that carry an MTP layer (manifest `models[*].mtp`).

mod common;

use std::path::PathBuf;

use ndarray::{concatenate, s, Array2, Axis};
use serde_json::Value;

use dsv3::model::checkpoint::Checkpoint;
use dsv3::model::forward::max_rel_diff;
use dsv3::registry::io::SafeFile;
use dsv3_reference::linear::{Linear, Precision, Weight};
use dsv3_reference::model::{AttnImpl, Ffn, MainHidden, Model};
use dsv3_reference::train::mtp_loss::{mtp_loss, mtp_module_loss};

use common::{dsv3, fixtures, read_matrix, LOGITS_REL_TOL};

/// A fixture model with an MTP layer and its oracle tensors.
struct MtpFixture {
    name: String,
    dir: PathBuf,
    tokens: Vec<usize>,
    oracle: SafeFile,
}

impl MtpFixture {
    fn logits(&self, name: &str) -> Array2<f32> {
        read_matrix(&self.oracle, name)
    }
}

fn mtp_fixtures() -> Vec<MtpFixture> {
    let m: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("manifest.json")).unwrap())
            .unwrap();
    let fx: Vec<MtpFixture> = m["models"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e.get("mtp").is_some())
        .map(|e| MtpFixture {
            name: e["name"].as_str().unwrap().to_string(),
            dir: fixtures().join(e["dir"].as_str().unwrap()),
            tokens: e["tokens"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect(),
            oracle: SafeFile::open(fixtures().join(e["oracle_file"].as_str().unwrap())).unwrap(),
        })
        .collect();
    assert!(fx.len() >= 2, "only {} MTP fixtures", fx.len());
    fx
}

fn mtp1(model: &Model, tokens: &[usize], run: Option<AttnImpl>, h0: MainHidden) -> Array2<f32> {
    let out = model.forward_mtp(tokens, run, Precision::F32, h0).unwrap();
    assert_eq!(out.mtp.len(), 1);
    out.mtp.into_iter().next().unwrap()
}

/// Module 1's logits of a naive prefill with `h^0` before the final norm (the default).
fn mtp1_naive(model: &Model, tokens: &[usize]) -> Array2<f32> {
    mtp1(model, tokens, Some(AttnImpl::Naive), MainHidden::default())
}

#[test]
fn mtp_logits_match_the_oracle_in_prefill_and_decode() {
    for f in &mtp_fixtures() {
        let ck = Checkpoint::open(&f.dir).unwrap();
        let model = ck.load(None).unwrap();
        // the checkpoint's MTP layer is a MoE block (layer ≥ first_k_dense_replace)
        assert!(matches!(model.mtp[0].block.ffn, Ffn::Moe(_)), "{}", f.name);
        for (h0, oracle) in [
            (MainHidden::BeforeFinalNorm, "mtp_logits"),
            (MainHidden::AfterFinalNorm, "mtp_logits_after_final_norm"),
        ] {
            let want = f.logits(oracle);
            assert_eq!(want.nrows(), f.tokens.len() - 1);
            let naive = mtp1(&model, &f.tokens, Some(AttnImpl::Naive), h0);
            let absorbed = mtp1(&model, &f.tokens, Some(AttnImpl::Absorbed), h0);
            let decode = mtp1(&model, &f.tokens, None, h0);
            // the same arithmetic per row: exact
            assert_eq!(absorbed, decode, "{} {h0:?}", f.name);
            let (a, b) = (max_rel_diff(&naive, &want), max_rel_diff(&decode, &want));
            println!(
                "{} {oracle}: max|Δ|/max|ref| prefill (naive MLA) {a:.3e}, prefill (absorbed) and decode {b:.3e}",
                f.name
            );
            assert!(
                a <= LOGITS_REL_TOL && b <= LOGITS_REL_TOL,
                "{}: {a:e} {b:e}",
                f.name
            );
        }
        // in FP8 too, decode and the absorbed prefill agree bit for bit (main and MTP logits)
        let fp8 = Precision::Fp8 {
            scale_fmt: ck.fp8_scale_fmt(),
        };
        let h0 = MainHidden::default();
        assert_eq!(
            model
                .forward_mtp(&f.tokens, Some(AttnImpl::Absorbed), fp8, h0)
                .unwrap(),
            model.forward_mtp(&f.tokens, None, fp8, h0).unwrap(),
            "{} fp8",
            f.name
        );
    }
}

/// `eh_proj` with its two column halves swapped: applying it to `[enorm(emb); hnorm(h)]` is the
/// released weight applied to `[hnorm(h); enorm(emb)]`, the paper's printed order.
fn swap_halves(l: &Linear) -> Linear<'static> {
    let w = l.weight.to_f32(false).unwrap();
    let d = w.nrows();
    let swapped = concatenate(Axis(1), &[w.slice(s![.., d..]), w.slice(s![.., ..d])]).unwrap();
    Linear::new(Weight::from_values(l.weight.name.clone(), swapped))
}

#[test]
fn mtp_concat_order_is_embedding_first() {
    for f in &mtp_fixtures() {
        let ck = Checkpoint::open(&f.dir).unwrap();
        let mut model = ck.load(None).unwrap();
        let (emb_first, hidden_first) =
            (f.logits("mtp_logits"), f.logits("mtp_logits_hidden_first"));
        let ours = mtp1_naive(&model, &f.tokens);
        model.mtp[0].eh_proj = swap_halves(&model.mtp[0].eh_proj);
        let swapped = mtp1_naive(&model, &f.tokens);
        let (a, b) = (
            max_rel_diff(&ours, &emb_first),
            max_rel_diff(&swapped, &hidden_first),
        );
        let (x, y) = (
            max_rel_diff(&ours, &hidden_first),
            max_rel_diff(&swapped, &emb_first),
        );
        println!(
            "{}: embedding-first vs oracle {a:.3e}; swapped halves vs the oracle's [h; emb] {b:.3e}; crossed: {x:.3e}, {y:.3e}",
            f.name
        );
        // each reading matches its own oracle, and the two readings are far apart
        assert!(a <= LOGITS_REL_TOL && b <= LOGITS_REL_TOL, "{a:e} {b:e}");
        assert!(x > 1e-2 && y > 1e-2, "{x:e} {y:e}");
    }
}

#[test]
fn mtp_loss_from_dsv3_logits_equals_the_oracle_loss() {
    for f in &mtp_fixtures() {
        let ck = Checkpoint::open(&f.dir).unwrap();
        let model = ck.load(None).unwrap();
        let n = f.tokens.len();
        let ours = mtp1_naive(&model, &f.tokens);
        // eq. (24) with the input t_1..t_T (T = n − 1) and t_{T+1} = the last token: by
        // causality, module 1's rows 0..T−1 on all n tokens are its logits on the first T
        let rows = ours.slice(s![..n - 2, ..]);
        let ids: Vec<u32> = f.tokens.iter().map(|&t| t as u32).collect();
        let l1 = mtp_module_loss(rows, &ids, 1).unwrap();
        let want = f.oracle.tensor("mtp_loss").unwrap().value(0);
        // each term lse(x) − x_t moves by at most 2·max_j|Δx_j| (lse is 1-Lipschitz in the
        // max norm); T − 1 terms divided by T; plus f64 rounding of both sums
        let oracle_rows = f.logits("mtp_logits").slice(s![..n - 2, ..]).to_owned();
        let dmax = rows
            .iter()
            .zip(oracle_rows.iter())
            .fold(0f64, |m, (a, b)| m.max(f64::from(*a - *b).abs()));
        let bound = 2.0 * dmax * (n - 2) as f64 / (n - 1) as f64 + 1e-12 * want.abs();
        println!(
            "{}: L^1_MTP dsv3 {l1:.9}, oracle {want:.9}, |Δ| {:.2e} ≤ {bound:.2e}",
            f.name,
            (l1 - want).abs()
        );
        assert!((l1 - want).abs() <= bound);
        // eq. (25) with D = 1: λ·L^1 (λ = 0.3 for the first 10T tokens, 0.1 after)
        for lambda in [0.3, 0.1] {
            let total = mtp_loss(&[l1], lambda).unwrap();
            assert!((total - lambda * want).abs() <= lambda * bound + 1e-15);
        }
    }
}

#[test]
fn mtp_reads_the_layer_s_own_embedding_and_head_copies() {
    let f = &mtp_fixtures()[0];
    let ck = Checkpoint::open(&f.dir).unwrap();
    let mut model = ck.load(None).unwrap();
    let m = &model.mtp[0];
    assert!(
        m.embed.is_some() && m.shared_head.is_some(),
        "the release stores both copies"
    );
    let base = mtp1_naive(&model, &f.tokens);
    // without the copies the main embedding and head stand in: the copies are equal to them
    // in the fixture (as in the release), so nothing changes
    let (embed, head) = (
        model.mtp[0].embed.take().unwrap(),
        model.mtp[0].shared_head.take().unwrap(),
    );
    assert_eq!(base, mtp1_naive(&model, &f.tokens));
    // a different copy is used when present (rows reversed: RMSNorm would undo a scaling)
    let reversed = embed.to_f32(false).unwrap().slice(s![..;-1, ..]).to_owned();
    model.mtp[0].embed = Some(Weight::from_values("reversed", reversed));
    let e = mtp1_naive(&model, &f.tokens);
    assert!(max_rel_diff(&e, &base) > 1e-3);
    model.mtp[0].embed = None;
    let neg = head.weight.to_f32(false).unwrap().mapv(|v| -v);
    model.mtp[0].shared_head = Some(Linear::new(Weight::from_values("neg", neg)));
    let h = mtp1_naive(&model, &f.tokens);
    assert_eq!(h, base.mapv(|v| -v));
}

#[test]
fn mtp_needs_more_tokens_than_its_depth_and_its_own_layer_index() {
    let f = &mtp_fixtures()[0];
    let ck = Checkpoint::open(&f.dir).unwrap();
    let mut model = ck.load(None).unwrap();
    let e = model
        .forward_mtp(&f.tokens[..1], None, Precision::F32, MainHidden::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("tokens") && e.contains("T > 1"), "{e}");
    model.mtp[0].layer += 1;
    let e = model
        .forward_mtp(&f.tokens, None, Precision::F32, MainHidden::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("MTP module 1"), "{e}");
}

#[test]
fn cli_forward_mtp_writes_mtp_logits_and_prints_the_loss() {
    let dir = std::env::temp_dir().join(format!("dsv3-mtp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in &mtp_fixtures() {
        let tokens: Vec<String> = f.tokens.iter().map(|t| t.to_string()).collect();
        let tokens = tokens.join(",");
        let want = f.logits("mtp_logits");
        let loss = f.oracle.tensor("mtp_loss").unwrap().value(0);
        for mode in [&[][..], &["--decode"][..]] {
            let out = dir.join("mtp.safetensors");
            let mut args = vec![
                "forward",
                "--model",
                f.dir.to_str().unwrap(),
                "--tokens",
                &tokens,
                "--mtp",
                "--out",
                out.to_str().unwrap(),
            ];
            args.extend_from_slice(mode);
            let (code, err) = dsv3(&args);
            assert_eq!(code, 0, "{err}");
            let got = read_matrix(&SafeFile::open(&out).unwrap(), "mtp_logits");
            assert_eq!(got.dim(), (f.tokens.len() - 1, want.ncols()));
            let r = max_rel_diff(&got, &want);
            println!("dsv3 forward --mtp {mode:?} on {}: {r:.3e}", f.name);
            assert!(r <= LOGITS_REL_TOL);
            // the printed L^1 (6 decimals: ±5e-7) agrees with the oracle's within the rounding
            // and the logits-derived bound of `mtp_loss_from_dsv3_logits_equals_the_oracle_loss`
            // (≤ 1e-6 relative on these fixtures)
            let line = err
                .lines()
                .find(|l| l.starts_with("L^1_MTP = "))
                .unwrap_or_else(|| panic!("{err}"));
            let printed: f64 = line["L^1_MTP = ".len()..]
                .split_whitespace()
                .next()
                .unwrap()
                .parse()
                .unwrap();
            assert!(
                (printed - loss).abs() <= 5e-7 + 1e-6 * loss,
                "{line} vs {loss}"
            );
            assert!(err.contains("row 0: t[1] = "), "{err}");
        }
        // lower precisions print the MTP logits' distance to f32
        let (code, err) = dsv3(&[
            "forward",
            "--model",
            f.dir.to_str().unwrap(),
            "--tokens",
            &tokens,
            "--mtp",
            "--precision",
            "fp8",
        ]);
        assert_eq!(code, 0, "{err}");
        assert!(
            err.contains("fp8 vs f32, MTP module 1: max|Δ|/max|ref| = "),
            "{err}"
        );
    }
    // a model without MTP tensors, and too few tokens: exit 2 naming the problem
    for (model, tokens, says) in [
        (
            "plain_rope_no_qlora",
            "1,2,3",
            &["no MTP module", "model.layers.3"][..],
        ),
        ("v3_yarn_qlora", "7", &["T > 1"][..]),
    ] {
        let dir = fixtures().join("models").join(model);
        let args = [
            "forward",
            "--model",
            dir.to_str().unwrap(),
            "--tokens",
            tokens,
            "--mtp",
        ];
        let (code, err) = dsv3(&args);
        assert_eq!(code, 2, "{err}");
        assert!(says.iter().all(|s| err.contains(s)), "{err}");
    }
    std::fs::remove_dir_all(&dir).ok();
}
