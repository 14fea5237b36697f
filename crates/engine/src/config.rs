//! `config.json` of a Hugging Face causal LM (Llama, Mistral, Qwen2), as a
//! serde mirror that reads what transformers 4.x and 5.x write, and its
//! checked, derived form [`ModelConfig`] that the model is built from.
//!
//! transformers 4.x writes `rope_theta` and `rope_scaling` at the top level;
//! 5.x writes `rope_parameters` (with `rope_theta` inside). Both are accepted.

use crate::error::{EngineError, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

/// An integer or a list of integers (`eos_token_id` can be either).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// One id.
    One(i64),
    /// Several ids.
    Many(Vec<i64>),
}

impl OneOrMany {
    /// The ids as a list.
    pub fn to_vec(&self) -> Vec<i64> {
        match self {
            Self::One(x) => vec![*x],
            Self::Many(v) => v.clone(),
        }
    }
}

/// `config.json` as written by transformers (the fields this engine reads;
/// every other field is kept in `extra` so the file round-trips).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HfConfig {
    /// `llama`, `mistral` or `qwen2`.
    pub model_type: String,
    /// e.g. `["LlamaForCausalLM"]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architectures: Option<Vec<String>>,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention); defaults to the query heads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    /// Per-head width; defaults to `hidden_size / num_attention_heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// Longest position the model was trained for.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// Activation of the gated MLP (only `silu` is supported).
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// transformers 4.x: RoPE base.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// transformers 4.x: RoPE scaling dictionary (null when none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<Value>,
    /// transformers 5.x: RoPE parameters (type, theta, scaling fields).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<Value>,
    /// Whether `lm_head` shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Llama: bias on q/k/v/o projections.
    #[serde(default)]
    pub attention_bias: bool,
    /// Llama: bias on the MLP projections.
    #[serde(default)]
    pub mlp_bias: bool,
    /// Mistral/Qwen2 sliding attention window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    /// Qwen2: whether the sliding window is used at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_sliding_window: Option<bool>,
    /// Beginning-of-sequence id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<i64>,
    /// End-of-sequence id(s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<OneOrMany>,
    /// Padding id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<i64>,
    /// transformers 4.x: the stored dtype.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
    /// transformers 5.x: the stored dtype.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
    /// Every other field, kept verbatim.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    2048
}
fn default_act() -> String {
    "silu".to_owned()
}

/// The architectures this engine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Llama 1/2/3 (and SmolLM, TinyLlama...).
    Llama,
    /// Mistral.
    Mistral,
    /// Qwen2 / Qwen2.5 (q/k/v bias).
    Qwen2,
}

/// How RoPE frequencies are scaled.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Position interpolation: frequencies divided by `factor`.
    Linear {
        /// Scale factor.
        factor: f64,
    },
    /// Llama 3.x frequency-dependent scaling.
    Llama3 {
        /// Scale factor.
        factor: f64,
        /// Low-frequency factor.
        low_freq_factor: f64,
        /// High-frequency factor.
        high_freq_factor: f64,
        /// The context length the model was pre-trained with.
        original_max_position_embeddings: f64,
    },
}

/// The checked configuration the model is built from.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// Which architecture.
    pub arch: Architecture,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads.
    pub num_kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// Longest position.
    pub max_position_embeddings: usize,
    /// `lm_head` shares the embedding.
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v.
    pub qkv_bias: bool,
    /// Bias on o_proj.
    pub o_bias: bool,
    /// Bias on the MLP projections.
    pub mlp_bias: bool,
    /// Sliding attention window (keys older than this many positions are masked).
    pub sliding_window: Option<usize>,
    /// Beginning-of-sequence id.
    pub bos_token_id: Option<i64>,
    /// End-of-sequence ids.
    pub eos_token_ids: Vec<i64>,
    /// Padding id.
    pub pad_token_id: Option<i64>,
    /// The parsed `config.json`, kept to write it back.
    pub hf: HfConfig,
}

impl HfConfig {
    /// Reads `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| EngineError::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Parses `config.json` text; `path` names it in errors.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        serde_json::from_str(text).map_err(|e| EngineError::json(path, &e))
    }
}

fn cfg_err(
    path: &Path,
    field: &str,
    message: impl Into<String>,
    hint: Option<&str>,
) -> EngineError {
    EngineError::Config {
        path: path.to_path_buf(),
        field: field.to_owned(),
        message: message.into(),
        hint: hint.map(str::to_owned),
    }
}

