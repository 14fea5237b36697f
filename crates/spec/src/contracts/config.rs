//! LoRAConfigSkill contract (seed 001 §3) and the preflight report (seed 002).
//!
//! Seed 001's fields (`base_model`, `task`, `method`, `vram_limit_gb`,
//! `dataset_profile` → `trial_config`, `search_space`, `memory_estimate
//! {vram_gb, fits, model_params}`) are kept; the rest is added: the hardware
//! the plan is for, the VRAM breakdown, compatibility findings with codes and
//! fix hints, the distributed-strategy recommendation and seed 002's preflight
//! response (`ok, warnings, errors, estimated_vram_mb, vram_breakdown,
//! time_per_step_ms, throughput`).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::experiment::ExperimentSpec;
use crate::trial::{PeftMethod, SearchSpace, TrialConfig};

/// Registry name of the preflight skill (checks an experiment before launch).
pub const PREFLIGHT: &str = "preflight";

/// What the fine-tune is for (seed 001 `task`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    /// Instruction following (alpaca-style pairs).
    #[default]
    Instruction,
    /// Domain adaptation on raw text.
    Domain,
    /// Multi-turn chat.
    Chat,
    /// Style transfer.
    Style,
}

/// Input of `lora_config` (seed 001 `LoRAConfigInput`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LoRAConfigInput {
    /// Base model: local folder, hub id (offline cache) or a known model name.
    pub base_model: String,
    /// What the fine-tune is for.
    #[serde(default)]
    pub task: Task,
    /// PEFT method.
    #[serde(default)]
    pub method: PeftMethod,
    /// Accelerator memory available, in GB.
    #[serde(default = "default_vram")]
    pub vram_limit_gb: f64,
    /// Output of `dataset_analyze`, as JSON (may be empty).
    #[serde(default)]
    pub dataset_profile: serde_json::Value,
    /// Accelerator model the plan is for (`rtx-4090`, `a100-80gb`, `h100`, `cpu`, ...);
    /// when absent, a generic GPU with `vram_limit_gb` of memory.
    #[serde(default)]
    pub gpu_type: Option<String>,
    /// Number of accelerators (for the distributed-strategy recommendation).
    #[serde(default = "one_gpu")]
    pub num_gpus: u32,
    /// Sequence length to plan for; default: from the dataset profile (p99/max tokens), capped by the model.
    #[serde(default)]
    pub max_seq_length: Option<u32>,
    /// Passes over the data; default 3 for small datasets, fewer for large ones.
    #[serde(default)]
    pub epochs: Option<f64>,
    /// Target effective batch in samples (micro-batch × accumulation); default 16.
    #[serde(default)]
    pub target_batch_size: Option<u32>,
}

fn default_vram() -> f64 {
    24.0
}

fn one_gpu() -> u32 {
    1
}

/// How serious a compatibility finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Blocks the experiment.
    Error,
    /// Will run, but probably not as intended.
    Warning,
    /// For information.
    Info,
}

/// One compatibility or preflight finding (seed 002 "machine-readable hints").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Finding {
    /// Stable machine code, e.g. `gguf_not_trainable`, `vram_exceeded`.
    pub code: String,
    /// Error, warning or info.
    pub severity: Severity,
    /// What is wrong, in one sentence.
    pub message: String,
    /// What would fix it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    /// The offending field (`config.lora_rank`), when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// Where the estimated memory goes (seed 002 `vram_breakdown`, in GB = 10^9 bytes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
pub struct VramBreakdown {
    /// Base weights at their storage precision (NF4 + scales for QLoRA).
    pub model_gb: f64,
    /// Trainable parameters (LoRA adapters, or the whole model for full fine-tuning).
    pub lora_gb: f64,
    /// AdamW moments of the trainable parameters.
    pub optimizer_gb: f64,
    /// Gradients of the trainable parameters.
    pub gradients_gb: f64,
    /// Activations kept for the backward pass (checkpoints, or every layer's tensors) plus
    /// the layer being recomputed and the backward transients.
    pub activations_gb: f64,
    /// Vocab-sized logits, log-probabilities and their gradient.
    pub logits_gb: f64,
    /// Allocator fragmentation and library workspaces.
    pub overhead_gb: f64,
    /// CUDA context (or the CPU runtime), outside the tensor allocator.
    pub runtime_gb: f64,
    /// Peak memory of the tensor allocator (what `torch.cuda.max_memory_reserved` reports).
    pub total_gb: f64,
    /// Everything the process needs on the device, runtime included; compared with the limit.
    pub total_with_buffer_gb: f64,
}

/// Memory estimate (seed 001 `memory_estimate`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MemoryEstimate {
    /// Estimated peak accelerator memory in GB (`total_with_buffer_gb`).
    pub vram_gb: f64,
    /// Whether it fits in `vram_limit_gb`.
    pub fits: bool,
    /// Parameters of the base model.
    pub model_params: u64,
    /// Trainable parameters (adapter parameters for LoRA/QLoRA).
    #[serde(default)]
    pub trainable_params: u64,
    /// The limit it was compared with, in GB.
    #[serde(default)]
    pub vram_limit_gb: f64,
    /// Where the memory goes.
    #[serde(default)]
    pub breakdown: VramBreakdown,
    /// When it does not fit: changes that would make it fit, best first, each with its estimate.
    #[serde(default)]
    pub suggestions: Vec<String>,
}

