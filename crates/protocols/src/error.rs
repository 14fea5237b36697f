//! The protocols' error type, mapped into `SkillError` at the skill boundary.

use std::path::PathBuf;

use lora_skill::SkillError;

/// Errors of the protocol library.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// An input field is wrong.
    #[error("{field}: {message}")]
    Invalid {
        /// Dotted path of the field.
        field: String,
        /// What is wrong.
        message: String,
        /// How to fix it.
        hint: Option<String>,
    },
    /// The request is understood but this build cannot do it.
    #[error("{field}: {message}")]
    Unsupported {
        /// The field.
        field: String,
        /// What is not supported.
        message: String,
        /// What to do instead.
        hint: Option<String>,
    },
    /// A file is malformed.
    #[error("{}:{line}: {message}", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: u64,
        /// What is wrong.
        message: String,
    },
    /// Reading or writing failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Drawing the plot failed.
    #[error("plot {}: {message}", path.display())]
    Plot {
        /// The SVG file.
        path: PathBuf,
        /// What failed.
        message: String,
    },
}

impl ProtocolError {
    /// An invalid-input error.
    pub fn invalid(
        field: impl Into<String>,
        message: impl Into<String>,
        hint: Option<String>,
    ) -> Self {
        Self::Invalid {
            field: field.into(),
            message: message.into(),
            hint,
        }
    }

    /// An I/O error about `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }
}

impl From<ProtocolError> for SkillError {
    fn from(e: ProtocolError) -> Self {
        match e {
            ProtocolError::Invalid {
                field,
                message,
                hint,
            } => {
                let s = SkillError::invalid_input(message).with_field(field);
                match hint {
                    Some(h) => s.with_hint(h),
                    None => s,
                }
            }
            ProtocolError::Unsupported {
                field,
                message,
                hint,
            } => {
                let s = SkillError::unsupported(message).with_field(field);
                match hint {
                    Some(h) => s.with_hint(h),
                    None => s,
                }
            }
            ProtocolError::Malformed {
                path,
                line,
                message,
            } => SkillError::invalid_input(message)
                .with_file(path.display().to_string())
                .with_line(line)
                .with_hint("each line of a JSONL file must be one JSON object"),
            ProtocolError::Io { path, source } => SkillError::io(&path, &source),
            ProtocolError::Plot { path, message } => {
                SkillError::backend(message).with_file(path.display().to_string())
            }
        }
    }
}
