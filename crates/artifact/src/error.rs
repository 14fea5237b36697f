//! `ArtifactError`: everything that can go wrong in the store, and its mapping
//! into [`lora_skill::SkillError`] (kind, field, file and a hint that says what fixes it).

use lora_skill::{ErrorKind, SkillError};
use std::path::{Path, PathBuf};

/// An error of the artifact store.
#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The adapter folder cannot be stored as it is.
    #[error("adapter folder {}: {reason}", path.display())]
    InvalidAdapter {
        /// The offending file or folder.
        path: PathBuf,
        /// What is wrong.
        reason: String,
        /// What would fix it.
        hint: String,
    },
    /// An input value is wrong.
    #[error("{field}: {message}")]
    InvalidInput {
        /// Dotted field path (`metrics.eval_loss`).
        field: String,
        /// What is wrong.
        message: String,
        /// What would fix it.
        hint: String,
    },
    /// The folder holds no artifact store.
    #[error("no artifact store at {} (no index.sqlite)", root.display())]
    NoStore {
        /// The folder.
        root: PathBuf,
    },
    /// A version, experiment or metric does not exist.
    #[error("{what}")]
    NotFound {
        /// What was looked for, in words.
        what: String,
        /// What would fix it.
        hint: String,
    },
    /// The SQLite index failed.
    #[error("index {}: {source}", path.display())]
    Index {
        /// The index file.
        path: PathBuf,
        /// The cause.
        source: rusqlite::Error,
    },
    /// The index was written by a newer build.
    #[error(
        "index {} has schema version {found}; this build knows versions up to {supported}",
        path.display()
    )]
    SchemaTooNew {
        /// The index file.
        path: PathBuf,
        /// Its schema version.
        found: i64,
        /// The newest this build reads.
        supported: i64,
    },
    /// A file of the adapter changed between hashing and copying.
    #[error("{} changed while it was being stored", path.display())]
    SourceChanged {
        /// The file.
        path: PathBuf,
    },
    /// Another process holds the store for longer than we were willing to wait.
    #[error("the store at {} is busy ({what}); gave up after {waited_s:.1} s", root.display())]
    Busy {
        /// The store.
        root: PathBuf,
        /// Who holds it, in words.
        what: String,
        /// How long we waited.
        waited_s: f64,
    },
    /// The caller cancelled the work.
    #[error("cancelled by the caller")]
    Cancelled,
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, ArtifactError>;

impl ArtifactError {
    /// An I/O error about `path`.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    pub(crate) fn input(
        field: impl Into<String>,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) -> Self {
        Self::InvalidInput {
            field: field.into(),
            message: message.into(),
            hint: hint.into(),
        }
    }

    pub(crate) fn index(path: impl AsRef<Path>, source: rusqlite::Error) -> Self {
        Self::Index {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }
}

impl From<ArtifactError> for SkillError {
    fn from(err: ArtifactError) -> Self {
        let message = err.to_string();
        match err {
            ArtifactError::Io { path, source } => {
                let mut e = SkillError::io(&path, &source);
                if source.kind() == std::io::ErrorKind::PermissionDenied {
                    e = e.with_hint("check the permissions of the store folder and the adapter");
                }
                e
            }
            ArtifactError::InvalidAdapter { path, hint, .. } => SkillError::invalid_input(message)
                .with_field("adapter_path")
                .with_file(path.display().to_string())
                .with_hint(hint),
            ArtifactError::InvalidInput { field, hint, .. } => {
                let mut e = SkillError::invalid_input(message).with_field(field);
                if !hint.is_empty() {
                    e = e.with_hint(hint);
                }
                e
            }
            ArtifactError::NoStore { root } => SkillError::not_found(message)
                .with_field("store_root")
                .with_file(root.display().to_string())
                .with_hint("store an adapter first, or pass the store folder (--store DIR / store_root)"),
            ArtifactError::NotFound { hint, .. } => {
                let e = SkillError::not_found(message);
                if hint.is_empty() { e } else { e.with_hint(hint) }
            }
            ArtifactError::Index { path, .. } => SkillError::new(ErrorKind::Io, message)
                .with_file(path.display().to_string())
                .with_hint("if the index is damaged, restore index.sqlite from a backup; the blobs are intact"),
            ArtifactError::SchemaTooNew { path, .. } => SkillError::unsupported(message)
                .with_file(path.display().to_string())
                .with_hint("upgrade lora-trainer to open this store"),
            ArtifactError::SourceChanged { path } => SkillError::new(ErrorKind::Io, message)
                .with_field("adapter_path")
                .with_file(path.display().to_string())
                .with_hint("store the adapter after the process writing it has finished"),
            ArtifactError::Busy { .. } => SkillError::new(ErrorKind::Io, message)
                .with_hint("wait for the running store or gc to finish, or raise the wait time"),
            ArtifactError::Cancelled => SkillError::cancelled(),
        }
    }
}
