//! Training data: read rows with the dataset crate (jsonl, json, csv,
//! parquet, Hugging Face folders), render them with its prompt renderer
//! (alpaca, ChatML, Llama 3 or the model's own chat template), tokenise, and
//! turn the renderer's response spans into per-token training masks.
//!
//! The prompt is masked from the renderer's spans, never from template
//! keywords (pain point 6); samples with no trainable token left after
//! truncation are dropped and counted, and the fraction of trained tokens is
//! reported.

use std::path::{Path, PathBuf};

use lora_dataset::render::{Renderer, Sample};
use lora_dataset::source::{self, ReadOptions, RowCtx, RowSink};
use lora_spec::contracts::dataset::{FileFormat, TemplateChoice};
use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;

use crate::batch::TokenizedSample;
use crate::error::{Result, TrainError};

/// How samples are rendered and cut.
#[derive(Debug, Clone, PartialEq)]
pub struct DataOptions {
    /// `auto` (the model's chat template, else alpaca), `alpaca`, `chatml`, `llama3`, `model`.
    pub template: String,
    /// Truncation length in tokens.
    pub max_seq_length: usize,
    /// Train on prompt tokens too.
    pub train_on_inputs: bool,
}

/// Tokenised samples and what happened on the way.
#[derive(Debug, Clone)]
pub struct PreparedData {
    /// The samples kept.
    pub samples: Vec<TokenizedSample>,
    /// Rows read.
    pub rows: usize,
    /// Samples cut at `max_seq_length`.
    pub truncated: usize,
    /// Samples dropped because no trainable token was left.
    pub dropped_no_targets: usize,
    /// Trained tokens / all tokens of the kept samples.
    pub trained_fraction: f64,
    /// Kept samples whose last trained token is a stop token.
    pub ends_with_eos: usize,
    /// sha256 of the data file bytes (part of the checkpoint's config hash).
    pub sha256: String,
    /// The template used.
    pub template: String,
}

/// A model folder's tokenizer and renderer, loaded once.
pub struct TextPipeline {
    /// The tokenizer (`tokenizer.json`).
    pub tokenizer: Tokenizer,
    /// The renderer.
    pub renderer: Renderer,
    /// Ids that may end a trained response.
    pub stop_ids: Vec<u32>,
    /// Padding id (pad token, else EOS, else 0).
    pub pad_id: u32,
}

impl std::fmt::Debug for TextPipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextPipeline")
            .field("renderer", &self.renderer)
            .field("stop_ids", &self.stop_ids)
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

impl TextPipeline {
    /// Loads `model_dir/tokenizer.json` and the renderer for `template`.
    pub fn new(model_dir: &Path, template: &str) -> Result<Self> {
        let tok_path = model_dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&tok_path).map_err(|e| {
            TrainError::data(
                &tok_path,
                None,
                format!("cannot load the tokenizer: {e}"),
                "the base model folder needs a tokenizer.json (Hugging Face fast tokenizer)",
            )
        })?;
        let renderer = match template {
            "auto" => Renderer::for_choice(TemplateChoice::Tokenizer, Some(model_dir))
                .or_else(|_| Renderer::for_choice(TemplateChoice::Alpaca, Some(model_dir)))?,
            "model" => Renderer::for_choice(TemplateChoice::Tokenizer, Some(model_dir))?,
            "alpaca" => Renderer::for_choice(TemplateChoice::Alpaca, Some(model_dir))?,
            "chatml" => Renderer::for_choice(TemplateChoice::Chatml, Some(model_dir))?,
            "llama3" => Renderer::for_choice(TemplateChoice::Llama3, Some(model_dir))?,
            other => {
                return Err(TrainError::config(
                    "prompt_template",
                    format!("unknown template `{other}`"),
                    "one of auto, alpaca, chatml, llama3, model",
                ));
            }
        };
        let stop_ids = renderer.stop_ids(&tokenizer);
        let sp = renderer.special_tokens();
        let pad_id = sp
            .pad
            .as_deref()
            .and_then(|p| tokenizer.token_to_id(p))
            .or_else(|| sp.eos.as_deref().and_then(|e| tokenizer.token_to_id(e)))
            .or_else(|| stop_ids.first().copied())
            .unwrap_or(0);
        Ok(Self {
            tokenizer,
            renderer,
            stop_ids,
            pad_id,
        })
    }

    /// Renders and tokenises one sample; `trainable` comes from the response spans
    /// (or is all true with `train_on_inputs`).
    pub fn tokenize(
        &self,
        sample: &Sample,
        train_on_inputs: bool,
    ) -> Result<(TokenizedSample, bool)> {
        let rendered = self.renderer.render(sample)?;
        let t = rendered.tokenize(&self.tokenizer, &self.stop_ids)?;
        let trainable = if train_on_inputs {
            vec![true; t.input_ids.len()]
        } else {
            t.labels
                .iter()
                .map(|&l| l != lora_dataset::render::IGNORE_INDEX)
                .collect()
        };
        Ok((
            TokenizedSample {
                input_ids: t.input_ids,
                trainable,
            },
            t.ends_with_unmasked_eos,
        ))
    }

    /// The prompt text of a sample (everything before the response), for generation.
    pub fn prompt_text(&self, sample: &Sample) -> Result<String> {
        Ok(self.renderer.render_prompt(sample)?)
    }
}

