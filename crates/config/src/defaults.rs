//! Smart defaults (seed 002): a complete [`TrialConfig`] from the model, the
//! method, the data and the hardware, with one line of rationale per choice,
//! a search space around it and a distributed-strategy recommendation.
//!
//! Rules (each is a heuristic from common practice, stated as such):
//! - learning rate by method and size: LoRA/QLoRA 3e-4 below 1B, 2e-4 up to
//!   13B (QLoRA paper), 1e-4 up to 40B, 5e-5 above; full fine-tuning 10-20×
//!   lower; IA3 3e-3; prefix tuning 1e-2;
//! - rank by data size (more data supports more capacity): 8 below 1k
//!   samples, 16 below 10k, 32 below 100k, else 64; alpha = 2·r;
//! - all linear projections of the family as targets (QLoRA paper: adapting
//!   every linear layer is what matches full fine-tuning);
//! - effective batch 8/16/32/64 by data size; the largest power-of-two
//!   micro-batch that fits (with gradient checkpointing only when nothing fits
//!   without it), the rest as accumulation;
//! - epochs 3 below 10k samples, 2 below 100k, else 1; `max_steps` from
//!   samples × (1 − eval fraction) × epochs / batch; warm-up 10 % of steps
//!   below 100 steps, 5 % below 1000, else 3 %; cosine schedule (constant
//!   below 20 steps); evaluation and checkpoints every ~10 % of the run;
//! - sequence length: the data's p99 (else its longest record, else 512)
//!   rounded up to 64, within [128, model context, 8192];
//! - strategy: one device → single; several → DDP when a replica fits one
//!   device, FSDP for 7-70B or when it does not fit, DeepSpeed ZeRO-3 above 70B.

use lora_spec::contracts::config::{StrategyAdvice, Task};
use lora_spec::trial::{LrScheduler, PeftMethod, SearchSpace, TrialConfig};

use crate::dataset::DatasetInfo;
use crate::device::DeviceSpec;
use crate::memory::{MemoryCoefficients, MemoryReport, Recipe, TrainSetup, estimate_memory};
use crate::model::{Family, InputGroup, ModelFacts};

/// What smart defaults are computed from.
#[derive(Debug, Clone)]
pub struct DefaultsRequest<'a> {
    /// The base model.
    pub facts: &'a ModelFacts,
    /// PEFT method.
    pub method: PeftMethod,
    /// What the fine-tune is for.
    pub task: Task,
    /// The data (may be empty).
    pub dataset: &'a DatasetInfo,
    /// The device.
    pub device: &'a DeviceSpec,
    /// Memory available per device, GB.
    pub vram_limit_gb: f64,
    /// Devices.
    pub num_gpus: u32,
    /// Fixed sequence length, else derived from the data.
    pub max_seq_length: Option<u32>,
    /// Fixed epochs, else derived from the data size.
    pub epochs: Option<f64>,
    /// Fixed effective batch, else derived from the data size.
    pub target_batch_size: Option<u32>,
    /// Fraction of the data held out for evaluation.
    pub eval_fraction: f64,
}

/// The result: a trial, its search space, the strategy, and why.
#[derive(Debug, Clone)]
pub struct SmartDefaults {
    /// The suggested trial.
    pub trial: TrialConfig,
    /// HPO ranges around it.
    pub search_space: SearchSpace,
    /// Distributed-strategy recommendation.
    pub strategy: StrategyAdvice,
    /// One line per choice.
    pub rationale: Vec<String>,
    /// The setup the memory estimate was made for.
    pub setup: TrainSetup,
    /// Its memory estimate.
    pub memory: MemoryReport,
    /// Whether it fits the limit.
    pub fits: bool,
}

/// Peak learning rate by method and model size (billions of parameters).
pub fn default_learning_rate(method: Recipe, params_b: f64) -> f64 {
    match method {
        Recipe::Lora | Recipe::Qlora => {
            if params_b < 1.0 {
                3e-4
            } else if params_b <= 13.5 {
                2e-4
            } else if params_b <= 40.0 {
                1e-4
            } else {
                5e-5
            }
        }
        Recipe::FullFt => {
            if params_b < 3.0 {
                2e-5
            } else {
                1e-5
            }
        }
        Recipe::Ia3 => 3e-3,
        Recipe::Prefix => 1e-2,
    }
}

