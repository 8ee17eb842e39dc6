//! `fp8_gemm`: OFF `kernel.py fp8_gemm(a, a_s, b, b_s)`, `a`'s leading dims flattened.

#[cfg(feature = "cuda")]
use dsv3_gpu::fp8_gemm::Backend;
#[cfg(feature = "cuda")]
use dsv3_gpu::Floats;
use dsv3_reference::fp8::fp8_gemm::{self as reference, BlockScaled};
use ndarray::{Array2, ArrayView2};

use super::generate::{codes, scales, size};
#[cfg(feature = "cuda")]
use super::gpu;
use super::{
    Backends, GemmConfig, Layout, BLOCK, OUT_DTYPES, POLICY_DOC, SCALE_DTYPES, SCHEMA, TEST_CONFIGS,
};
use crate::ops::gemm::fast::{self, GemmOut};
use crate::ops::{gen_fits, get, outputs, OutDtype};
use crate::registry::contract::{Dim, TensorSpec};
use crate::registry::error::Result;
use crate::registry::io::TensorMap;
use crate::registry::rng::Rng;
use crate::registry::tensor::{DType, Tensor};
use crate::registry::tolerance::TcBoundTolerance;
use crate::registry::{OpEntry, Sizes};

pub static FP8_GEMM: OpEntry = OpEntry {
    name: "fp8_gemm",
    source: "V3 §3.3.2 (Fig. 7: fine-grained quantization, increasing accumulation precision); OFF kernel.py fp8_gemm",
    summary: "c[m,n] = Σ_kb (Σ_{k∈kb} a[m,k]·b[n,k]) · a_s[m,kb] · b_s[n/B,kb]; exact block dots (or the Tensor Core model), f32 accumulator, out_dtype",
    inputs: &[
        TensorSpec { name: "a", dtypes: &[DType::F8E4M3], shape: &[Dim::Batch, Dim::Var("K")], doc: "activations, E4M3 codes (1×B tiles)" },
        TensorSpec { name: "a_s", dtypes: SCALE_DTYPES, shape: &[Dim::Batch, Dim::CeilDiv("K", BLOCK)], doc: "one scale per 1×B tile of a" },
        TensorSpec { name: "b", dtypes: &[DType::F8E4M3], shape: &[Dim::Var("N"), Dim::Var("K")], doc: "weight, E4M3 codes (B×B blocks)" },
        TensorSpec { name: "b_s", dtypes: SCALE_DTYPES, shape: &[Dim::CeilDiv("N", BLOCK), Dim::CeilDiv("K", BLOCK)], doc: "one scale per B×B block of b (weight_scale_inv)" },
    ],
    outputs: &[TensorSpec { name: "c", dtypes: OUT_DTYPES, shape: &[Dim::Batch, Dim::Var("N")], doc: "a·bᵀ (dtype = out_dtype)" }],
    constraints: &[],
    config: SCHEMA,
    adapt: Some(super::layouts::adapt_inputs),
    reference: super::reference::<Dense>,
    reference_fn: "reference/src/fp8/fp8_gemm.rs::fp8_gemm",
    gpu: Backends::<Dense>::BOTH,
    policy: super::policy_of::<Dense>,
    policy_doc: POLICY_DOC,
    generate: super::generate::<Dense>,
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

/// The dense GEMM (`fp8_gemm`).
pub(crate) struct Dense;

/// A dense GEMM's operands: `(a, a_s, b, b_s)` as matrices (`a`'s leading dims flattened), the
/// codes borrowed from the inputs (at V3 sizes a copy would add tens of MB to a check).
pub(crate) struct DenseOps<'a> {
    a: ArrayView2<'a, u8>,
    a_s: Array2<f32>,
    b: ArrayView2<'a, u8>,
    b_s: Array2<f32>,
}

impl DenseOps<'_> {
    fn tiles(&self) -> (BlockScaled<'_>, BlockScaled<'_>) {
        (
            BlockScaled::tiles(self.a.view(), self.a_s.view()),
            BlockScaled::blocks(self.b.view(), self.b_s.view()),
        )
    }
}

impl Layout for Dense {
    const OUTPUT: &'static str = "c";
    type Operands<'a> = DenseOps<'a>;

