//! The experiment loop: Step 1 profile, Step 2 config and preflight, Step 3
//! trials (plan, train, evaluate, store) under the stop rules and the
//! budget, Step 4 merge and export; every step journaled, every skill taken
//! from the registry by name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use lora_skill::{ErrorKind, Progress, SkillContext, SkillError, SkillRegistry, StepResult};
use lora_spec::contracts::artifact::{ArtifactStoreInput, ArtifactStoreOutput};
use lora_spec::contracts::config::{
    LoRAConfigInput, LoRAConfigOutput, PREFLIGHT, PreflightInput, PreflightReport,
};
use lora_spec::contracts::dataset::{DatasetAnalyzeInput, DatasetProfile};
use lora_spec::contracts::eval::{EvalInput, EvalOutput, EvalReport, EvalRequest};
use lora_spec::contracts::hpo::{HPOInput, HPOOutput, TrialRecord};
use lora_spec::contracts::merge::{ExportFormat, GgufQuantization, MergeInput, MergeOutput};
use lora_spec::contracts::names;
use lora_spec::contracts::orchestrator::{
    BudgetState, ExperimentState, LoRATrainerInput, SampleComparison, StopReason, TrialRole,
    TrialSummary,
};
use lora_spec::contracts::training::{
    TrainingInput, TrainingReport, TrainingRequest, TrainingStatus,
};
use lora_spec::experiment::{Device, ExperimentSpec, ProtocolType};
use lora_spec::trial::TrialConfig;

use crate::data;
use crate::error::OrchestratorError;
use crate::journal::{Event, Fault, Journal};
use crate::ledger::{Ledger, Stage};
use crate::lock::RunLock;
use crate::plan::{self, Next, PlannedTrial};
use crate::report;

/// Two diverged trials in a row stop the experiment: the search space is
/// likely broken (a learning rate far too high) and more trials would waste budget.
pub const DIVERGENCE_STREAK: usize = 2;

/// Options that are not part of the experiment (fault injection for tests).
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Fail the journal write of this event (simulated crash or full disk).
    pub fault: Option<Fault>,
}

/// Runs experiments with the skills of a registry.
#[derive(Debug, Clone)]
pub struct Orchestrator {
    registry: SkillRegistry,
    options: Options,
}

impl Orchestrator {
    /// An orchestrator over `registry` (the real skills, or test doubles).
    pub fn new(registry: SkillRegistry) -> Self {
        Self {
            registry,
            options: Options::default(),
        }
    }

    /// With options.
    pub fn with_options(mut self, options: Options) -> Self {
        self.options = options;
        self
    }

    /// The registry.
    pub fn registry(&self) -> &SkillRegistry {
        &self.registry
    }

    /// Runs (or resumes, or dry-runs) the experiment of `input`.
    pub async fn run(
        &self,
        input: &LoRATrainerInput,
        ctx: &SkillContext,
    ) -> Result<StepResult<ExperimentState>, SkillError> {
        let spec = &input.experiment;
        let issues = spec.check();
        if let Some(first) = issues.first() {
            let mut e = SkillError::invalid_input(first.message.clone())
                .with_field(format!("experiment.{}", first.path));
            if let Some(h) = &first.hint {
                e = e.with_hint(h.clone());
            }
            return Err(e);
        }
        let dir = experiment_dir(input, ctx);
        let mut run = Run::new(self, input, ctx, dir)?;
        let outcome = run.execute().await;
        run.finish(outcome).await
    }
}

/// The experiment folder of `input`.
pub fn experiment_dir(input: &LoRATrainerInput, ctx: &SkillContext) -> PathBuf {
    match &input.experiment_dir {
        Some(d) => ctx.resolve(d),
        None => ctx
            .resolve(&input.experiment.output.dir)
            .join(sanitize(&input.experiment.experiment_name)),
    }
}

/// A name safe as a folder and an artifact experiment id.
pub fn sanitize(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(128)
        .collect();
    if s.is_empty() || s.starts_with('.') {
        format!("x{s}")
    } else {
        s
    }
}

/// The spec as it is hashed into the journal: every field that changes results.
fn journal_spec(input: &LoRATrainerInput) -> serde_json::Value {
    serde_json::to_value(&input.experiment).unwrap_or(serde_json::Value::Null)
}

/// The dollars per device-hour of the spec's device, when it has a cost table.
fn dollar_rate(spec: &ExperimentSpec) -> Result<Option<f64>, OrchestratorError> {
    let table = &spec.protocol.cost_per_device_hour;
    if table.is_empty() {
        return Ok(None);
    }
    let device = spec
        .resources
        .gpu_type
        .clone()
        .unwrap_or_else(|| match spec.resources.device {
            Device::Cpu => "cpu".into(),
            Device::Cuda => "cuda".into(),
            Device::Auto => "cpu".into(),
        });
    if let Some(r) = table.get(&device) {
        return Ok(Some(*r));
    }
    if let Some(r) = table.get("default") {
        return Ok(Some(*r));
    }
    if table.len() == 1 {
        return Ok(table.values().next().copied());
    }
    Err(OrchestratorError::Invalid {
        field: "experiment.protocol.cost_per_device_hour".into(),
        message: format!("has no price for the device `{device}`"),
        hint: format!(
            "add `{device}: <dollars per hour>` (or `default:`), or set resources.gpu_type to one of {}",
            table.keys().cloned().collect::<Vec<_>>().join(", ")
        ),
    })
}

pub(crate) struct Run<'a> {
    registry: &'a SkillRegistry,
    input: &'a LoRATrainerInput,
    spec: &'a ExperimentSpec,
    ctx: SkillContext,
    dir: PathBuf,
    journal: Option<Journal>,
    ledger: Ledger,
    /// Narration of every event (journal order), the Step 1..4 log.
    log: Vec<String>,
    overall: Option<Progress>,
    _lock: Option<RunLock>,
    /// Dry run: planned trials with their forecast.
    planned: Vec<TrialSummary>,
    /// Correction of predicted device-hours from finished trials.
    prediction_ratio: Option<f64>,
}

/// The loop's end: a stop (journaled), cancellation, or an error.
enum Outcome {
    Done,
    Cancelled,
}

impl<'a> Run<'a> {
    fn new(
        orch: &'a Orchestrator,
        input: &'a LoRATrainerInput,
        ctx: &SkillContext,
        dir: PathBuf,
    ) -> Result<Self, SkillError> {
        let spec = &input.experiment;
        let rate = dollar_rate(spec)?;
        let budget = BudgetState {
            budget_gpu_hours: spec.budget_gpu_hours,
            gpu_hours_used: 0.0,
            budget_dollars: spec.protocol.budget_dollars,
            dollars_used: rate.map(|_| 0.0),
            gpu_hours_forecast: 0.0,
            dollars_per_device_hour: rate,
        };
        let best_is_last = spec.protocol.kind == ProtocolType::Curriculum;
        let mut run = Self {
            registry: &orch.registry,
            input,
            spec,
            ctx: ctx.child(names::ORCHESTRATOR),
            dir: dir.clone(),
            journal: None,
            ledger: Ledger::new(budget, best_is_last),
            log: Vec::new(),
            overall: None,
            _lock: None,
            planned: Vec::new(),
            prediction_ratio: None,
        };
        if input.dry_run {
            return Ok(run);
        }
        let journal_path = Journal::path_in(&dir);
        let spec_json = journal_spec(input);
        std::fs::create_dir_all(&dir).map_err(|e| OrchestratorError::io(&dir, e))?;
        run._lock = Some(RunLock::acquire(&dir)?);
        let mut journal = if journal_path.exists() {
            if !input.resume {
                return Err(OrchestratorError::AlreadyExists { path: journal_path }.into());
            }
            let j = Journal::open(&dir, &spec_json)?;
            for entry in j.entries() {
                run.ledger.apply(&entry.event);
                if let Some(line) = run.narrate(&entry.event) {
                    run.log.push(line);
                }
            }
            j
        } else {
            Journal::create(&dir, &spec.experiment_name, spec_json)
        };
        journal.set_fault(orch.options.fault);
        let first = journal.entries().is_empty();
        run.journal = Some(journal);
        if first {
            run.record(Event::Started)?;
        } else if !run.ledger.finished {
            run.record(Event::Resumed)?;
        }
        Ok(run)
    }

