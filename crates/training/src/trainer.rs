//! The SFT training loop: data → LoRA model → AdamW steps with gradient
//! accumulation, clipping and a schedule; eval every N steps; atomic
//! checkpoints every N steps; exact resume; divergence stop.
//!
//! Reproducibility: the adapter init, the data order (per epoch) and the
//! dropout stream (re-seeded each step from `(seed, step)`) are functions of
//! the seed and the position, so the same seed gives the same losses and a
//! stopped-and-resumed run gives the losses of an uninterrupted one, bit for
//! bit on the CPU with the same thread count.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use lora_engine::LlamaModel;
use lora_engine::lora::{self, LoraSpec};
use lora_spec::trial::TrialConfig;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::SeedableRng;
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::batch::{
    Batch, BatchPlanConfig, Row, TokenizedSample, collate, epoch_plan, packing_efficiency,
};
use crate::checkpoint::{self, DataPosition, EvalPoint, TrainerState};
use crate::data::{DataOptions, TextPipeline, prepare};
use crate::error::{Result, TrainError};
use crate::loss::{DEFAULT_CHUNK_ELEMENTS, LossStats, chunked_cross_entropy_grad};
use crate::optim::{AdamW, AdamWConfig};
use crate::schedule::Schedule;
use crate::step::{TrainableModel, accumulate_gradients, evaluate_batches};

/// Metrics file name in the output folder.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// Final adapter folder name in the output folder.
pub const ADAPTER_DIR: &str = "adapter";
/// Checkpoints folder name in the output folder.
pub const CHECKPOINTS_DIR: &str = "checkpoints";

/// Everything one training run needs.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// The trial (normalised inside).
    pub trial: TrialConfig,
    /// The base model folder (config.json, safetensors, tokenizer.json).
    pub model_dir: PathBuf,
    /// The base model as the user named it (recorded in adapter_config.json).
    pub base_model_name: String,
    /// Training data.
    pub train_data: PathBuf,
    /// Held-out data.
    pub eval_data: Option<PathBuf>,
    /// Without `eval_data`: fraction of training rows held out when `eval_steps` is set.
    pub eval_holdout_fraction: f64,
    /// Output folder (adapter/, checkpoints/, metrics.jsonl).
    pub output_dir: PathBuf,
    /// A checkpoint folder to resume from.
    pub resume_from: Option<PathBuf>,
    /// A PEFT adapter to start from instead of a fresh one.
    pub init_adapter: Option<PathBuf>,
    /// Device.
    pub device: Device,
    /// libtorch CPU threads.
    pub threads: Option<i32>,
    /// Pause after this many steps (status stopped, checkpoint written).
    pub stop_after_steps: Option<u64>,
    /// Checkpoints kept.
    pub keep_checkpoints: usize,
    /// Logits chunk size (elements) of the cross-entropy.
    pub chunk_elements: i64,
}

impl TrainOptions {
    /// Options with defaults for everything but the essentials.
    pub fn new(trial: TrialConfig, model_dir: &Path, train_data: &Path, output_dir: &Path) -> Self {
        Self {
            trial,
            model_dir: model_dir.to_path_buf(),
            base_model_name: model_dir.display().to_string(),
            train_data: train_data.to_path_buf(),
            eval_data: None,
            eval_holdout_fraction: 0.05,
            output_dir: output_dir.to_path_buf(),
            resume_from: None,
            init_adapter: None,
            device: Device::cuda_if_available(),
            threads: None,
            stop_after_steps: None,
            keep_checkpoints: 2,
            chunk_elements: DEFAULT_CHUNK_ELEMENTS,
        }
    }
}

