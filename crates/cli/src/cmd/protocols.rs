//! Research protocol commands: `ablation`, `curriculum`, `ensemble` write
//! the configs (or stages) they generate; `manifest create|verify` writes and
//! checks a reproducibility manifest. Each calls its protocol skill.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use lora_skill::{Skill, SkillContext};
use lora_spec::ExperimentSpec;
use lora_spec::contracts::orchestrator::ExperimentState;
use lora_spec::contracts::protocols::{
    AblationInput, CurriculumInput, DifficultyMeasure, EnsembleInput, ManifestAction, ManifestInput,
};
use lora_spec::experiment::load_experiment;
use serde_json::Value;

use crate::exit::{Failed, Usage};
use crate::output;

/// `ablation` options.
#[derive(Debug, Args)]
pub struct AblationArgs {
    /// The experiment spec (its `config:` is the base; its `protocol.ablation` is used when no option is given).
    pub spec: PathBuf,
    /// The parameter to vary: a trial field (`lora_rank`) or a seed 003 path (`optimizer.learning_rate`).
    #[arg(long)]
    pub param: Option<String>,
    /// Its values, comma-separated (`4,8,16`; `q_proj+v_proj` is a list).
    #[arg(long, value_delimiter = ',')]
    pub values: Vec<String>,
    /// A grid axis `PARAM=V1,V2` (repeatable): every combination is a config.
    #[arg(long, value_name = "PARAM=V1,V2")]
    pub grid: Vec<String>,
    /// A seed 003 preset: `lora_rank` (all variants) or `lora_rank:r32`.
    #[arg(long)]
    pub preset: Option<String>,
    /// Do not add the base config as a baseline point.
    #[arg(long)]
    pub no_baseline: bool,
    /// Folder for the configs (default: `<output.dir>/<experiment>/ablation`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the skill's result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `curriculum` options.
#[derive(Debug, Args)]
pub struct CurriculumArgs {
    /// A named stage `NAME=PATH` (repeatable, in order: `--stage easy=e.jsonl --stage hard=h.jsonl`).
    #[arg(long, value_name = "NAME=PATH")]
    pub stage: Vec<String>,
    /// Or one JSONL dataset split by difficulty.
    #[arg(long)]
    pub dataset: Option<PathBuf>,
    /// Stages of the split.
    #[arg(long, default_value_t = 3)]
    pub stages: u32,
    /// Difficulty score: `length` (characters), `words`, or `loss` (the
    /// base model's loss on each sample; needs `--model`).
    #[arg(long, default_value = "length")]
    pub measure: String,
    /// The base model that scores samples for `--measure loss`.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Epochs: one for every stage or one per stage (`1,1,2`).
    #[arg(long, value_delimiter = ',')]
    pub epochs: Vec<f64>,
    /// Folder for the stage files of a split (default: beside the dataset).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the skill's result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `ensemble` options.
#[derive(Debug, Args)]
pub struct EnsembleArgs {
    /// The experiment spec (its `config:` is the base).
    pub spec: PathBuf,
    /// Members (default: the spec's `protocol.ensemble.members`).
    #[arg(long)]
    pub members: Option<u32>,
    /// Seed of the member seeds (default: the spec's `protocol.seed`).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Folder for the member configs (default: `<output.dir>/<experiment>/ensemble`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the skill's result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `manifest` options.
#[derive(Debug, Args)]
pub struct ManifestArgs {
    #[command(subcommand)]
    cmd: ManifestCmd,
}

#[derive(Debug, Subcommand)]
enum ManifestCmd {
    /// Write a manifest for a spec (and, with --state, its trials).
    Create {
        /// The experiment spec.
        spec: PathBuf,
        /// The experiment state JSON (from `run`), for every trial's seed and config.
        #[arg(long)]
        state: Option<PathBuf>,
        /// Experiment id (default: the experiment name).
        #[arg(long)]
        id: Option<String>,
        /// Where to write it.
        #[arg(long, default_value = "experiment_manifest.json")]
        out: PathBuf,
        /// Print the skill's result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Re-check a manifest against the files and this machine (and a spec, when given).
    Verify {
        /// The manifest.
        manifest: PathBuf,
        /// The spec about to run (checks seeds and hyper-parameters too).
        #[arg(long)]
        spec: Option<PathBuf>,
        /// Print the skill's result as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn ctx() -> anyhow::Result<SkillContext> {
    let dir = std::env::current_dir().context("reading the current directory")?;
    Ok(SkillContext::new(dir)
        .with_sink(crate::render::BarSink::new(false))
        .with_cancel(crate::render::ctrl_c_token()))
}

/// `8` -> 8, `1e-4` -> 0.0001, `true`, `q_proj+v_proj` -> a list, anything else a string.
fn parse_value(s: &str) -> Value {
    let s = s.trim();
    if s.contains('+') && s.parse::<f64>().is_err() {
        return Value::Array(
            s.split('+')
                .map(|x| Value::String(x.trim().to_string()))
                .collect(),
        );
    }
    serde_json::from_str::<Value>(s)
        .ok()
        .filter(|v| !v.is_object() && !v.is_array())
        .unwrap_or_else(|| Value::String(s.to_string()))
}

fn default_dir(spec: &ExperimentSpec, what: &str) -> PathBuf {
    Path::new(&spec.output.dir)
        .join(&spec.experiment_name)
        .join(what)
}

/// Runs `ablation`.
pub async fn ablation(a: AblationArgs) -> anyhow::Result<()> {
    let (spec, _) = load_experiment(&a.spec)?;
    let mut input = AblationInput {
        base_config: spec.base_config.clone(),
        include_baseline: !a.no_baseline,
        metric: spec.stop_metric.clone(),
        ..AblationInput::default()
    };
    if a.param.is_none() && a.grid.is_empty() && a.preset.is_none() {
        let Some(s) = &spec.protocol.ablation else {
            return Err(Usage(
                "nothing to ablate: give --param with --values, --grid or --preset, or a protocol.ablation section"
                    .into(),
            )
            .into());
        };
        input.param = s.param.clone();
        input.values = s.values.clone();
        input.grid = s.grid.clone();
        input.preset = s.preset.clone();
    } else {
        input.param = a.param.clone();
        input.values = a.values.iter().map(|v| parse_value(v)).collect();
        input.preset = a.preset.clone();
        let mut grid = BTreeMap::new();
        for g in &a.grid {
            let Some((k, vs)) = g.split_once('=') else {
                return Err(Usage(format!("--grid `{g}` is not PARAM=V1,V2")).into());
            };
            grid.insert(
                k.trim().to_string(),
                vs.split(',').map(parse_value).collect(),
            );
        }
        input.grid = grid;
    }
    let out_dir = a
        .out
        .clone()
        .unwrap_or_else(|| default_dir(&spec, "ablation"));
    input.output_dir = Some(out_dir.display().to_string());
    let r = lora_protocols::AblationSkill.run(input, &ctx()?).await?;
    if a.json {
        return output::json(&r);
    }
    let rows = r
        .data
        .configs
        .iter()
        .map(|p| {
            let c = &p.trial_config;
            vec![
                c.trial_id.to_string(),
                format!("{}{}", p.label, if p.baseline { " (baseline)" } else { "" }),
                format!("{:e}", c.learning_rate),
                c.lora_rank.to_string(),
                c.lora_alpha.to_string(),
                c.batch_size.to_string(),
                c.target_modules.join(","),
            ]
        })
        .collect();
    output::table(
        &["trial", "point", "lr", "rank", "alpha", "batch", "targets"],
        rows,
    )?;
    output::line(&format!(
        "{} configs written to {}",
        r.data.written.len(),
        out_dir.display()
    ))
}

/// Runs `curriculum`.
pub async fn curriculum(a: CurriculumArgs) -> anyhow::Result<()> {
    let mut files = serde_json::Map::new();
    for s in &a.stage {
        let Some((name, path)) = s.split_once('=') else {
            return Err(Usage(format!("--stage `{s}` is not NAME=PATH")).into());
        };
        files.insert(
            name.trim().to_string(),
            Value::String(path.trim().to_string()),
        );
    }
    let measure = match a.measure.as_str() {
        "length" => DifficultyMeasure::Length,
        "words" => DifficultyMeasure::Words,
        "loss" => DifficultyMeasure::Loss,
        other => {
            return Err(Usage(format!("--measure `{other}`: use length, words or loss")).into());
        }
    };
    let scores = if measure == DifficultyMeasure::Loss {
        let (Some(model), Some(data)) = (&a.model, &a.dataset) else {
            return Err(Usage(
                "--measure loss scores --dataset with a model: add --model DIR".into(),
            )
            .into());
        };
        let req = lora_spec::contracts::eval::EvalRequest {
            per_sample: true,
            compute_delta: false,
            ..lora_spec::contracts::eval::EvalRequest::from(lora_spec::contracts::eval::EvalInput {
                adapter_path: None,
                base_model: model.display().to_string(),
                eval_dataset_path: data.display().to_string(),
                compute_perplexity: false,
                compute_delta: false,
            })
        };
        let r = lora_eval::EvalSkill.run(req, &ctx()?).await?;
        r.data.sample_losses.unwrap_or_default()
    } else {
        Vec::new()
    };
    let input = CurriculumInput {
        files,
        dataset_path: a.dataset.as_ref().map(|d| d.display().to_string()),
        num_stages: Some(a.stages),
        measure,
        epochs: a.epochs.clone(),
        output_dir: a.out.as_ref().map(|d| d.display().to_string()),
        scores,
    };
    let r = lora_protocols::CurriculumSkill.run(input, &ctx()?).await?;
    if a.json {
        return output::json(&r);
    }
    let rows = r
        .data
        .stages
        .iter()
        .map(|s| {
            vec![
                s.index.to_string(),
                s.name.clone(),
                s.dataset_path.clone(),
                s.samples.to_string(),
                s.epochs.to_string(),
                s.difficulty.map_or("-".into(), |(a, b)| format!("{a}-{b}")),
            ]
        })
        .collect();
    output::table(
        &["stage", "name", "data", "samples", "epochs", "difficulty"],
        rows,
    )
}

/// Runs `ensemble`.
pub async fn ensemble(a: EnsembleArgs) -> anyhow::Result<()> {
    let (spec, _) = load_experiment(&a.spec)?;
    let members = a
        .members
        .or_else(|| spec.protocol.ensemble.as_ref().map(|e| e.members))
        .unwrap_or(3);
    let input = EnsembleInput {
        base_config: spec.base_config.clone(),
        n_members: members,
        seed: Some(a.seed.unwrap_or(spec.protocol.seed)),
        ..EnsembleInput::default()
    };
    let r = lora_protocols::EnsembleSkill.run(input, &ctx()?).await?;
    let out_dir = a
        .out
        .clone()
        .unwrap_or_else(|| default_dir(&spec, "ensemble"));
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    for c in &r.data.configs {
        let p = out_dir.join(format!("member_{:02}.json", c.trial_config.trial_id));
        lora_skill::fs::write_json_atomic(&p, &c.trial_config)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    if a.json {
        return output::json(&r);
    }
    for c in &r.data.configs {
        output::line(&c.rationale)?;
    }
    output::line(&format!(
        "{} member configs written to {}",
        r.data.configs.len(),
        out_dir.display()
    ))
}

/// Runs `manifest create|verify`.
pub async fn manifest(a: ManifestArgs) -> anyhow::Result<()> {
    match a.cmd {
        ManifestCmd::Create {
            spec,
            state,
            id,
            out,
            json,
        } => {
            let (spec, _) = load_experiment(&spec)?;
            let state: Option<ExperimentState> = match state {
                Some(p) => {
                    let text = std::fs::read_to_string(&p)
                        .with_context(|| format!("reading {}", p.display()))?;
                    Some(lora_skill::decode(serde_json::from_str(&text).map_err(
                        |e| Usage(format!("{}:{}: not JSON: {e}", p.display(), e.line())),
                    )?)?)
                }
                None => None,
            };
            let input = ManifestInput {
                action: ManifestAction::Create,
                spec: Some(spec),
                state,
                experiment_id: id,
                path: out.display().to_string(),
            };
            let r = lora_protocols::ManifestSkill.run(input, &ctx()?).await?;
            if json {
                return output::json(&r);
            }
            output::line(&format!(
                "manifest {} written to {} ({} seeds, dataset sha256 {})",
                r.data.manifest.fingerprint,
                r.data.path,
                r.data.manifest.seeds.len(),
                r.data
                    .manifest
                    .dataset
                    .as_ref()
                    .map_or("-", |d| d.sha256.as_str())
            ))
        }
        ManifestCmd::Verify {
            manifest,
            spec,
            json,
        } => {
            let spec = match spec {
                Some(p) => Some(load_experiment(&p)?.0),
                None => None,
            };
            let input = ManifestInput {
                action: ManifestAction::Verify,
                spec,
                state: None,
                experiment_id: None,
                path: manifest.display().to_string(),
            };
            let r = lora_protocols::ManifestSkill.run(input, &ctx()?).await?;
            if json {
                output::json(&r)?;
            } else if r.data.drift.is_empty() {
                output::line("nothing drifted")?;
            } else {
                let rows = r
                    .data
                    .drift
                    .iter()
                    .map(|d| {
                        vec![
                            d.field.clone(),
                            format!("{:?}", d.severity).to_lowercase(),
                            d.expected.clone(),
                            d.actual.clone(),
                        ]
                    })
                    .collect();
                output::table(&["drifted", "severity", "manifest", "now"], rows)?;
            }
            if r.data.reproducible {
                Ok(())
            } else {
                Err(
                    Failed("the manifest does not match: see the breaking drift above".into())
                        .into(),
                )
            }
        }
    }
}
