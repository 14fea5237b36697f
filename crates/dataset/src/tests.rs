//! Tests over real files: every reader, bad input, the profile fields and the skill.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use lora_skill::{MemorySink, SkillContext, SkillRegistry};
use lora_spec::contracts::dataset::{DatasetAnalyzeInput, DetectedRecordFormat, FileFormat};

use crate::analyze::{AnalyzeEnv, analyze};
use crate::error::DatasetError;

fn run(path: &Path) -> Result<lora_spec::contracts::dataset::DatasetProfile, DatasetError> {
    let input = DatasetAnalyzeInput::new(path.display().to_string());
    run_with(input)
}

fn run_with(
    input: DatasetAnalyzeInput,
) -> Result<lora_spec::contracts::dataset::DatasetProfile, DatasetError> {
    let env = AnalyzeEnv {
        read: crate::source::ReadOptions {
            // Small chunks so that tests cross chunk boundaries.
            chunk_bytes: 4096,
            threads: 2,
            ..Default::default()
        },
        ..Default::default()
    };
    analyze(&input, &env, &mut |_, _| Ok(())).map(|a| a.profile)
}

pub(crate) fn python() -> PathBuf {
    let p = std::env::var("LORA_TRAINER_PYTHON")
        .ok()
        .or_else(|| option_env!("LORA_TRAINER_PYTHON").map(String::from))
        .expect("LORA_TRAINER_PYTHON is set by .cargo/config.toml (run `cargo xtask setup`)");
    let p = PathBuf::from(p);
    if p.is_absolute() {
        p
    } else {
        // Relative to the workspace root.
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(p)
    }
}

pub(crate) fn run_python(script: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(python())
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("run the project python");
    assert!(
        out.status.success(),
        "python failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn write(path: &Path, bytes: &[u8]) {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).unwrap();
    }
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn jsonl_profile_counts_duplicates_invalid_rows_and_targets() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.jsonl");
    let mut s = String::new();
    for i in 0..300 {
        s.push_str(&format!(
            "{{\"instruction\":\"task {i} do it\",\"input\":\"\",\"output\":\"answer {i}\"}}\n"
        ));
    }
    // Whitespace-only difference: a duplicate after normalisation.
    s.push_str("{\"instruction\":\"task  1   do it \",\"input\":\"\",\"output\":\"answer 1\"}\n");
    s.push_str("{\"instruction\":\"truncated\",\"out\n"); // line 302
    s.push('\n'); // blank line: not a row
    s.push_str("[1,2]\n"); // line 304
    s.push_str("{\"instruction\":\"no output\",\"input\":\"x\"}\n"); // line 305: missing target
    s.push_str("{\"instruction\":\"empty\",\"input\":\"\",\"output\":\"  \"}\n"); // 306
    write(&p, s.as_bytes());
    let pr = run(&p).unwrap();
    assert_eq!(pr.total_samples, 303);
    assert_eq!(pr.format_detected, "jsonl");
    assert_eq!(pr.record_format, DetectedRecordFormat::Alpaca);
    assert!(pr.has_instruction && pr.has_output);
    assert_eq!(pr.columns, ["instruction", "input", "output"]);
    assert_eq!(pr.duplicates_found, 1);
    assert_eq!(pr.duplicate_examples[0].row, 301);
    assert!(
        pr.duplicate_examples[0]
            .reason
            .contains("duplicate of row 2"),
        "{:?}",
        pr.duplicate_examples
    );
    assert_eq!(pr.invalid_rows, 2);
    assert_eq!(pr.invalid_examples[0].line, Some(302));
    assert!(
        pr.invalid_examples[0].reason.contains("truncated JSON"),
        "{:?}",
        pr.invalid_examples
    );
    assert_eq!(pr.invalid_examples[1].line, Some(304));
    assert!(
        pr.invalid_examples[1]
            .reason
            .contains("expected a JSON object")
    );
    assert_eq!((pr.missing_targets, pr.empty_targets), (1, 1));
    assert_eq!(pr.target_examples[0].line, Some(305));
    assert_eq!(pr.column_gaps.len(), 1);
    assert_eq!(pr.column_gaps[0].column, "output");
    assert!(!pr.token_counter.exact);
    assert_eq!(pr.token_counter.kind, "chars_div_4");
    assert!(pr.avg_tokens > 3.0 && pr.max_tokens >= 4);
    assert!(pr.token_percentiles.p50 <= pr.token_percentiles.p99);
    let binned: u64 = pr.token_histogram.iter().map(|b| b.count).sum();
    assert_eq!(binned, 303);
}

