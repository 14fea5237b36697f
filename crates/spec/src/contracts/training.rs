//! TrainingSkill contract (seed 001 §4).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::trial::TrialConfig;

/// Input of `training` (seed 001 `TrainingInput`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainingInput {
    /// The trial to run.
    pub trial_config: TrialConfig,
    /// Training data.
    pub dataset_path: String,
    /// Where the adapter, checkpoints and metrics go.
    #[serde(default = "default_output_dir")]
    pub output_dir: String,
    /// A checkpoint folder to resume from.
    #[serde(default)]
    pub resume_from: Option<String>,
    /// Plan only: validate and report, no tensors.
    #[serde(default)]
    pub dry_run: bool,
}

fn default_output_dir() -> String {
    "./outputs".into()
}

/// How a training run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TrainingStatus {
    /// Ran to the end.
    Completed,
    /// Planned only.
    DryRun,
    /// Stopped: divergence, error or pruning.
    Failed,
}

/// Output `data` of `training` (seed 001 §4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TrainingOutput {
    /// completed / dry_run / failed.
    pub status: TrainingStatus,
    /// Saved adapter folder (PEFT layout).
    pub adapter_path: Option<String>,
    /// Optimiser steps done.
    pub training_steps: u64,
    /// Device-hours used (GPU-hours on a GPU, CPU-hours on the CPU).
    pub gpu_hours: f64,
    /// Last training loss.
    pub final_loss: Option<f64>,
}
