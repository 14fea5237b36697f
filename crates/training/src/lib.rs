//! TrainingSkill: SFT training of LoRA adapters on the engine.
//!
//! Filled by its own issue; see docs/ARCHITECTURE.md.
