//! Research protocol skills (seed 001 §9): ablation, curriculum, ensemble,
//! standard (N trials from the HPO skill) and the reproducibility manifest.
//!
//! Seed names are kept: `generate_configs(base, param, values)`,
//! `build_stages({"easy": ..., "hard": ...})`,
//! `generate_diverse_configs(base, n_members)`,
//! `compute_merge_weights(members, "inverse_loss")`,
//! `create_manifest(spec, state, experiment_id)` / `save_manifest`.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::contracts::hpo::{HPOInput, Suggestion};
use crate::contracts::orchestrator::{AblationResult, ExperimentState};
use crate::experiment::{ExperimentSpec, Weighting};
use crate::trial::TrialConfig;

// ------------------------------------------------------------------ Ablation

/// One measured ablation point (to build the results table).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AblationMeasurement {
    /// The trial.
    pub trial_id: u32,
    /// The varied parameters and their values (`lora_rank` = 8).
    #[serde(default)]
    pub values: Map<String, Value>,
    /// Whether this is the baseline (the base config unchanged).
    #[serde(default)]
    pub baseline: bool,
    /// The metric (none if the trial failed).
    pub metric: Option<f64>,
}

/// Input of `protocol_ablation`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct AblationInput {
    /// The config every point starts from.
    #[serde(default)]
    pub base_config: TrialConfig,
    /// The parameter to vary: a `TrialConfig` field (`lora_rank`) or a seed 003
    /// dotted path (`optimizer.learning_rate`, `lora.r`).
    #[serde(default)]
    pub param: Option<String>,
    /// Its values.
    #[serde(default)]
    pub values: Vec<Value>,
    /// Several parameters at once: every combination (product) is a point.
    #[serde(default)]
    pub grid: BTreeMap<String, Vec<Value>>,
    /// A seed 003 preset: `lora_rank` (all variants) or `lora_rank:r32`.
    #[serde(default)]
    pub preset: Option<String>,
    /// Add the base config as the baseline point when no value equals it (default true).
    #[serde(default = "yes")]
    pub include_baseline: bool,
    /// Measured points: when given, the results table (and plot) is built.
    #[serde(default)]
    pub results: Vec<AblationMeasurement>,
    /// Name of the metric in the table and plot.
    #[serde(default = "default_metric")]
    pub metric: String,
    /// Higher metric values are better (default: lower is better, like a loss).
    #[serde(default)]
    pub higher_is_better: bool,
    /// Write each generated config as `<output_dir>/<label>.json` and the plot there.
    #[serde(default)]
    pub output_dir: Option<String>,
}

fn yes() -> bool {
    true
}
fn default_metric() -> String {
    "eval_loss".into()
}

/// One generated ablation point.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AblationPoint {
    /// The config (trial ids 1, 2, ... in order).
    pub trial_config: TrialConfig,
    /// The varied parameters and their values.
    pub values: Map<String, Value>,
    /// `lora_rank=8`, or `baseline`.
    pub label: String,
    /// Whether this is the baseline.
    pub baseline: bool,
}

/// Output `data` of `protocol_ablation`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
pub struct AblationOutput {
    /// The generated points.
    pub configs: Vec<AblationPoint>,
    /// The results table, when `results` were given.
    pub table: Option<AblationResult>,
    /// The table as markdown, when `results` were given.
    pub table_markdown: Option<String>,
    /// Files written (configs, plot).
    pub written: Vec<String>,
}

// ---------------------------------------------------------------- Curriculum

/// How a curriculum orders data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum DifficultyMeasure {
    /// Characters of the rendered sample (prompt + response).
    #[default]
    Length,
    /// Whitespace-separated words.
    Words,
    /// The base model's mean token loss on the sample: what the model finds
    /// hard, not what is long. Scores come from the eval skill (`per_sample`);
    /// the orchestrator computes them, a direct caller passes `scores`.
    Loss,
}

