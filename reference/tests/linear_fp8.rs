//! `LinearFp8` (V3 §3.3, Fig. 6): its output and both gradients match the f64 analytic values of
//! the unquantized Linear (`y = x·Wᵀ`, `dx = dy·W`, `dW = dyᵀ·x`, exact for a linear map, so
//! also what finite differences converge to) within a bound derived from the quantization error.
//!
//! # The bound
//! One element `v` of a tile with scale `s` is quantized as `q = e4m3(fl(v/s))`, and the GEMM
//! uses the exact value `q·s`. With `t = fl(v/s) = (v/s)(1+ε)`, `|ε| ≤ 2^-24`:
//! - E4M3 rounding: `|q − t| ≤ 2^-4·|t|` in the normal range (half a step of 2^(e−3)), and
//!   `≤ 2^-10` among subnormals (half of 2^-9); saturation at 448 only clips `t ≤ 448(1+2^-23)`,
//!   within the same bound;
//! - so `δ(v, s) := |q·s − v| ≤ s·|q − t| + s·|t − v/s| ≤ (2^-4 + 2^-23)·|v| + 2^-10·s`.
//!
//! Wgrad's `x` is quantized twice (1×128, dequantized in f32, re-tiled 128×1):
//! `δ₂ = δ(v, s₁) + 2^-24·(|v| + δ₁) + δ(|v| + 2δ₁, s₂)`.
//!
//! For `z = Σ_j u_j·w_j` computed from quantized operands: the quantization moves it by at most
//! `Σ_j (δu_j·|w_j| + |u_j|·δw_j + δu_j·δw_j)`; the f32 accumulation of the exact block dots
//! (W blocks, each rounded once, scaled twice, added) by at most `γ_{W+2}·Σ_j |ũ_j||w̃_j|` with
//! `|ũ| ≤ |u| + δu`, `γ_n = n·2^-24/(1 − n·2^-24)`; a bf16 output adds `2^-8·|z'|` with
//! `|z'| ≤ |z| + (both previous terms)`. Scales are bounded from the tile maxima:
//! `s ≤ max(amax, 1e-4)/448·(1 + 2^-23)` (f32) or `< 2·max(amax, 1e-4)/448` (ue8m0).

use dsv3_reference::fp8::linear_fp8::dgrad;
use dsv3_reference::fp8::{act_quant, Accumulation, LinearFp8, ScaleFmt};
use ndarray::{Array2, ArrayView2};

const B: usize = 128;

/// Deterministic Gaussian-like values (sum of 4 uniforms, centred) with a per-row magnitude.
fn matrix(rows: usize, cols: usize, seed: u64, row_spread: f64, scale: f64) -> Array2<f32> {
    let mut state = seed;
    let mut uniform = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut m = Array2::<f32>::zeros((rows, cols));
    for r in 0..rows {
        let mag = scale * (row_spread * (uniform() - 0.5)).exp();
        for c in 0..cols {
            let g = (uniform() + uniform() + uniform() + uniform() - 2.0) * 1.7;
            m[[r, c]] = (g * mag) as f32;
        }
    }
    m
}

/// Upper bound of a tile scale from the tile's absolute maximum.
fn scale_bound(amax: f64, fmt: ScaleFmt) -> f64 {
    let s = amax.max(1e-4) / 448.0;
    match fmt {
        ScaleFmt::F32 => s * (1.0 + 2f64.powi(-23)),
        ScaleFmt::Ue8m0 => 2.0 * s,
    }
}

/// `δ(v, s)` of the module docs.
fn delta(v: f64, s: f64) -> f64 {
    (2f64.powi(-4) + 2f64.powi(-23)) * v.abs() + 2f64.powi(-10) * s
}

/// Per-element quantization error bound of `x` in `tr × tc` tiles.
fn tile_error(x: ArrayView2<f64>, tr: usize, tc: usize, fmt: ScaleFmt) -> Array2<f64> {
    let (rows, cols) = x.dim();
    let mut amax = Array2::<f64>::zeros((rows.div_ceil(tr), cols.div_ceil(tc)));
    for ((r, c), v) in x.indexed_iter() {
        let a = &mut amax[[r / tr, c / tc]];
        *a = a.max(v.abs());
    }
    Array2::from_shape_fn((rows, cols), |(r, c)| {
        delta(x[[r, c]], scale_bound(amax[[r / tr, c / tc]], fmt))
    })
}

fn gamma(n: usize) -> f64 {
    let nu = n as f64 * 2f64.powi(-24);
    nu / (1.0 - nu)
}

/// `z = u·wᵀ` (f64) and the bound on a quantized evaluation of it: `u: [P, J]`, `w: [Q, J]`.
fn product_and_bound(
    u: &Array2<f64>,
    du: &Array2<f64>,
    w: &Array2<f64>,
    dw: &Array2<f64>,
    bf16_out: bool,
) -> (Array2<f64>, Array2<f64>) {
    let j_len = u.ncols();
    let partials = j_len.div_ceil(B);
    let z = u.dot(&w.t());
    let bound = Array2::from_shape_fn(z.dim(), |(p, q)| {
        let (mut quant, mut mag) = (0.0, 0.0);
        for j in 0..j_len {
            let (a, b, da, db) = (u[[p, j]].abs(), w[[q, j]].abs(), du[[p, j]], dw[[q, j]]);
            quant += da * b + a * db + da * db;
            mag += (a + da) * (b + db);
        }
        let pre = quant + gamma(partials + 2) * mag;
        if bf16_out {
            pre + 2f64.powi(-8) * (z[[p, q]].abs() + pre)
        } else {
            pre
        }
    });
    (z, bound)
}

