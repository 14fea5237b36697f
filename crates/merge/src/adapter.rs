//! PEFT LoRA adapters on disk: `adapter_config.json` + `adapter_model.safetensors`,
//! resolved into one [`LoraModule`] per adapted base weight.
//!
//! Key layout (PEFT `get_peft_model_state_dict`): `base_model.model.<module>.lora_A.weight`
//! `[r, in]`, `.lora_B.weight` `[out, r]`, `.lora_magnitude_vector` `[out]` (DoRA),
//! `.lora_B.bias` (lora_bias), `<embedding>.lora_embedding_A` `[r, vocab]` /
//! `lora_embedding_B` `[hidden, r]`; `modules_to_save` and `bias="all"` tensors are
//! full copies saved under the base name (`base_model.model.lm_head.weight`).

use crate::error::{MergeError, Result, read_json};
use crate::st::{SafetensorsSet, TensorEntry};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The PEFT prefix of every adapter tensor of a causal LM.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// The parts of `adapter_config.json` a merge depends on.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterConfig {
    /// `peft_type` (only `LORA` is merged).
    pub peft_type: String,
    /// Default rank `r`.
    pub r: usize,
    /// Default `lora_alpha`.
    pub lora_alpha: f64,
    /// `use_rslora`: scaling `alpha / sqrt(r)`.
    pub use_rslora: bool,
    /// `use_dora`.
    pub use_dora: bool,
    /// `fan_in_fan_out` (GPT-2 Conv1D layout; Llama-family models use false).
    pub fan_in_fan_out: bool,
    /// `modules_to_save`.
    pub modules_to_save: Vec<String>,
    /// `alpha_pattern` (regex key → alpha).
    pub alpha_pattern: Vec<(String, f64)>,
    /// `rank_pattern` (regex key → r).
    pub rank_pattern: Vec<(String, usize)>,
    /// `base_model_name_or_path`.
    pub base_model_name_or_path: Option<String>,
    /// The whole JSON, for writers that copy it.
    pub raw: Value,
}

impl AdapterConfig {
    /// Parses `adapter_config.json`.
    pub fn from_json(v: Value, file: &Path) -> Result<Self> {
        let bad = |m: String| MergeError::bad_file(file, m);
        let peft_type = v
            .get("peft_type")
            .and_then(Value::as_str)
            .unwrap_or("LORA")
            .to_string();
        let r = v
            .get("r")
            .and_then(Value::as_u64)
            .ok_or_else(|| bad("`r` is missing or not a positive integer".into()))?
            as usize;
        let lora_alpha = v.get("lora_alpha").and_then(Value::as_f64).unwrap_or(8.0);
        let flag = |k: &str| v.get(k).and_then(Value::as_bool).unwrap_or(false);
        let strings = |k: &str| -> Vec<String> {
            v.get(k)
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default()
        };
        let pattern = |k: &str| -> Result<Vec<(String, f64)>> {
            let mut out = Vec::new();
            if let Some(m) = v.get(k).and_then(Value::as_object) {
                for (key, val) in m {
                    let x = val
                        .as_f64()
                        .ok_or_else(|| bad(format!("`{k}.{key}` must be a number")))?;
                    out.push((key.clone(), x));
                }
            }
            Ok(out)
        };
        Ok(Self {
            peft_type,
            r,
            lora_alpha,
            use_rslora: flag("use_rslora"),
            use_dora: flag("use_dora"),
            fan_in_fan_out: flag("fan_in_fan_out"),
            modules_to_save: strings("modules_to_save"),
            alpha_pattern: pattern("alpha_pattern")?,
            rank_pattern: pattern("rank_pattern")?
                .into_iter()
                .map(|(k, x)| (k, x as usize))
                .collect(),
            base_model_name_or_path: v
                .get("base_model_name_or_path")
                .and_then(Value::as_str)
                .map(String::from),
            raw: v,
        })
    }

    /// The alpha of `module` (PEFT `get_pattern_key`: `^(.*\.)?(KEY)$`, first match wins).
    pub fn alpha_for(&self, module: &str) -> Result<f64> {
        for (key, alpha) in &self.alpha_pattern {
            if pattern_matches(key, module)? {
                return Ok(*alpha);
            }
        }
        Ok(self.lora_alpha)
    }
}

