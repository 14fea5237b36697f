//! GGUF reader and importer against gguf-py and transformers, and the real
//! SmolLM2-135M-Instruct import answering "Paris".

use crate::generate::{GenerationConfig, generate};
use crate::gguf::GgufFile;
use crate::gguf_import::import_gguf;
use crate::model::LlamaModel;
use crate::testutil::{cached_fixture, max_abs_diff};
use crate::tokenizer::{ChatMessage, TextTokenizer};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use tch::{Device, Kind, Tensor};

fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| cached_fixture("gguf_models.py", &[]))
}

#[test]
fn dequantisation_equals_gguf_py_for_every_type() {
    let g = GgufFile::open(&fixtures().join("quants.gguf")).unwrap();
    let refs: std::collections::BTreeMap<String, Tensor> =
        Tensor::read_safetensors(fixtures().join("quants_ref.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let mut seen = Vec::new();
    for info in &g.tensors {
        let ours = g.read_f32(info).unwrap();
        let want = &refs[&info.name];
        assert_eq!(ours.size(), want.size(), "{}", info.name);
        assert!(
            ours.equal(want),
            "{} ({}): max diff {}",
            info.name,
            info.ggml_type.name(),
            max_abs_diff(&ours, want)
        );
        seen.push(info.ggml_type.name());
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            "BF16", "F16", "F32", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q6_K", "Q8_0"
        ]
    );
}

fn check_import(arch: &str) {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("model");
    let report = import_gguf(&fixtures().join(format!("{arch}.gguf")), &dir, |_, _| {}).unwrap();
    assert_eq!(report.tied_embeddings, arch == "qwen2");
    let (model, load) = LlamaModel::load(&dir, Kind::Float, Device::Cpu).unwrap();
    assert!(load.is_clean());
    let r: std::collections::BTreeMap<String, Tensor> =
        Tensor::read_safetensors(fixtures().join(arch).join("reference.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let logits = tch::no_grad(|| model.forward(&r["ids"], None, None).unwrap());
    let d = max_abs_diff(&logits, &r["logits"]);
    assert!(
        d < 1e-4,
        "{arch}: imported logits differ from transformers' by {d}"
    );
    // The rebuilt tokenizer tokenizes like the original.
    let tok = TextTokenizer::from_dir(&dir).unwrap();
    let cases: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(fixtures().join(arch).join("tokens.json")).unwrap())
            .unwrap();
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let want: Vec<i64> = c["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        assert_eq!(tok.encode(text, true).unwrap(), want, "{text:?}");
        assert_eq!(tok.decode(&want, true).unwrap(), text);
    }
    assert_eq!(tok.eos_token.as_deref(), Some("<|eos|>"));
    assert!(tok.chat_template.is_some());
    // A second import into the same folder is refused, not merged.
    let err = import_gguf(&fixtures().join(format!("{arch}.gguf")), &dir, |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
}

#[test]
fn imported_llama_gguf_equals_the_hf_original() {
    check_import("llama");
}

#[test]
fn imported_qwen2_gguf_equals_the_hf_original() {
    check_import("qwen2");
}

/// A SentencePiece vocabulary (llama.cpp keeps pieces, scores and types, no
/// merges) becomes a tokenizer.json that tokenizes and decodes exactly as the
/// `sentencepiece` library does: merges, ▁ spaces, byte fallback, no BOS
/// without special tokens, BOS with them.
#[test]
fn imported_sentencepiece_vocabulary_tokenizes_like_sentencepiece() {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("model");
    let report = import_gguf(&fixtures().join("spm.gguf"), &dir, |_, _| {}).unwrap();
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    let (_, load) = LlamaModel::load(&dir, Kind::Float, Device::Cpu).unwrap();
    assert!(load.is_clean());
    let tok = TextTokenizer::from_dir(&dir).unwrap();
    let cases: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(fixtures().join("spm/tokens.json")).unwrap())
            .unwrap();
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let want: Vec<i64> = c["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        assert_eq!(tok.encode(text, false).unwrap(), want, "{text:?}");
        assert_eq!(
            tok.decode(&want, true).unwrap(),
            c["decoded"].as_str().unwrap(),
            "{text:?}"
        );
        let with_bos = tok.encode(text, true).unwrap();
        assert_eq!(with_bos[0], 1, "add_bos_token: <s> first");
        assert_eq!(&with_bos[1..], &want[..]);
    }
}

/// Llama-3 rope scaling survives the round trip although the GGUF keeps only
/// `rope_freqs.weight`: the recovered rope_scaling is the original one and the
/// logits are transformers'.
#[test]
fn imported_llama3_gguf_recovers_the_rope_scaling() {
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("model");
    import_gguf(&fixtures().join("llama3.gguf"), &dir, |_, _| {}).unwrap();
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        config["rope_scaling"],
        serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    );
    drop(out);
    check_import("llama3");
}

#[test]
fn broken_files_are_reported_with_position() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.gguf");
    std::fs::write(&p, b"GGML....").unwrap();
    let err = GgufFile::open(&p).unwrap_err().to_string();
    assert!(err.contains("not a GGUF file"), "{err}");
    let full = std::fs::read(fixtures().join("llama.gguf")).unwrap();
    std::fs::write(&p, &full[..full.len() / 2]).unwrap();
    let g = GgufFile::open(&p).unwrap();
    let last = g.tensors.last().unwrap();
    let err = g.read_f32(last).unwrap_err().to_string();
    assert!(err.contains("runs past the end of the file"), "{err}");
    std::fs::write(&p, &full[..200]).unwrap();
    let err = GgufFile::open(&p).unwrap_err().to_string();
    assert!(err.contains("truncated at byte"), "{err}");
}

/// The imported SmolLM2-135M-Instruct: `<cache>/models/SmolLM2-135M-Instruct`
/// (made by `cargo xtask setup`), or an import of the cached GGUF into a temp folder.
fn smollm2() -> Option<(PathBuf, Option<tempfile::TempDir>)> {
    let cache = crate::hub::project_cache_dir()?;
    let dir = cache.join("models/SmolLM2-135M-Instruct");
    if dir.join("model.safetensors").is_file() {
        return Some((dir, None));
    }
    let gguf = cache.join("downloads/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !gguf.is_file() {
        return None;
    }
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m");
    import_gguf(&gguf, &out, |_, _| {}).unwrap();
    Some((out, Some(tmp)))
}

#[test]
fn smollm2_answers_paris() {
    let Some((dir, _keep)) = smollm2() else {
        // Skipped only when setup has not fetched the model yet.
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            b"SKIPPED smollm2_answers_paris: run `cargo xtask setup` to fetch and import SmolLM2-135M-Instruct\n",
        );
        return;
    };
    let (model, _) = LlamaModel::load(&dir, Kind::Float, Device::Cpu).unwrap();
    assert_eq!(model.config.num_parameters(), 134_515_008);
    let tok = TextTokenizer::from_dir(&dir).unwrap();
    let prompt = tok
        .encode_chat(
            &[ChatMessage::new("user", "What is the capital of France?")],
            true,
        )
        .unwrap();
    let cfg = GenerationConfig {
        max_new_tokens: 16,
        eos_token_ids: tok.eos_token_ids.clone(),
        ..Default::default()
    };
    let out = generate(&model, &[prompt], &cfg, Some(&tok)).unwrap();
    let text = out[0].text.clone().unwrap();
    assert!(text.contains("Paris"), "{text:?}");
}
