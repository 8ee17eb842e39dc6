//! Where a checkpoint's tensors live: its shards, from `model.safetensors.index.json` or, without
//! one, from every `*.safetensors` file's header.

use std::cell::OnceCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{bad, INDEX_FILE};
use crate::registry::error::{Error, Result};
use crate::registry::io::SafeFile;

/// One shard file, opened (mapped) on first use.
pub(super) struct Shard {
    pub path: PathBuf,
    pub file: OnceCell<SafeFile>,
}

/// Shards and tensor locations from `model.safetensors.index.json`.
pub(super) fn read_index(dir: &Path, path: &Path) -> Result<(Vec<Shard>, BTreeMap<String, usize>)> {
    let text = crate::registry::io::read_text(path)?;
    let v: Value =
        serde_json::from_str(&text).map_err(|e| bad(path, format!("not valid JSON: {e}")))?;
    let Some(map) = v.get("weight_map").and_then(Value::as_object) else {
        return Err(bad(
            path,
            "no `weight_map` object (tensor name → shard file)",
        ));
    };
    let mut files: Vec<String> = Vec::new();
    let mut location = BTreeMap::new();
    for (name, file) in map {
        let Some(file) = file.as_str() else {
            return Err(bad(
                path,
                format!("`weight_map[\"{name}\"]` = {file} is not a file name"),
            ));
        };
        let i = match files.iter().position(|f| f == file) {
            Some(i) => i,
            None => {
                files.push(file.to_string());
                files.len() - 1
            }
        };
        location.insert(name.clone(), i);
    }
    let shards = files
        .iter()
        .map(|f| Shard {
            path: dir.join(f),
            file: OnceCell::new(),
        })
        .collect();
    Ok((shards, location))
}

/// Without an index: every `*.safetensors` file of `dir`, headers read.
pub(super) fn scan_shards(dir: &Path) -> Result<(Vec<Shard>, BTreeMap<String, usize>)> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    paths.sort();
    if paths.is_empty() {
        return Err(bad(
            dir,
            format!("no *.safetensors file and no {INDEX_FILE}"),
        ));
    }
    let mut shards = Vec::new();
    let mut location: BTreeMap<String, usize> = BTreeMap::new();
    for (i, p) in paths.into_iter().enumerate() {
        let f = SafeFile::open(&p)?;
        for name in f.names() {
            if let Some(&j) = location.get(&name) {
                let other: &Shard = &shards[j];
                return Err(bad(
                    &p,
                    format!(
                        "tensor `{name}` is also in {} (add a {INDEX_FILE} to say which one counts)",
                        other.path.display()
                    ),
                ));
            }
            location.insert(name, i);
        }
        let cell = OnceCell::new();
        let _ = cell.set(f);
        shards.push(Shard {
            path: p,
            file: cell,
        });
    }
    Ok((shards, location))
}
