//! The preflight estimate against torchtune's published figures (torchtune
//! README, "Memory and training speed"): Llama 3.1 8B on one RTX 4090,
//! batch 2, packed to 2048 tokens, torch.compile on; LoRA 16.2 GiB and 3,083
//! tokens/s, QLoRA 7.4 GiB and 2,413 tokens/s. The setups are torchtune's
//! recipe configs (`llama3_1/8B_lora_single_device`,
//! `8B_qlora_single_device`): rank 8, alpha 16, no dropout, LoRA on q/v/output
//! (plus k for QLoRA) and the MLP, activation checkpointing on, bf16
//! weights and adapters, chunked cross-entropy over 8 chunks.

#![allow(clippy::unwrap_used, clippy::print_stderr)] // Tests: a panic is the failure report; figures go to stderr.

use lora_config::device;
use lora_config::memory::{
    AttentionImpl, Dtype, MemoryCoefficients, Recipe, TrainSetup, estimate_memory,
};
use lora_config::model::{ResolveOptions, resolve_model};
use lora_config::throughput::{ThroughputCoefficients, estimate_step};

fn setup(recipe: Recipe, targets: &[&str]) -> TrainSetup {
    TrainSetup {
        recipe,
        micro_batch_size: 2,
        seq_len: 2048,
        gradient_checkpointing: true,
        lora_rank: 8,
        target_modules: targets.iter().map(|s| s.to_string()).collect(),
        lora_dropout: 0.0,
        quant_bits: 4,
        double_quant: true,
        weight_dtype: Dtype::Bf16,
        compute_dtype: Dtype::Bf16,
        adapter_dtype: Dtype::Bf16,
        attention: AttentionImpl::Sdpa,
        loss_chunks: 8,
        loss_chunk_elements: 0,
        device: device::DeviceKind::Cuda,
    }
}

fn within(pred: f64, published: f64, what: &str) {
    let err = pred / published - 1.0;
    eprintln!(
        "{what}: predicted {pred:.1}, published {published}, error {:+.1}%",
        err * 100.0
    );
    assert!(
        err.abs() <= 0.25,
        "{what}: predicted {pred:.2} vs published {published} ({:+.1}%)",
        err * 100.0
    );
}

#[test]
fn llama_3_1_8b_on_one_rtx_4090_matches_torchtune_within_25_percent() {
    let facts = resolve_model("meta-llama/Llama-3.1-8B", &ResolveOptions::default()).unwrap();
    let gpu = device::lookup("rtx-4090", 1, 0.0).unwrap();
    let mem = MemoryCoefficients::default();
    let time = ThroughputCoefficients::default();
    let mlp = ["gate_proj", "up_proj", "down_proj"];
    let lora_targets: Vec<&str> = ["q_proj", "v_proj", "o_proj"]
        .into_iter()
        .chain(mlp)
        .collect();
    let qlora_targets: Vec<&str> = ["q_proj", "k_proj", "v_proj", "o_proj"]
        .into_iter()
        .chain(mlp)
        .collect();

    for (recipe, targets, gib, tps) in [
        (Recipe::Lora, &lora_targets, 16.2, 3083.0),
        (Recipe::Qlora, &qlora_targets, 7.4, 2413.0),
    ] {
        let s = setup(recipe, targets);
        let m = estimate_memory(&facts, &s, &mem);
        let trainable = m.trainable_params;
        let t = estimate_step(&facts, &s, &gpu, 1, 2048.0, trainable, &time);
        within(
            m.allocator_peak_gib(),
            gib,
            &format!("{} peak GiB", recipe.as_str()),
        );
        within(
            t.tokens_per_sec,
            tps,
            &format!("{} tokens/s", recipe.as_str()),
        );
    }
}
