//! The context a skill runs in: working directory, progress and log events,
//! cancellation and a tracing span.
//!
//! Skills never print. They emit [`Event`]s into an [`EventSink`]; the CLI's
//! sink draws indicatif bars, a test's [`MemorySink`] records them, an agent's
//! sink may forward them anywhere.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::SkillError;

/// Cooperative cancellation shared by every skill of one run (Ctrl-C cancels it).
pub use tokio_util::sync::CancellationToken as CancelToken;

/// Severity of a log event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    /// Diagnostic detail.
    Debug,
    /// Normal progress narration.
    Info,
    /// Something the user should look at.
    Warn,
}

/// Something a skill reports while it runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A long task starts. `id` is unique within the context tree.
    ProgressStart {
        /// Task id.
        id: u64,
        /// What is being done ("train trial 3").
        label: String,
        /// Total units of work, when known.
        total: Option<u64>,
        /// The unit ("steps", "rows", "tensors").
        unit: String,
    },
    /// The task moved on.
    ProgressUpdate {
        /// Task id.
        id: u64,
        /// Units done so far.
        position: u64,
        /// A short status ("loss 1.23").
        message: Option<String>,
        /// Named numbers of the moment (loss, lr, tokens_per_s).
        metrics: BTreeMap<String, f64>,
    },
    /// The task ended.
    ProgressFinish {
        /// Task id.
        id: u64,
        /// A closing status.
        message: Option<String>,
    },
    /// A log line from a skill.
    Log {
        /// Severity.
        level: Level,
        /// The skill or component that logged it.
        source: String,
        /// The text.
        message: String,
    },
}

/// Receives a skill's events. Implementations must be cheap and must not block.
pub trait EventSink: Send + Sync {
    /// Handles one event.
    fn emit(&self, event: Event);
}

/// Drops every event.
#[derive(Debug, Default, Clone, Copy)]
pub struct NullSink;

impl EventSink for NullSink {
    fn emit(&self, _event: Event) {}
}

/// Keeps every event in memory (for tests and for agents that poll).
#[derive(Debug, Default)]
pub struct MemorySink {
    events: Mutex<Vec<Event>>,
}

impl MemorySink {
    /// A new, empty sink.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A copy of the events so far.
    pub fn events(&self) -> Vec<Event> {
        self.events.lock().map(|e| e.clone()).unwrap_or_default()
    }
}

impl EventSink for MemorySink {
    fn emit(&self, event: Event) {
        if let Ok(mut e) = self.events.lock() {
            e.push(event);
        }
    }
}

/// Where and how a skill runs.
#[derive(Clone)]
pub struct SkillContext {
    work_dir: PathBuf,
    sink: Arc<dyn EventSink>,
    cancel: CancelToken,
    span: tracing::Span,
    source: String,
    next_id: Arc<AtomicU64>,
}

impl std::fmt::Debug for SkillContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SkillContext")
            .field("work_dir", &self.work_dir)
            .field("source", &self.source)
            .field("cancelled", &self.cancel.is_cancelled())
            .finish()
    }
}

impl SkillContext {
    /// A context rooted at `work_dir` that drops its events.
    pub fn new(work_dir: impl Into<PathBuf>) -> Self {
        Self {
            work_dir: work_dir.into(),
            sink: Arc::new(NullSink),
            cancel: CancelToken::new(),
            span: tracing::Span::none(),
            source: String::new(),
            next_id: Arc::new(AtomicU64::new(1)),
        }
    }

    /// Sends events to `sink`.
    pub fn with_sink(mut self, sink: Arc<dyn EventSink>) -> Self {
        self.sink = sink;
        self
    }

    /// Shares `cancel` (for example one wired to Ctrl-C).
    pub fn with_cancel(mut self, cancel: CancelToken) -> Self {
        self.cancel = cancel;
        self
    }

    /// A child context for a named skill or step: same sink, same cancellation,
    /// a nested tracing span, events tagged with `source`.
    pub fn child(&self, source: &str) -> Self {
        let span = tracing::info_span!(parent: &self.span, "skill", name = source);
        Self {
            work_dir: self.work_dir.clone(),
            sink: Arc::clone(&self.sink),
            cancel: self.cancel.clone(),
            span,
            source: source.to_string(),
            next_id: Arc::clone(&self.next_id),
        }
    }

    /// The same context with another working directory.
    pub fn in_dir(&self, dir: impl Into<PathBuf>) -> Self {
        let mut c = self.clone();
        c.work_dir = dir.into();
        c
    }

    /// The working directory; relative paths in inputs are resolved against it.
    pub fn work_dir(&self) -> &Path {
        &self.work_dir
    }