#[test]
fn anchor_style_token_estimate_matches_python_definition() {
    // The anchor counts sum(len(str(v))) // 4 per row over code points.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.jsonl");
    write(
        &p,
        "{\"instruction\":\"héllo wörld\",\"input\":\"\",\"output\":\"abcdefg\"}\n{\"instruction\":\"a\",\"input\":\"b\",\"output\":\"c\"}\n"
            .as_bytes(),
    );
    let pr = run(&p).unwrap();
    // Row 1: 11 + 0 + 7 = 18 chars -> 4; row 2: 3 chars -> 0.
    assert_eq!(pr.max_tokens, 4);
    assert_eq!(pr.avg_tokens, 2.0);
}

#[test]
fn invalid_utf8_and_garbage_are_reported_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.jsonl");
    let mut bytes = b"{\"text\":\"fine\"}\n{\"text\":\"bad \xff\xfe byte\"}\n".to_vec();
    bytes.extend_from_slice(b"\x00\x01garbage\x02\n{\"text\":\"also fine\"}\n");
    write(&p, &bytes);
    let pr = run(&p).unwrap();
    assert_eq!(pr.total_samples, 2);
    assert_eq!(pr.invalid_rows, 2);
    assert_eq!(pr.invalid_examples[0].line, Some(2));
    assert_eq!(pr.record_format, DetectedRecordFormat::Text);

    // Only garbage: a clear error naming the file and the first bad line.
    let g = dir.path().join("g.jsonl");
    write(&g, b"\x89PNG\r\n\x1a\nnot json at all\n");
    let e = run(&g).unwrap_err();
    let s = lora_skill::SkillError::from(e);
    assert_eq!(s.kind, lora_skill::ErrorKind::InvalidInput);
    assert_eq!(s.line, Some(1));
    assert!(s.message.contains("no valid record"), "{s}");
    assert!(s.hint.is_some());
}

#[test]
fn empty_file_and_missing_path_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("empty.jsonl");
    write(&p, b"");
    let s = lora_skill::SkillError::from(run(&p).unwrap_err());
    assert!(s.message.contains("empty"), "{s}");
    let s = lora_skill::SkillError::from(run(&dir.path().join("nope.jsonl")).unwrap_err());
    assert_eq!(s.kind, lora_skill::ErrorKind::NotFound);
    let ws = dir.path().join("ws.jsonl");
    write(&ws, b"\n\n   \n");
    let s = lora_skill::SkillError::from(run(&ws).unwrap_err());
    assert!(s.message.contains("no records"), "{s}");
}

#[test]
fn oversized_line_is_skipped_without_buffering_it() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("big.jsonl");
    let mut f = std::fs::File::create(&p).unwrap();
    writeln!(f, "{{\"text\":\"before\"}}").unwrap();
    // An 8 MiB line with no newline for a long stretch.
    write!(f, "{{\"text\":\"").unwrap();
    let block = vec![b'x'; 1 << 20];
    for _ in 0..8 {
        f.write_all(&block).unwrap();
    }
    writeln!(f, "\"}}").unwrap();
    writeln!(f, "{{\"text\":\"after\"}}").unwrap();
    drop(f);
    let mut input = DatasetAnalyzeInput::new(p.display().to_string());
    input.max_record_bytes = 64 * 1024;
    let pr = run_with(input).unwrap();
    assert_eq!(pr.total_samples, 2);
    assert_eq!(pr.invalid_rows, 1);
    assert_eq!(pr.invalid_examples[0].line, Some(2));
    assert!(
        pr.invalid_examples[0].reason.contains("max_record_bytes"),
        "{:?}",
        pr.invalid_examples
    );
    // Under the limit, the same line is read.
    let pr = run(&p).unwrap();
    assert_eq!((pr.total_samples, pr.invalid_rows), (3, 0));
    assert!(pr.max_tokens >= 2 * 1024 * 1024);
}

