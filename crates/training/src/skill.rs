//! `TrainingSkill` (seed 001 §4): the trainer behind the `training` skill.
//!
//! Input: [`TrainingRequest`] (every `TrainingInput` is one). Output:
//! [`TrainingReport`], whose flattened seed fields decode as a
//! `TrainingOutput`. Files written under `output_dir`: `adapter/` (PEFT
//! format, completed runs), `checkpoints/checkpoint-N/` (resumable),
//! `metrics.jsonl` (one line per step: loss, lr, grad_norm, tokens_per_s,
//! step_time_s, peak_rss_mb; and one per eval: eval_loss, eval_token_accuracy).

use std::path::{Path, PathBuf};

use async_trait::async_trait;
use lora_skill::{Progress, Skill, SkillContext, SkillError, StepResult};
use lora_spec::contracts::names;
use lora_spec::contracts::training::{
    EvalPoint, TrainingOutput, TrainingReport, TrainingRequest, TrainingStatus,
};
use tch::Device;

use crate::error::TrainError;
use crate::trainer::{Monitor, Outcome, Plan, StepMetrics, TrainOptions, prepare_run, train};

/// The `training` skill.
#[derive(Debug, Clone, Copy, Default)]
pub struct TrainingSkill;

/// Parses a device name (`auto`, `cpu`, `cuda`, `cuda:N`).
pub fn parse_device(name: Option<&str>) -> Result<Device, TrainError> {
    match name.map(str::trim) {
        None | Some("") | Some("auto") => Ok(Device::cuda_if_available()),
        Some("cpu") => Ok(Device::Cpu),
        Some(d) if d == "cuda" || d.starts_with("cuda:") => {
            let idx = d
                .strip_prefix("cuda:")
                .map_or(Ok(0), str::parse::<usize>)
                .map_err(|_| {
                    TrainError::config(
                        "device",
                        format!("bad device `{d}`"),
                        "use cpu, cuda or cuda:N",
                    )
                })?;
            if !tch::Cuda::is_available() {
                return Err(TrainError::config(
                    "device",
                    format!("`{d}` requested but CUDA is not available"),
                    "use device: cpu or auto",
                ));
            }
            Ok(Device::Cuda(idx))
        }
        Some(other) => Err(TrainError::config(
            "device",
            format!("unknown device `{other}`"),
            "use auto, cpu, cuda or cuda:N",
        )),
    }
}

/// A device's short name.
pub fn device_name(d: Device) -> String {
    match d {
        Device::Cuda(i) => format!("cuda:{i}"),
        Device::Mps => "mps".into(),
        Device::Vulkan => "vulkan".into(),
        Device::Cpu => "cpu".into(),
    }
}

/// Resolves a base model name to a local folder with config.json.
pub fn resolve_model_dir(ctx: &SkillContext, name: &str) -> Result<PathBuf, SkillError> {
    let p = ctx.resolve(name);
    if p.join("config.json").is_file() {
        return Ok(p);
    }
    Err(SkillError::not_found(format!(
        "base model `{name}`: no config.json in {}",
        p.display()
    ))
    .with_field("trial_config.base_model")
    .with_hint("give a local Hugging Face model folder (config.json, model.safetensors, tokenizer.json); `lora-trainer model import` makes one from a GGUF"))
}

