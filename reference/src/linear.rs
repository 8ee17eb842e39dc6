//! Linear layers `y = x·Wᵀ (+ b)` over weights as a checkpoint stores them (F32, BF16, or FP8
//! codes with block scales), and the precision they run in.
//!
//! Weights are read on use, one strip of rows at a time, from the bytes a checkpoint maps into
//! memory: a 671B checkpoint's layer is never copied or dequantized as a whole.

use std::borrow::Cow;
use std::cell::Cell;

use half::bf16;
use ndarray::{s, Array2, ArrayView2};

use crate::error::{Error, Result};
use crate::fp8::{
    self, act_quant, act_quant_any_k, fp8_gemm, weight_quant, Accumulation, ScaleFmt,
};
use crate::numeric::bf16_round_f32;

/// Rows of a weight materialized at a time (the FP8 block edge of DeepSeek-V3).
const STRIP: usize = 128;

/// The tile edge of [`fp8_linear`] for weights not stored in FP8 (V3 §3.3.2: 1×128 activation
/// tiles, 128×128 weight blocks). FP8 checkpoint weights use their own `weight_block_size`.
pub const FP8_BLOCK: usize = 128;

/// The arithmetic a forward pass runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// Weights as f32 (BF16 widened exactly, FP8 dequantized `f32(q)·s` with one f32 rounding);
    /// activations f32; sums in f64.
    F32,
    /// Weights rounded to bf16 (FP8: OFF `weight_dequant` into the bf16 default dtype) and the
    /// inputs and outputs of every Linear rounded to bf16 (OFF's bf16 GEMMs with f32
    /// accumulation); norms, RoPE, softmax, routing and residual adds stay f32.
    Bf16,
    /// Every Linear the paper runs in FP8 (V3 §3.3: the Linears inside the blocks) through
    /// `act_quant` + the block-scaled FP8 GEMM ([`fp8_linear`]); embedding, head, gating, norms
    /// and attention in [`Precision::Bf16`]. `scale_fmt` is how activation tiles are scaled
    /// (the checkpoint's `quantization_config.scale_fmt`: `"ue8m0"` in V3.1).
    Fp8 { scale_fmt: ScaleFmt },
}

impl Precision {
    /// The precision of the components V3 §3.3 keeps out of FP8 (embedding, output head, MoE
    /// gating, the attention core): `Fp8` runs them in `Bf16`.
    pub fn outside_fp8(self) -> Precision {
        match self {
            Precision::Fp8 { .. } => Precision::Bf16,
            p => p,
        }
    }

    /// Whether weights and GEMM operands are rounded to bf16.
    pub fn rounds_to_bf16(self) -> bool {
        matches!(self, Precision::Bf16 | Precision::Fp8 { .. })
    }
}

/// How a weight's values are stored.
#[derive(Debug, Clone)]
pub enum Stored<'a> {
    /// f32 values (built in memory, e.g. by tests).
    Values(Array2<f32>),
    /// Little-endian F32 bytes of a checkpoint tensor.
    F32(Cow<'a, [u8]>),
    /// Little-endian BF16 bytes of a checkpoint tensor.
    Bf16(Cow<'a, [u8]>),
    /// E4M3 codes `[N, K]` and `weight_scale_inv` `[⌈N/B⌉, ⌈K/B⌉]` (B×B blocks, partial edge
    /// blocks allowed): the checkpoint's FP8 form, kept as is for the FP8 GEMM.
    Fp8 {
        codes: Cow<'a, [u8]>,
        scale_inv: Array2<f32>,
        block: usize,
    },
}

/// A named `[N, K]` matrix (`N` output features, `K` input features).
#[derive(Debug, Clone)]
pub struct Weight<'a> {
    /// The checkpoint name (`model.layers.0.self_attn.q_a_proj.weight`), for error messages.
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    pub stored: Stored<'a>,
}

impl<'a> Weight<'a> {
    /// An in-memory weight.
    pub fn from_values(name: impl Into<String>, values: Array2<f32>) -> Self {
        let (rows, cols) = values.dim();
        Weight {
            name: name.into(),
            rows,
            cols,
            stored: Stored::Values(values),
        }
    }

