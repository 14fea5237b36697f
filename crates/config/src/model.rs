//! Model facts: the architecture of a base model, read from its Hugging Face
//! `config.json` (a local folder, the local HF cache, or the built-in table),
//! with the exact parameter count computed from the architecture.
//!
//! The count follows the module layout transformers builds for each family
//! (token embedding, per-layer linear projections with their biases, norms,
//! the final norm and an untied `lm_head`), so it equals
//! `sum(p.numel() for p in model.parameters())`; the test
//! `catalog_matches_transformers` checks that against transformers itself.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::catalog;
use crate::error::ConfigError;

/// Architecture family (how the blocks are laid out).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// Llama 1/2/3, SmolLM, TinyLlama (`model_type: llama`).
    Llama,
    /// Mistral (`mistral`).
    Mistral,
    /// Qwen2 / Qwen2.5 (`qwen2`): biases on q/k/v.
    Qwen2,
    /// Qwen3 (`qwen3`): q/k norms.
    Qwen3,
    /// Gemma (`gemma`).
    Gemma,
    /// Gemma 2 (`gemma2`): four norms per block.
    Gemma2,
    /// Gemma 3 text (`gemma3_text`): four norms and q/k norms.
    Gemma3,
    /// Phi-1/1.5/2 (`phi`): LayerNorm, parallel attention and MLP, biases everywhere.
    Phi,
    /// Phi-3 / 3.5 (`phi3`): fused qkv and gate_up projections.
    Phi3,
    /// GPT-2 (`gpt2`): learned positions, Conv1D projections.
    Gpt2,
}

impl Family {
    /// The `model_type` transformers writes for this family.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Mistral => "mistral",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
            Self::Gemma => "gemma",
            Self::Gemma2 => "gemma2",
            Self::Gemma3 => "gemma3_text",
            Self::Phi => "phi",
            Self::Phi3 => "phi3",
            Self::Gpt2 => "gpt2",
        }
    }

    /// The family of a config.json `model_type`.
    pub fn from_model_type(t: &str) -> Option<Self> {
        Some(match t {
            "llama" => Self::Llama,
            "mistral" => Self::Mistral,
            "qwen2" => Self::Qwen2,
            "qwen3" => Self::Qwen3,
            "gemma" => Self::Gemma,
            "gemma2" => Self::Gemma2,
            "gemma3_text" => Self::Gemma3,
            "phi" => Self::Phi,
            "phi3" => Self::Phi3,
            "gpt2" => Self::Gpt2,
            _ => return None,
        })
    }

    /// Whether the MLP is gated (SwiGLU / GeGLU: gate, up, down) rather than fc1 → act → fc2.
    pub fn gated_mlp(self) -> bool {
        !matches!(self, Self::Phi | Self::Gpt2)
    }

    /// Whether norms are LayerNorm (weight and bias) rather than RMSNorm (weight only).
    pub fn layer_norm(self) -> bool {
        matches!(self, Self::Phi | Self::Gpt2)
    }
}

/// What kind of data a model consumes (seed 002 modality matrix).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Modality {
    /// Text.
    Text,
    /// Images.
    Image,
    /// Audio.
    Audio,
    /// Video.
    Video,
    /// Several of the above.
    Multimodal,
}

impl Modality {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Image => "image",
            Self::Audio => "audio",
            Self::Video => "video",
            Self::Multimodal => "multimodal",
        }
    }
}

/// Which tensor feeds a linear module; modules in one group share their input
/// (q, k and v all read the attention norm's output), which matters for the
/// activation estimate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputGroup {
    /// The attention norm's output (q, k, v, fused qkv).
    AttnIn,
    /// The attention output (o_proj / dense / attn.c_proj).
    AttnOut,
    /// The MLP norm's output (gate, up, fc1, c_fc).
    MlpIn,
    /// The activated MLP hidden state (down, fc2, mlp.c_proj).
    MlpAct,
}