fn num(v: &Map<String, Value>, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

impl ModelConfig {
    /// Reads and checks `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let hf = HfConfig::from_file(path)?;
        Self::from_hf(hf, path)
    }

    /// Checks a parsed config; `path` names it in errors.
    pub fn from_hf(hf: HfConfig, path: &Path) -> Result<Self> {
        let arch = match hf.model_type.as_str() {
            "llama" => Architecture::Llama,
            "mistral" => Architecture::Mistral,
            "qwen2" => Architecture::Qwen2,
            other => {
                return Err(cfg_err(
                    path,
                    "model_type",
                    format!("architecture `{other}` is not supported"),
                    Some("supported: llama, mistral, qwen2"),
                ));
            }
        };
        if hf.hidden_act != "silu" {
            return Err(cfg_err(
                path,
                "hidden_act",
                format!("activation `{}` is not supported", hf.hidden_act),
                Some("only `silu` (SwiGLU) is supported"),
            ));
        }
        for (field, v) in [
            ("hidden_size", hf.hidden_size),
            ("intermediate_size", hf.intermediate_size),
            ("num_hidden_layers", hf.num_hidden_layers),
            ("num_attention_heads", hf.num_attention_heads),
            ("vocab_size", hf.vocab_size),
        ] {
            if v == 0 {
                return Err(cfg_err(path, field, "must be positive", None));
            }
        }
        let num_heads = hf.num_attention_heads;
        let num_kv_heads = hf.num_key_value_heads.unwrap_or(num_heads);
        if num_kv_heads == 0 || !num_heads.is_multiple_of(num_kv_heads) {
            return Err(cfg_err(
                path,
                "num_key_value_heads",
                format!("{num_kv_heads} does not divide num_attention_heads = {num_heads}"),
                None,
            ));
        }
        let head_dim = match hf.head_dim {
            Some(d) => d,
            None => {
                if !hf.hidden_size.is_multiple_of(num_heads) {
                    return Err(cfg_err(
                        path,
                        "head_dim",
                        "absent, and hidden_size is not a multiple of num_attention_heads",
                        Some("set head_dim explicitly"),
                    ));
                }
                hf.hidden_size / num_heads
            }
        };
        if !head_dim.is_multiple_of(2) {
            return Err(cfg_err(path, "head_dim", "must be even for RoPE", None));
        }
        let (rope_theta, rope_scaling) = parse_rope(&hf, path)?;
        let (qkv_bias, o_bias) = match arch {
            Architecture::Qwen2 => (true, false),
            _ => (hf.attention_bias, hf.attention_bias),
        };
        let mlp_bias = arch == Architecture::Llama && hf.mlp_bias;
        let sliding_window = match arch {
            Architecture::Mistral => hf.sliding_window,
            Architecture::Qwen2 => {
                if hf.use_sliding_window == Some(true) {
                    return Err(EngineError::unsupported(
                        "Qwen2 with use_sliding_window = true (per-layer sliding windows)",
                        Some("set use_sliding_window to false when sequences fit the window"),
                    ));
                }
                None
            }
            Architecture::Llama => None,
        };
        Ok(Self {
            arch,
            hidden_size: hf.hidden_size,
            intermediate_size: hf.intermediate_size,
            num_layers: hf.num_hidden_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: hf.vocab_size,
            rms_norm_eps: hf.rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: hf.max_position_embeddings,
            tie_word_embeddings: hf.tie_word_embeddings,
            qkv_bias,
            o_bias,
            mlp_bias,
            sliding_window,
            bos_token_id: hf.bos_token_id,
            eos_token_ids: hf
                .eos_token_id
                .as_ref()
                .map(OneOrMany::to_vec)
                .unwrap_or_default(),
            pad_token_id: hf.pad_token_id,
            hf,
        })
    }

    /// Number of parameters (tied embeddings counted once).
    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        let i = self.intermediate_size;
        let mut attn = h * q + 2 * h * kv + q * h;
        if self.qkv_bias {
            attn += q + 2 * kv;
        }
        if self.o_bias {
            attn += h;
        }
        let mut mlp = 3 * h * i;
        if self.mlp_bias {
            mlp += 2 * i + h;
        }
        let layer = attn + mlp + 2 * h;
        let embed = self.vocab_size * h;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        self.num_layers * layer + embed + head + h
    }
}

