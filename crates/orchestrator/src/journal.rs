//! The experiment journal: every event of an experiment, rewritten atomically
//! after each one, so that a run killed at any moment (kill -9 included)
//! resumes from exactly what was recorded.
//!
//! The journal is one JSON file (`journal.json`) holding a header (format,
//! version, the experiment's spec and its SHA-256) and the ordered events.
//! It is small (a few kilobytes per trial), so rewriting it whole through
//! [`lora_skill::fs::write_json_atomic`] after each event costs little and a
//! reader never sees a torn file. The state of an experiment is a pure
//! function of its events ([`crate::ledger::Ledger::apply`]).

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use lora_spec::contracts::artifact::ArtifactStoreOutput;
use lora_spec::contracts::config::{LoRAConfigOutput, PreflightReport};
use lora_spec::contracts::dataset::DatasetProfile;
use lora_spec::contracts::eval::EvalOutput;
use lora_spec::contracts::merge::MergeOutput;
use lora_spec::contracts::orchestrator::{
    AblationResult, EnsembleResult, SampleComparison, StopReason, TrialSummary,
};
use lora_spec::contracts::training::TrainingOutput;

use crate::error::OrchestratorError;

/// The `format` field of every journal.
pub const JOURNAL_FORMAT: &str = "lora-trainer/experiment-journal";
/// The journal layout version this build writes and reads.
pub const JOURNAL_VERSION: u32 = 1;
/// The journal's file name inside the experiment folder.
pub const JOURNAL_FILE: &str = "journal.json";

/// One thing that happened in an experiment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The experiment started (first run).
    Started,
    /// A later run picked the experiment up again.
    Resumed,
    /// Step 1: the dataset profile.
    Profiled {
        /// The dataset skill's output.
        profile: Box<DatasetProfile>,
    },
    /// The held-out data was fixed (given, or split off the training data).
    DataReady {
        /// Training data.
        train_path: String,
        /// Held-out data.
        eval_path: String,
    },
    /// Step 2: configuration and preflight passed.
    Configured {
        /// The config skill's output.
        config: Box<LoRAConfigOutput>,
        /// Preflight warnings, shown to the user.
        #[serde(default)]
        warnings: Vec<String>,
        /// The preflight report (time per step, ETA of a trial), when there was one.
        #[serde(default)]
        preflight: Option<Box<PreflightReport>>,
    },
    /// A trial was chosen (by the strategy or the protocol), not started yet.
    Planned {
        /// The trial, status `planned`.
        trial: Box<TrialSummary>,
    },
    /// Training of a trial started (or restarted from a checkpoint).
    TrainingStarted {
        /// Trial.
        trial_id: u32,
        /// The trial's folder.
        output_dir: String,
        /// Checkpoint it resumes from.
        #[serde(default)]
        resume_from: Option<String>,
    },
    /// Training of a trial ended.
    Trained {
        /// Trial.
        trial_id: u32,
        /// The training skill's output.
        output: TrainingOutput,
    },
    /// A trial was evaluated.
    Evaluated {
        /// Trial.
        trial_id: u32,
        /// The eval skill's output.
        output: EvalOutput,
    },
    /// A trial's adapter was stored.
    Stored {
        /// Trial.
        trial_id: u32,
        /// The artifact skill's output.
        output: ArtifactStoreOutput,
    },
    /// A trial is over (completed, failed or pruned).
    TrialFinished {
        /// Trial.
        trial_id: u32,
        /// completed / failed / pruned.
        status: String,
        /// The objective (`stop_metric`), when completed.
        objective: Option<f64>,
        /// Why it failed or was pruned.
        #[serde(default)]
        failure: Option<String>,
        /// Whether it diverged.
        #[serde(default)]
        diverged: bool,
    },
    /// The trial loop stopped.
    Stopped {
        /// Why.
        reason: StopReason,
        /// In words.
        message: String,
    },
    /// The ablation comparison was computed.
    AblationDone {
        /// The table.
        result: AblationResult,
    },
    /// The ensemble members were combined (and the combination evaluated).
    EnsembleDone {
        /// Weights, combined adapter and its evaluation.
        result: EnsembleResult,
    },
    /// Step 4: merging started.
    MergeStarted {
        /// The adapter merged.
        adapter_path: String,
        /// Where the merged model goes.
        output_path: String,
    },
    /// Step 4: merged and exported.
    Merged {
        /// The merge skill's output.
        output: MergeOutput,
    },
    /// Before/after generations were made.
    Sampled {
        /// The comparisons.
        samples: Vec<SampleComparison>,
    },
    /// Everything is done.
    Finished,
}