/// Builds the trainer's options from a request.
pub fn options_from_request(
    req: &TrainingRequest,
    ctx: &SkillContext,
) -> Result<TrainOptions, SkillError> {
    let base = req.trial_config.base_model.clone().ok_or_else(|| {
        SkillError::invalid_input("no base model")
            .with_field("trial_config.base_model")
            .with_hint("set base_model to a local model folder")
    })?;
    let model_dir = resolve_model_dir(ctx, &base)?;
    let out = ctx.resolve(&req.output_dir);
    let mut o = TrainOptions::new(
        req.trial_config.clone(),
        &model_dir,
        &ctx.resolve(&req.dataset_path),
        &out,
    );
    o.base_model_name = base;
    o.eval_data = req.eval_dataset_path.as_ref().map(|p| ctx.resolve(p));
    if let Some(f) = req.eval_holdout_fraction {
        if !(0.0..0.5).contains(&f) {
            return Err(
                SkillError::invalid_input(format!("must be in [0, 0.5) (got {f})"))
                    .with_field("eval_holdout_fraction")
                    .with_hint("for example 0.05"),
            );
        }
        o.eval_holdout_fraction = f;
    }
    o.resume_from = req.resume_from.as_ref().map(|p| ctx.resolve(p));
    o.init_adapter = req.init_adapter.as_ref().map(|p| ctx.resolve(p));
    o.device = parse_device(req.device.as_deref()).map_err(SkillError::from)?;
    o.threads = req.threads.map(|t| t.max(1) as i32);
    o.stop_after_steps = req.stop_after_steps;
    o.keep_checkpoints = req.keep_checkpoints.map_or(2, |k| k.max(1) as usize);
    Ok(o)
}

struct CtxMonitor {
    ctx: SkillContext,
    bar: Option<Progress>,
    label: String,
}

