//! The Input and Output types of every skill (seed 001), kept here so that
//! callers (the orchestrator, agents, tests with doubles) use a skill through
//! the registry without linking the crate that implements it.
//!
//! Field names of seed 001 are the contract: they are kept, and added to.
//! Each skill's crate implements `lora_skill::Skill` with these types.

pub mod artifact;
pub mod config;
pub mod dataset;
pub mod eval;
pub mod hpo;
pub mod merge;
pub mod orchestrator;
pub mod protocols;
pub mod training;

/// Registry names of the skills, so that callers never spell them twice.
pub mod names {
    /// `DatasetSkill`.
    pub const DATASET: &str = "dataset_analyze";
    /// `LoRAConfigSkill`.
    pub const CONFIG: &str = "lora_config";
    /// `TrainingSkill`.
    pub const TRAINING: &str = "training";
    /// `EvalSkill`.
    pub const EVAL: &str = "eval";
    /// `HPOSkill`.
    pub const HPO: &str = "hpo";
    /// `ArtifactSkill`.
    pub const ARTIFACT: &str = "artifact_store";
    /// `MergeSkill`.
    pub const MERGE: &str = "merge";
    /// `LoRATrainerSkill` (the orchestrator).
    pub const ORCHESTRATOR: &str = "lora_trainer";
    /// Ablation protocol: configs varying one parameter or a grid; results table and plot.
    pub const ABLATION: &str = "protocol_ablation";
    /// Curriculum protocol: ordered stages from named files or by difficulty.
    pub const CURRICULUM: &str = "protocol_curriculum";
    /// Ensemble protocol: diverse member configs and merge weights.
    pub const ENSEMBLE: &str = "protocol_ensemble";
    /// Standard protocol: N independent trials drawn from the HPO skill.
    pub const STANDARD: &str = "protocol_standard";
    /// Reproducibility manifest: create and verify.
    pub const MANIFEST: &str = "reproducibility_manifest";
}
