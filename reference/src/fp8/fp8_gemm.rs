//! Block-scaled FP8 GEMM (V3 §3.3.2 "fine-grained quantization", §3.3.2 "increasing accumulation
//! precision"; OFF `kernel.py fp8_gemm`, DeepGEMM `fp8_gemm_nt`).
//!
//! `c[m, n] = Σ_kb (Σ_{k∈kb} a[m,k]·b[n,k]) · a_s[m, kb] · b_s[n/B, kb]`: `a` holds activations
//! quantized in 1×B tiles, `b` a weight in B×B blocks (or, for Wgrad, 1×B tiles along K:
//! [`ScaleLayout::Row`]). K need not be a multiple of B: the last block is partial (the official
//! Triton kernel masks it with `other=0.0`).
//!
//! # Accumulation
//! [`Accumulation::Exact`] (the default of `dsv3 check`) is defined so that it is independent of
//! summation order: every E4M3×E4M3 product is a multiple of 2^-18 below 2^18 in magnitude, so
//! the dot of one block of B ≤ 2^17 products needs at most `log2(B) + 36` ≤ 53 significant bits
//! (43 for B = 128) and is **exact in f64 in any order**. It is rounded once to f32 (RNE),
//! multiplied by the two scales and added to an f32 accumulator in ascending block order, with
//! IEEE f32 operations exactly as OFF's Triton kernel writes them:
//! `accumulator += tl.dot(a, b) * a_s[:, None] * b_s[None, :]`, i.e. `acc = acc + (p·a_s)·b_s`
//! with three roundings and no FMA. The tolerance policy (SPEC.md) allows what real kernels
//! legitimately do differently (another order across blocks, FMA contraction, `(a_s·b_s)·p` as
//! DeepGEMM).
//!
//! [`Accumulation::TensorCore`] replaces the exact block dot with the Tensor Core model of
//! [`accumulate`](super::accumulate): the products of each promotion window of `N_C` elements
//! (V3: 128 = four `wgmma` k-steps; 0 = never, one window for all of K) are accumulated in the
//! limited register, then the window's partial is promoted exactly as above. A window must not
//! span K-blocks with different scales (a Tensor Core accumulates one window under one scale
//! pair); with `N_C = 0` that means per-row scales constant along K.

use ndarray::{Array2, ArrayView1, ArrayView2};

use super::accumulate::TensorCoreModel;
use super::format::E4M3;
use super::tc_bound::TensorCoreBound;
use crate::error::{Error, Result};

/// How the block dots are accumulated (module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accumulation {
    /// Exact block dot, rounded once to f32, scaled, accumulated in f32 (OFF Triton).
    Exact,
    /// The Tensor Core model inside windows of `promote_interval` products (0 = all of K),
    /// promoted to the f32 accumulator as in `Exact`.
    TensorCore {
        model: TensorCoreModel,
        promote_interval: usize,
    },
    /// The exact mode's result, with the bound of [`tc_bound`](super::tc_bound) on what any
    /// Tensor Core kernel with at least `bound.frac_bits` fraction bits and `bound.group`
    /// products per step may produce around it, windows of `promote_interval` (0 = all of K).
    TensorCoreBound {
        bound: TensorCoreBound,
        promote_interval: usize,
    },
}

impl Accumulation {
    /// The promotion interval of a Tensor Core mode (`None` in exact mode).
    pub fn promote_interval(&self) -> Option<usize> {
        match self {
            Accumulation::Exact => None,
            Accumulation::TensorCore {
                promote_interval, ..
            }
            | Accumulation::TensorCoreBound {
                promote_interval, ..
            } => Some(*promote_interval),
        }
    }
}

/// Which scale row a row `n` of `b` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleLayout {
    /// B×B blocks: `b_s: [⌈N/B⌉, ⌈K/B⌉]`, row `n` uses `b_s[n / B]` (weights).
    Block,
    /// 1×B tiles along K: `b_s: [N, ⌈K/B⌉]`, row `n` uses `b_s[n]` (Wgrad's re-tiled operands).
    Row,
}

