//! A Linear's training GEMMs (V3 §3.3.1 Fig. 6): Fprop, Dgrad, Wgrad, each `fp8_gemm` on its
//! operands read the way the GEMM needs them (`reference/src/fp8/linear_fp8.rs`).

#[cfg(feature = "cuda")]
use dsv3_gpu::fp8_gemm::Backend;
#[cfg(feature = "cuda")]
use dsv3_gpu::Floats;
use dsv3_reference::fp8::fp8_gemm::{self as reference, BlockScaled, GemmNames, ScaleLayout};
use ndarray::Array2;

use super::generate::{codes, scales, size, tiled_operand, transpose_scales, weight};
#[cfg(feature = "cuda")]
use super::gpu;
use super::{
    Backends, GemmConfig, Layout, BLOCK, OUT_DTYPES, POLICY_DOC, SCALE_DTYPES, SCHEMA, TEST_CONFIGS,
};
use crate::ops::gemm::fast::{self, GemmOut};
use crate::ops::{gen_fits, get, outputs};
use crate::registry::config::ConfigSchema;
use crate::registry::contract::{Dim, TensorSpec};
use crate::registry::error::Result;
use crate::registry::io::TensorMap;
use crate::registry::rng::Rng;
use crate::registry::tensor::{DType, Tensor};
use crate::registry::{OpEntry, Sizes};

/// One training GEMM as `fp8_gemm` sees it.
pub(crate) struct Training {
    op: &'static str,
    output: &'static str,
    names: GemmNames,
    /// The op's inputs that are `a`, `a_s`, `b`, `b_s`, and whether each is read transposed.
    tensors: [(&'static str, bool); 4],
    /// The scale layouts of `a` and `b`.
    layouts: (ScaleLayout, ScaleLayout),
    /// `(output shape, reduction length)` from the op's inputs.
    shape: fn(&TensorMap) -> (Vec<usize>, usize),
    generate: fn(&mut Rng, &GemmConfig, &Sizes) -> Result<TensorMap>,
}

/// A training GEMM op: its descriptor.
pub(crate) trait TrainingGemm: 'static {
    const T: Training;
}

/// `(a, a_s, b, b_s)` as the GEMM reads them, and their scale layouts.
pub(crate) struct Operands {
    a: Array2<u8>,
    a_s: Array2<f32>,
    b: Array2<u8>,
    b_s: Array2<f32>,
    layouts: (ScaleLayout, ScaleLayout),
}

impl Operands {
    fn parts(&self) -> (BlockScaled<'_>, BlockScaled<'_>) {
        let a = BlockScaled {
            codes: self.a.view(),
            scales: self.a_s.view(),
            layout: self.layouts.0,
        };
        let b = BlockScaled {
            codes: self.b.view(),
            scales: self.b_s.view(),
            layout: self.layouts.1,
        };
        (a, b)
    }
}

impl<X: TrainingGemm> Layout for X {
    const OUTPUT: &'static str = X::T.output;
    type Operands<'a> = Operands;

    fn operands(inputs: &TensorMap, cfg: &GemmConfig) -> Result<Operands> {
        let t = &X::T;
        let read = |i: usize| {
            let (name, transposed) = t.tensors[i];
            (get(inputs, name), transposed)
        };
        let codes = |i: usize| {
            let (x, transposed) = read(i);
            let m = x.matrix_u8();
            if transposed {
                m.reversed_axes().as_standard_layout().to_owned()
            } else {
                m
            }
        };
        let scales = |i: usize| {
            let (x, transposed) = read(i);
            let m = x.matrix_f32();
            if transposed {
                m.reversed_axes().as_standard_layout().to_owned()
            } else {
                m
            }
        };
        let ops = Operands {
            a: codes(0),
            a_s: scales(1),
            b: codes(2),
            b_s: scales(3),
            layouts: t.layouts,
        };
        let (a, b) = ops.parts();
        reference::check_gemm(t.op, &t.names, a, b, cfg.block_size, &cfg.accumulation())?;
        Ok(ops)
    }

    fn compute(ops: &Operands, cfg: &GemmConfig, with_magnitude: bool) -> GemmOut {
        let (a, b) = ops.parts();
        fast::gemm(a, b, cfg.block_size, &cfg.accumulation(), with_magnitude)
    }

    fn shape(inputs: &TensorMap) -> (Vec<usize>, usize) {
        (X::T.shape)(inputs)
    }

    fn generate(rng: &mut Rng, cfg: &GemmConfig, sizes: &Sizes) -> Result<TensorMap> {
        (X::T.generate)(rng, cfg, sizes)
    }

