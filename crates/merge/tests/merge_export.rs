//! Merge parity with PEFT and the HF / `.bin` exports, verified by the tools that
//! read them (PEFT merge_and_unload, transformers, torch.load).
#![allow(clippy::unwrap_used, clippy::print_stderr)]

mod common;

use common::*;
use lora_merge::export::{ExportKind, ExportRequest, export};
use lora_merge::{DType, SafetensorsSet};
use std::path::Path;

fn run(req: &ExportRequest) -> lora_merge::ExportSummary {
    let mut n = 0;
    let s = export(req, &mut |done, total, _| {
        assert!(done <= total);
        n += 1;
        Ok(())
    })
    .unwrap();
    assert!(n > 0);
    s
}

/// Our merged tensors against PEFT's merge_and_unload (both fp32).
fn assert_matches_peft(ours: &Path, adapter: &Path, tol: f32) {
    let a = SafetensorsSet::open_model_dir(ours).unwrap();
    let b = SafetensorsSet::open_model_dir(&adapter.join("peft_merged")).unwrap();
    let mut worst = 0f32;
    for e in b.entries() {
        let (x, shape) = a
            .f32_named(&e.name)
            .unwrap_or_else(|_| panic!("missing {}", e.name));
        assert_eq!(shape, e.shape, "{}", e.name);
        let d = max_abs(&x, &b.f32(e));
        worst = worst.max(d);
        assert!(d <= tol, "{}: max |ours - peft| = {d}", e.name);
    }
    assert!(a.entries().len() >= b.entries().len());
    eprintln!(
        "{}: max |ours - PEFT merge_and_unload| = {worst:e}",
        adapter.display()
    );
}

#[test]
#[allow(clippy::print_stderr)]
fn streaming_merge_matches_peft_merge_and_unload() {
    let Some(s) = require_python("streaming_merge_matches_peft_merge_and_unload") else {
        return;
    };
    let out = scratch();
    for name in ["a_plain", "a_rs", "a_dora", "a_embed"] {
        let dst = out.join(name);
        let mut req = ExportRequest::new(
            s.join("llama"),
            Some(s.join(name)),
            &dst,
            ExportKind::Safetensors,
        );
        req.max_shard_bytes = 2_000_000; // forces sharding + index
        let sum = run(&req);
        assert!(sum.adapted_tensors > 0);
        assert!(
            dst.join("model.safetensors.index.json").is_file(),
            "sharded output has an index"
        );
        for f in [
            "config.json",
            "tokenizer.json",
            "tokenizer_config.json",
            "generation_config.json",
        ] {
            assert!(dst.join(f).is_file(), "{name}: {f} copied");
        }
        assert_matches_peft(&dst, &s.join(name), 2e-5);
    }
    // Qwen2 (bf16 base, tied embeddings, q/k/v biases) merged in f32.
    let dst = out.join("q_plain");
    let mut req = ExportRequest::new(
        s.join("qwen"),
        Some(s.join("q_plain")),
        &dst,
        ExportKind::Safetensors,
    );
    req.dtype = Some(DType::F32);
    run(&req);
    assert_matches_peft(&dst, &s.join("q_plain"), 2e-5);
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dst.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["dtype"], "float32");

    // The merged model's logits (transformers) against base + adapter (PEFT, unmerged).
    let ids = out.join("ids.json");
    std::fs::write(&ids, prompts(&s.join("a_rs")).to_string()).unwrap();
    let got = out.join("merged_logits.json");
    py(&[
        "logits",
        out.join("a_rs").to_str().unwrap(),
        ids.to_str().unwrap(),
        got.to_str().unwrap(),
    ]);
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&got).unwrap()).unwrap();
    let d = max_abs(
        &flat(&v["logits"]),
        &fixture_logits(&s.join("a_rs"), "logits"),
    );
    eprintln!("merged (ours, transformers) vs base+adapter (PEFT) logits: max |Δ| = {d:e}");
    assert!(d <= 1e-4, "max |Δlogit| {d}");
    // Refuses to overwrite.
    assert!(export(&req, &mut |_, _, _| Ok(())).is_err());
}

