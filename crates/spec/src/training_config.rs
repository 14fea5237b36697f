//! Seed 003's nested `TrainingConfig`: config files, dotted overrides
//! (`--set optimizer.learning_rate=1e-4`) and the named ablation presets
//! (`--ablation-preset lora_rank:r32`).
//!
//! Sections whose training does not exist yet (GRPO, rewards, noise, prompt
//! versions) are parsed and validated; [`TrainingConfig::apply_to`] reports
//! them as not run instead of pretending.

use std::path::Path;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::load::{Document, Syntax, decode_value, suggest};
use crate::trial::{LrScheduler, TrialConfig};
use crate::{Issue, SpecError};

/// Seed 003's `TrainingConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct TrainingConfig {
    /// Base model (registry name, HF folder or hub id).
    pub base_model: Option<String>,
    /// Passes over the data.
    pub epochs: f64,
    /// Random seed.
    pub seed: u64,
    /// System prompt used when rendering chat samples.
    pub system_prompt: Option<String>,
    /// LoRA hyper-parameters.
    pub lora: LoraSection,
    /// Optimiser and schedule.
    pub optimizer: OptimizerSection,
    /// Batching.
    pub batch: BatchSection,
    /// Data fields and lengths.
    pub data: DataSection,
    /// Logging and checkpoints.
    pub logging: LoggingSection,
    /// Infrastructure.
    pub infra: InfraSection,
    /// GRPO (parsed and validated; no GRPO trainer yet).
    pub grpo: GrpoSection,
    /// Reward model settings (parsed and validated; used by GRPO).
    pub reward: RewardSection,
    /// Training-noise injection (parsed and validated; not applied yet).
    pub noise: NoiseSection,
    /// Prompt versions from the prompt registry.
    pub prompt: PromptSection,
}

impl Default for TrainingConfig {
    fn default() -> Self {
        Self {
            base_model: None,
            epochs: 3.0,
            seed: 42,
            system_prompt: None,
            lora: LoraSection::default(),
            optimizer: OptimizerSection::default(),
            batch: BatchSection::default(),
            data: DataSection::default(),
            logging: LoggingSection::default(),
            infra: InfraSection::default(),
            grpo: GrpoSection::default(),
            reward: RewardSection::default(),
            noise: NoiseSection::default(),
            prompt: PromptSection::default(),
        }
    }
}

/// `lora` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct LoraSection {
    /// Rank (seed 003 default 16, range 4-64).
    pub r: u32,
    /// Alpha (default 16, range 8-32).
    pub alpha: f64,
    /// Dropout (default 0.0, range 0.0-0.1).
    pub dropout: f64,
    /// Adapted projections.
    pub target_modules: Vec<String>,
    /// rsLoRA scaling.
    pub use_rslora: bool,
    /// DoRA (parsed; not trained by this build).
    pub use_dora: bool,
}

impl Default for LoraSection {
    fn default() -> Self {
        Self {
            r: 16,
            alpha: 16.0,
            dropout: 0.0,
            target_modules: ["q_proj", "k_proj", "v_proj", "o_proj"]
                .map(String::from)
                .to_vec(),
            use_rslora: false,
            use_dora: false,
        }
    }
}

/// `optimizer` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct OptimizerSection {
    /// Peak learning rate (default 2e-4, range 1e-5-5e-4).
    pub learning_rate: f64,
    /// Warm-up fraction (default 0.06, range 0.0-0.2).
    pub warmup_ratio: f64,
    /// Weight decay (default 0.01, range 0.0-0.1).
    pub weight_decay: f64,
    /// Schedule.
    pub scheduler: LrScheduler,
    /// Gradient clipping.
    pub max_grad_norm: f64,
}

impl Default for OptimizerSection {
    fn default() -> Self {
        Self {
            learning_rate: 2e-4,
            warmup_ratio: 0.06,
            weight_decay: 0.01,
            scheduler: LrScheduler::Cosine,
            max_grad_norm: 1.0,
        }
    }
}

/// `batch` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct BatchSection {
    /// Per-device batch (default 16, range 4-32).
    pub batch_size: u32,
    /// Micro-batches accumulated per optimiser step.
    pub gradient_accumulation_steps: u32,
}

