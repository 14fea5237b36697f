//! Scenario tests of the loop with the test doubles: stop rules, budget
//! gating, dry run, preflight, resume after a crash at every journal point,
//! faults in training, storing and merging, damaged and foreign journals.

use std::path::Path;

use lora_skill::{ErrorKind, MemorySink, SkillContext, SkillError, StepResult};
use lora_spec::contracts::names;
use lora_spec::contracts::orchestrator::{
    ExperimentState, LoRATrainerInput, StopReason, TrialRole,
};
use lora_spec::experiment::ExperimentSpec;
use serde_json::json;

use crate::journal::{Fault, FaultKind, Journal};
use crate::testing::{Doubles, FAKE_BASE_LOSS};
use crate::{Options, Orchestrator};

/// A scratch folder on tmpfs when there is one (the many-crash test does
/// thousands of fsyncs, free on tmpfs), else in the default temp folder.
pub(crate) fn fast_tempdir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(d) = tempfile::tempdir_in(shm)
    {
        return d;
    }
    tempfile::tempdir().unwrap()
}

pub(crate) fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A data file of `n` alpaca rows in `dir`.
pub(crate) fn write_data(dir: &Path, n: usize) -> String {
    let p = dir.join("data.jsonl");
    let text: String = (0..n)
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

pub(crate) fn spec(dir: &Path, extra: serde_json::Value) -> ExperimentSpec {
    let mut v = json!({
        "dataset_path": write_data(dir, 40),
        "base_model": dir.join("base").display().to_string(),
        "experiment_name": "t",
        "max_trials": 3,
        "budget_gpu_hours": 10.0,
        "output": {"dir": dir.join("runs").display().to_string()},
    });
    if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        for (k, x) in e {
            o.insert(k.clone(), x.clone());
        }
    }
    serde_json::from_value(v).unwrap()
}

pub(crate) fn input(spec: ExperimentSpec) -> LoRATrainerInput {
    serde_json::from_value(json!({"experiment": spec})).unwrap()
}

pub(crate) fn run_with(
    d: &Doubles,
    inp: &LoRATrainerInput,
    fault: Option<Fault>,
) -> Result<StepResult<ExperimentState>, SkillError> {
    let orch = Orchestrator::new(d.registry()).with_options(Options { fault });
    let ctx = SkillContext::new(".");
    rt().block_on(orch.run(inp, &ctx))
}

fn run(d: &Doubles, inp: &LoRATrainerInput) -> StepResult<ExperimentState> {
    run_with(d, inp, None).unwrap()
}

fn without_model(c: &lora_spec::trial::TrialConfig) -> lora_spec::trial::TrialConfig {
    let mut c = c.clone();
    c.base_model = None;
    c
}

/// What must be equal between an interrupted-and-resumed run and an uninterrupted one.
pub(crate) fn essence(s: &ExperimentState) -> serde_json::Value {
    json!({
        "trials": s.trial_history.iter().map(|t| json!({
            "id": t.trial_id,
            "status": t.record.status,
            "objective": t.record.objective,
            "config": without_model(&t.record.config),
            "steps": t.training_steps,
            "gpu_hours": t.record.gpu_hours,
            "final_loss": t.final_loss,
            "version": t.artifact.as_ref().map(|a| a.version.clone()),
            "hash": t.artifact.as_ref().map(|a| a.adapter_hash.clone()),
            "eval": t.eval,
        })).collect::<Vec<_>>(),
        "best": s.best_trial.as_ref().map(|b| b.trial_id),
        "stop": s.stop_reason,
        "used": s.budget.gpu_hours_used,
        "merged": s.merged_path.as_ref().map(|m| Path::new(m).file_name().map(|f| f.to_string_lossy().into_owned())),
        "finished": s.finished,
        "ablation": s.ablation.as_ref().map(|a| json!(a.rows)),
        "ensemble": s.ensemble.as_ref().map(|e| json!({"members": e.members, "weights": e.weights, "metric": e.ensemble_metric})),
    })
}

