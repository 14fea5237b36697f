//! Text generation, kept apart from the model: greedy decoding or sampling
//! (temperature, top-k, top-p), repetition penalty, stop at EOS ids or stop
//! strings, with the KV cache; a batch of prompts is left-padded.
//!
//! The logits processors follow transformers' order and arithmetic
//! (repetition penalty, then temperature, top-k, top-p), so greedy decoding
//! reproduces `model.generate(do_sample=False)` token for token.

use crate::decode::FastDecoder;
use crate::error::{EngineError, Result};
use crate::model::{KvCache, LlamaModel};
use crate::tokenizer::TextTokenizer;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// How to generate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationConfig {
    /// Most tokens to add per prompt.
    pub max_new_tokens: usize,
    /// EOS is suppressed until this many tokens were generated.
    #[serde(default)]
    pub min_new_tokens: usize,
    /// Sampling temperature; 0 means greedy decoding.
    #[serde(default)]
    pub temperature: f64,
    /// Keep only the `k` most likely tokens when sampling.
    #[serde(default)]
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches `p` when sampling.
    #[serde(default)]
    pub top_p: Option<f64>,
    /// transformers' repetition penalty (1 = off): seen tokens' positive logits
    /// are divided by it, negative ones multiplied.
    #[serde(default = "one")]
    pub repetition_penalty: f64,
    /// Token ids that end a sequence (empty = never).
    #[serde(default)]
    pub eos_token_ids: Vec<i64>,
    /// Texts that end a sequence; the completion is cut before them (needs a tokenizer).
    #[serde(default)]
    pub stop_strings: Vec<String>,
    /// Id used for left padding and for finished rows.
    #[serde(default)]
    pub pad_token_id: i64,
    /// Seed of the sampling RNG (ChaCha8, private to this call; `None` = from the clock).
    #[serde(default)]
    pub seed: Option<u64>,
    /// After the prefill, decode a single fp32 CPU sequence with
    /// [`FastDecoder`] (the same arithmetic with the small operations in
    /// Rust); false keeps every step in the libtorch graph.
    #[serde(default = "yes")]
    pub fast_decode: bool,
}

fn yes() -> bool {
    true
}

fn one() -> f64 {
    1.0
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            min_new_tokens: 0,
            temperature: 0.0,
            top_k: None,
            top_p: None,
            repetition_penalty: 1.0,
            eos_token_ids: Vec::new(),
            stop_strings: Vec::new(),
            pad_token_id: 0,
            seed: None,
            fast_decode: true,
        }
    }
}

impl GenerationConfig {
    /// Checks the values.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(EngineError::invalid(
                "temperature",
                "must be a finite number >= 0 (0 = greedy)",
            ));
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(EngineError::invalid(
                "top_p",
                format!("{p} is outside (0, 1]"),
            ));
        }
        if self.top_k == Some(0) {
            return Err(EngineError::invalid("top_k", "must be at least 1"));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return Err(EngineError::invalid(
                "repetition_penalty",
                "must be > 0 (1 = off)",
            ));
        }
        if self.stop_strings.iter().any(String::is_empty) {
            return Err(EngineError::invalid(
                "stop_strings",
                "an empty stop string would stop at once",
            ));
        }
        Ok(())
    }

    /// Whether tokens are sampled (otherwise greedy).
    pub fn is_sampling(&self) -> bool {
        self.temperature > 0.0
    }
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An EOS id was generated.
    Eos,
    /// A stop string appeared.
    StopString,
    /// `max_new_tokens` was reached.
    Length,
}

/// The completion of one prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    /// New token ids (the EOS id included when it ended the sequence).
    pub token_ids: Vec<i64>,
    /// Decoded text without special tokens, cut before a stop string (when a tokenizer was given).
    pub text: Option<String>,
    /// Why it ended.
    pub finish_reason: FinishReason,
}

