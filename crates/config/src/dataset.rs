//! What the estimates need from a DatasetSkill profile, read leniently from
//! its JSON (seed 001 §2 fields plus the percentiles and row checks the
//! DatasetSkill adds), so an empty or partial profile still works.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::model::Modality;

/// The parts of a dataset profile the config skill uses.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DatasetInfo {
    /// Valid records.
    pub total_samples: Option<u64>,
    /// Mean tokens per record.
    pub avg_tokens: Option<f64>,
    /// Longest record in tokens.
    pub max_tokens: Option<u64>,
    /// 95th percentile of tokens per record.
    pub p95_tokens: Option<u64>,
    /// 99th percentile of tokens per record.
    pub p99_tokens: Option<u64>,
    /// Whether token counts come from the model's tokenizer (else characters / 4).
    pub exact_tokens: bool,
    /// An `instruction` field is present.
    pub has_instruction: bool,
    /// An `output` field is present.
    pub has_output: bool,
    /// Column names.
    pub columns: Vec<String>,
    /// Exact duplicates.
    pub duplicates: u64,
    /// Detected record layout (`alpaca`, `messages`, `text`, ...).
    pub record_format: Option<String>,
    /// Rows that could not be read.
    pub invalid_rows: u64,
    /// Rows whose target is missing or empty.
    pub bad_targets: u64,
    /// Rendered rows with no trainable token (from the render check).
    pub zero_trainable: u64,
    /// Rendered rows, and how many end with an unmasked EOS (from the render check).
    pub eos_check: Option<(u64, u64)>,
}

impl DatasetInfo {
    /// Reads a `dataset_analyze` output (or any object with some of its fields).
    pub fn from_profile(v: &Value) -> Self {
        let u = |k: &str| v.get(k).and_then(Value::as_u64);
        let pct = |k: &str| {
            v.get("token_percentiles")
                .and_then(|p| p.get(k))
                .and_then(Value::as_u64)
        };
        let render = v.get("render_check");
        let ru = |k: &str| render.and_then(|r| r.get(k)).and_then(Value::as_u64);
        Self {
            total_samples: u("total_samples"),
            avg_tokens: v.get("avg_tokens").and_then(Value::as_f64),
            max_tokens: u("max_tokens"),
            p95_tokens: pct("p95"),
            p99_tokens: pct("p99"),
            exact_tokens: v
                .get("token_counter")
                .and_then(|t| t.get("exact"))
                .and_then(Value::as_bool)
                .unwrap_or(false),
            has_instruction: v
                .get("has_instruction")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            has_output: v
                .get("has_output")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            columns: v
                .get("columns")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_default(),
            duplicates: u("duplicates_found").unwrap_or(0),
            record_format: v
                .get("record_format")
                .and_then(Value::as_str)
                .map(String::from),
            invalid_rows: u("invalid_rows").unwrap_or(0),
            bad_targets: u("missing_targets").unwrap_or(0) + u("empty_targets").unwrap_or(0),
            zero_trainable: ru("zero_trainable").unwrap_or(0),
            eos_check: ru("rendered").map(|r| (r, ru("ends_with_unmasked_eos").unwrap_or(0))),
        }
    }

    /// Whether nothing is known about the data.
    pub fn is_unknown(&self) -> bool {
        self.total_samples.is_none() && self.avg_tokens.is_none() && self.columns.is_empty()
    }

    /// The modality the columns suggest: images or audio next to text make it multimodal.
    pub fn modality(&self) -> Modality {
        let has = |names: &[&str]| {
            self.columns
                .iter()
                .any(|c| names.iter().any(|n| c.eq_ignore_ascii_case(n)))
        };
        let image = has(&["image", "images", "pixel_values", "image_path"]);
        let audio = has(&["audio", "audio_path", "speech"]);
        let video = has(&["video", "video_path"]);
        let kinds = [image, audio, video].iter().filter(|b| **b).count();
        let text = self.columns.is_empty()
            || self.columns.len() > kinds
            || self
                .record_format
                .as_deref()
                .is_some_and(|f| f != "unknown");
        match (kinds, text) {
            (0, _) => Modality::Text,
            (1, false) if image => Modality::Image,
            (1, false) if audio => Modality::Audio,
            (1, false) => Modality::Video,
            _ => Modality::Multimodal,
        }
    }

    /// Whether records carry a separate target (instruction/output, prompt/completion, chat turns, SQL).
    pub fn has_target(&self) -> bool {
        if self.has_output {
            return true;
        }
        match self.record_format.as_deref() {
            Some("alpaca" | "sharegpt" | "messages" | "prompt_completion" | "text_to_sql") => true,
            Some(_) => false,
            None => self.columns.iter().any(|c| {
                [
                    "output",
                    "response",
                    "completion",
                    "answer",
                    "messages",
                    "conversations",
                    "sql",
                ]
                .contains(&c.as_str())
            }),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests: a panic is the failure report.
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_seed_fields_and_additions() {
        let d = DatasetInfo::from_profile(&json!({
            "total_samples": 1200, "avg_tokens": 210.5, "max_tokens": 3000,
            "columns": ["instruction", "input", "output"], "has_instruction": true, "has_output": true,
            "duplicates_found": 3, "record_format": "alpaca", "invalid_rows": 2,
            "missing_targets": 1, "empty_targets": 4,
            "token_percentiles": {"p50": 180, "p95": 700, "p99": 1500},
            "token_counter": {"kind": "tokenizer", "exact": true},
            "render_check": {"rendered": 100, "ends_with_unmasked_eos": 97, "zero_trainable": 1}
        }));
        assert_eq!(d.total_samples, Some(1200));
        assert_eq!((d.p95_tokens, d.p99_tokens), (Some(700), Some(1500)));
        assert_eq!(d.bad_targets, 5);
        assert_eq!(d.eos_check, Some((100, 97)));
        assert!(d.exact_tokens && d.has_target());
        assert_eq!(d.modality(), Modality::Text);
        assert!(DatasetInfo::from_profile(&json!({})).is_unknown());
        let img = DatasetInfo::from_profile(&json!({"columns": ["image", "caption"]}));
        assert_eq!(img.modality(), Modality::Multimodal);
        let img = DatasetInfo::from_profile(&json!({"columns": ["image"]}));
        assert_eq!(img.modality(), Modality::Image);
        let raw = DatasetInfo::from_profile(&json!({"columns": ["text"], "record_format": "text"}));
        assert!(!raw.has_target());
    }
}
