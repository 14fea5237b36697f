//! The experiment's state as a pure function of its journal events.
//!
//! The runner changes state only by recording an event, and a resumed run
//! rebuilds the same state by applying the recorded events in order, so the
//! two can never disagree.

use std::collections::BTreeMap;

use lora_spec::contracts::config::{LoRAConfigOutput, PreflightReport};
use lora_spec::contracts::dataset::DatasetProfile;
use lora_spec::contracts::merge::MergeOutput;
use lora_spec::contracts::orchestrator::{
    AblationResult, BudgetState, EnsembleResult, ExperimentState, SampleComparison, StopReason,
    TrialRole, TrialSummary,
};

use crate::journal::Event;

/// Where a trial is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// Chosen, not started.
    Planned,
    /// Training started and did not report back (interrupted if the run is over).
    Training,
    /// Trained, not evaluated.
    Trained,
    /// Evaluated, not stored.
    Evaluated,
    /// Stored, not closed.
    Stored,
    /// Over.
    Done,
}

/// The state of an experiment.
#[derive(Debug, Clone, Default)]
pub struct Ledger {
    /// Step 1 result.
    pub profile: Option<DatasetProfile>,
    /// Training data.
    pub train_path: Option<String>,
    /// Held-out data.
    pub eval_path: Option<String>,
    /// Step 2 result.
    pub config: Option<LoRAConfigOutput>,
    /// Preflight warnings.
    pub warnings: Vec<String>,
    /// The preflight report.
    pub preflight: Option<PreflightReport>,
    /// Every trial, in order.
    pub trials: Vec<TrialSummary>,
    /// Stage of each trial.
    pub stages: BTreeMap<u32, Stage>,
    /// Trial-loop iterations.
    pub iterations: u32,
    /// Base loss (adapter off) on the held-out data.
    pub base_loss: Option<f64>,
    /// Why the loop stopped.
    pub stop: Option<(StopReason, String)>,
    /// Ablation table.
    pub ablation: Option<AblationResult>,
    /// Ensemble result.
    pub ensemble: Option<EnsembleResult>,
    /// Merge in progress (adapter, output path).
    pub merge_started: Option<(String, String)>,
    /// Merge result.
    pub merged: Option<MergeOutput>,
    /// Before/after generations.
    pub samples: Option<Vec<SampleComparison>>,
    /// Whether everything is done.
    pub finished: bool,
    /// Budget (used amounts are recomputed from the trials).
    pub budget: BudgetState,
    /// Whether the best trial is the last one (curriculum: the final stage is the product).
    pub best_is_last: bool,
}

impl Ledger {
    /// An empty ledger with the budget limits set.
    pub fn new(budget: BudgetState, best_is_last: bool) -> Self {
        Self {
            budget,
            best_is_last,
            ..Self::default()
        }
    }

    /// The trial `id`.
    pub fn trial(&self, id: u32) -> Option<&TrialSummary> {
        self.trials.iter().find(|t| t.trial_id == id)
    }

    fn trial_mut(&mut self, id: u32) -> Option<&mut TrialSummary> {
        self.trials.iter_mut().find(|t| t.trial_id == id)
    }

    /// The stage of trial `id`.
    pub fn stage(&self, id: u32) -> Option<Stage> {
        self.stages.get(&id).copied()
    }

    /// The first trial that is not over (an interrupted or planned trial).
    pub fn unfinished(&self) -> Option<u32> {
        self.trials
            .iter()
            .map(|t| t.trial_id)
            .find(|id| self.stage(*id) != Some(Stage::Done))
    }

    /// Trials that are over, in order.
    pub fn finished_trials(&self) -> impl Iterator<Item = &TrialSummary> {
        self.trials
            .iter()
            .filter(|t| self.stage(t.trial_id) == Some(Stage::Done))
    }

    /// The next trial id.
    pub fn next_id(&self) -> u32 {
        self.trials.iter().map(|t| t.trial_id).max().unwrap_or(0) + 1
    }

    /// The best trial: the lowest objective among completed trials (ties: the
    /// earlier trial), or the last completed trial when `best_is_last`.
    pub fn best(&self) -> Option<&TrialSummary> {
        let completed = self
            .finished_trials()
            .filter(|t| t.record.status == "completed" && t.record.objective.is_some());
        if self.best_is_last {
            return completed
                .filter(|t| !matches!(t.role, TrialRole::Ensemble))
                .last();
        }
        completed.fold(None, |best: Option<&TrialSummary>, t| match best {
            Some(b) if b.record.objective <= t.record.objective => Some(b),
            _ => Some(t),
        })
    }

    /// Device-hours used so far.
    pub fn gpu_hours_used(&self) -> f64 {
        self.trials.iter().map(|t| t.record.gpu_hours).sum()
    }

