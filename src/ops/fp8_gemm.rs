//! `fp8_gemm`, its MoE variants `m_grouped_fp8_gemm_contiguous` / `m_grouped_fp8_gemm_masked`,
//! and the training GEMMs `linear_fp8_fprop` / `linear_fp8_dgrad` / `linear_fp8_wgrad`.
//!
//! The reference functions in `dsv3_reference::fp8::{fp8_gemm, grouped_gemm, linear_fp8}` are
//! the definitions; the registry computes with `crate::fast`, which is bit-identical to them
//! (`tests/fp8_gemm_fast.rs`), so that `dsv3 check` handles DeepSeek-V3-sized GEMMs.
//!
//! # Tolerance policy (SPEC.md "FP8 GEMM tolerance")
//! A kernel's output element is accepted when it is the output-dtype rounding (RNE) of an f32
//! value within `E = 2·γ_{W+2}·Σ_w |p_w|·a_s·b_s + (W+2)·2^-147` of the reference's f32
//! accumulator, where `p_w` are the W promoted partials (block dots in exact mode, Tensor Core
//! window partials in model mode) and `γ_n = n·u/(1 − n·u)`, `u = 2^-24`. That covers any order
//! of the f32 accumulation across blocks, FMA contraction and either association of the scale
//! product; it does not cover a different block dot (use the model mode for Tensor Core
//! kernels).

use std::cell::OnceCell;

use dsv3_gpu::fp8_gemm::Backend;
use dsv3_gpu::Floats;
use dsv3_reference::fp8::accumulate::{MAX_FRAC_BITS, MAX_GROUP};
use dsv3_reference::fp8::fp8_gemm::{self as reference, Accumulation, GemmNames, ScaleLayout};
use dsv3_reference::fp8::tc_bound::TensorCoreBound;
use dsv3_reference::fp8::Saturation;
use dsv3_reference::fp8::{
    grouped_gemm, TensorCoreModel, TermCut, WriteBack, E4M3, HOPPER_FP8_WGMMA,
};
use dsv3_reference::numeric::round_to_bf16;
use ndarray::{Array2, Array3, ArrayView2, Axis};

use super::gen_fits;
use super::{floats_tensor, gamma, get, matrix_f32, matrix_u8, outputs, BLOCK_SIZE};
use crate::compare::Policy;
use crate::config::{ceil, Config, ConfigField, FieldKind};
use crate::contract::{Dim, TensorSpec};
use crate::error::Result;
use crate::fast::{self, GemmOut};
use crate::io::TensorMap;
use crate::registry::{GpuImpl, OpEntry, PolicyCtx, Sizes};
use crate::rng::Rng;
use crate::tensor::{DType, Tensor};

/// The two backends of a block-scaled GEMM op, each judged only under the configs it implements;
/// `$run(gpu, backend, inputs, config)` runs the op on one backend.
macro_rules! gemm_backends {
    ($run:path) => {
        &[
            GpuImpl {
                backend: "simt",
                run: |gpu, inputs, cfg| $run(gpu, Backend::Simt, inputs, cfg),
                kernel: SIMT_KERNEL,
                supports: simt_supports,
            },
            GpuImpl {
                backend: "wgmma",
                run: |gpu, inputs, cfg| $run(gpu, Backend::Wgmma, inputs, cfg),
                kernel: WGMMA_KERNEL,
                supports: wgmma_supports,
            },
        ]
    };
}

// ---- config

const OUT_DTYPE: ConfigField = ConfigField {
    name: "out_dtype",
    kind: FieldKind::Choice {
        values: &["bf16", "f32"],
        nullable: false,
    },
    default: "\"bf16\"",
    doc: "bf16 (OFF's c = accumulator.to(bf16), RNE) or f32 (the accumulator itself)",
};
const OUT_DTYPE_F32: ConfigField = ConfigField {
    default: "\"f32\"",
    doc: "f32 (V3 Fig. 6: the weight gradient stays FP32) or bf16",
    ..OUT_DTYPE
};
const ACCUMULATION: ConfigField = ConfigField {
    name: "accumulation",
    kind: FieldKind::Choice {
        values: &["exact", "tensor_core", "tensor_core_bound"],
        nullable: false,
    },
    default: "\"exact\"",
    doc: "exact: exact block dot rounded once to f32 (OFF Triton, CUDA-core kernels); \
          tensor_core: the T-FDPA model (acc_* fields) inside promotion windows, bit for bit; \
          tensor_core_bound: any Tensor Core kernel with at least acc_frac_bits bits and \
          acc_group products per step, promoted every promote_interval (a derived bound)",
};
const PROMOTE_INTERVAL: ConfigField = ConfigField {
    name: "promote_interval",
    kind: FieldKind::Int {
        min: 0,
        max: ceil::BLOCK,
    },
    default: "128",
    doc: "tensor_core: N_C, products per Tensor Core window before promotion to f32 (V3: 128); \
          0 = never (needs scales constant along K)",
};
const ACC_FRAC_BITS: ConfigField = ConfigField {
    name: "acc_frac_bits",
    kind: FieldKind::Int {
        min: 1,
        max: MAX_FRAC_BITS as u64,
    },
    default: "13",
    doc: "tensor_core: F, fraction bits kept below the largest exponent (Hopper: 13, the paper's \
          \"14 bits\")",
};
const ACC_GROUP: ConfigField = ConfigField {
    name: "acc_group",
    kind: FieldKind::Int {
        min: 1,
        max: MAX_GROUP as u64,
    },
    default: "32",
    doc: "tensor_core: L, products aligned together (one wgmma k32 step)",
};
const TERM_CUT: ConfigField = ConfigField {
    name: "term_cut",
    kind: FieldKind::Choice {
        values: &["toward_zero", "floor", "nearest"],
        nullable: false,
    },
    default: "\"toward_zero\"",
    doc: "tensor_core: how aligned terms drop bits (MMA-Sim: toward_zero; \"sign-fill\": floor; nearest)",
};
const ACC_OUT_FRAC_BITS: ConfigField = ConfigField {
    name: "acc_out_frac_bits",
    kind: FieldKind::Int { min: 0, max: 23 },
    default: "13",
    doc: "tensor_core: fraction bits of the accumulator register (Hopper: 13, e8m13; max 23)",
};
const ACC_OUT_ROUND: ConfigField = ConfigField {
    name: "acc_out_round",
    kind: FieldKind::Choice {
        values: &["toward_zero", "nearest_even"],
        nullable: false,
    },
    default: "\"toward_zero\"",
    doc: "tensor_core: rounding of each step's sum into the register",
};

/// Scale tensors stored MN-major (DeepGEMM's TMA-aligned layout), read by `src/adapt.rs`.
const MN_MAJOR_SCALES: ConfigField = ConfigField {
    name: "mn_major_scales",
    kind: FieldKind::Choice {
        values: &["none", "lhs", "rhs", "both"],
        nullable: false,
    },
    default: "\"none\"",
    doc: "scale inputs stored MN-major (transposed, MN padding allowed), as DeepGEMM's \
          TMA-aligned layout: lhs = the first scale input (a_s, x_s, dy_s), rhs = the second; \
          int32 scale inputs are DeepGEMM's packed UE8M0 (README \"Kernel layouts\")",
};
const GEMM_FIELDS: &[ConfigField] = &[
    BLOCK_SIZE,
    OUT_DTYPE,
    ACCUMULATION,
    PROMOTE_INTERVAL,
    ACC_FRAC_BITS,
    ACC_GROUP,
    TERM_CUT,
    ACC_OUT_FRAC_BITS,
    ACC_OUT_ROUND,
    MN_MAJOR_SCALES,
];
const WGRAD_FIELDS: &[ConfigField] = &[
    BLOCK_SIZE,
    OUT_DTYPE_F32,
    ACCUMULATION,
    PROMOTE_INTERVAL,
    ACC_FRAC_BITS,
    ACC_GROUP,
    TERM_CUT,
    ACC_OUT_FRAC_BITS,
    ACC_OUT_ROUND,
    MN_MAJOR_SCALES,
];

/// One config per branch: output dtype, block size, the model with its defaults (the Hopper
/// `wgmma` model: bf16 and f32 output, the configs the `wgmma` backend is judged under), without
/// promotion, and with every model parameter moved.
const TEST_CONFIGS: &[&str] = &[
    r#"{"out_dtype":"f32"}"#,
    r#"{"block_size":32}"#,
    r#"{"accumulation":"tensor_core"}"#,
    r#"{"accumulation":"tensor_core","out_dtype":"f32"}"#,
    r#"{"accumulation":"tensor_core","promote_interval":0,"out_dtype":"f32"}"#,
    r#"{"accumulation":"tensor_core","promote_interval":64,"acc_frac_bits":14,"acc_group":16,"term_cut":"floor","acc_out_frac_bits":23,"acc_out_round":"nearest_even"}"#,
    r#"{"accumulation":"tensor_core_bound"}"#,
    r#"{"accumulation":"tensor_core_bound","acc_group":16,"promote_interval":64,"out_dtype":"f32"}"#,
];