/// Every element within its bound; returns the largest error/bound ratio.
fn assert_within(name: &str, got: &Array2<f32>, want: &Array2<f64>, bound: &Array2<f64>) -> f64 {
    let mut worst: f64 = 0.0;
    for ((i, j), &g) in got.indexed_iter() {
        let err = (f64::from(g) - want[[i, j]]).abs();
        assert!(
            err <= bound[[i, j]],
            "{name}[{i}, {j}]: got {g}, f64 analytic {}, |error| {err:e} > bound {:e}",
            want[[i, j]],
            bound[[i, j]]
        );
        worst = worst.max(err / bound[[i, j]]);
    }
    worst
}

fn run(fmt: ScaleFmt) {
    let (m, k, n) = (200, 384, 256); // 200 tokens: one full and one partial 128-token block
    let x = matrix(m, k, 7, 4.0, 1.0);
    let mut w = matrix(n, k, 11, 1.0, 0.02);
    // the second 128-row block of W 4× larger: its block scales differ from the first's
    w.slice_mut(ndarray::s![B.., ..]).mapv_inplace(|v| 4.0 * v);
    let dy = matrix(m, n, 13, 2.0, 1e-3);
    let lin = LinearFp8 {
        block_size: B,
        scale_fmt: fmt,
        accumulation: Accumulation::Exact,
    };
    let (y, cache) = lin.forward(x.view(), w.view()).unwrap();
    let (dx, dw) = lin.backward(dy.view(), &cache).unwrap();

    let (x64, w64, dy64) = (x.mapv(f64::from), w.mapv(f64::from), dy.mapv(f64::from));
    let ex = tile_error(x64.view(), 1, B, fmt);
    let ew = tile_error(w64.view(), B, B, fmt);
    let edy_rows = tile_error(dy64.view(), 1, B, fmt);
    let edy_cols = tile_error(dy64.view(), B, 1, fmt);
    // x re-tiled for Wgrad: δ₂ = δ₁ + 2^-24(|x| + δ₁) + δ(|x| + 2δ₁, s₂)
    let x_moved = Array2::from_shape_fn((m, k), |(i, j)| x64[[i, j]].abs() + 2.0 * ex[[i, j]]);
    let e2 = tile_error(x_moved.view(), B, 1, fmt);
    let ex_cols = Array2::from_shape_fn((m, k), |(i, j)| {
        ex[[i, j]] + 2f64.powi(-24) * (x64[[i, j]].abs() + ex[[i, j]]) + e2[[i, j]]
    });

    // y = x·Wᵀ (bf16), dx = dy·W (bf16), dW = dyᵀ·x (f32)
    let (y_true, y_bound) = product_and_bound(&x64, &ex, &w64, &ew, true);
    let (wt, ewt) = (w64.t().to_owned(), ew.t().to_owned());
    let (dx_true, dx_bound) = product_and_bound(&dy64, &edy_rows, &wt, &ewt, true);
    let (dyt, edyt) = (dy64.t().to_owned(), edy_cols.t().to_owned());
    let (xt, ext) = (x64.t().to_owned(), ex_cols.t().to_owned());
    let (dw_true, dw_bound) = product_and_bound(&dyt, &edyt, &xt, &ext, false);

    let ry = assert_within("y", &y, &y_true, &y_bound);
    let rdx = assert_within("dx", &dx, &dx_true, &dx_bound);
    let rdw = assert_within("dw", &dw, &dw_true, &dw_bound);
    println!("{fmt:?}: max |error|/bound: y {ry:.3}, dx {rdx:.3}, dw {rdw:.3}");
    // the bound is not vacuous: the errors use a visible part of it
    assert!(ry > 0.05 && rdx > 0.05 && rdw > 0.05, "{ry} {rdx} {rdw}");

    // and it catches a backward with a layout bug: Dgrad with the weight's block scales of
    // the two N-blocks swapped
    let mut swapped = cache.w.s.clone();
    for c in 0..swapped.ncols() {
        swapped.swap([0, c], [1, c]);
    }
    let dyq = act_quant(dy.view(), B, fmt).unwrap();
    let bad = dgrad(
        dyq.y.view(),
        dyq.s.view(),
        cache.w.y.view(),
        swapped.view(),
        B,
        &Accumulation::Exact,
    )
    .unwrap();
    let violations = bad
        .indexed_iter()
        .filter(|&((i, j), &g)| (f64::from(g) - dx_true[[i, j]]).abs() > dx_bound[[i, j]])
        .count();
    assert!(violations > 0, "a swapped-scale Dgrad passes the bound");
}

#[test]
fn linear_fp8_gradients_match_f64_analytic_within_the_quantization_bound() {
    run(ScaleFmt::F32);
}

#[test]
fn linear_fp8_gradients_with_ue8m0_scales_match_f64_analytic() {
    run(ScaleFmt::Ue8m0);
}
