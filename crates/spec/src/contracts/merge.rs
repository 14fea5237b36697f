//! MergeSkill contract (seed 001 §8): merge a LoRA adapter into its base model and
//! export safetensors, GGUF or PyTorch `.bin`; optionally combine several adapters
//! first (PEFT `add_weighted_adapter` semantics).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

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
    #[serde(rename = "q4_k_m", alias = "q4_km", alias = "q4km")]
    Q4KM,
}

/// Floating-point type of merged safetensors / `.bin` weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OutputDtype {
    /// float32.
    F32,
    /// float16.
    F16,
    /// bfloat16.
    Bf16,
}

/// PEFT `add_weighted_adapter` combination types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CombinationType {
    /// Weighted sum of A's and of B's (each weighted by sqrt(|w·scale|), sign on A); needs equal ranks.
    Linear,
    /// Concatenation: rank = sum of ranks, exact `Σ w·scale·B·A`.
    Cat,
    /// Exact weighted sum of deltas, re-factored to rank `svd_rank` by SVD.
    Svd,
    /// TIES on A's and B's: magnitude pruning to `density`, sign election, disjoint mean.
    Ties,
    /// DARE on A's and B's: random pruning to `density` with rescaling, then weighted sum.
    DareLinear,
    /// DARE pruning followed by TIES sign election and disjoint mean.
    DareTies,
}

/// Adapters to combine before merging (ensembles; the protocols crate gives the weights).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AdapterCombination {
    /// Adapter folders (PEFT layout), in order.
    pub adapters: Vec<String>,
    /// One weight per adapter (may be negative).
    pub weights: Vec<f64>,
    /// How to combine.
    pub combination_type: CombinationType,
    /// Fraction of values kept by ties / dare_* (0, 1].
    #[serde(default)]
    pub density: Option<f64>,
    /// Rank of the `svd` result (default: the largest input rank).
    #[serde(default)]
    pub svd_rank: Option<usize>,
    /// Seed of the random DARE masks.
    #[serde(default)]
    pub seed: u64,
    /// TIES sign election: `total` (sum of values) or `frequency` (count of signs).
    #[serde(default = "total")]
    pub majority_sign_method: String,
}

fn total() -> String {
    "total".into()
}

/// Input of `merge` (seed 001 `MergeInput`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MergeInput {
    /// Adapter folder (PEFT layout). With `combination`, the folder the combined adapter is written to first.
    pub adapter_path: String,
    /// Base model folder (Hugging Face layout).
    pub base_model: String,
    /// Output format.
    #[serde(default)]
    pub output_format: ExportFormat,
    /// GGUF tensor type (GGUF only).
    #[serde(default)]
    pub gguf_quantization: GgufQuantization,
    /// Compare the merged model with base + adapter after writing it.
    #[serde(default = "yes")]
    pub validate_after_merge: bool,
    /// Output folder (safetensors, pytorch) or file (gguf); default: `<adapter_path>-merged[.gguf]`.
    #[serde(default)]
    pub output_path: Option<String>,
    /// Element type of merged safetensors / `.bin` weights (default: the base's dtype).
    #[serde(default)]
    pub output_dtype: Option<OutputDtype>,
    /// Shard size limit of safetensors / `.bin` output, in MB (transformers' default 5 GB).
    #[serde(default = "shard_mb")]
    pub max_shard_size_mb: u64,
    /// GGUF only: write the adapter alone as a GGUF LoRA (`llama-cli --lora`) instead of a merged model.
    #[serde(default)]
    pub adapter_only: bool,
    /// Combine several adapters first (PEFT `add_weighted_adapter`).
    #[serde(default)]
    pub combination: Option<AdapterCombination>,
    /// Bound of the validation's criterion, overriding the format's default: max |Δlogit| ≤ 1e-4
    /// absolute for f32; max |Δlogit| ≤ bound × max(1, max |logit|) for f16 (1e-2), bf16 (5e-2)
    /// and Q8_0 (0.1); for Q4_K_M the relative RMS logit difference ≤ bound (1.0). Given here, the
    /// f32 bound is also relative to the largest logit.
    #[serde(default)]
    pub validation_tolerance: Option<f64>,
    /// Prompts for the logit validation (default: three short built-in texts).
    #[serde(default)]
    pub validation_prompts: Vec<String>,
}

fn yes() -> bool {
    true
}

impl Default for MergeInput {
    fn default() -> Self {
        Self {
            adapter_path: String::new(),
            base_model: String::new(),
            output_format: ExportFormat::default(),
            gguf_quantization: GgufQuantization::default(),
            validate_after_merge: true,
            output_path: None,
            output_dtype: None,
            max_shard_size_mb: shard_mb(),
            adapter_only: false,
            combination: None,
            validation_tolerance: None,
            validation_prompts: Vec::new(),
        }
    }
}

fn shard_mb() -> u64 {
    5000
}

/// How the merged output was checked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MergeValidation {
    /// What was compared (for example `weights: merged file vs W + s·B·A on probe vectors`).
    pub method: String,
    /// Largest absolute difference seen.
    pub max_abs_diff: f64,
    /// The bound it had to stay under.
    pub tolerance: f64,
    /// Whether it did.
    pub passed: bool,
    /// Logit checks: ‖Δ‖₂ / ‖reference − its mean‖₂ over all positions and
    /// vocabulary entries, the criterion of 4-bit formats (whose largest single
    /// difference is not informative); none for the weight check.
    #[serde(default)]
    pub relative_rms_diff: Option<f64>,
    /// Logit checks: the share of positions whose arg-max token is the reference's.
    #[serde(default)]
    pub top1_agreement: Option<f64>,
}

/// Output `data` of `merge`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
pub struct MergeOutput {
    /// The merged model folder or exported file.
    pub merged_path: String,
    /// Format written.
    pub output_format: ExportFormat,
    /// Max abs difference against base + adapter, when validated.
    pub max_abs_logit_diff: Option<f64>,
    /// Files written.
    #[serde(default)]
    pub files: Vec<String>,
    /// Total bytes written.
    #[serde(default)]
    pub output_bytes: u64,
    /// Weights changed by the adapter.
    #[serde(default)]
    pub adapted_tensors: usize,
    /// Tensors written.
    #[serde(default)]
    pub tensors: usize,
    /// GGUF: tensors per ggml type.
    #[serde(default)]
    pub gguf_types: BTreeMap<String, usize>,
    /// The validation, when run.
    #[serde(default)]
    pub validation: Option<MergeValidation>,
    /// Wall time of the merge and export, seconds.
    #[serde(default)]
    pub elapsed_s: f64,
    /// Things the user should know (tokenizer padding, missing chat template…).
    #[serde(default)]
    pub warnings: Vec<String>,
}
