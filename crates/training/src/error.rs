//! The training crate's error type and its mapping into [`lora_skill::SkillError`].

use lora_skill::{ErrorKind, SkillError};
use std::path::PathBuf;

/// Everything that can go wrong while preparing data, training or checkpointing.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A configuration value is unusable.
    #[error("{field}: {message}")]
    Config {
        /// The offending field (dotted path).
        field: String,
        /// What is wrong.
        message: String,
        /// How to fix it.
        hint: String,
    },
    /// The training data cannot be used.
    #[error("{file}{}: {message}", line.map(|l| format!(":{l}")).unwrap_or_default())]
    Data {
        /// The data file.
        file: PathBuf,
        /// 1-based line, when known.
        line: Option<u64>,
        /// What is wrong.
        message: String,
        /// How to fix it.
        hint: String,
    },
    /// A checkpoint is missing, damaged or belongs to another configuration.
    #[error("checkpoint {path}: {message}")]
    Checkpoint {
        /// Checkpoint folder.
        path: PathBuf,
        /// What is wrong.
        message: String,
        /// How to fix it.
        hint: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// libtorch failed.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
    /// A model or adapter operation of the engine failed.
    #[error("{0}")]
    Engine(String),
    /// The engine reported an error (model loading, adapters).
    #[error(transparent)]
    EngineError(#[from] lora_engine::EngineError),
    /// The dataset crate could not read or render the data.
    #[error(transparent)]
    Dataset(#[from] lora_dataset::DatasetError),
    /// The caller cancelled the run.
    #[error("cancelled")]
    Cancelled,
}

impl TrainError {
    /// A configuration error.
    pub fn config(field: &str, message: impl Into<String>, hint: impl Into<String>) -> Self {
        Self::Config {
            field: field.into(),
            message: message.into(),
            hint: hint.into(),
        }
    }

    /// A data error at `file` (and `line` when known).
    pub fn data(
        file: impl Into<PathBuf>,
        line: Option<u64>,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) -> Self {
        Self::Data {
            file: file.into(),
            line,
            message: message.into(),
            hint: hint.into(),
        }
    }

    /// A checkpoint error.
    pub fn checkpoint(
        path: impl Into<PathBuf>,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) -> Self {
        Self::Checkpoint {
            path: path.into(),
            message: message.into(),
            hint: hint.into(),
        }
    }

    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

impl From<TrainError> for SkillError {
    fn from(e: TrainError) -> Self {
        match e {
            TrainError::Config {
                field,
                message,
                hint,
            } => SkillError::invalid_input(message)
                .with_field(field)
                .with_hint(hint),
            TrainError::Data {
                file,
                line,
                message,
                hint,
            } => {
                let mut err = SkillError::invalid_input(message)
                    .with_file(file.display().to_string())
                    .with_hint(hint);
                if let Some(l) = line {
                    err = err.with_line(l);
                }
                err
            }
            TrainError::Checkpoint {
                path,
                message,
                hint,
            } => SkillError::invalid_input(message)
                .with_file(path.display().to_string())
                .with_hint(hint),
            TrainError::Io { path, source } => SkillError::io(&path, &source),
            TrainError::Torch(e) => SkillError::new(ErrorKind::Backend, e.to_string()),
            TrainError::Engine(m) => SkillError::backend(m),
            TrainError::EngineError(e) => SkillError::from(e),
            TrainError::Dataset(e) => SkillError::from(e),
            TrainError::Cancelled => SkillError::cancelled(),
        }
    }
}

/// The crate's result type.
pub type Result<T, E = TrainError> = std::result::Result<T, E>;
