//! The scale layouts GEMM kernels emit, converted to the ops' canonical contract before anything
//! is checked (`check`, `run`, the Python package: the GEMM ops' [`crate::registry::AdaptFn`]):
//! what DeepGEMM writes, accepted as it writes it.
//!
//! - **DeepGEMM's packed UE8M0 scales** (SM100 recipe, `get_mn_major_tma_aligned_packed_ue8m0_tensor`):
//!   an `int32` scale tensor holds four UE8M0 exponent bytes per element along the K-blocks,
//!   little-endian (byte `j` of element `i` is the scale of K-block `4i + j`), the last element
//!   padded with zero bytes. A scale input (one whose contract accepts `F8_E8M0`) given as `I32`
//!   is unpacked to `F8_E8M0` codes; its last dim must be `⌈blocks/4⌉`.
//! - **MN-major scale tensors** (DeepGEMM's TMA-aligned layout, saved as the transposed storage):
//!   with `"mn_major_scales": "lhs" | "rhs" | "both"` the last two dims of those scale inputs are
//!   swapped back; the MN dim may be padded beyond its size (TMA alignment) and the padding is
//!   dropped. "lhs" is the op's first scale input (`a_s`, `x_s`, `dy_s`), "rhs" the second
//!   (`b_s`, `w_s`, Wgrad's `dy_s`). A packed tensor can be MN-major too: transposed first,
//!   then unpacked.

use super::GemmConfig;
use crate::registry::config::Config;
use crate::registry::contract::{Contract, TensorSpec};
use crate::registry::error::{Error, Result, Role};
use crate::registry::io::TensorMap;
use crate::registry::tensor::{DType, Tensor};
use crate::registry::OpEntry;

/// The scale inputs of a block-scaled GEMM: specs that accept UE8M0 codes, in input order
/// (`a_s`/`x_s`/`dy_s`, then `b_s`/`w_s`/Wgrad's `dy_s`).
fn scale_specs(op: &OpEntry) -> Vec<&TensorSpec> {
    op.inputs
        .iter()
        .filter(|s| s.dtypes.contains(&DType::F8E8M0))
        .collect()
}

