//! Loading and saving named tensors in Hugging Face's safetensors layout:
//! one `model.safetensors`, or shards listed by `model.safetensors.index.json`.
//! Stored dtypes F32, F16 and BF16 are converted to the requested kind.
//!
//! [`WeightLoader`] hands tensors to the model by HF name and keeps a
//! [`LoadReport`] (applied / missing / unused / wrong shape): a checkpoint
//! that does not match the model is an error that names every offending
//! tensor, never silently ignored.

use crate::error::{EngineError, Result};
use safetensors::SafeTensors;
use safetensors::tensor::{Dtype, TensorView};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// The single-file weights name.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The shard index name.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Named tensors read from disk.
#[derive(Debug, Default)]
pub struct TensorStore {
    /// Where they came from (the folder or the file), for error messages.
    pub source: PathBuf,
    /// Tensors by name.
    pub tensors: BTreeMap<String, Tensor>,
}

/// The safetensors files of a model folder, in load order.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join(INDEX_FILE);
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| EngineError::io(&index, e))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| EngineError::json(&index, &e))?;
        let Some(map) = v.get("weight_map").and_then(|m| m.as_object()) else {
            return Err(EngineError::format(&index, "no `weight_map` object"));
        };
        let mut files = BTreeSet::new();
        for (name, file) in map {
            let Some(f) = file.as_str() else {
                return Err(EngineError::format(
                    &index,
                    format!("weight_map entry `{name}` is not a file name"),
                ));
            };
            if f.contains('/') || f.contains('\\') || f.starts_with('.') {
                return Err(EngineError::format(
                    &index,
                    format!("weight_map entry `{name}` points outside the folder: {f}"),
                ));
            }
            files.insert(f.to_owned());
        }
        let files: Vec<PathBuf> = files.into_iter().map(|f| dir.join(f)).collect();
        for f in &files {
            if !f.is_file() {
                return Err(EngineError::NotFound {
                    what: format!("shard {} listed in {}", f.display(), index.display()),
                    hint: Some("the download is incomplete: fetch the missing shard".into()),
                });
            }
        }
        return Ok(files);
    }
    let single = dir.join(SINGLE_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(EngineError::NotFound {
        what: format!("{SINGLE_FILE} or {INDEX_FILE} in {}", dir.display()),
        hint: Some(
            "the folder must hold Hugging Face safetensors weights (pytorch_model.bin is not read)"
                .into(),
        ),
    })
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    match dtype {
        Dtype::F32 => Some(Kind::Float),
        Dtype::F16 => Some(Kind::Half),
        Dtype::BF16 => Some(Kind::BFloat16),
        _ => None,
    }
}

impl TensorStore {
    /// Reads every safetensors file of a model folder, converting to `kind` on `device`.
    pub fn load_dir(dir: &Path, kind: Kind, device: Device) -> Result<Self> {
        let files = weight_files(dir)?;
        let mut store = Self::load_files(&files, kind, device)?;
        store.source = dir.to_path_buf();
        Ok(store)
    }

    /// Reads safetensors files, converting to `kind` on `device`.
    /// A tensor name present in two files is an error.
    pub fn load_files(files: &[PathBuf], kind: Kind, device: Device) -> Result<Self> {
        let mut tensors = BTreeMap::new();
        for path in files {
            let bytes = std::fs::read(path).map_err(|e| EngineError::io(path, e))?;
            let st = SafeTensors::deserialize(&bytes)
                .map_err(|e| EngineError::format(path, format!("not a safetensors file: {e}")))?;
            for (name, view) in st.tensors() {
                let t = tensor_from_view(&view, path, &name)?;
                let t = t.to_device(device).to_kind(kind);
                if tensors.insert(name.clone(), t).is_some() {
                    return Err(EngineError::format(
                        path,
                        format!("tensor `{name}` appears in more than one shard"),
                    ));
                }
            }
        }
        Ok(Self {
            source: files.first().cloned().unwrap_or_default(),
            tensors,
        })
    }