    /// Records an event: journal first (atomically), then the ledger, then the narration.
    fn record(&mut self, event: Event) -> Result<(), SkillError> {
        if let Some(j) = self.journal.as_mut() {
            j.append(event.clone())?;
        }
        self.ledger.apply(&event);
        if let Some(line) = self.narrate(&event) {
            self.ctx.info(line.clone());
            self.log.push(line);
        }
        Ok(())
    }

    fn say(&mut self, line: String) {
        self.ctx.info(line.clone());
        self.log.push(line);
    }

    async fn execute(&mut self) -> Result<Outcome, SkillError> {
        if self.ledger.finished {
            self.say("experiment already finished: nothing to redo".into());
            return Ok(Outcome::Done);
        }
        match self.steps().await {
            Ok(()) => Ok(Outcome::Done),
            Err(e) if e.kind == ErrorKind::Cancelled => Ok(Outcome::Cancelled),
            Err(e) => Err(e),
        }
    }

    async fn steps(&mut self) -> Result<(), SkillError> {
        self.step1_profile().await?;
        self.prepare_data()?;
        self.step2_config().await?;
        if self.input.dry_run {
            return self.dry_run_plan().await;
        }
        self.step3_trials().await?;
        self.protocol_epilogue().await?;
        self.step4_merge().await?;
        self.sample_generations().await?;
        self.write_reports()?;
        self.record(Event::Finished)?;
        Ok(())
    }

    // ---------------------------------------------------------------- Step 1

    async fn step1_profile(&mut self) -> Result<(), SkillError> {
        if self.ledger.profile.is_some() {
            return Ok(());
        }
        self.ctx.check_cancelled()?;
        let mut input = DatasetAnalyzeInput::new(self.spec.dataset_path.clone());
        input.format = self.spec.dataset_file_format;
        input.tokenizer_name = local_tokenizer(&self.spec.base_model);
        let out: StepResult<DatasetProfile> = self
            .registry
            .call(names::DATASET, &input, &self.ctx)
            .await
            .map_err(|e| e.nested_in("step 1 (dataset)"))?;
        if out.data.total_samples == 0 {
            return Err(SkillError::invalid_input(format!(
                "{} holds no usable records",
                self.spec.dataset_path
            ))
            .with_field("experiment.dataset_path")
            .with_file(self.spec.dataset_path.clone())
            .with_hint("see `lora-trainer dataset analyze` for what is wrong with the rows"));
        }
        self.record(Event::Profiled {
            profile: Box::new(out.data),
        })
    }

    fn prepare_data(&mut self) -> Result<(), SkillError> {
        if self.ledger.eval_path.is_some() {
            return Ok(());
        }
        let train = self.spec.dataset_path.clone();
        if let Some(eval) = &self.spec.eval_dataset_path {
            if self.input.dry_run {
                self.ledger.train_path = Some(train);
                self.ledger.eval_path = Some(eval.clone());
                return Ok(());
            }
            return self.record(Event::DataReady {
                train_path: train,
                eval_path: eval.clone(),
            });
        }
        if self.input.dry_run {
            // A dry run writes nothing: plan on the whole file, split at run time.
            self.say(format!(
                "data: {:.0}% of {train} will be held out for evaluation (seed {})",
                self.spec.eval_fraction * 100.0,
                self.spec.protocol.seed
            ));
            self.ledger.train_path = Some(train.clone());
            self.ledger.eval_path = Some(train);
            return Ok(());
        }
        let src = PathBuf::from(&train);
        if !data::is_jsonl(&src) {
            return Err(OrchestratorError::Invalid {
                field: "experiment.eval_dataset_path".into(),
                message: format!(
                    "no held-out data is given and {} is not a JSON-lines file the orchestrator can split",
                    src.display()
                ),
                hint: "set dataset.eval_path (or write the data as .jsonl; `lora-trainer dataset split` writes both files)".into(),
            }
            .into());
        }
        let (t, e) = data::split_jsonl(
            &src,
            self.spec.eval_fraction.max(0.01),
            self.spec.protocol.seed,
            &self.dir.join("data"),
        )?;
        self.record(Event::DataReady {
            train_path: t.display().to_string(),
            eval_path: e.display().to_string(),
        })
    }

    // ---------------------------------------------------------------- Step 2

    async fn step2_config(&mut self) -> Result<(), SkillError> {
        if self.ledger.config.is_some() {
            return Ok(());
        }
        self.ctx.check_cancelled()?;
        let profile = serde_json::to_value(&self.ledger.profile).unwrap_or_default();
        let base = self.base_trial_config(1);
        let input = LoRAConfigInput {
            base_model: self.spec.base_model.clone(),
            task: self.spec.task,
            method: self.spec.methods.first().copied().unwrap_or_default(),
            vram_limit_gb: self.spec.resources.vram_limit_gb.unwrap_or(24.0),
            dataset_profile: profile.clone(),
            gpu_type: self.spec.resources.gpu_type.clone(),
            num_gpus: self.spec.resources.gpus.unwrap_or(1),
            max_seq_length: Some(base.max_seq_length),
            epochs: Some(base.epochs),
            target_batch_size: Some(base.batch_size),
        };
        let out: StepResult<LoRAConfigOutput> = self
            .registry
            .call(names::CONFIG, &input, &self.ctx)
            .await
            .map_err(|e| preflight_error(e, "the config skill"))?;
        let config = out.data;
        // Seed 002's preflight over the whole spec, when the skill is registered;
        // else the config skill's own preflight report.
        let report = if self.registry.contains(PREFLIGHT) {
            let input = PreflightInput {
                spec_path: None,
                spec: Some(self.spec.clone()),
                dataset_profile: profile,
            };
            let out: StepResult<PreflightReport> = self
                .registry
                .call(PREFLIGHT, &input, &self.ctx)
                .await
                .map_err(|e| preflight_error(e, "the preflight"))?;
            Some(out.data)
        } else {
            config.preflight.clone()
        };
        let mut warnings = Vec::new();
        if let Some(r) = &report {
            if !r.ok || !r.errors.is_empty() {
                let errors = if r.errors.is_empty() {
                    vec!["the preflight reports the experiment cannot start".to_string()]
                } else {
                    r.errors.clone()
                };
                let mut e =
                    SkillError::invalid_input(format!("preflight failed: {}", errors.join("; ")))
                        .with_field("experiment");
                e = e.with_hint(if r.suggestions.is_empty() {
                    "fix the spec as each finding says; nothing was trained".to_string()
                } else {
                    format!("nothing was trained; try: {}", r.suggestions.join("; "))
                });
                return Err(e);
            }
            warnings.extend(r.warnings.iter().cloned());
        }
        if !config.memory_estimate.fits {
            let limit = self.spec.resources.vram_limit_gb.unwrap_or(24.0);
            return Err(SkillError::invalid_input(format!(
                "preflight: the run needs about {:.1} GB and the limit is {limit:.1} GB",
                config.memory_estimate.vram_gb
            ))
            .with_field("experiment.resources.vram_limit_gb")
            .with_hint(
                "use a smaller micro_batch_size with more accumulation, gradient_checkpointing, \
                 shorter max_seq_length, or method: qlora",
            ));
        }
        // The training skill's own preflight: the base trial planned, no tensors.
        let dry = self
            .train_dry(&base, None)
            .await
            .map_err(|e| preflight_error(e, "the training preflight"))?;
        if dry.data.output.status == TrainingStatus::Failed {
            return Err(SkillError::invalid_input(
                "preflight: the training skill rejects the base configuration",
            )
            .with_field("experiment.base_config")
            .with_hint(if dry.output_text.is_empty() {
                "run `lora-trainer train --dry-run` on the spec for details".to_string()
            } else {
                dry.output_text.clone()
            }));
        }
        if !self.input.dry_run {
            warnings.extend(
                dry.metadata
                    .get("warnings")
                    .and_then(|w| w.as_array())
                    .into_iter()
                    .flatten()
                    .filter_map(|w| w.as_str().map(String::from)),
            );
        }
        // The skills warned already; the orchestrator's log keeps them.
        for w in &warnings {
            self.ctx.debug(format!("preflight warning: {w}"));
        }
        if self.input.dry_run {
            self.ledger.config = Some(config);
            self.ledger.warnings = warnings;
            self.ledger.preflight = report;
            let line = self.narrate_config();
            self.say(line);
            return Ok(());
        }
        self.record(Event::Configured {
            config: Box::new(config),
            warnings,
            preflight: report.map(Box::new),
        })
    }

