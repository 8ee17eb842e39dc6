//! `adamw_step`, `param_ema` and `clip_grad_norm`: the optimizer side of V3 §3.3.3 / §4.2.

use dsv3_reference::train::adamw::{self, adamw_element_f32, AdamWConfig, StepCoefficients};
use dsv3_reference::train::{clip, ema};
use half::bf16;

use super::bound_policy::{bound_policy, interval_policy};
use super::gen_fits;
use super::{get, outputs};
use crate::registry::compare::Policy;
use crate::registry::config::{ceil, Config, ConfigSchema, FieldKind};
use crate::registry::contract::{Dim, TensorSpec};
use crate::registry::error::{Error, Result, Role};
use crate::registry::io::TensorMap;
use crate::registry::rng::Rng;
use crate::registry::tensor::{DType, Tensor};
use crate::registry::tolerance::unit_roundoff;
use crate::registry::{OpEntry, PolicyCtx, Sizes};

const FLOATS: &[DType] = &[DType::F32, DType::F64];
const MOMENTS: &[DType] = &[DType::F32, DType::BF16, DType::F64];
const EMA_FLOATS: &[DType] = &[DType::F32, DType::BF16, DType::F64];

crate::op_config! {
    /// `adamw_step`'s config: the hyper-parameters of one update.
    pub struct AdamwStepConfig {
        lr: f64 = "0.00022", FieldKind::PositiveFloat, "learning rate of this step (peak 2.2e-4)";
        beta1: f64 = "0.9", FieldKind::NonNegativeFloat, "β1 < 1";
        beta2: f64 = "0.95", FieldKind::PositiveFloat, "β2 < 1";
        eps: f64 = "1e-8", FieldKind::PositiveFloat, "ε (not stated in V3; torch default)";
        weight_decay: f64 = "0.1", FieldKind::NonNegativeFloat, "decoupled weight decay";
        step: usize = "1", FieldKind::Int { min: 1, max: ceil::I32 }, "t ≥ 1 of this update (bias correction)";
    }
}

crate::op_config! {
    /// `param_ema`'s config.
    pub struct ParamEmaConfig {
        decay: f64 = "0.999", FieldKind::NonNegativeFloat, "decay < 1 (not stated in V3)";
    }
}

crate::op_config! {
    /// `clip_grad_norm`'s config.
    pub struct ClipGradNormConfig {
        max_norm: f64 = "1.0", FieldKind::PositiveFloat, "V3: 1.0";
    }
}