impl Event {
    /// The event's name as written in the journal.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Started => "started",
            Self::Resumed => "resumed",
            Self::Profiled { .. } => "profiled",
            Self::DataReady { .. } => "data_ready",
            Self::Configured { .. } => "configured",
            Self::Planned { .. } => "planned",
            Self::TrainingStarted { .. } => "training_started",
            Self::Trained { .. } => "trained",
            Self::Evaluated { .. } => "evaluated",
            Self::Stored { .. } => "stored",
            Self::TrialFinished { .. } => "trial_finished",
            Self::Stopped { .. } => "stopped",
            Self::AblationDone { .. } => "ablation_done",
            Self::EnsembleDone { .. } => "ensemble_done",
            Self::MergeStarted { .. } => "merge_started",
            Self::Merged { .. } => "merged",
            Self::Sampled { .. } => "sampled",
            Self::Finished => "finished",
        }
    }
}

/// An event with its sequence number and time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// 1-based position in the journal.
    pub seq: u64,
    /// Milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    /// What happened.
    #[serde(flatten)]
    pub event: Event,
}

/// The journal file's content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JournalFile {
    /// Always [`JOURNAL_FORMAT`].
    pub format: String,
    /// Layout version ([`JOURNAL_VERSION`]).
    pub version: u32,
    /// The experiment's name.
    pub experiment_name: String,
    /// SHA-256 of the canonical JSON of the spec.
    pub spec_hash: String,
    /// The spec the experiment runs (to name what differs when another spec resumes it).
    pub spec: serde_json::Value,
    /// The events, in order.
    pub events: Vec<Entry>,
}

/// Test-only fault injection: what happens when the journal is about to
/// write event `at_seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// The sequence number of the write that fails.
    pub at_seq: u64,
    /// How it fails.
    pub kind: FaultKind,
}

/// How an injected fault fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// The process "dies": the run returns at once, nothing more is written.
    Crash,
    /// The disk is full (an `ENOSPC`-like error from the write).
    DiskFull,
}

/// An open journal.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: JournalFile,
    fault: Option<Fault>,
}

