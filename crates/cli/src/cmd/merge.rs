//! `lora-trainer merge` and `lora-trainer export`: the merge skill (lora-merge)
//! for people (a summary, progress bars) and scripts (`--json`).
//!
//! - `merge --model DIR --adapter DIR --out DIR`: merged Hugging Face safetensors.
//! - `export --model DIR [--adapter DIR] --format safetensors|gguf|pytorch [--quant f16|q8_0|q4_k_m] --out PATH`
//! - `export --adapter DIR --format gguf-lora --out FILE` (a GGUF LoRA for `llama-cli --lora`).
//!
//! Both check what they wrote unless `--no-validate`: the written model's logits on the engine
//! against base + adapter (the base alone for `export` without `--adapter`), see
//! `lora_merge::validate`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args as ClapArgs, ValueEnum};
use lora_merge::export::{ExportKind, ExportRequest, ExportSummary};
use lora_merge::{DType, MergeError};
use lora_skill::{SkillContext, SkillError};
use lora_spec::contracts::merge::{
    ExportFormat, GgufQuantization, MergeInput, MergeValidation, OutputDtype,
};
use lora_spec::contracts::names;

use crate::exit::Usage;
use crate::{output, render};

/// `merge` options.
#[derive(Debug, ClapArgs)]
pub struct MergeArgs {
    /// Base model folder (Hugging Face layout).
    #[arg(long)]
    pub model: PathBuf,
    /// Adapter folder (PEFT layout).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Output folder (must not exist).
    #[arg(long)]
    pub out: PathBuf,
    /// Weight dtype of the output (default: the base's).
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeArg>,
    /// Shard size limit, MB.
    #[arg(long, default_value_t = 5000)]
    pub max_shard_mb: u64,
    /// Skip validate_after_merge (the merged model's logits against base + adapter on the engine).
    #[arg(long)]
    pub no_validate: bool,
    /// A prompt for the validation (repeat for several; default: three built-in texts).
    #[arg(long = "validation-prompt", value_name = "TEXT")]
    pub validation_prompts: Vec<String>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Output formats of `export`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    /// Hugging Face folder, safetensors weights.
    Safetensors,
    /// One GGUF model file (llama.cpp, Ollama).
    Gguf,
    /// Hugging Face folder, PyTorch .bin weights.
    Pytorch,
    /// One GGUF LoRA adapter file (`llama-cli --lora`).
    GgufLora,
}

/// GGUF types of `export --quant`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum QuantArg {
    /// float32.
    F32,
    /// float16.
    F16,
    /// bfloat16.
    Bf16,
    /// 8-bit blocks.
    #[value(name = "q8_0")]
    Q8_0,
    /// 4-bit k-quants with llama.cpp's Q4_K_M mix.
    #[value(name = "q4_k_m")]
    Q4KM,
}

/// Weight dtypes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    /// float32.
    F32,
    /// float16.
    F16,
    /// bfloat16.
    Bf16,
}

