//! The training throughput benchmark: the same work as
//! `shared/anchors/peft_anchor.py` (random-token batches of a fixed shape,
//! LoRA on the named projections, fp32, AdamW at 2e-4, loss on every next
//! token), timed per optimiser step; the median after warm-up is reported.

use std::path::PathBuf;
use std::time::Instant;

use lora_engine::LlamaModel;
use lora_engine::lora::{self, LoraSpec};
use lora_engine::matmul::{self, Backend};
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
    /// The f32 GEMM that ran (`native` or `libtorch`, see
    /// `lora_engine::matmul`).
    pub gemm: String,
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
        gemm: matmul::backend().name().into(),
    })
}

/// One product shape `m × k × n` timed on one backend.
#[derive(Debug, Clone, Serialize)]
pub struct GemmResult {
    /// Rows of the output.
    pub m: i64,
    /// Inner dimension.
    pub k: i64,
    /// Columns of the output.
    pub n: i64,
    /// `native` or `libtorch`.
    pub gemm: String,
    /// Threads.
    pub threads: i32,
    /// `2·m·k·n / median time`, in GFLOP/s.
    pub gflops_median: f64,
    /// Median time of one product (s).
    pub s_median: f64,
}

/// The f32 products `[m, k] × [k, n]` of `shapes` on both backends
/// (`lora_engine::matmul`), `reps` timed calls each after 3 untimed ones:
/// the machine's GEMM ceiling for MFU figures, and a way to check which
/// backend is faster on a CPU.
pub fn bench_gemm(
    shapes: &[(i64, i64, i64)],
    threads: i32,
    reps: usize,
) -> Result<Vec<GemmResult>> {
    if threads > 0 {
        tch::set_num_threads(threads);
    }
    tch::manual_seed(0);
    let mut out = Vec::new();
    for &(m, k, n) in shapes {
        if m <= 0 || k <= 0 || n <= 0 {
            return Err(TrainError::Engine(format!(
                "bench gemm: shape {m}x{k}x{n} needs three positive sizes"
            )));
        }
        let opts = (Kind::Float, Device::Cpu);
        let (a, b) = (Tensor::randn([m, k], opts), Tensor::randn([k, n], opts));
        let c = Tensor::empty([m, n], opts);
        for backend in [Backend::Native, Backend::Libtorch] {
            let mut times = matmul::with_backend(backend, || -> Result<Vec<f64>> {
                let mut times = Vec::with_capacity(reps);
                for i in 0..reps.max(1) + 3 {
                    let t0 = Instant::now();
                    matmul::mm_into(&c, &a, &b, false)?;
                    if i >= 3 {
                        times.push(t0.elapsed().as_secs_f64());
                    }
                }
                Ok(times)
            })?;
            times.sort_by(f64::total_cmp);
            let med = times[times.len() / 2];
            out.push(GemmResult {
                m,
                k,
                n,
                gemm: backend.name().into(),
                threads: tch::get_num_threads(),
                gflops_median: 2.0 * (m * k * n) as f64 / med / 1e9,
                s_median: med,
            });
        }
    }
    Ok(out)
}