    /// The spec's base config, as trial `id` (user fields win over smart defaults).
    fn base_trial_config(&self, id: u32) -> TrialConfig {
        let mut c = self.spec.base_config.clone();
        c.trial_id = id;
        c.base_model = Some(self.spec.base_model.clone());
        if c.early_stop_loss.is_none() {
            c.early_stop_loss = self.spec.protocol.early_stop_loss;
        }
        c.normalized()
    }

    /// The training request of a trial: the seed fields plus the held-out data
    /// (for eval every `eval_steps`), the device and threads of the spec.
    fn training_request(
        &self,
        config: &TrialConfig,
        dataset: Option<&str>,
        resume_from: Option<String>,
        dry_run: bool,
    ) -> TrainingRequest {
        let mut r = TrainingRequest::from(TrainingInput {
            trial_config: config.clone(),
            dataset_path: dataset
                .map(String::from)
                .or_else(|| self.ledger.train_path.clone())
                .unwrap_or_else(|| self.spec.dataset_path.clone()),
            output_dir: self.trial_dir(config.trial_id).display().to_string(),
            resume_from,
            dry_run,
        });
        if config.eval_steps.is_some() && !self.input.dry_run {
            r.eval_dataset_path = self.ledger.eval_path.clone();
        }
        r.device = device_name(self.spec.resources.device);
        r.threads = self.spec.resources.threads;
        r
    }

    fn trial_dir(&self, id: u32) -> PathBuf {
        self.dir.join("trials").join(format!("trial_{id:03}"))
    }

    async fn train_dry(
        &self,
        config: &TrialConfig,
        dataset: Option<&str>,
    ) -> Result<StepResult<TrainingReport>, SkillError> {
        let input = self.training_request(config, dataset, None, true);
        self.registry.call(names::TRAINING, &input, &self.ctx).await
    }

    /// The eval request for an adapter (none: the base alone).
    fn eval_request(&self, adapter: Option<String>, compute_delta: bool) -> EvalRequest {
        let base = self.base_trial_config(0);
        let mut r = EvalRequest::from(EvalInput {
            adapter_path: adapter,
            base_model: self.spec.base_model.clone(),
            eval_dataset_path: self
                .ledger
                .eval_path
                .clone()
                .unwrap_or_else(|| self.spec.dataset_path.clone()),
            compute_perplexity: true,
            compute_delta,
        });
        r.max_seq_length = Some(base.max_seq_length);
        r.prompt_template = Some(base.prompt_template.clone());
        r.device = device_name(self.spec.resources.device);
        r.threads = self.spec.resources.threads;
        r
    }

    // ---------------------------------------------------------------- Step 3

    fn max_trials(&self) -> u32 {
        self.spec.max_trials
    }

    async fn step3_trials(&mut self) -> Result<(), SkillError> {
        let total = match self.spec.protocol.kind {
            ProtocolType::Standard => u64::from(self.max_trials()),
            _ => plan::plan_len(self).await.unwrap_or(0) as u64,
        };
        let mut bar = self.ctx.progress("experiment", Some(total), "trials");
        bar.update(self.ledger.finished_trials().count() as u64, None, &[]);
        self.overall = Some(bar);
        loop {
            self.ctx.check_cancelled()?;
            if let Some(id) = self.ledger.unfinished() {
                self.drive_trial(id).await?;
                self.tick_overall();
                continue;
            }
            if self.ledger.stop.is_some() {
                break;
            }
            if let Some((reason, message)) = self.check_stop() {
                self.record(Event::Stopped { reason, message })?;
                break;
            }
            match plan::next(self).await? {
                Next::Trial(t) => {
                    if let Some((reason, message)) = self.gate_budget(&t).await? {
                        self.record(Event::Stopped { reason, message })?;
                        break;
                    }
                }
                Next::Done(reason, message) => {
                    self.record(Event::Stopped { reason, message })?;
                    break;
                }
            }
        }
        if let Some(bar) = self.overall.take() {
            let msg = self
                .ledger
                .stop
                .as_ref()
                .map(|s| format!("stopped: {}", s.0))
                .unwrap_or_default();
            bar.finish(msg);
        }
        Ok(())
    }

    fn tick_overall(&mut self) {
        let done = self.ledger.finished_trials().count() as u64;
        let best = self.ledger.best().and_then(|b| b.record.objective);
        let left = self.ledger.budget_now().gpu_hours_left();
        if let Some(bar) = self.overall.as_mut() {
            let mut m: Vec<(&str, f64)> = vec![("budget_left_h", left)];
            if let Some(b) = best {
                m.push(("best", b));
            }
            bar.update(done, None, &m);
        }
    }

    /// Predicts the trial's cost; records it as planned when it fits, else returns the stop.
    async fn gate_budget(
        &mut self,
        t: &PlannedTrial,
    ) -> Result<Option<(StopReason, String)>, SkillError> {
        let (predicted, steps) = self.predict(t).await?;
        let budget = self.ledger.budget_now();
        let left = budget.gpu_hours_left();
        if let Some(p) = predicted {
            if p > left + 1e-12 {
                return Ok(Some((
                    StopReason::BudgetExhausted,
                    format!(
                        "trial {} would need about {} device-hours and {} are left: not started",
                        t.config.trial_id,
                        fmt_hours(p),
                        fmt_hours(left)
                    ),
                )));
            }
            if let (Some(rate), Some(dleft)) =
                (budget.dollars_per_device_hour, budget.dollars_left())
                && p * rate > dleft + 1e-9
            {
                return Ok(Some((
                    StopReason::BudgetExhausted,
                    format!(
                        "trial {} would cost about ${:.2} and ${dleft:.2} is left: not started",
                        t.config.trial_id,
                        p * rate
                    ),
                )));
            }
        }
        let mut record = TrialRecord {
            config: t.config.clone(),
            objective: None,
            status: "planned".into(),
            ..TrialRecord::default()
        };
        record.config.trial_id = t.config.trial_id;
        let summary = TrialSummary {
            record,
            trial_id: t.config.trial_id,
            role: t.role.clone(),
            rationale: t.rationale.clone(),
            predicted_gpu_hours: predicted,
            training_steps: steps.unwrap_or(0),
            final_loss: None,
            eval: None,
            adapter_path: None,
            output_dir: None,
            artifact: None,
            failure: None,
            diverged: false,
            dollars: None,
            resumed: 0,
        };
        self.record(Event::Planned {
            trial: Box::new(summary),
        })?;
        Ok(None)
    }

