//! Hugging Face Llama/Mistral/Qwen2 → GGUF: architecture metadata with the exact
//! types llama.cpp reads, tensor names, the Q/K row permutation of arch `llama`,
//! Llama-3 `rope_freqs`, the embedded tokenizer, and the per-tensor type policy
//! of each file type (llama.cpp `convert_hf_to_gguf.py` + `src/llama-quant.cpp`).

use super::quant;
use super::tokenizer::{self, TokenizerKv};
use super::writer::{self, GgmlType, TensorInfo, Value};
use crate::error::{MergeError, Result, read_json};
use crate::merge::MergedModel;
use lora_spec::contracts::merge::GgufQuantization;
use serde_json::Value as Json;
use std::collections::BTreeMap;
use std::io::BufWriter;
use std::path::Path;

/// GGUF architectures written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// `llama` (Llama and Mistral): Q/K rows permuted for ggml's adjacent-pair RoPE.
    Llama,
    /// `qwen2`: NEOX RoPE, no permutation, q/k/v biases.
    Qwen2,
}

impl Arch {
    /// The `general.architecture` string.
    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
        }
    }
}

/// The hyper-parameters of a Hugging Face `config.json` that GGUF needs.
#[derive(Debug, Clone, PartialEq)]
pub struct HfConfig {
    /// GGUF architecture.
    pub arch: Arch,
    /// Layers.
    pub n_layer: usize,
    /// Hidden size.
    pub n_embd: usize,
    /// Attention heads.
    pub n_head: usize,
    /// Key/value heads.
    pub n_head_kv: usize,
    /// Head dimension.
    pub head_dim: usize,
    /// Intermediate size.
    pub n_ff: usize,
    /// Context length.
    pub n_ctx: usize,
    /// RMSNorm epsilon.
    pub eps: f32,
    /// RoPE base.
    pub rope_theta: f32,
    /// The rope scaling dict (`rope_scaling` in transformers 4, `rope_parameters` in 5).
    pub rope: Option<Json>,
    /// Vocabulary size of config.json.
    pub vocab_size: usize,
    /// Tied input/output embeddings.
    pub tied: bool,
    /// The raw config.
    pub raw: Json,
}

fn num(v: &Json, k: &str) -> Option<f64> {
    v.get(k).and_then(Json::as_f64)
}

impl HfConfig {
    /// Reads `config.json` of a model folder.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let v = read_json(&path)?;
        let mt = v.get("model_type").and_then(Json::as_str).unwrap_or("");
        let arch = match mt {
            "llama" | "mistral" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            other => {
                return Err(MergeError::unsupported(
                    format!(
                        "{}: model_type `{other}` has no GGUF writer here",
                        path.display()
                    ),
                    "GGUF export supports model_type llama, mistral and qwen2; export safetensors instead",
                ));
            }
        };
        let need = |k: &str| -> Result<usize> {
            num(&v, k).map(|x| x as usize).ok_or_else(|| {
                MergeError::bad_file(&path, format!("`{k}` is missing or not a number"))
                    .with_hint("config.json must be the model's transformers config")
            })
        };
        let n_embd = need("hidden_size")?;
        let n_head = need("num_attention_heads")?;
        let n_head_kv = num(&v, "num_key_value_heads")
            .map(|x| x as usize)
            .unwrap_or(n_head);
        let head_dim = v
            .get("head_dim")
            .and_then(Json::as_u64)
            .map(|x| x as usize)
            .unwrap_or(n_embd / n_head.max(1));
        let rope = v
            .get("rope_scaling")
            .filter(|r| !r.is_null())
            .or_else(|| v.get("rope_parameters").filter(|r| !r.is_null()))
            .cloned();
        let rope_theta = num(&v, "rope_theta")
            .or_else(|| rope.as_ref().and_then(|r| num(r, "rope_theta")))
            .unwrap_or(10000.0) as f32;
        Ok(Self {
            arch,
            n_layer: need("num_hidden_layers")?,
            n_embd,
            n_head,
            n_head_kv,
            head_dim,
            n_ff: need("intermediate_size")?,
            n_ctx: num(&v, "max_position_embeddings")
                .map(|x| x as usize)
                .unwrap_or(2048),
            eps: num(&v, "rms_norm_eps").unwrap_or(1e-6) as f32,
            rope_theta,
            rope,
            vocab_size: need("vocab_size")?,
            tied: v
                .get("tie_word_embeddings")
                .and_then(Json::as_bool)
                .unwrap_or(false),
            raw: v,
        })
    }

    fn rope_type(&self) -> String {
        self.rope
            .as_ref()
            .and_then(|r| r.get("rope_type").or_else(|| r.get("type")))
            .and_then(Json::as_str)
            .unwrap_or("default")
            .to_ascii_lowercase()
    }

    /// Llama-3 `rope_freqs.weight` divisors (`LlamaModel.generate_extra_tensors`), when the rope type is llama3.
    pub fn rope_freqs(&self) -> Option<Vec<f32>> {
        if self.rope_type() != "llama3" {
            return None;
        }
        let r = self.rope.as_ref()?;
        let base = num(r, "rope_theta").unwrap_or(self.rope_theta as f64);
        let factor = num(r, "factor").unwrap_or(8.0);
        let lo = num(r, "low_freq_factor").unwrap_or(1.0);
        let hi = num(r, "high_freq_factor").unwrap_or(4.0);
        let old = num(r, "original_max_position_embeddings").unwrap_or(8192.0);
        let (lo_wl, hi_wl) = (old / lo, old / hi);
        let dim = self.head_dim;
        Some(
            (0..dim / 2)
                .map(|i| {
                    // torch computes the frequency in f32
                    let freq = 1.0f32 / (base as f32).powf((2 * i) as f32 / dim as f32);
                    let wl = 2.0 * std::f64::consts::PI / freq as f64;
                    if wl < hi_wl {
                        1.0
                    } else if wl > lo_wl {
                        factor as f32
                    } else {
                        let s = (old / wl - lo) / (hi - lo);
                        (1.0 / ((1.0 - s) / factor + s)) as f32
                    }
                })
                .collect(),
        )
    }
}

