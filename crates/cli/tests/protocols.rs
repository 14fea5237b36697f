//! The protocol commands end to end through the binary: `ablation` and
//! `ensemble` write the configs they generate, `curriculum` splits a dataset
//! by words and by the base model's loss (the real eval skill on the tiny
//! random-init model), and `manifest create|verify` notices a changed dataset.

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_lora-trainer");

fn run_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .current_dir(dir)
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("the binary runs")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ok_json(dir: &Path, args: &[&str]) -> serde_json::Value {
    let o = run_in(dir, args);
    assert!(o.status.success(), "{args:?}: {}", text(&o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {}", text(&o)))
}

/// A spec and a dataset whose word order and length order differ.
fn workspace() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let rows: Vec<String> = (0..8)
        .map(|i| {
            serde_json::json!({
                "instruction": format!("Repeat the word {} times.", i + 1),
                "input": "",
                "output": vec!["echo"; i + 1].join(" "),
            })
            .to_string()
        })
        .collect();
    std::fs::write(dir.path().join("train.jsonl"), rows.join("\n") + "\n").unwrap();
    let spec = dir.path().join("experiment.yaml");
    std::fs::write(
        &spec,
        "version: \"1.0\"\nexperiment_name: proto\ndataset:\n  path: train.jsonl\n  format: alpaca\n\
         config:\n  base_model: tiny\n  lora_rank: 16\n  lora_alpha: 32\n  learning_rate: 2e-4\n\
         protocol:\n  type: ablation\n  seed: 11\n  ablation:\n    param: lora_rank\n    values: [8, 16]\n  ensemble:\n    members: 3\noutput:\n  dir: out\n",
    )
    .unwrap();
    (dir, spec)
}

#[test]
fn ablation_and_ensemble_write_the_configs_they_generate() {
    let (dir, _) = workspace();
    let d = dir.path();
    let r = ok_json(
        d,
        &[
            "ablation",
            "experiment.yaml",
            "--param",
            "lora_rank",
            "--values",
            "4,8,32",
            "--out",
            "abl",
            "--json",
        ],
    );
    let configs = r["data"]["configs"].as_array().unwrap();
    let ranks: Vec<u64> = configs
        .iter()
        .map(|c| c["trial_config"]["lora_rank"].as_u64().unwrap())
        .collect();
    // The base (rank 16) is the baseline, then the three values.
    assert_eq!(ranks, vec![16, 4, 8, 32]);
    assert_eq!(configs[0]["baseline"], true);
    let written: Vec<PathBuf> = std::fs::read_dir(d.join("abl"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    assert_eq!(written.len(), 4, "{written:?}");
    for w in &written {
        let c: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(w).unwrap()).unwrap();
        assert_eq!(
            c["learning_rate"],
            0.0002,
            "{}: the base is kept",
            w.display()
        );
    }
    // A bad parameter is a usage error naming it.
    let o = run_in(
        d,
        &[
            "ablation",
            "experiment.yaml",
            "--param",
            "lora_rnak",
            "--values",
            "4",
        ],
    );
    assert!(!o.status.success());
    assert!(text(&o).contains("lora_rnak"), "{}", text(&o));

    let r = ok_json(
        d,
        &["ensemble", "experiment.yaml", "--out", "ens", "--json"],
    );
    let members = r["data"]["configs"].as_array().unwrap();
    assert_eq!(members.len(), 3);
    let seeds: std::collections::BTreeSet<u64> = members
        .iter()
        .map(|m| m["trial_config"]["seed"].as_u64().unwrap())
        .collect();
    assert_eq!(seeds.len(), 3, "members differ in seed");
}

fn stage_outputs(stages: &serde_json::Value) -> Vec<Vec<String>> {
    stages
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            std::fs::read_to_string(s["dataset_path"].as_str().unwrap())
                .unwrap()
                .lines()
                .map(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).unwrap();
                    v["output"].as_str().unwrap().to_string()
                })
                .collect()
        })
        .collect()
}

