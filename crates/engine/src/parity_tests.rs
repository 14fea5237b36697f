//! Parity with transformers: logits of the tiny fixtures (made and run by
//! transformers through the project's Python) against ours, fp32, 1e-4.

use crate::model::LlamaModel;
use crate::testutil::{max_abs_diff, tiny_models};
use std::collections::BTreeMap;
use tch::{Device, Kind, Tensor};

fn reference(arch: &str) -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(tiny_models().join(arch).join("reference.safetensors"))
        .unwrap()
        .into_iter()
        .collect()
}

fn check_logits(arch: &str) {
    let dir = tiny_models().join(arch);
    let (model, report) = LlamaModel::load(&dir, Kind::Float, Device::Cpu).unwrap();
    assert!(report.is_clean(), "{}", report.summary());
    let r = reference(arch);
    let _g = tch::no_grad_guard();
    let logits = model.forward(&r["ids_plain"], None, None).unwrap();
    let d = max_abs_diff(&logits, &r["logits_plain"]);
    assert!(d < 1e-4, "{arch}: plain logits differ by {d}");

    // Left padding: positions derived from the mask equal transformers' explicit ones.
    let logits = model
        .forward(&r["ids_pad"], Some(&r["mask_pad"]), None)
        .unwrap();
    let mask = r["mask_pad"].to_kind(Kind::Bool).unsqueeze(-1);
    let diff = (logits - &r["logits_pad"])
        .abs()
        .masked_fill(&mask.logical_not(), 0.0);
    let d = f64::try_from(diff.max()).unwrap();
    assert!(d < 1e-4, "{arch}: padded logits differ by {d}");
}

#[test]
fn llama_logits_match_transformers() {
    check_logits("llama");
}

#[test]
fn mistral_logits_match_transformers() {
    check_logits("mistral");
}

#[test]
fn qwen2_logits_match_transformers() {
    check_logits("qwen2");
}

#[test]
fn transformers_v4_config_gives_the_same_logits() {
    // Rewrite the llama fixture's 5.x `rope_parameters` as 4.x top-level fields.
    let src = tiny_models().join("llama");
    let dir = tempfile::tempdir().unwrap();
    for f in ["model.safetensors", "config.json"] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(src.join("config.json")).unwrap()).unwrap();
    let mut rope = cfg["rope_parameters"].take();
    let theta = rope["rope_theta"].take();
    rope.as_object_mut().unwrap().remove("rope_theta");
    let obj = cfg.as_object_mut().unwrap();
    obj.remove("rope_parameters");
    obj.insert("rope_theta".into(), theta);
    obj.insert("rope_scaling".into(), rope);
    std::fs::write(
        dir.path().join("config.json"),
        serde_json::to_vec(&cfg).unwrap(),
    )
    .unwrap();
    let (model, _) = LlamaModel::load(dir.path(), Kind::Float, Device::Cpu).unwrap();
    let r = reference("llama");
    let logits = tch::no_grad(|| model.forward(&r["ids_plain"], None, None).unwrap());
    assert!(max_abs_diff(&logits, &r["logits_plain"]) < 1e-4);
}

#[test]
fn a_missing_or_extra_tensor_is_named() {
    let src = tiny_models().join("qwen2");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let mut tensors = Tensor::read_safetensors(src.join("model.safetensors")).unwrap();
    tensors.retain(|(n, _)| n != "model.layers.1.self_attn.k_proj.bias");
    tensors.push((
        "model.layers.9.extra.weight".into(),
        Tensor::zeros([2], (Kind::Float, Device::Cpu)),
    ));
    crate::weights::save_safetensors(&dir.path().join("model.safetensors"), &tensors).unwrap();
    let err = LlamaModel::load(dir.path(), Kind::Float, Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("1 missing: model.layers.1.self_attn.k_proj.bias"),
        "{err}"
    );
    assert!(
        err.contains("1 unused: model.layers.9.extra.weight"),
        "{err}"
    );
}

#[test]
fn the_sliding_window_matters() {
    // Without Mistral's window (6 < 9 tokens) the logits leave the reference:
    // the parity above really checks the window mask.
    let src = tiny_models().join("mistral");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        src.join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    let text = std::fs::read_to_string(src.join("config.json")).unwrap();
    let text = text.replace("\"sliding_window\": 6", "\"sliding_window\": null");
    std::fs::write(dir.path().join("config.json"), text).unwrap();
    let (model, _) = LlamaModel::load(dir.path(), Kind::Float, Device::Cpu).unwrap();
    assert_eq!(model.config.sliding_window, None);
    let r = reference("mistral");
    let logits = tch::no_grad(|| model.forward(&r["ids_plain"], None, None).unwrap());
    assert!(max_abs_diff(&logits, &r["logits_plain"]) > 1e-3);
}
