//! `lora-trainer preflight SPEC` and `lora-trainer config suggest|models`:
//! the config skill (lora-config) for people (tables) and scripts (`--json`).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args as ClapArgs, Subcommand};
use lora_skill::SkillContext;
use lora_spec::contracts::config::{Finding, LoRAConfigInput, PreflightReport, Severity, Task};
use lora_spec::contracts::names;
use lora_spec::trial::PeftMethod;
use serde_json::Value;

use crate::exit::Usage;
use crate::output;

/// `preflight` options.
#[derive(Debug, ClapArgs)]
pub struct PreflightArgs {
    /// The experiment spec (YAML or JSON).
    pub spec: PathBuf,
    /// A dataset profile (`dataset analyze --json` output); by default the spec's data is analysed.
    #[arg(long)]
    pub profile: Option<PathBuf>,
    /// Do not analyse the dataset (estimate from the spec alone).
    #[arg(long)]
    pub no_analyze: bool,
    /// A seed 003 TrainingConfig JSON/YAML file applied over `config:`.
    #[arg(long)]
    pub config_file: Option<PathBuf>,
    /// Dotted override of the TrainingConfig, e.g. `optimizer.learning_rate=1e-4` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// A seed 003 preset, e.g. `lora_rank:r32`.
    #[arg(long)]
    pub ablation_preset: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `config` options.
#[derive(Debug, ClapArgs)]
pub struct ConfigArgs {
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: ConfigCmd,
}

/// The `config` subcommands.
#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// Suggest a complete trial, search space and memory estimate for a model and a budget.
    Suggest {
        /// Base model: a local folder, a hub id in the HF cache, or a built-in name (`config models`).
        #[arg(long, short)]
        model: String,
        /// lora, qlora, prefix or ia3.
        #[arg(long, default_value = "lora")]
        method: String,
        /// Accelerator memory, GB.
        #[arg(long, default_value_t = 24.0)]
        vram: f64,
        /// Accelerator model (rtx-4090, a100-80gb, h100, t4, cpu, ...).
        #[arg(long)]
        gpu: Option<String>,
        /// Number of accelerators.
        #[arg(long, default_value_t = 1)]
        gpus: u32,
        /// instruction, domain, chat or style.
        #[arg(long, default_value = "instruction")]
        task: String,
        /// A dataset profile (`dataset analyze --json` output).
        #[arg(long)]
        profile: Option<PathBuf>,
        /// Sequence length to plan for (default: from the profile).
        #[arg(long)]
        seq: Option<u32>,
        /// Epochs (default: by dataset size).
        #[arg(long)]
        epochs: Option<f64>,
        /// Effective batch size (default: by dataset size).
        #[arg(long)]
        batch: Option<u32>,
    },
    /// List the built-in models (usable offline by name).
    Models,
}

fn context() -> SkillContext {
    let dir = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    SkillContext::new(dir)
        .with_sink(crate::render::BarSink::new(false))
        .with_cancel(crate::render::ctrl_c_token())
}

fn read_profile(path: &std::path::Path) -> anyhow::Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| {
        Usage(format!(
            "{}:{}:{}: not a JSON dataset profile: {e} (hint: write one with `lora-trainer dataset analyze PATH --json > profile.json`)",
            path.display(),
            e.line(),
            e.column()
        ))
    })?;
    // `dataset analyze --json` prints the profile itself; a StepResult wraps it in `data`.
    Ok(match v.get("data") {
        Some(d) if d.is_object() => d.clone(),
        _ => v,
    })
}

fn parse_enum<T: serde::de::DeserializeOwned>(
    flag: &str,
    value: &str,
    choices: &str,
) -> anyhow::Result<T> {
    serde_json::from_value(Value::String(value.to_ascii_lowercase())).map_err(|_| {
        Usage(format!(
            "--{flag}: unknown value `{value}` (one of {choices})"
        ))
        .into()
    })
}

fn severity(f: &Finding) -> &'static str {
    match f.severity {
        Severity::Error => "error",
        Severity::Warning => "warning",
        Severity::Info => "info",
    }
}