impl Default for BatchSection {
    fn default() -> Self {
        Self {
            batch_size: 16,
            gradient_accumulation_steps: 1,
        }
    }
}

/// `data` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct DataSection {
    /// Context window (default 4096, range 256-4096).
    pub max_seq_length: u32,
    /// Field holding the instruction.
    pub instruction_field: String,
    /// Field holding the optional input.
    pub input_field: String,
    /// Field holding the target.
    pub output_field: String,
}

impl Default for DataSection {
    fn default() -> Self {
        Self {
            max_seq_length: 4096,
            instruction_field: "instruction".into(),
            input_field: "input".into(),
            output_field: "output".into(),
        }
    }
}

/// When checkpoints are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum SaveStrategy {
    /// Every `save_steps`.
    #[default]
    Steps,
    /// At every epoch end.
    Epoch,
    /// Only at the end.
    No,
}

/// `logging` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct LoggingSection {
    /// Log every N steps.
    pub logging_steps: u32,
    /// Checkpoint strategy.
    pub save_strategy: SaveStrategy,
    /// Checkpoint interval.
    pub save_steps: u32,
    /// Eval interval (none: at the end).
    pub eval_steps: Option<u32>,
    /// W&B project (recorded; this build logs to files).
    pub wandb_project: Option<String>,
}

impl Default for LoggingSection {
    fn default() -> Self {
        Self {
            logging_steps: 10,
            save_strategy: SaveStrategy::Steps,
            save_steps: 500,
            eval_steps: None,
            wandb_project: None,
        }
    }
}

/// `infra` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct InfraSection {
    /// Accelerator type.
    pub gpu: Option<String>,
    /// Time limit per run, minutes.
    pub timeout_minutes: u32,
    /// Retries of a failed run.
    pub retries: u32,
}

impl Default for InfraSection {
    fn default() -> Self {
        Self {
            gpu: None,
            timeout_minutes: 600,
            retries: 0,
        }
    }
}

/// `grpo` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct GrpoSection {
    /// KL penalty (default 0.04, range 0.01-0.16).
    pub beta: f64,
    /// Candidates per prompt (default 4, range 2-8).
    pub num_generations: u32,
    /// Reward settings for GRPO (overrides the top-level `reward`).
    pub reward: Option<RewardSection>,
}

impl Default for GrpoSection {
    fn default() -> Self {
        Self {
            beta: 0.04,
            num_generations: 4,
            reward: None,
        }
    }
}

/// Reward model kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum RewardType {
    /// CLAP audio similarity.
    #[default]
    Clap,
    /// JSON-schema validity only.
    SchemaOnly,
    /// A user scorer.
    Custom,
}

/// Reward component weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct RewardWeights {
    /// JSON validity (default 0.2).
    pub format_weight: f64,
    /// Schema correctness (default 0.3).
    pub schema_weight: f64,
    /// Audio similarity (default 0.5).
    pub audio_weight: f64,
}

impl Default for RewardWeights {
    fn default() -> Self {
        Self {
            format_weight: 0.2,
            schema_weight: 0.3,
            audio_weight: 0.5,
        }
    }
}

/// `reward` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(default, deny_unknown_fields)]
pub struct RewardSection {
    /// Kind.
    pub reward_type: RewardType,
    /// Path of a custom scorer (reward_type: custom).
    pub custom_scorer_path: Option<String>,
    /// Component weights.
    pub weights: RewardWeights,
}

/// `noise` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct NoiseSection {
    /// Fraction of corrupted samples (default 0.15, range 0.0-0.5).
    pub error_rate: f64,
    /// Always augment.
    pub force_augmentation: bool,
}

impl Default for NoiseSection {
    fn default() -> Self {
        Self {
            error_rate: 0.15,
            force_augmentation: false,
        }
    }
}

/// `prompt` section: prompt versions from the registry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(default, deny_unknown_fields)]
pub struct PromptSection {
    /// Vibe-extraction prompt version.
    pub vibe_extraction: Option<String>,
    /// Config-generation prompt version.
    pub config_generation: Option<String>,
}

