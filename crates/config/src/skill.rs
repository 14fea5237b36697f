//! The skills: `lora_config` (seed 001 §3: a trial, its search space and
//! memory estimate for a base model, method, memory budget and dataset
//! profile) and `preflight` (seed 002: check an experiment before launch).

use async_trait::async_trait;

use lora_skill::{Skill, SkillContext, SkillError, StepResult};
use lora_spec::contracts::config::{
    self as contract, LoRAConfigInput, LoRAConfigOutput, MemoryEstimate, PreflightInput,
    PreflightReport, Severity,
};
use lora_spec::contracts::names;
use lora_spec::experiment::{Device, ResourcesSection, load_experiment};

use crate::compat::{self, CompatRequest, GGUF_MESSAGE};
use crate::dataset::DatasetInfo;
use crate::defaults::{DefaultsRequest, smart_defaults};
use crate::device::{self, DeviceSpec};
use crate::memory::{Recipe, fit_plan};
use crate::model::{is_gguf, resolve_model};
use crate::preflight::{PreflightOptions, PreflightRequest, preflight, preflight_spec};

/// Registers `lora_config` and `preflight`.
pub fn register(reg: &mut lora_skill::SkillRegistry) {
    reg.register(LoRAConfigSkill::default());
    reg.register(PreflightSkill::default());
}

/// LoRAConfigSkill (seed 001 §3).
#[derive(Debug, Clone, Default)]
pub struct LoRAConfigSkill {
    /// Model lookup, memory and time coefficients.
    pub options: PreflightOptions,
}

fn options_for(ctx: &SkillContext, base: &PreflightOptions) -> PreflightOptions {
    let mut o = base.clone();
    if o.resolve.base_dir.is_none() {
        o.resolve.base_dir = Some(ctx.work_dir().to_path_buf());
    }
    o
}

fn device_for(input: &LoRAConfigInput) -> Result<DeviceSpec, SkillError> {
    match &input.gpu_type {
        Some(name) => {
            let threads = std::thread::available_parallelism()
                .ok()
                .and_then(|n| u32::try_from(n.get()).ok())
                .unwrap_or(1);
            device::lookup(name, threads, input.vram_limit_gb).map_err(SkillError::from)
        }
        None => Ok(DeviceSpec::generic_gpu(input.vram_limit_gb)),
    }
}

