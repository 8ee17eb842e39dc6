//! The block-scaled FP8 GEMM family: `fp8_gemm`, its MoE layouts `m_grouped_fp8_gemm_contiguous`
//! / `m_grouped_fp8_gemm_masked`, and a Linear's training GEMMs `linear_fp8_fprop` /
//! `linear_fp8_dgrad` / `linear_fp8_wgrad`.
//!
//! One descriptor per op, a [`Layout`]: how its tensors become the reference's operands, its
//! output's shape, the rows it defines, its input generator and its GPU launch. Everything else
//! — the reference with its auxiliary tensors, the tolerance policy, the config, the GPU
//! backends — is written once here, generic over the layout.
//!
//! The reference functions in `dsv3_reference::fp8::{fp8_gemm, grouped_gemm, linear_fp8}` are
//! the definitions; the registry computes with `crate::ops::gemm::fast`, which is bit-identical to them
//! (`tests/fp8_gemm_fast.rs`), so that `dsv3 check` handles DeepSeek-V3-sized GEMMs.
//!
//! # Tolerance policy (SPEC.md "FP8 GEMM tolerance")
//! A kernel's output element is accepted when it is the output-dtype rounding (RNE) of an f32
//! value within `E = 2·γ_{W+2}·Σ_w |p_w|·a_s·b_s + (W+2)·2^-147` of the reference's f32
//! accumulator, where `p_w` are the W promoted partials (block dots in exact mode, Tensor Core
//! window partials in model mode) and `γ_n = n·u/(1 − n·u)`, `u = 2^-24`. That covers any order
//! of the f32 accumulation across blocks, FMA contraction and either association of the scale
//! product; it does not cover a different block dot (use a Tensor Core mode for Tensor Core
//! kernels). `tensor_core_bound` measures each element against its own bound instead
//! ([`crate::registry::tolerance::tc_bound_tolerance`]).

mod dense;
pub mod fast;
mod generate;
mod gpu;
mod grouped;
mod layouts;
mod linear;
mod policy;

pub use dense::FP8_GEMM;
pub use grouped::{M_GROUPED_CONTIGUOUS, M_GROUPED_MASKED};
pub use linear::{LINEAR_FP8_DGRAD, LINEAR_FP8_FPROP, LINEAR_FP8_WGRAD};

#[cfg(feature = "cuda")]
use dsv3_gpu::fp8_gemm::Backend;
#[cfg(feature = "cuda")]
use dsv3_gpu::Floats;
use dsv3_reference::fp8::accumulate::{MAX_FRAC_BITS, MAX_GROUP};
use dsv3_reference::fp8::fp8_gemm::{self as reference, Accumulation};
use dsv3_reference::fp8::tc_bound::TensorCoreBound;
use dsv3_reference::fp8::{TensorCoreModel, TermCut, WriteBack};
use ndarray::Array2;

use super::{OutDtype, BLOCK_KIND};
use crate::ops::gemm::fast::GemmOut;
use crate::registry::compare::Policy;
use crate::registry::config::{ceil, Choice, Config, ConfigSchema, FieldKind};
use crate::registry::contract::Param;
use crate::registry::error::Result;
use crate::registry::io::TensorMap;
use crate::registry::rng::Rng;
use crate::registry::tensor::{DType, Tensor};
use crate::registry::{GpuImpl, PolicyCtx, Sizes};

// ---- config

crate::choice! {
    /// How the block dots are accumulated (`dsv3_reference::fp8::fp8_gemm::Accumulation`).
    pub enum AccumulationMode {
        Exact = "exact",
        TensorCore = "tensor_core",
        TensorCoreBound = "tensor_core_bound",
    }
}

crate::choice! {
    /// Which scale inputs are stored MN-major (`src/registry/adapt.rs`).
    pub enum MnMajorScales { None = "none", Lhs = "lhs", Rhs = "rhs", Both = "both" }
}

