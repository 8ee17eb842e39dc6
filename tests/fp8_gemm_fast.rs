//! The fast GEMM paths of the registry (`src/ops/gemm/fast/mod.rs`) are bit-identical to the readable
//! reference (`dsv3_reference::fp8::{fp8_gemm, grouped_gemm, linear_fp8}`): random shapes that
//! cross the fast path's tile edges (64 rows, 512 columns), K and N not multiples of the block,
//! zero tiles, ±448 tiles, subnormal codes, outliers, every finite code, scales from 2^-75 to
//! 2^4, both scale layouts, both accumulation modes.

use dsv3::ops::gemm::fast::{self, ExactKernel};
use dsv3::registry::tolerance::TcBoundTolerance;
use dsv3_reference::fp8::fp8_gemm::{
    e4m3_values, gemm, scaled_dot, Accumulation, BlockScaled, ScaleLayout, OFF_NAMES,
};
use dsv3_reference::fp8::grouped_gemm::{flatten, ExpertWeights, GroupRows};
use dsv3_reference::fp8::tc_bound::TensorCoreBound;
use dsv3_reference::fp8::{
    m_grouped_fp8_gemm_contiguous, m_grouped_fp8_gemm_masked, TensorCoreModel, TermCut, WriteBack,
    HOPPER_FP8_WGMMA,
};
use dsv3_reference::numeric::round_to_bf16;
use ndarray::{Array2, Array3};
use proptest::prelude::*;

mod common;

/// The proptest seed decides everything.
use common::Stream;

/// Codes `[rows, k]`, one hazard kind per 1×B tile.
fn codes(s: &mut Stream, rows: usize, k: usize, block: usize) -> Array2<u8> {
    let mut a = Array2::<u8>::zeros((rows, k));
    for r in 0..rows {
        for k0 in (0..k).step_by(block) {
            let kind = s.below(6);
            for j in k0..(k0 + block).min(k) {
                let any = (s.below(254) as u8).wrapping_add(1);
                a[[r, j]] = match kind {
                    0 => 0x00,
                    1 => [0x7E, 0xFE][s.below(2) as usize],
                    2 => (s.below(8) as u8) | ((s.below(2) as u8) << 7), // subnormal codes
                    3 if j == k0 => 0x7E,                                // one outlier ...
                    3 => s.below(16) as u8,                              // ... over tiny codes
                    _ if any == 0x7F || any == 0xFF => 0x7E,
                    _ => any,
                };
            }
        }
    }
    a
}

/// Positive scales `[rows, cols]`; `row_constant` repeats one value along each row.
fn scales(s: &mut Stream, rows: usize, cols: usize, row_constant: bool) -> Array2<f32> {
    let mut v = Array2::<f32>::zeros((rows, cols));
    for r in 0..rows {
        let mut x = 1.0;
        for c in 0..cols {
            if c == 0 || !row_constant {
                x = match s.below(4) {
                    0 => 2f32.powi(s.below(25) as i32 - 20),
                    1 if s.below(8) == 0 => 2f32.powi(-75),
                    _ => (1.0 + s.below(1000) as f32 / 999.0) * 2f32.powi(-(s.below(12) as i32)),
                };
            }
            v[[r, c]] = x;
        }
    }
    v
}

/// The accumulation to test and whether it needs row-constant scales.
fn accumulation(s: &mut Stream, block: usize) -> (Accumulation, bool) {
    match s.below(5) {
        4 => (
            Accumulation::TensorCoreBound {
                bound: TensorCoreBound {
                    frac_bits: 13,
                    group: 32,
                },
                promote_interval: block,
            },
            false,
        ),
        0 | 1 => (Accumulation::Exact, false),
        2 => (
            Accumulation::TensorCore {
                model: HOPPER_FP8_WGMMA,
                promote_interval: block,
            },
            false,
        ),
        _ => (
            Accumulation::TensorCore {
                model: TensorCoreModel {
                    // F > 40 takes the readable step (tc.rs), the others the i64 one
                    frac_bits: [10 + s.below(8) as u32, 23, 45][s.below(3) as usize],
                    group: [8, 16, 32, 48][s.below(4) as usize],
                    term_cut: [TermCut::TowardZero, TermCut::Floor, TermCut::Nearest]
                        [s.below(3) as usize],
                    out_frac_bits: [13, 23][s.below(2) as usize],
                    out_round: [WriteBack::TowardZero, WriteBack::NearestEven][s.below(2) as usize],
                },
                promote_interval: [0, 64, 96][s.below(3) as usize],
            },
            true,
        ),
    }
}

