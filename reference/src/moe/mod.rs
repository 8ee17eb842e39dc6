//! DeepSeekMoE load balancing (V3 §2.1.2, eqs. 12–20) and expert placement for inference
//! (V3 §3.4, EPLB).
//!
//! - [`node_routing`]: which experts a token goes to: group-limited top-k (OFF `Gate.forward`) and
//!   the paper's node-limited routing, shown to be the same selection.
//! - [`bias_update`]: the auxiliary-loss-free bias `b_i` of eq. (16) and its per-step update.
//! - [`balance_loss`]: the complementary sequence-wise balance loss, eqs. (17)–(20), and its
//!   gradient.
//! - [`eplb`]: redundant experts and their placement on nodes and GPUs (deepseek-ai/EPLB).
//!
//! Dimension letters used here: `T` tokens (of one sequence for the balance loss), `E` routed
//! experts (`N_r` in the paper), `K` experts per token (`K_r`), `G` expert groups (= nodes in
//! node-limited routing).

pub mod balance_loss;
pub mod bias_update;
pub mod eplb;
pub mod node_routing;

pub use balance_loss::{balance_loss, balance_loss_grad, BalanceLoss};
pub use bias_update::{bias_update, bias_update_speed, expert_load};
pub use eplb::{rebalance_experts, Placement};
pub use node_routing::{group_limited_topk, node_limited_topk, topk_desc, RoutingConfig};