/// Rows of a dataset as samples, with the 1-based line (when known) of each.
struct SampleSink;

type Parsed = (Option<u64>, std::result::Result<Sample, String>);

impl RowSink for SampleSink {
    type Chunk = Vec<Parsed>;
    fn start(&self, _file: usize) -> Self::Chunk {
        Vec::new()
    }
    fn row(&self, chunk: &mut Self::Chunk, row: &RowCtx<'_>) {
        chunk.push((
            row.line,
            Sample::from_record(row.val).map_err(|e| e.to_string()),
        ));
    }
    fn invalid(&self, chunk: &mut Self::Chunk, line: Option<u64>, reason: String) {
        chunk.push((line, Err(reason)));
    }
}

/// Reads every row of `path` as a [`Sample`]. The first unreadable row is an
/// error naming the file and line (profile the dataset to see them all).
pub fn read_samples(path: &Path) -> Result<Vec<Sample>> {
    let resolved = source::resolve(path, FileFormat::Auto)?;
    let mut merged: Vec<Parsed> = Vec::new();
    source::read_rows(
        &resolved.files,
        &ReadOptions {
            threads: 1,
            ..Default::default()
        },
        &SampleSink,
        &mut |chunk| {
            merged.extend(chunk);
            Ok(())
        },
        &mut |_| Ok(()),
    )?;
    let file: PathBuf = resolved
        .files
        .first()
        .map_or_else(|| path.to_path_buf(), |f| f.path.clone());
    let mut samples = Vec::with_capacity(merged.len());
    for (line, s) in merged {
        match s {
            Ok(s) => samples.push(s),
            Err(reason) => {
                return Err(TrainError::data(
                    &file,
                    line,
                    reason,
                    "fix or remove the row (`lora-trainer dataset analyze` lists every invalid row)",
                ));
            }
        }
    }
    if samples.is_empty() {
        return Err(TrainError::data(
            path,
            None,
            "the dataset has no rows",
            "point dataset_path at a file with samples",
        ));
    }
    Ok(samples)
}

/// sha256 of a file or of every file under a folder (sorted by path).
pub fn content_sha256(path: &Path) -> Result<String> {
    let mut files = Vec::new();
    if path.is_dir() {
        let mut stack = vec![path.to_path_buf()];
        while let Some(d) = stack.pop() {
            let rd = std::fs::read_dir(&d).map_err(|e| TrainError::io(&d, e))?;
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    stack.push(p);
                } else {
                    files.push(p);
                }
            }
        }
        files.sort();
    } else {
        files.push(path.to_path_buf());
    }
    let mut h = Sha256::new();
    for f in files {
        let mut file = std::fs::File::open(&f).map_err(|e| TrainError::io(&f, e))?;
        std::io::copy(&mut file, &mut h).map_err(|e| TrainError::io(&f, e))?;
    }
    Ok(hex::encode(h.finalize()))
}

/// Reads, renders, tokenises, masks and truncates the dataset at `path`.
pub fn prepare(path: &Path, pipeline: &TextPipeline, opts: &DataOptions) -> Result<PreparedData> {
    let raw = read_samples(path)?;
    let rows = raw.len();
    let mut samples = Vec::with_capacity(rows);
    let (mut truncated, mut dropped, mut eos) = (0, 0, 0);
    let (mut trained, mut total) = (0usize, 0usize);
    for (i, s) in raw.iter().enumerate() {
        let (mut t, ends) = pipeline.tokenize(s, opts.train_on_inputs).map_err(|e| match e {
            TrainError::Dataset(d) => TrainError::data(
                path,
                None,
                format!("row {}: {d}", i + 1),
                "check the row against the template (`lora-trainer dataset analyze --template ...`)",
            ),
            other => other,
        })?;
        if t.truncate(opts.max_seq_length.max(2)) {
            truncated += 1;
        }
        if t.n_targets() == 0 {
            dropped += 1;
            continue;
        }
        if ends {
            eos += 1;
        }
        trained += t.trainable.iter().filter(|&&x| x).count();
        total += t.input_ids.len();
        samples.push(t);
    }
    if samples.is_empty() {
        return Err(TrainError::data(
            path,
            None,
            format!(
                "none of the {rows} samples has a trainable token after rendering and truncation"
            ),
            "raise max_seq_length, check the template's response spans, or set train_on_inputs",
        ));
    }
    Ok(PreparedData {
        samples,
        rows,
        truncated,
        dropped_no_targets: dropped,
        trained_fraction: trained as f64 / total.max(1) as f64,
        ends_with_eos: eos,
        sha256: content_sha256(path)?,
        template: pipeline.renderer.name().to_owned(),
    })
}