/// One linear projection inside every transformer block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinearModule {
    /// The name PEFT matches (`q_proj`, `c_proj`, ...).
    pub name: String,
    /// Path inside a block (`self_attn.q_proj`, `mlp.c_proj`).
    pub path: String,
    /// Input features.
    pub in_features: u64,
    /// Output features.
    pub out_features: u64,
    /// Whether it has a bias.
    pub bias: bool,
    /// Which tensor feeds it.
    pub group: InputGroup,
}

impl LinearModule {
    /// Weight elements.
    pub fn weight_params(&self) -> u64 {
        self.in_features * self.out_features
    }

    /// Whether a PEFT `target_modules` entry selects this module: the entry
    /// equals the name, or the module's path ends with `.entry` / equals it.
    pub fn matches(&self, target: &str) -> bool {
        let t = target.trim();
        !t.is_empty() && (self.name == t || self.path == t || self.path.ends_with(&format!(".{t}")))
    }
}

/// Where the parameters are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ParamCount {
    /// Every parameter (tied embeddings counted once), as `model.parameters()` counts them.
    pub total: u64,
    /// Token embedding (vocab × hidden).
    pub embedding: u64,
    /// Learned position embedding (GPT-2), else 0.
    pub position_embedding: u64,
    /// Untied `lm_head` (weight and bias); 0 when tied to the embedding.
    pub lm_head: u64,
    /// Weights of the linear projections of all blocks (what QLoRA quantises).
    pub block_linear_weights: u64,
    /// Biases of those projections.
    pub block_linear_biases: u64,
    /// Norm weights and biases (blocks and final).
    pub norms: u64,
}

/// The facts about a base model that the estimates need.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelFacts {
    /// The name it was asked for (hub id, folder or catalog id).
    pub name: String,
    /// `local`, `hf_cache` or `builtin`.
    pub source: String,
    /// The config.json it was read from (none for built-in entries).
    pub config_path: Option<PathBuf>,
    /// Architecture family.
    pub family: Family,
    /// `architectures[0]`, or the family's causal-LM class.
    pub architecture: String,
    /// Hidden size.
    pub hidden_size: u64,
    /// MLP inner size.
    pub intermediate_size: u64,
    /// Transformer blocks.
    pub num_layers: u64,
    /// Query heads.
    pub num_attention_heads: u64,
    /// Key/value heads (grouped-query attention).
    pub num_kv_heads: u64,
    /// Size of one head.
    pub head_dim: u64,
    /// Vocabulary size.
    pub vocab_size: u64,
    /// Longest context.
    pub max_position_embeddings: u64,
    /// Whether `lm_head` shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Storage dtype of the checkpoint (`bfloat16`, `float16`, `float32`).
    pub torch_dtype: String,
    /// `quantization_config.quant_method` (with bits) when the checkpoint is already quantised.
    pub quantization: Option<String>,
    /// Modality of the inputs.
    pub modality: Modality,
    /// Linear projections inside each block.
    pub linear_modules: Vec<LinearModule>,
    /// Parameter count.
    pub params: ParamCount,
}

impl ModelFacts {
    /// Width of all query heads together.
    pub fn q_dim(&self) -> u64 {
        self.num_attention_heads * self.head_dim
    }

    /// Width of all key (or value) heads together.
    pub fn kv_dim(&self) -> u64 {
        self.num_kv_heads * self.head_dim
    }

    /// Parameters in billions.
    pub fn params_b(&self) -> f64 {
        self.params.total as f64 / 1e9
    }

    /// Parameters of the matrices a token passes through in a forward pass
    /// (block projections plus the output projection, tied or not): the `N` of
    /// FLOPs ≈ 2·N per token.
    pub fn matmul_params(&self) -> u64 {
        self.params.block_linear_weights + self.vocab_size * self.hidden_size
    }

