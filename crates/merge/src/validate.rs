//! `validate_after_merge` through the model itself: the written model (merged
//! safetensors, or a GGUF file read back with the engine's GGUF importer) and
//! the base with the adapter applied unmerged (PEFT's `base(x) + s·B(A(x))`)
//! run the same prompts on libtorch, and the largest logit difference is
//! checked against a bound for the output's number format.
//!
//! Criteria, each from the format's rounding (reported with the relative RMS
//! difference ‖Δ‖₂/‖reference − mean‖₂ and the top-1 agreement):
//! - f32 (safetensors or GGUF F32): max |Δlogit| ≤ 1e-4 absolute. Both sides
//!   run in f64 (models up to 1 B parameters), so what remains is the one f32
//!   rounding of each stored `W + s·B·A`. Larger models (or ones whose f64
//!   copy does not fit the available memory) run in f32 and the bound becomes
//!   relative to the largest logit; a model that does not fit in f32 either
//!   is not run ([`compute_kind`]): the weight check (safetensors) or a
//!   warning (GGUF) replaces the logit check.
//! - f16 weights (11-bit significand, step 2^-11 ≈ 4.9e-4): max |Δlogit| ≤
//!   1e-2 × max(1, max |logit|); bf16 (8-bit, 3.9e-3): 5e-2 ×; GGUF Q8_0
//!   (8-bit blocks of 32, step ≈ block max / 127): 1e-1 ×.
//! - GGUF Q4_K_M: relative RMS ≤ 1.0. A 4-bit model's logits move by a large
//!   fraction of their spread, and its largest single difference says
//!   little; logits unrelated to the model's give ≈ 1.4 (√2), so the check
//!   tells a file that computes the model from one that does not (lost Q/K
//!   permutation, wrong layout, garbage blocks), not good quantisation from
//!   slightly worse.
//!
//! Measured (max |Δlogit| / relative RMS / top-1): the test fixture, a
//! random-init 2-layer Llama with hidden 256 and logits up to 3.4 (`cargo
//! test -p lora-merge --test merge_export validate_after -- --nocapture`):
//! f32 1.3e-6, f16 4.4e-3, bf16 2.0e-2, GGUF F16 3.8e-3, Q8_0 9.1e-2, Q4_K_M
//! 0.96 / 0.26 / 0.53. Tampered files fail (`--test merge_export
//! validation_fails`): one f32 projection scaled by 1 + 1e-3 moves the logits
//! by 2.3e-3 (22× the f32 bound); one Q8_0 projection with its block scales
//! negated by 5.7 (17× the Q8_0 bound).
//! SmolLM2-135M-Instruct with the quickstart's adapter (logits up to 39.3,
//! 27 positions × 49152): f32 2.4e-5; bf16 0.26; f16 0.045; GGUF F16 0.045 /
//! 1.2e-3 / 1.00; Q8_0 0.90 / 2.9e-2 / 0.96; Q4_K_M 22.9 / 0.58 / 0.63 (a
//! Q4_1-sourced 135M model re-quantised to 4 bits; llama-quantize's own file
//! is byte-identical, crates/merge/tests/gguf_export.rs).

use std::path::Path;

use lora_engine::{LlamaModel, TextTokenizer, lora};
use lora_skill::{SkillContext, SkillError};
use lora_spec::contracts::merge::{GgufQuantization, MergeValidation};
use tch::{Device, Kind, Tensor};

/// The format of the file being checked, for its bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// Safetensors in f32.
    F32,
    /// Safetensors in f16.
    F16,
    /// Safetensors in bf16.
    Bf16,
    /// A GGUF file of this type.
    Gguf(GgufQuantization),
}

impl Written {
    /// The bound of the format's criterion (see the module docs).
    pub fn tolerance(self) -> f64 {
        match self {
            Written::F32 | Written::Gguf(GgufQuantization::F32) => 1e-4,
            Written::F16 | Written::Gguf(GgufQuantization::F16) => 1e-2,
            Written::Bf16 | Written::Gguf(GgufQuantization::Bf16) => 5e-2,
            Written::Gguf(GgufQuantization::Q8_0) => 1e-1,
            Written::Gguf(GgufQuantization::Q4KM) => 1.0,
        }
    }
}

/// Prompts used when the caller gives none: short, varied text.
pub const DEFAULT_PROMPTS: [&str; 3] = [
    "The capital of France is",
    "def add(a, b):\n    return",
    "LoRA adapts a frozen model with low-rank updates, so",
];