/// The accumulation a config asks for.
pub(crate) fn accumulation(cfg: &Config) -> Accumulation {
    match cfg.choice("accumulation") {
        Some("tensor_core") => Accumulation::TensorCore {
            model: TensorCoreModel {
                frac_bits: cfg.u32("acc_frac_bits"),
                group: cfg.usize("acc_group"),
                term_cut: match cfg.choice("term_cut") {
                    Some("floor") => TermCut::Floor,
                    Some("nearest") => TermCut::Nearest,
                    _ => TermCut::TowardZero,
                },
                out_frac_bits: cfg.u32("acc_out_frac_bits"),
                out_round: match cfg.choice("acc_out_round") {
                    Some("nearest_even") => WriteBack::NearestEven,
                    _ => WriteBack::TowardZero,
                },
            },
            promote_interval: cfg.usize("promote_interval"),
        },
        Some("tensor_core_bound") => Accumulation::TensorCoreBound {
            bound: TensorCoreBound {
                frac_bits: cfg.u32("acc_frac_bits"),
                group: cfg.usize("acc_group"),
            },
            promote_interval: cfg.usize("promote_interval"),
        },
        _ => Accumulation::Exact,
    }
}

/// The number of promoted partials per output element over a reduction of length `k`: the
/// reference's (K-blocks in exact and bound mode, windows in tensor_core mode).
fn partials(cfg: &Config, k: usize) -> usize {
    match accumulation(cfg) {
        Accumulation::Exact | Accumulation::TensorCoreBound { .. } => {
            k.div_ceil(cfg.usize("block_size"))
        }
        Accumulation::TensorCore {
            promote_interval, ..
        } => k.div_ceil(reference::window_len(promote_interval, k)),
    }
}

/// The promotion windows a Tensor Core kernel has over a reduction of length `k`.
fn windows(promote_interval: usize, k: usize) -> usize {
    k.div_ceil(reference::window_len(promote_interval, k))
}

// ---- the tolerance policy

/// `E = 2·γ_{W+2}·magnitude + (W+2)·2^-147`: how far two f32 evaluations of the same W scaled
/// partials may drift apart (module docs; SPEC.md derives it).
pub fn gemm_bound(magnitude: f64, partials: usize) -> f64 {
    let n = (partials + 2) as f64;
    2.0 * gamma(n) * magnitude + n * 2f64.powi(-147)
}

/// Half the distance from the bf16 value `got` to its neighbour in the direction of `r`:
/// every real within it rounds (RNE) to `got`, ties included at worst.
fn bf16_half_gap_toward(got: f64, r: f64) -> f64 {
    let bits = (got as f32).to_bits();
    let exponent = ((bits >> 23) & 0xFF) as i32;
    if exponent == 0 {
        // zero and subnormals: spacing 2^-133
        return 2f64.powi(-134);
    }
    let e = exponent - 127;
    let toward_zero = if got > 0.0 { r < got } else { r > got };
    let power_of_two = bits & 0x7F_FFFF == 0;
    if power_of_two && toward_zero {
        2f64.powi(e - 9)
    } else {
        2f64.powi(e - 8)
    }
}

/// Whether `got` (an f32 or bf16 value) is acceptable against the reference accumulator `r`.
pub fn within_bound(got: f64, r: f32, magnitude: f64, partials: usize, bf16_out: bool) -> bool {
    let r = f64::from(r);
    if !got.is_finite() || !r.is_finite() {
        return false;
    }
    let e = gemm_bound(magnitude, partials);
    let d = (got - r).abs();
    if bf16_out {
        d <= e + bf16_half_gap_toward(got, r)
    } else {
        d <= e
    }
}

/// `tensor_core_bound`: the tolerance of one element around the exact mode's accumulator
/// (SPEC.md "Tensor Core bound"): the reference's own f32 evaluation over `w_b` K-blocks
/// (`γ_{W_b+3}·M_b`, one more rounding than exact mode's for the f32 block dots), the
/// kernel's f32 promotion of `w_w` window partials no larger than `|P_w| + Δ_w`
/// (`γ_{W_w+2}·(M_w + D)`), the Tensor Core slack itself (`D`) and underflow, all times
/// `1 + 2^-40` for the f64 evaluation of this sum.
pub fn tc_bound_tolerance(
    magnitude: f64,
    window_magnitude: f64,
    slack: f64,
    (w_b, w_w): (usize, usize),
) -> f64 {
    let e = gamma((w_b + 3) as f64) * magnitude
        + gamma((w_w + 2) as f64) * (window_magnitude + slack)
        + slack
        + (w_b + w_w + 4) as f64 * 2f64.powi(-147);
    e * (1.0 + 2f64.powi(-40))
}

/// The fraction of its tolerance that `got` (an f32 or bf16 value) uses around the reference
/// accumulator `r`: the distance from `r` to the reals that round to `got` (for bf16, `got`
/// less half the gap to its neighbour towards `r`), over the tolerance. Above 1 is a
/// violation; non-finite values are infinitely far. An exact-mode bf16 output uses 0.
pub fn bound_use(got: f64, r: f32, tolerance: f64, bf16_out: bool) -> f64 {
    let r = f64::from(r);
    if !got.is_finite() || !r.is_finite() {
        return f64::INFINITY;
    }
    let rounding = if bf16_out {
        bf16_half_gap_toward(got, r)
    } else {
        0.0
    };
    ((got - r).abs() - rounding).max(0.0) / tolerance
}

/// Names of the auxiliary tensors a bound-mode reference hands its policy.
const AUX_ACCUMULATOR: &str = "aux:accumulator";
const AUX_TOLERANCE: &str = "aux:tolerance";

/// The reference outputs of a GEMM op: `name` of `shape` under `out_dtype`; in bound mode also
/// the f32 accumulators and each element's tolerance as auxiliary tensors (the policy reads
/// them instead of computing everything again).
fn gemm_ref(
    inputs: &TensorMap,
    cfg: &Config,
    compute: Compute,
    k: usize,
    (name, shape): (&str, Vec<usize>),
) -> Result<TensorMap> {
    let Accumulation::TensorCoreBound {
        promote_interval, ..
    } = accumulation(cfg)
    else {
        let out = compute(inputs, cfg, false)?;
        return Ok(outputs([(name, out_tensor(cfg, shape, &out.c))]));
    };
    let out = compute(inputs, cfg, true)?;
    let w = (partials(cfg, k), windows(promote_interval, k));
    let tolerance: Vec<f64> = out
        .magnitude
        .iter()
        .zip(&out.window_magnitude)
        .zip(&out.slack)
        .map(|((&m, &mw), &d)| tc_bound_tolerance(m, mw, d, w))
        .collect();
    let flat = vec![out.c.nrows(), out.c.ncols()];
    let aux_tolerance = Tensor::from_bytes(
        DType::F64,
        flat.clone(),
        tolerance.iter().flat_map(|v| v.to_le_bytes()).collect(),
    )
    .expect("one f64 per element");
    Ok(outputs([
        (name, out_tensor(cfg, shape, &out.c)),
        (
            AUX_ACCUMULATOR,
            Tensor::from_f32(flat, &out.c.iter().copied().collect::<Vec<_>>()),
        ),
        (AUX_TOLERANCE, aux_tolerance),
    ]))
}

/// `compute(inputs, config, with_magnitude)`: an op's f32 accumulators in output order.
type Compute = fn(&TensorMap, &Config, bool) -> Result<GemmOut>;

/// The policy of output `name` (module docs); `judged_rows` lists the defined rows of a
/// grouped output (`None`: all), `k` is the reduction length.
fn gemm_policy<'a>(
    ctx: &PolicyCtx<'a>,
    compute: Compute,
    k: usize,
    judged_rows: Option<Vec<bool>>,
) -> Policy<'a> {
    let candidate = get(ctx.candidate, ctx.output);
    let (inputs, cfg) = (ctx.inputs, ctx.config);
    let bf16_out = candidate.dtype == DType::BF16;
    let w = partials(cfg, k);
    let n = *candidate.shape.last().unwrap_or(&1);
    if let Accumulation::TensorCoreBound {
        promote_interval, ..
    } = accumulation(cfg)
    {
        // the reference handed over its accumulators and tolerances (else: compute them)
        let (acc, tol) = match (
            ctx.reference.get(AUX_ACCUMULATOR),
            ctx.reference.get(AUX_TOLERANCE),
        ) {
            (Some(a), Some(t)) => (
                a.to_f32().unwrap_or_default(),
                (0..t.numel()).map(|i| t.value(i)).collect(),
            ),
            _ => match compute(inputs, cfg, true) {
                Ok(out) => {
                    let w = (w, windows(promote_interval, k));
                    let tol: Vec<f64> = out
                        .magnitude
                        .iter()
                        .zip(&out.window_magnitude)
                        .zip(&out.slack)
                        .map(|((&m, &mw), &d)| tc_bound_tolerance(m, mw, d, w))
                        .collect();
                    (out.c.iter().copied().collect(), tol)
                }
                Err(_) => (Vec::new(), Vec::new()),
            },
        };
        let inner = Policy::Bounded {
            why: "tensor_core_bound: the out_dtype rounding of a value within the Tensor Core \
                  bound of the exact accumulator (SPEC.md \"Tensor Core bound\")",
            measure: Box::new(move |i| {
                let (Some(&r), Some(&t)) = (acc.get(i), tol.get(i)) else {
                    return f64::INFINITY;
                };
                bound_use(candidate.value(i), r, t, bf16_out)
            }),
        };
        return match judged_rows {
            None => inner,
            Some(rows) => Policy::Partial {
                why: "padding rows (m_indices = −1, rows past masked_m): undefined, as in DeepGEMM",
                judged: Box::new(move |i| rows[i / n.max(1)]),
                inner: Box::new(inner),
            },
        };
    }
    // the reference accumulators and magnitudes, computed once, only if some element differs
    let bounds: OnceCell<Option<GemmOut>> = OnceCell::new();
    let inner = Policy::ExactUnless {
        why: "the out_dtype rounding of an f32 value within E = 2·γ_{W+2}·Σ|p|·a_s·b_s of the \
              reference accumulator (other f32 order across blocks, FMA, scale association)",
        allow: Box::new(move |i| {
            let Some(b) = bounds
                .get_or_init(|| compute(inputs, cfg, true).ok())
                .as_ref()
            else {
                return false;
            };
            let (r, c) = (i / n.max(1), i % n.max(1));
            within_bound(
                candidate.value(i),
                b.c[[r, c]],
                b.magnitude[[r, c]],
                w,
                bf16_out,
            )
        }),
    };
    match judged_rows {
        None => inner,
        Some(rows) => Policy::Partial {
            why: "padding rows (m_indices = −1, rows past masked_m): undefined, as in DeepGEMM",
            judged: Box::new(move |i| rows[i / n.max(1)]),
            inner: Box::new(inner),
        },
    }
}

