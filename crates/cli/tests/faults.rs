//! A whole experiment through the binary with the real skills (libtorch
//! training, eval, the SQLite artifact store, merge and GGUF export) on the
//! `--model tiny` random-init model, then the faults the orchestrator issue
//! names: the same experiment SIGKILLed during a trial, while its adapter is
//! being stored and during the merge, resumed with `--resume` each time, must
//! end with the uninterrupted run's result (same trials, losses, adapter
//! hashes, best trial and exported file); a full disk (a file-size limit, so
//! writes fail with an OS error) is reported cleanly and the experiment
//! resumes afterwards; runs making the `--model tiny` model at the same time
//! do not break each other's.
//!
//! Needs the tokenizer of the default model (`cargo xtask setup`, which CI runs).

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_lora-trainer");

/// Writes a small instruction set and the spec into `dir`; returns the spec path.
fn write_experiment(dir: &Path) -> PathBuf {
    let facts = [
        ("France", "Paris"),
        ("Japan", "Tokyo"),
        ("Italy", "Rome"),
        ("Spain", "Madrid"),
        ("Kenya", "Nairobi"),
        ("Peru", "Lima"),
        ("Egypt", "Cairo"),
        ("Chile", "Santiago"),
        ("Norway", "Oslo"),
        ("Greece", "Athens"),
        ("Poland", "Warsaw"),
        ("Cuba", "Havana"),
    ];
    let row = |c: &str, k: &str| {
        serde_json::json!({
            "instruction": format!("What is the capital of {c}?"),
            "input": "",
            "output": format!("The capital of {c} is {k}."),
        })
        .to_string()
    };
    let train: Vec<String> = facts[..10].iter().map(|(c, k)| row(c, k)).collect();
    let eval: Vec<String> = facts[10..].iter().map(|(c, k)| row(c, k)).collect();
    std::fs::write(dir.join("train.jsonl"), train.join("\n") + "\n").unwrap();
    std::fs::write(dir.join("eval.jsonl"), eval.join("\n") + "\n").unwrap();
    let spec = r#"version: "1.0"
experiment_name: faults
goal: "survive kill -9 and a full disk"
task: instruction
dataset:
  path: train.jsonl
  eval_path: eval.jsonl
  format: alpaca
config:
  base_model: tiny
  method: lora
  learning_rate: 1e-3
  lora_rank: 4
  lora_alpha: 8
  lora_dropout: 0.0
  target_modules: [q_proj, v_proj]
  batch_size: 4
  micro_batch_size: 4
  max_steps: 6
  save_steps: 2
  max_seq_length: 48
  warmup_ratio: 0.0
  seed: 7
search_space:
  lr_min: 5.0e-4
  lr_max: 5.0e-3
  rank_choices: [4, 8]
  batch_size_choices: [4]
protocol:
  type: standard
  strategy: auto
  trials: 2
  budget_gpu_hours: 1.0
  stop_metric: eval_loss
output:
  dir: out
  export_format: gguf
  gguf_quantization: f16
  merge_after: true
  validate_after_merge: true
"#;
    let path = dir.join("experiment.yaml");
    std::fs::write(&path, spec).unwrap();
    path
}

fn command(dir: &Path, resume: bool) -> Command {
    let mut c = Command::new(BIN);
    c.current_dir(dir)
        .args(["run", "experiment.yaml", "--model", "tiny"])
        .env("RUST_BACKTRACE", "1");
    if resume {
        c.arg("--resume");
    }
    c
}

