//! ArtifactSkill contract (seed 001 §7): storing adapters as numbered versions
//! and querying, pruning and checking the store.
//!
//! Two skills share these types:
//! - [`names::ARTIFACT`](crate::contracts::names::ARTIFACT) (`artifact_store`) takes seed 001's
//!   [`ArtifactStoreInput`] and returns [`ArtifactStoreOutput`] (`version`, `adapter_hash`,
//!   `stored_path`, plus facts about the stored copy);
//! - [`ARTIFACT_REGISTRY`] (`artifact_registry`) takes a flat [`ArtifactRegistryInput`]
//!   (`op`: list, filter, get, best, delete, gc, verify, plus the fields each
//!   uses; flat so that LLM tool APIs, which want an object at the root, take
//!   it) and returns an [`ArtifactRegistryOutput`] tagged with the same `op`.
//!
//! A version is named `v1`, `v2`, ... within its experiment and never reused,
//! even after a delete. References to a version (`reference`, `parent`) are
//! `vN`, `latest` or `best:<metric>` within the input's experiment, or the same
//! prefixed with another experiment's id and a slash (`sweep-2/v3`).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::BTreeMap;

/// Registry name of the query/maintenance skill over the artifact store.
pub const ARTIFACT_REGISTRY: &str = "artifact_registry";

/// The experiment id used when an input names none.
pub const DEFAULT_EXPERIMENT: &str = "default";

/// The store folder used when an input names none (relative to the working directory).
pub const DEFAULT_STORE_ROOT: &str = "artifacts";

fn default_experiment() -> String {
    DEFAULT_EXPERIMENT.to_string()
}

/// Input of `artifact_store` (seed 001 `ArtifactStoreInput`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ArtifactStoreInput {
    /// Adapter folder to store (every regular file under it, recursively).
    pub adapter_path: String,
    /// Trial that produced it.
    pub trial_id: u32,
    /// Metrics to index (eval_loss, ...); finite numbers only.
    #[serde(default)]
    pub metrics: BTreeMap<String, f64>,
    /// Free-form tags (used by `filter` and `best`).
    #[serde(default)]
    pub tags: Vec<String>,
    /// The experiment the version belongs to; versions are numbered per
    /// experiment. Letters, digits, `.`, `_` and `-`, at most 128 characters.
    #[serde(default = "default_experiment")]
    pub experiment_id: String,
    /// The version this adapter was trained from (`v2`, `other-exp/v5`), if any.
    #[serde(default)]
    pub parent: Option<String>,
    /// The store folder (default `artifacts`, relative to the working directory).
    #[serde(default)]
    pub store_root: Option<String>,
    /// Free-form JSON kept with the version (the trial's config, the dataset hash, ...).
    #[serde(default)]
    pub metadata: Map<String, Value>,
}

impl ArtifactStoreInput {
    /// An input for `adapter_path` from `trial_id` with every optional field at its default.
    pub fn new(adapter_path: impl Into<String>, trial_id: u32) -> Self {
        Self {
            adapter_path: adapter_path.into(),
            trial_id,
            metrics: BTreeMap::new(),
            tags: Vec::new(),
            experiment_id: default_experiment(),
            parent: None,
            store_root: None,
            metadata: Map::new(),
        }
    }
}

/// Output `data` of `artifact_store` (seed 001 §7).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ArtifactStoreOutput {
    /// `v1`, `v2`, ...
    pub version: String,
    /// SHA-256 of the adapter folder (64 hex characters; framing in the `lora-artifact` docs).
    pub adapter_hash: String,
    /// Where the artifact lives in the store: a read-only folder with the adapter's files.
    pub stored_path: String,
    /// The experiment the version belongs to.
    pub experiment_id: String,
    /// The trial that produced it.
    pub trial_id: u32,
    /// When the version was registered (RFC 3339, UTC).
    pub created_at: String,
    /// True when this exact request (same adapter, trial, metrics, tags, parent and
    /// metadata) was already stored: the existing version is returned, no new one is made.
    pub reused: bool,
    /// Files in the adapter.
    pub files: u64,
    /// Bytes in the adapter.
    pub bytes: u64,
    /// Bytes actually written to the store (0 when every file was already there).
    pub bytes_written: u64,
}

/// One stored version as the registry reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ArtifactVersion {
    /// The experiment.
    pub experiment_id: String,
    /// `v1`, `v2`, ...
    pub version: String,
    /// The trial that produced it.
    pub trial_id: u32,
    /// SHA-256 of the adapter folder.
    pub adapter_hash: String,
    /// The stored adapter folder.
    pub stored_path: String,
    /// Indexed metrics.
    pub metrics: BTreeMap<String, f64>,
    /// Tags, sorted.
    pub tags: Vec<String>,
    /// The parent version (`experiment/vN`), if any.
    pub parent: Option<String>,
    /// When it was registered (RFC 3339, UTC).
    pub created_at: String,
    /// Files in the adapter.
    pub files: u64,
    /// Bytes in the adapter.
    pub bytes: u64,
    /// Free-form JSON stored with it.
    #[serde(default)]
    pub metadata: Map<String, Value>,
}