/// One optimiser step's numbers (also a line of metrics.jsonl).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StepMetrics {
    /// Steps done (1-based count after this step).
    pub step: u64,
    /// Steps planned.
    pub total_steps: u64,
    /// Fractional epoch.
    pub epoch: f64,
    /// Mean token loss of the effective batch.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Real tokens processed.
    pub tokens: i64,
    /// Target tokens (with loss).
    pub targets: i64,
    /// Wall time of the step.
    pub step_time_s: f64,
    /// Real tokens per second.
    pub tokens_per_s: f64,
    /// Peak resident memory so far (MB).
    pub peak_rss_mb: Option<f64>,
}

/// The plan of a run, known before any tensor work.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    /// Training samples.
    pub train_samples: usize,
    /// Eval samples.
    pub eval_samples: usize,
    /// Micro-batches per epoch.
    pub micro_batches_per_epoch: usize,
    /// Micro-batches per optimiser step.
    pub gradient_accumulation: u64,
    /// Optimiser steps planned.
    pub total_steps: u64,
    /// Warm-up steps.
    pub warmup_steps: u64,
    /// Samples cut at max_seq_length.
    pub truncated: usize,
    /// Samples dropped (no trainable token).
    pub dropped: usize,
    /// Trained tokens / all tokens.
    pub trained_fraction: f64,
    /// Real tokens / batch slots of epoch 0.
    pub packing_efficiency: f64,
    /// Samples ending in an unmasked stop token.
    pub ends_with_eos: usize,
    /// Template used.
    pub template: String,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// All planned steps done.
    Completed,
    /// Diverged or broke; the reason.
    Failed(String),
    /// Paused on request or pruned; the reason. Resumable from the checkpoint.
    Stopped(String),
}

/// What a run produced.
#[derive(Debug, Clone)]
pub struct TrainResult {
    /// How it ended.
    pub outcome: Outcome,
    /// The plan.
    pub plan: Plan,
    /// Optimiser steps done.
    pub steps: u64,
    /// Loss of every step (including the resumed part's history).
    pub losses: Vec<f64>,
    /// Evaluations.
    pub eval_history: Vec<EvalPoint>,
    /// Final adapter folder (completed runs).
    pub adapter_path: Option<PathBuf>,
    /// Newest checkpoint.
    pub checkpoint_path: Option<PathBuf>,
    /// metrics.jsonl.
    pub metrics_path: PathBuf,
    /// Wall seconds of training (all sessions).
    pub train_seconds: f64,
    /// Tokens processed (all sessions).
    pub tokens_seen: u64,
    /// Peak resident memory (MB) of this process.
    pub peak_rss_mb: Option<f64>,
    /// Trainable parameters.
    pub trainable_params: u64,
    /// Device.
    pub device: Device,
}

/// Receives a run's events; every method has a do-nothing default.
pub trait Monitor {
    /// Polled between steps; true stops the run (as `Stopped("cancelled")`, checkpoint kept).
    fn cancelled(&self) -> bool {
        false
    }
    /// The plan is known (before the model loads).
    fn on_plan(&mut self, _plan: &Plan, _start_step: u64) {}
    /// A step finished.
    fn on_step(&mut self, _m: &StepMetrics) {}
    /// An evaluation finished; return false to stop the run (pruning).
    fn on_eval(&mut self, _e: &EvalPoint) -> bool {
        true
    }
    /// A log line.
    fn on_log(&mut self, _msg: &str) {}
}

/// A monitor that ignores everything.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoMonitor;
impl Monitor for NoMonitor {}

/// Peak resident set size of this process in MB (Linux `VmHWM`), if known.
pub fn peak_rss_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// The engine's model as the trainer sees it.
pub struct EngineModel<'a> {
    /// The model.
    pub model: &'a LlamaModel,
    /// Train with the engine's hand-written backward where it applies (CPU,
    /// fp32, unpacked causal batches); else autograd.
    pub fused: bool,
}

impl<'a> EngineModel<'a> {
    /// `model`, trained by the fused pass where it applies.
    pub fn new(model: &'a LlamaModel) -> Self {
        Self { model, fused: true }
    }

