//! `Issue` and `SpecError`: validation findings that name the field, the file
//! and the line, and say what would fix them.

use lora_skill::{ErrorKind, SkillError};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::fmt;

/// One validation finding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Issue {
    /// Dotted path of the offending field (`config.lora_rank`); empty for the whole document.
    pub path: String,
    /// What is wrong.
    pub message: String,
    /// What would fix it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    /// 1-based line in the source file, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<u64>,
    /// 1-based column in the source file, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub column: Option<u64>,
}

impl Issue {
    /// A finding about `path`.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
            hint: None,
            line: None,
            column: None,
        }
    }

    /// Adds a hint.
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Prefixes the path (`lora_rank` under `config` becomes `config.lora_rank`).
    pub fn under(mut self, prefix: &str) -> Self {
        self.path = if self.path.is_empty() {
            prefix.to_string()
        } else if self.path.starts_with('[') {
            format!("{prefix}{}", self.path)
        } else {
            format!("{prefix}.{}", self.path)
        };
        self
    }
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(line) = self.line {
            write!(f, "line {line}: ")?;
        }
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        write!(f, "{}", self.message)?;
        if let Some(h) = &self.hint {
            write!(f, " (hint: {h})")?;
        }
        Ok(())
    }
}

/// A document that failed to load or validate: every finding, with the file.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct SpecError {
    /// The file, or `<input>` for text that came from elsewhere.
    pub file: String,
    /// The findings, in document order where known.
    pub issues: Vec<Issue>,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, issue) in self.issues.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}", self.file)?;
            if let Some(line) = issue.line {
                write!(f, ":{line}")?;
                if let Some(col) = issue.column {
                    write!(f, ":{col}")?;
                }
            }
            write!(f, ": ")?;
            if !issue.path.is_empty() {
                write!(f, "{}: ", issue.path)?;
            }
            write!(f, "{}", issue.message)?;
            if let Some(h) = &issue.hint {
                write!(f, " (hint: {h})")?;
            }
        }
        Ok(())
    }
}

impl From<SpecError> for SkillError {
    fn from(e: SpecError) -> Self {
        match e.issues.as_slice() {
            [one] => {
                let mut err =
                    SkillError::new(ErrorKind::InvalidInput, one.message.clone()).with_file(e.file);
                if !one.path.is_empty() {
                    err = err.with_field(one.path.clone());
                }
                if let Some(l) = one.line {
                    err = err.with_line(l);
                }
                if let Some(h) = &one.hint {
                    err = err.with_hint(h.clone());
                }
                err
            }
            many => {
                let list: Vec<String> = many.iter().map(|i| i.to_string()).collect();
                SkillError::new(
                    ErrorKind::InvalidInput,
                    format!("{} problems: {}", many.len(), list.join("; ")),
                )
                .with_file(e.file)
            }
        }
    }
}