    /// Predicted device-hours (corrected by finished trials) and steps of a trial.
    async fn predict(
        &mut self,
        t: &PlannedTrial,
    ) -> Result<(Option<f64>, Option<u64>), SkillError> {
        let dry = self.train_dry(&t.config, t.dataset_path.as_deref()).await?;
        let steps = Some(dry.data.output.training_steps).filter(|s| *s > 0);
        let raw = Some(dry.data.output.gpu_hours).filter(|h| h.is_finite() && *h > 0.0);
        // Learn from history: actual / predicted over finished trials.
        let (mut act, mut pred) = (0.0, 0.0);
        for tr in self.ledger.finished_trials() {
            if let Some(p) = tr.predicted_gpu_hours
                && p > 0.0
                && tr.record.gpu_hours > 0.0
            {
                act += tr.record.gpu_hours;
                pred += p;
            }
        }
        self.prediction_ratio = (pred > 0.0).then(|| (act / pred).clamp(0.1, 10.0));
        let predicted = match raw {
            Some(h) => Some(h * self.prediction_ratio.unwrap_or(1.0)),
            None if self.ledger.finished_trials().all(|t| t.training_steps == 0) => {
                // No estimate from the trainer and no history: the preflight's ETA,
                // scaled by the trial's steps.
                self.ledger.preflight.as_ref().and_then(|p| {
                    let eta = p.eta_hours.filter(|h| h.is_finite() && *h > 0.0)?;
                    let base_steps = p.total_steps.filter(|s| *s > 0)?;
                    let n = steps.unwrap_or(base_steps);
                    Some(eta * n as f64 / base_steps as f64)
                })
            }
            None => {
                // No estimate from the trainer: hours per step from history.
                let (h, s): (f64, u64) = self
                    .ledger
                    .finished_trials()
                    .filter(|t| t.training_steps > 0)
                    .fold((0.0, 0), |(h, s), t| {
                        (h + t.record.gpu_hours, s + t.training_steps)
                    });
                match (steps, s) {
                    (Some(n), s) if s > 0 => Some(h / s as f64 * n as f64),
                    _ => None,
                }
            }
        };
        Ok((predicted, steps))
    }

    /// The stop rules, in order; `None` to go on.
    fn check_stop(&self) -> Option<(StopReason, String)> {
        let standard = self.spec.protocol.kind == ProtocolType::Standard;
        let finished: Vec<&TrialSummary> = self.ledger.finished_trials().collect();
        let metric = &self.spec.stop_metric;
        if standard
            && let (Some(th), Some(best)) = (self.spec.stop_threshold, self.ledger.best())
            && let Some(v) = best.record.objective
            && v <= th
        {
            return Some((
                StopReason::ThresholdReached,
                format!(
                    "{metric} {} <= stop_threshold {} at trial {}",
                    fmt_metric(v),
                    fmt_metric(th),
                    best.trial_id
                ),
            ));
        }
        if finished.len() >= DIVERGENCE_STREAK
            && finished[finished.len() - DIVERGENCE_STREAK..]
                .iter()
                .all(|t| t.diverged)
        {
            let ids: Vec<String> = finished[finished.len() - DIVERGENCE_STREAK..]
                .iter()
                .map(|t| t.trial_id.to_string())
                .collect();
            return Some((
                StopReason::Diverged,
                format!(
                    "trials {} diverged in a row (loss above early_stop_loss, NaN or Inf): \
                     lower the learning rate range",
                    ids.join(" and ")
                ),
            ));
        }
        if standard && let Some(p) = self.spec.stop_patience {
            let best_pos = self
                .ledger
                .best()
                .and_then(|b| finished.iter().position(|t| t.trial_id == b.trial_id));
            let since = match best_pos {
                Some(i) => finished.len() - 1 - i,
                None => finished.len(),
            };
            if since >= p as usize {
                return Some((
                    StopReason::PatienceExhausted,
                    format!("{since} trials without improving {metric} (stop_patience {p})"),
                ));
            }
        }
        if standard && self.ledger.trials.len() as u32 >= self.max_trials() {
            return Some((
                StopReason::MaxTrials,
                format!(
                    "{} trials ran (max_trials {})",
                    self.ledger.trials.len(),
                    self.max_trials()
                ),
            ));
        }
        if self.ledger.iterations >= self.input.max_loop_iterations {
            return Some((
                StopReason::MaxLoopIterations,
                format!(
                    "{} loop iterations (max_loop_iterations {})",
                    self.ledger.iterations, self.input.max_loop_iterations
                ),
            ));
        }
        let b = self.ledger.budget_now();
        if b.gpu_hours_used >= b.budget_gpu_hours {
            return Some((
                StopReason::BudgetExhausted,
                format!(
                    "{} of {} device-hours used",
                    fmt_hours(b.gpu_hours_used),
                    fmt_hours(b.budget_gpu_hours)
                ),
            ));
        }
        if let (Some(used), Some(limit)) = (b.dollars_used, b.budget_dollars)
            && used >= limit
        {
            return Some((
                StopReason::BudgetExhausted,
                format!("${used:.2} of ${limit:.2} spent"),
            ));
        }
        None
    }

    /// Takes a trial from wherever it is to its end.
    async fn drive_trial(&mut self, id: u32) -> Result<(), SkillError> {
        loop {
            self.ctx.check_cancelled()?;
            let Some(stage) = self.ledger.stage(id) else {
                return Ok(());
            };
            match stage {
                Stage::Planned | Stage::Training => self.train(id, stage).await?,
                Stage::Trained => self.evaluate(id).await?,
                Stage::Evaluated => self.store(id).await?,
                Stage::Stored => {
                    let t = self.trial(id)?;
                    let objective = self.objective(&t);
                    let (status, failure) = match objective {
                        Some(_) => ("completed", None),
                        None => (
                            "failed",
                            Some(format!(
                                "{} is not available or not finite",
                                self.spec.stop_metric
                            )),
                        ),
                    };
                    self.record(Event::TrialFinished {
                        trial_id: id,
                        status: status.into(),
                        objective,
                        failure,
                        diverged: false,
                    })?;
                }
                Stage::Done => return Ok(()),
            }
        }
    }

    fn trial(&self, id: u32) -> Result<TrialSummary, SkillError> {
        self.ledger
            .trial(id)
            .cloned()
            .ok_or_else(|| SkillError::backend(format!("trial {id} is not in the journal")))
    }

    fn objective(&self, t: &TrialSummary) -> Option<f64> {
        let e = t.eval.as_ref();
        let v = match self.spec.stop_metric.as_str() {
            "eval_loss" => e.map(|e| e.eval_loss),
            "eval_perplexity" => e.map(|e| e.eval_perplexity),
            "delta_vs_base_loss" => e.and_then(|e| e.delta_vs_base_loss),
            "final_loss" => t.final_loss,
            _ => e.map(|e| e.eval_loss),
        };
        v.filter(|v| v.is_finite())
    }

