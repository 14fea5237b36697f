//! The protocols as registered skills (so they appear in the schema export
//! and can be called by the orchestrator, the CLI and agents by name).

use std::path::PathBuf;

use async_trait::async_trait;
use lora_skill::{Skill, SkillContext, SkillError, StepResult};
use lora_spec::contracts::names;
use lora_spec::contracts::protocols::{
    AblationInput, AblationOutput, CurriculumInput, CurriculumOutput, DriftSeverity, EnsembleInput,
    EnsembleOutput, ManifestAction, ManifestInput, ManifestOutput, StandardInput, StandardOutput,
};
use serde_json::Value;

use crate::{ProtocolError, ablation, curriculum, ensemble, manifest};

/// `protocol_ablation`.
#[derive(Debug, Clone, Copy, Default)]
pub struct AblationSkill;

/// Generates the points of an ablation input (exactly one of param, grid, preset).
pub fn ablation_points(
    input: &AblationInput,
) -> Result<Vec<lora_spec::contracts::protocols::AblationPoint>, ProtocolError> {
    let given = [
        input.param.is_some(),
        !input.grid.is_empty(),
        input.preset.is_some(),
    ];
    if given.iter().filter(|g| **g).count() != 1 {
        return Err(ProtocolError::invalid(
            "param",
            "give exactly one of param (with values), grid, or preset",
            Some("for example param: lora_rank, values: [4, 8, 16]".into()),
        ));
    }
    if let Some(p) = &input.param {
        ablation::generate_configs(&input.base_config, p, &input.values, input.include_baseline)
    } else if let Some(p) = &input.preset {
        ablation::generate_preset(&input.base_config, p, input.include_baseline)
    } else {
        let grid: Vec<(String, Vec<Value>)> = input
            .grid
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        ablation::generate_grid(&input.base_config, &grid, input.include_baseline)
    }
}

#[async_trait]
impl Skill for AblationSkill {
    type Input = AblationInput;
    type Output = AblationOutput;

    fn name(&self) -> &'static str {
        names::ABLATION
    }

    fn description(&self) -> &'static str {
        "Ablation: configs that vary one parameter (a TrialConfig field or a seed 003 dotted path), a grid \
         of several (every combination) or a seed 003 preset, on top of a base config; with measured results, \
         the table (metric per value, delta vs baseline, best) and an SVG plot of metric vs value."
    }

    async fn run(
        &self,
        input: AblationInput,
        ctx: &SkillContext,
    ) -> Result<StepResult<AblationOutput>, SkillError> {
        let configs = ablation_points(&input)?;
        let mut out = AblationOutput {
            configs,
            ..AblationOutput::default()
        };
        let dir = input.output_dir.as_ref().map(|d| ctx.resolve(d));
        if let Some(dir) = &dir {
            std::fs::create_dir_all(dir).map_err(|e| SkillError::io(dir, &e))?;
            for (i, p) in out.configs.iter().enumerate() {
                let path = dir.join(format!("{}.json", ablation::file_stem(i, &p.label)));
                lora_skill::fs::write_json_atomic(&path, &p.trial_config)
                    .map_err(|e| SkillError::io(&path, &e))?;
                out.written.push(path.display().to_string());
            }
        }
        if !input.results.is_empty() {
            let mut table =
                ablation::results_table(&input.results, &input.metric, input.higher_is_better);
            if let Some(dir) = &dir {
                let key = input
                    .results
                    .iter()
                    .find_map(|m| m.values.keys().next().cloned())
                    .unwrap_or_default();
                let path = dir.join(format!("ablation_{}.svg", key.replace('.', "_")));
                let p = ablation::plot(&input.results, &input.metric, &path)?;
                table.plot_path = Some(p.display().to_string());
                out.written.push(p.display().to_string());
            }
            out.table_markdown = Some(ablation::table_markdown(&table));
            out.table = Some(table);
        }
        ctx.info(format!("ablation: {} configs", out.configs.len()));
        let text = out
            .configs
            .iter()
            .map(|p| format!("trial {}: {}", p.trial_config.trial_id, p.label))
            .collect::<Vec<_>>()
            .join("\n");
        let mut r = StepResult::new(out.clone()).with_text(match &out.table_markdown {
            Some(t) => format!("{text}\n\n{t}"),
            None => text,
        });
        for w in &out.written {
            r = r.with_artifact(w.clone());
        }
        Ok(r)
    }
}

