//! `MergeSkill` (`merge`, seed 001 §8): combine (optional), preflight, merge and
//! export, then validate what was written.

use crate::adapter::Adapter;
use crate::combine;
use crate::dtype::DType;
use crate::error::{MergeError, Result};
use crate::export::{ExportKind, ExportRequest, export};
use crate::merge::MergedModel;
use crate::st::SafetensorsSet;
use crate::validate::Written;
use async_trait::async_trait;
use lora_skill::{Skill, SkillContext, SkillError, StepResult};
use lora_spec::contracts::merge::{
    ExportFormat, MergeInput, MergeOutput, MergeValidation, OutputDtype,
};
use lora_spec::contracts::names;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The merge and export skill.
#[derive(Debug, Default, Clone)]
pub struct MergeSkill;

/// Registers [`MergeSkill`] in a registry.
pub fn register(reg: &mut lora_skill::SkillRegistry) {
    reg.register(MergeSkill);
}

fn dtype_of(d: Option<OutputDtype>) -> Option<DType> {
    d.map(|d| match d {
        OutputDtype::F32 => DType::F32,
        OutputDtype::F16 => DType::F16,
        OutputDtype::Bf16 => DType::BF16,
    })
}

/// The default output path beside the adapter.
pub fn default_output(adapter: &Path, format: ExportFormat, adapter_only: bool) -> PathBuf {
    let name = adapter
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "adapter".into());
    let file = match (format, adapter_only) {
        (ExportFormat::Gguf, true) => format!("{name}-LoRA.gguf"),
        (ExportFormat::Gguf, false) => format!("{name}-merged.gguf"),
        (ExportFormat::Pytorch, _) => format!("{name}-merged-bin"),
        (ExportFormat::Safetensors, _) => format!("{name}-merged"),
    };
    adapter.with_file_name(file)
}

/// `validate_after_merge` of a written output `out` (what [`MergeSkill`] runs
/// after writing it; public so a file can be re-checked later, or after a
/// copy): the written model's logits against base + adapter (module
/// [`crate::validate`]) when the engine runs this architecture and adapter;
/// else, for safetensors, the weight check; otherwise a warning says why the
/// file was not validated at run time. Without an adapter (a plain
/// conversion) the written file is checked against the base alone. A failed
/// check is a `backend` error naming the file, with the measured difference
/// and its bound.
pub fn validate_output(
    kind: ExportKind,
    input: &MergeInput,
    out: &Path,
    base_dir: &Path,
    adapter_dir: Option<&Path>,
    ctx: &SkillContext,
    warnings: &mut Vec<String>,
) -> std::result::Result<Option<MergeValidation>, SkillError> {
    let written = match kind {
        ExportKind::Safetensors => {
            // The coarsest type of any tensor sets the bound (a bf16 model may
            // keep its norms in f32).
            let set = SafetensorsSet::open_model_dir(out)?;
            let has = |d| set.entries().iter().any(|e| e.dtype == d);
            Some(if has(DType::BF16) {
                Written::Bf16
            } else if has(DType::F16) {
                Written::F16
            } else {
                Written::F32
            })
        }
        ExportKind::Gguf => Some(Written::Gguf(input.gguf_quantization)),
        _ => None,
    };
    let Some(written) = written else {
        warnings.push(match kind {
            ExportKind::PytorchBin => "validate_after_merge: the engine does not read PyTorch .bin, so the file \
                 was not validated at run time (the test suite checks this writer with torch.load); \
                 export safetensors to have the logits checked"
                .to_string(),
            _ => "validate_after_merge: a GGUF LoRA adapter is not run by the engine, so the file was not \
                 validated at run time (the test suite checks this writer with llama.cpp applying it to its base); export a \
                 merged GGUF to have the logits checked"
                .to_string(),
        });
        return Ok(None);
    };
    let v = match crate::validate::engine_unsupported(base_dir, adapter_dir) {
        None => {
            ctx.info(format!(
                "validating {} against base + adapter",
                out.display()
            ));
            if matches!(kind, ExportKind::Gguf) {
                // Read the GGUF back with the engine's importer (dequantised, Q/K
                // un-permuted): what a GGUF consumer computes, not what we meant to write.
                ctx.check_cancelled()?;
                let tmp = lora_skill::fs::temp_path_for(&out.with_extension("validate"));
                let r = lora_engine::import_gguf(out, &tmp, |_, _| {})
                    .map_err(|e| {
                        SkillError::backend(format!("reading back {}: {e}", out.display()))
                    })
                    .and_then(|_| {
                        crate::validate::validate_logits(
                            &tmp,
                            base_dir,
                            adapter_dir,
                            written,
                            &input.validation_prompts,
                            input.validation_tolerance,
                            ctx,
                        )
                    });
                let _ = std::fs::remove_dir_all(&tmp);
                r?
            } else {
                crate::validate::validate_logits(
                    out,
                    base_dir,
                    adapter_dir,
                    written,
                    &input.validation_prompts,
                    input.validation_tolerance,
                    ctx,
                )?
            }
        }
        Some(why) if matches!(kind, ExportKind::Safetensors) => {
            warnings.push(format!(
                "validate_after_merge: the engine cannot run this base and adapter ({why}); checked the merged weights \
                 instead of logits"
            ));
            let tol = input.validation_tolerance.unwrap_or(match written {
                Written::F16 | Written::Bf16 => 5e-2,
                _ => 1e-4,
            });
            match adapter_dir {
                Some(adapter_dir) => validate_safetensors(out, base_dir, adapter_dir, tol)?,
                None => return Ok(None),
            }
        }
        Some(why) => {
            warnings.push(format!(
                "validate_after_merge: the engine cannot run this base and adapter ({why}); the GGUF file was not \
                 validated at run time"
            ));
            return Ok(None);
        }
    };
    if !v.passed {
        return Err(SkillError::backend(format!(
            "validation failed: {}",
            v.method
        ))
        .with_file(out.display().to_string())
        .with_hint(
            "the written model does not compute base + adapter: report it with the adapter and base model",
        ));
    }
    Ok(Some(v))
}

