//! Deterministic test doubles of every skill the orchestrator composes,
//! implementing [`lora_skill::Skill`] with the real contract types.
//!
//! They do real file work (checkpoints, `metrics.jsonl`, adapter folders,
//! an artifact index, merged outputs) with no tensors: a trial's "loss" is a
//! closed-form function of its hyper-parameters, and device-hours are
//! counted per step, so a resumed run reaches exactly the result of an
//! uninterrupted one. Knobs inject the faults the orchestrator must survive
//! (a crash mid-training, mid-store or mid-merge; divergence; a failing
//! preflight). Used by this crate's tests, the integration tests, and anyone
//! who wants to watch the loop run in milliseconds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use lora_skill::{ErrorKind, Skill, SkillContext, SkillError, SkillRegistry, StepResult};
use lora_spec::contracts::artifact::{ArtifactStoreInput, ArtifactStoreOutput};
use lora_spec::contracts::config::{LoRAConfigInput, LoRAConfigOutput};
use lora_spec::contracts::dataset::{DatasetAnalyzeInput, DatasetProfile};
use lora_spec::contracts::eval::{EvalOutput, EvalReport, EvalRequest, GeneratedSample};
use lora_spec::contracts::hpo::{HPOInput, HPOOutput, Strategy, Suggestion};
use lora_spec::contracts::merge::{MergeInput, MergeOutput};
use lora_spec::contracts::names;
use lora_spec::contracts::training::{
    EvalPoint, TrainingOutput, TrainingReport, TrainingRequest, TrainingStatus,
};
use lora_spec::trial::TrialConfig;
use serde_json::json;
use sha2::{Digest, Sha256};

/// One recorded skill call.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    /// Skill name.
    pub skill: String,
    /// Its input as JSON.
    pub input: serde_json::Value,
}

/// The knobs of the doubles and the log of their calls.
#[derive(Debug, Clone)]
pub struct Doubles {
    /// Optimiser steps of a trial when its config sets no `max_steps`.
    pub steps: u64,
    /// Checkpoint every this many steps.
    pub save_every: u64,
    /// Wall time per step (for kill tests).
    pub step_delay: Duration,
    /// Device-hours charged per step.
    pub hours_per_step: f64,
    /// Trials with a learning rate at or above this diverge (loss NaN at step 3).
    pub diverge_at_lr: Option<f64>,
    /// Whether the memory estimate fits.
    pub fits: bool,
    /// Preflight errors the config skill reports.
    pub preflight_errors: Vec<String>,
    /// Crash (an I/O error that aborts the run) once, in trial `.0` at step `.1`.
    pub crash_training: Option<(u32, u64)>,
    /// Crash once in the artifact store of this trial, after the copy is written.
    pub crash_artifact: Option<u32>,
    /// Crash once in the merge, after part of the output is written.
    pub crash_merge: bool,
    /// Wall time the artifact store spends after copying, before indexing (for kill tests).
    pub artifact_delay: Duration,
    /// Wall time the merge spends after writing part of its output (for kill tests).
    pub merge_delay: Duration,
    /// Learning rates the fake search proposes, in order (combined with `rank_choices`).
    pub lr_grid: Vec<f64>,
    /// Every call, in order.
    pub calls: Arc<Mutex<Vec<Call>>>,
    /// Faults that already fired (each fires once; shared by clones).
    pub fired: Arc<Mutex<BTreeMap<String, bool>>>,
    /// Set by [`Doubles::cancel_during_training`] (shared by clones).
    pub stop_now: Arc<AtomicBool>,
}

impl Default for Doubles {
    fn default() -> Self {
        Self {
            steps: 12,
            save_every: 4,
            step_delay: Duration::ZERO,
            hours_per_step: 1e-3,
            diverge_at_lr: None,
            fits: true,
            preflight_errors: Vec::new(),
            crash_training: None,
            crash_artifact: None,
            crash_merge: false,
            artifact_delay: Duration::ZERO,
            merge_delay: Duration::ZERO,
            lr_grid: vec![2e-4, 1e-4, 4e-4, 5e-5],
            calls: Arc::default(),
            fired: Arc::default(),
            stop_now: Arc::default(),
        }
    }
}

