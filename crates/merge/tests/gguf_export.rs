//! GGUF exports verified by real readers: the PyPI `gguf` package (metadata types,
//! shapes, tensor types, dequantised values) and llama.cpp itself (through
//! llama-cpp-python: it loads the file and its logits match transformers').
#![allow(clippy::unwrap_used, clippy::print_stderr)]

mod common;

use common::*;
use lora_merge::export::{ExportKind, ExportRequest, export};
use lora_merge::gguf::GgmlType;
use lora_merge::gguf::convert::{self, HfConfig};
use lora_merge::{Adapter, MergedModel, SafetensorsSet};
use lora_spec::contracts::merge::GgufQuantization;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn ty_of(name: &str) -> GgmlType {
    match name {
        "F32" => GgmlType::F32,
        "F16" => GgmlType::F16,
        "BF16" => GgmlType::BF16,
        "Q8_0" => GgmlType::Q8_0,
        "Q5_0" => GgmlType::Q5_0,
        "Q4_K" => GgmlType::Q4_K,
        "Q6_K" => GgmlType::Q6_K,
        other => panic!("unexpected ggml type {other}"),
    }
}

fn export_gguf(
    base: &Path,
    adapter: Option<&Path>,
    q: GgufQuantization,
    out: &Path,
) -> lora_merge::ExportSummary {
    let mut req = ExportRequest::new(base, adapter.map(Path::to_path_buf), out, ExportKind::Gguf);
    req.quant = q;
    export(&req, &mut |_, _, _| Ok(())).unwrap()
}

/// Relative RMS error bound of each type against f32 (measured on these weights with
/// margin; Q4_K/Q5_0 are 4-5 bit formats, ~2-4% typical on Gaussian weights).
fn bound(t: GgmlType) -> f32 {
    match t {
        GgmlType::F32 => 0.0,
        GgmlType::F16 => 1e-3,
        GgmlType::BF16 => 4e-3,
        GgmlType::Q8_0 => 8e-3,
        GgmlType::Q6_K => 2e-2,
        GgmlType::Q5_0 => 5e-2,
        GgmlType::Q4_K => 8e-2,
    }
}

fn rel_rmse(a: &[f32], b: &[f32]) -> f32 {
    let e: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let s: f32 = a.iter().map(|x| x * x).sum();
    (e / s.max(1e-30)).sqrt()
}