/// `protocol_curriculum`.
#[derive(Debug, Clone, Copy, Default)]
pub struct CurriculumSkill;

#[async_trait]
impl Skill for CurriculumSkill {
    type Input = CurriculumInput;
    type Output = CurriculumOutput;

    fn name(&self) -> &'static str {
        names::CURRICULUM
    }

    fn description(&self) -> &'static str {
        "Curriculum: ordered training stages (easy first) with per-stage epochs, from named files \
         ({\"easy\": \"e.jsonl\", \"hard\": \"h.jsonl\"}) or one JSONL dataset split by difficulty (text length)."
    }

    async fn run(
        &self,
        input: CurriculumInput,
        ctx: &SkillContext,
    ) -> Result<StepResult<CurriculumOutput>, SkillError> {
        let stages = match (&input.dataset_path, input.files.is_empty()) {
            (None, false) => {
                let mut files = Vec::new();
                for (name, v) in &input.files {
                    let Some(p) = v.as_str() else {
                        return Err(ProtocolError::invalid(
                            format!("files.{name}"),
                            "must be a file path",
                            None,
                        )
                        .into());
                    };
                    files.push((name.clone(), ctx.resolve(p)));
                }
                curriculum::build_stages(&files, &input.epochs)?
            }
            (Some(d), true) => {
                let data = ctx.resolve(d);
                let out_dir = match &input.output_dir {
                    Some(o) => ctx.resolve(o),
                    None => data
                        .parent()
                        .map(PathBuf::from)
                        .unwrap_or_else(|| ctx.work_dir().to_path_buf()),
                };
                let n = input.num_stages.unwrap_or(3) as usize;
                curriculum::split_by_difficulty(
                    &data,
                    n,
                    input.measure,
                    &input.scores,
                    &input.epochs,
                    &out_dir,
                )?
            }
            _ => {
                return Err(ProtocolError::invalid(
                    "files",
                    "give either files (named stages) or dataset_path (split by difficulty)",
                    Some(r#"files: {"easy": "e.jsonl", "hard": "h.jsonl"}"#.into()),
                )
                .into());
            }
        };
        let text = stages
            .iter()
            .map(|s| {
                format!(
                    "stage {} {}: {} ({} samples, {} epochs)",
                    s.index, s.name, s.dataset_path, s.samples, s.epochs
                )
            })
            .collect::<Vec<_>>()
            .join("\n");
        Ok(StepResult::new(CurriculumOutput { stages }).with_text(text))
    }
}

/// `protocol_ensemble`.
#[derive(Debug, Clone, Copy, Default)]
pub struct EnsembleSkill;

#[async_trait]
impl Skill for EnsembleSkill {
    type Input = EnsembleInput;
    type Output = EnsembleOutput;

    fn name(&self) -> &'static str {
        names::ENSEMBLE
    }

    fn description(&self) -> &'static str {
        "Ensemble: member configs that differ on purpose (seed, rank, learning rate, target modules); \
         given trained members, their normalised merge weights (inverse_loss, uniform or softmax with a temperature)."
    }

    async fn run(
        &self,
        input: EnsembleInput,
        _ctx: &SkillContext,
    ) -> Result<StepResult<EnsembleOutput>, SkillError> {
        let out = if input.members.is_empty() {
            let seed = input.seed.unwrap_or(input.base_config.seed);
            EnsembleOutput {
                configs: ensemble::generate_diverse_configs(
                    &input.base_config,
                    input.n_members,
                    seed,
                )?,
                members: Vec::new(),
            }
        } else {
            EnsembleOutput {
                configs: Vec::new(),
                members: ensemble::compute_merge_weights(
                    &input.members,
                    input.weighting,
                    input.temperature,
                )?,
            }
        };
        let text = out
            .configs
            .iter()
            .map(|c| c.rationale.clone())
            .chain(
                out.members
                    .iter()
                    .map(|m| format!("trial {}: weight {:.4}", m.trial_id, m.weight)),
            )
            .collect::<Vec<_>>()
            .join("\n");
        Ok(StepResult::new(out).with_text(text))
    }
}