// ---- tensors

fn codes3(t: &Tensor) -> Array3<u8> {
    let s = &t.shape;
    Array3::from_shape_vec((s[0], s[1], s[2]), t.data.clone()).expect("validated shape")
}

fn scales3(t: &Tensor) -> Array3<f32> {
    let s = &t.shape;
    let v = t.to_f32().expect("F32 or F8_E8M0 scales");
    Array3::from_shape_vec((s[0], s[1], s[2]), v).expect("validated shape")
}

fn indices(t: &Tensor) -> Vec<i64> {
    (0..t.numel()).map(|i| t.value(i) as i64).collect()
}

/// The output tensor of f32 accumulators `c` under `out_dtype`.
fn out_tensor(cfg: &Config, shape: Vec<usize>, c: &Array2<f32>) -> Tensor {
    let values: Vec<f32> = c.iter().copied().collect();
    match cfg.choice("out_dtype") {
        Some("f32") => Tensor::from_f32(shape, &values),
        _ => Tensor::from_bf16(
            shape,
            &values.iter().map(|&v| round_to_bf16(v)).collect::<Vec<_>>(),
        ),
    }
}

const SCALE_DTYPES: &[DType] = &[DType::F32, DType::F8E8M0];
const OUT_DTYPES: &[DType] = &[DType::BF16, DType::F32];
const POLICY_DOC: &str = "per element: the out_dtype rounding (RNE) of an f32 value within \
E = 2·γ_{W+2}·Σ_w|p_w|·a_s·b_s + (W+2)·2^-147 of the reference's f32 accumulator (W promoted \
partials p_w: K-blocks in exact mode, Tensor Core windows in tensor_core mode; γ_n = n·2^-24/(1 − n·2^-24)); \
covers another f32 order across blocks, FMA contraction and (a_s·b_s)·p as DeepGEMM, not a different block dot";

// ---- fp8_gemm

pub static FP8_GEMM: OpEntry = OpEntry {
    name: "fp8_gemm",
    source: "V3 §3.3.2 (Fig. 7: fine-grained quantization, increasing accumulation precision); OFF kernel.py fp8_gemm",
    summary: "c[m,n] = Σ_kb (Σ_{k∈kb} a[m,k]·b[n,k]) · a_s[m,kb] · b_s[n/B,kb]; exact block dots (or the Tensor Core model), f32 accumulator, out_dtype",
    inputs: &[
        TensorSpec { name: "a", dtypes: &[DType::F8E4M3], shape: &[Dim::Batch, Dim::Var("K")], doc: "activations, E4M3 codes (1×B tiles)" },
        TensorSpec { name: "a_s", dtypes: SCALE_DTYPES, shape: &[Dim::Batch, Dim::CeilDiv("K", "block_size")], doc: "one scale per 1×B tile of a" },
        TensorSpec { name: "b", dtypes: &[DType::F8E4M3], shape: &[Dim::Var("N"), Dim::Var("K")], doc: "weight, E4M3 codes (B×B blocks)" },
        TensorSpec { name: "b_s", dtypes: SCALE_DTYPES, shape: &[Dim::CeilDiv("N", "block_size"), Dim::CeilDiv("K", "block_size")], doc: "one scale per B×B block of b (weight_scale_inv)" },
    ],
    outputs: &[TensorSpec { name: "c", dtypes: OUT_DTYPES, shape: &[Dim::Batch, Dim::Var("N")], doc: "a·bᵀ (dtype = out_dtype)" }],
    constraints: &[],
    config: GEMM_FIELDS,
    reference: fp8_gemm_ref,
    reference_fn: "reference/src/fp8/fp8_gemm.rs::fp8_gemm",
    gpu: gemm_backends!(fp8_gemm_gpu),
    policy: fp8_gemm_policy,
    policy_doc: POLICY_DOC,
    generate: fp8_gemm_gen,
    test_configs: TEST_CONFIGS,
    v3_sizes: &[
        &[("M", 2), ("N", 2112), ("K", 7168)],
        &[("M", 2), ("N", 576), ("K", 7168)],
        &[("M", 2), ("N", 24576), ("K", 1536)],
        &[("M", 2), ("N", 32768), ("K", 512)],
        &[("M", 2), ("N", 7168), ("K", 16384)],
        &[("M", 2), ("N", 4096), ("K", 7168)],
        &[("M", 2), ("N", 7168), ("K", 2048)],
    ],
};

/// A GEMM's operands `(a, a_s, b, b_s)` as matrices.
type Operands = (Array2<u8>, Array2<f32>, Array2<u8>, Array2<f32>);
/// A grouped GEMM's operands `(a, a_s, b, b_s, m_indices or masked_m)`, `A`/`S` 2-D
/// (contiguous) or 3-D (masked).
type GroupedOperands<A, S> = (A, S, Array3<u8>, Array3<f32>, Vec<i64>);

/// fp8_gemm's operands (a's leading dims flattened as OFF: `M = numel / K`, also when K = 0),
/// checked by the reference's rules.
fn fp8_gemm_operands(inputs: &TensorMap, cfg: &Config) -> Result<Operands> {
    let a_t = get(inputs, "a");
    let (lead, k) = a_t.shape.split_at(a_t.shape.len() - 1);
    let (m, k, block) = (
        lead.iter().product::<usize>(),
        k[0],
        cfg.usize("block_size"),
    );
    let a = Array2::from_shape_vec((m, k), a_t.data.clone()).expect("validated shape");
    let a_s = get(inputs, "a_s").to_f32().expect("F32 or F8_E8M0 scales");
    let a_s = Array2::from_shape_vec((m, k.div_ceil(block)), a_s).expect("validated shape");
    let (b, b_s) = (matrix_u8(get(inputs, "b")), matrix_f32(get(inputs, "b_s")));
    reference::check_gemm(
        "fp8_gemm",
        &reference::OFF_NAMES,
        a.view(),
        a_s.view(),
        b.view(),
        b_s.view(),
        ScaleLayout::Block,
        block,
        &accumulation(cfg),
    )?;
    Ok((a, a_s, b, b_s))
}

fn fp8_gemm_compute(inputs: &TensorMap, cfg: &Config, with_magnitude: bool) -> Result<GemmOut> {
    let (a, a_s, b, b_s) = fp8_gemm_operands(inputs, cfg)?;
    Ok(fast::gemm(
        a.view(),
        a_s.view(),
        b.view(),
        b_s.view(),
        (ScaleLayout::Block, cfg.usize("block_size")),
        &accumulation(cfg),
        with_magnitude,
    ))
}

fn fp8_gemm_ref(inputs: &TensorMap, cfg: &Config) -> Result<TensorMap> {
    let a = get(inputs, "a");
    let mut shape = a.shape[..a.shape.len() - 1].to_vec();
    shape.push(get(inputs, "b").shape[0]);
    let k = *a.shape.last().unwrap_or(&0);
    gemm_ref(inputs, cfg, fp8_gemm_compute, k, ("c", shape))
}

fn fp8_gemm_policy<'a>(ctx: &PolicyCtx<'a>) -> Policy<'a> {
    let k = *get(ctx.inputs, "a").shape.last().unwrap_or(&0);
    gemm_policy(ctx, fp8_gemm_compute, k, None)
}

// ---- input generators

/// Whether a config forces the scales of a row to be equal along K (a promotion window that
/// spans several blocks).
fn row_constant_scales(cfg: &Config) -> bool {
    match accumulation(cfg).promote_interval() {
        None => false,
        Some(promote_interval) => {
            promote_interval == 0 || cfg.usize("block_size") % promote_interval != 0
        }
    }
}

/// E4M3 codes `[rows, k]`: per 1×B tile one of Gaussian values quantized with amax near 448,
/// zeros, ±448, subnormal codes, any finite code, or one outlier over tiny codes. Values come
/// from 256-entry tables indexed by random bytes, so DeepSeek-V3-sized operands stay cheap.
fn gemm_codes(rng: &mut Rng, rows: usize, k: usize, block: usize) -> Vec<u8> {
    let mut table = |sigma: f64| -> Vec<u8> {
        (0..256)
            .map(|_| E4M3.encode((rng.normal() * sigma) as f32, Saturation::SatFinite) as u8)
            .collect()
    };
    let (gauss, tiny, small) = (table(120.0), table(2f64.powi(-7)), table(2f64.powi(-8)));
    let mut v = vec![0u8; rows * k];
    let (mut bits, mut left) = (0u64, 0);
    for r in 0..rows {
        for k0 in (0..k).step_by(block.max(1)) {
            let kind = if rng.chance(0.6) { 0 } else { rng.range(1, 5) };
            for j in k0..(k0 + block).min(k) {
                if left == 0 {
                    (bits, left) = (rng.next_u64(), 8);
                }
                let byte = usize::from(bits as u8);
                (bits, left) = (bits >> 8, left - 1);
                v[r * k + j] = match kind {
                    0 => gauss[byte],
                    1 => 0x00,
                    2 => [0x7E, 0xFE][byte % 2],
                    3 => tiny[byte],
                    // any code but the NaNs 0x7F / 0xFF
                    4 => [byte as u8, 0x7E][usize::from(byte % 128 == 0x7F)],
                    _ if j == k0 => 0x7E,
                    _ => small[byte],
                };
            }
        }
    }
    v
}

