//! `LoRATrainerSkill`: the orchestrator as a registered skill (`lora_trainer`).

use async_trait::async_trait;
use lora_skill::{Skill, SkillContext, SkillError, SkillRegistry, StepResult};
use lora_spec::contracts::names;
use lora_spec::contracts::orchestrator::{ExperimentState, LoRATrainerInput};

use crate::runner::Orchestrator;

/// Runs a whole experiment (seed 001 §1) with the skills of a registry.
#[derive(Debug, Clone)]
pub struct LoRATrainerSkill {
    orchestrator: Orchestrator,
}

impl LoRATrainerSkill {
    /// The skill over `registry` (which must hold the dataset, config, training,
    /// eval, hpo, artifact and merge skills; the protocol skills for those protocols).
    pub fn new(registry: SkillRegistry) -> Self {
        Self {
            orchestrator: Orchestrator::new(registry),
        }
    }

    /// The skill over an orchestrator with options.
    pub fn from_orchestrator(orchestrator: Orchestrator) -> Self {
        Self { orchestrator }
    }
}

#[async_trait]
impl Skill for LoRATrainerSkill {
    type Input = LoRATrainerInput;
    type Output = ExperimentState;

    fn name(&self) -> &'static str {
        names::ORCHESTRATOR
    }

    fn description(&self) -> &'static str {
        "Runs a whole LoRA experiment: profiles the data, plans a configuration with preflight, \
         searches hyper-parameters under a device-hour budget (train, evaluate, version each trial), \
         stops on the spec's rules, merges and exports the best adapter; journaled and resumable."
    }

    fn requires_gpu(&self) -> bool {
        true
    }

    async fn run(
        &self,
        input: LoRATrainerInput,
        ctx: &SkillContext,
    ) -> Result<StepResult<ExperimentState>, SkillError> {
        self.orchestrator.run(&input, ctx).await
    }
}