#[test]
fn curriculum_splits_by_words_and_by_the_base_models_loss() {
    let (dir, _) = workspace();
    let d = dir.path();
    let r = ok_json(
        d,
        &[
            "curriculum",
            "--dataset",
            "train.jsonl",
            "--stages",
            "2",
            "--measure",
            "words",
            "--out",
            "by_words",
            "--json",
        ],
    );
    let by_words = stage_outputs(&r["data"]["stages"]);
    assert_eq!(by_words.len(), 2);
    assert!(
        by_words[0].iter().all(|o| o.split(' ').count() <= 4),
        "{by_words:?}"
    );

    // Loss needs a model...
    let o = run_in(
        d,
        &[
            "curriculum",
            "--dataset",
            "train.jsonl",
            "--measure",
            "loss",
        ],
    );
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("--model"), "{}", text(&o));
    // ...which scores every sample (the tiny random-init model, made by a dry run).
    let o = run_in(
        d,
        &["run", "experiment.yaml", "--model", "tiny", "--dry-run"],
    );
    assert!(o.status.success(), "{}", text(&o));
    let home = std::env::var_os("XDG_CACHE_HOME")
        .filter(|x| !x.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache"));
    let tiny = home.join("lora-trainer/models/tiny-random-llama");
    let r = ok_json(
        d,
        &[
            "curriculum",
            "--dataset",
            "train.jsonl",
            "--stages",
            "2",
            "--measure",
            "loss",
            "--model",
            tiny.to_str().unwrap(),
            "--out",
            "by_loss",
            "--json",
        ],
    );
    let stages = r["data"]["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 2);
    let (lo0, hi0) = (
        stages[0]["difficulty"][0].as_f64().unwrap(),
        stages[0]["difficulty"][1].as_f64().unwrap(),
    );
    let lo1 = stages[1]["difficulty"][0].as_f64().unwrap();
    assert!(lo0 > 0.0 && lo0 <= hi0 && hi0 <= lo1, "{stages:?}");
    let by_loss = stage_outputs(&r["data"]["stages"]);
    assert_eq!(by_loss.iter().map(Vec::len).sum::<usize>(), 8);
}

#[test]
fn a_manifest_verifies_and_names_what_drifted() {
    let (dir, _) = workspace();
    let d = dir.path();
    let r = ok_json(
        d,
        &[
            "manifest",
            "create",
            "experiment.yaml",
            "--out",
            "m.json",
            "--json",
        ],
    );
    assert_eq!(
        r["data"]["manifest"]["dataset"]["sha256"]
            .as_str()
            .unwrap()
            .len(),
        64
    );
    let r = ok_json(d, &["manifest", "verify", "m.json", "--json"]);
    assert_eq!(r["data"]["reproducible"], true, "{r}");
    std::fs::write(
        d.join("train.jsonl"),
        "{\"instruction\": \"x\", \"output\": \"y\"}\n",
    )
    .unwrap();
    let o = run_in(d, &["manifest", "verify", "m.json", "--json"]);
    assert!(!o.status.success(), "a changed dataset is not reproducible");
    let t = text(&o);
    assert!(t.contains("dataset.sha256"), "{t}");
}

/// An experiment spec for `run --model tiny` with the given protocol section.
fn protocol_experiment(dir: &Path, name: &str, protocol: &str) {
    let rows: Vec<String> = (0..12)
        .map(|i| {
            serde_json::json!({
                "instruction": format!("Count to {}.", i + 1),
                "input": "",
                "output": (1..=i + 1).map(|k| k.to_string()).collect::<Vec<_>>().join(" "),
            })
            .to_string()
        })
        .collect();
    std::fs::write(dir.join("train.jsonl"), rows[..9].join("\n") + "\n").unwrap();
    std::fs::write(dir.join("eval.jsonl"), rows[9..].join("\n") + "\n").unwrap();
    std::fs::write(
        dir.join(format!("{name}.yaml")),
        format!(
            "version: \"1.0\"\nexperiment_name: {name}\ndataset:\n  path: train.jsonl\n  eval_path: eval.jsonl\n  format: alpaca\n\
             config:\n  base_model: tiny\n  lora_rank: 4\n  lora_alpha: 8\n  lora_dropout: 0.0\n  learning_rate: 1e-3\n  \
             batch_size: 4\n  micro_batch_size: 4\n  max_steps: 3\n  max_seq_length: 48\n\
             search_space:\n  rank_choices: [4, 8]\n  target_module_sets: [[q_proj, v_proj], [q_proj, k_proj, v_proj, o_proj]]\n\
             protocol:\n{protocol}\noutput:\n  dir: out\n  merge_after: false\n"
        ),
    )
    .unwrap();
}

/// The ensemble and a loss-based curriculum through `run` with the real skills
/// (libtorch training and eval, the merge skill's TIES combination): a TIES
/// ensemble keeps one rank, writes the combined adapter and its GGUF LoRA and
/// compares it with the best member; the curriculum scores every training row
/// with the base model and trains stage k from stage k-1's adapter.
#[test]
fn ensemble_and_loss_curriculum_run_with_the_real_skills() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    protocol_experiment(
        d,
        "ens",
        "  type: ensemble\n  ensemble:\n    members: 2\n    combination: ties\n    density: 0.5",
    );
    let r = ok_json(d, &["run", "ens.yaml", "--model", "tiny", "--json"]);
    let state = &r["data"];
    let ranks: Vec<u64> = state["trial_history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["config"]["lora_rank"].as_u64().unwrap())
        .collect();
    assert_eq!(ranks, vec![4, 4], "TIES needs one rank");
    let en = &state["ensemble"];
    assert!(en["ensemble_metric"].as_f64().unwrap().is_finite(), "{en}");
    assert!(en["best_member_metric"].as_f64().is_some(), "{en}");
    let exp = d.join("out/ens-tiny/ensemble");
    assert!(exp.join("adapter/adapter_config.json").is_file());
    assert!(exp.join("adapter.gguf").is_file());

    protocol_experiment(
        d,
        "cur",
        "  type: curriculum\n  curriculum:\n    num_stages: 3\n    measure: loss",
    );
    let r = ok_json(d, &["run", "cur.yaml", "--model", "tiny", "--json"]);
    let trials = r["data"]["trial_history"].as_array().unwrap();
    assert_eq!(trials.len(), 3);
    let scores: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.join("out/cur-tiny/data/loss_scores.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(scores["scores"].as_array().unwrap().len(), 9);
    for (k, t) in trials.iter().enumerate() {
        assert_eq!(t["role"]["kind"], "stage", "{t}");
        assert_eq!(t["role"]["index"], k as u64, "{t}");
        if k > 0 {
            let from = format!("from stage {k}'s adapter");
            assert!(t["rationale"].as_str().unwrap().contains(&from), "{t}");
        }
    }
}
