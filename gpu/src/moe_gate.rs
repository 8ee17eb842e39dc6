//! Wrapper of `kernels/moe_gate.cu` (reference: `dsv3_reference::moe::gate::route` after the
//! f32 logits `x·Wᵀ`).

use cudarc::driver::{LaunchConfig, PushKernelArg};

use crate::error::{Error, Result};
use crate::kernels::MOE_GATE;
use crate::runtime::{grid_1d, Gpu};

/// How experts are selected (the reference's `TopkMethod`, in the kernel's codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Bias for selection, groups scored by their top-2 sum (V3).
    NoauxTc = 0,
    /// Top-k over all experts.
    Greedy = 1,
    /// Groups scored by their max, no bias (V2).
    GroupLimitedGreedy = 2,
}

/// The routing hyper-parameters (the reference's `GateConfig`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Params {
    pub top_k: usize,
    pub n_group: usize,
    pub topk_group: usize,
    /// `true`: sigmoid affinities; `false`: softmax.
    pub sigmoid: bool,
    pub method: Method,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f64,
}

/// The routing of `N` tokens: `top_k` weights and expert ids per token, best first.
pub struct Routing {
    pub weights: Vec<f32>,
    pub ids: Vec<i64>,
}

/// Route `x: [N, D]` with `weight: [E, D]` and `bias: [E]` (f32 values; bf16 inputs widen
/// exactly). Checks the invariants the kernel's indexing relies on; the reference's
/// `GateConfig::validate` gives the user-facing errors first.
pub fn moe_gate(
    gpu: &Gpu,
    x: &[f32],
    weight: &[f32],
    bias: &[f32],
    (n, e, d): (usize, usize, usize),
    p: &Params,
) -> Result<Routing> {
    const OP: &str = "moe_gate";
    let bad = |msg: String| Err(Error::Argument { op: OP, msg });
    if x.len() != n * d || weight.len() != e * d || bias.len() != e {
        return bad(format!(
            "x has {} values, weight {}, bias {}; expected N·D = {n}·{d}, E·D = {e}·{d}, E",
            x.len(),
            weight.len(),
            bias.len()
        ));
    }
    let grouped = p.n_group > 1 && p.method != Method::Greedy;
    let kept = if grouped {
        p.topk_group * (e / p.n_group.max(1))
    } else {
        e
    };
    if p.top_k == 0
        || p.n_group == 0
        || e % p.n_group != 0
        || (grouped && (p.topk_group == 0 || p.topk_group > p.n_group))
        || (grouped && p.method == Method::NoauxTc && e / p.n_group < 2)
        || p.top_k > kept
    {
        return bad(format!("invalid routing parameters {p:?} for E = {e}"));
    }
    if [n, e, d, p.top_k, p.n_group, p.topk_group]
        .iter()
        .any(|&v| v > i32::MAX as usize)
    {
        return bad("sizes must fit in i32".into());
    }
    if n == 0 {
        return Ok(Routing {
            weights: Vec::new(),
            ids: Vec::new(),
        });
    }
    let stream = gpu.stream();
    let d_x = stream.clone_htod(if x.is_empty() { &[0f32][..] } else { x })?;
    let d_w = stream.clone_htod(if weight.is_empty() {
        &[0f32][..]
    } else {
        weight
    })?;
    let d_bias = stream.clone_htod(bias)?;
    let mut d_u = stream.alloc_zeros::<f32>(n * e)?;
    let mut d_scratch = stream.alloc_zeros::<f64>(n * (2 * e + p.n_group))?;
    let mut d_weights = stream.alloc_zeros::<f32>(n * p.top_k)?;
    let mut d_ids = stream.alloc_zeros::<i64>(n * p.top_k)?;
    let (n_arg, e_arg, d_arg) = (n as i32, e as i32, d as i32);

    // the logits: one warp per (token, expert), 8 warps per block
    let f = gpu.function(&MOE_GATE, "moe_gate_logits")?;
    let mut launch = stream.launch_builder(&f);
    launch
        .arg(&d_x)
        .arg(&d_w)
        .arg(&mut d_u)
        .arg(&n_arg)
        .arg(&e_arg)
        .arg(&d_arg);
    let cfg = LaunchConfig {
        grid_dim: grid_1d(OP, (n * e).div_ceil(8))?,
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: argument types and order match `moe_gate_logits`; warp (n, e) reads row n of x
    // and row e of w (D values each) and writes u[n·E + e], guarded by n·E.
    unsafe { launch.launch(cfg) }?;

    // the routing: one thread per token
    let (k_arg, g_arg, tg_arg) = (p.top_k as i32, p.n_group as i32, p.topk_group as i32);
    let (sig_arg, method_arg, norm_arg) = (
        i32::from(p.sigmoid),
        p.method as i32,
        i32::from(p.norm_topk_prob),
    );
    let f = gpu.function(&MOE_GATE, "moe_gate_route")?;
    let mut launch = stream.launch_builder(&f);
    launch
        .arg(&d_u)
        .arg(&d_bias)
        .arg(&mut d_scratch)
        .arg(&mut d_weights)
        .arg(&mut d_ids)
        .arg(&n_arg)
        .arg(&e_arg)
        .arg(&k_arg)
        .arg(&g_arg)
        .arg(&tg_arg)
        .arg(&sig_arg)
        .arg(&method_arg)
        .arg(&norm_arg)
        .arg(&p.routed_scaling_factor);
    let cfg = LaunchConfig {
        grid_dim: grid_1d(OP, n.div_ceil(128))?,
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: argument types and order match `moe_gate_route`; thread n uses row n of u, its own
    // 2E + n_group scratch values and top_k output slots; the parameters were checked above so
    // that every argmax finds an untaken entry.
    unsafe { launch.launch(cfg) }?;
    Ok(Routing {
        weights: stream.clone_dtoh(&d_weights)?,
        ids: stream.clone_dtoh(&d_ids)?,
    })
}