#[test]
fn adapter_on_the_wrong_base_is_refused_with_a_hint() {
    let Some(s) = require_python("adapter_on_the_wrong_base_is_refused_with_a_hint") else {
        return;
    };
    // An adapter for a deeper model: layer 9 does not exist in the 2-layer base.
    let ad = scratch().join("deep");
    std::fs::create_dir_all(&ad).unwrap();
    std::fs::write(
        ad.join("adapter_config.json"),
        r#"{"peft_type":"LORA","r":2,"lora_alpha":4}"#,
    )
    .unwrap();
    let p = "base_model.model.model.layers.9.self_attn.q_proj";
    let specs = [
        lora_merge::TensorSpec {
            name: format!("{p}.lora_A.weight"),
            dtype: DType::F32,
            shape: vec![2, 256],
        },
        lora_merge::TensorSpec {
            name: format!("{p}.lora_B.weight"),
            dtype: DType::F32,
            shape: vec![256, 2],
        },
    ];
    lora_merge::st::write_sharded(&ad, &specs, 1 << 30, &mut |i| {
        Ok(vec![0u8; specs[i].nbytes() as usize])
    })
    .unwrap();
    std::fs::rename(
        ad.join("model.safetensors"),
        ad.join("adapter_model.safetensors"),
    )
    .unwrap();
    let req = ExportRequest::new(
        s.join("llama"),
        Some(ad),
        scratch().join("x"),
        ExportKind::Safetensors,
    );
    let err = export(&req, &mut |_, _, _| Ok(())).unwrap_err();
    let skill: lora_skill::SkillError = err.into();
    assert_eq!(skill.kind, lora_skill::ErrorKind::Unsupported, "{skill:?}");
    assert!(skill.message.contains("layers.9"), "{skill:?}");
    assert!(skill.hint.unwrap().contains("different base model"));
}

#[test]
#[allow(clippy::print_stderr)]
fn pytorch_bin_loads_with_torch_load_weights_only() {
    let Some(s) = require_python("pytorch_bin_loads_with_torch_load_weights_only") else {
        return;
    };
    let out = scratch();
    for (dt, shard) in [(DType::BF16, 1_000_000u64), (DType::F32, 1u64 << 40)] {
        let tag = format!("{dt:?}");
        let bin = out.join(format!("bin-{tag}"));
        let st = out.join(format!("st-{tag}"));
        for (dir, kind) in [
            (&bin, ExportKind::PytorchBin),
            (&st, ExportKind::Safetensors),
        ] {
            let mut req = ExportRequest::new(s.join("llama"), Some(s.join("a_plain")), dir, kind);
            req.dtype = Some(dt);
            req.max_shard_bytes = shard;
            run(&req);
        }
        let ours = SafetensorsSet::open_model_dir(&st).unwrap();
        let mut files: Vec<_> = std::fs::read_dir(&bin)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "bin"))
            .collect();
        files.sort();
        assert_eq!(files.len() > 1, shard < 1 << 30, "{files:?}");
        if files.len() > 1 {
            assert!(bin.join("pytorch_model.bin.index.json").is_file());
        } else {
            assert_eq!(files[0].file_name().unwrap(), "pytorch_model.bin");
        }
        let mut seen = 0;
        for f in &files {
            let back = out.join(format!("back-{tag}-{seen}.safetensors"));
            let info = py(&["torch-load", f.to_str().unwrap(), back.to_str().unwrap()]);
            assert_eq!(info["type"], "dict");
            assert_eq!(info["mmap_equal"], true, "torch.load(mmap=True) agrees");
            let loaded = SafetensorsSet::open_files(&[back]).unwrap();
            for e in loaded.entries() {
                let o = ours.get(&e.name).unwrap();
                assert_eq!(e.dtype, dt);
                assert_eq!(e.shape, o.shape);
                assert_eq!(
                    loaded.bytes(e),
                    ours.bytes(o),
                    "{}: bytes identical",
                    e.name
                );
                seen += 1;
            }
        }
        assert_eq!(seen, ours.entries().len());
        eprintln!("torch.load(weights_only=True) read {seen} {tag} tensors byte-identical");
    }
}