    /// The budget with the used amounts filled in.
    pub fn budget_now(&self) -> BudgetState {
        let mut b = self.budget.clone();
        b.gpu_hours_used = self.gpu_hours_used();
        b.dollars_used = b.dollars_per_device_hour.map(|r| r * b.gpu_hours_used);
        b
    }

    /// Applies one event.
    pub fn apply(&mut self, event: &Event) {
        match event {
            Event::Started | Event::Resumed => {}
            Event::Profiled { profile } => self.profile = Some((**profile).clone()),
            Event::DataReady {
                train_path,
                eval_path,
            } => {
                self.train_path = Some(train_path.clone());
                self.eval_path = Some(eval_path.clone());
            }
            Event::Configured {
                config,
                warnings,
                preflight,
            } => {
                self.config = Some((**config).clone());
                self.warnings = warnings.clone();
                self.preflight = preflight.as_deref().cloned();
            }
            Event::Planned { trial } => {
                let mut t = (**trial).clone();
                t.record.status = "planned".into();
                self.stages.insert(t.trial_id, Stage::Planned);
                self.trials.push(t);
                self.iterations += 1;
            }
            Event::TrainingStarted {
                trial_id,
                output_dir,
                resume_from,
            } => {
                let was_started = self.stage(*trial_id) == Some(Stage::Training);
                if let Some(t) = self.trial_mut(*trial_id) {
                    t.record.status = "running".into();
                    t.output_dir = Some(output_dir.clone());
                    if was_started || resume_from.is_some() {
                        t.resumed += 1;
                    }
                }
                self.stages.insert(*trial_id, Stage::Training);
            }
            Event::Trained { trial_id, output } => {
                let rate = self.budget.dollars_per_device_hour;
                if let Some(t) = self.trial_mut(*trial_id) {
                    t.training_steps = output.training_steps;
                    t.record.gpu_hours = output.gpu_hours;
                    t.final_loss = output.final_loss;
                    t.adapter_path = output.adapter_path.clone();
                    t.dollars = rate.map(|r| r * output.gpu_hours);
                }
                self.stages.insert(*trial_id, Stage::Trained);
            }
            Event::Evaluated { trial_id, output } => {
                if let Some(b) = output.base_loss {
                    self.base_loss.get_or_insert(b);
                }
                let base = self.base_loss;
                if let Some(t) = self.trial_mut(*trial_id) {
                    let mut e = output.clone();
                    if e.base_loss.is_none() {
                        e.base_loss = base;
                    }
                    if e.delta_vs_base_loss.is_none() {
                        e.delta_vs_base_loss = e.base_loss.map(|b| e.eval_loss - b);
                    }
                    t.eval = Some(e);
                }
                self.stages.insert(*trial_id, Stage::Evaluated);
            }
            Event::Stored { trial_id, output } => {
                if let Some(t) = self.trial_mut(*trial_id) {
                    t.artifact = Some(output.clone());
                }
                self.stages.insert(*trial_id, Stage::Stored);
            }
            Event::TrialFinished {
                trial_id,
                status,
                objective,
                failure,
                diverged,
            } => {
                if let Some(t) = self.trial_mut(*trial_id) {
                    t.record.status = status.clone();
                    t.record.objective = *objective;
                    t.failure = failure.clone();
                    t.diverged = *diverged;
                }
                self.stages.insert(*trial_id, Stage::Done);
            }
            Event::Stopped { reason, message } => self.stop = Some((*reason, message.clone())),
            Event::AblationDone { result } => self.ablation = Some(result.clone()),
            Event::EnsembleDone { result } => self.ensemble = Some(result.clone()),
            Event::MergeStarted {
                adapter_path,
                output_path,
            } => self.merge_started = Some((adapter_path.clone(), output_path.clone())),
            Event::Merged { output } => self.merged = Some(output.clone()),
            Event::Sampled { samples } => self.samples = Some(samples.clone()),
            Event::Finished => self.finished = true,
        }
    }

    /// The seed 001 `ExperimentState` of this ledger.
    pub fn to_state(&self, experiment_dir: Option<String>) -> ExperimentState {
        ExperimentState {
            trial_history: self.trials.clone(),
            best_trial: self.best().cloned(),
            budget: self.budget_now(),
            stop_reason: self.stop.as_ref().map(|s| s.0),
            stop_message: self.stop.as_ref().map(|s| s.1.clone()),
            experiment_dir,
            iterations: self.iterations,
            base_loss: self.base_loss,
            merged_path: self.merged.as_ref().map(|m| m.merged_path.clone()),
            ablation: self.ablation.clone(),
            ensemble: self.ensemble.clone(),
            samples: self.samples.clone().unwrap_or_default(),
            reports: Vec::new(),
            finished: self.finished,
        }
    }
}