    #[cfg(feature = "cuda")]
    fn gpu(
        g: &dsv3_gpu::Gpu,
        backend: Backend,
        ops: &Operands,
        cfg: &GemmConfig,
    ) -> Result<Floats> {
        let (a, b) = ops.parts();
        gpu::gemm_on_gpu(g, backend, a, b, cfg)
    }
}

/// The sizes `M`, `N`, `K` of a training GEMM: pinned, or drawn below `hi` (the reduction's
/// drawn longer to cross blocks).
fn mnk(rng: &mut Rng, sizes: &Sizes, hi: [usize; 3]) -> (usize, usize, usize) {
    let m = size(rng, sizes, "M", 1, hi[0]);
    let n = size(rng, sizes, "N", 1, hi[1]);
    let k = size(rng, sizes, "K", 1, hi[2]);
    (m, n, k)
}

// ---- Fprop

pub static LINEAR_FP8_FPROP: OpEntry = OpEntry {
    name: "linear_fp8_fprop",
    source: "V3 §3.3.1 Fig. 6 (Fprop), §3.3.2: x in 1×128 tiles · W in 128×128 blocks",
    summary: "y[m,n] = Σ_kb (Σ_{k∈kb} x[m,k]·w[n,k]) · x_s[m,kb] · w_s[n/B,kb] (fp8_gemm with the Linear's names); bf16 output",
    inputs: &[
        TensorSpec { name: "x", dtypes: &[DType::F8E4M3], shape: &[Dim::Var("M"), Dim::Var("K")], doc: "input, E4M3 codes (1×B tiles)" },
        TensorSpec { name: "x_s", dtypes: SCALE_DTYPES, shape: &[Dim::Var("M"), Dim::CeilDiv("K", BLOCK)], doc: "1×B tile scales" },
        TensorSpec { name: "w", dtypes: &[DType::F8E4M3], shape: &[Dim::Var("N"), Dim::Var("K")], doc: "weight, E4M3 codes (B×B blocks)" },
        TensorSpec { name: "w_s", dtypes: SCALE_DTYPES, shape: &[Dim::CeilDiv("N", BLOCK), Dim::CeilDiv("K", BLOCK)], doc: "B×B block scales" },
    ],
    outputs: &[TensorSpec { name: "y", dtypes: OUT_DTYPES, shape: &[Dim::Var("M"), Dim::Var("N")], doc: "x·wᵀ" }],
    constraints: &[],
    config: SCHEMA,
    adapt: Some(super::layouts::adapt_inputs),
    reference: super::reference::<Fprop>,
    reference_fn: "reference/src/fp8/linear_fp8.rs::fprop",
    gpu: Backends::<Fprop>::BOTH,
    policy: super::policy_of::<Fprop>,
    policy_doc: POLICY_DOC,
    generate: super::generate::<Fprop>,
    test_configs: TEST_CONFIGS,
    v3_sizes: &[&[("M", 2), ("N", 4096), ("K", 7168)]],
};

pub(crate) struct Fprop;

impl TrainingGemm for Fprop {
    const T: Training = Training {
        op: "linear_fp8_fprop",
        output: "y",
        names: GemmNames {
            a: "x",
            a_s: "x_s",
            b: "w",
            b_s: "w_s",
        },
        tensors: [("x", false), ("x_s", false), ("w", false), ("w_s", false)],
        layouts: (ScaleLayout::Row, ScaleLayout::Block),
        // y [M, N] over K
        shape: |inputs| {
            let (x, w) = (&get(inputs, "x").shape, &get(inputs, "w").shape);
            (vec![x[0], w[0]], x[1])
        },
        generate: |rng, cfg, sizes| {
            let block = cfg.block_size;
            let (m, n, k) = mnk(rng, sizes, [6, 2 * block + 5, 3 * block + 7]);
            gen_fits(&[&[m, k], &[n, k]])?;
            let uniform = cfg.row_constant_scales();
            let (x, x_s) = tiled_operand(rng, (m, k), block, false, uniform);
            let (w, w_s) = weight(rng, (n, k), block, uniform);
            Ok(outputs([("x", x), ("x_s", x_s), ("w", w), ("w_s", w_s)]))
        },
    };
}

// ---- Dgrad

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
            shape: &[Dim::Var("M"), Dim::CeilDiv("N", BLOCK)],
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
            shape: &[Dim::CeilDiv("N", BLOCK), Dim::CeilDiv("K", BLOCK)],
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
    config: SCHEMA,
    adapt: Some(super::layouts::adapt_inputs),
    reference: super::reference::<Dgrad>,
    reference_fn: "reference/src/fp8/linear_fp8.rs::dgrad",
    gpu: Backends::<Dgrad>::BOTH,
    policy: super::policy_of::<Dgrad>,
    policy_doc: POLICY_DOC,
    generate: super::generate::<Dgrad>,
    test_configs: TEST_CONFIGS,
    v3_sizes: &[&[("M", 2), ("N", 4096), ("K", 7168)]],
};

pub(crate) struct Dgrad;