impl Doubles {
    /// Default knobs.
    pub fn new() -> Self {
        Self::default()
    }

    /// A registry with every double registered under its contract name.
    pub fn registry(&self) -> SkillRegistry {
        SkillRegistry::new()
            .with(FakeDataset(self.clone()))
            .with(FakeConfig(self.clone()))
            .with(FakeHpo(self.clone()))
            .with(FakeTraining(self.clone()))
            .with(FakeEval(self.clone()))
            .with(FakeArtifact(self.clone()))
            .with(FakeMerge(self.clone()))
    }

    /// The calls made to `skill`, in order.
    pub fn calls_to(&self, skill: &str) -> Vec<serde_json::Value> {
        self.calls
            .lock()
            .map(|c| {
                c.iter()
                    .filter(|c| c.skill == skill)
                    .map(|c| c.input.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn log<T: serde::Serialize>(&self, skill: &str, input: &T) {
        if let Ok(mut c) = self.calls.lock() {
            c.push(Call {
                skill: skill.into(),
                input: serde_json::to_value(input).unwrap_or_default(),
            });
        }
    }

    /// True the first time `key` is asked (crash once, then behave).
    fn first_time(&self, key: &str) -> bool {
        let Ok(mut f) = self.fired.lock() else {
            return false;
        };
        !std::mem::replace(f.entry(key.to_string()).or_insert(false), true)
    }

    /// Makes the next training step cancel the run's token (a Ctrl-C double).
    pub fn cancel_during_training(&self) {
        self.stop_now.store(true, Ordering::SeqCst);
    }
}

fn crash(what: &str) -> SkillError {
    SkillError::new(
        ErrorKind::Io,
        format!("simulated crash {what} (fault injection)"),
    )
}

fn io_err(path: &Path, e: std::io::Error) -> SkillError {
    SkillError::io(path, &e)
}

/// The fake "quality" of a configuration: the eval loss it converges to.
pub fn fake_quality(c: &TrialConfig) -> f64 {
    let lr_term = (c.learning_rate / 2e-4).ln().powi(2) / std::f64::consts::LN_10.powi(2);
    0.4 + 0.3 * lr_term
        + 0.5 / f64::from(c.lora_rank.max(1)).sqrt()
        + 0.02 * c.lora_dropout
        + 0.001 * (c.seed % 7) as f64
}

fn loss_at(q: f64, step: u64, total: u64) -> f64 {
    let tau = (total as f64 / 3.0).max(1.0);
    q + (3.0 - q) * (-(step as f64) / tau).exp()
}

/// Dataset double: counts the non-empty lines of the file.
#[derive(Debug, Clone)]
pub struct FakeDataset(pub Doubles);

#[async_trait]
impl Skill for FakeDataset {
    type Input = DatasetAnalyzeInput;
    type Output = DatasetProfile;
    fn name(&self) -> &'static str {
        names::DATASET
    }
    fn description(&self) -> &'static str {
        "Test double of dataset_analyze."
    }
    async fn run(
        &self,
        input: DatasetAnalyzeInput,
        ctx: &SkillContext,
    ) -> Result<StepResult<DatasetProfile>, SkillError> {
        self.0.log(names::DATASET, &input);
        let path = ctx.resolve(&input.dataset_path);
        let text = std::fs::read_to_string(&path).map_err(|e| io_err(&path, e))?;
        let rows: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let avg = rows.iter().map(|r| r.len() as f64 / 4.0).sum::<f64>() / rows.len().max(1) as f64;
        let max = rows.iter().map(|r| r.len() as u64 / 4).max().unwrap_or(0);
        let profile: DatasetProfile = lora_skill::decode(json!({
            "total_samples": rows.len(),
            "format_detected": "jsonl",
            "has_instruction": true,
            "has_output": true,
            "avg_tokens": avg,
            "max_tokens": max,
            "columns": ["instruction", "output"],
            "duplicates_found": 0,
            "record_format": "alpaca",
            "record_formats": {"alpaca": rows.len()},
            "files": [path.display().to_string()],
            "bytes_read": text.len(),
            "invalid_rows": 0,
            "invalid_examples": [],
            "missing_targets": 0,
            "empty_targets": 0,
            "target_examples": [],
            "column_gaps": [],
            "duplicate_examples": [],
            "token_counter": {"kind": "chars/4", "exact": false, "rows_counted": rows.len(), "note": "double"},
            "token_percentiles": {"p50": max / 2, "p95": max, "p99": max},
            "token_histogram": [],
            "warnings": []
        }))?;
        Ok(StepResult::new(profile))
    }
}

/// Config double: the default trial, the default search space, a fixed memory estimate.
#[derive(Debug, Clone)]
pub struct FakeConfig(pub Doubles);

#[async_trait]
impl Skill for FakeConfig {
    type Input = LoRAConfigInput;
    type Output = LoRAConfigOutput;
    fn name(&self) -> &'static str {
        names::CONFIG
    }
    fn description(&self) -> &'static str {
        "Test double of lora_config."
    }
    async fn run(
        &self,
        input: LoRAConfigInput,
        _ctx: &SkillContext,
    ) -> Result<StepResult<LoRAConfigOutput>, SkillError> {
        self.0.log(names::CONFIG, &input);
        let errors = &self.0.preflight_errors;
        let out: LoRAConfigOutput = lora_skill::decode(json!({
            "trial_config": TrialConfig::default(),
            "search_space": lora_spec::trial::SearchSpace::default(),
            "memory_estimate": {"vram_gb": if self.0.fits { 0.5 } else { 99.0 }, "fits": self.0.fits, "model_params": 1_000_000},
            "preflight": {
                "ok": errors.is_empty(),
                "warnings": ["double: estimates are fake"],
                "errors": errors,
                "estimated_vram_mb": 500,
                "vram_breakdown": {"model_gb": 0.1, "lora_gb": 0.0, "optimizer_gb": 0.0, "gradients_gb": 0.0, "activations_gb": 0.1, "logits_gb": 0.1, "overhead_gb": 0.2, "runtime_gb": 0.0, "total_gb": 0.5, "total_with_buffer_gb": 0.5},
                "time_per_step_ms": 10.0,
                "throughput": {"tokens_per_sec": 1000.0, "samples_per_sec": 10.0}
            }
        }))?;
        Ok(StepResult::new(out))
    }
}