/// Whether a smaller or a larger metric is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum MetricGoal {
    /// Smaller is better (losses, perplexity).
    #[default]
    Min,
    /// Larger is better (accuracy, BLEU).
    Max,
}

/// Conditions a version must meet to be listed (all must hold).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct VersionFilter {
    /// Only this experiment (every experiment when absent).
    #[serde(default)]
    pub experiment_id: Option<String>,
    /// Versions carrying every one of these tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// Versions carrying at least one of these tags (ignored when empty).
    #[serde(default)]
    pub any_tags: Vec<String>,
    /// Only this trial.
    #[serde(default)]
    pub trial_id: Option<u32>,
    /// Lower bounds on metrics (inclusive): `{"accuracy": 0.8}`; versions without the metric are dropped.
    #[serde(default)]
    pub metric_min: BTreeMap<String, f64>,
    /// Upper bounds on metrics (inclusive): `{"eval_loss": 0.5}`; versions without the metric are dropped.
    #[serde(default)]
    pub metric_max: BTreeMap<String, f64>,
}

/// What is wrong with a stored file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// A blob the index references is gone.
    MissingBlob,
    /// A blob's bytes no longer hash to its name.
    CorruptBlob,
    /// A file of a stored adapter folder is gone.
    MissingFile,
    /// A file of a stored adapter folder differs from what was stored.
    CorruptFile,
    /// A stored adapter folder holds a file that was not stored.
    UnexpectedFile,
    /// The index disagrees with itself (the file list does not hash to the adapter hash).
    IndexMismatch,
}

/// One problem found by `verify`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct VerifyProblem {
    /// What is wrong.
    pub kind: ProblemKind,
    /// The damaged file (absolute path).
    pub path: String,
    /// The SHA-256 it should have, when known.
    pub expected_sha256: Option<String>,
    /// The SHA-256 it has, when it could be read.
    pub actual_sha256: Option<String>,
    /// The versions affected (`experiment/vN`).
    pub versions: Vec<String>,
    /// One sentence for people.
    pub message: String,
}

/// What `verify` checked and found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
pub struct VerifyReport {
    /// True when nothing is wrong.
    pub ok: bool,
    /// Versions whose files were checked.
    pub versions_checked: u64,
    /// Distinct stored adapters checked.
    pub adapters_checked: u64,
    /// Distinct blobs re-hashed.
    pub blobs_checked: u64,
    /// Bytes read and hashed.
    pub bytes_hashed: u64,
    /// Every problem, by path.
    pub problems: Vec<VerifyProblem>,
}

/// What `gc` removed (or would remove, on a dry run).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
pub struct GcReport {
    /// Nothing was removed; the report says what would be.
    pub dry_run: bool,
    /// Stored adapter folders no version references.
    pub adapters_removed: u64,
    /// Blobs no stored adapter references.
    pub blobs_removed: u64,
    /// Leftover temporary files and folders of interrupted stores.
    pub temp_removed: u64,
    /// Bytes freed (blob and temporary bytes; adapter folders are hard links to blobs).
    pub bytes_freed: u64,
    /// Every removed path.
    pub removed: Vec<String>,
}

/// An operation of `artifact_registry`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RegistryOp {
    /// Versions (of `experiment_id`, or of all), oldest first, narrowed by the filter fields.
    List,
    /// Same as `list` (kept as its own name for callers that think in filters).
    Filter,
    /// One version by `reference`.
    Get,
    /// The version with the best value of `metric` (`goal` min or max), among the filtered ones.
    Best,
    /// Removes the version `reference` from the index (its files go at the next `gc`).
    Delete,
    /// Removes files no version references and leftovers of interrupted stores.
    Gc,
    /// Re-hashes stored files (of `reference`, or of every version) and reports corruption by path.
    Verify,
}

/// Input of `artifact_registry`: one operation on the store. Fields an
/// operation does not use are ignored; a field it needs is an error when missing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ArtifactRegistryInput {
    /// The operation.
    pub op: RegistryOp,
    /// The store folder (default `artifacts`, relative to the working directory).
    #[serde(default)]
    pub store_root: Option<String>,
    /// The experiment: list/filter/best look only at it (all experiments when
    /// absent); get/delete/verify look a bare reference up in it (default `default`).
    #[serde(default)]
    pub experiment_id: Option<String>,
    /// get, delete (required), verify (optional): `v3`, `latest`, `best:eval_loss`,
    /// `best:accuracy:max`, or any of them after an experiment id and a slash.
    #[serde(default)]
    pub reference: Option<String>,
    /// best (required): the metric to rank by.
    #[serde(default)]
    pub metric: Option<String>,
    /// best: whether smaller (`min`, default) or larger (`max`) is better.
    #[serde(default)]
    pub goal: MetricGoal,
    /// list/filter/best: only versions carrying every one of these tags.
    #[serde(default)]
    pub tags: Vec<String>,
    /// list/filter/best: only versions carrying at least one of these tags (ignored when empty).
    #[serde(default)]
    pub any_tags: Vec<String>,
    /// list/filter/best: only this trial.
    #[serde(default)]
    pub trial_id: Option<u32>,
    /// list/filter/best: inclusive lower bounds on metrics (`{"accuracy": 0.8}`).
    #[serde(default)]
    pub metric_min: BTreeMap<String, f64>,
    /// list/filter/best: inclusive upper bounds on metrics (`{"eval_loss": 0.5}`).
    #[serde(default)]
    pub metric_max: BTreeMap<String, f64>,
    /// gc: report what would go without removing anything.
    #[serde(default)]
    pub dry_run: bool,
    /// gc: seconds to wait for running stores to finish before giving up (default 60).
    #[serde(default)]
    pub wait_seconds: Option<f64>,
}

