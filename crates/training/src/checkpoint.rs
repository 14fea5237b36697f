//! Training checkpoints: adapter (PEFT format), optimiser moments, schedule,
//! RNG policy, data position and the configuration hash, in one folder
//! written under a temporary name and renamed into place (a crash leaves the
//! previous checkpoint intact, never a torn one).
//!
//! ```text
//! checkpoints/checkpoint-00000040/
//!   adapter_config.json, adapter_model.safetensors   (loadable by PEFT as is)
//!   optimizer.safetensors                              (exp_avg.* / exp_avg_sq.*)
//!   trainer_state.json                                 (TrainerState)
//! ```
//!
//! RNG: libtorch's generator (LoRA dropout) is re-seeded from `(seed, step)`
//! at the start of every optimiser step, and the data order is a function of
//! `(seed, epoch)`, so the RNG state at a step boundary is fully described by
//! the seed and the position stored here; resuming reproduces it exactly.

use std::path::{Path, PathBuf};

use lora_engine::LlamaModel;
use lora_engine::lora::{self, LoraSpec};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::Tensor;

use crate::error::{Result, TrainError};
use crate::optim::{AdamW, AdamWConfig};
use crate::schedule::Schedule;
pub use lora_spec::contracts::training::EvalPoint;

/// The state file in a checkpoint folder.
pub const STATE_FILE: &str = "trainer_state.json";
/// The optimiser state file in a checkpoint folder.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// Checkpoint folder name prefix.
pub const CHECKPOINT_PREFIX: &str = "checkpoint-";
/// Version of [`TrainerState`]'s layout.
pub const STATE_VERSION: u32 = 1;

/// Where the data stream stands at a step boundary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DataPosition {
    /// Current epoch (0-based).
    pub epoch: u64,
    /// Micro-batches of this epoch already consumed.
    pub batch_in_epoch: u64,
}

/// Everything besides tensors that a resumed run needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Layout version.
    pub version: u32,
    /// sha256 of the trajectory-defining configuration (see [`config_hash`]).
    pub config_hash: String,
    /// Optimiser steps done.
    pub step: u64,
    /// Data position after `step` steps.
    pub data: DataPosition,
    /// Seed; the dropout RNG is re-seeded from `(seed, step)` each step.
    pub seed: u64,
    /// The learning-rate schedule.
    pub schedule: Schedule,
    /// AdamW hyper-parameters.
    pub adamw: AdamWConfig,
    /// The LoRA layout.
    pub lora: LoraSpec,
    /// Training loss of every step so far.
    pub losses: Vec<f64>,
    /// Evaluations so far.
    pub eval_history: Vec<EvalPoint>,
    /// Tokens processed so far.
    pub tokens_seen: u64,
    /// Wall seconds of training so far (device time).
    pub train_seconds: f64,
}

/// sha256 of the canonical JSON of `value` (the trajectory-defining settings).
pub fn config_hash<T: Serialize>(value: &T) -> String {
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    hex::encode(Sha256::digest(&bytes))
}

/// The folder of the checkpoint after `step` steps under `dir`.
pub fn checkpoint_dir(dir: &Path, step: u64) -> PathBuf {
    dir.join(format!("{CHECKPOINT_PREFIX}{step:08}"))
}

/// Writes a checkpoint of `model`'s adapters, `opt` and `state` into
/// `dir/checkpoint-<step>` atomically; keeps the newest `keep` checkpoints.
pub fn save(
    dir: &Path,
    model: &LlamaModel,
    opt: &AdamW,
    state: &TrainerState,
    base_model: Option<&str>,
    keep: usize,
) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
    let target = checkpoint_dir(dir, state.step);
    let tmp = dir.join(format!(
        ".{CHECKPOINT_PREFIX}{:08}.tmp-{}",
        state.step,
        std::process::id()
    ));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| TrainError::io(&tmp, e))?;
    lora::save_peft(model, &state.lora, base_model, &tmp)?;
    lora_engine::weights::save_safetensors(&tmp.join(OPTIMIZER_FILE), &opt.state_tensors())?;
    let sp = tmp.join(STATE_FILE);
    lora_skill::fs::write_json_atomic(&sp, state).map_err(|e| TrainError::io(&sp, e))?;
    replace_dir(&tmp, &target)?;
    prune(dir, keep)?;
    Ok(target)
}