/// The GGUF name of a Hugging Face tensor, or None for tensors GGUF does not carry.
pub fn gguf_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, tail) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let mapped = match tail {
        "input_layernorm.weight" => "attn_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "self_attn.q_proj.bias" => "attn_q.bias",
        "self_attn.k_proj.bias" => "attn_k.bias",
        "self_attn.v_proj.bias" => "attn_v.bias",
        "self_attn.o_proj.bias" => "attn_output.bias",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        _ => return None,
    };
    Some(format!("blk.{layer}.{mapped}"))
}

/// The ggml file type number of a quantization (`general.file_type`).
pub fn file_type(q: GgufQuantization) -> u32 {
    match q {
        GgufQuantization::F32 => 0,
        GgufQuantization::F16 => 1,
        GgufQuantization::Q8_0 => 7,
        GgufQuantization::Q4KM => 15,
        GgufQuantization::Bf16 => 32,
    }
}

fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

/// llama.cpp's `use_more_bits(i, n)` of Q4_K_M.
pub fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i as i64 - (n / 8) as i64).rem_euclid(3) == 2
}

/// The tensor type of GGUF tensor `name` with ggml dims `ne` in a file of type `q`.
/// `has_output` = the file has its own `output.weight` (untied).
pub fn tensor_type(
    name: &str,
    ne: &[u64],
    q: GgufQuantization,
    has_output: bool,
    n_layer: usize,
) -> GgmlType {
    let quantizable = ne.len() >= 2 && name.ends_with("weight") && !name.contains("_norm.weight");
    if !quantizable {
        return GgmlType::F32;
    }
    let ne0 = ne[0] as usize;
    let fallback = |t: GgmlType| -> GgmlType {
        if ne0.is_multiple_of(t.block_size()) {
            return t;
        }
        let f = match t {
            GgmlType::Q4_K => GgmlType::Q5_0,
            GgmlType::Q6_K => GgmlType::Q8_0,
            other => other,
        };
        if ne0.is_multiple_of(f.block_size()) {
            f
        } else {
            GgmlType::F16
        }
    };
    match q {
        GgufQuantization::F32 => GgmlType::F32,
        GgufQuantization::F16 => GgmlType::F16,
        GgufQuantization::Bf16 => GgmlType::BF16,
        GgufQuantization::Q8_0 => fallback(GgmlType::Q8_0),
        GgufQuantization::Q4KM => {
            let is_output = name == "output.weight" || (!has_output && name == "token_embd.weight");
            let t = if is_output {
                if !ne0.is_multiple_of(256) {
                    GgmlType::Q8_0
                } else {
                    GgmlType::Q6_K
                }
            } else if name.ends_with("attn_v.weight") || name.ends_with("ffn_down.weight") {
                match layer_of(name) {
                    Some(i) if use_more_bits(i, n_layer) => GgmlType::Q6_K,
                    _ => GgmlType::Q4_K,
                }
            } else {
                GgmlType::Q4_K
            };
            fallback(t)
        }
    }
}