/// Checks a merged safetensors folder against base + adapter: for every changed weight,
/// `W'·x` read from the written files against `W·x + s·B·(A·x)` computed from the base and
/// the (unmerged) adapter, on a deterministic probe vector. DoRA, embedding and replaced
/// tensors are compared with the merge recomputed from the inputs.
pub fn validate_safetensors(
    out: &Path,
    base_dir: &Path,
    adapter_dir: &Path,
    tolerance: f64,
) -> Result<MergeValidation> {
    let written = SafetensorsSet::open_model_dir(out)?;
    let base = SafetensorsSet::open_model_dir(base_dir)?;
    let ad = Adapter::open(adapter_dir)?;
    let merged = MergedModel::new(&base, Some(&ad))?;
    let mut worst = 0f64;
    for spec in merged.specs(None) {
        if !merged.is_modified(&spec.name) {
            continue;
        }
        let (w_out, shape) = written.f32_named(&spec.name)?;
        let plain: Vec<_> = ad
            .modules
            .iter()
            .filter(|m| m.base_weight == spec.name && m.magnitude.is_none() && !m.embedding)
            .collect();
        let reference_direct = plain.is_empty() || shape.len() != 2;
        if reference_direct {
            let want = merged.values(&spec.name)?;
            let scale = want.iter().fold(1e-12f32, |m, v| m.max(v.abs())) as f64;
            let d = w_out
                .iter()
                .zip(&want)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs())) as f64;
            worst = worst.max(d / scale.max(1.0));
            continue;
        }
        let (rows, cols) = (shape[0], shape[1]);
        let x: Vec<f32> = (0..cols)
            .map(|i| ((i as f32 * 0.618_034).fract() - 0.5) * 2.0 / (cols as f32).sqrt())
            .collect();
        let matvec = |w: &[f32]| -> Vec<f64> {
            w.chunks_exact(cols)
                .map(|r| {
                    r.iter()
                        .zip(&x)
                        .map(|(a, b)| (*a as f64) * (*b as f64))
                        .sum()
                })
                .collect()
        };
        let y_out = matvec(&w_out);
        let (w_base, _) = base.f32_named(&spec.name)?;
        let mut y_ref = matvec(&w_base);
        for m in plain {
            let (a, _) = ad.f32(&m.a)?;
            let (b, _) = ad.f32(&m.b)?;
            let ax: Vec<f64> = a
                .chunks_exact(cols)
                .map(|r| {
                    r.iter()
                        .zip(&x)
                        .map(|(p, q)| (*p as f64) * (*q as f64))
                        .sum()
                })
                .collect();
            for (o, yv) in y_ref.iter_mut().enumerate().take(rows) {
                let bax: f64 = (0..m.rank).map(|k| b[o * m.rank + k] as f64 * ax[k]).sum();
                *yv += m.scale * bax;
            }
        }
        let d = y_out
            .iter()
            .zip(&y_ref)
            .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
        worst = worst.max(d);
    }
    let passed = worst.is_finite() && worst <= tolerance;
    let verdict = if passed { "<=" } else { "exceeds the bound" };
    Ok(MergeValidation {
        method: format!(
            "weights: every changed tensor read back from the written files; W'·x against W·x + s·B·(A·x) \
             from the base and the unmerged adapter on a probe vector (DoRA/embedding/replaced tensors: \
             against the merge recomputed from the inputs, relative); max |Δ| {worst:.3e} {verdict} \
             {tolerance:.3e}"
        ),
        max_abs_diff: worst,
        tolerance,
        passed,
        relative_rms_diff: None,
        top1_agreement: None,
    })
}

#[async_trait]
impl Skill for MergeSkill {
    type Input = MergeInput;
    type Output = MergeOutput;

