//! The reproducibility manifest of an experiment (`manifest.json`) and
//! `reproduce`: re-run one trial from it and say whether it matches.
//!
//! The manifest pins what a trial's result depends on: the spec, the SHA-256
//! of every data file, the base model's `config.json` and weights index
//! hashes, and per trial the resolved configuration (seed included), the
//! data it trained on, the adapter it started from, and its results (steps,
//! losses, the SHA-256 of the adapter folder).

use std::path::{Path, PathBuf};

use lora_skill::{SkillContext, SkillError, SkillRegistry, StepResult};
use lora_spec::contracts::eval::{EvalInput, EvalReport, EvalRequest};
use lora_spec::contracts::names;
use lora_spec::contracts::orchestrator::{ExperimentState, TrialRole};
use lora_spec::contracts::training::{TrainingInput, TrainingReport, TrainingRequest};
use lora_spec::experiment::ExperimentSpec;
use lora_spec::trial::TrialConfig;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::OrchestratorError;

/// The `format` field of a manifest.
pub const MANIFEST_FORMAT: &str = "lora-trainer/experiment-manifest";
/// The manifest's file name in the experiment folder.
pub const MANIFEST_FILE: &str = "manifest.json";

/// A file and its SHA-256.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct FileHash {
    /// Path.
    pub path: String,
    /// SHA-256 (hex), none when the file was unreadable.
    pub sha256: Option<String>,
}

/// One trial as the manifest pins it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ManifestTrial {
    /// Trial.
    pub trial_id: u32,
    /// Its role in the protocol.
    pub role: TrialRole,
    /// The resolved configuration (seed included).
    pub config: TrialConfig,
    /// The data it trained on.
    pub dataset_path: String,
    /// The adapter it started from (curriculum), if any.
    pub init_adapter: Option<String>,
    /// completed / failed / pruned.
    pub status: String,
    /// Optimiser steps.
    pub training_steps: u64,
    /// Last training loss.
    pub final_loss: Option<f64>,
    /// Eval loss.
    pub eval_loss: Option<f64>,
    /// SHA-256 over the adapter folder (relative paths and bytes, sorted).
    pub adapter_sha256: Option<String>,
    /// Artifact version.
    pub version: Option<String>,
}

/// The experiment manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Manifest {
    /// Always [`MANIFEST_FORMAT`].
    pub format: String,
    /// The lora-trainer version that wrote it.
    pub lora_trainer_version: String,
    /// The experiment.
    pub experiment_name: String,
    /// The spec as run.
    pub spec: ExperimentSpec,
    /// Training data actually used (after the split).
    pub train_data: FileHash,
    /// Held-out data actually used.
    pub eval_data: FileHash,
    /// The base model folder or id.
    pub base_model: String,
    /// SHA-256 of the base model's config.json, when local.
    pub base_model_config_sha256: Option<String>,
    /// SHA-256 of the base model's weights (each `*.safetensors` file, hashed in name order).
    pub base_model_weights_sha256: Option<String>,
    /// The trials.
    pub trials: Vec<ManifestTrial>,
}

/// SHA-256 (hex) of a file, streamed.
pub fn sha256_file(path: &Path) -> Option<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).ok()?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Some(hex::encode(h.finalize()))
}

/// SHA-256 over a folder: every regular file's relative path and bytes, in path order.
pub fn sha256_dir(dir: &Path) -> Option<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(root, &p, out);
                } else if p.is_file() {
                    out.push(p.strip_prefix(root).map(Path::to_path_buf).unwrap_or(p));
                }
            }
        }
    }
    if !dir.is_dir() {
        return None;
    }
    let mut files = Vec::new();
    walk(dir, dir, &mut files);
    files.sort();
    let mut h = Sha256::new();
    for rel in files {
        let bytes = std::fs::read(dir.join(&rel)).ok()?;
        let name = rel.to_string_lossy();
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(&bytes);
    }
    Some(hex::encode(h.finalize()))
}

fn weights_hash(model: &Path) -> Option<String> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(model)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    if files.is_empty() {
        return None;
    }
    files.sort();
    let mut h = Sha256::new();
    for f in files {
        h.update(sha256_file(&f)?.as_bytes());
    }
    Some(hex::encode(h.finalize()))
}