fn check_with_gguf_package(file: &Path, base: &Path, adapter: Option<&Path>, q: GgufQuantization) {
    let deq = file.with_extension("deq.safetensors");
    let info = py(&[
        "gguf-read",
        file.to_str().unwrap(),
        "--out",
        deq.to_str().unwrap(),
    ]);
    let fields = &info["fields"];
    let ftype = |k: &str| fields[k]["types"][0].as_str().unwrap_or("?").to_string();
    let arch = fields["general.architecture"]["value"]
        .as_str()
        .unwrap()
        .to_string();
    for k in [
        "context_length",
        "embedding_length",
        "block_count",
        "feed_forward_length",
        "attention.head_count",
        "attention.head_count_kv",
        "rope.dimension_count",
    ] {
        assert_eq!(ftype(&format!("{arch}.{k}")), "UINT32", "{k}");
    }
    assert_eq!(
        ftype(&format!("{arch}.attention.layer_norm_rms_epsilon")),
        "FLOAT32"
    );
    assert_eq!(ftype(&format!("{arch}.rope.freq_base")), "FLOAT32");
    assert_eq!(ftype("general.file_type"), "UINT32");
    assert_eq!(fields["general.file_type"]["value"], convert::file_type(q));
    assert_eq!(ftype("tokenizer.ggml.add_bos_token"), "BOOL");
    assert_eq!(ftype("tokenizer.ggml.bos_token_id"), "UINT32");
    assert_eq!(fields["tokenizer.ggml.model"]["value"], "gpt2");
    assert!(
        fields["tokenizer.chat_template"]["value"]
            .as_str()
            .unwrap()
            .contains("add_generation_prompt")
    );
    assert_eq!(fields["tokenizer.ggml.tokens"]["value"]["len"], 1024);

    // Our own plan of the same export: names, ne, types; and the f32 values before encoding.
    let st = SafetensorsSet::open_model_dir(base).unwrap();
    let ad = adapter.map(|a| Adapter::open(a).unwrap());
    let merged = MergedModel::new(&st, ad.as_ref()).unwrap();
    let cfg = HfConfig::read(base).unwrap();
    let plan = convert::plan_model(&cfg, &merged, base, q, "x").unwrap();
    let tensors = info["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), plan.tensors.len());
    let deq = SafetensorsSet::open_files(&[deq]).unwrap();
    let mut worst: std::collections::BTreeMap<&str, f32> = Default::default();
    for (t, p) in tensors.iter().zip(&plan.tensors) {
        assert_eq!(t["name"], p.info.name);
        let ne: Vec<u64> = t["ne"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        assert_eq!(ne, p.info.ne, "{}", p.info.name);
        let ty = ty_of(t["type"].as_str().unwrap());
        assert_eq!(ty, p.info.ty, "{}", p.info.name);
        let theirs = deq.f32_named(&p.info.name).unwrap().0;
        let exact = convert::planned_values(p, &merged).unwrap();
        let ours = convert::decode(&convert::encode(&exact, ty), ty);
        // gguf-py decodes exactly what we encoded...
        let d = max_abs(&theirs, &ours);
        assert!(
            d <= 1e-6 * ours.iter().fold(1f32, |m, v| m.max(v.abs())),
            "{}: gguf-py vs ours {d}",
            p.info.name
        );
        // ...and that is within the type's error bound of the merged f32 weights.
        let e = rel_rmse(&exact, &theirs);
        assert!(
            e <= bound(ty),
            "{} ({}): rel. RMSE {e}",
            p.info.name,
            ty.name()
        );
        let w = worst.entry(ty.name()).or_default();
        *w = w.max(e);
    }
    eprintln!(
        "{} {q:?}: gguf-py reads it; worst rel. RMSE per type {worst:?}",
        file.display()
    );
}

#[test]
fn gguf_files_are_read_by_the_gguf_package() {
    let Some(s) = require_python("gguf_files_are_read_by_the_gguf_package") else {
        return;
    };
    let out = scratch();
    for q in [
        GgufQuantization::F32,
        GgufQuantization::F16,
        GgufQuantization::Bf16,
        GgufQuantization::Q8_0,
        GgufQuantization::Q4KM,
    ] {
        let f = out.join(format!("llama-{q:?}.gguf"));
        let sum = export_gguf(&s.join("llama"), Some(&s.join("a_rs")), q, &f);
        assert!(
            sum.warnings.iter().any(|w| w.contains("padded")),
            "{:?}",
            sum.warnings
        );
        check_with_gguf_package(&f, &s.join("llama"), Some(&s.join("a_rs")), q);
        if q == GgufQuantization::Q4KM {
            assert!(
                sum.gguf_types.contains_key("Q6_K") && sum.gguf_types.contains_key("Q4_K"),
                "{:?}",
                sum.gguf_types
            );
        }
    }
    // qwen2: tied embeddings (token_embd gets the output treatment), biases, no permutation.
    let f = out.join("qwen-q4km.gguf");
    export_gguf(
        &s.join("qwen"),
        Some(&s.join("q_plain")),
        GgufQuantization::Q4KM,
        &f,
    );
    check_with_gguf_package(
        &f,
        &s.join("qwen"),
        Some(&s.join("q_plain")),
        GgufQuantization::Q4KM,
    );
}

fn llama_logits(gguf: &Path, ids: &Path, lora: Option<&Path>) -> Vec<f32> {
    let out = gguf.with_extension(format!("{}.logits.json", lora.map_or("base", |_| "lora")));
    let mut args = vec![
        "llama-logits",
        gguf.to_str().unwrap(),
        ids.to_str().unwrap(),
        out.to_str().unwrap(),
    ];
    if let Some(l) = lora {
        args.extend(["--lora", l.to_str().unwrap()]);
    }
    py(&args);
    let v: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    flat(&v["logits"])
}

/// max |Δ| / max |reference|.
fn rel_max(a: &[f32], reference: &[f32]) -> f32 {
    max_abs(a, reference) / reference.iter().fold(0f32, |m, v| m.max(v.abs()))
}

/// Share of positions whose arg-max token agrees.
fn top1(a: &[f32], b: &[f32], vocab: usize) -> f32 {
    let am = |x: &[f32]| {
        x.iter()
            .enumerate()
            .fold(
                (0, f32::MIN),
                |m, (i, v)| if *v > m.1 { (i, *v) } else { m },
            )
            .0
    };
    let n = a.len() / vocab;
    (0..n)
        .filter(|&i| am(&a[i * vocab..(i + 1) * vocab]) == am(&b[i * vocab..(i + 1) * vocab]))
        .count() as f32
        / n as f32
}

#[test]
fn llama_cpp_loads_our_gguf_and_matches_transformers() {
    let Some(s) = require_python("llama_cpp_loads_our_gguf_and_matches_transformers") else {
        return;
    };
    if !has_llama_cpp() {
        eprintln!(
            "SKIPPED llama_cpp_loads_our_gguf_and_matches_transformers: llama-cpp-python is not installed \
                   ($LORA_TRAINER_PYTHON -m pip install llama-cpp-python)"
        );
        return;
    }
    let out = scratch();
    let ad = s.join("a_rs");
    let ids: PathBuf = out.join("ids.json");
    std::fs::write(&ids, prompts(&ad).to_string()).unwrap();
    let reference = fixture_logits(&ad, "merged_logits"); // PEFT merge_and_unload, transformers, f32
    let mut report = Vec::new();
    // F32/F16: llama.cpp's f32/f16 kernels against transformers in f32 (1e-2 relative for F16).
    // Q8_0/Q4_K_M: llama.cpp quantizes activations too (q8 dot products), so its logits move
    // by more than the weight error alone; the justified bound is llama.cpp's own quantization
    // of the same f32 weights (llama_model_quantize on our F32 file): ours must be as close to
    // transformers as that, within 5%. The loose absolute bound only catches broken files.
    let f32_file = out.join("m-F32.gguf");
    for (q, rel_bound) in [
        (GgufQuantization::F32, 1e-3f32),
        (GgufQuantization::F16, 1e-2),
        (GgufQuantization::Q8_0, 0.15),
        (GgufQuantization::Q4KM, 0.5),
    ] {
        let f = out.join(format!("m-{q:?}.gguf"));
        export_gguf(&s.join("llama"), Some(&ad), q, &f);
        let got = llama_logits(&f, &ids, None);
        assert_eq!(got.len(), reference.len());
        let r = rel_max(&got, &reference);
        let t = top1(&got, &reference, 1024);
        assert!(
            r <= rel_bound,
            "{q:?}: llama.cpp vs transformers rel. max diff {r} > {rel_bound}"
        );
        if matches!(q, GgufQuantization::F32 | GgufQuantization::F16) {
            assert_eq!(t, 1.0, "{q:?} top-1");
            report.push(format!(
                "{q:?}: rel max |Δlogit| {r:.2e}, top-1 agreement {t:.2}"
            ));
        } else {
            let lq = out.join(format!("llama-quantize-{q:?}.gguf"));
            let ft = if q == GgufQuantization::Q8_0 {
                "q8_0"
            } else {
                "q4_k_m"
            };
            assert_eq!(
                py(&[
                    "llama-quantize",
                    f32_file.to_str().unwrap(),
                    lq.to_str().unwrap(),
                    ft
                ])["rc"],
                0
            );
            let theirs = llama_logits(&lq, &ids, None);
            let r_ref = rel_max(&theirs, &reference);
            let same = max_abs(&got, &theirs);
            report.push(format!(
                "{q:?}: rel max |Δlogit| {r:.2e} (llama-quantize's file: {r_ref:.2e}, ours vs theirs max |Δ| {same:.1e}), top-1 {t:.2}"
            ));
            assert!(
                r <= r_ref * 1.05 + 1e-6,
                "{q:?}: ours {r} vs llama-quantize {r_ref}"
            );
        }
    }
    // GGUF LoRA on the base: llama.cpp applies it at run time; compare with PEFT base+adapter.
    let base = out.join("base-f32.gguf");
    export_gguf(&s.join("llama"), None, GgufQuantization::F32, &base);
    let lora = out.join("a_rs-LoRA.gguf");
    let mut req = ExportRequest::new(
        s.join("llama"),
        Some(ad.clone()),
        &lora,
        ExportKind::GgufLora,
    );
    req.quant = GgufQuantization::F32;
    export(&req, &mut |_, _, _| Ok(())).unwrap();
    let got = llama_logits(&base, &ids, Some(&lora));
    let r = rel_max(&got, &fixture_logits(&ad, "logits"));
    report.push(format!(
        "LoRA GGUF (rsLoRA, alpha_pattern, rank_pattern) on F32 base: rel max |Δlogit| {r:.2e}"
    ));
    assert!(r <= 1e-3, "LoRA GGUF: {r}");
    eprintln!("llama.cpp vs transformers/PEFT:\n  {}", report.join("\n  "));
}

#[test]
fn q4_k_m_matches_llama_quantize() {
    let Some(s) = require_python("q4_k_m_matches_llama_quantize") else {
        return;
    };
    if !has_llama_cpp() {
        eprintln!("SKIPPED q4_k_m_matches_llama_quantize: llama-cpp-python is not installed");
        return;
    }
    let out = scratch();
    let f32g = out.join("f32.gguf");
    export_gguf(
        &s.join("llama"),
        Some(&s.join("a_plain")),
        GgufQuantization::F32,
        &f32g,
    );
    let ours = out.join("ours.gguf");
    export_gguf(
        &s.join("llama"),
        Some(&s.join("a_plain")),
        GgufQuantization::Q4KM,
        &ours,
    );
    let theirs = out.join("theirs.gguf");
    let rc = py(&[
        "llama-quantize",
        f32g.to_str().unwrap(),
        theirs.to_str().unwrap(),
        "q4_k_m",
    ]);
    assert_eq!(rc["rc"], 0);
    let a = py(&[
        "gguf-read",
        ours.to_str().unwrap(),
        "--out",
        out.join("a.safetensors").to_str().unwrap(),
    ]);
    let b = py(&[
        "gguf-read",
        theirs.to_str().unwrap(),
        "--out",
        out.join("b.safetensors").to_str().unwrap(),
    ]);
    let da = SafetensorsSet::open_files(&[out.join("a.safetensors")]).unwrap();
    let db = SafetensorsSet::open_files(&[out.join("b.safetensors")]).unwrap();
    let mut identical = 0;
    let ta = a["tensors"].as_array().unwrap();
    for t in b["tensors"].as_array().unwrap() {
        let name = t["name"].as_str().unwrap();
        let mine = ta
            .iter()
            .find(|x| x["name"] == name)
            .unwrap_or_else(|| panic!("{name} missing in ours"));
        assert_eq!(
            mine["type"], t["type"],
            "{name}: llama-quantize chose {} ",
            t["type"]
        );
        let d = max_abs(
            &da.f32_named(name).unwrap().0,
            &db.f32_named(name).unwrap().0,
        );
        if d == 0.0 {
            identical += 1;
        }
        assert!(d <= 1e-2, "{name}: dequantised values differ by {d}");
    }
    eprintln!(
        "Q4_K_M: same type mix as llama-quantize on all {} tensors; {identical} dequantise identically",
        ta.len()
    );
}
