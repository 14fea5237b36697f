//! End-to-end trainer tests on the tiny Llama fixture: exact resume, same
//! seed same losses, config-hash refusal, divergence stop, eval history,
//! learning, metrics.jsonl and the PEFT adapter written at the end.

use std::path::Path;

use lora_spec::trial::{LrScheduler, TrialConfig};
use tch::Device;

use crate::testutil::{tiny_llama, write_alpaca};
use crate::trainer::{NoMonitor, Outcome, TrainOptions, train};

fn trial() -> TrialConfig {
    TrialConfig {
        seed: 11,
        learning_rate: 5e-3,
        lora_rank: 4,
        lora_alpha: 8.0,
        lora_dropout: 0.1,
        target_modules: vec!["all-linear".into()],
        batch_size: 4,
        micro_batch_size: 2,
        max_steps: Some(6),
        warmup_steps: Some(2),
        lr_scheduler: LrScheduler::Cosine,
        weight_decay: 0.01,
        max_grad_norm: 1.0,
        max_seq_length: 64,
        save_steps: Some(3),
        ..Default::default()
    }
}

fn opts(t: TrialConfig, data: &Path, out: &Path) -> TrainOptions {
    let mut o = TrainOptions::new(t, tiny_llama(), data, out);
    o.device = Device::Cpu;
    o.threads = Some(1);
    o
}

/// libtorch's generator and thread count are process-wide: trainer tests run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn bits(v: &[f64]) -> Vec<u64> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn stopped_and_resumed_run_has_bit_identical_losses() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("train.jsonl");
    write_alpaca(&data, 21);

    let full = train(&opts(trial(), &data, &dir.path().join("a")), &mut NoMonitor).unwrap();
    assert_eq!(full.outcome, Outcome::Completed);
    assert_eq!(full.losses.len(), 6);

    let out_b = dir.path().join("b");
    let mut first = opts(trial(), &data, &out_b);
    first.stop_after_steps = Some(3);
    let part = train(&first, &mut NoMonitor).unwrap();
    assert!(
        matches!(part.outcome, Outcome::Stopped(_)),
        "{:?}",
        part.outcome
    );
    assert_eq!(
        bits(&part.losses),
        bits(&full.losses[..3]),
        "same seed, same losses"
    );
    let ck = part.checkpoint_path.clone().unwrap();
    assert!(ck.ends_with("checkpoint-00000003"), "{}", ck.display());
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "optimizer.safetensors",
        "trainer_state.json",
    ] {
        assert!(ck.join(f).is_file(), "{f}");
    }

    let mut second = opts(trial(), &data, &out_b);
    second.resume_from = Some(ck);
    let resumed = train(&second, &mut NoMonitor).unwrap();
    assert_eq!(resumed.outcome, Outcome::Completed);
    assert_eq!(bits(&resumed.losses), bits(&full.losses), "resume is exact");
    // The final adapters are the same tensors.
    let read = |p: std::path::PathBuf| {
        let mut v = tch::Tensor::read_safetensors(p.join("adapter_model.safetensors")).unwrap();
        v.sort_by(|x, y| x.0.cmp(&y.0));
        v
    };
    let a = read(full.adapter_path.unwrap());
    let b = read(resumed.adapter_path.unwrap());
    let keys = |v: &[(String, tch::Tensor)]| v.iter().map(|x| x.0.clone()).collect::<Vec<_>>();
    assert_eq!(keys(&a), keys(&b));
    assert_eq!(a.len(), 2 * 2 * 7);
    for ((ka, ta), (kb, tb)) in a.iter().zip(b.iter()) {
        assert_eq!(ka, kb);
        assert!(ta.equal(tb), "{ka}");
    }
    // metrics.jsonl of the resumed run has each step once.
    let lines = std::fs::read_to_string(out_b.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = lines
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("loss").is_some())
        .map(|v| v["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [1, 2, 3, 4, 5, 6]);
    let first_line: serde_json::Value =
        serde_json::from_str(lines.lines().next().unwrap()).unwrap();
    for k in ["loss", "lr", "grad_norm", "tokens_per_s"] {
        assert!(first_line[k].is_number(), "{k} in {first_line}");
    }

    // A changed configuration is refused on resume.
    let mut other = opts(
        TrialConfig {
            learning_rate: 1e-3,
            ..trial()
        },
        &data,
        &out_b,
    );
    other.resume_from = part.checkpoint_path;
    let err = train(&other, &mut NoMonitor).unwrap_err().to_string();
    assert!(err.contains("another configuration"), "{err}");
}

#[test]
fn divergence_stops_the_run_as_failed_and_keeps_no_bad_adapter() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("train.jsonl");
    write_alpaca(&data, 8);
    let t = TrialConfig {
        early_stop_loss: Some(0.01),
        ..trial()
    };
    let r = train(&opts(t, &data, &dir.path().join("o")), &mut NoMonitor).unwrap();
    match &r.outcome {
        Outcome::Failed(reason) => assert!(reason.contains("early_stop_loss"), "{reason}"),
        other => panic!("expected failure, got {other:?}"),
    }
    assert_eq!(r.steps, 0);
    assert!(r.adapter_path.is_none());
}

