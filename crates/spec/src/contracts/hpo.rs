//! HPOSkill contract (seed 001 §6).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::trial::{SearchSpace, TrialConfig};

/// Search strategy (seed 001 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Random for the first trials, then bayesian.
    #[default]
    Auto,
    /// Seeded random sampling with a space-filling start.
    Random,
    /// Tree-structured Parzen estimator.
    Bayesian,
    /// Epsilon-greedy / UCB over configurations.
    Bandit,
    /// Successive halving / ASHA over training steps.
    Halving,
}

/// One finished (or pruned) trial as HPO sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TrialRecord {
    /// The trial's configuration.
    pub config: TrialConfig,
    /// The objective (lower is better), none if the trial failed.
    pub objective: Option<f64>,
    /// completed / failed / pruned / running.
    pub status: String,
    /// Device-hours the trial used.
    #[serde(default)]
    pub gpu_hours: f64,
}

/// Input of `hpo` (seed 001 `HPOInput`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HPOInput {
    /// Previous trials.
    #[serde(default)]
    pub trial_history: Vec<TrialRecord>,
    /// Ranges from the config skill.
    #[serde(default)]
    pub search_space: SearchSpace,
    /// Strategy.
    #[serde(default)]
    pub strategy: Strategy,
    /// Device-hours left.
    pub budget_remaining: f64,
    /// Trials left.
    pub trials_remaining: u32,
}

/// A proposed trial with the reason it was chosen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Suggestion {
    /// The configuration to run.
    pub trial_config: TrialConfig,
    /// Why this one.
    pub rationale: String,
}

/// Output `data` of `hpo`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct HPOOutput {
    /// The next trials to run (empty when the budget or trials are spent).
    pub suggestions: Vec<Suggestion>,
    /// The strategy actually used.
    pub strategy_used: Strategy,
}