/// Publishes `tmp` as `target`, replacing an older `target` (same step saved again).
pub fn replace_dir(tmp: &Path, target: &Path) -> Result<()> {
    if target.exists() {
        let old = target.with_extension(format!("old-{}", std::process::id()));
        std::fs::rename(target, &old).map_err(|e| TrainError::io(target, e))?;
        lora_skill::fs::publish_dir(tmp, target).map_err(|e| TrainError::io(target, e))?;
        std::fs::remove_dir_all(&old).map_err(|e| TrainError::io(&old, e))?;
    } else {
        lora_skill::fs::publish_dir(tmp, target).map_err(|e| TrainError::io(target, e))?;
    }
    Ok(())
}

/// Checkpoint folders under `dir`, oldest first.
pub fn list(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix(CHECKPOINT_PREFIX)?.parse().ok()?;
            e.path()
                .join(STATE_FILE)
                .is_file()
                .then(|| (step, e.path()))
        })
        .collect();
    out.sort();
    out
}

fn prune(dir: &Path, keep: usize) -> Result<()> {
    let all = list(dir);
    let n = all.len().saturating_sub(keep.max(1));
    for (_, p) in all.into_iter().take(n) {
        std::fs::remove_dir_all(&p).map_err(|e| TrainError::io(&p, e))?;
    }
    Ok(())
}

/// Reads a checkpoint's state and refuses it when its configuration hash
/// differs from `expected_hash`.
pub fn read_state(ckpt: &Path, expected_hash: &str) -> Result<TrainerState> {
    let sp = ckpt.join(STATE_FILE);
    let bytes = std::fs::read(&sp).map_err(|e| {
        TrainError::checkpoint(
            ckpt,
            format!("cannot read {STATE_FILE}: {e}"),
            "resume_from must be a checkpoint-N folder written by the trainer",
        )
    })?;
    let state: TrainerState = serde_json::from_slice(&bytes).map_err(|e| {
        TrainError::checkpoint(
            ckpt,
            format!("{STATE_FILE} is damaged: {e}"),
            "resume from an older checkpoint",
        )
    })?;
    if state.version != STATE_VERSION {
        return Err(TrainError::checkpoint(
            ckpt,
            format!(
                "state version {} (this trainer writes {STATE_VERSION})",
                state.version
            ),
            "resume with the trainer version that wrote it",
        ));
    }
    if state.config_hash != expected_hash {
        return Err(TrainError::checkpoint(
            ckpt,
            format!(
                "it was written for another configuration or dataset (hash {} != {})",
                &state.config_hash[..12.min(state.config_hash.len())],
                &expected_hash[..12.min(expected_hash.len())]
            ),
            "resume with exactly the trial_config, base model and dataset of the original run, or start a new run",
        ));
    }
    Ok(state)
}

/// Loads the adapter of `ckpt` onto `model` (replacing its adapters).
pub fn load_adapter(ckpt: &Path, model: &mut LlamaModel) -> Result<LoraSpec> {
    Ok(lora::load_peft(model, ckpt)?)
}

/// Loads the optimiser moments of `ckpt` into `opt`, with `step` steps done.
pub fn load_optimizer(ckpt: &Path, opt: &mut AdamW, step: u64) -> Result<()> {
    let p = ckpt.join(OPTIMIZER_FILE);
    let tensors = Tensor::read_safetensors(&p).map_err(|e| {
        TrainError::checkpoint(
            ckpt,
            format!("cannot read {OPTIMIZER_FILE}: {e}"),
            "resume from an older checkpoint",
        )
    })?;
    opt.load_state(tensors, step).map_err(|e| {
        TrainError::checkpoint(
            ckpt,
            e.to_string(),
            "the checkpoint does not match the adapter layout",
        )
    })
}