/// HPO double: walks a grid of learning rates × ranks, never repeating a tried pair.
#[derive(Debug, Clone)]
pub struct FakeHpo(pub Doubles);

#[async_trait]
impl Skill for FakeHpo {
    type Input = HPOInput;
    type Output = HPOOutput;
    fn name(&self) -> &'static str {
        names::HPO
    }
    fn description(&self) -> &'static str {
        "Test double of hpo."
    }
    async fn run(
        &self,
        input: HPOInput,
        _ctx: &SkillContext,
    ) -> Result<StepResult<HPOOutput>, SkillError> {
        self.0.log(names::HPO, &input);
        let tried: Vec<(u64, u32)> = input
            .trial_history
            .iter()
            .map(|t| (t.config.learning_rate.to_bits(), t.config.lora_rank))
            .collect();
        let mut suggestions = Vec::new();
        if input.trials_remaining > 0 {
            'outer: for r in &input.search_space.rank_choices {
                for lr in &self.0.lr_grid {
                    if !tried.contains(&(lr.to_bits(), *r)) {
                        let c = TrialConfig {
                            learning_rate: *lr,
                            lora_rank: *r,
                            lora_alpha: f64::from(*r) * 2.0,
                            ..TrialConfig::default()
                        };
                        suggestions.push(Suggestion {
                            trial_config: c,
                            rationale: format!("grid point lr {lr:.0e} rank {r}"),
                            strategy: Strategy::Random,
                            predicted_gpu_hours: None,
                            stop_at_step: None,
                        });
                        break 'outer;
                    }
                }
            }
        }
        let out: HPOOutput = lora_skill::decode(json!({
            "suggestions": suggestions,
            "strategy_used": "random",
        }))?;
        Ok(StepResult::new(out))
    }
}

/// Training double: writes checkpoints, metrics.jsonl and an adapter folder.
#[derive(Debug, Clone)]
pub struct FakeTraining(pub Doubles);

fn total_steps(d: &Doubles, c: &TrialConfig) -> u64 {
    c.max_steps.unwrap_or(d.steps)
}

