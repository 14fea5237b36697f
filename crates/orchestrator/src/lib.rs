//! LoRATrainerSkill: runs whole experiments by composing skills from a registry.
//!
//! The orchestrator never names a concrete skill. It takes every skill from a
//! [`lora_skill::SkillRegistry`] by the names in
//! [`lora_spec::contracts::names`] and calls them with the typed contracts of
//! [`lora_spec::contracts`], so the same loop runs the real skills in the
//! binary and deterministic test doubles ([`testing`]) in tests.
//!
//! The loop (seed 001 §1):
//! 1. profile the dataset (`dataset_analyze`);
//! 2. configuration and preflight (`lora_config`, `preflight`, and the
//!    training skill's dry run): a spec that cannot run stops here with the
//!    preflight's errors, before any tensor;
//! 3. trials: the search strategy (`hpo`) or the protocol (ablation,
//!    curriculum, ensemble) proposes, `training` trains, `eval` evaluates,
//!    `artifact_store` versions the adapter; a trial whose predicted cost
//!    exceeds what is left of the budget is not started; the loop stops on
//!    the stop rules and says which;
//! 4. the best adapter is merged and exported (`merge`).
//!
//! Every event goes to a journal in the experiment folder, rewritten
//! atomically ([`journal`]); a run killed at any moment resumes from it
//! without redoing finished work ([`LoRATrainerInput::resume`]). Reports
//! (markdown, HTML, SVG plots, the state as JSON) are written at the end.
//!
//! [`LoRATrainerInput::resume`]: lora_spec::contracts::orchestrator::LoRATrainerInput::resume

#![cfg_attr(test, allow(clippy::unwrap_used))] // Tests may unwrap; library code may not.

mod data;
mod error;
pub mod journal;
mod ledger;
mod lock;
pub mod manifest;
mod plan;
mod protocols;
pub mod report;
mod runner;
mod skill;
pub mod testing;
#[cfg(test)]
mod tests;

pub use error::OrchestratorError;
pub use journal::{Fault, FaultKind, JOURNAL_FILE};
pub use lock::LOCK_FILE;
pub use runner::{
    DIVERGENCE_STREAK, Options, Orchestrator, describe_config, experiment_dir, fmt_hours,
    fmt_metric, sanitize,
};
pub use skill::LoRATrainerSkill;
