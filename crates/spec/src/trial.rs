//! `TrialConfig` (one concrete training run) and `SearchSpace` (HPO ranges).
//!
//! `TrialConfig::default()` is the one place where hyper-parameter defaults
//! live; the spec's `config:` section, the smart defaults and the HPO skill
//! all start from it.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The parameter-efficient fine-tuning method (seed 001's `PEFTMethod`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum PeftMethod {
    /// Low-rank adapters on a full-precision base.
    #[default]
    Lora,
    /// LoRA on a 4-bit (NF4) quantised base.
    Qlora,
    /// Prefix tuning (parsed and validated; no trainer yet).
    Prefix,
    /// IA3 (parsed and validated; no trainer yet).
    Ia3,
}

impl PeftMethod {
    /// The method's name as written in specs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Lora => "lora",
            Self::Qlora => "qlora",
            Self::Prefix => "prefix",
            Self::Ia3 => "ia3",
        }
    }
}

/// Learning-rate schedule after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum LrScheduler {
    /// Half-cosine decay to zero.
    #[default]
    Cosine,
    /// Linear decay to zero.
    Linear,
    /// Constant after warm-up.
    Constant,
}

/// The concrete configuration of one training run (seed 000 §2, seed 001 §4).
///
/// Every field has a default, so `{"trial_id": 1, "lora_rank": 16}` is a
/// complete trial. `gradient_accumulation` is derived from `batch_size`
/// (the effective batch) and `micro_batch_size` by [`TrialConfig::normalized`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct TrialConfig {
    /// Trial number within the experiment (0 for a spec's base config).
    pub trial_id: u32,
    /// Random seed: adapter init, dropout, data order.
    pub seed: u64,
    /// Base model: a local Hugging Face folder or a hub id (resolved offline from the cache).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_model: Option<String>,
    /// PEFT method.
    pub method: PeftMethod,
    /// Peak learning rate (AdamW).
    pub learning_rate: f64,
    /// LoRA rank `r`.
    pub lora_rank: u32,
    /// LoRA alpha; the adapter is scaled by `alpha / r` (or `alpha / sqrt(r)` with rsLoRA).
    pub lora_alpha: f64,
    /// Dropout on the adapter input.
    pub lora_dropout: f64,
    /// Projections that get adapters (`q_proj`, ..., or `all-linear`).
    pub target_modules: Vec<String>,
    /// Rank-stabilised LoRA scaling (`alpha / sqrt(r)`).
    pub use_rslora: bool,
    /// Effective batch size in samples per optimiser step.
    pub batch_size: u32,
    /// Samples per forward pass; `batch_size / micro_batch_size` micro-batches are accumulated.
    pub micro_batch_size: u32,
    /// Micro-batches per optimiser step (derived; 0 means "derive it").
    pub gradient_accumulation: u32,
    /// Passes over the training data (fractions allowed).
    pub epochs: f64,
    /// Hard cap on optimiser steps (overrides `epochs` when set).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<u64>,
    /// Warm-up as a fraction of all steps (ignored when `warmup_steps` is set).
    pub warmup_ratio: f64,
    /// Warm-up in optimiser steps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_steps: Option<u64>,
    /// Decoupled weight decay (AdamW).
    pub weight_decay: f64,
    /// Schedule after warm-up.
    pub lr_scheduler: LrScheduler,
    /// Gradient-norm clipping threshold (0 disables clipping).
    pub max_grad_norm: f64,
    /// Sequences are truncated to this many tokens.
    pub max_seq_length: u32,
    /// Base weight quantisation for QLoRA (4 or 8); none for LoRA.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantization_bits: Option<u8>,
    /// Recompute activations in the backward pass to save memory.
    pub gradient_checkpointing: bool,
    /// Train on the prompt tokens too (default: completions only).
    pub train_on_inputs: bool,
    /// Pack several samples per sequence (no attention across samples).
    pub packing: bool,
    /// Evaluate every N optimiser steps (none: at the end only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_steps: Option<u64>,
    /// Checkpoint every N optimiser steps (none: at the end only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub save_steps: Option<u64>,
    /// Divergence guard: a training loss above this (or NaN/Inf) stops the trial as failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub early_stop_loss: Option<f64>,
    /// Prompt template: `auto` (the model's chat template, else alpaca), `alpaca`, `chatml`, `llama3`, `model`.
    pub prompt_template: String,
}

