//! `SkillError`: the one error type that crosses the skill boundary.
//!
//! Library crates keep their own `thiserror` enums and map them into a
//! `SkillError` with a machine-readable [`ErrorKind`], the offending field
//! path and a hint that says what would fix it.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::fmt;

/// What went wrong, for machines (and for the CLI's exit code).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The input is wrong: a bad value, a missing field, a malformed file.
    InvalidInput,
    /// A named thing (file, model, skill, version) does not exist.
    NotFound,
    /// The request is understood but not supported (format, architecture, method).
    Unsupported,
    /// The work would exceed the budget (device-hours, dollars, trials).
    BudgetExceeded,
    /// The compute backend failed (libtorch, a numerical failure).
    Backend,
    /// Reading or writing failed.
    Io,
    /// The caller cancelled the work (Ctrl-C).
    Cancelled,
}

impl ErrorKind {
    /// The kind's `snake_case` name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidInput => "invalid_input",
            Self::NotFound => "not_found",
            Self::Unsupported => "unsupported",
            Self::BudgetExceeded => "budget_exceeded",
            Self::Backend => "backend",
            Self::Io => "io",
            Self::Cancelled => "cancelled",
        }
    }

    /// Whether the error is the user's input (exit code 2) rather than a failed run (exit code 1).
    pub fn is_user_error(self) -> bool {
        matches!(
            self,
            Self::InvalidInput | Self::NotFound | Self::Unsupported
        )
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error reported by a skill.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, thiserror::Error)]
pub struct SkillError {
    /// Machine-readable kind.
    pub kind: ErrorKind,
    /// What happened, in one sentence.
    pub message: String,
    /// The offending field, as a dotted path (`trial_config.lora_rank`), when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// The file the error is about, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// The 1-based line in `file`, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<u64>,
    /// What would fix it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

impl SkillError {
    /// A new error of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            field: None,
            file: None,
            line: None,
            hint: None,
        }
    }

    /// Shorthand for [`ErrorKind::InvalidInput`].
    pub fn invalid_input(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidInput, message)
    }

    /// Shorthand for [`ErrorKind::NotFound`].
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    /// Shorthand for [`ErrorKind::Unsupported`].
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unsupported, message)
    }

    /// Shorthand for [`ErrorKind::Backend`].
    pub fn backend(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Backend, message)
    }

    /// Shorthand for [`ErrorKind::Cancelled`].
    pub fn cancelled() -> Self {
        Self::new(ErrorKind::Cancelled, "cancelled by the caller")
    }

    /// An I/O error about `path`.
    pub fn io(path: impl AsRef<std::path::Path>, err: &std::io::Error) -> Self {
        let path = path.as_ref();
        let kind = if err.kind() == std::io::ErrorKind::NotFound {
            ErrorKind::NotFound
        } else {
            ErrorKind::Io
        };
        let mut e = Self::new(kind, format!("{}: {err}", path.display()));
        e.file = Some(path.display().to_string());
        if err.kind() == std::io::ErrorKind::StorageFull {
            e.hint = Some("the disk is full: free space or point the output elsewhere".into());
        }
        e
    }

    /// Sets the field path.
    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    /// Sets the file.
    pub fn with_file(mut self, file: impl Into<String>) -> Self {
        self.file = Some(file.into());
        self
    }

    /// Sets the line.
    pub fn with_line(mut self, line: u64) -> Self {
        self.line = Some(line);
        self
    }

    /// Sets the hint.
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Prefixes the field path with `prefix` (`lora_rank` becomes `trial_config.lora_rank`).
    pub fn nested_in(mut self, prefix: &str) -> Self {
        self.field = Some(match self.field.take() {
            Some(f) if !f.is_empty() => format!("{prefix}.{f}"),
            _ => prefix.to_string(),
        });
        self
    }
}

impl fmt::Display for SkillError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.file, self.line) {
            (Some(file), Some(line)) => write!(f, "{file}:{line}: ")?,
            (Some(file), None) if !self.message.contains(file.as_str()) => write!(f, "{file}: ")?,
            _ => {}
        }
        if let Some(field) = &self.field {
            write!(f, "{field}: ")?;
        }
        write!(f, "{}", self.message)?;
        if let Some(hint) = &self.hint {
            write!(f, " (hint: {hint})")?;
        }
        Ok(())
    }
}

impl From<std::io::Error> for SkillError {
    fn from(err: std::io::Error) -> Self {
        let kind = match err.kind() {
            std::io::ErrorKind::NotFound => ErrorKind::NotFound,
            _ => ErrorKind::Io,
        };
        Self::new(kind, err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_file_line_field_and_hint() {
        let e = SkillError::invalid_input("must be at least 1 (got -4)")
            .with_field("config.lora_rank")
            .with_file("exp.yaml")
            .with_line(12)
            .with_hint("use a rank such as 8, 16 or 32");
        assert_eq!(
            e.to_string(),
            "exp.yaml:12: config.lora_rank: must be at least 1 (got -4) (hint: use a rank such as 8, 16 or 32)"
        );
    }

    #[test]
    fn serialises_kind_in_snake_case() {
        let e = SkillError::new(ErrorKind::BudgetExceeded, "over");
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["kind"], "budget_exceeded");
        assert!(v.get("field").is_none());
    }

    #[test]
    fn nested_in_prefixes_paths() {
        let e = SkillError::invalid_input("x").with_field("lora_rank");
        assert_eq!(
            e.nested_in("trial_config").field.as_deref(),
            Some("trial_config.lora_rank")
        );
        let e = SkillError::invalid_input("x");
        assert_eq!(e.nested_in("input").field.as_deref(), Some("input"));
    }

    #[test]
    fn user_errors_are_distinguished() {
        assert!(ErrorKind::InvalidInput.is_user_error());
        assert!(!ErrorKind::Backend.is_user_error());
        assert!(!ErrorKind::Cancelled.is_user_error());
    }
}
