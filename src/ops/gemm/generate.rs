//! Random operands for the GEMM ops' generators: E4M3 codes with hazard tiles, scales with
//! underflowing products and UE8M0 powers of two, garbage for undefined rows.

use dsv3_reference::fp8::{Saturation, E4M3};
use ndarray::Array2;

use crate::registry::rng::Rng;
use crate::registry::tensor::{DType, Tensor};
use crate::registry::Sizes;

/// E4M3 codes `[rows, k]`: per 1×B tile one of Gaussian values quantized with amax near 448,
/// zeros, ±448, subnormal codes, any finite code, or one outlier over tiny codes. Values come
/// from 256-entry tables indexed by random bytes, so DeepSeek-V3-sized operands stay cheap.
pub(super) fn codes(rng: &mut Rng, rows: usize, k: usize, block: usize) -> Vec<u8> {
    let mut table = |sigma: f64| -> Vec<u8> {
        (0..256)
            .map(|_| E4M3.encode((rng.normal() * sigma) as f32, Saturation::SatFinite) as u8)
            .collect()
    };
    let (gauss, tiny, small) = (table(120.0), table(2f64.powi(-7)), table(2f64.powi(-8)));
    let mut v = vec![0u8; rows * k];
    let (mut bits, mut left) = (0u64, 0);
    for r in 0..rows {
        for k0 in (0..k).step_by(block.max(1)) {
            let kind = if rng.chance(0.6) { 0 } else { rng.range(1, 5) };
            for j in k0..(k0 + block).min(k) {
                if left == 0 {
                    (bits, left) = (rng.next_u64(), 8);
                }
                let byte = usize::from(bits as u8);
                (bits, left) = (bits >> 8, left - 1);
                v[r * k + j] = match kind {
                    0 => gauss[byte],
                    1 => 0x00,
                    2 => [0x7E, 0xFE][byte % 2],
                    3 => tiny[byte],
                    // any code but the NaNs 0x7F / 0xFF
                    4 => [byte as u8, 0x7E][usize::from(byte % 128 == 0x7F)],
                    _ if j == k0 => 0x7E,
                    _ => small[byte],
                };
            }
        }
    }
    v
}

/// A positive scale: log-normal, a power of two, or (rarely) tiny enough that scale products
/// underflow f32.
fn one_scale(rng: &mut Rng) -> f32 {
    match rng.range(0, 19) {
        0..=11 => ((rng.normal() * 2.0).exp() * 2f64.powi(-8)) as f32,
        12..=18 => 2f32.powi(rng.range(0, 24) as i32 - 20),
        _ => 2f32.powi(-75),
    }
}

/// Scales of `shape`, F32 or (sometimes) F8_E8M0 powers of two; `row_constant` repeats one
/// value along each row.
pub(super) fn scales(rng: &mut Rng, shape: Vec<usize>, row_constant: bool) -> Tensor {
    let cols = *shape.last().unwrap_or(&1);
    let numel: usize = shape.iter().product();
    let e8m0 = rng.chance(0.25);
    let mut v = Vec::with_capacity(numel);
    let mut current = 1.0f32;
    for i in 0..numel {
        if !row_constant || i % cols.max(1) == 0 {
            current = if e8m0 {
                2f32.powi(rng.range(0, 24) as i32 - 20)
            } else {
                one_scale(rng)
            };
        }
        v.push(current);
    }
    if e8m0 {
        let codes = v.iter().map(|s| (s.to_bits() >> 23) as u8).collect();
        Tensor::from_codes(DType::F8E8M0, shape, codes)
    } else {
        Tensor::from_f32(shape, &v)
    }
}

/// A size: the pinned one, else a small random one in `lo..hi` (K and N often not multiples
/// of B).
pub(super) fn size(rng: &mut Rng, sizes: &Sizes, name: &str, lo: usize, hi: usize) -> usize {
    sizes
        .get(name)
        .copied()
        .unwrap_or_else(|| rng.range(lo, hi))
}

/// Garbage for undefined rows `rows` of `a` (`k` codes each) and their scales (`kb` each): any
/// byte (NaN codes included) and any f32 scale.
pub(super) fn scribble_rows(
    rng: &mut Rng,
    (a, k): (&mut [u8], usize),
    (a_s, kb): (&mut [f32], usize),
    rows: impl Iterator<Item = usize>,
) {
    for r in rows {
        for x in &mut a[r * k..(r + 1) * k] {
            *x = rng.next_u64() as u8;
        }
        for s in &mut a_s[r * kb..(r + 1) * kb] {
            *s = f32::from_bits(rng.next_u64() as u32);
        }
    }
}

/// Codes `[rows, cols]` quantized along rows in 1×B tiles, or (`along_rows`) down the columns
/// in B×1 tiles, with scales of the matching grid (`[rows, ⌈cols/B⌉]` or `[⌈rows/B⌉, cols]`).
pub(super) fn tiled_operand(
    rng: &mut Rng,
    (rows, cols): (usize, usize),
    block: usize,
    along_rows: bool,
    uniform: bool,
) -> (Tensor, Tensor) {
    // quantize the transposed matrix when the tiles run down the columns
    let (r, c) = if along_rows {
        (cols, rows)
    } else {
        (rows, cols)
    };
    let codes = codes(rng, r, c, block);
    let s = scales(rng, vec![r, c.div_ceil(block)], uniform);
    if !along_rows {
        return (
            Tensor::from_codes(DType::F8E4M3, vec![rows, cols], codes),
            s,
        );
    }
    let t_codes = Array2::from_shape_vec((r, c), codes).expect("r·c codes");
    let t_codes: Vec<u8> = t_codes.t().iter().copied().collect();
    (
        Tensor::from_codes(DType::F8E4M3, vec![rows, cols], t_codes),
        transpose_scales(&s),
    )
}

/// A weight `[n, k]` in B×B blocks with its scales.
pub(super) fn weight(
    rng: &mut Rng,
    (n, k): (usize, usize),
    block: usize,
    uniform: bool,
) -> (Tensor, Tensor) {
    let codes = codes(rng, n, k, block);
    let grid = vec![n.div_ceil(block), k.div_ceil(block)];
    (
        Tensor::from_codes(DType::F8E4M3, vec![n, k], codes),
        scales(rng, grid, uniform),
    )
}

/// A 2-D scale grid transposed (F32 or F8_E8M0 alike).
pub(super) fn transpose_scales(t: &Tensor) -> Tensor {
    let (r, c) = (t.shape[0], t.shape[1]);
    if t.dtype == DType::F8E8M0 {
        let m = Array2::from_shape_vec((r, c), t.data.clone()).expect("grid");
        Tensor::from_codes(DType::F8E8M0, vec![c, r], m.t().iter().copied().collect())
    } else {
        let m = Array2::from_shape_vec((r, c), t.to_f32().expect("scales")).expect("grid");
        Tensor::from_f32(vec![c, r], &m.t().iter().copied().collect::<Vec<_>>())
    }
}