pub static ADAMW_STEP: OpEntry = OpEntry {
    name: "adamw_step",
    source: "V3 §4.2 (β1 0.9, β2 0.95, wd 0.1), §3.3.3 (BF16 moments, FP32 master weights); torch.optim.AdamW single-tensor algorithm",
    summary: "p ← p(1−lr·wd); m ← m+(1−β1)(g−m); v ← β2v+(1−β2)g²; p ← p − lr/(1−β1^t)·m/(√v/√(1−β2^t)+ε). dtypes (param, moments): (F64, F64), (F32, F32), or (F32, BF16) = FP32 master + BF16 moments",
    inputs: &[
        TensorSpec { name: "param", dtypes: FLOATS, shape: &[Dim::Var("N")], doc: "master weights (F32, or F64 for the yardstick)" },
        TensorSpec { name: "grad", dtypes: FLOATS, shape: &[Dim::Var("N")], doc: "gradient, same dtype as param" },
        TensorSpec { name: "exp_avg", dtypes: MOMENTS, shape: &[Dim::Var("N")], doc: "first moment m (BF16 with an F32 param = V3's storage)" },
        TensorSpec { name: "exp_avg_sq", dtypes: MOMENTS, shape: &[Dim::Var("N")], doc: "second moment v, same dtype as exp_avg" },
    ],
    outputs: &[
        TensorSpec { name: "param_out", dtypes: FLOATS, shape: &[Dim::Var("N")], doc: "updated weights" },
        TensorSpec { name: "exp_avg_out", dtypes: MOMENTS, shape: &[Dim::Var("N")], doc: "updated m (stored dtype)" },
        TensorSpec { name: "exp_avg_sq_out", dtypes: MOMENTS, shape: &[Dim::Var("N")], doc: "updated v (stored dtype)" },
    ],
    constraints: &[],
    config: ConfigSchema::of::<AdamwStepConfig>(),
    adapt: None,
    reference: adamw_step_ref,
    reference_fn: "reference/src/train/adamw.rs::adamw_step_bf16",
    gpu: &[],
    policy: adamw_step_policy,
    policy_doc: "per element, twice the first-order rounding bound of the update formula in the working precision (SPEC.md \"adamw_step tolerance\"); BF16 moments: the BF16 rounding of any value within that bound of our f32 moment",
    generate: adamw_step_gen,
    test_configs: &[r#"{"step":10}"#, r#"{"step":1000,"lr":0.001,"weight_decay":0.01}"#, r#"{"step":3,"beta1":0.0,"weight_decay":0.0}"#],
    v3_sizes: &[&[("N", 7168)]],
};

fn hyper(cfg: &Config) -> AdamWConfig {
    let c = cfg.get::<AdamwStepConfig>();
    AdamWConfig {
        lr: c.lr,
        beta1: c.beta1,
        beta2: c.beta2,
        eps: c.eps,
        weight_decay: c.weight_decay,
    }
}

/// The precision combination of the inputs, or an error naming the odd tensor.
fn precision(inputs: &TensorMap) -> Result<(DType, DType)> {
    let p = get(inputs, "param").dtype;
    let m = get(inputs, "exp_avg").dtype;
    let mismatch = |name: &str, got: DType, expected: String| Error::DType {
        op: "adamw_step",
        role: Role::Input,
        name: name.into(),
        got: got.name().into(),
        expected,
        hint: " (supported: param/grad F64 with F64 moments, F32 with F32 or BF16 moments)".into(),
    };
    for (name, want) in [("grad", p), ("exp_avg_sq", m)] {
        let got = get(inputs, name).dtype;
        if got != want {
            return Err(mismatch(name, got, want.name().into()));
        }
    }
    match (p, m) {
        (DType::F64, DType::F64) | (DType::F32, DType::F32) | (DType::F32, DType::BF16) => {
            Ok((p, m))
        }
        _ => Err(mismatch(
            "exp_avg",
            m,
            if p == DType::F64 {
                "F64".into()
            } else {
                "F32 or BF16".into()
            },
        )),
    }
}

fn adamw_step_ref(inputs: &TensorMap, cfg: &Config) -> Result<TensorMap> {
    let (pd, md) = precision(inputs)?;
    let hp = hyper(cfg);
    let step = cfg.get::<AdamwStepConfig>().step as u64;
    let n = get(inputs, "param").numel();
    let [mut p, g, mut m, mut v] =
        ["param", "grad", "exp_avg", "exp_avg_sq"].map(|k| (get(inputs, k)).values());
    match (pd, md) {
        (DType::F64, _) => adamw::adamw_step_f64(&mut p, &g, &mut m, &mut v, step, &hp)?,
        _ => {
            let f32s = |x: &[f64]| x.iter().map(|&v| v as f32).collect::<Vec<f32>>();
            let (mut p32, g32) = (f32s(&p), f32s(&g));
            if md == DType::BF16 {
                let bf = |x: &[f64]| x.iter().map(|&v| bf16::from_f64(v)).collect::<Vec<bf16>>();
                let (mut mb, mut vb) = (bf(&m), bf(&v));
                adamw::adamw_step_bf16(&mut p32, &g32, &mut mb, &mut vb, step, &hp)?;
                m = mb.iter().map(|x| f64::from(x.to_f32())).collect();
                v = vb.iter().map(|x| f64::from(x.to_f32())).collect();
            } else {
                let (mut m32, mut v32) = (f32s(&m), f32s(&v));
                adamw::adamw_step_f32(&mut p32, &g32, &mut m32, &mut v32, step, &hp)?;
                m = m32.iter().map(|&x| f64::from(x)).collect();
                v = v32.iter().map(|&x| f64::from(x)).collect();
            }
            p = p32.iter().map(|&x| f64::from(x)).collect();
        }
    }
    Ok(outputs([
        ("param_out", Tensor::from_f64_as(pd, vec![n], &p)),
        ("exp_avg_out", Tensor::from_f64_as(md, vec![n], &m)),
        ("exp_avg_sq_out", Tensor::from_f64_as(md, vec![n], &v)),
    ]))
}

/// First-order rounding bounds `(E_p, E_m, E_v)` of one element's update when every operation
/// (and every scalar coefficient) is rounded once with unit roundoff `u`; SPEC.md derives them.
fn adamw_bounds(p: f64, g: f64, m: f64, v: f64, c: &StepCoefficients, u: f64) -> (f64, f64, f64) {
    let m1 = m + c.w1 * (g - m);
    let v1 = v * c.beta2 + c.w2 * g * g;
    let sq = v1.sqrt();
    let d = sq / c.bc2_sqrt + c.eps;
    let upd = c.neg_step_size.abs() * m1.abs() / d;
    let p1 = p * c.decay - upd * m1.signum();
    // m' = m + w1(g − m): sub, coefficient, mul (3u on the product, +1 for second order), add
    let e_m = u * (m1.abs() + 4.0 * c.w1 * (g - m).abs());
    // v' = β2 v + w2 g g: 2u on β2v, 4u on the product, u on the sum
    let e_v = u * (v1.abs() + 2.0 * c.beta2 * v.abs() + 4.0 * c.w2 * g * g);
    // √: propagated (|√a − √b| ≤ min(|a−b|/(2√a), √|a−b|)) plus its own rounding
    let e_sq = (if sq > 0.0 {
        e_v / (2.0 * sq)
    } else {
        f64::INFINITY
    })
    .min(e_v.sqrt())
        + u * sq;
    // d = √v'/c + ε: coefficient and division 2u, add u·d
    let e_d = e_sq / c.bc2_sqrt + 3.0 * u * sq / c.bc2_sqrt + u * d;
    // step·m/d: m and d errors propagated, coefficient, mul, div
    let e_upd = c.neg_step_size.abs() * (e_m / d + m1.abs() * e_d / (d * d)) + 3.0 * u * upd;
    // p·decay (coefficient, mul) and the final add
    let e_p = u * (2.0 * (p * c.decay).abs() + p1.abs()) + e_upd;
    (e_p, e_m, e_v)
}

fn adamw_step_policy<'a>(ctx: &PolicyCtx<'a>) -> Policy<'a> {
    let Ok((pd, md)) = precision(ctx.inputs) else {
        return Policy::Exact;
    };
    let Ok(c) = StepCoefficients::new(
        &hyper(ctx.config),
        ctx.config.get::<AdamwStepConfig>().step as u64,
    ) else {
        return Policy::Exact;
    };
    // working precision: f64 for the yardstick, f32 otherwise (BF16 only for storage)
    let u = unit_roundoff(pd);
    let [p, g, m, v] =
        ["param", "grad", "exp_avg", "exp_avg_sq"].map(|k| (get(ctx.inputs, k)).values());
    let which = match ctx.output {
        "param_out" => 0,
        "exp_avg_out" => 1,
        _ => 2,
    };
    let bounds: Vec<f64> = (0..p.len())
        .map(|i| {
            let (ep, em, ev) = adamw_bounds(p[i], g[i], m[i], v[i], &c, u);
            2.0 * [ep, em, ev][which]
        })
        .collect();
    if which == 0 || md != DType::BF16 {
        return bound_policy(
            ctx,
            "within twice the rounding bound of the update",
            &bounds,
        );
    }
    // BF16 storage: the rounding of any f32 moment within the bound of ours
    let (mut lo, mut hi) = (Vec::new(), Vec::new());
    for i in 0..p.len() {
        let (_, m1, v1) = adamw_element_f32(p[i] as f32, g[i] as f32, m[i] as f32, v[i] as f32, &c);
        let x = f64::from(if which == 1 { m1 } else { v1 });
        lo.push(f64::from(bf16::from_f64(x - bounds[i]).to_f32()));
        hi.push(f64::from(bf16::from_f64(x + bounds[i]).to_f32()));
    }
    interval_policy(
        ctx,
        "the BF16 rounding of a value within twice the rounding bound of the f32 moment",
        lo,
        hi,
    )
}