#[test]
fn the_loop_runs_trials_merges_and_reports() {
    let dir = tempfile::tempdir().unwrap();
    let d = Doubles::new();
    let inp = input(spec(dir.path(), json!({})));
    let sink = MemorySink::new();
    let ctx = SkillContext::new(".").with_sink(sink.clone());
    let out = rt()
        .block_on(Orchestrator::new(d.registry()).run(&inp, &ctx))
        .unwrap();
    let s = &out.data;
    assert_eq!(s.trial_history.len(), 3);
    assert!(
        s.trial_history
            .iter()
            .all(|t| t.record.status == "completed")
    );
    assert_eq!(s.stop_reason, Some(StopReason::MaxTrials));
    assert!(s.finished);
    // The first grid point (lr 2e-4) is the best the fake loss allows at rank 8.
    let best = s.best_trial.as_ref().unwrap();
    let min = s
        .trial_history
        .iter()
        .filter_map(|t| t.record.objective)
        .fold(f64::MAX, f64::min);
    assert_eq!(best.record.objective, Some(min));
    assert_eq!(s.base_loss, Some(FAKE_BASE_LOSS));
    let delta = best.eval.as_ref().unwrap().delta_vs_base_loss.unwrap();
    assert!((delta - (min - FAKE_BASE_LOSS)).abs() < 1e-12);
    // Versions v1..v3, budget = 3 trials x 12 steps x 1e-3 h.
    let versions: Vec<_> = s
        .trial_history
        .iter()
        .map(|t| t.artifact.as_ref().unwrap().version.clone())
        .collect();
    assert_eq!(versions, ["v1", "v2", "v3"]);
    assert!((s.budget.gpu_hours_used - 0.036).abs() < 1e-9);
    // Merged (safetensors by default) into the experiment folder.
    let merged = s.merged_path.as_ref().unwrap();
    assert!(Path::new(merged).join("model.safetensors").is_file());
    assert_eq!(out.artifacts, vec![merged.clone()]);
    assert_eq!(out.metadata["total_trials"], 3);
    assert_eq!(out.metadata["best_trial_id"], best.trial_id);
    assert_eq!(out.metadata["merged_path"], merged.as_str());
    // HPO saw the history grow, with the base config and the seed.
    let hpo = d.calls_to(names::HPO);
    assert_eq!(hpo.len(), 3);
    assert_eq!(hpo[2]["trial_history"].as_array().unwrap().len(), 2);
    assert_eq!(hpo[0]["seed"], 42);
    // The base loss is measured once.
    let evals = d.calls_to(names::EVAL);
    assert_eq!(
        evals.iter().filter(|e| e["compute_delta"] == true).count(),
        1
    );
    // Before/after generations on held-out prompts, journaled.
    assert_eq!(s.samples.len(), 3);
    assert!(s.samples[0].prompt.as_deref().unwrap().starts_with("add "));
    assert_ne!(s.samples[0].before, s.samples[0].after);
    assert!(
        out.output_text
            .contains("before/after on 3 held-out prompts")
    );
    // Step 1..4 narrated.
    for step in ["Step 1/4", "Step 2/4", "Step 3/4", "Step 4/4"] {
        assert!(
            out.output_text.contains(step),
            "{step} missing in\n{}",
            out.output_text
        );
    }
    // Reports and plots.
    let exp = Path::new(s.experiment_dir.as_ref().unwrap());
    let md = std::fs::read_to_string(exp.join("report.md")).unwrap();
    assert!(md.contains("| trial |") && md.contains("max_trials"));
    assert!(
        std::fs::read_to_string(exp.join("plots/loss_curves.svg"))
            .unwrap()
            .contains("trial 3")
    );
    assert!(exp.join("report.html").is_file());
    let state: ExperimentState =
        serde_json::from_str(&std::fs::read_to_string(exp.join("state.json")).unwrap()).unwrap();
    assert_eq!(state.trial_history.len(), 3);
    // Progress: an overall bar with the budget left.
    let has_overall = sink.events().iter().any(|e| {
        matches!(e, lora_skill::Event::ProgressUpdate { metrics, .. } if metrics.contains_key("budget_left_h"))
    });
    assert!(has_overall);
    // The lock is released.
    assert!(!exp.join(crate::LOCK_FILE).exists());
}

#[test]
fn threshold_stops_at_the_first_good_enough_trial() {
    let dir = tempfile::tempdir().unwrap();
    let d = Doubles::new();
    let out = run(&d, &input(spec(dir.path(), json!({"stop_threshold": 5.0}))));
    assert_eq!(out.data.stop_reason, Some(StopReason::ThresholdReached));
    assert_eq!(out.data.trial_history.len(), 1);
    assert!(
        out.data
            .stop_message
            .unwrap()
            .contains("<= stop_threshold 5")
    );
}

#[test]
fn patience_stops_after_trials_without_improvement() {
    let dir = tempfile::tempdir().unwrap();
    let d = Doubles {
        lr_grid: vec![2e-4, 1e-5, 2e-5, 3e-5, 4e-5],
        ..Doubles::new()
    };
    let s = spec(dir.path(), json!({"max_trials": 5, "stop_patience": 2}));
    let out = run(&d, &input(s));
    assert_eq!(out.data.stop_reason, Some(StopReason::PatienceExhausted));
    assert_eq!(out.data.trial_history.len(), 3);
    assert_eq!(out.data.best_trial.unwrap().trial_id, 1);
}