    /// The linear modules selected by PEFT-style `target_modules`
    /// (`all-linear` selects every block projection). Unknown names are returned separately.
    pub fn select_targets<'a>(
        &'a self,
        targets: &[String],
    ) -> (Vec<&'a LinearModule>, Vec<String>) {
        let all = targets
            .iter()
            .any(|t| t == "all-linear" || t == "all_linear");
        if all {
            return (self.linear_modules.iter().collect(), Vec::new());
        }
        let mut unknown = Vec::new();
        for t in targets {
            if !self.linear_modules.iter().any(|m| m.matches(t)) {
                unknown.push(t.clone());
            }
        }
        let chosen = self
            .linear_modules
            .iter()
            .filter(|m| targets.iter().any(|t| m.matches(t)))
            .collect();
        (chosen, unknown)
    }

    /// Distinct PEFT names of the block projections, in block order.
    pub fn module_names(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for m in &self.linear_modules {
            if !out.contains(&m.name) {
                out.push(m.name.clone());
            }
        }
        out
    }

    /// LoRA parameters for rank `r` on `targets`: `r·(in + out)` per adapted module per block.
    pub fn lora_params(&self, targets: &[String], rank: u32) -> u64 {
        let (mods, _) = self.select_targets(targets);
        let per_layer: u64 = mods
            .iter()
            .map(|m| u64::from(rank) * (m.in_features + m.out_features))
            .sum();
        per_layer * self.num_layers
    }

    /// Builds the facts from a parsed config.json.
    pub fn from_config(
        name: &str,
        source: &str,
        config_path: Option<PathBuf>,
        cfg: &Value,
    ) -> Result<Self, ConfigError> {
        let file = config_path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| format!("<built-in {name}>"));
        let obj = cfg.as_object().ok_or_else(|| ConfigError::BadModelConfig {
            file: file.clone(),
            field: None,
            message: "config.json is not a JSON object".into(),
        })?;
        let model_type = obj
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let family = match Family::from_model_type(&model_type) {
            Some(f) => f,
            None => {
                return Err(ConfigError::UnsupportedArchitecture {
                    model_type: if model_type.is_empty() {
                        "<missing model_type>".into()
                    } else {
                        model_type
                    },
                    file,
                });
            }
        };
        let reader = Reader { obj, file: &file };
        let hidden = reader.req(&["hidden_size", "n_embd", "d_model"])?;
        let layers = reader.req(&["num_hidden_layers", "n_layer", "num_layers"])?;
        let heads = reader.req(&["num_attention_heads", "n_head"])?;
        let vocab = reader.req(&["vocab_size"])?;
        if heads == 0 || hidden == 0 || layers == 0 || vocab == 0 {
            return Err(ConfigError::BadModelConfig {
                file,
                field: Some("hidden_size".into()),
                message: "hidden_size, num_hidden_layers, num_attention_heads and vocab_size must be positive"
                    .into(),
            });
        }
        let intermediate = match family {
            Family::Gpt2 => reader.opt(&["n_inner"]).unwrap_or(4 * hidden),
            _ => reader.req(&["intermediate_size"])?,
        };
        let kv_heads = reader
            .opt(&["num_key_value_heads", "multi_query_group_num"])
            .unwrap_or(heads);
        let head_dim = reader.opt(&["head_dim"]).unwrap_or(hidden / heads);
        let max_pos = reader
            .opt(&["max_position_embeddings", "n_positions", "n_ctx"])
            .unwrap_or(2048);
        let tie_default = matches!(
            family,
            Family::Gpt2 | Family::Gemma | Family::Gemma2 | Family::Gemma3
        );
        let tie = obj
            .get("tie_word_embeddings")
            .and_then(Value::as_bool)
            .unwrap_or(tie_default);
        let flag = |k: &str| obj.get(k).and_then(Value::as_bool).unwrap_or(false);
        let attention_bias = flag("attention_bias");
        let mlp_bias = flag("mlp_bias");
        let torch_dtype = obj
            .get("torch_dtype")
            .or_else(|| obj.get("dtype"))
            .and_then(Value::as_str)
            .unwrap_or("float32")
            .to_string();
        let quantization = obj.get("quantization_config").map(|q| {
            let method = q
                .get("quant_method")
                .and_then(Value::as_str)
                .unwrap_or("unknown");
            let bits = if q.get("load_in_4bit").and_then(Value::as_bool) == Some(true) {
                Some(4)
            } else if q.get("load_in_8bit").and_then(Value::as_bool) == Some(true) {
                Some(8)
            } else {
                q.get("bits").and_then(Value::as_u64)
            };
            match bits {
                Some(b) => format!("{method}-{b}bit"),
                None => method.to_string(),
            }
        });
        let architecture = obj
            .get("architectures")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .and_then(Value::as_str)
            .map(String::from)
            .unwrap_or_else(|| default_architecture(family).to_string());

        let q_dim = heads * head_dim;
        let kv_dim = kv_heads * head_dim;
        let linear_modules = block_linears(
            family,
            hidden,
            intermediate,
            q_dim,
            kv_dim,
            attention_bias,
            mlp_bias,
        );

        // Parameter count.
        let embedding = vocab * hidden;
        let position_embedding = if family == Family::Gpt2 {
            max_pos * hidden
        } else {
            0
        };
        let w: u64 = linear_modules.iter().map(LinearModule::weight_params).sum();
        let b: u64 = linear_modules
            .iter()
            .filter(|m| m.bias)
            .map(|m| m.out_features)
            .sum();
        let norm = if family.layer_norm() {
            2 * hidden
        } else {
            hidden
        };
        let per_layer_norms = match family {
            Family::Phi => norm,
            Family::Gemma2 => 4 * norm,
            Family::Gemma3 => 4 * norm + 2 * head_dim,
            Family::Qwen3 => 2 * norm + 2 * head_dim,
            _ => 2 * norm,
        };
        let norms = layers * per_layer_norms + norm;
        let lm_head = if tie {
            0
        } else if family == Family::Phi {
            vocab * hidden + vocab
        } else {
            vocab * hidden
        };
        let params = ParamCount {
            total: embedding + position_embedding + layers * (w + b) + norms + lm_head,
            embedding,
            position_embedding,
            lm_head,
            block_linear_weights: layers * w,
            block_linear_biases: layers * b,
            norms,
        };
        let modality = if obj.contains_key("vision_config") || obj.contains_key("audio_config") {
            Modality::Multimodal
        } else {
            Modality::Text
        };
        Ok(Self {
            name: name.to_string(),
            source: source.to_string(),
            config_path,
            family,
            architecture,
            hidden_size: hidden,
            intermediate_size: intermediate,
            num_layers: layers,
            num_attention_heads: heads,
            num_kv_heads: kv_heads,
            head_dim,
            vocab_size: vocab,
            max_position_embeddings: max_pos,
            tie_word_embeddings: tie,
            torch_dtype,
            quantization,
            modality,
            linear_modules,
            params,
        })
    }

    /// The contract summary of these facts.
    pub fn summary(&self) -> lora_spec::contracts::config::ModelSummary {
        lora_spec::contracts::config::ModelSummary {
            name: self.name.clone(),
            source: self.source.clone(),
            family: self.family.as_str().to_string(),
            architecture: self.architecture.clone(),
            params: self.params.total,
            hidden_size: self.hidden_size,
            num_layers: self.num_layers,
            vocab_size: self.vocab_size,
            max_position_embeddings: self.max_position_embeddings,
            linear_modules: self.module_names(),
        }
    }
}

