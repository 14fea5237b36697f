//! Preflight (seed 002): compatibility findings, the memory estimate against
//! the limit, time per step, throughput and the ETA of one trial, in seed
//! 002's response shape (`ok, warnings, errors, estimated_vram_mb,
//! vram_breakdown, time_per_step_ms, throughput`).

use std::path::Path;

use serde_json::Value;

use lora_spec::contracts::config::{Finding, PreflightReport, Severity, Task, ThroughputEstimate};
use lora_spec::experiment::{Device, ExperimentSpec, ResourcesSection};
use lora_spec::trial::TrialConfig;

use crate::compat::{self, CompatRequest, finding};
use crate::dataset::DatasetInfo;
use crate::device::{self, DeviceSpec};
use crate::error::ConfigError;
use crate::memory::{MemoryCoefficients, Recipe, TrainSetup, estimate_memory, fit_plan};
use crate::model::{ModelFacts, ResolveOptions, is_gguf, resolve_model};
use crate::throughput::{ThroughputCoefficients, estimate_step};

/// Where to look for models and which coefficients to use.
#[derive(Debug, Clone, Default)]
pub struct PreflightOptions {
    /// Model lookup.
    pub resolve: ResolveOptions,
    /// Memory model constants.
    pub memory: MemoryCoefficients,
    /// Time model constants.
    pub throughput: ThroughputCoefficients,
}

/// One trial to check.
#[derive(Debug, Clone)]
pub struct PreflightRequest<'a> {
    /// Base model (folder, hub id in the cache, or built-in name).
    pub base_model: &'a str,
    /// The trial.
    pub trial: &'a TrialConfig,
    /// What the fine-tune is for.
    pub task: Task,
    /// The data (may be empty).
    pub dataset: &'a DatasetInfo,
    /// Hardware.
    pub resources: &'a ResourcesSection,
    /// Fraction of the data held out for evaluation.
    pub eval_fraction: f64,
    /// Trials the experiment may run (for the budget check).
    pub max_trials: Option<u32>,
    /// Device-hours budget of the experiment.
    pub budget_gpu_hours: Option<f64>,
}

fn system_memory_gb() -> Option<f64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024.0 / 1e9)
}

fn has_nvidia_gpu() -> bool {
    std::fs::read_dir("/proc/driver/nvidia/gpus")
        .map(|mut d| d.next().is_some())
        .unwrap_or(false)
}

/// The device and memory limit the resources describe, with notes about
/// what was assumed. `gpu_type` wins; `device: cpu` (or `auto` with no
/// NVIDIA driver present) means the CPU with `threads` threads and the
/// machine's RAM; otherwise a GPU of `vram_limit_gb` (24 GB if unset).
pub fn resolve_device(
    res: &ResourcesSection,
) -> Result<(DeviceSpec, f64, Vec<Finding>), ConfigError> {
    let threads = res.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .ok()
            .and_then(|n| u32::try_from(n.get()).ok())
            .unwrap_or(1)
    });
    let ram = system_memory_gb().unwrap_or(16.0);
    let mut notes = Vec::new();
    let dev = match (&res.gpu_type, res.device) {
        (Some(name), Device::Cpu) if !name.eq_ignore_ascii_case("cpu") => {
            notes.push(finding(
                "device_conflict",
                Severity::Warning,
                format!("resources.device is cpu but gpu_type is {name}; planning for the CPU"),
                "drop gpu_type or set device: cuda",
            ));
            DeviceSpec::cpu(threads, ram)
        }
        (Some(name), _) => device::lookup(name, threads, ram)?,
        (None, Device::Cpu) => DeviceSpec::cpu(threads, ram),
        (None, Device::Auto) if !has_nvidia_gpu() => {
            notes.push(finding(
                "planning_for_cpu",
                Severity::Info,
                format!("no GPU found and no gpu_type given: planning for the CPU ({threads} threads, {ram:.0} GB RAM)"),
                "set resources.gpu_type to plan for a GPU (rtx-4090, a100-80gb, h100, ...)",
            ));
            DeviceSpec::cpu(threads, ram)
        }
        (None, _) => {
            let mem = res.vram_limit_gb.unwrap_or(24.0);
            notes.push(finding(
                "generic_gpu",
                Severity::Info,
                format!("gpu_type not set: assuming an RTX 4090-class GPU with {mem:.0} GB for throughput"),
                "set resources.gpu_type for a sharper time estimate",
            ));
            DeviceSpec::generic_gpu(mem)
        }
    };
    let limit = res.vram_limit_gb.unwrap_or(dev.memory_gb);
    Ok((dev, limit, notes))
}