fn run_to_end(dir: &Path, resume: bool) -> Output {
    let out = command(dir, resume).output().expect("the binary runs");
    assert!(
        out.status.success(),
        "run failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn spawn(dir: &Path, resume: bool) -> Child {
    command(dir, resume)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the binary starts")
}

fn experiment_dir(dir: &Path) -> PathBuf {
    // `--model tiny` keeps its experiment apart under `<name>-tiny`.
    dir.join("out/faults-tiny")
}

/// The journal's event names so far (empty while it does not exist yet).
fn events(dir: &Path) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(experiment_dir(dir).join("journal.json")) else {
        return Vec::new();
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        // Atomic writes: a reader never sees half a journal.
        panic!("the journal is not valid JSON at some moment: {text}");
    };
    v["events"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| e["event"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn count(ev: &[String], name: &str) -> usize {
    ev.iter().filter(|e| *e == name).count()
}

/// Polls until `pred` holds, waits `after`, then SIGKILLs the child.
fn kill_when(child: &mut Child, what: &str, pred: impl Fn() -> bool, after: Duration) {
    let start = Instant::now();
    while !pred() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the run ended ({status}) before the kill point `{what}`");
        }
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "kill point `{what}` never reached"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    std::thread::sleep(after);
    child.kill().expect("SIGKILL");
    child.wait().expect("reaped");
}

/// What must be the same between an interrupted and an uninterrupted run.
fn essence(dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(experiment_dir(dir).join("state.json")).unwrap();
    let s: serde_json::Value = serde_json::from_str(&text).unwrap();
    let trials: Vec<serde_json::Value> = s["trial_history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            serde_json::json!({
                "id": t["trial_id"],
                "config": t["config"],
                "status": t["status"],
                "steps": t["training_steps"],
                "final_loss": t["final_loss"],
                "objective": t["objective"],
                "version": t["artifact"]["version"],
                "hash": t["artifact"]["adapter_hash"],
            })
        })
        .collect();
    let merged = s["merged_path"].as_str().expect("a merged file");
    let gguf = std::fs::read(merged).expect("the exported GGUF exists");
    serde_json::json!({
        "trials": trials,
        "best": s["best_trial"]["trial_id"],
        "stop": s["stop_reason"],
        "finished": s["finished"],
        "merged_name": Path::new(merged).file_name().unwrap().to_string_lossy(),
        "merged_len": gguf.len(),
        "merged_sum": gguf.iter().fold(0u64, |h, b| h.wrapping_mul(1_099_511_628_211) ^ u64::from(*b)),
    })
}

fn has_checkpoint(trial_dir: &Path) -> bool {
    std::fs::read_dir(trial_dir.join("checkpoints"))
        .map(|rd| {
            rd.flatten().any(|e| {
                let n = e.file_name().to_string_lossy().into_owned();
                !n.starts_with('.') && !n.ends_with(".tmp")
            })
        })
        .unwrap_or(false)
}

#[test]
fn kill_9_during_a_trial_during_storing_and_during_the_merge_then_resume_with_real_skills() {
    let reference = tempfile::tempdir().unwrap();
    write_experiment(reference.path());
    run_to_end(reference.path(), false);
    let expected = essence(reference.path());
    assert_eq!(expected["trials"].as_array().unwrap().len(), 2);
    assert_eq!(expected["finished"], true);

    let work = tempfile::tempdir().unwrap();
    let d = work.path();
    write_experiment(d);
    let trial2 = experiment_dir(d).join("trials/trial_002");

    // 1. Killed inside trial 2's training, once it has a checkpoint.
    let mut child = spawn(d, false);
    kill_when(
        &mut child,
        "trial 2 checkpointed",
        || count(&events(d), "training_started") >= 2 && has_checkpoint(&trial2),
        Duration::ZERO,
    );
    let ev = events(d);
    assert_eq!(count(&ev, "trained"), 1, "killed inside trial 2: {ev:?}");

    // 2. Resumed, killed as soon as trial 2 is evaluated: the store comes next.
    let mut child = spawn(d, true);
    kill_when(
        &mut child,
        "trial 2 evaluated",
        || count(&events(d), "evaluated") >= 2,
        Duration::ZERO,
    );
    let ev = events(d);
    assert_eq!(count(&ev, "stored"), 1, "trial 2 not stored yet: {ev:?}");
    let journal: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(experiment_dir(d).join("journal.json")).unwrap(),
    )
    .unwrap();
    let resumed_from: Vec<&str> = journal["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"] == "training_started" && e["trial_id"] == 2)
        .filter_map(|e| e["resume_from"].as_str())
        .collect();
    assert_eq!(resumed_from.len(), 1, "trial 2 resumed once: {journal}");
    assert!(
        resumed_from[0].contains("checkpoint"),
        "from its checkpoint: {resumed_from:?}"
    );

    // 3. Resumed, killed during the merge.
    let mut child = spawn(d, true);
    kill_when(
        &mut child,
        "merge started",
        || count(&events(d), "merge_started") >= 1,
        Duration::from_millis(100),
    );
    let ev = events(d);
    assert_eq!(count(&ev, "merged"), 0, "killed inside the merge: {ev:?}");

    // 4. Resumed to the end: the uninterrupted run's result.
    run_to_end(d, true);
    assert_eq!(essence(d), expected);
    let ev = events(d);
    assert_eq!(
        count(&ev, "trained"),
        2,
        "no finished trial was redone: {ev:?}"
    );
    assert_eq!(count(&ev, "finished"), 1);
}