fn default_architecture(f: Family) -> &'static str {
    match f {
        Family::Llama => "LlamaForCausalLM",
        Family::Mistral => "MistralForCausalLM",
        Family::Qwen2 => "Qwen2ForCausalLM",
        Family::Qwen3 => "Qwen3ForCausalLM",
        Family::Gemma => "GemmaForCausalLM",
        Family::Gemma2 => "Gemma2ForCausalLM",
        Family::Gemma3 => "Gemma3ForCausalLM",
        Family::Phi => "PhiForCausalLM",
        Family::Phi3 => "Phi3ForCausalLM",
        Family::Gpt2 => "GPT2LMHeadModel",
    }
}

fn lin(name: &str, path: &str, i: u64, o: u64, bias: bool, group: InputGroup) -> LinearModule {
    LinearModule {
        name: name.into(),
        path: path.into(),
        in_features: i,
        out_features: o,
        bias,
        group,
    }
}

/// The projections of one block, as transformers lays them out per family.
fn block_linears(
    family: Family,
    h: u64,
    i: u64,
    q: u64,
    kv: u64,
    attention_bias: bool,
    mlp_bias: bool,
) -> Vec<LinearModule> {
    use InputGroup::*;
    match family {
        Family::Phi => vec![
            lin("q_proj", "self_attn.q_proj", h, q, true, AttnIn),
            lin("k_proj", "self_attn.k_proj", h, kv, true, AttnIn),
            lin("v_proj", "self_attn.v_proj", h, kv, true, AttnIn),
            lin("dense", "self_attn.dense", q, h, true, AttnOut),
            lin("fc1", "mlp.fc1", h, i, true, MlpIn),
            lin("fc2", "mlp.fc2", i, h, true, MlpAct),
        ],
        Family::Phi3 => vec![
            lin(
                "qkv_proj",
                "self_attn.qkv_proj",
                h,
                q + 2 * kv,
                false,
                AttnIn,
            ),
            lin("o_proj", "self_attn.o_proj", q, h, false, AttnOut),
            lin("gate_up_proj", "mlp.gate_up_proj", h, 2 * i, false, MlpIn),
            lin("down_proj", "mlp.down_proj", i, h, false, MlpAct),
        ],
        Family::Gpt2 => vec![
            lin("c_attn", "attn.c_attn", h, 3 * h, true, AttnIn),
            lin("c_proj", "attn.c_proj", h, h, true, AttnOut),
            lin("c_fc", "mlp.c_fc", h, i, true, MlpIn),
            lin("c_proj", "mlp.c_proj", i, h, true, MlpAct),
        ],
        _ => {
            // Llama layout; Qwen2 always has q/k/v biases and no o_proj bias.
            let (qkv_b, o_b) = if family == Family::Qwen2 {
                (true, false)
            } else {
                (attention_bias, attention_bias)
            };
            vec![
                lin("q_proj", "self_attn.q_proj", h, q, qkv_b, AttnIn),
                lin("k_proj", "self_attn.k_proj", h, kv, qkv_b, AttnIn),
                lin("v_proj", "self_attn.v_proj", h, kv, qkv_b, AttnIn),
                lin("o_proj", "self_attn.o_proj", q, h, o_b, AttnOut),
                lin("gate_proj", "mlp.gate_proj", h, i, mlp_bias, MlpIn),
                lin("up_proj", "mlp.up_proj", h, i, mlp_bias, MlpIn),
                lin("down_proj", "mlp.down_proj", i, h, mlp_bias, MlpAct),
            ]
        }
    }
}