#[test]
fn two_divergences_in_a_row_stop_the_experiment() {
    let dir = tempfile::tempdir().unwrap();
    let d = Doubles {
        lr_grid: vec![2e-4, 1e-3, 2e-3, 5e-5],
        diverge_at_lr: Some(1e-3),
        ..Doubles::new()
    };
    let s = spec(
        dir.path(),
        json!({"max_trials": 5, "protocol": {"early_stop_loss": 8.0}}),
    );
    let out = run(&d, &input(s));
    let st = out.data;
    assert_eq!(st.stop_reason, Some(StopReason::Diverged));
    assert_eq!(st.trial_history.len(), 3);
    assert!(st.trial_history[1].diverged && st.trial_history[2].diverged);
    assert_eq!(st.trial_history[1].record.status, "failed");
    assert!(
        st.trial_history[1]
            .failure
            .as_ref()
            .unwrap()
            .contains("diverged")
    );
    // The diverged trials' device-hours are charged, and the good trial is merged.
    assert!(st.trial_history[1].record.gpu_hours > 0.0);
    assert_eq!(st.best_trial.unwrap().trial_id, 1);
    assert!(st.merged_path.is_some());
}

#[test]
fn max_loop_iterations_caps_the_loop() {
    let dir = tempfile::tempdir().unwrap();
    let d = Doubles::new();
    let mut inp = input(spec(dir.path(), json!({"max_trials": 5})));
    inp.max_loop_iterations = 2;
    let out = run(&d, &inp);
    assert_eq!(out.data.stop_reason, Some(StopReason::MaxLoopIterations));
    assert_eq!(out.data.trial_history.len(), 2);
}

#[test]
fn a_trial_that_would_exceed_the_budget_is_not_started() {
    let dir = tempfile::tempdir().unwrap();
    let d = Doubles::new();
    // 12 steps x 1e-3 h = 0.012 h per trial: two fit in 0.03 h, a third does not.
    let s = spec(
        dir.path(),
        json!({"max_trials": 5, "budget_gpu_hours": 0.03}),
    );
    let out = run(&d, &input(s));
    let st = out.data;
    assert_eq!(st.stop_reason, Some(StopReason::BudgetExhausted));
    assert_eq!(st.trial_history.len(), 2);
    assert!(st.stop_message.unwrap().contains("trial 3 would need"));
    let real_trainings = d
        .calls_to(names::TRAINING)
        .iter()
        .filter(|c| c["dry_run"] == false)
        .count();
    assert_eq!(real_trainings, 2);
    assert!(st.budget.gpu_hours_used <= 0.03);
}

#[test]
fn a_dollar_budget_gates_with_the_cost_table() {
    let dir = tempfile::tempdir().unwrap();
    let d = Doubles::new();
    // $100 per device-hour: $1.20 per trial; $3 allows two.
    let s = spec(
        dir.path(),
        json!({"max_trials": 5, "protocol": {"budget_dollars": 3.0, "cost_per_device_hour": {"cpu": 100.0}}}),
    );
    let st = run(&d, &input(s)).data;
    assert_eq!(st.stop_reason, Some(StopReason::BudgetExhausted));
    assert_eq!(st.trial_history.len(), 2);
    assert!((st.budget.dollars_used.unwrap() - 2.4).abs() < 1e-9);
    assert!((st.trial_history[0].dollars.unwrap() - 1.2).abs() < 1e-9);
    // A cost table without the device is a clear error.
    let s = spec(
        dir.path(),
        json!({"protocol": {"budget_dollars": 3.0, "cost_per_device_hour": {"a100": 2.0, "h100": 4.0}}}),
    );
    let err = run_with(&d, &input(s), None).unwrap_err();
    assert_eq!(err.kind, ErrorKind::InvalidInput);
    assert!(err.hint.unwrap().contains("cpu"));
}

#[test]
fn an_exhausted_search_space_stops_the_loop() {
    let dir = tempfile::tempdir().unwrap();
    let d = Doubles {
        lr_grid: vec![2e-4, 1e-4],
        ..Doubles::new()
    };
    let s = spec(
        dir.path(),
        json!({"max_trials": 5, "search_space": {"rank_choices": [16]}}),
    );
    let st = run(&d, &input(s)).data;
    assert_eq!(st.stop_reason, Some(StopReason::SearchExhausted));
    assert_eq!(st.trial_history.len(), 2);
}