/// Builds the manifest of a finished (or stopped) experiment.
pub fn build(
    spec: &ExperimentSpec,
    state: &ExperimentState,
    train_path: &str,
    eval_path: &str,
) -> Manifest {
    let model = Path::new(&spec.base_model);
    let trials = state
        .trial_history
        .iter()
        .map(|t| {
            let dataset_path = match &t.role {
                TrialRole::Stage { dataset_path, .. } => dataset_path.clone(),
                _ => train_path.to_string(),
            };
            let init_adapter = match &t.role {
                TrialRole::Stage { index, .. } if *index > 0 => state
                    .trial_history
                    .iter()
                    .find(|p| matches!(&p.role, TrialRole::Stage { index: i, .. } if *i + 1 == *index))
                    .and_then(|p| p.adapter_path.clone()),
                _ => None,
            };
            ManifestTrial {
                trial_id: t.trial_id,
                role: t.role.clone(),
                config: t.record.config.clone(),
                dataset_path,
                init_adapter,
                status: t.record.status.clone(),
                training_steps: t.training_steps,
                final_loss: t.final_loss,
                eval_loss: t.eval.as_ref().map(|e| e.eval_loss),
                adapter_sha256: t
                    .adapter_path
                    .as_deref()
                    .and_then(|a| sha256_dir(Path::new(a))),
                version: t.artifact.as_ref().map(|a| a.version.clone()),
            }
        })
        .collect();
    Manifest {
        format: MANIFEST_FORMAT.into(),
        lora_trainer_version: env!("CARGO_PKG_VERSION").into(),
        experiment_name: spec.experiment_name.clone(),
        spec: spec.clone(),
        train_data: FileHash {
            path: train_path.into(),
            sha256: sha256_file(Path::new(train_path)),
        },
        eval_data: FileHash {
            path: eval_path.into(),
            sha256: sha256_file(Path::new(eval_path)),
        },
        base_model: spec.base_model.clone(),
        base_model_config_sha256: sha256_file(&model.join("config.json")),
        base_model_weights_sha256: weights_hash(model),
        trials,
    }
}

/// Reads a manifest, with a clear error for anything else.
pub fn load(path: &Path) -> Result<Manifest, SkillError> {
    let text = std::fs::read_to_string(path).map_err(|e| OrchestratorError::io(path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
        SkillError::invalid_input(format!("not valid JSON: {e}"))
            .with_file(path.display().to_string())
            .with_line(e.line() as u64)
    })?;
    if v.get("format").and_then(|f| f.as_str()) != Some(MANIFEST_FORMAT) {
        return Err(
            SkillError::invalid_input("this is not a lora-trainer experiment manifest")
                .with_file(path.display().to_string())
                .with_hint("pass the manifest.json of an experiment folder"),
        );
    }
    lora_skill::decode(v).map_err(|e| e.with_file(path.display().to_string()))
}

/// One comparison of a reproduction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Check {
    /// What is compared.
    pub name: String,
    /// The manifest's value.
    pub expected: String,
    /// Now.
    pub actual: String,
    /// Whether they agree.
    pub ok: bool,
}

/// What `reproduce` found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ReproduceReport {
    /// The trial re-run.
    pub trial_id: u32,
    /// Every check passed (inputs unchanged, same steps, same losses, same adapter bytes).
    pub matches: bool,
    /// Results agree within 1e-6 relative even if the adapter bytes differ.
    pub matches_within_tolerance: bool,
    /// The comparisons.
    pub checks: Vec<Check>,
    /// Where the re-run wrote its files.
    pub output_dir: String,
}

fn check(name: &str, expected: String, actual: String, ok: bool) -> Check {
    Check {
        name: name.into(),
        expected,
        actual,
        ok,
    }
}

fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref()
        .map(|x| x.to_string())
        .unwrap_or_else(|| "-".into())
}

fn close(a: Option<f64>, b: Option<f64>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => (a - b).abs() <= 1e-6 * a.abs().max(b.abs()).max(1.0),
        (None, None) => true,
        _ => false,
    }
}