/// `inputs` with every scale input in the canonical layout (module docs), or `None` when none
/// needs converting.
pub(super) fn adapt_inputs(
    op: &OpEntry,
    inputs: &TensorMap,
    config: &Config,
    place: &str,
) -> Result<Option<TensorMap>> {
    let scales = scale_specs(op);
    let (lhs_mn, rhs_mn) = config.get::<GemmConfig>().mn_major();
    let transposed = |i: usize| (i == 0 && lhs_mn) || (i == 1 && rhs_mn);
    let needs = scales
        .iter()
        .enumerate()
        .any(|(i, s)| transposed(i) || inputs.get(s.name).is_some_and(|t| t.dtype == DType::I32));
    if !needs {
        return Ok(None);
    }
    let mut inputs = inputs.clone();
    // the sizes the other inputs bind, for the scales' expected shapes
    let others: Vec<TensorSpec> = op
        .inputs
        .iter()
        .filter(|s| !s.dtypes.contains(&DType::F8E8M0))
        .copied()
        .collect();
    let partial = Contract {
        op: op.name,
        inputs: &others,
        outputs: &[],
        constraints: &[],
    };
    let other_inputs: TensorMap = inputs
        .iter()
        .filter(|(k, _)| others.iter().any(|s| s.name == k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let bindings = partial.check_inputs(&other_inputs, config, place)?;
    let full = op.contract();
    for (i, spec) in scales.iter().enumerate() {
        let Some(t) = inputs.remove(spec.name) else {
            continue; // the contract check names the missing tensor
        };
        let expected = full.expected_shape(spec, &bindings, config);
        let mut t = t;
        if transposed(i) {
            t = untranspose(op.name, spec.name, t, &expected, place)?;
        }
        if t.dtype == DType::I32 {
            t = unpack_ue8m0(op.name, spec.name, &t, &expected, place)?;
        }
        inputs.insert(spec.name.to_string(), t);
    }
    Ok(Some(inputs))
}

/// An MN-major scale tensor `[..., blocks, MN']` (MN' ≥ MN: TMA padding) back to
/// `[..., MN, blocks]`; a packed one is `[..., ⌈blocks/4⌉, MN']`.
fn untranspose(
    op: &'static str,
    name: &str,
    t: Tensor,
    expected: &[usize],
    place: &str,
) -> Result<Tensor> {
    let r = expected.len();
    let bad = |why: String| Error::Shape {
        op,
        role: Role::Input,
        name: name.to_string(),
        got: t.shape.clone(),
        expected: format!("an MN-major scale tensor (mn_major_scales){place}: {why}"),
    };
    if r < 2 || t.shape.len() != r {
        return Err(bad(format!("rank {r} expected")));
    }
    let (mn, blocks) = (expected[r - 2], expected[r - 1]);
    let packed = t.dtype == DType::I32;
    let stored_blocks = if packed { blocks.div_ceil(4) } else { blocks };
    let (rows, cols) = (t.shape[r - 2], t.shape[r - 1]);
    if rows != stored_blocks || cols < mn || t.shape[..r - 2] != expected[..r - 2] {
        return Err(bad(format!(
            "[..., {stored_blocks}, ≥ {mn}] ({} blocks{} by {mn} rows, MN padding allowed)",
            blocks,
            if packed { " packed 4 per int32" } else { "" }
        )));
    }
    let size = t.dtype.size();
    let batch: usize = t.shape[..r - 2].iter().product();
    let mut data = Vec::with_capacity(batch * mn * rows * size);
    for b in 0..batch {
        let base = b * rows * cols;
        for m in 0..mn {
            for k in 0..rows {
                let at = (base + k * cols + m) * size;
                data.extend_from_slice(&t.data[at..at + size]);
            }
        }
    }
    let mut shape = t.shape[..r - 2].to_vec();
    shape.extend([mn, rows]);
    Tensor::from_bytes(t.dtype, shape, data)
        .ok_or_else(|| Error::Internal("untransposed size".into()))
}

/// DeepGEMM's packed UE8M0 scales `[..., ⌈blocks/4⌉]` int32 → `F8_E8M0` codes `[..., blocks]`.
fn unpack_ue8m0(
    op: &'static str,
    name: &str,
    t: &Tensor,
    expected: &[usize],
    place: &str,
) -> Result<Tensor> {
    let r = expected.len();
    let blocks = expected.last().copied().unwrap_or(0);
    let mut packed_shape = expected.to_vec();
    if let Some(last) = packed_shape.last_mut() {
        *last = blocks.div_ceil(4);
    }
    if t.shape != packed_shape {
        return Err(Error::Shape {
            op,
            role: Role::Input,
            name: name.to_string(),
            got: t.shape.clone(),
            expected: format!(
                "{packed_shape:?}: packed UE8M0 scales (int32, four K-block exponents each, DeepGEMM's layout) for {expected:?}{place}"
            ),
        });
    }
    let rows: usize = expected[..r.saturating_sub(1)].iter().product();
    let per_row = blocks.div_ceil(4) * 4;
    let mut codes = Vec::with_capacity(rows * blocks);
    for row in 0..rows {
        let bytes = &t.data[row * per_row..(row + 1) * per_row];
        codes.extend_from_slice(&bytes[..blocks]);
    }
    Ok(Tensor::from_codes(DType::F8E8M0, expected.to_vec(), codes))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// DeepGEMM's packing written from its definition: the exponent byte of each f32 scale,
    /// four K-blocks per int32 little-endian, zero bytes past the last block.
    fn pack(codes: &[u8], rows: usize, blocks: usize) -> Tensor {
        let packed = blocks.div_ceil(4);
        let mut bytes = vec![0u8; rows * packed * 4];
        for r in 0..rows {
            for b in 0..blocks {
                bytes[r * packed * 4 + b] = codes[r * blocks + b];
            }
        }
        Tensor::from_bytes(DType::I32, vec![rows, packed], bytes).unwrap()
    }

    #[test]
    fn packed_and_mn_major_scales_unpack_to_the_codes() {
        let op = crate::ops::find("fp8_gemm").unwrap();
        let (m, n, k) = (3usize, 130usize, 700usize); // 6 K-blocks: one packed element half full
        let kb = k.div_ceil(128);
        let a_s_codes: Vec<u8> = (0..m * kb).map(|i| 120 + (i % 7) as u8).collect();
        let b_s_codes: Vec<u8> = (0..2 * kb).map(|i| 110 + (i % 5) as u8).collect();
        let canonical: TensorMap = [
            (
                "a",
                Tensor::from_codes(DType::F8E4M3, vec![m, k], vec![0x38; m * k]),
            ),
            (
                "a_s",
                Tensor::from_codes(DType::F8E8M0, vec![m, kb], a_s_codes.clone()),
            ),
            (
                "b",
                Tensor::from_codes(DType::F8E4M3, vec![n, k], vec![0x30; n * k]),
            ),
            (
                "b_s",
                Tensor::from_codes(DType::F8E8M0, vec![2, kb], b_s_codes.clone()),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let cfg = op.default_config();
        // packed a_s (k-major)
        let mut packed = canonical.clone();
        packed.insert("a_s".into(), pack(&a_s_codes, m, kb));
        assert_eq!(
            adapt_inputs(op, &packed, &cfg, "").unwrap().unwrap(),
            canonical
        );
        // packed and MN-major a_s with the MN dim padded to 4 (TMA alignment), b_s MN-major
        let p = pack(&a_s_codes, m, kb);
        let (rows, cols) = (kb.div_ceil(4), 4);
        let mut t = vec![0u8; rows * cols * 4];
        for r in 0..m {
            for c in 0..rows {
                t[(c * cols + r) * 4..(c * cols + r) * 4 + 4]
                    .copy_from_slice(&p.data[(r * rows + c) * 4..(r * rows + c) * 4 + 4]);
            }
        }
        let mut b_t = vec![0u8; kb * 2];
        for r in 0..2 {
            for c in 0..kb {
                b_t[c * 2 + r] = b_s_codes[r * kb + c];
            }
        }
        let mut mn = canonical.clone();
        mn.insert(
            "a_s".into(),
            Tensor::from_bytes(DType::I32, vec![rows, cols], t).unwrap(),
        );
        mn.insert(
            "b_s".into(),
            Tensor::from_codes(DType::F8E8M0, vec![kb, 2], b_t),
        );
        let cfg_mn = op
            .parse_config(&serde_json::json!({"mn_major_scales": "both"}))
            .unwrap();
        assert_eq!(
            adapt_inputs(op, &mn, &cfg_mn, "").unwrap().unwrap(),
            canonical
        );
        // a packed tensor of the wrong width names the expected shape
        let mut bad = canonical.clone();
        bad.insert(
            "a_s".into(),
            Tensor::from_bytes(DType::I32, vec![m, 3], vec![0; m * 12]).unwrap(),
        );
        let e = adapt_inputs(op, &bad, &cfg, "").unwrap_err().to_string();
        assert!(
            e.contains("`a_s`") && e.contains("[3, 2]") && e.contains("packed UE8M0"),
            "{e}"
        );
    }

    #[test]
    fn only_gemm_scales_are_unpacked() {
        // fp8_decode's `y` accepts UE8M0 codes, but an int32 `y` is not a packed layout: the op
        // has no adapter and the contract refuses its dtype (found by the Python package's
        // random-input test: a rank-0 int32 `y` was "unpacked" to zero bytes)
        let op = crate::ops::find("fp8_decode").unwrap();
        let y = Tensor::from_bytes(DType::I32, vec![], vec![0; 4]).unwrap();
        let inputs: TensorMap = [("y".to_string(), y)].into_iter().collect();
        let cfg = op.parse_config(&serde_json::Value::Null).unwrap();
        assert!(op.adapt_inputs(&inputs, &cfg, "").unwrap().is_none());
        let err = op.contract().check_inputs(&inputs, &cfg, "").unwrap_err();
        assert!(
            err.to_string().contains("`y`") && err.to_string().contains("I32"),
            "{err}"
        );
    }
}
