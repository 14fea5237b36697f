//! Orchestrator scenarios across processes: the quickstart example's data is
//! what its generator writes; the quickstart spec dry-runs; an experiment
//! killed with SIGKILL during a trial, during artifact storing and during the
//! merge resumes to the same result as an uninterrupted run.
//!
//! The kill tests re-execute this test binary as a child that runs the
//! orchestrator with the deterministic test doubles of `lora_orchestrator::testing`
//! (slowed down so the kill lands inside the chosen step).

#![allow(clippy::unwrap_used)] // Test code: a failed unwrap is a failed test.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use lora_orchestrator::Orchestrator;
use lora_orchestrator::testing::Doubles;
use lora_skill::SkillContext;
use lora_spec::contracts::orchestrator::{ExperimentState, LoRATrainerInput};
use lora_spec::experiment::load_experiment;
use serde_json::json;

fn root() -> PathBuf {
    lora_tests::workspace_root()
}

// ------------------------------------------------------------------ quickstart data

const COUNTRIES: [(&str, &str); 24] = [
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Italy", "Rome"),
    ("Spain", "Madrid"),
    ("Portugal", "Lisbon"),
    ("Japan", "Tokyo"),
    ("Canada", "Ottawa"),
    ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"),
    ("Peru", "Lima"),
    ("Chile", "Santiago"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"),
    ("Poland", "Warsaw"),
    ("Greece", "Athens"),
    ("Austria", "Vienna"),
    ("Ireland", "Dublin"),
    ("Hungary", "Budapest"),
    ("Thailand", "Bangkok"),
    ("Vietnam", "Hanoi"),
    ("Argentina", "Buenos Aires"),
    ("Australia", "Canberra"),
    ("Mexico", "Mexico City"),
];

const WORDS: [&str; 24] = [
    "apple", "river", "candle", "garden", "planet", "window", "silver", "orange", "forest",
    "bridge", "rocket", "pencil", "castle", "winter", "dragon", "mirror", "ticket", "basket",
    "lemon", "cloud", "tiger", "violin", "harbor", "meadow",
];

const OPPOSITES: [(&str, &str); 20] = [
    ("hot", "cold"),
    ("big", "small"),
    ("fast", "slow"),
    ("early", "late"),
    ("light", "dark"),
    ("happy", "sad"),
    ("open", "closed"),
    ("full", "empty"),
    ("strong", "weak"),
    ("high", "low"),
    ("old", "new"),
    ("rich", "poor"),
    ("wet", "dry"),
    ("loud", "quiet"),
    ("up", "down"),
    ("first", "last"),
    ("hard", "soft"),
    ("near", "far"),
    ("true", "false"),
    ("win", "lose"),
];

/// The quickstart's records, in a fixed order: short instructions with
/// exact, templated answers a 135M model can learn in a few hundred steps.
pub fn quickstart_records() -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let mut push = |instruction: String, output: String| {
        out.push(json!({"instruction": instruction, "input": "", "output": output}));
    };
    for (c, cap) in COUNTRIES {
        push(
            format!("What is the capital of {c}?"),
            format!("The capital of {c} is {cap}."),
        );
    }
    for i in 0..100u32 {
        let (a, b) = (3 + (i * 7) % 41, 2 + (i * 11) % 37);
        push(
            format!("What is {a} plus {b}?"),
            format!("{a} plus {b} is {}.", a + b),
        );
    }
    for i in 0..60u32 {
        let (a, b) = (2 + i % 9, 3 + (i * 5) % 8);
        push(
            format!("What is {a} times {b}?"),
            format!("{a} times {b} is {}.", a * b),
        );
    }
    for i in 0..40u32 {
        let (a, b) = (20 + (i * 13) % 60, 1 + (i * 3) % 19);
        push(
            format!("What is {a} minus {b}?"),
            format!("{a} minus {b} is {}.", a - b),
        );
    }
    for w in WORDS {
        let rev: String = w.chars().rev().collect();
        push(
            format!("Reverse the word \"{w}\"."),
            format!("\"{w}\" reversed is \"{rev}\"."),
        );
    }
    for w in WORDS {
        push(
            format!("How many letters are in the word \"{w}\"?"),
            format!("The word \"{w}\" has {} letters.", w.chars().count()),
        );
    }
    for w in WORDS {
        push(
            format!("Write \"{w}\" in capital letters."),
            w.to_uppercase(),
        );
    }
    for (a, b) in OPPOSITES {
        push(
            format!("What is the opposite of \"{a}\"?"),
            format!("The opposite of \"{a}\" is \"{b}\"."),
        );
        push(
            format!("What is the opposite of \"{b}\"?"),
            format!("The opposite of \"{b}\" is \"{a}\"."),
        );
    }
    for k in 1..=30u32 {
        push(
            format!("How many meters are in {k} kilometers?"),
            format!("{k} kilometers is {} meters.", k * 1000),
        );
    }
    for n in 1..=30u32 {
        let parity = if n % 2 == 0 { "even" } else { "odd" };
        push(format!("Is {n} even or odd?"), format!("{n} is {parity}."));
    }
    out
}

