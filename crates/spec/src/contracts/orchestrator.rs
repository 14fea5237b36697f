//! LoRATrainerSkill contract (seed 001 §1): the orchestrator's input and the
//! experiment state it returns.
//!
//! Seed names are kept (`experiment`, `dry_run`, `max_loop_iterations`,
//! `auto_merge`, `merge_format`; `trial_history`, `best_trial`, `budget`);
//! the rest is added: why the loop stopped, the planned trials of a dry run,
//! the per-trial details (evaluation, artifact version, adapter path) and the
//! results of the ablation, curriculum and ensemble protocols.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::contracts::artifact::ArtifactStoreOutput;
use crate::contracts::eval::EvalOutput;
use crate::contracts::hpo::TrialRecord;
use crate::contracts::merge::ExportFormat;
use crate::experiment::ExperimentSpec;

/// Input of `lora_trainer` (seed 001 `LoRATrainerInput`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LoRATrainerInput {
    /// The experiment.
    pub experiment: ExperimentSpec,
    /// The whole flow with no tensors: preflight, planned trials, budget forecast.
    #[serde(default)]
    pub dry_run: bool,
    /// Hard cap on loop iterations (suggest, train, eval, store).
    #[serde(default = "default_iterations")]
    pub max_loop_iterations: u32,
    /// Merge the best adapter at the end.
    #[serde(default = "yes")]
    pub auto_merge: bool,
    /// Format of the merged model (`experiment.output.export_format` wins when it is not the default).
    #[serde(default)]
    pub merge_format: ExportFormat,
    /// Continue the experiment recorded in the experiment folder's journal
    /// (finished trials are not redone; an interrupted trial resumes from its checkpoint).
    #[serde(default)]
    pub resume: bool,
    /// The experiment folder (default: `experiment.output.dir/experiment.experiment_name`).
    #[serde(default)]
    pub experiment_dir: Option<String>,
}

fn default_iterations() -> u32 {
    20
}

fn yes() -> bool {
    true
}

/// Budget accounting.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
pub struct BudgetState {
    /// Device-hours allowed.
    pub budget_gpu_hours: f64,
    /// Device-hours used.
    pub gpu_hours_used: f64,
    /// Dollars allowed, when set.
    pub budget_dollars: Option<f64>,
    /// Dollars spent, when costs are known.
    pub dollars_used: Option<f64>,
    /// Device-hours predicted for the trials of a dry run (or for the trial not started).
    #[serde(default)]
    pub gpu_hours_forecast: f64,
    /// Dollars per device-hour used for costs, when the spec has a cost table.
    #[serde(default)]
    pub dollars_per_device_hour: Option<f64>,
}

impl BudgetState {
    /// Device-hours left (never negative).
    pub fn gpu_hours_left(&self) -> f64 {
        (self.budget_gpu_hours - self.gpu_hours_used).max(0.0)
    }

    /// Dollars left, when a dollar budget is set.
    pub fn dollars_left(&self) -> Option<f64> {
        self.budget_dollars
            .map(|b| (b - self.dollars_used.unwrap_or(0.0)).max(0.0))
    }
}

/// Why the trial loop stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The best `stop_metric` reached `stop_threshold`.
    ThresholdReached,
    /// `stop_patience` trials in a row did not improve the best.
    PatienceExhausted,
    /// Trials diverged (loss above `early_stop_loss`, NaN or Inf) twice in a row.
    Diverged,
    /// `max_trials` trials ran.
    MaxTrials,
    /// `max_loop_iterations` iterations ran.
    MaxLoopIterations,
    /// The next trial's predicted cost exceeds what is left of the budget (device-hours or dollars).
    BudgetExhausted,
    /// The search strategy has nothing left to propose.
    SearchExhausted,
    /// The protocol ran every trial it planned (ablation points, curriculum stages, ensemble members).
    PlanCompleted,
    /// A dry run planned the trials and stopped.
    DryRun,
    /// The caller cancelled (Ctrl-C); the experiment can be resumed.
    Cancelled,
}

impl StopReason {
    /// The reason's `snake_case` name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ThresholdReached => "threshold_reached",
            Self::PatienceExhausted => "patience_exhausted",
            Self::Diverged => "diverged",
            Self::MaxTrials => "max_trials",
            Self::MaxLoopIterations => "max_loop_iterations",
            Self::BudgetExhausted => "budget_exhausted",
            Self::SearchExhausted => "search_exhausted",
            Self::PlanCompleted => "plan_completed",
            Self::DryRun => "dry_run",
            Self::Cancelled => "cancelled",
        }
    }
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a trial is within its protocol.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TrialRole {
    /// A trial proposed by the search strategy.
    #[default]
    Search,
    /// One point of an ablation: the values of the varied parameters.
    Ablation {
        /// The varied parameters and their values in this trial (`lora_rank` = 8).
        values: serde_json::Map<String, serde_json::Value>,
        /// Whether this is the baseline (the base config unchanged).
        #[serde(default)]
        baseline: bool,
    },
    /// A curriculum stage (starts from the previous stage's adapter).
    Stage {
        /// 0-based stage index.
        index: u32,
        /// Stage name (`easy`, `hard`).
        name: String,
        /// The stage's data.
        dataset_path: String,
    },
    /// An ensemble member.
    Member {
        /// 0-based member index.
        index: u32,
    },
    /// The combined ensemble adapter (evaluated, not trained).
    Ensemble,
}

