//! DeepSeek-V3's router, one step at a time (V3 §2.1.2, eqs. (12)–(16)), then the
//! auxiliary-loss-free bias update balancing the experts over a few steps.
//!
//!     cargo run --release --example moe_routing
//!
//! V3's routing shape: 256 routed experts in 8 groups (nodes), 4 groups kept, top-8.

use dsv3_reference::moe::bias_update::{bias_update, expert_load, BIAS_UPDATE_SPEED};
use dsv3_reference::moe::gate::{route, token_scores, GateConfig, ScoringFunc, TopkMethod};
use dsv3_reference::rng::Rng;
use ndarray::Array2;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cfg = GateConfig {
        top_k: 8,
        n_group: 8,
        topk_group: 4,
        scoring_func: ScoringFunc::Sigmoid,
        topk_method: TopkMethod::NoauxTc,
        norm_topk_prob: true,
        routed_scaling_factor: 2.5,
    };
    let e = 256;
    let mut rng = Rng::new(7);
    // router logits u = x·e_iᵀ of one token; experts 0..32 are a little "popular"
    let popular = |i: usize| if i < 32 { 0.8 } else { 0.0 };
    let u: Vec<f32> = (0..e).map(|i| (rng.normal() + popular(i)) as f32).collect();
    let mut bias = vec![0f32; e];

    println!(
        "one token, {e} experts in {} groups of {}:",
        cfg.n_group,
        e / cfg.n_group
    );
    let ts = token_scores(&u, Some(&bias), &cfg)?;
    println!(
        "  eq. (15) affinities s_i = σ(u_i): s_0 = σ({:+.3}) = {:.4}, s_1 = σ({:+.3}) = {:.4}, …",
        u[0], ts.affinity[0], u[1], ts.affinity[1]
    );
    println!("  eq. (16) selection scores s_i + b_i (b = 0 before any update)");
    let groups: Vec<String> = ts.groups.iter().map(|g| format!("{g:.3}")).collect();
    println!(
        "  group score = sum of the group's top-2 selection scores: [{}]",
        groups.join(", ")
    );
    println!(
        "  kept groups (top {}): {:?}  — node-limited routing: ≤ 4 nodes per token",
        cfg.topk_group, ts.kept_groups
    );
    let r = route(
        Array2::from_shape_vec((1, e), u.clone())?.view(),
        Some(&bias),
        &cfg,
    )?;
    let ids: Vec<usize> = r.ids.row(0).to_vec();
    println!("  top-{} experts of the kept groups: {ids:?}", cfg.top_k);
    let sum: f64 = ids.iter().map(|&i| ts.affinity[i]).sum();
    println!(
        "  eq. (13) g = s_i / Σ_sel s · {} (Σ_sel s = {sum:.4}):",
        cfg.routed_scaling_factor
    );
    for (k, &i) in ids.iter().enumerate() {
        println!(
            "    expert {i:3}: s = {:.4} → g = {:.4}",
            ts.affinity[i],
            r.weights[[0, k]]
        );
    }
    println!(
        "  Σ g = {:.4} (= routed_scaling_factor)",
        r.weights.row(0).sum()
    );

    // a batch whose tokens all prefer the popular experts; the bias update (γ = 0.001, §2.1.2)
    // pushes load away from them, step by step, without an auxiliary loss
    let tokens = 512;
    let batch: Vec<f32> = (0..tokens * e)
        .map(|j| (rng.normal() + popular(j % e)) as f32)
        .collect();
    let batch = Array2::from_shape_vec((tokens, e), batch)?;
    let gamma = BIAS_UPDATE_SPEED;
    println!("\nbias update b_i ← b_i + γ·sign(c̄ − c_i), γ = {gamma}, on {tokens} tokens (mean load c̄ = {}):", tokens * cfg.top_k / e);
    for step in 0..=60 {
        let r = route(batch.view(), Some(&bias), &cfg)?;
        let load = expert_load(r.ids.view(), e)?;
        let max = *load.iter().max().unwrap_or(&0);
        let on_popular: u64 = load[..32].iter().sum();
        if step % 10 == 0 {
            println!(
                "  step {step:2}: max load {max:3} ({:.2}× the mean), {:.1}% of the slots on the 32 popular experts, b_0 = {:+.3}",
                max as f64 / (tokens * cfg.top_k / e) as f64,
                100.0 * on_popular as f64 / (tokens * cfg.top_k) as f64,
                bias[0]
            );
        }
        bias_update(&mut bias, &load, gamma)?;
    }
    println!("  the gate weights still come from s (without b): the bias only chooses (eq. (16))");
    Ok(())
}