impl Default for TrialConfig {
    fn default() -> Self {
        Self {
            trial_id: 0,
            seed: 42,
            base_model: None,
            method: PeftMethod::Lora,
            learning_rate: 2e-4,
            lora_rank: 16,
            lora_alpha: 32.0,
            lora_dropout: 0.05,
            target_modules: ["q_proj", "k_proj", "v_proj", "o_proj"]
                .map(String::from)
                .to_vec(),
            use_rslora: false,
            batch_size: 16,
            micro_batch_size: 4,
            gradient_accumulation: 0,
            epochs: 3.0,
            max_steps: None,
            warmup_ratio: 0.03,
            warmup_steps: None,
            weight_decay: 0.0,
            lr_scheduler: LrScheduler::Cosine,
            max_grad_norm: 1.0,
            max_seq_length: 512,
            quantization_bits: None,
            gradient_checkpointing: false,
            train_on_inputs: false,
            packing: false,
            eval_steps: None,
            save_steps: None,
            early_stop_loss: None,
            prompt_template: "auto".into(),
        }
    }
}

/// Linear projections LoRA can adapt in Llama-family models.
pub const LLAMA_LINEAR_MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

impl TrialConfig {
    /// A copy with derived fields filled in: `gradient_accumulation`
    /// (`ceil(batch_size / micro_batch_size)`, and `micro_batch_size` clamped to
    /// `batch_size`), `quantization_bits` = 4 for QLoRA when unset.
    pub fn normalized(&self) -> Self {
        let mut t = self.clone();
        t.micro_batch_size = t.micro_batch_size.clamp(1, t.batch_size.max(1));
        t.gradient_accumulation = t.batch_size.max(1).div_ceil(t.micro_batch_size);
        if t.method == PeftMethod::Qlora && t.quantization_bits.is_none() {
            t.quantization_bits = Some(4);
        }
        t
    }

    /// The adapter scale: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn lora_scale(&self) -> f64 {
        let r = f64::from(self.lora_rank.max(1));
        if self.use_rslora {
            self.lora_alpha / r.sqrt()
        } else {
            self.lora_alpha / r
        }
    }

    /// `target_modules` with `all-linear` expanded to the seven Llama projections.
    pub fn expanded_targets(&self) -> Vec<String> {
        if self
            .target_modules
            .iter()
            .any(|m| m == "all-linear" || m == "all_linear")
        {
            LLAMA_LINEAR_MODULES.iter().map(|s| s.to_string()).collect()
        } else {
            self.target_modules.clone()
        }
    }

    /// Semantic checks. Returns `(field, message, hint)` triples.
    pub fn check(&self) -> Vec<crate::Issue> {
        let mut out = Vec::new();
        let mut bad = |field: &str, msg: String, hint: &str| {
            out.push(crate::Issue::new(field, msg).hint(hint));
        };
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0 && self.learning_rate < 1.0)
        {
            bad(
                "learning_rate",
                format!("must be in (0, 1) (got {})", self.learning_rate),
                "LoRA learning rates are usually between 1e-5 and 5e-4",
            );
        }
        if self.lora_rank == 0 {
            bad(
                "lora_rank",
                "must be at least 1 (got 0)".into(),
                "use a rank such as 8, 16 or 32",
            );
        }
        if !(self.lora_alpha.is_finite() && self.lora_alpha > 0.0) {
            bad(
                "lora_alpha",
                format!("must be positive (got {})", self.lora_alpha),
                "alpha is often 1-2x the rank",
            );
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            bad(
                "lora_dropout",
                format!("must be in [0, 1) (got {})", self.lora_dropout),
                "typical values are 0.0-0.1",
            );
        }
        if self.target_modules.is_empty() {
            bad(
                "target_modules",
                "must name at least one module".into(),
                "for example [q_proj, v_proj] or [all-linear]",
            );
        }
        if self.batch_size == 0 {
            bad("batch_size", "must be at least 1".into(), "for example 16");
        }
        if self.micro_batch_size == 0 {
            bad(
                "micro_batch_size",
                "must be at least 1".into(),
                "for example 4",
            );
        }
        if self.batch_size > 0
            && self.micro_batch_size > 0
            && self.micro_batch_size <= self.batch_size
            && !self.batch_size.is_multiple_of(self.micro_batch_size)
        {
            bad(
                "batch_size",
                format!(
                    "{} is not a multiple of micro_batch_size {}",
                    self.batch_size, self.micro_batch_size
                ),
                "choose batch_size = micro_batch_size x gradient accumulation steps",
            );
        }
        if !(self.epochs.is_finite() && self.epochs > 0.0) && self.max_steps.is_none() {
            bad(
                "epochs",
                format!("must be positive (got {})", self.epochs),
                "for example 1 or 3",
            );
        }
        if self.max_steps == Some(0) {
            bad(
                "max_steps",
                "must be at least 1".into(),
                "or leave it out to use epochs",
            );
        }
        if !(0.0..=0.5).contains(&self.warmup_ratio) {
            bad(
                "warmup_ratio",
                format!("must be in [0, 0.5] (got {})", self.warmup_ratio),
                "typical values are 0.0-0.1",
            );
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            bad(
                "weight_decay",
                "must be >= 0".into(),
                "typical values are 0.0-0.1",
            );
        }
        if !(self.max_grad_norm.is_finite() && self.max_grad_norm >= 0.0) {
            bad(
                "max_grad_norm",
                "must be >= 0".into(),
                "1.0 is common; 0 disables clipping",
            );
        }
        if self.max_seq_length < 8 {
            bad(
                "max_seq_length",
                format!("must be at least 8 (got {})", self.max_seq_length),
                "for example 512 or 2048",
            );
        }
        if let Some(b) = self.quantization_bits
            && b != 4
            && b != 8
        {
            bad(
                "quantization_bits",
                format!("must be 4 or 8 (got {b})"),
                "QLoRA uses 4-bit NF4",
            );
        }
        if self.method == PeftMethod::Lora && self.quantization_bits.is_some() {
            bad(
                "quantization_bits",
                "is set but method is lora".into(),
                "use method: qlora for a quantised base, or drop quantization_bits",
            );
        }
        if let Some(l) = self.early_stop_loss
            && !(l.is_finite() && l > 0.0)
        {
            bad(
                "early_stop_loss",
                "must be a positive number".into(),
                "for example 10.0",
            );
        }
        const TEMPLATES: [&str; 5] = ["auto", "alpaca", "chatml", "llama3", "model"];
        if !TEMPLATES.contains(&self.prompt_template.as_str()) {
            bad(
                "prompt_template",
                format!("unknown template `{}`", self.prompt_template),
                "one of auto, alpaca, chatml, llama3, model",
            );
        }
        out
    }
}