fn text(f: &Finding) -> String {
    match &f.hint {
        Some(h) => format!("{}: {} (hint: {h})", f.code, f.message),
        None => format!("{}: {}", f.code, f.message),
    }
}

fn finish(mut r: PreflightReport, findings: Vec<Finding>) -> PreflightReport {
    r.errors = findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .map(text)
        .collect();
    r.warnings = findings
        .iter()
        .filter(|f| f.severity == Severity::Warning)
        .map(text)
        .collect();
    r.ok = r.errors.is_empty();
    r.findings = findings;
    r
}

fn error_finding(e: &ConfigError) -> Finding {
    let se: lora_skill::SkillError = match e {
        ConfigError::ModelNotFound {
            name,
            detail,
            suggestions,
        } => ConfigError::ModelNotFound {
            name: name.clone(),
            detail: detail.clone(),
            suggestions: suggestions.clone(),
        }
        .into(),
        other => lora_skill::SkillError::invalid_input(other.to_string()),
    };
    let code = match e {
        ConfigError::ModelNotFound { .. } => "model_not_found",
        ConfigError::UnsupportedArchitecture { .. } => "unsupported_architecture",
        ConfigError::BadModelConfig { .. } => "bad_model_config",
        ConfigError::UnknownDevice { .. } => "unknown_device",
        ConfigError::InvalidInput { .. } => "invalid_input",
        ConfigError::Io { .. } => "io",
    };
    let hint = match e {
        ConfigError::UnknownDevice { known, .. } => Some(format!("one of: {}", known.join(", "))),
        _ => se.hint.clone(),
    };
    Finding {
        code: code.into(),
        severity: Severity::Error,
        message: e.to_string(),
        hint,
        field: se.field.clone(),
    }
}

/// Checks one trial: compatibility, memory, time.
pub fn preflight(req: &PreflightRequest<'_>, opts: &PreflightOptions) -> PreflightReport {
    let mut findings: Vec<Finding> = Vec::new();
    let base = PreflightReport::default();

    // Errors in the trial itself.
    for i in req.trial.check() {
        let mut f = finding(
            "invalid_config",
            Severity::Error,
            i.message.clone(),
            i.hint.clone().unwrap_or_default(),
        );
        f.field = Some(format!("config.{}", i.path));
        findings.push(f);
    }

    if is_gguf(req.base_model, &opts.resolve) {
        findings.push(compat::gguf_finding());
        return finish(base, findings);
    }
    let facts = match resolve_model(req.base_model, &opts.resolve) {
        Ok(f) => f,
        Err(e) => {
            findings.push(error_finding(&e));
            return finish(base, findings);
        }
    };
    let (dev, limit, notes) = match resolve_device(req.resources) {
        Ok(x) => x,
        Err(e) => {
            findings.push(error_finding(&e));
            return finish(base, findings);
        }
    };
    findings.extend(notes);
    let trial = req.trial.normalized();
    let recipe = Recipe::from(trial.method);
    findings.extend(compat::check_compatibility(&CompatRequest {
        facts: &facts,
        recipe,
        trial: Some(&trial),
        task: req.task,
        dataset: Some(req.dataset),
        device: Some(&dev),
        trainer_supports_prefix_ia3: false,
    }));
    plan(&facts, &trial, &dev, limit, req, opts, findings)
}

