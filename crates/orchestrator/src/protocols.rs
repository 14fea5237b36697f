//! The research protocols as the orchestrator runs them (seed 000 §3):
//!
//! - ablation: one parameter (`param` + `values`), a grid (every
//!   combination) or a seed 003 preset, against the base config as the
//!   baseline; the epilogue builds the comparison table (metric, delta vs the
//!   baseline, best point), which the report plots;
//! - curriculum: one trial per stage, stage k starting from stage k-1's
//!   adapter (`init_adapter`), stages from named files or split by
//!   difficulty: length, words, or the base model's loss per sample (scored
//!   once by the eval skill with `per_sample`, cached in `data/`);
//! - ensemble: diverse members (seeds, ranks, learning rates, target sets),
//!   weights from their eval losses, the adapters combined by the merge skill
//!   (PEFT `add_weighted_adapter` semantics), the combination evaluated
//!   against the best member.
//!
//! Plans are pure functions of the spec (and, for difficulty-split curriculum
//! stages, of the data and the base model's deterministic losses), so a
//! resumed run plans exactly the same trials. The generators here follow
//! seed 001 §9's rules; the orchestrator names no skill crate, so it does not
//! call `lora-protocols`' code directly.

use std::path::{Path, PathBuf};

use lora_skill::{SkillError, StepResult};
use lora_spec::contracts::merge::{AdapterCombination, CombinationType, MergeInput, MergeOutput};
use lora_spec::contracts::names;
use lora_spec::contracts::orchestrator::{
    AblationResult, AblationRow, EnsembleResult, TrialRole, TrialSummary,
};
use lora_spec::contracts::protocols::DifficultyMeasure;
use lora_spec::contracts::training::TrainingRequest;
use lora_spec::experiment::{Combination, ProtocolType, StageSection, Weighting};
use lora_spec::training_config::{parse_preset, preset_trial_field};
use lora_spec::trial::TrialConfig;
use serde_json::{Map, Value};

use crate::error::OrchestratorError;
use crate::journal::Event;
use crate::plan::{PlannedTrial, fit_micro_batch};
use crate::runner::{Run, fmt_metric};

/// The protocol's whole plan (deterministic: the same on every run).
pub(crate) async fn plan(run: &mut Run<'_>) -> Result<Vec<PlannedTrial>, SkillError> {
    match run.spec().protocol.kind {
        ProtocolType::Standard => Ok(Vec::new()),
        ProtocolType::Ablation => ablation_plan(run),
        ProtocolType::Curriculum => curriculum_plan(run).await,
        ProtocolType::Ensemble => Ok(ensemble_plan(run)),
    }
}

fn invalid(field: &str, message: String, hint: &str) -> SkillError {
    OrchestratorError::Invalid {
        field: format!("experiment.protocol.{field}"),
        message,
        hint: hint.into(),
    }
    .into()
}

/// `base` with the fields of `values` set (through serde, so any trial field works).
fn with_values(
    base: &TrialConfig,
    values: &Map<String, Value>,
    field: &str,
) -> Result<TrialConfig, SkillError> {
    let mut v = serde_json::to_value(base).map_err(|e| SkillError::backend(e.to_string()))?;
    if let Some(o) = v.as_object_mut() {
        for (k, x) in values {
            // Integer fields accept whole floats (presets are numbers).
            let x = match x.as_f64() {
                Some(f)
                    if f.fract() == 0.0 && o.get(k).is_some_and(|c| c.is_u64() || c.is_i64()) =>
                {
                    Value::from(f as i64)
                }
                _ => x.clone(),
            };
            o.insert(k.clone(), x);
        }
    }
    let mut c: TrialConfig = lora_skill::decode(v).map_err(|e| {
        invalid(
            field,
            format!(
                "cannot apply {}: {}",
                Value::Object(values.clone()),
                e.message
            ),
            "use values of the parameter's type",
        )
    })?;
    fit_micro_batch(&mut c);
    let c = c.normalized();
    if let Some(i) = c.check().first() {
        return Err(invalid(
            field,
            format!(
                "{} gives an invalid trial: {}: {}",
                Value::Object(values.clone()),
                i.path,
                i.message
            ),
            i.hint
                .as_deref()
                .unwrap_or("choose values the trial accepts"),
        ));
    }
    Ok(c)
}

