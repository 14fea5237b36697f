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

/// Block-diagonal causal pattern `[1, 1, T, T]` of samples of `lens` laid end to end.
fn packed_pattern(lens: &[i64]) -> Tensor {
    let seg: Vec<i64> = lens
        .iter()
        .enumerate()
        .flat_map(|(i, &n)| std::iter::repeat_n(i as i64, n as usize))
        .collect();
    let t = seg.len() as i64;
    let s = Tensor::from_slice(&seg);
    let same = s.view([t, 1]).eq_tensor(&s.view([1, t]));
    let causal = Tensor::ones([t, t], (Kind::Bool, Device::Cpu)).tril(0);
    same.logical_and(&causal).view([1, 1, t, t])
}

/// Packed rows: a sample's logits are those it has alone, whatever is packed
/// before or after it (block-diagonal attention, positions restarting at 0),
/// and Mistral's sliding window still applies inside a packed sample (its
/// second sample is longer than the fixture's window of 6). The layer-by-layer
/// path used by activation checkpointing gives the same hidden states.
#[test]
fn a_packed_sample_has_its_logits_alone() {
    let _g = tch::no_grad_guard();
    for arch in ["llama", "mistral", "qwen2"] {
        let (model, _) =
            LlamaModel::load(&tiny_models().join(arch), Kind::Float, Device::Cpu).unwrap();
        let vocab = model.config.vocab_size as i64;
        let tokens = |n: i64, salt: i64| -> Vec<i64> {
            (0..n).map(|i| (i * 31 + salt * 97 + 3) % vocab).collect()
        };
        let logits_alone = |ids: &[i64]| {
            let x = Tensor::from_slice(ids).view([1, -1]);
            model.forward(&x, None, None).unwrap()
        };
        let b = tokens(9, 1);
        let b_alone = logits_alone(&b);
        let mut seen_b: Vec<Tensor> = Vec::new();
        for before in [tokens(4, 2), tokens(7, 3)] {
            let row: Vec<i64> = before.iter().chain(&b).copied().collect();
            let lens = [before.len() as i64, b.len() as i64];
            let pos: Vec<i64> = lens.iter().flat_map(|&n| 0..n).collect();
            let ids = Tensor::from_slice(&row).view([1, -1]);
            let pos = Tensor::from_slice(&pos).view([1, -1]);
            let attend = packed_pattern(&lens);
            let hidden = model
                .forward_hidden_attend(&ids, &pos, &attend, false)
                .unwrap();
            let logits = model.lm_head.forward(&hidden);
            let got_b = logits.narrow(1, lens[0], lens[1]);
            let d = max_abs_diff(&got_b, &b_alone);
            assert!(d < 1e-5, "{arch}: packed sample's logits differ by {d}");
            let d = max_abs_diff(&logits.narrow(1, 0, lens[0]), &logits_alone(&before));
            assert!(d < 1e-5, "{arch}: first sample's logits differ by {d}");
            seen_b.push(got_b);

            // The layer-by-layer pass (activation checkpointing) on the same row.
            let ctx = model.layer_context(&pos, Some(&attend)).unwrap();
            let mut x = model.embed(&ids);
            for l in 0..model.num_layers() {
                x = model.layer(l, &x, &ctx, false);
            }
            let d = max_abs_diff(&model.final_norm(&x), &hidden);
            assert!(
                d < 1e-5,
                "{arch}: layer-by-layer packed pass differs by {d}"
            );
        }
        let d = max_abs_diff(&seen_b[0], &seen_b[1]);
        assert!(
            d < 1e-5,
            "{arch}: the sample packed first changed the second's logits by {d}"
        );

        // Layer by layer with plain causal attention (the window applies too).
        let ids = Tensor::from_slice(&b).view([1, -1]);
        let pos = Tensor::arange(b.len() as i64, (Kind::Int64, Device::Cpu)).view([1, -1]);
        let ctx = model.layer_context(&pos, None).unwrap();
        let mut x = model.embed(&ids);
        for l in 0..model.num_layers() {
            x = model.layer(l, &x, &ctx, false);
        }
        let d = max_abs_diff(&model.lm_head.forward(&model.final_norm(&x)), &b_alone);
        assert!(
            d < 1e-5,
            "{arch}: layer-by-layer causal pass differs by {d}"
        );
    }
}