impl Choice for TermCut {
    const VALUES: &'static [&'static str] = &["toward_zero", "floor", "nearest"];
    fn from_index(i: usize) -> Self {
        [TermCut::TowardZero, TermCut::Floor, TermCut::Nearest][i]
    }
    fn name(self) -> &'static str {
        Self::VALUES[self as usize]
    }
}

impl Choice for WriteBack {
    const VALUES: &'static [&'static str] = &["toward_zero", "nearest_even"];
    fn from_index(i: usize) -> Self {
        [WriteBack::TowardZero, WriteBack::NearestEven][i]
    }
    fn name(self) -> &'static str {
        Self::VALUES[self as usize]
    }
}

crate::op_config! {
    /// The config of every block-scaled GEMM op (`linear_fp8_wgrad` defaults to f32 output).
    pub struct GemmConfig {
        block_size: usize = "128", BLOCK_KIND, "tile edge; 128 in DeepSeek-V3";
        out_dtype: OutDtype = "\"bf16\"", FieldKind::choice::<OutDtype>(),
            "bf16 (OFF's c = accumulator.to(bf16), RNE) or f32 (the accumulator itself; linear_fp8_wgrad's default: V3 Fig. 6 keeps the weight gradient in FP32)";
        accumulation: AccumulationMode = "\"exact\"", FieldKind::choice::<AccumulationMode>(),
            "exact: exact block dot rounded once to f32 (OFF Triton, CUDA-core kernels); tensor_core: the T-FDPA model (acc_* fields) inside promotion windows, bit for bit; tensor_core_bound: any Tensor Core kernel with at least acc_frac_bits bits and acc_group products per step, promoted every promote_interval (a derived bound)";
        promote_interval: usize = "128", FieldKind::Int { min: 0, max: ceil::BLOCK },
            "tensor_core: N_C, products per Tensor Core window before promotion to f32 (V3: 128); 0 = never (needs scales constant along K)";
        acc_frac_bits: u32 = "13", FieldKind::Int { min: 1, max: MAX_FRAC_BITS as u64 },
            "tensor_core: F, fraction bits kept below the largest exponent (Hopper: 13, the paper's \"14 bits\")";
        acc_group: usize = "32", FieldKind::Int { min: 1, max: MAX_GROUP as u64 },
            "tensor_core: L, products aligned together (one wgmma k32 step)";
        term_cut: TermCut = "\"toward_zero\"", FieldKind::choice::<TermCut>(),
            "tensor_core: how aligned terms drop bits (MMA-Sim: toward_zero; \"sign-fill\": floor; nearest)";
        acc_out_frac_bits: u32 = "13", FieldKind::Int { min: 0, max: 23 },
            "tensor_core: fraction bits of the accumulator register (Hopper: 13, e8m13; max 23)";
        acc_out_round: WriteBack = "\"toward_zero\"", FieldKind::choice::<WriteBack>(),
            "tensor_core: rounding of each step's sum into the register";
        mn_major_scales: MnMajorScales = "\"none\"", FieldKind::choice::<MnMajorScales>(),
            "scale inputs stored MN-major (transposed, MN padding allowed), as DeepGEMM's TMA-aligned layout: lhs = the first scale input (a_s, x_s, dy_s), rhs = the second; int32 scale inputs are DeepGEMM's packed UE8M0 (README \"Kernel layouts\")";
    }
}

impl GemmConfig {
    /// The accumulation this config asks for.
    pub fn accumulation(&self) -> Accumulation {
        match self.accumulation {
            AccumulationMode::Exact => Accumulation::Exact,
            AccumulationMode::TensorCore => Accumulation::TensorCore {
                model: TensorCoreModel {
                    frac_bits: self.acc_frac_bits,
                    group: self.acc_group,
                    term_cut: self.term_cut,
                    out_frac_bits: self.acc_out_frac_bits,
                    out_round: self.acc_out_round,
                },
                promote_interval: self.promote_interval,
            },
            AccumulationMode::TensorCoreBound => Accumulation::TensorCoreBound {
                bound: TensorCoreBound {
                    frac_bits: self.acc_frac_bits,
                    group: self.acc_group,
                },
                promote_interval: self.promote_interval,
            },
        }
    }