/// Ranges the HPO skill searches (seed 000 §2, seed 001 §6).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct SearchSpace {
    /// Lowest learning rate (log-uniform).
    pub lr_min: f64,
    /// Highest learning rate (log-uniform).
    pub lr_max: f64,
    /// LoRA ranks to choose from (categorical, ordered).
    pub rank_choices: Vec<u32>,
    /// Lowest alpha, as a multiple of the rank (alpha = ratio x r).
    pub alpha_ratio_min: f64,
    /// Highest alpha, as a multiple of the rank.
    pub alpha_ratio_max: f64,
    /// Lowest LoRA dropout.
    pub dropout_min: f64,
    /// Highest LoRA dropout.
    pub dropout_max: f64,
    /// Effective batch sizes to choose from.
    pub batch_size_choices: Vec<u32>,
    /// Lowest warm-up ratio.
    pub warmup_ratio_min: f64,
    /// Highest warm-up ratio.
    pub warmup_ratio_max: f64,
    /// Sets of target modules to choose from.
    pub target_module_sets: Vec<Vec<String>>,
    /// Methods to choose from (seed 001's `methods`); empty means the base config's method.
    pub methods: Vec<PeftMethod>,
}

impl Default for SearchSpace {
    fn default() -> Self {
        Self {
            lr_min: 1e-5,
            lr_max: 5e-4,
            rank_choices: vec![8, 16, 32, 64],
            alpha_ratio_min: 1.0,
            alpha_ratio_max: 2.0,
            dropout_min: 0.0,
            dropout_max: 0.1,
            batch_size_choices: vec![8, 16, 32],
            warmup_ratio_min: 0.0,
            warmup_ratio_max: 0.1,
            target_module_sets: vec![
                vec!["q_proj".into(), "v_proj".into()],
                vec![
                    "q_proj".into(),
                    "k_proj".into(),
                    "v_proj".into(),
                    "o_proj".into(),
                ],
                vec!["all-linear".into()],
            ],
            methods: Vec::new(),
        }
    }
}

