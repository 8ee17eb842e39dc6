//! `dsv3 gpu-bench`: the GPU kernels timed at DeepSeek-V3 shapes.

use dsv3::{Error, Result};

#[derive(clap::Args)]
pub struct Args {
    /// Fail (exit 2) when no device is present.
    #[arg(long)]
    require: bool,
    /// Fewer shapes and repetitions.
    #[arg(long)]
    quick: bool,
}

pub fn run(a: Args) -> Result<bool> {
    let (require, quick) = (a.require, a.quick);
    #[cfg(not(feature = "cuda"))]
    {
        let why = dsv3::registry::gpu::device().err().unwrap_or_default();
        if require {
            return Err(Error::Usage(format!("gpu-bench --require: {why}")));
        }
        println!("SKIP gpu-bench: {why}");
        let _ = quick;
        Ok(true)
    }
    #[cfg(feature = "cuda")]
    bench(require, quick)
}

#[cfg(feature = "cuda")]
fn bench(require: bool, quick: bool) -> Result<bool> {
    use dsv3_gpu::bench::{
        bench_act_quant, bench_copy, bench_fp8_gemm, bench_mla_decode, BenchRow,
    };
    use dsv3_gpu::fp8_gemm::Backend;
    let gpu = match dsv3::registry::gpu::device() {
        Ok(g) => g,
        Err(why) if require => {
            return Err(Error::Usage(format!(
                "gpu-bench --require: no usable GPU: {why}"
            )))
        }
        Err(why) => {
            println!("SKIP gpu-bench: {why}");
            return Ok(true);
        }
    };
    println!("gpu-bench on {}", gpu.description);
    // (N, K) of DeepSeek-V3's Linears (DeepGEMM's test shapes), M tokens
    let nk: &[(usize, usize)] = if quick {
        &[(7168, 2048), (4096, 7168)]
    } else {
        &[
            (2112, 7168),
            (24576, 1536),
            (32768, 512),
            (7168, 16384),
            (4096, 7168),
            (7168, 2048),
        ]
    };
    let ms: &[usize] = if quick {
        &[128, 4096]
    } else {
        &[64, 128, 4096]
    };
    let mut rows: Vec<BenchRow> = vec![bench_copy(gpu, 1 << 30)?];
    for &(m, k) in &[(4096usize, 7168usize), (4096, 16384)] {
        rows.push(bench_act_quant(gpu, m, k)?);
    }
    for &(n, k) in nk {
        for &m in ms {
            rows.push(bench_fp8_gemm(
                gpu,
                Backend::Wgmma,
                (m, n, k),
                if m >= 4096 { 5 } else { 20 },
            )?);
        }
        rows.push(bench_fp8_gemm(gpu, Backend::Simt, (128, n, k), 2)?);
    }
    // FlashMLA's decode benchmark: b = 128, h_q = 128, s_q ∈ {1, 2}, T cached tokens
    let lens: &[usize] = if quick { &[4096] } else { &[4096, 16384] };
    for &len in lens {
        for s_q in [1, 2] {
            rows.push(bench_mla_decode(gpu, (128, s_q, 128, len), 5)?);
        }
    }
    let mut t = dsv3::registry::table::Table::new(&["kernel", "shape", "ms", "TFLOP/s", "GB/s"]);
    for r in rows {
        t.row(vec![
            r.kernel,
            r.shape,
            format!("{:.4}", r.ms),
            r.tflops.map_or("-".into(), |v| format!("{v:.1}")),
            r.gbps.map_or("-".into(), |v| format!("{v:.0}")),
        ]);
    }
    print!("{}", t.render());
    Ok(true)
}