    /// Names of the tensors, sorted.
    pub fn names(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }
}

fn tensor_from_view(view: &TensorView<'_>, path: &Path, name: &str) -> Result<Tensor> {
    let Some(kind) = kind_of(view.dtype()) else {
        return Err(EngineError::unsupported(
            format!(
                "tensor `{name}` in {} has dtype {:?}",
                path.display(),
                view.dtype()
            ),
            Some("weights must be F32, F16 or BF16 (dequantise quantised checkpoints first)"),
        ));
    };
    let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
    Ok(Tensor::f_from_data_size(view.data(), &shape, kind)?)
}

/// What happened to each tensor of a checkpoint when a model was built from it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LoadReport {
    /// Tensors the model took.
    pub applied: Vec<String>,
    /// Tensors the model needs that the checkpoint lacks.
    pub missing: Vec<String>,
    /// Tensors in the checkpoint the model has no place for.
    pub unused: Vec<String>,
    /// Tensors whose shape differs from the model's: `(name, expected, found)`.
    pub mismatched: Vec<(String, Vec<i64>, Vec<i64>)>,
    /// Tensors known to be redundant and skipped on purpose: `(name, reason)`.
    pub ignored: Vec<(String, String)>,
}

impl LoadReport {
    /// True when every needed tensor was applied and none was left over.
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty() && self.unused.is_empty() && self.mismatched.is_empty()
    }

    /// A one-paragraph summary naming every offending tensor.
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        if !self.missing.is_empty() {
            parts.push(format!(
                "{} missing: {}",
                self.missing.len(),
                self.missing.join(", ")
            ));
        }
        if !self.unused.is_empty() {
            parts.push(format!(
                "{} unused: {}",
                self.unused.len(),
                self.unused.join(", ")
            ));
        }
        if !self.mismatched.is_empty() {
            let m: Vec<String> = self
                .mismatched
                .iter()
                .map(|(n, e, f)| format!("{n} (expected {e:?}, found {f:?})"))
                .collect();
            parts.push(format!("{} of the wrong shape: {}", m.len(), m.join(", ")));
        }
        if parts.is_empty() {
            format!("{} tensors applied", self.applied.len())
        } else {
            parts.join("; ")
        }
    }
}

/// Hands tensors to a model under construction and records the [`LoadReport`].
#[derive(Debug)]
pub struct WeightLoader {
    store: TensorStore,
    report: LoadReport,
}

impl WeightLoader {
    /// Wraps a store.
    pub fn new(store: TensorStore) -> Self {
        Self {
            store,
            report: LoadReport::default(),
        }
    }

    /// Takes the tensor `name`, which must have `shape`. A missing or
    /// mis-shaped tensor is recorded and a zero placeholder of the right shape
    /// is returned, so that every problem is reported at once by [`Self::finish`].
    pub fn take(&mut self, name: &str, shape: &[i64]) -> Tensor {
        match self.store.tensors.remove(name) {
            Some(t) if t.size() == shape => {
                self.report.applied.push(name.to_owned());
                t
            }
            Some(t) => {
                self.report
                    .mismatched
                    .push((name.to_owned(), shape.to_vec(), t.size()));
                Tensor::zeros(shape, (t.kind(), t.device()))
            }
            None => {
                self.report.missing.push(name.to_owned());
                Tensor::zeros(shape, (Kind::Float, Device::Cpu))
            }
        }
    }

    /// Takes `name` if present (no report entry when absent).
    pub fn take_optional(&mut self, name: &str, shape: &[i64]) -> Option<Tensor> {
        if self.store.tensors.contains_key(name) {
            Some(self.take(name, shape))
        } else {
            None
        }
    }

    /// Drops `name` if present, recording why.
    pub fn ignore(&mut self, name: &str, reason: &str) {
        if self.store.tensors.remove(name).is_some() {
            self.report
                .ignored
                .push((name.to_owned(), reason.to_owned()));
        }
    }

