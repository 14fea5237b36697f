//! The contract every lora-trainer skill implements.
//!
//! Skill authors implement the typed [`Skill`] trait: a JSON-schema'd `Input`,
//! a JSON-schema'd `Output`, and an async `run`. Every `Skill` is also an
//! [`ErasedSkill`] (object-safe, JSON in and JSON out), which is what the
//! [`SkillRegistry`] stores and what the orchestrator, the CLI and LLM agents
//! call. A skill reports progress and events through its [`SkillContext`] and
//! never prints.
//!
//! This crate is deliberately small and has no heavy dependencies: every
//! other crate depends on it.

mod context;
mod error;
pub mod fs;
mod registry;
mod result;

pub use context::{
    CancelToken, Event, EventSink, Level, MemorySink, NullSink, Progress, SkillContext,
};
pub use error::{ErrorKind, SkillError};
pub use registry::{ErasedSkill, SkillInfo, SkillRegistry, decode, schema_of};
pub use result::StepResult;

use async_trait::async_trait;
use schemars::JsonSchema;
use serde::{Serialize, de::DeserializeOwned};

/// A unit of work with a typed, JSON-schema'd contract.
///
/// The `name` is stable: it is the key in the registry, the tool name in the
/// schema export and the command in `lora-trainer skill NAME`.
#[async_trait]
pub trait Skill: Send + Sync + 'static {
    /// What the skill takes. Field doc comments become the schema's descriptions.
    type Input: DeserializeOwned + JsonSchema + Send + 'static;
    /// The `data` part of the skill's [`StepResult`].
    type Output: Serialize + JsonSchema + Send + 'static;

    /// Stable machine name, `snake_case` (for example `dataset_analyze`).
    fn name(&self) -> &'static str;

    /// One or two sentences for people and for LLM tool descriptions.
    fn description(&self) -> &'static str;

    /// Whether the skill needs an accelerator to run at a useful speed.
    /// Skills that can fall back to the CPU still say `true` here if they hold tensors.
    fn requires_gpu(&self) -> bool {
        false
    }

    /// Runs the skill. Long work must poll `ctx.cancelled()` and report progress
    /// through `ctx`; it must not print.
    async fn run(
        &self,
        input: Self::Input,
        ctx: &SkillContext,
    ) -> Result<StepResult<Self::Output>, SkillError>;
}
