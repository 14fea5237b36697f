//! HPOSkill contract (seed 001 §6).
//!
//! Seed names are kept (`trial_history`, `search_space`, `strategy`,
//! `budget_remaining`, `trials_remaining`); added: the base config the
//! proposals are built from, the seed, intermediate eval results and the
//! pruned status of trials, the ASHA rung tables (input and output, so a
//! caller can persist them), per-trial decisions (continue / stop / promote)
//! and the predicted cost of every suggestion.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::trial::{SearchSpace, TrialConfig};

/// Search strategy (seed 001 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Random (space-filling) for the first `n_startup_trials` trials, then bayesian.
    #[default]
    Auto,
    /// Seeded random sampling with a space-filling (Latin hypercube) start.
    Random,
    /// Tree-structured Parzen estimator.
    Bayesian,
    /// Epsilon-greedy (80% exploit / 20% explore) or UCB.
    Bandit,
    /// Successive halving / ASHA over training steps.
    Halving,
}

impl Strategy {
    /// The strategy's `snake_case` name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Random => "random",
            Self::Bayesian => "bayesian",
            Self::Bandit => "bandit",
            Self::Halving => "halving",
        }
    }
}

/// The status of a trial as HPO reads it (`TrialRecord::status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TrialStatus {
    /// Planned but not started (a dry run): treated like `running`.
    Planned,
    /// Started, not finished: its config is taken (never proposed again) and
    /// it counts as a bad point for TPE (constant liar), so parallel workers diverge.
    Running,
    /// Finished with an objective.
    Completed,
    /// Stopped early by the halving strategy (or a pruner): ranked by how far it
    /// got and its last intermediate value; ASHA may promote it later.
    Pruned,
    /// Crashed or diverged: its region counts as bad for TPE.
    Failed,
}

impl TrialStatus {
    /// Parses the status string of a [`TrialRecord`] (case-insensitive;
    /// `complete`/`done` and `stopped`/`paused` are accepted as synonyms).
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "planned" | "pending" | "queued" => Some(Self::Planned),
            "running" | "started" => Some(Self::Running),
            "completed" | "complete" | "done" | "finished" | "succeeded" => Some(Self::Completed),
            "pruned" | "stopped" | "paused" => Some(Self::Pruned),
            "failed" | "diverged" | "error" | "cancelled" => Some(Self::Failed),
            _ => None,
        }
    }

    /// The canonical name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Planned => "planned",
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Pruned => "pruned",
            Self::Failed => "failed",
        }
    }
}

/// One intermediate evaluation of a trial (eval loss after `step` optimiser steps).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct IntermediateValue {
    /// Optimiser steps done when it was measured.
    pub step: u64,
    /// The objective at that point (eval loss; lower is better).
    pub value: f64,
}

/// One finished, running or pruned trial as HPO sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
pub struct TrialRecord {
    /// The trial's configuration (`config.trial_id` identifies it).
    pub config: TrialConfig,
    /// The objective (lower is better), none if the trial failed or has not finished.
    pub objective: Option<f64>,
    /// planned / running / completed / pruned / failed (see [`TrialStatus`]).
    pub status: String,
    /// Device-hours the trial used (so far, for running and pruned trials).
    #[serde(default)]
    pub gpu_hours: f64,
    /// Intermediate eval results in step order (the halving strategy's input).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub intermediate: Vec<IntermediateValue>,
}

/// Which bandit rule `strategy: bandit` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum BanditPolicy {
    /// With probability 1 - epsilon perturb the best config, else sample at random (seed: 80/20).
    #[default]
    EpsilonGreedy,
    /// UCB1 over the rank choices (the arms); the config within an arm is a
    /// perturbation of the arm's best (random while the arm is unplayed).
    Ucb,
}

/// Settings of the bayesian (TPE) strategy; every field has Optuna's default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct TpeSettings {
    /// Fraction of trials in the good set: `n_good = min(ceil(gamma * n), 25)`.
    pub gamma: f64,
    /// Candidates drawn from the good density and scored by l(x)/g(x).
    pub n_ei_candidates: u32,
    /// Joint (product-kernel) densities, which capture couplings such as lr x alpha/rank.
    /// Off by default: on the benchmark's tuning tasks the independent (per-parameter)
    /// densities reached lower regret at 20 and 40 trials (docs/BENCHMARKS.md, "HPO").
    pub multivariate: bool,
    /// Weight of the prior kernel (uniform over the space) in each density.
    pub prior_weight: f64,
}

impl Default for TpeSettings {
    fn default() -> Self {
        Self {
            gamma: 0.1,
            n_ei_candidates: 24,
            multivariate: false,
            prior_weight: 1.0,
        }
    }
}

/// Settings of the halving (ASHA) strategy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct HalvingSettings {
    /// Steps of the first rung (0: `max_resource / reduction_factor^2`, i.e. 1/9 of the run).
    pub min_resource: u64,
    /// Steps of a full trial (0: the base config's `max_steps`, else the longest
    /// intermediate step seen in the history).
    pub max_resource: u64,
    /// Keep the top 1/eta of each rung (eta).
    pub reduction_factor: u32,
    /// How new trials are sampled: `random` (ASHA) or `bayesian` (TPE, BOHB-like).
    pub sampler: Strategy,
}

impl Default for HalvingSettings {
    fn default() -> Self {
        Self {
            min_resource: 0,
            max_resource: 0,
            reduction_factor: 3,
            sampler: Strategy::Random,
        }
    }
}

