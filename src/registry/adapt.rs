//! Candidate outputs as kernels write them, converted to the reference's dtypes before
//! comparing: **int32 indices** (vLLM and SGLang routers) where the reference writes `I64` are
//! widened (exactly). The input layouts an op accepts (DeepGEMM's packed and MN-major scales)
//! are the op's own adapter ([`crate::registry::OpEntry::adapt`]).

use std::collections::BTreeMap;

use crate::registry::io::TensorMap;
use crate::registry::tensor::{DType, Tensor};

/// `candidate` with integer outputs widened to the reference's dtype (`I32` ids where the
/// reference writes `I64`); other tensors unchanged.
pub fn adapt_outputs(candidate: &TensorMap, reference: &TensorMap) -> Option<TensorMap> {
    let widen: BTreeMap<&String, &Tensor> = candidate
        .iter()
        .filter(|(k, t)| {
            t.dtype == DType::I32 && reference.get(*k).is_some_and(|r| r.dtype == DType::I64)
        })
        .collect();
    if widen.is_empty() {
        return None;
    }
    let mut out = candidate.clone();
    for (k, t) in widen {
        let values: Vec<u8> = t
            .data
            .chunks_exact(4)
            .flat_map(|c| i64::from(i32::from_le_bytes([c[0], c[1], c[2], c[3]])).to_le_bytes())
            .collect();
        out.insert(
            k.clone(),
            Tensor::from_bytes(DType::I64, t.shape.clone(), values).expect("8 bytes per element"),
        );
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int32_ids_are_widened() {
        let ids = Tensor::from_bytes(
            DType::I32,
            vec![2],
            [7i32, -1].iter().flat_map(|v| v.to_le_bytes()).collect(),
        )
        .unwrap();
        let reference: TensorMap = [(
            "topk_ids".to_string(),
            Tensor::from_bytes(DType::I64, vec![2], vec![0; 16]).unwrap(),
        )]
        .into();
        let got = adapt_outputs(&[("topk_ids".to_string(), ids)].into(), &reference).unwrap();
        assert_eq!(got["topk_ids"].dtype, DType::I64);
        assert_eq!(
            (got["topk_ids"].value(0), got["topk_ids"].value(1)),
            (7.0, -1.0)
        );
    }
}
