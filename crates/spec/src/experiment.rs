//! The experiment document (seed 000, YAML or JSON) and seed 001's flat
//! `ExperimentSpec`.
//!
//! A user writes an [`ExperimentFile`]: `version`, `dataset`, `config` (a
//! [`TrialConfig`]), optional `search_space`, `protocol`, `resources` and
//! `output`. [`ExperimentFile::to_spec`] turns it into seed 001's
//! [`ExperimentSpec`] (goal, dataset_path, base_model, max_trials,
//! budget_gpu_hours, methods, stop_metric, stop_threshold, stop_patience),
//! which keeps every other section too, so the orchestrator needs only the
//! spec. Both are validated with field paths; [`load_experiment`] adds lines.

use std::collections::BTreeMap;
use std::path::Path;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::contracts::config::Task;
use crate::contracts::dataset::FileFormat;
use crate::contracts::hpo::Strategy;
use crate::contracts::merge::{ExportFormat, GgufQuantization};
use crate::load::{Document, Syntax};
use crate::trial::{PeftMethod, SearchSpace, TrialConfig};
use crate::{Issue, SpecError};

/// The spec language version this build reads.
pub const SPEC_VERSION: &str = "1.0";

/// The experiment document a user writes (seed 000).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExperimentFile {
    /// Spec language version; must be "1.0".
    pub version: String,
    /// A name for the experiment (used for its folder and artifact ids).
    #[serde(default = "default_name")]
    pub experiment_name: String,
    /// What the experiment is for, in words (seed 001's `goal`).
    #[serde(default)]
    pub goal: String,
    /// What the fine-tune is for.
    #[serde(default)]
    pub task: Task,
    /// The training data.
    pub dataset: DatasetSection,
    /// The base model and the fixed hyper-parameters (a trial's starting point).
    pub config: TrialConfig,
    /// HPO ranges; defaults apply when absent.
    #[serde(default)]
    pub search_space: Option<SearchSpace>,
    /// How trials are chosen and when to stop.
    #[serde(default)]
    pub protocol: ProtocolSection,
    /// Hardware.
    #[serde(default)]
    pub resources: ResourcesSection,
    /// What to do with the best adapter.
    #[serde(default)]
    pub output: OutputSection,
}

fn default_name() -> String {
    "experiment".into()
}

/// How records are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum RecordFormat {
    /// Decide from the fields.
    #[default]
    Auto,
    /// instruction / input / output.
    Alpaca,
    /// conversations with from/value.
    Sharegpt,
    /// messages with role/content (OpenAI style).
    Messages,
    /// prompt / completion.
    PromptCompletion,
    /// Raw text (`text` field).
    Text,
    /// question / schema / SQL.
    TextToSql,
}

/// `dataset:` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DatasetSection {
    /// Training data file or folder (relative to the spec file).
    pub path: String,
    /// Record layout (seed 000's `format`, e.g. `alpaca`).
    #[serde(default)]
    pub format: RecordFormat,
    /// File format (`auto` decides by extension and content).
    #[serde(default)]
    pub file_format: FileFormat,
    /// Held-out data; when absent, `eval_fraction` of the training data is split off (seeded).
    #[serde(default)]
    pub eval_path: Option<String>,
    /// Fraction held out when there is no `eval_path`.
    #[serde(default = "default_eval_fraction")]
    pub eval_fraction: f64,
}

fn default_eval_fraction() -> f64 {
    0.1
}

/// Research protocol (seed 000 §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum ProtocolType {
    /// N independent trials chosen by HPO.
    #[default]
    Standard,
    /// Vary one parameter (or a grid) while fixing the others.
    Ablation,
    /// Train on easy data first, then hard.
    Curriculum,
    /// Train diverse adapters and combine them.
    Ensemble,
}

/// Ablation settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct AblationSection {
    /// The parameter to vary (a `TrialConfig` field, e.g. `lora_rank`).
    #[serde(default)]
    pub param: Option<String>,
    /// Its values.
    #[serde(default)]
    pub values: Vec<serde_json::Value>,
    /// Several parameters at once: every combination is a trial.
    #[serde(default)]
    pub grid: BTreeMap<String, Vec<serde_json::Value>>,
    /// A seed 003 preset, `name:variant` or just `name` for all variants (e.g. `lora_rank`).
    #[serde(default)]
    pub preset: Option<String>,
}