    /// Check that the stored data holds `[rows, cols]` (and, for FP8, a scale grid of
    /// `[⌈rows/B⌉, ⌈cols/B⌉]`).
    pub fn validate(&self) -> Result<()> {
        let numel = self.rows * self.cols;
        let (got, want) = match &self.stored {
            Stored::Values(v) => (v.len(), numel),
            Stored::F32(b) => (b.len(), 4 * numel),
            Stored::Bf16(b) => (b.len(), 2 * numel),
            Stored::Fp8 {
                codes,
                scale_inv,
                block,
            } => {
                if *block == 0 {
                    return Err(self.error(Error::Argument {
                        op: "weight",
                        name: "block",
                        value: "0".into(),
                        why: "FP8 blocks must be ≥ 1 wide".into(),
                    }));
                }
                let grid = [self.rows.div_ceil(*block), self.cols.div_ceil(*block)];
                if scale_inv.shape() != grid {
                    return Err(Error::Shape {
                        op: "weight",
                        tensor: "weight_scale_inv",
                        got: scale_inv.shape().to_vec(),
                        expected: format!(
                            "{grid:?} = [⌈{}/{block}⌉, ⌈{}/{block}⌉] for `{}`",
                            self.rows, self.cols, self.name
                        ),
                    });
                }
                (codes.len(), numel)
            }
        };
        if got != want {
            return Err(self.error(Error::Shape {
                op: "weight",
                tensor: "data",
                got: vec![got],
                expected: format!("{want} bytes/values for [{}, {}]", self.rows, self.cols),
            }));
        }
        Ok(())
    }

    fn error(&self, e: Error) -> Error {
        Error::InTensor {
            tensor: self.name.clone(),
            source: Box::new(e),
        }
    }