fn findings_table(findings: &[Finding]) -> anyhow::Result<()> {
    if findings.is_empty() {
        return Ok(());
    }
    let rows = findings
        .iter()
        .map(|f| {
            vec![
                severity(f).to_string(),
                f.code.clone(),
                match &f.field {
                    Some(field) => format!("{field}: {}", f.message),
                    None => f.message.clone(),
                },
                f.hint.clone().unwrap_or_default(),
            ]
        })
        .collect();
    output::table(&["severity", "code", "finding", "fix"], rows)
}

fn report_tables(r: &PreflightReport) -> anyhow::Result<()> {
    let b = &r.vram_breakdown;
    let gb = |x: f64| format!("{x:.2} GB");
    output::table(
        &["memory", "estimate"],
        vec![
            vec!["base weights".into(), gb(b.model_gb)],
            vec!["adapters".into(), gb(b.lora_gb)],
            vec!["gradients".into(), gb(b.gradients_gb)],
            vec!["optimizer (AdamW)".into(), gb(b.optimizer_gb)],
            vec!["activations".into(), gb(b.activations_gb)],
            vec!["logits".into(), gb(b.logits_gb)],
            vec!["overhead".into(), gb(b.overhead_gb)],
            vec!["allocator peak".into(), gb(b.total_gb)],
            vec!["runtime (CUDA context / process)".into(), gb(b.runtime_gb)],
            vec![
                "total".into(),
                format!(
                    "{} of {:.1} GB: {}",
                    gb(b.total_with_buffer_gb),
                    r.vram_limit_gb,
                    if r.fits { "fits" } else { "DOES NOT FIT" }
                ),
            ],
        ],
    )?;
    let mut rows = vec![
        vec!["device".into(), r.device.clone()],
        vec![
            "parameters".into(),
            format!("{} ({} trainable)", r.model_params, r.trainable_params),
        ],
        vec![
            "time per step".into(),
            format!("{:.0} ms", r.time_per_step_ms),
        ],
        vec![
            "throughput".into(),
            format!(
                "{:.0} tokens/s, {:.2} samples/s",
                r.throughput.tokens_per_sec, r.throughput.samples_per_sec
            ),
        ],
        vec![
            "FLOPs per token".into(),
            format!("{:.3e}", r.flops_per_token),
        ],
    ];
    if let Some(s) = r.total_steps {
        rows.push(vec!["steps per trial".into(), s.to_string()]);
    }
    if let Some(h) = r.eta_hours {
        rows.push(vec!["time per trial".into(), format!("{h:.2} h")]);
    }
    output::table(&["speed", "estimate"], rows)?;
    for s in &r.suggestions {
        output::line(&format!("to fit: {s}"))?;
    }
    Ok(())
}

/// Runs `preflight SPEC`.
pub async fn preflight(args: PreflightArgs) -> anyhow::Result<()> {
    let (spec, _, _) = crate::cmd::validate::resolve(
        &args.spec,
        args.config_file.as_deref(),
        &args.set,
        args.ablation_preset.as_deref(),
    )?;
    let ctx = context();
    let profile = match (&args.profile, args.no_analyze) {
        (Some(p), _) => read_profile(p)?,
        (None, true) => Value::Null,
        (None, false) => {
            let reg = crate::skills::registry();
            if reg.contains(names::DATASET) && std::path::Path::new(&spec.dataset_path).exists() {
                match reg
                    .call_json(
                        names::DATASET,
                        serde_json::json!({"dataset_path": spec.dataset_path}),
                        &ctx,
                    )
                    .await
                {
                    Ok(v) => v.data,
                    Err(e) => {
                        ctx.warn(format!(
                            "dataset analysis failed, estimating without it: {e}"
                        ));
                        Value::Null
                    }
                }
            } else {
                Value::Null
            }
        }
    };
    let opts = lora_config::PreflightOptions::default();
    let report =
        tokio::task::spawn_blocking(move || lora_config::preflight_spec(&spec, &profile, &opts))
            .await
            .context("the preflight task failed")?;
    if args.json {
        output::json(&report)?;
    } else {
        findings_table(&report.findings)?;
        if report.estimated_vram_mb > 0 {
            report_tables(&report)?;
        }
        output::line(if report.ok {
            "preflight: ok"
        } else {
            "preflight: blocked (fix the errors above)"
        })?;
    }
    if report.ok {
        Ok(())
    } else {
        Err(Usage(format!("preflight found {} error(s)", report.errors.len())).into())
    }
}

