//! DatasetSkill contract (seed 001 §2), extended by issue 3.
//!
//! Seed 001's field names are kept as they are (`dataset_path`, `format`,
//! `tokenizer_name`, `sample_size` in; `total_samples`, `format_detected`,
//! `has_instruction`, `has_output`, `avg_tokens`, `max_tokens`, `columns`,
//! `duplicates_found` out); everything else is added after them.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::experiment::RecordFormat;

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

impl FileFormat {
    /// The `snake_case` name (`jsonl`, `csv`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Jsonl => "jsonl",
            Self::Json => "json",
            Self::Csv => "csv",
            Self::Parquet => "parquet",
            Self::Hf => "hf",
        }
    }
}

/// A prompt template to render samples with (for the end-of-sequence and mask check).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TemplateChoice {
    /// The Stanford Alpaca prompt (`### Instruction:` / `### Input:` / `### Response:`).
    Alpaca,
    /// ChatML (`<|im_start|>role ... <|im_end|>`).
    Chatml,
    /// Llama 3 instruct headers (`<|start_header_id|>` ... `<|eot_id|>`).
    Llama3,
    /// The model's own `chat_template` from `tokenizer_config.json` (needs `tokenizer_name`).
    Tokenizer,
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
    /// Tokenizer for exact token counts: a tokenizer.json, a model folder or a hub id in the local
    /// Hugging Face cache. Without it, tokens are estimated as characters / 4.
    #[serde(default)]
    pub tokenizer_name: Option<String>,
    /// Rows sampled (seeded, uniformly) for exact token statistics; 0 = every row. All rows are
    /// always counted, checked and de-duplicated, and the characters/4 estimate covers every row.
    #[serde(default = "default_sample_size")]
    pub sample_size: u64,
    /// Also look for near-duplicates (MinHash over word 3-grams with LSH banding; Jaccard ≳ 0.75).
    /// Costs about 150 bytes of memory per row.
    #[serde(default)]
    pub near_duplicates: bool,
    /// Longest accepted record (line) in bytes; longer ones are reported as invalid and skipped.
    #[serde(default = "default_max_record_bytes")]
    pub max_record_bytes: u64,
    /// Render the sampled rows with this template and check prompt/response masks and the final
    /// end-of-sequence token. `tokenizer` needs `tokenizer_name`.
    #[serde(default)]
    pub template: Option<TemplateChoice>,
    /// How many examples of each problem (invalid rows, empty targets, duplicates) to list.
    #[serde(default = "default_max_examples")]
    pub max_examples: u32,
}

fn default_sample_size() -> u64 {
    1000
}

fn default_max_record_bytes() -> u64 {
    32 * 1024 * 1024
}

fn default_max_examples() -> u32 {
    10
}

impl DatasetAnalyzeInput {
    /// An input for `path` with every other field at its default.
    pub fn new(path: impl Into<String>) -> Self {
        Self {
            dataset_path: path.into(),
            format: FileFormat::Auto,
            tokenizer_name: None,
            sample_size: default_sample_size(),
            near_duplicates: false,
            max_record_bytes: default_max_record_bytes(),
            template: None,
            max_examples: default_max_examples(),
        }
    }
}

/// The record layout found in the data (`unknown` when no known layout fits).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum DetectedRecordFormat {
    /// instruction / input / output (or response).
    Alpaca,
    /// `conversations` with from/value turns.
    Sharegpt,
    /// `messages` with role/content turns (OpenAI style).
    Messages,
    /// prompt / completion.
    PromptCompletion,
    /// A single `text` field.
    Text,
    /// A natural-language question and its SQL (question + sql/query, or question + context + answer).
    TextToSql,
    /// None of the above.
    Unknown,
}

impl DetectedRecordFormat {
    /// The `snake_case` name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Alpaca => "alpaca",
            Self::Sharegpt => "sharegpt",
            Self::Messages => "messages",
            Self::PromptCompletion => "prompt_completion",
            Self::Text => "text",
            Self::TextToSql => "text_to_sql",
            Self::Unknown => "unknown",
        }
    }

    /// The spec's record format, `None` for `unknown`.
    pub fn to_record_format(self) -> Option<RecordFormat> {
        Some(match self {
            Self::Alpaca => RecordFormat::Alpaca,
            Self::Sharegpt => RecordFormat::Sharegpt,
            Self::Messages => RecordFormat::Messages,
            Self::PromptCompletion => RecordFormat::PromptCompletion,
            Self::Text => RecordFormat::Text,
            Self::TextToSql => RecordFormat::TextToSql,
            Self::Unknown => return None,
        })
    }
}