fn range(out: &mut Vec<Issue>, path: &str, v: f64, lo: f64, hi: f64, hint: &str) {
    if !(v.is_finite() && v >= lo && v <= hi) {
        out.push(Issue::new(path, format!("must be in [{lo}, {hi}] (got {v})")).hint(hint));
    }
}

impl TrainingConfig {
    /// Semantic checks with seed 003's ranges, widened to what still trains.
    pub fn check(&self) -> Vec<Issue> {
        let mut out = Vec::new();
        if self.lora.r == 0 {
            out.push(Issue::new("lora.r", "must be at least 1").hint("seed 003 range: 4-64"));
        }
        range(
            &mut out,
            "lora.alpha",
            self.lora.alpha,
            1e-6,
            1e6,
            "seed 003 range: 8-32",
        );
        range(
            &mut out,
            "lora.dropout",
            self.lora.dropout,
            0.0,
            0.9,
            "seed 003 range: 0.0-0.1",
        );
        range(
            &mut out,
            "optimizer.learning_rate",
            self.optimizer.learning_rate,
            1e-9,
            1.0,
            "seed 003 range: 1e-5-5e-4",
        );
        range(
            &mut out,
            "optimizer.warmup_ratio",
            self.optimizer.warmup_ratio,
            0.0,
            0.5,
            "seed 003 range: 0.0-0.2",
        );
        range(
            &mut out,
            "optimizer.weight_decay",
            self.optimizer.weight_decay,
            0.0,
            1.0,
            "seed 003 range: 0.0-0.1",
        );
        range(
            &mut out,
            "optimizer.max_grad_norm",
            self.optimizer.max_grad_norm,
            0.0,
            1e6,
            "1.0 is common",
        );
        if self.batch.batch_size == 0 {
            out.push(
                Issue::new("batch.batch_size", "must be at least 1").hint("seed 003 range: 4-32"),
            );
        }
        if self.batch.gradient_accumulation_steps == 0 {
            out.push(Issue::new(
                "batch.gradient_accumulation_steps",
                "must be at least 1",
            ));
        }
        if self.data.max_seq_length < 8 {
            out.push(
                Issue::new("data.max_seq_length", "must be at least 8")
                    .hint("seed 003 range: 256-4096"),
            );
        }
        range(&mut out, "epochs", self.epochs, 1e-6, 1e4, "for example 3");
        range(
            &mut out,
            "grpo.beta",
            self.grpo.beta,
            0.0,
            10.0,
            "seed 003 range: 0.01-0.16",
        );
        if self.grpo.num_generations < 2 {
            out.push(
                Issue::new("grpo.num_generations", "must be at least 2")
                    .hint("seed 003 range: 2-8"),
            );
        }
        for (prefix, r) in [
            ("reward", Some(&self.reward)),
            ("grpo.reward", self.grpo.reward.as_ref()),
        ] {
            let Some(r) = r else { continue };
            for (k, v) in [
                ("format_weight", r.weights.format_weight),
                ("schema_weight", r.weights.schema_weight),
                ("audio_weight", r.weights.audio_weight),
            ] {
                range(
                    &mut out,
                    &format!("{prefix}.weights.{k}"),
                    v,
                    0.0,
                    1.0,
                    "weights are in [0, 1]",
                );
            }
            if r.reward_type == RewardType::Custom && r.custom_scorer_path.is_none() {
                out.push(
                    Issue::new(
                        format!("{prefix}.custom_scorer_path"),
                        "is required for reward_type: custom",
                    )
                    .hint("path of the scorer"),
                );
            }
        }
        range(
            &mut out,
            "noise.error_rate",
            self.noise.error_rate,
            0.0,
            0.5,
            "seed 003 range: 0.0-0.5",
        );
        out
    }

