//! `lora-trainer dataset analyze PATH` (the `dataset_analyze` skill as a readable
//! table, or `--json`) and `lora-trainer dataset split PATH --out DIR` (a seeded
//! train/eval split written atomically).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args as ClapArgs, Subcommand};
use lora_dataset::split::{SplitOptions, split_dataset};
use lora_skill::{SkillContext, SkillError};
use lora_spec::contracts::dataset::{
    DatasetAnalyzeInput, DatasetProfile, FileFormat, TemplateChoice,
};
use lora_spec::contracts::names;

use crate::output;

/// `dataset` options.
#[derive(Debug, ClapArgs)]
pub struct Args {
    #[command(subcommand)]
    pub command: DatasetCmd,
}

/// The `dataset` subcommands.
#[derive(Debug, Subcommand)]
pub enum DatasetCmd {
    /// Profile a dataset: layout, invalid rows, targets, duplicates, token lengths.
    Analyze(AnalyzeArgs),
    /// Write a deterministic, seeded train/eval split (train.jsonl, eval.jsonl, split_manifest.json).
    Split(SplitArgs),
}

/// `dataset analyze` options.
#[derive(Debug, ClapArgs)]
pub struct AnalyzeArgs {
    /// A .jsonl/.json/.csv/.parquet file, a `datasets.save_to_disk` folder, or a folder of shards.
    pub path: PathBuf,
    /// auto, jsonl, json, csv, parquet or hf.
    #[arg(long, default_value = "auto")]
    pub format: String,
    /// Tokenizer for exact token counts: tokenizer.json, a model folder, or a hub id in the HF cache.
    #[arg(long)]
    pub tokenizer: Option<String>,
    /// Rows (seeded sample) tokenised exactly; 0 = every row.
    #[arg(long, default_value_t = 1000)]
    pub sample_size: u64,
    /// Also count near-duplicates (MinHash/LSH).
    #[arg(long)]
    pub near_dups: bool,
    /// Render the sample with a template and check masks and EOS: alpaca, chatml, llama3, tokenizer.
    #[arg(long)]
    pub template: Option<String>,
    /// Longest accepted record in bytes.
    #[arg(long, default_value_t = 32 * 1024 * 1024)]
    pub max_record_bytes: u64,
    /// Print the profile as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `dataset split` options.
#[derive(Debug, ClapArgs)]
pub struct SplitArgs {
    /// The dataset (file or folder).
    pub path: PathBuf,
    /// Output folder.
    #[arg(long)]
    pub out: PathBuf,
    /// auto, jsonl, json, csv, parquet or hf.
    #[arg(long, default_value = "auto")]
    pub format: String,
    /// Fraction of rows held out for eval.
    #[arg(long, default_value_t = 0.1)]
    pub eval_fraction: f64,
    /// Exact number of eval rows (overrides --eval-fraction).
    #[arg(long)]
    pub eval_size: Option<u64>,
    /// Seed of the split.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Keep exact duplicates (they still never straddle train and eval).
    #[arg(long)]
    pub no_dedup: bool,
    /// Longest accepted record in bytes.
    #[arg(long, default_value_t = 32 * 1024 * 1024)]
    pub max_record_bytes: u64,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

fn parse_enum<T: serde::de::DeserializeOwned>(
    flag: &str,
    value: &str,
    allowed: &str,
) -> anyhow::Result<T> {
    serde_json::from_value(serde_json::Value::String(value.to_string())).map_err(|_| {
        SkillError::invalid_input(format!("unknown value {value:?}"))
            .with_field(flag)
            .with_hint(format!("use one of: {allowed}"))
            .into()
    })
}

/// Runs `dataset ...`.
pub async fn run(args: Args) -> anyhow::Result<()> {
    match args.command {
        DatasetCmd::Analyze(a) => analyze(a).await,
        DatasetCmd::Split(a) => split(a).await,
    }
}

fn context() -> anyhow::Result<SkillContext> {
    let dir = std::env::current_dir().context("reading the current directory")?;
    Ok(SkillContext::new(dir)
        .with_sink(crate::render::BarSink::new(false))
        .with_cancel(crate::render::ctrl_c_token()))
}

async fn analyze(a: AnalyzeArgs) -> anyhow::Result<()> {
    let format: FileFormat =
        parse_enum("--format", &a.format, "auto, jsonl, json, csv, parquet, hf")?;
    let template: Option<TemplateChoice> = match &a.template {
        Some(t) => Some(parse_enum(
            "--template",
            t,
            "alpaca, chatml, llama3, tokenizer",
        )?),
        None => None,
    };
    let mut input = DatasetAnalyzeInput::new(a.path.display().to_string());
    input.format = format;
    input.tokenizer_name = a.tokenizer.clone();
    input.sample_size = a.sample_size;
    input.near_duplicates = a.near_dups;
    input.template = template;
    input.max_record_bytes = a.max_record_bytes;
    let reg = crate::skills::registry();
    let ctx = context()?;
    let result = reg
        .call_json(names::DATASET, serde_json::to_value(&input)?, &ctx)
        .await?;
    if a.json {
        return output::json(&result.data);
    }
    let p: DatasetProfile = serde_json::from_value(result.data)?;
    output::line(&profile_table(&p))?;
    output::line(&result.output_text)
}

fn pct(n: u64, of: u64) -> String {
    format!("{n} ({:.2}%)", 100.0 * n as f64 / of.max(1) as f64)
}

/// The profile as tables (what `dataset analyze` prints).
pub fn profile_table(p: &DatasetProfile) -> String {
    let rows_total = p.total_samples + p.invalid_rows;
    let layouts: Vec<String> = p
        .record_formats
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    let mut rows = vec![
        vec!["files".into(), p.files.join(", ")],
        vec!["format".into(), p.format_detected.clone()],
        vec![
            "record layout".into(),
            format!("{} ({})", p.record_format.as_str(), layouts.join(", ")),
        ],
        vec!["samples".into(), p.total_samples.to_string()],
        vec!["columns".into(), p.columns.join(", ")],
        vec!["invalid rows".into(), pct(p.invalid_rows, rows_total)],
        vec![
            "missing / empty targets".into(),
            format!("{} / {}", p.missing_targets, p.empty_targets),
        ],
        vec![
            "exact duplicates".into(),
            pct(p.duplicates_found, p.total_samples),
        ],
    ];
    if let Some(n) = p.near_duplicates_found {
        rows.push(vec!["near duplicates".into(), pct(n, p.total_samples)]);
    }
    for g in &p.column_gaps {
        rows.push(vec![
            format!("rows without {:?}", g.column),
            g.rows_missing.to_string(),
        ]);
    }
    let t = &p.token_percentiles;
    rows.push(vec![
        "tokens avg / p50 / p95 / p99 / max".into(),
        format!(
            "{:.1} / {} / {} / {} / {}",
            p.avg_tokens, t.p50, t.p95, t.p99, p.max_tokens
        ),
    ]);
    rows.push(vec!["token counter".into(), p.token_counter.note.clone()]);
    if let Some(rc) = &p.render_check {
        rows.push(vec![
            format!("template {}", rc.template),
            format!(
                "{} rendered, {} end in an unmasked EOS, {} EOS appended, {} without trained tokens, {} errors; {:.1}% of {} trained",
                rc.rendered,
                rc.ends_with_unmasked_eos,
                rc.eos_appended,
                rc.zero_trainable,
                rc.render_errors,
                rc.trained_token_fraction * 100.0,
                if rc.by_tokens { "tokens" } else { "characters" }
            ),
        ]);
    }
    let mut out = output::table_string(&["dataset", "value"], rows);
    if !p.token_histogram.is_empty() {
        let maxc = p
            .token_histogram
            .iter()
            .map(|b| b.count)
            .max()
            .unwrap_or(1)
            .max(1);
        let hist: Vec<Vec<String>> = p
            .token_histogram
            .iter()
            .map(|b| {
                let w = (b.count as f64 / maxc as f64 * 40.0).round() as usize;
                vec![
                    format!("{}..{}", b.lo, b.hi),
                    b.count.to_string(),
                    "█".repeat(w),
                ]
            })
            .collect();
        out.push('\n');
        out.push_str(&output::table_string(&["tokens", "rows", ""], hist));
    }
    let mut issues: Vec<Vec<String>> = Vec::new();
    for (kind, list) in [
        ("invalid", &p.invalid_examples),
        ("target", &p.target_examples),
        ("duplicate", &p.duplicate_examples),
    ] {
        for i in list.iter().take(5) {
            let at = match i.line {
                Some(l) => format!("{}:{l}", i.file),
                None => format!("{} row {}", i.file, i.row),
            };
            issues.push(vec![kind.into(), at, i.reason.clone()]);
        }
    }
    if let Some(rc) = &p.render_check {
        for e in rc.examples.iter().take(5) {
            issues.push(vec!["render".into(), String::new(), e.clone()]);
        }
    }
    if !issues.is_empty() {
        out.push('\n');
        out.push_str(&output::table_string(&["problem", "where", "what"], issues));
    }
    for w in &p.warnings {
        out.push_str(&format!("\nwarning: {w}"));
    }
    out
}

async fn split(a: SplitArgs) -> anyhow::Result<()> {
    let format: FileFormat =
        parse_enum("--format", &a.format, "auto, jsonl, json, csv, parquet, hf")?;
    let ctx = context()?;
    let mut opts = SplitOptions::new(ctx.resolve(&a.path), ctx.resolve(&a.out));
    opts.format = format;
    opts.eval_fraction = a.eval_fraction;
    opts.eval_size = a.eval_size;
    opts.seed = a.seed;
    opts.dedup = !a.no_dedup;
    opts.max_record_bytes = a.max_record_bytes;
    let ctx2 = ctx.clone();
    let report = tokio::task::spawn_blocking(move || {
        let mut progress: Option<lora_skill::Progress> = None;
        let r = split_dataset(&opts, &mut |done, total| {
            if ctx2.is_cancelled() {
                return Err(lora_dataset::DatasetError::Cancelled);
            }
            progress
                .get_or_insert_with(|| ctx2.progress("split dataset", Some(total), "bytes"))
                .update(done, None, &[]);
            Ok(())
        });
        if let Some(p) = progress {
            p.finish("done");
        }
        r
    })
    .await
    .context("the split task failed")?
    .map_err(SkillError::from)?;
    if a.json {
        return output::json(&report);
    }
    output::table(
        &["split", "value"],
        vec![
            vec![
                "train".into(),
                format!("{} rows  {}", report.train_rows, report.train_path),
            ],
            vec![
                "eval".into(),
                format!("{} rows  {}", report.eval_rows, report.eval_path),
            ],
            vec!["seed".into(), report.seed.to_string()],
            vec![
                "duplicates dropped".into(),
                report.duplicates_dropped.to_string(),
            ],
            vec![
                "invalid rows skipped".into(),
                report.invalid_rows_skipped.to_string(),
            ],
            vec!["train sha256".into(), report.train_sha256.clone()],
            vec!["eval sha256".into(), report.eval_sha256.clone()],
        ],
    )
}