/// Runs `config ...`.
pub async fn config(args: ConfigArgs) -> anyhow::Result<()> {
    match args.command {
        ConfigCmd::Models => {
            let rows: Vec<Vec<String>> = lora_config::catalog::entries()
                .iter()
                .map(|e| {
                    let family = e
                        .config
                        .get("model_type")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string();
                    vec![
                        e.id.clone(),
                        family,
                        format!("{:.3}B", e.params as f64 / 1e9),
                        e.aliases.join(", "),
                    ]
                })
                .collect();
            if args.json {
                let v: Vec<Value> = rows
                    .iter()
                    .map(|r| serde_json::json!({"id": r[0], "family": r[1], "params": r[2], "aliases": r[3]}))
                    .collect();
                return output::json(&v);
            }
            output::table(&["model", "family", "params", "also known as"], rows)
        }
        ConfigCmd::Suggest {
            model,
            method,
            vram,
            gpu,
            gpus,
            task,
            profile,
            seq,
            epochs,
            batch,
        } => {
            let input = LoRAConfigInput {
                base_model: model,
                task: parse_enum::<Task>("task", &task, "instruction, domain, chat, style")?,
                method: parse_enum::<PeftMethod>("method", &method, "lora, qlora, prefix, ia3")?,
                vram_limit_gb: vram,
                dataset_profile: match &profile {
                    Some(p) => read_profile(p)?,
                    None => Value::Null,
                },
                gpu_type: gpu,
                num_gpus: gpus,
                max_seq_length: seq,
                epochs,
                target_batch_size: batch,
            };
            let ctx = context();
            let reg = crate::skills::registry();
            let result = reg
                .call_json(names::CONFIG, serde_json::to_value(&input)?, &ctx)
                .await?;
            if args.json {
                return output::json(&result);
            }
            let out: lora_spec::contracts::config::LoRAConfigOutput =
                serde_json::from_value(result.data.clone())?;
            let t = &out.trial_config;
            output::line(&format!(
                "{} — {} ({}), {:.3}B parameters, {} layers, hidden {}",
                out.model.name,
                out.model.architecture,
                out.model.source,
                out.model.params as f64 / 1e9,
                out.model.num_layers,
                out.model.hidden_size
            ))?;
            let opt = |x: Option<u64>| x.map_or("-".to_string(), |v| v.to_string());
            output::table(
                &["setting", "value"],
                vec![
                    vec!["method".into(), t.method.as_str().into()],
                    vec![
                        "lora_rank / alpha / dropout".into(),
                        format!("{} / {} / {}", t.lora_rank, t.lora_alpha, t.lora_dropout),
                    ],
                    vec!["target_modules".into(), t.target_modules.join(", ")],
                    vec!["learning_rate".into(), format!("{:e}", t.learning_rate)],
                    vec![
                        "batch (micro × accumulation)".into(),
                        format!(
                            "{} ({} × {})",
                            t.batch_size, t.micro_batch_size, t.gradient_accumulation
                        ),
                    ],
                    vec!["max_seq_length".into(), t.max_seq_length.to_string()],
                    vec![
                        "gradient_checkpointing".into(),
                        t.gradient_checkpointing.to_string(),
                    ],
                    vec![
                        "epochs / max_steps".into(),
                        format!("{} / {}", t.epochs, opt(t.max_steps)),
                    ],
                    vec![
                        "warm-up ratio / scheduler".into(),
                        format!(
                            "{} / {}",
                            t.warmup_ratio,
                            serde_json::to_value(t.lr_scheduler)?.as_str().unwrap_or("")
                        ),
                    ],
                    vec![
                        "eval / save every".into(),
                        format!("{} / {} steps", opt(t.eval_steps), opt(t.save_steps)),
                    ],
                    vec![
                        "strategy".into(),
                        format!("{} ({})", out.strategy.kind, out.strategy.mixed_precision),
                    ],
                ],
            )?;
            if let Some(p) = &out.preflight {
                report_tables(p)?;
            }
            findings_table(&out.findings)?;
            for r in &out.rationale {
                output::line(&format!("- {r}"))?;
            }
            Ok(())
        }
    }
}
