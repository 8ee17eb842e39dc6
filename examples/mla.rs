//! One token through Multi-head Latent Attention (V3 §2.1.1, eqs. (1)–(11)) at DeepSeek-V3's
//! head shapes: what is cached, and the absorbed form giving the naive form's output.
//!
//!     cargo run --release --example mla
//!
//! V3's per-head shapes (nope 128, rope 64, value 128, latent 512, query latent 1536) with 2
//! heads and a model width of 512 instead of 128 heads and 7168, so that it runs in a second.

use dsv3_reference::linear::{Linear, Precision, Weight};
use dsv3_reference::mla::{LatentCache, Mla, MlaConfig, QProj};
use dsv3_reference::rng::Rng;
use dsv3_reference::rope::{RopeConfig, Yarn};
use ndarray::{s, Array2};

fn weight(rng: &mut Rng, name: &str, rows: usize, cols: usize) -> Linear<'static> {
    let scale = (cols as f64).powf(-0.5);
    let w = Array2::from_shape_fn((rows, cols), |_| (rng.normal() * scale) as f32);
    Linear::new(Weight::from_values(name, w))
}

fn head(v: &[f32], n: usize) -> String {
    let shown: Vec<String> = v.iter().take(n).map(|x| format!("{x:+.4}")).collect();
    format!("[{}, …]", shown.join(", "))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (d, h) = (512, 2);
    let (dn, dr, dv, dc, dq) = (128, 64, 128, 512, 1536);
    let rope = RopeConfig {
        dim: dr,
        theta: 10000.0,
        yarn: Some(Yarn {
            factor: 40.0,
            original_max_position_embeddings: 4096,
            beta_fast: 32.0,
            beta_slow: 1.0,
            mscale_all_dim: 1.0,
        }),
        interleaved: true,
    };
    let cfg = MlaConfig {
        n_heads: h,
        q_lora_rank: Some(dq),
        kv_lora_rank: dc,
        qk_nope_head_dim: dn,
        qk_rope_head_dim: dr,
        v_head_dim: dv,
        // (dn + dr)^-1/2 · mscale² (YaRN, §4.3): the scale V3 attends with
        softmax_scale: ((dn + dr) as f64).powf(-0.5) * rope.softmax_scale_factor(),
        inv_freq: rope.inv_freqs()?,
        rope_interleaved: true,
    };
    let mut rng = Rng::new(2024);
    let mla = Mla {
        q: QProj::Lora {
            wq_a: weight(&mut rng, "wq_a", dq, d),
            q_norm: vec![1.0; dq],
            wq_b: weight(&mut rng, "wq_b", h * (dn + dr), dq),
        },
        wkv_a: weight(&mut rng, "wkv_a", dc + dr, d),
        kv_norm: vec![1.0; dc],
        wkv_b: weight(&mut rng, "wkv_b", h * (dn + dv), dc),
        wo: weight(&mut rng, "wo", d, h * dv),
    };
    println!("MLA at V3's head shapes: H = {h} heads (V3: 128), D = {d} (V3: 7168)");
    println!(
        "  eq. (1)  c_kv = W^DKV h        : wkv_a rows 0..{dc}    → c_kv [{dc}] (then kv_norm)"
    );
    println!(
        "  eq. (3)  k^R  = RoPE(W^KR h)   : wkv_a rows {dc}..{}  → k_pe [{dr}], one for all heads",
        dc + dr
    );
    println!("  eq. (2)  k^C  = W^UK c_kv      : wkv_b                → [{h}, {dn}] per token");
    println!("  eq. (5)  v^C  = W^UV c_kv      : wkv_b                → [{h}, {dv}] per token");
    println!(
        "  eqs. (6)–(8) q = W^UQ norm(W^DQ h), RoPE on the last {dr} dims → [{h}, {}]",
        dn + dr
    );
    println!(
        "  softmax scale (dn + dr)^-1/2 · mscale² = {:.6}",
        cfg.softmax_scale
    );

    let tokens = 5;
    let x = Array2::from_shape_fn((tokens, d), |_| rng.normal() as f32);
    // the naive form: per-head keys and values expanded from the latent, ordinary attention
    let naive = mla.forward_naive(x.view(), &cfg, Precision::F32)?;
    // the absorbed form: the first 4 tokens fill the latent cache, the 5th is decoded against it
    let mut cache = LatentCache::default();
    mla.forward_absorbed(
        x.slice(s![..tokens - 1, ..]),
        &mut cache,
        &cfg,
        Precision::F32,
    )?;
    println!(
        "\nprefill of {} tokens: the latent cache holds c_kv {}×{} and k_pe {}×{}",
        tokens - 1,
        cache.len(),
        cache.c_kv[0].len(),
        cache.len(),
        cache.k_pe[0].len()
    );
    println!("  token 0 c_kv {}", head(&cache.c_kv[0], 4));
    println!("  token 0 k_pe {}", head(&cache.k_pe[0], 4));
    let per_token = dc + dr;
    let mha = 128 * ((dn + dr) + dv);
    println!(
        "  cached per token and layer: {per_token} values ({} B in BF16); an MHA with V3's 128 heads caches {mha} ({} B): {:.0}× more",
        2 * per_token,
        2 * mha,
        mha as f64 / per_token as f64
    );
    let y = mla.forward_absorbed(
        x.slice(s![tokens - 1.., ..]),
        &mut cache,
        &cfg,
        Precision::F32,
    )?;
    println!(
        "\ndecode of token {} (absorbed: W^UK folded into the query, W^UV into the output)",
        tokens - 1
    );
    println!(
        "  absorbed output {}",
        head(y.row(0).as_slice().unwrap(), 5)
    );
    println!(
        "  naive output    {}",
        head(naive.row(tokens - 1).to_vec().as_slice(), 5)
    );
    let max_diff = y
        .row(0)
        .iter()
        .zip(naive.row(tokens - 1))
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    let max_abs = naive
        .row(tokens - 1)
        .iter()
        .fold(0f32, |m, v| m.max(v.abs()));
    println!("  max |absorbed − naive| = {max_diff:.2e} ({:.1e} of the largest output): the same function, other f32 roundings", max_diff / max_abs);
    assert!(
        max_diff / max_abs < 1e-5,
        "absorbed and naive forms disagree"
    );
    Ok(())
}
