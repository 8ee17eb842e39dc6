//! DeepSeek-V3's FP8 GEMM, piece by piece (V3 §3.3, Fig. 7): one 1×128 activation tile
//! quantized, one 128-deep block dot with its two scales, the Tensor Core's limited accumulation
//! and the promotion to FP32 every 128 products that fixes it.
//!
//!     cargo run --release --example fp8_gemm

use dsv3_reference::fp8::{act_quant, weight_quant, ScaleFmt, E4M3, HOPPER_FP8_WGMMA};
use dsv3_reference::rng::Rng;
use ndarray::Array2;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut rng = Rng::new(3);
    // 1. one 1×128 tile of activations, with one outlier
    let mut x: Vec<f32> = (0..128).map(|_| rng.normal() as f32).collect();
    x[17] = 9.5;
    let q = act_quant(
        Array2::from_shape_vec((1, 128), x.clone())?.view(),
        128,
        ScaleFmt::F32,
    )?;
    let s = q.s[[0, 0]];
    println!("1. one 1×128 activation tile (V3 §3.3.2: per-tile scaling):");
    println!(
        "   amax = {:.4} → s = amax / 448 = {s:.6e} (448: E4M3's largest value)",
        9.5
    );
    for j in [0usize, 1, 17] {
        let c = q.y[[0, j]];
        let back = E4M3.decode(u16::from(c)) * s;
        println!(
            "   x[{j:2}] = {:+.5} → x/s = {:+9.3} → code 0x{c:02x} = {:+8.3} → ·s = {back:+.5}",
            x[j],
            x[j] / s,
            E4M3.decode(u16::from(c))
        );
    }
    let worst = (0..128)
        .map(|j| ((E4M3.decode(u16::from(q.y[[0, j]])) * s - x[j]) / x[j]).abs())
        .fold(0f32, f32::max);
    println!("   largest relative error of the tile: {:.2}% (E4M3 keeps 3 mantissa bits: ≤ 6.25%, less near the top)", 100.0 * worst);

    // 2. one block dot: the tile against one 128×128 weight block
    let w = Array2::from_shape_fn((128, 128), |_| (rng.normal() * 0.05) as f32);
    let wq = weight_quant(w.view(), 128, ScaleFmt::F32)?;
    let (a, b): (Vec<u8>, Vec<u8>) = (
        (0..128).map(|k| q.y[[0, k]]).collect(),
        (0..128).map(|k| wq.y[[0, k]]).collect(),
    );
    let dot: f64 = a
        .iter()
        .zip(&b)
        .map(|(&p, &r)| f64::from(E4M3.decode(u16::from(p))) * f64::from(E4M3.decode(u16::from(r))))
        .sum();
    let c = dot * f64::from(s) * f64::from(wq.s[[0, 0]]);
    let exact: f64 = (0..128)
        .map(|k| f64::from(x[k]) * f64::from(w[[0, k]]))
        .sum();
    println!("\n2. one block dot (output n = 0): Σ_k a_k·b_k over 128 codes = {dot:.4}");
    println!("   × a_s × b_s ({s:.4e} × {:.4e}) = {c:.6}; the unquantized x·w = {exact:.6} ({:.2}% off: both operands quantized, and the sum cancels)", wq.s[[0, 0]], 100.0 * ((c - exact) / exact).abs());

    // 3. the Tensor Core: a long K accumulated in the wgmma's limited register
    let k = 4096;
    let codes = |rng: &mut Rng| -> Vec<u8> {
        (0..k)
            .map(|_| {
                E4M3.encode(
                    (rng.uniform() * 2.0) as f32,
                    dsv3_reference::fp8::Saturation::SatFinite,
                ) as u8
            })
            .collect()
    };
    let (a, b) = (codes(&mut rng), codes(&mut rng));
    let value = |c: u8| f64::from(E4M3.decode(u16::from(c)));
    let exact: f64 = a.iter().zip(&b).map(|(&p, &r)| value(p) * value(r)).sum();
    let m = HOPPER_FP8_WGMMA;
    let no_promotion = f64::from(m.accumulate_e4m3(&a, &b));
    // promotion (Fig. 7b): every N_C = 128 products the Tensor Core's partial sum is added to
    // an FP32 register on the CUDA cores, and the Tensor Core restarts from zero
    let promoted: f32 = a
        .chunks(128)
        .zip(b.chunks(128))
        .map(|(p, r)| m.accumulate_e4m3(p, r))
        .sum();
    println!("\n3. K = {k}, all-positive products (U[0,2) codes), the Hopper model (F = {} fraction bits, L = {} products per step, cut toward zero):", m.frac_bits, m.group);
    println!("   exact Σ a·b               = {exact:.3}");
    println!("   Tensor Core, no promotion = {no_promotion:.3} ({:.2}% low: each step drops what falls below 2^-{} of its largest term)", 100.0 * (exact - no_promotion) / exact, m.frac_bits);
    println!(
        "   promoted every 128        = {promoted:.3} ({:.4}% low)",
        100.0 * (exact - f64::from(promoted)) / exact
    );
    println!("   V3 §3.3.2 reports nearly 2% at K = 4096 on its inputs; all-positive products lose more, since");
    println!(
        "   nothing cancels. `dsv3 accum-study` sweeps K, the interval and the distributions."
    );
    Ok(())
}
