//! LoRATrainerSkill contract (seed 001 §1): the orchestrator's input and the
//! experiment state it returns.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

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
    /// Format of the merged model.
    #[serde(default)]
    pub merge_format: ExportFormat,
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
}

/// `ExperimentState` (seed 001): what the orchestrator returns as `data`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
pub struct ExperimentState {
    /// Every trial, in order.
    pub trial_history: Vec<TrialRecord>,
    /// The best trial so far.
    pub best_trial: Option<TrialRecord>,
    /// Budget accounting.
    pub budget: BudgetState,
    /// Why the loop stopped.
    pub stop_reason: Option<String>,
}