#[test]
fn a_dry_run_plans_and_forecasts_without_writing() {
    let dir = tempfile::tempdir().unwrap();
    let d = Doubles::new();
    let mut inp = input(spec(
        dir.path(),
        json!({"max_trials": 4, "budget_gpu_hours": 0.03}),
    ));
    inp.dry_run = true;
    let out = run(&d, &inp);
    let st = out.data;
    assert_eq!(st.stop_reason, Some(StopReason::DryRun));
    assert_eq!(st.trial_history.len(), 4);
    assert!(
        st.trial_history
            .iter()
            .all(|t| t.record.status == "planned")
    );
    assert!((st.budget.gpu_hours_forecast - 0.048).abs() < 1e-9);
    assert!(
        st.stop_message
            .unwrap()
            .contains("the budget runs out at trial 3")
    );
    assert!(out.output_text.contains("over budget"));
    assert!(
        !dir.path().join("runs").exists(),
        "a dry run writes nothing"
    );
    assert!(
        d.calls_to(names::TRAINING)
            .iter()
            .all(|c| c["dry_run"] == true)
    );
    // Four different configurations were planned.
    let configs: std::collections::BTreeSet<String> = st
        .trial_history
        .iter()
        .map(|t| {
            format!(
                "{} {}",
                t.record.config.learning_rate, t.record.config.lora_rank
            )
        })
        .collect();
    assert_eq!(configs.len(), 4);
}

#[test]
fn preflight_errors_stop_before_any_training() {
    let dir = tempfile::tempdir().unwrap();
    let d = Doubles {
        preflight_errors: vec!["E_GGUF_BASE: a GGUF base cannot be trained".into()],
        ..Doubles::new()
    };
    let err = run_with(&d, &input(spec(dir.path(), json!({}))), None).unwrap_err();
    assert_eq!(err.kind, ErrorKind::InvalidInput);
    assert!(err.message.contains("E_GGUF_BASE"), "{err}");
    assert!(d.calls_to(names::TRAINING).is_empty());
    let d = Doubles {
        fits: false,
        ..Doubles::new()
    };
    let err = run_with(
        &d,
        &input(spec(dir.path(), json!({"experiment_name": "b"}))),
        None,
    )
    .unwrap_err();
    assert!(err.message.contains("needs about 99.0 GB"), "{err}");
    assert_eq!(
        err.field.as_deref(),
        Some("experiment.resources.vram_limit_gb")
    );
    assert!(
        d.calls_to(names::TRAINING)
            .iter()
            .all(|c| c["dry_run"] == true)
    );
}

#[test]
fn an_invalid_spec_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let err = run_with(
        &Doubles::new(),
        &input(spec(dir.path(), json!({"max_trials": 0}))),
        None,
    )
    .unwrap_err();
    assert_eq!(err.field.as_deref(), Some("experiment.max_trials"));
}

#[test]
fn resume_after_a_crash_at_every_journal_point_reaches_the_same_result() {
    let base = fast_tempdir();
    let small = || Doubles {
        steps: 4,
        save_every: 2,
        ..Doubles::new()
    };
    let reference = {
        let d = small();
        let s = spec(base.path(), json!({}));
        let out = run(&d, &input(s));
        essence(&out.data)
    };
    let events = {
        let dir = base.path().join("runs/t");
        let text = std::fs::read_to_string(Journal::path_in(&dir)).unwrap();
        crate::journal::parse(&dir, &text).unwrap().events.len() as u64
    };
    assert!(events > 20, "{events} events");
    for k in 2..=events {
        let dir = fast_tempdir();
        let d = small();
        let mut inp = input(spec(dir.path(), json!({})));
        let err = run_with(
            &d,
            &inp,
            Some(Fault {
                at_seq: k,
                kind: FaultKind::Crash,
            }),
        )
        .unwrap_err();
        assert!(err.message.contains("simulated crash"), "{err}");
        let trained_before = finished_trainings(&d);
        inp.resume = true;
        let d2 = small();
        let out = run(&d2, &inp);
        assert_eq!(
            essence(&out.data),
            reference,
            "crash before journal event {k}"
        );
        // Finished trials are not trained again: at most the interrupted one.
        let again = finished_trainings(&d2);
        assert!(
            again + trained_before <= 3 + 1,
            "event {k}: {trained_before} + {again}"
        );
    }
}

fn finished_trainings(d: &Doubles) -> usize {
    d.calls_to(names::TRAINING)
        .iter()
        .filter(|c| c["dry_run"] == false)
        .count()
}