    async fn train(&mut self, id: u32, stage: Stage) -> Result<(), SkillError> {
        let t = self.trial(id)?;
        let out_dir = self.dir.join("trials").join(format!("trial_{id:03}"));
        let resume_from = if stage == Stage::Training {
            data::latest_checkpoint(&out_dir).map(|p| p.display().to_string())
        } else {
            None
        };
        if stage == Stage::Training {
            self.say(match &resume_from {
                Some(c) => format!("trial {id}: interrupted; resuming from {c}"),
                None => {
                    format!("trial {id}: interrupted before its first checkpoint; restarting it")
                }
            });
        }
        self.record(Event::TrainingStarted {
            trial_id: id,
            output_dir: out_dir.display().to_string(),
            resume_from: resume_from.clone(),
        })?;
        let dataset = match &t.role {
            TrialRole::Stage { dataset_path, .. } => dataset_path.clone(),
            _ => self
                .ledger
                .train_path
                .clone()
                .unwrap_or_else(|| self.spec.dataset_path.clone()),
        };
        let input = self.training_request(&t.record.config, Some(&dataset), resume_from, false);
        let input = plan::with_init_adapter(self, &t, input)?;
        match self
            .registry
            .call::<_, TrainingReport>(names::TRAINING, &input, &self.ctx)
            .await
        {
            Ok(out) => {
                let report = out.data;
                let output = report.output.clone();
                let (diverged, why) = self.divergence(&report, &out.output_text);
                let failed = output.status == TrainingStatus::Failed || diverged;
                self.record(Event::Trained {
                    trial_id: id,
                    output: output.clone(),
                })?;
                if failed || output.adapter_path.is_none() {
                    let failure = why.unwrap_or_else(|| {
                        if output.adapter_path.is_none() && output.status != TrainingStatus::Failed
                        {
                            "training wrote no adapter".into()
                        } else {
                            first_line(&out.output_text).unwrap_or_else(|| "training failed".into())
                        }
                    });
                    self.record(Event::TrialFinished {
                        trial_id: id,
                        status: "failed".into(),
                        objective: None,
                        failure: Some(failure),
                        diverged,
                    })?;
                }
                Ok(())
            }
            Err(e) if trial_level(&e) => self.record(Event::TrialFinished {
                trial_id: id,
                status: "failed".into(),
                objective: None,
                failure: Some(format!("training: {e}")),
                diverged: false,
            }),
            Err(e) => Err(e),
        }
    }

    /// Whether a training outcome is a divergence, and why.
    fn divergence(&self, report: &TrainingReport, text: &str) -> (bool, Option<String>) {
        let out = &report.output;
        let guard = self
            .spec
            .base_config
            .early_stop_loss
            .or(self.spec.protocol.early_stop_loss);
        if let Some(l) = out.final_loss {
            if !l.is_finite() {
                return (true, Some(format!("diverged: the loss became {l}")));
            }
            if let Some(g) = guard
                && l > g
            {
                return (
                    true,
                    Some(format!(
                        "diverged: loss {} above early_stop_loss {}",
                        fmt_metric(l),
                        fmt_metric(g)
                    )),
                );
            }
        }
        if out.status == TrainingStatus::Failed {
            let reason = report.reason.clone().or_else(|| first_line(text));
            let diverged = reason
                .as_deref()
                .is_some_and(|r| r.to_ascii_lowercase().contains("diverg") || r.contains("NaN"));
            return (diverged, reason);
        }
        (false, None)
    }

    async fn evaluate(&mut self, id: u32) -> Result<(), SkillError> {
        let t = self.trial(id)?;
        let input = self.eval_request(t.adapter_path.clone(), self.ledger.base_loss.is_none());
        match self
            .registry
            .call::<_, EvalReport>(names::EVAL, &input, &self.ctx)
            .await
        {
            Ok(out) => self.record(Event::Evaluated {
                trial_id: id,
                output: out.data.output,
            }),
            Err(e) if trial_level(&e) => self.record(Event::TrialFinished {
                trial_id: id,
                status: "failed".into(),
                objective: None,
                failure: Some(format!("evaluation: {e}")),
                diverged: false,
            }),
            Err(e) => Err(e),
        }
    }

    async fn store(&mut self, id: u32) -> Result<(), SkillError> {
        let t = self.trial(id)?;
        let mut input = ArtifactStoreInput::new(t.adapter_path.clone().unwrap_or_default(), id);
        let mut metrics = BTreeMap::new();
        if let Some(e) = &t.eval {
            metrics.insert("eval_loss".to_string(), e.eval_loss);
            metrics.insert("eval_perplexity".to_string(), e.eval_perplexity);
            if let Some(d) = e.delta_vs_base_loss {
                metrics.insert("delta_vs_base_loss".to_string(), d);
            }
        }
        if let Some(l) = t.final_loss {
            metrics.insert("final_loss".to_string(), l);
        }
        metrics.insert("gpu_hours".to_string(), t.record.gpu_hours);
        metrics.retain(|_, v| v.is_finite());
        input.metrics = metrics;
        input.tags = vec![
            format!("experiment:{}", self.spec.experiment_name),
            format!("method:{}", t.record.config.method.as_str()),
            format!("protocol:{}", protocol_name(self.spec.protocol.kind)),
            format!("role:{}", role_name(&t.role)),
        ];
        input.experiment_id = sanitize(&self.spec.experiment_name);
        input.store_root = Some(self.dir.join("artifacts").display().to_string());
        input.parent = plan::parent_version(self, &t);
        input.metadata.insert(
            "trial_config".into(),
            serde_json::to_value(&t.record.config).unwrap_or_default(),
        );
        let out: StepResult<ArtifactStoreOutput> = self
            .registry
            .call(names::ARTIFACT, &input, &self.ctx)
            .await?;
        self.record(Event::Stored {
            trial_id: id,
            output: out.data,
        })
    }

    /// HPO's view of the finished trials.
    pub(crate) fn hpo_history(&self) -> Vec<TrialRecord> {
        self.ledger
            .finished_trials()
            .map(|t| t.record.clone())
            .collect()
    }

    /// Asks the HPO skill for the next configuration.
    pub(crate) async fn suggest(
        &mut self,
        history: Vec<TrialRecord>,
        remaining: u32,
    ) -> Result<Option<(TrialConfig, String)>, SkillError> {
        let mut space = self.spec.search_space.clone();
        if space.methods.is_empty() && self.spec.methods.len() > 1 {
            space.methods = self.spec.methods.clone();
        }
        let input = HPOInput {
            trial_history: history,
            search_space: space,
            strategy: self.spec.protocol.strategy,
            budget_remaining: self.ledger.budget_now().gpu_hours_left(),
            trials_remaining: remaining,
            base_config: self.base_trial_config(0),
            seed: Some(self.spec.protocol.seed),
            ..HPOInput::default()
        };
        let out: StepResult<HPOOutput> = self.registry.call(names::HPO, &input, &self.ctx).await?;
        Ok(out
            .data
            .suggestions
            .into_iter()
            .next()
            .map(|s| (s.trial_config, s.rationale)))
    }

    // ---------------------------------------------------------------- Dry run

