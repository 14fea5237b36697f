//! `lora-trainer eval --model DIR [--adapter DIR] --data FILE [--json]`:
//! eval loss, perplexity, base loss (adapter switched off) and delta, token
//! accuracy, optional generations scored by exact match.

use std::path::PathBuf;

use anyhow::Context as _;
use lora_eval::EvalSkill;
use lora_skill::{Skill, SkillContext};
use lora_spec::contracts::eval::EvalRequest;

use crate::{output, render};

/// Arguments of `eval`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Base model folder.
    #[arg(long)]
    pub model: PathBuf,
    /// PEFT adapter folder; without it the base model alone is scored.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Held-out data (jsonl, json, csv, parquet, HF folder).
    #[arg(long)]
    pub data: PathBuf,
    /// Prompt template: auto, alpaca, chatml, llama3, model.
    #[arg(long)]
    pub template: Option<String>,
    /// Score only the first N rows.
    #[arg(long)]
    pub max_samples: Option<u64>,
    /// Generate completions for the first N rows and report exact match.
    #[arg(long, default_value_t = 0)]
    pub generate: u32,
    /// New tokens per completion.
    #[arg(long)]
    pub max_new_tokens: Option<u32>,
    /// Sampling temperature (0 = greedy).
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Nucleus sampling threshold.
    #[arg(long)]
    pub top_p: Option<f64>,
    /// `auto`, `cpu`, `cuda`, `cuda:N`.
    #[arg(long)]
    pub device: Option<String>,
    /// CPU threads for libtorch.
    #[arg(long)]
    pub threads: Option<u32>,
    /// Also report each row's loss (`sample_losses` in the JSON).
    #[arg(long)]
    pub per_sample: bool,
    /// Print the EvalReport as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `eval`.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let req = EvalRequest {
        adapter_path: args.adapter.as_ref().map(|p| p.display().to_string()),
        base_model: args.model.display().to_string(),
        eval_dataset_path: args.data.display().to_string(),
        compute_perplexity: true,
        compute_delta: true,
        prompt_template: args.template.clone(),
        max_seq_length: None,
        max_samples: args.max_samples,
        batch_size: None,
        generate_samples: Some(args.generate),
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        seed: None,
        device: args.device.clone(),
        threads: args.threads,
        per_sample: args.per_sample,
    };
    let cwd = std::env::current_dir().context("reading the current directory")?;
    let ctx = SkillContext::new(cwd)
        .with_sink(render::BarSink::new(false))
        .with_cancel(render::ctrl_c_token())
        .child("eval");
    let res = EvalSkill.run(req, &ctx).await?;
    let r = &res.data;
    if args.json {
        return output::json(r);
    }
    let f = |v: Option<f64>| v.map_or("-".into(), |x| format!("{x:.4}"));
    let rows = vec![
        vec!["eval loss".into(), f(Some(r.output.eval_loss))],
        vec!["eval perplexity".into(), f(Some(r.output.eval_perplexity))],
        vec!["base loss".into(), f(r.output.base_loss)],
        vec!["delta vs base".into(), f(r.output.delta_vs_base_loss)],
        vec!["token accuracy".into(), f(Some(r.token_accuracy))],
        vec!["exact match".into(), f(r.exact_match)],
        vec![
            "samples / tokens".into(),
            format!("{} / {}", r.samples, r.tokens),
        ],
    ];
    output::table(&["", "eval"], rows)
}
