//! Files around the trials: the seeded train/eval split, finding a trial's
//! latest checkpoint, reading its loss curve, hashing.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::OrchestratorError;

/// Splits a JSON-lines file into `train.jsonl` and `eval.jsonl` under
/// `out_dir`: each non-empty line goes to eval when a seeded hash of its
/// index falls under `fraction`, so the split is the same on every run.
/// At least one line lands on each side (when there are two or more).
/// Returns `(train, eval)` paths.
pub fn split_jsonl(
    src: &Path,
    fraction: f64,
    seed: u64,
    out_dir: &Path,
) -> Result<(PathBuf, PathBuf), OrchestratorError> {
    let text = std::fs::read_to_string(src).map_err(|e| OrchestratorError::io(src, e))?;
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.len() < 2 {
        return Err(OrchestratorError::Invalid {
            field: "dataset.path".into(),
            message: format!(
                "{} has {} record(s): too few to hold out evaluation data",
                src.display(),
                lines.len()
            ),
            hint: "add records, or give held-out data with dataset.eval_path".into(),
        });
    }
    let mut is_eval: Vec<bool> = (0..lines.len())
        .map(|i| unit_hash(seed, i as u64) < fraction)
        .collect();
    if !is_eval.iter().any(|e| *e) {
        // The line with the smallest hash goes to eval.
        if let Some(i) = (0..lines.len())
            .min_by(|a, b| unit_hash(seed, *a as u64).total_cmp(&unit_hash(seed, *b as u64)))
        {
            is_eval[i] = true;
        }
    }
    if is_eval.iter().all(|e| *e) {
        is_eval[0] = false;
    }
    let mut train = String::new();
    let mut eval = String::new();
    for (line, e) in lines.iter().zip(&is_eval) {
        let dst = if *e { &mut eval } else { &mut train };
        dst.push_str(line);
        dst.push('\n');
    }
    let train_path = out_dir.join("train.jsonl");
    let eval_path = out_dir.join("eval.jsonl");
    lora_skill::fs::write_atomic(&train_path, train.as_bytes())
        .map_err(|e| OrchestratorError::io(&train_path, e))?;
    lora_skill::fs::write_atomic(&eval_path, eval.as_bytes())
        .map_err(|e| OrchestratorError::io(&eval_path, e))?;
    Ok((train_path, eval_path))
}

/// A number in [0, 1) from `(seed, index)` (SHA-256, so it is the same everywhere).
fn unit_hash(seed: u64, index: u64) -> f64 {
    let mut h = Sha256::new();
    h.update(seed.to_le_bytes());
    h.update(index.to_le_bytes());
    let d = h.finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

/// Whether `path` looks like a JSON-lines file the split can handle.
pub fn is_jsonl(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("jsonl" | "ndjson")
    )
}

/// The step number of a checkpoint folder name: `checkpoint-120`, `step-120`,
/// `step_120`, `checkpoint_120` (the Hugging Face Trainer's convention and its
/// variants). Hidden or temporary folders (a leading `.`, a `.tmp` suffix) are not checkpoints.
fn checkpoint_step(name: &str) -> Option<u64> {
    if name.starts_with('.') || name.ends_with(".tmp") || name.contains(".tmp-") {
        return None;
    }
    for prefix in ["checkpoint-", "checkpoint_", "step-", "step_"] {
        if let Some(rest) = name.strip_prefix(prefix) {
            return rest.parse().ok();
        }
    }
    None
}

/// The latest complete checkpoint of a trial folder: the highest-numbered
/// checkpoint folder directly in `output_dir` or in `output_dir/checkpoints`.
/// A folder holding no visible file (a writer killed between creating it and
/// filling it) is not a checkpoint.
pub fn latest_checkpoint(output_dir: &Path) -> Option<PathBuf> {
    let mut best: Option<(u64, PathBuf)> = None;
    for dir in [output_dir.to_path_buf(), output_dir.join("checkpoints")] {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in rd.flatten() {
            let path = entry.path();
            if !path.is_dir() {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(step) = checkpoint_step(&name)
                && best.as_ref().is_none_or(|(s, _)| step > *s)
                && has_visible_file(&path)
            {
                best = Some((step, path));
            }
        }
    }
    best.map(|(_, p)| p)
}

/// Whether `dir` holds a file or folder whose name does not start with `.`.
fn has_visible_file(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|rd| {
        rd.flatten()
            .any(|e| !e.file_name().to_string_lossy().starts_with('.'))
    })
}

/// One point of a loss curve.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CurvePoint {
    /// Optimiser step.
    pub step: f64,
    /// Training loss.
    pub loss: f64,
}