#[tokio::test]
async fn merge_skill_runs_through_the_registry_and_validates() {
    let Some(s) = require_python("merge_skill_runs_through_the_registry_and_validates") else {
        return;
    };
    let out = scratch();
    let mut reg = lora_skill::SkillRegistry::new();
    lora_merge::register(&mut reg);
    let sink = lora_skill::MemorySink::new();
    let ctx = lora_skill::SkillContext::new(&out).with_sink(sink.clone());
    let input = serde_json::json!({
        "adapter_path": s.join("a_dora").display().to_string(),
        "base_model": s.join("llama").display().to_string(),
        "output_format": "safetensors",
        "output_path": out.join("merged").display().to_string(),
    });
    let res = reg
        .call_json(lora_spec::contracts::names::MERGE, input, &ctx)
        .await
        .unwrap();
    let v = &res.data["validation"];
    assert_eq!(v["passed"], true, "{v}");
    assert!(v["max_abs_diff"].as_f64().unwrap() < 1e-4);
    // The engine does not run DoRA: the weight check, said in a warning, and no logit figure.
    assert!(v["method"].as_str().unwrap().starts_with("weights"), "{v}");
    assert!(res.data["max_abs_logit_diff"].is_null());
    assert!(
        res.data["warnings"].as_array().unwrap().iter().any(|w| {
            let w = w.as_str().unwrap();
            w.contains("engine cannot run this base and adapter") && w.contains("use_dora")
        }),
        "{}",
        res.data["warnings"]
    );
    assert!(res.data["adapted_tensors"].as_u64().unwrap() >= 4);
    assert!(!sink.events().is_empty(), "progress reported");
    // Combination then GGUF LoRA through the same skill; DoRA adapters are refused for GGUF LoRA.
    let comb = serde_json::json!({
        "adapter_path": out.join("combined").display().to_string(),
        "base_model": s.join("llama").display().to_string(),
        "output_format": "gguf", "adapter_only": true, "gguf_quantization": "f16",
        "combination": {"adapters": [s.join("a_plain").display().to_string(), s.join("a_second").display().to_string()],
                        "weights": [0.5, 0.5], "combination_type": "cat"}
    });
    let res = reg
        .call_json(lora_spec::contracts::names::MERGE, comb, &ctx)
        .await
        .unwrap();
    assert!(
        res.data["merged_path"]
            .as_str()
            .unwrap()
            .ends_with("combined-LoRA.gguf")
    );
    assert!(res.data["validation"].is_null());
    assert!(
        res.data["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w.as_str().unwrap().contains("not validated at run time")),
        "{}",
        res.data["warnings"]
    );
    let bad = serde_json::json!({
        "adapter_path": s.join("a_dora").display().to_string(),
        "base_model": s.join("llama").display().to_string(),
        "output_format": "gguf", "adapter_only": true,
        "output_path": out.join("dora.gguf").display().to_string(),
    });
    let err = reg
        .call_json(lora_spec::contracts::names::MERGE, bad, &ctx)
        .await
        .unwrap_err();
    assert_eq!(err.kind, lora_skill::ErrorKind::Unsupported);
    assert!(err.message.contains("DoRA"), "{err:?}");
}

/// validate_after_merge runs the written model: the merged folder (f32, f16, bf16)
/// and GGUF files (F16, Q8_0, Q4_K_M, read back by the engine's importer) give
/// the logits of base + adapter within their format's bound, reported as
/// `max_abs_logit_diff`; a merged model that does not compute base + this
/// adapter fails the check.
#[tokio::test]
async fn validate_after_merge_compares_logits_and_catches_a_wrong_model() {
    let Some(s) = require_python("validate_after_merge_compares_logits_and_catches_a_wrong_model")
    else {
        return;
    };
    let out = scratch();
    let mut reg = lora_skill::SkillRegistry::new();
    lora_merge::register(&mut reg);
    let ctx = lora_skill::SkillContext::new(&out);
    let run = |extra: serde_json::Value, name: &str, base: &str, adapter: &str| {
        let mut input = serde_json::json!({
            "adapter_path": s.join(adapter).display().to_string(),
            "base_model": s.join(base).display().to_string(),
            "output_path": out.join(name).display().to_string(),
        });
        for (k, v) in extra.as_object().unwrap() {
            input[k] = v.clone();
        }
        let reg = &reg;
        let ctx = &ctx;
        async move {
            reg.call_json(lora_spec::contracts::names::MERGE, input, ctx)
                .await
                .unwrap()
        }
    };
    let cases = [
        (
            serde_json::json!({"output_format": "safetensors",
                               "validation_prompts": ["Held-out prompt one.", "def f(x):\n    return x"]}),
            "f32",
            "llama",
            "a_plain",
            1e-4,
        ),
        (
            serde_json::json!({"output_format": "safetensors", "output_dtype": "f16"}),
            "f16",
            "llama",
            "a_plain",
            1e-2,
        ),
        (
            serde_json::json!({"output_format": "safetensors"}),
            "bf16",
            "qwen",
            "q_plain",
            5e-2,
        ),
        (
            serde_json::json!({"output_format": "gguf", "gguf_quantization": "f16"}),
            "m16.gguf",
            "llama",
            "a_plain",
            1e-2,
        ),
        (
            serde_json::json!({"output_format": "gguf", "gguf_quantization": "q8_0"}),
            "m8.gguf",
            "llama",
            "a_plain",
            1e-1,
        ),
        (
            serde_json::json!({"output_format": "gguf", "gguf_quantization": "q4_k_m"}),
            "m4.gguf",
            "llama",
            "a_plain",
            1.0,
        ),
    ];
    for (extra, name, base, adapter, rel) in cases {
        let res = run(extra, name, base, adapter).await;
        let v = &res.data["validation"];
        assert_eq!(v["passed"], true, "{name}: {v}");
        assert!(
            v["method"].as_str().unwrap().starts_with("logits"),
            "{name}: {v}"
        );
        let diff = res.data["max_abs_logit_diff"].as_f64().unwrap();
        assert_eq!(diff, v["max_abs_diff"].as_f64().unwrap());
        assert!(v["tolerance"].as_f64().unwrap() >= rel, "{name}: {v}");
        let from = if name == "f32" {
            "(validation_prompts,"
        } else {
            "(the built-in prompts,"
        };
        assert!(v["method"].as_str().unwrap().contains(from), "{name}: {v}");
        eprintln!(
            "{name}: max |Δlogit| {diff:.3e}, relative RMS {}, top-1 {} (bound {})",
            v["relative_rms_diff"], v["top1_agreement"], v["tolerance"]
        );
    }
    // The f32 merge of a_plain is not base + a_second: the check says so.
    let wrong = lora_merge::validate::validate_logits(
        &out.join("f32"),
        &s.join("llama"),
        Some(&s.join("a_second")),
        lora_merge::validate::Written::F32,
        &[],
        None,
        &ctx,
    )
    .unwrap();
    assert!(!wrong.passed, "{wrong:?}");
    assert!(wrong.max_abs_diff > 100.0 * wrong.tolerance, "{wrong:?}");
    // Without an adapter (a plain conversion, `lora-trainer export` of a base)
    // the file is checked against the base alone.
    let plain = out.join("base16.gguf");
    let mut req = ExportRequest::new(s.join("llama"), None, &plain, ExportKind::Gguf);
    req.quant = lora_spec::contracts::merge::GgufQuantization::F16;
    export(&req, &mut |_, _, _| Ok(())).unwrap();
    let input = lora_spec::contracts::merge::MergeInput {
        gguf_quantization: lora_spec::contracts::merge::GgufQuantization::F16,
        ..Default::default()
    };
    let mut warnings = Vec::new();
    let v = lora_merge::skill::validate_output(
        ExportKind::Gguf,
        &input,
        &plain,
        &s.join("llama"),
        None,
        &ctx,
        &mut warnings,
    )
    .unwrap()
    .unwrap();
    assert!(
        v.passed && v.method.contains("against the base model"),
        "{v:?}"
    );
    eprintln!("base only, GGUF F16: max |Δlogit| {:.3e}", v.max_abs_diff);
    // The merged model is not the base: against the base alone it fails.
    let not_base = lora_merge::validate::validate_logits(
        &out.join("f32"),
        &s.join("llama"),
        None,
        lora_merge::validate::Written::F32,
        &[],
        None,
        &ctx,
    )
    .unwrap();
    assert!(!not_base.passed, "{not_base:?}");
}

/// Byte offset of `needle` in `hay` (the tensor's bytes inside its file).
fn find_bytes(hay: &[u8], needle: &[u8]) -> usize {
    let head = &needle[..needle.len().min(256)];
    let at = hay
        .windows(head.len())
        .position(|w| w == head)
        .expect("tensor bytes found in the file");
    assert_eq!(&hay[at..at + needle.len()], needle);
    at
}

/// A merge that validates, then the same output tampered with on disk: the
/// check (`lora_merge::skill::validate_output`, what the skill runs after
/// writing) fails with a `backend` error naming the file and the measured
/// difference. Safetensors f32: one projection scaled by 1 + 1e-3; GGUF Q8_0:
/// one projection's block scales negated.
#[tokio::test]
async fn validation_fails_on_a_tampered_output() {
    use lora_merge::export::ExportKind;
    use lora_spec::contracts::merge::{ExportFormat, GgufQuantization, MergeInput};
    let Some(s) = require_python("validation_fails_on_a_tampered_output") else {
        return;
    };
    let out = scratch();
    let mut reg = lora_skill::SkillRegistry::new();
    lora_merge::register(&mut reg);
    let ctx = lora_skill::SkillContext::new(&out);
    let cases = [
        (ExportKind::Safetensors, ExportFormat::Safetensors, "st"),
        (ExportKind::Gguf, ExportFormat::Gguf, "q8.gguf"),
    ];
    for (kind, format, name) in cases {
        let input = MergeInput {
            adapter_path: s.join("a_plain").display().to_string(),
            base_model: s.join("llama").display().to_string(),
            output_format: format,
            gguf_quantization: GgufQuantization::Q8_0,
            output_path: Some(out.join(name).display().to_string()),
            ..MergeInput::default()
        };
        let res = reg
            .call_json(
                lora_spec::contracts::names::MERGE,
                serde_json::to_value(&input).unwrap(),
                &ctx,
            )
            .await
            .unwrap();
        let good = res.data["max_abs_logit_diff"].as_f64().unwrap();
        assert_eq!(res.data["validation"]["passed"], true, "{name}");
        let path = out.join(name);
        // A cancelled caller stops the check before it loads anything.
        let cancelled = lora_skill::SkillContext::new(&out);
        cancelled.cancel_token().cancel();
        let err = lora_merge::skill::validate_output(
            kind,
            &input,
            &path,
            &s.join("llama"),
            Some(&s.join("a_plain")),
            &cancelled,
            &mut Vec::new(),
        )
        .unwrap_err();
        assert_eq!(err.kind, lora_skill::ErrorKind::Cancelled, "{err:?}");
        let (file, tensor) = match kind {
            ExportKind::Safetensors => {
                let file = path.join("model.safetensors");
                let mut bytes = std::fs::read(&file).unwrap();
                let t = "model.layers.1.self_attn.o_proj.weight";
                let (at, len) = {
                    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
                    let view = st.tensor(t).unwrap();
                    assert_eq!(view.dtype(), safetensors::Dtype::F32);
                    let at = view.data().as_ptr() as usize - bytes.as_ptr() as usize;
                    (at, view.data().len())
                };
                for c in bytes[at..at + len].chunks_exact_mut(4) {
                    let v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]) * (1.0 + 1e-3);
                    c.copy_from_slice(&v.to_le_bytes());
                }
                std::fs::write(&file, bytes).unwrap();
                (file, t)
            }
            _ => {
                let t = "blk.1.attn_output.weight";
                let g = lora_engine::gguf::GgufFile::open(&path).unwrap();
                let info = g.tensor_info(t).unwrap();
                assert_eq!(info.ggml_type.name(), "Q8_0");
                let raw = g.raw(info).unwrap();
                drop(g);
                let mut bytes = std::fs::read(&path).unwrap();
                let at = find_bytes(&bytes, &raw);
                // Q8_0 block: f16 scale then 32 int8; flip the scale's sign bit.
                for block in bytes[at..at + raw.len()].chunks_exact_mut(34) {
                    block[1] ^= 0x80;
                }
                std::fs::write(&path, bytes).unwrap();
                (path.clone(), t)
            }
        };
        let mut warnings = Vec::new();
        let err = lora_merge::skill::validate_output(
            kind,
            &input,
            &path,
            &s.join("llama"),
            Some(&s.join("a_plain")),
            &ctx,
            &mut warnings,
        )
        .unwrap_err();
        eprintln!(
            "{name}: correct file max |Δlogit| {good:.3e}; {tensor} tampered: {}",
            err.message
        );
        assert_eq!(err.kind, lora_skill::ErrorKind::Backend, "{err:?}");
        assert!(
            err.message.starts_with("validation failed: logits"),
            "{err:?}"
        );
        assert!(
            err.message.contains("criterion: max |Δlogit|")
                && err.message.contains("exceeds the bound"),
            "{err:?}"
        );
        assert_eq!(err.file.as_deref(), Some(path.to_str().unwrap()), "{err:?}");
        assert!(err.hint.is_some(), "{err:?}");
        assert!(file.exists());
    }
}