    /// Applies the sections this build trains with to `trial`; returns the
    /// settings that were parsed but are not run (so callers can say so).
    pub fn apply_to(&self, trial: &mut TrialConfig) -> Vec<String> {
        if let Some(m) = &self.base_model {
            trial.base_model = Some(m.clone());
        }
        trial.epochs = self.epochs;
        trial.seed = self.seed;
        trial.lora_rank = self.lora.r;
        trial.lora_alpha = self.lora.alpha;
        trial.lora_dropout = self.lora.dropout;
        trial.target_modules = self.lora.target_modules.clone();
        trial.use_rslora = self.lora.use_rslora;
        trial.learning_rate = self.optimizer.learning_rate;
        trial.warmup_ratio = self.optimizer.warmup_ratio;
        trial.weight_decay = self.optimizer.weight_decay;
        trial.lr_scheduler = self.optimizer.scheduler;
        trial.max_grad_norm = self.optimizer.max_grad_norm;
        trial.micro_batch_size = self.batch.batch_size;
        trial.batch_size = self.batch.batch_size * self.batch.gradient_accumulation_steps;
        trial.gradient_accumulation = 0;
        trial.max_seq_length = self.data.max_seq_length;
        trial.save_steps = match self.logging.save_strategy {
            SaveStrategy::Steps => Some(u64::from(self.logging.save_steps)),
            _ => None,
        };
        trial.eval_steps = self.logging.eval_steps.map(u64::from);
        let defaults = TrainingConfig::default();
        let mut not_run = Vec::new();
        if self.lora.use_dora {
            not_run.push("lora.use_dora (DoRA is not trained by this build)".into());
        }
        if self.grpo != defaults.grpo {
            not_run.push("grpo (no GRPO trainer yet; SFT runs)".into());
        }
        if self.reward != defaults.reward {
            not_run.push("reward (used by GRPO only)".into());
        }
        if self.noise != defaults.noise {
            not_run.push("noise (noise injection is not applied yet)".into());
        }
        not_run
    }
}

impl TrainingConfig {
    /// The nested view of a trial (the inverse of [`apply_to`](Self::apply_to) for
    /// the sections this build trains with), so overrides start from the spec.
    pub fn from_trial(t: &TrialConfig) -> Self {
        let t = t.normalized();
        Self {
            base_model: t.base_model.clone(),
            epochs: t.epochs,
            seed: t.seed,
            lora: LoraSection {
                r: t.lora_rank,
                alpha: t.lora_alpha,
                dropout: t.lora_dropout,
                target_modules: t.target_modules.clone(),
                use_rslora: t.use_rslora,
                use_dora: false,
            },
            optimizer: OptimizerSection {
                learning_rate: t.learning_rate,
                warmup_ratio: t.warmup_ratio,
                weight_decay: t.weight_decay,
                scheduler: t.lr_scheduler,
                max_grad_norm: t.max_grad_norm,
            },
            batch: BatchSection {
                batch_size: t.micro_batch_size,
                gradient_accumulation_steps: t.gradient_accumulation,
            },
            data: DataSection {
                max_seq_length: t.max_seq_length,
                ..DataSection::default()
            },
            logging: LoggingSection {
                save_strategy: if t.save_steps.is_some() {
                    SaveStrategy::Steps
                } else {
                    SaveStrategy::No
                },
                save_steps: t
                    .save_steps
                    .map(|s| s.min(u64::from(u32::MAX)) as u32)
                    .unwrap_or(500),
                eval_steps: t.eval_steps.map(|s| s.min(u64::from(u32::MAX)) as u32),
                ..LoggingSection::default()
            },
            ..Self::default()
        }
    }
}