/// A block-scaled FP8 operand (V3 §3.3.2 fine-grained quantization): E4M3 codes and one f32
/// scale per tile of `block_size` codes along K, the tiles laid out by `layout`.
///
/// Shapes: `codes: [R, K]`; `scales: [R, ⌈K/B⌉]` ([`ScaleLayout::Row`], 1×B tiles) or
/// `[⌈R/B⌉, ⌈K/B⌉]` ([`ScaleLayout::Block`], B×B blocks).
#[derive(Debug, Clone, Copy)]
pub struct BlockScaled<'a> {
    pub codes: ArrayView2<'a, u8>,
    pub scales: ArrayView2<'a, f32>,
    pub layout: ScaleLayout,
}

impl<'a> BlockScaled<'a> {
    /// Codes in 1×B tiles along K (activations; OFF's `a`, `a_s`).
    pub fn tiles(codes: ArrayView2<'a, u8>, scales: ArrayView2<'a, f32>) -> Self {
        BlockScaled {
            codes,
            scales,
            layout: ScaleLayout::Row,
        }
    }

    /// Codes in B×B blocks (weights; OFF's `b`, `b_s` = the checkpoint's `weight_scale_inv`).
    pub fn blocks(codes: ArrayView2<'a, u8>, scales: ArrayView2<'a, f32>) -> Self {
        BlockScaled {
            codes,
            scales,
            layout: ScaleLayout::Block,
        }
    }

    /// The transposed operand (codes and scales transposed, the same layout): Dgrad reads the
    /// stored weight as `Wᵀ` with `w_sᵀ`, Wgrad its B×1-tiled operands as `dyᵀ` and `xᵀ`.
    pub fn t(self) -> Self {
        BlockScaled {
            codes: self.codes.reversed_axes(),
            scales: self.scales.reversed_axes(),
            layout: self.layout,
        }
    }

    /// The scale row of code row `r`.
    pub fn scale_row(&self, r: usize, block_size: usize) -> usize {
        match self.layout {
            ScaleLayout::Block => r / block_size,
            ScaleLayout::Row => r,
        }
    }

    /// The number of scale rows `R` code rows need.
    pub fn scale_rows(&self, block_size: usize) -> usize {
        match self.layout {
            ScaleLayout::Block => self.codes.nrows().div_ceil(block_size),
            ScaleLayout::Row => self.codes.nrows(),
        }
    }
}

/// The names of the four operands in error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmNames {
    pub a: &'static str,
    pub a_s: &'static str,
    pub b: &'static str,
    pub b_s: &'static str,
}

/// OFF's names: `a`, `a_s`, `b`, `b_s`.
pub const OFF_NAMES: GemmNames = GemmNames {
    a: "a",
    a_s: "a_s",
    b: "b",
    b_s: "b_s",
};

/// Largest block size for which a block dot is exact in f64 (`log2(B) + 36 ≤ 53`).
pub const MAX_EXACT_BLOCK: usize = 1 << 17;

/// One output element with the magnitude its promotion roundings scale with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScaledDot {
    /// The f32 accumulator after the last block (before any bf16 rounding of the output).
    pub c: f32,
    /// `Σ |p|·a_s·b_s` over the promoted partials `p`, in f64: the tolerance policy's scale.
    pub magnitude: f64,
    /// `tensor_core_bound` only (else 0): `Σ_w |P_w|·a_s·b_s` over the exact window dots.
    pub window_magnitude: f64,
    /// `tensor_core_bound` only (else 0): `D = Σ_w Δ_w·a_s·b_s`, the Tensor Core's slack.
    pub slack: f64,
}

/// The exact value of every E4M3 code (NaN codes decode to NaN; callers reject them first).
pub fn e4m3_values() -> [f64; 256] {
    std::array::from_fn(|code| f64::from(E4M3.decode(code as u16)))
}