/// SHA-256 (hex) of the canonical JSON of `spec`.
pub fn spec_hash(spec: &serde_json::Value) -> String {
    let bytes = serde_json::to_vec(spec).unwrap_or_default();
    hex::encode(Sha256::digest(&bytes))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Journal {
    /// The journal of the experiment folder `dir`.
    pub fn path_in(dir: &Path) -> PathBuf {
        dir.join(JOURNAL_FILE)
    }

    /// Creates a new journal (no file is written until the first event).
    pub fn create(dir: &Path, experiment_name: &str, spec: serde_json::Value) -> Self {
        Self {
            path: Self::path_in(dir),
            file: JournalFile {
                format: JOURNAL_FORMAT.into(),
                version: JOURNAL_VERSION,
                experiment_name: experiment_name.into(),
                spec_hash: spec_hash(&spec),
                spec,
                events: Vec::new(),
            },
            fault: None,
        }
    }

    /// Opens the journal of `dir` and checks that it belongs to `spec`.
    pub fn open(dir: &Path, spec: &serde_json::Value) -> Result<Self, OrchestratorError> {
        let path = Self::path_in(dir);
        let text = std::fs::read_to_string(&path).map_err(|e| OrchestratorError::io(&path, e))?;
        let file = parse(&path, &text)?;
        let hash = spec_hash(spec);
        if file.spec_hash != hash {
            return Err(OrchestratorError::ForeignJournal {
                message: describe_difference(&file.spec, spec),
                path,
            });
        }
        Ok(Self {
            path,
            file,
            fault: None,
        })
    }

    /// Injects a fault at a later write (tests).
    pub fn set_fault(&mut self, fault: Option<Fault>) {
        self.fault = fault;
    }

    /// The journal file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The events so far.
    pub fn entries(&self) -> &[Entry] {
        &self.file.events
    }

    /// Appends `event` and rewrites the journal atomically. On error the
    /// event is not recorded (in memory nor on disk).
    pub fn append(&mut self, event: Event) -> Result<&Entry, OrchestratorError> {
        let seq = self.file.events.len() as u64 + 1;
        if let Some(f) = self.fault.filter(|f| f.at_seq == seq) {
            match f.kind {
                FaultKind::Crash => return Err(OrchestratorError::SimulatedCrash { seq }),
                FaultKind::DiskFull => {
                    return Err(OrchestratorError::io(
                        &self.path,
                        std::io::Error::new(
                            std::io::ErrorKind::StorageFull,
                            "No space left on device (injected)",
                        ),
                    ));
                }
            }
        }
        self.file.events.push(Entry {
            seq,
            at_unix_ms: now_ms(),
            event,
        });
        if let Err(e) = lora_skill::fs::write_json_atomic(&self.path, &self.file) {
            self.file.events.pop();
            return Err(OrchestratorError::io(&self.path, e));
        }
        let last = self.file.events.len() - 1;
        Ok(&self.file.events[last])
    }
}

/// Parses journal text, with the line of any damage.
pub fn parse(path: &Path, text: &str) -> Result<JournalFile, OrchestratorError> {
    let corrupt = |line: u64, message: String| OrchestratorError::CorruptJournal {
        path: path.to_path_buf(),
        line,
        message,
    };
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| corrupt(e.line() as u64, e.to_string()))?;
    match value.get("format").and_then(|f| f.as_str()) {
        Some(JOURNAL_FORMAT) => {}
        Some(other) => {
            return Err(corrupt(
                0,
                format!("it is a `{other}` file, not a lora-trainer experiment journal"),
            ));
        }
        None => {
            return Err(corrupt(
                0,
                "it has no `format` field: this is not a lora-trainer experiment journal".into(),
            ));
        }
    }
    let version = value.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
    if version != u64::from(JOURNAL_VERSION) {
        return Err(corrupt(
            0,
            format!(
                "journal version {version} is not readable by this build (it reads version {JOURNAL_VERSION})"
            ),
        ));
    }
    let file: JournalFile = serde_json::from_str(text).map_err(|e| {
        corrupt(
            e.line() as u64,
            format!("an entry does not match the journal layout: {e}"),
        )
    })?;
    for (i, entry) in file.events.iter().enumerate() {
        if entry.seq != i as u64 + 1 {
            return Err(corrupt(
                0,
                format!(
                    "event {} has sequence number {} (events were removed or reordered)",
                    i + 1,
                    entry.seq
                ),
            ));
        }
    }
    if file.spec_hash != spec_hash(&file.spec) {
        return Err(corrupt(
            0,
            "the recorded spec does not match its recorded hash (the journal was edited)".into(),
        ));
    }
    Ok(file)
}

/// Names the top-level spec fields that differ between `old` and `new`.
fn describe_difference(old: &serde_json::Value, new: &serde_json::Value) -> String {
    let mut diffs = Vec::new();
    if let (Some(a), Some(b)) = (old.as_object(), new.as_object()) {
        for (k, va) in a {
            match b.get(k) {
                Some(vb) if vb == va => {}
                Some(vb) => diffs.push(field_diff(k, va, vb)),
                None => diffs.push(format!("`{k}` is missing now")),
            }
        }
        for k in b.keys() {
            if !a.contains_key(k) {
                diffs.push(format!("`{k}` is new"));
            }
        }
    }
    if diffs.is_empty() {
        "the spec differs".into()
    } else {
        format!("the spec differs in {}", diffs.join("; "))
    }
}