/// Computes the skill's output without a context (for callers that link the crate).
pub fn suggest(
    input: &LoRAConfigInput,
    opts: &PreflightOptions,
) -> Result<LoRAConfigOutput, SkillError> {
    if !(input.vram_limit_gb.is_finite() && input.vram_limit_gb > 0.0) {
        return Err(SkillError::invalid_input(format!(
            "must be positive (got {})",
            input.vram_limit_gb
        ))
        .with_field("vram_limit_gb")
        .with_hint("the accelerator memory in GB, e.g. 24"));
    }
    if input.num_gpus == 0 {
        return Err(SkillError::invalid_input("must be at least 1").with_field("num_gpus"));
    }
    if is_gguf(&input.base_model, &opts.resolve) {
        return Err(SkillError::unsupported(GGUF_MESSAGE)
            .with_field("base_model")
            .with_hint("point base_model at the original Hugging Face checkpoint the GGUF was converted from"));
    }
    let facts = resolve_model(&input.base_model, &opts.resolve)?;
    let dev = device_for(input)?;
    let dataset = DatasetInfo::from_profile(&input.dataset_profile);
    let sd = smart_defaults(
        &DefaultsRequest {
            facts: &facts,
            method: input.method,
            task: input.task,
            dataset: &dataset,
            device: &dev,
            vram_limit_gb: input.vram_limit_gb,
            num_gpus: input.num_gpus,
            max_seq_length: input.max_seq_length,
            epochs: input.epochs,
            target_batch_size: input.target_batch_size,
            eval_fraction: 0.1,
        },
        &opts.memory,
    );
    let findings = compat::check_compatibility(&CompatRequest {
        facts: &facts,
        recipe: Recipe::from(input.method),
        trial: Some(&sd.trial),
        task: input.task,
        dataset: Some(&dataset),
        device: Some(&dev),
        trainer_supports_prefix_ia3: false,
    });
    let suggestions = if sd.fits {
        Vec::new()
    } else {
        fit_plan(&facts, &sd.setup, &opts.memory, input.vram_limit_gb)
            .iter()
            .map(|s| {
                format!(
                    "{} → {:.1} GB{}",
                    s.change,
                    s.total_gb,
                    if s.fits { " (fits)" } else { "" }
                )
            })
            .collect()
    };
    let resources = ResourcesSection {
        device: if dev.is_cpu() {
            Device::Cpu
        } else {
            Device::Cuda
        },
        vram_limit_gb: Some(input.vram_limit_gb),
        gpu_type: Some(dev.name.clone()).filter(|n| n != "gpu"),
        gpus: Some(input.num_gpus),
        threads: None,
    };
    let report = preflight(
        &PreflightRequest {
            base_model: &input.base_model,
            trial: &sd.trial,
            task: input.task,
            dataset: &dataset,
            resources: &resources,
            eval_fraction: 0.1,
            max_trials: None,
            budget_gpu_hours: None,
        },
        opts,
    );
    Ok(LoRAConfigOutput {
        memory_estimate: MemoryEstimate {
            vram_gb: (sd.memory.total_gb() * 100.0).round() / 100.0,
            fits: sd.fits,
            model_params: facts.params.total,
            trainable_params: sd.memory.trainable_params,
            vram_limit_gb: input.vram_limit_gb,
            breakdown: sd.memory.breakdown(),
            suggestions,
        },
        trial_config: sd.trial,
        search_space: sd.search_space,
        model: facts.summary(),
        strategy: sd.strategy,
        findings,
        preflight: Some(report),
        rationale: sd.rationale,
    })
}

#[async_trait]
impl Skill for LoRAConfigSkill {
    type Input = LoRAConfigInput;
    type Output = LoRAConfigOutput;

    fn name(&self) -> &'static str {
        names::CONFIG
    }

    fn description(&self) -> &'static str {
        "Suggest a complete LoRA/QLoRA trial (rank, alpha, learning rate, target modules, batch, steps) for a \
         base model, method, memory budget and dataset profile, with its HPO search space, a memory estimate \
         with breakdown, compatibility findings and a preflight of the suggestion."
    }

    async fn run(
        &self,
        input: LoRAConfigInput,
        ctx: &SkillContext,
    ) -> Result<StepResult<LoRAConfigOutput>, SkillError> {
        ctx.check_cancelled()?;
        let opts = options_for(ctx, &self.options);
        let out = suggest(&input, &opts)?;
        for f in &out.findings {
            if f.severity != Severity::Info {
                ctx.warn(format!("{}: {}", f.code, f.message));
            }
        }
        let m = &out.memory_estimate;
        let text = format!(
            "{} ({:.2}B params, {}): {} r={} alpha={} lr={:e} targets [{}], batch {} = {} × {}, seq {}; \
             estimated {:.1} GB of {:.1} GB ({})",
            out.model.name,
            out.model.params as f64 / 1e9,
            out.model.source,
            out.trial_config.method.as_str(),
            out.trial_config.lora_rank,
            out.trial_config.lora_alpha,
            out.trial_config.learning_rate,
            out.trial_config.target_modules.join(", "),
            out.trial_config.batch_size,
            out.trial_config.micro_batch_size,
            out.trial_config.gradient_accumulation,
            out.trial_config.max_seq_length,
            m.vram_gb,
            m.vram_limit_gb,
            if m.fits { "fits" } else { "does not fit" },
        );
        Ok(StepResult::new(out.clone())
            .with_text(text)
            .with_meta("fits", m.fits)
            .with_meta("model_params", m.model_params)
            .with_meta("trainable_params", m.trainable_params))
    }
}

