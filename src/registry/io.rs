//! Reading and writing safetensors files.
//!
//! [`SafeFile`] maps a file into memory and parses only its header, so one tensor of a large
//! checkpoint can be read without touching the others. Every malformed file (truncated, bad
//! header, offsets outside the file, an unsupported dtype) is an [`Error`] naming the path.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Metadata, TensorInfo, TensorView};

use crate::registry::error::{Error, Result};
use crate::registry::tensor::{DType, Tensor};

/// Tensors by name (sorted).
pub type TensorMap = BTreeMap<String, Tensor>;

/// A memory-mapped safetensors file with its parsed header.
pub struct SafeFile {
    path: PathBuf,
    /// The open file: [`SafeFile::tensor`] reads a tensor's bytes from it (on Unix) instead of
    /// copying them out of the mapping, so they are resident once, not twice.
    #[cfg_attr(not(unix), allow(dead_code))]
    file: File,
    map: memmap2::Mmap,
    header_len: usize,
    metadata: Metadata,
}

impl SafeFile {
    /// Map `path` and validate its header against the file size.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        require_regular_file(&path)?;
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
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| {
            if e.kind() == std::io::ErrorKind::OutOfMemory {
                Error::TooLarge {
                    what: format!("{}: mapping it", path.display()),
                    need: format!("{} of address space", crate::registry::limits::human(len)),
                    limit: "the operating system refused the mapping (an address-space limit such as `ulimit -v`?)".into(),
                }
            } else {
                Error::io(&path, e)
            }
        })?;
        let (header_len, metadata) =
            safetensors::SafeTensors::read_metadata(&map).map_err(|e| Error::Corrupt {
                path: path.clone(),
                reason: describe(&e, map.len()),
            })?;
        if let Some(name) = duplicate_key(&map[8..8 + header_len]) {
            return Err(Error::Corrupt {
                path,
                reason: format!(
                    "the header names tensor `{name}` twice (which one is meant is ambiguous)"
                ),
            });
        }
        Ok(SafeFile {
            path,
            file,
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
        self.map.get(self.data_range(name)?)
    }

    /// Where the bytes of `name` lie in the file (not checked against its length).
    fn data_range(&self, name: &str) -> Option<std::ops::Range<usize>> {
        let (a, b) = self.metadata.info(name)?.data_offsets;
        let start = 8 + self.header_len;
        Some(start + a..start + b)
    }

    /// Read one tensor (copies its bytes).
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let info = self.metadata.info(name).ok_or_else(|| Error::Corrupt {
            path: self.path.clone(),
            reason: format!("no tensor named `{name}`"),
        })?;
        let dtype = self.dtype_of(name, info)?;
        let range = self
            .data_range(name)
            .filter(|r| r.start <= r.end && r.end <= self.map.len())
            .ok_or_else(|| Error::Corrupt {
                path: self.path.clone(),
                reason: format!("tensor `{name}` lies outside the file"),
            })?;
        let stored = range.len();
        Tensor::from_bytes(dtype, info.shape.clone(), self.read_bytes(range)?).ok_or_else(|| {
            Error::Corrupt {
                path: self.path.clone(),
                reason: format!(
                    "tensor `{name}`: {} bytes do not hold shape {:?} of {dtype}",
                    stored, info.shape
                ),
            }
        })
    }

    /// An owned copy of the file's bytes `range` (inside the mapping): read from the file with `pread` on
    /// Unix, so that the mapping's pages are never touched (they would count in the resident
    /// set beside the copy); copied from the mapping elsewhere.
    fn read_bytes(&self, range: std::ops::Range<usize>) -> Result<Vec<u8>> {
        #[cfg(unix)]
        {
            use rayon::prelude::*;
            use std::os::unix::fs::FileExt;
            // in pieces on every thread: most of a large read's time is the faults on the
            // destination's fresh pages, which the threads take in parallel
            const PIECE: usize = 4 << 20;
            let mut out = vec![0u8; range.len()];
            out.par_chunks_mut(PIECE)
                .enumerate()
                .try_for_each(|(i, piece)| {
                    self.file
                        .read_exact_at(piece, (range.start + i * PIECE) as u64)
                })
                .map_err(|e| Error::io(&self.path, e))?;
            Ok(out)
        }
        #[cfg(not(unix))]
        {
            Ok(self.map[range].to_vec())
        }
    }

    /// Read every tensor (refused before copying anything when the tensors would not fit in
    /// memory, [`crate::registry::limits`]).
    pub fn load_all(&self) -> Result<TensorMap> {
        let mut need = Some(0u64);
        for (_, info) in self.metadata.tensors() {
            let working = crate::registry::limits::extent(&info.shape)
                .and_then(|e| e.checked_mul(info.dtype.bitsize().div_ceil(8) as u64));
            need = need.zip(working).and_then(|(a, b)| a.checked_add(b));
        }
        crate::registry::limits::ensure_fits(
            &format!("{}: loading its tensors", self.path.display()),
            need,
        )?;
        self.names()
            .into_iter()
            .map(|n| Ok((n.clone(), self.tensor(&n)?)))
            .collect()
    }
}

