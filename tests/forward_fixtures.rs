//! The model forward against transformers' `DeepseekV3ForCausalLM` on the committed tiny
//! checkpoints (fixtures/models, listed under "models" in fixtures/manifest.json): prefill with
//! both MLA forms and token-by-token decode through the latent cache must reproduce the oracle
//! logits to max|Δ|/max|ref| ≤ 1e-4.

mod common;

use std::path::{Path, PathBuf};

use ndarray::Array2;
use serde_json::Value;

use dsv3::model::checkpoint::Checkpoint;
use dsv3::model::forward::max_rel_diff;
use dsv3::registry::io::SafeFile;
use dsv3_reference::linear::Precision;
use dsv3_reference::model::AttnImpl;
use dsv3_reference::moe::{ScoringFunc, TopkMethod};

use common::{dsv3, fixtures, read_matrix, LOGITS_REL_TOL};

struct Fixture {
    name: String,
    dir: PathBuf,
    tokens: Vec<usize>,
    logits: Array2<f32>,
}

fn model_fixtures() -> Vec<Fixture> {
    let m: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("manifest.json")).unwrap())
            .unwrap();
    m["models"]
        .as_array()
        .expect("manifest lists model fixtures")
        .iter()
        .map(|e| {
            let oracle =
                SafeFile::open(fixtures().join(e["oracle_file"].as_str().unwrap())).unwrap();
            let logits = read_matrix(&oracle, "logits");
            let tok = oracle.tensor("tokens").unwrap();
            let tokens: Vec<usize> = (0..tok.numel()).map(|i| tok.value(i) as usize).collect();
            let listed: Vec<usize> = e["tokens"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as usize)
                .collect();
            assert_eq!(tokens, listed);
            Fixture {
                name: e["name"].as_str().unwrap().to_string(),
                dir: fixtures().join(e["dir"].as_str().unwrap()),
                tokens,
                logits,
            }
        })
        .collect()
}

#[test]
fn every_model_fixture_matches_transformers_logits_in_prefill_and_decode() {
    let fx = model_fixtures();
    assert!(fx.len() >= 5, "only {} model fixtures", fx.len());
    for f in &fx {
        let ck = Checkpoint::open(&f.dir).unwrap();
        let model = ck.load(None).unwrap();
        let naive = model
            .forward(&f.tokens, AttnImpl::Naive, Precision::F32)
            .unwrap();
        let absorbed = model
            .forward(&f.tokens, AttnImpl::Absorbed, Precision::F32)
            .unwrap();
        let decode = model.decode(&f.tokens, Precision::F32).unwrap();
        let (a, b, c) = (
            max_rel_diff(&naive, &f.logits),
            max_rel_diff(&absorbed, &f.logits),
            max_rel_diff(&decode, &f.logits),
        );
        println!(
            "{}: max|Δ|/max|ref| prefill (naive MLA) {a:.3e}, prefill (absorbed MLA) {b:.3e}, decode {c:.3e}",
            f.name
        );
        for (what, r) in [("prefill naive", a), ("prefill absorbed", b), ("decode", c)] {
            assert!(r <= LOGITS_REL_TOL, "{} {what}: {r:e}", f.name);
        }
    }
}

