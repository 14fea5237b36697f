//! EvalSkill contract (seed 001 §5).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Input of `eval` (seed 001 `EvalInput`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EvalInput {
    /// Adapter folder (PEFT layout); none evaluates the base alone.
    #[serde(default)]
    pub adapter_path: Option<String>,
    /// Base model folder or hub id.
    pub base_model: String,
    /// Held-out data.
    pub eval_dataset_path: String,
    /// Report perplexity.
    #[serde(default = "yes")]
    pub compute_perplexity: bool,
    /// Also measure the base (adapter switched off) and report the delta.
    #[serde(default = "yes")]
    pub compute_delta: bool,
}

fn yes() -> bool {
    true
}

/// Output `data` of `eval` (seed 001 §5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct EvalOutput {
    /// Mean token loss with the adapter.
    pub eval_loss: f64,
    /// exp(eval_loss).
    pub eval_perplexity: f64,
    /// Mean token loss of the base model.
    pub base_loss: Option<f64>,
    /// eval_loss - base_loss (negative is better).
    pub delta_vs_base_loss: Option<f64>,
}

/// Input of the `eval` skill as the evaluator reads it: every field of
/// [`EvalInput`] (any `EvalInput` JSON is accepted as is), plus optional knobs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EvalRequest {
    /// Adapter folder (PEFT layout); none evaluates the base alone.
    #[serde(default)]
    pub adapter_path: Option<String>,
    /// Base model folder.
    pub base_model: String,
    /// Held-out data (jsonl, json, csv, parquet, Hugging Face folder).
    pub eval_dataset_path: String,
    /// Report perplexity.
    #[serde(default = "yes")]
    pub compute_perplexity: bool,
    /// Also measure the base (adapter switched off, not reloaded) and report the delta.
    #[serde(default = "yes")]
    pub compute_delta: bool,
    /// Prompt template (`auto`, `alpaca`, `chatml`, `llama3`, `model`). Default `auto`.
    #[serde(default)]
    pub prompt_template: Option<String>,
    /// Truncation length in tokens. Default 1024.
    #[serde(default)]
    pub max_seq_length: Option<u32>,
    /// Rows evaluated (the first N). Default: all.
    #[serde(default)]
    pub max_samples: Option<u64>,
    /// Sequences per forward pass. Default 8.
    #[serde(default)]
    pub batch_size: Option<u32>,
    /// Generate completions for the first N samples (greedy unless `temperature` > 0)
    /// with the KV cache and score exact match against the references. Default 0.
    #[serde(default)]
    pub generate_samples: Option<u32>,
    /// New tokens per generated completion. Default 128.
    #[serde(default)]
    pub max_new_tokens: Option<u32>,
    /// Sampling temperature (0 or absent: greedy).
    #[serde(default)]
    pub temperature: Option<f64>,
    /// Nucleus sampling threshold.
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Sampling seed.
    #[serde(default)]
    pub seed: Option<u64>,
    /// `auto`, `cpu`, `cuda`, `cuda:N`.
    #[serde(default)]
    pub device: Option<String>,
    /// CPU threads for libtorch.
    #[serde(default)]
    pub threads: Option<u32>,
    /// Also report each row's mean token loss (`sample_losses`), in file order:
    /// the difficulty score of a loss-based curriculum.
    #[serde(default)]
    pub per_sample: bool,
}

impl From<EvalInput> for EvalRequest {
    fn from(i: EvalInput) -> Self {
        Self {
            adapter_path: i.adapter_path,
            base_model: i.base_model,
            eval_dataset_path: i.eval_dataset_path,
            compute_perplexity: i.compute_perplexity,
            compute_delta: i.compute_delta,
            prompt_template: None,
            max_seq_length: None,
            max_samples: None,
            batch_size: None,
            generate_samples: None,
            max_new_tokens: None,
            temperature: None,
            top_p: None,
            seed: None,
            device: None,
            threads: None,
            per_sample: false,
        }
    }
}

/// One generated completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct GeneratedSample {
    /// Row number (0-based) in the eval set.
    pub index: u64,
    /// The generated text (stop token removed, trimmed).
    pub completion: String,
    /// The reference completion.
    pub reference: String,
    /// Whether they match after trimming whitespace.
    pub exact_match: bool,
}

/// Output `data` of the `eval` skill: the seed's [`EvalOutput`] fields
/// (flattened, so it decodes as an `EvalOutput`) plus accuracy and generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct EvalReport {
    /// The seed 001 fields.
    #[serde(flatten)]
    pub output: EvalOutput,
    /// exp(base_loss).
    pub base_perplexity: Option<f64>,
    /// Arg-max next-token accuracy on the trained (completion) tokens.
    pub token_accuracy: f64,
    /// The same for the base model.
    pub base_token_accuracy: Option<f64>,
    /// Fraction of generated completions equal to the reference (when generating).
    pub exact_match: Option<f64>,
    /// Samples evaluated.
    pub samples: u64,
    /// Target tokens scored.
    pub tokens: u64,
    /// Generated completions (when `generate_samples` > 0).
    #[serde(default)]
    pub generations: Vec<GeneratedSample>,
    /// Generation speed in new tokens per second.
    pub generation_tokens_per_s: Option<f64>,
    /// Device used.
    pub device: String,
    /// With `per_sample`: each evaluated row's mean token loss (nats) under the
    /// evaluated model, in file order; `null` for a row with no target token.
    #[serde(default)]
    pub sample_losses: Option<Vec<Option<f64>>>,
}
