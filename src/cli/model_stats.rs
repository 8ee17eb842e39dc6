//! `dsv3 model-stats`: a DeepSeek-V3-style model's arithmetic from its config
//! ([`dsv3::studies::model_stats`]).

use std::path::PathBuf;

use dsv3::studies::model_stats::{
    billions, model_stats, ModelStats, H800_BF16_TFLOPS, H800_FP8_TFLOPS,
};
use dsv3::studies::plot::{Bar, BarChart, Scale};
use dsv3::Result;

#[derive(clap::Args)]
pub struct Args {
    /// A config.json, or a model directory holding one.
    #[arg(long)]
    config: PathBuf,
    /// Print everything as one JSON object instead of the text report.
    #[arg(long)]
    json: bool,
    /// Write model-stats-params.svg (parameters by component) and model-stats-kv.svg (KV-cache
    /// bytes, MLA against MHA) into this folder.
    #[arg(long)]
    svg_dir: Option<PathBuf>,
    /// Context lengths (tokens) for the KV-cache and attention-FLOP figures; repeatable
    /// (default 4096, 32768, 131072).
    #[arg(long = "context", value_parser = clap::value_parser!(u32).range(1..))]
    contexts: Vec<u32>,
}

fn gb(bytes: u64) -> String {
    format!("{:.2} GB", bytes as f64 / 1e9)
}

fn b(x: u64) -> String {
    if x >= 1_000_000_000 {
        format!("{:.2}B", x as f64 / 1e9)
    } else if x >= 1_000_000 {
        format!("{:.2}M", x as f64 / 1e6)
    } else if x >= 10_000 {
        format!("{:.1}K", x as f64 / 1e3)
    } else {
        format!("{x}")
    }
}

pub fn run(a: Args) -> Result<bool> {
    let path = if a.config.is_dir() {
        a.config.join("config.json")
    } else {
        a.config.clone()
    };
    let parsed = dsv3::model::checkpoint::config::read(&path)?;
    let contexts: Vec<usize> = if a.contexts.is_empty() {
        dsv3::studies::model_stats::CONTEXTS.to_vec()
    } else {
        a.contexts.iter().map(|&c| c as usize).collect()
    };
    let s = model_stats(
        &parsed.model,
        parsed.fp8.as_ref().map(|f| f.block),
        &contexts,
    );
    if a.json {
        let mut v = serde_json::to_value(&s).expect("serializable");
        v["config"] = serde_json::Value::String(path.display().to_string());
        println!(
            "{}",
            serde_json::to_string_pretty(&v).expect("serializable")
        );
    } else {
        print_report(&s, &path.display().to_string());
    }
    if let Some(dir) = a.svg_dir {
        std::fs::create_dir_all(&dir)
            .map_err(|e| dsv3::Error::Usage(format!("{}: {e}", dir.display())))?;
        for (name, svg) in plots(&s) {
            let p = dir.join(name);
            dsv3::registry::io::write_file(&p, svg.as_bytes())?;
            eprintln!("wrote {}", p.display());
        }
    }
    Ok(true)
}

