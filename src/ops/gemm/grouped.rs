//! The M-grouped GEMMs of the routed experts (DeepGEMM `m_grouped_fp8_gemm_nt_contiguous` and
//! `_masked`): one [`GroupRows`] says which rows each expert multiplies, for the reference, the
//! fast path and the GPU alike.

#[cfg(feature = "cuda")]
use dsv3_gpu::fp8_gemm::Backend;
#[cfg(feature = "cuda")]
use dsv3_gpu::Floats;
use dsv3_reference::fp8::fp8_gemm::BlockScaled;
use dsv3_reference::fp8::grouped_gemm::{self, flatten, ExpertWeights, GroupRows};
use ndarray::{Array2, Array3};

use super::generate::{codes, scales, scribble_rows, size};
#[cfg(feature = "cuda")]
use super::gpu;
use super::{Backends, GemmConfig, Layout, BLOCK, OUT_DTYPES, SCALE_DTYPES, SCHEMA, TEST_CONFIGS};
use crate::ops::gemm::fast::{self, GemmOut};
use crate::ops::{gen_fits, get, outputs};
use crate::registry::contract::{Dim, TensorSpec};
use crate::registry::error::Result;
use crate::registry::io::TensorMap;
use crate::registry::rng::Rng;
use crate::registry::tensor::{DType, Tensor};
use crate::registry::{OpEntry, Sizes};

pub static M_GROUPED_CONTIGUOUS: OpEntry = OpEntry {
    name: "m_grouped_fp8_gemm_contiguous",
    source: "V3 §2.1.2/§3.3 (routed experts in FP8); DeepGEMM m_grouped_fp8_gemm_nt_contiguous (m_indices layout)",
    summary: "c[m] = fp8_gemm(a[m], b[m_indices[m]]); rows with m_indices = −1 are padding: not computed, not judged",
    inputs: &[
        TensorSpec { name: "a", dtypes: &[DType::F8E4M3], shape: &[Dim::Var("M"), Dim::Var("K")], doc: "all experts' rows, E4M3 codes" },
        TensorSpec { name: "a_s", dtypes: SCALE_DTYPES, shape: &[Dim::Var("M"), Dim::CeilDiv("K", BLOCK)], doc: "1×B tile scales of a" },
        TensorSpec { name: "b", dtypes: &[DType::F8E4M3], shape: &[Dim::Var("G"), Dim::Var("N"), Dim::Var("K")], doc: "one weight per expert" },
        TensorSpec { name: "b_s", dtypes: SCALE_DTYPES, shape: &[Dim::Var("G"), Dim::CeilDiv("N", BLOCK), Dim::CeilDiv("K", BLOCK)], doc: "B×B block scales per expert" },
        TensorSpec { name: "m_indices", dtypes: &[DType::I32, DType::I64], shape: &[Dim::Var("M")], doc: "expert of each row, −1 = padding row" },
    ],
    outputs: &[TensorSpec { name: "c", dtypes: OUT_DTYPES, shape: &[Dim::Var("M"), Dim::Var("N")], doc: "padding rows undefined" }],
    constraints: &[],
    config: SCHEMA,
    adapt: Some(super::layouts::adapt_inputs),
    reference: super::reference::<Contiguous>,
    reference_fn: "reference/src/fp8/grouped_gemm.rs::m_grouped_fp8_gemm_contiguous",
    gpu: Backends::<Contiguous>::BOTH,
    policy: super::policy_of::<Contiguous>,
    policy_doc: "fp8_gemm's policy on rows with an expert; padding rows (m_indices = −1) are undefined and not judged",
    generate: super::generate::<Contiguous>,
    test_configs: TEST_CONFIGS,
    v3_sizes: &[&[("G", 2), ("M", 256), ("N", 7168), ("K", 2048)]],
};