/// Deep-merges `over` into `base` (objects merge key by key; anything else replaces).
fn merge_json(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge_json(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

/// Seed 003's presets: (group, variant, dotted path, value).
pub const PRESETS: &[(&str, &str, &str, f64)] = &[
    ("lora_rank", "r4", "lora.r", 4.0),
    ("lora_rank", "r8", "lora.r", 8.0),
    ("lora_rank", "r16", "lora.r", 16.0),
    ("lora_rank", "r32", "lora.r", 32.0),
    ("lora_rank", "r64", "lora.r", 64.0),
    ("learning_rate", "lr1e-05", "optimizer.learning_rate", 1e-5),
    ("learning_rate", "lr5e-05", "optimizer.learning_rate", 5e-5),
    ("learning_rate", "lr0.0001", "optimizer.learning_rate", 1e-4),
    ("learning_rate", "lr0.0002", "optimizer.learning_rate", 2e-4),
    ("learning_rate", "lr0.0005", "optimizer.learning_rate", 5e-4),
    ("grpo_beta", "beta0.01", "grpo.beta", 0.01),
    ("grpo_beta", "beta0.02", "grpo.beta", 0.02),
    ("grpo_beta", "beta0.04", "grpo.beta", 0.04),
    ("grpo_beta", "beta0.08", "grpo.beta", 0.08),
    ("grpo_beta", "beta0.16", "grpo.beta", 0.16),
    ("batch_size", "bs4", "batch.batch_size", 4.0),
    ("batch_size", "bs8", "batch.batch_size", 8.0),
    ("batch_size", "bs16", "batch.batch_size", 16.0),
    ("batch_size", "bs32", "batch.batch_size", 32.0),
];

/// One preset variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Preset {
    /// Group (`lora_rank`).
    pub group: String,
    /// Variant (`r32`).
    pub variant: String,
    /// Dotted path in `TrainingConfig` (`lora.r`).
    pub path: String,
    /// Value.
    pub value: f64,
}

/// The `TrialConfig` field a preset group varies.
pub fn preset_trial_field(group: &str) -> Option<&'static str> {
    match group {
        "lora_rank" => Some("lora_rank"),
        "learning_rate" => Some("learning_rate"),
        "batch_size" => Some("batch_size"),
        _ => None,
    }
}

/// Every variant of `group`, in order.
pub fn preset_group(group: &str) -> Vec<Preset> {
    PRESETS
        .iter()
        .filter(|p| p.0 == group)
        .map(|&(g, v, p, x)| Preset {
            group: g.into(),
            variant: v.into(),
            path: p.into(),
            value: x,
        })
        .collect()
}

/// Parses `group:variant` (one preset) or `group` (all of its variants).
pub fn parse_preset(s: &str) -> Result<Vec<Preset>, Issue> {
    let (group, variant) = match s.split_once(':') {
        Some((g, v)) => (g.trim(), Some(v.trim())),
        None => (s.trim(), None),
    };
    let groups: Vec<&str> = {
        let mut g: Vec<&str> = PRESETS.iter().map(|p| p.0).collect();
        g.dedup();
        g
    };
    let all = preset_group(group);
    if all.is_empty() {
        let mut i = Issue::new("", format!("unknown preset group `{group}`"));
        i = match suggest(group, groups.iter().copied()) {
            Some(g) => i.hint(format!(
                "did you mean `{g}`? (groups: {})",
                groups.join(", ")
            )),
            None => i.hint(format!("groups: {}", groups.join(", "))),
        };
        return Err(i);
    }
    match variant {
        None => Ok(all),
        Some(v) => {
            let found: Vec<Preset> = all.iter().filter(|p| p.variant == v).cloned().collect();
            if found.is_empty() {
                let names: Vec<&str> = all.iter().map(|p| p.variant.as_str()).collect();
                let mut i = Issue::new("", format!("unknown variant `{v}` of preset `{group}`"));
                i = match suggest(v, names.iter().copied()) {
                    Some(s) => i.hint(format!(
                        "did you mean `{group}:{s}`? (variants: {})",
                        names.join(", ")
                    )),
                    None => i.hint(format!("variants: {}", names.join(", "))),
                };
                Err(i)
            } else {
                Ok(found)
            }
        }
    }
}

/// Sets a dotted path in a JSON object, creating objects on the way.
fn set_path(root: &mut Value, path: &str, value: Value) {
    let mut cur = root;
    let parts: Vec<&str> = path.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        if !cur.is_object() {
            *cur = Value::Object(Default::default());
        }
        let Some(obj) = cur.as_object_mut() else {
            return;
        };
        if i + 1 == parts.len() {
            obj.insert((*part).to_string(), value);
            return;
        }
        cur = obj
            .entry((*part).to_string())
            .or_insert_with(|| Value::Object(Default::default()));
    }
}

