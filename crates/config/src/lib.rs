//! LoRAConfigSkill: model facts, memory estimate, smart defaults, compatibility, preflight.
//!
//! Filled by its own issue; see docs/ARCHITECTURE.md.