/// Reads `metrics.jsonl` of a trial folder: one JSON object per line with
/// `step` and `loss` (other keys ignored; eval lines with `eval_loss` are
/// returned separately). Missing file: empty curves. Unreadable lines are skipped.
pub fn read_curves(output_dir: &Path) -> (Vec<CurvePoint>, Vec<CurvePoint>) {
    let mut train = Vec::new();
    let mut eval = Vec::new();
    let Ok(text) = std::fs::read_to_string(output_dir.join("metrics.jsonl")) else {
        return (train, eval);
    };
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(step) = v.get("step").and_then(|s| s.as_f64()) else {
            continue;
        };
        if let Some(loss) = v
            .get("loss")
            .and_then(|l| l.as_f64())
            .filter(|l| l.is_finite())
        {
            train.push(CurvePoint { step, loss });
        }
        if let Some(loss) = v
            .get("eval_loss")
            .and_then(|l| l.as_f64())
            .filter(|l| l.is_finite())
        {
            eval.push(CurvePoint { step, loss });
        }
    }
    (train, eval)
}

/// Removes a file or a folder if it exists.
pub fn remove_path(path: &Path) -> Result<(), OrchestratorError> {
    let r = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else if path.exists() {
        std::fs::remove_file(path)
    } else {
        Ok(())
    };
    r.map_err(|e| OrchestratorError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_is_deterministic_and_keeps_every_line_once() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("d.jsonl");
        let text: String = (0..200).map(|i| format!("{{\"i\": {i}}}\n")).collect();
        std::fs::write(&src, &text).unwrap();
        let (t, e) = split_jsonl(&src, 0.1, 7, &dir.path().join("a")).unwrap();
        let (t2, e2) = split_jsonl(&src, 0.1, 7, &dir.path().join("b")).unwrap();
        let read = |p: &Path| std::fs::read_to_string(p).unwrap();
        assert_eq!(read(&t), read(&t2));
        assert_eq!(read(&e), read(&e2));
        let n_eval = read(&e).lines().count();
        assert!((8..=35).contains(&n_eval), "{n_eval}");
        assert_eq!(read(&t).lines().count() + n_eval, 200);
        let (_, e3) = split_jsonl(&src, 0.1, 8, &dir.path().join("c")).unwrap();
        assert_ne!(read(&e), read(&e3), "another seed, another split");
    }

    #[test]
    fn tiny_files_still_get_both_sides_or_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("d.jsonl");
        std::fs::write(&src, "{\"a\":1}\n{\"a\":2}\n").unwrap();
        let (t, e) = split_jsonl(&src, 0.01, 1, dir.path()).unwrap();
        assert_eq!(std::fs::read_to_string(t).unwrap().lines().count(), 1);
        assert_eq!(std::fs::read_to_string(e).unwrap().lines().count(), 1);
        std::fs::write(&src, "{\"a\":1}\n").unwrap();
        let err = split_jsonl(&src, 0.1, 1, dir.path()).unwrap_err();
        assert!(err.to_string().contains("too few"));
    }

    #[test]
    fn latest_checkpoint_ignores_temporary_folders() {
        let dir = tempfile::tempdir().unwrap();
        assert!(latest_checkpoint(dir.path()).is_none());
        for n in [
            "checkpoint-5",
            "checkpoint-20",
            ".checkpoint-30.tmp",
            "checkpoint-9",
            "checkpoints/step-25",
        ] {
            std::fs::create_dir_all(dir.path().join(n)).unwrap();
            std::fs::write(dir.path().join(n).join("state.json"), "{}").unwrap();
        }
        assert_eq!(
            latest_checkpoint(dir.path()).unwrap(),
            dir.path().join("checkpoints/step-25")
        );
        // A writer killed after creating the folder, before filling it.
        std::fs::create_dir_all(dir.path().join("checkpoint-40")).unwrap();
        std::fs::write(dir.path().join("checkpoint-40/.state.json.tmp"), "{").unwrap();
        assert_eq!(
            latest_checkpoint(dir.path()).unwrap(),
            dir.path().join("checkpoints/step-25"),
            "an empty checkpoint folder is skipped"
        );
    }

    #[test]
    fn curves_skip_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("metrics.jsonl"),
            "{\"step\":1,\"loss\":2.0}\nnot json\n{\"step\":2,\"loss\":1.5,\"eval_loss\":1.7}\n{\"step\":3,\"loss\":NaN}\n",
        )
        .unwrap();
        let (t, e) = read_curves(dir.path());
        assert_eq!(t.len(), 2);
        assert_eq!(
            e,
            vec![CurvePoint {
                step: 2.0,
                loss: 1.7
            }]
        );
    }
}
