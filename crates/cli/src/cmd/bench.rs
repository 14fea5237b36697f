//! `lora-trainer bench train --model DIR --seq 256 --batch 4 --rank 16 --steps N [--json]`:
//! the same work as `shared/anchors/peft_anchor.py`, printing the same fields
//! (tokens_per_s, step_s_median, peak_rss_mb, last_loss); `bench gemm`: f32
//! products on both GEMM backends.

use std::path::PathBuf;

use lora_training::bench::{BenchOptions, bench_gemm, bench_train};
use lora_training::skill::parse_device;

use crate::output;

/// Arguments of `bench`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// What to benchmark.
    #[command(subcommand)]
    pub what: What,
}

/// Benchmarks.
#[derive(Debug, clap::Subcommand)]
pub enum What {
    /// LoRA training steps on random tokens (as peft_anchor.py).
    Train(TrainArgs),
    /// f32 matrix products on both GEMM backends (the MFU ceiling; which
    /// backend `LORA_TRAINER_GEMM` should name on this CPU).
    Gemm(GemmArgs),
}

/// Arguments of `bench gemm`.
#[derive(Debug, clap::Args)]
pub struct GemmArgs {
    /// Shapes `MxKxN`, comma-separated (the default: tiny's and small's
    /// projections over a 1024-token batch, and 2048³).
    #[arg(
        long,
        value_delimiter = ',',
        value_parser = parse_shape,
        default_value = "1024x256x704,1024x576x1536,1024x1536x576,2048x2048x2048"
    )]
    pub shapes: Vec<(i64, i64, i64)>,
    /// Threads (0 = libtorch's default).
    #[arg(long, default_value_t = 0)]
    pub threads: i32,
    /// Timed products per shape and backend (the median is reported).
    #[arg(long, default_value_t = 21)]
    pub reps: usize,
    /// One JSON line per shape and backend.
    #[arg(long)]
    pub json: bool,
}

/// `MxKxN` → `(m, k, n)`.
fn parse_shape(s: &str) -> Result<(i64, i64, i64), String> {
    let bad = || format!("`{s}` is not MxKxN with three positive sizes; e.g. 1024x256x704");
    let dims: Vec<i64> = s
        .trim()
        .split('x')
        .map(|d| d.trim().parse::<i64>())
        .collect::<Result<_, _>>()
        .map_err(|_| bad())?;
    match dims[..] {
        [m, k, n] if m > 0 && k > 0 && n > 0 => Ok((m, k, n)),
        _ => Err(bad()),
    }
}

/// Arguments of `bench train`.
#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    /// Model folder.
    #[arg(long)]
    pub model: PathBuf,
    /// Sequence length.
    #[arg(long, default_value_t = 256)]
    pub seq: i64,
    /// Batch size.
    #[arg(long, default_value_t = 4)]
    pub batch: i64,
    /// Timed steps.
    #[arg(long, default_value_t = 6)]
    pub steps: usize,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// LoRA rank.
    #[arg(long, default_value_t = 16)]
    pub rank: i64,
    /// LoRA alpha.
    #[arg(long, default_value_t = 32.0)]
    pub alpha: f64,
    /// Target projections, comma-separated.
    #[arg(
        long,
        default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    )]
    pub targets: String,
    /// libtorch threads (0 = default).
    #[arg(long, default_value_t = 0)]
    pub threads: i32,
    /// `auto`, `cpu`, `cuda`, `cuda:N`.
    #[arg(long)]
    pub device: Option<String>,
    /// Recompute activations in backward (activation checkpointing).
    #[arg(long)]
    pub grad_checkpointing: bool,
    /// LoRA dropout on the adapters' inputs (the anchor has none).
    #[arg(long, default_value_t = 0.0)]
    pub lora_dropout: f64,
    /// Back-propagate through autograd instead of the engine's fused pass.
    #[arg(long)]
    pub autograd: bool,
    /// Print one JSON line (as the anchor does).
    #[arg(long)]
    pub json: bool,
}

/// Runs `bench`.
pub async fn run(args: Args) -> anyhow::Result<()> {
    match args.what {
        What::Gemm(a) => {
            let (shapes, threads, reps) = (a.shapes, a.threads, a.reps);
            let rows =
                tokio::task::spawn_blocking(move || bench_gemm(&shapes, threads, reps)).await??;
            if a.json {
                for r in &rows {
                    output::line(&serde_json::to_string(r)?)?;
                }
                Ok(())
            } else {
                output::table(
                    &[
                        "m x k x n",
                        "gemm",
                        "GFLOP/s (median)",
                        "ms (median)",
                        "threads",
                    ],
                    rows.iter()
                        .map(|r| {
                            vec![
                                format!("{}x{}x{}", r.m, r.k, r.n),
                                r.gemm.clone(),
                                format!("{:.1}", r.gflops_median),
                                format!("{:.3}", r.s_median * 1e3),
                                r.threads.to_string(),
                            ]
                        })
                        .collect(),
                )
            }
        }
        What::Train(a) => {
            let o = BenchOptions {
                model_dir: a.model.clone(),
                seq: a.seq,
                batch: a.batch,
                steps: a.steps.max(1),
                warmup: a.warmup,
                rank: a.rank,
                alpha: a.alpha,
                targets: a.targets.split(',').map(|s| s.trim().to_owned()).collect(),
                threads: a.threads,
                device: parse_device(a.device.as_deref())?,
                gradient_checkpointing: a.grad_checkpointing,
                autograd: a.autograd,
                dropout: a.lora_dropout,
            };
            let r = tokio::task::spawn_blocking(move || bench_train(&o)).await??;
            if a.json {
                output::line(&serde_json::to_string(&r)?)
            } else {
                output::table(
                    &[
                        "tokens/s",
                        "step s (median)",
                        "peak RSS MB",
                        "last loss",
                        "threads",
                        "trainable",
                    ],
                    vec![vec![
                        format!("{:.1}", r.tokens_per_s),
                        format!("{:.4}", r.step_s_median),
                        r.peak_rss_mb.map_or("-".into(), |m| format!("{m:.0}")),
                        format!("{:.4}", r.last_loss),
                        r.threads.to_string(),
                        r.trainable_params.to_string(),
                    ]],
                )
            }
        }
    }
}