/// Reads RoPE theta and scaling from either the 4.x or the 5.x fields.
fn parse_rope(hf: &HfConfig, path: &Path) -> Result<(f64, RopeScaling)> {
    let (params, field): (Option<&Map<String, Value>>, &str) = match &hf.rope_parameters {
        Some(Value::Object(m)) => (Some(m), "rope_parameters"),
        Some(Value::Null) | None => match &hf.rope_scaling {
            Some(Value::Object(m)) => (Some(m), "rope_scaling"),
            Some(Value::Null) | None => (None, "rope_scaling"),
            Some(_) => {
                return Err(cfg_err(
                    path,
                    "rope_scaling",
                    "must be an object or null",
                    None,
                ));
            }
        },
        Some(_) => {
            return Err(cfg_err(
                path,
                "rope_parameters",
                "must be an object or null",
                None,
            ));
        }
    };
    let theta = params
        .and_then(|m| num(m, "rope_theta"))
        .or(hf.rope_theta)
        .unwrap_or(10_000.0);
    if theta <= 0.0 {
        return Err(cfg_err(path, "rope_theta", "must be positive", None));
    }
    let Some(m) = params else {
        return Ok((theta, RopeScaling::Default));
    };
    let kind = m
        .get("rope_type")
        .or_else(|| m.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let need = |key: &str| -> Result<f64> {
        num(m, key).ok_or_else(|| {
            cfg_err(
                path,
                &format!("{field}.{key}"),
                format!("missing or not a number (needed by rope_type `{kind}`)"),
                None,
            )
        })
    };
    let scaling = match kind {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear {
            factor: need("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: need("factor")?,
            low_freq_factor: need("low_freq_factor")?,
            high_freq_factor: need("high_freq_factor")?,
            original_max_position_embeddings: need("original_max_position_embeddings")?,
        },
        other => {
            return Err(EngineError::unsupported(
                format!("rope_type `{other}` in {}", PathBuf::from(path).display()),
                Some("supported rope types: default, linear, llama3"),
            ));
        }
    };
    Ok((theta, scaling))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ModelConfig> {
        let p = Path::new("config.json");
        ModelConfig::from_hf(HfConfig::from_json_str(text, p)?, p)
    }

    const BASE: &str = r#""hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100"#;

    #[test]
    fn reads_v4_rope_fields() {
        let c = parse(&format!(
            r#"{{"model_type": "llama", {BASE}, "rope_theta": 500000.0,
            "rope_scaling": {{"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
            "eos_token_id": [1, 2], "tie_word_embeddings": true}}"#
        ))
        .unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 32.0));
        assert_eq!(c.eos_token_ids, vec![1, 2]);
        assert_eq!(c.head_dim, 16);
        assert!(c.tie_word_embeddings);
    }

    #[test]
    fn reads_v5_rope_parameters_and_qwen_bias() {
        let c = parse(&format!(
            r#"{{"model_type": "qwen2", {BASE}, "rope_parameters": {{"rope_theta": 1000000.0,
            "rope_type": "default"}}, "eos_token_id": 7, "head_dim": null}}"#
        ))
        .unwrap();
        assert_eq!(c.rope_theta, 1e6);
        assert_eq!(c.rope_scaling, RopeScaling::Default);
        assert!(c.qkv_bias && !c.o_bias);
        assert_eq!(c.eos_token_ids, vec![7]);
    }

    #[test]
    fn round_trips_unknown_fields() {
        let text =
            format!(r#"{{"model_type": "mistral", {BASE}, "sliding_window": 4096, "foo": [1]}}"#);
        let hf = HfConfig::from_json_str(&text, Path::new("c.json")).unwrap();
        let back = serde_json::to_value(&hf).unwrap();
        assert_eq!(back["foo"], serde_json::json!([1]));
        let c = ModelConfig::from_hf(hf, Path::new("c.json")).unwrap();
        assert_eq!(c.sliding_window, Some(4096));
    }

    #[test]
    fn rejects_bad_values_by_field() {
        let err = parse(&format!(r#"{{"model_type": "gpt2", {BASE}}}"#)).unwrap_err();
        assert!(err.to_string().contains("model_type"), "{err}");
        let err = parse(&format!(
            r#"{{"model_type": "llama", {BASE}, "rope_scaling": {{"rope_type": "llama3", "factor": 8}}}}"#
        ))
        .unwrap_err();
        assert!(
            err.to_string().contains("rope_scaling.low_freq_factor"),
            "{err}"
        );
        let err = parse(r#"{"model_type": "llama", "hidden_size": "x"}"#).unwrap_err();
        assert!(matches!(err, EngineError::Json { line: 1, .. }), "{err}");
        let err = parse(&format!(
            r#"{{"model_type": "llama", {BASE}, "rope_scaling": {{"type": "yarn", "factor": 4}}}}"#
        ))
        .unwrap_err();
        assert!(matches!(err, EngineError::Unsupported { .. }), "{err}");
    }
}
