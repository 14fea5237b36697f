//! Seed 001's `StepResult`: what every skill returns.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The result of one skill call (seed 001).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema, PartialEq)]
pub struct StepResult<T> {
    /// The skill's typed output.
    pub data: T,
    /// Paths of the files or folders the skill produced (adapters, merged models, reports).
    #[serde(default)]
    pub artifacts: Vec<String>,
    /// A human-readable log of what happened.
    #[serde(default)]
    pub output_text: String,
    /// Free-form facts about the run (timings, counts, ids).
    #[serde(default)]
    pub metadata: Map<String, Value>,
}

impl<T> StepResult<T> {
    /// A result with `data` and nothing else.
    pub fn new(data: T) -> Self {
        Self {
            data,
            artifacts: Vec::new(),
            output_text: String::new(),
            metadata: Map::new(),
        }
    }

    /// Adds an artifact path.
    pub fn with_artifact(mut self, path: impl Into<String>) -> Self {
        self.artifacts.push(path.into());
        self
    }

    /// Sets the human-readable log.
    pub fn with_text(mut self, text: impl Into<String>) -> Self {
        self.output_text = text.into();
        self
    }

    /// Adds one metadata entry.
    pub fn with_meta(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// Maps the data, keeping everything else.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> StepResult<U> {
        StepResult {
            data: f(self.data),
            artifacts: self.artifacts,
            output_text: self.output_text,
            metadata: self.metadata,
        }
    }
}