#[test]
fn an_interrupted_trial_resumes_from_its_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let reference = {
        let other = tempfile::tempdir().unwrap();
        essence(&run(&Doubles::new(), &input(spec(other.path(), json!({})))).data)
    };
    let d = Doubles {
        crash_training: Some((2, 7)),
        ..Doubles::new()
    };
    let mut inp = input(spec(dir.path(), json!({})));
    let err = run_with(&d, &inp, None).unwrap_err();
    assert!(err.message.contains("simulated crash in trial 2 at step 7"));
    inp.resume = true;
    let out = run(&d, &inp);
    assert_eq!(essence(&out.data), reference);
    let calls: Vec<_> = d
        .calls_to(names::TRAINING)
        .into_iter()
        .filter(|c| c["dry_run"] == false)
        .collect();
    // trial 1, trial 2 (crashed), trial 2 resumed from checkpoint-4, trial 3.
    assert_eq!(calls.len(), 4);
    assert!(
        calls[2]["resume_from"]
            .as_str()
            .unwrap()
            .ends_with("trial_002/checkpoint-4")
    );
    assert_eq!(out.data.trial_history[1].resumed, 1);
    assert!(out.output_text.contains("resuming from"));
    // The loss curve has each step once.
    let metrics =
        std::fs::read_to_string(dir.path().join("runs/t/trials/trial_002/metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 12);
}

#[test]
fn a_crash_while_storing_and_while_merging_resume_cleanly() {
    let reference = {
        let other = tempfile::tempdir().unwrap();
        essence(&run(&Doubles::new(), &input(spec(other.path(), json!({})))).data)
    };
    let dir = tempfile::tempdir().unwrap();
    let d = Doubles {
        crash_artifact: Some(2),
        crash_merge: true,
        ..Doubles::new()
    };
    let mut inp = input(spec(dir.path(), json!({})));
    let err = run_with(&d, &inp, None).unwrap_err();
    assert!(err.message.contains("while storing trial 2"), "{err}");
    inp.resume = true;
    let err = run_with(&d, &inp, None).unwrap_err();
    assert!(err.message.contains("during the merge"), "{err}");
    let out = run(&d, &inp);
    assert_eq!(essence(&out.data), reference);
    // The interrupted store was re-done idempotently (same version), the partial merge replaced.
    assert_eq!(d.calls_to(names::ARTIFACT).len(), 4);
    let merged = out.data.merged_path.unwrap();
    let body = std::fs::read_to_string(Path::new(&merged).join("model.safetensors")).unwrap();
    assert!(body.contains("fake_eval_loss"));
    assert!(!Path::new(&merged).join("model-00001.safetensors").exists());
}

#[test]
fn cancel_stops_gracefully_and_resume_finishes() {
    let reference = {
        let other = tempfile::tempdir().unwrap();
        essence(&run(&Doubles::new(), &input(spec(other.path(), json!({})))).data)
    };
    let dir = tempfile::tempdir().unwrap();
    let d = Doubles::new();
    d.cancel_during_training();
    let mut inp = input(spec(dir.path(), json!({})));
    let out = run(&d, &inp);
    assert_eq!(out.data.stop_reason, Some(StopReason::Cancelled));
    assert!(!out.data.finished);
    assert!(out.data.stop_message.unwrap().contains("--resume"));
    assert!(dir.path().join("runs/t/report.md").is_file());
    inp.resume = true;
    let out = run(&Doubles::new(), &inp);
    assert_eq!(essence(&out.data), reference);
}

#[test]
fn a_finished_experiment_resumes_to_the_same_state_without_work() {
    let dir = tempfile::tempdir().unwrap();
    let mut inp = input(spec(dir.path(), json!({})));
    let first = run(&Doubles::new(), &inp);
    inp.resume = true;
    let d = Doubles::new();
    let again = run(&d, &inp);
    assert_eq!(essence(&again.data), essence(&first.data));
    assert!(d.calls.lock().unwrap().is_empty());
}

#[test]
fn journals_that_are_damaged_foreign_or_unasked_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut inp = input(spec(dir.path(), json!({})));
    run(&Doubles::new(), &inp);
    // Without --resume.
    let err = run_with(&Doubles::new(), &inp, None).unwrap_err();
    assert!(err.hint.as_ref().unwrap().contains("--resume"), "{err}");
    // Another spec in the same folder.
    inp.resume = true;
    let mut other = inp.clone();
    other.experiment.max_trials = 7;
    let err = run_with(&Doubles::new(), &other, None).unwrap_err();
    assert!(
        err.message.contains("another experiment") && err.message.contains("max_trials"),
        "{err}"
    );
    // A damaged journal.
    let jp = dir.path().join("runs/t/journal.json");
    let text = std::fs::read_to_string(&jp).unwrap();
    std::fs::write(
        &jp,
        text.replacen("\"event\": \"planned\"", "\"event\": \"plannned\"", 1),
    )
    .unwrap();
    let err = run_with(&Doubles::new(), &inp, None).unwrap_err();
    assert_eq!(err.kind, ErrorKind::InvalidInput);
    assert!(err.message.contains("damaged"), "{err}");
    assert!(err.file.as_ref().unwrap().ends_with("journal.json"));
    std::fs::write(&jp, "{\"hello\": 1}").unwrap();
    let err = run_with(&Doubles::new(), &inp, None).unwrap_err();
    assert!(
        err.message
            .contains("not a lora-trainer experiment journal"),
        "{err}"
    );
}

