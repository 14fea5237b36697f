//! `lora-trainer run SPEC [--resume] [--dry-run] [--model tiny|DIR] [--json]`
//! runs a whole experiment with the orchestrator (`lora_trainer` skill), and
//! `lora-trainer reproduce MANIFEST --trial N` re-runs one trial of it.

use std::path::{Path, PathBuf};

use anyhow::Context;
use lora_orchestrator::{Orchestrator, fmt_hours, fmt_metric};
use lora_skill::SkillContext;
use lora_spec::contracts::orchestrator::{ExperimentState, LoRATrainerInput, StopReason};

use crate::exit::{Failed, Usage};
use crate::{output, render};

/// `run` options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The experiment spec (seed 000 YAML/JSON document, or a seed 001 flat spec).
    pub spec: PathBuf,
    /// Continue the experiment journaled in its folder (finished trials are not redone).
    #[arg(long)]
    pub resume: bool,
    /// Plan only: preflight, the planned trials and the budget forecast; no tensors, nothing written.
    #[arg(long)]
    pub dry_run: bool,
    /// Override the base model: `tiny` (a random-init fixture made on first use) or a model folder.
    #[arg(long)]
    pub model: Option<String>,
    /// Hard cap on loop iterations.
    #[arg(long, default_value_t = 20)]
    pub max_loop_iterations: u32,
    /// Skip Step 4 (merge and export).
    #[arg(long)]
    pub no_merge: bool,
    /// Print the StepResult (state, artifacts, log, metadata) as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `reproduce` options.
