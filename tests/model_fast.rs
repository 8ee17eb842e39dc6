//! The forward's fast Linears (`src/model/fast_linear.rs`) are bit-identical to the readable
//! `dsv3_reference::linear::linear`: every stored weight form (in-memory f32, F32 and BF16 bytes,
//! FP8 codes with block scales, subnormal and ±448 codes, partial edge blocks), every precision
//! (f32, bf16, fp8 with f32 and ue8m0 activation scales), with and without bias, one to nine
//! tokens, output features crossing the 16-lane strips; the same errors for a NaN code and a
//! non-positive scale; and whole forwards (prefill with both MLA forms, decode through the
//! latent cache, the MTP modules) on every committed model fixture in every precision.

mod common;

use std::borrow::Cow;

use half::bf16;
use ndarray::Array2;
use serde_json::Value;

use dsv3::model::checkpoint::Checkpoint;
use dsv3::model::fast_linear;
use dsv3::model::forward::logits;
use dsv3_reference::fp8::ScaleFmt;
use dsv3_reference::linear::{linear, Linear, Precision, Stored, Weight};
use dsv3_reference::model::{AttnImpl, MainHidden};

use common::{dsv3, fixtures, s, scratch, Stream};

/// A value with a wide spread of magnitudes and both signs.
fn value(s: &mut Stream) -> f32 {
    let m = (s.below(1 << 20) as f32 / (1 << 20) as f32 - 0.5) * 4.0;
    m * 2f32.powi(s.below(12) as i32 - 6)
}

const PRECISIONS: [Precision; 4] = [
    Precision::F32,
    Precision::Bf16,
    Precision::Fp8 {
        scale_fmt: ScaleFmt::F32,
    },
    Precision::Fp8 {
        scale_fmt: ScaleFmt::Ue8m0,
    },
];

/// The weight `[n, k]` in `form` (0: values, 1: F32 bytes, 2: BF16 bytes, 3: FP8, block `b`).
fn weight(s: &mut Stream, form: u64, n: usize, k: usize, b: usize) -> Weight<'static> {
    let values: Vec<f32> = (0..n * k).map(|_| value(s)).collect();
    let stored = match form {
        0 => Stored::Values(Array2::from_shape_vec((n, k), values).unwrap()),
        1 => Stored::F32(Cow::Owned(
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        )),
        2 => Stored::Bf16(Cow::Owned(
            values
                .iter()
                .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
                .collect(),
        )),
        _ => {
            // every finite code, subnormals and ±448 among them; scales over many binades
            let codes: Vec<u8> = (0..n * k)
                .map(|_| match s.below(8) {
                    0 => s.below(8) as u8 | ((s.below(2) as u8) << 7),
                    1 => [0x7E, 0xFE][s.below(2) as usize],
                    _ => {
                        let c = s.below(256) as u8;
                        if c & 0x7F == 0x7F {
                            0x00
                        } else {
                            c
                        }
                    }
                })
                .collect();
            let scale_inv = Array2::from_shape_fn((n.div_ceil(b), k.div_ceil(b)), |_| {
                (1.0 + s.below(1000) as f32 / 999.0) * 2f32.powi(s.below(30) as i32 - 20)
            });
            Stored::Fp8 {
                codes: Cow::Owned(codes),
                scale_inv,
                block: b,
            }
        }
    };
    Weight {
        name: "w".into(),
        rows: n,
        cols: k,
        stored,
    }
}

fn bits(y: &Array2<f32>) -> Vec<u32> {
    y.iter().map(|v| v.to_bits()).collect()
}

#[test]
fn fast_linears_are_bit_identical_to_the_readable_loops() {
    let mut s = Stream(0x5EED_1234);
    let mut cases = 0;
    for form in 0..4 {
        for &(m, n, k, b) in &[
            (1usize, 1usize, 1usize, 128usize),
            (3, 17, 130, 128),
            (9, 40, 300, 128),
            (5, 33, 256, 64),
            (2, 100, 200, 128),
            (2, 5, 0, 128),
        ] {
            for with_bias in [false, true] {
                let mut l = Linear::new(weight(&mut s, form, n, k, b));
                if with_bias {
                    l.bias = Some((0..n).map(|_| value(&mut s)).collect());
                }
                let x = Array2::from_shape_fn((m, k), |_| value(&mut s));
                for p in PRECISIONS {
                    let readable = linear(x.view(), &l, p).unwrap();
                    let fast = fast_linear::install(|| linear(x.view(), &l, p)).unwrap();
                    assert_eq!(
                        bits(&fast),
                        bits(&readable),
                        "form {form} M={m} N={n} K={k} B={b} bias {with_bias} {p:?}"
                    );
                    cases += 1;
                }
            }
        }
    }
    assert_eq!(cases, 4 * 6 * 2 * 4);
}