/// A positive scale: log-normal, a power of two, or (rarely) tiny enough that scale products
/// underflow f32.
fn one_scale(rng: &mut Rng) -> f32 {
    match rng.range(0, 19) {
        0..=11 => ((rng.normal() * 2.0).exp() * 2f64.powi(-8)) as f32,
        12..=18 => 2f32.powi(rng.range(0, 24) as i32 - 20),
        _ => 2f32.powi(-75),
    }
}

/// Scales `[rows, cols]`, F32 or (sometimes) F8_E8M0 powers of two; `row_constant` repeats one
/// value along each row.
fn gemm_scales(rng: &mut Rng, shape: Vec<usize>, row_constant: bool) -> Tensor {
    let cols = *shape.last().unwrap_or(&1);
    let numel: usize = shape.iter().product();
    let e8m0 = rng.chance(0.25);
    let mut v = Vec::with_capacity(numel);
    let mut current = 1.0f32;
    for i in 0..numel {
        if !row_constant || i % cols.max(1) == 0 {
            current = if e8m0 {
                2f32.powi(rng.range(0, 24) as i32 - 20)
            } else {
                one_scale(rng)
            };
        }
        v.push(current);
    }
    if e8m0 {
        let codes = v.iter().map(|s| (s.to_bits() >> 23) as u8).collect();
        Tensor::from_codes(DType::F8E8M0, shape, codes)
    } else {
        Tensor::from_f32(shape, &v)
    }
}

/// Sizes: the pinned ones, else small random ones with K and N often not multiples of B.
fn size(rng: &mut Rng, sizes: &Sizes, name: &str, lo: usize, hi: usize) -> usize {
    sizes
        .get(name)
        .copied()
        .unwrap_or_else(|| rng.range(lo, hi))
}

fn fp8_gemm_gen(rng: &mut Rng, cfg: &Config, sizes: &Sizes) -> Result<TensorMap> {
    let block = cfg.usize("block_size");
    let m = size(rng, sizes, "M", 1, 6);
    let n = size(rng, sizes, "N", 1, 2 * block + 5);
    let k = size(rng, sizes, "K", 1, 3 * block + 7);
    gen_fits(&[&[m, k], &[n, k], &[m, k.div_ceil(block)]])?;
    // leading dims as OFF's a: [..., K]; sometimes [2, m, K]
    let lead = if sizes.is_empty() && rng.chance(0.3) {
        vec![2, m]
    } else {
        vec![m]
    };
    let rows: usize = lead.iter().product();
    let kb = k.div_ceil(block);
    let uniform = row_constant_scales(cfg);
    let a = gemm_codes(rng, rows, k, block);
    let b = gemm_codes(rng, n, k, block);
    let mut a_shape = lead.clone();
    a_shape.push(k);
    let mut a_s_shape = lead;
    a_s_shape.push(kb);
    Ok(outputs([
        ("a", Tensor::from_codes(DType::F8E4M3, a_shape, a)),
        ("a_s", gemm_scales(rng, a_s_shape, uniform)),
        ("b", Tensor::from_codes(DType::F8E4M3, vec![n, k], b)),
        (
            "b_s",
            gemm_scales(rng, vec![n.div_ceil(block), kb], uniform),
        ),
    ]))
}

// ---- m_grouped_fp8_gemm_contiguous

pub static M_GROUPED_CONTIGUOUS: OpEntry = OpEntry {
    name: "m_grouped_fp8_gemm_contiguous",
    source: "V3 §2.1.2/§3.3 (routed experts in FP8); DeepGEMM m_grouped_fp8_gemm_nt_contiguous (m_indices layout)",
    summary: "c[m] = fp8_gemm(a[m], b[m_indices[m]]); rows with m_indices = −1 are padding: not computed, not judged",
    inputs: &[
        TensorSpec { name: "a", dtypes: &[DType::F8E4M3], shape: &[Dim::Var("M"), Dim::Var("K")], doc: "all experts' rows, E4M3 codes" },
        TensorSpec { name: "a_s", dtypes: SCALE_DTYPES, shape: &[Dim::Var("M"), Dim::CeilDiv("K", "block_size")], doc: "1×B tile scales of a" },
        TensorSpec { name: "b", dtypes: &[DType::F8E4M3], shape: &[Dim::Var("G"), Dim::Var("N"), Dim::Var("K")], doc: "one weight per expert" },
        TensorSpec { name: "b_s", dtypes: SCALE_DTYPES, shape: &[Dim::Var("G"), Dim::CeilDiv("N", "block_size"), Dim::CeilDiv("K", "block_size")], doc: "B×B block scales per expert" },
        TensorSpec { name: "m_indices", dtypes: &[DType::I32, DType::I64], shape: &[Dim::Var("M")], doc: "expert of each row, −1 = padding row" },
    ],
    outputs: &[TensorSpec { name: "c", dtypes: OUT_DTYPES, shape: &[Dim::Var("M"), Dim::Var("N")], doc: "padding rows undefined" }],
    constraints: &[],
    config: GEMM_FIELDS,
    reference: contiguous_ref,
    reference_fn: "reference/src/fp8/grouped_gemm.rs::m_grouped_fp8_gemm_contiguous",
    gpu: gemm_backends!(contiguous_gpu),
    policy: contiguous_policy,
    policy_doc: "fp8_gemm's policy on rows with an expert; padding rows (m_indices = −1) are undefined and not judged",
    generate: contiguous_gen,
    test_configs: TEST_CONFIGS,
    v3_sizes: &[&[("G", 2), ("M", 256), ("N", 7168), ("K", 2048)]],
};

/// The contiguous layout's operands and `m_indices`, checked by the reference's rules.
fn contiguous_operands(
    inputs: &TensorMap,
    cfg: &Config,
) -> Result<GroupedOperands<Array2<u8>, Array2<f32>>> {
    let (a, a_s) = (matrix_u8(get(inputs, "a")), matrix_f32(get(inputs, "a_s")));
    let (b, b_s) = (codes3(get(inputs, "b")), scales3(get(inputs, "b_s")));
    let m_indices = indices(get(inputs, "m_indices"));
    grouped_gemm::check_m_grouped_contiguous(
        a.view(),
        a_s.view(),
        b.view(),
        b_s.view(),
        &m_indices,
        cfg.usize("block_size"),
        &accumulation(cfg),
    )?;
    Ok((a, a_s, b, b_s, m_indices))
}

fn contiguous_compute(inputs: &TensorMap, cfg: &Config, with_magnitude: bool) -> Result<GemmOut> {
    let (a, a_s, b, b_s, m_indices) = contiguous_operands(inputs, cfg)?;
    Ok(fast::m_grouped_contiguous(
        a.view(),
        a_s.view(),
        b.view(),
        b_s.view(),
        &m_indices,
        cfg.usize("block_size"),
        &accumulation(cfg),
        with_magnitude,
    ))
}

fn contiguous_ref(inputs: &TensorMap, cfg: &Config) -> Result<TensorMap> {
    let a = get(inputs, "a");
    let shape = vec![a.shape[0], get(inputs, "b").shape[1]];
    gemm_ref(inputs, cfg, contiguous_compute, a.shape[1], ("c", shape))
}

fn contiguous_policy<'a>(ctx: &PolicyCtx<'a>) -> Policy<'a> {
    let k = *get(ctx.inputs, "a").shape.last().unwrap_or(&0);
    let rows = indices(get(ctx.inputs, "m_indices"))
        .iter()
        .map(|&g| g != -1)
        .collect();
    gemm_policy(ctx, contiguous_compute, k, Some(rows))
}

/// Garbage for undefined rows: any byte (NaN codes included) and any f32 scale.
fn scribble_codes(rng: &mut Rng, v: &mut [u8]) {
    for x in v {
        *x = rng.next_u64() as u8;
    }
}