fn plan(
    facts: &ModelFacts,
    trial: &TrialConfig,
    dev: &DeviceSpec,
    limit: f64,
    req: &PreflightRequest<'_>,
    opts: &PreflightOptions,
    mut findings: Vec<Finding>,
) -> PreflightReport {
    let d = req.dataset;
    let mut setup = TrainSetup::from_trial(trial, dev);
    // The peak comes from the longest micro-batch: padded to the longest record
    // (or to max_seq_length when packing or unknown).
    let longest = if trial.packing {
        None
    } else {
        d.max_tokens.and_then(|m| u32::try_from(m).ok())
    };
    setup.seq_len = longest.map_or(trial.max_seq_length, |m| {
        m.clamp(1, trial.max_seq_length.max(1))
    });
    let mem = estimate_memory(facts, &setup, &opts.memory);
    let total_gb = mem.total_gb();
    let fits = total_gb <= limit;
    let mut suggestions = Vec::new();
    if !fits {
        let steps = fit_plan(facts, &setup, &opts.memory, limit);
        suggestions = steps
            .iter()
            .map(|s| {
                format!(
                    "{} → {:.1} GB{}",
                    s.change,
                    s.total_gb,
                    if s.fits { " (fits)" } else { "" }
                )
            })
            .collect();
        let hint = match steps.iter().find(|s| s.fits) {
            Some(_) => format!("apply in order: {}", suggestions.join("; ")),
            None => "even QLoRA with micro-batch 1 and 256-token sequences does not fit: use a smaller model or a larger device"
                .to_string(),
        };
        let mut f = finding(
            "vram_exceeded",
            Severity::Error,
            format!(
                "estimated peak {total_gb:.1} GB exceeds the {limit:.1} GB limit on {}",
                dev.name
            ),
            hint,
        );
        f.field = Some("resources.vram_limit_gb".into());
        findings.push(f);
        if req.dataset.total_samples.is_some_and(|n| n > 1_000_000) {
            findings.push(finding(
                "oversized_dataset",
                Severity::Warning,
                "a large dataset on a device it does not fit",
                "QLoRA with FSDP over several devices, or train on a sample first",
            ));
        }
    } else if total_gb > 0.9 * limit {
        findings.push(finding(
            "vram_tight",
            Severity::Warning,
            format!("estimated peak {total_gb:.1} GB is within 10 % of the {limit:.1} GB limit"),
            "enable gradient_checkpointing or lower micro_batch_size for headroom",
        ));
    }

    // Time: the mean micro-batch is padded to about the longest of its samples.
    let mut time_setup = setup.clone();
    let per_sample = d.avg_tokens.map_or(f64::from(trial.max_seq_length), |a| {
        a.clamp(1.0, f64::from(trial.max_seq_length))
    });
    if !trial.packing
        && let Some(avg) = d.avg_tokens
    {
        let padded = d
            .p95_tokens
            .map_or(avg * 1.25, |p| p as f64)
            .min(f64::from(trial.max_seq_length))
            .max(avg.min(f64::from(trial.max_seq_length)));
        time_setup.seq_len = if trial.micro_batch_size <= 1 {
            per_sample.ceil() as u32
        } else {
            padded.ceil() as u32
        }
        .max(1);
    }
    let step = estimate_step(
        facts,
        &time_setup,
        dev,
        trial.gradient_accumulation.max(1),
        if trial.packing {
            per_sample
        } else {
            f64::from(time_setup.seq_len)
        },
        mem.trainable_params,
        &opts.throughput,
    );
    let total_steps = trial.max_steps.or_else(|| {
        d.total_samples.map(|n| {
            let train = (n as f64 * (1.0 - req.eval_fraction.clamp(0.0, 0.9))).max(1.0);
            ((train / f64::from(trial.batch_size.max(1))).ceil() * trial.epochs)
                .ceil()
                .max(1.0) as u64
        })
    });
    let eta_hours = total_steps.map(|s| s as f64 * step.step_ms / 3.6e6);
    if let (Some(eta), Some(budget)) = (eta_hours, req.budget_gpu_hours) {
        let trials = f64::from(req.max_trials.unwrap_or(1).max(1));
        if eta * trials > budget {
            findings.push(finding(
                "budget_exceeded_estimate",
                Severity::Warning,
                format!(
                    "{} trials of ~{eta:.2} h each need ~{:.1} device-hours; the budget is {budget:.1}",
                    trials,
                    eta * trials
                ),
                "fewer trials, max_steps, a smaller model, or a larger budget (HPO stops early within the budget)",
            ));
        }
    }
    if dev.is_cpu() && eta_hours.is_some_and(|h| h > 24.0) {
        findings.push(finding(
            "slow_on_cpu",
            Severity::Warning,
            format!(
                "one trial would take ~{:.0} h on the CPU",
                eta_hours.unwrap_or(0.0)
            ),
            "use a GPU (resources.gpu_type), a smaller model, or max_steps",
        ));
    }

    let report = PreflightReport {
        estimated_vram_mb: (mem.total_bytes / 1e6).round() as u64,
        vram_breakdown: mem.breakdown(),
        time_per_step_ms: (step.step_ms * 10.0).round() / 10.0,
        throughput: ThroughputEstimate {
            tokens_per_sec: (step.tokens_per_sec * 10.0).round() / 10.0,
            samples_per_sec: (step.samples_per_sec * 1000.0).round() / 1000.0,
        },
        fits,
        vram_limit_gb: limit,
        device: dev.name.clone(),
        model_params: facts.params.total,
        trainable_params: mem.trainable_params,
        total_steps,
        eta_hours: eta_hours.map(|h| (h * 1000.0).round() / 1000.0),
        suggestions,
        flops_per_token: step.flops.total(),
        ..PreflightReport::default()
    };
    finish(report, findings)
}