/// Encodes f32 values as `ty`.
pub fn encode(values: &[f32], ty: GgmlType) -> Vec<u8> {
    match ty {
        GgmlType::F32 => quant::to_f32_bytes(values),
        GgmlType::F16 => quant::to_f16(values),
        GgmlType::BF16 => quant::to_bf16(values),
        GgmlType::Q8_0 => quant::quantize_q8_0(values),
        GgmlType::Q5_0 => quant::quantize_q5_0(values),
        GgmlType::Q4_K => quant::quantize_q4_k(values),
        GgmlType::Q6_K => quant::quantize_q6_k(values),
    }
}

/// Decodes `ty` bytes to f32 (for checks and tests).
pub fn decode(bytes: &[u8], ty: GgmlType) -> Vec<f32> {
    match ty {
        GgmlType::F32 => crate::dtype::to_f32(bytes, crate::dtype::DType::F32),
        GgmlType::F16 => crate::dtype::to_f32(bytes, crate::dtype::DType::F16),
        GgmlType::BF16 => crate::dtype::to_f32(bytes, crate::dtype::DType::BF16),
        GgmlType::Q8_0 => quant::dequantize_q8_0(bytes),
        GgmlType::Q5_0 => quant::dequantize_q5_0(bytes),
        GgmlType::Q4_K => quant::dequantize_q4_k(bytes),
        GgmlType::Q6_K => quant::dequantize_q6_k(bytes),
    }
}