impl ArtifactRegistryInput {
    /// An input for `op` with every other field at its default.
    pub fn new(op: RegistryOp) -> Self {
        Self {
            op,
            store_root: None,
            experiment_id: None,
            reference: None,
            metric: None,
            goal: MetricGoal::Min,
            tags: Vec::new(),
            any_tags: Vec::new(),
            trial_id: None,
            metric_min: BTreeMap::new(),
            metric_max: BTreeMap::new(),
            dry_run: false,
            wait_seconds: None,
        }
    }

    /// The filter fields as a [`VersionFilter`].
    pub fn filter(&self) -> VersionFilter {
        VersionFilter {
            experiment_id: self.experiment_id.clone(),
            tags: self.tags.clone(),
            any_tags: self.any_tags.clone(),
            trial_id: self.trial_id,
            metric_min: self.metric_min.clone(),
            metric_max: self.metric_max.clone(),
        }
    }
}

/// Output `data` of `artifact_registry`, tagged with the operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ArtifactRegistryOutput {
    /// The versions, oldest first.
    List {
        /// The versions.
        versions: Vec<ArtifactVersion>,
    },
    /// The version asked for.
    Get {
        /// The version.
        version: ArtifactVersion,
    },
    /// The best version, none when no version has the metric.
    Best {
        /// The version.
        version: Option<ArtifactVersion>,
        /// How many versions had the metric.
        candidates: u64,
    },
    /// The matching versions, oldest first.
    Filter {
        /// The versions.
        versions: Vec<ArtifactVersion>,
    },
    /// The version that was removed from the index.
    Delete {
        /// The removed version.
        deleted: ArtifactVersion,
    },
    /// What garbage collection removed.
    Gc {
        /// The report.
        report: GcReport,
    },
    /// What verification found.
    Verify {
        /// The report.
        report: VerifyReport,
    },
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests: a panic is the failure report.
mod tests {
    use super::*;

    #[test]
    fn seed_store_input_still_parses_with_defaults() {
        let v = serde_json::json!({
            "adapter_path": "outputs/trial_1/adapter",
            "trial_id": 1,
            "metrics": {"eval_loss": 0.42},
            "tags": ["lora", "instruction"]
        });
        let i: ArtifactStoreInput = serde_json::from_value(v).unwrap();
        assert_eq!(i.experiment_id, DEFAULT_EXPERIMENT);
        assert_eq!(i.metrics["eval_loss"], 0.42);
        assert!(i.parent.is_none() && i.store_root.is_none());
        assert_eq!(i, {
            let mut n = ArtifactStoreInput::new("outputs/trial_1/adapter", 1);
            n.metrics.insert("eval_loss".into(), 0.42);
            n.tags = vec!["lora".into(), "instruction".into()];
            n
        });
    }

    #[test]
    fn registry_input_is_flat_and_strict() {
        let i: ArtifactRegistryInput = serde_json::from_value(serde_json::json!({
            "op": "best", "metric": "eval_loss", "goal": "max", "tags": ["lora"]
        }))
        .unwrap();
        assert_eq!(i.op, RegistryOp::Best);
        assert_eq!(i.goal, MetricGoal::Max);
        assert_eq!(i.filter().tags, vec!["lora".to_string()]);
        let f: ArtifactRegistryInput = serde_json::from_value(serde_json::json!({
            "op": "filter", "metric_max": {"eval_loss": 0.5}
        }))
        .unwrap();
        assert_eq!(f.filter().metric_max["eval_loss"], 0.5);
        let bad = serde_json::from_value::<ArtifactRegistryInput>(serde_json::json!({
            "op": "get", "reference": "v1", "refrence": "v2"
        }));
        assert!(bad.is_err());
        let bad =
            serde_json::from_value::<ArtifactRegistryInput>(serde_json::json!({"op": "compact"}));
        assert!(bad.is_err());
        let out = serde_json::to_value(ArtifactRegistryOutput::Gc {
            report: GcReport::default(),
        })
        .unwrap();
        assert_eq!(out["op"], "gc");
    }
}