    async fn dry_run_plan(&mut self) -> Result<(), SkillError> {
        let left = self.spec.budget_gpu_hours;
        let mut total = 0.0;
        let mut over = None;
        let limit = match self.spec.protocol.kind {
            ProtocolType::Standard => self.max_trials(),
            _ => u32::MAX,
        }
        .min(self.input.max_loop_iterations);
        while (self.planned.len() as u32) < limit {
            self.ctx.check_cancelled()?;
            let t = match plan::next(self).await? {
                Next::Trial(t) => t,
                Next::Done(..) => break,
            };
            let (pred, steps) = self.predict(&t).await?;
            let mut s = plan::summary_of(&t, pred, steps.unwrap_or(0));
            s.record.status = "planned".into();
            let p = pred.unwrap_or(0.0);
            total += p;
            if total > left && over.is_none() {
                over = Some(t.config.trial_id);
            }
            self.say(format!(
                "planned trial {}: {} — {} steps, ~{} device-hours{}",
                t.config.trial_id,
                describe_config(&t.config),
                s.training_steps,
                pred.map(fmt_hours).unwrap_or_else(|| "?".into()),
                if total > left {
                    " (over budget: would not start)"
                } else {
                    ""
                }
            ));
            self.planned.push(s.clone());
            self.ledger.trials.push(s);
            self.ledger.stages.insert(t.config.trial_id, Stage::Planned);
        }
        // Dry-run trials are listed, not run: they are not "finished".
        self.ledger.budget.gpu_hours_forecast = total;
        let msg = format!(
            "dry run: {} trials planned, forecast {} of {} device-hours{}",
            self.planned.len(),
            fmt_hours(total),
            fmt_hours(left),
            match over {
                Some(id) => format!("; the budget runs out at trial {id}"),
                None => String::new(),
            }
        );
        self.ledger.stop = Some((StopReason::DryRun, msg.clone()));
        self.say(format!("Step 3/4 {msg}"));
        Ok(())
    }

    // ---------------------------------------------------------------- Protocols' end

    async fn protocol_epilogue(&mut self) -> Result<(), SkillError> {
        plan::epilogue(self).await
    }

    // ---------------------------------------------------------------- Step 4

    async fn step4_merge(&mut self) -> Result<(), SkillError> {
        if self.ledger.merged.is_some() {
            return Ok(());
        }
        if !(self.input.auto_merge && self.spec.output.merge_after) {
            return Ok(());
        }
        let Some(best) = self.ledger.best().cloned() else {
            self.say("Step 4/4 merge: skipped, no trial completed".into());
            return Ok(());
        };
        let Some(mut adapter) = best.adapter_path.clone() else {
            return Ok(());
        };
        // An ensemble that beats its best member is what gets merged.
        if let Some(en) = &self.ledger.ensemble
            && let (Some(c), Some(m)) = (&en.combined_adapter, en.ensemble_metric)
            && best.record.objective.is_none_or(|b| m < b)
        {
            adapter = c.clone();
        }
        self.ctx.check_cancelled()?;
        let format = self.merge_format();
        let quant = self.spec.output.gguf_quantization;
        let out_path = self.merge_output_path(format, quant);
        if self.ledger.merge_started.is_some() {
            // An earlier merge was interrupted: whatever it left is incomplete.
            data::remove_path(&out_path)?;
            self.say(format!(
                "merge: interrupted earlier; removed {} and merging again",
                out_path.display()
            ));
        }
        self.record(Event::MergeStarted {
            adapter_path: adapter.clone(),
            output_path: out_path.display().to_string(),
        })?;
        let input = MergeInput {
            adapter_path: adapter,
            base_model: self.spec.base_model.clone(),
            output_format: format,
            gguf_quantization: quant,
            validate_after_merge: self.spec.output.validate_after_merge,
            output_path: Some(out_path.display().to_string()),
            ..MergeInput::default()
        };
        let out: StepResult<MergeOutput> =
            self.registry.call(names::MERGE, &input, &self.ctx).await?;
        self.record(Event::Merged { output: out.data })
    }

    /// Before/after: the base model and the best adapter answer the first
    /// held-out prompts (greedy), so the user sees what the fine-tune changed.
    async fn sample_generations(&mut self) -> Result<(), SkillError> {
        const SAMPLES: u32 = 3;
        if self.ledger.samples.is_some() {
            return Ok(());
        }
        let Some(best) = self.ledger.best().cloned() else {
            return Ok(());
        };
        let Some(mut adapter) = best.adapter_path.clone() else {
            return Ok(());
        };
        if let Some(en) = &self.ledger.ensemble
            && let (Some(c), Some(m)) = (&en.combined_adapter, en.ensemble_metric)
            && best.record.objective.is_none_or(|b| m < b)
        {
            adapter = c.clone();
        }
        self.ctx.check_cancelled()?;
        let generate = |a: Option<String>| {
            let mut r = self.eval_request(a, false);
            r.generate_samples = Some(SAMPLES);
            r.max_samples = Some(u64::from(SAMPLES));
            r.max_new_tokens = Some(48);
            r.compute_perplexity = false;
            r
        };
        let before: StepResult<EvalReport> = self
            .registry
            .call(names::EVAL, &generate(None), &self.ctx)
            .await?;
        let after: StepResult<EvalReport> = self
            .registry
            .call(names::EVAL, &generate(Some(adapter)), &self.ctx)
            .await?;
        let prompts = self
            .ledger
            .eval_path
            .as_deref()
            .map(read_prompts)
            .unwrap_or_default();
        let samples: Vec<SampleComparison> = after
            .data
            .generations
            .iter()
            .map(|a| {
                let b = before.data.generations.iter().find(|b| b.index == a.index);
                SampleComparison {
                    index: a.index,
                    prompt: prompts.get(a.index as usize).cloned().flatten(),
                    reference: a.reference.clone(),
                    before: b.map(|b| b.completion.clone()).unwrap_or_default(),
                    after: a.completion.clone(),
                }
            })
            .collect();
        self.record(Event::Sampled { samples })
    }

    fn merge_format(&self) -> ExportFormat {
        if self.spec.output.export_format != ExportFormat::default() {
            self.spec.output.export_format
        } else {
            self.input.merge_format
        }
    }

    fn merge_output_path(&self, format: ExportFormat, quant: GgufQuantization) -> PathBuf {
        match format {
            ExportFormat::Gguf => self.dir.join("export").join(format!(
                "{}-{}.gguf",
                sanitize(&self.spec.experiment_name),
                quant_name(quant)
            )),
            ExportFormat::Safetensors => self.dir.join("merged"),
            ExportFormat::Pytorch => self.dir.join("merged-pytorch"),
        }
    }

    // ---------------------------------------------------------------- Reports and result

    fn state(&self) -> ExperimentState {
        let dir = (!self.input.dry_run).then(|| self.dir.display().to_string());
        let mut s = self.ledger.to_state(dir);
        if self.input.dry_run {
            s.best_trial = None;
        }
        s
    }

    fn write_manifest(&self, state: &ExperimentState) -> Result<String, SkillError> {
        let train = self.ledger.train_path.clone().unwrap_or_default();
        let eval = self.ledger.eval_path.clone().unwrap_or_default();
        let m = crate::manifest::build(self.spec, state, &train, &eval);
        let path = self.dir.join(crate::manifest::MANIFEST_FILE);
        lora_skill::fs::write_json_atomic(&path, &m)
            .map_err(|e| OrchestratorError::io(&path, e))?;
        Ok(path.display().to_string())
    }