/// llama.cpp's Q/K row permutation (`LlamaModel.permute`): within each of `n_head`
/// heads of `d` rows, row `j·d/2 + i` moves to `2i + j`. `cols` = row length (1 for a bias).
pub fn permute_rows(w: &[f32], n_head: usize, cols: usize) -> Vec<f32> {
    let rows = w.len() / cols.max(1);
    let d = rows / n_head.max(1);
    let half = d / 2;
    let mut out = vec![0f32; w.len()];
    for h in 0..n_head {
        for j in 0..2 {
            for i in 0..half {
                let src = h * d + j * half + i;
                let dst = h * d + 2 * i + j;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// One planned GGUF tensor and where its values come from.
#[derive(Debug, Clone)]
pub struct PlannedTensor {
    /// The GGUF tensor info.
    pub info: TensorInfo,
    /// The Hugging Face source tensor (None for generated tensors).
    pub source: Option<String>,
    /// Permute rows over this many heads (arch llama q/k).
    pub permute_heads: Option<usize>,
    /// Generated values (rope_freqs).
    pub generated: Option<Vec<f32>>,
}

/// What a GGUF model export wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GgufReport {
    /// File written.
    pub path: String,
    /// Bytes.
    pub bytes: u64,
    /// Tensors per ggml type.
    pub types: BTreeMap<String, usize>,
    /// Tensors.
    pub n_tensors: usize,
    /// Whether a chat template was embedded.
    pub chat_template: bool,
    /// Warnings (tokenizer padding, unrecognised pre-tokenizer…).
    pub warnings: Vec<String>,
}

/// The metadata and tensor plan of a model export.
#[derive(Debug, Clone)]
pub struct ModelPlan {
    /// Key/values in write order.
    pub kvs: Vec<(String, Value)>,
    /// Tensors in write order.
    pub tensors: Vec<PlannedTensor>,
    /// Tokenizer findings.
    pub tokenizer: TokenizerKv,
}

/// Plans a GGUF model export of `merged` (a base folder `dir` with an optional adapter).
/// `tok_dir` is where the tokenizer and chat template are read from.
pub fn plan_model(
    cfg: &HfConfig,
    merged: &MergedModel<'_>,
    tok_dir: &Path,
    q: GgufQuantization,
    name: &str,
) -> Result<ModelPlan> {
    let embd = merged
        .shape_of("model.embed_tokens.weight")
        .ok_or_else(|| {
            MergeError::unsupported(
                "the model has no model.embed_tokens.weight",
                "only Llama-family causal LMs are exported to GGUF",
            )
        })?;
    let n_vocab = embd.0[0];
    let tok = tokenizer::tokenizer_kvs(tok_dir, n_vocab, &cfg.raw)?;
    let a = cfg.arch.name();
    let mut kvs: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::Str(a.into())),
        ("general.type".into(), Value::Str("model".into())),
        ("general.name".into(), Value::Str(name.into())),
        ("general.file_type".into(), Value::U32(file_type(q))),
        ("general.quantization_version".into(), Value::U32(2)),
        (format!("{a}.context_length"), Value::U32(cfg.n_ctx as u32)),
        (
            format!("{a}.embedding_length"),
            Value::U32(cfg.n_embd as u32),
        ),
        (format!("{a}.block_count"), Value::U32(cfg.n_layer as u32)),
        (
            format!("{a}.feed_forward_length"),
            Value::U32(cfg.n_ff as u32),
        ),
        (
            format!("{a}.attention.head_count"),
            Value::U32(cfg.n_head as u32),
        ),
        (
            format!("{a}.attention.head_count_kv"),
            Value::U32(cfg.n_head_kv as u32),
        ),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(cfg.eps),
        ),
        (format!("{a}.rope.freq_base"), Value::F32(cfg.rope_theta)),
        (
            format!("{a}.rope.dimension_count"),
            Value::U32(cfg.head_dim as u32),
        ),
        (
            format!("{a}.attention.key_length"),
            Value::U32(cfg.head_dim as u32),
        ),
        (
            format!("{a}.attention.value_length"),
            Value::U32(cfg.head_dim as u32),
        ),
        (format!("{a}.vocab_size"), Value::U32(n_vocab as u32)),
    ];
    match cfg.rope_type().as_str() {
        "linear" | "yarn" => {
            let r = cfg.rope.as_ref().cloned().unwrap_or(Json::Null);
            kvs.push((
                format!("{a}.rope.scaling.type"),
                Value::Str(cfg.rope_type()),
            ));
            kvs.push((
                format!("{a}.rope.scaling.factor"),
                Value::F32(num(&r, "factor").unwrap_or(1.0) as f32),
            ));
            if let Some(o) = num(&r, "original_max_position_embeddings") {
                kvs.push((
                    format!("{a}.rope.scaling.original_context_length"),
                    Value::U32(o as u32),
                ));
            }
        }
        "default" | "llama3" => {}
        other => {
            return Err(MergeError::unsupported(
                format!("rope type `{other}` is not written to GGUF by this tool"),
                "supported rope types: default, linear, yarn, llama3",
            ));
        }
    }
    kvs.extend(tok.kvs.iter().cloned());

    let specs = merged.specs(None);
    let has_output = specs.iter().any(|s| s.name == "lm_head.weight");
    let mut tensors = Vec::new();
    let mut push = |name: String,
                    shape: &[usize],
                    source: Option<String>,
                    permute: Option<usize>,
                    generated: Option<Vec<f32>>| {
        let ne: Vec<u64> = shape.iter().rev().map(|&x| x as u64).collect();
        let ty = tensor_type(&name, &ne, q, has_output, cfg.n_layer);
        tensors.push(PlannedTensor {
            info: TensorInfo { name, ne, ty },
            source,
            permute_heads: permute,
            generated,
        });
    };
    if let Some(f) = cfg.rope_freqs() {
        let n = f.len();
        push("rope_freqs.weight".into(), &[n], None, None, Some(f));
    }
    for s in &specs {
        if s.name.ends_with("rotary_emb.inv_freq") {
            continue;
        }
        let Some(g) = gguf_name(&s.name) else {
            return Err(MergeError::unsupported(
                format!("tensor `{}` has no GGUF name for arch {a}", s.name),
                "the model has parts llama.cpp's llama/qwen2 graphs do not use; export safetensors instead",
            ));
        };
        let permute = match cfg.arch {
            Arch::Llama if s.name.contains("self_attn.q_proj.") => Some(cfg.n_head),
            Arch::Llama if s.name.contains("self_attn.k_proj.") => Some(cfg.n_head_kv),
            _ => None,
        };
        push(g, &s.shape, Some(s.name.clone()), permute, None);
    }
    // llama.cpp visits tensors sorted by block; keep the converter's order: globals, then blocks.
    tensors.sort_by_key(|t| layer_of(&t.info.name).map_or(0, |l| l + 1));
    Ok(ModelPlan {
        kvs,
        tensors,
        tokenizer: tok,
    })
}