/// One output element, OFF `fp8_gemm_kernel` for a single (m, n):
/// `Σ_kb (Σ_{k∈kb} a[k]·b[k]) · a_s[kb] · b_s[kb]` under `accumulation` (module docs).
///
/// Shapes: `a, b: [K]` E4M3 codes, `a_s, b_s: [⌈K/B⌉]`. The caller has validated them
/// ([`check_gemm`]); `values` is [`e4m3_values`].
pub fn scaled_dot(
    a: &[u8],
    a_s: &[f32],
    b: &[u8],
    b_s: &[f32],
    block_size: usize,
    accumulation: &Accumulation,
    values: &[f64; 256],
) -> ScaledDot {
    let k = a.len();
    let mut acc = 0f32;
    let mut magnitude = 0f64;
    let (mut window_magnitude, mut slack) = (0f64, 0f64);
    match accumulation {
        Accumulation::Exact | Accumulation::TensorCoreBound { .. } => {
            for kb in 0..a_s.len() {
                let (k0, k1) = (kb * block_size, ((kb + 1) * block_size).min(k));
                // the block dot, exact in f64 whatever the order (≤ 43 significant bits)
                let mut dot = 0f64;
                for j in k0..k1 {
                    dot += values[usize::from(a[j])] * values[usize::from(b[j])];
                }
                // rounded once to f32, then scaled and added (OFF: acc += dot * a_s * b_s)
                let p = dot as f32;
                acc += p * a_s[kb] * b_s[kb];
                magnitude += f64::from(p.abs()) * f64::from(a_s[kb]) * f64::from(b_s[kb]);
            }
            if let Accumulation::TensorCoreBound {
                bound,
                promote_interval,
            } = accumulation
            {
                let window = window_len(*promote_interval, k);
                for w0 in (0..k).step_by(window) {
                    let w1 = (w0 + window).min(k);
                    let wb = bound.window(&a[w0..w1], &b[w0..w1], values);
                    // the window's scale pair (one K-block's), exact in f64
                    let kb = w0 / block_size;
                    let s = f64::from(a_s[kb]) * f64::from(b_s[kb]);
                    window_magnitude += wb.exact.abs() * s;
                    slack += wb.delta * s;
                }
            }
        }
        Accumulation::TensorCore {
            model,
            promote_interval,
        } => {
            let window = window_len(*promote_interval, k);
            for w0 in (0..k).step_by(window) {
                let w1 = (w0 + window).min(k);
                // the window's partial sum in the Tensor Core's limited accumulator
                let p = model.accumulate_e4m3(&a[w0..w1], &b[w0..w1]);
                // promoted with the scales of the window's (single) K-block
                let kb = w0 / block_size;
                acc += p * a_s[kb] * b_s[kb];
                magnitude += f64::from(p.abs()) * f64::from(a_s[kb]) * f64::from(b_s[kb]);
            }
        }
    }
    ScaledDot {
        c: acc,
        magnitude,
        window_magnitude,
        slack,
    }
}

/// Products per promotion window: `promote_interval`, or all of K (at least 1) when it is 0.
pub fn window_len(promote_interval: usize, k: usize) -> usize {
    if promote_interval == 0 {
        k.max(1)
    } else {
        promote_interval
    }
}

/// OFF `kernel.py fp8_gemm(a, a_s, b, b_s)`; V3 §3.3.2 (Fig. 7): the f32 accumulator of
/// `c = a·bᵀ` with per-tile scales (module docs).
///
/// Shapes: `a: [M, K]` E4M3 codes, `a_s: [M, ⌈K/B⌉]`, `b: [N, K]` E4M3 codes,
/// `b_s: [⌈N/B⌉, ⌈K/B⌉]` → `c: [M, N]` f32 (OFF stores it as bf16: round with
/// [`round_to_bf16`](crate::numeric::round_to_bf16)).
/// Errors: wrong shapes, NaN codes, scales that are not finite and positive, invalid model
/// parameters, a promotion window spanning blocks with different scales.
pub fn fp8_gemm(
    a: ArrayView2<u8>,
    a_s: ArrayView2<f32>,
    b: ArrayView2<u8>,
    b_s: ArrayView2<f32>,
    block_size: usize,
    accumulation: &Accumulation,
) -> Result<Array2<f32>> {
    gemm(
        "fp8_gemm",
        &OFF_NAMES,
        BlockScaled::tiles(a, a_s),
        BlockScaled::blocks(b, b_s),
        block_size,
        accumulation,
    )
}