/// Reads integer fields of a config object under any of several names.
struct Reader<'a> {
    obj: &'a serde_json::Map<String, Value>,
    file: &'a str,
}

impl Reader<'_> {
    fn opt(&self, keys: &[&str]) -> Option<u64> {
        keys.iter().filter_map(|k| self.obj.get(*k)).find_map(|v| {
            v.as_u64().or_else(|| {
                v.as_f64()
                    .filter(|f| *f >= 0.0 && f.fract() == 0.0)
                    .map(|f| f as u64)
            })
        })
    }

    fn req(&self, keys: &[&str]) -> Result<u64, ConfigError> {
        if let Some(v) = self.opt(keys) {
            return Ok(v);
        }
        let present = keys.iter().find(|k| self.obj.contains_key(**k));
        Err(ConfigError::BadModelConfig {
            file: self.file.to_string(),
            field: Some(keys[0].to_string()),
            message: match present {
                Some(k) => format!("`{k}` must be a non-negative integer"),
                None => format!("missing `{}`", keys[0]),
            },
        })
    }
}

/// Where to look for a model.
#[derive(Debug, Clone, Default)]
pub struct ResolveOptions {
    /// The HF hub cache folder (the one holding `models--org--name`); default:
    /// `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`.
    pub hf_cache: Option<PathBuf>,
    /// Relative paths are resolved against this folder (default: the current one).
    pub base_dir: Option<PathBuf>,
}

