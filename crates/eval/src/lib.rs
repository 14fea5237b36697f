//! EvalSkill: eval loss, perplexity, delta against the base, generation metrics.
//!
//! Filled by its own issue; see docs/ARCHITECTURE.md.