/// Input of `protocol_curriculum`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct CurriculumInput {
    /// Named files in order, as in seed 001: `{"easy": "e.jsonl", "hard": "h.jsonl"}`
    /// (kept in the given order).
    #[serde(default)]
    pub files: Map<String, Value>,
    /// Or: one JSONL dataset split by difficulty into `num_stages` stages.
    #[serde(default)]
    pub dataset_path: Option<String>,
    /// Stages of a difficulty split (default 3).
    #[serde(default)]
    pub num_stages: Option<u32>,
    /// The difficulty score of a split.
    #[serde(default)]
    pub measure: DifficultyMeasure,
    /// Epochs per stage: one number for all, or one per stage (default 1).
    #[serde(default)]
    pub epochs: Vec<f64>,
    /// Folder for the stage files of a difficulty split (default: beside the dataset).
    #[serde(default)]
    pub output_dir: Option<String>,
    /// Difficulty per sample of `dataset_path` (its non-empty lines, in order),
    /// required by `measure: loss`: the eval skill's `sample_losses` for the
    /// base model (`null`: no target token, scored as easiest).
    #[serde(default)]
    pub scores: Vec<Option<f64>>,
}

/// One curriculum stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CurriculumStage {
    /// 0-based position.
    pub index: u32,
    /// Name (`easy`, `stage_1`).
    pub name: String,
    /// The stage's data.
    pub dataset_path: String,
    /// Epochs of this stage.
    pub epochs: f64,
    /// Samples in the stage.
    pub samples: u64,
    /// Lowest and highest difficulty score in the stage (difficulty splits).
    #[serde(default)]
    pub difficulty: Option<(f64, f64)>,
}

/// Output `data` of `protocol_curriculum`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
pub struct CurriculumOutput {
    /// The stages, easiest first; stage k trains from stage k-1's adapter.
    pub stages: Vec<CurriculumStage>,
}

// ------------------------------------------------------------------ Ensemble

/// One trained ensemble member.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct EnsembleMember {
    /// The trial.
    pub trial_id: u32,
    /// Its eval loss (none if it failed: weight 0).
    pub eval_loss: Option<f64>,
    /// Its adapter, when trained.
    #[serde(default)]
    pub adapter_path: Option<String>,
    /// Its weight (filled by the skill).
    #[serde(default)]
    pub weight: f64,
}

/// Input of `protocol_ensemble`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EnsembleInput {
    /// The config members start from.
    #[serde(default)]
    pub base_config: TrialConfig,
    /// Members to generate (`n_members` in seed 001).
    #[serde(default = "default_members")]
    pub n_members: u32,
    /// Trained members: when given, their merge weights are computed.
    #[serde(default)]
    pub members: Vec<EnsembleMember>,
    /// `inverse_loss` | `uniform` | `softmax`.
    #[serde(default)]
    pub weighting: Weighting,
    /// Softmax temperature (in loss units).
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    /// Seed of the diversity draws.
    #[serde(default)]
    pub seed: Option<u64>,
}

fn default_members() -> u32 {
    3
}
fn default_temperature() -> f64 {
    1.0
}

impl Default for EnsembleInput {
    fn default() -> Self {
        Self {
            base_config: TrialConfig::default(),
            n_members: default_members(),
            members: Vec::new(),
            weighting: Weighting::default(),
            temperature: default_temperature(),
            seed: None,
        }
    }
}

/// One generated member config and how it differs from the base.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct EnsembleConfig {
    /// The config.
    pub trial_config: TrialConfig,
    /// What was varied, in words.
    pub rationale: String,
}

/// Output `data` of `protocol_ensemble`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
pub struct EnsembleOutput {
    /// Diverse member configs (when `n_members` > 0 and no members were given).
    pub configs: Vec<EnsembleConfig>,
    /// The members with their normalised weights (when members were given).
    pub members: Vec<EnsembleMember>,
}

// ------------------------------------------------------------------ Standard

/// Input of `protocol_standard`: N independent trials drawn from the HPO skill.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StandardInput {
    /// Trials to draw.
    pub n_trials: u32,
    /// The HPO input (search space, strategy, seed, base config, budget).
    pub hpo: HPOInput,
}

/// Output `data` of `protocol_standard`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
pub struct StandardOutput {
    /// The trials, as the HPO skill proposed them.
    pub suggestions: Vec<Suggestion>,
    /// Why fewer than asked, if so.
    pub exhausted_reason: Option<String>,
}

// ----------------------------------------------------------- Reproducibility

/// A hashed file (dataset, tokenizer, chat template, model weights).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct FileHash {
    /// The path as given.
    pub path: String,
    /// SHA-256 (64 hex characters); for a folder, over relative paths and bytes, sorted.
    pub sha256: String,
    /// Bytes hashed.
    pub bytes: u64,
}