    fn write_reports(&mut self) -> Result<Vec<String>, SkillError> {
        let mut state = self.state();
        let written = report::write_all(&self.dir, self.spec, &mut state, &self.log)?;
        Ok(written)
    }

    async fn finish(
        mut self,
        outcome: Result<Outcome, SkillError>,
    ) -> Result<StepResult<ExperimentState>, SkillError> {
        if let Some(bar) = self.overall.take() {
            bar.finish("stopped");
        }
        let outcome = outcome?;
        let mut state = self.state();
        if matches!(outcome, Outcome::Cancelled) {
            state.stop_reason = Some(StopReason::Cancelled);
            state.stop_message = Some(
                "cancelled: every finished step is journaled; run again with --resume to continue"
                    .into(),
            );
            state.finished = false;
            self.say("cancelled: run again with --resume to continue".into());
        }
        if !self.input.dry_run {
            // Reports (best effort after a cancel: the journal is what matters).
            match report::write_all(&self.dir, self.spec, &mut state, &self.log)
                .and_then(|paths| self.write_manifest(&state).map(|m| (paths, m)))
            {
                Ok((mut paths, m)) => {
                    paths.push(m);
                    state.reports = paths;
                }
                Err(e) if matches!(outcome, Outcome::Cancelled) => {
                    self.ctx.warn(format!("could not write the report: {e}"))
                }
                Err(e) => return Err(e),
            }
        }
        let mut result = StepResult::new(state.clone()).with_text(self.log.join("\n"));
        let artifact = state.merged_path.clone().or_else(|| {
            state
                .best_trial
                .as_ref()
                .and_then(|b| b.adapter_path.clone())
        });
        if let Some(a) = artifact {
            result = result.with_artifact(a);
        }
        result = result
            .with_meta("total_trials", state.trial_history.len() as u64)
            .with_meta(
                "best_trial_id",
                state
                    .best_trial
                    .as_ref()
                    .map(|b| serde_json::Value::from(b.trial_id))
                    .unwrap_or(serde_json::Value::Null),
            )
            .with_meta("gpu_hours_used", state.budget.gpu_hours_used)
            .with_meta(
                "merged_path",
                state
                    .merged_path
                    .clone()
                    .map(serde_json::Value::from)
                    .unwrap_or(serde_json::Value::Null),
            )
            .with_meta(
                "stop_reason",
                state
                    .stop_reason
                    .map(|s| serde_json::Value::from(s.as_str()))
                    .unwrap_or(serde_json::Value::Null),
            );
        if !self.input.dry_run {
            result = result.with_meta("experiment_dir", self.dir.display().to_string());
        } else {
            result = result.with_meta("gpu_hours_forecast", state.budget.gpu_hours_forecast);
        }
        Ok(result)
    }

    // ---------------------------------------------------------------- Narration

    fn narrate_config(&self) -> String {
        let Some(c) = &self.ledger.config else {
            return String::new();
        };
        let m = &c.memory_estimate;
        let base = self.base_trial_config(0);
        format!(
            "Step 2/4 config: base trial {}; suggested rank {} alpha {} lr {:.1e}; memory ~{:.2} GB ({}, {} base parameters); preflight ok{}",
            describe_config(&base),
            c.trial_config.lora_rank,
            c.trial_config.lora_alpha,
            c.trial_config.learning_rate,
            m.vram_gb,
            if m.fits { "fits" } else { "does not fit" },
            m.model_params,
            if self.ledger.warnings.is_empty() {
                String::new()
            } else {
                format!(" with {} warning(s)", self.ledger.warnings.len())
            }
        )
    }

    fn narrate(&self, event: &Event) -> Option<String> {
        Some(match event {
            Event::Started => format!(
                "experiment `{}` in {}",
                self.spec.experiment_name,
                self.dir.display()
            ),
            Event::Resumed => format!(
                "resumed: {} trial(s) journaled, {} finished",
                self.ledger.trials.len(),
                self.ledger.finished_trials().count()
            ),
            Event::Profiled { profile: p } => format!(
                "Step 1/4 dataset: {} samples ({}), {} columns, avg {:.1} tokens, max {}, {} duplicates",
                p.total_samples,
                p.format_detected,
                p.columns.len(),
                p.avg_tokens,
                p.max_tokens,
                p.duplicates_found
            ),
            Event::DataReady {
                train_path,
                eval_path,
            } => format!("data: train {train_path}, eval {eval_path}"),
            Event::Configured { .. } => self.narrate_config(),
            Event::Planned { trial } => format!(
                "Step 3/4 trial {} planned: {}{}{}",
                trial.trial_id,
                describe_config(&trial.record.config),
                trial
                    .predicted_gpu_hours
                    .map(|h| format!(", ~{} device-hours", fmt_hours(h)))
                    .unwrap_or_default(),
                if trial.rationale.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", trial.rationale)
                }
            ),
            Event::TrainingStarted { .. } => return None,
            Event::Trained { trial_id, output } => format!(
                "trial {trial_id}: trained {} steps, final loss {}, {} device-hours ({:?})",
                output.training_steps,
                output
                    .final_loss
                    .map(fmt_metric)
                    .unwrap_or_else(|| "-".into()),
                fmt_hours(output.gpu_hours),
                output.status
            ),
            Event::Evaluated { trial_id, output } => format!(
                "trial {trial_id}: eval_loss {} (perplexity {}{})",
                fmt_metric(output.eval_loss),
                fmt_metric(output.eval_perplexity),
                output
                    .base_loss
                    .or(self.ledger.base_loss)
                    .map(|b| format!(
                        ", base {} -> delta {}",
                        fmt_metric(b),
                        fmt_metric(output.eval_loss - b)
                    ))
                    .unwrap_or_default()
            ),
            Event::Stored { trial_id, output } => format!(
                "trial {trial_id}: stored as {} ({}...)",
                output.version,
                &output.adapter_hash[..output.adapter_hash.len().min(12)]
            ),
            Event::TrialFinished {
                trial_id,
                status,
                objective,
                failure,
                ..
            } => match (objective, failure) {
                (Some(v), _) => format!(
                    "trial {trial_id}: {status}, {} = {}",
                    self.spec.stop_metric,
                    fmt_metric(*v)
                ),
                (None, Some(f)) => format!("trial {trial_id}: {status}: {f}"),
                (None, None) => format!("trial {trial_id}: {status}"),
            },
            Event::Stopped { reason, message } => format!("Step 3/4 stop ({reason}): {message}"),
            Event::AblationDone { result } => format!(
                "ablation: {} points, best {}",
                result.rows.len(),
                result.best.clone().unwrap_or_else(|| "-".into())
            ),
            Event::EnsembleDone { result } => format!(
                "ensemble: {} members, weights [{}], combined {} vs best member {}",
                result.members.len(),
                result
                    .weights
                    .iter()
                    .map(|w| format!("{w:.3}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                result
                    .ensemble_metric
                    .map(fmt_metric)
                    .unwrap_or_else(|| "-".into()),
                result
                    .best_member_metric
                    .map(fmt_metric)
                    .unwrap_or_else(|| "-".into())
            ),
            Event::MergeStarted {
                adapter_path,
                output_path,
            } => format!("Step 4/4 merge: {adapter_path} -> {output_path}"),
            Event::Merged { output } => format!(
                "Step 4/4 merged: {} ({:?}{})",
                output.merged_path,
                output.output_format,
                output
                    .max_abs_logit_diff
                    .map(|d| format!(", max |logit diff| {d:.2e}"))
                    .unwrap_or_default()
            ),
            Event::Sampled { samples } => {
                let mut t = format!("before/after on {} held-out prompts:", samples.len());
                for x in samples {
                    t.push_str(&format!(
                        "\n  [{}] {}\n      base:       {}\n      fine-tuned: {}\n      reference:  {}",
                        x.index,
                        x.prompt.clone().unwrap_or_default().replace('\n', " "),
                        x.before.trim().replace('\n', " "),
                        x.after.trim().replace('\n', " "),
                        x.reference.trim().replace('\n', " ")
                    ));
                }
                t
            }
            Event::Finished => format!("done: everything is in {}", self.dir.display()),
        })
    }
}

/// Access for the protocol planners.
impl Run<'_> {
    pub(crate) fn spec(&self) -> &ExperimentSpec {
        self.spec
    }
    pub(crate) fn ledger(&self) -> &Ledger {
        &self.ledger
    }
    pub(crate) fn registry(&self) -> &SkillRegistry {
        self.registry
    }
    pub(crate) fn ctx(&self) -> &SkillContext {
        &self.ctx
    }
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }
    pub(crate) fn is_dry_run(&self) -> bool {
        self.input.dry_run
    }
    pub(crate) fn planned(&self) -> &[TrialSummary] {
        &self.planned
    }
    pub(crate) fn base_config(&self, id: u32) -> TrialConfig {
        self.base_trial_config(id)
    }
    pub(crate) fn record_event(&mut self, e: Event) -> Result<(), SkillError> {
        self.record(e)
    }
    pub(crate) fn log_line(&mut self, line: String) {
        self.say(line)
    }
    /// Each row's loss under the base model (the eval skill with `per_sample`):
    /// a loss-based curriculum's difficulty scores.
    pub(crate) async fn sample_losses(
        &self,
        dataset: &str,
    ) -> Result<Vec<Option<f64>>, SkillError> {
        let mut input = self.eval_request(None, false);
        input.eval_dataset_path = dataset.to_string();
        input.compute_perplexity = false;
        input.per_sample = true;
        let out: StepResult<EvalReport> =
            self.registry.call(names::EVAL, &input, &self.ctx).await?;
        out.data.sample_losses.ok_or_else(|| {
            SkillError::backend("the eval skill returned no sample_losses for a per_sample request")
                .with_hint("register an eval skill that supports `per_sample`")
        })
    }
    pub(crate) async fn run_eval(&self, adapter: &str) -> Result<EvalOutput, SkillError> {
        let input = self.eval_request(Some(adapter.to_string()), false);
        let out: StepResult<EvalReport> =
            self.registry.call(names::EVAL, &input, &self.ctx).await?;
        Ok(out.data.output)
    }
    pub(crate) fn metric_of_eval(&self, e: &EvalOutput) -> Option<f64> {
        let t = TrialSummary {
            record: TrialRecord::default(),
            trial_id: 0,
            role: TrialRole::Ensemble,
            rationale: String::new(),
            predicted_gpu_hours: None,
            training_steps: 0,
            final_loss: None,
            eval: Some(e.clone()),
            adapter_path: None,
            output_dir: None,
            artifact: None,
            failure: None,
            diverged: false,
            dollars: None,
            resumed: 0,
        };
        self.objective(&t)
    }
}