/// PEFT's pattern match of a module name against an `alpha_pattern`/`rank_pattern` key.
pub fn pattern_matches(key: &str, module: &str) -> Result<bool> {
    let re = regex_lite::Regex::new(&format!(r"^(.*\.)?({key})$")).map_err(|e| {
        MergeError::invalid(
            "adapter_config.alpha_pattern",
            format!("key `{key}` is not a valid regular expression: {e}"),
            "use a module-name suffix such as `q_proj` or `layers.0.self_attn.q_proj`",
        )
    })?;
    Ok(re.is_match(module))
}

/// One adapted base weight.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraModule {
    /// Module path in the base model (`model.layers.0.self_attn.q_proj`).
    pub module: String,
    /// The base tensor this adapts (`<module>.weight`).
    pub base_weight: String,
    /// Adapter tensor name of A (`[r, in]`, or `[r, vocab]` for embeddings).
    pub a: String,
    /// Adapter tensor name of B (`[out, r]`, or `[hidden, r]` for embeddings).
    pub b: String,
    /// Rank (rows of A).
    pub rank: usize,
    /// lora_alpha after `alpha_pattern`.
    pub alpha: f64,
    /// `alpha / r` or `alpha / sqrt(r)` with rsLoRA.
    pub scale: f64,
    /// DoRA magnitude vector, when DoRA.
    pub magnitude: Option<String>,
    /// `lora_B.bias` (PEFT `lora_bias`), added as `scale * bias` to the base bias.
    pub bias: Option<String>,
    /// An embedding adapter (`lora_embedding_A/B`): delta = `(B·A)ᵀ · scale`.
    pub embedding: bool,
}

/// A PEFT LoRA adapter opened from disk.
#[derive(Debug)]
pub struct Adapter {
    /// The adapter folder.
    pub dir: PathBuf,
    /// Its configuration.
    pub config: AdapterConfig,
    /// Its tensors (memory-mapped).
    pub tensors: SafetensorsSet,
    /// Adapted weights, in file order.
    pub modules: Vec<LoraModule>,
    /// Full replacement tensors: base tensor name → adapter tensor name
    /// (`modules_to_save`, `bias="all"`).
    pub replacements: BTreeMap<String, String>,
}

impl Adapter {
    /// Opens a PEFT adapter folder.
    pub fn open(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("adapter_config.json");
        if !cfg_path.is_file() {
            return Err(MergeError::NotFound {
                message: format!("{} is not a PEFT adapter folder (no adapter_config.json)", dir.display()),
                file: Some(cfg_path),
                hint: Some("pass the folder a training run saved (adapter_config.json + adapter_model.safetensors)".into()),
            });
        }
        let config = AdapterConfig::from_json(read_json(&cfg_path)?, &cfg_path)?;
        if config.peft_type != "LORA" {
            return Err(MergeError::unsupported(
                format!(
                    "{}: peft_type `{}` cannot be merged by this tool",
                    cfg_path.display(),
                    config.peft_type
                ),
                "only LoRA (including rsLoRA and DoRA) adapters are merged",
            ));
        }
        if config.fan_in_fan_out {
            return Err(MergeError::unsupported(
                format!(
                    "{}: fan_in_fan_out=true (GPT-2 Conv1D layout) is not supported",
                    cfg_path.display()
                ),
                "Llama, Mistral and Qwen2 adapters use fan_in_fan_out=false",
            ));
        }
        let st = dir.join("adapter_model.safetensors");
        if !st.is_file() {
            let hint = if dir.join("adapter_model.bin").is_file() {
                "this adapter is a pickle .bin; re-save it with safe_serialization=True (PEFT's default)"
            } else {
                "the adapter folder must contain adapter_model.safetensors"
            };
            return Err(MergeError::NotFound {
                message: format!("no adapter_model.safetensors in {}", dir.display()),
                file: Some(st),
                hint: Some(hint.into()),
            });
        }
        let tensors = SafetensorsSet::open_files(&[st])?;
        let (modules, replacements) = resolve(&config, &tensors)?;
        if modules.is_empty() && replacements.is_empty() {
            return Err(MergeError::bad_file(
                tensors.file_of(&tensors.entries()[0].clone()),
                "the adapter has no LoRA tensors",
            ));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            tensors,
            modules,
            replacements,
        })
    }

    /// Whether any module is DoRA.
    pub fn has_dora(&self) -> bool {
        self.modules.iter().any(|m| m.magnitude.is_some())
    }

    /// The f32 values and shape of an adapter tensor.
    pub fn f32(&self, name: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        self.tensors.f32_named(name)
    }
}

