//! LoRAConfigSkill: model facts, memory estimate, smart defaults,
//! compatibility checks and preflight (seed 001 §3, seed 002).
//!
//! - [`model`]: a base model's architecture from its config.json (local
//!   folder, the HF cache offline, or the built-in [`catalog`]) with the exact
//!   parameter count;
//! - [`memory`]: peak training memory with a breakdown, parameterised by
//!   [`memory::MemoryCoefficients`] so measured peaks can calibrate it, and
//!   what would make a setup fit;
//! - [`device`] and [`throughput`]: the device table and time per step from
//!   LoRA's FLOPs per token;
//! - [`defaults`]: smart defaults for a complete `TrialConfig`;
//! - [`compat`]: the compatibility engine (findings with codes and hints);
//! - [`preflight`]: all of it for one trial or an experiment spec, in seed
//!   002's response shape.
//!
//! No libtorch: everything here is arithmetic over config files. The
//! formulas are documented in `docs/MEMORY.md`.

pub mod catalog;
pub mod compat;
pub mod dataset;
pub mod defaults;
pub mod device;
mod error;
pub mod memory;
pub mod model;
pub mod preflight;
pub mod skill;
pub mod throughput;

pub use dataset::DatasetInfo;
pub use error::ConfigError;
pub use memory::{MemoryCoefficients, MemoryReport, Recipe, TrainSetup, estimate_memory, fit_plan};
pub use model::{ModelFacts, ResolveOptions, resolve_model};
pub use preflight::{PreflightOptions, PreflightRequest, preflight, preflight_spec};
pub use skill::{LoRAConfigSkill, PreflightSkill, register, run_preflight, suggest};
pub use throughput::{StepEstimate, ThroughputCoefficients, estimate_step};