impl TrainingGemm for Dgrad {
    const T: Training = Training {
        op: "linear_fp8_dgrad",
        output: "dx",
        names: GemmNames {
            a: "dy",
            a_s: "dy_s",
            b: "wᵀ",
            b_s: "w_sᵀ",
        },
        tensors: [("dy", false), ("dy_s", false), ("w", true), ("w_s", true)],
        layouts: (ScaleLayout::Row, ScaleLayout::Block),
        // dx [M, K] over N
        shape: |inputs| {
            let (dy, w) = (&get(inputs, "dy").shape, &get(inputs, "w").shape);
            (vec![dy[0], w[1]], dy[1])
        },
        generate: |rng, cfg, sizes| {
            let block = cfg.block_size;
            let (m, n, k) = mnk(rng, sizes, [6, 3 * block + 7, 2 * block + 5]);
            gen_fits(&[&[m, n], &[n, k]])?;
            let uniform = cfg.row_constant_scales();
            let (dy, dy_s) = tiled_operand(rng, (m, n), block, false, uniform);
            // w_sᵀ rows must be constant when windows span blocks: draw w_sᵀ, store its transpose
            let w = codes(rng, n, k, block);
            let w_s_t = scales(rng, vec![k.div_ceil(block), n.div_ceil(block)], uniform);
            Ok(outputs([
                ("dy", dy),
                ("dy_s", dy_s),
                ("w", Tensor::from_codes(DType::F8E4M3, vec![n, k], w)),
                ("w_s", transpose_scales(&w_s_t)),
            ]))
        },
    };
}

// ---- Wgrad

pub static LINEAR_FP8_WGRAD: OpEntry = OpEntry {
    name: "linear_fp8_wgrad",
    source: "V3 §3.3.1 Fig. 6 (Wgrad), App. B.2: xᵀ re-tiled 128×1 · dy in 128×1 tiles → FP32 weight gradient",
    summary: "dw[n,k] = Σ_mb (Σ_{m∈mb} dy[m,n]·x[m,k]) · dy_s[mb,n] · x_s[mb,k]; f32 output",
    inputs: &[
        TensorSpec { name: "x", dtypes: &[DType::F8E4M3], shape: &[Dim::Var("M"), Dim::Var("K")], doc: "input, E4M3 codes in B×1 tiles (B tokens per scale)" },
        TensorSpec { name: "x_s", dtypes: SCALE_DTYPES, shape: &[Dim::CeilDiv("M", BLOCK), Dim::Var("K")], doc: "B×1 tile scales" },
        TensorSpec { name: "dy", dtypes: &[DType::F8E4M3], shape: &[Dim::Var("M"), Dim::Var("N")], doc: "output gradient, E4M3 codes in B×1 tiles" },
        TensorSpec { name: "dy_s", dtypes: SCALE_DTYPES, shape: &[Dim::CeilDiv("M", BLOCK), Dim::Var("N")], doc: "B×1 tile scales" },
    ],
    outputs: &[TensorSpec { name: "dw", dtypes: OUT_DTYPES, shape: &[Dim::Var("N"), Dim::Var("K")], doc: "dyᵀ·x" }],
    constraints: &[],
    // V3 Fig. 6: the weight gradient stays FP32
    config: WGRAD_SCHEMA,
    adapt: Some(super::layouts::adapt_inputs),
    reference: super::reference::<Wgrad>,
    reference_fn: "reference/src/fp8/linear_fp8.rs::wgrad",
    gpu: &[],
    policy: super::policy_of::<Wgrad>,
    policy_doc: POLICY_DOC,
    generate: super::generate::<Wgrad>,
    test_configs: &[
        r#"{"out_dtype":"bf16"}"#,
        r#"{"block_size":32}"#,
        r#"{"accumulation":"tensor_core"}"#,
        r#"{"accumulation":"tensor_core","promote_interval":0}"#,
        r#"{"accumulation":"tensor_core","promote_interval":64,"acc_frac_bits":14,"acc_group":16,"term_cut":"floor","acc_out_frac_bits":23,"acc_out_round":"nearest_even"}"#,
    ],
    v3_sizes: &[&[("M", 256), ("N", 576), ("K", 512)]],
};

const WGRAD_SCHEMA: ConfigSchema = SCHEMA.with_defaults(&[("out_dtype", "\"f32\"")]);

pub(crate) struct Wgrad;

impl TrainingGemm for Wgrad {
    const T: Training = Training {
        op: "linear_fp8_wgrad",
        output: "dw",
        names: GemmNames {
            a: "dyᵀ",
            a_s: "dy_sᵀ",
            b: "xᵀ",
            b_s: "x_sᵀ",
        },
        tensors: [("dy", true), ("dy_s", true), ("x", true), ("x_s", true)],
        layouts: (ScaleLayout::Row, ScaleLayout::Row),
        // dw [N, K] over M
        shape: |inputs| {
            let (dy, x) = (&get(inputs, "dy").shape, &get(inputs, "x").shape);
            (vec![dy[1], x[1]], x[0])
        },
        generate: |rng, cfg, sizes| {
            let block = cfg.block_size;
            let (m, n, k) = mnk(rng, sizes, [3 * block + 7, 6, 2 * block + 5]);
            gen_fits(&[&[m, k], &[m, n]])?;
            let uniform = cfg.row_constant_scales();
            let (x, x_s) = tiled_operand(rng, (m, k), block, true, uniform);
            let (dy, dy_s) = tiled_operand(rng, (m, n), block, true, uniform);
            Ok(outputs([
                ("x", x),
                ("x_s", x_s),
                ("dy", dy),
                ("dy_s", dy_s),
            ]))
        },
    };
}
