//! `EngineError`: the engine crate's one error type, and its mapping into
//! [`lora_skill::SkillError`] at the skill boundary.

use lora_skill::SkillError;
use std::path::{Path, PathBuf};

/// Everything that can go wrong in the engine.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A JSON file (config.json, tokenizer_config.json, an index) is malformed.
    #[error("{}:{line}:{column}: {message}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What serde said.
        message: String,
    },
    /// A config value is wrong or missing.
    #[error("{}: field `{field}`: {message}", path.display())]
    Config {
        /// The config file (or a description of the source).
        path: PathBuf,
        /// The dotted field path.
        field: String,
        /// What is wrong.
        message: String,
        /// What would fix it.
        hint: Option<String>,
    },
    /// The weights do not match the model: tensors missing, unused, or of the wrong shape.
    #[error("weights in {} do not match the model: {summary}", path.display())]
    Weights {
        /// The model folder or file.
        path: PathBuf,
        /// Names of the offending tensors, grouped.
        summary: String,
    },
    /// A file is not in the expected format (safetensors, GGUF, tokenizer).
    #[error("{}: {message}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong, with the byte offset or entry when known.
        message: String,
    },
    /// The request is understood but not supported.
    #[error("unsupported: {what}")]
    Unsupported {
        /// What is not supported.
        what: String,
        /// What to do instead.
        hint: Option<String>,
    },
    /// A named thing does not exist (model folder, hub id in the cache).
    #[error("not found: {what}")]
    NotFound {
        /// What was looked for, and where.
        what: String,
        /// How to get it.
        hint: Option<String>,
    },
    /// A caller-supplied argument is invalid (a generation option, a tensor shape).
    #[error("invalid argument `{field}`: {message}")]
    InvalidArgument {
        /// The argument.
        field: String,
        /// What is wrong.
        message: String,
    },
    /// libtorch failed.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// The engine's result type.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;

impl EngineError {
    /// An I/O error about `path`.
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.as_ref().to_path_buf(),
            source,
        }
    }

    /// A JSON error about `path`.
    pub fn json(path: impl AsRef<Path>, err: &serde_json::Error) -> Self {
        Self::Json {
            path: path.as_ref().to_path_buf(),
            line: err.line(),
            column: err.column(),
            message: err.to_string(),
        }
    }

    /// A format error about `path`.
    pub fn format(path: impl AsRef<Path>, message: impl Into<String>) -> Self {
        Self::Format {
            path: path.as_ref().to_path_buf(),
            message: message.into(),
        }
    }

    /// An unsupported request.
    pub fn unsupported(what: impl Into<String>, hint: Option<&str>) -> Self {
        Self::Unsupported {
            what: what.into(),
            hint: hint.map(str::to_owned),
        }
    }

    /// An invalid caller argument.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl From<EngineError> for SkillError {
    fn from(e: EngineError) -> Self {
        let message = e.to_string();
        match e {
            EngineError::Io { path, source } => SkillError::io(&path, &source),
            EngineError::Json { path, line, .. } => SkillError::invalid_input(message)
                .with_file(path.display().to_string())
                .with_line(line as u64)
                .with_hint("fix the JSON syntax or field type at that line"),
            EngineError::Config {
                path, field, hint, ..
            } => {
                let mut err = SkillError::invalid_input(message)
                    .with_file(path.display().to_string())
                    .with_field(field);
                if let Some(h) = hint {
                    err = err.with_hint(h);
                }
                err
            }
            EngineError::Weights { path, .. } => SkillError::invalid_input(message)
                .with_file(path.display().to_string())
                .with_hint(
                    "the checkpoint and config.json disagree: use the config that was saved with the weights",
                ),
            EngineError::Format { path, .. } => {
                SkillError::invalid_input(message).with_file(path.display().to_string())
            }
            EngineError::Unsupported { hint, .. } => {
                let mut err = SkillError::unsupported(message);
                if let Some(h) = hint {
                    err = err.with_hint(h);
                }
                err
            }
            EngineError::NotFound { hint, .. } => {
                let mut err = SkillError::not_found(message);
                if let Some(h) = hint {
                    err = err.with_hint(h);
                }
                err
            }
            EngineError::InvalidArgument { field, .. } => {
                SkillError::invalid_input(message).with_field(field)
            }
            EngineError::Torch(_) => SkillError::backend(message),
        }
    }
}