    /// `path` if absolute, else `work_dir/path`.
    pub fn resolve(&self, path: impl AsRef<Path>) -> PathBuf {
        let p = path.as_ref();
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.work_dir.join(p)
        }
    }

    /// The tracing span of this context; enter it around work done on other threads.
    pub fn span(&self) -> &tracing::Span {
        &self.span
    }

    /// The cancellation token.
    pub fn cancel_token(&self) -> &CancelToken {
        &self.cancel
    }

    /// Whether the caller asked to stop.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// `Err(Cancelled)` once the caller asked to stop; call it between units of work.
    pub fn check_cancelled(&self) -> Result<(), SkillError> {
        if self.cancel.is_cancelled() {
            Err(SkillError::cancelled())
        } else {
            Ok(())
        }
    }

    /// Emits a raw event.
    pub fn emit(&self, event: Event) {
        self.sink.emit(event);
    }

    /// Logs an informational line (also to tracing).
    pub fn info(&self, message: impl Into<String>) {
        self.log(Level::Info, message.into());
    }

    /// Logs a warning (also to tracing).
    pub fn warn(&self, message: impl Into<String>) {
        self.log(Level::Warn, message.into());
    }

    /// Logs a debug line (also to tracing).
    pub fn debug(&self, message: impl Into<String>) {
        self.log(Level::Debug, message.into());
    }

    fn log(&self, level: Level, message: String) {
        let _g = self.span.enter();
        match level {
            Level::Debug => tracing::debug!(source = %self.source, "{message}"),
            Level::Info => tracing::info!(source = %self.source, "{message}"),
            Level::Warn => tracing::warn!(source = %self.source, "{message}"),
        }
        self.sink.emit(Event::Log {
            level,
            source: self.source.clone(),
            message,
        });
    }

    /// Starts a progress task of `total` units (None when unknown).
    pub fn progress(&self, label: impl Into<String>, total: Option<u64>, unit: &str) -> Progress {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.sink.emit(Event::ProgressStart {
            id,
            label: label.into(),
            total,
            unit: unit.to_string(),
        });
        Progress {
            id,
            sink: Arc::clone(&self.sink),
            position: 0,
            finished: false,
        }
    }
}

/// A running progress task. Dropping it finishes it.
pub struct Progress {
    id: u64,
    sink: Arc<dyn EventSink>,
    position: u64,
    finished: bool,
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Progress")
            .field("id", &self.id)
            .field("position", &self.position)
            .finish()
    }
}

impl Progress {
    /// The task id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Units done so far.
    pub fn position(&self) -> u64 {
        self.position
    }

    /// Moves to `position` with an optional message and metrics.
    pub fn update(&mut self, position: u64, message: Option<String>, metrics: &[(&str, f64)]) {
        self.position = position;
        self.sink.emit(Event::ProgressUpdate {
            id: self.id,
            position,
            message,
            metrics: metrics.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        });
    }

    /// Moves on by `n` units.
    pub fn inc(&mut self, n: u64) {
        let p = self.position + n;
        self.update(p, None, &[]);
    }

    /// Ends the task with a closing message.
    pub fn finish(mut self, message: impl Into<String>) {
        self.finished = true;
        self.sink.emit(Event::ProgressFinish {
            id: self.id,
            message: Some(message.into()),
        });
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if !self.finished {
            self.sink.emit(Event::ProgressFinish {
                id: self.id,
                message: None,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_events_reach_the_sink_in_order() {
        let sink = MemorySink::new();
        let ctx = SkillContext::new("/tmp").with_sink(sink.clone());
        let child = ctx.child("training");
        {
            let mut p = child.progress("train", Some(3), "steps");
            p.update(1, Some("loss 2.0".into()), &[("loss", 2.0)]);
            p.inc(1);
            p.finish("done");
        }
        child.warn("careful");
        let ev = sink.events();
        assert_eq!(ev.len(), 5);
        assert!(matches!(ev[0], Event::ProgressStart { total: Some(3), .. }));
        match &ev[1] {
            Event::ProgressUpdate {
                position, metrics, ..
            } => {
                assert_eq!(*position, 1);
                assert_eq!(metrics["loss"], 2.0);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(ev[2], Event::ProgressUpdate { position: 2, .. }));
        assert!(matches!(ev[3], Event::ProgressFinish { .. }));
        match &ev[4] {
            Event::Log {
                level,
                source,
                message,
            } => {
                assert_eq!(*level, Level::Warn);
                assert_eq!(source, "training");
                assert_eq!(message, "careful");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn dropped_progress_finishes_and_ids_are_unique_across_children() {
        let sink = MemorySink::new();
        let ctx = SkillContext::new("/tmp").with_sink(sink.clone());
        let a = ctx.child("a").progress("x", None, "rows");
        let b = ctx.child("b").progress("y", None, "rows");
        assert_ne!(a.id(), b.id());
        drop(a);
        drop(b);
        let finishes = sink
            .events()
            .iter()
            .filter(|e| matches!(e, Event::ProgressFinish { .. }))
            .count();
        assert_eq!(finishes, 2);
    }

    #[test]
    fn cancellation_is_shared_with_children() {
        let ctx = SkillContext::new("/tmp");
        let child = ctx.child("x");
        assert!(child.check_cancelled().is_ok());
        ctx.cancel_token().cancel();
        let err = child.check_cancelled().unwrap_err();
        assert_eq!(err.kind, crate::ErrorKind::Cancelled);
    }

    #[test]
    fn resolve_is_relative_to_work_dir() {
        let ctx = SkillContext::new("/work/exp");
        assert_eq!(
            ctx.resolve("data.jsonl"),
            PathBuf::from("/work/exp/data.jsonl")
        );
        assert_eq!(ctx.resolve("/abs/x"), PathBuf::from("/abs/x"));
    }
}