/// One curriculum stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StageSection {
    /// Stage name (`easy`, `hard`).
    pub name: String,
    /// Data of this stage.
    pub path: String,
    /// Epochs of this stage.
    #[serde(default = "one")]
    pub epochs: f64,
}

fn one() -> f64 {
    1.0
}

/// Curriculum settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct CurriculumSection {
    /// Explicit stages, in order.
    #[serde(default)]
    pub stages: Vec<StageSection>,
    /// Or split the dataset by difficulty into this many stages.
    #[serde(default)]
    pub num_stages: Option<u32>,
    /// The difficulty of a split: `length` (characters, the default), `words`,
    /// or `loss` (the base model's mean token loss per sample, measured by
    /// the eval skill before the first stage).
    #[serde(default)]
    pub measure: crate::contracts::protocols::DifficultyMeasure,
}

/// How ensemble members are weighted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum Weighting {
    /// Proportional to 1 / eval loss.
    #[default]
    InverseLoss,
    /// Equal weights.
    Uniform,
    /// softmax(-loss / temperature).
    Softmax,
}

/// How adapters are combined (PEFT `add_weighted_adapter` names).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum Combination {
    /// Weighted sum of the low-rank factors.
    #[default]
    Linear,
    /// Concatenate the factors (rank adds up).
    Cat,
    /// Weighted sum of the deltas, re-factored to rank r by SVD.
    Svd,
    /// TIES merging.
    Ties,
    /// DARE with linear combination.
    DareLinear,
    /// DARE with TIES sign election.
    DareTies,
}

/// Ensemble settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EnsembleSection {
    /// Number of members.
    #[serde(default = "default_members")]
    pub members: u32,
    /// Member weighting.
    #[serde(default)]
    pub weighting: Weighting,
    /// Softmax temperature.
    #[serde(default = "one")]
    pub temperature: f64,
    /// Combination method.
    #[serde(default)]
    pub combination: Combination,
    /// Density for TIES/DARE.
    #[serde(default = "default_density")]
    pub density: f64,
}

fn default_members() -> u32 {
    3
}

fn default_density() -> f64 {
    0.5
}

impl Default for EnsembleSection {
    fn default() -> Self {
        Self {
            members: default_members(),
            weighting: Weighting::default(),
            temperature: 1.0,
            combination: Combination::default(),
            density: default_density(),
        }
    }
}

/// `protocol:` section: trials, budget (seed 000 §4) and stopping (seed 001).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProtocolSection {
    /// Protocol.
    #[serde(rename = "type", default)]
    pub kind: ProtocolType,
    /// Maximum number of trials (seed 001's `max_trials`).
    #[serde(default = "default_trials")]
    pub trials: u32,
    /// HPO strategy.
    #[serde(default)]
    pub strategy: Strategy,
    /// Maximum aggregate device-hours.
    #[serde(default = "default_budget")]
    pub budget_gpu_hours: f64,
    /// Maximum estimated cost in dollars (needs `cost_per_device_hour`).
    #[serde(default)]
    pub budget_dollars: Option<f64>,
    /// Dollars per device-hour by device name (`cpu`, `a100-80gb`, ...).
    #[serde(default)]
    pub cost_per_device_hour: BTreeMap<String, f64>,
    /// Divergence guard: a trial whose loss exceeds this (or is NaN) fails.
    #[serde(default)]
    pub early_stop_loss: Option<f64>,
    /// The metric that decides the best trial (lower is better).
    #[serde(default = "default_metric")]
    pub stop_metric: String,
    /// Stop once the best `stop_metric` is at or below this.
    #[serde(default)]
    pub stop_threshold: Option<f64>,
    /// Stop after this many trials without improvement.
    #[serde(default)]
    pub stop_patience: Option<u32>,
    /// HPO seed (trial seeds derive from it).
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Ablation settings (type: ablation).
    #[serde(default)]
    pub ablation: Option<AblationSection>,
    /// Curriculum settings (type: curriculum).
    #[serde(default)]
    pub curriculum: Option<CurriculumSection>,
    /// Ensemble settings (type: ensemble).
    #[serde(default)]
    pub ensemble: Option<EnsembleSection>,
}