fn contiguous_gen(rng: &mut Rng, cfg: &Config, sizes: &Sizes) -> Result<TensorMap> {
    let block = cfg.usize("block_size");
    let groups = size(rng, sizes, "G", 1, 4);
    let n = size(rng, sizes, "N", 1, 2 * block + 5);
    let k = size(rng, sizes, "K", 1, 3 * block + 7);
    // unpinned, M is at most 5 rows per group (below)
    let m_max = sizes.get("M").copied().unwrap_or(5 * groups);
    gen_fits(&[&[m_max, k], &[groups, n, k]])?;
    // rows: each expert's segment, with some padding rows (−1) between them
    let mut m_indices = Vec::new();
    match sizes.get("M") {
        Some(&m) => m_indices.extend((0..m).map(|i| (i * groups / m.max(1)) as i64)),
        None => {
            for g in 0..groups {
                m_indices.extend(std::iter::repeat_n(g as i64, rng.range(0, 4)));
                m_indices.extend(std::iter::repeat_n(-1, rng.range(0, 2)));
            }
        }
    }
    let m = m_indices.len();
    let kb = k.div_ceil(block);
    let uniform = row_constant_scales(cfg);
    let mut a = gemm_codes(rng, m, k, block);
    let a_s = gemm_scales(rng, vec![m, kb], uniform);
    let mut a_s_values = a_s.to_f32().expect("scales");
    for (i, &g) in m_indices.iter().enumerate() {
        if g == -1 {
            scribble_codes(rng, &mut a[i * k..(i + 1) * k]);
            for s in &mut a_s_values[i * kb..(i + 1) * kb] {
                *s = f32::from_bits(rng.next_u64() as u32);
            }
        }
    }
    let b = gemm_codes(rng, groups * n, k, block);
    let idx: Vec<u8> = m_indices
        .iter()
        .flat_map(|&g| (g as i32).to_le_bytes())
        .collect();
    Ok(outputs([
        ("a", Tensor::from_codes(DType::F8E4M3, vec![m, k], a)),
        ("a_s", Tensor::from_f32(vec![m, kb], &a_s_values)),
        (
            "b",
            Tensor::from_codes(DType::F8E4M3, vec![groups, n, k], b),
        ),
        (
            "b_s",
            gemm_scales(rng, vec![groups, n.div_ceil(block), kb], uniform),
        ),
        (
            "m_indices",
            Tensor::from_bytes(DType::I32, vec![m], idx).expect("4 bytes per row"),
        ),
    ]))
}

// ---- m_grouped_fp8_gemm_masked

pub static M_GROUPED_MASKED: OpEntry = OpEntry {
    name: "m_grouped_fp8_gemm_masked",
    source: "V3 §2.1.2/§3.3 (routed experts, decoding); DeepGEMM m_grouped_fp8_gemm_nt_masked",
    summary: "c[g, m] = fp8_gemm(a[g, m], b[g]) for m < masked_m[g]; rows past masked_m are undefined: not computed, not judged",
    inputs: &[
        TensorSpec { name: "a", dtypes: &[DType::F8E4M3], shape: &[Dim::Var("G"), Dim::Var("M"), Dim::Var("K")], doc: "per group M_max rows, E4M3 codes" },
        TensorSpec { name: "a_s", dtypes: SCALE_DTYPES, shape: &[Dim::Var("G"), Dim::Var("M"), Dim::CeilDiv("K", "block_size")], doc: "1×B tile scales of a" },
        TensorSpec { name: "b", dtypes: &[DType::F8E4M3], shape: &[Dim::Var("G"), Dim::Var("N"), Dim::Var("K")], doc: "one weight per group" },
        TensorSpec { name: "b_s", dtypes: SCALE_DTYPES, shape: &[Dim::Var("G"), Dim::CeilDiv("N", "block_size"), Dim::CeilDiv("K", "block_size")], doc: "B×B block scales per group" },
        TensorSpec { name: "masked_m", dtypes: &[DType::I32, DType::I64], shape: &[Dim::Var("G")], doc: "real rows per group (≤ M_max)" },
    ],
    outputs: &[TensorSpec { name: "c", dtypes: OUT_DTYPES, shape: &[Dim::Var("G"), Dim::Var("M"), Dim::Var("N")], doc: "rows past masked_m undefined" }],
    constraints: &[],
    config: GEMM_FIELDS,
    reference: masked_ref,
    reference_fn: "reference/src/fp8/grouped_gemm.rs::m_grouped_fp8_gemm_masked",
    gpu: gemm_backends!(masked_gpu),
    policy: masked_policy,
    policy_doc: "fp8_gemm's policy on the first masked_m[g] rows of each group; the rest is undefined and not judged",
    generate: masked_gen,
    test_configs: TEST_CONFIGS,
    v3_sizes: &[&[("G", 2), ("M", 64), ("N", 4096), ("K", 7168)]],
};

/// The masked layout's operands and `masked_m`, checked by the reference's rules.
fn masked_operands(
    inputs: &TensorMap,
    cfg: &Config,
) -> Result<GroupedOperands<Array3<u8>, Array3<f32>>> {
    let (a, a_s) = (codes3(get(inputs, "a")), scales3(get(inputs, "a_s")));
    let (b, b_s) = (codes3(get(inputs, "b")), scales3(get(inputs, "b_s")));
    let masked_m = indices(get(inputs, "masked_m"));
    grouped_gemm::check_m_grouped_masked(
        a.view(),
        a_s.view(),
        b.view(),
        b_s.view(),
        &masked_m,
        cfg.usize("block_size"),
        &accumulation(cfg),
    )?;
    Ok((a, a_s, b, b_s, masked_m))
}

fn masked_compute(inputs: &TensorMap, cfg: &Config, with_magnitude: bool) -> Result<GemmOut> {
    let (a, a_s, b, b_s, masked_m) = masked_operands(inputs, cfg)?;
    Ok(fast::m_grouped_masked(
        a.view(),
        a_s.view(),
        b.view(),
        b_s.view(),
        &masked_m,
        cfg.usize("block_size"),
        &accumulation(cfg),
        with_magnitude,
    ))
}

fn masked_ref(inputs: &TensorMap, cfg: &Config) -> Result<TensorMap> {
    let a = get(inputs, "a");
    let shape = vec![a.shape[0], a.shape[1], get(inputs, "b").shape[1]];
    gemm_ref(inputs, cfg, masked_compute, a.shape[2], ("c", shape))
}

fn masked_policy<'a>(ctx: &PolicyCtx<'a>) -> Policy<'a> {
    let a = get(ctx.inputs, "a");
    let (m_max, k) = (a.shape[1], a.shape[2]);
    let masked_m = indices(get(ctx.inputs, "masked_m"));
    let rows = (0..a.shape[0] * m_max)
        .map(|r| (r % m_max) < masked_m[r / m_max].max(0) as usize)
        .collect();
    gemm_policy(ctx, masked_compute, k, Some(rows))
}

fn masked_gen(rng: &mut Rng, cfg: &Config, sizes: &Sizes) -> Result<TensorMap> {
    let block = cfg.usize("block_size");
    let groups = size(rng, sizes, "G", 1, 3);
    let m_max = size(rng, sizes, "M", 1, 5);
    let n = size(rng, sizes, "N", 1, 2 * block + 5);
    let k = size(rng, sizes, "K", 1, 3 * block + 7);
    gen_fits(&[&[groups, m_max, k], &[groups, n, k]])?;
    let kb = k.div_ceil(block);
    let masked_m: Vec<usize> = (0..groups).map(|_| rng.range(0, m_max)).collect();
    let uniform = row_constant_scales(cfg);
    let mut a = gemm_codes(rng, groups * m_max, k, block);
    let a_s = gemm_scales(rng, vec![groups, m_max, kb], uniform);
    let mut a_s_values = a_s.to_f32().expect("scales");
    for (g, &rows) in masked_m.iter().enumerate() {
        for m in rows..m_max {
            let row = g * m_max + m;
            scribble_codes(rng, &mut a[row * k..(row + 1) * k]);
            for s in &mut a_s_values[row * kb..(row + 1) * kb] {
                *s = f32::from_bits(rng.next_u64() as u32);
            }
        }
    }
    let b = gemm_codes(rng, groups * n, k, block);
    let mm: Vec<u8> = masked_m
        .iter()
        .flat_map(|&r| (r as i32).to_le_bytes())
        .collect();
    Ok(outputs([
        (
            "a",
            Tensor::from_codes(DType::F8E4M3, vec![groups, m_max, k], a),
        ),
        (
            "a_s",
            Tensor::from_f32(vec![groups, m_max, kb], &a_s_values),
        ),
        (
            "b",
            Tensor::from_codes(DType::F8E4M3, vec![groups, n, k], b),
        ),
        (
            "b_s",
            gemm_scales(rng, vec![groups, n.div_ceil(block), kb], uniform),
        ),
        (
            "masked_m",
            Tensor::from_bytes(DType::I32, vec![groups], mm).expect("4 bytes per group"),
        ),
    ]))
}

// ---- the training GEMMs