impl ResolveOptions {
    fn cache_dir(&self) -> PathBuf {
        if let Some(p) = &self.hf_cache {
            return p.clone();
        }
        if let Some(p) = std::env::var_os("HF_HUB_CACHE").filter(|v| !v.is_empty()) {
            return PathBuf::from(p);
        }
        hf_hub_cache::Cache::from_env().path().clone()
    }
}

/// Whether `name` names a GGUF file, a folder holding only GGUF weights, or a
/// hub repo that by convention ships GGUF (`...-GGUF`).
pub fn is_gguf(name: &str, opts: &ResolveOptions) -> bool {
    let p = local_path(name, opts);
    if p.is_file() {
        return has_gguf_magic(&p)
            || p.extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    }
    if p.is_dir() {
        if p.join("config.json").is_file() {
            return false;
        }
        return std::fs::read_dir(&p)
            .map(|rd| {
                rd.flatten().any(|e| {
                    e.path()
                        .extension()
                        .is_some_and(|x| x.eq_ignore_ascii_case("gguf"))
                })
            })
            .unwrap_or(false);
    }
    if let Some(snap) = cached_snapshot(name, opts) {
        if snap.join("config.json").is_file() {
            return false;
        }
        let has = std::fs::read_dir(&snap)
            .map(|rd| {
                rd.flatten().any(|e| {
                    e.path()
                        .extension()
                        .is_some_and(|x| x.eq_ignore_ascii_case("gguf"))
                })
            })
            .unwrap_or(false);
        if has {
            return true;
        }
    }
    let lower = name.to_ascii_lowercase();
    lower.ends_with(".gguf") || lower.ends_with("-gguf") || lower.ends_with("_gguf")
}

fn has_gguf_magic(p: &Path) -> bool {
    use std::io::Read;
    let mut buf = [0u8; 4];
    std::fs::File::open(p)
        .and_then(|mut f| f.read_exact(&mut buf))
        .map(|()| &buf == b"GGUF")
        .unwrap_or(false)
}

fn local_path(name: &str, opts: &ResolveOptions) -> PathBuf {
    let p = PathBuf::from(name);
    match (&opts.base_dir, p.is_relative()) {
        (Some(base), true) => base.join(p),
        _ => p,
    }
}

/// The snapshot folder of a hub id in the HF cache: the one `refs/main`
/// points at, else the most recently modified snapshot.
pub fn cached_snapshot(repo_id: &str, opts: &ResolveOptions) -> Option<PathBuf> {
    if !lora_spec::experiment::looks_like_hub_id(repo_id) {
        return None;
    }
    let cache_dir = opts.cache_dir();
    let cache = hf_hub_cache::Cache::new(cache_dir.clone());
    if let Some(cfg) = cache.model(repo_id.to_string()).get("config.json") {
        return cfg.parent().map(Path::to_path_buf);
    }
    // hf-hub reads refs/main verbatim; be lenient about a trailing newline and
    // about caches filled with an explicit revision (no refs/main).
    let repo_dir = cache_dir.join(format!("models--{}", repo_id.replace('/', "--")));
    if let Ok(rev) = std::fs::read_to_string(repo_dir.join("refs").join("main")) {
        let snap = repo_dir.join("snapshots").join(rev.trim());
        if snap.is_dir() {
            return Some(snap);
        }
    }
    let mut snaps: Vec<(std::time::SystemTime, PathBuf)> =
        std::fs::read_dir(repo_dir.join("snapshots"))
            .ok()?
            .flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| {
                let t = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .unwrap_or(std::time::UNIX_EPOCH);
                (t, e.path())
            })
            .collect();
    snaps.sort();
    snaps.pop().map(|(_, p)| p)
}

fn read_config(path: &Path) -> Result<Value, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
        path: path.display().to_string(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| ConfigError::BadModelConfig {
        file: path.display().to_string(),
        field: None,
        message: format!(
            "invalid JSON at line {}, column {}: {e}",
            e.line(),
            e.column()
        ),
    })
}