fn default_trials() -> u32 {
    5
}
fn default_budget() -> f64 {
    10.0
}
fn default_metric() -> String {
    "eval_loss".into()
}
fn default_seed() -> u64 {
    42
}

impl Default for ProtocolSection {
    fn default() -> Self {
        Self {
            kind: ProtocolType::default(),
            trials: default_trials(),
            strategy: Strategy::default(),
            budget_gpu_hours: default_budget(),
            budget_dollars: None,
            cost_per_device_hour: BTreeMap::new(),
            early_stop_loss: None,
            stop_metric: default_metric(),
            stop_threshold: None,
            stop_patience: None,
            seed: default_seed(),
            ablation: None,
            curriculum: None,
            ensemble: None,
        }
    }
}

/// Which device trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum Device {
    /// CUDA when present, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// The first CUDA device.
    Cuda,
}

/// `resources:` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct ResourcesSection {
    /// Device.
    #[serde(default)]
    pub device: Device,
    /// Accelerator memory to plan for, in GB (default: the device's).
    #[serde(default)]
    pub vram_limit_gb: Option<f64>,
    /// Accelerator model for preflight and cost (`rtx-4090`, `a100-80gb`, `cpu`, ...).
    #[serde(default)]
    pub gpu_type: Option<String>,
    /// Number of accelerators.
    #[serde(default)]
    pub gpus: Option<u32>,
    /// CPU threads for libtorch (default: all cores).
    #[serde(default)]
    pub threads: Option<u32>,
}

/// `output:` section (seed 000 §1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OutputSection {
    /// Where the experiment folder goes (relative to the spec file).
    #[serde(default = "default_out_dir")]
    pub dir: String,
    /// Export format of the merged model.
    #[serde(default)]
    pub export_format: ExportFormat,
    /// Merge the best adapter into the base at the end.
    #[serde(default = "yes")]
    pub merge_after: bool,
    /// GGUF tensor type (GGUF only).
    #[serde(default)]
    pub gguf_quantization: GgufQuantization,
    /// Compare the merged model with base + adapter.
    #[serde(default = "yes")]
    pub validate_after_merge: bool,
}

fn default_out_dir() -> String {
    "runs".into()
}
fn yes() -> bool {
    true
}

impl Default for OutputSection {
    fn default() -> Self {
        Self {
            dir: default_out_dir(),
            export_format: ExportFormat::default(),
            merge_after: true,
            gguf_quantization: GgufQuantization::default(),
            validate_after_merge: true,
        }
    }
}

/// Seed 001's `ExperimentSpec`: the orchestrator's input, flat for the
/// seed's fields, with the document's other sections kept.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExperimentSpec {
    /// What the experiment is for.
    #[serde(default)]
    pub goal: String,
    /// Training data.
    pub dataset_path: String,
    /// Base model folder, hub id or known name.
    pub base_model: String,
    /// Maximum number of trials.
    #[serde(default = "default_trials")]
    pub max_trials: u32,
    /// Maximum aggregate device-hours.
    #[serde(default = "default_budget")]
    pub budget_gpu_hours: f64,
    /// PEFT methods to try.
    #[serde(default = "default_methods")]
    pub methods: Vec<PeftMethod>,
    /// The metric that decides the best trial (lower is better).
    #[serde(default = "default_metric")]
    pub stop_metric: String,
    /// Stop once the best metric is at or below this.
    #[serde(default)]
    pub stop_threshold: Option<f64>,
    /// Stop after this many trials without improvement.
    #[serde(default)]
    pub stop_patience: Option<u32>,
    /// Experiment name.
    #[serde(default = "default_name")]
    pub experiment_name: String,
    /// What the fine-tune is for.
    #[serde(default)]
    pub task: Task,
    /// Record layout of the data.
    #[serde(default)]
    pub dataset_format: RecordFormat,
    /// File format of the data.
    #[serde(default)]
    pub dataset_file_format: FileFormat,
    /// Held-out data.
    #[serde(default)]
    pub eval_dataset_path: Option<String>,
    /// Fraction held out when there is no eval data.
    #[serde(default = "default_eval_fraction")]
    pub eval_fraction: f64,
    /// The starting trial (fixed hyper-parameters).
    #[serde(default)]
    pub base_config: TrialConfig,
    /// HPO ranges.
    #[serde(default)]
    pub search_space: SearchSpace,
    /// Protocol, budget in dollars, divergence guard, strategy, seeds.
    #[serde(default)]
    pub protocol: ProtocolSection,
    /// Hardware.
    #[serde(default)]
    pub resources: ResourcesSection,
    /// Merge and export.
    #[serde(default)]
    pub output: OutputSection,
}