/// `validation_prompts` are the caller's input: given with a base that has no
/// tokenizer they are refused (field, hint) before anything is written; with
/// no prompts such a base is checked on a fixed token-id ramp.
#[tokio::test]
async fn validation_prompts_need_the_tokenizer() {
    let Some(s) = require_python("validation_prompts_need_the_tokenizer") else {
        return;
    };
    let out = scratch();
    let bare = out.join("bare");
    std::fs::create_dir_all(&bare).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(s.join("llama").join(f), bare.join(f)).unwrap();
    }
    let mut reg = lora_skill::SkillRegistry::new();
    lora_merge::register(&mut reg);
    let ctx = lora_skill::SkillContext::new(&out);
    let input = |prompts: serde_json::Value, name: &str| {
        serde_json::json!({
            "adapter_path": s.join("a_plain").display().to_string(),
            "base_model": bare.display().to_string(),
            "output_path": out.join(name).display().to_string(),
            "validation_prompts": prompts,
        })
    };
    let err = reg
        .call_json(
            lora_spec::contracts::names::MERGE,
            input(serde_json::json!(["Hello"]), "refused"),
            &ctx,
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind, lora_skill::ErrorKind::InvalidInput, "{err:?}");
    assert_eq!(err.field.as_deref(), Some("validation_prompts"), "{err:?}");
    assert!(err.hint.is_some(), "{err:?}");
    assert!(!out.join("refused").exists(), "nothing written");
    let res = reg
        .call_json(
            lora_spec::contracts::names::MERGE,
            input(serde_json::json!([]), "ramp"),
            &ctx,
        )
        .await
        .unwrap();
    let v = &res.data["validation"];
    assert_eq!(v["passed"], true, "{v}");
    assert!(v["method"].as_str().unwrap().contains("id ramp"), "{v}");
    assert!(res.data["max_abs_logit_diff"].as_f64().unwrap() <= 1e-4);
}