#[test]
fn a_full_disk_is_reported_cleanly_and_the_experiment_resumes() {
    // `--model tiny` makes its 13 MB model in the user's cache on first use:
    // make it (a dry run elsewhere) before the limit, which it would not fit.
    let scratch = tempfile::tempdir().unwrap();
    write_experiment(scratch.path());
    let prep = Command::new(BIN)
        .current_dir(scratch.path())
        .args(["run", "experiment.yaml", "--model", "tiny", "--dry-run"])
        .output()
        .unwrap();
    assert!(
        prep.status.success(),
        "{}",
        String::from_utf8_lossy(&prep.stderr)
    );
    let work = tempfile::tempdir().unwrap();
    let d = work.path();
    write_experiment(d);
    // A 4 MiB file-size limit (SIGXFSZ ignored, so writes fail with EFBIG the
    // way a full disk fails them with ENOSPC): the trials' small files fit,
    // the exported model does not.
    let out = Command::new("bash")
        .current_dir(d)
        .args([
            "-c",
            "trap '' XFSZ; ulimit -f 4096; exec \"$0\" run experiment.yaml --model tiny",
            BIN,
        ])
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "the export cannot fit: {text}");
    assert_ne!(out.status.code(), Some(101), "no panic: {text}");
    assert!(
        !text.contains("panicked") && !text.contains("stack backtrace"),
        "{text}"
    );
    assert!(
        text.contains("File too large") || text.contains("No space"),
        "the OS error is named: {text}"
    );
    assert!(text.contains("--resume"), "the way on is named: {text}");
    assert!(text.contains(".gguf"), "the file is named: {text}");
    let ev = events(d);
    assert_eq!(count(&ev, "trained"), 2, "{ev:?}");
    assert_eq!(count(&ev, "merged"), 0, "{ev:?}");
    // Space again: the experiment resumes and finishes without retraining.
    run_to_end(d, true);
    let ev = events(d);
    assert_eq!(count(&ev, "trained"), 2, "{ev:?}");
    assert_eq!(count(&ev, "merged"), 1, "{ev:?}");
    assert_eq!(count(&ev, "finished"), 1, "{ev:?}");
}

/// The user's cache folder the binary uses (`XDG_CACHE_HOME`, else `~/.cache`).
fn user_cache() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .filter(|x| !x.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache"))
}

#[test]
fn runs_making_the_tiny_model_at_once_all_get_the_whole_model() {
    // A cache of its own holding only the default model's tokenizer and config,
    // so the tiny model is made here, by four processes at once.
    let cache = tempfile::tempdir().unwrap();
    let src = user_cache().join("lora-trainer/models/SmolLM2-135M-Instruct");
    let base = cache
        .path()
        .join("lora-trainer/models/SmolLM2-135M-Instruct");
    std::fs::create_dir_all(&base).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        if src.join(f).is_file() {
            std::fs::copy(src.join(f), base.join(f)).unwrap();
        }
    }
    let work = tempfile::tempdir().unwrap();
    write_experiment(work.path());
    let children: Vec<Child> = (0..4)
        .map(|_| {
            Command::new(BIN)
                .current_dir(work.path())
                .env("XDG_CACHE_HOME", cache.path())
                .args(["run", "experiment.yaml", "--model", "tiny", "--dry-run"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let models = cache.path().join("lora-trainer/models");
    let mut names: Vec<String> = std::fs::read_dir(&models)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["SmolLM2-135M-Instruct", "tiny-random-llama"],
        "one model folder and no staging folders left behind"
    );
    let tiny = models.join("tiny-random-llama");
    let bytes = std::fs::read(tiny.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert!(st.tensor("model.embed_tokens.weight").is_ok());
    assert!(tiny.join("config.json").is_file() && tiny.join("tokenizer.json").is_file());
    // The model is a fixed-seed one: the same bytes as the user's cache's (when made).
    let theirs = user_cache().join("lora-trainer/models/tiny-random-llama/model.safetensors");
    if theirs.is_file() {
        assert!(
            std::fs::read(theirs).unwrap() == bytes,
            "same seed, same model"
        );
    }
}