#[test]
fn a_full_disk_is_reported_cleanly_and_resumable() {
    let dir = tempfile::tempdir().unwrap();
    let mut inp = input(spec(dir.path(), json!({})));
    let err = run_with(
        &Doubles::new(),
        &inp,
        Some(Fault {
            at_seq: 9,
            kind: FaultKind::DiskFull,
        }),
    )
    .unwrap_err();
    assert_eq!(err.kind, ErrorKind::Io);
    assert!(err.hint.as_ref().unwrap().contains("disk is full"), "{err}");
    assert!(err.file.as_ref().unwrap().ends_with("journal.json"));
    inp.resume = true;
    let out = run(&Doubles::new(), &inp);
    assert!(out.data.finished);
}

#[test]
fn a_missing_dataset_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = spec(dir.path(), json!({}));
    s.dataset_path = dir.path().join("nope.jsonl").display().to_string();
    let err = run_with(&Doubles::new(), &input(s), None).unwrap_err();
    assert_eq!(err.kind, ErrorKind::NotFound);
    assert!(err.to_string().contains("nope.jsonl"), "{err}");
}

#[test]
fn a_trial_reproduces_from_the_manifest_and_drift_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = Doubles::new();
    let out = run(&d, &input(spec(dir.path(), json!({}))));
    let exp = Path::new(out.data.experiment_dir.as_ref().unwrap()).to_path_buf();
    let manifest = exp.join(crate::manifest::MANIFEST_FILE);
    assert!(
        out.data
            .reports
            .iter()
            .any(|r| r.ends_with("manifest.json"))
    );
    let ctx = SkillContext::new(".");
    let rep = rt()
        .block_on(crate::manifest::reproduce(
            &d.registry(),
            &manifest,
            2,
            &exp.join("reproduce"),
            &ctx,
        ))
        .unwrap();
    assert!(rep.data.matches, "{}", rep.output_text);
    assert!(rep.output_text.contains("reproduced exactly"));
    // Change the training data: the reproduction names the drift.
    let m = crate::manifest::load(&manifest).unwrap();
    std::fs::write(
        &m.train_data.path,
        "{\"instruction\": \"x\", \"output\": \"y\"}\n",
    )
    .unwrap();
    let rep = rt()
        .block_on(crate::manifest::reproduce(
            &d.registry(),
            &manifest,
            2,
            &exp.join("reproduce"),
            &ctx,
        ))
        .unwrap();
    assert!(!rep.data.matches);
    assert!(!rep.data.checks[0].ok && rep.data.checks[0].name == "training data sha256");
    let err = rt()
        .block_on(crate::manifest::reproduce(
            &d.registry(),
            &manifest,
            9,
            &exp.join("reproduce"),
            &ctx,
        ))
        .unwrap_err();
    assert!(err.hint.unwrap().contains("1, 2, 3"));
}

#[test]
fn ablation_runs_every_point_against_the_baseline_and_plots() {
    let dir = tempfile::tempdir().unwrap();
    let d = Doubles::new();
    let s = spec(
        dir.path(),
        json!({"protocol": {"type": "ablation", "ablation": {"param": "lora_rank", "values": [4, 8, 32]}}}),
    );
    let out = run(&d, &input(s));
    let st = &out.data;
    assert_eq!(st.stop_reason, Some(StopReason::PlanCompleted));
    assert_eq!(st.trial_history.len(), 4, "baseline + 3 points");
    let ranks: Vec<u32> = st
        .trial_history
        .iter()
        .map(|t| t.record.config.lora_rank)
        .collect();
    assert_eq!(
        ranks,
        [16, 4, 8, 32],
        "the base (rank 16) first as the baseline"
    );
    let ab = st.ablation.as_ref().unwrap();
    assert_eq!(ab.rows.len(), 4);
    assert!(ab.rows[0].baseline && ab.rows[0].delta_vs_baseline == Some(0.0));
    assert_eq!(ab.best.as_deref(), Some("lora_rank=32"));
    assert!(ab.rows[3].delta_vs_baseline.unwrap() < 0.0);
    let plot = std::fs::read_to_string(ab.plot_path.as_ref().unwrap()).unwrap();
    assert!(plot.contains("<svg") && plot.contains("lora_rank"));
    let exp = Path::new(st.experiment_dir.as_ref().unwrap());
    let md = std::fs::read_to_string(exp.join("report.md")).unwrap();
    assert!(
        md.contains("## Ablation")
            && md.contains("lora_rank=32")
            && md.contains("plots/ablation.svg")
    );
    // HPO is not asked in an ablation; the best point is merged.
    assert!(d.calls_to(names::HPO).is_empty());
    assert_eq!(st.best_trial.as_ref().unwrap().record.config.lora_rank, 32);
}

