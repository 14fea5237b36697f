//! The crate's error type and its mapping into [`lora_skill::SkillError`].

use std::path::{Path, PathBuf};

use lora_skill::{ErrorKind, SkillError};

/// Everything that can go wrong while reading, profiling, rendering or splitting a dataset.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The dataset path does not exist.
    #[error("{}: no such file or folder", path.display())]
    NotFound {
        /// The path.
        path: PathBuf,
    },
    /// The data is unusable as a whole (empty file, no valid row, mixed folder ...).
    #[error("{}{}: {message}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    Invalid {
        /// The file or folder.
        path: PathBuf,
        /// The 1-based line, when known.
        line: Option<u64>,
        /// What is wrong.
        message: String,
        /// What would fix it.
        hint: String,
    },
    /// The file format or a column type is not supported.
    #[error("{}: {message}", path.display())]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// What is not supported.
        message: String,
        /// What to do instead.
        hint: String,
    },
    /// A tokenizer could not be found or loaded.
    #[error("tokenizer {name:?}: {message}")]
    Tokenizer {
        /// The tokenizer name as given.
        name: String,
        /// What went wrong.
        message: String,
        /// What would fix it.
        hint: String,
    },
    /// A prompt template could not be compiled or rendered.
    #[error("template {template}: {message}")]
    Template {
        /// Which template.
        template: String,
        /// What went wrong.
        message: String,
        /// What would fix it.
        hint: String,
    },
    /// A sample cannot be turned into a prompt/response pair.
    #[error("sample: {message}")]
    Sample {
        /// What is wrong with the sample.
        message: String,
        /// What would fix it.
        hint: String,
    },
    /// An option has a bad value.
    #[error("{field}: {message}")]
    Option {
        /// The option's name.
        field: String,
        /// What is wrong.
        message: String,
        /// What would fix it.
        hint: String,
    },
    /// The caller cancelled the work.
    #[error("cancelled")]
    Cancelled,
}

/// Shorthand result.
pub type Result<T, E = DatasetError> = std::result::Result<T, E>;

impl DatasetError {
    /// An I/O error about `path` (a missing file becomes [`DatasetError::NotFound`]).
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        let path = path.as_ref().to_path_buf();
        if source.kind() == std::io::ErrorKind::NotFound {
            Self::NotFound { path }
        } else {
            Self::Io { path, source }
        }
    }

    /// An invalid-data error.
    pub fn invalid(
        path: impl AsRef<Path>,
        line: Option<u64>,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) -> Self {
        Self::Invalid {
            path: path.as_ref().to_path_buf(),
            line,
            message: message.into(),
            hint: hint.into(),
        }
    }

    /// An unsupported-format error.
    pub fn unsupported(
        path: impl AsRef<Path>,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) -> Self {
        Self::Unsupported {
            path: path.as_ref().to_path_buf(),
            message: message.into(),
            hint: hint.into(),
        }
    }

    /// A bad option value.
    pub fn option(
        field: impl Into<String>,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) -> Self {
        Self::Option {
            field: field.into(),
            message: message.into(),
            hint: hint.into(),
        }
    }

    /// A template error.
    pub fn template(
        template: impl Into<String>,
        message: impl Into<String>,
        hint: impl Into<String>,
    ) -> Self {
        Self::Template {
            template: template.into(),
            message: message.into(),
            hint: hint.into(),
        }
    }

    /// A sample error.
    pub fn sample(message: impl Into<String>, hint: impl Into<String>) -> Self {
        Self::Sample {
            message: message.into(),
            hint: hint.into(),
        }
    }
}

impl From<DatasetError> for SkillError {
    fn from(e: DatasetError) -> Self {
        let message = e.to_string();
        match e {
            DatasetError::Io { path, source } => SkillError::io(&path, &source),
            DatasetError::NotFound { path } => SkillError::not_found(message)
                .with_file(path.display().to_string())
                .with_field("dataset_path")
                .with_hint(
                    "check the path; relative paths are resolved against the working directory",
                ),
            DatasetError::Invalid {
                path, line, hint, ..
            } => {
                let mut s = SkillError::invalid_input(message)
                    .with_file(path.display().to_string())
                    .with_hint(hint);
                if let Some(l) = line {
                    s = s.with_line(l);
                }
                s
            }
            DatasetError::Unsupported { path, hint, .. } => SkillError::unsupported(message)
                .with_file(path.display().to_string())
                .with_field("format")
                .with_hint(hint),
            DatasetError::Tokenizer { hint, .. } => SkillError::new(ErrorKind::NotFound, message)
                .with_field("tokenizer_name")
                .with_hint(hint),
            DatasetError::Template { hint, .. } => SkillError::invalid_input(message)
                .with_field("template")
                .with_hint(hint),
            DatasetError::Sample { hint, .. } => SkillError::invalid_input(message).with_hint(hint),
            DatasetError::Option { field, hint, .. } => SkillError::invalid_input(message)
                .with_field(field)
                .with_hint(hint),
            DatasetError::Cancelled => SkillError::cancelled(),
        }
    }
}