#[test]
fn model_fixtures_cover_every_config_branch_the_issue_names() {
    let cks: Vec<(String, Checkpoint)> = model_fixtures()
        .into_iter()
        .map(|f| (f.name, Checkpoint::open(&f.dir).unwrap()))
        .collect();
    let any = |p: &dyn Fn(&Checkpoint) -> bool| cks.iter().any(|(_, c)| p(c));
    assert!(any(&|c| c.config.mla.q_lora_rank.is_some()));
    assert!(any(&|c| c.config.mla.q_lora_rank.is_none()));
    assert!(any(&|c| c.config.rope.yarn.is_some()));
    assert!(any(&|c| c.config.rope.yarn.is_none()));
    assert!(any(&|c| !c.config.rope.interleaved));
    assert!(any(&|c| c.config.gate.n_group == 1));
    assert!(any(
        &|c| c.config.gate.n_group == 8 && c.config.gate.topk_group == 4
    ));
    assert!(any(
        &|c| c.config.gate.n_group == 2 && c.config.gate.topk_group == 1
    ));
    assert!(any(&|c| c.config.gate.scoring_func == ScoringFunc::Softmax));
    assert!(any(
        &|c| c.config.gate.topk_method == TopkMethod::GroupLimitedGreedy
    ));
    assert!(any(&|c| !c.config.gate.norm_topk_prob));
    assert!(any(&|c| c.config.first_k_dense_replace == 0));
    assert!(any(&|c| c.config.first_k_dense_replace > 0
        && c.config.first_k_dense_replace < c.config.num_hidden_layers));
    assert!(any(&|c| c.config.attention_bias));
    assert!(any(&|c| c.fp8.is_some()));
    assert!(any(&|c| c.index.is_some()));
    // FP8 with partial edge blocks, and a non-zero correction bias
    let fp8 = &cks.iter().find(|(_, c)| c.fp8.is_some()).unwrap().1;
    let block = fp8.fp8.as_ref().unwrap().block;
    assert!(fp8.config.hidden_size % block != 0);
    let model = fp8.load(None).unwrap();
    assert!(model.blocks[0].attn.wkv_a.weight.is_fp8());
    match &model.blocks[1].ffn {
        dsv3_reference::model::Ffn::Moe(moe) => {
            assert!(moe
                .experts
                .iter()
                .all(|e| e.w1.weight.is_fp8() && e.w2.weight.is_fp8()));
            assert!(!moe.gate.weight.is_fp8(), "the router stays BF16");
        }
        _ => panic!("layer 1 is MoE"),
    }
    assert!(!model.embed.is_fp8() && !model.head.weight.is_fp8());
    // its MTP layer: an FP8 MoE block, eh_proj in BF16 (as layer 61 of the release)
    let mtp = &model.mtp[0];
    assert!(mtp.block.attn.wkv_a.weight.is_fp8() && !mtp.eh_proj.weight.is_fp8());
    let v3 = &cks.iter().find(|(n, _)| n == "v3_yarn_qlora").unwrap().1;
    let m = v3.load(None).unwrap();
    let bias = match &m.blocks[1].ffn {
        dsv3_reference::model::Ffn::Moe(moe) => moe.bias.clone().unwrap(),
        _ => panic!("layer 1 is MoE"),
    };
    assert!(bias.iter().any(|b| *b != 0.0));
}

#[test]
fn mtp_layer_is_loaded_and_not_run() {
    let dir = fixtures().join("models/v3_yarn_qlora");
    let ck = Checkpoint::open(&dir).unwrap();
    let mut model = ck.load(None).unwrap();
    assert_eq!(model.mtp.len(), 1);
    assert_eq!(model.mtp[0].layer, 3);
    assert!(model.mtp[0].shared_head.is_some() && model.mtp[0].embed.is_some());
    assert!(ck.unused().is_empty(), "unused: {:?}", ck.unused());
    let tokens = [3, 1, 4];
    let with = model
        .forward(&tokens, AttnImpl::Naive, Precision::F32)
        .unwrap();
    model.mtp.clear();
    let without = model
        .forward(&tokens, AttnImpl::Naive, Precision::F32)
        .unwrap();
    assert_eq!(with, without);
}

/// `--precision fp8` with the checkpoint's activation scale format.
fn fp8(ck: &Checkpoint) -> Precision {
    Precision::Fp8 {
        scale_fmt: ck.fp8_scale_fmt(),
    }
}

/// E4M3 keeps 4 significant bits (unit roundoff 2^-4), bf16 8 (2^-8). The bf16 run rounds the
/// operands of the same Linears (and, for FP8 checkpoints, the weights the FP8 run uses as
/// stored); to first order the logits' error is linear in the operands' relative errors, so
/// with the same expert selection the FP8 distance to f32 stays below (2^-4/2^-8)·d_bf16.
/// A changed selection is a discontinuity outside this argument (and outside any bound).
const FP8_OVER_BF16: f64 = 16.0;

