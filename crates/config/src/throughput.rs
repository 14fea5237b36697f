//! Time per step and throughput from FLOPs per token, the device's peak
//! and an efficiency factor.
//!
//! LoRA training is not full fine-tuning's 6·N FLOPs per token: the frozen
//! weights need the forward pass (2·N) and the gradient with respect to their
//! input (2·N), but no weight gradient. So the base costs 4·N, plus 2·N of
//! the blocks again when gradient checkpointing recomputes the forward, plus
//! the adapters' own 6·r·(in + out) per adapted module (8 with
//! recomputation), plus attention's score and value products. QLoRA adds the
//! time to dequantise every 4-bit weight on each pass, which is bound by
//! memory bandwidth, not FLOPs. See `docs/MEMORY.md` for the derivation and
//! the calibration of the efficiency factor.

use serde::{Deserialize, Serialize};

use crate::device::DeviceSpec;
use crate::memory::{Recipe, TrainSetup, quantized_bytes_per_param};
use crate::model::ModelFacts;

/// The constants of the time model that measurement may correct.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ThroughputCoefficients {
    /// Fraction of a GPU's peak dense tensor FLOP/s that training achieves (model FLOPs utilisation).
    pub gpu_mfu: f64,
    /// Fraction of the CPU's measured GEMM rate that training achieves.
    pub cpu_efficiency: f64,
    /// Attention backward FLOPs as a multiple of its forward (dQ, dK, dV and the recomputed scores).
    pub attention_backward_ratio: f64,
    /// Fraction of peak memory bandwidth that dequantisation and the optimiser step achieve.
    pub bandwidth_efficiency: f64,
    /// Fixed cost per block per pass (kernel launches, norms, rotary, residuals), microseconds.
    pub per_layer_overhead_us: f64,
    /// Fixed cost per adapted module per pass (dropout, two small GEMMs, scale-add), microseconds.
    pub per_adapter_overhead_us: f64,
}

impl Default for ThroughputCoefficients {
    fn default() -> Self {
        Self {
            gpu_mfu: 0.75,
            cpu_efficiency: 0.6,
            attention_backward_ratio: 2.5,
            bandwidth_efficiency: 0.8,
            per_layer_overhead_us: 60.0,
            per_adapter_overhead_us: 20.0,
        }
    }
}

/// FLOPs of one trained token, by part.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct FlopsPerToken {
    /// Forward through the blocks' projections and the output projection: 2·N.
    pub forward: f64,
    /// Gradient with respect to the inputs of those matrices: 2·N.
    pub backward_input: f64,
    /// Weight gradients of trained base matrices (full fine-tuning only): 2·N.
    pub backward_weights: f64,
    /// Recomputed forward of the blocks under gradient checkpointing: 2·N_blocks.
    pub recompute: f64,
    /// Adapters: forward, both backward products, and recompute.
    pub adapters: f64,
    /// Attention scores and weighted values, forward, backward and recompute.
    pub attention: f64,
}

impl FlopsPerToken {
    /// Sum.
    pub fn total(&self) -> f64 {
        self.forward
            + self.backward_input
            + self.backward_weights
            + self.recompute
            + self.adapters
            + self.attention
    }
}

/// FLOPs per trained token of a setup.
pub fn flops_per_token(
    facts: &ModelFacts,
    setup: &TrainSetup,
    coef: &ThroughputCoefficients,
) -> FlopsPerToken {
    let n_blocks = facts.params.block_linear_weights as f64;
    let n = facts.matmul_params() as f64;
    let ckpt = setup.gradient_checkpointing;
    let full = setup.recipe == Recipe::FullFt;
    let adapters = if matches!(setup.recipe, Recipe::Lora | Recipe::Qlora) {
        let (mods, _) = facts.select_targets(&setup.target_modules);
        let per_token: f64 = mods
            .iter()
            .map(|m| 2.0 * f64::from(setup.lora_rank) * (m.in_features + m.out_features) as f64)
            .sum::<f64>()
            * facts.num_layers as f64;
        per_token * if ckpt { 4.0 } else { 3.0 }
    } else {
        0.0
    };
    // Causal attention: a token attends to (seq + 1) / 2 positions on average;
    // QKᵀ and PV cost 2·q_dim FLOPs per attended position each.
    let s_eff = (f64::from(setup.seq_len) + 1.0) / 2.0;
    let attn_fwd = facts.num_layers as f64 * 4.0 * s_eff * facts.q_dim() as f64;
    let attention = attn_fwd * (1.0 + coef.attention_backward_ratio + if ckpt { 1.0 } else { 0.0 });
    FlopsPerToken {
        forward: 2.0 * n,
        backward_input: 2.0 * n,
        backward_weights: if full { 2.0 * n } else { 0.0 },
        recompute: if ckpt { 2.0 * n_blocks } else { 0.0 },
        adapters,
        attention,
    }
}

