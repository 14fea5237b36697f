//! `MergeSkill` (`merge`, seed 001 §8): combine (optional), preflight, merge and
//! export, then validate what was written.

use crate::adapter::Adapter;
use crate::combine;
use crate::dtype::DType;
use crate::error::{MergeError, Result};
use crate::export::{ExportKind, ExportRequest, export};
use crate::merge::MergedModel;
use crate::st::SafetensorsSet;
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
    Ok(MergeValidation {
        method: "weights: every changed tensor read back from the written files; W'·x against W·x + s·B·(A·x) \
                 from the base and the unmerged adapter on a probe vector (DoRA/embedding/replaced tensors: \
                 against the merge recomputed from the inputs, relative)"
            .into(),
        max_abs_diff: worst,
        tolerance,
        passed: worst <= tolerance,
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
            match kind {
                ExportKind::Safetensors => {
                    let tol = input.validation_tolerance.unwrap_or(match req.dtype {
                        Some(DType::F16) | Some(DType::BF16) => 5e-2,
                        _ => 1e-4,
                    });
                    let v = validate_safetensors(&out, &base_dir, &adapter_dir, tol)?;
                    if !v.passed {
                        return Err(SkillError::backend(format!(
                            "validation failed: max |Δ| {:.3e} > {:.1e} ({})",
                            v.max_abs_diff, v.tolerance, v.method
                        ))
                        .with_hint("report this with the adapter and base model: the merged file does not compute base + adapter"));
                    }
                    validation = Some(v);
                }
                _ => warnings.push(format!(
                    "validate_after_merge: the in-process check covers safetensors output; {kind:?} files are verified \
                     against their readers (torch.load, gguf-py, llama.cpp) by the test suite, not at run time"
                )),
            }
        }
        let data = MergeOutput {
            merged_path: out.display().to_string(),
            output_format: input.output_format,
            max_abs_logit_diff: None,
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