/// Applies the repetition penalty to `logits` `[B, V]` for each row's `seen` tokens.
fn repetition_penalty(logits: &Tensor, seen: &[Vec<i64>], penalty: f64) -> Tensor {
    let width = seen.iter().map(Vec::len).max().unwrap_or(0);
    if width == 0 || penalty == 1.0 {
        return logits.shallow_clone();
    }
    // Pad each row with its own first id (scatter of a duplicate writes the same value).
    let mut flat = Vec::with_capacity(seen.len() * width);
    for row in seen {
        let fill = row.first().copied().unwrap_or(0);
        flat.extend(row.iter().copied());
        flat.extend(std::iter::repeat_n(fill, width - row.len()));
    }
    let index = Tensor::from_slice(&flat)
        .view([seen.len() as i64, width as i64])
        .to_device(logits.device());
    let score = logits.gather(1, &index, false);
    let score = (&score * penalty).where_self(&score.lt(0.0), &(&score / penalty));
    logits.scatter(1, &index, &score)
}

/// Masks all but the `k` largest logits of each row.
fn top_k(logits: &Tensor, k: usize) -> Tensor {
    let v = logits.size()[1];
    let k = (k as i64).min(v);
    let (vals, _) = logits.topk(k, -1, true, true);
    let kth = vals.narrow(1, k - 1, 1);
    logits.masked_fill(&logits.lt_tensor(&kth), f64::NEG_INFINITY)
}

/// Nucleus filtering as transformers' `TopPLogitsWarper`.
fn top_p(logits: &Tensor, p: f64) -> Tensor {
    let (sorted, idx) = logits.sort(-1, false);
    let cum = sorted.softmax(-1, Kind::Float).cumsum(-1, Kind::Float);
    let remove = cum.le(1.0 - p);
    let v = remove.size()[1];
    let _ = remove.narrow(1, v - 1, 1).fill_(0);
    let remove = remove.scatter(1, &idx, &remove);
    logits.masked_fill(&remove, f64::NEG_INFINITY)
}

fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Draws an index from a probability row (inverse CDF).
fn sample(probs: &[f32], rng: &mut ChaCha8Rng) -> i64 {
    let total: f64 = probs.iter().map(|&p| f64::from(p)).sum();
    let target = rng.random::<f64>() * total;
    let mut acc = 0.0;
    let mut last = 0;
    for (i, &p) in probs.iter().enumerate() {
        if p > 0.0 {
            acc += f64::from(p);
            last = i;
            if acc > target {
                return i as i64;
            }
        }
    }
    last as i64
}