/// Values of a planned tensor (merged, permuted), in f32.
pub fn planned_values(t: &PlannedTensor, merged: &MergedModel<'_>) -> Result<Vec<f32>> {
    if let Some(g) = &t.generated {
        return Ok(g.clone());
    }
    let src = t.source.as_deref().unwrap_or_default();
    let v = merged.values(src)?;
    Ok(match t.permute_heads {
        Some(h) => {
            let cols = if t.info.ne.len() >= 2 {
                t.info.ne[0] as usize
            } else {
                1
            };
            permute_rows(&v, h, cols)
        }
        None => v,
    })
}

/// Writes a GGUF model file at `out` (atomically).
pub fn write_model(
    out: &Path,
    plan: &ModelPlan,
    merged: &MergedModel<'_>,
    on_tensor: &mut dyn FnMut(usize, usize, &str) -> Result<()>,
) -> Result<GgufReport> {
    let infos: Vec<TensorInfo> = plan.tensors.iter().map(|t| t.info.clone()).collect();
    let n = infos.len();
    let mut err: Option<MergeError> = None;
    let res = lora_skill::fs::write_atomic_with(out, |f| {
        let mut w = BufWriter::with_capacity(1 << 20, f);
        let r = writer::write(out, &mut w, &plan.kvs, &infos, &mut |i| {
            let t = &plan.tensors[i];
            let v = planned_values(t, merged)?;
            let bytes = encode(&v, t.info.ty);
            on_tensor(i + 1, n, &t.info.name)?;
            Ok(bytes)
        });
        match r {
            Ok(()) => std::io::Write::flush(&mut w),
            Err(e) => {
                err = Some(e);
                Err(std::io::Error::other("export failed"))
            }
        }
    });
    if let Some(e) = err {
        return Err(e);
    }
    res.map_err(|e| MergeError::io(out, e))?;
    let mut types = BTreeMap::new();
    for t in &infos {
        *types.entry(t.ty.name().to_string()).or_insert(0) += 1;
    }
    Ok(GgufReport {
        path: out.display().to_string(),
        bytes: std::fs::metadata(out).map(|m| m.len()).unwrap_or(0),
        types,
        n_tensors: n,
        chat_template: plan.tokenizer.has_chat_template,
        warnings: plan.tokenizer.warnings.clone(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn permutation_matches_the_converter() {
        // 1 head of d=4 rows, 1 column: rows [0,1,2,3] -> [0,2,1,3]
        assert_eq!(permute_rows(&[0., 1., 2., 3.], 1, 1), vec![0., 2., 1., 3.]);
        // 2 heads of 4 rows, 2 columns
        let w: Vec<f32> = (0..16).map(|x| x as f32).collect();
        let p = permute_rows(&w, 2, 2);
        assert_eq!(&p[..8], &[0., 1., 4., 5., 2., 3., 6., 7.]);
    }

    #[test]
    fn q4_k_m_mix_follows_llama_quant() {
        let n = 32;
        let six: Vec<usize> = (0..n).filter(|&i| use_more_bits(i, n)).collect();
        assert_eq!(
            six,
            vec![0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
        );
        let q = GgufQuantization::Q4KM;
        assert_eq!(
            tensor_type("blk.0.attn_v.weight", &[256, 64], q, true, n),
            GgmlType::Q6_K
        );
        assert_eq!(
            tensor_type("blk.4.attn_v.weight", &[256, 64], q, true, n),
            GgmlType::Q4_K
        );
        assert_eq!(
            tensor_type("blk.4.attn_q.weight", &[576, 64], q, true, n),
            GgmlType::Q5_0
        );
        assert_eq!(
            tensor_type("blk.0.ffn_down.weight", &[576, 64], q, true, n),
            GgmlType::Q8_0
        );
        assert_eq!(
            tensor_type("output.weight", &[256, 100], q, true, n),
            GgmlType::Q6_K
        );
        assert_eq!(
            tensor_type("token_embd.weight", &[256, 100], q, true, n),
            GgmlType::Q4_K
        );
        assert_eq!(
            tensor_type("token_embd.weight", &[256, 100], q, false, n),
            GgmlType::Q6_K
        );
        assert_eq!(
            tensor_type("token_embd.weight", &[576, 100], q, false, n),
            GgmlType::Q8_0
        );
        assert_eq!(
            tensor_type("blk.0.attn_norm.weight", &[256], q, true, n),
            GgmlType::F32
        );
        assert_eq!(
            tensor_type(
                "blk.0.attn_q.weight",
                &[40, 8],
                GgufQuantization::Q8_0,
                true,
                n
            ),
            GgmlType::F16
        );
    }
}
