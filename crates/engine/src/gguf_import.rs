//! `model import`: a llama- or qwen2-architecture GGUF file becomes a
//! trainable Hugging Face folder — config.json, fp32 model.safetensors
//! (weights dequantised, Q/K rows un-permuted back to HF's rotate-half order
//! for `llama`), tokenizer.json rebuilt from the GGUF vocabulary and merges
//! (gpt2-style byte-level BPE), tokenizer_config.json with the chat template
//! and special tokens, generation_config.json.

use crate::error::{EngineError, Result};
use crate::gguf::{GgufFile, GgufTensorInfo, GgufValue};
use serde::Serialize;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::Tensor;

/// What an import did.
#[derive(Debug, Clone, Serialize)]
pub struct ImportReport {
    /// The GGUF file.
    pub source: PathBuf,
    /// The HF folder written.
    pub out_dir: PathBuf,
    /// `general.architecture`.
    pub architecture: String,
    /// `general.name`, when present.
    pub name: Option<String>,
    /// Tensors written.
    pub tensors: usize,
    /// Parameters (elements) written.
    pub parameters: u64,
    /// Count of source tensors per storage type (`Q4_1` → 210).
    pub source_types: BTreeMap<String, usize>,
    /// Whether lm_head is tied to the embedding (no `output.weight`).
    pub tied_embeddings: bool,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Things worth knowing (approximations, ignored tensors).
    pub warnings: Vec<String>,
}

struct Meta<'a> {
    g: &'a GgufFile,
    arch: String,
}

impl Meta<'_> {
    fn key(&self, k: &str) -> String {
        format!("{}.{k}", self.arch)
    }
    fn u(&self, k: &str) -> Result<u64> {
        let key = self.key(k);
        self.g.get(&key).and_then(GgufValue::as_u64).ok_or_else(|| {
            EngineError::format(
                &self.g.path,
                format!("metadata `{key}` is missing or not an integer"),
            )
        })
    }
    fn u_opt(&self, k: &str) -> Option<u64> {
        self.g.get(&self.key(k)).and_then(GgufValue::as_u64)
    }
    fn f_opt(&self, k: &str) -> Option<f64> {
        self.g.get(&self.key(k)).and_then(GgufValue::as_f64)
    }
}

/// f32 metadata printed the shortest way that reads back as the same f32 (1e-5, not 9.99e-6).
fn f32_json(v: f64) -> Value {
    let s = format!("{}", v as f32);
    s.parse::<f64>().map(|x| json!(x)).unwrap_or(json!(v))
}

/// Undoes llama.cpp's Q/K row permutation (HF rotate-half → ggml adjacent pairs):
/// `w.view(n_head, d/2, 2, ...).transpose(1, 2).reshape(w.shape)`.
pub fn unpermute_qk(w: &Tensor, n_head: i64) -> Tensor {
    let shape = w.size();
    let rows = shape[0];
    let head_dim = rows / n_head;
    let mut view = vec![n_head, head_dim / 2, 2];
    view.extend_from_slice(&shape[1..]);
    w.reshape(&view).transpose(1, 2).reshape(&shape)
}

/// Maps a GGUF tensor name to the HF name.
fn hf_name(gguf: &str) -> Option<String> {
    let fixed = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_owned());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = tail.rsplit_once('.')?;
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

fn strings(g: &GgufFile, key: &str) -> Result<Vec<String>> {
    let Some(arr) = g.get(key).and_then(GgufValue::as_array) else {
        return Err(EngineError::format(
            &g.path,
            format!("metadata `{key}` is missing or not an array"),
        ));
    };
    arr.iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_str().map(str::to_owned).ok_or_else(|| {
                EngineError::format(&g.path, format!("`{key}`[{i}] is not a string"))
            })
        })
        .collect()
}

/// The pre-tokenizer of a llama.cpp `tokenizer.ggml.pre` name (byte-level BPE).
fn pre_tokenizer(pre: &str, warnings: &mut Vec<String>) -> Value {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |pattern: &str| json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false});
    match pre {
        "smollm" | "starcoder" | "refact" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true}, byte_level(true)]}),
        "llama-bpe" | "llama3" => json!({"type": "Sequence", "pretokenizers": [
            split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
            byte_level(false)]}),
        "qwen2" => json!({"type": "Sequence", "pretokenizers": [
            split(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
            byte_level(false)]}),
        "default" | "gpt2" | "gpt-2" => byte_level(true),
        other => {
            warnings.push(format!(
                "tokenizer.ggml.pre `{other}` is not known: using GPT-2's byte-level pre-tokenizer (check the tokenization of digits and punctuation)"
            ));
            byte_level(true)
        }
    }
}