#[test]
fn an_ablation_grid_includes_the_base_point_as_baseline() {
    let dir = tempfile::tempdir().unwrap();
    let s = spec(
        dir.path(),
        json!({"protocol": {"type": "ablation", "ablation": {"grid": {"lora_rank": [8, 16], "learning_rate": [1e-4, 2e-4]}}}}),
    );
    let st = run(&Doubles::new(), &input(s)).data;
    assert_eq!(st.trial_history.len(), 4);
    let ab = st.ablation.unwrap();
    let base: Vec<_> = ab.rows.iter().filter(|r| r.baseline).collect();
    assert_eq!(base.len(), 1);
    assert!(
        base[0].label.contains("lora_rank=16") && base[0].label.contains("learning_rate=0.0002")
    );
    // A bad value names the point.
    let s = spec(
        dir.path(),
        json!({"experiment_name": "bad", "protocol": {"type": "ablation", "ablation": {"param": "lora_dropout", "values": [0.1, 1.5]}}}),
    );
    let err = run_with(&Doubles::new(), &input(s), None).unwrap_err();
    assert!(err.message.contains("lora_dropout"), "{err}");
}

#[test]
fn curriculum_stages_start_from_the_previous_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let easy = dir.path().join("easy.jsonl");
    let hard = dir.path().join("hard.jsonl");
    std::fs::write(&easy, "{\"instruction\": \"1+1\", \"output\": \"2\"}\n").unwrap();
    std::fs::write(&hard, "{\"instruction\": \"17*23\", \"output\": \"391\"}\n").unwrap();
    let d = Doubles::new();
    let s = spec(
        dir.path(),
        json!({"protocol": {"type": "curriculum", "curriculum": {"stages": [
            {"name": "easy", "path": easy, "epochs": 1},
            {"name": "hard", "path": hard, "epochs": 2}
        ]}}}),
    );
    let st = run(&d, &input(s)).data;
    assert_eq!(st.trial_history.len(), 2);
    assert_eq!(st.stop_reason, Some(StopReason::PlanCompleted));
    let trainings: Vec<_> = d
        .calls_to(names::TRAINING)
        .into_iter()
        .filter(|c| c["dry_run"] == false)
        .collect();
    assert_eq!(trainings[0]["dataset_path"], easy.display().to_string());
    assert!(trainings[0]["init_adapter"].is_null());
    assert_eq!(trainings[1]["dataset_path"], hard.display().to_string());
    assert_eq!(
        trainings[1]["init_adapter"],
        st.trial_history[0].adapter_path.clone().unwrap().as_str()
    );
    assert_eq!(trainings[1]["trial_config"]["epochs"], 2.0);
    // The last stage is the product, and it is better than the first (it started from it).
    assert_eq!(st.best_trial.as_ref().unwrap().trial_id, 2);
    assert!(st.trial_history[1].record.objective < st.trial_history[0].record.objective);
    let stores = d.calls_to(names::ARTIFACT);
    assert_eq!(stores[1]["parent"], "v1");
    // By length: the data is cut into stage files, shortest first.
    let s = spec(
        dir.path(),
        json!({"experiment_name": "bylen", "protocol": {"type": "curriculum", "curriculum": {"num_stages": 2}}}),
    );
    let st = run(&Doubles::new(), &input(s)).data;
    assert_eq!(st.trial_history.len(), 2);
    let stage0 = dir.path().join("runs/bylen/data/stage_0.jsonl");
    let stage1 = dir.path().join("runs/bylen/data/stage_1.jsonl");
    let max0 = std::fs::read_to_string(&stage0)
        .unwrap()
        .lines()
        .map(str::len)
        .max()
        .unwrap();
    let min1 = std::fs::read_to_string(&stage1)
        .unwrap()
        .lines()
        .map(str::len)
        .min()
        .unwrap();
    assert!(max0 <= min1);
    // By the base model's loss (the double's loss falls with length): the eval
    // skill scores every row once (per_sample, no adapter), the hardest rows
    // (the shortest here) come last, and a resume reuses the cached scores.
    let s = spec(
        dir.path(),
        json!({"experiment_name": "byloss", "protocol": {"type": "curriculum", "curriculum": {"num_stages": 2, "measure": "loss"}}}),
    );
    let d = Doubles::new();
    let st = run(&d, &input(s.clone())).data;
    assert_eq!(st.trial_history.len(), 2);
    assert_eq!(
        st.trial_history[1].role,
        TrialRole::Stage {
            index: 1,
            name: "loss-2".into(),
            dataset_path: dir
                .path()
                .join("runs/byloss/data/stage_1.jsonl")
                .display()
                .to_string()
        }
    );
    let scored: Vec<_> = d
        .calls_to(names::EVAL)
        .into_iter()
        .filter(|c| c["per_sample"] == true)
        .collect();
    assert_eq!(scored.len(), 1, "scored once");
    assert!(scored[0]["adapter_path"].is_null(), "by the base model");
    let lens = |k: u32| -> Vec<usize> {
        std::fs::read_to_string(dir.path().join(format!("runs/byloss/data/stage_{k}.jsonl")))
            .unwrap()
            .lines()
            .map(|l| l.chars().count())
            .collect()
    };
    assert!(
        lens(0).iter().min() >= lens(1).iter().max(),
        "{:?} {:?}",
        lens(0),
        lens(1)
    );
    assert!(
        dir.path()
            .join("runs/byloss/data/loss_scores.json")
            .is_file()
    );
}