/// Re-runs trial `trial_id` of the manifest at `manifest_path` (training,
/// then evaluation) into `out_dir` and compares it with the manifest.
pub async fn reproduce(
    registry: &SkillRegistry,
    manifest_path: &Path,
    trial_id: u32,
    out_dir: &Path,
    ctx: &SkillContext,
) -> Result<StepResult<ReproduceReport>, SkillError> {
    let m = load(manifest_path)?;
    let Some(t) = m.trials.iter().find(|t| t.trial_id == trial_id) else {
        let ids: Vec<String> = m.trials.iter().map(|t| t.trial_id.to_string()).collect();
        return Err(
            SkillError::not_found(format!("trial {trial_id} is not in the manifest"))
                .with_field("trial")
                .with_file(manifest_path.display().to_string())
                .with_hint(format!("trials: {}", ids.join(", "))),
        );
    };
    let mut checks = Vec::new();
    let data_now = sha256_file(Path::new(&t.dataset_path));
    let data_then = if t.dataset_path == m.train_data.path {
        m.train_data.sha256.clone()
    } else {
        data_now.clone()
    };
    checks.push(check(
        "training data sha256",
        opt(&data_then),
        opt(&data_now),
        data_then == data_now,
    ));
    let eval_now = sha256_file(Path::new(&m.eval_data.path));
    checks.push(check(
        "eval data sha256",
        opt(&m.eval_data.sha256),
        opt(&eval_now),
        m.eval_data.sha256 == eval_now,
    ));
    let model = Path::new(&m.base_model);
    let cfg_now = sha256_file(&model.join("config.json"));
    checks.push(check(
        "base model config.json sha256",
        opt(&m.base_model_config_sha256),
        opt(&cfg_now),
        m.base_model_config_sha256 == cfg_now,
    ));
    let w_now = weights_hash(model);
    checks.push(check(
        "base model weights sha256",
        opt(&m.base_model_weights_sha256),
        opt(&w_now),
        m.base_model_weights_sha256 == w_now,
    ));
    let trial_dir = out_dir.join(format!("trial_{trial_id:03}"));
    if trial_dir.exists() {
        crate::data::remove_path(&trial_dir)?;
    }
    let mut req = TrainingRequest::from(TrainingInput {
        trial_config: t.config.clone(),
        dataset_path: t.dataset_path.clone(),
        output_dir: trial_dir.display().to_string(),
        resume_from: None,
        dry_run: false,
    });
    req.init_adapter = t.init_adapter.clone();
    req.threads = m.spec.resources.threads;
    let trained: StepResult<TrainingReport> = registry.call(names::TRAINING, &req, ctx).await?;
    let out = trained.data.output;
    checks.push(check(
        "training steps",
        t.training_steps.to_string(),
        out.training_steps.to_string(),
        t.training_steps == out.training_steps,
    ));
    let exact_loss = t.final_loss.map(f64::to_bits) == out.final_loss.map(f64::to_bits);
    checks.push(check(
        "final training loss",
        opt(&t.final_loss),
        opt(&out.final_loss),
        exact_loss,
    ));
    let mut eval_loss = None;
    if let Some(adapter) = &out.adapter_path {
        let mut r = EvalRequest::from(EvalInput {
            adapter_path: Some(adapter.clone()),
            base_model: m.base_model.clone(),
            eval_dataset_path: m.eval_data.path.clone(),
            compute_perplexity: true,
            compute_delta: false,
        });
        r.max_seq_length = Some(t.config.max_seq_length);
        r.prompt_template = Some(t.config.prompt_template.clone());
        r.threads = m.spec.resources.threads;
        let ev: StepResult<EvalReport> = registry.call(names::EVAL, &r, ctx).await?;
        eval_loss = Some(ev.data.output.eval_loss);
    }
    let exact_eval = t.eval_loss.map(f64::to_bits) == eval_loss.map(f64::to_bits);
    checks.push(check(
        "eval loss",
        opt(&t.eval_loss),
        opt(&eval_loss),
        exact_eval,
    ));
    let hash_now = out
        .adapter_path
        .as_deref()
        .and_then(|a| sha256_dir(Path::new(a)));
    checks.push(check(
        "adapter sha256",
        opt(&t.adapter_sha256),
        opt(&hash_now),
        t.adapter_sha256 == hash_now,
    ));
    let inputs_ok = checks[..4].iter().all(|c| c.ok);
    let matches = checks.iter().all(|c| c.ok);
    let within = inputs_ok
        && t.training_steps == out.training_steps
        && close(t.final_loss, out.final_loss)
        && close(t.eval_loss, eval_loss);
    let mut text = format!(
        "trial {trial_id}: {}\n",
        if matches {
            "reproduced exactly"
        } else if within {
            "reproduced within 1e-6 (the adapter bytes differ)"
        } else {
            "does NOT match"
        }
    );
    for c in &checks {
        text.push_str(&format!(
            "  [{}] {}: expected {}, got {}\n",
            if c.ok { "ok" } else { "DIFF" },
            c.name,
            c.expected,
            c.actual
        ));
    }
    Ok(StepResult::new(ReproduceReport {
        trial_id,
        matches,
        matches_within_tolerance: within,
        checks,
        output_dir: trial_dir.display().to_string(),
    })
    .with_text(text))
}
