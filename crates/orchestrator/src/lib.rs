//! LoRATrainerSkill: runs whole experiments by composing skills from a registry.
//!
//! Filled by its own issue; see docs/ARCHITECTURE.md.