/// What the base model is, as the config skill resolved it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
pub struct ModelSummary {
    /// The name it was asked for.
    pub name: String,
    /// Where the facts came from: `local`, `hf_cache`, `builtin`.
    pub source: String,
    /// Architecture family (`llama`, `mistral`, `qwen2`, `gemma2`, `phi3`, `gpt2`, ...).
    pub family: String,
    /// `architectures[0]` of config.json.
    pub architecture: String,
    /// Exact parameter count computed from the architecture.
    pub params: u64,
    /// Hidden size.
    pub hidden_size: u64,
    /// Transformer blocks.
    pub num_layers: u64,
    /// Vocabulary size.
    pub vocab_size: u64,
    /// Longest context the model was trained for.
    pub max_position_embeddings: u64,
    /// Linear modules LoRA can adapt, by the names PEFT matches (`q_proj`, ...).
    pub linear_modules: Vec<String>,
}

/// Distributed-training recommendation (seed 002 `strategy`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
pub struct StrategyAdvice {
    /// `single`, `ddp`, `fsdp` or `deepspeed`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `bf16`, `fp16` or `fp32`.
    pub mixed_precision: String,
    /// Why, in one sentence (a recommendation, not a requirement).
    pub reason: String,
}

/// Output `data` of `lora_config` (seed 001 §3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LoRAConfigOutput {
    /// Suggested trial with rank, alpha, learning rate and modules.
    pub trial_config: TrialConfig,
    /// HPO ranges for every hyper-parameter.
    pub search_space: SearchSpace,
    /// Memory estimate.
    pub memory_estimate: MemoryEstimate,
    /// The base model's facts.
    #[serde(default)]
    pub model: ModelSummary,
    /// Distributed strategy recommendation.
    #[serde(default)]
    pub strategy: StrategyAdvice,
    /// Compatibility findings (errors block training).
    #[serde(default)]
    pub findings: Vec<Finding>,
    /// Preflight of the suggested trial on the planned hardware.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preflight: Option<PreflightReport>,
    /// Why each default was chosen, one line each.
    #[serde(default)]
    pub rationale: Vec<String>,
}

/// Throughput estimate (seed 002 `throughput`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
pub struct ThroughputEstimate {
    /// Trained tokens per second.
    pub tokens_per_sec: f64,
    /// Samples per second.
    pub samples_per_sec: f64,
}

/// Input of `preflight`: an experiment, given inline or as a file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct PreflightInput {
    /// Path of a seed 000 / seed 001 experiment file (YAML or JSON).
    #[serde(default)]
    pub spec_path: Option<String>,
    /// The flat experiment spec (seed 001), instead of `spec_path`.
    #[serde(default)]
    pub spec: Option<ExperimentSpec>,
    /// Output of `dataset_analyze` for the spec's data (sizes sharpen the estimate); may be empty.
    #[serde(default)]
    pub dataset_profile: serde_json::Value,
}

/// Seed 002's preflight response, with structured findings added.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
pub struct PreflightReport {
    /// No errors: the experiment may start.
    pub ok: bool,
    /// Warning messages (`code: message (hint)`).
    pub warnings: Vec<String>,
    /// Error messages (`code: message (hint)`).
    pub errors: Vec<String>,
    /// Estimated peak device memory, MB (10^6 bytes).
    pub estimated_vram_mb: u64,
    /// Where the memory goes.
    pub vram_breakdown: VramBreakdown,
    /// Estimated time of one optimiser step (all micro-batches), ms.
    pub time_per_step_ms: f64,
    /// Estimated throughput.
    pub throughput: ThroughputEstimate,
    /// Every finding with its code, severity and hint.
    #[serde(default)]
    pub findings: Vec<Finding>,
    /// Whether the estimate fits the memory limit.
    #[serde(default)]
    pub fits: bool,
    /// The memory limit used, GB.
    #[serde(default)]
    pub vram_limit_gb: f64,
    /// The device the estimate is for.
    #[serde(default)]
    pub device: String,
    /// Parameters of the base model.
    #[serde(default)]
    pub model_params: u64,
    /// Trainable parameters.
    #[serde(default)]
    pub trainable_params: u64,
    /// Optimiser steps of one trial (from `max_steps`, or dataset size × epochs / batch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_steps: Option<u64>,
    /// Estimated wall time of one trial, hours.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_hours: Option<f64>,
    /// Changes that would make it fit (when it does not).
    #[serde(default)]
    pub suggestions: Vec<String>,
    /// Model FLOPs per trained token used for the time estimate.
    #[serde(default)]
    pub flops_per_token: f64,
}