    /// Rows `r0..r1` as f32 values `[r1 − r0, K]`, rounded to bf16 when `to_bf16`. FP8 weights
    /// go through [`fp8::weight_dequant()`] one block row at a time: `w = f32(q)·s`.
    pub fn rows_f32(&self, r0: usize, r1: usize, to_bf16: bool) -> Result<Array2<f32>> {
        let k = self.cols;
        let mut out = Array2::<f32>::zeros((r1 - r0, k));
        match &self.stored {
            Stored::Values(v) => out.assign(&v.slice(s![r0..r1, ..])),
            Stored::F32(b) => {
                for (i, c) in b[4 * r0 * k..4 * r1 * k].chunks_exact(4).enumerate() {
                    out[[i / k, i % k]] = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            Stored::Bf16(b) => {
                for (i, c) in b[2 * r0 * k..2 * r1 * k].chunks_exact(2).enumerate() {
                    out[[i / k, i % k]] = bf16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            Stored::Fp8 {
                codes,
                scale_inv,
                block,
            } => {
                let b = *block;
                // one block row (≤ B rows of codes, one row of scales) per weight_dequant call
                for br in r0 / b..r1.div_ceil(b) {
                    let (n0, n1) = (br * b, ((br + 1) * b).min(self.rows));
                    let strip = ArrayView2::from_shape((n1 - n0, k), &codes[n0 * k..n1 * k])
                        .expect("validated length");
                    let w = fp8::weight_dequant(strip, scale_inv.slice(s![br..br + 1, ..]), b)
                        .map_err(|e| self.error(e))?;
                    for n in n0.max(r0)..n1.min(r1) {
                        out.row_mut(n - r0).assign(&w.row(n - n0));
                    }
                }
            }
        }
        if to_bf16 {
            out.mapv_inplace(bf16_round_f32);
        }
        Ok(out)
    }

    /// The whole matrix as f32 (for the small matrices the absorbed attention folds, `wkv_b`).
    pub fn to_f32(&self, to_bf16: bool) -> Result<Array2<f32>> {
        self.rows_f32(0, self.rows, to_bf16)
    }

    pub fn is_fp8(&self) -> bool {
        matches!(self.stored, Stored::Fp8 { .. })
    }
}

/// A Linear layer: weight `[N, K]` and an optional bias `[N]` (`attention_bias`).
#[derive(Debug, Clone)]
pub struct Linear<'a> {
    pub weight: Weight<'a>,
    pub bias: Option<Vec<f32>>,
}

impl<'a> Linear<'a> {
    pub fn new(weight: Weight<'a>) -> Self {
        Linear { weight, bias: None }
    }

    pub fn out_features(&self) -> usize {
        self.weight.rows
    }

    pub fn in_features(&self) -> usize {
        self.weight.cols
    }
}

/// A faster implementation of [`linear`] that computes the very same bits, or `None` to leave a
/// call to the readable loops below (which also produce every error). The reference never
/// installs one; the root crate's model fast path does, around a forward ([`with_backend`]).
pub type Backend = fn(ArrayView2<f32>, &Linear, Precision) -> Option<Result<Array2<f32>>>;

thread_local! {
    static BACKEND: Cell<Option<Backend>> = const { Cell::new(None) };
}

/// Run `f` with `backend` computing the [`linear`] calls made on this thread (`None`: the
/// readable loops), then restore the previous one (also when `f` panics).
pub fn with_backend<R>(backend: Option<Backend>, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<Backend>);
    impl Drop for Restore {
        fn drop(&mut self) {
            BACKEND.with(|b| b.set(self.0));
        }
    }
    let _restore = Restore(BACKEND.with(|b| b.replace(backend)));
    f()
}

/// `y[m, n] = Σ_k x[m, k] · W[n, k] (+ b[n])`.
///
/// OFF `linear()` / `nn.Linear`. Shapes: `x: [M, K]`, `W: [N, K]` → `y: [M, N]`. Sums in f64,
/// one rounding to f32. `Bf16` rounds `x`, `W` and `y` to bf16 (a bf16 GEMM with f32
/// accumulation); `Fp8` takes [`fp8_linear`] (callers pass `precision.outside_fp8()` for the
/// Linears V3 §3.3 keeps out of FP8).
pub fn linear(x: ArrayView2<f32>, l: &Linear, precision: Precision) -> Result<Array2<f32>> {
    if let Some(fast) = BACKEND.with(Cell::get) {
        if let Some(y) = fast(x, l, precision) {
            return y;
        }
    }
    let w = &l.weight;
    let (m_len, k_len) = x.dim();
    if k_len != w.cols {
        return Err(Error::Shape {
            op: "linear",
            tensor: "x",
            got: vec![m_len, k_len],
            expected: format!("[M, {}] (the in-features of `{}`)", w.cols, w.name),
        });
    }
    if let Some(b) = l.bias.as_ref().filter(|b| b.len() != w.rows) {
        return Err(w.error(Error::Shape {
            op: "linear",
            tensor: "bias",
            got: vec![b.len()],
            expected: format!("[{}] (the out-features of `{}`)", w.rows, w.name),
        }));
    }
    if let Precision::Fp8 { scale_fmt } = precision {
        return fp8_linear(x, l, scale_fmt);
    }
    let to_bf16 = precision.rounds_to_bf16();
    let x = if to_bf16 {
        x.mapv(bf16_round_f32)
    } else {
        x.to_owned()
    };
    let mut y = Array2::<f32>::zeros((m_len, w.rows));
    for n0 in (0..w.rows).step_by(STRIP) {
        let n1 = (n0 + STRIP).min(w.rows);
        let strip = w.rows_f32(n0, n1, to_bf16)?;
        for m in 0..m_len {
            for n in n0..n1 {
                let mut acc = 0f64;
                for k in 0..k_len {
                    acc += f64::from(x[[m, k]]) * f64::from(strip[[n - n0, k]]);
                }
                if let Some(b) = &l.bias {
                    acc += f64::from(b[n]);
                }
                y[[m, n]] = acc as f32;
            }
        }
    }
    if to_bf16 {
        y.mapv_inplace(bf16_round_f32);
    }
    Ok(y)
}

/// The FP8 path of a Linear (V3 §3.3.2, Fig. 7; OFF `linear()` with `gemm_impl = "fp8"`):
///
/// 1. the weight as E4M3 codes + block scales: an FP8 checkpoint weight ([`Stored::Fp8`]) as
///    stored (codes and `weight_scale_inv`, its `B×B` blocks); any other weight through
///    [`weight_quant()`] (`B = 128`, `scale_fmt`);
/// 2. `x` rounded to bf16 (OFF's activations are bf16 tensors), then `act_quant`: one scale per
///    token and `B` channels (`scale_fmt`; a partial last tile when `K % B ≠ 0`, see
///    [`act_quant_any_k`]);
/// 3. `y = bf16(fp8_gemm(x_q, s_x, W_q, W_s))`: exact block dots, f32 promotion per block (OFF's
///    Triton kernel), output rounded to bf16 as OFF's `fp8_gemm` stores it;
/// 4. the bias, if any, as OFF's `y += bias`: one more bf16 rounding.
///
/// Shapes: `x: [M, K]`, `W: [N, K]` → `y: [M, N]` (bf16 values held in f32).
/// Deviation: OFF HEAD forwards `scale_fmt` only from plain `Linear` (wq_a, wkv_a, routed
/// experts), not from Column/RowParallelLinear; we apply it to every FP8 Linear (SPEC.md).
pub fn fp8_linear(x: ArrayView2<f32>, l: &Linear, scale_fmt: ScaleFmt) -> Result<Array2<f32>> {
    fp8_linear_with(x, l, scale_fmt, &|a, a_s, b, b_s, block| {
        fp8_gemm(a, a_s, b, b_s, block, &Accumulation::Exact)
    })
}

/// The GEMM step of [`fp8_linear`]: `(x codes [M, K], x scales [M, ⌈K/B⌉], W codes [N, K],
/// W scales [⌈N/B⌉, ⌈K/B⌉], B)` → the f32 accumulators `[M, N]` of
/// [`fp8_gemm`] with exact block dots (it validates its operands).
pub type Fp8Gemm<'f> = &'f dyn Fn(
    ArrayView2<u8>,
    ArrayView2<f32>,
    ArrayView2<u8>,
    ArrayView2<f32>,
    usize,
) -> Result<Array2<f32>>;

/// [`fp8_linear`] with its GEMM step computed by `gemm` (a faster implementation of the same
/// bits, e.g. the root crate's fast path).
pub fn fp8_linear_with(
    x: ArrayView2<f32>,
    l: &Linear,
    scale_fmt: ScaleFmt,
    gemm: Fp8Gemm,
) -> Result<Array2<f32>> {
    let w = &l.weight;
    // pass 1: the weight's codes and block scales
    let quantized;
    let (codes, scales, block) = match &w.stored {
        Stored::Fp8 {
            codes,
            scale_inv,
            block,
        } => (
            ArrayView2::from_shape((w.rows, w.cols), &codes[..]).map_err(|_| {
                w.error(Error::Shape {
                    op: "fp8_linear",
                    tensor: "weight",
                    got: vec![codes.len()],
                    expected: format!("{} codes", w.rows * w.cols),
                })
            })?,
            scale_inv.view(),
            *block,
        ),
        _ => {
            quantized = weight_quant(w.to_f32(false)?.view(), FP8_BLOCK, scale_fmt)
                .map_err(|e| w.error(e))?;
            (quantized.y.view(), quantized.s.view(), FP8_BLOCK)
        }
    };
    // pass 2: bf16 activations in 1×B tiles (OFF's act_quant when B divides K)
    let x = x.mapv(bf16_round_f32);
    let xq = if x.ncols() % block == 0 {
        act_quant(x.view(), block, scale_fmt)?
    } else {
        act_quant_any_k(x.view(), block, scale_fmt)?
    };
    // pass 3: block-scaled GEMM with exact block dots, output in bf16
    let mut y = gemm(xq.y.view(), xq.s.view(), codes, scales, block).map_err(|e| w.error(e))?;
    y.mapv_inplace(bf16_round_f32);
    // pass 4: bias added to the bf16 output
    if let Some(b) = &l.bias {
        for mut row in y.rows_mut() {
            for (v, &bn) in row.iter_mut().zip(b) {
                *v = bf16_round_f32(*v + bn);
            }
        }
    }
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    fn bytes_f32(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn linear_computes_x_times_w_transposed_plus_bias() {
        let w = Weight::from_values("w", array![[1.0f32, 2.0], [3.0, 4.0], [0.5, -1.0]]);
        let l = Linear {
            weight: w,
            bias: Some(vec![0.0, 1.0, 0.0]),
        };
        let y = linear(array![[1.0f32, 1.0]].view(), &l, Precision::F32).unwrap();
        assert_eq!(y, array![[3.0f32, 8.0, -0.5]]);
    }

    #[test]
    fn linear_rejects_a_bias_of_the_wrong_length_in_every_precision() {
        let w = Weight::from_values("w", array![[1.0f32, 2.0], [3.0, 4.0], [0.5, -1.0]]);
        let l = Linear {
            weight: w,
            bias: Some(vec![0.0, 1.0]),
        };
        for p in [
            Precision::F32,
            Precision::Bf16,
            Precision::Fp8 {
                scale_fmt: ScaleFmt::F32,
            },
        ] {
            let err = linear(array![[1.0f32, 1.0]].view(), &l, p).unwrap_err();
            assert!(err.to_string().contains("bias"), "{p:?}: {err}");
        }
    }

    #[test]
    fn stored_forms_decode_to_the_same_values() {
        let v = array![[1.5f32, -2.0, 0.25], [3.0, 0.0, -0.125]];
        let flat: Vec<f32> = v.iter().copied().collect();
        let f32w = Weight {
            name: "a".into(),
            rows: 2,
            cols: 3,
            stored: Stored::F32(Cow::Owned(bytes_f32(&flat))),
        };
        let bf = Weight {
            name: "b".into(),
            rows: 2,
            cols: 3,
            stored: Stored::Bf16(Cow::Owned(
                flat.iter()
                    .flat_map(|x| bf16::from_f32(*x).to_le_bytes())
                    .collect(),
            )),
        };
        // E4M3 codes of 1.5, −2, 0.25, 3, 0, −0.125 at scale 1 (block 2: grid [1, 2])
        let fp8w = Weight {
            name: "c".into(),
            rows: 2,
            cols: 3,
            stored: Stored::Fp8 {
                codes: Cow::Owned(vec![0x3C, 0xC0, 0x28, 0x44, 0x00, 0xA0]),
                scale_inv: array![[1.0f32, 1.0]],
                block: 2,
            },
        };
        for w in [&f32w, &bf, &fp8w] {
            w.validate().unwrap();
            assert_eq!(w.to_f32(false).unwrap(), v, "{}", w.name);
            assert_eq!(w.rows_f32(1, 2, false).unwrap(), v.slice(s![1..2, ..]));
        }
    }

    #[test]
    fn fp8_rows_use_their_block_scale() {
        // 3 rows, block 2: rows 0-1 scale 0.5, row 2 (partial block) scale 4.
        let w = Weight {
            name: "w".into(),
            rows: 3,
            cols: 1,
            stored: Stored::Fp8 {
                codes: Cow::Owned(vec![0x38, 0x38, 0x38]), // 1.0
                scale_inv: array![[0.5f32], [4.0]],
                block: 2,
            },
        };
        assert_eq!(w.to_f32(false).unwrap(), array![[0.5f32], [0.5], [4.0]]);
        assert_eq!(w.rows_f32(2, 3, false).unwrap(), array![[4.0f32]]);
    }

    #[test]
    fn a_wrong_scale_grid_names_the_weight() {
        let w = Weight {
            name: "model.layers.0.mlp.down_proj.weight".into(),
            rows: 3,
            cols: 1,
            stored: Stored::Fp8 {
                codes: Cow::Owned(vec![0; 3]),
                scale_inv: array![[1.0f32]],
                block: 2,
            },
        };
        let e = w.validate().unwrap_err().to_string();
        assert!(e.contains("down_proj") && e.contains("[2, 1]"), "{e}");
    }

    #[test]
    fn bf16_precision_rounds_weights_inputs_and_outputs() {
        let (w, x) = (0.1f32, 3.3f32);
        let l = Linear::new(Weight::from_values("w", array![[w]]));
        let y32 = linear(array![[x]].view(), &l, Precision::F32).unwrap();
        let y16 = linear(array![[x]].view(), &l, Precision::Bf16).unwrap();
        assert_eq!(y32[[0, 0]], (f64::from(x) * f64::from(w)) as f32);
        let want = f64::from(bf16_round_f32(x)) * f64::from(bf16_round_f32(w));
        assert_eq!(y16[[0, 0]], bf16_round_f32(want as f32));
        assert_ne!(y32, y16);
    }

    /// `[rows, cols]` normal values with spread magnitudes (zero and tiny tiles included).
    fn normal(rows: usize, cols: usize, seed: u64) -> Array2<f32> {
        let mut rng = crate::rng::Rng::new(seed);
        Array2::from_shape_fn((rows, cols), |(r, _)| {
            (rng.normal() * 2f64.powi(r as i32 % 5 - 2)) as f32
        })
    }

    /// An FP8 checkpoint weight: `weight_quant` of `w` as codes + `weight_scale_inv`.
    fn fp8_weight(w: &Array2<f32>, block: usize) -> Weight<'static> {
        let q = weight_quant(w.view(), block, ScaleFmt::F32).unwrap();
        Weight {
            name: "model.layers.0.mlp.up_proj.weight".into(),
            rows: w.nrows(),
            cols: w.ncols(),
            stored: Stored::Fp8 {
                codes: Cow::Owned(q.y.iter().copied().collect()),
                scale_inv: q.s,
                block,
            },
        }
    }

    fn fp8(scale_fmt: ScaleFmt) -> Precision {
        Precision::Fp8 { scale_fmt }
    }

    #[test]
    fn fp8_linear_is_fp8_gemm_of_act_quant_and_the_stored_codes() {
        // K = 256 (two full 1×128 tiles), N = 200 (a partial block row of the weight)
        let (x, w) = (normal(5, 256, 1), normal(200, 256, 2));
        let weight = fp8_weight(&w, 128);
        let (codes, scale_inv) = match &weight.stored {
            Stored::Fp8 {
                codes, scale_inv, ..
            } => (
                Array2::from_shape_vec((200, 256), codes.to_vec()).unwrap(),
                scale_inv.clone(),
            ),
            _ => unreachable!(),
        };
        let bias: Vec<f32> = (0..200).map(|n| n as f32 * 0.37 - 30.0).collect();
        let l = Linear {
            weight,
            bias: Some(bias.clone()),
        };
        for scale_fmt in [ScaleFmt::F32, ScaleFmt::Ue8m0] {
            let y = linear(x.view(), &l, fp8(scale_fmt)).unwrap();
            // independently: bf16 activations, OFF act_quant, the GEMM, bf16, + bias in bf16
            let xq = act_quant(x.mapv(bf16_round_f32).view(), 128, scale_fmt).unwrap();
            let c = fp8_gemm(
                xq.y.view(),
                xq.s.view(),
                codes.view(),
                scale_inv.view(),
                128,
                &Accumulation::Exact,
            )
            .unwrap();
            let want = Array2::from_shape_fn(c.dim(), |(m, n)| {
                bf16_round_f32(bf16_round_f32(c[[m, n]]) + bias[n])
            });
            assert_eq!(y, want, "{scale_fmt:?}");
        }
        // the ue8m0 activation scales change the result
        assert_ne!(
            linear(x.view(), &l, fp8(ScaleFmt::F32)).unwrap(),
            linear(x.view(), &l, fp8(ScaleFmt::Ue8m0)).unwrap()
        );
    }

    #[test]
    fn fp8_linear_with_k_not_a_multiple_of_128_is_the_zero_padded_gemm() {
        // K = 144: the last K-block holds 16 columns. Zero-padding x and the codes to K = 256
        // (what DeepGEMM does) must give the same bits.
        let (x, w) = (normal(3, 144, 3), normal(136, 144, 4));
        let l = Linear::new(fp8_weight(&w, 128));
        let y = linear(x.view(), &l, fp8(ScaleFmt::F32)).unwrap();
        let mut xp = Array2::<f32>::zeros((3, 256));
        xp.slice_mut(s![.., ..144]).assign(&x.mapv(bf16_round_f32));
        let xq = act_quant(xp.view(), 128, ScaleFmt::F32).unwrap();
        let (codes, scale_inv) = match &l.weight.stored {
            Stored::Fp8 {
                codes, scale_inv, ..
            } => (codes.to_vec(), scale_inv.clone()),
            _ => unreachable!(),
        };
        let mut wp = Array2::<u8>::zeros((136, 256));
        wp.slice_mut(s![.., ..144])
            .assign(&Array2::from_shape_vec((136, 144), codes).unwrap());
        let c = fp8_gemm(
            xq.y.view(),
            xq.s.view(),
            wp.view(),
            scale_inv.view(),
            128,
            &Accumulation::Exact,
        )
        .unwrap();
        assert_eq!(y, c.mapv(bf16_round_f32));
    }

    #[test]
    fn fp8_linear_quantizes_other_weights_with_weight_quant() {
        let (x, w) = (normal(4, 256, 5), normal(130, 256, 6));
        let l = Linear::new(Weight::from_values("w", w.clone()));
        let y = linear(x.view(), &l, fp8(ScaleFmt::F32)).unwrap();
        // the same bits as the FP8 checkpoint weight weight_quant makes of it
        let stored = Linear::new(fp8_weight(&w, FP8_BLOCK));
        assert_eq!(y, linear(x.view(), &stored, fp8(ScaleFmt::F32)).unwrap());
        assert_ne!(y, linear(x.view(), &l, Precision::Bf16).unwrap());
    }
}