/// One trial of the experiment: HPO's record plus what the orchestrator knows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TrialSummary {
    /// The HPO view: config, objective, status (planned / running / completed / failed / pruned), device-hours.
    #[serde(flatten)]
    pub record: TrialRecord,
    /// Trial number (also `config.trial_id`).
    pub trial_id: u32,
    /// The trial's place in its protocol.
    #[serde(default)]
    pub role: TrialRole,
    /// Why the strategy or protocol proposed it.
    #[serde(default)]
    pub rationale: String,
    /// Device-hours predicted before it started.
    #[serde(default)]
    pub predicted_gpu_hours: Option<f64>,
    /// Optimiser steps done.
    #[serde(default)]
    pub training_steps: u64,
    /// Last training loss.
    #[serde(default)]
    pub final_loss: Option<f64>,
    /// Evaluation on the held-out data.
    #[serde(default)]
    pub eval: Option<EvalOutput>,
    /// The trained adapter (PEFT layout).
    #[serde(default)]
    pub adapter_path: Option<String>,
    /// The trial's folder (checkpoints, metrics.jsonl).
    #[serde(default)]
    pub output_dir: Option<String>,
    /// The stored artifact (version, hash, path).
    #[serde(default)]
    pub artifact: Option<ArtifactStoreOutput>,
    /// Why it failed or was pruned.
    #[serde(default)]
    pub failure: Option<String>,
    /// Whether the failure was a divergence (loss above `early_stop_loss`, NaN or Inf).
    #[serde(default)]
    pub diverged: bool,
    /// Dollars it cost, when costs are known.
    #[serde(default)]
    pub dollars: Option<f64>,
    /// How many times it was resumed from a checkpoint after an interruption.
    #[serde(default)]
    pub resumed: u32,
}

/// One row of an ablation's comparison table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AblationRow {
    /// Trial.
    pub trial_id: u32,
    /// The varied parameters' values, as text (`lora_rank=8`).
    pub label: String,
    /// The metric (none if the trial failed).
    pub metric: Option<f64>,
    /// metric - baseline metric.
    pub delta_vs_baseline: Option<f64>,
    /// Whether this is the baseline.
    pub baseline: bool,
}

/// Ablation result: the comparison table, the best value and the plot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
pub struct AblationResult {
    /// The metric compared (the spec's `stop_metric`).
    pub metric: String,
    /// One row per trial, in trial order.
    pub rows: Vec<AblationRow>,
    /// Label of the best row.
    pub best: Option<String>,
    /// SVG plot of the metric against the value.
    pub plot_path: Option<String>,
}

/// Ensemble result: member weights, the combined adapter and its evaluation against the best member.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
pub struct EnsembleResult {
    /// Member trial ids, in order.
    pub members: Vec<u32>,
    /// Normalised weights, one per member.
    pub weights: Vec<f64>,
    /// The combined adapter.
    pub combined_adapter: Option<String>,
    /// The combined adapter's metric.
    pub ensemble_metric: Option<f64>,
    /// The best single member's trial id and metric.
    pub best_member: Option<u32>,
    /// The best single member's metric.
    pub best_member_metric: Option<f64>,
}

/// One held-out prompt answered by the base model and by the fine-tuned one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SampleComparison {
    /// Row of the held-out data.
    pub index: u64,
    /// The prompt (the row's instruction / prompt / question), when readable.
    pub prompt: Option<String>,
    /// The reference answer.
    pub reference: String,
    /// The base model's completion.
    pub before: String,
    /// The fine-tuned model's completion.
    pub after: String,
}

/// `ExperimentState` (seed 001): what the orchestrator returns as `data`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
pub struct ExperimentState {
    /// Every trial, in order.
    pub trial_history: Vec<TrialSummary>,
    /// The best trial so far (lowest `stop_metric` among completed trials).
    pub best_trial: Option<TrialSummary>,
    /// Budget accounting.
    pub budget: BudgetState,
    /// Why the loop stopped.
    pub stop_reason: Option<StopReason>,
    /// The stop reason in words ("eval_loss 0.29 <= stop_threshold 0.3 at trial 4").
    #[serde(default)]
    pub stop_message: Option<String>,
    /// The experiment folder (journal, trials, reports).
    #[serde(default)]
    pub experiment_dir: Option<String>,
    /// Trial-loop iterations done.
    #[serde(default)]
    pub iterations: u32,
    /// Base model loss on the held-out data (adapter off).
    #[serde(default)]
    pub base_loss: Option<f64>,
    /// The merged or exported model, when merged.
    #[serde(default)]
    pub merged_path: Option<String>,
    /// Ablation comparison (protocol ablation).
    #[serde(default)]
    pub ablation: Option<AblationResult>,
    /// Ensemble result (protocol ensemble).
    #[serde(default)]
    pub ensemble: Option<EnsembleResult>,
    /// Before/after generations on held-out prompts (base vs the merged adapter).
    #[serde(default)]
    pub samples: Vec<SampleComparison>,
    /// Reports written (markdown, HTML, SVG plots, state JSON).
    #[serde(default)]
    pub reports: Vec<String>,
    /// Whether the experiment ran to its end (false after Ctrl-C or in a dry run).
    #[serde(default)]
    pub finished: bool,
}