/// Resolves a base model to its facts: a local folder (or a config.json
/// path), then a hub id in the local HF cache (offline), then the built-in
/// table.
pub fn resolve_model(name: &str, opts: &ResolveOptions) -> Result<ModelFacts, ConfigError> {
    let name = name.trim();
    if name.is_empty() {
        return Err(ConfigError::InvalidInput {
            field: "base_model".into(),
            message: "is empty".into(),
            hint: "a local model folder, a hub id such as HuggingFaceTB/SmolLM2-135M, or a built-in name".into(),
        });
    }
    let local = local_path(name, opts);
    if local.is_dir() {
        let cfg_path = local.join("config.json");
        if cfg_path.is_file() {
            let cfg = read_config(&cfg_path)?;
            return ModelFacts::from_config(name, "local", Some(cfg_path), &cfg);
        }
        return Err(ConfigError::ModelNotFound {
            name: name.into(),
            detail: format!("the folder {} has no config.json", local.display()),
            suggestions: Vec::new(),
        });
    }
    if local.is_file() && local.file_name().is_some_and(|f| f == "config.json") {
        let cfg = read_config(&local)?;
        return ModelFacts::from_config(name, "local", Some(local), &cfg);
    }
    if let Some(snap) = cached_snapshot(name, opts) {
        let cfg_path = snap.join("config.json");
        if cfg_path.is_file() {
            let cfg = read_config(&cfg_path)?;
            return ModelFacts::from_config(name, "hf_cache", Some(cfg_path), &cfg);
        }
    }
    if let Some(entry) = catalog::lookup(name) {
        return ModelFacts::from_config(name, "builtin", None, &entry.config);
    }
    Err(ConfigError::ModelNotFound {
        name: name.into(),
        detail: format!(
            "not a local folder, not in the HF cache at {}, and not in the built-in table",
            opts.cache_dir().display()
        ),
        suggestions: catalog::suggest(name),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::print_stderr)] // Tests: a panic is the failure report.
mod tests {
    use super::*;
    use serde_json::json;

    fn facts(id: &str) -> ModelFacts {
        resolve_model(id, &ResolveOptions::default()).unwrap()
    }

    #[test]
    fn smollm2_135m_count_is_exact() {
        let f = facts("HuggingFaceTB/SmolLM2-135M");
        assert_eq!(f.params.total, 134_515_008);
        assert_eq!(f.family, Family::Llama);
        assert!(f.tie_word_embeddings);
        assert_eq!(f.params.lm_head, 0);
        assert_eq!(f.kv_dim(), 192);
    }

    #[test]
    fn every_catalog_entry_matches_its_recorded_count() {
        for e in catalog::entries() {
            let f = ModelFacts::from_config(&e.id, "builtin", None, &e.config).unwrap();
            assert_eq!(f.params.total, e.params, "{}", e.id);
        }
    }

    #[test]
    fn qwen2_has_qkv_bias_and_gpt2_shares_c_proj_name() {
        let q = facts("Qwen/Qwen2.5-0.5B");
        let biases: Vec<_> = q
            .linear_modules
            .iter()
            .filter(|m| m.bias)
            .map(|m| m.name.as_str())
            .collect();
        assert_eq!(biases, ["q_proj", "k_proj", "v_proj"]);
        let g = facts("gpt2");
        let (sel, unknown) = g.select_targets(&["c_proj".into()]);
        assert_eq!(sel.len(), 2);
        assert!(unknown.is_empty());
        let (sel, _) = g.select_targets(&["mlp.c_proj".into()]);
        assert_eq!(sel.len(), 1);
    }

    #[test]
    fn lora_params_of_llama_8b_attention_and_mlp() {
        let f = facts("meta-llama/Llama-3.1-8B");
        // r=8 on q, v, o and the MLP: per block 8·(8192 + 5120 + 8192 + 3·18432).
        let t: Vec<String> = [
            "q_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            f.lora_params(&t, 8),
            32 * 8 * (8192 + 5120 + 8192 + 3 * 18432)
        );
        let (_, unknown) = f.select_targets(&["qkv".into()]);
        assert_eq!(unknown, ["qkv"]);
        assert_eq!(
            f.lora_params(&["all-linear".into()], 1),
            f.lora_params(&t, 1) + 32 * (4096 + 1024)
        );
    }

    #[test]
    fn local_folder_and_fake_hf_cache_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = json!({
            "model_type": "mistral", "architectures": ["MistralForCausalLM"],
            "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
            "torch_dtype": "float32"
        });
        let folder = dir.path().join("tiny");
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::write(folder.join("config.json"), cfg.to_string()).unwrap();
        let opts = ResolveOptions {
            hf_cache: Some(dir.path().join("hub")),
            base_dir: None,
        };
        let f = resolve_model(folder.to_str().unwrap(), &opts).unwrap();
        assert_eq!(f.source, "local");
        // 100·64 embed + 2·(64·64 + 2·64·32 + 64·64 + 3·64·128 + 2·64) + 64 + 100·64 lm_head
        assert_eq!(
            f.params.total,
            6400 + 2 * (4096 + 4096 + 4096 + 24576 + 128) + 64 + 6400
        );

        // models--org--name/snapshots/<rev>/config.json with refs/main.
        let repo = dir.path().join("hub").join("models--acme--tiny-mistral");
        let snap = repo.join("snapshots").join("abc123");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::write(repo.join("refs").join("main"), "abc123").unwrap();
        std::fs::write(snap.join("config.json"), cfg.to_string()).unwrap();
        let g = resolve_model("acme/tiny-mistral", &opts).unwrap();
        assert_eq!(g.source, "hf_cache");
        assert_eq!(g.params.total, f.params.total);

        // Without refs/main (downloaded at a pinned revision), the snapshot is still found.
        std::fs::remove_file(repo.join("refs").join("main")).unwrap();
        assert_eq!(
            resolve_model("acme/tiny-mistral", &opts).unwrap().source,
            "hf_cache"
        );

        // A folder with only GGUF weights is GGUF; one with config.json is not.
        let gg = dir.path().join("gg");
        std::fs::create_dir_all(&gg).unwrap();
        std::fs::write(gg.join("model-q4_k_m.gguf"), b"GGUF\x03\0\0\0").unwrap();
        assert!(is_gguf(gg.to_str().unwrap(), &opts));
        assert!(is_gguf(
            gg.join("model-q4_k_m.gguf").to_str().unwrap(),
            &opts
        ));
        assert!(!is_gguf(folder.to_str().unwrap(), &opts));
        assert!(is_gguf("TheBloke/Llama-2-7B-GGUF", &opts));
    }

    #[test]
    fn bad_configs_name_the_file_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        std::fs::write(&p, r#"{"model_type": "llama", "hidden_size": "big"}"#).unwrap();
        let e = resolve_model(p.to_str().unwrap(), &ResolveOptions::default()).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("config.json") && msg.contains("hidden_size"),
            "{msg}"
        );
        std::fs::write(&p, r#"{"model_type": "mixtral"}"#).unwrap();
        let e = resolve_model(p.to_str().unwrap(), &ResolveOptions::default()).unwrap_err();
        assert!(matches!(e, ConfigError::UnsupportedArchitecture { .. }));
        std::fs::write(&p, "{ not json").unwrap();
        let e = resolve_model(p.to_str().unwrap(), &ResolveOptions::default()).unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");
        let e = resolve_model("meta-llama/Llama-3.2-1", &ResolveOptions::default()).unwrap_err();
        match e {
            ConfigError::ModelNotFound { suggestions, .. } => {
                assert!(
                    suggestions.iter().any(|s| s == "meta-llama/Llama-3.2-1B"),
                    "{suggestions:?}"
                )
            }
            other => panic!("{other}"),
        }
    }

    #[test]
    fn quantized_checkpoints_are_flagged() {
        let cfg = json!({
            "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 10,
            "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": true}
        });
        let f = ModelFacts::from_config("x", "local", None, &cfg).unwrap();
        assert_eq!(f.quantization.as_deref(), Some("bitsandbytes-4bit"));
    }
}