/// A bf16 base that keeps some tensors in f32 (embeddings, norms) merges into
/// a mixed folder; its validation is held to the bf16 bound (the coarsest
/// type written), not to f32's 1e-4 because the first tensor is f32.
#[tokio::test]
async fn mixed_dtype_output_is_held_to_its_coarsest_type() {
    let Some(s) = require_python("mixed_dtype_output_is_held_to_its_coarsest_type") else {
        return;
    };
    let out = scratch();
    let base = out.join("mixed");
    std::fs::create_dir_all(&base).unwrap();
    for e in std::fs::read_dir(s.join("qwen")).unwrap() {
        let p = e.unwrap().path();
        if p.file_name().unwrap() != "model.safetensors" {
            std::fs::copy(&p, base.join(p.file_name().unwrap())).unwrap();
        }
    }
    let bytes = std::fs::read(s.join("qwen/model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, view) in st.tensors() {
        assert_eq!(view.dtype(), safetensors::Dtype::BF16);
        if name.contains("embed_tokens") || name.contains("norm") {
            let data = view
                .data()
                .chunks_exact(2)
                .flat_map(|c| {
                    half::bf16::from_le_bytes([c[0], c[1]])
                        .to_f32()
                        .to_le_bytes()
                })
                .collect();
            tensors.push((name, safetensors::Dtype::F32, view.shape().to_vec(), data));
        } else {
            tensors.push((
                name,
                view.dtype(),
                view.shape().to_vec(),
                view.data().to_vec(),
            ));
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, d, sh, data)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, sh.clone(), data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, &base.join("model.safetensors")).unwrap();
    let mut reg = lora_skill::SkillRegistry::new();
    lora_merge::register(&mut reg);
    let ctx = lora_skill::SkillContext::new(&out);
    let input = serde_json::json!({
        "adapter_path": s.join("q_plain").display().to_string(),
        "base_model": base.display().to_string(),
        "output_path": out.join("merged").display().to_string(),
    });
    let res = reg
        .call_json(lora_spec::contracts::names::MERGE, input, &ctx)
        .await
        .unwrap();
    let written = SafetensorsSet::open_model_dir(&out.join("merged")).unwrap();
    let types: std::collections::BTreeSet<_> = written
        .entries()
        .iter()
        .map(|e| format!("{:?}", e.dtype))
        .collect();
    assert_eq!(types.len(), 2, "mixed output: {types:?}");
    let v = &res.data["validation"];
    assert_eq!(v["passed"], true, "{v}");
    assert!(v["method"].as_str().unwrap().contains("(Bf16;"), "{v}");
}
