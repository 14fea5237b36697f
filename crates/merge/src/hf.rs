//! Hugging Face model folders out: weights (sharded safetensors or `.bin`) plus
//! config.json, generation_config.json, tokenizer files and the chat template.

use crate::dtype::DType;
use crate::error::{MergeError, Result, read_json};
use crate::merge::MergedModel;
use crate::st::{self, TensorSpec};
use crate::torch_bin;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Files copied beside the weights (when present). Tokenizer files found in the
/// adapter folder win over the base's: a training run saves the tokenizer and chat
/// template it trained with.
pub const AUX_FILES: &[&str] = &[
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
];

/// Files that describe the tokenizer (taken from the adapter folder when it has them).
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
];

/// Weight container of a Hugging Face folder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// `model.safetensors` / shards + index.
    Safetensors,
    /// `pytorch_model.bin` / shards + index (torch.save zip).
    PytorchBin,
}

/// Where each auxiliary file comes from: the adapter folder for tokenizer files it
/// has, else the base folder.
pub fn aux_sources(base_dir: &Path, adapter_dir: Option<&Path>) -> BTreeMap<String, PathBuf> {
    let mut out = BTreeMap::new();
    for f in AUX_FILES {
        let from_adapter = adapter_dir
            .filter(|_| TOKENIZER_FILES.contains(f))
            .map(|d| d.join(f))
            .filter(|p| p.is_file());
        let p = from_adapter.unwrap_or_else(|| base_dir.join(f));
        if p.is_file() {
            out.insert((*f).to_string(), p);
        }
    }
    out
}

/// The base `config.json`, patched for the output: dtype, and untied embeddings when
/// the adapter adds an `lm_head.weight`.
pub fn output_config(base_dir: &Path, out_dtype: Option<DType>, untie: bool) -> Result<Value> {
    let path = base_dir.join("config.json");
    let mut cfg = read_json(&path)?;
    let Some(obj) = cfg.as_object_mut() else {
        return Err(MergeError::bad_file(
            &path,
            "config.json is not a JSON object",
        ));
    };
    if let Some(dt) = out_dtype {
        // transformers 4 reads `torch_dtype`, 5 reads `dtype`: write the ones present (or `dtype`).
        let mut wrote = false;
        for k in ["torch_dtype", "dtype"] {
            if obj.contains_key(k) {
                obj.insert(k.into(), Value::from(dt.torch_name()));
                wrote = true;
            }
        }
        if !wrote {
            obj.insert("dtype".into(), Value::from(dt.torch_name()));
        }
    }
    if untie {
        obj.insert("tie_word_embeddings".into(), Value::Bool(false));
    }
    Ok(cfg)
}

/// Writes the weights of `merged` into `dir` in `format`, sharded past
/// `max_shard_bytes`; `on_tensor(i, n, name)` is called after each tensor (progress and
/// cancellation). Returns the files written.
pub fn write_weights(
    dir: &Path,
    merged: &MergedModel<'_>,
    out_dtype: Option<DType>,
    format: WeightFormat,
    max_shard_bytes: u64,
    on_tensor: &mut dyn FnMut(usize, usize, &str) -> Result<()>,
) -> Result<Vec<PathBuf>> {
    let specs = merged.specs(out_dtype);
    let n = specs.len();
    let mut produce = |i: usize| -> Result<Vec<u8>> {
        let s = &specs[i];
        let bytes = merged.bytes(&s.name, s.dtype)?.into_owned();
        on_tensor(i + 1, n, &s.name)?;
        Ok(bytes)
    };
    match format {
        WeightFormat::Safetensors => st::write_sharded(dir, &specs, max_shard_bytes, &mut produce),
        WeightFormat::PytorchBin => write_bin_sharded(dir, &specs, max_shard_bytes, &mut produce),
    }
}

fn write_bin_sharded(
    dir: &Path,
    specs: &[TensorSpec],
    max_shard_bytes: u64,
    produce: &mut dyn FnMut(usize) -> Result<Vec<u8>>,
) -> Result<Vec<PathBuf>> {
    let shards = st::plan_shards(specs, max_shard_bytes);
    let n = shards.len();
    let mut written = Vec::new();
    let mut weight_map = BTreeMap::new();
    for (k, idx) in shards.iter().enumerate() {
        let name = st::shard_name("pytorch_model", "bin", k, n);
        let path = dir.join(&name);
        let sel: Vec<TensorSpec> = idx.iter().map(|&i| specs[i].clone()).collect();
        torch_bin::write_state_dict(&path, &sel, &mut |j| produce(idx[j]))?;
        for s in &sel {
            weight_map.insert(s.name.clone(), name.clone());
        }
        written.push(path);
    }
    if n > 1 {
        let total: u64 = specs.iter().map(TensorSpec::nbytes).sum();
        let index =
            serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let path = dir.join("pytorch_model.bin.index.json");
        lora_skill::fs::write_json_atomic(&path, &index).map_err(|e| MergeError::io(&path, e))?;
        written.push(path);
    }
    Ok(written)
}

/// Writes a complete Hugging Face folder at `out` (built beside it under a temporary
/// name and renamed into place; an existing `out` is refused).
#[allow(clippy::too_many_arguments)] // one call site per format; a struct would only rename these
pub fn write_model_dir(
    out: &Path,
    base_dir: &Path,
    adapter_dir: Option<&Path>,
    merged: &MergedModel<'_>,
    out_dtype: Option<DType>,
    format: WeightFormat,
    max_shard_bytes: u64,
    on_tensor: &mut dyn FnMut(usize, usize, &str) -> Result<()>,
) -> Result<Vec<PathBuf>> {
    if out.exists() {
        return Err(MergeError::invalid(
            "out",
            format!("{} already exists", out.display()),
            "choose a new output folder; finished exports are never overwritten",
        ));
    }
    let tmp = lora_skill::fs::temp_path_for(out);
    std::fs::create_dir_all(&tmp).map_err(|e| MergeError::io(&tmp, e))?;
    let result = (|| -> Result<Vec<PathBuf>> {
        let untie = merged.added().iter().any(|n| n == "lm_head.weight");
        let cfg = output_config(base_dir, out_dtype, untie)?;
        let p = tmp.join("config.json");
        lora_skill::fs::write_json_atomic(&p, &cfg).map_err(|e| MergeError::io(&p, e))?;
        for (name, src) in aux_sources(base_dir, adapter_dir) {
            let dst = tmp.join(&name);
            std::fs::copy(&src, &dst).map_err(|e| MergeError::io(&src, e))?;
        }
        write_weights(&tmp, merged, out_dtype, format, max_shard_bytes, on_tensor)
    })();
    match result {
        Ok(files) => {
            lora_skill::fs::publish_dir(&tmp, out).map_err(|e| MergeError::io(out, e))?;
            Ok(files
                .iter()
                .filter_map(|f| f.file_name().map(|n| out.join(n)))
                .collect())
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}