/// [`fp8_gemm`] of two [`BlockScaled`] operands, `c = a·bᵀ` (each row of `b` with the scale row
/// its layout gives; Wgrad uses [`ScaleLayout::Row`] for `b`); `op` and `names` name the caller
/// and its operands in errors.
///
/// Shapes: `a.codes: [M, K]`, `b.codes: [N, K]` → `c: [M, N]` f32.
pub fn gemm(
    op: &'static str,
    names: &GemmNames,
    a: BlockScaled,
    b: BlockScaled,
    block_size: usize,
    accumulation: &Accumulation,
) -> Result<Array2<f32>> {
    check_gemm(op, names, a, b, block_size, accumulation)?;
    // rows as contiguous slices (transposed views, as Dgrad's Wᵀ, are copied once)
    let (a_codes, a_s) = (a.codes.as_standard_layout(), a.scales.as_standard_layout());
    let (b_codes, b_s) = (b.codes.as_standard_layout(), b.scales.as_standard_layout());
    let values = e4m3_values();
    let mut c = Array2::<f32>::zeros((a.codes.nrows(), b.codes.nrows()));
    for (i, mut c_row) in c.outer_iter_mut().enumerate() {
        output_row(
            c_row.as_slice_mut().expect("a fresh array is contiguous"),
            row(&a_codes, i),
            row(&a_s, a.scale_row(i, block_size)),
            (&b_codes, &b_s, b.layout),
            block_size,
            accumulation,
            &values,
        );
    }
    Ok(c)
}

/// `c_row[n] = scaled_dot(a_row, b[n])` for every row `n` of `b` (`b`, `b_s` in standard
/// layout, `b_s` rows chosen by the layout). Shapes: `c_row: [N]`, `a_row: [K]`,
/// `a_s_row: [⌈K/B⌉]`.
pub(crate) fn output_row(
    c_row: &mut [f32],
    a_row: &[u8],
    a_s_row: &[f32],
    (b, b_s, b_layout): (&Codes2, &Scales2, ScaleLayout),
    block_size: usize,
    accumulation: &Accumulation,
    values: &[f64; 256],
) {
    for (j, c) in c_row.iter_mut().enumerate() {
        let b_scale_row = match b_layout {
            ScaleLayout::Block => j / block_size,
            ScaleLayout::Row => j,
        };
        *c = scaled_dot(
            a_row,
            a_s_row,
            row(b, j),
            row(b_s, b_scale_row),
            block_size,
            accumulation,
            values,
        )
        .c;
    }
}

/// A matrix of codes / scales in standard layout.
pub(crate) type Codes2<'a> = ndarray::CowArray<'a, u8, ndarray::Ix2>;
pub(crate) type Scales2<'a> = ndarray::CowArray<'a, f32, ndarray::Ix2>;

/// Row `i` of a standard-layout matrix as a slice.
pub(crate) fn row<'a, T>(x: &'a ndarray::CowArray<'_, T, ndarray::Ix2>, i: usize) -> &'a [T] {
    x.row(i)
        .to_slice()
        .expect("standard layout rows are contiguous")
}

/// Validate the operands of [`gemm`]: shapes, NaN codes, scales, the accumulation's
/// parameters and its windows. Every error names the tensor and the index.
pub fn check_gemm(
    op: &'static str,
    names: &GemmNames,
    a: BlockScaled,
    b: BlockScaled,
    block_size: usize,
    accumulation: &Accumulation,
) -> Result<()> {
    check_setup(op, block_size, accumulation)?;
    let (k, kb) = (a.codes.ncols(), a.codes.ncols().div_ceil(block_size));
    let rule = |layout: ScaleLayout, rows: &str| match layout {
        ScaleLayout::Block => format!("[ceil({rows}/B), ceil(K/B)]"),
        ScaleLayout::Row => format!("[{rows}, ceil(K/B)]"),
    };
    let a_rule = rule(a.layout, "M");
    check_shape(
        op,
        names.a_s,
        a.scales.shape(),
        &[a.scale_rows(block_size), kb],
        &a_rule,
    )?;
    if b.codes.ncols() != k {
        return Err(Error::Shape {
            op,
            tensor: names.b,
            got: b.codes.shape().to_vec(),
            expected: format!("[N, K] with K = {k} (the last dim of {})", names.a),
        });
    }
    let b_rule = rule(b.layout, "N");
    check_shape(
        op,
        names.b_s,
        b.scales.shape(),
        &[b.scale_rows(block_size), kb],
        &b_rule,
    )?;
    for (codes, scales, name, name_s) in [
        (a.codes, a.scales, names.a, names.a_s),
        (b.codes, b.scales, names.b, names.b_s),
    ] {
        for (i, r) in codes.outer_iter().enumerate() {
            check_codes(op, name, r, &[i])?;
        }
        for (i, r) in scales.outer_iter().enumerate() {
            check_scales(op, name_s, r, &[i], block_size, k, accumulation)?;
        }
    }
    Ok(())
}