/// The split: every 8th record (by index) is held out for evaluation.
pub fn quickstart_split() -> (String, String) {
    let mut train = String::new();
    let mut eval = String::new();
    for (i, r) in quickstart_records().iter().enumerate() {
        let dst = if i % 8 == 5 { &mut eval } else { &mut train };
        dst.push_str(&r.to_string());
        dst.push('\n');
    }
    (train, eval)
}

#[test]
fn quickstart_data_is_what_the_generator_writes() {
    let dir = root().join("examples/data");
    let (train, eval) = quickstart_split();
    if std::env::var_os("LORA_REGENERATE_EXAMPLES").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("quickstart_train.jsonl"), &train).unwrap();
        std::fs::write(dir.join("quickstart_eval.jsonl"), &eval).unwrap();
    }
    let read = |n: &str| std::fs::read_to_string(dir.join(n)).unwrap_or_default();
    assert_eq!(
        read("quickstart_train.jsonl"),
        train,
        "examples/data is stale: run with LORA_REGENERATE_EXAMPLES=1"
    );
    assert_eq!(read("quickstart_eval.jsonl"), eval);
    assert!(
        train.lines().count() >= 300,
        "{} training rows",
        train.lines().count()
    );
    assert!(eval.lines().count() >= 40);
}

#[test]
fn the_quickstart_spec_loads_and_dry_runs() {
    let (spec, _) = load_experiment(&root().join("examples/quickstart.yaml")).unwrap();
    assert!(
        spec.dataset_path
            .ends_with("examples/data/quickstart_train.jsonl")
    );
    assert!(Path::new(&spec.dataset_path).is_file());
    assert!(spec.max_trials >= 3);
    let input = LoRATrainerInput {
        experiment: spec,
        dry_run: true,
        max_loop_iterations: 20,
        auto_merge: true,
        merge_format: Default::default(),
        resume: false,
        experiment_dir: None,
    };
    let out = rt()
        .block_on(Orchestrator::new(Doubles::new().registry()).run(&input, &SkillContext::new(".")))
        .unwrap();
    assert_eq!(
        out.data.trial_history.len(),
        input.experiment.max_trials as usize
    );
    assert!(out.output_text.contains("dry run"));
}

// ------------------------------------------------------------------ kill -9

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn write_data(dir: &Path) -> String {
    let p = dir.join("data.jsonl");
    let text: String = (0..40)
        .map(|i| {
            format!(
                "{{\"instruction\": \"add {i} and 1\", \"output\": \"{}\"}}\n",
                i + 1
            )
        })
        .collect();
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

fn experiment(dir: &Path) -> LoRATrainerInput {
    let spec = json!({
        "dataset_path": write_data(dir),
        "base_model": dir.join("base").display().to_string(),
        "experiment_name": "killed",
        "max_trials": 3,
        "budget_gpu_hours": 10.0,
        "output": {"dir": dir.join("runs").display().to_string(), "export_format": "gguf"},
    });
    serde_json::from_value(json!({"experiment": spec, "resume": true})).unwrap()
}

fn slow_doubles() -> Doubles {
    Doubles {
        steps: 12,
        save_every: 3,
        step_delay: Duration::from_millis(40),
        artifact_delay: Duration::from_millis(400),
        merge_delay: Duration::from_millis(600),
        ..Doubles::new()
    }
}

fn essence(s: &ExperimentState) -> serde_json::Value {
    json!({
        "trials": s.trial_history.iter().map(|t| json!({
            "id": t.trial_id,
            "status": t.record.status,
            "objective": t.record.objective,
            "lr": t.record.config.learning_rate,
            "rank": t.record.config.lora_rank,
            "steps": t.training_steps,
            "gpu_hours": t.record.gpu_hours,
            "final_loss": t.final_loss,
            "version": t.artifact.as_ref().map(|a| a.version.clone()),
            "hash": t.artifact.as_ref().map(|a| a.adapter_hash.clone()),
        })).collect::<Vec<_>>(),
        "best": s.best_trial.as_ref().map(|b| b.trial_id),
        "stop": s.stop_reason,
        "merged": s.merged_path.as_ref().map(|m| Path::new(m).file_name().map(|f| f.to_string_lossy().into_owned())),
        "finished": s.finished,
    })
}

/// The child process: runs (or resumes) the slowed-down experiment in
/// `LORA_ORCH_CHILD_DIR`. A no-op unless that variable is set.
#[test]
fn child_run_for_kill_tests() {
    let Some(dir) = std::env::var_os("LORA_ORCH_CHILD_DIR") else {
        return;
    };
    let input = experiment(Path::new(&dir));
    let orch = Orchestrator::new(slow_doubles().registry());
    rt().block_on(orch.run(&input, &SkillContext::new(".")))
        .unwrap();
}

fn spawn_child(dir: &Path) -> Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "orchestrator::child_run_for_kill_tests",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("LORA_ORCH_CHILD_DIR", dir)
        .spawn()
        .unwrap()
}