/// The base model's identity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
pub struct ModelIdentity {
    /// As named in the spec (folder or hub id).
    pub name: String,
    /// Hub revision (commit) when known from the local cache (`refs/main` or the snapshot folder).
    pub revision: Option<String>,
    /// SHA-256 over the weight files (`*.safetensors`, `*.bin`, `*.gguf`) and `config.json`.
    pub weights: Option<FileHash>,
    /// `tokenizer.json` (or `tokenizer.model`).
    pub tokenizer: Option<FileHash>,
    /// SHA-256 of the chat template text (`tokenizer_config.json`'s `chat_template` or `chat_template.jinja`).
    pub chat_template_sha256: Option<String>,
}

/// Where and with what the experiment ran.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
pub struct Environment {
    /// Crate name -> version (every lora-trainer crate).
    pub crate_versions: BTreeMap<String, String>,
    /// Git commit of the source tree (none outside a checkout).
    pub git_commit: Option<String>,
    /// Whether the tree had uncommitted changes.
    pub git_dirty: Option<bool>,
    /// libtorch version (from `$LIBTORCH/build-version` or torch's `version.py`).
    pub libtorch_version: Option<String>,
    /// Host name.
    pub host: Option<String>,
    /// `os-arch`.
    pub platform: String,
    /// Logical CPUs.
    pub cpus: u32,
}

/// The reproducibility manifest (seed 001 §9).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
pub struct Manifest {
    /// Manifest format version.
    pub manifest_version: u32,
    /// The experiment id.
    pub experiment_id: String,
    /// When it was created (RFC 3339, UTC).
    pub created_at: String,
    /// Every seed: `protocol` (HPO) and `trial_<id>` for each trial.
    pub seeds: BTreeMap<String, u64>,
    /// The resolved hyper-parameters of the base config.
    pub base_config: TrialConfig,
    /// The resolved hyper-parameters of every trial (by trial id).
    pub trials: BTreeMap<String, TrialConfig>,
    /// Training data (SHA-256).
    pub dataset: Option<FileHash>,
    /// Held-out data (SHA-256).
    pub eval_dataset: Option<FileHash>,
    /// Base model revision / hash, tokenizer and chat-template hash.
    pub base_model: ModelIdentity,
    /// Versions, commit, libtorch, host.
    pub environment: Environment,
    /// The spec as run.
    pub spec: Value,
    /// SHA-256 of the canonical JSON of everything above (except itself).
    pub fingerprint: String,
}

/// Input of `reproducibility_manifest`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ManifestInput {
    /// `create` (from spec + state), `verify` (an existing manifest against the current files and environment).
    #[serde(default)]
    pub action: ManifestAction,
    /// The experiment (create).
    #[serde(default)]
    pub spec: Option<ExperimentSpec>,
    /// The orchestrator's state (create; trial seeds and configs).
    #[serde(default)]
    pub state: Option<ExperimentState>,
    /// Experiment id (create; default: the spec's experiment name).
    #[serde(default)]
    pub experiment_id: Option<String>,
    /// Where the manifest is written (create) or read (verify).
    pub path: String,
}

/// What `reproducibility_manifest` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum ManifestAction {
    /// Build and save a manifest.
    #[default]
    Create,
    /// Load a manifest and re-check it.
    Verify,
}

/// One difference found by verify.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Drift {
    /// What drifted (`dataset.sha256`, `environment.git_commit`).
    pub field: String,
    /// In the manifest.
    pub expected: String,
    /// Now.
    pub actual: String,
    /// Whether it breaks reproducibility (data, model, seeds) or only notes a change (host, versions).
    pub severity: DriftSeverity,
}

/// How much a drift matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DriftSeverity {
    /// The results can differ (data, model, tokenizer, template, the manifest itself).
    Breaking,
    /// The environment differs (host, commit, versions): results may differ slightly.
    Warning,
}

/// Output `data` of `reproducibility_manifest`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
pub struct ManifestOutput {
    /// The manifest written or read.
    pub manifest: Manifest,
    /// Where it is.
    pub path: String,
    /// Verify: what drifted (empty when everything matches).
    pub drift: Vec<Drift>,
    /// Verify: true when nothing breaking drifted.
    pub reproducible: bool,
}