/// `protocol_standard`.
#[derive(Debug, Clone, Copy, Default)]
pub struct StandardSkill;

#[async_trait]
impl Skill for StandardSkill {
    type Input = StandardInput;
    type Output = StandardOutput;

    fn name(&self) -> &'static str {
        names::STANDARD
    }

    fn description(&self) -> &'static str {
        "Standard protocol: N independent trials drawn at once from the HPO skill (each sees the others as \
         running, so they differ), within the budget."
    }

    async fn run(
        &self,
        input: StandardInput,
        _ctx: &SkillContext,
    ) -> Result<StepResult<StandardOutput>, SkillError> {
        if input.n_trials == 0 {
            return Err(ProtocolError::invalid("n_trials", "must be at least 1", None).into());
        }
        let mut hpo = input.hpo.clone();
        hpo.n_suggestions = input.n_trials;
        hpo.trials_remaining = hpo.trials_remaining.max(input.n_trials);
        let out = lora_hpo::suggest(&hpo)?;
        let text = out
            .suggestions
            .iter()
            .map(|s| format!("trial {}: {}", s.trial_config.trial_id, s.rationale))
            .collect::<Vec<_>>()
            .join("\n");
        Ok(StepResult::new(StandardOutput {
            suggestions: out.suggestions,
            exhausted_reason: out.exhausted_reason,
        })
        .with_text(text))
    }
}

/// `reproducibility_manifest`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ManifestSkill;

#[async_trait]
impl Skill for ManifestSkill {
    type Input = ManifestInput;
    type Output = ManifestOutput;

    fn name(&self) -> &'static str {
        names::MANIFEST
    }

    fn description(&self) -> &'static str {
        "Reproducibility manifest: create (every seed, resolved hyper-parameters, dataset SHA-256, base model \
         revision and hashes, tokenizer and chat-template hash, crate versions, git commit, libtorch, host) \
         and verify (re-measure and name what drifted)."
    }

    async fn run(
        &self,
        input: ManifestInput,
        ctx: &SkillContext,
    ) -> Result<StepResult<ManifestOutput>, SkillError> {
        let path = ctx.resolve(&input.path);
        match input.action {
            ManifestAction::Create => {
                let Some(spec) = &input.spec else {
                    return Err(ProtocolError::invalid(
                        "spec",
                        "is required to create a manifest",
                        None,
                    )
                    .into());
                };
                let id = input
                    .experiment_id
                    .clone()
                    .unwrap_or_else(|| spec.experiment_name.clone());
                let m = manifest::create_manifest(spec, input.state.as_ref(), &id)?;
                manifest::save_manifest(&m, &path)?;
                ctx.info(format!(
                    "manifest {} written to {}",
                    m.fingerprint,
                    path.display()
                ));
                Ok(StepResult::new(ManifestOutput {
                    manifest: m,
                    path: path.display().to_string(),
                    drift: Vec::new(),
                    reproducible: true,
                })
                .with_artifact(path.display().to_string())
                .with_text(format!("manifest written to {}", path.display())))
            }
            ManifestAction::Verify => {
                let m = manifest::load_manifest(&path)?;
                let drift = manifest::verify_manifest(&m, input.spec.as_ref());
                let reproducible = drift.iter().all(|d| d.severity != DriftSeverity::Breaking);
                let text = if drift.is_empty() {
                    "nothing drifted".to_string()
                } else {
                    drift
                        .iter()
                        .map(|d| {
                            format!(
                                "{:?} {}: {} -> {}",
                                d.severity, d.field, d.expected, d.actual
                            )
                        })
                        .collect::<Vec<_>>()
                        .join("\n")
                };
                for d in &drift {
                    ctx.warn(format!(
                        "drift: {} ({} -> {})",
                        d.field, d.expected, d.actual
                    ));
                }
                Ok(StepResult::new(ManifestOutput {
                    manifest: m,
                    path: path.display().to_string(),
                    drift,
                    reproducible,
                })
                .with_text(text))
            }
        }
    }
}