fn default_methods() -> Vec<PeftMethod> {
    vec![PeftMethod::Lora]
}

const KNOWN_METRICS: [&str; 4] = [
    "eval_loss",
    "eval_perplexity",
    "final_loss",
    "delta_vs_base_loss",
];

impl ExperimentFile {
    /// Semantic checks, with paths as the user wrote them.
    pub fn check(&self) -> Vec<Issue> {
        let mut out = Vec::new();
        if self.version != SPEC_VERSION {
            out.push(
                Issue::new(
                    "version",
                    format!(
                        "spec version \"{}\" is not supported by this build",
                        self.version
                    ),
                )
                .hint(format!("write version: \"{SPEC_VERSION}\"")),
            );
        }
        if self.dataset.path.trim().is_empty() {
            out.push(
                Issue::new("dataset.path", "is empty")
                    .hint("point it at a .jsonl, .json, .csv or .parquet file or a dataset folder"),
            );
        }
        if self
            .config
            .base_model
            .as_deref()
            .is_none_or(|m| m.trim().is_empty())
        {
            out.push(
                Issue::new("config.base_model", "is required but missing").hint(
                    "a local Hugging Face folder (e.g. the one `cargo xtask setup` imports) or a hub id",
                ),
            );
        }
        if !(0.0..0.9).contains(&self.dataset.eval_fraction) {
            out.push(
                Issue::new("dataset.eval_fraction", "must be in [0, 0.9)").hint("for example 0.1"),
            );
        }
        out.extend(self.config.check().into_iter().map(|i| i.under("config")));
        if let Some(s) = &self.search_space {
            out.extend(s.check().into_iter().map(|i| i.under("search_space")));
        }
        out.extend(
            self.protocol
                .check()
                .into_iter()
                .map(|i| i.under("protocol")),
        );
        if let Some(v) = self.resources.vram_limit_gb
            && !(v.is_finite() && v > 0.0)
        {
            out.push(
                Issue::new("resources.vram_limit_gb", "must be positive").hint("for example 24"),
            );
        }
        if self.resources.threads == Some(0) {
            out.push(Issue::new("resources.threads", "must be at least 1"));
        }
        out
    }

    /// Seed 001's flat spec. Relative dataset paths stay relative (the caller
    /// resolves them against the spec file's folder).
    pub fn to_spec(&self) -> ExperimentSpec {
        let search_space = self.search_space.clone().unwrap_or_default();
        let methods = if search_space.methods.is_empty() {
            vec![self.config.method]
        } else {
            search_space.methods.clone()
        };
        let mut base = self.config.clone();
        if base.early_stop_loss.is_none() {
            base.early_stop_loss = self.protocol.early_stop_loss;
        }
        ExperimentSpec {
            goal: self.goal.clone(),
            dataset_path: self.dataset.path.clone(),
            base_model: self.config.base_model.clone().unwrap_or_default(),
            max_trials: self.protocol.trials,
            budget_gpu_hours: self.protocol.budget_gpu_hours,
            methods,
            stop_metric: self.protocol.stop_metric.clone(),
            stop_threshold: self.protocol.stop_threshold,
            stop_patience: self.protocol.stop_patience,
            experiment_name: self.experiment_name.clone(),
            task: self.task,
            dataset_format: self.dataset.format,
            dataset_file_format: self.dataset.file_format,
            eval_dataset_path: self.dataset.eval_path.clone(),
            eval_fraction: self.dataset.eval_fraction,
            base_config: base,
            search_space,
            protocol: self.protocol.clone(),
            resources: self.resources.clone(),
            output: self.output.clone(),
        }
    }
}