/// One of the three precision combinations; a state that looks like a few hundred steps in
/// (|m| ~ |g|/3, v ~ g²).
fn adamw_step_gen(rng: &mut Rng, _: &Config, sizes: &Sizes) -> Result<TensorMap> {
    let n = sizes.get("N").copied().unwrap_or_else(|| rng.range(1, 64));
    gen_fits(&[&[n], &[n], &[n], &[n]])?;
    let gs = (rng.normal() * 2.0).exp() * 1e-3;
    let (pd, md) = *rng.pick(&[
        (DType::F64, DType::F64),
        (DType::F32, DType::F32),
        (DType::F32, DType::BF16),
    ]);
    let mut col = |scale: f64, square: bool| -> Vec<f64> {
        (0..n)
            .map(|_| {
                let x = rng.normal() * scale;
                if square {
                    x * x
                } else {
                    x
                }
            })
            .collect()
    };
    let (p, g, m, v) = (
        col(0.02, false),
        col(gs, false),
        col(gs / 3.0, false),
        col(gs, true),
    );
    Ok(outputs([
        ("param", Tensor::from_f64_as(pd, vec![n], &p)),
        ("grad", Tensor::from_f64_as(pd, vec![n], &g)),
        ("exp_avg", Tensor::from_f64_as(md, vec![n], &m)),
        ("exp_avg_sq", Tensor::from_f64_as(md, vec![n], &v)),
    ]))
}