impl SearchSpace {
    /// Semantic checks.
    pub fn check(&self) -> Vec<crate::Issue> {
        let mut out = Vec::new();
        if !(self.lr_min > 0.0 && self.lr_min.is_finite()) {
            out.push(
                crate::Issue::new("lr_min", format!("must be positive (got {})", self.lr_min))
                    .hint("the learning rate is searched on a log scale, so both ends must be > 0"),
            );
        }
        if self.lr_min > self.lr_max {
            out.push(
                crate::Issue::new(
                    "lr_min",
                    format!(
                        "lr_min {} is greater than lr_max {}",
                        self.lr_min, self.lr_max
                    ),
                )
                .hint("swap them, e.g. lr_min: 1e-5, lr_max: 5e-4"),
            );
        }
        if self.rank_choices.is_empty() || self.rank_choices.contains(&0) {
            out.push(
                crate::Issue::new("rank_choices", "must be a non-empty list of ranks >= 1")
                    .hint("for example [16, 32, 64]"),
            );
        }
        let pairs = [
            (
                "alpha_ratio_min",
                self.alpha_ratio_min,
                self.alpha_ratio_max,
                0.0,
                f64::MAX,
            ),
            ("dropout_min", self.dropout_min, self.dropout_max, 0.0, 0.99),
            (
                "warmup_ratio_min",
                self.warmup_ratio_min,
                self.warmup_ratio_max,
                0.0,
                0.5,
            ),
        ];
        for (field, lo, hi, min, max) in pairs {
            if !(lo >= min && hi <= max && lo <= hi) {
                out.push(
                    crate::Issue::new(field, format!("range [{lo}, {hi}] is invalid"))
                        .hint(format!("need {min} <= min <= max <= {max}")),
                );
            }
        }
        if self.batch_size_choices.is_empty() || self.batch_size_choices.contains(&0) {
            out.push(
                crate::Issue::new(
                    "batch_size_choices",
                    "must be a non-empty list of sizes >= 1",
                )
                .hint("for example [8, 16, 32]"),
            );
        }
        if self.target_module_sets.iter().any(|s| s.is_empty()) {
            out.push(
                crate::Issue::new("target_module_sets", "contains an empty set")
                    .hint("each set names at least one module"),
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_001_example_is_a_complete_trial() {
        let t: TrialConfig =
            serde_json::from_str(r#"{"trial_id": 1, "lora_rank": 16, "learning_rate": 2e-4}"#)
                .unwrap();
        assert_eq!(t.trial_id, 1);
        assert_eq!(t.learning_rate, 0.0002);
        assert!(t.check().is_empty());
    }

    #[test]
    fn gradient_accumulation_is_derived_from_the_effective_batch() {
        let t = TrialConfig {
            batch_size: 32,
            micro_batch_size: 4,
            ..Default::default()
        };
        assert_eq!(t.normalized().gradient_accumulation, 8);
        let t = TrialConfig {
            batch_size: 2,
            micro_batch_size: 8,
            ..Default::default()
        };
        let n = t.normalized();
        assert_eq!((n.micro_batch_size, n.gradient_accumulation), (2, 1));
    }

    #[test]
    fn qlora_defaults_to_four_bits_and_lora_rejects_bits() {
        let t = TrialConfig {
            method: PeftMethod::Qlora,
            ..Default::default()
        };
        assert_eq!(t.normalized().quantization_bits, Some(4));
        let t = TrialConfig {
            quantization_bits: Some(4),
            ..Default::default()
        };
        assert!(t.check().iter().any(|i| i.path == "quantization_bits"));
    }

    #[test]
    fn scale_follows_peft() {
        let t = TrialConfig {
            lora_rank: 16,
            lora_alpha: 32.0,
            ..Default::default()
        };
        assert_eq!(t.lora_scale(), 2.0);
        let t = TrialConfig {
            use_rslora: true,
            ..t
        };
        assert_eq!(t.lora_scale(), 8.0);
    }

    #[test]
    fn bad_values_are_reported_by_field() {
        let t = TrialConfig {
            lora_rank: 0,
            learning_rate: -1.0,
            lora_dropout: 1.5,
            batch_size: 10,
            micro_batch_size: 4,
            ..Default::default()
        };
        let fields: Vec<_> = t.check().into_iter().map(|i| i.path).collect();
        for f in ["lora_rank", "learning_rate", "lora_dropout", "batch_size"] {
            assert!(fields.iter().any(|x| x == f), "{f} missing from {fields:?}");
        }
    }

    #[test]
    fn search_space_rejects_inverted_lr() {
        let s = SearchSpace {
            lr_min: 1e-3,
            lr_max: 1e-4,
            ..Default::default()
        };
        assert_eq!(s.check()[0].path, "lr_min");
        assert!(SearchSpace::default().check().is_empty());
    }

    #[test]
    fn all_linear_expands() {
        let t = TrialConfig {
            target_modules: vec!["all-linear".into()],
            ..Default::default()
        };
        assert_eq!(t.expanded_targets().len(), 7);
    }
}