/// Errors that fail one trial but not the experiment (a bad configuration, a
/// numerical failure); I/O, a missing file or skill, and cancellation stop the run.
fn trial_level(e: &SkillError) -> bool {
    matches!(
        e.kind,
        ErrorKind::Backend
            | ErrorKind::InvalidInput
            | ErrorKind::Unsupported
            | ErrorKind::BudgetExceeded
    )
}

fn preflight_error(e: SkillError, who: &str) -> SkillError {
    if e.kind == ErrorKind::Cancelled {
        return e;
    }
    let hint = e.hint.clone();
    let mut out = SkillError::new(
        e.kind,
        format!("preflight: {who} rejects the experiment: {}", e.message),
    );
    out.field = e.field.clone().map(|f| format!("experiment ({f})"));
    out.file = e.file.clone();
    out.line = e.line;
    out.hint =
        Some(hint.unwrap_or_else(|| "nothing was trained; fix the spec and run again".into()));
    out
}

/// The prompt of each row of a JSON-lines file (`instruction` + `input`,
/// `prompt`, `question`, or the last user message), for showing generations.
fn read_prompts(path: &str) -> Vec<Option<String>> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(String::from);
            if let Some(i) = s("instruction") {
                return Some(match s("input").filter(|x| !x.is_empty()) {
                    Some(inp) => format!("{i}\n{inp}"),
                    None => i,
                });
            }
            s("prompt").or_else(|| s("question")).or_else(|| {
                v.get("messages")?
                    .as_array()?
                    .iter()
                    .rev()
                    .find(|m| m.get("role").and_then(|r| r.as_str()) == Some("user"))?
                    .get("content")?
                    .as_str()
                    .map(String::from)
            })
        })
        .collect()
}

/// The device name the training and eval skills read.
fn device_name(d: Device) -> Option<String> {
    match d {
        Device::Auto => None,
        Device::Cpu => Some("cpu".into()),
        Device::Cuda => Some("cuda".into()),
    }
}

/// A tokenizer for exact token counts: the base model folder when it has a tokenizer.json.
fn local_tokenizer(base_model: &str) -> Option<String> {
    let p = Path::new(base_model);
    if p.join("tokenizer.json").is_file() {
        Some(base_model.to_string())
    } else {
        None
    }
}

fn first_line(text: &str) -> Option<String> {
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(String::from)
}

/// `lr 2.0e-4 r16 a32 bs16 drop0.05 [q_proj,v_proj]`.
pub fn describe_config(c: &TrialConfig) -> String {
    format!(
        "{} lr {:.1e} r{} a{} bs{} drop {} [{}]",
        c.method.as_str(),
        c.learning_rate,
        c.lora_rank,
        c.lora_alpha,
        c.batch_size,
        c.lora_dropout,
        c.target_modules.join(",")
    )
}

/// A device-hour amount, readable at any scale.
pub fn fmt_hours(h: f64) -> String {
    if h == 0.0 {
        "0".into()
    } else if h < 0.01 {
        format!("{h:.2e}")
    } else {
        format!("{h:.3}")
    }
}

/// A metric, 4 significant decimals.
pub fn fmt_metric(v: f64) -> String {
    if v.abs() >= 1e4 || (v != 0.0 && v.abs() < 1e-3) {
        format!("{v:.3e}")
    } else {
        format!("{v:.4}")
    }
}

fn quant_name(q: GgufQuantization) -> &'static str {
    match q {
        GgufQuantization::F32 => "f32",
        GgufQuantization::F16 => "f16",
        GgufQuantization::Bf16 => "bf16",
        GgufQuantization::Q8_0 => "q8_0",
        GgufQuantization::Q4KM => "q4_k_m",
    }
}

/// The protocol's name.
pub fn protocol_name(p: ProtocolType) -> &'static str {
    match p {
        ProtocolType::Standard => "standard",
        ProtocolType::Ablation => "ablation",
        ProtocolType::Curriculum => "curriculum",
        ProtocolType::Ensemble => "ensemble",
    }
}

/// The role's name.
pub fn role_name(r: &TrialRole) -> &'static str {
    match r {
        TrialRole::Search => "search",
        TrialRole::Ablation { .. } => "ablation",
        TrialRole::Stage { .. } => "stage",
        TrialRole::Member { .. } => "member",
        TrialRole::Ensemble => "ensemble",
    }
}
