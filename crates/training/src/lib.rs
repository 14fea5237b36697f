//! TrainingSkill: SFT training of LoRA adapters on the engine.
//!
//! The pieces, usable on their own:
//! - [`optim`]: AdamW with decoupled weight decay and checkpointable state;
//!   global gradient-norm clipping.
//! - [`schedule`]: warm-up then cosine / linear / constant learning rates.
//! - [`batch`]: truncation, seeded epoch order, length grouping, packing with
//!   per-sample positions and block-diagonal masks, collation with shifted targets.
//! - [`loss`]: chunked cross-entropy with a closed-form gradient, normalised
//!   over the target tokens of the effective batch.
//! - [`step`]: gradient accumulation over micro-batches.
//! - [`data`]: rows → rendered prompts (dataset crate) → tokens with masks.
//! - [`checkpoint`]: atomic checkpoints and resume checks.
//! - [`trainer`]: the loop (eval, checkpoints, divergence stop, metrics.jsonl).
//! - [`skill`]: [`TrainingSkill`], the `training` skill.

pub mod batch;
pub mod bench;
pub mod checkpoint;
pub mod data;
pub mod error;
pub mod loss;
pub mod optim;
pub mod schedule;
pub mod skill;
pub mod step;
pub mod trainer;

#[cfg(test)]
mod testutil;
#[cfg(test)]
mod trainer_tests;

pub use error::{Result, TrainError};
pub use skill::TrainingSkill;
