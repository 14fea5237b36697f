//! EvalSkill (seed 001 §5): eval loss, perplexity, the delta against the
//! base model (the adapter switched off in place, not reloaded), next-token
//! accuracy on the trained tokens, and generation with the KV cache (greedy,
//! temperature, top-p, stop at EOS) scored by exact match.
//!
//! Input [`EvalRequest`] (every `EvalInput` is one); output [`EvalReport`]
//! (its flattened seed fields decode as an `EvalOutput`). Nothing is written.

use std::time::Instant;

use async_trait::async_trait;
use lora_dataset::render::Sample;
use lora_engine::LlamaModel;
use lora_engine::generate::{GenerationConfig, generate};
use lora_engine::lora;
use lora_engine::tokenizer::TextTokenizer;
use lora_skill::{Skill, SkillContext, SkillError, StepResult};
use lora_spec::contracts::eval::{EvalOutput, EvalReport, EvalRequest, GeneratedSample};
use lora_spec::contracts::names;
use lora_training::TrainError;
use lora_training::batch::{Row, TokenizedSample, collate};
use lora_training::data::{TextPipeline, read_samples};
use lora_training::loss::{DEFAULT_CHUNK_ELEMENTS, LossStats};
use lora_training::skill::{device_name, parse_device, resolve_model_dir};
use lora_training::step::evaluate_batches;
use lora_training::trainer::EngineModel;
use tch::{Device, Kind};

/// The `eval` skill.
#[derive(Debug, Clone, Copy, Default)]
pub struct EvalSkill;

/// The reference completion of a sample (what generation should reproduce).
pub fn reference_of(s: &Sample) -> Option<String> {
    match s {
        Sample::Instruction { output, .. } => Some(output.clone()),
        Sample::PromptCompletion { completion, .. } => Some(completion.clone()),
        Sample::Chat(m) => m
            .iter()
            .rev()
            .find(|x| x.role == "assistant")
            .map(|x| x.content.clone()),
        Sample::Text(_) => None,
    }
}

/// The sample without its last assistant answer (the prompt to generate from).
fn prompt_sample(s: &Sample) -> Option<Sample> {
    match s {
        Sample::Chat(m) => {
            let i = m.iter().rposition(|x| x.role == "assistant")?;
            Some(Sample::Chat(m[..i].to_vec()))
        }
        Sample::Text(_) => None,
        other => Some(other.clone()),
    }
}

fn batches(
    samples: &[TokenizedSample],
    bs: usize,
    pad: u32,
    device: Device,
) -> Vec<lora_training::batch::Batch> {
    let mut order: Vec<usize> = (0..samples.len()).collect();
    order.sort_by_key(|&i| samples[i].input_ids.len());
    order
        .chunks(bs.max(1))
        .map(|c| {
            let rows: Vec<Row> = c.iter().map(|&i| vec![i]).collect();
            collate(samples, &rows, pad, 8, device)
        })
        .collect()
}