    /// Whether the scale inputs `(lhs, rhs)` are stored MN-major.
    pub fn mn_major(&self) -> (bool, bool) {
        match self.mn_major_scales {
            MnMajorScales::None => (false, false),
            MnMajorScales::Lhs => (true, false),
            MnMajorScales::Rhs => (false, true),
            MnMajorScales::Both => (true, true),
        }
    }

    /// The number of promoted partials per output element over a reduction of length `k`:
    /// the reference's (K-blocks in exact and bound mode, windows in tensor_core mode).
    fn partials(&self, k: usize) -> usize {
        match self.accumulation() {
            Accumulation::Exact | Accumulation::TensorCoreBound { .. } => {
                k.div_ceil(self.block_size)
            }
            Accumulation::TensorCore {
                promote_interval, ..
            } => windows(promote_interval, k),
        }
    }

    /// Whether the scales of a row must be equal along K (a promotion window that spans
    /// several blocks).
    fn row_constant_scales(&self) -> bool {
        match self.accumulation().promote_interval() {
            None => false,
            Some(promote_interval) => {
                promote_interval == 0 || self.block_size % promote_interval != 0
            }
        }
    }

    /// The output tensor of f32 accumulators `c` under `out_dtype`.
    fn out_tensor(&self, shape: Vec<usize>, c: &Array2<f32>) -> Tensor {
        let dtype = match self.out_dtype {
            OutDtype::F32 => DType::F32,
            OutDtype::Bf16 => DType::BF16,
        };
        let c = c.as_standard_layout();
        Tensor::from_f32_as(dtype, shape, c.as_slice().expect("standard layout"))
    }
}

/// The promotion windows a Tensor Core kernel has over a reduction of length `k`.
fn windows(promote_interval: usize, k: usize) -> usize {
    k.div_ceil(reference::window_len(promote_interval, k))
}

/// The schema of the GEMM ops (bf16 output).
const SCHEMA: ConfigSchema = ConfigSchema::of::<GemmConfig>();

/// `block_size`, for the shape rules.
const BLOCK: Param = Param {
    name: "block_size",
    get: |c| c.get::<GemmConfig>().block_size,
};

/// Configs the property tests, GPU diff and benches sweep: one per branch of the config.
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

const SCALE_DTYPES: &[DType] = &[DType::F32, DType::F8E8M0];
const OUT_DTYPES: &[DType] = &[DType::BF16, DType::F32];
const POLICY_DOC: &str = "per element: the out_dtype rounding (RNE) of an f32 value within \
E = 2·γ_{W+2}·Σ_w|p_w|·a_s·b_s + (W+2)·2^-147 of the reference's f32 accumulator (W promoted \
partials p_w: K-blocks in exact mode, Tensor Core windows in tensor_core mode; γ_n = n·2^-24/(1 − n·2^-24)); \
covers another f32 order across blocks, FMA contraction and (a_s·b_s)·p as DeepGEMM, not a different block dot";

// ---- the descriptor