/// Input of `hpo` (seed 001 `HPOInput`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HPOInput {
    /// Previous trials (completed, pruned, failed, and running ones).
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
    /// The config suggestions are built from (fields outside the search space are kept).
    #[serde(default)]
    pub base_config: TrialConfig,
    /// Seed of the search (none: `base_config.seed`); the same seed and history give the same suggestions.
    #[serde(default)]
    pub seed: Option<u64>,
    /// How many trials to propose at once (parallel workers; each sees the others as running).
    #[serde(default = "one")]
    pub n_suggestions: u32,
    /// Random (space-filling) trials before TPE starts (none: `clamp(ceil(total / 5), 3, 8)`,
    /// where total = finished trials + trials_remaining).
    #[serde(default)]
    pub n_startup_trials: Option<u32>,
    /// Bandit rule (strategy bandit).
    #[serde(default)]
    pub bandit_policy: BanditPolicy,
    /// Exploration probability of epsilon-greedy (seed: 0.2).
    #[serde(default = "default_epsilon")]
    pub epsilon: f64,
    /// UCB exploration constant.
    #[serde(default = "default_ucb_c")]
    pub ucb_c: f64,
    /// TPE settings (strategies bayesian, auto, and halving with sampler bayesian).
    #[serde(default)]
    pub tpe: TpeSettings,
    /// ASHA settings (strategy halving).
    #[serde(default)]
    pub halving: HalvingSettings,
    /// The rung tables returned by the previous call (persisted by the caller):
    /// values recorded there are kept even if the history no longer carries them.
    #[serde(default)]
    pub halving_state: Option<HalvingState>,
}

fn one() -> u32 {
    1
}
fn default_epsilon() -> f64 {
    0.2
}
fn default_ucb_c() -> f64 {
    1.0
}

impl Default for HPOInput {
    fn default() -> Self {
        Self {
            trial_history: Vec::new(),
            search_space: SearchSpace::default(),
            strategy: Strategy::default(),
            budget_remaining: f64::INFINITY,
            trials_remaining: 1,
            base_config: TrialConfig::default(),
            seed: None,
            n_suggestions: 1,
            n_startup_trials: None,
            bandit_policy: BanditPolicy::default(),
            epsilon: default_epsilon(),
            ucb_c: default_ucb_c(),
            tpe: TpeSettings::default(),
            halving: HalvingSettings::default(),
            halving_state: None,
        }
    }
}

/// A proposed trial with the reason it was chosen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Suggestion {
    /// The configuration to run (`trial_id` = next free id, `seed` derived from the search seed).
    pub trial_config: TrialConfig,
    /// Why this one.
    pub rationale: String,
    /// The strategy that produced it (`random` during the startup of `auto`).
    #[serde(default)]
    pub strategy: Strategy,
    /// Device-hours predicted from the history (none before any trial finished).
    #[serde(default)]
    pub predicted_gpu_hours: Option<f64>,
    /// Halving: stop and report at this step (the first rung); none: run to the end.
    #[serde(default)]
    pub stop_at_step: Option<u64>,
}

/// What the halving strategy says about a trial that is not completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DecisionAction {
    /// A running trial goes on to its next rung.
    Continue,
    /// A running trial stops here (it becomes `pruned`; it may be promoted later).
    Stop,
    /// A pruned trial resumes from its checkpoint and runs to the next rung.
    Promote,
}

/// A decision about one running or pruned trial.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TrialDecision {
    /// The trial.
    pub trial_id: u32,
    /// What to do.
    pub action: DecisionAction,
    /// The rung whose result decided it (0-based).
    pub rung: u32,
    /// Run until this step (continue / promote): the next rung's resource.
    #[serde(default)]
    pub run_until_step: Option<u64>,
    /// Why.
    pub rationale: String,
}

/// One result recorded at a rung.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RungEntry {
    /// The trial.
    pub trial_id: u32,
    /// Its intermediate value at (or first after) the rung's step.
    pub value: f64,
    /// Whether it was promoted to (or continued into) the next rung.
    pub promoted: bool,
}

/// One rung of ASHA.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Rung {
    /// 0-based rung index.
    pub index: u32,
    /// Steps a trial has done when it is compared at this rung.
    pub resource: u64,
    /// Every value recorded here, including those of pruned trials, in trial order.
    pub entries: Vec<RungEntry>,
}

/// The ASHA state: the rung tables (persist it and pass it back as `halving_state`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
pub struct HalvingState {
    /// eta.
    pub reduction_factor: u32,
    /// Steps of the first rung.
    pub min_resource: u64,
    /// Steps of a full trial.
    pub max_resource: u64,
    /// The rungs, lowest first.
    pub rungs: Vec<Rung>,
}

/// Output `data` of `hpo`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct HPOOutput {
    /// The next trials to run (empty when the budget, the trials or the space are spent).
    pub suggestions: Vec<Suggestion>,
    /// The strategy actually used.
    pub strategy_used: Strategy,
    /// Halving: what to do with running and pruned trials (promotions first).
    #[serde(default)]
    pub decisions: Vec<TrialDecision>,
    /// Halving: the rung tables after this call.
    #[serde(default)]
    pub halving_state: Option<HalvingState>,
    /// Why fewer suggestions than asked were returned, if so.
    #[serde(default)]
    pub exhausted_reason: Option<String>,
    /// The search seed used.
    #[serde(default)]
    pub seed: u64,
    /// Startup trials of auto / bayesian before TPE takes over.
    #[serde(default)]
    pub n_startup_trials: u32,
}