#[test]
fn csv_with_quotes_multiline_fields_and_bad_rows() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.csv");
    write(
        &p,
        b"\xEF\xBB\xBFprompt,completion\n\"say \"\"hi\"\", please\",\"line one\nline two\"\nshort row\n\"a\",\"b\"\n\"bad\xff\",\"x\"\n",
    );
    let pr = run(&p).unwrap();
    assert_eq!(pr.format_detected, "csv");
    assert_eq!(pr.columns, ["prompt", "completion"]);
    assert_eq!(pr.record_format, DetectedRecordFormat::PromptCompletion);
    assert_eq!(pr.total_samples, 2);
    assert_eq!(pr.invalid_rows, 2);
    assert_eq!(
        pr.invalid_examples[0].line,
        Some(4),
        "{:?}",
        pr.invalid_examples
    );
    assert!(
        pr.invalid_examples[0]
            .reason
            .contains("has 1 fields, the header has 2")
    );
    assert!(pr.invalid_examples[1].reason.contains("invalid UTF-8"));
}

#[test]
fn csv_unclosed_quote_is_bounded_by_max_record_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.csv");
    let mut s = b"text\nok\n\"never closed\n".to_vec();
    for _ in 0..40_000 {
        s.extend_from_slice(b"more text inside the open quote\n");
    }
    write(&p, &s);
    let mut input = DatasetAnalyzeInput::new(p.display().to_string());
    input.max_record_bytes = 64 * 1024;
    let pr = run_with(input).unwrap();
    assert_eq!(pr.total_samples, 1);
    assert_eq!(pr.invalid_rows, 1);
    assert!(
        pr.invalid_examples[0].reason.contains("max_record_bytes"),
        "{:?}",
        pr.invalid_examples
    );
}

#[test]
fn json_array_messages_and_truncated_array() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.json");
    let rows: Vec<serde_json::Value> = (0..2500)
        .map(|i| {
            serde_json::json!({"messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": format!("question {i}")},
                {"role": "assistant", "content": format!("answer {i}")}
            ]})
        })
        .collect();
    write(&p, serde_json::to_string_pretty(&rows).unwrap().as_bytes());
    let pr = run(&p).unwrap();
    assert_eq!(pr.format_detected, "json");
    assert_eq!(pr.total_samples, 2500);
    assert_eq!(pr.record_format, DetectedRecordFormat::Messages);
    assert_eq!(pr.columns, ["messages"]);

    let t = dir.path().join("t.json");
    let mut text = serde_json::to_string(&rows[..10]).unwrap();
    text.truncate(text.len() - 40);
    write(&t, text.as_bytes());
    let pr = run(&t).unwrap();
    assert_eq!(pr.total_samples, 9);
    assert_eq!(pr.invalid_rows, 1);
    assert!(
        pr.invalid_examples[0]
            .reason
            .contains("rest of the file is not read")
    );
}

fn write_parquet(path: &Path, n: usize) {
    use arrow_array::{RecordBatch, StringArray};
    use arrow_schema::{DataType, Field, Schema};
    let schema = Arc::new(Schema::new(vec![
        Field::new("question", DataType::Utf8, false),
        Field::new("query", DataType::Utf8, true),
    ]));
    let q: Vec<String> = (0..n)
        .map(|i| format!("how many orders in year {}", i % 50))
        .collect();
    let s: Vec<Option<String>> = (0..n)
        .map(|i| {
            if i == 3 {
                None
            } else {
                Some(format!("SELECT count(*) FROM orders WHERE y = {}", i % 50))
            }
        })
        .collect();
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from(q)),
            Arc::new(StringArray::from(s)),
        ],
    )
    .unwrap();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let f = std::fs::File::create(path).unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(f, schema, None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
}

#[test]
fn parquet_text_to_sql_and_hub_folder() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.parquet");
    write_parquet(&p, 3000);
    let pr = run(&p).unwrap();
    assert_eq!(pr.format_detected, "parquet");
    assert_eq!(pr.total_samples, 3000);
    assert_eq!(pr.record_format, DetectedRecordFormat::TextToSql);
    assert_eq!(pr.missing_targets, 1);
    assert_eq!(pr.duplicates_found, 3000 - 51); // 50 distinct pairs + the null-SQL row

    // Hub layout: data/train-*.parquet and data/test-*.parquet; train shards are profiled.
    let hub = dir.path().join("hub");
    write_parquet(&hub.join("data/train-00000-of-00002.parquet"), 100);
    write_parquet(&hub.join("data/train-00001-of-00002.parquet"), 100);
    write_parquet(&hub.join("data/test-00000-of-00001.parquet"), 100);
    write(&hub.join("README.md"), b"# card");
    let pr = run(&hub).unwrap();
    assert_eq!(pr.format_detected, "hf");
    assert_eq!(pr.total_samples, 200);
    assert_eq!(pr.files.len(), 2);
    assert!(pr.warnings.iter().any(|w| w.contains("train shards")));

    // A folder mixing kinds of data files is refused with a hint.
    write(&hub.join("extra.jsonl"), b"{\"text\":\"x\"}\n");
    let s = lora_skill::SkillError::from(run(&hub).unwrap_err());
    assert!(s.message.contains("mixes data file types"), "{s}");
    assert!(s.hint.is_some());
}

