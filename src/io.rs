//! Reading and writing safetensors files.
//!
//! [`SafeFile`] maps a file into memory and parses only its header, so one tensor of a large
//! checkpoint can be read without touching the others. Every malformed file (truncated, bad
//! header, offsets outside the file, an unsupported dtype) is an [`Error`] naming the path.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Metadata, TensorInfo, TensorView};

use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};

/// Tensors by name (sorted).
pub type TensorMap = BTreeMap<String, Tensor>;

/// A memory-mapped safetensors file with its parsed header.
pub struct SafeFile {
    path: PathBuf,
    map: memmap2::Mmap,
    header_len: usize,
    metadata: Metadata,
}

impl SafeFile {
    /// Map `path` and validate its header against the file size.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
        let len = file.metadata().map_err(|e| Error::io(&path, e))?.len();
        if len < 8 {
            return Err(Error::Corrupt {
                path,
                reason: format!(
                    "the file has {len} bytes, fewer than the 8-byte header length (truncated?)"
                ),
            });
        }
        // SAFETY: the file is opened read-only; dsv3 does not modify it while mapped, and a
        // concurrent writer is outside what any reader of a model file can defend against.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        let (header_len, metadata) =
            safetensors::SafeTensors::read_metadata(&map).map_err(|e| Error::Corrupt {
                path: path.clone(),
                reason: describe(&e, map.len()),
            })?;
        Ok(SafeFile {
            path,
            map,
            header_len,
            metadata,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.metadata.tensors().into_keys().collect();
        names.sort();
        names
    }

    pub fn contains(&self, name: &str) -> bool {
        self.metadata.info(name).is_some()
    }

    /// The `__metadata__` map of the header, if any.
    pub fn user_metadata(&self) -> Option<&HashMap<String, String>> {
        self.metadata.metadata().as_ref()
    }

    /// Dtype and shape of `name`, without reading its data.
    pub fn info(&self, name: &str) -> Option<Result<(DType, Vec<usize>)>> {
        self.metadata
            .info(name)
            .map(|info| Ok((self.dtype_of(name, info)?, info.shape.clone())))
    }

    fn dtype_of(&self, name: &str, info: &TensorInfo) -> Result<DType> {
        DType::from_safetensors(info.dtype).ok_or_else(|| Error::UnsupportedDType {
            path: self.path.clone(),
            name: name.to_string(),
            dtype: format!("{:?}", info.dtype),
        })
    }

    /// The bytes of `name` as stored (little-endian), borrowed from the mapping.
    pub fn bytes(&self, name: &str) -> Option<&[u8]> {
        let info = self.metadata.info(name)?;
        let start = 8 + self.header_len;
        let (a, b) = info.data_offsets;
        self.map.get(start + a..start + b)
    }

    /// Read one tensor (copies its bytes).
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let info = self.metadata.info(name).ok_or_else(|| Error::Corrupt {
            path: self.path.clone(),
            reason: format!("no tensor named `{name}`"),
        })?;
        let dtype = self.dtype_of(name, info)?;
        let bytes = self.bytes(name).ok_or_else(|| Error::Corrupt {
            path: self.path.clone(),
            reason: format!("tensor `{name}` lies outside the file"),
        })?;
        Tensor::from_bytes(dtype, info.shape.clone(), bytes.to_vec()).ok_or_else(|| {
            Error::Corrupt {
                path: self.path.clone(),
                reason: format!(
                    "tensor `{name}`: {} bytes do not hold shape {:?} of {dtype}",
                    bytes.len(),
                    info.shape
                ),
            }
        })
    }

    /// Read every tensor (refused before copying anything when the tensors would not fit in
    /// memory, [`crate::limits`]).
    pub fn load_all(&self) -> Result<TensorMap> {
        let mut need = Some(0u64);
        for (_, info) in self.metadata.tensors() {
            let working = crate::limits::extent(&info.shape)
                .and_then(|e| e.checked_mul(info.dtype.bitsize().div_ceil(8) as u64));
            need = need.zip(working).and_then(|(a, b)| a.checked_add(b));
        }
        crate::limits::ensure_fits(
            &format!("{}: loading its tensors", self.path.display()),
            need,
        )?;
        self.names()
            .into_iter()
            .map(|n| Ok((n.clone(), self.tensor(&n)?)))
            .collect()
    }
}

/// Read every tensor of a safetensors file.
pub fn load(path: impl AsRef<Path>) -> Result<TensorMap> {
    SafeFile::open(path)?.load_all()
}

/// Write `tensors` (and optional `__metadata__`) to `path`.
pub fn save(
    path: impl AsRef<Path>,
    tensors: &TensorMap,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let path = path.as_ref();
    let mut views = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let view =
            TensorView::new(t.dtype.to_safetensors(), t.shape.clone(), &t.data).map_err(|e| {
                Error::Usage(format!(
                    "cannot write tensor `{name}` to {}: {e}",
                    path.display()
                ))
            })?;
        views.push((name.clone(), view));
    }
    safetensors::serialize_to_file(views, metadata, path).map_err(|e| match e {
        safetensors::SafeTensorError::IoError(io) => Error::io(path, io),
        other => Error::Usage(format!("cannot write {}: {other}", path.display())),
    })
}

fn describe(e: &safetensors::SafeTensorError, file_len: usize) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::HeaderTooSmall => "the file is too short to hold a header (truncated?)".into(),
        E::InvalidHeaderLength => {
            format!("the header length field points past the end of the file ({file_len} bytes): truncated or not safetensors")
        }
        E::HeaderTooLarge => {
            "the header length field is implausibly large: not a safetensors file".into()
        }
        E::InvalidHeader(_) => "the header is not UTF-8 text".into(),
        E::InvalidHeaderDeserialization(j) => {
            format!("the header is not valid safetensors JSON: {j}")
        }
        E::MetadataIncompleteBuffer => {
            format!("the tensor data in the header does not end at the end of the file ({file_len} bytes): truncated or padded")
        }
        E::InvalidOffset(name) => format!("tensor `{name}` has invalid data offsets"),
        E::TensorInvalidInfo => "a tensor's byte range does not match its shape and dtype".into(),
        E::ValidationOverflow => "a tensor's shape overflows".into(),
        other => other.to_string(),
    }
}