#[async_trait]
impl Skill for FakeTraining {
    type Input = TrainingRequest;
    type Output = TrainingReport;
    fn name(&self) -> &'static str {
        names::TRAINING
    }
    fn description(&self) -> &'static str {
        "Test double of training."
    }
    fn requires_gpu(&self) -> bool {
        true
    }
    async fn run(
        &self,
        input: TrainingRequest,
        ctx: &SkillContext,
    ) -> Result<StepResult<TrainingReport>, SkillError> {
        self.0.log(names::TRAINING, &input);
        let d = &self.0;
        let c = input.trial_config.normalized();
        let total = total_steps(d, &c);
        if input.dry_run {
            return Ok(StepResult::new(report(
                TrainingOutput {
                    status: TrainingStatus::DryRun,
                    adapter_path: None,
                    training_steps: total,
                    gpu_hours: total as f64 * d.hours_per_step,
                    final_loss: None,
                },
                total,
                None,
            )));
        }
        let out = ctx.resolve(&input.output_dir);
        std::fs::create_dir_all(&out).map_err(|e| io_err(&out, e))?;
        let mut q = fake_quality(&c);
        if let Some(init) = input
            .init_adapter
            .as_deref()
            .and_then(|p| read_fake_loss(&ctx.resolve(p)))
        {
            q = q.min(init) - 0.05;
        }
        let mut start = 0;
        if let Some(r) = &input.resume_from {
            let p = ctx.resolve(r).join("state.json");
            let text = std::fs::read_to_string(&p).map_err(|e| io_err(&p, e))?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
                SkillError::invalid_input(format!("bad checkpoint: {e}"))
                    .with_file(p.display().to_string())
            })?;
            start = v["step"].as_u64().unwrap_or(0);
        }
        // metrics.jsonl: keep the lines up to the checkpoint.
        let metrics = out.join("metrics.jsonl");
        let mut lines: Vec<String> = std::fs::read_to_string(&metrics)
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                serde_json::from_str::<serde_json::Value>(l)
                    .ok()
                    .and_then(|v| v["step"].as_u64())
                    .is_some_and(|s| s <= start)
            })
            .map(String::from)
            .collect();
        let mut bar = ctx.progress(format!("trial {}", c.trial_id), Some(total), "steps");
        let diverges = d.diverge_at_lr.is_some_and(|lr| c.learning_rate >= lr);
        let mut last = None;
        for step in start + 1..=total {
            ctx.check_cancelled()?;
            if d.stop_now.swap(false, Ordering::SeqCst) {
                ctx.cancel_token().cancel();
                return Err(SkillError::cancelled());
            }
            if d.crash_training == Some((c.trial_id, step))
                && d.first_time(&format!("train-{}-{step}", c.trial_id))
            {
                return Err(crash(&format!("in trial {} at step {step}", c.trial_id)));
            }
            if !d.step_delay.is_zero() {
                tokio::time::sleep(d.step_delay).await;
            }
            let loss = if diverges && step >= 3 {
                f64::NAN
            } else {
                loss_at(q, step, total)
            };
            lines.push(json!({"step": step, "loss": if loss.is_finite() { json!(loss) } else { json!(null) }}).to_string());
            // Plain write (no fsync per step): a torn last line is skipped by readers.
            std::fs::write(&metrics, lines.join("\n") + "\n").map_err(|e| io_err(&metrics, e))?;
            bar.update(step, None, &[("loss", loss)]);
            if !loss.is_finite() {
                return Ok(StepResult::new(report(
                    TrainingOutput {
                        status: TrainingStatus::Failed,
                        adapter_path: None,
                        training_steps: step,
                        gpu_hours: step as f64 * d.hours_per_step,
                        final_loss: Some(loss),
                    },
                    total,
                    Some(format!("diverged: loss NaN at step {step}")),
                )));
            }
            last = Some(loss);
            if step % d.save_every.max(1) == 0 && step < total {
                // Published whole, as the real trainer does: built in a
                // hidden folder, then renamed into place.
                let ck = out.join(format!("checkpoint-{step}"));
                let tmp = out.join(format!(".checkpoint-{step}.tmp"));
                lora_skill::fs::write_json_atomic(&tmp.join("state.json"), &json!({"step": step}))
                    .map_err(|e| io_err(&tmp, e))?;
                if ck.exists() {
                    std::fs::remove_dir_all(&ck).map_err(|e| io_err(&ck, e))?;
                }
                lora_skill::fs::publish_dir(&tmp, &ck).map_err(|e| io_err(&ck, e))?;
            }
        }
        bar.finish("done");
        let adapter = out.join("adapter");
        write_fake_adapter(&adapter, &c, q + 0.05)?;
        let mut r = report(
            TrainingOutput {
                status: TrainingStatus::Completed,
                adapter_path: Some(adapter.display().to_string()),
                training_steps: total,
                gpu_hours: total as f64 * d.hours_per_step,
                final_loss: last,
            },
            total,
            None,
        );
        if input.eval_dataset_path.is_some() {
            r.eval_history = vec![EvalPoint {
                step: total,
                eval_loss: q + 0.05,
                eval_token_accuracy: 0.5,
            }];
        }
        r.metrics_path = Some(metrics.display().to_string());
        Ok(StepResult::new(r))
    }
}