/// Every linear projection of the family, by the names PEFT matches.
pub fn all_linear_targets(facts: &ModelFacts) -> Vec<String> {
    facts.module_names()
}

/// The attention projections only (the classic `q_proj, v_proj`-style choice).
pub fn attention_targets(facts: &ModelFacts) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for m in &facts.linear_modules {
        if matches!(m.group, InputGroup::AttnIn | InputGroup::AttnOut) && !out.contains(&m.name) {
            out.push(m.name.clone());
        }
    }
    out
}

fn round_up(x: u64, to: u64) -> u64 {
    x.div_ceil(to) * to
}

/// Recommends a distributed strategy (a recommendation, not a requirement).
pub fn recommend_strategy(
    facts: &ModelFacts,
    device: &DeviceSpec,
    num_gpus: u32,
    replica_fits: bool,
) -> StrategyAdvice {
    let mixed_precision = if device.is_cpu() {
        "fp32"
    } else if device.bf16 {
        "bf16"
    } else {
        "fp16"
    }
    .to_string();
    let b = facts.params_b();
    let (kind, reason) = if num_gpus <= 1 || device.is_cpu() {
        ("single", "one device: no distribution needed".to_string())
    } else if b > 70.0 {
        (
            "deepspeed",
            format!(
                "{b:.0}B parameters: shard weights, gradients and optimiser state (ZeRO-3) across {num_gpus} devices"
            ),
        )
    } else if replica_fits && b < 7.0 {
        (
            "ddp",
            format!(
                "a full replica fits one device: data parallel over {num_gpus} devices is simplest and fastest"
            ),
        )
    } else if replica_fits {
        (
            "ddp",
            format!(
                "{b:.1}B parameters but a LoRA replica fits one device: data parallel; FSDP if memory gets tight"
            ),
        )
    } else {
        (
            "fsdp",
            format!(
                "a replica does not fit one device: shard the {b:.1}B base across {num_gpus} devices with FSDP"
            ),
        )
    };
    StrategyAdvice {
        kind: kind.into(),
        mixed_precision,
        reason,
    }
}