    /// Names still in the store.
    pub fn remaining(&self) -> Vec<String> {
        self.store.names()
    }

    /// Ends loading: leftovers become `unused`; an unclean report is an error.
    pub fn finish(mut self) -> Result<LoadReport> {
        self.report.unused = self.store.names();
        if self.report.is_clean() {
            Ok(self.report)
        } else {
            Err(EngineError::Weights {
                path: self.store.source.clone(),
                summary: self.report.summary(),
            })
        }
    }
}

/// Writes tensors as one safetensors file with `{"format": "pt"}` metadata, atomically.
pub fn save_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.contiguous();
        let dtype = match t.kind() {
            Kind::Float => Dtype::F32,
            Kind::Half => Dtype::F16,
            Kind::BFloat16 => Dtype::BF16,
            Kind::Int64 => Dtype::I64,
            other => {
                return Err(EngineError::unsupported(
                    format!("saving tensor `{name}` of kind {other:?}"),
                    None,
                ));
            }
        };
        let numel = t.numel();
        let mut data = vec![0u8; numel * t.kind().elt_size_in_bytes()];
        t.f_copy_data_u8(&mut data, numel)?;
        let shape = t.size().iter().map(|&d| d as usize).collect();
        owned.push((name.clone(), dtype, shape, data));
    }
    let mut views = Vec::with_capacity(owned.len());
    for (name, dtype, shape, data) in &owned {
        let view = TensorView::new(*dtype, shape.clone(), data)
            .map_err(|e| EngineError::format(path, format!("tensor `{name}`: {e}")))?;
        views.push((name.as_str(), view));
    }
    let meta = std::collections::HashMap::from([("format".to_owned(), "pt".to_owned())]);
    let bytes = safetensors::tensor::serialize(views, Some(meta))
        .map_err(|e| EngineError::format(path, e.to_string()))?;
    lora_skill::fs::write_atomic(path, &bytes).map_err(|e| EngineError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sharded_round_trip_and_dtype_conversion() {
        let dir = tempfile::tempdir().unwrap();
        let a = Tensor::arange(6, (Kind::Float, Device::Cpu)).reshape([2, 3]);
        let b = Tensor::ones([4], (Kind::BFloat16, Device::Cpu));
        save_safetensors(
            &dir.path().join("s1.safetensors"),
            &[("a".into(), a.shallow_clone())],
        )
        .unwrap();
        save_safetensors(&dir.path().join("s2.safetensors"), &[("b".into(), b)]).unwrap();
        std::fs::write(
            dir.path().join(INDEX_FILE),
            r#"{"metadata": {}, "weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}"#,
        )
        .unwrap();
        let store = TensorStore::load_dir(dir.path(), Kind::Float, Device::Cpu).unwrap();
        assert_eq!(store.names(), vec!["a", "b"]);
        assert_eq!(store.tensors["b"].kind(), Kind::Float);
        assert!(store.tensors["a"].equal(&a));

        let mut loader = WeightLoader::new(store);
        let _ = loader.take("a", &[3, 2]);
        let _ = loader.take("c", &[1]);
        let err = loader.finish().unwrap_err().to_string();
        assert!(err.contains("missing: c"), "{err}");
        assert!(err.contains("unused: b"), "{err}");
        assert!(err.contains("a (expected [3, 2], found [2, 3])"), "{err}");
    }

    #[test]
    fn missing_shard_and_missing_weights_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = weight_files(dir.path()).unwrap_err().to_string();
        assert!(err.contains("model.safetensors"), "{err}");
        std::fs::write(
            dir.path().join(INDEX_FILE),
            r#"{"weight_map": {"a": "x.safetensors"}}"#,
        )
        .unwrap();
        let err = weight_files(dir.path()).unwrap_err().to_string();
        assert!(err.contains("x.safetensors"), "{err}");
    }
}