    /// a's leading dims flattened as OFF: `M = numel / K` (also when K = 0).
    fn operands<'a>(inputs: &'a TensorMap, cfg: &GemmConfig) -> Result<DenseOps<'a>> {
        let a_t = get(inputs, "a");
        let k = *a_t.shape.last().unwrap_or(&0);
        let m: usize = a_t.shape[..a_t.shape.len() - 1].iter().product();
        let a = ArrayView2::from_shape((m, k), &a_t.data[..]).expect("validated shape");
        let a_s = get(inputs, "a_s").to_f32().expect("F32 or F8_E8M0 scales");
        let a_s =
            Array2::from_shape_vec((m, k.div_ceil(cfg.block_size)), a_s).expect("validated shape");
        let b_t = get(inputs, "b");
        let b = ArrayView2::from_shape((b_t.shape[0], b_t.shape[1]), &b_t.data[..])
            .expect("validated shape");
        let b_s = get(inputs, "b_s").matrix_f32();
        let d = DenseOps { a, a_s, b, b_s };
        let (a, b) = d.tiles();
        reference::check_gemm(
            "fp8_gemm",
            &reference::OFF_NAMES,
            a,
            b,
            cfg.block_size,
            &cfg.accumulation(),
        )?;
        Ok(d)
    }

    fn compute(ops: &DenseOps, cfg: &GemmConfig, with_magnitude: bool) -> GemmOut {
        let (a, b) = ops.tiles();
        fast::gemm(a, b, cfg.block_size, &cfg.accumulation(), with_magnitude)
    }

    /// The tolerances folded in the fused bound kernel's tiles (no M×N sums).
    fn bound_output(
        ops: &DenseOps,
        cfg: &GemmConfig,
        tolerance: &TcBoundTolerance,
    ) -> Option<(Array2<f32>, Vec<u8>)> {
        let (a, b) = ops.tiles();
        fast::gemm_bound_tolerances(a, b, cfg.block_size, &cfg.accumulation(), tolerance)
    }

    /// The output's bytes straight from the kernel's tiles where it computes them (no f32
    /// `[M, N]` array beside them: at M = 4096, N = 7168 that is 117 MB of a check's memory).
    fn output(ops: &DenseOps, cfg: &GemmConfig, shape: Vec<usize>) -> Tensor {
        let (a, b) = ops.tiles();
        let bf16 = cfg.out_dtype == OutDtype::Bf16;
        match fast::gemm_bytes(a, b, cfg.block_size, &cfg.accumulation(), bf16) {
            Some(bytes) => {
                let dtype = if bf16 { DType::BF16 } else { DType::F32 };
                Tensor::from_bytes(dtype, shape, bytes).expect("the dtype's bytes per element")
            }
            None => cfg.out_tensor(shape, &Self::compute(ops, cfg, false).c),
        }
    }

    fn shape(inputs: &TensorMap) -> (Vec<usize>, usize) {
        let a = get(inputs, "a");
        let mut shape = a.shape[..a.shape.len() - 1].to_vec();
        shape.push(get(inputs, "b").shape[0]);
        (shape, *a.shape.last().unwrap_or(&0))
    }

    fn generate(rng: &mut Rng, cfg: &GemmConfig, sizes: &Sizes) -> Result<TensorMap> {
        let block = cfg.block_size;
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
        let uniform = cfg.row_constant_scales();
        let a = codes(rng, rows, k, block);
        let b = codes(rng, n, k, block);
        let mut a_shape = lead.clone();
        a_shape.push(k);
        let mut a_s_shape = lead;
        a_s_shape.push(kb);
        Ok(outputs([
            ("a", Tensor::from_codes(DType::F8E4M3, a_shape, a)),
            ("a_s", scales(rng, a_s_shape, uniform)),
            ("b", Tensor::from_codes(DType::F8E4M3, vec![n, k], b)),
            ("b_s", scales(rng, vec![n.div_ceil(block), kb], uniform)),
        ]))
    }

    #[cfg(feature = "cuda")]
    fn gpu(
        g: &dsv3_gpu::Gpu,
        backend: Backend,
        ops: &DenseOps,
        cfg: &GemmConfig,
    ) -> Result<Floats> {
        let (a, b) = ops.tiles();
        gpu::gemm_on_gpu(g, backend, a, b, cfg)
    }
}