pub static PARAM_EMA: OpEntry = OpEntry {
    name: "param_ema",
    source: "V3 §3.2.3 (EMA of the parameters, kept on CPU)",
    summary: "ema ← ema + (1 − decay)·(θ − ema), evaluated in f64, rounded once to the dtype",
    inputs: &[
        TensorSpec { name: "ema", dtypes: EMA_FLOATS, shape: &[Dim::Batch], doc: "EMA weights" },
        TensorSpec { name: "param", dtypes: EMA_FLOATS, shape: &[Dim::Batch], doc: "current weights (same dtype)" },
    ],
    outputs: &[TensorSpec { name: "ema_out", dtypes: EMA_FLOATS, shape: &[Dim::Batch], doc: "updated EMA" }],
    constraints: &[],
    config: ConfigSchema::of::<ParamEmaConfig>(),
    adapt: None,
    reference: param_ema_ref,
    reference_fn: "reference/src/train/ema.rs::ema_update",
    gpu: &[],
    policy: param_ema_policy,
    policy_doc: "|Δ| ≤ u·(2|ema'| + 3w|θ − ema|), w = 1 − decay, u of the dtype: a lerp in the dtype (sub, coefficient, mul, add) against ours (one rounding)",
    generate: param_ema_gen,
    test_configs: &[r#"{"decay":0.5}"#, r#"{"decay":0.0}"#],
    v3_sizes: &[&[("N", 7168)]],
};

fn param_ema_ref(inputs: &TensorMap, cfg: &Config) -> Result<TensorMap> {
    let (e, p) = (get(inputs, "ema"), get(inputs, "param"));
    if p.dtype != e.dtype {
        return Err(Error::DType {
            op: "param_ema",
            role: Role::Input,
            name: "param".into(),
            got: p.dtype.name().into(),
            expected: e.dtype.name().into(),
            hint: " (ema and param must share a dtype)".into(),
        });
    }
    let out = ema::ema_update(&e.values(), &p.values(), cfg.get::<ParamEmaConfig>().decay)?;
    Ok(outputs([(
        "ema_out",
        Tensor::from_f64_as(e.dtype, e.shape.clone(), &out),
    )]))
}

fn param_ema_policy<'a>(ctx: &PolicyCtx<'a>) -> Policy<'a> {
    let e = get(ctx.inputs, "ema");
    let u = unit_roundoff(e.dtype);
    let w = 1.0 - ctx.config.get::<ParamEmaConfig>().decay;
    let (ev, pv) = (e.values(), (get(ctx.inputs, "param")).values());
    let bound: Vec<f64> = ev
        .iter()
        .zip(&pv)
        .map(|(&x, &t)| u * (2.0 * (x + w * (t - x)).abs() + 3.0 * w * (t - x).abs()))
        .collect();
    bound_policy(
        ctx,
        "within the rounding bound of a lerp in the dtype",
        &bound,
    )
}