pub static M_GROUPED_MASKED: OpEntry = OpEntry {
    name: "m_grouped_fp8_gemm_masked",
    source: "V3 §2.1.2/§3.3 (routed experts, decoding); DeepGEMM m_grouped_fp8_gemm_nt_masked",
    summary: "c[g, m] = fp8_gemm(a[g, m], b[g]) for m < masked_m[g]; rows past masked_m are undefined: not computed, not judged",
    inputs: &[
        TensorSpec { name: "a", dtypes: &[DType::F8E4M3], shape: &[Dim::Var("G"), Dim::Var("M"), Dim::Var("K")], doc: "per group M_max rows, E4M3 codes" },
        TensorSpec { name: "a_s", dtypes: SCALE_DTYPES, shape: &[Dim::Var("G"), Dim::Var("M"), Dim::CeilDiv("K", BLOCK)], doc: "1×B tile scales of a" },
        TensorSpec { name: "b", dtypes: &[DType::F8E4M3], shape: &[Dim::Var("G"), Dim::Var("N"), Dim::Var("K")], doc: "one weight per group" },
        TensorSpec { name: "b_s", dtypes: SCALE_DTYPES, shape: &[Dim::Var("G"), Dim::CeilDiv("N", BLOCK), Dim::CeilDiv("K", BLOCK)], doc: "B×B block scales per group" },
        TensorSpec { name: "masked_m", dtypes: &[DType::I32, DType::I64], shape: &[Dim::Var("G")], doc: "real rows per group (≤ M_max)" },
    ],
    outputs: &[TensorSpec { name: "c", dtypes: OUT_DTYPES, shape: &[Dim::Var("G"), Dim::Var("M"), Dim::Var("N")], doc: "rows past masked_m undefined" }],
    constraints: &[],
    config: SCHEMA,
    adapt: Some(super::layouts::adapt_inputs),
    reference: super::reference::<Masked>,
    reference_fn: "reference/src/fp8/grouped_gemm.rs::m_grouped_fp8_gemm_masked",
    gpu: Backends::<Masked>::BOTH,
    policy: super::policy_of::<Masked>,
    policy_doc: "fp8_gemm's policy on the first masked_m[g] rows of each group; the rest is undefined and not judged",
    generate: super::generate::<Masked>,
    test_configs: TEST_CONFIGS,
    v3_sizes: &[&[("G", 2), ("M", 64), ("N", 4096), ("K", 7168)]],
};

/// A grouped GEMM's operands: `a` with its leading dims flattened (`[R, K]`), the experts'
/// weights, and the rows of each expert.
pub(crate) struct Grouped {
    a: Array2<u8>,
    a_s: Array2<f32>,
    b: Array3<u8>,
    b_s: Array3<f32>,
    rows: GroupRows,
}

impl Grouped {
    fn parts(&self) -> (BlockScaled<'_>, ExpertWeights<'_>) {
        (
            BlockScaled::tiles(self.a.view(), self.a_s.view()),
            ExpertWeights::new(self.b.view(), self.b_s.view()),
        )
    }

    fn compute(&self, cfg: &GemmConfig, with_magnitude: bool) -> GemmOut {
        let (a, b) = self.parts();
        fast::grouped(
            a,
            b,
            &self.rows,
            cfg.block_size,
            &cfg.accumulation(),
            with_magnitude,
        )
    }

    #[cfg(feature = "cuda")]
    fn gpu(&self, g: &dsv3_gpu::Gpu, backend: Backend, cfg: &GemmConfig) -> Result<Floats> {
        gpu::grouped_on_gpu(g, backend, self.parts(), &self.rows, cfg)
    }
}

/// The contiguous layout: `a: [M, K]`, `m_indices: [M]`.
pub(crate) struct Contiguous;

impl Layout for Contiguous {
    const OUTPUT: &'static str = "c";
    type Operands<'a> = Grouped;

    fn operands(inputs: &TensorMap, cfg: &GemmConfig) -> Result<Grouped> {
        let (a, a_s) = (
            (get(inputs, "a")).matrix_u8(),
            (get(inputs, "a_s")).matrix_f32(),
        );
        let (b, b_s) = ((get(inputs, "b")).codes3(), (get(inputs, "b_s")).floats3());
        let m_indices = (get(inputs, "m_indices")).indices();
        grouped_gemm::check_m_grouped_contiguous(
            BlockScaled::tiles(a.view(), a_s.view()),
            ExpertWeights::new(b.view(), b_s.view()),
            &m_indices,
            cfg.block_size,
            &cfg.accumulation(),
        )?;
        let rows = GroupRows::contiguous(&m_indices, b.shape()[0]);
        Ok(Grouped {
            a,
            a_s,
            b,
            b_s,
            rows,
        })
    }

    fn compute(ops: &Grouped, cfg: &GemmConfig, with_magnitude: bool) -> GemmOut {
        ops.compute(cfg, with_magnitude)
    }

    fn shape(inputs: &TensorMap) -> (Vec<usize>, usize) {
        let a = get(inputs, "a");
        (vec![a.shape[0], get(inputs, "b").shape[1]], a.shape[1])
    }

    fn defined_rows(ops: &Grouped) -> Option<Vec<bool>> {
        Some(ops.rows.defined())
    }