#[test]
fn truncated_parquet_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.parquet");
    write_parquet(&p, 100);
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let s = lora_skill::SkillError::from(run(&p).unwrap_err());
    assert!(s.message.contains("parquet"), "{s}");
}

#[test]
fn save_to_disk_folder_written_by_datasets() {
    // The real tool writes the folder: datasets.Dataset.save_to_disk, and a DatasetDict.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ds");
    let dd = dir.path().join("dd");
    run_python(
        "import sys, datasets\n\
         rows = {'conversations': [[{'from': 'human', 'value': f'q{i}'}, {'from': 'gpt', 'value': f'a{i % 7}' if i != 5 else ''}] for i in range(1200)]}\n\
         ds = datasets.Dataset.from_dict(rows)\n\
         ds.save_to_disk(sys.argv[1], max_shard_size='20KB')\n\
         datasets.DatasetDict({'train': ds.select(range(100)), 'test': ds.select(range(10))}).save_to_disk(sys.argv[2])\n",
        &[out.to_str().unwrap(), dd.to_str().unwrap()],
    );
    let pr = run(&out).unwrap();
    assert_eq!(pr.format_detected, "hf");
    assert!(pr.files.len() > 1, "several arrow shards: {:?}", pr.files);
    assert_eq!(pr.total_samples, 1200);
    assert_eq!(pr.record_format, DetectedRecordFormat::Sharegpt);
    assert_eq!(pr.empty_targets, 1);
    assert_eq!(pr.columns, ["conversations"]);
    let pr = run(&dd).unwrap();
    assert_eq!(pr.total_samples, 100);
    assert!(
        pr.warnings
            .iter()
            .any(|w| w.contains("profiling split \"train\""))
    );
    assert!(pr.files[0].starts_with("train/"));
}

#[test]
fn near_duplicates_are_found_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.jsonl");
    let mut s = String::new();
    let base = "list the customers in france with a credit limit above ten thousand and order them by name";
    s.push_str(&format!("{{\"text\":\"{base} please\"}}\n"));
    s.push_str(&format!("{{\"text\":\"{base} thanks\"}}\n"));
    s.push_str(
        "{\"text\":\"how many employees work in the sydney office and who manages them\"}\n",
    );
    write(&p, s.as_bytes());
    let mut input = DatasetAnalyzeInput::new(p.display().to_string());
    input.near_duplicates = true;
    let pr = run_with(input).unwrap();
    assert_eq!(pr.duplicates_found, 0);
    assert_eq!(pr.near_duplicates_found, Some(1));
    assert_eq!(run(&p).unwrap().near_duplicates_found, None);
}

#[test]
fn exact_token_counts_with_a_tokenizer_on_a_sample_and_on_all_rows() {
    let dir = tempfile::tempdir().unwrap();
    crate::tokens::test_support::write_word_tokenizer(
        &dir.path().join("tokenizer.json"),
        &["a", "b"],
        &[],
    );
    let p = dir.path().join("d.jsonl");
    let mut s = String::new();
    for i in 0..500 {
        // i+1 words in the text field.
        let words = vec!["a"; i % 20 + 1].join(" ");
        s.push_str(&format!("{{\"text\":\"{words} b{i}\"}}\n"));
    }
    write(&p, s.as_bytes());
    let mut input = DatasetAnalyzeInput::new(p.display().to_string());
    input.tokenizer_name = Some(dir.path().display().to_string());
    input.sample_size = 0;
    let pr = run_with(input.clone()).unwrap();
    assert!(pr.token_counter.exact);
    assert_eq!(pr.token_counter.rows_counted, 500);
    assert_eq!(pr.max_tokens, 21);
    assert_eq!(pr.token_percentiles.p99, 21);
    input.sample_size = 100;
    let pr = run_with(input).unwrap();
    assert_eq!(pr.token_counter.rows_counted, 100);
    assert!(pr.token_counter.note.contains("seeded sample"));
    assert!(pr.max_tokens <= 21 && pr.max_tokens >= 15);
}

