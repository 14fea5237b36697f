//! One entry point for every output: merged Hugging Face folders (safetensors or
//! `.bin`), GGUF models and GGUF LoRA adapters, with the preflight checks that run
//! before anything is written.

use crate::adapter::Adapter;
use crate::dtype::DType;
use crate::error::{MergeError, Result};
use crate::gguf::{self, HfConfig};
use crate::hf::{self, WeightFormat};
use crate::merge::MergedModel;
use crate::st::SafetensorsSet;
use lora_spec::contracts::merge::GgufQuantization;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExportKind {
    /// Hugging Face folder with safetensors weights.
    Safetensors,
    /// Hugging Face folder with `torch.save` `.bin` weights.
    PytorchBin,
    /// One GGUF model file.
    Gguf,
    /// One GGUF LoRA adapter file (the adapter alone).
    GgufLora,
}

/// An export request.
#[derive(Debug, Clone)]
pub struct ExportRequest {
    /// Base model folder (Hugging Face layout).
    pub base_dir: PathBuf,
    /// Adapter folder (PEFT layout), if any.
    pub adapter_dir: Option<PathBuf>,
    /// Output folder (safetensors, `.bin`) or file (GGUF).
    pub out: PathBuf,
    /// What to write.
    pub kind: ExportKind,
    /// Weight dtype of safetensors / `.bin` output (None = the base's).
    pub dtype: Option<DType>,
    /// GGUF file type.
    pub quant: GgufQuantization,
    /// Shard size limit of safetensors / `.bin` output.
    pub max_shard_bytes: u64,
    /// Accept a GGUF export of a fine-tuned model without a chat template.
    pub allow_missing_chat_template: bool,
}

impl ExportRequest {
    /// A request with defaults: base dtype, Q4_K_M, 5 GB shards.
    pub fn new(
        base_dir: impl Into<PathBuf>,
        adapter_dir: Option<PathBuf>,
        out: impl Into<PathBuf>,
        kind: ExportKind,
    ) -> Self {
        Self {
            base_dir: base_dir.into(),
            adapter_dir,
            out: out.into(),
            kind,
            dtype: None,
            quant: GgufQuantization::Q4KM,
            max_shard_bytes: 5_000_000_000,
            allow_missing_chat_template: false,
        }
    }
}

/// What an export wrote.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ExportSummary {
    /// The folder or file written.
    pub path: PathBuf,
    /// Files written.
    pub files: Vec<PathBuf>,
    /// Bytes written.
    pub bytes: u64,
    /// Tensors written.
    pub tensors: usize,
    /// Base tensors changed by the adapter.
    pub adapted_tensors: usize,
    /// GGUF tensors per ggml type.
    pub gguf_types: BTreeMap<String, usize>,
    /// Things the user should know.
    pub warnings: Vec<String>,
}

/// Progress callback: `(done, total, tensor name)`; return an error to stop (cancellation).
pub type OnTensor<'a> = &'a mut dyn FnMut(usize, usize, &str) -> Result<()>;

fn tokenizer_dir(base: &Path, adapter: Option<&Path>) -> PathBuf {
    match adapter {
        Some(a) if a.join("tokenizer.json").is_file() || a.join("tokenizer.model").is_file() => {
            a.to_path_buf()
        }
        _ => base.to_path_buf(),
    }
}

/// The base model folder of an adapter-only GGUF export: `base_dir` when it has a
/// config.json, else the adapter's `base_model_name_or_path` when that is a local folder.
fn lora_base_config(req: &ExportRequest, adapter: &Adapter) -> Result<HfConfig> {
    if req.base_dir.join("config.json").is_file() {
        return HfConfig::read(&req.base_dir);
    }
    if let Some(p) = adapter.config.base_model_name_or_path.as_deref() {
        let p = Path::new(p);
        if p.join("config.json").is_file() {
            return HfConfig::read(p);
        }
    }
    Err(MergeError::NotFound {
        message:
            "the base model's config.json is needed for a GGUF LoRA (architecture and head counts)"
                .into(),
        file: Some(req.base_dir.join("config.json")),
        hint: Some("pass --model BASE_DIR (the folder the adapter was trained on)".into()),
    })
}

