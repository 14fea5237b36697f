//! DatasetSkill: dataset profiling, prompt rendering and splits.
//!
//! - [`analyze()`] profiles a dataset in one streaming pass (jsonl, json array,
//!   csv, parquet, `datasets.save_to_disk` folders and hub-style shard folders):
//!   record layout, invalid rows with line numbers, missing/empty targets,
//!   exact duplicates after whitespace normalisation, optional near-duplicates,
//!   token-length statistics (exact with a tokenizer, else characters / 4).
//! - [`render`] turns records into training text with prompt/response spans
//!   (alpaca, ChatML, Llama 3, or the model's own Jinja chat template rendered
//!   as transformers' `apply_chat_template` does) and token-level label masks,
//!   and checks that every sample ends in an unmasked end-of-sequence token.
//! - [`split`] writes a deterministic, seeded train/eval split atomically.
//! - [`DatasetSkill`] exposes the profile as the `dataset_analyze` skill.

#![cfg_attr(test, allow(clippy::unwrap_used))] // Tests may unwrap; library code may not.

pub mod analyze;
mod columnar;
pub mod error;
pub mod minhash;
pub mod records;
pub mod render;
pub mod source;
pub mod split;
pub mod tokens;
pub mod value;

use std::path::PathBuf;

use async_trait::async_trait;
use lora_skill::{Skill, SkillContext, SkillError, StepResult};
use lora_spec::contracts::dataset::{DatasetAnalyzeInput, DatasetProfile};

pub use analyze::{Analysis, AnalyzeEnv, analyze};
pub use error::DatasetError;
pub use value::Val;

/// The `dataset_analyze` skill (seed 001 §2).
#[derive(Debug, Clone, Default)]
pub struct DatasetSkill {
    /// The Hugging Face hub cache for tokenizer lookups (default: `HF_HUB_CACHE` / `HF_HOME`).
    pub hf_cache: Option<PathBuf>,
}

#[async_trait]
impl Skill for DatasetSkill {
    type Input = DatasetAnalyzeInput;
    type Output = DatasetProfile;

    fn name(&self) -> &'static str {
        lora_spec::contracts::names::DATASET
    }

    fn description(&self) -> &'static str {
        "Profile a training dataset (jsonl, json, csv, parquet, Hugging Face folders): record layout, \
         invalid rows with line numbers, missing or empty targets, duplicates, token-length \
         percentiles (exact with a tokenizer), and optionally check prompt masks and EOS with a template."
    }

    async fn run(
        &self,
        input: DatasetAnalyzeInput,
        ctx: &SkillContext,
    ) -> Result<StepResult<DatasetProfile>, SkillError> {
        let ctx2 = ctx.clone();
        let env = AnalyzeEnv {
            base_dir: ctx.work_dir().to_path_buf(),
            hf_cache: self.hf_cache.clone(),
            read: source::ReadOptions::default(),
        };
        let started = std::time::Instant::now();
        let handle = tokio::task::spawn_blocking(
            move || -> Result<DatasetProfile, DatasetError> {
                ctx2.info(format!("profiling {}", input.dataset_path));
                let mut progress: Option<lora_skill::Progress> = None;
                let mut analysis = analyze(&input, &env, &mut |done, total| {
                    if ctx2.is_cancelled() {
                        return Err(DatasetError::Cancelled);
                    }
                    let p = progress.get_or_insert_with(|| {
                        ctx2.progress("profile dataset", Some(total), "bytes")
                    });
                    p.update(done, None, &[]);
                    Ok(())
                })?;
                if let Some(p) = progress.take() {
                    p.finish(format!("{} rows", analysis.profile.total_samples));
                }
                if let Some(choice) = input.template {
                    let check = render::check_sample_rows(
                        choice,
                        analysis.tokenizer.as_ref(),
                        &analysis.sample,
                        input.max_examples as usize,
                    )?;
                    if check.ends_with_unmasked_eos < check.rendered {
                        analysis.profile.warnings.push(format!(
                        "{} of {} rendered samples do not end in an unmasked end-of-sequence token: the model may never stop",
                        check.rendered - check.ends_with_unmasked_eos,
                        check.rendered
                    ));
                    }
                    if check.zero_trainable > 0 {
                        analysis.profile.warnings.push(format!(
                            "{} rendered samples have no trainable token",
                            check.zero_trainable
                        ));
                    }
                    analysis.profile.render_check = Some(check);
                }
                for w in &analysis.profile.warnings {
                    ctx2.warn(w.clone());
                }
                Ok(analysis.profile)
            },
        );
        let profile = handle
            .await
            .map_err(|e| SkillError::backend(format!("the profiling task failed: {e}")))?
            .map_err(SkillError::from)?;
        let secs = started.elapsed().as_secs_f64();
        let text = format!(
            "{} samples ({} format, {} layout), {} invalid, {} duplicates, avg {:.1} / max {} tokens ({}) in {:.2}s",
            profile.total_samples,
            profile.format_detected,
            profile.record_format.as_str(),
            profile.invalid_rows,
            profile.duplicates_found,
            profile.avg_tokens,
            profile.max_tokens,
            profile.token_counter.kind,
            secs
        );
        Ok(StepResult::new(profile)
            .with_text(text)
            .with_meta("seconds", secs))
    }
}

#[cfg(test)]
mod tests;