/// Time of one optimiser step and the throughput it implies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepEstimate {
    /// FLOPs per trained token.
    pub flops: FlopsPerToken,
    /// Sustained FLOP/s assumed (peak × efficiency).
    pub sustained_flops: f64,
    /// One micro-batch: compute + dequantisation + fixed overheads, ms.
    pub micro_step_ms: f64,
    /// Of which dequantisation (QLoRA), ms.
    pub dequant_ms: f64,
    /// The optimiser update, ms.
    pub optimizer_ms: f64,
    /// One optimiser step (all micro-batches + update), ms.
    pub step_ms: f64,
    /// Trained tokens per second.
    pub tokens_per_sec: f64,
    /// Samples per second.
    pub samples_per_sec: f64,
}

/// Estimates one optimiser step of `grad_accum` micro-batches; `tokens_per_sample`
/// is the mean sample length (for samples/s; the sequence length when packing).
pub fn estimate_step(
    facts: &ModelFacts,
    setup: &TrainSetup,
    device: &DeviceSpec,
    grad_accum: u32,
    tokens_per_sample: f64,
    trainable_params: u64,
    coef: &ThroughputCoefficients,
) -> StepEstimate {
    let flops = flops_per_token(facts, setup, coef);
    let eff = if device.is_cpu() {
        coef.cpu_efficiency
    } else {
        coef.gpu_mfu
    };
    let sustained = device.peak_tflops * 1e12 * eff;
    let tokens = setup.tokens();
    let compute_s = tokens * flops.total() / sustained.max(1.0);
    let passes = if setup.gradient_checkpointing {
        3.0
    } else {
        2.0
    };
    let bw = device.bandwidth_gbs * 1e9 * coef.bandwidth_efficiency;
    let dequant_s = if setup.recipe == Recipe::Qlora {
        // Each pass reads the packed weights and writes them out in the compute dtype.
        let bytes: f64 = facts
            .linear_modules
            .iter()
            .map(|m| {
                m.weight_params() as f64
                    * (quantized_bytes_per_param(
                        setup.quant_bits,
                        setup.double_quant,
                        m.in_features,
                    ) + setup.weight_dtype.bytes())
            })
            .sum::<f64>()
            * facts.num_layers as f64;
        passes * bytes / bw.max(1.0)
    } else {
        0.0
    };
    let adapted = match setup.recipe {
        Recipe::Lora | Recipe::Qlora => facts.select_targets(&setup.target_modules).0.len() as f64,
        _ => 0.0,
    };
    let overhead_s = passes
        * facts.num_layers as f64
        * (coef.per_layer_overhead_us + adapted * coef.per_adapter_overhead_us)
        * 1e-6;
    let micro_s = compute_s + dequant_s + overhead_s;
    // AdamW reads parameter, gradient and two moments and writes three of them back (fp32: 28 B).
    let optimizer_s = trainable_params as f64 * 28.0 / bw.max(1.0);
    let step_s = micro_s * f64::from(grad_accum.max(1)) + optimizer_s;
    let step_tokens = tokens * f64::from(grad_accum.max(1));
    let tokens_per_sec = step_tokens / step_s;
    let samples = f64::from(setup.micro_batch_size)
        * f64::from(grad_accum.max(1))
        * (f64::from(setup.seq_len) / tokens_per_sample.max(1.0)).max(1.0);
    StepEstimate {
        flops,
        sustained_flops: sustained,
        micro_step_ms: micro_s * 1e3,
        dequant_ms: dequant_s * 1e3,
        optimizer_ms: optimizer_s * 1e3,
        step_ms: step_s * 1e3,
        tokens_per_sec,
        samples_per_sec: samples / step_s,
    }
}

