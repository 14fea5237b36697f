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
    /// Paused on request (`stop_after_steps`) with a checkpoint to resume from;
    /// not finished, not failed (successive-halving rungs use this).
    Stopped,
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

/// Input of the `training` skill as the trainer reads it: every field of
/// [`TrainingInput`] (so any `TrainingInput` JSON is accepted as is), plus
/// optional knobs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrainingRequest {
    /// The trial to run (its `base_model` names the model folder or hub id).
    pub trial_config: TrialConfig,
    /// Training data (jsonl, json, csv, parquet, or a Hugging Face dataset folder).
    pub dataset_path: String,
    /// Where the adapter, checkpoints and metrics go.
    #[serde(default = "default_output_dir")]
    pub output_dir: String,
    /// A checkpoint folder (`.../checkpoints/checkpoint-N`) to resume from; its
    /// configuration hash must match this run's.
    #[serde(default)]
    pub resume_from: Option<String>,
    /// Plan only: load the data and the model config, report the plan, no training.
    #[serde(default)]
    pub dry_run: bool,
    /// Held-out data for eval every `eval_steps` (and at the end).
    #[serde(default)]
    pub eval_dataset_path: Option<String>,
    /// Without `eval_dataset_path`: hold out this fraction of the training rows
    /// (seeded) when `eval_steps` is set. Default 0.05 (at most 200 rows).
    #[serde(default)]
    pub eval_holdout_fraction: Option<f64>,
    /// Start from this PEFT adapter instead of a fresh one (curriculum, continued training).
    #[serde(default)]
    pub init_adapter: Option<String>,
    /// `auto` (CUDA when present, else CPU), `cpu`, `cuda` or `cuda:N`.
    #[serde(default)]
    pub device: Option<String>,
    /// CPU threads for libtorch (default: libtorch's choice).
    #[serde(default)]
    pub threads: Option<u32>,
    /// Pause after this many optimiser steps of the planned run (status
    /// `stopped`, a checkpoint written); resume later for the exact same trajectory.
    #[serde(default)]
    pub stop_after_steps: Option<u64>,
    /// Checkpoints kept on disk (newest first). Default 2.
    #[serde(default)]
    pub keep_checkpoints: Option<u32>,
}

impl From<TrainingInput> for TrainingRequest {
    fn from(i: TrainingInput) -> Self {
        Self {
            trial_config: i.trial_config,
            dataset_path: i.dataset_path,
            output_dir: i.output_dir,
            resume_from: i.resume_from,
            dry_run: i.dry_run,
            eval_dataset_path: None,
            eval_holdout_fraction: None,
            init_adapter: None,
            device: None,
            threads: None,
            stop_after_steps: None,
            keep_checkpoints: None,
        }
    }
}

/// One evaluation made during training (for pruning by ASHA/successive halving).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct EvalPoint {
    /// Optimiser steps done when it ran.
    pub step: u64,
    /// Mean token loss on the eval set.
    pub eval_loss: f64,
    /// Arg-max next-token accuracy on the eval set.
    pub eval_token_accuracy: f64,
}

/// Output `data` of the `training` skill: the seed's [`TrainingOutput`] fields
/// (flattened, so it decodes as a `TrainingOutput`) plus the run's details.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TrainingReport {
    /// The seed 001 fields.
    #[serde(flatten)]
    pub output: TrainingOutput,
    /// Why the run failed or stopped (divergence, cancellation ...).
    #[serde(default)]
    pub reason: Option<String>,
    /// Steps the full run plans (epochs x steps per epoch, or max_steps).
    pub planned_steps: u64,
    /// Evaluations during training.
    #[serde(default)]
    pub eval_history: Vec<EvalPoint>,
    /// Per-step metrics (loss, lr, grad_norm, tokens_per_s ...), one JSON object a line.
    pub metrics_path: Option<String>,
    /// The newest checkpoint folder (resume_from for the next run).
    pub checkpoint_path: Option<String>,
    /// Peak resident memory of the process in MB (CPU), when measured.
    pub peak_rss_mb: Option<f64>,
    /// Mean training throughput in tokens per second.
    pub tokens_per_s: Option<f64>,
    /// Tokens processed.
    pub tokens_seen: u64,
    /// Samples used for training (after dropping those without trainable tokens).
    pub train_samples: u64,
    /// Samples cut at max_seq_length.
    pub truncated_samples: u64,
    /// Samples dropped because no trainable token was left.
    pub dropped_samples: u64,
    /// Fraction of tokens with loss (completion-only training masks the prompt).
    pub trained_token_fraction: f64,
    /// Padding efficiency of the batches (real tokens / slots).
    pub packing_efficiency: f64,
    /// Trainable parameters (LoRA A and B).
    pub trainable_params: u64,
    /// Device used (`cpu`, `cuda:0`).
    pub device: String,
}