fn backend(e: impl std::fmt::Display) -> SkillError {
    SkillError::backend(e.to_string())
}

/// Longest prompt, in tokens, run by the check.
pub const MAX_PROMPT_TOKENS: usize = 64;

/// Token ids of the prompts, each cut to [`MAX_PROMPT_TOKENS`], and where they
/// came from. The caller's `validation_prompts` must tokenise (with the base's
/// tokenizer) into ids of the model's vocabulary, else an `invalid_input`
/// error names the prompt; the built-in prompts are used when none are given,
/// and a fixed token-id ramp when the base folder has no tokenizer.
fn prompt_ids(
    base_dir: &Path,
    prompts: &[String],
    vocab: i64,
) -> Result<(Vec<Vec<i64>>, String), SkillError> {
    let cut = |mut ids: Vec<i64>| {
        ids.truncate(MAX_PROMPT_TOKENS);
        ids
    };
    let tok = match TextTokenizer::from_dir(base_dir) {
        Ok(tok) => tok,
        Err(e) if !prompts.is_empty() => {
            return Err(SkillError::invalid_input(format!(
                "validation_prompts need the base model's tokenizer, which does not load: {e}"
            ))
            .with_field("validation_prompts")
            .with_hint(
                "add the tokenizer files to the base model folder, or drop validation_prompts",
            ));
        }
        Err(_) => {
            let ramp = (0..16).map(|i| (i * 7 + 3) % vocab).collect();
            return Ok((
                vec![ramp],
                "a fixed 16-token id ramp (the base folder has no tokenizer)".into(),
            ));
        }
    };
    if prompts.is_empty() {
        let ids: Vec<Vec<i64>> = DEFAULT_PROMPTS
            .iter()
            .filter_map(|t| tok.encode(t, true).ok())
            .filter(|ids| !ids.is_empty() && ids.iter().all(|&i| (0..vocab).contains(&i)))
            .map(cut)
            .collect();
        if ids.is_empty() {
            let ramp = (0..16).map(|i| (i * 7 + 3) % vocab).collect();
            return Ok((
                vec![ramp],
                "a fixed 16-token id ramp (the tokenizer's ids of the built-in prompts are outside the vocabulary)"
                    .into(),
            ));
        }
        return Ok((ids, "the built-in prompts".into()));
    }
    let mut out = Vec::with_capacity(prompts.len());
    for (i, text) in prompts.iter().enumerate() {
        let bad = |why: String| {
            SkillError::invalid_input(format!("validation prompt {i}: {why}"))
                .with_field(format!("validation_prompts[{i}]"))
                .with_hint("give non-empty text the base model's tokenizer encodes")
        };
        let ids = tok.encode(text, true).map_err(|e| bad(e.to_string()))?;
        if ids.is_empty() {
            return Err(bad("encodes to no tokens".into()));
        }
        if let Some(id) = ids.iter().find(|&&id| !(0..vocab).contains(&id)) {
            return Err(bad(format!(
                "token id {id} is outside the model's vocabulary of {vocab}"
            )));
        }
        out.push(cut(ids));
    }
    Ok((out, "validation_prompts".into()))
}

/// Checks the caller's `validation_prompts` against the base model (its
/// tokenizer and vocabulary) before anything is written; no prompts pass.
/// A base whose config does not read is left to the merge to report.
pub fn check_prompts(base_dir: &Path, prompts: &[String]) -> Result<(), SkillError> {
    if prompts.is_empty() {
        return Ok(());
    }
    match lora_engine::ModelConfig::from_file(&base_dir.join("config.json")) {
        Ok(c) => prompt_ids(base_dir, prompts, c.vocab_size as i64).map(|_| ()),
        Err(_) => Ok(()),
    }
}

/// Logits of every prompt, concatenated over positions `[Σ T, V]`.
fn logits(model: &LlamaModel, prompts: &[Vec<i64>]) -> Result<Tensor, SkillError> {
    let mut all = Vec::with_capacity(prompts.len());
    for p in prompts {
        let ids = Tensor::from_slice(p).view([1, -1]);
        let l = tch::no_grad(|| model.forward(&ids, None, None)).map_err(backend)?;
        all.push(l.squeeze_dim(0).to_kind(Kind::Double));
    }
    Ok(Tensor::cat(&all, 0))
}

fn load(dir: &Path, kind: Kind) -> Result<LlamaModel, SkillError> {
    let (model, report) = LlamaModel::load(dir, kind, Device::Cpu).map_err(backend)?;
    if !report.is_clean() {
        return Err(SkillError::backend(format!(
            "{}: {}",
            dir.display(),
            report.summary()
        )));
    }
    Ok(model)
}

