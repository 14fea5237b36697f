//! Curriculum (seed 001 §9): ordered training stages, easy first, each with
//! its own epochs; stage k starts from stage k-1's adapter (the orchestrator
//! does that). Stages come from named files (`{"easy": "e.jsonl", "hard":
//! "h.jsonl"}`, in the given order) or from one JSONL dataset split by a
//! difficulty score: the length of the sample's text, its words, or the base
//! model's loss on it (scores the eval skill measures with `per_sample`; this
//! crate holds no model, so loss scores are passed in).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use lora_spec::contracts::protocols::{CurriculumStage, DifficultyMeasure};
use serde_json::Value;

use crate::ProtocolError;

/// Epochs of stage `i` of `n` from the input list (empty: 1; one: for all; else one per stage).
pub fn stage_epochs(epochs: &[f64], n: usize) -> Result<Vec<f64>, ProtocolError> {
    let out = match epochs.len() {
        0 => vec![1.0; n],
        1 => vec![epochs[0]; n],
        k if k == n => epochs.to_vec(),
        k => {
            return Err(ProtocolError::invalid(
                "epochs",
                format!("{k} values for {n} stages"),
                Some("give one number for every stage, or one per stage".into()),
            ));
        }
    };
    if let Some(bad) = out.iter().find(|e| !(e.is_finite() && **e > 0.0)) {
        return Err(ProtocolError::invalid(
            "epochs",
            format!("must be positive (got {bad})"),
            None,
        ));
    }
    Ok(out)
}

/// Samples in a data file: non-empty lines of JSONL, elements of a JSON array.
fn count_samples(path: &Path) -> Result<u64, ProtocolError> {
    let f = std::fs::File::open(path).map_err(|e| ProtocolError::io(path, e))?;
    let is_json = path.extension().is_some_and(|e| e == "json");
    if is_json {
        let v: Value =
            serde_json::from_reader(BufReader::new(f)).map_err(|e| ProtocolError::Malformed {
                path: path.to_path_buf(),
                line: e.line() as u64,
                message: e.to_string(),
            })?;
        return Ok(v.as_array().map_or(1, |a| a.len() as u64));
    }
    let mut n = 0;
    for line in BufReader::new(f).lines() {
        let line = line.map_err(|e| ProtocolError::io(path, e))?;
        if !line.trim().is_empty() {
            n += 1;
        }
    }
    Ok(n)
}

/// Seed 001's `build_stages({"easy": ..., "hard": ...})`: one stage per named
/// file, in order; every file must exist.
pub fn build_stages(
    files: &[(String, PathBuf)],
    epochs: &[f64],
) -> Result<Vec<CurriculumStage>, ProtocolError> {
    if files.is_empty() {
        return Err(ProtocolError::invalid(
            "files",
            "no stage files",
            Some(r#"for example {"easy": "e.jsonl", "hard": "h.jsonl"}"#.into()),
        ));
    }
    let ep = stage_epochs(epochs, files.len())?;
    files
        .iter()
        .zip(ep)
        .enumerate()
        .map(|(i, ((name, path), epochs))| {
            if !path.is_file() {
                return Err(ProtocolError::Io {
                    path: path.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("stage `{name}`: no such file"),
                    ),
                });
            }
            Ok(CurriculumStage {
                index: i as u32,
                name: name.clone(),
                dataset_path: path.display().to_string(),
                epochs,
                samples: count_samples(path)?,
                difficulty: None,
            })
        })
        .collect()
}

/// All string leaves of a sample, concatenated (instruction, input, output, message contents).
fn text_of(v: &Value, out: &mut String) {
    match v {
        Value::String(s) => {
            out.push_str(s);
            out.push(' ');
        }
        Value::Array(a) => a.iter().for_each(|x| text_of(x, out)),
        Value::Object(o) => o.values().for_each(|x| text_of(x, out)),
        _ => {}
    }
}

/// The difficulty score of one sample from its text; `None` for
/// [`DifficultyMeasure::Loss`], which needs a model (pass scores instead).
pub fn difficulty(sample: &Value, measure: DifficultyMeasure) -> Option<f64> {
    let mut s = String::new();
    text_of(sample, &mut s);
    match measure {
        DifficultyMeasure::Length => Some(s.trim_end().chars().count() as f64),
        DifficultyMeasure::Words => Some(s.split_whitespace().count() as f64),
        DifficultyMeasure::Loss => None,
    }
}