fn bits(a: &Array2<f32>) -> Vec<u32> {
    a.iter().map(|v| v.to_bits()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// `tensor_core_bound`: the fast path's accumulators, magnitudes, window magnitudes and
    /// slacks equal the readable `scaled_dot` of every element, bit for bit, whatever the block,
    /// promotion interval (windows inside, across or equal to blocks) and step.
    #[test]
    fn bound_mode_fast_path_is_bit_identical_to_scaled_dot(seed in 1u64.., row_layout in any::<bool>()) {
        let mut s = Stream(seed);
        let block = [128usize, 32, 16][s.below(3) as usize];
        let m = 1 + s.below(70) as usize;
        let n = 1 + s.below(600) as usize;
        let k = 1 + s.below(3 * block as u64 + 40) as usize;
        let promote_interval = [block, block, 0, 64, 96, 2 * block][s.below(6) as usize];
        let bound = TensorCoreBound { frac_bits: 10 + s.below(8) as u32, group: [8, 16, 32, 48][s.below(4) as usize] };
        let acc = Accumulation::TensorCoreBound { bound, promote_interval };
        let uniform = promote_interval == 0 || block % promote_interval != 0;
        let kb = k.div_ceil(block);
        let (layout, b_rows) = if row_layout { (ScaleLayout::Row, n) } else { (ScaleLayout::Block, n.div_ceil(block)) };
        let a = codes(&mut s, m, k, block);
        let b = codes(&mut s, n, k, block);
        let a_s = scales(&mut s, m, kb, uniform);
        let b_s = scales(&mut s, b_rows, kb, uniform);
        let out = fast::gemm(BlockScaled::tiles(a.view(), a_s.view()), BlockScaled { codes: b.view(), scales: b_s.view(), layout }, block, &acc, true);
        let values = e4m3_values();
        for i in 0..m {
            for j in 0..n {
                let sb = match layout { ScaleLayout::Block => j / block, ScaleLayout::Row => j };
                let d = scaled_dot(a.row(i).as_slice().unwrap(), a_s.row(i).as_slice().unwrap(), b.row(j).as_slice().unwrap(), b_s.row(sb).as_slice().unwrap(), block, &acc, &values);
                prop_assert_eq!(
                    (out.c[[i, j]].to_bits(), out.magnitude[[i, j]].to_bits(), out.window_magnitude[[i, j]].to_bits(), out.slack[[i, j]].to_bits()),
                    (d.c.to_bits(), d.magnitude.to_bits(), d.window_magnitude.to_bits(), d.slack.to_bits()),
                    "[{}, {}] M={} N={} K={} B={} {:?}", i, j, m, n, k, block, acc
                );
            }
        }
        // without magnitudes: the exact mode's accumulators
        let plain = fast::gemm(BlockScaled::tiles(a.view(), a_s.view()), BlockScaled { codes: b.view(), scales: b_s.view(), layout }, block, &acc, false);
        let exact = fast::gemm(BlockScaled::tiles(a.view(), a_s.view()), BlockScaled { codes: b.view(), scales: b_s.view(), layout }, block, &Accumulation::Exact, false);
        prop_assert_eq!(bits(&plain.c), bits(&exact.c));
        prop_assert_eq!(bits(&out.c), bits(&exact.c));
    }

    #[test]
    fn fp8_gemm_fast_path_is_bit_identical_to_the_readable_loop(seed in 1u64.., row_layout in any::<bool>()) {
        let mut s = Stream(seed);
        let block = [128usize, 32, 16][s.below(3) as usize];
        let m = 1 + s.below(70) as usize;
        let n = 1 + s.below(600) as usize;
        let k = 1 + s.below(3 * block as u64 + 40) as usize;
        let (acc, uniform) = accumulation(&mut s, block);
        let kb = k.div_ceil(block);
        let (layout, b_rows) = if row_layout { (ScaleLayout::Row, n) } else { (ScaleLayout::Block, n.div_ceil(block)) };
        let a = codes(&mut s, m, k, block);
        let b = codes(&mut s, n, k, block);
        let a_s = scales(&mut s, m, kb, uniform);
        let b_s = scales(&mut s, b_rows, kb, uniform);
        let readable = gemm("fp8_gemm", &OFF_NAMES, BlockScaled::tiles(a.view(), a_s.view()), BlockScaled { codes: b.view(), scales: b_s.view(), layout }, block, &acc).unwrap();
        let out = fast::gemm(BlockScaled::tiles(a.view(), a_s.view()), BlockScaled { codes: b.view(), scales: b_s.view(), layout }, block, &acc, true);
        prop_assert_eq!(bits(&out.c), bits(&readable), "M={} N={} K={} B={} {:?}", m, n, k, block, acc);
        prop_assert_eq!(out.magnitude.dim(), (m, n));
        // the magnitudes (what the policy scales with) are the readable scaled_dot's, bit for bit
        let values = e4m3_values();
        for i in 0..m {
            for j in 0..n {
                let sb = match layout { ScaleLayout::Block => j / block, ScaleLayout::Row => j };
                let d = scaled_dot(a.row(i).as_slice().unwrap(), a_s.row(i).as_slice().unwrap(), b.row(j).as_slice().unwrap(), b_s.row(sb).as_slice().unwrap(), block, &acc, &values);
                prop_assert_eq!(out.magnitude[[i, j]].to_bits(), d.magnitude.to_bits(), "magnitude [{}, {}] {:?}", i, j, acc);
            }
        }
        // the fast path without magnitudes computes the same accumulators
        let plain = fast::gemm(BlockScaled::tiles(a.view(), a_s.view()), BlockScaled { codes: b.view(), scales: b_s.view(), layout }, block, &acc, false);
        prop_assert_eq!(bits(&plain.c), bits(&readable));
        // and so does each exact kernel (f64 micro-kernel, AMX where the machine has it), with
        // the same magnitudes
        for kernel in [ExactKernel::F64, ExactKernel::Amx] {
            let each = fast::with_exact_kernel(kernel, || fast::gemm(BlockScaled::tiles(a.view(), a_s.view()), BlockScaled { codes: b.view(), scales: b_s.view(), layout }, block, &acc, true));
            prop_assert_eq!(bits(&each.c), bits(&readable), "{:?}", kernel);
            let mag = |o: &fast::GemmOut| o.magnitude.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
            prop_assert_eq!(mag(&each), mag(&out), "{:?}", kernel);
        }
    }

    #[test]
    fn grouped_fast_paths_are_bit_identical_to_the_readable_loops(seed in 1u64..) {
        let mut s = Stream(seed);
        let block = [128usize, 32][s.below(2) as usize];
        let groups = 1 + s.below(3) as usize;
        let n = 1 + s.below(150) as usize;
        let k = 1 + s.below(2 * block as u64 + 40) as usize;
        let kb = k.div_ceil(block);
        let (acc, uniform) = accumulation(&mut s, block);
        let b = Array3::from_shape_vec((groups, n, k), codes(&mut s, groups * n, k, block).into_raw_vec_and_offset().0).unwrap();
        let b_s = Array3::from_shape_vec((groups, n.div_ceil(block), kb), scales(&mut s, groups * n.div_ceil(block), kb, uniform).into_raw_vec_and_offset().0).unwrap();
        // contiguous: rows assigned to random experts or padding
        let m = 1 + s.below(80) as usize;
        let m_indices: Vec<i64> = (0..m).map(|_| s.below(groups as u64 + 1) as i64 - 1).collect();
        let a = codes(&mut s, m, k, block);
        let a_s = scales(&mut s, m, kb, uniform);
        let w = ExpertWeights::new(b.view(), b_s.view());
        let tiles = BlockScaled::tiles(a.view(), a_s.view());
        let readable = m_grouped_fp8_gemm_contiguous(tiles, w, &m_indices, block, &acc).unwrap();
        let out = fast::grouped(tiles, w, &GroupRows::contiguous(&m_indices, groups), block, &acc, false);
        prop_assert_eq!(bits(&out.c), bits(&readable));
        // masked
        let m_max = 1 + s.below(20) as usize;
        let masked_m: Vec<i64> = (0..groups).map(|_| s.below(m_max as u64 + 1) as i64).collect();
        let a3 = Array3::from_shape_vec((groups, m_max, k), codes(&mut s, groups * m_max, k, block).into_raw_vec_and_offset().0).unwrap();
        let a_s3 = Array3::from_shape_vec((groups, m_max, kb), scales(&mut s, groups * m_max, kb, uniform).into_raw_vec_and_offset().0).unwrap();
        let readable = m_grouped_fp8_gemm_masked(a3.view(), a_s3.view(), w, &masked_m, block, &acc).unwrap();
        let (a2, a_s2) = (flatten(a3.view()), flatten(a_s3.view()));
        let rows = GroupRows::masked(&masked_m, m_max);
        let out = fast::grouped(BlockScaled::tiles(a2.view(), a_s2.view()), w, &rows, block, &acc, false);
        let flat: Vec<u32> = readable.iter().map(|v| v.to_bits()).collect();
        prop_assert_eq!(bits(&out.c), flat);
    }
}

/// The fused kernel's tiles (256 × 256 outputs per task, 6 × 16 per micro-tile) with partial tiles
/// on both sides and a partial last K-block: bit-identical to the readable loop; its bf16 output
/// (written from the tiles) is the rounding of those accumulators.
#[test]
fn the_fused_kernel_is_bit_identical_across_several_tiles() {
    if !fast::amx_available() {
        println!("SKIP (AMX part): this CPU or OS offers no AMX-INT8; the f64 kernel runs twice");
    }
    for kernel in [ExactKernel::F64, ExactKernel::Amx] {
        fast::with_exact_kernel(kernel, fused_kernel_cases);
    }
}

/// [`the_fused_kernel_is_bit_identical_across_several_tiles`]' cases (f64 tasks of 256 × 256,
/// AMX tasks of 512 × 256 outputs, both crossed).
fn fused_kernel_cases() {
    let mut s = Stream(99);
    for (m, n, k, block) in [
        (300usize, 530usize, 300usize, 128usize),
        (513, 17, 64, 64),
        (7, 260, 1000, 256),
    ] {
        let kb = k.div_ceil(block);
        let a = codes(&mut s, m, k, block);
        let b = codes(&mut s, n, k, block);
        let a_s = scales(&mut s, m, kb, false);
        let b_s = scales(&mut s, n.div_ceil(block), kb, false);
        let readable = gemm(
            "fp8_gemm",
            &OFF_NAMES,
            BlockScaled::tiles(a.view(), a_s.view()),
            BlockScaled::blocks(b.view(), b_s.view()),
            block,
            &Accumulation::Exact,
        )
        .unwrap();
        let out = fast::gemm(
            BlockScaled::tiles(a.view(), a_s.view()),
            BlockScaled::blocks(b.view(), b_s.view()),
            block,
            &Accumulation::Exact,
            false,
        );
        assert_eq!(bits(&out.c), bits(&readable), "M={m} N={n} K={k} B={block}");
        // the bf16 and f32 outputs written from the tiles (exact mode and the bound mode's
        // output): every accumulator's bytes, rounded to bf16 (RNE) or as they are; the Tensor
        // Core mode's output is not the fused kernel's (`None`: the caller converts `gemm`'s)
        let tensor_core = Accumulation::TensorCore {
            model: HOPPER_FP8_WGMMA,
            promote_interval: block,
        };
        assert!(fast::gemm_bytes(
            BlockScaled::tiles(a.view(), a_s.view()),
            BlockScaled::blocks(b.view(), b_s.view()),
            block,
            &tensor_core,
            true,
        )
        .is_none());
        for acc in [
            Accumulation::Exact,
            Accumulation::TensorCoreBound {
                bound: TensorCoreBound {
                    frac_bits: 13,
                    group: 32,
                },
                promote_interval: block,
            },
        ] {
            let c = fast::gemm(
                BlockScaled::tiles(a.view(), a_s.view()),
                BlockScaled::blocks(b.view(), b_s.view()),
                block,
                &acc,
                false,
            )
            .c;
            for bf16 in [true, false] {
                let want: Vec<u8> = if bf16 {
                    c.iter()
                        .flat_map(|&v| round_to_bf16(v).to_le_bytes())
                        .collect()
                } else {
                    c.iter().flat_map(|&v| v.to_le_bytes()).collect()
                };
                let got = fast::gemm_bytes(
                    BlockScaled::tiles(a.view(), a_s.view()),
                    BlockScaled::blocks(b.view(), b_s.view()),
                    block,
                    &acc,
                    bf16,
                );
                assert!(
                    got == Some(want),
                    "output bytes (bf16: {bf16}) M={m} N={n} K={k} B={block} {acc:?}"
                );
            }
        }
    }
}

/// The fused bound kernel's tiles (192 × 256 outputs per task, 6 × 16 per micro-tile, steps of
/// L inside windows inside K-blocks) with partial tiles on both sides, a partial last K-block,
/// windows shorter than the block, steps that do not divide the window, and configurations it
/// does not take (windows across blocks, steps of over 255 products: the blocked-GEMM path, whose
/// counters carry past 255): window magnitudes, slacks,
/// magnitudes and accumulators equal the readable `scaled_dot`'s bit for bit.
#[test]
fn the_fused_bound_kernel_is_bit_identical_across_several_tiles() {
    let mut s = Stream(2024);
    let values = e4m3_values();
    for (m, n, k, block, promote_interval, group) in [
        (400usize, 530usize, 300usize, 128usize, 128usize, 32usize),
        (200, 270, 200, 128, 64, 48),
        (9, 40, 260, 32, 32, 8),
        (13, 20, 300, 128, 256, 32),
        (5, 30, 700, 512, 512, 300),
    ] {
        let kb = k.div_ceil(block);
        let uniform = block % promote_interval != 0;
        let a = codes(&mut s, m, k, block);
        let b = codes(&mut s, n, k, block);
        let a_s = scales(&mut s, m, kb, uniform);
        let b_s = scales(&mut s, n.div_ceil(block), kb, uniform);
        let acc = Accumulation::TensorCoreBound {
            bound: TensorCoreBound {
                frac_bits: 13,
                group,
            },
            promote_interval,
        };
        let out = fast::gemm(
            BlockScaled::tiles(a.view(), a_s.view()),
            BlockScaled::blocks(b.view(), b_s.view()),
            block,
            &acc,
            true,
        );
        // the tolerances folded in the kernel's tiles (when it takes the configuration)
        let partials = (k.div_ceil(block), k.div_ceil(promote_interval));
        let tolerance = TcBoundTolerance::new(partials);
        let folded = fast::gemm_bound_tolerances(
            BlockScaled::tiles(a.view(), a_s.view()),
            BlockScaled::blocks(b.view(), b_s.view()),
            block,
            &acc,
            &tolerance,
        );
        let fused = block % promote_interval == 0 && group.min(promote_interval) <= 255;
        assert_eq!(
            folded.is_some(),
            fused,
            "M={m} N={n} K={k} B={block} {acc:?}"
        );
        for i in 0..m {
            for j in 0..n {
                let d = scaled_dot(
                    a.row(i).as_slice().unwrap(),
                    a_s.row(i).as_slice().unwrap(),
                    b.row(j).as_slice().unwrap(),
                    b_s.row(j / block).as_slice().unwrap(),
                    block,
                    &acc,
                    &values,
                );
                assert_eq!(
                    (
                        out.c[[i, j]].to_bits(),
                        out.magnitude[[i, j]].to_bits(),
                        out.window_magnitude[[i, j]].to_bits(),
                        out.slack[[i, j]].to_bits()
                    ),
                    (
                        d.c.to_bits(),
                        d.magnitude.to_bits(),
                        d.window_magnitude.to_bits(),
                        d.slack.to_bits()
                    ),
                    "[{i}, {j}] M={m} N={n} K={k} B={block} {acc:?}"
                );
                if let Some((c, bytes)) = &folded {
                    let t = f64::from_le_bytes(bytes[8 * (i * n + j)..][..8].try_into().unwrap());
                    let want = tolerance.of(d.magnitude, d.window_magnitude, d.slack);
                    assert_eq!(
                        (c[[i, j]].to_bits(), t.to_bits()),
                        (d.c.to_bits(), want.to_bits()),
                        "folded [{i}, {j}]"
                    );
                }
            }
        }
    }
}