/// Models up to this many parameters are checked in f64, larger ones in f32.
pub const F64_MAX_PARAMETERS: usize = 1_000_000_000;

/// Memory the check needs for a model of `params` parameters computed in
/// `kind`, bytes: one model at a time in that type (the reference is dropped
/// before the written model loads), +10 %, plus 0.5 GB for libtorch, the
/// tokenizer and the logits (measured: 1.8 GB peak for 135 M in f64).
pub fn memory_needed(params: usize, kind: Kind) -> u64 {
    let per = if kind == Kind::Double { 8.0 } else { 4.0 };
    (params as f64 * per * 1.1) as u64 + 500_000_000
}

/// The compute type of the check: f64 up to [`F64_MAX_PARAMETERS`] when it
/// fits in `available` bytes, else f32 when that fits; `None` when neither
/// does (the check would be killed for memory after a merge that worked).
/// With `available` unknown, memory is not limited.
pub fn compute_kind(params: usize, available: Option<u64>) -> Option<Kind> {
    let fits = |k| available.is_none_or(|a| memory_needed(params, k) <= a);
    if params <= F64_MAX_PARAMETERS && fits(Kind::Double) {
        Some(Kind::Double)
    } else if fits(Kind::Float) {
        Some(Kind::Float)
    } else {
        None
    }
}

/// The machine's available memory (`MemAvailable`, Linux), bytes.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Why the logit check cannot run this base and adapter, if it cannot (the
/// caller then falls back to the weight check): the engine runs a
/// Llama-family config and a plain LoRA adapter (no DoRA, no replaced
/// modules, no per-layer patterns), and the model must fit in the available
/// memory in f32 ([`compute_kind`]).
pub fn engine_unsupported(base_dir: &Path, adapter_dir: Option<&Path>) -> Option<String> {
    match lora_engine::ModelConfig::from_file(&base_dir.join("config.json")) {
        Err(e) => return Some(e.to_string()),
        Ok(c) => {
            let params = c.num_parameters();
            let available = available_memory();
            if compute_kind(params, available).is_none() {
                return Some(format!(
                    "a {:.1} B-parameter model needs {:.1} GB in f32 to run, {:.1} GB is available",
                    params as f64 / 1e9,
                    memory_needed(params, Kind::Float) as f64 / 1e9,
                    available.unwrap_or(0) as f64 / 1e9
                ));
            }
        }
    }
    let adapter_dir = adapter_dir?;
    match lora::read_peft_config(adapter_dir) {
        Err(e) => Some(e.to_string()),
        Ok(c) if c.use_dora => Some("DoRA adapters".into()),
        Ok(c) if c.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) => {
            Some("modules_to_save".into())
        }
        Ok(c) if !c.rank_pattern.is_empty() || !c.alpha_pattern.is_empty() => {
            Some("rank_pattern / alpha_pattern".into())
        }
        Ok(c) if c.layers_to_transform.as_ref().is_some_and(|v| !v.is_null()) => {
            Some("layers_to_transform".into())
        }
        Ok(_) => None,
    }
}