#[tokio::test]
async fn skill_runs_through_the_registry_and_reports_progress() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("d.jsonl");
    let mut s = String::new();
    for i in 0..50 {
        s.push_str(&format!(
            "{{\"prompt\":\"p{i}\",\"completion\":\"c{i}\"}}\n"
        ));
    }
    write(&p, s.as_bytes());
    let mut reg = SkillRegistry::new();
    reg.register(crate::DatasetSkill::default());
    let sink = MemorySink::new();
    let ctx = SkillContext::new(dir.path()).with_sink(sink.clone());
    let out = reg
        .call_json(
            lora_spec::contracts::names::DATASET,
            serde_json::json!({"dataset_path": "d.jsonl", "format": "auto"}),
            &ctx,
        )
        .await
        .unwrap();
    assert_eq!(out.data["total_samples"], 50);
    assert_eq!(out.data["record_format"], "prompt_completion");
    assert!(out.output_text.contains("50 samples"));
    assert!(!sink.events().is_empty());

    let err = reg
        .call_json(
            lora_spec::contracts::names::DATASET,
            serde_json::json!({"dataset_path": "d.jsonl", "sample_sise": 3}),
            &ctx,
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind, lora_skill::ErrorKind::InvalidInput);

    // Cancellation stops the work with the cancelled kind.
    let ctx = SkillContext::new(dir.path());
    ctx.cancel_token().cancel();
    let err = reg
        .call_json(
            lora_spec::contracts::names::DATASET,
            serde_json::json!({"dataset_path": "d.jsonl", "format": FileFormat::Jsonl}),
            &ctx,
        )
        .await
        .unwrap_err();
    assert_eq!(err.kind, lora_skill::ErrorKind::Cancelled);
}

#[tokio::test]
async fn skill_render_check_reports_eos_and_masks() {
    use lora_skill::Skill;
    let dir = tempfile::tempdir().unwrap();
    crate::tokens::test_support::write_word_tokenizer(
        &dir.path().join("tokenizer.json"),
        &["user", "assistant", "q", "a"],
        &["<|im_start|>", "<|im_end|>"],
    );
    let p = dir.path().join("d.jsonl");
    let mut s = String::new();
    for i in 0..40 {
        s.push_str(&format!(
            "{{\"messages\":[{{\"role\":\"user\",\"content\":\"q {i}\"}},{{\"role\":\"assistant\",\"content\":\"a {i}\"}}]}}\n"
        ));
    }
    s.push_str("{\"messages\":[{\"role\":\"user\",\"content\":\"q only\"}]}\n");
    write(&p, s.as_bytes());
    let mut input = DatasetAnalyzeInput::new("d.jsonl");
    input.tokenizer_name = Some(dir.path().display().to_string());
    input.template = Some(lora_spec::contracts::dataset::TemplateChoice::Chatml);
    let ctx = SkillContext::new(dir.path());
    let out = crate::DatasetSkill::default()
        .run(input, &ctx)
        .await
        .unwrap();
    let rc = out.data.render_check.unwrap();
    assert_eq!(rc.template, "chatml");
    assert!(rc.by_tokens);
    assert_eq!(rc.rendered, 40);
    assert_eq!(
        rc.render_errors, 1,
        "the row without an assistant turn: {:?}",
        rc.examples
    );
    assert_eq!(rc.ends_with_unmasked_eos, 40);
    assert_eq!(rc.zero_trainable, 0);
    assert!(rc.trained_token_fraction > 0.1 && rc.trained_token_fraction < 0.9);
    assert!(
        rc.examples.iter().any(|e| e.contains("[[a")),
        "{:?}",
        rc.examples
    );
    assert_eq!(out.data.missing_targets, 1);

    // The model's own template needs a tokenizer.
    let mut input = DatasetAnalyzeInput::new("d.jsonl");
    input.template = Some(lora_spec::contracts::dataset::TemplateChoice::Tokenizer);
    let err = crate::DatasetSkill::default()
        .run(input, &ctx)
        .await
        .unwrap_err();
    assert_eq!(err.field.as_deref(), Some("template"));
}
