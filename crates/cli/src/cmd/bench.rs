//! `lora-trainer bench train --model DIR --seq 256 --batch 4 --rank 16 --steps N [--json]`:
//! the same work as `shared/anchors/peft_anchor.py`, printing the same fields
//! (tokens_per_s, step_s_median, peak_rss_mb, last_loss).

use std::path::PathBuf;

use lora_training::bench::{BenchOptions, bench_train};
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
