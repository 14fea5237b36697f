//! Which trial comes next, by protocol: the search strategy (standard) or the
//! protocol's generated plan (ablation points, curriculum stages, ensemble
//! members), and what a protocol does after its trials.

use lora_skill::SkillError;
use lora_spec::contracts::hpo::TrialRecord;
use lora_spec::contracts::orchestrator::{StopReason, TrialRole, TrialSummary};
use lora_spec::contracts::training::TrainingRequest;
use lora_spec::experiment::ProtocolType;
use lora_spec::trial::TrialConfig;

use crate::protocols;
use crate::runner::Run;

/// A trial about to be planned.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedTrial {
    /// The full configuration (trial_id set).
    pub config: TrialConfig,
    /// Its role in the protocol.
    pub role: TrialRole,
    /// Why.
    pub rationale: String,
    /// The data it trains on, when not the experiment's (curriculum stages).
    pub dataset_path: Option<String>,
}

/// What the planner says.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// Run this trial.
    Trial(Box<PlannedTrial>),
    /// Nothing more to run.
    Done(StopReason, String),
}

/// The number of trials a protocol plans (for the overall progress bar).
pub(crate) async fn plan_len(run: &mut Run<'_>) -> Result<usize, SkillError> {
    match run.spec().protocol.kind {
        ProtocolType::Standard => Ok(run.spec().max_trials as usize),
        _ => Ok(protocols::plan(run).await?.len()),
    }
}

/// The next trial of the experiment (or of the dry run's plan).
pub(crate) async fn next(run: &mut Run<'_>) -> Result<Next, SkillError> {
    let id = if run.is_dry_run() {
        run.planned().len() as u32 + 1
    } else {
        run.ledger().next_id()
    };
    match run.spec().protocol.kind {
        ProtocolType::Standard => next_search(run, id).await,
        _ => {
            let plan = protocols::plan(run).await?;
            let index = (id - 1) as usize;
            match plan.into_iter().nth(index) {
                Some(mut t) => {
                    t.config.trial_id = id;
                    Ok(Next::Trial(Box::new(t)))
                }
                None => Ok(Next::Done(
                    StopReason::PlanCompleted,
                    format!(
                        "the {} plan ran all its {index} trial(s)",
                        crate::runner::protocol_name(run.spec().protocol.kind)
                    ),
                )),
            }
        }
    }
}

async fn next_search(run: &mut Run<'_>, id: u32) -> Result<Next, SkillError> {
    let mut history: Vec<TrialRecord> = run.hpo_history();
    if run.is_dry_run() {
        // Planned trials count as running, so the strategy does not propose them again.
        history.extend(run.planned().iter().map(|t| {
            let mut r = t.record.clone();
            r.status = "running".into();
            r
        }));
    }
    let started = if run.is_dry_run() {
        run.planned().len() as u32
    } else {
        run.ledger().trials.len() as u32
    };
    let remaining = run.spec().max_trials.saturating_sub(started);
    let Some((suggested, rationale)) = run.suggest(history, remaining).await? else {
        return Ok(Next::Done(
            StopReason::SearchExhausted,
            "the search strategy has nothing left to propose".into(),
        ));
    };
    let config = overlay(&run.base_config(id), &suggested, id);
    Ok(Next::Trial(Box::new(PlannedTrial {
        config,
        role: TrialRole::Search,
        rationale,
        dataset_path: None,
    })))
}

/// The base config with the searched hyper-parameters of `suggested` on top
/// (the search space's fields; everything else is the spec's), normalised so
/// that the micro-batch divides the batch.
pub fn overlay(base: &TrialConfig, suggested: &TrialConfig, id: u32) -> TrialConfig {
    let mut c = base.clone();
    c.trial_id = id;
    c.method = suggested.method;
    c.learning_rate = suggested.learning_rate;
    c.lora_rank = suggested.lora_rank;
    c.lora_alpha = suggested.lora_alpha;
    c.lora_dropout = suggested.lora_dropout;
    c.target_modules = suggested.target_modules.clone();
    c.batch_size = suggested.batch_size;
    c.warmup_ratio = suggested.warmup_ratio;
    c.use_rslora = suggested.use_rslora;
    if suggested.method != base.method {
        c.quantization_bits = suggested.quantization_bits;
    }
    fit_micro_batch(&mut c);
    c.normalized()
}

/// Makes `micro_batch_size` divide `batch_size` (the largest divisor not above it).
pub fn fit_micro_batch(c: &mut TrialConfig) {
    let b = c.batch_size.max(1);
    let m = c.micro_batch_size.clamp(1, b);
    c.micro_batch_size = (1..=m).rev().find(|d| b.is_multiple_of(*d)).unwrap_or(1);
}

/// Adds the adapter a trial starts from (curriculum stage k: stage k-1's).
pub(crate) fn with_init_adapter(
    run: &Run<'_>,
    t: &TrialSummary,
    input: TrainingRequest,
) -> Result<TrainingRequest, SkillError> {
    protocols::with_init_adapter(run, t, input)
}

/// The artifact version a trial's adapter derives from (curriculum: the previous stage).
pub(crate) fn parent_version(run: &Run<'_>, t: &TrialSummary) -> Option<String> {
    protocols::parent_version(run, t)
}

/// What a protocol does once its trials are over (ablation table, ensemble combination).
pub(crate) async fn epilogue(run: &mut Run<'_>) -> Result<(), SkillError> {
    protocols::epilogue(run).await
}

/// A summary of a planned trial (dry run).
pub fn summary_of(t: &PlannedTrial, predicted: Option<f64>, steps: u64) -> TrialSummary {
    TrialSummary {
        record: TrialRecord {
            config: t.config.clone(),
            objective: None,
            status: "planned".into(),
            ..TrialRecord::default()
        },
        trial_id: t.config.trial_id,
        role: t.role.clone(),
        rationale: t.rationale.clone(),
        predicted_gpu_hours: predicted,
        training_steps: steps,
        final_loss: None,
        eval: None,
        adapter_path: None,
        output_dir: None,
        artifact: None,
        failure: None,
        diverged: false,
        dollars: None,
        resumed: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_keeps_the_spec_fields_and_fixes_the_micro_batch() {
        let base = TrialConfig {
            max_steps: Some(30),
            max_seq_length: 128,
            micro_batch_size: 4,
            seed: 9,
            ..Default::default()
        };
        let s = TrialConfig {
            learning_rate: 1e-3,
            lora_rank: 8,
            batch_size: 6,
            max_steps: None,
            max_seq_length: 2048,
            ..Default::default()
        };
        let c = overlay(&base, &s, 3);
        assert_eq!(c.trial_id, 3);
        assert_eq!((c.learning_rate, c.lora_rank, c.batch_size), (1e-3, 8, 6));
        assert_eq!((c.max_steps, c.max_seq_length, c.seed), (Some(30), 128, 9));
        assert_eq!(c.micro_batch_size, 3);
        assert_eq!(c.gradient_accumulation, 2);
        assert!(c.check().is_empty(), "{:?}", c.check());
    }
}
