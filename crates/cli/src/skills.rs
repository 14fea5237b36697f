//! The registry of real skills the binary ships. Each area registers its
//! skill here; nothing else in the CLI names a concrete skill type.

use lora_skill::SkillRegistry;

/// Every skill this binary can run.
pub fn registry() -> SkillRegistry {
    #[allow(unused_mut)] // Areas add their skills below.
    let mut reg = SkillRegistry::new();
    reg.register(lora_dataset::DatasetSkill::default()); // dataset_analyze
    lora_artifact::register(&mut reg); // artifact_store, artifact_registry
    lora_config::register(&mut reg); // lora_config, preflight
    lora_merge::register(&mut reg); // merge
    reg.register(lora_training::TrainingSkill); // training
    reg.register(lora_eval::EvalSkill); // eval
    reg.register(lora_hpo::HpoSkill); // hpo
    lora_protocols::register(&mut reg); // protocol_ablation, _curriculum, _ensemble, _standard, reproducibility_manifest
    // lora_trainer: composes every skill above through the registry (keep it last).
    let orchestrator = lora_orchestrator::LoRATrainerSkill::new(reg.clone());
    reg.register(orchestrator);
    reg
}