#[derive(Debug, clap::Args)]
pub struct ReproduceArgs {
    /// An experiment's manifest.json.
    pub manifest: PathBuf,
    /// The trial to re-run.
    #[arg(long)]
    pub trial: u32,
    /// Where the re-run writes (default: `reproduce/` beside the manifest).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// The cache shared by every clone: `${XDG_CACHE_HOME:-$HOME/.cache}/lora-trainer`.
fn cache_dir() -> Option<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return Some(PathBuf::from(x).join("lora-trainer"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/lora-trainer"))
}

/// The default base model `cargo xtask setup` imports.
const DEFAULT_MODEL: &str = "SmolLM2-135M-Instruct";

/// A model folder: an existing path, else `<cache>/models/<name>` (what setup imports).
fn resolve_model(spec_value: &str) -> Option<PathBuf> {
    let p = Path::new(spec_value);
    if p.join("config.json").is_file() {
        return Some(p.to_path_buf());
    }
    let name = p.file_name()?.to_string_lossy().into_owned();
    let cached = cache_dir()?.join("models").join(name);
    cached.join("config.json").is_file().then_some(cached)
}

/// `a/b/../c` as `a/c` (no filesystem access), so printed paths are the plain ones.
fn lexical_normal(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// Runs `run`.
pub async fn run(args: Args, verbose: u8) -> anyhow::Result<()> {
    let (mut spec, _loaded, _) = crate::cmd::validate::resolve(&args.spec, None, &[], None)?;
    match args.model.as_deref() {
        Some("tiny") => {
            let dir = tiny::ensure().context("making the tiny random-init model")?;
            spec.base_model = dir.display().to_string();
        }
        Some(m) => {
            let p = std::path::absolute(m).unwrap_or_else(|_| PathBuf::from(m));
            spec.base_model = p.display().to_string();
        }
        None => {
            if let Some(p) = resolve_model(&spec.base_model) {
                spec.base_model = p.display().to_string();
            } else if !lora_spec::experiment::looks_like_hub_id(&spec.base_model) {
                return Err(Usage(format!(
                    "{}: config.base_model: no model folder at {}\n  hint: run `cargo xtask setup` (imports {DEFAULT_MODEL} into {}), \
                     point base_model at a Hugging Face model folder, or try `--model tiny`",
                    args.spec.display(),
                    spec.base_model,
                    cache_dir()
                        .map(|c| c.join("models").display().to_string())
                        .unwrap_or_else(|| "the cache".into())
                ))
                .into());
            }
        }
    }
    spec.base_config.base_model = Some(spec.base_model.clone());
    spec.output.dir = lexical_normal(Path::new(&spec.output.dir))
        .display()
        .to_string();
    if args.model.is_some() {
        // Another model is another experiment: keep its folder apart.
        let tag = if args.model.as_deref() == Some("tiny") {
            "tiny"
        } else {
            "model"
        };
        spec.experiment_name = format!("{}-{tag}", spec.experiment_name);
    }
    let input = LoRATrainerInput {
        auto_merge: spec.output.merge_after && !args.no_merge,
        merge_format: spec.output.export_format,
        experiment: spec,
        dry_run: args.dry_run,
        max_loop_iterations: args.max_loop_iterations,
        resume: args.resume,
        experiment_dir: None,
    };
    let cwd = std::env::current_dir().context("reading the current directory")?;
    let ctx = SkillContext::new(cwd)
        .with_sink(render::BarSink::new(verbose > 0))
        .with_cancel(render::ctrl_c_token());
    let orch = Orchestrator::new(crate::skills::registry());
    let started = std::time::Instant::now();
    let exp_dir = lora_orchestrator::experiment_dir(&input, &ctx);
    let result = match orch.run(&input, &ctx).await {
        Ok(r) => r,
        // A failure once the journal exists (a full disk, a backend error):
        // every finished step is kept, so say how to continue.
        Err(mut e)
            if !e.kind.is_user_error()
                && exp_dir.join(lora_orchestrator::JOURNAL_FILE).is_file() =>
        {
            let again = format!(
                "every finished step is journaled in {}: fix the cause, then `lora-trainer run {} --resume` continues from there",
                exp_dir.display(),
                args.spec.display()
            );
            let hint = match e.hint.take() {
                Some(h) => format!("{h}; {again}"),
                None => again,
            };
            return Err(e.with_hint(hint).into());
        }
        Err(e) => return Err(e.into()),
    };
    let elapsed = started.elapsed().as_secs_f64();
    let state = &result.data;
    if args.json {
        output::json(&result)?;
    } else {
        print_summary(&input, state, &result.output_text, elapsed)?;
    }
    match state.stop_reason {
        Some(StopReason::Cancelled) => Err(Failed(
            "cancelled: every finished step is journaled; run again with --resume".into(),
        )
        .into()),
        _ => Ok(()),
    }
}

fn print_summary(
    input: &LoRATrainerInput,
    state: &ExperimentState,
    log: &str,
    elapsed: f64,
) -> anyhow::Result<()> {
    let spec = &input.experiment;
    output::line(log)?;
    output::line("")?;
    let best = state.best_trial.as_ref().map(|b| b.trial_id);
    let rows: Vec<Vec<String>> = state
        .trial_history
        .iter()
        .map(|t| {
            vec![
                format!(
                    "{}{}",
                    t.trial_id,
                    if Some(t.trial_id) == best { " *" } else { "" }
                ),
                t.record.status.clone(),
                format!("{:.1e}", t.record.config.learning_rate),
                t.record.config.lora_rank.to_string(),
                t.record.config.lora_alpha.to_string(),
                t.training_steps.to_string(),
                t.final_loss.map(fmt_metric).unwrap_or_else(|| "-".into()),
                t.record
                    .objective
                    .map(fmt_metric)
                    .unwrap_or_else(|| "-".into()),
                t.eval
                    .as_ref()
                    .and_then(|e| e.delta_vs_base_loss)
                    .map(fmt_metric)
                    .unwrap_or_else(|| "-".into()),
                t.predicted_gpu_hours
                    .map(fmt_hours)
                    .unwrap_or_else(|| "-".into()),
                fmt_hours(t.record.gpu_hours),
                t.artifact
                    .as_ref()
                    .map(|a| a.version.clone())
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let metric = spec.stop_metric.as_str();
    output::table(
        &[
            "trial",
            "status",
            "lr",
            "rank",
            "alpha",
            "steps",
            "final loss",
            metric,
            "vs base",
            "pred. h",
            "device-h",
            "version",
        ],
        rows,
    )?;
    if let Some(r) = state.stop_reason {
        output::line(&format!(
            "stopped: {r} — {}",
            state.stop_message.clone().unwrap_or_default()
        ))?;
    }
    let b = &state.budget;
    if input.dry_run {
        output::line(&format!(
            "forecast: {} of {} device-hours",
            fmt_hours(b.gpu_hours_forecast),
            fmt_hours(b.budget_gpu_hours)
        ))?;
        return output::line("dry run: nothing was trained or written");
    }
    output::line(&format!(
        "budget: {} of {} device-hours used{}; wall time {elapsed:.1} s",
        fmt_hours(b.gpu_hours_used),
        fmt_hours(b.budget_gpu_hours),
        b.dollars_used
            .map(|d| format!(", ${d:.2}"))
            .unwrap_or_default()
    ))?;
    if let Some(bt) = &state.best_trial {
        output::line(&format!(
            "best: trial {} with {metric} {}{}",
            bt.trial_id,
            bt.record.objective.map(fmt_metric).unwrap_or_default(),
            state
                .base_loss
                .map(|l| format!(" (base model {})", fmt_metric(l)))
                .unwrap_or_default()
        ))?;
    }
    output::line("")?;
    output::line("written:")?;
    if let Some(d) = &state.experiment_dir {
        output::line(&format!("  experiment folder  {d}"))?;
        output::line(&format!(
            "  journal            {}",
            Path::new(d).join("journal.json").display()
        ))?;
    }
    if let Some(a) = state
        .best_trial
        .as_ref()
        .and_then(|b| b.adapter_path.as_ref())
    {
        output::line(&format!("  best adapter       {a}"))?;
    }
    if let Some(v) = state.best_trial.as_ref().and_then(|b| b.artifact.as_ref()) {
        output::line(&format!(
            "  stored version     {} at {}",
            v.version, v.stored_path
        ))?;
    }
    if let Some(m) = &state.merged_path {
        output::line(&format!("  merged / exported  {m}"))?;
    }
    for r in &state.reports {
        output::line(&format!("  report             {r}"))?;
    }
    Ok(())
}

/// Runs `reproduce`.
pub async fn reproduce(args: ReproduceArgs, verbose: u8) -> anyhow::Result<()> {
    let out = match &args.out {
        Some(o) => o.clone(),
        None => args
            .manifest
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .join("reproduce"),
    };
    let cwd = std::env::current_dir().context("reading the current directory")?;
    let ctx = SkillContext::new(cwd)
        .with_sink(render::BarSink::new(verbose > 0))
        .with_cancel(render::ctrl_c_token());
    let reg = crate::skills::registry();
    let result =
        lora_orchestrator::manifest::reproduce(&reg, &args.manifest, args.trial, &out, &ctx)
            .await?;
    if args.json {
        output::json(&result.data)?;
    } else {
        output::line(&result.output_text)?;
    }
    if result.data.matches || result.data.matches_within_tolerance {
        Ok(())
    } else {
        Err(Failed(format!("trial {} does not reproduce", args.trial)).into())
    }
}

/// The `--model tiny` fixture: a random-init Llama in Hugging Face layout
/// (2 layers, hidden 64) with the default model's tokenizer, made once in the cache.
mod tiny {
    use std::path::PathBuf;

    use anyhow::{Context, bail};
    use safetensors::tensor::{Dtype, TensorView};

    const HIDDEN: usize = 64;
    const INTER: usize = 128;
    const LAYERS: usize = 2;
    const HEADS: usize = 4;
    const KV_HEADS: usize = 2;

    /// Seeded normal(0, 0.02) values (xorshift64* + Box-Muller): the same model on every machine.
    fn normal(n: usize, state: &mut u64) -> Vec<f32> {
        let mut next = || {
            *state ^= *state >> 12;
            *state ^= *state << 25;
            *state ^= *state >> 27;
            (state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
        };
        (0..n)
            .map(|_| {
                let u1 = next().max(1e-12);
                let u2 = next();
                ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos() * 0.02) as f32
            })
            .collect()
    }

    /// Makes (once) and returns the tiny model folder.
    pub fn ensure() -> anyhow::Result<PathBuf> {
        let cache = super::cache_dir().context("no HOME or XDG_CACHE_HOME")?;
        let dir = cache.join("models").join("tiny-random-llama");
        if dir.join("model.safetensors").is_file() {
            return Ok(dir);
        }
        let src = cache.join("models").join(super::DEFAULT_MODEL);
        if !src.join("tokenizer.json").is_file() {
            bail!(
                "the tiny model borrows the tokenizer of {}: run `cargo xtask setup` first",
                src.display()
            );
        }
        let base: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(src.join("config.json"))?)?;
        let vocab = base["vocab_size"]
            .as_u64()
            .context("vocab_size in config.json")? as usize;
        // A temp folder of this process's own: two runs making the model at once
        // (parallel tests, two terminals) must not delete each other's files.
        // It is removed on every early return.
        std::fs::create_dir_all(cache.join("models"))?;
        let staging = tempfile::Builder::new()
            .prefix(".tiny-random-llama.")
            .tempdir_in(cache.join("models"))?;
        let tmp = staging.path();
        for f in [
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "generation_config.json",
            "chat_template.jinja",
        ] {
            if src.join(f).is_file() {
                std::fs::copy(src.join(f), tmp.join(f))?;
            }
        }
        let config = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": HIDDEN,
            "intermediate_size": INTER,
            "num_hidden_layers": LAYERS,
            "num_attention_heads": HEADS,
            "num_key_value_heads": KV_HEADS,
            "vocab_size": vocab,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "tie_word_embeddings": true,
            "hidden_act": "silu",
            "torch_dtype": "float32",
            "bos_token_id": base["bos_token_id"],
            "eos_token_id": base["eos_token_id"],
            "pad_token_id": base["pad_token_id"],
        });
        lora_skill::fs::write_json_atomic(&tmp.join("config.json"), &config)?;
        let head = HIDDEN / HEADS;
        let mut shapes: Vec<(String, Vec<usize>)> = vec![
            ("model.embed_tokens.weight".into(), vec![vocab, HIDDEN]),
            ("model.norm.weight".into(), vec![HIDDEN]),
        ];
        for l in 0..LAYERS {
            let p = format!("model.layers.{l}");
            shapes.extend([
                (format!("{p}.self_attn.q_proj.weight"), vec![HIDDEN, HIDDEN]),
                (
                    format!("{p}.self_attn.k_proj.weight"),
                    vec![KV_HEADS * head, HIDDEN],
                ),
                (
                    format!("{p}.self_attn.v_proj.weight"),
                    vec![KV_HEADS * head, HIDDEN],
                ),
                (format!("{p}.self_attn.o_proj.weight"), vec![HIDDEN, HIDDEN]),
                (format!("{p}.mlp.gate_proj.weight"), vec![INTER, HIDDEN]),
                (format!("{p}.mlp.up_proj.weight"), vec![INTER, HIDDEN]),
                (format!("{p}.mlp.down_proj.weight"), vec![HIDDEN, INTER]),
                (format!("{p}.input_layernorm.weight"), vec![HIDDEN]),
                (format!("{p}.post_attention_layernorm.weight"), vec![HIDDEN]),
            ]);
        }
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let data: Vec<(String, Vec<usize>, Vec<u8>)> = shapes
            .into_iter()
            .map(|(name, shape)| {
                let n: usize = shape.iter().product();
                let values = if name.ends_with("norm.weight") {
                    vec![1.0f32; n]
                } else {
                    normal(n, &mut state)
                };
                let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                (name, shape, bytes)
            })
            .collect();
        let views = data
            .iter()
            .map(|(n, s, b)| Ok((n.clone(), TensorView::new(Dtype::F32, s.clone(), b)?)))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let bytes = safetensors::serialize(views, None)?;
        lora_skill::fs::write_atomic(&tmp.join("model.safetensors"), &bytes)?;
        if dir.join("model.safetensors").is_file() {
            // Another process finished first; its model is the same one (fixed seed).
            return Ok(dir);
        }
        // A folder without its weights (files deleted by hand) is not a model:
        // replace it. A missing folder is left alone, so a model another process
        // publishes meanwhile is never deleted here.
        if dir.is_dir() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        match lora_skill::fs::publish_dir(tmp, &dir) {
            Ok(()) => {
                // Renamed away: nothing is left for the TempDir to delete.
                let _ = staging.keep();
                Ok(dir)
            }
            Err(_) if dir.join("model.safetensors").is_file() => Ok(dir),
            Err(e) => Err(e.into()),
        }
    }
}
