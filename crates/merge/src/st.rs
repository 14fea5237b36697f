//! Safetensors input and output: memory-mapped (possibly sharded) models read
//! tensor by tensor, and a streaming sharded writer in the Hugging Face layout.
//!
//! Reading uses the `safetensors` crate's header parser on a `memmap2` map, so
//! a model is never loaded whole: a merge touches one tensor at a time and the
//! kernel pages the rest in and out. The writer is our own because the crate's
//! `serialize_to_file` needs every tensor's bytes from an infallible callback
//! and reorders tensors; we stream fallible, cancellable tensors in our order.

use crate::dtype::{self, DType};
use crate::error::{MergeError, Result, read_json};
use memmap2::Mmap;
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// One tensor of a memory-mapped safetensors file set.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape (row-major).
    pub shape: Vec<usize>,
    shard: usize,
    start: usize,
    end: usize,
}

impl TensorEntry {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A set of memory-mapped safetensors files (one model or one adapter).
#[derive(Debug)]
pub struct SafetensorsSet {
    files: Vec<PathBuf>,
    maps: Vec<Mmap>,
    entries: Vec<TensorEntry>,
    by_name: HashMap<String, usize>,
}

/// Maps a file read-only.
fn map_file(path: &Path) -> Result<Mmap> {
    let file = File::open(path).map_err(|e| MergeError::io(path, e))?;
    // SAFETY: the map is read-only; as in every safetensors loader, the file must not be
    // truncated by another process while we read it (that would be a user error we cannot detect).
    #[allow(unsafe_code)]
    let map = unsafe { Mmap::map(&file) }.map_err(|e| MergeError::io(path, e))?;
    Ok(map)
}

impl SafetensorsSet {
    /// Opens the weights of a Hugging Face model folder: `model.safetensors`, or the
    /// shards listed in `model.safetensors.index.json`.
    pub fn open_model_dir(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        if index.is_file() {
            let v = read_json(&index)?;
            let map = v.get("weight_map").and_then(Value::as_object).ok_or_else(|| {
                MergeError::bad_file(&index, "no `weight_map` object").with_hint(
                    "the index must map every tensor name to its shard file, as transformers writes it",
                )
            })?;
            let mut files: Vec<String> = map
                .values()
                .filter_map(|f| f.as_str().map(String::from))
                .collect();
            files.sort();
            files.dedup();
            let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
            return Self::open_files(&paths);
        }
        let single = dir.join("model.safetensors");
        if single.is_file() {
            return Self::open_files(&[single]);
        }
        Err(MergeError::NotFound {
            message: format!("no safetensors weights in {}", dir.display()),
            file: Some(single),
            hint: Some(
                "point --model at a Hugging Face model folder with model.safetensors (or shards plus \
                 model.safetensors.index.json); convert .bin checkpoints with `lora-trainer export --format safetensors`"
                    .into(),
            ),
        })
    }

    /// Opens explicit safetensors files.
    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        let mut set = Self {
            files: Vec::new(),
            maps: Vec::new(),
            entries: Vec::new(),
            by_name: HashMap::new(),
        };
        for path in paths {
            let map = map_file(path)?;
            let (n, meta) = safetensors::SafeTensors::read_metadata(&map).map_err(|e| {
                MergeError::bad_file(path, format!("not a valid safetensors file: {e}"))
            })?;
            let base = 8 + n;
            let shard = set.maps.len();
            let mut infos: Vec<(String, &safetensors::tensor::TensorInfo)> =
                meta.tensors().into_iter().collect();
            infos.sort_by_key(|(_, i)| i.data_offsets.0);
            for (name, info) in infos {
                let dtype = DType::from_safetensors(info.dtype, &name, path)?;
                if set.by_name.contains_key(&name) {
                    return Err(MergeError::bad_file(
                        path,
                        format!("tensor `{name}` appears in two shards"),
                    ));
                }
                let entry = TensorEntry {
                    name: name.clone(),
                    dtype,
                    shape: info.shape.clone(),
                    shard,
                    start: base + info.data_offsets.0,
                    end: base + info.data_offsets.1,
                };
                if entry.end > map.len() || entry.end - entry.start != entry.numel() * dtype.size()
                {
                    return Err(MergeError::bad_file(
                        path,
                        format!("tensor `{name}` has inconsistent data offsets"),
                    ));
                }
                set.by_name.insert(name, set.entries.len());
                set.entries.push(entry);
            }
            set.files.push(path.clone());
            set.maps.push(map);
        }
        Ok(set)
    }

    /// Every tensor, in file order (shard by shard, by offset).
    pub fn entries(&self) -> &[TensorEntry] {
        &self.entries
    }

    /// The tensor named `name`.
    pub fn get(&self, name: &str) -> Option<&TensorEntry> {
        self.by_name.get(name).map(|&i| &self.entries[i])
    }

    /// The file a tensor lives in.
    pub fn file_of(&self, e: &TensorEntry) -> &Path {
        &self.files[e.shard]
    }

    /// The raw little-endian bytes of a tensor (borrowed from the map).
    pub fn bytes(&self, e: &TensorEntry) -> &[u8] {
        &self.maps[e.shard][e.start..e.end]
    }

    /// A tensor decoded to f32.
    pub fn f32(&self, e: &TensorEntry) -> Vec<f32> {
        dtype::to_f32(self.bytes(e), e.dtype)
    }

    /// A tensor decoded to f32, by name (with a clear error when absent).
    pub fn f32_named(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let e = self.get(name).ok_or_else(|| MergeError::NotFound {
            message: format!("tensor `{name}` is missing"),
            file: self.files.first().cloned(),
            hint: None,
        })?;
        Ok((self.f32(e), e.shape.clone()))
    }
}