/// One row with a problem.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RowIssue {
    /// The file the row is in (relative to `dataset_path` for folders).
    pub file: String,
    /// 1-based record number within the file.
    pub row: u64,
    /// 1-based line within the file, for line-oriented formats (jsonl, csv).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub line: Option<u64>,
    /// What is wrong.
    pub reason: String,
}

/// Which counter produced the token statistics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TokenCounterInfo {
    /// `tokenizer` (exact) or `chars_div_4` (estimate).
    pub kind: String,
    /// Whether the counts are exact tokenizer counts.
    pub exact: bool,
    /// The tokenizer file used, when exact.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer_file: Option<String>,
    /// Rows the statistics cover (all rows, or the seeded sample).
    pub rows_counted: u64,
    /// What is counted, in words.
    pub note: String,
}

/// Token-length percentiles.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
pub struct TokenPercentiles {
    /// Median.
    pub p50: u64,
    /// 95th percentile.
    pub p95: u64,
    /// 99th percentile.
    pub p99: u64,
}

/// One histogram bin: rows with `lo <= tokens < hi`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct HistogramBin {
    /// Inclusive lower bound.
    pub lo: u64,
    /// Exclusive upper bound.
    pub hi: u64,
    /// Rows in the bin.
    pub count: u64,
}

/// A column that some rows lack.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ColumnGap {
    /// The column.
    pub column: String,
    /// Valid rows without it.
    pub rows_missing: u64,
}

/// The result of rendering sampled rows with a template and tokenising them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
pub struct RenderCheck {
    /// The template used (`alpaca`, `chatml`, `llama3`, or the tokenizer's chat template).
    pub template: String,
    /// Rows rendered.
    pub rendered: u64,
    /// Rows that could not be rendered (with reasons in `examples`).
    pub render_errors: u64,
    /// Rendered rows whose last trainable token is an end-of-sequence / end-of-turn token.
    pub ends_with_unmasked_eos: u64,
    /// Rows where the template did not close the last response with a stop token, so the renderer
    /// appended the tokenizer's EOS.
    pub eos_appended: u64,
    /// Rows with no trainable (unmasked) token at all.
    pub zero_trainable: u64,
    /// Trainable tokens / all tokens over the rendered rows (exact when a tokenizer is known,
    /// else by characters).
    pub trained_token_fraction: f64,
    /// Whether the statistics are by tokenizer tokens (true) or characters (false).
    pub by_tokens: bool,
    /// A few problems, and the first rendered sample with its mask (`[[...]]` = trained).
    pub examples: Vec<String>,
}

/// Output `data` of `dataset_analyze` (seed 001 §2).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DatasetProfile {
    /// Number of valid records.
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
    /// Column / field names, in first-seen order.
    pub columns: Vec<String>,
    /// Exact duplicates after whitespace normalisation (rows beyond the first copy).
    pub duplicates_found: u64,

    /// The record layout of most rows.
    pub record_format: DetectedRecordFormat,
    /// Rows per record layout.
    pub record_formats: BTreeMap<String, u64>,
    /// Files read (relative to `dataset_path` for folders).
    pub files: Vec<String>,
    /// Bytes read from disk (or decoded from columnar files).
    pub bytes_read: u64,
    /// Rows that could not be read (bad JSON, invalid UTF-8, wrong field count, oversized line ...).
    pub invalid_rows: u64,
    /// The first invalid rows, with line numbers and reasons.
    pub invalid_examples: Vec<RowIssue>,
    /// Valid rows whose target (output, completion, last assistant turn, SQL, text) is missing.
    pub missing_targets: u64,
    /// Valid rows whose target is present but empty or whitespace only.
    pub empty_targets: u64,
    /// The first rows with a missing or empty target.
    pub target_examples: Vec<RowIssue>,
    /// Columns that some valid rows lack.
    pub column_gaps: Vec<ColumnGap>,
    /// The first duplicates, naming the row they repeat.
    pub duplicate_examples: Vec<RowIssue>,
    /// Near-duplicate rows (MinHash/LSH candidates, beyond exact duplicates), when asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub near_duplicates_found: Option<u64>,
    /// Which counter produced `avg_tokens`, `max_tokens`, the percentiles and the histogram.
    pub token_counter: TokenCounterInfo,
    /// Token-length percentiles.
    pub token_percentiles: TokenPercentiles,
    /// Token-length histogram (power-of-two bins).
    pub token_histogram: Vec<HistogramBin>,
    /// Rendering and mask check, when a template was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub render_check: Option<RenderCheck>,
    /// Things the user should look at, in words.
    pub warnings: Vec<String>,
}