/// One op of the family: how its inputs become the reference's operands and its output.
pub(crate) trait Layout: 'static {
    /// The output tensor's name (`c`, `y`, `dx`, `dw`).
    const OUTPUT: &'static str;
    /// The operands as the reference takes them (they may borrow the inputs' bytes).
    type Operands<'a>;

    /// The operands of contract-checked `inputs`, validated by the reference's rules.
    fn operands<'a>(inputs: &'a TensorMap, cfg: &GemmConfig) -> Result<Self::Operands<'a>>;
    /// The f32 accumulators (rows in output order), with magnitudes when asked for.
    fn compute(ops: &Self::Operands<'_>, cfg: &GemmConfig, with_magnitude: bool) -> GemmOut;
    /// The reference output tensor of the exact and `tensor_core` modes, `[shape]` under
    /// `out_dtype`.
    fn output(ops: &Self::Operands<'_>, cfg: &GemmConfig, shape: Vec<usize>) -> Tensor {
        cfg.out_tensor(shape, &Self::compute(ops, cfg, false).c)
    }
    /// `tensor_core_bound`: the accumulators and each element's tolerance (f64 little-endian
    /// bytes) straight from a kernel that folds the sums in its tiles, or `None` (then
    /// [`Layout::compute`] with magnitudes).
    fn bound_output(
        _ops: &Self::Operands<'_>,
        _cfg: &GemmConfig,
        _tolerance: &crate::registry::tolerance::TcBoundTolerance,
    ) -> Option<(ndarray::Array2<f32>, Vec<u8>)> {
        None
    }
    /// The output's shape and the reduction length.
    fn shape(inputs: &TensorMap) -> (Vec<usize>, usize);
    /// The rows the op defines (grouped layouts leave padding rows undefined); `None`: all.
    fn defined_rows(_ops: &Self::Operands<'_>) -> Option<Vec<bool>> {
        None
    }
    /// Random inputs (registry [`crate::registry::GenFn`]).
    fn generate(rng: &mut Rng, cfg: &GemmConfig, sizes: &Sizes) -> Result<TensorMap>;
    /// The output computed on the GPU by `backend`, rows in output order (`[rows, N]`).
    #[cfg(feature = "cuda")]
    fn gpu(
        gpu: &dsv3_gpu::Gpu,
        backend: Backend,
        ops: &Self::Operands<'_>,
        cfg: &GemmConfig,
    ) -> Result<Floats>;
}

/// The f32 accumulators of `L` on `inputs` (the policy's fallback when the reference handed
/// over no auxiliary tensors).
fn compute<L: Layout>(
    inputs: &TensorMap,
    cfg: &GemmConfig,
    with_magnitude: bool,
) -> Result<GemmOut> {
    Ok(L::compute(&L::operands(inputs, cfg)?, cfg, with_magnitude))
}

/// The registry's reference of `L` ([`policy::reference`]).
fn reference<L: Layout>(inputs: &TensorMap, cfg: &Config) -> Result<TensorMap> {
    policy::reference::<L>(inputs, cfg.get::<GemmConfig>())
}

/// The registry's policy of `L` ([`policy::policy`]).
fn policy_of<'a, L: Layout>(ctx: &PolicyCtx<'a>) -> Policy<'a> {
    policy::policy::<L>(ctx)
}

/// The registry's generator of `L`.
fn generate<L: Layout>(rng: &mut Rng, cfg: &Config, sizes: &Sizes) -> Result<TensorMap> {
    L::generate(rng, cfg.get::<GemmConfig>(), sizes)
}

#[cfg(feature = "cuda")]
/// `L` on one GPU backend.
fn run_gpu<L: Layout, const WGMMA: bool>(
    g: &dsv3_gpu::Gpu,
    inputs: &TensorMap,
    cfg: &Config,
) -> Result<TensorMap> {
    let cfg = cfg.get::<GemmConfig>();
    let backend = if WGMMA { Backend::Wgmma } else { Backend::Simt };
    let out = L::gpu(g, backend, &L::operands(inputs, cfg)?, cfg)?;
    let (shape, _) = L::shape(inputs);
    Ok(super::outputs([(
        L::OUTPUT,
        Tensor::from_floats(shape, out),
    )]))
}

/// The two GPU backends of a layout, each judged only under the configs it implements.
struct Backends<L>(std::marker::PhantomData<L>);

impl<L: Layout> Backends<L> {
    const BOTH: &'static [GpuImpl] = &[
        GpuImpl {
            backend: "simt",
            run: crate::gpu_fn!(run_gpu::<L, false>),
            kernel: gpu::SIMT_KERNEL,
            supports: gpu::simt_supports,
        },
        GpuImpl {
            backend: "wgmma",
            run: crate::gpu_fn!(run_gpu::<L, true>),
            kernel: gpu::WGMMA_KERNEL,
            supports: gpu::wgmma_supports,
        },
    ];
}
