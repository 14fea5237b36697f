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
//!   rounding of each stored `W + s·B·A`. Larger models run in f32 and the
//!   bound becomes relative to the largest logit.
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
use lora_skill::SkillError;
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

/// Token ids of the prompts (the base's tokenizer; a fixed id ramp without one).
fn prompt_ids(base_dir: &Path, prompts: &[String], vocab: i64) -> Vec<Vec<i64>> {
    let texts: Vec<String> = if prompts.is_empty() {
        DEFAULT_PROMPTS.iter().map(|s| s.to_string()).collect()
    } else {
        prompts.to_vec()
    };
    if let Ok(tok) = TextTokenizer::from_dir(base_dir) {
        let ids: Vec<Vec<i64>> = texts
            .iter()
            .filter_map(|t| tok.encode(t, true).ok())
            .filter(|ids| !ids.is_empty() && ids.iter().all(|&i| i < vocab))
            .map(|mut ids| {
                ids.truncate(64);
                ids
            })
            .collect();
        if !ids.is_empty() {
            return ids;
        }
    }
    vec![(0..16).map(|i| (i * 7 + 3) % vocab).collect()]
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

/// Why the engine cannot run this base and adapter, if it cannot (the caller
/// then falls back to the weight check): a Llama-family config and a plain
/// LoRA adapter (no DoRA, no replaced modules, no per-layer patterns) are
/// what it runs.
pub fn engine_unsupported(base_dir: &Path, adapter_dir: &Path) -> Option<String> {
    if let Err(e) = lora_engine::ModelConfig::from_file(&base_dir.join("config.json")) {
        return Some(e.to_string());
    }
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

/// Runs the prompts through base + adapter (unmerged) and through the written
/// model (`merged_dir`: an HF folder, for GGUF the importer's output) and
/// compares the logits.
pub fn validate_logits(
    merged_dir: &Path,
    base_dir: &Path,
    adapter_dir: &Path,
    written: Written,
    prompts: &[String],
    tolerance: Option<f64>,
) -> Result<MergeValidation, SkillError> {
    // Both sides compute in f64 when it fits in memory, so that the difference
    // is the written file's, not f32 compute noise (which alone reaches ~1e-4
    // on a 30-layer model with logits near 40); above 1 B parameters in f32,
    // with the f32 bound relative to the largest logit.
    let params = lora_engine::ModelConfig::from_file(&base_dir.join("config.json"))
        .map(|c| c.num_parameters())
        .map_err(backend)?;
    let kind = if params <= 1_000_000_000 {
        Kind::Double
    } else {
        Kind::Float
    };
    let mut reference = load(base_dir, kind)?;
    lora::load_peft(&mut reference, adapter_dir).map_err(backend)?;
    let ids = prompt_ids(base_dir, prompts, reference.config.vocab_size as i64);
    let want = logits(&reference, &ids)?;
    drop(reference);
    let merged = load(merged_dir, kind)?;
    let got = logits(&merged, &ids)?;
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
            "logits: the written model against base + adapter (unmerged) on libtorch, {} prompt(s), \
             {tokens} positions x {} vocabulary entries, computed in {kind:?} ({written:?}; max |logit| \
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