    /// `model`, always trained through autograd.
    pub fn autograd(model: &'a LlamaModel) -> Self {
        Self {
            model,
            fused: false,
        }
    }
}

impl TrainableModel for EngineModel<'_> {
    fn hidden_states(&self, batch: &Batch, train: bool) -> Result<Tensor> {
        let device = self.model.device();
        Ok(tch::autocast(device.is_cuda(), || {
            match &batch.attention_mask {
                // Packed rows: block-diagonal causal attention, positions restart per sample.
                Some(attend) => self.model.forward_hidden_attend(
                    &batch.input_ids,
                    &batch.position_ids,
                    attend,
                    train,
                ),
                None => self.model.forward_hidden_t(
                    &batch.input_ids,
                    None,
                    Some(&batch.position_ids),
                    None,
                    train,
                ),
            }
        })?)
    }
    fn output_weight(&self) -> Tensor {
        self.model.lm_head.weight.shallow_clone()
    }
    fn fused_step(
        &self,
        batch: &Batch,
        weight: &Tensor,
        norm: f64,
        chunk_elements: i64,
    ) -> Result<Option<LossStats>> {
        let (_, t) = batch.shape();
        if !self.fused || batch.attention_mask.is_some() || !self.model.fused_training_supported(t)
        {
            return Ok(None);
        }
        let device = self.model.device();
        let (hidden, tape) = self.model.fused_forward(
            &batch.input_ids.to_device(device),
            &batch.position_ids.to_device(device),
            true,
        )?;
        let (stats, grad) = chunked_cross_entropy_grad(
            &hidden,
            weight,
            &batch.targets.to_device(device),
            norm,
            chunk_elements,
        )?;
        drop(hidden);
        if let Some(g) = grad {
            self.model.fused_backward(tape, &g)?;
        }
        Ok(Some(stats))
    }
}

/// The engine's model with activation checkpointing: the forward runs the
/// layers without autograd, keeping only each layer's input; after the loss's
/// backward has reached the last hidden state, [`TrainableModel::finish_backward`]
/// recomputes the layers one at a time, last first, each with autograd, and
/// back-propagates the incoming gradient through it (LoRA gradients
/// accumulate, the input's gradient feeds the layer below). Peak activation
/// memory is one layer's plus the `L` layer inputs. Dropout draws the same
/// masks in the recomputation: each layer's generator seed is drawn from the
/// step's stream and set again before the replay.
pub struct CheckpointedModel<'a> {
    /// The model.
    pub model: &'a LlamaModel,
    saved: std::cell::RefCell<Option<Saved>>,
}

struct Saved {
    ctx: lora_engine::LayerContext,
    inputs: Vec<Tensor>,
    seeds: Vec<i64>,
    last: Tensor,
}

impl<'a> CheckpointedModel<'a> {
    /// Wraps `model`.
    pub fn new(model: &'a LlamaModel) -> Self {
        Self {
            model,
            saved: std::cell::RefCell::new(None),
        }
    }
}

