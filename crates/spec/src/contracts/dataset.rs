//! DatasetSkill contract (seed 001 §2).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// File format of a dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum FileFormat {
    /// Decide by extension and content.
    #[default]
    Auto,
    /// One JSON object per line.
    Jsonl,
    /// A JSON array of objects.
    Json,
    /// Comma-separated values with a header row.
    Csv,
    /// Apache Parquet.
    Parquet,
    /// A folder written by `datasets.save_to_disk`, or a hub-style folder of shards.
    Hf,
}

/// Input of `dataset_analyze` (seed 001 `DatasetAnalyzeInput`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DatasetAnalyzeInput {
    /// Path of the dataset file or folder.
    pub dataset_path: String,
    /// File format (`auto` decides by extension and content).
    #[serde(default)]
    pub format: FileFormat,
    /// Tokenizer for exact token counts: a tokenizer.json, a model folder or a hub id in the local cache.
    #[serde(default)]
    pub tokenizer_name: Option<String>,
    /// Rows sampled for token statistics (all rows are counted and de-duplicated).
    #[serde(default = "default_sample_size")]
    pub sample_size: u64,
}

fn default_sample_size() -> u64 {
    1000
}

/// Output `data` of `dataset_analyze` (seed 001 §2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DatasetProfile {
    /// Number of records.
    pub total_samples: u64,
    /// jsonl / json / csv / parquet / hf.
    pub format_detected: String,
    /// Whether an `instruction` field is present.
    pub has_instruction: bool,
    /// Whether an `output` field is present.
    pub has_output: bool,
    /// Mean length in tokens (see `token_counter`).
    pub avg_tokens: f64,
    /// Longest record in tokens.
    pub max_tokens: u64,
    /// Column / field names.
    pub columns: Vec<String>,
    /// Exact duplicates after whitespace normalisation.
    pub duplicates_found: u64,
}
