//! `lora-trainer model import FILE.gguf --out DIR` (a llama/qwen2 GGUF into a
//! trainable Hugging Face folder) and `lora-trainer generate --model DIR
//! [--adapter DIR] [--chat] --prompt TEXT` (greedy unless sampling options
//! are given; `--json` adds token ids and timings).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use clap::{Args as ClapArgs, Subcommand, ValueEnum};
use lora_engine::{
    ChatMessage, GenerationConfig, LlamaModel, TextTokenizer, generate, hub, import_gguf,
};
use lora_skill::{SkillContext, SkillError};
use serde::Serialize;
use tch::{Device, Kind};

use crate::exit::Usage;
use crate::{output, render};

/// `model` subcommands.
#[derive(Debug, ClapArgs)]
pub struct ModelArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: ModelCommand,
}

/// `model` subcommands.
#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Turn a llama/qwen2 GGUF (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K) into a Hugging Face folder.
    Import(ImportArgs),
}

/// `model import` options.
#[derive(Debug, ClapArgs)]
pub struct ImportArgs {
    /// The GGUF file.
    pub file: PathBuf,
    /// Output folder (must not exist, unless --force).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace an existing output folder.
    #[arg(long)]
    pub force: bool,
    /// Print the import report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Weight precision for generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    /// float32 (exact; the default).
    F32,
    /// bfloat16 (half the memory).
    Bf16,
}

/// `generate` options.
#[derive(Debug, ClapArgs)]
pub struct GenerateArgs {
    /// Model: a folder, an imported model's name, or a hub id in the local HF cache
    /// (default: the SmolLM2-135M-Instruct imported by `cargo xtask setup`).
    #[arg(long)]
    pub model: Option<String>,
    /// PEFT LoRA adapter folder to apply.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Wrap the prompt as a user turn in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// System turn for --chat (default: the template's own).
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// The prompt.
    #[arg(long)]
    pub prompt: String,
    /// Most new tokens.
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Generate at least this many tokens (EOS suppressed until then).
    #[arg(long, default_value_t = 0)]
    pub min_new_tokens: usize,
    /// Sampling temperature (sampling is on when any of temperature/top-k/top-p is given).
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Sample among the k most likely tokens.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus sampling probability.
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Repetition penalty (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f64,
    /// Stop when this text appears (repeatable).
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    /// Sampling seed.
    #[arg(long)]
    pub seed: Option<u64>,
    /// CPU threads for libtorch (default: libtorch's choice).
    #[arg(long)]
    pub threads: Option<i32>,
    /// Weight precision.
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    pub dtype: DtypeArg,
    /// Run the generation this many times and report the median timing (benchmarks);
    /// with more than one run, the first is a warm-up and is not timed.
    #[arg(long, default_value_t = 1)]
    pub repeat: usize,
    /// Decode every token through the libtorch graph instead of the fast
    /// one-sequence CPU step (same results; for comparisons).
    #[arg(long)]
    pub graph_decode: bool,
    /// Print JSON with the token ids and timings.
    #[arg(long)]
    pub json: bool,
}

/// Runs `model ...`.
pub async fn model(args: ModelArgs) -> anyhow::Result<()> {
    match args.command {
        ModelCommand::Import(a) => import(a).await,
    }
}

async fn import(a: ImportArgs) -> anyhow::Result<()> {
    if a.out.exists() {
        if !a.force {
            return Err(Usage(format!(
                "{} already exists: pass --force to replace it, or choose another --out",
                a.out.display()
            ))
            .into());
        }
        std::fs::remove_dir_all(&a.out).with_context(|| format!("removing {}", a.out.display()))?;
    }
    let cwd = std::env::current_dir()?;
    let ctx = SkillContext::new(cwd).with_sink(render::BarSink::new(false));
    let file = a.file.clone();
    let out = a.out.clone();
    let report = tokio::task::spawn_blocking(move || {
        let mut bar: Option<lora_skill::Progress> = None;
        let r = import_gguf(&file, &out, |done, total| {
            let b =
                bar.get_or_insert_with(|| ctx.progress("import", Some(total as u64), "tensors"));
            b.update(done as u64, None, &[]);
        });
        if let Some(b) = bar {
            b.finish("imported");
        }
        r
    })
    .await?
    .map_err(SkillError::from)?;
    if a.json {
        return output::json(&report);
    }
    let types: Vec<String> = report
        .source_types
        .iter()
        .map(|(t, n)| format!("{n} {t}"))
        .collect();
    output::line(&format!(
        "imported {} ({} {}, {} parameters, {} tensors: {}) into {}",
        report.source.display(),
        report.architecture,
        report.name.as_deref().unwrap_or("model"),
        report.parameters,
        report.tensors,
        types.join(", "),
        report.out_dir.display()
    ))?;
    for w in &report.warnings {
        output::line(&format!("warning: {w}"))?;
    }
    Ok(())
}

/// What `generate --json` prints.
#[derive(Debug, Serialize)]
struct GenerateReport {
    model: String,
    adapter: Option<String>,
    text: String,
    token_ids: Vec<i64>,
    finish_reason: lora_engine::FinishReason,
    prompt_tokens: usize,
    new_tokens: usize,
    seconds: f64,
    tokens_per_s: f64,
    load_seconds: f64,
    threads: i32,
}

/// Runs `generate`.
pub async fn generate_cmd(a: GenerateArgs) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || run_generate(a)).await?
}

