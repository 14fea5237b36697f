//! The experiment spec language and the contract types of every skill.
//!
//! - `experiment`: the declarative experiment document (seed 000, YAML or
//!   JSON) and seed 001's flat `ExperimentSpec`;
//! - `trial`: `TrialConfig` (the one place hyper-parameter defaults live)
//!   and `SearchSpace`;
//! - `training_config`: seed 003's nested `TrainingConfig`, config files,
//!   dotted overrides and ablation presets;
//! - `contracts`: every skill's Input and Output;
//! - `load`: parsing with errors that name the field, the file and the line.
//!
//! No libtorch, no I/O beyond reading the spec file.

pub mod contracts;
pub mod experiment;
mod issue;
pub mod load;
pub mod reference;
pub mod training_config;
pub mod trial;

pub use experiment::{ExperimentFile, ExperimentSpec};
pub use issue::{Issue, SpecError};
pub use trial::{LrScheduler, PeftMethod, SearchSpace, TrialConfig};
