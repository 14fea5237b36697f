//! `lora-trainer train SPEC`: trains the spec's base configuration once on
//! its dataset with the TrainingSkill, drawing a progress bar (loss, lr,
//! tokens/s, ETA), and prints the result as a table or `--json`.

use std::path::PathBuf;

use anyhow::Context as _;
use lora_skill::{Skill, SkillContext};
use lora_spec::contracts::training::{TrainingRequest, TrainingStatus};
use lora_training::TrainingSkill;

use crate::exit::Failed;
use crate::{output, render};

/// Arguments of `train`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Experiment spec (YAML or JSON): its `base_config` is trained on `dataset_path` with `base_model`.
    pub spec: PathBuf,
    /// Output folder (adapter/, checkpoints/, metrics.jsonl). Default: `<output.dir>/train-<trial_id>`.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Resume from a checkpoint folder (`.../checkpoints/checkpoint-N`).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Plan only: read and tokenise the data, report the steps, no training.
    #[arg(long)]
    pub dry_run: bool,
    /// `auto`, `cpu`, `cuda`, `cuda:N`.
    #[arg(long)]
    pub device: Option<String>,
    /// CPU threads for libtorch.
    #[arg(long)]
    pub threads: Option<u32>,
    /// Override `max_steps` of the base config.
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Pause after N steps with a checkpoint (status stopped).
    #[arg(long)]
    pub stop_after_steps: Option<u64>,
    /// Print the TrainingReport as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Runs `train`.
pub async fn run(args: Args, verbose: u8) -> anyhow::Result<()> {
    let (spec, _) = lora_spec::experiment::load_experiment(&args.spec)?;
    let mut trial = spec.base_config.clone();
    trial.base_model = Some(spec.base_model.clone());
    if args.max_steps.is_some() {
        trial.max_steps = args.max_steps;
    }
    let spec_dir = args.spec.parent().map(PathBuf::from).unwrap_or_default();
    let out = args.out.clone().unwrap_or_else(|| {
        spec_dir
            .join(&spec.output.dir)
            .join(format!("train-{}", trial.trial_id))
    });
    let req = TrainingRequest {
        trial_config: trial,
        dataset_path: spec.dataset_path.clone(),
        output_dir: out.display().to_string(),
        resume_from: args.resume.as_ref().map(|p| p.display().to_string()),
        dry_run: args.dry_run,
        eval_dataset_path: spec.eval_dataset_path.clone(),
        eval_holdout_fraction: Some(spec.eval_fraction.clamp(0.0, 0.49)),
        init_adapter: None,
        device: args.device.clone(),
        threads: args.threads,
        stop_after_steps: args.stop_after_steps,
        keep_checkpoints: None,
    };
    let cwd = std::env::current_dir().context("reading the current directory")?;
    let ctx = SkillContext::new(cwd)
        .with_sink(render::BarSink::new(true))
        .with_cancel(render::ctrl_c_token())
        .child("training");
    let _ = verbose;
    let res = TrainingSkill.run(req, &ctx).await?;
    let r = &res.data;
    if args.json {
        output::json(r)?;
    } else {
        let opt = |v: Option<f64>, p: usize| v.map_or("-".into(), |x| format!("{x:.p$}"));
        let rows = vec![
            vec![
                "status".into(),
                format!("{:?}", r.output.status).to_lowercase(),
            ],
            vec![
                "steps".into(),
                format!("{} / {}", r.output.training_steps, r.planned_steps),
            ],
            vec!["final loss".into(), opt(r.output.final_loss, 4)],
            vec![
                "last eval loss".into(),
                opt(r.eval_history.last().map(|e| e.eval_loss), 4),
            ],
            vec!["tokens/s".into(), opt(r.tokens_per_s, 1)],
            vec!["peak RSS (MB)".into(), opt(r.peak_rss_mb, 0)],
            vec!["device-hours".into(), format!("{:.4}", r.output.gpu_hours)],
            vec![
                "adapter".into(),
                r.output.adapter_path.clone().unwrap_or("-".into()),
            ],
            vec![
                "checkpoint".into(),
                r.checkpoint_path.clone().unwrap_or("-".into()),
            ],
            vec![
                "metrics".into(),
                r.metrics_path.clone().unwrap_or("-".into()),
            ],
        ];
        output::table(&["", "training"], rows)?;
        if let Some(reason) = &r.reason {
            output::line(reason)?;
        }
    }
    if r.output.status == TrainingStatus::Failed {
        return Err(Failed(r.reason.clone().unwrap_or_else(|| "training failed".into())).into());
    }
    Ok(())
}
