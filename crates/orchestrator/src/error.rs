//! The orchestrator's error type and its mapping into [`SkillError`].

use std::path::{Path, PathBuf};

use lora_skill::{ErrorKind, SkillError};

/// What can go wrong while running an experiment, before it crosses the skill boundary.
#[derive(Debug, thiserror::Error)]
pub enum OrchestratorError {
    /// Reading or writing a file of the experiment folder failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The journal is not valid JSON or not a journal of this format.
    #[error("{path}:{line}: the experiment journal is damaged: {message}")]
    CorruptJournal {
        /// The journal file.
        path: PathBuf,
        /// 1-based line of the damage (0 when unknown).
        line: u64,
        /// What is wrong.
        message: String,
    },
    /// The journal belongs to another experiment (its spec differs).
    #[error("{path}: the journal belongs to another experiment ({message})")]
    ForeignJournal {
        /// The journal file.
        path: PathBuf,
        /// What differs.
        message: String,
    },
    /// A journal exists and the caller did not ask to resume.
    #[error("{path}: an experiment already exists in this folder")]
    AlreadyExists {
        /// The journal file.
        path: PathBuf,
    },
    /// Another process runs this experiment.
    #[error("{path}: the experiment is being run by process {pid}")]
    Locked {
        /// The lock file.
        path: PathBuf,
        /// The other process.
        pid: u32,
    },
    /// The spec is not runnable (a missing file, a bad combination).
    #[error("{message}")]
    Invalid {
        /// The spec field.
        field: String,
        /// What is wrong.
        message: String,
        /// What would fix it.
        hint: String,
    },
    /// A fault injected by a test (simulated crash).
    #[error("simulated crash before journal event {seq} (fault injection)")]
    SimulatedCrash {
        /// The journal event that was not written.
        seq: u64,
    },
}

impl OrchestratorError {
    /// An I/O error about `path`.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

impl From<OrchestratorError> for SkillError {
    fn from(e: OrchestratorError) -> Self {
        let msg = e.to_string();
        match e {
            OrchestratorError::Io { path, source } => SkillError::io(&path, &source),
            OrchestratorError::CorruptJournal { path, line, message } => {
                let mut err = SkillError::invalid_input(format!(
                    "the experiment journal is damaged: {message}"
                ))
                .with_file(path.display().to_string())
                .with_hint(
                    "the journal is written atomically, so it was edited or overwritten by hand: \
                     restore it, or move the experiment folder aside and run again without --resume",
                );
                if line > 0 {
                    err = err.with_line(line);
                }
                err
            }
            OrchestratorError::ForeignJournal { path, message } => SkillError::invalid_input(
                format!("the journal belongs to another experiment: {message}"),
            )
            .with_file(path.display().to_string())
            .with_hint(
                "resume with the spec that started this experiment, or give this spec its own \
                 experiment_name or output.dir",
            ),
            OrchestratorError::AlreadyExists { path } => SkillError::invalid_input(
                "an experiment already exists in this folder",
            )
            .with_file(path.display().to_string())
            .with_hint(
                "pass --resume to continue it, or change experiment_name or output.dir to start another",
            ),
            OrchestratorError::Locked { path, pid } => SkillError::new(
                ErrorKind::InvalidInput,
                format!("the experiment is being run by process {pid}"),
            )
            .with_file(path.display().to_string())
            .with_hint("wait for it to finish or stop it; a stale lock of a dead process is taken over"),
            OrchestratorError::Invalid {
                field,
                message,
                hint,
            } => SkillError::invalid_input(message)
                .with_field(field)
                .with_hint(hint),
            OrchestratorError::SimulatedCrash { .. } => SkillError::backend(msg),
        }
    }
}