fn run_generate(a: GenerateArgs) -> anyhow::Result<()> {
    if let Some(n) = a.threads {
        if n < 1 {
            return Err(Usage("--threads must be at least 1".into()).into());
        }
        tch::set_num_threads(n);
    }
    if a.repeat == 0 {
        return Err(Usage("--repeat must be at least 1".into()).into());
    }
    let dir = match &a.model {
        Some(m) => hub::resolve_model(m).map_err(SkillError::from)?,
        None => hub::default_model_dir()
            .filter(|d| d.join("config.json").is_file())
            .ok_or_else(|| {
                Usage(
                    "no --model given and the default model is not imported: run `cargo xtask setup`, or pass --model DIR"
                        .into(),
                )
            })?,
    };
    let kind = match a.dtype {
        DtypeArg::F32 => Kind::Float,
        DtypeArg::Bf16 => Kind::BFloat16,
    };
    let t0 = Instant::now();
    let (mut model, _) = LlamaModel::load(&dir, kind, Device::Cpu).map_err(SkillError::from)?;
    let tok = TextTokenizer::from_dir(&dir).map_err(SkillError::from)?;
    if let Some(ad) = &a.adapter {
        lora_engine::lora::load_peft(&mut model, ad).map_err(SkillError::from)?;
    }
    let load_seconds = t0.elapsed().as_secs_f64();
    let prompt = if a.chat {
        let mut turns = Vec::new();
        if let Some(s) = &a.system {
            turns.push(ChatMessage::new("system", s));
        }
        turns.push(ChatMessage::new("user", &a.prompt));
        tok.encode_chat(&turns, true).map_err(SkillError::from)?
    } else {
        tok.encode(&a.prompt, true).map_err(SkillError::from)?
    };
    let sampling = a.temperature.is_some() || a.top_k.is_some() || a.top_p.is_some();
    let mut eos = tok.eos_token_ids.clone();
    for id in &model.config.eos_token_ids {
        if !eos.contains(id) {
            eos.push(*id);
        }
    }
    let cfg = GenerationConfig {
        max_new_tokens: a.max_new_tokens,
        min_new_tokens: a.min_new_tokens,
        temperature: if sampling {
            a.temperature.unwrap_or(1.0)
        } else {
            0.0
        },
        top_k: a.top_k,
        top_p: a.top_p,
        repetition_penalty: a.repetition_penalty,
        eos_token_ids: eos,
        stop_strings: a.stop.clone(),
        pad_token_id: model.config.pad_token_id.unwrap_or(0),
        seed: a.seed,
        fast_decode: !a.graph_decode,
    };
    let mut times = Vec::with_capacity(a.repeat);
    let mut last = None;
    for run in 0..a.repeat {
        let t = Instant::now();
        let g = generate(&model, std::slice::from_ref(&prompt), &cfg, Some(&tok))
            .map_err(SkillError::from)?;
        if a.repeat == 1 || run > 0 {
            times.push(t.elapsed().as_secs_f64());
        }
        last = g.into_iter().next();
    }
    let g = last.context("no generation")?;
    times.sort_by(f64::total_cmp);
    let seconds = times[times.len() / 2];
    let text = g.text.clone().unwrap_or_default();
    if a.json {
        return output::json(&GenerateReport {
            model: dir.display().to_string(),
            adapter: a.adapter.as_ref().map(|p| p.display().to_string()),
            text,
            new_tokens: g.token_ids.len(),
            tokens_per_s: g.token_ids.len() as f64 / seconds.max(1e-9),
            token_ids: g.token_ids,
            finish_reason: g.finish_reason,
            prompt_tokens: prompt.len(),
            seconds,
            load_seconds,
            threads: tch::get_num_threads(),
        });
    }
    output::line(&text)
}