impl ProtocolSection {
    /// Semantic checks (paths relative to `protocol`).
    pub fn check(&self) -> Vec<Issue> {
        let mut out = Vec::new();
        if self.trials == 0 {
            out.push(Issue::new("trials", "must be at least 1").hint("for example 5"));
        }
        if !(self.budget_gpu_hours.is_finite() && self.budget_gpu_hours > 0.0) {
            out.push(
                Issue::new(
                    "budget_gpu_hours",
                    format!("must be positive (got {})", self.budget_gpu_hours),
                )
                .hint("device-hours, e.g. 10.0; CPU hours count on a CPU-only machine"),
            );
        }
        if let Some(d) = self.budget_dollars {
            if !(d.is_finite() && d > 0.0) {
                out.push(Issue::new("budget_dollars", "must be positive"));
            }
            if self.cost_per_device_hour.is_empty() {
                out.push(
                    Issue::new("budget_dollars", "needs a cost table")
                        .hint("add cost_per_device_hour: {cpu: 0.05, a100-80gb: 1.8}"),
                );
            }
        }
        for (k, v) in &self.cost_per_device_hour {
            if !(v.is_finite() && *v >= 0.0) {
                out.push(Issue::new(
                    format!("cost_per_device_hour.{k}"),
                    "must be >= 0",
                ));
            }
        }
        if let Some(l) = self.early_stop_loss
            && !(l.is_finite() && l > 0.0)
        {
            out.push(Issue::new("early_stop_loss", "must be positive").hint("for example 10.0"));
        }
        if !KNOWN_METRICS.contains(&self.stop_metric.as_str()) {
            let mut i = Issue::new(
                "stop_metric",
                format!("unknown metric `{}`", self.stop_metric),
            );
            i = match crate::load::suggest(&self.stop_metric, KNOWN_METRICS) {
                Some(s) => i.hint(format!("did you mean `{s}`?")),
                None => i.hint(format!("one of {}", KNOWN_METRICS.join(", "))),
            };
            out.push(i);
        }
        if self.stop_patience == Some(0) {
            out.push(Issue::new("stop_patience", "must be at least 1"));
        }
        match self.kind {
            ProtocolType::Ablation => match &self.ablation {
                None => out.push(
                    Issue::new("ablation", "is required for type: ablation")
                        .hint("add ablation: {param: lora_rank, values: [4, 8, 16]}"),
                ),
                Some(a) => {
                    let has_param = a.param.is_some();
                    if has_param && a.values.is_empty() {
                        out.push(Issue::new("ablation.values", "must list the values to try"));
                    }
                    if !has_param && a.grid.is_empty() && a.preset.is_none() {
                        out.push(
                            Issue::new("ablation", "names nothing to vary")
                                .hint("set param + values, a grid, or a preset such as lora_rank"),
                        );
                    }
                    let fields = trial_fields();
                    let names = a.param.iter().chain(a.grid.keys());
                    for p in names {
                        if !fields.iter().any(|f| f == p) {
                            let mut i = Issue::new(
                                "ablation.param",
                                format!("`{p}` is not a trial parameter"),
                            );
                            if let Some(s) =
                                crate::load::suggest(p, fields.iter().map(String::as_str))
                            {
                                i = i.hint(format!("did you mean `{s}`?"));
                            }
                            out.push(i);
                        }
                    }
                    if let Some(p) = &a.preset
                        && let Err(e) = crate::training_config::parse_preset(p)
                    {
                        out.push(e.under("ablation.preset"));
                    }
                }
            },
            ProtocolType::Curriculum => {
                if let Some(c) = &self.curriculum {
                    if c.stages.is_empty() && c.num_stages.is_none() {
                        out.push(
                            Issue::new("curriculum", "needs stages or num_stages")
                                .hint("stages: [{name: easy, path: easy.jsonl}, {name: hard, path: hard.jsonl}]"),
                        );
                    }
                    if c.num_stages == Some(0) || c.num_stages == Some(1) {
                        out.push(Issue::new("curriculum.num_stages", "must be at least 2"));
                    }
                    for (i, s) in c.stages.iter().enumerate() {
                        if !(s.epochs.is_finite() && s.epochs > 0.0) {
                            out.push(Issue::new(
                                format!("curriculum.stages[{i}].epochs"),
                                "must be positive",
                            ));
                        }
                    }
                }
            }
            ProtocolType::Ensemble => {
                if let Some(e) = &self.ensemble {
                    if e.members < 2 {
                        out.push(Issue::new("ensemble.members", "must be at least 2"));
                    }
                    if !(e.density > 0.0 && e.density <= 1.0) {
                        out.push(Issue::new("ensemble.density", "must be in (0, 1]"));
                    }
                    if !(e.temperature.is_finite() && e.temperature > 0.0) {
                        out.push(Issue::new("ensemble.temperature", "must be positive"));
                    }
                }
            }
            ProtocolType::Standard => {}
        }
        out
    }
}

