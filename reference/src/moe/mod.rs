//! DeepSeekMoE (V3 eq. (12); OFF `MoE`, HF `DeepseekV3MoE`): a router picks `top_k` of the
//! routed experts per token, their SwiGLU outputs are summed with the gate weights, and the
//! shared experts see every token.
//!
//! Load balancing (V3 §2.1.2, eqs. 12–20) and expert placement for inference
//! (V3 §3.4, EPLB).
//!
//! - [`gate`]: the router of the model (eqs. (13)–(16)), [`Moe`]: the expert mixture.
//! - [`node_routing`]: which experts a token goes to: group-limited top-k (OFF `Gate.forward`) and
//!   the paper's node-limited routing, shown to be the same selection.
//! - [`bias_update`]: the auxiliary-loss-free bias `b_i` of eq. (16) and its per-step update.
//! - [`balance_loss`]: the complementary sequence-wise balance loss, eqs. (17)–(20), and its
//!   gradient.
//! - [`eplb`]: redundant experts and their placement on nodes and GPUs (deepseek-ai/EPLB).
//! - [`permute`]: dispatch and combine on one rank in DeepGEMM's contiguous layout.
//! - [`gate::moe_gate_backward`]: the router's gradient, the selection held.
//!
//! Dimension letters used here: `T` tokens (of one sequence for the balance loss), `E` routed
//! experts (`N_r` in the paper), `K` experts per token (`K_r`), `G` expert groups (= nodes in
//! node-limited routing).

pub mod balance_loss;
pub mod bias_update;
pub mod eplb;
pub mod gate;
pub mod node_routing;
pub mod permute;

pub use balance_loss::{balance_loss, balance_loss_grad, BalanceLoss};
pub use bias_update::{bias_update, bias_update_speed, expert_load};
pub use eplb::{rebalance_experts, Placement};
pub use node_routing::{group_limited_topk, node_limited_topk, topk_desc, RoutingConfig};

use ndarray::{Array2, ArrayView2};

use crate::error::Result;
use crate::linear::{linear, Linear, Precision};
use crate::mlp::Mlp;
pub use gate::{route, GateConfig, Routing, ScoringFunc, TopkMethod};

/// The weights of one MoE layer.
#[derive(Debug, Clone)]
pub struct Moe<'a> {
    /// Expert centroids `e_i` `[E, D]` (`mlp.gate.weight`).
    pub gate: Linear<'a>,
    /// `b_i` `[E]` (`mlp.gate.e_score_correction_bias`; `noaux_tc` only).
    pub bias: Option<Vec<f32>>,
    /// Routed experts (`mlp.experts.{i}`), each `[moe_intermediate_size]` wide.
    pub experts: Vec<Mlp<'a>>,
    /// The shared experts as one MLP `[n_shared · moe_intermediate_size]` wide
    /// (`mlp.shared_experts`); `None` when `n_shared_experts` is 0.
    pub shared: Option<Mlp<'a>>,
}

impl Moe<'_> {
    /// `h' = Σ_shared FFN(u) + Σ_i g_{i,t} FFN_i(u)` (eq. (12) without the residual, which the
    /// block adds). The router runs at `precision.outside_fp8()` (V3 §3.3 keeps gating out of
    /// FP8). Experts are visited in ascending index, each on the tokens routed to it (OFF's
    /// order); the weighted outputs are summed in f64. Shapes: `x: [N, D]` → `[N, D]`.
    pub fn forward(
        &self,
        x: ArrayView2<f32>,
        cfg: &GateConfig,
        precision: Precision,
    ) -> Result<Array2<f32>> {
        Ok(self.forward_routed(x, cfg, precision)?.0)
    }

    /// [`Moe::forward`] and the router's decision it followed.
    pub fn forward_routed(
        &self,
        x: ArrayView2<f32>,
        cfg: &GateConfig,
        precision: Precision,
    ) -> Result<(Array2<f32>, Routing)> {
        let (n_len, d) = x.dim();
        // router: logits u = x·eᵀ, then eqs. (13)-(16)
        let logits = linear(x, &self.gate, precision.outside_fp8())?;
        let r = route(logits.view(), self.bias.as_deref(), cfg)?;
        // routed experts, in ascending expert index
        let mut acc = Array2::<f64>::zeros((n_len, d));
        for (e, expert) in self.experts.iter().enumerate() {
            // (token, gate weight) pairs routed to expert e
            let mut hits: Vec<(usize, f32)> = Vec::new();
            for n in 0..n_len {
                for j in 0..cfg.top_k {
                    if r.ids[[n, j]] == e {
                        hits.push((n, r.weights[[n, j]]));
                    }
                }
            }
            if hits.is_empty() {
                continue;
            }
            let mut xe = Array2::<f32>::zeros((hits.len(), d));
            for (row, &(n, _)) in hits.iter().enumerate() {
                xe.row_mut(row).assign(&x.row(n));
            }
            let ye = expert.forward(xe.view(), precision)?;
            for (row, &(n, w)) in hits.iter().enumerate() {
                for c in 0..d {
                    acc[[n, c]] += f64::from(w) * f64::from(ye[[row, c]]);
                }
            }
        }
        // shared experts see every token
        if let Some(shared) = &self.shared {
            let z = shared.forward(x, precision)?;
            acc.zip_mut_with(&z, |a, &v| *a += f64::from(v));
        }
        Ok((acc.mapv(|v| v as f32), r))
    }
}