/// Runs an evaluation (blocking).
pub fn evaluate(
    req: &EvalRequest,
    ctx: &SkillContext,
) -> Result<StepResult<EvalReport>, SkillError> {
    if let Some(t) = req.threads {
        tch::set_num_threads(t.max(1) as i32);
    }
    let device = parse_device(req.device.as_deref())?;
    let model_dir =
        resolve_model_dir(ctx, &req.base_model).map_err(|e| e.with_field("base_model"))?;
    let template = req.prompt_template.clone().unwrap_or_else(|| "auto".into());
    let pipeline = TextPipeline::new(&model_dir, &template)?;
    let data_path = ctx.resolve(&req.eval_dataset_path);
    let mut rows = read_samples(&data_path).map_err(SkillError::from)?;
    if let Some(n) = req.max_samples {
        rows.truncate(n as usize);
    }
    let max_len = req.max_seq_length.unwrap_or(1024).max(8) as usize;
    let mut samples = Vec::with_capacity(rows.len());
    // The row each scored sample came from (rows without a target are skipped).
    let mut row_of = Vec::with_capacity(rows.len());
    for (i, s) in rows.iter().enumerate() {
        let (mut t, _) = pipeline.tokenize(s, false).map_err(|e| {
            SkillError::from(e)
                .with_file(data_path.display().to_string())
                .with_hint(format!("row {} could not be rendered", i + 1))
        })?;
        t.truncate(max_len);
        if t.n_targets() > 0 {
            samples.push(t);
            row_of.push(i);
        }
    }
    if samples.is_empty() {
        return Err(
            SkillError::invalid_input("no sample has a target token to score")
                .with_file(data_path.display().to_string())
                .with_hint("the eval set needs completions (output / assistant turns)"),
        );
    }
    ctx.check_cancelled()?;
    let (mut model, report) =
        LlamaModel::load(&model_dir, Kind::Float, device).map_err(SkillError::from)?;
    if !report.is_clean() {
        return Err(
            SkillError::invalid_input(report.summary()).with_file(model_dir.display().to_string())
        );
    }
    if let Some(a) = &req.adapter_path {
        lora::load_peft(&mut model, &ctx.resolve(a))
            .map_err(|e| SkillError::from(e).with_field("adapter_path"))?;
    }
    let bs = req.batch_size.unwrap_or(8) as usize;
    let eb = batches(&samples, bs, pipeline.pad_id, device);
    let score = |m: &LlamaModel| -> Result<LossStats, TrainError> {
        evaluate_batches(&EngineModel::new(m), &eb, DEFAULT_CHUNK_ELEMENTS)
    };
    let mut bar = ctx.progress("eval", Some(2), "passes");
    let stats = score(&model)?;
    bar.update(
        1,
        Some(format!("loss {:.4}", stats.mean())),
        &[("eval_loss", stats.mean())],
    );
    ctx.check_cancelled()?;
    let base = if req.compute_delta && req.adapter_path.is_some() {
        lora::set_enabled(&mut model, false);
        let b = score(&model);
        lora::set_enabled(&mut model, true);
        Some(b?)
    } else if req.compute_delta {
        Some(stats)
    } else {
        None
    };
    bar.finish("scored");
    let sample_losses = if req.per_sample {
        let mut out = vec![None; rows.len()];
        let mut bar = ctx.progress("per-sample loss", Some(samples.len() as u64), "samples");
        for (k, &row) in row_of.iter().enumerate() {
            ctx.check_cancelled()?;
            let one = collate(&samples, &[vec![k]], pipeline.pad_id, 8, device);
            let st = evaluate_batches(
                &EngineModel::new(&model),
                std::slice::from_ref(&one),
                DEFAULT_CHUNK_ELEMENTS,
            )?;
            out[row] = Some(st.mean());
            bar.update(k as u64 + 1, None, &[]);
        }
        bar.finish("scored per sample");
        Some(out)
    } else {
        None
    };

    let n_gen = req.generate_samples.unwrap_or(0) as usize;
    let mut generations = Vec::new();
    let mut gen_speed = None;
    if n_gen > 0 {
        let tok = TextTokenizer::from_dir(&model_dir).map_err(SkillError::from)?;
        let add_special = pipeline.renderer.special_tokens().add_special_tokens;
        let mut prompts = Vec::new();
        let mut refs = Vec::new();
        for (i, s) in rows.iter().enumerate() {
            if prompts.len() >= n_gen {
                break;
            }
            let (Some(p), Some(r)) = (prompt_sample(s), reference_of(s)) else {
                continue;
            };
            let text = pipeline.prompt_text(&p).map_err(SkillError::from)?;
            let ids = tok.encode(&text, add_special).map_err(SkillError::from)?;
            if ids.is_empty() {
                continue;
            }
            prompts.push(ids);
            refs.push((i, r));
        }
        let mut eos: Vec<i64> = pipeline.stop_ids.iter().map(|&x| i64::from(x)).collect();
        eos.extend(tok.eos_token_ids.iter().copied());
        let cfg = GenerationConfig {
            max_new_tokens: req.max_new_tokens.unwrap_or(128) as usize,
            temperature: req.temperature.unwrap_or(0.0),
            top_p: req.top_p,
            eos_token_ids: eos.clone(),
            pad_token_id: i64::from(pipeline.pad_id),
            seed: req.seed,
            ..Default::default()
        };
        let t0 = Instant::now();
        let mut new_tokens = 0usize;
        let mut bar = ctx.progress("generate", Some(prompts.len() as u64), "samples");
        for (k, (p, (idx, r))) in prompts.iter().zip(refs).enumerate() {
            ctx.check_cancelled()?;
            let g = generate(&model, std::slice::from_ref(p), &cfg, Some(&tok))
                .map_err(SkillError::from)?
                .remove(0);
            new_tokens += g.token_ids.len();
            let completion = g.text.unwrap_or_default().trim().to_owned();
            let exact = completion == r.trim();
            generations.push(GeneratedSample {
                index: idx as u64,
                completion,
                reference: r,
                exact_match: exact,
            });
            bar.update(k as u64 + 1, None, &[]);
        }
        bar.finish("generated");
        let secs = t0.elapsed().as_secs_f64();
        gen_speed = (secs > 0.0).then(|| new_tokens as f64 / secs);
    }
    let exact_match = (!generations.is_empty()).then(|| {
        generations.iter().filter(|g| g.exact_match).count() as f64 / generations.len() as f64
    });
    let eval_loss = stats.mean();
    let out = EvalOutput {
        eval_loss,
        eval_perplexity: eval_loss.exp(),
        base_loss: base.map(|b| b.mean()),
        delta_vs_base_loss: base.map(|b| eval_loss - b.mean()),
    };
    let report = EvalReport {
        base_perplexity: out.base_loss.map(f64::exp),
        token_accuracy: stats.accuracy(),
        base_token_accuracy: base.map(|b| b.accuracy()),
        exact_match,
        samples: samples.len() as u64,
        tokens: stats.n_targets as u64,
        generations,
        generation_tokens_per_s: gen_speed,
        device: device_name(device),
        output: out,
        sample_losses,
    };
    let mut text = format!(
        "eval loss {:.4} (perplexity {:.2}), token accuracy {:.3} on {} samples / {} tokens",
        eval_loss,
        report.output.eval_perplexity,
        report.token_accuracy,
        report.samples,
        report.tokens
    );
    if let (Some(b), Some(d)) = (report.output.base_loss, report.output.delta_vs_base_loss) {
        text.push_str(&format!("; base loss {b:.4}, delta {d:+.4}"));
    }
    if let Some(em) = exact_match {
        text.push_str(&format!("; exact match {:.1}%", em * 100.0));
    }
    Ok(StepResult::new(report).with_text(text))
}