#[test]
fn training_learns_and_evaluates_every_n_steps() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("train.jsonl");
    write_alpaca(&data, 12);
    let t = TrialConfig {
        max_steps: Some(16),
        learning_rate: 2e-2,
        lora_dropout: 0.0,
        eval_steps: Some(5),
        save_steps: None,
        lr_scheduler: LrScheduler::Constant,
        ..trial()
    };
    let mut o = opts(t, &data, &dir.path().join("o"));
    o.eval_data = Some(data.clone());
    let r = train(&o, &mut NoMonitor).unwrap();
    assert_eq!(r.outcome, Outcome::Completed);
    let steps: Vec<u64> = r.eval_history.iter().map(|e| e.step).collect();
    assert_eq!(steps, [5, 10, 15, 16]);
    let first = r.eval_history[0].eval_loss;
    let last = r.eval_history[3].eval_loss;
    assert!(
        last < first - 0.3,
        "eval loss should fall on its own training data: {first} -> {last}"
    );
    assert!(r.plan.trained_fraction < 0.9, "the prompt is masked");
}

/// Packing: three samples packed into one row (block-diagonal causal
/// attention, positions restarting per sample, no target across a boundary)
/// give the same loss and the same LoRA gradients as the three samples
/// collated as separate, padded rows.
#[test]
fn a_packed_row_has_the_loss_and_gradients_of_its_samples_apart() {
    use crate::batch::{TokenizedSample, collate};
    use crate::loss::DEFAULT_CHUNK_ELEMENTS;
    use crate::step::accumulate_gradients;
    use crate::trainer::EngineModel;
    use lora_engine::LlamaModel;
    use lora_engine::lora::{self, LoraSpec};
    use tch::{Kind, Tensor};

    let _g = serial();
    let (mut m, _) = LlamaModel::load(tiny_llama(), Kind::Float, Device::Cpu).unwrap();
    tch::manual_seed(7);
    let spec = LoraSpec::new(4, 8.0, 0.0, false, &["all-linear".into()]);
    lora::attach(&mut m, &spec).unwrap();
    tch::no_grad(|| {
        for (_, t) in lora::adapter_tensors(&m) {
            let _ = t.shallow_clone().uniform_(-0.2, 0.2);
        }
    });
    let vocab = m.config.vocab_size as u32;
    let samples: Vec<TokenizedSample> = [(9usize, 3usize), (5, 1), (12, 6)]
        .iter()
        .enumerate()
        .map(|(k, &(n, prompt))| TokenizedSample {
            input_ids: (0..n as u32)
                .map(|i| (i * 37 + k as u32 * 101 + 5) % vocab)
                .collect(),
            trainable: (0..n).map(|i| i >= prompt).collect(),
        })
        .collect();
    let engine = EngineModel::new(&m);
    let run = |rows: &[Vec<usize>]| -> (f64, i64, Vec<Tensor>) {
        for (_, t) in lora::adapter_tensors(&m) {
            let mut g = t.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        let batch = collate(&samples, rows, 0, 8, Device::Cpu);
        let stats = accumulate_gradients(
            &engine,
            std::slice::from_ref(&batch),
            DEFAULT_CHUNK_ELEMENTS,
        )
        .unwrap();
        let grads = lora::adapter_tensors(&m)
            .iter()
            .map(|(_, t)| t.grad().copy())
            .collect();
        (stats.loss_sum, stats.n_targets as i64, grads)
    };
    let (packed_loss, packed_n, packed_g) = run(&[vec![0, 1, 2]]);
    let (apart_loss, apart_n, apart_g) = run(&[vec![0], vec![1], vec![2]]);
    assert_eq!(packed_n, apart_n);
    assert_eq!(
        packed_n,
        6 + 4 + 6,
        "targets: trainable tokens after the first, per sample"
    );
    assert!(
        (packed_loss - apart_loss).abs() < 1e-5 * apart_loss.abs().max(1.0),
        "{packed_loss} vs {apart_loss}"
    );
    let worst = packed_g
        .iter()
        .zip(&apart_g)
        .map(|(a, b)| (a - b).abs().max().double_value(&[]))
        .fold(0.0f64, f64::max);
    let scale = apart_g
        .iter()
        .map(|g| g.abs().max().double_value(&[]))
        .fold(0.0f64, f64::max);
    assert!(
        scale > 0.0 && worst < 1e-5 * scale.max(1.0),
        "max |Δgrad| {worst} (scale {scale})"
    );
}

/// The whole trainer with `packing: true` runs (packed rows through the
/// engine's block-diagonal attention) and packs tighter than one sample per
/// row.
#[test]
fn packing_trains_end_to_end() {
    let _g = serial();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("train.jsonl");
    write_alpaca(&data, 21);
    let mut t = trial();
    t.packing = true;
    t.max_steps = Some(3);
    let r = train(&opts(t, &data, &dir.path().join("p")), &mut NoMonitor).unwrap();
    assert_eq!(r.outcome, Outcome::Completed);
    assert!(r.losses.iter().all(|l| l.is_finite()), "{:?}", r.losses);
    assert!(
        r.plan.packing_efficiency > 0.5,
        "{}",
        r.plan.packing_efficiency
    );
}

/// Activation checkpointing: without dropout, the layer-by-layer recomputed
/// backward gives the gradients of the ordinary one (1e-6 relative), for plain
/// and packed rows; with dropout, the replay draws the same masks, so a
/// checkpointed run is deterministic and trains.
#[test]
fn checkpointed_gradients_equal_the_ordinary_ones() {
    use crate::batch::{TokenizedSample, collate};
    use crate::loss::DEFAULT_CHUNK_ELEMENTS;
    use crate::step::{TrainableModel, accumulate_gradients};
    use crate::trainer::{CheckpointedModel, EngineModel};
    use lora_engine::LlamaModel;
    use lora_engine::lora::{self, LoraSpec};
    use tch::{Kind, Tensor};

    let _g = serial();
    let (mut m, _) = LlamaModel::load(tiny_llama(), Kind::Float, Device::Cpu).unwrap();
    tch::manual_seed(3);
    let spec = LoraSpec::new(4, 8.0, 0.0, false, &["all-linear".into()]);
    lora::attach(&mut m, &spec).unwrap();
    tch::no_grad(|| {
        for (_, t) in lora::adapter_tensors(&m) {
            let _ = t.shallow_clone().uniform_(-0.2, 0.2);
        }
    });
    let vocab = m.config.vocab_size as u32;
    let samples: Vec<TokenizedSample> = (0..4usize)
        .map(|k| {
            let n = 6 + 3 * k;
            TokenizedSample {
                input_ids: (0..n as u32)
                    .map(|i| (i * 53 + k as u32 * 17 + 3) % vocab)
                    .collect(),
                trainable: (0..n).map(|i| i >= 2).collect(),
            }
        })
        .collect();
    let zero = |m: &LlamaModel| {
        for (_, t) in lora::adapter_tensors(m) {
            let mut g = t.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    };
    let grads = |model: &dyn TrainableModel, rows: &[Vec<usize>]| -> (f64, Vec<Tensor>) {
        zero(&m);
        let b = collate(&samples, rows, 0, 8, Device::Cpu);
        let st =
            accumulate_gradients(model, std::slice::from_ref(&b), DEFAULT_CHUNK_ELEMENTS).unwrap();
        let g = lora::adapter_tensors(&m)
            .iter()
            .map(|(_, t)| t.grad().copy())
            .collect();
        (st.loss_sum, g)
    };
    // The fused pass (the default) against autograd with and without
    // checkpointing.
    let fused = EngineModel::new(&m);
    let plain = EngineModel::autograd(&m);
    let ckpt = CheckpointedModel::new(&m);
    for rows in [
        vec![vec![0], vec![1], vec![2], vec![3]],
        vec![vec![0, 1], vec![2, 3]],
    ] {
        // One sample per row takes the fused pass; packed rows (two per
        // row) fall back to autograd.
        let b = collate(&samples, &rows, 0, 8, Device::Cpu);
        let took = fused
            .fused_step(&b, &m.lm_head.weight, 1.0, DEFAULT_CHUNK_ELEMENTS)
            .unwrap()
            .is_some();
        assert_eq!(took, b.attention_mask.is_none());
        zero(&m);
        let (l1, g1) = grads(&plain, &rows);
        // The fused pass may multiply with the engine's own GEMM
        // (lora_engine::matmul), whose summation order differs from MKL's:
        // f32 rounding, hence its looser bound.
        for (other, tol) in [(&ckpt as &dyn TrainableModel, 1e-6), (&fused, 1e-5)] {
            let (l2, g2) = grads(other, &rows);
            assert!((l1 - l2).abs() < 1e-6 * l1.abs(), "{l1} vs {l2}");
            let scale = g1
                .iter()
                .map(|g| g.abs().max().double_value(&[]))
                .fold(0.0, f64::max);
            let worst = g1
                .iter()
                .zip(&g2)
                .map(|(a, b)| (a - b).abs().max().double_value(&[]))
                .fold(0.0f64, f64::max);
            assert!(
                scale > 0.0 && worst <= tol * scale,
                "{rows:?}: max |Δgrad| {worst} of {scale}"
            );
        }
    }

    // Through the trainer, with dropout: same seed, same losses; it learns.
    drop(ckpt);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("train.jsonl");
    write_alpaca(&data, 21);
    let mut t = trial();
    t.gradient_checkpointing = true;
    let a = train(
        &opts(t.clone(), &data, &dir.path().join("a")),
        &mut NoMonitor,
    )
    .unwrap();
    let b = train(&opts(t, &data, &dir.path().join("b")), &mut NoMonitor).unwrap();
    assert_eq!(a.outcome, Outcome::Completed);
    assert_eq!(bits(&a.losses), bits(&b.losses));
}