/// Checks a request before anything is written; returns warnings.
pub fn preflight(req: &ExportRequest) -> Result<Vec<String>> {
    let mut warnings = Vec::new();
    let adapter = req.adapter_dir.as_deref().map(Adapter::open).transpose()?;
    if req.kind == ExportKind::GgufLora {
        let ad = adapter.as_ref().ok_or_else(|| {
            MergeError::invalid(
                "adapter",
                "a GGUF LoRA export needs an adapter",
                "pass --adapter DIR",
            )
        })?;
        gguf::lora::preflight(ad)?;
        let cfg = lora_base_config(req, ad)?;
        let _ = cfg;
        return Ok(warnings);
    }
    let base = SafetensorsSet::open_model_dir(&req.base_dir)?;
    let merged = MergedModel::new(&base, adapter.as_ref())?;
    let cfg_path = req.base_dir.join("config.json");
    if !cfg_path.is_file() {
        return Err(MergeError::NotFound {
            message: format!("{} has no config.json", req.base_dir.display()),
            file: Some(cfg_path),
            hint: Some("--model must be a Hugging Face model folder".into()),
        });
    }
    let tdir = tokenizer_dir(&req.base_dir, req.adapter_dir.as_deref());
    let template = gguf::tokenizer::chat_template(&tdir)?;
    if req.kind == ExportKind::Gguf {
        let cfg = HfConfig::read(&req.base_dir)?;
        let (shape, _) = merged
            .shape_of("model.embed_tokens.weight")
            .ok_or_else(|| {
                MergeError::unsupported(
                    "no model.embed_tokens.weight",
                    "only Llama-family causal LMs export to GGUF",
                )
            })?;
        if shape[0] != cfg.vocab_size {
            warnings.push(format!(
                "config.json vocab_size {} differs from the embedding's {} rows; GGUF uses the embedding",
                cfg.vocab_size, shape[0]
            ));
        }
        // Vocabulary against the tokenizer (errors when the tokenizer is larger).
        let tok = gguf::tokenizer::tokenizer_kvs(&tdir, shape[0], &cfg.raw)?;
        warnings.extend(tok.warnings);
        if template.is_none() && adapter.is_some() && !req.allow_missing_chat_template {
            return Err(MergeError::invalid(
                "chat_template",
                format!(
                    "no chat template in {} (tokenizer_config.json or chat_template.jinja)",
                    tdir.display()
                ),
                "a fine-tuned GGUF without its template makes llama.cpp/Ollama fall back to a default one and undoes \
                 the fine-tune: save the training tokenizer (with chat_template) beside the adapter, or pass \
                 --allow-missing-chat-template",
            ));
        }
    } else if template.is_none() {
        warnings.push(format!(
            "no chat template found in {}; the export carries none",
            tdir.display()
        ));
    }
    Ok(warnings)
}

/// Runs an export (preflight first).
pub fn export(req: &ExportRequest, on_tensor: OnTensor<'_>) -> Result<ExportSummary> {
    let mut warnings = preflight(req)?;
    let adapter = req.adapter_dir.as_deref().map(Adapter::open).transpose()?;
    if req.kind == ExportKind::GgufLora {
        let ad = adapter
            .as_ref()
            .ok_or_else(|| MergeError::Check("internal: adapter".into()))?;
        let cfg = lora_base_config(req, ad)?;
        refuse_existing(&req.out)?;
        let rep = gguf::lora::write_lora(&req.out, ad, &cfg, req.quant)?;
        return Ok(ExportSummary {
            path: req.out.clone(),
            files: vec![req.out.clone()],
            bytes: rep.bytes,
            tensors: rep.modules * 2,
            adapted_tensors: rep.modules,
            gguf_types: BTreeMap::new(),
            warnings,
        });
    }
    let base = SafetensorsSet::open_model_dir(&req.base_dir)?;
    let merged = MergedModel::new(&base, adapter.as_ref())?;
    let adapted_tensors = merged
        .specs(None)
        .iter()
        .filter(|s| merged.is_modified(&s.name))
        .count();
    match req.kind {
        ExportKind::Safetensors | ExportKind::PytorchBin => {
            let fmt = if req.kind == ExportKind::Safetensors {
                WeightFormat::Safetensors
            } else {
                WeightFormat::PytorchBin
            };
            let files = hf::write_model_dir(
                &req.out,
                &req.base_dir,
                req.adapter_dir.as_deref(),
                &merged,
                req.dtype,
                fmt,
                req.max_shard_bytes,
                on_tensor,
            )?;
            let bytes = files
                .iter()
                .filter_map(|f| std::fs::metadata(f).ok())
                .map(|m| m.len())
                .sum();
            Ok(ExportSummary {
                path: req.out.clone(),
                files,
                bytes,
                tensors: merged.specs(None).len(),
                adapted_tensors,
                gguf_types: BTreeMap::new(),
                warnings,
            })
        }
        ExportKind::Gguf => {
            refuse_existing(&req.out)?;
            let cfg = HfConfig::read(&req.base_dir)?;
            let tdir = tokenizer_dir(&req.base_dir, req.adapter_dir.as_deref());
            let name = req
                .base_dir
                .file_name()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "model".into());
            let plan = gguf::convert::plan_model(&cfg, &merged, &tdir, req.quant, &name)?;
            let rep = gguf::convert::write_model(&req.out, &plan, &merged, on_tensor)?;
            for w in rep.warnings {
                if !warnings.contains(&w) {
                    warnings.push(w);
                }
            }
            Ok(ExportSummary {
                path: req.out.clone(),
                files: vec![req.out.clone()],
                bytes: rep.bytes,
                tensors: rep.n_tensors,
                adapted_tensors,
                gguf_types: rep.types,
                warnings,
            })
        }
        ExportKind::GgufLora => Err(MergeError::Check(
            "internal: unreachable export kind".into(),
        )),
    }
}

fn refuse_existing(out: &Path) -> Result<()> {
    if out.exists() {
        return Err(MergeError::invalid(
            "out",
            format!("{} already exists", out.display()),
            "choose a new output path; finished exports are never overwritten",
        ));
    }
    Ok(())
}
