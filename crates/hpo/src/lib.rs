//! HPOSkill: random, TPE, bandit and ASHA suggestions under a budget.
//!
//! Filled by its own issue; see docs/ARCHITECTURE.md.