/// Generates a completion for each prompt (token ids, no padding).
///
/// With a `tokenizer`, completions are decoded and stop strings are honoured.
pub fn generate(
    model: &LlamaModel,
    prompts: &[Vec<i64>],
    cfg: &GenerationConfig,
    tokenizer: Option<&TextTokenizer>,
) -> Result<Vec<Generation>> {
    cfg.validate()?;
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        return Err(EngineError::invalid(
            format!("prompts[{i}]"),
            "empty prompt",
        ));
    }
    if !cfg.stop_strings.is_empty() && tokenizer.is_none() {
        return Err(EngineError::invalid(
            "stop_strings",
            "stop strings need a tokenizer",
        ));
    }
    let vocab = model.config.vocab_size as i64;
    for (i, p) in prompts.iter().enumerate() {
        if let Some(&bad) = p.iter().find(|&&t| t < 0 || t >= vocab) {
            return Err(EngineError::invalid(
                format!("prompts[{i}]"),
                format!("token id {bad} is outside the vocabulary (0..{vocab})"),
            ));
        }
    }
    let _guard = tch::no_grad_guard();
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed.unwrap_or_else(clock_seed));
    let device = model.device();
    let b = prompts.len();
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(b * longest);
    let mut mask = Vec::with_capacity(b * longest);
    for p in prompts {
        let pad = longest - p.len();
        ids.extend(std::iter::repeat_n(cfg.pad_token_id, pad));
        ids.extend(p.iter().copied());
        mask.extend(std::iter::repeat_n(0i64, pad));
        mask.extend(std::iter::repeat_n(1i64, p.len()));
    }
    let (b64, l64) = (b as i64, longest as i64);
    let input = Tensor::from_slice(&ids).view([b64, l64]).to_device(device);
    let padded = mask.contains(&0);
    let mut attn = Tensor::from_slice(&mask).view([b64, l64]).to_device(device);
    // One unpadded fp32 CPU sequence decodes through the fast step after the
    // prefill, which keeps its own cache: the graph cache then holds only the prompt.
    let use_fast = cfg.fast_decode && b == 1 && !padded && FastDecoder::supports(model);
    let graph_tokens = if use_fast {
        0
    } else {
        cfg.max_new_tokens as i64
    };
    let mut cache = KvCache::new(model, b64, l64 + graph_tokens);

    let mut seen: Vec<Vec<i64>> = prompts.to_vec();
    let mut out: Vec<Vec<i64>> = vec![Vec::new(); b];
    let mut done: Vec<Option<FinishReason>> = vec![None; b];
    let mut texts: Vec<Option<String>> = vec![None; b];
    let eos = (!cfg.eos_token_ids.is_empty())
        .then(|| Tensor::from_slice(&cfg.eos_token_ids).to_device(device));

    let mut step_input = input;
    let mut fast: Option<FastDecoder<'_>> = None;
    let mut fed: Vec<i64> = Vec::with_capacity(b);
    for step in 0..cfg.max_new_tokens {
        let mut logits = match fast.as_mut() {
            Some(f) => f.step(fed[0])?,
            None => {
                let hidden = model.forward_hidden_t(
                    &step_input,
                    padded.then_some(&attn),
                    None,
                    Some(&mut cache),
                    false,
                )?;
                let t = hidden.size()[1];
                let last = hidden.narrow(1, t - 1, 1).squeeze_dim(1);
                if use_fast {
                    fast = Some(FastDecoder::from_cache(
                        model,
                        &cache,
                        longest + cfg.max_new_tokens,
                    )?);
                }
                model.lm_head.forward(&last)
            }
        }
        .to_kind(Kind::Float);
        if cfg.repetition_penalty != 1.0 {
            logits = repetition_penalty(&logits, &seen, cfg.repetition_penalty);
        }
        if step < cfg.min_new_tokens
            && let Some(e) = &eos
        {
            let _ = logits.index_fill_(1, e, f64::NEG_INFINITY);
        }
        let next = if cfg.is_sampling() {
            let mut l = logits / cfg.temperature;
            if let Some(k) = cfg.top_k {
                l = top_k(&l, k);
            }
            if let Some(p) = cfg.top_p.filter(|&p| p < 1.0) {
                l = top_p(&l, p);
            }
            let probs = l.softmax(-1, Kind::Float).to_device(Device::Cpu);
            let probs: Vec<Vec<f32>> = Vec::<Vec<f32>>::try_from(&probs)?;
            probs.iter().map(|row| sample(row, &mut rng)).collect()
        } else {
            Vec::<i64>::try_from(logits.argmax(-1, false).to_device(Device::Cpu))?
        };
        fed.clear();
        for (row, &tok) in next.iter().enumerate() {
            if done[row].is_some() {
                fed.push(cfg.pad_token_id);
                continue;
            }
            out[row].push(tok);
            seen[row].push(tok);
            fed.push(tok);
            if cfg.eos_token_ids.contains(&tok) {
                done[row] = Some(FinishReason::Eos);
            } else if !cfg.stop_strings.is_empty()
                && let Some(tk) = tokenizer
            {
                let text = tk.decode(&out[row], true)?;
                if let Some(cut) = cfg
                    .stop_strings
                    .iter()
                    .filter_map(|s| text.find(s.as_str()))
                    .min()
                {
                    texts[row] = Some(text[..cut].to_owned());
                    done[row] = Some(FinishReason::StopString);
                }
            }
        }
        if done.iter().all(Option::is_some) || step + 1 == cfg.max_new_tokens {
            break;
        }
        if fast.is_some() {
            continue;
        }
        step_input = Tensor::from_slice(&fed).view([b64, 1]).to_device(device);
        if padded {
            attn = Tensor::cat(&[&attn, &Tensor::ones([b64, 1], (Kind::Int64, device))], 1);
        }
    }
    let mut result = Vec::with_capacity(b);
    for row in 0..b {
        let text = match (texts[row].take(), tokenizer) {
            (Some(t), _) => Some(t),
            (None, Some(tk)) => Some(tk.decode(&out[row], true)?),
            (None, None) => None,
        };
        result.push(Generation {
            token_ids: std::mem::take(&mut out[row]),
            text,
            finish_reason: done[row].unwrap_or(FinishReason::Length),
        });
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::tiny_models;
    use std::collections::BTreeMap;

    fn load(arch: &str) -> (LlamaModel, BTreeMap<String, Tensor>) {
        let dir = tiny_models().join(arch);
        let (m, _) = LlamaModel::load(&dir, Kind::Float, Device::Cpu).unwrap();
        let r = Tensor::read_safetensors(dir.join("reference.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
        (m, r)
    }

    fn rows(t: &Tensor, mask: Option<&Tensor>) -> Vec<Vec<i64>> {
        let v: Vec<Vec<i64>> = Vec::<Vec<i64>>::try_from(t).unwrap();
        match mask {
            None => v,
            Some(m) => {
                let m: Vec<Vec<i64>> = Vec::<Vec<i64>>::try_from(m).unwrap();
                v.into_iter()
                    .zip(m)
                    .map(|(r, m)| {
                        r.into_iter()
                            .zip(m)
                            .filter(|(_, m)| *m == 1)
                            .map(|(x, _)| x)
                            .collect()
                    })
                    .collect()
            }
        }
    }

    #[test]
    fn greedy_batched_left_padded_equals_transformers_generate() {
        for arch in ["llama", "mistral", "qwen2"] {
            let (m, r) = load(arch);
            let prompts = rows(&r["gen_ids"], Some(&r["gen_mask"]));
            let cfg = GenerationConfig {
                max_new_tokens: 6,
                min_new_tokens: 6,
                eos_token_ids: vec![2],
                ..Default::default()
            };
            let got: Vec<Vec<i64>> = generate(&m, &prompts, &cfg, None)
                .unwrap()
                .into_iter()
                .map(|g| g.token_ids)
                .collect();
            assert_eq!(got, rows(&r["gen_out"], None), "{arch}");
            // One prompt alone gives the same tokens as in the padded batch.
            let alone = generate(&m, &prompts[..1], &cfg, None).unwrap();
            assert_eq!(alone[0].token_ids, got[0], "{arch}");
        }
    }

    #[test]
    fn kv_cache_steps_equal_a_full_forward() {
        let (m, r) = load("mistral");
        let ids = &r["ids_plain"];
        let full = tch::no_grad(|| m.forward(ids, None, None).unwrap());
        let mut cache = KvCache::new(&m, 2, 4);
        let mut parts = Vec::new();
        tch::no_grad(|| {
            parts.push(
                m.forward(&ids.narrow(1, 0, 5), None, Some(&mut cache))
                    .unwrap(),
            );
            for i in 5..9 {
                parts.push(
                    m.forward(&ids.narrow(1, i, 1), None, Some(&mut cache))
                        .unwrap(),
                );
            }
        });
        assert_eq!(cache.len(), 9);
        let stepped = Tensor::cat(&parts, 1);
        assert!(crate::testutil::max_abs_diff(&full, &stepped) < 1e-4);
    }

    #[test]
    fn sampling_is_seeded_and_filters_apply() {
        let (m, _) = load("llama");
        let cfg = GenerationConfig {
            max_new_tokens: 8,
            temperature: 0.8,
            top_k: Some(20),
            top_p: Some(0.9),
            repetition_penalty: 1.3,
            seed: Some(3),
            ..Default::default()
        };
        let a = generate(&m, &[vec![5, 6, 7]], &cfg, None).unwrap();
        let b = generate(&m, &[vec![5, 6, 7]], &cfg, None).unwrap();
        assert_eq!(a, b);
        let c = generate(
            &m,
            &[vec![5, 6, 7]],
            &GenerationConfig {
                seed: Some(4),
                ..cfg.clone()
            },
            None,
        )
        .unwrap();
        assert_ne!(
            a[0].token_ids, c[0].token_ids,
            "another seed, another sample"
        );
        assert_eq!(a[0].token_ids.len(), 8);
        assert_eq!(a[0].finish_reason, FinishReason::Length);
        // top_k = 1 is greedy.
        let greedy = generate(
            &m,
            &[vec![5, 6, 7]],
            &GenerationConfig {
                max_new_tokens: 8,
                ..Default::default()
            },
            None,
        )
        .unwrap();
        let k1 = generate(
            &m,
            &[vec![5, 6, 7]],
            &GenerationConfig {
                max_new_tokens: 8,
                temperature: 1.0,
                top_k: Some(1),
                seed: Some(1),
                ..Default::default()
            },
            None,
        )
        .unwrap();
        assert_eq!(greedy[0].token_ids, k1[0].token_ids);
    }

    #[test]
    fn filters_match_their_definitions() {
        let l = Tensor::from_slice(&[1.0f32, 3.0, 2.0, 0.0]).view([1, 4]);
        let k = top_k(&l, 2);
        assert_eq!(
            Vec::<f32>::try_from(k.view([-1])).unwrap()[..3],
            [f32::NEG_INFINITY, 3.0, 2.0]
        );
        // probs ~ [0.087, 0.644, 0.237, 0.032]: p = 0.7 keeps {3.0, 2.0}.
        let p = top_p(&l, 0.7);
        let v = Vec::<f32>::try_from(p.view([-1])).unwrap();
        assert_eq!(v, vec![f32::NEG_INFINITY, 3.0, 2.0, f32::NEG_INFINITY]);
        let rp = repetition_penalty(
            &Tensor::from_slice(&[2.0f32, -2.0, 1.0]).view([1, 3]),
            &[vec![0, 1]],
            2.0,
        );
        assert_eq!(
            Vec::<f32>::try_from(rp.view([-1])).unwrap(),
            vec![1.0, -4.0, 1.0]
        );
    }

    #[test]
    fn stop_strings_and_eos_end_sequences() {
        let dir = tiny_models().join("llama");
        let (m, _) = load("llama");
        let tok = TextTokenizer::from_dir(&dir).unwrap();
        let prompt = tok.encode("the quick", false).unwrap();
        let free = generate(
            &m,
            std::slice::from_ref(&prompt),
            &GenerationConfig {
                max_new_tokens: 12,
                ..Default::default()
            },
            Some(&tok),
        )
        .unwrap();
        let text = free[0].text.clone().unwrap();
        // Stop at the generated text's third character: the completion is cut there.
        let stop: String = text.chars().skip(2).take(1).collect();
        let cut = generate(
            &m,
            std::slice::from_ref(&prompt),
            &GenerationConfig {
                max_new_tokens: 12,
                stop_strings: vec![stop.clone()],
                ..Default::default()
            },
            Some(&tok),
        )
        .unwrap();
        assert_eq!(cut[0].finish_reason, FinishReason::StopString);
        assert_eq!(
            cut[0].text.as_deref(),
            Some(&text[..text.find(&stop).unwrap()])
        );
        // The first generated token as EOS ends at once, keeping the EOS id.
        let first = free[0].token_ids[0];
        let e = generate(
            &m,
            &[prompt],
            &GenerationConfig {
                max_new_tokens: 12,
                eos_token_ids: vec![first],
                ..Default::default()
            },
            Some(&tok),
        )
        .unwrap();
        assert_eq!(e[0].token_ids, vec![first]);
        assert_eq!(e[0].finish_reason, FinishReason::Eos);
    }

    #[test]
    fn bad_options_are_named() {
        let (m, _) = load("llama");
        let bad = GenerationConfig {
            top_p: Some(1.5),
            ..Default::default()
        };
        let err = generate(&m, &[vec![1]], &bad, None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("top_p"), "{err}");
        let err = generate(&m, &[vec![100_000]], &GenerationConfig::default(), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("outside the vocabulary"), "{err}");
    }
}