#[test]
fn fp8_precision_stays_within_16_times_the_bf16_distance_while_routing_is_unchanged() {
    let mut checked = Vec::new();
    for f in &model_fixtures() {
        let ck = Checkpoint::open(&f.dir).unwrap();
        let model = ck.load(None).unwrap();
        let run = |p| {
            model
                .forward(&f.tokens, AttnImpl::Naive, p)
                .unwrap_or_else(|e| panic!("{} {p:?}: {e}", f.name))
        };
        let (l32, l16, l8) = (run(Precision::F32), run(Precision::Bf16), run(fp8(&ck)));
        let (d16, d8) = (max_rel_diff(&l16, &l32), max_rel_diff(&l8, &l32));
        let reference = model
            .expert_selection(&f.tokens, Precision::F32, None)
            .unwrap();
        let low = model.expert_selection(&f.tokens, fp8(&ck), None).unwrap();
        let changed: usize = reference
            .iter()
            .zip(&low)
            .map(|((_, a), (_, b))| {
                a.rows()
                    .into_iter()
                    .zip(b.rows())
                    .filter(|(x, y)| x != y)
                    .count()
            })
            .sum();
        println!(
            "{}: fp8 vs f32 {d8:.3e}, bf16 vs f32 {d16:.3e}, ratio {:.1}, {changed} expert selection(s) changed by fp8",
            f.name,
            d8 / d16
        );
        assert!(
            d8 > d16,
            "{}: fp8 {d8:e} not further from f32 than bf16 {d16:e}",
            f.name
        );
        if changed == 0 {
            assert!(d8 <= FP8_OVER_BF16 * d16, "{}: {d8:e} > 16·{d16:e}", f.name);
            checked.push(f.name.clone());
        }
    }
    // the FP8 checkpoint (codes used as stored) and the V3-shaped one keep their routing
    for name in ["fp8_sharded", "v3_yarn_qlora"] {
        assert!(
            checked.iter().any(|c| c == name),
            "{name}: routing changed under fp8"
        );
    }
}

#[test]
fn fp8_linear_of_a_checkpoint_weight_is_fp8_gemm_of_act_quant_and_its_stored_codes() {
    use dsv3_reference::fp8::{act_quant, fp8_gemm, Accumulation, ScaleFmt};
    use dsv3_reference::linear::linear;
    use dsv3_reference::numeric::bf16_round_f32;
    use ndarray::s;
    let dir = fixtures().join("models/fp8_sharded");
    let ck = Checkpoint::open(&dir).unwrap();
    let model = ck.load(None).unwrap();
    let expert = match &model.blocks[1].ffn {
        dsv3_reference::model::Ffn::Moe(moe) => &moe.experts[5].w2,
        _ => panic!("layer 1 is MoE"),
    };
    // K = 144 (a partial K-block of 16), K = 32 (one partial block), K = 136
    let wq_a = match &model.blocks[0].attn.q {
        dsv3_reference::mla::QProj::Lora { wq_a, .. } => wq_a,
        _ => panic!("q_lora"),
    };
    let cases = [
        ("model.layers.0.self_attn.q_a_proj.weight", wq_a),
        ("model.layers.1.mlp.experts.5.down_proj.weight", expert),
    ];
    let shards: Vec<SafeFile> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .map(|p| SafeFile::open(p).unwrap())
        .collect();
    let tensor = |name: &str| {
        shards
            .iter()
            .find_map(|f| f.tensor(name).ok())
            .unwrap_or_else(|| panic!("{name} in no shard"))
    };
    for scale_fmt in [ScaleFmt::F32, ScaleFmt::Ue8m0] {
        for (name, l) in cases {
            // the file's codes and scales, read without the loader
            let codes = tensor(name);
            let (n, k) = (codes.shape[0], codes.shape[1]);
            let scales = tensor(&format!("{name}_scale_inv"));
            let scales = Array2::from_shape_vec(
                (scales.shape[0], scales.shape[1]),
                scales.to_f32().unwrap(),
            )
            .unwrap();
            let x = Array2::from_shape_fn((3, k), |(m, c)| {
                ((m * 31 + c * 7) % 23) as f32 * 0.173 - 1.9 + (c as f32).sin()
            });
            // zero-padding K to a multiple of 128 makes it OFF's act_quant + Triton GEMM input
            let kp = k.div_ceil(128) * 128;
            let mut xp = Array2::<f32>::zeros((3, kp));
            xp.slice_mut(s![.., ..k]).assign(&x.mapv(bf16_round_f32));
            let mut wp = Array2::<u8>::zeros((n, kp));
            for r in 0..n {
                for c in 0..k {
                    wp[[r, c]] = codes.data[r * k + c];
                }
            }
            let xq = act_quant(xp.view(), 128, scale_fmt).unwrap();
            let want = fp8_gemm(
                xq.y.view(),
                xq.s.view(),
                wp.view(),
                scales.view(),
                128,
                &Accumulation::Exact,
            )
            .unwrap()
            .mapv(bf16_round_f32);
            let got = linear(x.view(), l, Precision::Fp8 { scale_fmt }).unwrap();
            assert_eq!(got, want, "{name} {scale_fmt:?}");
        }
    }
}