/// The BPE merges of a SentencePiece vocabulary, which llama.cpp stores
/// without merges (pieces, scores and types only). SentencePiece BPE joins
/// the adjacent pair whose joined piece scores highest, so every split
/// `left + right` of a normal piece with both halves in the vocabulary is a
/// merge, ranked by the joined piece's score (ties: the halves' ids), as
/// transformers' `SentencePieceExtractor` derives them.
fn spm_merges(g: &GgufFile, tokens: &[String]) -> Result<Vec<String>> {
    let scores: Vec<f64> = match g.get("tokenizer.ggml.scores").and_then(GgufValue::as_array) {
        Some(a) if a.len() == tokens.len() => a.iter().map(|v| v.as_f64().unwrap_or(0.0)).collect(),
        _ => {
            return Err(EngineError::format(
                &g.path,
                "a SentencePiece vocabulary needs `tokenizer.ggml.scores`, one per token",
            ));
        }
    };
    let types: Vec<u64> = g
        .get("tokenizer.ggml.token_type")
        .and_then(GgufValue::as_array)
        .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(1)).collect())
        .unwrap_or_default();
    let id: std::collections::HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    let mut merges: Vec<(f64, usize, usize)> = Vec::new();
    for (i, piece) in tokens.iter().enumerate() {
        if types.get(i).copied().unwrap_or(1) != 1 {
            continue;
        }
        for (at, _) in piece.char_indices().skip(1) {
            if let (Some(&l), Some(&r)) = (id.get(&piece[..at]), id.get(&piece[at..])) {
                merges.push((scores[i], l, r));
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    Ok(merges
        .into_iter()
        .map(|(_, l, r)| format!("{} {}", tokens[l], tokens[r]))
        .collect())
}

/// Builds tokenizer.json and tokenizer_config.json from the GGUF vocabulary.
fn tokenizer_files(
    g: &GgufFile,
    context: u64,
    warnings: &mut Vec<String>,
) -> Result<(Value, Value, Vec<String>)> {
    let model = g
        .get("tokenizer.ggml.model")
        .and_then(GgufValue::as_str)
        .unwrap_or("");
    let spm = match model {
        "gpt2" => false,
        "llama" => true,
        _ => {
            return Err(EngineError::unsupported(
                format!("tokenizer.ggml.model `{model}` in {}", g.path.display()),
                Some(
                    "byte-level BPE (`gpt2`: Llama 3, SmolLM, Qwen2) and SentencePiece BPE (`llama`: Llama 2, Mistral) vocabularies are rebuilt; bring the model's tokenizer.json for others",
                ),
            ));
        }
    };
    let tokens = strings(g, "tokenizer.ggml.tokens")?;
    let merges = if spm {
        spm_merges(g, &tokens)?
    } else {
        strings(g, "tokenizer.ggml.merges")?
    };
    let types: Vec<u64> = match g
        .get("tokenizer.ggml.token_type")
        .and_then(GgufValue::as_array)
    {
        Some(a) => a.iter().map(|v| v.as_u64().unwrap_or(1)).collect(),
        None => vec![1; tokens.len()],
    };
    let id = |key: &str| g.get(key).and_then(GgufValue::as_u64);
    let tok_of = |i: Option<u64>| i.and_then(|i| tokens.get(i as usize).cloned());
    let bos = tok_of(id("tokenizer.ggml.bos_token_id"));
    let eos = tok_of(id("tokenizer.ggml.eos_token_id"));
    let unk = tok_of(id("tokenizer.ggml.unknown_token_id"));
    let pad = tok_of(id("tokenizer.ggml.padding_token_id"));
    let add_bos = g
        .get("tokenizer.ggml.add_bos_token")
        .and_then(GgufValue::as_bool)
        .unwrap_or(false);
    let add_eos = g
        .get("tokenizer.ggml.add_eos_token")
        .and_then(GgufValue::as_bool)
        .unwrap_or(false);

    let mut vocab = Map::new();
    let mut added = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert(t.clone(), json!(i));
        // ggml token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
        let ty = types.get(i).copied().unwrap_or(1);
        if ty == 3 || ty == 4 {
            added.push(
                json!({"id": i, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": ty == 4, "special": ty == 3}),
            );
        }
    }
    let merges: Vec<Value> = merges
        .iter()
        .map(|m| match m.split_once(' ') {
            Some((a, b)) => Ok(json!([a, b])),
            None => Err(EngineError::format(
                &g.path,
                format!("merge `{m}` is not `left right`"),
            )),
        })
        .collect::<Result<_>>()?;
    let pre = g
        .get("tokenizer.ggml.pre")
        .and_then(GgufValue::as_str)
        .unwrap_or("default");
    let mut post = if spm {
        json!({"type": "TemplateProcessing", "single": [{"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {}})
    } else {
        json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true})
    };
    if add_bos || add_eos {
        let mut single = Vec::new();
        let mut pair = Vec::new();
        let mut special = Map::new();
        if let (true, Some(b)) = (add_bos, &bos) {
            single.push(json!({"SpecialToken": {"id": b, "type_id": 0}}));
            pair.push(json!({"SpecialToken": {"id": b, "type_id": 0}}));
            let bid = vocab.get(b).cloned().unwrap_or(json!(0));
            special.insert(b.clone(), json!({"id": b, "ids": [bid], "tokens": [b]}));
        }
        single.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
        pair.push(json!({"Sequence": {"id": "A", "type_id": 0}}));
        pair.push(json!({"Sequence": {"id": "B", "type_id": 1}}));
        if let (true, Some(e)) = (add_eos, &eos) {
            single.push(json!({"SpecialToken": {"id": e, "type_id": 0}}));
            pair.push(json!({"SpecialToken": {"id": e, "type_id": 1}}));
            let eid = vocab.get(e).cloned().unwrap_or(json!(0));
            special.insert(e.clone(), json!({"id": e, "ids": [eid], "tokens": [e]}));
        }
        post = json!({"type": "Sequence", "processors": [post,
            {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special}]});
    }
    let tokenizer = if spm {
        // SentencePiece BPE as transformers' LlamaConverter writes it: spaces
        // become ▁ with one prepended, unknown bytes fall back to <0xNN>.
        json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            // Always prepend ▁ (SentencePiece's add_dummy_prefix), even before
            // leading spaces: Metaspace would skip it there.
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "Prepend", "prepend": "\u{2581}"},
                {"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"}]},
            "pre_tokenizer": null,
            "post_processor": post,
            "decoder": {"type": "Sequence", "decoders": [
                {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
            "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                "vocab": vocab, "merges": merges}
        })
    } else {
        json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre_tokenizer(pre, warnings),
            "post_processor": post,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": merges}
        })
    };
    let mut cfg = Map::new();
    cfg.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    cfg.insert("add_bos_token".into(), json!(add_bos));
    cfg.insert("add_eos_token".into(), json!(add_eos));
    cfg.insert("model_max_length".into(), json!(context));
    cfg.insert("clean_up_tokenization_spaces".into(), json!(false));
    for (k, v) in [
        ("bos_token", &bos),
        ("eos_token", &eos),
        ("unk_token", &unk),
        ("pad_token", &pad),
    ] {
        if let Some(v) = v {
            cfg.insert(k.into(), json!(v));
        }
    }
    if let Some(t) = g.get("tokenizer.chat_template").and_then(GgufValue::as_str) {
        cfg.insert("chat_template".into(), json!(t));
    }
    Ok((tokenizer, Value::Object(cfg), tokens))
}

/// llama.cpp's tensor of Llama-3 rope divisors (one per rotary frequency).
const ROPE_FREQS: &str = "rope_freqs.weight";

/// The Llama-3 rope divisor of frequency `freq` (transformers'
/// `_compute_llama3_parameters`, which llama.cpp's converter writes out as
/// `rope_freqs.weight`).
fn llama3_divisor(freq: f32, factor: f64, lo: f64, hi: f64, old: f64) -> f64 {
    let wl = std::f64::consts::TAU / f64::from(freq);
    if wl < old / hi {
        1.0
    } else if wl > old / lo {
        factor
    } else {
        let s = (old / wl - lo) / (hi - lo);
        1.0 / ((1.0 - s) / factor + s)
    }
}

/// Recovers config.json's `rope_scaling` (rope_type llama3) from the GGUF's
/// `rope_freqs.weight`, which is all llama.cpp keeps of it. `factor` is the
/// plateau of the divisors; in the smoothed band each divisor `r` gives
/// `s = (1/r − 1/factor)/(1 − 1/factor) = orig·x/(hi − lo) − lo/(hi − lo)`
/// with `x = 1/wavelength`, a line fitted by least squares. A line has two
/// coefficients and the parameters are three, so one is taken as known: the
/// original context from `rope.scaling.original_context_length` when the
/// file has it, else `low_freq_factor = 1` (every Llama 3.x release). The
/// fitted parameters must reproduce every stored divisor (1e-4 relative),
/// or the import stops rather than train on a silently different RoPE.
fn llama3_rope_scaling(m: &Meta<'_>, head_dim: u64, theta: f64) -> Result<Option<Value>> {
    let Some(info) = m.g.tensor_info(ROPE_FREQS) else {
        return Ok(None);
    };
    let r: Vec<f32> = Vec::<f32>::try_from(m.g.read_f32(info)?.flatten(0, -1))?;
    let half = (head_dim / 2) as usize;
    if r.len() != half {
        return Err(EngineError::format(
            &m.g.path,
            format!(
                "{ROPE_FREQS} has {} values, head_dim {head_dim} needs {half}",
                r.len()
            ),
        ));
    }
    let freqs: Vec<f32> = (0..half)
        .map(|i| 1.0f32 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
        .collect();
    let factor = r.iter().fold(1.0f64, |a, &v| a.max(f64::from(v)));
    if factor - 1.0 < 1e-6 {
        return Ok(None);
    }
    let band: Vec<(f64, f64)> = r
        .iter()
        .zip(&freqs)
        .filter(|(v, _)| {
            let v = f64::from(**v);
            v > 1.0 + 1e-5 && v < factor * (1.0 - 1e-5)
        })
        .map(|(v, f)| {
            let s = (1.0 / f64::from(*v) - 1.0 / factor) / (1.0 - 1.0 / factor);
            (f64::from(*f) / std::f64::consts::TAU, s)
        })
        .collect();
    let known_old = m
        .u_opt("rope.scaling.original_context_length")
        .map(|v| v as f64);
    let (lo, hi, old) = if band.len() >= 2 {
        let n = band.len() as f64;
        let (sx, sy) = band
            .iter()
            .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
        let (mx, my) = (sx / n, sy / n);
        let sxx: f64 = band.iter().map(|(x, _)| (x - mx).powi(2)).sum();
        let sxy: f64 = band.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
        let a = sxy / sxx;
        let c = my - a * mx;
        match known_old {
            Some(old) => {
                let width = old / a;
                let lo = -c * width;
                (lo, lo + width, old)
            }
            None => {
                let width = -1.0 / c;
                (1.0, 1.0 + width, a * width)
            }
        }
    } else {
        (1.0, 4.0, known_old.unwrap_or(8192.0))
    };
    // Snap to the round numbers the fit wobbles around (1, 4, 8192).
    let snap = |v: f64| {
        let r = v.round();
        if (v - r).abs() <= 1e-3 * r.abs().max(1.0) {
            r
        } else {
            v
        }
    };
    let (lo, hi, old, factor) = (snap(lo), snap(hi), snap(old), snap(factor));
    let worst = r
        .iter()
        .zip(&freqs)
        .map(|(v, f)| {
            let want = f64::from(*v);
            (llama3_divisor(*f, factor, lo, hi, old) - want).abs() / want
        })
        .fold(0.0f64, f64::max);
    if !(lo > 0.0 && hi > lo && old > 0.0) || worst > 1e-4 {
        return Err(EngineError::unsupported(
            format!(
                "{ROPE_FREQS} in {} does not follow Llama-3 rope scaling (best fit factor {factor}, \
                 low {lo}, high {hi}, original context {old}: off by {worst:.1e})",
                m.g.path.display()
            ),
            Some(
                "import the original Hugging Face folder instead (its config.json carries rope_scaling)",
            ),
        ));
    }
    Ok(Some(json!({
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": lo,
        "high_freq_factor": hi,
        "original_max_position_embeddings": old as u64,
    })))
}

fn config_json(
    m: &Meta<'_>,
    vocab: usize,
    tied: bool,
    head_dim: u64,
    warnings: &mut Vec<String>,
) -> Result<Value> {
    let g = m.g;
    let hidden = m.u("embedding_length")?;
    let heads = m.u("attention.head_count")?;
    let kv = m.u_opt("attention.head_count_kv").unwrap_or(heads);
    let ctx = m.u_opt("context_length").unwrap_or(2048);
    let eps = m.f_opt("attention.layer_norm_rms_epsilon").unwrap_or(1e-5);
    let theta = m.f_opt("rope.freq_base").unwrap_or(10_000.0);
    if m.g.get(&m.key("rope.scaling.type")).is_some() {
        warnings.push("rope.scaling.* metadata is not carried over (plain RoPE)".into());
    }
    let id = |k: &str| g.get(k).and_then(GgufValue::as_u64);
    let (model_type, archs) = if m.arch == "qwen2" {
        ("qwen2", "Qwen2ForCausalLM")
    } else {
        ("llama", "LlamaForCausalLM")
    };
    let mut c = Map::new();
    c.insert("architectures".into(), json!([archs]));
    c.insert("model_type".into(), json!(model_type));
    c.insert("hidden_size".into(), json!(hidden));
    c.insert(
        "intermediate_size".into(),
        json!(m.u("feed_forward_length")?),
    );
    c.insert("num_hidden_layers".into(), json!(m.u("block_count")?));
    c.insert("num_attention_heads".into(), json!(heads));
    c.insert("num_key_value_heads".into(), json!(kv));
    c.insert("head_dim".into(), json!(head_dim));
    c.insert("hidden_act".into(), json!("silu"));
    c.insert("max_position_embeddings".into(), json!(ctx));
    c.insert("rms_norm_eps".into(), f32_json(eps));
    c.insert("rope_theta".into(), f32_json(theta));
    c.insert(
        "rope_scaling".into(),
        llama3_rope_scaling(m, head_dim, theta)?.unwrap_or(Value::Null),
    );
    c.insert("vocab_size".into(), json!(vocab));
    c.insert("tie_word_embeddings".into(), json!(tied));
    if model_type == "llama" {
        c.insert("attention_bias".into(), json!(false));
        c.insert("mlp_bias".into(), json!(false));
    } else {
        c.insert("use_sliding_window".into(), json!(false));
    }
    if let Some(b) = id("tokenizer.ggml.bos_token_id") {
        c.insert("bos_token_id".into(), json!(b));
    }
    if let Some(e) = id("tokenizer.ggml.eos_token_id") {
        c.insert("eos_token_id".into(), json!(e));
    }
    if let Some(p) = id("tokenizer.ggml.padding_token_id") {
        c.insert("pad_token_id".into(), json!(p));
    }
    c.insert("torch_dtype".into(), json!("float32"));
    Ok(Value::Object(c))
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    lora_skill::fs::write_json_atomic(path, v).map_err(|e| EngineError::io(path, e))
}

/// Imports `gguf` into a new HF folder `out` (which must not exist yet; it is
/// built beside it and renamed into place). `progress(done, total)` is
/// called after each tensor.
pub fn import_gguf(
    gguf: &Path,
    out: &Path,
    mut progress: impl FnMut(usize, usize),
) -> Result<ImportReport> {
    if out.exists() {
        return Err(EngineError::invalid(
            "out",
            format!(
                "{} already exists (remove it, or choose another folder)",
                out.display()
            ),
        ));
    }
    let g = GgufFile::open(gguf)?;
    let arch = g
        .get("general.architecture")
        .and_then(GgufValue::as_str)
        .unwrap_or("")
        .to_owned();
    if arch != "llama" && arch != "qwen2" {
        return Err(EngineError::unsupported(
            format!("GGUF architecture `{arch}` in {}", gguf.display()),
            Some("model import reads llama (Llama, Mistral, SmolLM) and qwen2 GGUF files"),
        ));
    }
    let m = Meta {
        g: &g,
        arch: arch.clone(),
    };
    let mut warnings = Vec::new();
    let heads = m.u("attention.head_count")? as i64;
    let kv_heads = m
        .u_opt("attention.head_count_kv")
        .map_or(heads, |v| v as i64);
    let hidden = m.u("embedding_length")?;
    let head_dim = m
        .u_opt("attention.key_length")
        .or_else(|| m.u_opt("rope.dimension_count"))
        .unwrap_or(hidden / heads as u64);
    let context = m.u_opt("context_length").unwrap_or(2048);
    let tied = g.tensor_info("output.weight").is_none();
    let (tokenizer, tok_cfg, tokens) = tokenizer_files(&g, context, &mut warnings)?;
    let embd_rows = g
        .tensor_info("token_embd.weight")
        .map(|t| t.shape()[0] as usize)
        .ok_or_else(|| EngineError::format(gguf, "no token_embd.weight tensor"))?;
    if embd_rows != tokens.len() {
        warnings.push(format!(
            "the vocabulary has {} tokens but token_embd has {embd_rows} rows; vocab_size = {embd_rows}",
            tokens.len()
        ));
    }
    let config = config_json(&m, embd_rows, tied, head_dim, &mut warnings)?;

    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| EngineError::io(parent, e))?;
    let tmp = lora_skill::fs::temp_path_for(out);
    std::fs::create_dir_all(&tmp).map_err(|e| EngineError::io(&tmp, e))?;
    let result = (|| {
        let mut named = Vec::with_capacity(g.tensors.len());
        let mut source_types = BTreeMap::new();
        let mut parameters = 0u64;
        let total = g.tensors.len();
        for (i, info) in g.tensors.iter().enumerate() {
            if info.name == ROPE_FREQS {
                // Carried over as config.json's rope_scaling (see llama3_rope_scaling).
                progress(i + 1, total);
                continue;
            }
            let Some(name) = hf_name(&info.name) else {
                return Err(EngineError::unsupported(
                    format!(
                        "GGUF tensor `{}` has no Hugging Face counterpart",
                        info.name
                    ),
                    Some("this importer reads plain llama/qwen2 decoder weights"),
                ));
            };
            *source_types.entry(info.ggml_type.name()).or_insert(0usize) += 1;
            let t = read_tensor(&g, info, &arch, heads, kv_heads)?;
            parameters += t.numel() as u64;
            named.push((name, t));
            progress(i + 1, total);
        }
        crate::weights::save_safetensors(&tmp.join(crate::weights::SINGLE_FILE), &named)?;
        write_json(&tmp.join("config.json"), &config)?;
        write_json(&tmp.join("tokenizer.json"), &tokenizer)?;
        write_json(&tmp.join("tokenizer_config.json"), &tok_cfg)?;
        let mut gen_cfg = Map::new();
        for (k, v) in [
            ("bos_token_id", &config["bos_token_id"]),
            ("eos_token_id", &config["eos_token_id"]),
            ("pad_token_id", &config["pad_token_id"]),
        ] {
            if !v.is_null() {
                gen_cfg.insert(k.into(), v.clone());
            }
        }
        write_json(&tmp.join("generation_config.json"), &Value::Object(gen_cfg))?;
        Ok((named.len(), parameters, source_types))
    })();
    let (count, parameters, source_types) = match result {
        Ok(v) => v,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    lora_skill::fs::publish_dir(&tmp, out).map_err(|e| {
        let _ = std::fs::remove_dir_all(&tmp);
        EngineError::io(out, e)
    })?;
    Ok(ImportReport {
        source: gguf.to_path_buf(),
        out_dir: out.to_path_buf(),
        architecture: arch,
        name: g
            .get("general.name")
            .and_then(GgufValue::as_str)
            .map(str::to_owned),
        tensors: count,
        parameters,
        source_types,
        tied_embeddings: tied,
        vocab_size: embd_rows,
        warnings,
    })
}

fn read_tensor(
    g: &GgufFile,
    info: &GgufTensorInfo,
    arch: &str,
    heads: i64,
    kv_heads: i64,
) -> Result<Tensor> {
    let t = g.read_f32(info)?;
    // llama.cpp permutes q/k rows (weights and biases) for arch `llama` only.
    if arch == "llama" {
        if info.name.contains(".attn_q.") {
            return Ok(unpermute_qk(&t, heads));
        }
        if info.name.contains(".attn_k.") {
            return Ok(unpermute_qk(&t, kv_heads));
        }
    }
    Ok(t)
}