impl TrainableModel for CheckpointedModel<'_> {
    fn hidden_states(&self, batch: &Batch, train: bool) -> Result<Tensor> {
        if !train {
            return EngineModel::new(self.model).hidden_states(batch, false);
        }
        let m = self.model;
        // bf16 autocast on CUDA, as the ordinary forward (and the replay below).
        let cuda = m.device().is_cuda();
        let ctx = m.layer_context(&batch.position_ids, batch.attention_mask.as_ref())?;
        let mut x = tch::no_grad(|| m.embed(&batch.input_ids));
        let n = m.num_layers();
        let mut inputs = Vec::with_capacity(n);
        let mut seeds = Vec::with_capacity(n);
        for l in 0..n {
            // A seed from the step's stream, set now and again before the replay.
            let seed = Tensor::randint(i64::MAX, [1], (tch::Kind::Int64, tch::Device::Cpu))
                .int64_value(&[0]);
            tch::manual_seed(seed);
            inputs.push(x.shallow_clone());
            seeds.push(seed);
            x = tch::no_grad(|| tch::autocast(cuda, || m.layer(l, &x, &ctx, true)));
        }
        let last = x.detach().set_requires_grad(true);
        let out = tch::autocast(cuda, || m.final_norm(&last));
        *self.saved.borrow_mut() = Some(Saved {
            ctx,
            inputs,
            seeds,
            last,
        });
        Ok(out)
    }
    fn output_weight(&self) -> Tensor {
        self.model.lm_head.weight.shallow_clone()
    }
    fn finish_backward(&self) -> Result<()> {
        let Some(s) = self.saved.borrow_mut().take() else {
            return Ok(());
        };
        let mut g = s.last.grad();
        if !g.defined() {
            return Ok(());
        }
        for l in (0..s.inputs.len()).rev() {
            // Layer 0's input is the frozen embedding: no gradient needed below it.
            let x = s.inputs[l].detach().set_requires_grad(l > 0);
            tch::manual_seed(s.seeds[l]);
            let cuda = self.model.device().is_cuda();
            let y = tch::autocast(cuda, || self.model.layer(l, &x, &s.ctx, true));
            if y.requires_grad() {
                (y * &g).sum(g.kind()).backward();
            }
            if l > 0 {
                g = x.grad();
                if !g.defined() {
                    break;
                }
            }
        }
        Ok(())
    }
}

/// The settings that define a run's trajectory; their hash guards resume.
#[derive(Serialize)]
struct HashInput<'a> {
    trial: TrialConfig,
    dataset_sha256: &'a str,
    eval_dataset: Option<String>,
    eval_holdout_fraction: f64,
    model_config_sha256: String,
    init_adapter: Option<String>,
}

fn trajectory_trial(t: &TrialConfig) -> TrialConfig {
    // Fields that do not change the losses are left out of the hash.
    TrialConfig {
        trial_id: 0,
        eval_steps: None,
        save_steps: None,
        early_stop_loss: None,
        base_model: None,
        ..t.clone()
    }
}

fn step_seed(seed: u64, step: u64) -> i64 {
    // splitmix64 finaliser of (seed, step): well-spread, deterministic.
    let mut z = seed ^ step.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) as i64 & i64::MAX
}

/// Splits `samples` into (train, eval) with a seeded shuffle when `holdout` > 0.
fn holdout_split(
    samples: Vec<TokenizedSample>,
    fraction: f64,
    seed: u64,
) -> (Vec<TokenizedSample>, Vec<TokenizedSample>) {
    let n = samples.len();
    let k = ((n as f64 * fraction).round() as usize).clamp(1, 200);
    if n < 10 || fraction <= 0.0 {
        return (samples, Vec::new());
    }
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ 0x5EED_E7A1));
    let eval_set: std::collections::HashSet<usize> = idx[..k].iter().copied().collect();
    let (mut tr, mut ev) = (Vec::with_capacity(n - k), Vec::with_capacity(k));
    for (i, s) in samples.into_iter().enumerate() {
        if eval_set.contains(&i) {
            ev.push(s);
        } else {
            tr.push(s);
        }
    }
    (tr, ev)
}

/// Eval batches: samples in length order, `micro` rows each.
fn eval_batches(samples: &[TokenizedSample], micro: usize, pad: u32, device: Device) -> Vec<Batch> {
    let mut order: Vec<usize> = (0..samples.len()).collect();
    order.sort_by_key(|&i| samples[i].input_ids.len());
    order
        .chunks(micro.max(1))
        .map(|c| {
            let rows: Vec<Row> = c.iter().map(|&i| vec![i]).collect();
            collate(samples, &rows, pad, 8, device)
        })
        .collect()
}

