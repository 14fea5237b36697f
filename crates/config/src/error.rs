//! `ConfigError`: everything that can go wrong in this crate, mapped into
//! [`lora_skill::SkillError`] at the skill boundary.

use lora_skill::{ErrorKind, SkillError};

/// An error of the config crate.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The model could not be found locally, in the HF cache or in the built-in table.
    #[error("model `{name}` not found: {detail}")]
    ModelNotFound {
        /// What was asked for.
        name: String,
        /// Where we looked.
        detail: String,
        /// Close names from the built-in table.
        suggestions: Vec<String>,
    },
    /// A config.json that cannot be read or lacks a needed field.
    #[error("{file}: {message}")]
    BadModelConfig {
        /// The file.
        file: String,
        /// The offending field, when there is one.
        field: Option<String>,
        /// What is wrong.
        message: String,
    },
    /// An architecture we cannot describe.
    #[error("unsupported architecture `{model_type}` in {file}")]
    UnsupportedArchitecture {
        /// config.json's `model_type`.
        model_type: String,
        /// The file.
        file: String,
    },
    /// A value in a request is out of range.
    #[error("{field}: {message}")]
    InvalidInput {
        /// The offending field.
        field: String,
        /// What is wrong.
        message: String,
        /// What would fix it.
        hint: String,
    },
    /// An unknown device name.
    #[error("unknown device `{name}`")]
    UnknownDevice {
        /// What was asked for.
        name: String,
        /// Known names.
        known: Vec<String>,
    },
    /// Reading a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
}

impl From<ConfigError> for SkillError {
    fn from(e: ConfigError) -> Self {
        let message = e.to_string();
        match e {
            ConfigError::ModelNotFound { suggestions, .. } => {
                let hint = if suggestions.is_empty() {
                    "give a local Hugging Face model folder (with config.json), a hub id that is in the \
                     local HF cache, or a model from `lora-trainer config models`"
                        .to_string()
                } else {
                    format!("did you mean {}?", suggestions.join(", "))
                };
                SkillError::new(ErrorKind::NotFound, message)
                    .with_field("base_model")
                    .with_hint(hint)
            }
            ConfigError::BadModelConfig { file, field, .. } => {
                let mut err = SkillError::new(ErrorKind::InvalidInput, message)
                    .with_file(file)
                    .with_hint(
                        "the folder's config.json must be a Hugging Face transformers config",
                    );
                if let Some(f) = field {
                    err = err.with_field(f);
                }
                err
            }
            ConfigError::UnsupportedArchitecture { file, .. } => SkillError::new(
                ErrorKind::Unsupported,
                message,
            )
            .with_file(file)
            .with_field("base_model")
            .with_hint(
                "supported families: llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text, \
                         phi, phi3, gpt2",
            ),
            ConfigError::InvalidInput { field, hint, .. } => {
                SkillError::new(ErrorKind::InvalidInput, message)
                    .with_field(field)
                    .with_hint(hint)
            }
            ConfigError::UnknownDevice { known, .. } => {
                SkillError::new(ErrorKind::InvalidInput, message)
                    .with_field("gpu_type")
                    .with_hint(format!("one of: {}", known.join(", ")))
            }
            ConfigError::Io { path, source } => SkillError::io(path, &source),
        }
    }
}