/// Block size and accumulation parameters.
pub fn check_setup(op: &'static str, block_size: usize, accumulation: &Accumulation) -> Result<()> {
    if block_size == 0 || block_size > MAX_EXACT_BLOCK {
        return Err(Error::Argument {
            op,
            name: "block_size",
            value: block_size.to_string(),
            why: format!("must be in 1..={MAX_EXACT_BLOCK} (a block dot must be exact in f64)"),
        });
    }
    if let Accumulation::TensorCore { model, .. } = accumulation {
        model.validate(op)?;
    }
    if let Accumulation::TensorCoreBound { bound, .. } = accumulation {
        bound.validate(op)?;
    }
    Ok(())
}

/// `got` must equal `want`; `rule` is the symbolic shape for the message.
pub fn check_shape(
    op: &'static str,
    tensor: &'static str,
    got: &[usize],
    want: &[usize],
    rule: &str,
) -> Result<()> {
    if got == want {
        return Ok(());
    }
    Err(Error::Shape {
        op,
        tensor,
        got: got.to_vec(),
        expected: format!("expected {rule} = {want:?}"),
    })
}

/// No E4M3 NaN code in one row; `at` is the row's index (the column is appended).
pub fn check_codes(
    op: &'static str,
    tensor: &'static str,
    row: ArrayView1<u8>,
    at: &[usize],
) -> Result<()> {
    // a contiguous row is first scanned in vector-friendly form: E4M3's NaN codes are exactly
    // 0x7F and 0xFF (`is_nan` below, tested on every code beside it)
    if let Some(codes) = row.as_slice() {
        if !codes.iter().fold(false, |nan, &c| nan | (c & 0x7F == 0x7F)) {
            return Ok(());
        }
    }
    match row.iter().position(|&c| E4M3.is_nan(u16::from(c))) {
        None => Ok(()),
        Some(j) => Err(Error::Value {
            op,
            tensor,
            index: [at, &[j]].concat(),
            value: format!("the E4M3 NaN code {:#04x}", row[j]),
            why: "GEMM operands hold no NaN codes",
        }),
    }
}