/// Prepared data and plan (no model weights touched): what dry runs report.
pub struct Prepared {
    /// Training samples.
    pub train: Vec<TokenizedSample>,
    /// Eval samples.
    pub eval: Vec<TokenizedSample>,
    /// The plan.
    pub plan: Plan,
    /// The batch plan settings.
    pub batch_cfg: BatchPlanConfig,
    /// The schedule.
    pub schedule: Schedule,
    /// Padding id.
    pub pad_id: u32,
    /// Hash of the trajectory-defining settings.
    pub config_hash: String,
}

/// Loads and tokenises the data and computes the plan.
pub fn prepare_run(opts: &TrainOptions) -> Result<Prepared> {
    let t = opts.trial.normalized();
    let issues = t.check();
    if let Some(i) = issues.first() {
        return Err(TrainError::config(
            &format!("trial_config.{}", i.path),
            i.message.clone(),
            i.hint.clone().unwrap_or_default(),
        ));
    }
    if t.method != lora_spec::trial::PeftMethod::Lora {
        return Err(TrainError::config(
            "trial_config.method",
            format!("method {} has no trainer yet", t.method.as_str()),
            "use method: lora",
        ));
    }
    if t.expanded_targets().iter().any(|m| m == "lm_head") {
        return Err(TrainError::config(
            "trial_config.target_modules",
            "lm_head cannot take an adapter here (the output projection stays frozen)",
            "use the seven projections or all-linear",
        ));
    }
    let pipeline = TextPipeline::new(&opts.model_dir, &t.prompt_template)?;
    let dopts = DataOptions {
        template: t.prompt_template.clone(),
        max_seq_length: t.max_seq_length as usize,
        train_on_inputs: t.train_on_inputs,
    };
    let data = prepare(&opts.train_data, &pipeline, &dopts)?;
    let (train, eval) = match &opts.eval_data {
        Some(p) => (data.samples.clone(), prepare(p, &pipeline, &dopts)?.samples),
        None if t.eval_steps.is_some() => {
            holdout_split(data.samples.clone(), opts.eval_holdout_fraction, t.seed)
        }
        None => (data.samples.clone(), Vec::new()),
    };
    let batch_cfg = BatchPlanConfig {
        micro_batch_size: t.micro_batch_size as usize,
        packing: t.packing,
        max_seq_length: t.max_seq_length as usize,
        group_by_length: !t.packing,
        seed: t.seed,
    };
    let lengths: Vec<usize> = train.iter().map(|s| s.input_ids.len()).collect();
    let epoch0 = epoch_plan(&lengths, &batch_cfg, 0);
    let accum = u64::from(t.gradient_accumulation.max(1));
    let steps_per_epoch = (epoch0.len() as u64).div_ceil(accum).max(1);
    let total_steps = t
        .max_steps
        .unwrap_or_else(|| ((t.epochs * steps_per_epoch as f64).ceil() as u64).max(1));
    let schedule = Schedule::new(
        t.lr_scheduler,
        t.learning_rate,
        total_steps,
        t.warmup_steps,
        t.warmup_ratio,
    );
    let model_cfg = opts.model_dir.join("config.json");
    let hash = checkpoint::config_hash(&HashInput {
        trial: trajectory_trial(&t),
        dataset_sha256: &data.sha256,
        eval_dataset: opts.eval_data.as_ref().map(|p| p.display().to_string()),
        eval_holdout_fraction: opts.eval_holdout_fraction,
        model_config_sha256: crate::data::content_sha256(&model_cfg)?,
        init_adapter: opts.init_adapter.as_ref().map(|p| p.display().to_string()),
    });
    let plan = Plan {
        train_samples: train.len(),
        eval_samples: eval.len(),
        micro_batches_per_epoch: epoch0.len(),
        gradient_accumulation: accum,
        total_steps,
        warmup_steps: schedule.warmup_steps,
        truncated: data.truncated,
        dropped: data.dropped_no_targets,
        trained_fraction: data.trained_fraction,
        packing_efficiency: packing_efficiency(&epoch0, &lengths),
        ends_with_eos: data.ends_with_eos,
        template: data.template.clone(),
    };
    Ok(Prepared {
        train,
        eval,
        plan,
        batch_cfg,
        schedule,
        pad_id: pipeline.pad_id,
        config_hash: hash,
    })
}

