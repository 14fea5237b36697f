//! ArtifactSkill contract (seed 001 §7).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Input of `artifact_store` (seed 001 `ArtifactStoreInput`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ArtifactStoreInput {
    /// Adapter folder to store.
    pub adapter_path: String,
    /// Trial that produced it.
    pub trial_id: u32,
    /// Metrics to index (eval_loss, ...).
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
    /// Free-form tags.
    #[serde(default)]
    pub tags: Vec<String>,
}

/// Output `data` of `artifact_store` (seed 001 §7).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ArtifactStoreOutput {
    /// `v1`, `v2`, ...
    pub version: String,
    /// SHA-256 of the adapter folder (64 hex characters).
    pub adapter_hash: String,
    /// Where the artifact lives in the store.
    pub stored_path: String,
}