/// What a writer needs to know about one output tensor before its bytes exist.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSpec {
    /// Tensor name.
    pub name: String,
    /// Element type written.
    pub dtype: DType,
    /// Shape.
    pub shape: Vec<usize>,
}

impl TensorSpec {
    /// Bytes of the tensor's data.
    pub fn nbytes(&self) -> u64 {
        self.shape.iter().product::<usize>() as u64 * self.dtype.size() as u64
    }
}

/// Splits tensors into shards the way transformers does: a new shard starts when the
/// next tensor would push the current one past `max_shard_bytes` (a shard holds at
/// least one tensor).
pub fn plan_shards(specs: &[TensorSpec], max_shard_bytes: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut size = 0u64;
    for (i, s) in specs.iter().enumerate() {
        let n = s.nbytes();
        let cur = shards.len() - 1;
        if !shards[cur].is_empty() && size + n > max_shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        let cur = shards.len() - 1;
        shards[cur].push(i);
        size += n;
    }
    shards
}

/// The Hugging Face shard file name (`model-00001-of-00003.safetensors`), or the
/// single-file name when there is one shard.
pub fn shard_name(stem: &str, ext: &str, k: usize, n: usize) -> String {
    if n == 1 {
        format!("{stem}.{ext}")
    } else {
        format!("{stem}-{:05}-of-{:05}.{ext}", k + 1, n)
    }
}

/// The safetensors header for `specs` in order, padded with spaces to 8 bytes.
pub fn safetensors_header(specs: &[&TensorSpec]) -> Vec<u8> {
    let mut m = Map::new();
    m.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut off = 0u64;
    for s in specs {
        let n = s.nbytes();
        m.insert(
            s.name.clone(),
            json!({"dtype": s.dtype.safetensors_name(), "shape": s.shape, "data_offsets": [off, off + n]}),
        );
        off += n;
    }
    let mut header = Value::Object(m).to_string().into_bytes();
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    header
}

/// Writes `specs` as sharded safetensors into `dir` (which must exist), calling
/// `produce(i)` for the bytes of tensor `i` in order, then the index when sharded.
/// Returns the files written.
pub fn write_sharded(
    dir: &Path,
    specs: &[TensorSpec],
    max_shard_bytes: u64,
    produce: &mut dyn FnMut(usize) -> Result<Vec<u8>>,
) -> Result<Vec<PathBuf>> {
    let shards = plan_shards(specs, max_shard_bytes);
    let n = shards.len();
    let mut written = Vec::new();
    let mut weight_map = BTreeMap::new();
    for (k, idx) in shards.iter().enumerate() {
        let name = shard_name("model", "safetensors", k, n);
        let path = dir.join(&name);
        let sel: Vec<&TensorSpec> = idx.iter().map(|&i| &specs[i]).collect();
        let header = safetensors_header(&sel);
        let f = File::create(&path).map_err(|e| MergeError::io(&path, e))?;
        let mut w = BufWriter::with_capacity(1 << 20, f);
        let io = |e| MergeError::io(&path, e);
        w.write_all(&(header.len() as u64).to_le_bytes())
            .map_err(io)?;
        w.write_all(&header).map_err(io)?;
        for &i in idx {
            let bytes = produce(i)?;
            if bytes.len() as u64 != specs[i].nbytes() {
                return Err(MergeError::Check(format!(
                    "internal: tensor `{}` produced {} bytes, expected {}",
                    specs[i].name,
                    bytes.len(),
                    specs[i].nbytes()
                )));
            }
            w.write_all(&bytes).map_err(io)?;
            weight_map.insert(specs[i].name.clone(), name.clone());
        }
        let f = w
            .into_inner()
            .map_err(|e| MergeError::io(&path, e.into_error()))?;
        f.sync_all().map_err(|e| MergeError::io(&path, e))?;
        written.push(path);
    }
    if n > 1 {
        let total: u64 = specs.iter().map(TensorSpec::nbytes).sum();
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let path = dir.join("model.safetensors.index.json");
        lora_skill::fs::write_json_atomic(&path, &index).map_err(|e| MergeError::io(&path, e))?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn spec(name: &str, n: usize) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            dtype: DType::F32,
            shape: vec![n],
        }
    }

    #[test]
    fn shards_are_planned_like_transformers() {
        let s = [spec("a", 10), spec("b", 10), spec("c", 30), spec("d", 1)];
        assert_eq!(plan_shards(&s, 80), vec![vec![0, 1], vec![2], vec![3]]);
        assert_eq!(plan_shards(&s, 1 << 30), vec![vec![0, 1, 2, 3]]);
        assert_eq!(
            shard_name("model", "safetensors", 1, 3),
            "model-00002-of-00003.safetensors"
        );
    }

    #[test]
    fn written_shards_read_back_through_the_safetensors_crate() {
        let dir = tempfile::tempdir().unwrap();
        let specs = [spec("x", 3), spec("y", 20), spec("z", 2)];
        let vals: Vec<Vec<f32>> = specs
            .iter()
            .map(|s| (0..s.shape[0]).map(|i| i as f32 * 0.5 - 1.0).collect())
            .collect();
        let files = write_sharded(dir.path(), &specs, 64, &mut |i| {
            Ok(dtype::from_f32(&vals[i], DType::F32))
        })
        .unwrap();
        assert_eq!(files.len(), 4, "{files:?}");
        let set = SafetensorsSet::open_model_dir(dir.path()).unwrap();
        for (s, v) in specs.iter().zip(&vals) {
            assert_eq!(&set.f32_named(&s.name).unwrap().0, v);
        }
        let bytes = std::fs::read(&files[0]).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.names().len(), 1);
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
    }
}