#[test]
fn an_ensemble_trains_members_combines_them_and_compares_with_the_best() {
    let dir = tempfile::tempdir().unwrap();
    let d = Doubles::new();
    let s = spec(
        dir.path(),
        json!({"protocol": {"type": "ensemble", "ensemble": {"members": 3, "weighting": "inverse_loss", "combination": "ties"}}}),
    );
    let st = run(&d, &input(s)).data;
    assert_eq!(st.trial_history.len(), 3);
    let seeds: std::collections::BTreeSet<u64> = st
        .trial_history
        .iter()
        .map(|t| t.record.config.seed)
        .collect();
    assert_eq!(seeds.len(), 3, "members differ in seed");
    let ranks: std::collections::BTreeSet<u32> = st
        .trial_history
        .iter()
        .map(|t| t.record.config.lora_rank)
        .collect();
    assert_eq!(ranks.len(), 1, "TIES combines adapters of one rank only");
    let en = st.ensemble.as_ref().unwrap();
    assert_eq!(en.members, [1, 2, 3]);
    assert!((en.weights.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    let merges = d.calls_to(names::MERGE);
    assert_eq!(merges[0]["combination"]["combination_type"], "ties");
    assert_eq!(merges[0]["adapter_only"], true);
    assert!(en.ensemble_metric.is_some() && en.best_member_metric.is_some());
    // Step 4 merged the better of the combination and the best member.
    let merged_from = merges[1]["adapter_path"].as_str().unwrap();
    if en.ensemble_metric < en.best_member_metric {
        assert_eq!(Some(merged_from), en.combined_adapter.as_deref());
    } else {
        assert_eq!(
            Some(merged_from),
            st.best_trial.as_ref().unwrap().adapter_path.as_deref()
        );
    }
    let md = std::fs::read_to_string(dir.path().join("runs/t/report.md")).unwrap();
    assert!(md.contains("## Ensemble"));
}

#[test]
fn protocols_resume_after_a_crash_to_the_same_result() {
    for protocol in [
        json!({"type": "ablation", "ablation": {"param": "lora_rank", "values": [4, 16]}}),
        json!({"type": "ensemble", "ensemble": {"members": 2}}),
    ] {
        let reference = {
            let other = fast_tempdir();
            essence(
                &run(
                    &Doubles::new(),
                    &input(spec(other.path(), json!({"protocol": protocol}))),
                )
                .data,
            )
        };
        let events = 30;
        for k in (3..=events).step_by(4) {
            let dir = fast_tempdir();
            let mut inp = input(spec(dir.path(), json!({"protocol": protocol})));
            let fault = Some(Fault {
                at_seq: k,
                kind: FaultKind::Crash,
            });
            if run_with(&Doubles::new(), &inp, fault).is_ok() {
                continue; // fewer events than k
            }
            inp.resume = true;
            let out = run(&Doubles::new(), &inp);
            assert_eq!(
                essence(&out.data),
                reference,
                "{protocol}: crash before event {k}"
            );
        }
    }
}

#[test]
fn a_dry_run_lists_a_protocols_plan() {
    let dir = tempfile::tempdir().unwrap();
    let mut inp = input(spec(
        dir.path(),
        json!({"protocol": {"type": "curriculum", "curriculum": {"num_stages": 3}}}),
    ));
    inp.dry_run = true;
    let st = run(&Doubles::new(), &inp).data;
    assert_eq!(st.trial_history.len(), 3);
    assert!(!dir.path().join("runs").exists());
}