fn param_ema_gen(rng: &mut Rng, _: &Config, sizes: &Sizes) -> Result<TensorMap> {
    let n = sizes.get("N").copied().unwrap_or_else(|| rng.range(1, 64));
    gen_fits(&[&[n], &[n]])?;
    let p: Vec<f64> = (0..n).map(|_| rng.normal() * 0.02).collect();
    let e: Vec<f64> = p.iter().map(|&x| x + rng.normal() * 1e-3).collect();
    let dt = *rng.pick(&[DType::F32, DType::F64]);
    Ok(outputs([
        ("ema", Tensor::from_f64_as(dt, vec![n], &e)),
        ("param", Tensor::from_f64_as(dt, vec![n], &p)),
    ]))
}

pub static CLIP_GRAD_NORM: OpEntry = OpEntry {
    name: "clip_grad_norm",
    source: "V3 §4.2 (gradient clipping norm 1.0); torch.nn.utils.clip_grad_norm_",
    summary: "‖g‖ = √Σg² over all elements (f64), c = max_norm/(‖g‖ + 1e-6); if c < 1: g ← g·f32(c)",
    inputs: &[TensorSpec { name: "grad", dtypes: &[DType::F32], shape: &[Dim::Batch, Dim::Var("N")], doc: "all gradients (concatenated)" }],
    outputs: &[
        TensorSpec { name: "grad_out", dtypes: &[DType::F32], shape: &[Dim::Batch, Dim::Var("N")], doc: "clipped gradients" },
        TensorSpec { name: "total_norm", dtypes: &[DType::F32], shape: &[], doc: "the global norm before clipping" },
    ],
    constraints: &[],
    config: ConfigSchema::of::<ClipGradNormConfig>(),
    adapt: None,
    reference: clip_grad_norm_ref,
    reference_fn: "reference/src/train/clip.rs::clip_grad_norm",
    gpu: &[],
    policy: clip_grad_norm_policy,
    policy_doc: "relative (n+4)·2^-24 on total_norm and (n+8)·2^-24 on grad_out, n = element count: an f32 sum of squares (torch) against ours (f64)",
    generate: clip_grad_norm_gen,
    test_configs: &[r#"{"max_norm":1000.0}"#],
    v3_sizes: &[&[("N", 7168)]],
};

fn clip_grad_norm_ref(inputs: &TensorMap, cfg: &Config) -> Result<TensorMap> {
    let g = get(inputs, "grad");
    let mut v = g.to_f32().expect("F32");
    let norm = clip::clip_grad_norm(&mut v, cfg.get::<ClipGradNormConfig>().max_norm)?;
    Ok(outputs([
        ("grad_out", Tensor::from_f32(g.shape.clone(), &v)),
        ("total_norm", Tensor::from_f32(vec![], &[norm as f32])),
    ]))
}

fn clip_grad_norm_policy<'a>(ctx: &PolicyCtx<'a>) -> Policy<'a> {
    let n = get(ctx.inputs, "grad").numel() as f64;
    let u = unit_roundoff(DType::F32);
    let want = (get(ctx.reference, ctx.output)).values();
    let k = if ctx.output == "total_norm" {
        n + 4.0
    } else {
        n + 8.0
    };
    let bound: Vec<f64> = want.iter().map(|w| k * u * w.abs()).collect();
    bound_policy(
        ctx,
        "relative rounding bound of an f32 sum of n squares",
        &bound,
    )
}

fn clip_grad_norm_gen(rng: &mut Rng, _: &Config, sizes: &Sizes) -> Result<TensorMap> {
    let n = sizes.get("N").copied().unwrap_or_else(|| rng.range(1, 200));
    gen_fits(&[&[n]])?;
    // norms from ~0.01 to ~100: both sides of max_norm = 1
    let scale = (rng.normal() * 2.5).exp() / (n as f64).sqrt();
    let g: Vec<f32> = (0..n).map(|_| (rng.normal() * scale) as f32).collect();
    Ok(outputs([("grad", Tensor::from_f32(vec![n], &g))]))
}
