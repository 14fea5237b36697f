//! `MergeError`: every way a merge or an export can fail, mapped into
//! [`lora_skill::SkillError`] at the skill boundary.

use lora_skill::{ErrorKind, SkillError};
use std::path::{Path, PathBuf};

/// Errors of the merge and export crate.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A JSON file could not be parsed.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser error (with line and column).
        source: serde_json::Error,
    },
    /// A file exists but its content is wrong (bad header, missing field, wrong shape).
    #[error("{file}: {message}")]
    BadFile {
        /// The file.
        file: PathBuf,
        /// What is wrong.
        message: String,
        /// What would fix it.
        hint: Option<String>,
    },
    /// A required file or tensor does not exist.
    #[error("{message}")]
    NotFound {
        /// What is missing.
        message: String,
        /// The file, when there is one.
        file: Option<PathBuf>,
        /// What would fix it.
        hint: Option<String>,
    },
    /// The request is understood but this format or model cannot carry it.
    #[error("{message}")]
    Unsupported {
        /// What is not supported.
        message: String,
        /// What to do instead.
        hint: Option<String>,
    },
    /// An argument is invalid.
    #[error("{field}: {message}")]
    InvalidInput {
        /// The offending argument or field.
        field: String,
        /// What is wrong.
        message: String,
        /// What would fix it.
        hint: Option<String>,
    },
    /// A numerical check failed (validation after merge, round trip).
    #[error("{0}")]
    Check(String),
    /// The caller cancelled.
    #[error("cancelled")]
    Cancelled,
}

/// Shorthand result.
pub type Result<T, E = MergeError> = std::result::Result<T, E>;

impl MergeError {
    /// An I/O error about `path`.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    /// A malformed file.
    pub fn bad_file(file: impl AsRef<Path>, message: impl Into<String>) -> Self {
        Self::BadFile {
            file: file.as_ref().to_path_buf(),
            message: message.into(),
            hint: None,
        }
    }

    /// An unsupported request with a hint.
    pub fn unsupported(message: impl Into<String>, hint: impl Into<String>) -> Self {
        Self::Unsupported {
            message: message.into(),
            hint: Some(hint.into()),
        }
    }

    /// An invalid argument with a hint.
    pub fn invalid(
        field: impl Into<String>,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) -> Self {
        Self::InvalidInput {
            field: field.into(),
            message: message.into(),
            hint: Some(hint.into()),
        }
    }

    /// Adds a hint to errors that carry one.
    pub fn with_hint(mut self, h: impl Into<String>) -> Self {
        match &mut self {
            Self::BadFile { hint, .. }
            | Self::NotFound { hint, .. }
            | Self::Unsupported { hint, .. }
            | Self::InvalidInput { hint, .. } => *hint = Some(h.into()),
            _ => {}
        }
        self
    }
}

impl From<MergeError> for SkillError {
    fn from(e: MergeError) -> Self {
        let msg = e.to_string();
        match e {
            MergeError::Io { path, source } => SkillError::io(&path, &source),
            MergeError::Json { path, source } => SkillError::invalid_input(msg)
                .with_file(path.display().to_string())
                .with_line(source.line() as u64)
                .with_hint("fix the JSON syntax at the reported line"),
            MergeError::BadFile { file, hint, .. } => {
                let mut s = SkillError::invalid_input(msg).with_file(file.display().to_string());
                s.hint = hint;
                s
            }
            MergeError::NotFound { file, hint, .. } => {
                let mut s = SkillError::not_found(msg);
                s.file = file.map(|f| f.display().to_string());
                s.hint = hint;
                s
            }
            MergeError::Unsupported { hint, .. } => {
                let mut s = SkillError::unsupported(msg);
                s.hint = hint;
                s
            }
            MergeError::InvalidInput { field, hint, .. } => {
                let mut s = SkillError::invalid_input(msg).with_field(field);
                s.hint = hint;
                s
            }
            MergeError::Check(_) => SkillError::new(ErrorKind::Backend, msg),
            MergeError::Cancelled => SkillError::cancelled(),
        }
    }
}

/// Reads and parses a JSON file.
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let bytes = std::fs::read(path).map_err(|e| MergeError::io(path, e))?;
    serde_json::from_slice(&bytes).map_err(|source| MergeError::Json {
        path: path.to_path_buf(),
        source,
    })
}