/// The journal's event names so far (empty while it does not exist or is being replaced).
fn events(dir: &Path) -> Vec<String> {
    let p = dir.join("runs/killed/journal.json");
    let Ok(text) = std::fs::read_to_string(p) else {
        return Vec::new();
    };
    let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
        return Vec::new();
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

/// Waits until `pred(events)` holds, then SIGKILLs the child (`Child::kill` is SIGKILL on Unix).
fn kill_when(child: &mut Child, dir: &Path, pred: impl Fn(&[String]) -> bool, after: Duration) {
    let start = Instant::now();
    loop {
        if pred(&events(dir)) {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "the child ended ({status}) before the kill point; events: {:?}",
                events(dir)
            );
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "kill point never reached: {:?}",
            events(dir)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(after);
    child.kill().unwrap();
    child.wait().unwrap();
}

fn count(ev: &[String], name: &str) -> usize {
    ev.iter().filter(|e| *e == name).count()
}

fn reference() -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let input = experiment(dir.path());
    let fast = Doubles::new();
    let out = rt()
        .block_on(Orchestrator::new(fast.registry()).run(&input, &SkillContext::new(".")))
        .unwrap();
    essence(&out.data)
}

fn resume_in_process(dir: &Path) -> (ExperimentState, Doubles) {
    let d = Doubles::new();
    let out = rt()
        .block_on(Orchestrator::new(d.registry()).run(&experiment(dir), &SkillContext::new(".")))
        .unwrap();
    (out.data, d)
}

#[test]
fn kill_9_during_a_trial_during_storing_and_during_the_merge_then_resume() {
    let expected = reference();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d).unwrap();
    // 1. Killed mid-training of trial 2 (after its first checkpoint).
    let mut child = spawn_child(d);
    kill_when(
        &mut child,
        d,
        |e| count(e, "training_started") >= 2,
        Duration::from_millis(250),
    );
    let ev = events(d);
    assert_eq!(
        count(&ev, "trained"),
        1,
        "killed inside trial 2's training: {ev:?}"
    );
    assert!(d.join("runs/killed/trials/trial_002/checkpoint-3").is_dir());
    // 2. Resumed in a child, killed while storing trial 2's adapter.
    let mut child = spawn_child(d);
    kill_when(
        &mut child,
        d,
        |e| count(e, "evaluated") >= 2 && count(e, "stored") == 1,
        Duration::from_millis(150),
    );
    let ev = events(d);
    assert_eq!(
        count(&ev, "stored"),
        1,
        "killed inside trial 2's store: {ev:?}"
    );
    let resumed_from = std::fs::read_to_string(d.join("runs/killed/journal.json")).unwrap();
    assert!(
        resumed_from.contains("checkpoint-"),
        "trial 2 resumed from its checkpoint"
    );
    // 3. Resumed in a child, killed during the merge.
    let mut child = spawn_child(d);
    kill_when(
        &mut child,
        d,
        |e| count(e, "merge_started") >= 1,
        Duration::from_millis(200),
    );
    let ev = events(d);
    assert_eq!(count(&ev, "merged"), 0, "killed inside the merge: {ev:?}");
    // 4. Resumed to the end in this process.
    let (state, doubles) = resume_in_process(d);
    assert_eq!(essence(&state), expected);
    // Nothing finished was redone: the last resume only merged.
    assert!(
        doubles
            .calls_to("training")
            .iter()
            .all(|c| c["dry_run"] == true)
    );
    assert_eq!(doubles.calls_to("merge").len(), 1);
    let merged = state.merged_path.unwrap();
    assert!(merged.ends_with(".gguf") && Path::new(&merged).is_file());
    // The journal is still one valid file.
    assert!(count(&events(d), "finished") == 1);
}