/// Names of the `TrialConfig` fields (what an ablation may vary).
pub fn trial_fields() -> Vec<String> {
    serde_json::to_value(TrialConfig::default())
        .ok()
        .and_then(|v| v.as_object().map(|m| m.keys().cloned().collect::<Vec<_>>()))
        .map(|mut v| {
            v.extend(
                [
                    "base_model",
                    "max_steps",
                    "warmup_steps",
                    "quantization_bits",
                    "eval_steps",
                    "save_steps",
                    "early_stop_loss",
                ]
                .map(String::from),
            );
            v.sort();
            v.dedup();
            v
        })
        .unwrap_or_default()
}

impl ExperimentSpec {
    /// Semantic checks with the flat spec's paths.
    pub fn check(&self) -> Vec<Issue> {
        let mut out = Vec::new();
        if self.dataset_path.trim().is_empty() {
            out.push(Issue::new("dataset_path", "is required but empty"));
        }
        if self.base_model.trim().is_empty() {
            out.push(Issue::new("base_model", "is required but empty"));
        }
        if self.max_trials == 0 {
            out.push(Issue::new("max_trials", "must be at least 1"));
        }
        if !(self.budget_gpu_hours.is_finite() && self.budget_gpu_hours > 0.0) {
            out.push(Issue::new("budget_gpu_hours", "must be positive"));
        }
        if self.methods.is_empty() {
            out.push(Issue::new("methods", "must name at least one method").hint("[lora]"));
        }
        out.extend(
            self.base_config
                .check()
                .into_iter()
                .map(|i| i.under("base_config")),
        );
        out.extend(
            self.search_space
                .check()
                .into_iter()
                .map(|i| i.under("search_space")),
        );
        // The flat fields are authoritative; check the protocol section without them.
        let mut p = self.protocol.clone();
        p.trials = self.max_trials.max(1);
        p.budget_gpu_hours = if self.budget_gpu_hours > 0.0 {
            self.budget_gpu_hours
        } else {
            1.0
        };
        p.stop_metric = self.stop_metric.clone();
        p.stop_patience = self.stop_patience;
        out.extend(p.check().into_iter().map(|i| i.under("protocol")));
        out
    }

    /// Makes relative data and model paths absolute against `base_dir` (the
    /// spec file's folder); hub ids (which do not exist locally) are kept.
    pub fn resolve_paths(&mut self, base_dir: &Path) {
        let fix = |p: &mut String| {
            if !p.is_empty() && Path::new(p.as_str()).is_relative() {
                *p = base_dir.join(p.as_str()).display().to_string();
            }
        };
        fix(&mut self.dataset_path);
        if let Some(e) = &mut self.eval_dataset_path {
            fix(e);
        }
        // A model may be a hub id (`org/name`): keep it unless the folder exists here.
        let local = base_dir.join(&self.base_model);
        if !looks_like_hub_id(&self.base_model) || local.exists() {
            fix(&mut self.base_model);
        }
        self.base_config.base_model = Some(self.base_model.clone());
        if !Path::new(&self.output.dir).is_absolute() {
            self.output.dir = base_dir.join(&self.output.dir).display().to_string();
        }
        if let Some(c) = &mut self.protocol.curriculum {
            for s in &mut c.stages {
                fix(&mut s.path);
            }
        }
    }
}

/// `org/name` with no leading `.` or `/`, which is how hub ids look.
pub fn looks_like_hub_id(s: &str) -> bool {
    let parts: Vec<_> = s.split('/').collect();
    parts.len() == 2
        && !s.starts_with('.')
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
}