/// A training report around the seed fields.
fn report(output: TrainingOutput, planned: u64, reason: Option<String>) -> TrainingReport {
    TrainingReport {
        output,
        reason,
        planned_steps: planned,
        eval_history: Vec::new(),
        metrics_path: None,
        checkpoint_path: None,
        peak_rss_mb: None,
        tokens_per_s: None,
        tokens_seen: 0,
        train_samples: 0,
        truncated_samples: 0,
        dropped_samples: 0,
        trained_token_fraction: 1.0,
        packing_efficiency: 1.0,
        trainable_params: 0,
        device: "cpu".into(),
    }
}

/// Writes a PEFT-looking adapter folder whose config records its fake eval loss.
pub fn write_fake_adapter(dir: &Path, c: &TrialConfig, eval_loss: f64) -> Result<(), SkillError> {
    let cfg = json!({
        "peft_type": "LORA",
        "r": c.lora_rank,
        "lora_alpha": c.lora_alpha,
        "target_modules": c.target_modules,
        "fake_eval_loss": eval_loss,
    });
    lora_skill::fs::write_json_atomic(&dir.join("adapter_config.json"), &cfg)
        .map_err(|e| io_err(dir, e))?;
    let bytes: Vec<u8> = Sha256::digest(cfg.to_string().as_bytes())
        .iter()
        .cycle()
        .take(256)
        .copied()
        .collect();
    lora_skill::fs::write_atomic(&dir.join("adapter_model.safetensors"), &bytes)
        .map_err(|e| io_err(dir, e))
}

/// The fake eval loss of an adapter folder.
pub fn read_fake_loss(dir: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(dir.join("adapter_config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["fake_eval_loss"].as_f64()
}

/// Eval double: reads the adapter's recorded loss; the base model's loss is 2.5.
#[derive(Debug, Clone)]
pub struct FakeEval(pub Doubles);

/// The base model's eval loss in the doubles.
pub const FAKE_BASE_LOSS: f64 = 2.5;

#[async_trait]
impl Skill for FakeEval {
    type Input = EvalRequest;
    type Output = EvalReport;
    fn name(&self) -> &'static str {
        names::EVAL
    }
    fn description(&self) -> &'static str {
        "Test double of eval."
    }
    async fn run(
        &self,
        input: EvalRequest,
        ctx: &SkillContext,
    ) -> Result<StepResult<EvalReport>, SkillError> {
        self.0.log(names::EVAL, &input);
        let loss = match &input.adapter_path {
            Some(a) => {
                let p = ctx.resolve(a);
                read_fake_loss(&p)
                    .ok_or_else(|| SkillError::not_found(format!("{}: no adapter", p.display())))?
            }
            None => FAKE_BASE_LOSS,
        };
        let generations = (0..u64::from(input.generate_samples.unwrap_or(0)))
            .map(|i| GeneratedSample {
                index: i,
                completion: format!("answer {i} at loss {loss:.3}"),
                reference: format!("answer {i}"),
                exact_match: false,
            })
            .collect();
        Ok(StepResult::new(EvalReport {
            output: EvalOutput {
                eval_loss: loss,
                eval_perplexity: loss.exp(),
                base_loss: input.compute_delta.then_some(FAKE_BASE_LOSS),
                delta_vs_base_loss: input.compute_delta.then_some(loss - FAKE_BASE_LOSS),
            },
            base_perplexity: input.compute_delta.then_some(FAKE_BASE_LOSS.exp()),
            token_accuracy: 0.5,
            base_token_accuracy: None,
            exact_match: None,
            samples: 4,
            tokens: 100,
            generations,
            generation_tokens_per_s: None,
            device: "cpu".into(),
            sample_losses: if input.per_sample {
                Some(fake_sample_losses(&ctx.resolve(&input.eval_dataset_path))?)
            } else {
                None
            },
        }))
    }
}