/// One row of scales (one per K-block): finite and positive, and constant across every
/// Tensor Core promotion window (module docs).
pub fn check_scales(
    op: &'static str,
    tensor: &'static str,
    row: ArrayView1<f32>,
    at: &[usize],
    block_size: usize,
    k: usize,
    accumulation: &Accumulation,
) -> Result<()> {
    if let Some(j) = row.iter().position(|v| !(v.is_finite() && *v > 0.0)) {
        return Err(Error::Value {
            op,
            tensor,
            index: [at, &[j]].concat(),
            value: row[j].to_string(),
            why: "scales must be finite and positive",
        });
    }
    if let Some(promote_interval) = accumulation.promote_interval() {
        let window = window_len(promote_interval, k);
        if matches!(accumulation, Accumulation::TensorCoreBound { .. }) && window > MAX_EXACT_BLOCK
        {
            return Err(Error::Argument {
                op,
                name: "promote_interval",
                value: promote_interval.to_string(),
                why: format!(
                    "a promotion window of {window} products: the bound needs exact window dots \
                     (at most {MAX_EXACT_BLOCK} products)"
                ),
            });
        }
        for w0 in (0..k).step_by(window) {
            let w1 = (w0 + window).min(k);
            let first = w0 / block_size;
            for j in first + 1..=(w1 - 1) / block_size {
                if row[j] != row[first] {
                    return Err(Error::Value {
                        op,
                        tensor,
                        index: [at, &[j]].concat(),
                        value: format!("{} (block {first} has {})", row[j], row[first]),
                        why: "a Tensor Core promotion window (promote_interval; 0 = all of K) \
                              spans K-blocks with different scales, but it accumulates under \
                              one scale pair",
                    });
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fp8::accumulate::HOPPER_FP8_WGMMA;
    use crate::fp8::format::Saturation;
    use ndarray::{array, Array2};

    /// `check_codes`' fast scan and the format's `is_nan` agree on every code, and a NaN code
    /// anywhere in a row (contiguous or strided) is reported at its index.
    #[test]
    fn the_fast_nan_scan_is_the_formats_on_every_code() {
        for c in 0..=255u8 {
            assert_eq!(c & 0x7F == 0x7F, E4M3.is_nan(u16::from(c)), "{c:#04x}");
        }
        for (j, nan) in [(0usize, 0x7Fu8), (5, 0xFF), (9, 0x7F)] {
            let mut row = Array2::<u8>::from_elem((2, 10), 0x7E);
            row[[1, j]] = nan;
            for view in [row.row(1), row.t().column(1)] {
                match check_codes("fp8_gemm", "a", view, &[1]) {
                    Err(Error::Value { index, .. }) => assert_eq!(index, vec![1, j]),
                    other => panic!("{other:?}"),
                }
            }
            assert!(check_codes("fp8_gemm", "a", row.row(0), &[0]).is_ok());
        }
    }

    fn codes(v: &[f32]) -> Vec<u8> {
        v.iter()
            .map(|&x| E4M3.encode(x, Saturation::NonSat) as u8)
            .collect()
    }

    #[test]
    fn fp8_gemm_scales_each_block_by_both_tiles() {
        // K = 3 with B = 2: blocks {0, 1} and the partial block {2}.
        // a = [1, 2, 3], b rows [1, 1, 1] and [2, 0, −1]; a_s = [0.5, 4], b_s = [[2, 0.25]] (N = 2 ≤ B).
        let a = Array2::from_shape_vec((1, 3), codes(&[1.0, 2.0, 3.0])).unwrap();
        let b = Array2::from_shape_vec((2, 3), codes(&[1.0, 1.0, 1.0, 2.0, 0.0, -1.0])).unwrap();
        let a_s = array![[0.5f32, 4.0]];
        let b_s = array![[2.0f32, 0.25]];
        let c = fp8_gemm(
            a.view(),
            a_s.view(),
            b.view(),
            b_s.view(),
            2,
            &Accumulation::Exact,
        )
        .unwrap();
        // c[0,0] = (1+2)·0.5·2 + 3·4·0.25 = 3 + 3 = 6; c[0,1] = 2·0.5·2 + (−3)·4·0.25 = 2 − 3 = −1
        assert_eq!(c, array![[6.0f32, -1.0]]);
    }

    #[test]
    fn exact_mode_rounds_the_block_dot_once() {
        // block dot 448·448 + 2^-9·2^-9 = 200704 + 2^-18: exact in f64, rounds to 200704 in f32.
        let a = Array2::from_shape_vec((1, 2), codes(&[448.0, 2f32.powi(-9)])).unwrap();
        let b = a.clone();
        let s = array![[1.0f32]];
        let c = fp8_gemm(
            a.view(),
            s.view(),
            b.view(),
            s.view(),
            128,
            &Accumulation::Exact,
        )
        .unwrap();
        assert_eq!(c[[0, 0]], 200704.0);
        // the scales multiply the rounded partial left to right: (p·a_s)·b_s in f32, with
        // p = 1·1 + 2·1 = 3, a_s = fl(1/3), b_s = 3.
        let a = Array2::from_shape_vec((1, 2), codes(&[1.0, 2.0])).unwrap();
        let b = Array2::from_shape_vec((1, 2), codes(&[1.0, 1.0])).unwrap();
        let (sa, sb) = (1.0f32 / 3.0, 3.0f32);
        let c = fp8_gemm(
            a.view(),
            array![[sa]].view(),
            b.view(),
            array![[sb]].view(),
            128,
            &Accumulation::Exact,
        )
        .unwrap();
        assert_eq!(c[[0, 0]], (3.0f32 * sa) * sb);
    }

    #[test]
    fn tensor_core_mode_loses_small_products_without_promotion() {
        // 64 products: 448·448 then 63 copies of 1·1. With the Hopper model and no promotion,
        // each step aligns to 2^16 (quantum 2^3 = 8): the ones are lost in every step, since
        // the running accumulator (≈ 2^17.6) stays in every step. Exact: 200704 + 63.
        let mut av = vec![448.0f32];
        av.extend(std::iter::repeat_n(1.0, 63));
        let a = Array2::from_shape_vec((1, 64), codes(&av)).unwrap();
        let s = array![[1.0f32]];
        let tc = Accumulation::TensorCore {
            model: HOPPER_FP8_WGMMA,
            promote_interval: 0,
        };
        let c = fp8_gemm(a.view(), s.view(), a.view(), s.view(), 128, &tc).unwrap();
        assert_eq!(c[[0, 0]], 200704.0);
        let exact = fp8_gemm(
            a.view(),
            s.view(),
            a.view(),
            s.view(),
            128,
            &Accumulation::Exact,
        )
        .unwrap();
        assert_eq!(exact[[0, 0]], 200767.0);
        // promoting every 32 products keeps the second window's 32 ones exactly
        let tc32 = Accumulation::TensorCore {
            model: HOPPER_FP8_WGMMA,
            promote_interval: 32,
        };
        let c = fp8_gemm(a.view(), s.view(), a.view(), s.view(), 128, &tc32).unwrap();
        assert_eq!(c[[0, 0]], 200704.0 + 32.0);
    }

    #[test]
    fn a_window_spanning_blocks_needs_equal_scales() {
        let a = Array2::from_elem((2, 4), 0x38u8);
        let a_s = array![[1.0f32, 1.0], [1.0, 2.0]];
        let b_s = array![[1.0f32, 1.0]];
        let tc = Accumulation::TensorCore {
            model: HOPPER_FP8_WGMMA,
            promote_interval: 4,
        };
        let e = fp8_gemm(a.view(), a_s.view(), a.view(), b_s.view(), 2, &tc).unwrap_err();
        assert!(
            matches!(e, Error::Value { tensor: "a_s", ref index, .. } if index == &vec![1, 1]),
            "{e}"
        );
        // promoting every block is fine with any scales
        let tc2 = Accumulation::TensorCore {
            model: HOPPER_FP8_WGMMA,
            promote_interval: 2,
        };
        assert!(fp8_gemm(a.view(), a_s.view(), a.view(), b_s.view(), 2, &tc2).is_ok());
    }

    #[test]
    fn bad_operands_are_named() {
        let a = Array2::from_elem((2, 3), 0x38u8);
        let s = array![[1.0f32, 1.0], [1.0, 1.0]];
        let b_s = array![[1.0f32, 1.0]];
        let mut bad = a.clone();
        bad[[1, 2]] = 0xFF;
        let e = fp8_gemm(
            bad.view(),
            s.view(),
            a.view(),
            b_s.view(),
            2,
            &Accumulation::Exact,
        )
        .unwrap_err();
        assert!(
            matches!(e, Error::Value { tensor: "a", ref index, .. } if index == &vec![1, 2]),
            "{e}"
        );
        let e = fp8_gemm(
            a.view(),
            s.view(),
            a.view(),
            s.view(),
            2,
            &Accumulation::Exact,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("b_s") && e.contains("[1, 2]"), "{e}");
        let zero = array![[1.0f32, 0.0], [1.0, 1.0]];
        let e = fp8_gemm(
            a.view(),
            zero.view(),
            a.view(),
            b_s.view(),
            2,
            &Accumulation::Exact,
        )
        .unwrap_err();
        assert!(matches!(e, Error::Value { tensor: "a_s", .. }), "{e}");
        let wrong_k = Array2::from_elem((2, 4), 0x38u8);
        let e = fp8_gemm(
            a.view(),
            s.view(),
            wrong_k.view(),
            b_s.view(),
            2,
            &Accumulation::Exact,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("K = 3"), "{e}");
    }
}