/// `export` options.
#[derive(Debug, ClapArgs)]
pub struct ExportArgs {
    /// Base model folder (Hugging Face layout); for gguf-lora only its config.json is read
    /// (default: the adapter's base_model_name_or_path when that is a local folder).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Adapter folder (PEFT layout) merged before export (required for gguf-lora).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum)]
    pub format: FormatArg,
    /// GGUF tensor type (gguf: default q4_k_m; gguf-lora: default f32).
    #[arg(long, value_enum)]
    pub quant: Option<QuantArg>,
    /// Weight dtype of safetensors/pytorch output (default: the base's).
    #[arg(long, value_enum)]
    pub dtype: Option<DtypeArg>,
    /// Output folder (safetensors, pytorch) or file (gguf, gguf-lora); must not exist.
    #[arg(long)]
    pub out: PathBuf,
    /// Shard size limit of safetensors/pytorch output, MB.
    #[arg(long, default_value_t = 5000)]
    pub max_shard_mb: u64,
    /// Export a fine-tuned GGUF even though no chat template was found.
    #[arg(long)]
    pub allow_missing_chat_template: bool,
    /// Skip the check of the written file (safetensors, gguf: its logits on the engine against
    /// base + adapter, or the base alone without --adapter, within the format's bound).
    #[arg(long)]
    pub no_validate: bool,
    /// A prompt for the validation (repeat for several; default: three built-in texts).
    #[arg(long = "validation-prompt", value_name = "TEXT")]
    pub validation_prompts: Vec<String>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

fn quant(q: QuantArg) -> GgufQuantization {
    match q {
        QuantArg::F32 => GgufQuantization::F32,
        QuantArg::F16 => GgufQuantization::F16,
        QuantArg::Bf16 => GgufQuantization::Bf16,
        QuantArg::Q8_0 => GgufQuantization::Q8_0,
        QuantArg::Q4KM => GgufQuantization::Q4KM,
    }
}

fn dtype(d: DtypeArg) -> DType {
    match d {
        DtypeArg::F32 => DType::F32,
        DtypeArg::F16 => DType::F16,
        DtypeArg::Bf16 => DType::BF16,
    }
}

fn context(verbose: u8) -> anyhow::Result<SkillContext> {
    let cwd = std::env::current_dir().context("reading the current directory")?;
    Ok(SkillContext::new(cwd)
        .with_sink(render::BarSink::new(verbose > 0))
        .with_cancel(render::ctrl_c_token()))
}

/// `lora-trainer merge`: runs the merge skill (safetensors output, validated).
pub async fn merge(args: MergeArgs, verbose: u8) -> anyhow::Result<()> {
    let ctx = context(verbose)?;
    let input = MergeInput {
        adapter_path: args.adapter.display().to_string(),
        base_model: args.model.display().to_string(),
        output_format: ExportFormat::Safetensors,
        validate_after_merge: !args.no_validate,
        output_path: Some(args.out.display().to_string()),
        output_dtype: args.dtype.map(|d| match d {
            DtypeArg::F32 => OutputDtype::F32,
            DtypeArg::F16 => OutputDtype::F16,
            DtypeArg::Bf16 => OutputDtype::Bf16,
        }),
        max_shard_size_mb: args.max_shard_mb,
        validation_prompts: args.validation_prompts,
        ..MergeInput::default()
    };
    let reg = crate::skills::registry();
    let res: lora_skill::StepResult<lora_spec::contracts::merge::MergeOutput> =
        reg.call(names::MERGE, &input, &ctx).await?;
    if args.json {
        return output::json(&res.data);
    }
    output::line(&res.output_text)?;
    if let Some(v) = &res.data.validation {
        print_validation(v)?;
    }
    for w in &res.data.warnings {
        output::line(&format!("warning: {w}"))?;
    }
    Ok(())
}

/// The validation's one-line summary.
fn print_validation(v: &MergeValidation) -> anyhow::Result<()> {
    output::line(&format!(
        "validation {}: {}",
        if v.passed { "passed" } else { "FAILED" },
        v.method
    ))
}

/// `lora-trainer export`.
pub async fn export(args: ExportArgs, verbose: u8) -> anyhow::Result<()> {
    let ctx = context(verbose)?;
    let kind = match args.format {
        FormatArg::Safetensors => ExportKind::Safetensors,
        FormatArg::Pytorch => ExportKind::PytorchBin,
        FormatArg::Gguf => ExportKind::Gguf,
        FormatArg::GgufLora => ExportKind::GgufLora,
    };
    let model = match (&args.model, kind) {
        (Some(m), _) => m.clone(),
        (None, ExportKind::GgufLora) => PathBuf::new(),
        (None, _) => return Err(Usage("--model is required for this format".into()).into()),
    };
    if kind == ExportKind::GgufLora && args.adapter.is_none() {
        return Err(Usage("--format gguf-lora needs --adapter DIR".into()).into());
    }
    if args.quant.is_some() && !matches!(kind, ExportKind::Gguf | ExportKind::GgufLora) {
        return Err(Usage(
            "--quant applies to gguf and gguf-lora; use --dtype for safetensors/pytorch".into(),
        )
        .into());
    }
    let mut req = ExportRequest::new(&model, args.adapter.clone(), &args.out, kind);
    req.quant = args
        .quant
        .map(quant)
        .unwrap_or(if kind == ExportKind::GgufLora {
            GgufQuantization::F32
        } else {
            GgufQuantization::Q4KM
        });
    req.dtype = args.dtype.map(dtype);
    req.max_shard_bytes = args.max_shard_mb.max(1) * 1_000_000;
    req.allow_missing_chat_template = args.allow_missing_chat_template;
    let validate = !args.no_validate;
    if validate {
        // Prompts the check could not run are refused before anything is written.
        lora_merge::validate::check_prompts(&model, &args.validation_prompts)?;
    }
    let started = std::time::Instant::now();
    let mut progress = ctx.progress("export", None, "tensors");
    let summary: ExportSummary = {
        let mut on_tensor = |done: usize, total: usize, name: &str| -> lora_merge::Result<()> {
            if ctx.is_cancelled() {
                return Err(MergeError::Cancelled);
            }
            progress.update(done as u64, Some(format!("{done}/{total} {name}")), &[]);
            Ok(())
        };
        lora_merge::export(&req, &mut on_tensor).map_err(SkillError::from)?
    };
    progress.finish(format!("wrote {}", args.out.display()));
    let mut summary = summary;
    let mut validation = None;
    if validate {
        let input = MergeInput {
            gguf_quantization: req.quant,
            validation_prompts: args.validation_prompts.clone(),
            ..MergeInput::default()
        };
        validation = lora_merge::skill::validate_output(
            kind,
            &input,
            &args.out,
            &model,
            args.adapter.as_deref(),
            &ctx,
            &mut summary.warnings,
        )?;
    }
    if args.json {
        let mut v = serde_json::to_value(&summary)?;
        v["validation"] = serde_json::to_value(&validation)?;
        return output::json(&v);
    }
    output::line(&format!(
        "{} -> {} ({} tensors, {} adapted, {:.1} MB) in {:.1}s",
        args.adapter
            .as_ref()
            .map_or_else(|| model.display().to_string(), |a| a.display().to_string()),
        args.out.display(),
        summary.tensors,
        summary.adapted_tensors,
        summary.bytes as f64 / 1e6,
        started.elapsed().as_secs_f64()
    ))?;
    if !summary.gguf_types.is_empty() {
        let types: Vec<String> = summary
            .gguf_types
            .iter()
            .map(|(k, v)| format!("{k}×{v}"))
            .collect();
        output::line(&format!("tensor types: {}", types.join(", ")))?;
    }
    if let Some(v) = &validation {
        print_validation(v)?;
    }
    for w in &summary.warnings {
        output::line(&format!("warning: {w}"))?;
    }
    Ok(())
}