/// The preflight skill (seed 002): checks an experiment before launch.
#[derive(Debug, Clone, Default)]
pub struct PreflightSkill {
    /// Model lookup, memory and time coefficients.
    pub options: PreflightOptions,
}

/// Runs a preflight on a [`PreflightInput`] (a spec file or an inline spec).
pub fn run_preflight(
    input: &PreflightInput,
    ctx: &SkillContext,
    base: &PreflightOptions,
) -> Result<PreflightReport, SkillError> {
    let opts = options_for(ctx, base);
    let spec = match (&input.spec_path, &input.spec) {
        (Some(path), None) => {
            let (spec, _) = load_experiment(&ctx.resolve(path))?;
            spec
        }
        (None, Some(spec)) => {
            let issues = spec.check();
            if let Some(first) = issues.first() {
                let mut e = SkillError::invalid_input(first.message.clone())
                    .with_field(format!("spec.{}", first.path));
                if let Some(h) = &first.hint {
                    e = e.with_hint(h.clone());
                }
                return Err(e);
            }
            let mut s = spec.clone();
            s.resolve_paths(ctx.work_dir());
            s
        }
        (Some(_), Some(_)) => {
            return Err(
                SkillError::invalid_input("give spec_path or spec, not both")
                    .with_field("spec_path"),
            );
        }
        (None, None) => {
            return Err(
                SkillError::invalid_input("one of spec_path or spec is required")
                    .with_field("spec_path")
                    .with_hint("the path of an experiment YAML/JSON file"),
            );
        }
    };
    Ok(preflight_spec(&spec, &input.dataset_profile, &opts))
}

#[async_trait]
impl Skill for PreflightSkill {
    type Input = PreflightInput;
    type Output = PreflightReport;