/// The double's per-sample loss: 100 / characters of the row, so the loss
/// order is the reverse of the length order (a test can tell them apart).
fn fake_sample_losses(data: &Path) -> Result<Vec<Option<f64>>, SkillError> {
    let text = std::fs::read_to_string(data).map_err(|e| io_err(data, e))?;
    Ok(text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| Some(100.0 / l.chars().count() as f64))
        .collect())
}

fn hash_dir(dir: &Path) -> Result<String, SkillError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| io_err(dir, e))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    let mut h = Sha256::new();
    for f in files {
        h.update(
            f.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
                .as_bytes(),
        );
        h.update(std::fs::read(&f).map_err(|e| io_err(&f, e))?);
    }
    Ok(hex::encode(h.finalize()))
}

/// Artifact double: copies the adapter into `store_root/<hash>` and numbers
/// versions in an index file; the same (trial, hash) is reused, not renumbered.
#[derive(Debug, Clone)]
pub struct FakeArtifact(pub Doubles);

#[async_trait]
impl Skill for FakeArtifact {
    type Input = ArtifactStoreInput;
    type Output = ArtifactStoreOutput;
    fn name(&self) -> &'static str {
        names::ARTIFACT
    }
    fn description(&self) -> &'static str {
        "Test double of artifact_store."
    }
    async fn run(
        &self,
        input: ArtifactStoreInput,
        ctx: &SkillContext,
    ) -> Result<StepResult<ArtifactStoreOutput>, SkillError> {
        self.0.log(names::ARTIFACT, &input);
        let src = ctx.resolve(&input.adapter_path);
        let hash = hash_dir(&src)?;
        let root = ctx.resolve(
            input
                .store_root
                .clone()
                .unwrap_or_else(|| "artifacts".into()),
        );
        let stored = root.join(&hash);
        if !stored.exists() {
            let tmp = root.join(format!(".{hash}.tmp"));
            let _ = std::fs::remove_dir_all(&tmp);
            std::fs::create_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
            for e in std::fs::read_dir(&src)
                .map_err(|e| io_err(&src, e))?
                .flatten()
            {
                std::fs::copy(e.path(), tmp.join(e.file_name()))
                    .map_err(|er| io_err(&e.path(), er))?;
            }
            lora_skill::fs::publish_dir(&tmp, &stored).map_err(|e| io_err(&stored, e))?;
        }
        if !self.0.artifact_delay.is_zero() {
            tokio::time::sleep(self.0.artifact_delay).await;
        }
        if self.0.crash_artifact == Some(input.trial_id)
            && self.0.first_time(&format!("artifact-{}", input.trial_id))
        {
            return Err(crash(&format!("while storing trial {}", input.trial_id)));
        }
        let index_path = root.join("index.json");
        let mut index: Vec<(u32, String)> = std::fs::read_to_string(&index_path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default();
        let (n, reused) = match index
            .iter()
            .position(|(t, h)| *t == input.trial_id && *h == hash)
        {
            Some(i) => (i + 1, true),
            None => {
                index.push((input.trial_id, hash.clone()));
                lora_skill::fs::write_json_atomic(&index_path, &index)
                    .map_err(|e| io_err(&index_path, e))?;
                (index.len(), false)
            }
        };
        let out: ArtifactStoreOutput = lora_skill::decode(json!({
            "version": format!("v{n}"),
            "adapter_hash": hash,
            "stored_path": stored.display().to_string(),
            "experiment_id": input.experiment_id,
            "trial_id": input.trial_id,
            "created_at": "1970-01-01T00:00:00Z",
            "reused": reused,
            "files": 2,
            "bytes": 0,
            "bytes_written": 0
        }))?;
        Ok(StepResult::new(out))
    }
}

