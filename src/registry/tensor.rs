//! Host tensors as safetensors stores them: a dtype, a shape and little-endian bytes.
//!
//! The registry moves tensors between files, the reference and the GPU in this form; the
//! reference functions themselves take typed `ndarray` views.

use half::{bf16, f16};
use ndarray::{Array2, Array3, Array4, ArrayView2};

use dsv3_reference::fp8::{ue8m0, E4M3, E5M2};

/// Element types dsv3 reads and writes (safetensors names in [`DType::name`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    Bool,
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    U64,
    I64,
    F16,
    BF16,
    F32,
    F64,
    F8E4M3,
    F8E5M2,
    F8E8M0,
}

/// Every dtype, for lookups by name.
const ALL: [DType; 16] = [
    DType::Bool,
    DType::U8,
    DType::I8,
    DType::U16,
    DType::I16,
    DType::U32,
    DType::I32,
    DType::U64,
    DType::I64,
    DType::F16,
    DType::BF16,
    DType::F32,
    DType::F64,
    DType::F8E4M3,
    DType::F8E5M2,
    DType::F8E8M0,
];

impl DType {
    /// The safetensors spelling (`F8_E4M3`, `BF16`, ...).
    pub fn name(self) -> &'static str {
        match self {
            DType::Bool => "BOOL",
            DType::U8 => "U8",
            DType::I8 => "I8",
            DType::U16 => "U16",
            DType::I16 => "I16",
            DType::U32 => "U32",
            DType::I32 => "I32",
            DType::U64 => "U64",
            DType::I64 => "I64",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F32 => "F32",
            DType::F64 => "F64",
            DType::F8E4M3 => "F8_E4M3",
            DType::F8E5M2 => "F8_E5M2",
            DType::F8E8M0 => "F8_E8M0",
        }
    }

    /// The dtype of a safetensors name (`"F8_E4M3"`), the inverse of [`DType::name`].
    pub fn from_name(name: &str) -> Option<Self> {
        ALL.iter().copied().find(|d| d.name() == name)
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::Bool | DType::U8 | DType::I8 | DType::F8E4M3 | DType::F8E5M2 | DType::F8E8M0 => {
                1
            }
            DType::U16 | DType::I16 | DType::F16 | DType::BF16 => 2,
            DType::U32 | DType::I32 | DType::F32 => 4,
            DType::U64 | DType::I64 | DType::F64 => 8,
        }
    }

    /// Whether elements are floating-point values (including FP8 codes).
    pub fn is_float(self) -> bool {
        matches!(
            self,
            DType::F16
                | DType::BF16
                | DType::F32
                | DType::F64
                | DType::F8E4M3
                | DType::F8E5M2
                | DType::F8E8M0
        )
    }

    pub fn from_safetensors(d: safetensors::Dtype) -> Option<Self> {
        use safetensors::Dtype as S;
        Some(match d {
            S::BOOL => DType::Bool,
            S::U8 => DType::U8,
            S::I8 => DType::I8,
            S::U16 => DType::U16,
            S::I16 => DType::I16,
            S::U32 => DType::U32,
            S::I32 => DType::I32,
            S::U64 => DType::U64,
            S::I64 => DType::I64,
            S::F16 => DType::F16,
            S::BF16 => DType::BF16,
            S::F32 => DType::F32,
            S::F64 => DType::F64,
            S::F8_E4M3 => DType::F8E4M3,
            S::F8_E5M2 => DType::F8E5M2,
            S::F8_E8M0 => DType::F8E8M0,
            _ => return None,
        })
    }

    pub fn to_safetensors(self) -> safetensors::Dtype {
        use safetensors::Dtype as S;
        match self {
            DType::Bool => S::BOOL,
            DType::U8 => S::U8,
            DType::I8 => S::I8,
            DType::U16 => S::U16,
            DType::I16 => S::I16,
            DType::U32 => S::U32,
            DType::I32 => S::I32,
            DType::U64 => S::U64,
            DType::I64 => S::I64,
            DType::F16 => S::F16,
            DType::BF16 => S::BF16,
            DType::F32 => S::F32,
            DType::F64 => S::F64,
            DType::F8E4M3 => S::F8_E4M3,
            DType::F8E5M2 => S::F8_E5M2,
            DType::F8E8M0 => S::F8_E8M0,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The little-endian bytes of `values`, allocated once (collecting a `flat_map` grows the
/// vector by doubling: at V3 sizes, hundreds of MB copied and held twice).
pub fn le_bytes<T: Copy, const N: usize>(values: &[T], to_bytes: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * N);
    for &v in values {
        out.extend_from_slice(&to_bytes(v));
    }
    out
}

/// A dense, row-major tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    /// `numel · dtype.size()` little-endian bytes.
    pub data: Vec<u8>,
}

impl Tensor {
    /// A tensor from raw bytes; `None` if the byte count does not match the shape.
    pub fn from_bytes(dtype: DType, shape: Vec<usize>, data: Vec<u8>) -> Option<Self> {
        let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
        (numel.checked_mul(dtype.size())? == data.len()).then_some(Tensor { dtype, shape, data })
    }

    pub fn from_f32(shape: Vec<usize>, values: &[f32]) -> Self {
        Self::packed(DType::F32, shape, le_bytes(values, |v| v.to_le_bytes()))
    }

    pub fn from_bf16(shape: Vec<usize>, values: &[bf16]) -> Self {
        Self::packed(DType::BF16, shape, le_bytes(values, |v| v.to_le_bytes()))
    }

    /// A tensor of one-byte codes (`F8_E4M3`, `F8_E5M2`, `F8_E8M0`, `U8`).
    pub fn from_codes(dtype: DType, shape: Vec<usize>, codes: Vec<u8>) -> Self {
        assert_eq!(dtype.size(), 1, "from_codes takes a one-byte dtype");
        Self::packed(dtype, shape, codes)
    }

    pub fn from_u16(shape: Vec<usize>, values: &[u16]) -> Self {
        Self::packed(DType::U16, shape, le_bytes(values, |v| v.to_le_bytes()))
    }

    pub fn from_f64(shape: Vec<usize>, values: &[f64]) -> Self {
        Self::packed(DType::F64, shape, le_bytes(values, |v| v.to_le_bytes()))
    }

    pub fn from_i64(shape: Vec<usize>, values: &[i64]) -> Self {
        Self::packed(DType::I64, shape, le_bytes(values, |v| v.to_le_bytes()))
    }

    pub fn from_i32(shape: Vec<usize>, values: &[i32]) -> Self {
        Self::packed(DType::I32, shape, le_bytes(values, |v| v.to_le_bytes()))
    }

    pub fn from_bool(shape: Vec<usize>, values: &[bool]) -> Self {
        Self::packed(
            DType::Bool,
            shape,
            values.iter().map(|&b| u8::from(b)).collect(),
        )
    }

    /// f32 values stored as `dtype`: F32, or BF16 by RNE (a reference's output in the dtype
    /// of the op's input).
    pub fn from_f32_as(dtype: DType, shape: Vec<usize>, values: &[f32]) -> Self {
        match dtype {
            DType::BF16 => Self::packed(
                DType::BF16,
                shape,
                le_bytes(values, |v| {
                    dsv3_reference::numeric::round_to_bf16(v).to_le_bytes()
                }),
            ),
            _ => Self::from_f32(shape, values),
        }
    }

    /// f64 values rounded to `dtype` (F64 as is, BF16 and F32 by one RNE).
    pub fn from_f64_as(dtype: DType, shape: Vec<usize>, values: &[f64]) -> Self {
        match dtype {
            DType::F64 => Self::from_f64(shape, values),
            DType::BF16 => Self::from_bf16(
                shape,
                &values
                    .iter()
                    .map(|&v| dsv3_reference::numeric::f64_to_bf16(v))
                    .collect::<Vec<_>>(),
            ),
            _ => Self::from_f32(shape, &values.iter().map(|&v| v as f32).collect::<Vec<_>>()),
        }
    }

    /// A matrix of f32 values as a tensor of `shape` (its element count).
    pub fn from_matrix(shape: Vec<usize>, a: ArrayView2<f32>) -> Self {
        Self::from_f32(shape, &a.iter().copied().collect::<Vec<_>>())
    }

    /// A matrix of one-byte codes as a `dtype` tensor of `shape`.
    pub fn from_code_matrix(dtype: DType, shape: Vec<usize>, a: ArrayView2<u8>) -> Self {
        Self::from_codes(dtype, shape, a.iter().copied().collect())
    }

    fn packed(dtype: DType, shape: Vec<usize>, data: Vec<u8>) -> Self {
        let t = Tensor { dtype, shape, data };
        debug_assert_eq!(t.numel() * dtype.size(), t.data.len());
        t
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// `[..., C]` viewed as a matrix: (product of the leading dims, C). Counted from the shape,
    /// not from `numel / C`, so an empty tensor keeps its rows (`[5, 0]` is 5 × 0) and its
    /// columns (`[0, 7]` is 0 × 7). A scalar is 1 × 1.
    pub fn rows_cols(&self) -> (usize, usize) {
        match self.shape.split_last() {
            Some((&cols, lead)) => (lead.iter().product(), cols),
            None => (1, 1),
        }
    }

    /// Every element as f64 (exact for floats and for integers up to 2^53).
    pub fn values(&self) -> Vec<f64> {
        (0..self.numel()).map(|i| self.value(i)).collect()
    }

    /// Every element as bool (non-zero = true).
    pub fn bools(&self) -> Vec<bool> {
        (0..self.numel()).map(|i| self.value(i) != 0.0).collect()
    }

    /// Every element as i64 (integer tensors: ids and indices).
    pub fn indices(&self) -> Vec<i64> {
        (0..self.numel()).map(|i| self.value(i) as i64).collect()
    }

    /// The values of a floating tensor, widened exactly to f32 (the contract has checked the
    /// dtype: anything else is a dsv3 bug).
    pub fn floats(&self) -> Vec<f32> {
        self.to_f32()
            .unwrap_or_else(|| panic!("{}: not a floating tensor", self.dtype))
    }

    /// `[..., C]` floating values as an f32 matrix `[rows, C]` (leading dims flattened).
    pub fn matrix_f32(&self) -> Array2<f32> {
        Array2::from_shape_vec(self.rows_cols(), self.floats()).expect("numel = rows · cols")
    }

    /// One-byte codes `[..., C]` as a matrix `[rows, C]`.
    pub fn matrix_u8(&self) -> Array2<u8> {
        assert_eq!(self.dtype.size(), 1, "matrix_u8 of {}", self.dtype);
        Array2::from_shape_vec(self.rows_cols(), self.data.clone()).expect("one byte per element")
    }

    /// One-byte codes of a rank-3 tensor as `[d0, d1, d2]`.
    pub fn codes3(&self) -> Array3<u8> {
        assert_eq!(self.dtype.size(), 1, "codes3 of {}", self.dtype);
        Array3::from_shape_vec(self.dims(), self.data.clone()).expect("rank 3")
    }

    /// Floating values of a rank-3 tensor as f32 `[d0, d1, d2]`.
    pub fn floats3(&self) -> Array3<f32> {
        Array3::from_shape_vec(self.dims(), self.floats()).expect("rank 3")
    }

    /// Floating values of a rank-4 tensor as f32 `[d0, d1, d2, d3]`.
    pub fn floats4(&self) -> Array4<f32> {
        let s = &self.shape;
        Array4::from_shape_vec((s[0], s[1], s[2], s[3]), self.floats()).expect("rank 4")
    }

    fn dims(&self) -> (usize, usize, usize) {
        let s = &self.shape;
        assert_eq!(s.len(), 3, "a rank-3 tensor, not {s:?}");
        (s[0], s[1], s[2])
    }

    /// Values widened exactly to f32 (F32, BF16, F16, and the FP8 formats); `None` for others.
    pub fn to_f32(&self) -> Option<Vec<f32>> {
        let d = &self.data;
        Some(match self.dtype {
            DType::F32 => d
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            DType::BF16 => d
                .chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            DType::F16 => d
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            DType::F8E4M3 => d.iter().map(|&c| E4M3.decode(u16::from(c))).collect(),
            DType::F8E5M2 => d.iter().map(|&c| E5M2.decode(u16::from(c))).collect(),
            DType::F8E8M0 => d.iter().map(|&c| ue8m0::decode(c)).collect(),
            _ => return None,
        })
    }

    /// The raw 16-bit patterns of a two-byte tensor (BF16, F16, U16, I16).
    pub fn to_u16_bits(&self) -> Vec<u16> {
        assert_eq!(self.dtype.size(), 2, "to_u16_bits on {}", self.dtype);
        self.data
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect()
    }

    pub fn to_u16(&self) -> Option<Vec<u16>> {
        (self.dtype.size() == 2 && !self.dtype.is_float()).then(|| {
            self.data
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
                .collect()
        })
    }

    /// Raw bits of element `i` (zero-extended).
    pub fn bits(&self, i: usize) -> u64 {
        let n = self.dtype.size();
        let mut b = [0u8; 8];
        b[..n].copy_from_slice(&self.data[i * n..(i + 1) * n]);
        u64::from_le_bytes(b)
    }

    /// Element `i` as f64: the exact value for floating types and FP8 codes, the integer for
    /// integer types (an E5M6 code held in a U16 is an integer here).
    pub fn value(&self, i: usize) -> f64 {
        let bits = self.bits(i);
        match self.dtype {
            DType::F32 => f64::from(f32::from_bits(bits as u32)),
            DType::F64 => f64::from_bits(bits),
            DType::BF16 => f64::from(bf16::from_bits(bits as u16).to_f32()),
            DType::F16 => f64::from(f16::from_bits(bits as u16).to_f32()),
            DType::F8E4M3 => f64::from(E4M3.decode(bits as u16)),
            DType::F8E5M2 => f64::from(E5M2.decode(bits as u16)),
            DType::F8E8M0 => f64::from(ue8m0::decode(bits as u8)),
            DType::I8 => f64::from(bits as u8 as i8),
            DType::I16 => f64::from(bits as u16 as i16),
            DType::I32 => f64::from(bits as u32 as i32),
            DType::I64 => bits as i64 as f64,
            DType::Bool | DType::U8 | DType::U16 | DType::U32 | DType::U64 => bits as f64,
        }
    }

    /// A position on a monotone integer line for ULP counting: sign-magnitude bits for floating
    /// types and FP8 codes (adjacent representable values differ by 1, ±0 coincide), the value
    /// itself for integers and UE8M0.
    pub fn ordinal(&self, i: usize) -> i128 {
        let bits = self.bits(i);
        let sign_magnitude = |width: u32| {
            let sign = (bits >> (width - 1)) & 1;
            let magnitude = i128::from(bits & ((1u64 << (width - 1)) - 1));
            if sign == 1 {
                -magnitude
            } else {
                magnitude
            }
        };
        match self.dtype {
            DType::F32 => sign_magnitude(32),
            DType::F64 => sign_magnitude(64),
            DType::BF16 | DType::F16 => sign_magnitude(16),
            DType::F8E4M3 | DType::F8E5M2 => sign_magnitude(8),
            _ => self.value(i) as i128,
        }
    }

    /// Whether element `i` is a NaN (of its dtype).
    pub fn is_nan(&self, i: usize) -> bool {
        self.dtype.is_float() && self.value(i).is_nan()
    }

    /// A copy with another shape of the same element count.
    pub fn reshaped(&self, shape: Vec<usize>) -> Self {
        assert_eq!(shape.iter().product::<usize>(), self.numel());
        Tensor {
            dtype: self.dtype,
            shape,
            data: self.data.clone(),
        }
    }
}

/// Row-major multi-index of flat element `i` in `shape`.
pub fn unravel(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut index = vec![0; shape.len()];
    for (slot, &d) in index.iter_mut().zip(shape).rev() {
        if d > 0 {
            *slot = i % d;
            i /= d;
        }
    }
    index
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unravel_is_row_major() {
        assert_eq!(unravel(0, &[2, 3]), vec![0, 0]);
        assert_eq!(unravel(5, &[2, 3]), vec![1, 2]);
        assert_eq!(unravel(7, &[2, 2, 2]), vec![1, 1, 1]);
    }

    #[test]
    fn ordinal_counts_fp8_codes_across_zero() {
        let t = Tensor::from_codes(DType::F8E4M3, vec![3], vec![0x01, 0x81, 0x80]);
        assert_eq!(t.ordinal(0) - t.ordinal(1), 2);
        assert_eq!(t.ordinal(2), 0);
    }

    #[test]
    fn from_bytes_checks_length() {
        assert!(Tensor::from_bytes(DType::F32, vec![2], vec![0; 8]).is_some());
        assert!(Tensor::from_bytes(DType::F32, vec![2], vec![0; 7]).is_none());
    }
}