impl Monitor for CtxMonitor {
    fn cancelled(&self) -> bool {
        self.ctx.is_cancelled()
    }
    fn on_plan(&mut self, plan: &Plan, start: u64) {
        self.ctx.info(format!(
            "{} training samples ({} truncated, {} dropped without targets, {:.0}% tokens trained), {} eval samples; {} steps ({} micro-batches each), warm-up {}",
            plan.train_samples,
            plan.truncated,
            plan.dropped,
            plan.trained_fraction * 100.0,
            plan.eval_samples,
            plan.total_steps,
            plan.gradient_accumulation,
            plan.warmup_steps
        ));
        let mut bar = self
            .ctx
            .progress(self.label.clone(), Some(plan.total_steps), "steps");
        if start > 0 {
            bar.update(start, Some(format!("resumed at step {start}")), &[]);
        }
        self.bar = Some(bar);
    }
    fn on_step(&mut self, m: &StepMetrics) {
        if let Some(b) = self.bar.as_mut() {
            b.update(
                m.step,
                Some(format!(
                    "loss {:.4} lr {:.2e} {:.0} tok/s",
                    m.loss, m.lr, m.tokens_per_s
                )),
                &[
                    ("loss", m.loss),
                    ("lr", m.lr),
                    ("grad_norm", m.grad_norm),
                    ("tokens_per_s", m.tokens_per_s),
                ],
            );
        }
    }
    fn on_eval(&mut self, e: &EvalPoint) -> bool {
        self.ctx.info(format!(
            "step {}: eval loss {:.4}, token accuracy {:.3}",
            e.step, e.eval_loss, e.eval_token_accuracy
        ));
        true
    }
    fn on_log(&mut self, msg: &str) {
        self.ctx.info(msg.to_string());
    }
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

/// Runs a request to the end (blocking; call from a blocking thread).
pub fn run_blocking(
    req: &TrainingRequest,
    ctx: &SkillContext,
) -> Result<StepResult<TrainingReport>, SkillError> {
    let opts = options_from_request(req, ctx)?;
    if req.dry_run {
        let prep = prepare_run(&opts)?;
        let p = &prep.plan;
        let report = TrainingReport {
            output: TrainingOutput {
                status: TrainingStatus::DryRun,
                adapter_path: None,
                training_steps: p.total_steps,
                gpu_hours: 0.0,
                final_loss: None,
            },
            reason: None,
            planned_steps: p.total_steps,
            eval_history: Vec::new(),
            metrics_path: None,
            checkpoint_path: None,
            peak_rss_mb: None,
            tokens_per_s: None,
            tokens_seen: 0,
            train_samples: p.train_samples as u64,
            truncated_samples: p.truncated as u64,
            dropped_samples: p.dropped as u64,
            trained_token_fraction: p.trained_fraction,
            packing_efficiency: p.packing_efficiency,
            trainable_params: 0,
            device: device_name(opts.device),
        };
        let text = format!(
            "dry run: {} samples, {} steps of {} micro-batches, template {}",
            p.train_samples, p.total_steps, p.gradient_accumulation, p.template
        );
        return Ok(StepResult::new(report).with_text(text));
    }
    let mut mon = CtxMonitor {
        ctx: ctx.clone(),
        bar: None,
        label: format!("train trial {}", req.trial_config.trial_id),
    };
    let r = train(&opts, &mut mon)?;
    let (status, reason) = match &r.outcome {
        Outcome::Completed => (TrainingStatus::Completed, None),
        Outcome::Failed(m) => (TrainingStatus::Failed, Some(m.clone())),
        Outcome::Stopped(m) => (TrainingStatus::Stopped, Some(m.clone())),
    };
    if let Some(b) = mon.bar.take() {
        b.finish(match &reason {
            Some(m) => m.clone(),
            None => format!(
                "done, loss {:.4}",
                r.losses.last().copied().unwrap_or(f64::NAN)
            ),
        });
    }
    if r.outcome == Outcome::Stopped("cancelled".into()) {
        return Err(SkillError::cancelled());
    }
    let final_loss = r.losses.last().copied().filter(|l| l.is_finite());
    let report = TrainingReport {
        output: TrainingOutput {
            status,
            adapter_path: r.adapter_path.as_deref().map(path_str),
            training_steps: r.steps,
            gpu_hours: r.train_seconds / 3600.0,
            final_loss,
        },
        reason: reason.clone(),
        planned_steps: r.plan.total_steps,
        eval_history: r.eval_history.clone(),
        metrics_path: Some(path_str(&r.metrics_path)),
        checkpoint_path: r.checkpoint_path.as_deref().map(path_str),
        peak_rss_mb: r.peak_rss_mb,
        tokens_per_s: (r.train_seconds > 0.0).then(|| r.tokens_seen as f64 / r.train_seconds),
        tokens_seen: r.tokens_seen,
        train_samples: r.plan.train_samples as u64,
        truncated_samples: r.plan.truncated as u64,
        dropped_samples: r.plan.dropped as u64,
        trained_token_fraction: r.plan.trained_fraction,
        packing_efficiency: r.plan.packing_efficiency,
        trainable_params: r.trainable_params,
        device: device_name(r.device),
    };
    let text = match &reason {
        Some(m) => format!(
            "{:?} after {} of {} steps: {m}",
            status, r.steps, r.plan.total_steps
        ),
        None => format!(
            "trained {} steps, final loss {:.4}, adapter in {}",
            r.steps,
            final_loss.unwrap_or(f64::NAN),
            report.output.adapter_path.clone().unwrap_or_default()
        ),
    };
    let mut res = StepResult::new(report.clone()).with_text(text);
    if let Some(m) = reason {
        res = res.with_meta("reason", m);
    }
    for a in [
        &report.output.adapter_path,
        &report.metrics_path,
        &report.checkpoint_path,
    ]
    .into_iter()
    .flatten()
    {
        res = res.with_artifact(a.clone());
    }
    Ok(res)
}

#[async_trait]
impl Skill for TrainingSkill {
    type Input = TrainingRequest;
    type Output = TrainingReport;

    fn name(&self) -> &'static str {
        names::TRAINING
    }

    fn description(&self) -> &'static str {
        "Train a LoRA adapter on a base model with SFT (AdamW, warm-up + cosine/linear/constant \
         schedule, token-normalised gradient accumulation, completion-only loss, checkpoints with \
         exact resume, divergence stop). Writes adapter/ (PEFT format), checkpoints/ and metrics.jsonl."
    }

    fn requires_gpu(&self) -> bool {
        true
    }

    async fn run(
        &self,
        input: TrainingRequest,
        ctx: &SkillContext,
    ) -> Result<StepResult<TrainingReport>, SkillError> {
        let ctx2 = ctx.clone();
        tokio::task::spawn_blocking(move || {
            let _g = ctx2.span().clone().entered();
            run_blocking(&input, &ctx2)
        })
        .await
        .map_err(|e| SkillError::backend(format!("the training task failed: {e}")))?
    }
}