/// Merge double: writes the output (a folder, or a `.gguf` file) recording the adapter's loss.
#[derive(Debug, Clone)]
pub struct FakeMerge(pub Doubles);

#[async_trait]
impl Skill for FakeMerge {
    type Input = MergeInput;
    type Output = MergeOutput;
    fn name(&self) -> &'static str {
        names::MERGE
    }
    fn description(&self) -> &'static str {
        "Test double of merge."
    }
    fn requires_gpu(&self) -> bool {
        true
    }
    async fn run(
        &self,
        input: MergeInput,
        ctx: &SkillContext,
    ) -> Result<StepResult<MergeOutput>, SkillError> {
        self.0.log(names::MERGE, &input);
        let out = ctx.resolve(input.output_path.clone().unwrap_or_else(|| "merged".into()));
        let loss = read_fake_loss(&ctx.resolve(&input.adapter_path));
        let body = json!({"base": input.base_model, "adapter": input.adapter_path, "fake_eval_loss": loss}).to_string();
        let is_file = out.extension().is_some_and(|e| e == "gguf");
        if let Some(comb) = &input.combination {
            // As the real skill: the combined adapter goes to `adapter_path`
            // (a new folder), then it is exported to `output_path`. Here it is
            // a weighted adapter slightly better than its members' mix.
            let mut loss = 0.0;
            for (a, w) in comb.adapters.iter().zip(&comb.weights) {
                let l = read_fake_loss(&ctx.resolve(a))
                    .ok_or_else(|| SkillError::not_found(format!("{a}: no adapter")))?;
                loss += w * l;
            }
            let combined = ctx.resolve(&input.adapter_path);
            if combined.exists() {
                return Err(SkillError::invalid_input(format!(
                    "{} already exists",
                    combined.display()
                ))
                .with_field("combination.adapter_path"));
            }
            write_fake_adapter(&combined, &TrialConfig::default(), loss - 0.02)?;
            lora_skill::fs::write_atomic(&out, body.as_bytes()).map_err(|e| io_err(&out, e))?;
            return Ok(StepResult::new(MergeOutput {
                merged_path: out.display().to_string(),
                output_format: input.output_format,
                max_abs_logit_diff: None,
                ..MergeOutput::default()
            }));
        }
        if out.exists() {
            return Err(SkillError::invalid_input(format!(
                "{} already exists",
                out.display()
            )));
        }
        if self.0.crash_merge && self.0.first_time("merge") {
            // Leave a partial output behind, as a killed writer would.
            let part = if is_file {
                out.clone()
            } else {
                out.join("model-00001.safetensors")
            };
            if let Some(p) = part.parent() {
                std::fs::create_dir_all(p).map_err(|e| io_err(p, e))?;
            }
            std::fs::write(&part, b"partial").map_err(|e| io_err(&part, e))?;
            return Err(crash("during the merge"));
        }
        if !self.0.merge_delay.is_zero() {
            // Part of the output exists while the merge works, as with a real writer.
            let part = if is_file {
                out.with_extension("gguf.part")
            } else {
                out.join("model-00001.safetensors")
            };
            if let Some(p) = part.parent() {
                std::fs::create_dir_all(p).map_err(|e| io_err(p, e))?;
            }
            std::fs::write(&part, b"partial").map_err(|e| io_err(&part, e))?;
            tokio::time::sleep(self.0.merge_delay).await;
            std::fs::remove_file(&part).map_err(|e| io_err(&part, e))?;
        }
        if is_file {
            lora_skill::fs::write_atomic(&out, body.as_bytes()).map_err(|e| io_err(&out, e))?;
        } else {
            lora_skill::fs::write_atomic(&out.join("model.safetensors"), body.as_bytes())
                .map_err(|e| io_err(&out, e))?;
        }
        Ok(StepResult::new(MergeOutput {
            merged_path: out.display().to_string(),
            output_format: input.output_format,
            max_abs_logit_diff: input.validate_after_merge.then_some(1e-6),
            ..MergeOutput::default()
        }))
    }
}
