//! `cpu_act_quant/<M>x<K>`: the reference `act_quant` at DeepSeek-V3 activation widths.
//! Napkin math: reads 4 B and writes 1 B per element plus 4 B per 128-tile (≈ 5.03 B/element);
//! the reference is scalar and single-threaded by design, so this measures readability's price.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use dsv3_reference::fp8::{act_quant, ScaleFmt};
use ndarray::Array2;

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu_act_quant");
    for (m, k) in [(128usize, 7168usize), (128, 1536), (128, 16384)] {
        let x = Array2::from_shape_fn((m, k), |(i, j)| {
            (((i * 7919 + j * 104729) % 1000) as f32 - 500.0) * 1e-2
        });
        g.throughput(Throughput::Bytes((m * k * 5) as u64));
        for fmt in [ScaleFmt::F32, ScaleFmt::Ue8m0] {
            let id = BenchmarkId::new(format!("{fmt:?}"), format!("{m}x{k}"));
            g.bench_with_input(id, &x, |b, x| {
                b.iter(|| act_quant(x.view(), 128, fmt).unwrap())
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
