//! The training throughput benchmark: the same work as
//! `shared/anchors/peft_anchor.py` (random-token batches of a fixed shape,
//! LoRA on the named projections, fp32, AdamW at 2e-4, loss on every next
//! token), timed per optimiser step; the median after warm-up is reported.

use std::path::PathBuf;
use std::time::Instant;

use lora_engine::LlamaModel;
use lora_engine::lora::{self, LoraSpec};
use serde::Serialize;
use tch::{Device, Kind, Tensor};

use crate::batch::Batch;
use crate::error::{Result, TrainError};
use crate::loss::DEFAULT_CHUNK_ELEMENTS;
use crate::optim::{AdamW, AdamWConfig};
use crate::step::accumulate_gradients;
use crate::trainer::{EngineModel, peak_rss_mb};

/// What to benchmark.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Model folder.
    pub model_dir: PathBuf,
    /// Sequence length.
    pub seq: i64,
    /// Batch size.
    pub batch: i64,
    /// Timed steps.
    pub steps: usize,
    /// Untimed warm-up steps.
    pub warmup: usize,
    /// LoRA rank.
    pub rank: i64,
    /// LoRA alpha.
    pub alpha: f64,
    /// Target projections.
    pub targets: Vec<String>,
    /// libtorch threads (0 = libtorch's default).
    pub threads: i32,
    /// Device.
    pub device: Device,
    /// Activation checkpointing (as the anchor's `--grad-checkpointing`).
    pub gradient_checkpointing: bool,
    /// Back-propagate through autograd even where the engine's fused pass
    /// applies (to compare the two).
    pub autograd: bool,
    /// LoRA dropout (0 in the anchor).
    pub dropout: f64,
}

/// The benchmark's result (the anchor's field names).
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    /// `lora-trainer`.
    #[serde(rename = "impl")]
    pub implementation: String,
    /// libtorch threads.
    pub threads: i32,
    /// Trainable parameters.
    pub trainable_params: i64,
    /// Sequence length.
    pub seq: i64,
    /// Batch size.
    pub batch: i64,
    /// Median step time (s).
    pub step_s_median: f64,
    /// `batch × seq / step_s_median`.
    pub tokens_per_s: f64,
    /// Peak resident memory (MB).
    pub peak_rss_mb: Option<f64>,
    /// Loss of the last step.
    pub last_loss: f64,
    /// Model parameters (frozen + trainable).
    pub model_params: i64,
}

/// Runs the benchmark.
pub fn bench_train(o: &BenchOptions) -> Result<BenchResult> {
    if o.threads > 0 {
        tch::set_num_threads(o.threads);
    }
    tch::manual_seed(0);
    let (mut model, report) = LlamaModel::load(&o.model_dir, Kind::Float, o.device)?;
    if !report.is_clean() {
        return Err(TrainError::Engine(report.summary()));
    }
    let model_params: i64 = model
        .state_dict()
        .iter()
        .map(|(_, t)| t.numel() as i64)
        .sum();
    let spec = LoraSpec::new(o.rank, o.alpha, o.dropout, false, &o.targets);
    lora::attach(&mut model, &spec)?;
    let params = lora::adapter_tensors(&model);
    let trainable: i64 = params.iter().map(|(_, t)| t.numel() as i64).sum();
    let mut opt = AdamW::new(params, AdamWConfig::default());
    let vocab = model.config.vocab_size as i64;
    let plain = if o.autograd {
        EngineModel::autograd(&model)
    } else {
        EngineModel::new(&model)
    };
    let checkpointed = crate::trainer::CheckpointedModel::new(&model);
    let engine: &dyn crate::step::TrainableModel = if o.gradient_checkpointing {
        &checkpointed
    } else {
        &plain
    };
    let mut times = Vec::new();
    let mut last_loss = f64::NAN;
    let positions = Tensor::arange(o.seq, (Kind::Int64, o.device))
        .unsqueeze(0)
        .expand([o.batch, o.seq], false)
        .contiguous();
    for step in 0..(o.warmup + o.steps) {
        let ids = Tensor::randint_low(4, vocab, [o.batch, o.seq], (Kind::Int64, o.device));
        let ignore = Tensor::full(
            [o.batch, 1],
            crate::batch::IGNORE_INDEX,
            (Kind::Int64, o.device),
        );
        let targets = Tensor::cat(&[ids.narrow(1, 1, o.seq - 1), ignore], 1);
        let b = Batch {
            input_ids: ids,
            targets,
            position_ids: positions.shallow_clone(),
            attention_mask: None,
            n_targets: o.batch * (o.seq - 1),
            n_tokens: o.batch * o.seq,
        };
        let t0 = Instant::now();
        let stats = accumulate_gradients(engine, std::slice::from_ref(&b), DEFAULT_CHUNK_ELEMENTS)?;
        opt.step(2e-4);
        opt.zero_grad();
        if let Device::Cuda(i) = o.device {
            tch::Cuda::synchronize(i as i64);
        }
        let dt = t0.elapsed().as_secs_f64();
        if step >= o.warmup {
            times.push(dt);
            last_loss = stats.mean();
        }
    }
    times.sort_by(f64::total_cmp);
    let med = times.get(times.len() / 2).copied().unwrap_or(f64::NAN);
    Ok(BenchResult {
        implementation: "lora-trainer".into(),
        threads: tch::get_num_threads(),
        trainable_params: trainable,
        seq: o.seq,
        batch: o.batch,
        step_s_median: med,
        tokens_per_s: (o.batch * o.seq) as f64 / med,
        peak_rss_mb: peak_rss_mb(),
        last_loss,
        model_params,
    })
}