#[async_trait]
impl Skill for EvalSkill {
    type Input = EvalRequest;
    type Output = EvalReport;

    fn name(&self) -> &'static str {
        names::EVAL
    }

    fn description(&self) -> &'static str {
        "Evaluate a LoRA adapter on held-out data: eval loss, perplexity, the base model's loss \
         (adapter switched off) and the delta, token accuracy, and optionally generated \
         completions (KV cache, greedy or sampled) scored by exact match."
    }

    fn requires_gpu(&self) -> bool {
        true
    }

    async fn run(
        &self,
        input: EvalRequest,
        ctx: &SkillContext,
    ) -> Result<StepResult<EvalReport>, SkillError> {
        let ctx2 = ctx.clone();
        tokio::task::spawn_blocking(move || evaluate(&input, &ctx2))
            .await
            .map_err(|e| SkillError::backend(format!("the eval task failed: {e}")))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lora_engine::lora::LoraSpec;
    use std::path::{Path, PathBuf};

    /// The tiny llama fixture (made by transformers through the project's Python, cached).
    fn tiny_llama() -> PathBuf {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let dir = std::env::temp_dir().join(format!("lora-eval-fixture-{}", std::process::id()));
        let py = std::env::var_os("LORA_TRAINER_PYTHON")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join(".pyenv/bin/python"));
        let out = std::process::Command::new(py)
            .arg(root.join("tests/fixtures/tiny_models.py"))
            .arg(&dir)
            .args(["--archs", "llama"])
            .env("OMP_NUM_THREADS", "2")
            .output()
            .expect("the project's Python");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir.join("llama")
    }

    #[test]
    fn base_is_measured_with_the_adapter_off_and_generation_is_scored() {
        let model_dir = tiny_llama();
        let work = tempfile::tempdir().unwrap();
        let data = work.path().join("eval.jsonl");
        std::fs::write(
            &data,
            "{\"instruction\": \"the quick brown fox\", \"output\": \"jumps over the lazy dog\"}\n\
             {\"instruction\": \"one two three\", \"output\": \"four five six\"}\n\
             {\"messages\": [{\"role\": \"user\", \"content\": \"capital of france?\"}, {\"role\": \"assistant\", \"content\": \"paris\"}]}\n",
        )
        .unwrap();
        // An adapter with non-zero B, written in PEFT format.
        let (mut m, _) = LlamaModel::load(&model_dir, Kind::Float, Device::Cpu).unwrap();
        tch::manual_seed(4);
        let spec = LoraSpec::new(4, 8.0, 0.0, false, &["q_proj".into(), "v_proj".into()]);
        lora::attach(&mut m, &spec).unwrap();
        tch::no_grad(|| {
            for (_, t) in lora::adapter_tensors(&m) {
                let _ = t.shallow_clone().uniform_(-0.3, 0.3);
            }
        });
        let adapter = work.path().join("adapter");
        lora::save_peft(&m, &spec, None, &adapter).unwrap();

        let ctx = SkillContext::new(work.path());
        let mut req = EvalRequest::from(lora_spec::contracts::eval::EvalInput {
            adapter_path: Some(adapter.display().to_string()),
            base_model: model_dir.display().to_string(),
            eval_dataset_path: data.display().to_string(),
            compute_perplexity: true,
            compute_delta: true,
        });
        req.device = Some("cpu".into());
        req.generate_samples = Some(2);
        req.max_new_tokens = Some(4);
        let with = evaluate(&req, &ctx).unwrap().data;
        let o = &with.output;
        assert!(o.eval_loss.is_finite() && o.eval_loss > 0.0);
        assert!((o.eval_perplexity - o.eval_loss.exp()).abs() < 1e-9);
        let base = o.base_loss.unwrap();
        assert!((o.delta_vs_base_loss.unwrap() - (o.eval_loss - base)).abs() < 1e-12);
        assert!(
            (o.eval_loss - base).abs() > 1e-4,
            "the adapter changes the loss"
        );
        assert_eq!(with.samples, 3);
        assert_eq!(with.generations.len(), 2);
        assert!(with.exact_match.is_some());

        // The base measured by switching the adapter off equals a model loaded without it.
        let mut no_adapter = req.clone();
        no_adapter.adapter_path = None;
        no_adapter.generate_samples = None;
        let plain = evaluate(&no_adapter, &ctx).unwrap().data;
        assert!(
            (plain.output.eval_loss - base).abs() < 1e-9,
            "{} vs {base}",
            plain.output.eval_loss
        );
        assert_eq!(plain.output.delta_vs_base_loss, Some(0.0));
        assert_eq!(plain.sample_losses, None, "only when asked");

        // Per-sample losses (a loss-based curriculum's scores): one per row, in
        // file order, each the loss that row has when evaluated alone.
        let mut per = no_adapter.clone();
        per.per_sample = true;
        let losses = evaluate(&per, &ctx).unwrap().data.sample_losses.unwrap();
        assert_eq!(losses.len(), 3);
        let second = work.path().join("second.jsonl");
        std::fs::write(
            &second,
            "{\"instruction\": \"one two three\", \"output\": \"four five six\"}\n",
        )
        .unwrap();
        let mut alone = no_adapter.clone();
        alone.eval_dataset_path = second.display().to_string();
        let alone = evaluate(&alone, &ctx).unwrap().data.output.eval_loss;
        assert!(
            (losses[1].unwrap() - alone).abs() < 1e-6,
            "{losses:?} vs {alone}"
        );
        assert!(losses.iter().all(|l| l.is_some_and(f64::is_finite)));
        let _ = std::fs::remove_dir_all(model_dir.parent().unwrap());
    }
}
