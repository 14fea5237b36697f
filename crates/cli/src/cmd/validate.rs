//! `lora-trainer validate SPEC`: load, check and show what an experiment
//! resolves to (with seed 003 config files, `--set` overrides and presets).

use std::path::PathBuf;

use lora_spec::experiment::{Loaded, load_experiment};
use lora_spec::training_config::{TrainingConfig, load_training_config_over};

use crate::output;

/// `validate` options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The experiment spec (YAML or JSON).
    pub spec: PathBuf,
    /// A seed 003 TrainingConfig JSON/YAML file applied over `config:`.
    #[arg(long)]
    pub config_file: Option<PathBuf>,
    /// Dotted override of the TrainingConfig, e.g. `optimizer.learning_rate=1e-4` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// A seed 003 preset, e.g. `lora_rank:r32`.
    #[arg(long)]
    pub ablation_preset: Option<String>,
    /// Print the resolved spec as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Loads the spec and applies config files, overrides and presets; returns
/// the resolved flat spec and the settings that are parsed but not run.
pub fn resolve(
    spec: &std::path::Path,
    config_file: Option<&std::path::Path>,
    set: &[String],
    preset: Option<&str>,
) -> anyhow::Result<(lora_spec::ExperimentSpec, Loaded, Vec<String>)> {
    let (mut resolved, loaded) = load_experiment(spec)?;
    let mut not_run = Vec::new();
    if config_file.is_some() || !set.is_empty() || preset.is_some() {
        let base = TrainingConfig::from_trial(&resolved.base_config);
        let tc = load_training_config_over(Some(&base), config_file, set, preset)?;
        not_run = tc.apply_to(&mut resolved.base_config);
        if let Some(m) = &tc.base_model {
            resolved.base_model = m.clone();
        }
        let issues = resolved.base_config.check();
        if !issues.is_empty() {
            return Err(lora_spec::SpecError {
                file: "--config-file/--set".into(),
                issues: issues.into_iter().map(|i| i.under("config")).collect(),
            }
            .into());
        }
    }
    Ok((resolved, loaded, not_run))
}

/// Runs the command.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let (spec, loaded, not_run) = resolve(
        &args.spec,
        args.config_file.as_deref(),
        &args.set,
        args.ablation_preset.as_deref(),
    )?;
    if args.json {
        return output::json(&serde_json::json!({
            "ok": true,
            "form": match loaded { Loaded::File(_) => "document", Loaded::Spec(_) => "flat_spec" },
            "spec": spec,
            "not_run": not_run,
        }));
    }
    let t = spec.base_config.normalized();
    let methods: Vec<&str> = spec.methods.iter().map(|m| m.as_str()).collect();
    let rows = vec![
        vec!["experiment".into(), spec.experiment_name.clone()],
        vec![
            "dataset".into(),
            format!("{} ({})", spec.dataset_path, name(&spec.dataset_format)),
        ],
        vec!["base model".into(), spec.base_model.clone()],
        vec!["methods".into(), methods.join(", ")],
        vec![
            "lora".into(),
            format!(
                "r={} alpha={} dropout={} targets={}",
                t.lora_rank,
                t.lora_alpha,
                t.lora_dropout,
                t.target_modules.join(",")
            ),
        ],
        vec![
            "optimisation".into(),
            format!(
                "lr={:e} batch={} (micro {} x accum {}) epochs={} scheduler={}",
                t.learning_rate,
                t.batch_size,
                t.micro_batch_size,
                t.gradient_accumulation,
                t.epochs,
                name(&t.lr_scheduler)
            ),
        ],
        vec![
            "protocol".into(),
            format!(
                "{}, {} trials, strategy {}",
                name(&spec.protocol.kind),
                spec.max_trials,
                name(&spec.protocol.strategy)
            ),
        ],
        vec![
            "budget".into(),
            format!(
                "{} device-hours{}",
                spec.budget_gpu_hours,
                spec.protocol
                    .budget_dollars
                    .map(|d| format!(", ${d}"))
                    .unwrap_or_default()
            ),
        ],
        vec![
            "stop".into(),
            format!(
                "{} <= {} / patience {}",
                spec.stop_metric,
                spec.stop_threshold
                    .map(|x| x.to_string())
                    .unwrap_or("-".into()),
                spec.stop_patience
                    .map(|x| x.to_string())
                    .unwrap_or("-".into())
            ),
        ],
        vec![
            "output".into(),
            format!(
                "{}{}, merge_after={} -> {}",
                name(&spec.output.export_format),
                if spec.output.export_format == lora_spec::contracts::merge::ExportFormat::Gguf {
                    format!(" {}", name(&spec.output.gguf_quantization))
                } else {
                    String::new()
                },
                spec.output.merge_after,
                spec.output.dir
            ),
        ],
    ];
    output::line(&format!(
        "ok: {} is a valid experiment",
        args.spec.display()
    ))?;
    output::table(&["setting", "value"], rows)?;
    for n in not_run {
        output::line(&format!("note: parsed but not run by this build: {n}"))?;
    }
    Ok(())
}

/// The serde name of a unit enum value (`q4_k_m`, `standard`).
pub fn name<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => String::new(),
    }
}