/// The operands of one training GEMM as `fp8_gemm` sees them: `a`, `a_s`, `b`, `b_s` (views
/// transposed as the GEMM needs), the layout of `b_s`.
struct Training {
    op: &'static str,
    names: GemmNames,
    /// (tensor names of a, a_s, b, b_s in the op's inputs; whether each is read transposed)
    tensors: [(&'static str, bool); 4],
    b_layout: ScaleLayout,
}

const FPROP: Training = Training {
    op: "linear_fp8_fprop",
    names: GemmNames {
        a: "x",
        a_s: "x_s",
        b: "w",
        b_s: "w_s",
    },
    tensors: [("x", false), ("x_s", false), ("w", false), ("w_s", false)],
    b_layout: ScaleLayout::Block,
};
const DGRAD: Training = Training {
    op: "linear_fp8_dgrad",
    names: GemmNames {
        a: "dy",
        a_s: "dy_s",
        b: "wᵀ",
        b_s: "w_sᵀ",
    },
    tensors: [("dy", false), ("dy_s", false), ("w", true), ("w_s", true)],
    b_layout: ScaleLayout::Block,
};
const WGRAD: Training = Training {
    op: "linear_fp8_wgrad",
    names: GemmNames {
        a: "dyᵀ",
        a_s: "dy_sᵀ",
        b: "xᵀ",
        b_s: "x_sᵀ",
    },
    tensors: [("dy", true), ("dy_s", true), ("x", true), ("x_s", true)],
    b_layout: ScaleLayout::Row,
};

/// The operands of a training GEMM as `fp8_gemm` sees them: `(a, a_s, b, b_s)`, transposed
/// where the op reads them transposed, checked by the reference's rules.
fn training_operands(t: &Training, inputs: &TensorMap, cfg: &Config) -> Result<Operands> {
    let scales = |i: usize| {
        let (name, transposed) = t.tensors[i];
        let m = matrix_f32(get(inputs, name));
        if transposed {
            m.reversed_axes().as_standard_layout().to_owned()
        } else {
            m
        }
    };
    let codes = |i: usize| {
        let (name, transposed) = t.tensors[i];
        let m = matrix_u8(get(inputs, name));
        if transposed {
            m.reversed_axes().as_standard_layout().to_owned()
        } else {
            m
        }
    };
    let (a, a_s, b, b_s) = (codes(0), scales(1), codes(2), scales(3));
    reference::check_gemm(
        t.op,
        &t.names,
        a.view(),
        a_s.view(),
        b.view(),
        b_s.view(),
        t.b_layout,
        cfg.usize("block_size"),
        &accumulation(cfg),
    )?;
    Ok((a, a_s, b, b_s))
}

fn training_compute(
    t: &Training,
    inputs: &TensorMap,
    cfg: &Config,
    with_magnitude: bool,
) -> Result<GemmOut> {
    let (a, a_s, b, b_s) = training_operands(t, inputs, cfg)?;
    Ok(fast::gemm(
        a.view(),
        a_s.view(),
        b.view(),
        b_s.view(),
        (t.b_layout, cfg.usize("block_size")),
        &accumulation(cfg),
        with_magnitude,
    ))
}

/// Training operands: codes `[rows, cols]` quantized along `tile` (1×B: along cols; B×1:
/// along rows) with scales of the matching grid.
fn training_operand(
    rng: &mut Rng,
    rows: usize,
    cols: usize,
    block: usize,
    along_rows: bool,
    uniform: bool,
) -> (Tensor, Tensor) {
    // quantize the transposed matrix when the tiles run down the columns
    let (r, c) = if along_rows {
        (cols, rows)
    } else {
        (rows, cols)
    };
    let codes = gemm_codes(rng, r, c, block);
    let scales = gemm_scales(rng, vec![r, c.div_ceil(block)], uniform);
    if !along_rows {
        return (
            Tensor::from_codes(DType::F8E4M3, vec![rows, cols], codes),
            scales,
        );
    }
    let t_codes = Array2::from_shape_vec((r, c), codes).expect("r·c codes");
    let t_codes: Vec<u8> = t_codes.t().iter().copied().collect();
    let grid = (r, c.div_ceil(block));
    let values = Array2::from_shape_vec(grid, scales.to_f32().expect("scales")).expect("grid");
    let transposed: Vec<f32> = values.t().iter().copied().collect();
    let s = if scales.dtype == DType::F8E8M0 {
        Tensor::from_codes(
            DType::F8E8M0,
            vec![grid.1, grid.0],
            transposed
                .iter()
                .map(|v| (v.to_bits() >> 23) as u8)
                .collect(),
        )
    } else {
        Tensor::from_f32(vec![grid.1, grid.0], &transposed)
    };
    (
        Tensor::from_codes(DType::F8E4M3, vec![rows, cols], t_codes),
        s,
    )
}

/// A weight `[n, k]` in B×B blocks with its scales.
fn training_weight(
    rng: &mut Rng,
    n: usize,
    k: usize,
    block: usize,
    uniform: bool,
) -> (Tensor, Tensor) {
    let codes = gemm_codes(rng, n, k, block);
    let grid = vec![n.div_ceil(block), k.div_ceil(block)];
    (
        Tensor::from_codes(DType::F8E4M3, vec![n, k], codes),
        gemm_scales(rng, grid, uniform),
    )
}

/// The uniformity a transposed scale grid needs: Dgrad reads `w_sᵀ`, whose rows are the
/// columns of `w_s`; a row-constant `w_sᵀ` is a column-constant `w_s`.
fn transpose_scales(t: &Tensor) -> Tensor {
    let (r, c) = (t.shape[0], t.shape[1]);
    if t.dtype == DType::F8E8M0 {
        let m = Array2::from_shape_vec((r, c), t.data.clone()).expect("grid");
        Tensor::from_codes(DType::F8E8M0, vec![c, r], m.t().iter().copied().collect())
    } else {
        let m = Array2::from_shape_vec((r, c), t.to_f32().expect("scales")).expect("grid");
        Tensor::from_f32(vec![c, r], &m.t().iter().copied().collect::<Vec<_>>())
    }
}

pub static LINEAR_FP8_FPROP: OpEntry = OpEntry {
    name: "linear_fp8_fprop",
    source: "V3 §3.3.1 Fig. 6 (Fprop), §3.3.2: x in 1×128 tiles · W in 128×128 blocks",
    summary: "y[m,n] = Σ_kb (Σ_{k∈kb} x[m,k]·w[n,k]) · x_s[m,kb] · w_s[n/B,kb] (fp8_gemm with the Linear's names); bf16 output",
    inputs: &[
        TensorSpec { name: "x", dtypes: &[DType::F8E4M3], shape: &[Dim::Var("M"), Dim::Var("K")], doc: "input, E4M3 codes (1×B tiles)" },
        TensorSpec { name: "x_s", dtypes: SCALE_DTYPES, shape: &[Dim::Var("M"), Dim::CeilDiv("K", "block_size")], doc: "1×B tile scales" },
        TensorSpec { name: "w", dtypes: &[DType::F8E4M3], shape: &[Dim::Var("N"), Dim::Var("K")], doc: "weight, E4M3 codes (B×B blocks)" },
        TensorSpec { name: "w_s", dtypes: SCALE_DTYPES, shape: &[Dim::CeilDiv("N", "block_size"), Dim::CeilDiv("K", "block_size")], doc: "B×B block scales" },
    ],
    outputs: &[TensorSpec { name: "y", dtypes: OUT_DTYPES, shape: &[Dim::Var("M"), Dim::Var("N")], doc: "x·wᵀ" }],
    constraints: &[],
    config: GEMM_FIELDS,
    reference: fprop_ref,
    reference_fn: "reference/src/fp8/linear_fp8.rs::fprop",
    gpu: gemm_backends!(fprop_gpu),
    policy: fprop_policy,
    policy_doc: POLICY_DOC,
    generate: fprop_gen,
    test_configs: TEST_CONFIGS,
    v3_sizes: &[&[("M", 2), ("N", 4096), ("K", 7168)]],
};

fn fprop_compute(inputs: &TensorMap, cfg: &Config, with_magnitude: bool) -> Result<GemmOut> {
    training_compute(&FPROP, inputs, cfg, with_magnitude)
}

fn fprop_ref(inputs: &TensorMap, cfg: &Config) -> Result<TensorMap> {
    // y [M, N] over K
    let (x, w) = (&get(inputs, "x").shape, &get(inputs, "w").shape);
    gemm_ref(inputs, cfg, fprop_compute, x[1], ("y", vec![x[0], w[0]]))
}

fn fprop_policy<'a>(ctx: &PolicyCtx<'a>) -> Policy<'a> {
    // the reduction length
    let k = get(ctx.inputs, "x").shape[1];
    gemm_policy(ctx, fprop_compute, k, None)
}

fn fprop_gen(rng: &mut Rng, cfg: &Config, sizes: &Sizes) -> Result<TensorMap> {
    let block = cfg.usize("block_size");
    let (m, n, k) = (
        size(rng, sizes, "M", 1, 6),
        size(rng, sizes, "N", 1, 2 * block + 5),
        size(rng, sizes, "K", 1, 3 * block + 7),
    );
    gen_fits(&[&[m, k], &[n, k]])?;
    let uniform = row_constant_scales(cfg);
    let (x, x_s) = training_operand(rng, m, k, block, false, uniform);
    let (w, w_s) = training_weight(rng, n, k, block, uniform);
    Ok(outputs([("x", x), ("x_s", x_s), ("w", w), ("w_s", w_s)]))
}

pub static LINEAR_FP8_DGRAD: OpEntry = OpEntry {
    name: "linear_fp8_dgrad",
    source:
        "V3 §3.3.1 Fig. 6 (Dgrad): dy in 1×128 tiles · Wᵀ with the transposed 128×128 block scales",
    summary: "dx[m,k] = Σ_nb (Σ_{n∈nb} dy[m,n]·w[n,k]) · dy_s[m,nb] · w_s[nb,k/B]; bf16 output",
    inputs: &[
        TensorSpec {
            name: "dy",
            dtypes: &[DType::F8E4M3],
            shape: &[Dim::Var("M"), Dim::Var("N")],
            doc: "output gradient, E4M3 codes (1×B tiles along N)",
        },
        TensorSpec {
            name: "dy_s",
            dtypes: SCALE_DTYPES,
            shape: &[Dim::Var("M"), Dim::CeilDiv("N", "block_size")],
            doc: "1×B tile scales",
        },
        TensorSpec {
            name: "w",
            dtypes: &[DType::F8E4M3],
            shape: &[Dim::Var("N"), Dim::Var("K")],
            doc: "the forward weight as stored, E4M3 codes",
        },
        TensorSpec {
            name: "w_s",
            dtypes: SCALE_DTYPES,
            shape: &[
                Dim::CeilDiv("N", "block_size"),
                Dim::CeilDiv("K", "block_size"),
            ],
            doc: "its B×B block scales (read transposed)",
        },
    ],
    outputs: &[TensorSpec {
        name: "dx",
        dtypes: OUT_DTYPES,
        shape: &[Dim::Var("M"), Dim::Var("K")],
        doc: "dy·w",
    }],
    constraints: &[],
    config: GEMM_FIELDS,
    reference: dgrad_ref,
    reference_fn: "reference/src/fp8/linear_fp8.rs::dgrad",
    gpu: gemm_backends!(dgrad_gpu),
    policy: dgrad_policy,
    policy_doc: POLICY_DOC,
    generate: dgrad_gen,
    test_configs: TEST_CONFIGS,
    v3_sizes: &[&[("M", 2), ("N", 4096), ("K", 7168)]],
};