/// Computes smart defaults.
pub fn smart_defaults(req: &DefaultsRequest<'_>, coef: &MemoryCoefficients) -> SmartDefaults {
    let f = req.facts;
    let d = req.dataset;
    let recipe = Recipe::from(req.method);
    let mut why = Vec::new();
    let mut t = TrialConfig {
        base_model: Some(f.name.clone()),
        method: req.method,
        ..TrialConfig::default()
    };
    let samples = d.total_samples;

    // Learning rate.
    t.learning_rate = default_learning_rate(recipe, f.params_b());
    why.push(format!(
        "learning_rate {:e}: {} on a {:.2}B model",
        t.learning_rate,
        req.method.as_str(),
        f.params_b()
    ));

    // Rank, alpha, dropout.
    let n = samples.unwrap_or(5_000);
    let mut rank: u32 = match n {
        0..1_000 => 8,
        1_000..10_000 => 16,
        10_000..100_000 => 32,
        _ => 64,
    };
    if req.task == Task::Domain && rank < 64 {
        rank *= 2;
    }
    rank = rank
        .min(u32::try_from(f.hidden_size / 4).unwrap_or(u32::MAX))
        .max(1);
    t.lora_rank = rank;
    t.lora_alpha = f64::from(2 * rank);
    t.lora_dropout = if n < 1_000 { 0.1 } else { 0.05 };
    why.push(format!(
        "lora_rank {rank}, alpha {}: {} samples{}",
        2 * rank,
        samples.map_or("unknown number of".to_string(), |s| s.to_string()),
        if req.task == Task::Domain {
            ", doubled for domain adaptation"
        } else {
            ""
        }
    ));

    // Targets.
    t.target_modules = all_linear_targets(f);
    why.push(format!(
        "target_modules {}: every linear projection of the {} family",
        t.target_modules.join(", "),
        f.family.as_str()
    ));

    // Sequence length.
    let seq = req.max_seq_length.unwrap_or_else(|| {
        let want = d
            .p99_tokens
            .or(d.max_tokens)
            .map(|x| round_up(x.max(1) + 1, 64))
            .unwrap_or(512);
        u32::try_from(want.clamp(128, f.max_position_embeddings.clamp(128, 8192))).unwrap_or(512)
    });
    t.max_seq_length = seq;
    why.push(format!(
        "max_seq_length {seq}: {}",
        if req.max_seq_length.is_some() {
            "as given".to_string()
        } else if d.p99_tokens.is_some() {
            "the data's 99th percentile, rounded up to 64".to_string()
        } else if d.max_tokens.is_some() {
            "the data's longest record, rounded up to 64".to_string()
        } else {
            "no token statistics; a common default".to_string()
        }
    ));

    // Effective batch and micro-batch that fits.
    let target = req.target_batch_size.unwrap_or(match n {
        0..1_000 => 8,
        1_000..20_000 => 16,
        20_000..200_000 => 32,
        _ => 64,
    });
    let target = target.max(1);
    let base_setup = TrainSetup::from_trial(&t, req.device);
    let fits = |s: &TrainSetup| estimate_memory(f, s, coef).total_gb() <= req.vram_limit_gb;
    let mut chosen: Option<TrainSetup> = None;
    'outer: for ckpt in [false, true] {
        let mut mb = target.next_power_of_two().min(target.max(1));
        if mb > target {
            mb /= 2;
        }
        // A CPU gains little from wide micro-batches; keep memory modest.
        if req.device.is_cpu() {
            mb = mb.min(4);
        }
        while mb >= 1 {
            let s = TrainSetup {
                micro_batch_size: mb,
                gradient_checkpointing: ckpt,
                ..base_setup.clone()
            };
            if fits(&s) {
                chosen = Some(s);
                break 'outer;
            }
            mb /= 2;
        }
    }
    let setup = chosen.clone().unwrap_or_else(|| TrainSetup {
        micro_batch_size: 1,
        gradient_checkpointing: true,
        ..base_setup.clone()
    });
    // Keep the effective batch a multiple of the micro-batch.
    let batch = round_up(u64::from(target), u64::from(setup.micro_batch_size)) as u32;
    t.batch_size = batch;
    t.micro_batch_size = setup.micro_batch_size;
    t.gradient_checkpointing = setup.gradient_checkpointing;
    t = t.normalized();
    why.push(format!(
        "batch_size {batch} = micro_batch_size {} × accumulation {}{}",
        t.micro_batch_size,
        t.gradient_accumulation,
        match (&chosen, setup.gradient_checkpointing) {
            (None, _) => format!(
                ", and even that exceeds {:.0} GB (see memory_estimate.suggestions)",
                req.vram_limit_gb
            ),
            (Some(_), true) => format!(
                ", gradient checkpointing on: nothing fits {:.0} GB without it",
                req.vram_limit_gb
            ),
            (Some(_), false) => format!(
                ": the largest micro-batch that fits {:.0} GB",
                req.vram_limit_gb
            ),
        }
    ));

    // Epochs, steps, warm-up, schedule, intervals.
    t.epochs = req.epochs.unwrap_or(match n {
        0..10_000 => 3.0,
        10_000..100_000 => 2.0,
        _ => 1.0,
    });
    if let Some(s) = samples {
        let train = ((s as f64) * (1.0 - req.eval_fraction.clamp(0.0, 0.9))).max(1.0);
        let per_epoch = (train / f64::from(batch)).ceil().max(1.0);
        let steps = (per_epoch * t.epochs).ceil().max(1.0) as u64;
        t.max_steps = Some(steps);
        t.warmup_ratio = if steps < 100 {
            0.1
        } else if steps < 1000 {
            0.05
        } else {
            0.03
        };
        t.lr_scheduler = if steps < 20 {
            LrScheduler::Constant
        } else {
            LrScheduler::Cosine
        };
        let every = (steps / 10).max(1);
        t.eval_steps = Some(every);
        t.save_steps = Some(every);
        why.push(format!(
            "max_steps {steps}: {train:.0} training samples × {} epochs / batch {batch}; warm-up {:.0} %, {} schedule, eval and checkpoint every {every} steps",
            t.epochs,
            t.warmup_ratio * 100.0,
            if steps < 20 { "constant" } else { "cosine" }
        ));
    } else {
        why.push(format!(
            "epochs {}: dataset size unknown, so no max_steps (run dataset_analyze for step counts)",
            t.epochs
        ));
    }

    // Method-specific.
    t.weight_decay = 0.0;
    if recipe == Recipe::Qlora {
        t.quantization_bits = Some(4);
        t.max_grad_norm = 0.3;
        why.push("qlora: 4-bit NF4 base, max_grad_norm 0.3 (QLoRA paper)".into());
    }
    t.train_on_inputs = req.task == Task::Domain || !d.has_target() && !d.is_unknown();
    t.packing = req.task == Task::Domain;
    if t.packing {
        why.push("packing on: raw-text domain adaptation has no prompt to mask".into());
    }

    // Search space around the defaults.
    let lr = t.learning_rate;
    let mut ranks: Vec<u32> = [rank / 2, rank, rank * 2, rank * 4]
        .into_iter()
        .filter(|r| *r >= 4 && u64::from(*r) < f.hidden_size && *r <= 256)
        .collect();
    ranks.dedup();
    if ranks.is_empty() {
        ranks.push(rank);
    }
    let mut batches: Vec<u32> = [batch / 2, batch, batch * 2]
        .into_iter()
        .filter(|b| *b >= t.micro_batch_size && b % t.micro_batch_size == 0)
        .collect();
    batches.dedup();
    let attn = attention_targets(f);
    let qv: Vec<String> = attn
        .iter()
        .filter(|n| matches!(n.as_str(), "q_proj" | "v_proj"))
        .cloned()
        .collect();
    let mut sets = Vec::new();
    if qv.len() == 2 {
        sets.push(qv);
    }
    sets.push(attn);
    sets.push(t.target_modules.clone());
    sets.dedup();
    let search_space = SearchSpace {
        lr_min: lr / 4.0,
        lr_max: (lr * 2.5).min(0.9),
        rank_choices: ranks,
        alpha_ratio_min: 1.0,
        alpha_ratio_max: 2.0,
        dropout_min: 0.0,
        dropout_max: 0.1,
        batch_size_choices: if batches.is_empty() {
            vec![batch]
        } else {
            batches
        },
        warmup_ratio_min: 0.0,
        warmup_ratio_max: 0.1,
        target_module_sets: sets,
        methods: vec![req.method],
    };

    let final_setup = TrainSetup::from_trial(&t, req.device);
    let memory = estimate_memory(f, &final_setup, coef);
    let fits = memory.total_gb() <= req.vram_limit_gb;
    let strategy = recommend_strategy(f, req.device, req.num_gpus, fits);
    why.push(format!("strategy {}: {}", strategy.kind, strategy.reason));
    if f.family == Family::Gpt2 && t.max_seq_length as u64 > f.max_position_embeddings {
        t.max_seq_length = u32::try_from(f.max_position_embeddings).unwrap_or(1024);
    }
    SmartDefaults {
        trial: t,
        search_space,
        strategy,
        rationale: why,
        setup: final_setup,
        memory,
        fits,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests: a panic is the failure report.
mod tests {
    use super::*;
    use crate::device;
    use crate::model::{ResolveOptions, resolve_model};
    use serde_json::json;

    fn req<'a>(
        facts: &'a ModelFacts,
        method: PeftMethod,
        data: &'a DatasetInfo,
        dev: &'a DeviceSpec,
        vram: f64,
    ) -> DefaultsRequest<'a> {
        DefaultsRequest {
            facts,
            method,
            task: Task::Instruction,
            dataset: data,
            device: dev,
            vram_limit_gb: vram,
            num_gpus: 1,
            max_seq_length: None,
            epochs: None,
            target_batch_size: None,
            eval_fraction: 0.1,
        }
    }

    #[test]
    fn llama_8b_qlora_on_24_gb_is_complete_and_fits() {
        let f = resolve_model("meta-llama/Llama-3.1-8B", &ResolveOptions::default()).unwrap();
        let dev = device::lookup("rtx-4090", 1, 0.0).unwrap();
        let data = DatasetInfo::from_profile(&json!({
            "total_samples": 5000, "avg_tokens": 300.0, "max_tokens": 4000,
            "token_percentiles": {"p50": 250, "p95": 800, "p99": 1500},
            "has_instruction": true, "has_output": true, "record_format": "alpaca"
        }));
        let out = smart_defaults(
            &req(&f, PeftMethod::Qlora, &data, &dev, 24.0),
            &MemoryCoefficients::default(),
        );
        let t = &out.trial;
        assert!(out.fits, "{:?}", out.memory);
        assert!(t.check().is_empty(), "{:?}", t.check());
        assert_eq!(t.learning_rate, 2e-4);
        assert_eq!(t.lora_rank, 16);
        assert_eq!(t.target_modules.len(), 7);
        assert_eq!(t.max_seq_length, 1536);
        assert_eq!(t.batch_size, 16);
        assert_eq!(t.batch_size, t.micro_batch_size * t.gradient_accumulation);
        // 4500 training samples / 16 = 282 steps per epoch × 3 epochs.
        assert_eq!(t.max_steps, Some(846));
        assert_eq!(t.eval_steps, Some(84));
        assert_eq!(t.quantization_bits, Some(4));
        assert_eq!(out.strategy.kind, "single");
        assert!(out.search_space.check().is_empty());
        assert!(out.search_space.rank_choices.contains(&16));
        assert!(out.rationale.len() >= 6);
    }

    #[test]
    fn tight_memory_turns_on_checkpointing_and_shrinks_micro_batch() {
        let f = resolve_model("meta-llama/Llama-3.2-1B", &ResolveOptions::default()).unwrap();
        let dev = device::lookup("t4", 1, 0.0).unwrap();
        let data = DatasetInfo::from_profile(&json!({"total_samples": 50000, "max_tokens": 2000}));
        let roomy = smart_defaults(
            &req(&f, PeftMethod::Lora, &data, &dev, 80.0),
            &MemoryCoefficients::default(),
        );
        let tight = smart_defaults(
            &req(&f, PeftMethod::Lora, &data, &dev, 8.0),
            &MemoryCoefficients::default(),
        );
        assert!(tight.fits);
        assert!(
            tight.trial.micro_batch_size < roomy.trial.micro_batch_size
                || tight.trial.gradient_checkpointing
        );
        assert_eq!(tight.trial.batch_size, roomy.trial.batch_size);
        assert_eq!(tight.strategy.mixed_precision, "fp16");
    }

    #[test]
    fn cpu_keeps_micro_batches_small() {
        let f = resolve_model("HuggingFaceTB/SmolLM2-135M", &ResolveOptions::default()).unwrap();
        let cpu = device::DeviceSpec::cpu(2, 24.0);
        let data = DatasetInfo::from_profile(&json!({"total_samples": 30000, "max_tokens": 200}));
        let out = smart_defaults(
            &req(&f, PeftMethod::Lora, &data, &cpu, 24.0),
            &MemoryCoefficients::default(),
        );
        assert_eq!(out.trial.micro_batch_size, 4);
        assert_eq!(out.trial.batch_size, 32);
        assert_eq!(out.strategy.mixed_precision, "fp32");
    }

    #[test]
    fn family_targets_and_strategies() {
        let g = resolve_model("gpt2", &ResolveOptions::default()).unwrap();
        assert_eq!(all_linear_targets(&g), ["c_attn", "c_proj", "c_fc"]);
        let p = resolve_model(
            "microsoft/Phi-3-mini-4k-instruct",
            &ResolveOptions::default(),
        )
        .unwrap();
        assert_eq!(attention_targets(&p), ["qkv_proj", "o_proj"]);
        let big = resolve_model("meta-llama/Llama-3.1-70B", &ResolveOptions::default()).unwrap();
        let a100 = device::lookup("a100", 1, 0.0).unwrap();
        assert_eq!(recommend_strategy(&big, &a100, 8, false).kind, "deepspeed");
        let l8 = resolve_model("meta-llama/Llama-3.1-8B", &ResolveOptions::default()).unwrap();
        assert_eq!(recommend_strategy(&l8, &a100, 4, true).kind, "ddp");
        assert_eq!(recommend_strategy(&l8, &a100, 4, false).kind, "fsdp");
        assert_eq!(recommend_strategy(&l8, &a100, 1, false).kind, "single");
        assert_eq!(default_learning_rate(Recipe::Lora, 0.135), 3e-4);
        assert_eq!(default_learning_rate(Recipe::Lora, 70.0), 5e-5);
        assert_eq!(default_learning_rate(Recipe::FullFt, 8.0), 1e-5);
    }
}
