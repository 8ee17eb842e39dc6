//! `cpu_fp8_gemm/<mode>/<M>x<N>x<K>`: the block-scaled FP8 GEMM on the CPU.
//! - `exact_fast`: the registry's exact path (`src/ops/gemm/fast/mod.rs`: f64 block dots by
//!   `matrixmultiply::dgemm`, rayon over rows), bit-identical to the reference;
//! - `exact_readable`: the reference's plain loop (`dsv3_reference::fp8::fp8_gemm`);
//! - `tensor_core_fast`: the Hopper Tensor Core model (F = 13, L = 32, promotion every 128) per
//!   element, rows in parallel.
//!
//! Napkin math: 2·M·N·K flops (reported as element throughput M·N·K multiply-adds). On 2 cores
//! with AVX2 FMA in f64 the peak is ≈ 2 cores × 8 FMA/cycle; the exact path also rounds and
//! scales M·N·⌈K/128⌉ partials in f32.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dsv3::ops::gemm::fast;
use dsv3_reference::fp8::{fp8_gemm, Accumulation, BlockScaled, HOPPER_FP8_WGMMA};
use ndarray::Array2;

/// Deterministic finite E4M3 codes (both signs, every exponent) and positive scales.
fn operands(m: usize, n: usize, k: usize) -> [Array2<u8>; 2] {
    let code = |i: usize| {
        let c = ((i.wrapping_mul(2654435761) >> 7) % 254) as u8;
        if c >= 0x7F {
            c + 1
        } else {
            c
        }
    };
    [
        Array2::from_shape_fn((m, k), |(i, j)| code(i * k + j)),
        Array2::from_shape_fn((n, k), |(i, j)| code(i * k + j + 17)),
    ]
}

fn scales(rows: usize, cols: usize) -> Array2<f32> {
    Array2::from_shape_fn((rows, cols), |(i, j)| {
        1e-3 * (1.0 + ((i * 31 + j * 17) % 97) as f32 / 97.0)
    })
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu_fp8_gemm");
    g.sample_size(10);
    let tc = Accumulation::TensorCore {
        model: HOPPER_FP8_WGMMA,
        promote_interval: 128,
    };
    // (mode, M, N, K): DeepSeek-V3 (N, K) pairs at reduced M; the readable loop and the
    // Tensor Core model are much slower, so they run at smaller M.
    let cases: &[(&str, usize, usize, usize)] = &[
        ("exact_fast", 512, 7168, 7168),
        ("exact_fast", 512, 2112, 7168),
        ("exact_fast", 512, 24576, 1536),
        ("exact_readable", 16, 2112, 7168),
        ("tensor_core_fast", 16, 2112, 7168),
    ];
    for &(mode, m, n, k) in cases {
        let [a, b] = operands(m, n, k);
        let (a_s, b_s) = (
            scales(m, k.div_ceil(128)),
            scales(n.div_ceil(128), k.div_ceil(128)),
        );
        g.throughput(Throughput::Elements((m * n * k) as u64));
        let id = BenchmarkId::new(mode, format!("{m}x{n}x{k}"));
        g.bench_function(id, |bench| {
            bench.iter(|| match mode {
                "exact_fast" => {
                    fast::gemm(
                        BlockScaled::tiles(a.view(), a_s.view()),
                        BlockScaled::blocks(b.view(), b_s.view()),
                        128,
                        &Accumulation::Exact,
                        false,
                    )
                    .c
                }
                "exact_readable" => fp8_gemm(
                    a.view(),
                    a_s.view(),
                    b.view(),
                    b_s.view(),
                    128,
                    &Accumulation::Exact,
                )
                .unwrap(),
                _ => {
                    fast::gemm(
                        BlockScaled::tiles(a.view(), a_s.view()),
                        BlockScaled::blocks(b.view(), b_s.view()),
                        128,
                        &tc,
                        false,
                    )
                    .c
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