fn dgrad_compute(inputs: &TensorMap, cfg: &Config, with_magnitude: bool) -> Result<GemmOut> {
    training_compute(&DGRAD, inputs, cfg, with_magnitude)
}

fn dgrad_ref(inputs: &TensorMap, cfg: &Config) -> Result<TensorMap> {
    // dx [M, K] over N
    let (dy, w) = (&get(inputs, "dy").shape, &get(inputs, "w").shape);
    gemm_ref(inputs, cfg, dgrad_compute, dy[1], ("dx", vec![dy[0], w[1]]))
}

fn dgrad_policy<'a>(ctx: &PolicyCtx<'a>) -> Policy<'a> {
    // the reduction length
    let n = get(ctx.inputs, "dy").shape[1];
    gemm_policy(ctx, dgrad_compute, n, None)
}

fn dgrad_gen(rng: &mut Rng, cfg: &Config, sizes: &Sizes) -> Result<TensorMap> {
    let block = cfg.usize("block_size");
    let (m, n, k) = (
        size(rng, sizes, "M", 1, 6),
        size(rng, sizes, "N", 1, 3 * block + 7),
        size(rng, sizes, "K", 1, 2 * block + 5),
    );
    gen_fits(&[&[m, n], &[n, k]])?;
    let uniform = row_constant_scales(cfg);
    let (dy, dy_s) = training_operand(rng, m, n, block, false, uniform);
    // w_sᵀ rows must be constant when windows span blocks: draw w_sᵀ, store its transpose
    let (w, w_s_t) = {
        let codes = gemm_codes(rng, n, k, block);
        let grid_t = vec![k.div_ceil(block), n.div_ceil(block)];
        (
            Tensor::from_codes(DType::F8E4M3, vec![n, k], codes),
            gemm_scales(rng, grid_t, uniform),
        )
    };
    Ok(outputs([
        ("dy", dy),
        ("dy_s", dy_s),
        ("w", w),
        ("w_s", transpose_scales(&w_s_t)),
    ]))
}

pub static LINEAR_FP8_WGRAD: OpEntry = OpEntry {
    name: "linear_fp8_wgrad",
    source: "V3 §3.3.1 Fig. 6 (Wgrad), App. B.2: xᵀ re-tiled 128×1 · dy in 128×1 tiles → FP32 weight gradient",
    summary: "dw[n,k] = Σ_mb (Σ_{m∈mb} dy[m,n]·x[m,k]) · dy_s[mb,n] · x_s[mb,k]; f32 output",
    inputs: &[
        TensorSpec { name: "x", dtypes: &[DType::F8E4M3], shape: &[Dim::Var("M"), Dim::Var("K")], doc: "input, E4M3 codes in B×1 tiles (B tokens per scale)" },
        TensorSpec { name: "x_s", dtypes: SCALE_DTYPES, shape: &[Dim::CeilDiv("M", "block_size"), Dim::Var("K")], doc: "B×1 tile scales" },
        TensorSpec { name: "dy", dtypes: &[DType::F8E4M3], shape: &[Dim::Var("M"), Dim::Var("N")], doc: "output gradient, E4M3 codes in B×1 tiles" },
        TensorSpec { name: "dy_s", dtypes: SCALE_DTYPES, shape: &[Dim::CeilDiv("M", "block_size"), Dim::Var("N")], doc: "B×1 tile scales" },
    ],
    outputs: &[TensorSpec { name: "dw", dtypes: OUT_DTYPES, shape: &[Dim::Var("N"), Dim::Var("K")], doc: "dyᵀ·x" }],
    constraints: &[],
    config: WGRAD_FIELDS,
    reference: wgrad_ref,
    reference_fn: "reference/src/fp8/linear_fp8.rs::wgrad",
    gpu: &[],
    policy: wgrad_policy,
    policy_doc: POLICY_DOC,
    generate: wgrad_gen,
    test_configs: &[
        r#"{"out_dtype":"bf16"}"#,
        r#"{"block_size":32}"#,
        r#"{"accumulation":"tensor_core"}"#,
        r#"{"accumulation":"tensor_core","promote_interval":0}"#,
        r#"{"accumulation":"tensor_core","promote_interval":64,"acc_frac_bits":14,"acc_group":16,"term_cut":"floor","acc_out_frac_bits":23,"acc_out_round":"nearest_even"}"#,
    ],
    v3_sizes: &[&[("M", 256), ("N", 576), ("K", 512)]],
};

fn wgrad_compute(inputs: &TensorMap, cfg: &Config, with_magnitude: bool) -> Result<GemmOut> {
    training_compute(&WGRAD, inputs, cfg, with_magnitude)
}

fn wgrad_ref(inputs: &TensorMap, cfg: &Config) -> Result<TensorMap> {
    // dw [N, K] over M
    let (dy, x) = (&get(inputs, "dy").shape, &get(inputs, "x").shape);
    gemm_ref(inputs, cfg, wgrad_compute, x[0], ("dw", vec![dy[1], x[1]]))
}

fn wgrad_policy<'a>(ctx: &PolicyCtx<'a>) -> Policy<'a> {
    // the reduction length
    let m = get(ctx.inputs, "x").shape[0];
    gemm_policy(ctx, wgrad_compute, m, None)
}

fn wgrad_gen(rng: &mut Rng, cfg: &Config, sizes: &Sizes) -> Result<TensorMap> {
    let block = cfg.usize("block_size");
    let (m, n, k) = (
        size(rng, sizes, "M", 1, 3 * block + 7),
        size(rng, sizes, "N", 1, 6),
        size(rng, sizes, "K", 1, 2 * block + 5),
    );
    gen_fits(&[&[m, k], &[m, n]])?;
    let uniform = row_constant_scales(cfg);
    let (x, x_s) = training_operand(rng, m, k, block, true, uniform);
    let (dy, dy_s) = training_operand(rng, m, n, block, true, uniform);
    Ok(outputs([
        ("x", x),
        ("x_s", x_s),
        ("dy", dy),
        ("dy_s", dy_s),
    ]))
}

// ---- GPU backends (gpu/kernels/fp8_gemm.cu "simt", gpu/kernels/fp8_gemm_wgmma.cu "wgmma")

const SIMT_KERNEL: &str = "gpu/kernels/fp8_gemm.cu";
const WGMMA_KERNEL: &str = "gpu/kernels/fp8_gemm_wgmma.cu";

/// `simt` computes exact block dots on the CUDA cores: it is the exact mode, any block size.
fn simt_supports(cfg: &Config) -> std::result::Result<(), &'static str> {
    match accumulation(cfg) {
        // exact block dots: the exact mode, and inside every Tensor Core bound
        Accumulation::Exact | Accumulation::TensorCoreBound { .. } => Ok(()),
        Accumulation::TensorCore { .. } => {
            Err("tensor_core config: its block dots are exact, not a Tensor Core's")
        }
    }
}

/// `wgmma` runs the block dots on Hopper's Tensor Cores and promotes every 128 products: the
/// only config that describes its partials is the Hopper model with promote_interval 128.
fn wgmma_supports(cfg: &Config) -> std::result::Result<(), &'static str> {
    match accumulation(cfg) {
        Accumulation::Exact => Err("exact mode: Tensor Core block dots are not exact"),
        Accumulation::TensorCore {
            model,
            promote_interval,
        } => {
            if cfg.usize("block_size") != 128 {
                Err("block_size ≠ 128 (the kernel's K and N tiles)")
            } else if promote_interval != 128 {
                Err("promote_interval ≠ 128 (the kernel promotes every 4 k32 steps)")
            } else if model != HOPPER_FP8_WGMMA {
                Err("model parameters ≠ HOPPER_FP8_WGMMA (they do not describe this hardware)")
            } else {
                Ok(())
            }
        }
        Accumulation::TensorCoreBound {
            bound,
            promote_interval,
        } => {
            if cfg.usize("block_size") != 128 || promote_interval != 128 {
                Err("block_size or promote_interval ≠ 128 (the kernel's tiles and promotion)")
            } else if bound.group != HOPPER_FP8_WGMMA.group
                || bound.frac_bits > HOPPER_FP8_WGMMA.frac_bits
            {
                Err("the bound's acc_group ≠ 32 or acc_frac_bits > 13: Hopper's wgmma is outside it")
            } else {
                Ok(())
            }
        }
    }
}