/// Loads the base model and puts the adapters on it (fresh, from
/// `init_adapter`, or from a checkpoint's adapter), seeded by the trial seed.
pub fn load_model_with_adapters(
    opts: &TrainOptions,
    spec: &LoraSpec,
    from: Option<&Path>,
) -> Result<LlamaModel> {
    let (mut model, report) = LlamaModel::load(&opts.model_dir, Kind::Float, opts.device)?;
    if !report.is_clean() {
        return Err(TrainError::Engine(format!(
            "{}: {}",
            opts.model_dir.display(),
            report.summary()
        )));
    }
    tch::manual_seed(opts.trial.seed as i64);
    match from {
        Some(dir) => {
            lora::load_peft(&mut model, dir)?;
        }
        None => {
            lora::attach(&mut model, spec)?;
        }
    }
    Ok(model)
}

/// The LoRA layout of a trial.
pub fn lora_spec_of(t: &TrialConfig) -> LoraSpec {
    LoraSpec::new(
        i64::from(t.lora_rank),
        t.lora_alpha,
        t.lora_dropout,
        t.use_rslora,
        &t.expanded_targets(),
    )
}

struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsLog {
    /// Opens metrics.jsonl; on resume keeps only the lines up to `keep_upto` steps.
    fn open(path: &Path, keep_upto: Option<u64>) -> Result<Self> {
        let kept = match keep_upto {
            Some(k) => std::fs::read_to_string(path)
                .unwrap_or_default()
                .lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v["step"].as_u64())
                        .is_some_and(|s| s <= k)
                })
                .map(|l| format!("{l}\n"))
                .collect::<String>(),
            None => String::new(),
        };
        lora_skill::fs::write_atomic(path, kept.as_bytes()).map_err(|e| TrainError::io(path, e))?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| TrainError::io(path, e))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    fn write<T: Serialize>(&mut self, v: &T) -> Result<()> {
        let mut line = serde_json::to_vec(v).unwrap_or_default();
        line.push(b'\n');
        self.file
            .write_all(&line)
            .and_then(|_| self.file.flush())
            .map_err(|e| TrainError::io(&self.path, e))
    }
}

