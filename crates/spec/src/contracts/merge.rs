//! MergeSkill contract (seed 001 §8).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Export format (seed 001 `ExportFormat`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum ExportFormat {
    /// Hugging Face safetensors (vLLM, transformers).
    #[default]
    Safetensors,
    /// GGUF (llama.cpp, Ollama).
    Gguf,
    /// PyTorch `.bin` (legacy).
    Pytorch,
}

/// GGUF tensor type (seed 001 `GGUFQuantization`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum GgufQuantization {
    /// 32-bit floats.
    F32,
    /// 16-bit floats.
    F16,
    /// bfloat16.
    Bf16,
    /// 8-bit blocks of 32.
    Q8_0,
    /// 4-bit k-quants, Q6_K on the tensors llama.cpp's Q4_K_M gives Q6_K.
    #[default]
    Q4KM,
}

/// Input of `merge` (seed 001 `MergeInput`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MergeInput {
    /// Adapter folder (PEFT layout).
    pub adapter_path: String,
    /// Base model folder or hub id.
    pub base_model: String,
    /// Output format.
    #[serde(default)]
    pub output_format: ExportFormat,
    /// GGUF tensor type (GGUF only).
    #[serde(default)]
    pub gguf_quantization: GgufQuantization,
    /// Compare the merged model's logits with base + adapter.
    #[serde(default = "yes")]
    pub validate_after_merge: bool,
    /// Output folder or file (default: beside the adapter).
    #[serde(default)]
    pub output_path: Option<String>,
}

fn yes() -> bool {
    true
}

/// Output `data` of `merge`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MergeOutput {
    /// The merged model folder or exported file.
    pub merged_path: String,
    /// Format written.
    pub output_format: ExportFormat,
    /// Max abs logit difference against base + adapter, when validated.
    pub max_abs_logit_diff: Option<f64>,
}
