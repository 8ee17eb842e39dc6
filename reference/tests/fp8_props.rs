//! Properties of tile quantization (V3 §3.3.2) that hold for every input.

use dsv3_reference::fp8::{act_quant, ue8m0, weight_dequant, weight_quant, ScaleFmt, E4M3, E5M6};
use dsv3_reference::Error;
use ndarray::Array2;
use proptest::prelude::*;

/// Spacing of E4M3 values in the binade holding |t| (2^-9 in the subnormal range).
fn e4m3_spacing(t: f64) -> f64 {
    let a = t.abs();
    if a < 2f64.powi(-6) {
        2f64.powi(-9)
    } else {
        2f64.powi(a.log2().floor() as i32 - 3)
    }
}

/// Rows of 128-element tiles; each tile Gaussian with its own magnitude, or one of the hazards.
fn tiles(rows: usize, tiles_per_row: usize) -> impl Strategy<Value = Array2<f32>> {
    let n = rows * tiles_per_row;
    prop::collection::vec((0u8..6, -30i32..30, any::<u64>()), n).prop_map(move |specs| {
        let mut x = Array2::<f32>::zeros((rows, tiles_per_row * 128));
        for (t, (kind, exp, seed)) in specs.into_iter().enumerate() {
            let (r, c0) = (t / tiles_per_row, (t % tiles_per_row) * 128);
            let mut state = seed | 1;
            let mut next = || {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5
            };
            let mag = 2f64.powi(exp);
            for j in 0..128 {
                x[[r, c0 + j]] = match kind {
                    0 => 0.0,
                    1 => (mag * 0.7) as f32,
                    2 if j == 0 => 1e4,
                    2 => (next() * 1e-3) as f32,
                    _ => (next() * mag) as f32,
                };
            }
        }
        x
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn round_trip_error_is_at_most_half_a_code_times_the_scale(x in tiles(3, 2), ue8m0 in any::<bool>()) {
        let fmt = if ue8m0 { ScaleFmt::Ue8m0 } else { ScaleFmt::F32 };
        let q = act_quant(x.view(), 128, fmt).unwrap();
        for ((m, k), &v) in x.indexed_iter() {
            let s = f64::from(q.s[[m, k / 128]]);
            let t = f64::from(v) / s;
            let back = f64::from(E4M3.decode(u16::from(q.y[[m, k]]))) * s;
            // half a code at t's binade, plus the f32 rounding of the quotient x/s
            let bound = s * (e4m3_spacing(t) / 2.0) + f64::from(v).abs() * 2f64.powi(-23);
            prop_assert!((f64::from(v) - back).abs() <= bound, "x[{m},{k}] = {v}: back {back}, bound {bound}");
        }
    }

    #[test]
    fn scale_maps_the_tile_max_onto_448(x in tiles(2, 3), ue8m0 in any::<bool>()) {
        let fmt = if ue8m0 { ScaleFmt::Ue8m0 } else { ScaleFmt::F32 };
        let q = act_quant(x.view(), 128, fmt).unwrap();
        for m in 0..2 {
            for kb in 0..3 {
                let tile = x.slice(ndarray::s![m, kb * 128..(kb + 1) * 128]);
                let amax = tile.iter().fold(0f32, |a, v| a.max(v.abs()));
                let s = q.s[[m, kb]];
                let raw = amax.max(1e-4) / 448.0;
                if ue8m0 {
                    // a power of two, the smallest one ≥ raw
                    prop_assert_eq!(s.to_bits() & 0x7F_FFFF, 0);
                    prop_assert!(s >= raw && s / 2.0 < raw, "s {s} raw {raw}");
                } else {
                    prop_assert_eq!(s, raw);
                }
                if amax >= 1e-4 && !ue8m0 {
                    // the largest element lands on ±448 (|x/s| = 448 up to one rounding)
                    let top = (0..128).map(|j| E4M3.decode(u16::from(q.y[[m, kb * 128 + j]])).abs()).fold(0f32, f32::max);
                    prop_assert_eq!(top, 448.0);
                }
                // no code saturates beyond what the scale allows
                prop_assert!((0..128).all(|j| !E4M3.is_nan(u16::from(q.y[[m, kb * 128 + j]]))));
            }
        }
    }

    #[test]
    fn quantizing_the_dequantized_tensor_again_is_idempotent(x in tiles(2, 2)) {
        // With power-of-two scales dequantization is exact and so is re-quantization.
        let q = act_quant(x.view(), 128, ScaleFmt::Ue8m0).unwrap();
        let back = Array2::from_shape_fn(x.dim(), |(m, k)| E4M3.decode(u16::from(q.y[[m, k]])) * q.s[[m, k / 128]]);
        let q2 = act_quant(back.view(), 128, ScaleFmt::Ue8m0).unwrap();
        prop_assert_eq!(&q2.s, &q.s);
        prop_assert_eq!(&q2.y, &q.y);
        // With f32 scales: whenever the scale reproduces, the codes do too.
        let q = act_quant(x.view(), 128, ScaleFmt::F32).unwrap();
        let back = Array2::from_shape_fn(x.dim(), |(m, k)| E4M3.decode(u16::from(q.y[[m, k]])) * q.s[[m, k / 128]]);
        let q2 = act_quant(back.view(), 128, ScaleFmt::F32).unwrap();
        for m in 0..2 {
            for kb in 0..2 {
                let (a, b) = (q.s[[m, kb]], q2.s[[m, kb]]);
                prop_assert!(a.to_bits().abs_diff(b.to_bits()) <= 1, "scale drifted: {a} → {b}");
                if a == b {
                    for j in kb * 128..(kb + 1) * 128 {
                        prop_assert_eq!(q.y[[m, j]], q2.y[[m, j]]);
                    }
                }
            }
        }
    }

    #[test]
    fn a_nan_or_inf_anywhere_is_an_error_naming_it(m in 0usize..3, k in 0usize..256, which in 0u8..3) {
        let mut x = Array2::<f32>::from_elem((3, 256), 0.5);
        x[[m, k]] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][which as usize];
        let err = act_quant(x.view(), 128, ScaleFmt::F32).unwrap_err();
        prop_assert!(matches!(&err, Error::Value { index, .. } if index == &vec![m, k]), "{err}");
        let err = weight_quant(x.view(), 128, ScaleFmt::F32).unwrap_err();
        prop_assert!(matches!(&err, Error::Value { index, .. } if index == &vec![m, k]), "{err}");
    }

    #[test]
    fn weight_blocks_round_trip_with_partial_edges(n in 1usize..300, k in 1usize..300, seed in any::<u32>()) {
        let w = Array2::from_shape_fn((n, k), |(i, j)| (((i * 31 + j * 17) as u32 ^ seed) as f32 / u32::MAX as f32 - 0.5) * 0.02);
        let q = weight_quant(w.view(), 128, ScaleFmt::F32).unwrap();
        prop_assert_eq!(q.s.dim(), (n.div_ceil(128), k.div_ceil(128)));
        let back = weight_dequant(q.y.view(), q.s.view(), 128).unwrap();
        for ((i, j), &v) in w.indexed_iter() {
            let s = f64::from(q.s[[i / 128, j / 128]]);
            let bound = s * e4m3_spacing(f64::from(v) / s) / 2.0 + f64::from(v).abs() * 2f64.powi(-22);
            prop_assert!((f64::from(back[[i, j]]) - f64::from(v)).abs() <= bound, "w[{i},{j}]");
        }
    }
}

#[test]
fn zero_constant_and_outlier_tiles() {
    let mut x = Array2::<f32>::zeros((3, 128));
    x.row_mut(1).fill(-2.5);
    x[[2, 0]] = 1e4;
    x[[2, 1]] = 1e-3;
    x[[2, 2]] = 20.0;
    let q = act_quant(x.view(), 128, ScaleFmt::F32).unwrap();
    // zero tile: the 1e-4 floor, all codes +0
    assert_eq!(q.s[[0, 0]], 1e-4f32 / 448.0);
    assert!(q.y.row(0).iter().all(|&c| c == 0));
    // constant tile: every element is the tile max → −448
    assert!(q.y.row(1).iter().all(|&c| c == 0xFE));
    // outlier: 1e4 → 448; 20/(1e4/448) = 0.896 → E4M3 0.875 (0x36); 1e-3·448/1e4 = 4.48e-5 → 0
    assert_eq!(q.y[[2, 0]], 0x7E);
    assert_eq!(E4M3.decode(u16::from(q.y[[2, 2]])), 0.875);
    assert_eq!(q.y[[2, 1]], 0x00);
}

#[test]
fn e5m6_is_the_top_12_bits_of_ieee_half() {
    // Our E5M6 definition = FP16 with the 4 low mantissa bits dropped: decode through `half`.
    for code in 0u16..4096 {
        let via_half = half::f16::from_bits(code << 4).to_f32();
        let ours = E5M6.decode(code);
        assert!(
            ours.to_bits() == via_half.to_bits() || (ours.is_nan() && via_half.is_nan()),
            "{code:#x}: {ours} vs {via_half}"
        );
    }
}

#[test]
fn ue8m0_ceil_matches_float64_log2_on_a_sweep() {
    // Independent derivation: ceil(log2 s) in f64 is exact for these f32 inputs (none of them is
    // within f64 rounding of a power of two); the powers of two themselves and one ulp above
    // them are checked in the unit tests of ue8m0.rs.
    let mut s = 1e-30f32;
    while s < 1e30 {
        let k = f64::from(s).log2().ceil() as i32;
        assert_eq!(ue8m0::ceil_pow2(s), Some(2f32.powi(k)), "{s:e}");
        s *= 1.37;
    }
}