fn missing_scores(dataset: &Path, given: usize, rows: Option<usize>) -> ProtocolError {
    ProtocolError::invalid(
        "scores",
        format!(
            "measure `loss` needs one score per sample of {}: {given} given{}",
            dataset.display(),
            rows.map(|r| format!(" for {r} samples")).unwrap_or_default()
        ),
        Some(
            "take `sample_losses` from the eval skill run with `per_sample: true` on the base model \
             (the orchestrator and `lora-trainer curriculum --measure loss --model DIR` do this)"
                .into(),
        ),
    )
}

fn stage_names(n: usize) -> Vec<String> {
    match n {
        2 => vec!["easy".into(), "hard".into()],
        3 => vec!["easy".into(), "medium".into(), "hard".into()],
        _ => (1..=n).map(|i| format!("stage_{i}")).collect(),
    }
}

/// Splits a JSONL dataset into `n` stages of equal size by increasing
/// difficulty (ties keep file order); writes `<stem>.<name>.jsonl` into `out_dir`.
/// `scores` (one per non-empty line; `None` = nothing to learn, easiest) are
/// required by [`DifficultyMeasure::Loss`] and ignored otherwise.
pub fn split_by_difficulty(
    dataset: &Path,
    n: usize,
    measure: DifficultyMeasure,
    scores: &[Option<f64>],
    epochs: &[f64],
    out_dir: &Path,
) -> Result<Vec<CurriculumStage>, ProtocolError> {
    if n == 0 {
        return Err(ProtocolError::invalid(
            "num_stages",
            "must be at least 1",
            Some("for example 3".into()),
        ));
    }
    let ep = stage_epochs(epochs, n)?;
    let f = std::fs::File::open(dataset).map_err(|e| ProtocolError::io(dataset, e))?;
    let mut rows: Vec<(f64, String)> = Vec::new();
    for (i, line) in BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| ProtocolError::io(dataset, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(&line).map_err(|e| ProtocolError::Malformed {
            path: dataset.to_path_buf(),
            line: i as u64 + 1,
            message: format!("not a JSON object: {e}"),
        })?;
        let score = match difficulty(&v, measure) {
            Some(d) => d,
            None => match scores.get(rows.len()) {
                Some(s) => s.unwrap_or(0.0),
                None => return Err(missing_scores(dataset, scores.len(), None)),
            },
        };
        rows.push((score, line));
    }
    if measure == DifficultyMeasure::Loss && scores.len() != rows.len() {
        return Err(missing_scores(dataset, scores.len(), Some(rows.len())));
    }
    if rows.len() < n {
        return Err(ProtocolError::invalid(
            "num_stages",
            format!(
                "{n} stages but {} has only {} samples",
                dataset.display(),
                rows.len()
            ),
            Some("use fewer stages".into()),
        ));
    }
    rows.sort_by(|a, b| a.0.total_cmp(&b.0));
    std::fs::create_dir_all(out_dir).map_err(|e| ProtocolError::io(out_dir, e))?;
    let stem = dataset
        .file_stem()
        .map_or("data".into(), |s| s.to_string_lossy().to_string());
    let names = stage_names(n);
    let mut stages = Vec::with_capacity(n);
    for (k, name) in names.iter().enumerate() {
        let (lo, hi) = (k * rows.len() / n, (k + 1) * rows.len() / n);
        let chunk = &rows[lo..hi];
        let path = out_dir.join(format!("{stem}.{name}.jsonl"));
        let mut body = String::new();
        for (_, l) in chunk {
            body.push_str(l);
            body.push('\n');
        }
        lora_skill::fs::write_atomic(&path, body.as_bytes())
            .map_err(|e| ProtocolError::io(&path, e))?;
        stages.push(CurriculumStage {
            index: k as u32,
            name: name.clone(),
            dataset_path: path.display().to_string(),
            epochs: ep[k],
            samples: chunk.len() as u64,
            difficulty: chunk.first().zip(chunk.last()).map(|(a, b)| (a.0, b.0)),
        });
    }
    Ok(stages)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn named_files_keep_their_order_and_epochs() {
        let dir = tempfile::tempdir().unwrap();
        let e = dir.path().join("e.jsonl");
        let h = dir.path().join("h.jsonl");
        std::fs::write(&e, "{\"a\":1}\n{\"a\":2}\n\n").unwrap();
        std::fs::write(&h, "{\"a\":3}\n").unwrap();
        let files = vec![("easy".to_string(), e), ("hard".to_string(), h.clone())];
        let s = build_stages(&files, &[1.0, 2.0]).unwrap();
        assert_eq!(
            (s[0].name.as_str(), s[0].samples, s[0].epochs),
            ("easy", 2, 1.0)
        );
        assert_eq!((s[1].index, s[1].samples, s[1].epochs), (1, 1, 2.0));
        assert!(build_stages(&files, &[1.0, 2.0, 3.0]).is_err());
        let missing = vec![("x".to_string(), dir.path().join("nope.jsonl"))];
        assert!(
            build_stages(&missing, &[])
                .unwrap_err()
                .to_string()
                .contains("nope.jsonl")
        );
    }

    #[test]
    fn difficulty_split_orders_by_length() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("data.jsonl");
        let lines: Vec<String> = [30, 5, 20, 10, 25, 15]
            .iter()
            .map(|n| serde_json::json!({"instruction": "x".repeat(*n), "output": "y"}).to_string())
            .collect();
        std::fs::write(&d, lines.join("\n")).unwrap();
        let s = split_by_difficulty(
            &d,
            3,
            DifficultyMeasure::Length,
            &[],
            &[2.0],
            &dir.path().join("st"),
        )
        .unwrap();
        assert_eq!(
            s.iter().map(|x| x.name.as_str()).collect::<Vec<_>>(),
            vec!["easy", "medium", "hard"]
        );
        assert_eq!(s[0].difficulty, Some((7.0, 12.0)));
        assert_eq!(s[2].difficulty, Some((27.0, 32.0)));
        assert!(s.iter().all(|x| x.samples == 2 && x.epochs == 2.0));
        let easy = std::fs::read_to_string(&s[0].dataset_path).unwrap();
        assert_eq!(easy.lines().count(), 2);
        std::fs::write(&d, "{\"a\": 1}\nnot json\n").unwrap();
        let e = split_by_difficulty(&d, 1, DifficultyMeasure::Length, &[], &[], dir.path())
            .unwrap_err();
        assert!(
            matches!(e, ProtocolError::Malformed { line: 2, .. }),
            "{e:?}"
        );
    }

    #[test]
    fn loss_split_orders_by_the_given_scores() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("data.jsonl");
        // Long but easy, short but hard: the loss order is not the length order.
        let lines: Vec<String> = (0..4)
            .map(|i| {
                serde_json::json!({"instruction": "x".repeat(40 - 10 * i), "output": i}).to_string()
            })
            .collect();
        std::fs::write(&d, lines.join("\n") + "\n\n").unwrap();
        let scores = [Some(0.5), Some(2.5), None, Some(1.5)];
        let s = split_by_difficulty(
            &d,
            2,
            DifficultyMeasure::Loss,
            &scores,
            &[],
            &dir.path().join("st"),
        )
        .unwrap();
        assert_eq!(s[0].difficulty, Some((0.0, 0.5)));
        assert_eq!(s[1].difficulty, Some((1.5, 2.5)));
        let easy = std::fs::read_to_string(&s[0].dataset_path).unwrap();
        assert_eq!(easy, format!("{}\n{}\n", lines[2], lines[0]));
        // Scores missing or of the wrong count: an error naming `scores`.
        for bad in [&scores[..0], &scores[..3]] {
            let e = split_by_difficulty(&d, 2, DifficultyMeasure::Loss, bad, &[], dir.path())
                .unwrap_err();
            let ProtocolError::Invalid { field, hint, .. } = &e else {
                panic!("{e:?}")
            };
            assert_eq!(field, "scores");
            assert!(hint.as_deref().unwrap().contains("per_sample"), "{e:?}");
        }
    }
}
