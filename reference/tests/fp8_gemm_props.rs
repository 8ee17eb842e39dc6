//! Properties of the block-scaled FP8 GEMM's exact mode (V3 §3.3.2) that hold for every input:
//! random shapes with K and N not multiples of the block, zero tiles, ±448 outliers, subnormal
//! codes, random positive scales.

use dsv3_reference::fp8::{fp8_gemm, Accumulation};
use ndarray::{s, Array2};
use proptest::prelude::*;

/// Finite E4M3 codes: per tile of `block` columns one of zeros, ±448, subnormals, any code.
fn codes(rows: usize, cols: usize, block: usize) -> impl Strategy<Value = Array2<u8>> {
    let tiles = rows * cols.div_ceil(block);
    (
        prop::collection::vec(0u8..4, tiles),
        prop::collection::vec(any::<u8>(), rows * cols),
    )
        .prop_map(move |(kinds, raw)| {
            Array2::from_shape_fn((rows, cols), |(r, c)| {
                let x = raw[r * cols + c];
                match kinds[r * cols.div_ceil(block) + c / block] {
                    0 => 0x00,
                    1 => 0x7E | (x & 0x80),
                    2 => x & 0x87,
                    _ if x & 0x7F == 0x7F => 0x7E,
                    _ => x,
                }
            })
        })
}

fn scales(rows: usize, cols: usize) -> impl Strategy<Value = Array2<f32>> {
    prop::collection::vec(-20i32..5, rows * cols).prop_map(move |e| {
        Array2::from_shape_fn((rows, cols), |(r, c)| {
            let k = e[r * cols + c];
            2f32.powi(k) * (1.0 + (k.rem_euclid(7)) as f32 / 7.0)
        })
    })
}

/// (a, a_s, b, b_s, block) with M ≤ 4, N ≤ 40, K ≤ 3 blocks + a partial one.
fn gemm_inputs() -> impl Strategy<Value = (Array2<u8>, Array2<f32>, Array2<u8>, Array2<f32>, usize)>
{
    (
        prop::sample::select(vec![16usize, 32]),
        1usize..5,
        1usize..41,
        1usize..70,
    )
        .prop_flat_map(|(block, m, n, k)| {
            let kb = k.div_ceil(block);
            (
                codes(m, k, block),
                scales(m, kb),
                codes(n, k, block),
                scales(n.div_ceil(block), kb),
                Just(block),
            )
        })
}

fn bits(a: &Array2<f32>) -> Vec<u32> {
    a.iter().map(|v| v.to_bits()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// A block dot of E4M3 products is exact in f64, so permuting k inside a block (the same
    /// permutation for a and b) cannot change a single bit of c.
    #[test]
    fn fp8_gemm_block_dots_are_order_independent((a, a_s, b, b_s, block) in gemm_inputs(), seed in any::<u64>()) {
        let k = a.ncols();
        let mut perm: Vec<usize> = (0..k).collect();
        let mut state = seed | 1;
        for kb in 0..k.div_ceil(block) {
            let (k0, k1) = (kb * block, ((kb + 1) * block).min(k));
            for i in (k0 + 1..k1).rev() {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                perm.swap(i, k0 + (state % (i - k0 + 1) as u64) as usize);
            }
        }
        let (ap, bp) = (a.select(ndarray::Axis(1), &perm), b.select(ndarray::Axis(1), &perm));
        let c = fp8_gemm(a.view(), a_s.view(), b.view(), b_s.view(), block, &Accumulation::Exact).unwrap();
        let cp = fp8_gemm(ap.view(), a_s.view(), bp.view(), b_s.view(), block, &Accumulation::Exact).unwrap();
        prop_assert_eq!(bits(&c), bits(&cp));
    }

    /// The partial last K-block is the zero-padded full block (what Triton's `other=0.0` mask
    /// and DeepGEMM's padding compute).
    #[test]
    fn fp8_gemm_partial_k_block_equals_zero_padding((a, a_s, b, b_s, block) in gemm_inputs()) {
        let k = a.ncols();
        let padded = k.div_ceil(block) * block;
        let pad = |x: &Array2<u8>| {
            let mut p = Array2::<u8>::zeros((x.nrows(), padded));
            p.slice_mut(s![.., ..k]).assign(x);
            p
        };
        let c = fp8_gemm(a.view(), a_s.view(), b.view(), b_s.view(), block, &Accumulation::Exact).unwrap();
        let cp = fp8_gemm(pad(&a).view(), a_s.view(), pad(&b).view(), b_s.view(), block, &Accumulation::Exact).unwrap();
        prop_assert_eq!(bits(&c), bits(&cp));
    }

    /// A zero tile contributes exactly nothing, whatever its scale: 0·s = 0 and acc + 0 = acc.
    #[test]
    fn fp8_gemm_zero_tile_scale_is_irrelevant((a, a_s, b, b_s, block) in gemm_inputs(), row in any::<prop::sample::Index>(), kb in any::<prop::sample::Index>()) {
        let (m, blocks) = a_s.dim();
        let (r, t) = (row.index(m), kb.index(blocks));
        let mut a0 = a.clone();
        let k1 = ((t + 1) * block).min(a.ncols());
        a0.slice_mut(s![r, t * block..k1]).fill(0);
        let mut s0 = a_s.clone();
        s0[[r, t]] *= 1024.0;
        let c = fp8_gemm(a0.view(), a_s.view(), b.view(), b_s.view(), block, &Accumulation::Exact).unwrap();
        let c2 = fp8_gemm(a0.view(), s0.view(), b.view(), b_s.view(), block, &Accumulation::Exact).unwrap();
        prop_assert_eq!(bits(&c), bits(&c2));
    }

    /// Doubling every scale of `a` doubles c exactly (no overflow or underflow at these
    /// magnitudes: |c| < K·448²·2^8 and every nonzero term ≥ 2^-18·2^-40).
    #[test]
    fn fp8_gemm_power_of_two_scaling_is_exact((a, a_s, b, b_s, block) in gemm_inputs()) {
        let c = fp8_gemm(a.view(), a_s.view(), b.view(), b_s.view(), block, &Accumulation::Exact).unwrap();
        let a2 = a_s.mapv(|v| 2.0 * v);
        let c2 = fp8_gemm(a.view(), a2.view(), b.view(), b_s.view(), block, &Accumulation::Exact).unwrap();
        prop_assert_eq!(bits(&c.mapv(|v| 2.0 * v)), bits(&c2));
    }
}
