//! LoRAConfigSkill contract (seed 001 §3).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::trial::{PeftMethod, SearchSpace, TrialConfig};

/// What the fine-tune is for (seed 001 `task`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// Instruction following (alpaca-style pairs).
    #[default]
    Instruction,
    /// Domain adaptation on raw text.
    Domain,
    /// Multi-turn chat.
    Chat,
    /// Style transfer.
    Style,
}

/// Input of `lora_config` (seed 001 `LoRAConfigInput`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LoRAConfigInput {
    /// Base model: local folder, hub id (offline cache) or a known model name.
    pub base_model: String,
    /// What the fine-tune is for.
    #[serde(default)]
    pub task: Task,
    /// PEFT method.
    #[serde(default)]
    pub method: PeftMethod,
    /// Accelerator memory available, in GB.
    #[serde(default = "default_vram")]
    pub vram_limit_gb: f64,
    /// Output of `dataset_analyze`, as JSON (may be empty).
    #[serde(default)]
    pub dataset_profile: serde_json::Value,
}

fn default_vram() -> f64 {
    24.0
}

/// Memory estimate (seed 001 `memory_estimate`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MemoryEstimate {
    /// Estimated peak accelerator memory in GB.
    pub vram_gb: f64,
    /// Whether it fits in `vram_limit_gb`.
    pub fits: bool,
    /// Parameters of the base model.
    pub model_params: u64,
}

/// Output `data` of `lora_config` (seed 001 §3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LoRAConfigOutput {
    /// Suggested trial with rank, alpha, learning rate and modules.
    pub trial_config: TrialConfig,
    /// HPO ranges for every hyper-parameter.
    pub search_space: SearchSpace,
    /// Memory estimate.
    pub memory_estimate: MemoryEstimate,
}