/// Preflight of an experiment's base trial (seed 001 flat spec) with an
/// optional dataset profile.
pub fn preflight_spec(
    spec: &ExperimentSpec,
    dataset_profile: &Value,
    opts: &PreflightOptions,
) -> PreflightReport {
    let info = DatasetInfo::from_profile(dataset_profile);
    let mut trial = spec.base_config.clone();
    if trial.base_model.is_none() {
        trial.base_model = Some(spec.base_model.clone());
    }
    let mut o = opts.clone();
    if o.resolve.base_dir.is_none() {
        o.resolve.base_dir = Path::new(&spec.dataset_path)
            .parent()
            .map(Path::to_path_buf);
    }
    let mut report = preflight(
        &PreflightRequest {
            base_model: &spec.base_model,
            trial: &trial,
            task: spec.task,
            dataset: &info,
            resources: &spec.resources,
            eval_fraction: spec.eval_fraction,
            max_trials: Some(spec.max_trials),
            budget_gpu_hours: Some(spec.budget_gpu_hours),
        },
        &o,
    );
    // Every method the HPO may try must be trainable too.
    for m in &spec.methods {
        if *m != trial.method
            && matches!(
                m,
                lora_spec::trial::PeftMethod::Prefix | lora_spec::trial::PeftMethod::Ia3
            )
        {
            let f = finding(
                "method_not_implemented",
                Severity::Error,
                format!(
                    "methods lists {}, which the trainer does not implement",
                    m.as_str()
                ),
                "keep methods to lora and qlora",
            );
            report.errors.push(text(&f));
            report.findings.push(f);
            report.ok = false;
        }
    }
    report
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests: a panic is the failure report.
mod tests {
    use super::*;
    use lora_spec::trial::PeftMethod;
    use serde_json::json;

    fn gpu(name: &str) -> ResourcesSection {
        ResourcesSection {
            gpu_type: Some(name.into()),
            ..Default::default()
        }
    }

    fn run(
        model: &str,
        trial: &TrialConfig,
        res: &ResourcesSection,
        profile: Value,
    ) -> PreflightReport {
        let info = DatasetInfo::from_profile(&profile);
        preflight(
            &PreflightRequest {
                base_model: model,
                trial,
                task: Task::Instruction,
                dataset: &info,
                resources: res,
                eval_fraction: 0.1,
                max_trials: Some(5),
                budget_gpu_hours: Some(10.0),
            },
            &PreflightOptions::default(),
        )
    }

    #[test]
    fn seed_002_shape_for_a_fitting_trial() {
        let t = TrialConfig {
            method: PeftMethod::Qlora,
            target_modules: vec!["all-linear".into()],
            max_seq_length: 1024,
            gradient_checkpointing: true,
            ..Default::default()
        };
        let r = run(
            "meta-llama/Llama-3.1-8B",
            &t,
            &gpu("a100-40gb"),
            json!({"total_samples": 20000, "avg_tokens": 300.0, "max_tokens": 1000, "has_output": true,
                   "token_percentiles": {"p50": 250, "p95": 700, "p99": 900}}),
        );
        assert!(r.ok, "{:?}", r.errors);
        assert!(r.fits);
        assert_eq!(r.device, "a100-40gb");
        assert!(
            r.estimated_vram_mb > 5_000 && r.estimated_vram_mb < 40_000,
            "{}",
            r.estimated_vram_mb
        );
        let b = &r.vram_breakdown;
        let sum = b.model_gb
            + b.lora_gb
            + b.optimizer_gb
            + b.gradients_gb
            + b.activations_gb
            + b.logits_gb
            + b.overhead_gb;
        assert!((sum - b.total_gb).abs() < 0.01, "{sum} vs {}", b.total_gb);
        assert!(
            r.time_per_step_ms > 0.0
                && r.throughput.tokens_per_sec > 0.0
                && r.throughput.samples_per_sec > 0.0
        );
        // 18000 / 16 = 1125 steps per epoch × 3.
        assert_eq!(r.total_steps, Some(3375));
        let v = serde_json::to_value(&r).unwrap();
        for k in [
            "ok",
            "warnings",
            "errors",
            "estimated_vram_mb",
            "vram_breakdown",
            "time_per_step_ms",
            "throughput",
        ] {
            assert!(v.get(k).is_some(), "{k}");
        }
        assert!(
            v["throughput"].get("tokens_per_sec").is_some()
                && v["vram_breakdown"].get("total_with_buffer_gb").is_some()
        );
    }

    #[test]
    fn too_big_reports_vram_exceeded_with_a_plan() {
        let t = TrialConfig {
            micro_batch_size: 8,
            batch_size: 16,
            max_seq_length: 2048,
            ..Default::default()
        };
        let r = run("meta-llama/Llama-3.1-8B", &t, &gpu("rtx-4090"), json!({}));
        assert!(!r.ok && !r.fits);
        let e = r
            .findings
            .iter()
            .find(|f| f.code == "vram_exceeded")
            .unwrap();
        assert!(
            e.hint
                .as_deref()
                .unwrap()
                .contains("gradient_checkpointing")
        );
        assert!(
            r.suggestions.last().unwrap().contains("(fits)"),
            "{:?}",
            r.suggestions
        );
        assert!(r.errors[0].starts_with("vram_exceeded"));
    }

    #[test]
    fn gguf_unknown_models_and_devices_are_errors_not_panics() {
        let t = TrialConfig::default();
        let r = run("TheBloke/Llama-2-7B-GGUF", &t, &gpu("a100"), json!({}));
        assert!(!r.ok);
        assert_eq!(r.findings[0].code, "gguf_not_trainable");
        assert!(r.errors[0].contains("GGUF models cannot be trained. Use original format."));
        let r = run("acme/not-a-model", &t, &gpu("a100"), json!({}));
        assert_eq!(r.findings[0].code, "model_not_found");
        let r = run("gpt2", &t, &gpu("tpu-v9"), json!({}));
        assert_eq!(r.findings[0].code, "unknown_device");
        assert!(r.findings[0].hint.as_deref().unwrap().contains("rtx-4090"));
        let bad = TrialConfig {
            lora_rank: 0,
            ..Default::default()
        };
        let r = run("gpt2", &bad, &gpu("a100"), json!({}));
        assert!(
            r.findings
                .iter()
                .any(|f| f.field.as_deref() == Some("config.lora_rank"))
        );
    }

    #[test]
    fn cpu_plans_use_threads_and_flag_budget() {
        let res = ResourcesSection {
            device: Device::Cpu,
            threads: Some(2),
            vram_limit_gb: Some(16.0),
            ..Default::default()
        };
        let t = TrialConfig {
            target_modules: vec!["all-linear".into()],
            max_seq_length: 256,
            ..Default::default()
        };
        let r = run(
            "HuggingFaceTB/SmolLM2-135M",
            &t,
            &res,
            json!({"total_samples": 100000, "avg_tokens": 256.0, "has_output": true}),
        );
        assert_eq!(r.device, "cpu");
        assert!(r.fits && r.ok, "{:?}", r.errors);
        assert!(
            r.warnings
                .iter()
                .any(|w| w.starts_with("budget_exceeded_estimate")),
            "{:?}",
            r.warnings
        );
        // Near the PEFT anchor's ~160 tokens/s on this machine class (2 threads, seq 256 × 4).
        assert!(
            (80.0..320.0).contains(&r.throughput.tokens_per_sec),
            "{}",
            r.throughput.tokens_per_sec
        );
    }
}