fn strip(name: &str) -> &str {
    name.strip_prefix(PEFT_PREFIX).unwrap_or(name)
}

fn resolve(
    cfg: &AdapterConfig,
    st: &SafetensorsSet,
) -> Result<(Vec<LoraModule>, BTreeMap<String, String>)> {
    let mut modules: BTreeMap<String, LoraModule> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    let mut replacements = BTreeMap::new();
    let file = st.file_of(&st.entries()[0].clone()).to_path_buf();
    let mut extras: Vec<(String, String, &'static str)> = Vec::new();
    for e in st.entries() {
        let name = e.name.as_str();
        let short = strip(name);
        let (module, role) = if let Some(m) = short.strip_suffix(".lora_A.weight") {
            (m, "A")
        } else if let Some(m) = short.strip_suffix(".lora_B.weight") {
            (m, "B")
        } else if let Some(m) = short.strip_suffix(".lora_embedding_A") {
            (m, "EA")
        } else if let Some(m) = short.strip_suffix(".lora_embedding_B") {
            (m, "EB")
        } else if let Some(m) = short.strip_suffix(".lora_magnitude_vector") {
            (m, "M")
        } else if let Some(m) = short.strip_suffix(".lora_B.bias") {
            (m, "BB")
        } else if short.contains(".base_layer.") {
            // PEFT saves the untouched base embedding beside an embedding adapter.
            continue;
        } else if short.contains("lora_") {
            return Err(MergeError::unsupported(
                format!(
                    "{}: adapter tensor `{name}` is of a LoRA variant this tool does not merge",
                    file.display()
                ),
                "supported: lora_A/lora_B, lora_embedding_A/B, lora_magnitude_vector (DoRA), lora_B.bias",
            ));
        } else {
            replacements.insert(short.to_string(), name.to_string());
            continue;
        };
        if !modules.contains_key(module) {
            order.push(module.to_string());
            modules.insert(
                module.to_string(),
                LoraModule {
                    module: module.to_string(),
                    base_weight: format!("{module}.weight"),
                    a: String::new(),
                    b: String::new(),
                    rank: 0,
                    alpha: 0.0,
                    scale: 0.0,
                    magnitude: None,
                    bias: None,
                    embedding: false,
                },
            );
        }
        let m = modules
            .get_mut(module)
            .ok_or_else(|| MergeError::Check("internal: module map".into()))?;
        match role {
            "A" | "EA" => {
                m.a = name.to_string();
                m.embedding = role == "EA";
                m.rank = e.shape.first().copied().unwrap_or(0);
            }
            "B" | "EB" => m.b = name.to_string(),
            "M" => m.magnitude = Some(name.to_string()),
            _ => extras.push((module.to_string(), name.to_string(), "bias")),
        }
    }
    for (module, name, _) in extras {
        if let Some(m) = modules.get_mut(&module) {
            m.bias = Some(name);
        }
    }
    let mut out = Vec::new();
    for module in order {
        let Some(mut m) = modules.remove(&module) else {
            continue;
        };
        if m.a.is_empty() || m.b.is_empty() {
            return Err(MergeError::bad_file(
                &file,
                format!("module `{module}` has only one of lora_A / lora_B"),
            )
            .with_hint("the adapter file is incomplete; re-save it from the training run"));
        }
        let a: &TensorEntry = st
            .get(&m.a)
            .ok_or_else(|| MergeError::Check("internal: A".into()))?;
        let b: &TensorEntry = st
            .get(&m.b)
            .ok_or_else(|| MergeError::Check("internal: B".into()))?;
        let rank_b = b.shape.get(1).copied().unwrap_or(0);
        if a.shape.len() != 2 || b.shape.len() != 2 || rank_b != m.rank || m.rank == 0 {
            return Err(MergeError::bad_file(
                &file,
                format!(
                    "module `{module}`: lora_A {:?} and lora_B {:?} do not share a rank",
                    a.shape, b.shape
                ),
            ));
        }
        m.alpha = cfg.alpha_for(&module)?;
        let r = m.rank as f64;
        m.scale = if cfg.use_rslora {
            m.alpha / r.sqrt()
        } else {
            m.alpha / r
        };
        out.push(m);
    }
    Ok((out, replacements))
}