/// Either form an experiment can be given in.
#[derive(Debug, Clone, PartialEq)]
pub enum Loaded {
    /// A seed 000 document.
    File(Box<ExperimentFile>),
    /// A seed 001 flat spec (JSON or YAML).
    Spec(Box<ExperimentSpec>),
}

/// Reads an experiment from a YAML or JSON file: a seed 000 document (it has
/// `version`) or a seed 001 flat spec. Returns the flat spec with paths made
/// absolute against the file's folder. Every error names the field and line.
pub fn load_experiment(path: &Path) -> Result<(ExperimentSpec, Loaded), SpecError> {
    let doc = Document::read(path)?;
    let loaded = from_document(&doc)?;
    let mut spec = match &loaded {
        Loaded::File(f) => f.to_spec(),
        Loaded::Spec(s) => (**s).clone(),
    };
    let base = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let base = std::path::absolute(base).unwrap_or_else(|_| base.to_path_buf());
    spec.resolve_paths(&base);
    Ok((spec, loaded))
}

/// Parses experiment text (for callers that have no file).
pub fn parse_experiment(text: &str, name: &str, syntax: Syntax) -> Result<Loaded, SpecError> {
    let doc = Document::parse(text, name, syntax)?;
    from_document(&doc)
}

fn from_document(doc: &Document) -> Result<Loaded, SpecError> {
    let is_object = doc.value.is_object();
    if !is_object {
        let mut e = SpecError {
            file: doc.file.clone(),
            issues: vec![
                Issue::new("", "an experiment must be a mapping of keys to values")
                    .hint("start with `version: \"1.0\"`"),
            ],
        };
        doc.index.annotate(&mut e.issues);
        return Err(e);
    }
    let flat = doc.value.get("version").is_none() && doc.value.get("dataset_path").is_some();
    if flat {
        return doc
            .decode::<ExperimentSpec>(ExperimentSpec::check)
            .map(|s| Loaded::Spec(Box::new(s)));
    }
    if doc.value.get("version").is_none() {
        let mut issues = vec![
            Issue::new("version", "is required but missing")
                .hint(format!("add `version: \"{SPEC_VERSION}\"` at the top")),
        ];
        doc.index.annotate(&mut issues);
        return Err(SpecError {
            file: doc.file.clone(),
            issues,
        });
    }
    // Check the version before anything else: a future spec may have other keys.
    if let Some(v) = doc.value.get("version") {
        let as_text = match v {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        if as_text != SPEC_VERSION {
            let mut issues = vec![
                Issue::new(
                    "version",
                    format!("spec version \"{as_text}\" is not supported by this build"),
                )
                .hint(format!(
                    "this build reads version \"{SPEC_VERSION}\" (write it quoted)"
                )),
            ];
            doc.index.annotate(&mut issues);
            return Err(SpecError {
                file: doc.file.clone(),
                issues,
            });
        }
    }
    doc.decode::<ExperimentFile>(ExperimentFile::check)
        .map(|f| Loaded::File(Box::new(f)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seed 000's example, unchanged.
    pub(crate) const SEED_000: &str = r#"version: "1.0"
experiment_name: "llama3-sql-finetune"
dataset:
  path: "data/text_to_sql.json"
  format: "alpaca"

# Search Space (for HPO) or Fixed Config
config:
  base_model: "meta-llama/Meta-Llama-3-8B"
  method: "qlora"
  
  # Hyperparameters
  learning_rate: 2e-4
  batch_size: 4
  epochs: 3
  lora_rank: 64
  lora_alpha: 16
  
  # Advanced
  target_modules: ["q_proj", "v_proj"]
  quantization_bits: 4

protocol:
  type: "standard" # or "ablation", "curriculum"
  budget_gpu_hours: 10.0
  trials: 5

output:
  export_format: "gguf"
  merge_after: true
"#;

    fn load(text: &str) -> Result<Loaded, SpecError> {
        parse_experiment(text, "exp.yaml", Syntax::Yaml)
    }

    #[test]
    fn seed_000_example_parses_unchanged() {
        let Loaded::File(f) = load(SEED_000).unwrap() else {
            panic!("expected a document")
        };
        assert_eq!(f.config.learning_rate, 0.0002);
        assert_eq!(f.config.lora_rank, 64);
        assert_eq!(f.config.method, PeftMethod::Qlora);
        assert_eq!(f.dataset.format, RecordFormat::Alpaca);
        assert_eq!(f.output.export_format, ExportFormat::Gguf);
        let spec = f.to_spec();
        assert_eq!(spec.max_trials, 5);
        assert_eq!(spec.base_model, "meta-llama/Meta-Llama-3-8B");
        assert_eq!(spec.methods, vec![PeftMethod::Qlora]);
        assert_eq!(spec.base_config.normalized().gradient_accumulation, 1);
    }

    #[test]
    fn flat_seed_001_spec_is_accepted() {
        let text = r#"{"goal": "Fine-tune for QA", "dataset_path": "data/train.jsonl",
            "base_model": "unsloth/Llama-3.2-1B", "max_trials": 10, "budget_gpu_hours": 5.0,
            "methods": ["lora"], "stop_metric": "eval_loss", "stop_threshold": 0.3, "stop_patience": 3}"#;
        let Loaded::Spec(s) = parse_experiment(text, "s.json", Syntax::Json).unwrap() else {
            panic!("expected a flat spec")
        };
        assert_eq!(s.max_trials, 10);
        assert_eq!(s.stop_patience, Some(3));
    }

    fn first_issue(text: &str) -> Issue {
        load(text).unwrap_err().issues.remove(0)
    }

    #[test]
    fn broken_specs_name_field_and_line() {
        let i = first_issue(&SEED_000.replace("lora_rank: 64", "lora_rank: -4"));
        assert_eq!((i.path.as_str(), i.line), ("config.lora_rank", Some(16)));
        let i = first_issue(&SEED_000.replace("lora_rank: 64", "lora_rnk: 64"));
        assert_eq!(i.path, "config.lora_rnk");
        assert!(i.hint.unwrap().contains("lora_rank"));
        let i = first_issue(&SEED_000.replace("type: \"standard\"", "type: \"standart\""));
        assert_eq!(i.path, "protocol.type");
        assert!(i.hint.unwrap().contains("standard"));
        let i = first_issue(&SEED_000.replace("\"gguf\"", "\"onnx\""));
        assert_eq!(i.path, "output.export_format");
        let i = first_issue(&SEED_000.replace("version: \"1.0\"", "version: \"2.0\""));
        assert_eq!((i.path.as_str(), i.line), ("version", Some(1)));
        let i = first_issue(&SEED_000.replace("  path: \"data/text_to_sql.json\"\n", ""));
        assert_eq!(i.path, "dataset.path");
        let i = first_issue(&SEED_000.replace("learning_rate: 2e-4", "learning_rate: fast"));
        assert_eq!(i.path, "config.learning_rate");
        assert_eq!(i.line, Some(13));
        let i = first_issue(&SEED_000.replace(
            "budget_gpu_hours: 10.0",
            "budget_gpu_hours: 10.0\n  budget: 3",
        ));
        assert_eq!(i.path, "protocol.budget");
    }

    #[test]
    fn search_space_inverted_lr_is_caught() {
        let text = format!("{SEED_000}search_space:\n  lr_min: 1e-3\n  lr_max: 1e-4\n");
        let i = first_issue(&text);
        assert_eq!(i.path, "search_space.lr_min");
        assert_eq!(i.line, Some(32));
    }

    #[test]
    fn ablation_needs_a_known_param() {
        let text = SEED_000.replace(
            "  type: \"standard\" # or \"ablation\", \"curriculum\"",
            "  type: ablation\n  ablation: {param: lora_rnk, values: [4, 8]}",
        );
        let i = first_issue(&text);
        assert_eq!(i.path, "protocol.ablation.param");
        assert!(i.hint.unwrap().contains("lora_rank"));
    }

    #[test]
    fn relative_paths_resolve_against_the_spec_folder_but_hub_ids_stay() {
        let Loaded::File(f) = load(SEED_000).unwrap() else {
            panic!()
        };
        let mut s = f.to_spec();
        s.resolve_paths(Path::new("/exp"));
        assert_eq!(s.dataset_path, "/exp/data/text_to_sql.json");
        assert_eq!(s.base_model, "meta-llama/Meta-Llama-3-8B");
        assert_eq!(s.output.dir, "/exp/runs");
    }
}