fn label(values: &Map<String, Value>) -> String {
    values
        .iter()
        .map(|(k, v)| {
            format!(
                "{k}={}",
                v.as_str()
                    .map(String::from)
                    .unwrap_or_else(|| v.to_string())
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn ablation_points(run: &Run<'_>) -> Result<Vec<Map<String, Value>>, SkillError> {
    let Some(a) = run.spec().protocol.ablation.clone() else {
        return Err(invalid(
            "ablation",
            "is required for type: ablation".into(),
            "ablation: {param: lora_rank, values: [4, 8, 16]}",
        ));
    };
    let mut axes: Vec<(String, Vec<Value>)> = Vec::new();
    if let Some(p) = &a.param {
        axes.push((p.clone(), a.values.clone()));
    }
    for (k, v) in &a.grid {
        axes.push((k.clone(), v.clone()));
    }
    if let Some(p) = &a.preset {
        let presets = parse_preset(p).map_err(|i| {
            invalid(
                "ablation.preset",
                i.message.clone(),
                i.hint.as_deref().unwrap_or(""),
            )
        })?;
        let group = presets.first().map(|p| p.group.clone()).unwrap_or_default();
        let Some(field) = preset_trial_field(&group) else {
            return Err(invalid(
                "ablation.preset",
                format!(
                    "preset group `{group}` does not map to a trial parameter the orchestrator can vary"
                ),
                "use param + values for this parameter",
            ));
        };
        axes.push((
            field.to_string(),
            presets.iter().map(|p| Value::from(p.value)).collect(),
        ));
    }
    // Every combination, in axis order (the grid's keys are sorted).
    let mut points: Vec<Map<String, Value>> = vec![Map::new()];
    for (k, vals) in &axes {
        let mut next = Vec::new();
        for p in &points {
            for v in vals {
                let mut q = p.clone();
                q.insert(k.clone(), v.clone());
                next.push(q);
            }
        }
        points = next;
    }
    points.retain(|p| !p.is_empty());
    Ok(points)
}

fn ablation_plan(run: &Run<'_>) -> Result<Vec<PlannedTrial>, SkillError> {
    let base = run.base_config(0);
    let base_json = serde_json::to_value(&base).unwrap_or_default();
    let points = ablation_points(run)?;
    let is_base = |p: &Map<String, Value>| {
        p.iter().all(|(k, v)| {
            let b = &base_json[k];
            b == v || (b.as_f64().is_some() && b.as_f64() == v.as_f64())
        })
    };
    let mut plan = Vec::new();
    if !points.iter().any(is_base) {
        // The baseline carries the base's values of the varied parameters.
        let mut values = Map::new();
        for k in points.iter().flat_map(|p| p.keys()) {
            values.insert(k.clone(), base_json[k].clone());
        }
        plan.push(PlannedTrial {
            config: base.clone(),
            role: TrialRole::Ablation {
                values,
                baseline: true,
            },
            rationale: "baseline (the base config)".into(),
            dataset_path: None,
        });
    }
    for (i, p) in points.iter().enumerate() {
        let config = with_values(&base, p, &format!("ablation (point {})", i + 1))?;
        plan.push(PlannedTrial {
            config,
            role: TrialRole::Ablation {
                values: p.clone(),
                baseline: is_base(p),
            },
            rationale: format!("ablation point {}", label(p)),
            dataset_path: None,
        });
    }
    Ok(plan)
}

fn measure_name(m: DifficultyMeasure) -> &'static str {
    match m {
        DifficultyMeasure::Length => "length",
        DifficultyMeasure::Words => "words",
        DifficultyMeasure::Loss => "loss",
    }
}

/// The base model's loss on every row of `train` (eval skill, `per_sample`),
/// measured once and kept in `data/loss_scores.json` for resumes.
async fn loss_scores(
    run: &Run<'_>,
    train: &str,
    data_dir: &Path,
) -> Result<Vec<Option<f64>>, SkillError> {
    let cache = data_dir.join("loss_scores.json");
    if let Ok(text) = std::fs::read_to_string(&cache)
        && let Ok(v) = serde_json::from_str::<Value>(&text)
        && v["dataset"] == train
        && let Ok(scores) = serde_json::from_value::<Vec<Option<f64>>>(v["scores"].clone())
    {
        return Ok(scores);
    }
    let scores = run.sample_losses(train).await?;
    let doc = serde_json::json!({"dataset": train, "scores": scores});
    lora_skill::fs::write_json_atomic(&cache, &doc)
        .map_err(|e| OrchestratorError::io(&cache, e))?;
    Ok(scores)
}

/// Splits JSON lines into `n` stages by increasing difficulty (ties keep file
/// order; rows keep file order inside a stage): characters of the line, its
/// words, or the given per-row loss (`None`: nothing to learn, easiest).
/// Stage files are rewritten only when their content changes.
fn difficulty_stages(
    src: &Path,
    n: u32,
    measure: DifficultyMeasure,
    scores: Option<&[Option<f64>]>,
    out: &Path,
) -> Result<Vec<StageSection>, SkillError> {
    let text = std::fs::read_to_string(src).map_err(|e| OrchestratorError::io(src, e))?;
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if let Some(s) = scores
        && s.len() != lines.len()
    {
        return Err(invalid(
            "curriculum.measure",
            format!(
                "the eval skill scored {} rows of {} but it has {} non-empty lines",
                s.len(),
                src.display(),
                lines.len()
            ),
            "every row must be a sample the eval skill can render (see `lora-trainer dataset analyze`)",
        ));
    }
    let mut rows: Vec<(f64, usize, &str)> = lines
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let d = match (measure, scores) {
                (DifficultyMeasure::Loss, Some(s)) => s[i].unwrap_or(0.0),
                (DifficultyMeasure::Words, _) => l.split_whitespace().count() as f64,
                _ => l.chars().count() as f64,
            };
            (d, i, *l)
        })
        .collect();
    rows.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let n = n.max(1) as usize;
    let per = rows.len().div_ceil(n).max(1);
    let mut stages = Vec::new();
    for (k, chunk) in rows.chunks(per).enumerate() {
        let mut chunk: Vec<&(f64, usize, &str)> = chunk.iter().collect();
        chunk.sort_by_key(|r| r.1);
        let body: String = chunk.iter().map(|r| format!("{}\n", r.2)).collect();
        let path = out.join(format!("stage_{k}.jsonl"));
        if std::fs::read_to_string(&path).ok().as_deref() != Some(body.as_str()) {
            lora_skill::fs::write_atomic(&path, body.as_bytes())
                .map_err(|e| OrchestratorError::io(&path, e))?;
        }
        stages.push(StageSection {
            name: format!("{}-{}", measure_name(measure), k + 1),
            path: path.display().to_string(),
            epochs: 1.0,
        });
    }
    Ok(stages)
}

async fn curriculum_plan(run: &Run<'_>) -> Result<Vec<PlannedTrial>, SkillError> {
    let c = run.spec().protocol.curriculum.clone().unwrap_or_default();
    let train = run
        .ledger()
        .train_path
        .clone()
        .unwrap_or_else(|| run.spec().dataset_path.clone());
    let stages: Vec<StageSection> = if !c.stages.is_empty() {
        c.stages.clone()
    } else {
        let n = c.num_stages.unwrap_or(2);
        if run.is_dry_run() {
            (0..n)
                .map(|k| StageSection {
                    name: format!("{}-{}", measure_name(c.measure), k + 1),
                    path: train.clone(),
                    epochs: 1.0,
                })
                .collect()
        } else {
            let data_dir = run.dir().join("data");
            let scores = match c.measure {
                DifficultyMeasure::Loss => Some(loss_scores(run, &train, &data_dir).await?),
                _ => None,
            };
            difficulty_stages(
                Path::new(&train),
                n,
                c.measure,
                scores.as_deref(),
                &data_dir,
            )?
        }
    };
    let base = run.base_config(0);
    Ok(stages
        .iter()
        .enumerate()
        .map(|(k, s)| {
            let mut config = base.clone();
            config.epochs = s.epochs;
            PlannedTrial {
                config,
                role: TrialRole::Stage {
                    index: k as u32,
                    name: s.name.clone(),
                    dataset_path: s.path.clone(),
                },
                rationale: if k == 0 {
                    format!("stage {} `{}` from a fresh adapter", k + 1, s.name)
                } else {
                    format!("stage {} `{}` from stage {}'s adapter", k + 1, s.name, k)
                },
                dataset_path: Some(s.path.clone()),
            }
        })
        .collect())
}

/// Deliberately different members: seeds, ranks, learning rates and target
/// sets. Ranks vary only when the combination can join adapters of different
/// ranks (cat, svd); linear, TIES and DARE need one rank (PEFT's rule).
fn ensemble_plan(run: &Run<'_>) -> Vec<PlannedTrial> {
    let e = run.spec().protocol.ensemble.clone().unwrap_or_default();
    let vary_rank = matches!(e.combination, Combination::Cat | Combination::Svd);
    let base = run.base_config(0);
    let space = &run.spec().search_space;
    let lr_factors = [1.0, 0.5, 2.0, 0.75, 1.5];
    (0..e.members)
        .map(|i| {
            let mut c = base.clone();
            let k = i as usize;
            c.seed = base.seed.wrapping_add(1000 * u64::from(i));
            if vary_rank && !space.rank_choices.is_empty() {
                let start = space
                    .rank_choices
                    .iter()
                    .position(|r| *r == base.lora_rank)
                    .unwrap_or(0);
                c.lora_rank = space.rank_choices[(start + k) % space.rank_choices.len()];
                c.lora_alpha =
                    base.lora_alpha / f64::from(base.lora_rank.max(1)) * f64::from(c.lora_rank);
            }
            c.learning_rate = (base.learning_rate * lr_factors[k % lr_factors.len()])
                .clamp(space.lr_min, space.lr_max.max(space.lr_min));
            if k > 0 && !space.target_module_sets.is_empty() {
                c.target_modules =
                    space.target_module_sets[(k - 1) % space.target_module_sets.len()].clone();
            }
            let c = c.normalized();
            PlannedTrial {
                rationale: format!(
                    "ensemble member {}: seed {}, rank {}, lr {:.1e}",
                    i + 1,
                    c.seed,
                    c.lora_rank,
                    c.learning_rate
                ),
                config: c,
                role: TrialRole::Member { index: i },
                dataset_path: None,
            }
        })
        .collect()
}

/// Adds the adapter a trial starts from (curriculum stage k: stage k-1's).
pub(crate) fn with_init_adapter(
    run: &Run<'_>,
    t: &TrialSummary,
    mut input: TrainingRequest,
) -> Result<TrainingRequest, SkillError> {
    let TrialRole::Stage { index, .. } = &t.role else {
        return Ok(input);
    };
    if *index == 0 {
        return Ok(input);
    }
    let prev = previous_stage(run, *index);
    match prev.and_then(|p| {
        p.adapter_path
            .clone()
            .filter(|_| p.record.status == "completed")
    }) {
        Some(a) => {
            input.init_adapter = Some(a);
            Ok(input)
        }
        None => Err(SkillError::invalid_input(format!(
            "stage {} cannot start: stage {} did not complete",
            index + 1,
            index
        ))),
    }
}

fn previous_stage<'r>(run: &'r Run<'_>, index: u32) -> Option<&'r TrialSummary> {
    run.ledger()
        .trials
        .iter()
        .find(|p| matches!(&p.role, TrialRole::Stage { index: i, .. } if *i + 1 == index))
}

/// The artifact version a trial derives from (curriculum: the previous stage's).
pub(crate) fn parent_version(run: &Run<'_>, t: &TrialSummary) -> Option<String> {
    match &t.role {
        TrialRole::Stage { index, .. } if *index > 0 => {
            previous_stage(run, *index).and_then(|p| p.artifact.as_ref().map(|a| a.version.clone()))
        }
        _ => None,
    }
}

/// What a protocol does after its trials.
pub(crate) async fn epilogue(run: &mut Run<'_>) -> Result<(), SkillError> {
    match run.spec().protocol.kind {
        ProtocolType::Ablation if run.ledger().ablation.is_none() => {
            let result = ablation_table(run);
            run.record_event(Event::AblationDone { result })
        }
        ProtocolType::Ensemble if run.ledger().ensemble.is_none() => ensemble_combine(run).await,
        _ => Ok(()),
    }
}

fn ablation_table(run: &Run<'_>) -> AblationResult {
    let metric = run.spec().stop_metric.clone();
    let trials: Vec<&TrialSummary> = run.ledger().trials.iter().collect();
    let baseline = trials
        .iter()
        .find(|t| matches!(&t.role, TrialRole::Ablation { baseline: true, .. }))
        .and_then(|t| t.record.objective);
    let rows: Vec<AblationRow> = trials
        .iter()
        .filter_map(|t| match &t.role {
            TrialRole::Ablation {
                values,
                baseline: b,
            } => Some(AblationRow {
                trial_id: t.trial_id,
                label: if values.is_empty() {
                    "baseline".into()
                } else {
                    label(values)
                },
                metric: t.record.objective,
                delta_vs_baseline: match (t.record.objective, baseline) {
                    (Some(m), Some(b)) => Some(m - b),
                    _ => None,
                },
                baseline: *b,
            }),
            _ => None,
        })
        .collect();
    let best = rows
        .iter()
        .filter(|r| r.metric.is_some())
        .min_by(|a, b| {
            a.metric
                .unwrap_or(f64::MAX)
                .total_cmp(&b.metric.unwrap_or(f64::MAX))
        })
        .map(|r| r.label.clone());
    AblationResult {
        metric,
        rows,
        best,
        plot_path: None,
    }
}

/// Normalised member weights (seed 001 §9's `compute_merge_weights`).
pub fn merge_weights(losses: &[f64], weighting: Weighting, temperature: f64) -> Vec<f64> {
    let raw: Vec<f64> = match weighting {
        Weighting::Uniform => vec![1.0; losses.len()],
        Weighting::InverseLoss => losses.iter().map(|l| 1.0 / l.max(1e-12)).collect(),
        Weighting::Softmax => {
            let t = temperature.max(1e-12);
            let m = losses.iter().copied().fold(f64::MAX, f64::min);
            losses.iter().map(|l| (-(l - m) / t).exp()).collect()
        }
    };
    let s: f64 = raw.iter().sum();
    if s > 0.0 && s.is_finite() {
        raw.iter().map(|w| w / s).collect()
    } else {
        vec![1.0 / losses.len().max(1) as f64; losses.len()]
    }
}

fn combination_type(c: Combination) -> CombinationType {
    match c {
        Combination::Linear => CombinationType::Linear,
        Combination::Cat => CombinationType::Cat,
        Combination::Svd => CombinationType::Svd,
        Combination::Ties => CombinationType::Ties,
        Combination::DareLinear => CombinationType::DareLinear,
        Combination::DareTies => CombinationType::DareTies,
    }
}

async fn ensemble_combine(run: &mut Run<'_>) -> Result<(), SkillError> {
    let e = run.spec().protocol.ensemble.clone().unwrap_or_default();
    let members: Vec<TrialSummary> = run
        .ledger()
        .trials
        .iter()
        .filter(|t| matches!(t.role, TrialRole::Member { .. }) && t.record.status == "completed")
        .cloned()
        .collect();
    let best = members.iter().min_by(|a, b| {
        a.record
            .objective
            .unwrap_or(f64::MAX)
            .total_cmp(&b.record.objective.unwrap_or(f64::MAX))
    });
    let mut result = EnsembleResult {
        members: members.iter().map(|m| m.trial_id).collect(),
        best_member: best.map(|b| b.trial_id),
        best_member_metric: best.and_then(|b| b.record.objective),
        ..EnsembleResult::default()
    };
    if members.len() < 2 {
        run.log_line(format!(
            "ensemble: {} member(s) completed, nothing to combine",
            members.len()
        ));
        return run.record_event(Event::EnsembleDone { result });
    }
    let losses: Vec<f64> = members
        .iter()
        .map(|m| m.eval.as_ref().map(|e| e.eval_loss).unwrap_or(f64::MAX))
        .collect();
    result.weights = merge_weights(&losses, e.weighting, e.temperature);
    // The merge skill writes the combined adapter (PEFT layout) to
    // `adapter_path`, then exports it; a GGUF LoRA is the cheap export (and
    // what llama.cpp users load), the folder is what is evaluated.
    let out: PathBuf = run.dir().join("ensemble").join("adapter");
    let gguf: PathBuf = run.dir().join("ensemble").join("adapter.gguf");
    // Whatever an interrupted combination left is incomplete.
    crate::data::remove_path(&out)?;
    crate::data::remove_path(&gguf)?;
    let adapters: Vec<String> = members
        .iter()
        .filter_map(|m| m.adapter_path.clone())
        .collect();
    let input = MergeInput {
        adapter_path: out.display().to_string(),
        base_model: run.spec().base_model.clone(),
        validate_after_merge: false,
        output_path: Some(gguf.display().to_string()),
        output_format: lora_spec::contracts::merge::ExportFormat::Gguf,
        gguf_quantization: lora_spec::contracts::merge::GgufQuantization::F16,
        adapter_only: true,
        combination: Some(AdapterCombination {
            adapters,
            weights: result.weights.clone(),
            combination_type: combination_type(e.combination),
            density: Some(e.density),
            svd_rank: None,
            seed: run.spec().protocol.seed,
            majority_sign_method: "total".into(),
        }),
        ..MergeInput::default()
    };
    let _: StepResult<MergeOutput> = run.registry().call(names::MERGE, &input, run.ctx()).await?;
    let combined = out.display().to_string();
    let ev = run.run_eval(&combined).await?;
    result.ensemble_metric = run.metric_of_eval(&ev);
    result.combined_adapter = Some(combined);
    run.log_line(format!(
        "ensemble: combined {} members ({:?}) -> {} vs best member {}",
        result.members.len(),
        e.combination,
        result
            .ensemble_metric
            .map(fmt_metric)
            .unwrap_or_else(|| "-".into()),
        result
            .best_member_metric
            .map(fmt_metric)
            .unwrap_or_else(|| "-".into())
    ));
    run.record_event(Event::EnsembleDone { result })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_are_normalised_and_favour_low_loss() {
        let w = merge_weights(&[1.0, 2.0, 4.0], Weighting::InverseLoss, 1.0);
        assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!((w[0] / w[1] - 2.0).abs() < 1e-12);
        let u = merge_weights(&[1.0, 2.0], Weighting::Uniform, 1.0);
        assert_eq!(u, vec![0.5, 0.5]);
        let s = merge_weights(&[1.0, 2.0], Weighting::Softmax, 1.0);
        assert!((s[0] / s[1] - std::f64::consts::E).abs() < 1e-9);
        let cold = merge_weights(&[1.0, 1.1], Weighting::Softmax, 0.01);
        assert!(cold[0] > 0.99);
    }
}