#[test]
fn fast_linears_leave_bad_weights_to_the_readable_errors() {
    let mut s = Stream(77);
    let x = Array2::from_shape_fn((2, 130), |_| value(&mut s));
    for (bad, expected) in [
        ("nan code", "NaN"),
        ("zero scale", "finite and positive"),
        ("short bias", "bias"),
        ("wrong k", "in-features"),
    ] {
        let mut l = Linear::new(weight(&mut s, 3, 20, 130, 128));
        let mut x = x.clone();
        match bad {
            "nan code" => {
                if let Stored::Fp8 { codes, .. } = &mut l.weight.stored {
                    codes.to_mut()[19 * 130 + 129] = 0xFF;
                }
            }
            "zero scale" => {
                if let Stored::Fp8 { scale_inv, .. } = &mut l.weight.stored {
                    scale_inv[[0, 1]] = 0.0;
                }
            }
            "short bias" => l.bias = Some(vec![1.0; 3]),
            _ => x = Array2::zeros((2, 129)),
        }
        for p in PRECISIONS {
            let readable = linear(x.view(), &l, p).map_err(|e| e.to_string());
            let fast = fast_linear::install(|| linear(x.view(), &l, p)).map_err(|e| e.to_string());
            let Err(message) = readable else {
                panic!("{bad} {p:?}: the readable path accepts it");
            };
            assert!(message.contains(expected), "{bad} {p:?}: {message}");
            assert_eq!(fast.map(|y| bits(&y)), Err(message), "{bad} {p:?}");
        }
    }
}

#[test]
fn fast_forwards_are_bit_identical_on_every_model_fixture() {
    let m: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("manifest.json")).unwrap())
            .unwrap();
    let models = m["models"].as_array().expect("model fixtures");
    assert!(models.len() >= 5);
    let mut runs = 0;
    for e in models {
        let ck = Checkpoint::open(fixtures().join(e["dir"].as_str().unwrap())).unwrap();
        let model = ck.load(None).unwrap();
        let tokens: Vec<usize> = e["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let fp8 = Precision::Fp8 {
            scale_fmt: ck.fp8_scale_fmt(),
        };
        let mtp = (!model.mtp.is_empty()).then_some(MainHidden::BeforeFinalNorm);
        for precision in [Precision::F32, Precision::Bf16, fp8] {
            for (decode, attn) in [
                (false, AttnImpl::Naive),
                (false, AttnImpl::Absorbed),
                (true, AttnImpl::Naive),
            ] {
                let readable = logits(&model, &tokens, decode, attn, precision, mtp).unwrap();
                let fast =
                    fast_linear::install(|| logits(&model, &tokens, decode, attn, precision, mtp))
                        .unwrap();
                let what = format!("{} decode {decode} {attn:?} {precision:?}", e["name"]);
                assert_eq!(bits(&fast.main), bits(&readable.main), "{what}");
                assert_eq!(fast.mtp.len(), readable.mtp.len());
                for (f, r) in fast.mtp.iter().zip(&readable.mtp) {
                    assert_eq!(bits(f), bits(r), "{what} MTP");
                }
                runs += 1;
            }
        }
    }
    assert_eq!(runs, models.len() * 9);
}

/// `dsv3 forward` and `dsv3 forward --readable` write byte-identical logits (decode, fp8, MTP)
/// and say which Linears ran.
#[test]
fn cli_readable_and_fast_forwards_write_the_same_logits() {
    let dir = scratch("readable");
    let model = fixtures().join("models").join("fp8_sharded");
    let (fast, readable) = (
        dir.join("fast.safetensors"),
        dir.join("readable.safetensors"),
    );
    for (out, extra) in [(&fast, None), (&readable, Some("--readable"))] {
        let mut args = vec![
            "forward",
            "--model",
            s(&model),
            "--tokens",
            "64,109,100,36,120",
            "--decode",
            "--precision",
            "fp8",
            "--mtp",
            "--out",
            s(out),
        ];
        args.extend(extra);
        let (code, err) = dsv3(&args);
        assert_eq!(code, 0, "{err}");
        let which = if extra.is_some() {
            "(readable Linears)"
        } else {
            "(fast, bit-identical Linears)"
        };
        assert!(err.contains(which), "{err}");
    }
    let (a, b) = (
        std::fs::read(&fast).unwrap(),
        std::fs::read(&readable).unwrap(),
    );
    assert!(a.len() > 1000);
    assert!(a == b, "the logits files differ");
}