#[test]
fn fp8_precision_takes_v3_1_ue8m0_activation_scales_from_the_config() {
    // fp8_sharded with V3.1's quantization_config.scale_fmt = "ue8m0"
    let dir = copy_of_fixture_model("fp8_sharded", "ue8m0");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    config["quantization_config"]["scale_fmt"] = Value::from("ue8m0");
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let ck = Checkpoint::open(&dir).unwrap();
    assert_eq!(ck.fp8_scale_fmt(), dsv3_reference::fp8::ScaleFmt::Ue8m0);
    let model = ck.load(None).unwrap();
    let tokens = [3, 1, 4, 1];
    let ue8m0 = model.forward(&tokens, AttnImpl::Naive, fp8(&ck)).unwrap();
    let f32_scales = model
        .forward(
            &tokens,
            AttnImpl::Naive,
            Precision::Fp8 {
                scale_fmt: dsv3_reference::fp8::ScaleFmt::F32,
            },
        )
        .unwrap();
    assert_ne!(ue8m0, f32_scales);
    let (code, err) = dsv3(&[
        "forward",
        "--model",
        dir.to_str().unwrap(),
        "--tokens",
        "3,1,4,1",
        "--precision",
        "fp8",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("precision fp8 (ue8m0 scales)"), "{err}");
    printed_distance(&err, "fp8 (ue8m0 scales)");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn decode_equals_the_absorbed_prefill_bit_for_bit_in_every_precision() {
    // Prefill with the absorbed MLA and token-by-token decode run the same arithmetic per token
    // (row-wise Linears, act_quant tiles within a token, attention over the same keys in the
    // same order), so they agree exactly, FP8 included. The naive form rounds elsewhere in
    // bf16/fp8 (kv_b_proj's per-head outputs vs the absorbed products): printed, not equal.
    for f in &model_fixtures() {
        let ck = Checkpoint::open(&f.dir).unwrap();
        let model = ck.load(None).unwrap();
        for p in [Precision::F32, Precision::Bf16, fp8(&ck)] {
            let absorbed = model.forward(&f.tokens, AttnImpl::Absorbed, p).unwrap();
            let decode = model.decode(&f.tokens, p).unwrap();
            assert_eq!(absorbed, decode, "{} {p:?}", f.name);
            let naive = model.forward(&f.tokens, AttnImpl::Naive, p).unwrap();
            println!(
                "{} {p:?}: naive prefill vs decode max|Δ|/max|ref| = {:.3e}",
                f.name,
                max_rel_diff(&naive, &decode)
            );
        }
    }
}

/// A temporary copy of `fixtures/models/<name>` to break or edit.
fn copy_of_fixture_model(name: &str, tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dsv3-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(fixtures().join("models").join(name)).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
    }
    dir
}

#[test]
fn cli_forward_writes_logits_that_match_the_oracle_in_prefill_and_decode() {
    let dir = std::env::temp_dir().join(format!("dsv3-forward-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in model_fixtures().iter().filter(|f| f.name == "fp8_sharded") {
        let tokens: Vec<String> = f.tokens.iter().map(|t| t.to_string()).collect();
        let tokens = tokens.join(",");
        for mode in [&[][..], &["--decode"][..], &["--attn", "absorbed"][..]] {
            let out = dir.join("logits.safetensors");
            let mut args = vec![
                "forward",
                "--model",
                f.dir.to_str().unwrap(),
                "--tokens",
                &tokens,
                "--out",
                out.to_str().unwrap(),
            ];
            args.extend_from_slice(mode);
            let (code, err) = dsv3(&args);
            assert_eq!(code, 0, "{err}");
            let t = SafeFile::open(&out).unwrap().tensor("logits").unwrap();
            assert_eq!(t.dtype, dsv3::registry::tensor::DType::F32);
            assert_eq!(t.shape, vec![f.tokens.len(), f.logits.ncols()]);
            let got =
                Array2::from_shape_vec((t.shape[0], t.shape[1]), t.to_f32().unwrap()).unwrap();
            let r = max_rel_diff(&got, &f.logits);
            println!("dsv3 forward {mode:?} on {}: {r:.3e}", f.name);
            assert!(r <= LOGITS_REL_TOL);
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// The number after `<label> vs f32: max|Δ|/max|ref| = ` (or `<label> max|Δ|/max|ref| = `
/// when the label ends in a colon) in a `dsv3 forward` log.
fn printed_distance(log: &str, label: &str) -> f64 {
    let key = if label.ends_with(':') {
        format!("{label} max|Δ|/max|ref| = ")
    } else {
        format!("{label} vs f32: max|Δ|/max|ref| = ")
    };
    let line = log
        .lines()
        .find(|l| l.starts_with(&key))
        .unwrap_or_else(|| panic!("no `{key}` in\n{log}"));
    line[key.len()..]
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

fn read_logits(path: &Path, name: &str) -> Array2<f32> {
    read_matrix(&SafeFile::open(path).unwrap(), name)
}

#[test]
fn cli_forward_fp8_reports_its_distance_to_f32_within_the_bound() {
    let f = model_fixtures()
        .into_iter()
        .find(|f| f.name == "fp8_sharded")
        .unwrap();
    let dir = std::env::temp_dir().join(format!("dsv3-forward-fp8-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let tokens: Vec<String> = f.tokens.iter().map(|t| t.to_string()).collect();
    let tokens = tokens.join(",");
    let run = |precision: &str, extra: &[&str], out: &Path| {
        let mut args = vec![
            "forward",
            "--model",
            f.dir.to_str().unwrap(),
            "--tokens",
            &tokens,
            "--precision",
            precision,
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let (code, err) = dsv3(&args);
        assert_eq!(code, 0, "{err}");
        err
    };
    let (p32, p16, p8) = (
        dir.join("f32.safetensors"),
        dir.join("bf16.safetensors"),
        dir.join("fp8.safetensors"),
    );
    // with its MTP module: the same bound holds for the MTP logits (the FP8 MTP block's
    // routing is in the selection count)
    run("f32", &["--mtp"], &p32);
    let log16 = run("bf16", &["--mtp"], &p16);
    let log = run("fp8", &["--mtp"], &p8);
    let (d16, d8) = (
        printed_distance(&log16, "bf16"),
        printed_distance(&log, "fp8"),
    );
    let (m16, m8) = (
        printed_distance(&log16, "bf16 vs f32, MTP module 1:"),
        printed_distance(&log, "fp8 vs f32, MTP module 1:"),
    );
    println!("dsv3 forward --precision fp8 --mtp on fp8_sharded: {d8:.3e}, MTP {m8:.3e} (bf16: {d16:.3e}, MTP {m16:.3e})");
    assert!(
        m8 > m16 && m8 <= FP8_OVER_BF16 * m16,
        "{m8:e} vs bf16 {m16:e}"
    );
    // the printed number is the distance of the written logits to the f32 run's
    let recomputed = max_rel_diff(&read_logits(&p8, "logits"), &read_logits(&p32, "logits"));
    assert!(
        (d8 - recomputed).abs() <= 1e-3 * recomputed,
        "{d8} vs {recomputed}"
    );
    assert!(
        log.contains("expert selection vs f32 (naive prefill): 0 of "),
        "{log}"
    );
    assert!(
        d8 > d16 && d8 <= FP8_OVER_BF16 * d16,
        "{d8:e} vs bf16 {d16:e}"
    );
    // decode and the absorbed prefill write the same bits
    let (pd, pa) = (dir.join("dec.safetensors"), dir.join("abs.safetensors"));
    let dd = printed_distance(&run("fp8", &["--decode"], &pd), "fp8");
    run("fp8", &["--attn", "absorbed"], &pa);
    assert_eq!(read_logits(&pd, "logits"), read_logits(&pa, "logits"));
    let dd16 = printed_distance(&run("bf16", &["--decode"], &p16), "bf16");
    println!("dsv3 forward --precision fp8 --decode on fp8_sharded: {dd:.3e} (bf16: {dd16:.3e})");
    assert!(
        dd > dd16 && dd <= FP8_OVER_BF16 * dd16,
        "{dd:e} vs bf16 {dd16:e}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn layers_option_reads_only_the_shards_it_needs() {
    let dir = copy_of_fixture_model("fp8_sharded", "layers");
    // the middle shard holds only layer 1's experts: break it
    let broken = dir.join("model-00002-of-00003.safetensors");
    std::fs::write(&broken, b"not a safetensors file").unwrap();
    let ck = Checkpoint::open(&dir).unwrap();
    let model = ck.load(Some(&[0])).unwrap();
    assert_eq!(model.blocks.len(), 1);
    assert_eq!(ck.opened_shards().len(), 2, "{:?}", ck.opened_shards());
    model
        .forward(&[1, 2], AttnImpl::Naive, Precision::F32)
        .unwrap();
    let (code, err) = dsv3(&[
        "forward",
        "--model",
        dir.to_str().unwrap(),
        "--tokens",
        "1,2",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("model-00002-of-00003.safetensors"), "{err}");
    let (code, err) = dsv3(&[
        "forward",
        "--model",
        dir.to_str().unwrap(),
        "--tokens",
        "1,2",
        "--layers",
        "0",
    ]);
    assert_eq!(code, 0, "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