fn field_diff(key: &str, a: &serde_json::Value, b: &serde_json::Value) -> String {
    if let (Some(ao), Some(bo)) = (a.as_object(), b.as_object()) {
        let inner: Vec<String> = ao
            .iter()
            .filter(|(k, v)| bo.get(*k) != Some(*v))
            .map(|(k, v)| {
                format!(
                    "`{key}.{k}` (was {}, now {})",
                    short(v),
                    bo.get(k).map(short).unwrap_or_else(|| "missing".into())
                )
            })
            .collect();
        if !inner.is_empty() {
            return inner.join(", ");
        }
    }
    format!("`{key}` (was {}, now {})", short(a), short(b))
}

fn short(v: &serde_json::Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 60 {
        format!("{}...", s.chars().take(57).collect::<String>())
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> serde_json::Value {
        serde_json::json!({"dataset_path": "/d.jsonl", "protocol": {"trials": 3, "seed": 1}})
    }

    #[test]
    fn events_round_trip_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::create(dir.path(), "exp", spec());
        j.append(Event::Started).unwrap();
        j.append(Event::Stopped {
            reason: StopReason::MaxTrials,
            message: "3 trials".into(),
        })
        .unwrap();
        let j2 = Journal::open(dir.path(), &spec()).unwrap();
        assert_eq!(j2.entries().len(), 2);
        assert_eq!(j2.entries()[1].event.name(), "stopped");
        assert_eq!(j2.entries()[1].seq, 2);
    }

    #[test]
    fn another_spec_is_a_foreign_journal_naming_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::create(dir.path(), "exp", spec());
        j.append(Event::Started).unwrap();
        let other =
            serde_json::json!({"dataset_path": "/d.jsonl", "protocol": {"trials": 5, "seed": 1}});
        let err = Journal::open(dir.path(), &other).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, OrchestratorError::ForeignJournal { .. }));
        assert!(
            msg.contains("protocol.trials") && msg.contains("was 3, now 5"),
            "{msg}"
        );
    }

    #[test]
    fn damage_is_reported_with_a_line() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::create(dir.path(), "exp", spec());
        j.append(Event::Started).unwrap();
        let p = Journal::path_in(dir.path());
        let text = std::fs::read_to_string(&p).unwrap();
        std::fs::write(&p, &text[..text.len() / 2]).unwrap();
        let err = Journal::open(dir.path(), &spec()).unwrap_err();
        match err {
            OrchestratorError::CorruptJournal { line, .. } => assert!(line > 1),
            other => panic!("{other:?}"),
        }
        std::fs::write(&p, r#"{"format": "something-else", "version": 1}"#).unwrap();
        let msg = Journal::open(dir.path(), &spec()).unwrap_err().to_string();
        assert!(msg.contains("something-else"), "{msg}");
        std::fs::write(&p, text.replace("\"seq\": 1", "\"seq\": 7")).unwrap();
        let msg = Journal::open(dir.path(), &spec()).unwrap_err().to_string();
        assert!(msg.contains("sequence number 7"), "{msg}");
    }

    #[test]
    fn injected_faults_leave_the_journal_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::create(dir.path(), "exp", spec());
        j.append(Event::Started).unwrap();
        j.set_fault(Some(Fault {
            at_seq: 2,
            kind: FaultKind::DiskFull,
        }));
        let err = j.append(Event::Finished).unwrap_err();
        assert!(err.to_string().contains("No space left"));
        assert_eq!(j.entries().len(), 1);
        let j2 = Journal::open(dir.path(), &spec()).unwrap();
        assert_eq!(j2.entries().len(), 1);
    }
}