/// Fits the efficiency factor (MFU on a GPU, GEMM efficiency on the CPU) to a
/// measured micro-step time, keeping dequantisation and overheads as modelled.
pub fn calibrate_efficiency(
    facts: &ModelFacts,
    setup: &TrainSetup,
    device: &DeviceSpec,
    measured_micro_step_ms: f64,
    coef: &ThroughputCoefficients,
) -> ThroughputCoefficients {
    let est = estimate_step(facts, setup, device, 1, f64::from(setup.seq_len), 0, coef);
    let fixed_ms =
        est.micro_step_ms - setup.tokens() * est.flops.total() / est.sustained_flops.max(1.0) * 1e3;
    let compute_ms = (measured_micro_step_ms - fixed_ms).max(measured_micro_step_ms * 0.05);
    let sustained = setup.tokens() * est.flops.total() / (compute_ms / 1e3);
    let eff = (sustained / (device.peak_tflops * 1e12)).clamp(0.01, 1.0);
    let mut out = coef.clone();
    if device.is_cpu() {
        out.cpu_efficiency = eff;
    } else {
        out.gpu_mfu = eff;
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::print_stderr)] // Tests: a panic is the failure report.
mod tests {
    use super::*;
    use crate::device;
    use crate::memory::{AttentionImpl, Dtype};
    use crate::model::{ResolveOptions, resolve_model};

    fn setup(recipe: Recipe, ckpt: bool) -> TrainSetup {
        TrainSetup {
            recipe,
            micro_batch_size: 2,
            seq_len: 2048,
            gradient_checkpointing: ckpt,
            lora_rank: 8,
            target_modules: vec!["all-linear".into()],
            lora_dropout: 0.0,
            quant_bits: 4,
            double_quant: true,
            weight_dtype: Dtype::Bf16,
            compute_dtype: Dtype::Bf16,
            adapter_dtype: Dtype::F32,
            attention: AttentionImpl::Sdpa,
            loss_chunks: 1,
            loss_chunk_elements: 0,
            device: device::DeviceKind::Cuda,
        }
    }

    #[test]
    fn lora_is_about_4n_and_full_ft_6n() {
        let f = resolve_model("meta-llama/Llama-3.1-8B", &ResolveOptions::default()).unwrap();
        let c = ThroughputCoefficients::default();
        let n = f.matmul_params() as f64;
        let lora = flops_per_token(&f, &setup(Recipe::Lora, false), &c);
        let full = flops_per_token(&f, &setup(Recipe::FullFt, false), &c);
        let r = lora.total() / n;
        assert!((4.0..4.5).contains(&r), "{r}");
        let r = full.total() / n;
        assert!((6.0..6.5).contains(&r), "{r}");
        let ck = flops_per_token(&f, &setup(Recipe::Lora, true), &c);
        assert!(ck.total() > lora.total() + 1.8 * f.params.block_linear_weights as f64);
    }

    #[test]
    fn qlora_is_slower_than_lora_and_calibration_round_trips() {
        let f = resolve_model("meta-llama/Llama-3.2-1B", &ResolveOptions::default()).unwrap();
        let d = device::lookup("a100", 1, 1.0).unwrap();
        let c = ThroughputCoefficients::default();
        let l = estimate_step(&f, &setup(Recipe::Lora, true), &d, 4, 2048.0, 0, &c);
        let q = estimate_step(&f, &setup(Recipe::Qlora, true), &d, 4, 2048.0, 0, &c);
        assert!(q.step_ms > l.step_ms && q.dequant_ms > 0.0);
        assert!((l.step_ms - 4.0 * l.micro_step_ms).abs() < 1e-6);
        let cal = calibrate_efficiency(
            &f,
            &setup(Recipe::Lora, true),
            &d,
            l.micro_step_ms * 2.0,
            &c,
        );
        assert!(
            cal.gpu_mfu < c.gpu_mfu && cal.gpu_mfu > 0.3,
            "{}",
            cal.gpu_mfu
        );
        let again = estimate_step(&f, &setup(Recipe::Lora, true), &d, 1, 2048.0, 0, &cal);
        assert!((again.micro_step_ms / (l.micro_step_ms * 2.0) - 1.0).abs() < 1e-6);
    }
}
