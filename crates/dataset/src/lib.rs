//! DatasetSkill: dataset profiling, prompt rendering and splits.
//!
//! Filled by its own issue; see docs/ARCHITECTURE.md.
