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