/// Parses the value side of `--set key=value` as a YAML scalar or flow collection.
fn parse_override_value(text: &str) -> Result<Value, Issue> {
    Document::parse(&format!("v: {text}"), "--set", Syntax::Yaml)
        .map(|d| d.value.get("v").cloned().unwrap_or(Value::Null))
        .map_err(|e| {
            e.issues
                .into_iter()
                .next()
                .unwrap_or_else(|| Issue::new("", "bad value"))
        })
}

/// Builds a `TrainingConfig` from an optional config file, then dotted
/// overrides (`optimizer.learning_rate=1e-4`), then one preset
/// (`lora_rank:r32`). Errors name the file and line, or the override.
pub fn load_training_config(
    file: Option<&Path>,
    overrides: &[String],
    preset: Option<&str>,
) -> Result<TrainingConfig, SpecError> {
    load_training_config_over(None, file, overrides, preset)
}

/// Like [`load_training_config`], starting from `base` instead of the
/// defaults (e.g. [`TrainingConfig::from_trial`] of a spec's `config:`), so a
/// file or override changes only what it names.
pub fn load_training_config_over(
    base: Option<&TrainingConfig>,
    file: Option<&Path>,
    overrides: &[String],
    preset: Option<&str>,
) -> Result<TrainingConfig, SpecError> {
    let (mut doc, file_name) = match file {
        Some(p) => {
            let d = Document::read(p)?;
            let name = d.file.clone();
            (d, name)
        }
        None => (
            Document {
                file: "<defaults>".into(),
                value: Value::Object(Default::default()),
                index: Default::default(),
            },
            "<defaults>".to_string(),
        ),
    };
    let fail = |issue: Issue, file: &str| SpecError {
        file: file.to_string(),
        issues: vec![issue],
    };
    // Unknown keys in the file first, so the lines point into it.
    let mut issues = crate::load::unknown_keys::<TrainingConfig>(&doc.value);
    if !issues.is_empty() {
        doc.index.annotate(&mut issues);
        return Err(SpecError {
            file: file_name,
            issues,
        });
    }
    if let Some(b) = base {
        let mut merged = serde_json::to_value(b).unwrap_or(Value::Null);
        merge_json(&mut merged, std::mem::take(&mut doc.value));
        doc.value = merged;
    }
    for o in overrides {
        let Some((key, val)) = o.split_once('=') else {
            return Err(fail(
                Issue::new("", format!("`{o}` is not key=value"))
                    .hint("for example optimizer.learning_rate=1e-4"),
                "--set",
            ));
        };
        let key = key.trim();
        let v = parse_override_value(val.trim()).map_err(|i| fail(i.under(key), "--set"))?;
        let mut probe = Value::Object(Default::default());
        set_path(&mut probe, key, v.clone());
        let unknown = crate::load::unknown_keys::<TrainingConfig>(&probe);
        if let Some(i) = unknown.into_iter().next() {
            return Err(fail(i, "--set"));
        }
        set_path(&mut doc.value, key, v);
    }
    if let Some(p) = preset {
        let presets = parse_preset(p).map_err(|i| fail(i, "--ablation-preset"))?;
        if presets.len() != 1 {
            return Err(fail(
                Issue::new("", format!("`{p}` names a whole preset group")).hint(format!(
                    "pick one variant, e.g. {}:{}",
                    presets[0].group, presets[0].variant
                )),
                "--ablation-preset",
            ));
        }
        let pr = &presets[0];
        let value = if pr.path == "lora.r" || pr.path == "batch.batch_size" {
            Value::from(pr.value as u64)
        } else {
            Value::from(pr.value)
        };
        set_path(&mut doc.value, &pr.path, value);
    }
    let cfg: TrainingConfig = decode_value(doc.value.clone()).map_err(|mut i| {
        if let Some((l, c)) = doc.index.locate(&i.path) {
            i.line = Some(l);
            i.column = Some(c);
        }
        fail(i, &file_name)
    })?;
    let mut issues = cfg.check();
    if !issues.is_empty() {
        doc.index.annotate(&mut issues);
        return Err(SpecError {
            file: file_name,
            issues,
        });
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED_003_FILE: &str = r#"{
  "base_model": "gemma3-270m",
  "epochs": 3,
  "seed": 42,
  "lora": {
    "r": 32,
    "alpha": 32,
    "dropout": 0.05
  },
  "optimizer": {
    "learning_rate": 1e-4,
    "warmup_ratio": 0.1
  },
  "grpo": {
    "beta": 0.02,
    "num_generations": 6,
    "reward": {
      "weights": {
        "format_weight": 0.15,
        "schema_weight": 0.35,
        "audio_weight": 0.5
      }
    }
  }
}"#;

    fn write(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("ablation_lr.json");
        std::fs::write(&p, text).unwrap();
        (d, p)
    }

    #[test]
    fn seed_003_config_file_loads() {
        let (_d, p) = write(SEED_003_FILE);
        let c = load_training_config(Some(&p), &[], None).unwrap();
        assert_eq!(c.lora.r, 32);
        assert_eq!(c.optimizer.learning_rate, 1e-4);
        assert_eq!(c.grpo.reward.as_ref().unwrap().weights.schema_weight, 0.35);
        let mut t = TrialConfig::default();
        let not_run = c.apply_to(&mut t);
        assert_eq!(t.lora_rank, 32);
        assert!(not_run.iter().any(|s| s.starts_with("grpo")));
    }

    #[test]
    fn overrides_and_presets_apply_in_order() {
        let (_d, p) = write(SEED_003_FILE);
        let c = load_training_config(
            Some(&p),
            &[
                "optimizer.learning_rate=5e-5".into(),
                "batch.batch_size=8".into(),
            ],
            Some("lora_rank:r4"),
        )
        .unwrap();
        assert_eq!(c.optimizer.learning_rate, 5e-5);
        assert_eq!(c.batch.batch_size, 8);
        assert_eq!(c.lora.r, 4);
    }

    #[test]
    fn bad_override_and_preset_are_named() {
        let e = load_training_config(None, &["optimizer.learning_rat=1".into()], None).unwrap_err();
        assert_eq!(e.file, "--set");
        assert!(
            e.issues[0]
                .hint
                .as_deref()
                .unwrap()
                .contains("learning_rate")
        );
        let e = load_training_config(None, &[], Some("lora_rank:r33")).unwrap_err();
        assert!(e.to_string().contains("variants"), "{e}");
        let e = load_training_config(None, &["lora.r=-1".into()], None).unwrap_err();
        assert!(e.to_string().contains("lora.r"), "{e}");
        let e = parse_preset("lora_rnk").unwrap_err();
        assert!(e.hint.unwrap().contains("lora_rank"));
    }

    #[test]
    fn file_errors_carry_lines() {
        let (_d, p) = write(&SEED_003_FILE.replace("\"dropout\": 0.05", "\"dropout\": 2.0"));
        let e = load_training_config(Some(&p), &[], None).unwrap_err();
        assert_eq!(e.issues[0].path, "lora.dropout");
        assert_eq!(e.issues[0].line, Some(8));
    }

    #[test]
    fn overrides_start_from_the_trial() {
        let t = TrialConfig {
            lora_rank: 64,
            target_modules: vec!["q_proj".into()],
            batch_size: 32,
            micro_batch_size: 8,
            ..Default::default()
        };
        let base = TrainingConfig::from_trial(&t);
        let c = load_training_config_over(Some(&base), None, &["lora.r=8".into()], None).unwrap();
        let mut out = t.clone();
        assert!(c.apply_to(&mut out).is_empty());
        assert_eq!(out.lora_rank, 8);
        assert_eq!(out.target_modules, vec!["q_proj".to_string()]);
        assert_eq!((out.batch_size, out.micro_batch_size), (32, 8));
        assert_eq!(out.learning_rate, t.learning_rate);
    }

    #[test]
    fn presets_match_seed_003() {
        let names: Vec<String> = preset_group("learning_rate")
            .into_iter()
            .map(|p| p.variant)
            .collect();
        assert_eq!(
            names,
            ["lr1e-05", "lr5e-05", "lr0.0001", "lr0.0002", "lr0.0005"]
        );
        assert_eq!(preset_group("batch_size").len(), 4);
        assert_eq!(preset_group("grpo_beta").len(), 5);
        assert_eq!(preset_group("lora_rank").len(), 5);
    }
}
