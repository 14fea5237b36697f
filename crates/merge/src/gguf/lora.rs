//! GGUF LoRA adapters for `llama-cli --lora` / Ollama `ADAPTER`
//! (llama.cpp `convert_lora_to_gguf.py`, `src/llama-adapter.cpp`).
//!
//! Tensors `<gguf weight name>.lora_a` (ne `[in, r]`, the bytes of PyTorch `A [r, in]`)
//! and `.lora_b` (ne `[r, out]`); arch `llama` permutes the rows of q/k `lora_b` like the
//! base weights. llama.cpp scales by `adapter.lora.alpha / r`; any other per-module
//! scale (rsLoRA, `alpha_pattern`, `rank_pattern`) is folded into B.

use super::convert::{self, Arch, HfConfig};
use super::writer::{self, GgmlType, TensorInfo, Value};
use crate::adapter::Adapter;
use crate::error::{MergeError, Result};
use lora_spec::contracts::merge::GgufQuantization;
use std::io::BufWriter;
use std::path::Path;

/// What a GGUF LoRA export wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LoraReport {
    /// File written.
    pub path: String,
    /// Bytes.
    pub bytes: u64,
    /// Adapted weights.
    pub modules: usize,
    /// `adapter.lora.alpha` written.
    pub alpha: f32,
}

/// Checks that `adapter` can be carried by a GGUF LoRA (no DoRA, no embedding
/// adapters, no modules_to_save, no lora_bias) and fits arch `cfg`.
pub fn preflight(adapter: &Adapter) -> Result<()> {
    if adapter.has_dora() {
        return Err(MergeError::unsupported(
            "DoRA adapters (lora_magnitude_vector) cannot be loaded by llama.cpp as GGUF LoRA",
            "merge the adapter into the model and export the merged model: `lora-trainer export --model BASE --adapter DIR --format gguf`",
        ));
    }
    if !adapter.replacements.is_empty() {
        let names: Vec<&str> = adapter.replacements.keys().map(String::as_str).collect();
        return Err(MergeError::unsupported(
            format!(
                "the adapter carries full trained tensors (modules_to_save / bias): {}",
                names.join(", ")
            ),
            "a GGUF LoRA holds only low-rank pairs; merge and export the whole model with --format gguf instead",
        ));
    }
    if let Some(m) = adapter
        .modules
        .iter()
        .find(|m| m.embedding || m.bias.is_some())
    {
        return Err(MergeError::unsupported(
            format!(
                "module `{}` is an embedding adapter or has lora_bias, which this GGUF LoRA writer does not carry",
                m.module
            ),
            "merge the adapter and export the whole model with --format gguf",
        ));
    }
    Ok(())
}

/// Writes `adapter` (trained on a base with config `cfg`) as a GGUF LoRA at `out`.
pub fn write_lora(
    out: &Path,
    adapter: &Adapter,
    cfg: &HfConfig,
    q: GgufQuantization,
) -> Result<LoraReport> {
    preflight(adapter)?;
    let ty = match q {
        GgufQuantization::F32 => GgmlType::F32,
        GgufQuantization::F16 => GgmlType::F16,
        GgufQuantization::Bf16 => GgmlType::BF16,
        GgufQuantization::Q8_0 => GgmlType::Q8_0,
        GgufQuantization::Q4KM => {
            return Err(MergeError::invalid(
                "gguf_quantization",
                "llama.cpp LoRA adapters support F32, F16, BF16 or Q8_0",
                "use --quant f16 (or omit --quant for f32)",
            ));
        }
    };
    let c = &adapter.config;
    let alpha = if c.use_rslora {
        c.lora_alpha * (c.r as f64).sqrt()
    } else {
        c.lora_alpha
    } as f32;
    let mut infos = Vec::new();
    let mut jobs = Vec::new();
    for m in &adapter.modules {
        let g = convert::gguf_name(&m.base_weight).ok_or_else(|| {
            MergeError::unsupported(
                format!("adapted module `{}` has no GGUF name", m.module),
                "GGUF LoRA supports the attention and MLP projections of llama/mistral/qwen2",
            )
        })?;
        let a = adapter
            .tensors
            .get(&m.a)
            .map(|e| e.shape.clone())
            .unwrap_or_default();
        let b = adapter
            .tensors
            .get(&m.b)
            .map(|e| e.shape.clone())
            .unwrap_or_default();
        let (r, inn, outn) = (m.rank, a[1], b[0]);
        let pick = |ne0: usize| {
            if ty.block_size() > 1 && !ne0.is_multiple_of(ty.block_size()) {
                GgmlType::F16
            } else {
                ty
            }
        };
        infos.push(TensorInfo {
            name: format!("{g}.lora_a"),
            ne: vec![inn as u64, r as u64],
            ty: pick(inn),
        });
        infos.push(TensorInfo {
            name: format!("{g}.lora_b"),
            ne: vec![r as u64, outn as u64],
            ty: pick(r),
        });
        // llama.cpp applies alpha / r; fold the rest of our scale into B.
        let factor = (m.scale * r as f64 / alpha as f64) as f32;
        let permute = match cfg.arch {
            Arch::Llama if m.module.ends_with("self_attn.q_proj") => Some(cfg.n_head),
            Arch::Llama if m.module.ends_with("self_attn.k_proj") => Some(cfg.n_head_kv),
            _ => None,
        };
        jobs.push((m.a.clone(), None, 1.0f32));
        jobs.push((m.b.clone(), permute.map(|h| (h, r)), factor));
    }
    let kvs = vec![
        (
            "general.architecture".to_string(),
            Value::Str(cfg.arch.name().into()),
        ),
        ("general.type".to_string(), Value::Str("adapter".into())),
        ("adapter.type".to_string(), Value::Str("lora".into())),
        ("adapter.lora.alpha".to_string(), Value::F32(alpha)),
    ];
    let mut err: Option<MergeError> = None;
    let res = lora_skill::fs::write_atomic_with(out, |f| {
        let mut w = BufWriter::new(f);
        let r = writer::write(out, &mut w, &kvs, &infos, &mut |i| {
            let (name, permute, factor) = &jobs[i];
            let (mut v, _) = adapter.f32(name)?;
            if *factor != 1.0 {
                v.iter_mut().for_each(|x| *x *= factor);
            }
            if let Some((h, cols)) = permute {
                v = convert::permute_rows(&v, *h, *cols);
            }
            Ok(convert::encode(&v, infos[i].ty))
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
    Ok(LoraReport {
        path: out.display().to_string(),
        bytes: std::fs::metadata(out).map(|m| m.len()).unwrap_or(0),
        modules: adapter.modules.len(),
        alpha,
    })
}