    fn name(&self) -> &'static str {
        names::MERGE
    }

    fn description(&self) -> &'static str {
        "Merge a PEFT LoRA adapter into its base model (streamed, f32 math) and export Hugging Face \
         safetensors, PyTorch .bin or GGUF (F32/F16/BF16/Q8_0/Q4_K_M, or a GGUF LoRA adapter); optionally \
         combine several adapters first (PEFT add_weighted_adapter types)."
    }

    fn requires_gpu(&self) -> bool {
        false
    }

    async fn run(
        &self,
        input: MergeInput,
        ctx: &SkillContext,
    ) -> std::result::Result<StepResult<MergeOutput>, SkillError> {
        let started = Instant::now();
        let base_dir = ctx.resolve(&input.base_model);
        let adapter_dir = ctx.resolve(&input.adapter_path);
        let mut warnings = Vec::new();
        if let Some(comb) = &input.combination {
            if comb.adapters.is_empty() {
                return Err(SkillError::invalid_input("combination.adapters is empty")
                    .with_field("combination.adapters")
                    .with_hint("list the adapter folders to combine"));
            }
            let ads = comb
                .adapters
                .iter()
                .map(|p| Adapter::open(&ctx.resolve(p)))
                .collect::<Result<Vec<_>>>()?;
            let rep = combine::combine(&ads, comb, &adapter_dir)
                .map_err(|e| SkillError::from(e).nested_in("combination"))?;
            ctx.info(format!(
                "combined {} adapters ({:?}) into {} (rank {})",
                ads.len(),
                comb.combination_type,
                adapter_dir.display(),
                rep.rank
            ));
        }
        let kind = match (input.output_format, input.adapter_only) {
            (ExportFormat::Safetensors, false) => ExportKind::Safetensors,
            (ExportFormat::Pytorch, false) => ExportKind::PytorchBin,
            (ExportFormat::Gguf, false) => ExportKind::Gguf,
            (ExportFormat::Gguf, true) => ExportKind::GgufLora,
            (_, true) => {
                return Err(
                    SkillError::invalid_input("adapter_only applies to GGUF output only")
                        .with_field("adapter_only")
                        .with_hint("set output_format: gguf, or drop adapter_only"),
                );
            }
        };
        let out = input
            .output_path
            .as_deref()
            .map(|p| ctx.resolve(p))
            .unwrap_or_else(|| {
                default_output(&adapter_dir, input.output_format, input.adapter_only)
            });
        if input.validate_after_merge {
            crate::validate::check_prompts(&base_dir, &input.validation_prompts)?;
        }
        let mut req = ExportRequest::new(&base_dir, Some(adapter_dir.clone()), &out, kind);
        req.dtype = dtype_of(input.output_dtype);
        req.quant = input.gguf_quantization;
        req.max_shard_bytes = input.max_shard_size_mb.max(1) * 1_000_000;
        let mut progress = ctx.progress("merge", None, "tensors");
        let summary = {
            let mut on_tensor = |done: usize, total: usize, name: &str| -> Result<()> {
                if ctx.is_cancelled() {
                    return Err(MergeError::Cancelled);
                }
                progress.update(done as u64, Some(format!("{done}/{total} {name}")), &[]);
                Ok(())
            };
            // CPU-bound and synchronous; it polls cancellation between tensors.
            export(&req, &mut on_tensor)?
        };
        progress.finish(format!("wrote {}", out.display()));
        warnings.extend(summary.warnings.iter().cloned());
        for w in &warnings {
            ctx.warn(w.clone());
        }
        let mut validation = None;
        if input.validate_after_merge {
            validation = validate_output(
                kind,
                &input,
                &out,
                &base_dir,
                Some(&adapter_dir),
                ctx,
                &mut warnings,
            )?;
        }
        let data = MergeOutput {
            merged_path: out.display().to_string(),
            output_format: input.output_format,
            max_abs_logit_diff: validation
                .as_ref()
                .filter(|v| v.method.starts_with("logits"))
                .map(|v| v.max_abs_diff),
            files: summary
                .files
                .iter()
                .map(|f| f.display().to_string())
                .collect(),
            output_bytes: summary.bytes,
            adapted_tensors: summary.adapted_tensors,
            tensors: summary.tensors,
            gguf_types: summary.gguf_types.clone(),
            validation,
            elapsed_s: started.elapsed().as_secs_f64(),
            warnings,
        };
        let text = format!(
            "{} -> {} ({} tensors, {} adapted, {:.1} MB) in {:.1}s",
            adapter_dir.display(),
            out.display(),
            data.tensors,
            data.adapted_tensors,
            data.output_bytes as f64 / 1e6,
            data.elapsed_s
        );
        let mut res = StepResult::new(data).with_text(text);
        for f in &summary.files {
            res = res.with_artifact(f.display().to_string());
        }
        Ok(res)
    }
}