fn print_report(s: &ModelStats, config: &str) {
    println!("{config}");
    println!("parameters by component:");
    println!(
        "  {:<18} {:>12} {:>12} {:>7}",
        "component", "total", "activated", "layers"
    );
    for c in &s.components {
        println!(
            "  {:<18} {:>12} {:>12} {:>7}",
            c.name,
            b(c.params),
            b(c.activated),
            c.layers
        );
    }
    println!(
        "  total {} (≈ {}B); activated per token {} (≈ {}B; {} with the embedding lookup)",
        b(s.total),
        billions(s.total),
        b(s.activated),
        billions(s.activated),
        b(s.activated_with_embedding)
    );
    println!(
        "  MTP modules {} ({} with the stored embedding and head); FP8 scales {}; hub count {} (≈ {}B = {}B main + {}B MTP)",
        b(s.mtp),
        b(s.mtp_with_copies),
        b(s.fp8_scales),
        b(s.hub_count),
        billions(s.hub_count),
        billions(s.total),
        billions(s.hub_count) - billions(s.total)
    );
    let k = &s.kv_cache;
    println!("KV cache per token per layer:");
    println!(
        "  MLA {} values (c_kv + k_pe): {} B BF16, {} B FP8 ({} B in FlashMLA's FP8 layout); MHA with the same heads {} values: {} B BF16, {} B FP8 ({:.1}× MLA)",
        k.mla_values,
        2 * k.mla_values,
        k.mla_values,
        k.mla_flashmla_fp8_bytes,
        k.mha_values,
        2 * k.mha_values,
        k.mha_values,
        k.mha_values as f64 / k.mla_values as f64
    );
    println!(
        "  whole model:  {:>8} {:>12} {:>12} {:>12} {:>12}",
        "context", "MLA BF16", "MLA FP8", "MHA BF16", "MHA FP8"
    );
    for c in &k.per_context {
        println!(
            "                {:>8} {:>12} {:>12} {:>12} {:>12}",
            c.context,
            gb(c.mla_bf16_bytes),
            gb(c.mla_fp8_bytes),
            gb(c.mha_bf16_bytes),
            gb(c.mha_fp8_bytes)
        );
    }
    println!("forward FLOPs per token:");
    println!(
        "  GEMMs {:.1} GFLOP (2 × activated parameters)",
        s.flops.gemm_per_token / 1e9
    );
    for (t, f) in &s.flops.attention_per_token {
        println!(
            "  attention at context {t}: {:.1} GFLOP (total {:.1})",
            f / 1e9,
            (f + s.flops.gemm_per_token) / 1e9
        );
    }
    let t = &s.training;
    println!("training (V3 §4, Table 1):");
    println!(
        "  6·N·D = 6 × {} × {:.1}T tokens = {:.3e} FLOPs (attention not included)",
        b(s.activated),
        t.tokens / 1e12,
        t.flops
    );
    println!(
        "  GPU-hours: {:.0}K pre-training + {:.0}K context extension + {:.0}K post-training = {:.0}K, ${:.3}M at $2/GPU-hour",
        t.pretrain_gpu_hours / 1e3,
        dsv3::studies::model_stats::CONTEXT_EXTENSION_GPU_HOURS / 1e3,
        dsv3::studies::model_stats::POST_TRAINING_GPU_HOURS / 1e3,
        t.total_gpu_hours / 1e3,
        t.cost_dollars / 1e6
    );
    println!(
        "  {:.0}K GPU-hours per trillion tokens ({:.1} days on 2048 H800s)",
        t.gpu_hours_per_trillion_tokens / 1e3,
        t.days_on_cluster_per_trillion_tokens
    );
    println!(
        "  implied {:.0} TFLOP/s per GPU: {:.1}% of the H800's dense BF16 peak ({H800_BF16_TFLOPS}), {:.1}% of FP8 ({H800_FP8_TFLOPS})",
        t.implied_tflops_per_gpu,
        100.0 * t.utilization_of_bf16_peak,
        100.0 * t.utilization_of_fp8_peak
    );
    let c = &s.communication;
    println!("MoE dispatch/combine per token (node-limited routing):");
    println!(
        "  ≤ {} nodes over IB: dispatch {} B (FP8 {} B per node incl. 1×128 f32 scales), combine {} B (BF16)",
        c.nodes, c.dispatch_bytes_ib, c.dispatch_bytes_per_destination, c.combine_bytes_ib
    );
    println!(
        "  to the routed experts' GPUs (NVLink): dispatch {} B, combine {} B",
        c.dispatch_bytes_nvlink, c.combine_bytes_nvlink
    );
}

/// The two SVG figures.
pub fn plots(s: &ModelStats) -> Vec<(&'static str, String)> {
    let mut bars: Vec<Bar> = s
        .components
        .iter()
        .filter(|c| c.params > 0)
        .map(|c| Bar {
            label: c.name.to_string(),
            value: c.params as f64,
            text: b(c.params),
            color: 0,
        })
        .collect();
    bars.push(Bar {
        label: "MTP module (+ copies)".into(),
        value: s.mtp_with_copies as f64,
        text: b(s.mtp_with_copies),
        color: 2,
    });
    bars.push(Bar {
        label: "total".into(),
        value: s.total as f64,
        text: b(s.total),
        color: 1,
    });
    bars.push(Bar {
        label: "activated per token".into(),
        value: s.activated as f64,
        text: b(s.activated),
        color: 3,
    });
    let params = BarChart {
        title: "Parameters by component (log scale)".into(),
        x_label: "parameters".into(),
        scale: Scale::Log10,
        bars,
    };
    let k = &s.kv_cache;
    let mut kv = vec![
        Bar {
            label: "MLA BF16".into(),
            value: (2 * k.mla_values) as f64,
            text: format!("{} B", 2 * k.mla_values),
            color: 0,
        },
        Bar {
            label: "MLA FP8 (FlashMLA)".into(),
            value: k.mla_flashmla_fp8_bytes as f64,
            text: format!("{} B", k.mla_flashmla_fp8_bytes),
            color: 0,
        },
        Bar {
            label: "MHA BF16".into(),
            value: (2 * k.mha_values) as f64,
            text: format!("{} B", 2 * k.mha_values),
            color: 1,
        },
        Bar {
            label: "MHA FP8".into(),
            value: k.mha_values as f64,
            text: format!("{} B", k.mha_values),
            color: 1,
        },
    ];
    if let Some(c) = k.per_context.iter().find(|c| c.context == 131072) {
        kv.push(Bar {
            label: "MLA BF16, 128K, model".into(),
            value: c.mla_bf16_bytes as f64,
            text: gb(c.mla_bf16_bytes),
            color: 2,
        });
        kv.push(Bar {
            label: "MHA BF16, 128K, model".into(),
            value: c.mha_bf16_bytes as f64,
            text: gb(c.mha_bf16_bytes),
            color: 3,
        });
    }
    let kv = BarChart {
        title: "KV cache: bytes per token per layer, and the whole model at 128K (log scale)"
            .into(),
        x_label: "bytes".into(),
        scale: Scale::Log10,
        bars: kv,
    };
    vec![
        ("model-stats-params.svg", params.to_svg()),
        ("model-stats-kv.svg", kv.to_svg()),
    ]
}