/// Held by [`train`] for a whole run: see there.
static GENERATOR: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs (or resumes) training.
pub fn train(opts: &TrainOptions, monitor: &mut dyn Monitor) -> Result<TrainResult> {
    // libtorch's default generator (LoRA init, dropout) is process-wide and
    // reseeded at every step: two runs in one process take turns, or neither
    // would be reproducible.
    let _generator = GENERATOR.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(n) = opts.threads {
        tch::set_num_threads(n);
    }
    let t = opts.trial.normalized();
    let prep = prepare_run(opts)?;
    std::fs::create_dir_all(&opts.output_dir).map_err(|e| TrainError::io(&opts.output_dir, e))?;
    let ck_root = opts.output_dir.join(CHECKPOINTS_DIR);

    // Resume state first: a mismatched checkpoint is refused before any heavy work.
    let resumed = match &opts.resume_from {
        Some(ck) => Some(checkpoint::read_state(ck, &prep.config_hash)?),
        None => None,
    };
    let start_step = resumed.as_ref().map_or(0, |s| s.step);
    monitor.on_plan(&prep.plan, start_step);

    let spec = lora_spec_of(&t);
    let adapter_source = opts.resume_from.as_deref().or(opts.init_adapter.as_deref());
    let model = load_model_with_adapters(opts, &spec, adapter_source)?;
    let params = lora::adapter_tensors(&model);
    let trainable_params: u64 = params.iter().map(|(_, p)| p.numel() as u64).sum();
    let adamw = AdamWConfig {
        weight_decay: t.weight_decay,
        ..Default::default()
    };
    let mut opt = AdamW::new(params, adamw);
    let mut state = match resumed {
        Some(s) => {
            if let Some(ck) = &opts.resume_from {
                checkpoint::load_optimizer(ck, &mut opt, s.step)?;
            }
            monitor.on_log(&format!(
                "resumed at step {} of {}",
                s.step, prep.plan.total_steps
            ));
            s
        }
        None => TrainerState {
            version: checkpoint::STATE_VERSION,
            config_hash: prep.config_hash.clone(),
            step: 0,
            data: DataPosition::default(),
            seed: t.seed,
            schedule: prep.schedule,
            adamw,
            lora: spec.clone(),
            losses: Vec::new(),
            eval_history: Vec::new(),
            tokens_seen: 0,
            train_seconds: 0.0,
        },
    };
    let metrics_path = opts.output_dir.join(METRICS_FILE);
    let mut metrics =
        MetricsLog::open(&metrics_path, opts.resume_from.as_ref().map(|_| state.step))?;

    let lengths: Vec<usize> = prep.train.iter().map(|s| s.input_ids.len()).collect();
    let mut plan_epoch = state.data.epoch;
    let mut batches = epoch_plan(&lengths, &prep.batch_cfg, plan_epoch);
    let eval_set = (!prep.eval.is_empty()).then(|| {
        eval_batches(
            &prep.eval,
            t.micro_batch_size as usize,
            prep.pad_id,
            opts.device,
        )
    });
    let plain = EngineModel::new(&model);
    let checkpointed = CheckpointedModel::new(&model);
    let engine: &dyn TrainableModel = if t.gradient_checkpointing {
        &checkpointed
    } else {
        &plain
    };
    let total = prep.plan.total_steps;
    let accum = prep.plan.gradient_accumulation;
    let mut last_ckpt = checkpoint::list(&ck_root).last().map(|(_, p)| p.clone());
    let mut outcome = Outcome::Completed;
    let save = |state: &TrainerState, opt: &AdamW| {
        checkpoint::save(
            &ck_root,
            &model,
            opt,
            state,
            Some(&opts.base_model_name),
            opts.keep_checkpoints,
        )
    };
    let run_eval = |state: &TrainerState| -> Result<Option<EvalPoint>> {
        let Some(eb) = &eval_set else { return Ok(None) };
        let s: LossStats = evaluate_batches(engine, eb, opts.chunk_elements)?;
        Ok(Some(EvalPoint {
            step: state.step,
            eval_loss: s.mean(),
            eval_token_accuracy: s.accuracy(),
        }))
    };

    while state.step < total {
        if monitor.cancelled() {
            last_ckpt = Some(save(&state, &opt)?);
            outcome = Outcome::Stopped("cancelled".into());
            break;
        }
        if opts.stop_after_steps.is_some_and(|s| state.step >= s) {
            last_ckpt = Some(save(&state, &opt)?);
            outcome = Outcome::Stopped(format!(
                "paused after {} steps (stop_after_steps)",
                state.step
            ));
            break;
        }
        let step = state.step;
        tch::manual_seed(step_seed(t.seed, step));
        // The next `accum` micro-batches of the stream.
        let mut mbs = Vec::with_capacity(accum as usize);
        let mut pos = state.data;
        for _ in 0..accum {
            if pos.batch_in_epoch as usize >= batches.len() {
                pos = DataPosition {
                    epoch: pos.epoch + 1,
                    batch_in_epoch: 0,
                };
            }
            if pos.epoch != plan_epoch {
                plan_epoch = pos.epoch;
                batches = epoch_plan(&lengths, &prep.batch_cfg, plan_epoch);
            }
            let rows = &batches[pos.batch_in_epoch as usize];
            mbs.push(collate(&prep.train, rows, prep.pad_id, 8, opts.device));
            pos.batch_in_epoch += 1;
        }
        let started = Instant::now();
        let stats = accumulate_gradients(engine, &mbs, opts.chunk_elements)?;
        let loss = stats.mean();
        let bad_loss = !loss.is_finite() || t.early_stop_loss.is_some_and(|l| loss > l);
        let grad_norm = if bad_loss {
            f64::NAN
        } else {
            opt.clip_grad_norm(t.max_grad_norm)
        };
        if bad_loss || !grad_norm.is_finite() {
            opt.zero_grad();
            let reason = if !loss.is_finite() {
                format!("diverged: loss is {loss} at step {}", step + 1)
            } else if bad_loss {
                format!(
                    "diverged: loss {loss:.4} above early_stop_loss {} at step {}",
                    t.early_stop_loss.unwrap_or(f64::INFINITY),
                    step + 1
                )
            } else {
                format!(
                    "diverged: gradient norm is {grad_norm} at step {}",
                    step + 1
                )
            };
            monitor.on_log(&reason);
            outcome = Outcome::Failed(reason);
            break;
        }
        let lr = prep.schedule.lr_at(step);
        opt.step(lr);
        opt.zero_grad();
        if let Device::Cuda(i) = opts.device {
            tch::Cuda::synchronize(i as i64);
        }
        let dt = started.elapsed().as_secs_f64();
        let tokens: i64 = mbs.iter().map(|b| b.n_tokens).sum();
        state.step += 1;
        state.data = pos;
        state.losses.push(loss);
        state.tokens_seen += tokens as u64;
        state.train_seconds += dt;
        let per_epoch = batches.len().max(1) as f64;
        let m = StepMetrics {
            step: state.step,
            total_steps: total,
            epoch: pos.epoch as f64 + pos.batch_in_epoch as f64 / per_epoch,
            loss,
            lr,
            grad_norm,
            tokens,
            targets: stats.n_targets,
            step_time_s: dt,
            tokens_per_s: tokens as f64 / dt.max(1e-9),
            peak_rss_mb: peak_rss_mb(),
        };
        metrics.write(&m)?;
        monitor.on_step(&m);
        if t.eval_steps
            .is_some_and(|e| e > 0 && state.step % e == 0 && state.step < total)
            && let Some(e) = run_eval(&state)?
        {
            state.eval_history.push(e);
            metrics.write(&e)?;
            if !monitor.on_eval(&e) {
                last_ckpt = Some(save(&state, &opt)?);
                outcome = Outcome::Stopped(format!("pruned after the eval at step {}", state.step));
                break;
            }
        }
        if t.save_steps
            .is_some_and(|s| s > 0 && state.step % s == 0 && state.step < total)
        {
            last_ckpt = Some(save(&state, &opt)?);
        }
    }

    let mut adapter_path = None;
    if outcome == Outcome::Completed {
        if let Some(e) = run_eval(&state)? {
            state.eval_history.push(e);
            metrics.write(&e)?;
            monitor.on_eval(&e);
        }
        last_ckpt = Some(save(&state, &opt)?);
        let target = opts.output_dir.join(ADAPTER_DIR);
        let tmp = opts
            .output_dir
            .join(format!(".{ADAPTER_DIR}.tmp-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
        }
        lora::save_peft(&model, &state.lora, Some(&opts.base_model_name), &tmp)?;
        checkpoint::replace_dir(&tmp, &target)?;
        adapter_path = Some(target);
    }
    Ok(TrainResult {
        outcome,
        plan: prep.plan,
        steps: state.step,
        losses: state.losses,
        eval_history: state.eval_history,
        adapter_path,
        checkpoint_path: last_ckpt,
        metrics_path,
        train_seconds: state.train_seconds,
        tokens_seen: state.tokens_seen,
        peak_rss_mb: peak_rss_mb(),
        trainable_params,
        device: opts.device,
    })
}