    fn generate(rng: &mut Rng, cfg: &GemmConfig, sizes: &Sizes) -> Result<TensorMap> {
        let block = cfg.block_size;
        let groups = size(rng, sizes, "G", 1, 4);
        let n = size(rng, sizes, "N", 1, 2 * block + 5);
        let k = size(rng, sizes, "K", 1, 3 * block + 7);
        // unpinned, M is at most 5 rows per group (below)
        let m_max = sizes.get("M").copied().unwrap_or(5 * groups);
        gen_fits(&[&[m_max, k], &[groups, n, k]])?;
        // rows: each expert's segment, with some padding rows (−1) between them
        let mut m_indices: Vec<i64> = Vec::new();
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
        let uniform = cfg.row_constant_scales();
        let mut a = codes(rng, m, k, block);
        let mut a_s = scales(rng, vec![m, kb], uniform).to_f32().expect("scales");
        let padding = (0..m).filter(|&i| m_indices[i] == -1);
        scribble_rows(rng, (&mut a, k), (&mut a_s, kb), padding);
        let b = codes(rng, groups * n, k, block);
        let idx: Vec<i32> = m_indices.iter().map(|&g| g as i32).collect();
        Ok(outputs([
            ("a", Tensor::from_codes(DType::F8E4M3, vec![m, k], a)),
            ("a_s", Tensor::from_f32(vec![m, kb], &a_s)),
            (
                "b",
                Tensor::from_codes(DType::F8E4M3, vec![groups, n, k], b),
            ),
            (
                "b_s",
                scales(rng, vec![groups, n.div_ceil(block), kb], uniform),
            ),
            ("m_indices", Tensor::from_i32(vec![m], &idx)),
        ]))
    }

    #[cfg(feature = "cuda")]
    fn gpu(g: &dsv3_gpu::Gpu, backend: Backend, ops: &Grouped, cfg: &GemmConfig) -> Result<Floats> {
        ops.gpu(g, backend, cfg)
    }
}

/// The masked layout: `a: [G, M_max, K]`, `masked_m: [G]`.
pub(crate) struct Masked;

impl Layout for Masked {
    const OUTPUT: &'static str = "c";
    type Operands<'a> = Grouped;

    fn operands(inputs: &TensorMap, cfg: &GemmConfig) -> Result<Grouped> {
        let (a3, a_s3) = ((get(inputs, "a")).codes3(), (get(inputs, "a_s")).floats3());
        let (b, b_s) = ((get(inputs, "b")).codes3(), (get(inputs, "b_s")).floats3());
        let masked_m = (get(inputs, "masked_m")).indices();
        grouped_gemm::check_m_grouped_masked(
            a3.view(),
            a_s3.view(),
            ExpertWeights::new(b.view(), b_s.view()),
            &masked_m,
            cfg.block_size,
            &cfg.accumulation(),
        )?;
        let rows = GroupRows::masked(&masked_m, a3.shape()[1]);
        let (a, a_s) = (flatten(a3.view()), flatten(a_s3.view()));
        Ok(Grouped {
            a,
            a_s,
            b,
            b_s,
            rows,
        })
    }

    fn compute(ops: &Grouped, cfg: &GemmConfig, with_magnitude: bool) -> GemmOut {
        ops.compute(cfg, with_magnitude)
    }

    fn shape(inputs: &TensorMap) -> (Vec<usize>, usize) {
        let a = get(inputs, "a");
        (
            vec![a.shape[0], a.shape[1], get(inputs, "b").shape[1]],
            a.shape[2],
        )
    }

    fn defined_rows(ops: &Grouped) -> Option<Vec<bool>> {
        Some(ops.rows.defined())
    }

    fn generate(rng: &mut Rng, cfg: &GemmConfig, sizes: &Sizes) -> Result<TensorMap> {
        let block = cfg.block_size;
        let groups = size(rng, sizes, "G", 1, 3);
        let m_max = size(rng, sizes, "M", 1, 5);
        let n = size(rng, sizes, "N", 1, 2 * block + 5);
        let k = size(rng, sizes, "K", 1, 3 * block + 7);
        gen_fits(&[&[groups, m_max, k], &[groups, n, k]])?;
        let kb = k.div_ceil(block);
        let masked_m: Vec<usize> = (0..groups).map(|_| rng.range(0, m_max)).collect();
        let uniform = cfg.row_constant_scales();
        let mut a = codes(rng, groups * m_max, k, block);
        let mut a_s = scales(rng, vec![groups, m_max, kb], uniform)
            .to_f32()
            .expect("scales");
        let past = masked_m
            .iter()
            .enumerate()
            .flat_map(|(g, &rows)| (rows..m_max).map(move |m| g * m_max + m));
        scribble_rows(rng, (&mut a, k), (&mut a_s, kb), past);
        let b = codes(rng, groups * n, k, block);
        Ok(outputs([
            (
                "a",
                Tensor::from_codes(DType::F8E4M3, vec![groups, m_max, k], a),
            ),
            ("a_s", Tensor::from_f32(vec![groups, m_max, kb], &a_s)),
            (
                "b",
                Tensor::from_codes(DType::F8E4M3, vec![groups, n, k], b),
            ),
            (
                "b_s",
                scales(rng, vec![groups, n.div_ceil(block), kb], uniform),
            ),
            (
                "masked_m",
                Tensor::from_i32(
                    vec![groups],
                    &masked_m.iter().map(|&r| r as i32).collect::<Vec<_>>(),
                ),
            ),
        ]))
    }

    #[cfg(feature = "cuda")]
    fn gpu(g: &dsv3_gpu::Gpu, backend: Backend, ops: &Grouped, cfg: &GemmConfig) -> Result<Floats> {
        ops.gpu(g, backend, cfg)
    }
}