/// One GEMM on the GPU: contiguous copies of the operands (scales as f32: F8_E8M0 decodes
/// exactly), the f32 accumulators or their bf16 rounding as the config asks.
fn gemm_on_gpu(
    gpu: &dsv3_gpu::Gpu,
    backend: Backend,
    (a, a_s, b, b_s): (
        ArrayView2<u8>,
        ArrayView2<f32>,
        ArrayView2<u8>,
        ArrayView2<f32>,
    ),
    cfg: &Config,
) -> Result<Floats> {
    let (m, k, n) = (a.nrows(), a.ncols(), b.nrows());
    let owned = |v: ArrayView2<u8>| v.iter().copied().collect::<Vec<u8>>();
    let owned_f32 = |v: ArrayView2<f32>| v.iter().copied().collect::<Vec<f32>>();
    Ok(dsv3_gpu::fp8_gemm::fp8_gemm(
        gpu,
        backend,
        &owned(a),
        &owned_f32(a_s),
        &owned(b),
        &owned_f32(b_s),
        (m, n, k),
        cfg.usize("block_size"),
        cfg.choice("out_dtype") != Some("f32"),
    )?)
}

fn fp8_gemm_gpu(
    gpu: &dsv3_gpu::Gpu,
    backend: Backend,
    inputs: &TensorMap,
    cfg: &Config,
) -> Result<TensorMap> {
    let (a, a_s, b, b_s) = fp8_gemm_operands(inputs, cfg)?;
    let out = gemm_on_gpu(
        gpu,
        backend,
        (a.view(), a_s.view(), b.view(), b_s.view()),
        cfg,
    )?;
    let a_shape = &get(inputs, "a").shape;
    let mut shape = a_shape[..a_shape.len() - 1].to_vec();
    shape.push(b.nrows());
    Ok(outputs([("c", floats_tensor(shape, out))]))
}

/// Grouped GEMMs on the GPU, one launch per group: the group's defined rows are gathered, run
/// against the group's weight and scattered back (undefined rows are written 0, as the
/// reference does).
fn grouped_gpu(
    gpu: &dsv3_gpu::Gpu,
    backend: Backend,
    a: &Array3<u8>,
    a_s: &Array3<f32>,
    (b, b_s): (&Array3<u8>, &Array3<f32>),
    rows_of_group: &[Vec<(usize, usize)>],
    cfg: &Config,
) -> Result<(usize, Vec<f32>, Vec<u16>)> {
    // rows_of_group[g]: (slab, row) of a for every defined row of group g, in output order
    let n = b.shape()[1];
    let total_rows = a.shape()[0] * a.shape()[1];
    let (mut c_f32, mut c_bf16) = (vec![0f32; total_rows * n], vec![0u16; total_rows * n]);
    for (g, rows) in rows_of_group.iter().enumerate() {
        if rows.is_empty() {
            continue;
        }
        let ga = Array2::from_shape_fn((rows.len(), a.shape()[2]), |(i, k)| {
            a[[rows[i].0, rows[i].1, k]]
        });
        let ga_s = Array2::from_shape_fn((rows.len(), a_s.shape()[2]), |(i, k)| {
            a_s[[rows[i].0, rows[i].1, k]]
        });
        let out = gemm_on_gpu(
            gpu,
            backend,
            (
                ga.view(),
                ga_s.view(),
                b.index_axis(Axis(0), g),
                b_s.index_axis(Axis(0), g),
            ),
            cfg,
        )?;
        for (i, &(slab, row)) in rows.iter().enumerate() {
            let dst = (slab * a.shape()[1] + row) * n;
            match &out {
                Floats::F32(v) => c_f32[dst..dst + n].copy_from_slice(&v[i * n..(i + 1) * n]),
                Floats::Bf16(v) => c_bf16[dst..dst + n].copy_from_slice(&v[i * n..(i + 1) * n]),
            }
        }
    }
    Ok((n, c_f32, c_bf16))
}

/// The grouped output tensor `[.., N]` from the scattered buffers.
fn grouped_out(cfg: &Config, shape: Vec<usize>, c_f32: Vec<f32>, c_bf16: Vec<u16>) -> Tensor {
    floats_tensor(
        shape,
        match cfg.choice("out_dtype") {
            Some("f32") => Floats::F32(c_f32),
            _ => Floats::Bf16(c_bf16),
        },
    )
}

fn contiguous_gpu(
    gpu: &dsv3_gpu::Gpu,
    backend: Backend,
    inputs: &TensorMap,
    cfg: &Config,
) -> Result<TensorMap> {
    let (a, a_s, b, b_s, m_indices) = contiguous_operands(inputs, cfg)?;
    let mut rows = vec![Vec::new(); b.shape()[0]];
    for (i, &g) in m_indices.iter().enumerate() {
        if g >= 0 {
            rows[g as usize].push((0, i));
        }
    }
    let m = a.nrows();
    let (a3, a_s3) = (a.insert_axis(Axis(0)), a_s.insert_axis(Axis(0)));
    let (n, c_f32, c_bf16) = grouped_gpu(gpu, backend, &a3, &a_s3, (&b, &b_s), &rows, cfg)?;
    Ok(outputs([(
        "c",
        grouped_out(cfg, vec![m, n], c_f32, c_bf16),
    )]))
}

fn masked_gpu(
    gpu: &dsv3_gpu::Gpu,
    backend: Backend,
    inputs: &TensorMap,
    cfg: &Config,
) -> Result<TensorMap> {
    let (a, a_s, b, b_s, masked_m) = masked_operands(inputs, cfg)?;
    let rows: Vec<Vec<(usize, usize)>> = masked_m
        .iter()
        .enumerate()
        .map(|(g, &r)| (0..r.max(0) as usize).map(|i| (g, i)).collect())
        .collect();
    let (groups, m_max) = (a.shape()[0], a.shape()[1]);
    let (n, c_f32, c_bf16) = grouped_gpu(gpu, backend, &a, &a_s, (&b, &b_s), &rows, cfg)?;
    Ok(outputs([(
        "c",
        grouped_out(cfg, vec![groups, m_max, n], c_f32, c_bf16),
    )]))
}

/// Fprop and Dgrad on the GPU: the operands as fp8_gemm sees them (Dgrad's `wᵀ`, `w_sᵀ`
/// transposed on the host), block-scaled B.
fn training_gpu(
    t: &Training,
    out: &str,
    gpu: &dsv3_gpu::Gpu,
    backend: Backend,
    inputs: &TensorMap,
    cfg: &Config,
) -> Result<TensorMap> {
    let (a, a_s, b, b_s) = training_operands(t, inputs, cfg)?;
    let c = gemm_on_gpu(
        gpu,
        backend,
        (a.view(), a_s.view(), b.view(), b_s.view()),
        cfg,
    )?;
    Ok(outputs([(
        out,
        floats_tensor(vec![a.nrows(), b.nrows()], c),
    )]))
}

fn fprop_gpu(
    gpu: &dsv3_gpu::Gpu,
    backend: Backend,
    inputs: &TensorMap,
    cfg: &Config,
) -> Result<TensorMap> {
    training_gpu(&FPROP, "y", gpu, backend, inputs, cfg)
}

fn dgrad_gpu(
    gpu: &dsv3_gpu::Gpu,
    backend: Backend,
    inputs: &TensorMap,
    cfg: &Config,
) -> Result<TensorMap> {
    training_gpu(&DGRAD, "dx", gpu, backend, inputs, cfg)
}

#[cfg(test)]
mod tests {
    use super::super::U32 as U;
    use super::*;

    #[test]
    fn bf16_half_gap_is_half_an_ulp_toward_the_reference() {
        // 1.0: the gap above is 2^-7, below 2^-8 (the binade below is finer)
        assert_eq!(bf16_half_gap_toward(1.0, 1.5), 2f64.powi(-8));
        assert_eq!(bf16_half_gap_toward(1.0, 0.5), 2f64.powi(-9));
        assert_eq!(bf16_half_gap_toward(-1.0, -0.5), 2f64.powi(-9));
        assert_eq!(bf16_half_gap_toward(-1.0, -1.5), 2f64.powi(-8));
        assert_eq!(bf16_half_gap_toward(1.5, 1.0), 2f64.powi(-8));
        assert_eq!(bf16_half_gap_toward(0.0, 1.0), 2f64.powi(-134));
    }

    #[test]
    fn the_bound_accepts_one_rounding_step_and_rejects_two() {
        // f32: magnitude 1, W = 1 → E = 2·3u/(1−3u) ≈ 6u
        let e = gemm_bound(1.0, 1);
        assert!((e - 6.0 * U).abs() < 1e-12, "{e}");
        // (3 f32 ulps of 1.0 = 6u: accepted; 4 ulps: rejected)
        let three_up = f64::from(f32::from_bits(1.0f32.to_bits() + 3));
        assert!(within_bound(three_up, 1.0, 1.0, 1, false));
        let four_up = f64::from(f32::from_bits(1.0f32.to_bits() + 4));
        assert!(!within_bound(four_up, 1.0, 1.0, 1, false));
        // bf16: the reference 1 + 2^-8 + 2^-23 lies one f32 ulp above a rounding midpoint:
        // both neighbours 1 and 1 + 2^-7 are acceptable, 1 + 2^-6 is not.
        let r = 1.0 + 2f32.powi(-8) + 2f32.powi(-23);
        assert!(within_bound(1.0, r, 1.0, 1, true));
        assert!(within_bound(1.0 + 2f64.powi(-7), r, 1.0, 1, true));
        assert!(!within_bound(1.0 + 2f64.powi(-6), r, 1.0, 1, true));
        assert!(!within_bound(f64::NAN, r, 1.0, 1, true));
    }
}