/// Refuse an input path that is not a regular file (after following links): a FIFO or a
/// device would block or never end, a directory is a mistake.
pub fn require_regular_file(path: &Path) -> Result<std::fs::Metadata> {
    let m = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if m.is_file() {
        return Ok(m);
    }
    let kind = if m.is_dir() {
        "a directory"
    } else {
        special_kind(&m.file_type())
    };
    Err(Error::Usage(format!(
        "{}: is {kind}; dsv3 reads inputs from regular files",
        path.display()
    )))
}

#[cfg(unix)]
fn special_kind(t: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

#[cfg(not(unix))]
fn special_kind(_: &std::fs::FileType) -> &'static str {
    "not a regular file"
}

/// Read a text input (a JSON config, an index): a regular file that fits in memory.
pub fn read_text(path: &Path) -> Result<String> {
    let m = require_regular_file(path)?;
    crate::registry::limits::ensure_fits(
        &format!("{}: reading it", path.display()),
        Some(m.len()),
    )?;
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

/// Read every tensor of a safetensors file.
pub fn load(path: impl AsRef<Path>) -> Result<TensorMap> {
    SafeFile::open(path)?.load_all()
}

/// Write `tensors` (and optional `__metadata__`) to `path` ([`write_file`]).
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
    let bytes = safetensors::serialize(views, metadata)
        .map_err(|e| Error::Usage(format!("cannot write {}: {e}", path.display())))?;
    write_file(path, &bytes)
}

/// Write an output file the way a user expects of a command-line tool:
/// - a symbolic link is written through (the link stays, its target gets the bytes);
/// - an existing file that is not a regular file (a device such as `/dev/null`, a FIFO) is
///   written directly, never replaced;
/// - a regular file is replaced atomically (a temporary file beside it, then a rename), keeping
///   the permissions of the file it replaces; a new file gets the user's usual permissions
///   (0666 less the umask), as `>` in a shell would.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let link = std::fs::symlink_metadata(path).ok();
    let target = std::fs::metadata(path).ok();
    let direct = link.as_ref().is_some_and(|m| m.file_type().is_symlink())
        || target.as_ref().is_some_and(|m| !m.is_file());
    if direct {
        return std::fs::write(path, bytes).map_err(|e| Error::io(path, e));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| Error::Usage(format!("{}: not a file name to write to", path.display())))?;
    let tmp = dir.join(format!(
        ".{}.dsv3-{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        if let Some(m) = &target {
            std::fs::set_permissions(&tmp, m.permissions())?;
        }
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
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

/// The first key that a safetensors header (a JSON object) holds twice. The safetensors crate
/// parses the header into a map, where the last of two equal keys silently wins.
fn duplicate_key(header: &[u8]) -> Option<String> {
    use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
    struct FirstDuplicate;
    impl<'de> Visitor<'de> for FirstDuplicate {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(
            self,
            mut map: A,
        ) -> std::result::Result<Self::Value, A::Error> {
            let mut seen = std::collections::HashSet::new();
            while let Some(key) = map.next_key::<String>()? {
                map.next_value::<IgnoredAny>()?;
                if !seen.insert(key.clone()) {
                    return Ok(Some(key));
                }
            }
            Ok(None)
        }
    }
    // the header already parsed as JSON once (read_metadata), so errors cannot occur here
    serde_json::Deserializer::from_slice(header)
        .deserialize_map(FirstDuplicate)
        .ok()
        .flatten()
}