/// Runs the prompts through base + adapter (unmerged; the base alone without
/// an adapter, for a plain conversion) and through the written model
/// (`merged_dir`: an HF folder, for GGUF the importer's output) and compares
/// the logits. Reports progress (four steps: load and run each side) and
/// stops between steps when `ctx` is cancelled.
pub fn validate_logits(
    merged_dir: &Path,
    base_dir: &Path,
    adapter_dir: Option<&Path>,
    written: Written,
    prompts: &[String],
    tolerance: Option<f64>,
    ctx: &SkillContext,
) -> Result<MergeValidation, SkillError> {
    // Both sides compute in f64 when it fits in memory, so that the difference
    // is the written file's, not f32 compute noise (which alone reaches ~1e-4
    // on a 30-layer model with logits near 40); above 1 B parameters, or when
    // f64 does not fit, in f32 with the f32 bound relative to the largest logit.
    let config =
        lora_engine::ModelConfig::from_file(&base_dir.join("config.json")).map_err(backend)?;
    let params = config.num_parameters();
    // Bad prompts are the caller's input: refused before any model is loaded.
    let (ids, source) = prompt_ids(base_dir, prompts, config.vocab_size as i64)?;
    let kind = compute_kind(params, available_memory()).ok_or_else(|| {
        SkillError::backend(format!(
            "not enough memory to run the {:.1} B-parameter model for the logit check ({:.1} GB needed in f32)",
            params as f64 / 1e9,
            memory_needed(params, Kind::Float) as f64 / 1e9
        ))
        .with_hint("free memory, or set validate_after_merge: false")
    })?;
    ctx.check_cancelled()?;
    let mut progress = ctx.progress("validate", Some(4), "steps");
    progress.update(0, Some("loading base + adapter".into()), &[]);
    let mut reference = load(base_dir, kind)?;
    if let Some(adapter_dir) = adapter_dir {
        lora::load_peft(&mut reference, adapter_dir).map_err(backend)?;
    }
    let against = if adapter_dir.is_some() {
        "base + adapter (unmerged)"
    } else {
        "the base model"
    };
    ctx.check_cancelled()?;
    progress.update(1, Some("running base + adapter".into()), &[]);
    let want = logits(&reference, &ids)?;
    drop(reference);
    ctx.check_cancelled()?;
    progress.update(2, Some("loading the written model".into()), &[]);
    let merged = load(merged_dir, kind)?;
    ctx.check_cancelled()?;
    progress.update(3, Some("running the written model".into()), &[]);
    let got = logits(&merged, &ids)?;
    drop(merged);
    progress.finish("compared");
    if got.size() != want.size() {
        return Err(SkillError::backend(format!(
            "the written model's logits have shape {:?}, base + adapter {:?}",
            got.size(),
            want.size()
        )));
    }
    let delta = &got - &want;
    let diff = delta.abs().max().double_value(&[]);
    let scale = want.abs().max().double_value(&[]).max(1.0);
    let spread = (&want - want.mean(Kind::Double)).norm().double_value(&[]);
    let rms = delta.norm().double_value(&[]) / spread.max(f64::MIN_POSITIVE);
    let top1 = got
        .argmax(-1, false)
        .eq_tensor(&want.argmax(-1, false))
        .to_kind(Kind::Double)
        .mean(Kind::Double)
        .double_value(&[]);
    let rel = tolerance.unwrap_or_else(|| written.tolerance());
    let tokens: usize = ids.iter().map(Vec::len).sum();
    let (criterion, value, bound) = if written == Written::Gguf(GgufQuantization::Q4KM) {
        ("relative RMS difference", rms, rel)
    } else if matches!(written, Written::F32 | Written::Gguf(GgufQuantization::F32))
        && tolerance.is_none()
        && kind == Kind::Double
    {
        // f32 is held to an absolute 1e-4.
        ("max |Δlogit|", diff, rel)
    } else {
        // The rounding formats: a bound relative to the largest logit.
        ("max |Δlogit|", diff, rel * scale)
    };
    let passed = value.is_finite() && value <= bound;
    let verdict = if passed { "<=" } else { "exceeds the bound" };
    Ok(MergeValidation {
        method: format!(
            "logits: the written model against {against} on libtorch, {} prompt(s) \
             ({source}, up to {MAX_PROMPT_TOKENS} tokens each), {tokens} positions x {} vocabulary entries, computed in {kind:?} ({written:?}; max |logit| \
             {scale:.2}); criterion: {criterion} {value:.3e} {verdict} {bound:.3e}; relative RMS {rms:.3e}, \
             top-1 agreement {top1:.3}",
            ids.len(),
            want.size()[1]
        ),
        max_abs_diff: diff,
        tolerance: bound,
        passed,
        relative_rms_diff: Some(rms),
        top1_agreement: Some(top1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compute_kind_falls_back_to_f32_then_to_none() {
        let gb = 1_000_000_000u64;
        // 135 M: f64 needs 1.7 GB, f32 1.1 GB.
        assert_eq!(compute_kind(135_000_000, Some(16 * gb)), Some(Kind::Double));
        assert_eq!(compute_kind(135_000_000, None), Some(Kind::Double));
        assert_eq!(
            compute_kind(135_000_000, Some(12 * gb / 10)),
            Some(Kind::Float)
        );
        assert_eq!(compute_kind(135_000_000, Some(gb / 2)), None);
        // 7 B: f32 needs 31.3 GB, never f64.
        assert_eq!(
            compute_kind(7_000_000_000, Some(64 * gb)),
            Some(Kind::Float)
        );
        assert_eq!(compute_kind(7_000_000_000, Some(16 * gb)), None);
        assert_eq!(memory_needed(135_000_000, Kind::Double), 1_688_000_000);
    }

    #[test]
    fn reads_available_memory_on_linux() {
        if cfg!(target_os = "linux") {
            assert!(available_memory().is_some_and(|b| b > 0));
        }
    }
}