    fn name(&self) -> &'static str {
        contract::PREFLIGHT
    }

    fn description(&self) -> &'static str {
        "Check an experiment spec before launch: compatibility findings (codes, hints), peak memory with a \
         breakdown against the limit and what would make it fit, time per step, throughput and the ETA of a trial."
    }

    async fn run(
        &self,
        input: PreflightInput,
        ctx: &SkillContext,
    ) -> Result<StepResult<PreflightReport>, SkillError> {
        ctx.check_cancelled()?;
        let report = run_preflight(&input, ctx, &self.options)?;
        for w in &report.warnings {
            ctx.warn(w.clone());
        }
        let text = format!(
            "{}: {:.1} GB of {:.1} GB on {}, {:.0} ms/step, {:.0} tokens/s{}",
            if report.ok { "ok" } else { "blocked" },
            report.estimated_vram_mb as f64 / 1000.0,
            report.vram_limit_gb,
            report.device,
            report.time_per_step_ms,
            report.throughput.tokens_per_sec,
            report
                .eta_hours
                .map(|h| format!(", ~{h:.2} h per trial"))
                .unwrap_or_default()
        );
        Ok(StepResult::new(report.clone())
            .with_text(text)
            .with_meta("ok", report.ok)
            .with_meta("fits", report.fits))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests: a panic is the failure report.
mod tests {
    use super::*;
    use lora_skill::{MemorySink, SkillRegistry};
    use serde_json::json;

    fn ctx(dir: &std::path::Path) -> SkillContext {
        SkillContext::new(dir).with_sink(MemorySink::new())
    }

    #[tokio::test]
    async fn seed_001_example_through_the_registry() {
        let mut reg = SkillRegistry::new();
        register(&mut reg);
        let tmp = tempfile::tempdir().unwrap();
        let out = reg
            .call_json(
                names::CONFIG,
                json!({"base_model": "meta-llama/Llama-3.1-8B", "task": "instruction", "method": "qlora",
                       "vram_limit_gb": 24.0, "dataset_profile": {"total_samples": 2000, "avg_tokens": 200.0,
                       "max_tokens": 900, "has_instruction": true, "has_output": true}}),
                &ctx(tmp.path()),
            )
            .await
            .unwrap();
        let data = &out.data;
        assert_eq!(data["memory_estimate"]["model_params"], 8_030_261_248u64);
        assert_eq!(data["memory_estimate"]["fits"], true);
        assert_eq!(data["trial_config"]["method"], "qlora");
        assert_eq!(data["trial_config"]["lora_rank"], 16);
        assert!(
            data["search_space"]["rank_choices"]
                .as_array()
                .unwrap()
                .len()
                >= 2
        );
        assert_eq!(data["preflight"]["ok"], true, "{}", data["preflight"]);
        // The output decodes as the contract type.
        let typed: LoRAConfigOutput = serde_json::from_value(data.clone()).unwrap();
        assert!(typed.trial_config.check().is_empty());
    }

    #[tokio::test]
    async fn bad_inputs_are_skill_errors_with_fields() {
        let tmp = tempfile::tempdir().unwrap();
        let c = ctx(tmp.path());
        let skill = LoRAConfigSkill::default();
        let input = |v: serde_json::Value| serde_json::from_value::<LoRAConfigInput>(v).unwrap();
        let e = skill
            .run(input(json!({"base_model": "TheBloke/Mistral-7B-GGUF"})), &c)
            .await
            .unwrap_err();
        assert_eq!(e.kind, lora_skill::ErrorKind::Unsupported);
        assert_eq!(e.message, GGUF_MESSAGE);
        let e = skill
            .run(input(json!({"base_model": "smollm2-135"})), &c)
            .await
            .unwrap_err();
        assert_eq!(e.kind, lora_skill::ErrorKind::NotFound);
        assert!(e.hint.unwrap().contains("SmolLM2-135M"));
        let e = skill
            .run(
                input(json!({"base_model": "gpt2", "vram_limit_gb": -1.0})),
                &c,
            )
            .await
            .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("vram_limit_gb"));
        let e = skill
            .run(
                input(json!({"base_model": "gpt2", "gpu_type": "abacus"})),
                &c,
            )
            .await
            .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("gpu_type"));
    }

    #[tokio::test]
    async fn preflight_skill_reads_a_spec_file() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(
            tmp.path().join("train.jsonl"),
            "{\"instruction\": \"a\", \"output\": \"b\"}\n",
        )
        .unwrap();
        let spec = "version: \"1.0\"\ndataset:\n  path: train.jsonl\n  format: alpaca\nconfig:\n  base_model: HuggingFaceTB/SmolLM2-135M\n  lora_rank: 8\n  target_modules: [q_proj, v_proj]\nresources:\n  gpu_type: t4\n";
        std::fs::write(tmp.path().join("exp.yaml"), spec).unwrap();
        let skill = PreflightSkill::default();
        let out = skill
            .run(
                PreflightInput {
                    spec_path: Some("exp.yaml".into()),
                    spec: None,
                    dataset_profile: json!({"total_samples": 5000, "avg_tokens": 120.0, "max_tokens": 400, "has_output": true}),
                },
                &ctx(tmp.path()),
            )
            .await
            .unwrap();
        assert!(out.data.ok, "{:?}", out.data.errors);
        assert_eq!(out.data.device, "t4");
        assert_eq!(out.data.model_params, 134_515_008);
        assert!(out.output_text.starts_with("ok:"));
        let e = skill
            .run(PreflightInput::default(), &ctx(tmp.path()))
            .await
            .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("spec_path"));
        std::fs::write(
            tmp.path().join("bad.yaml"),
            "version: \"1.0\"\ndataset:\n  path: x\nconfig:\n  base_model: gpt2\n  lora_rnk: 8\n",
        )
        .unwrap();
        let e = skill
            .run(
                PreflightInput {
                    spec_path: Some("bad.yaml".into()),
                    ..Default::default()
                },
                &ctx(tmp.path()),
            )
            .await
            .unwrap_err();
        assert_eq!(e.line, Some(6), "{e}");
    }
}
