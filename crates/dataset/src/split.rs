//! A deterministic, seeded train/eval split, written atomically as JSON lines.
//!
//! Pass 1 hashes every row (whitespace-normalised, as for duplicate detection) and
//! keeps one `(key, row)` pair per kept row, where `key = xxh3(seed, content hash)`.
//! The eval set is the `eval_size` rows with the smallest keys. Because the key
//! depends on the content and the seed only, the split is the same on every machine
//! and run, and copies of one row always land on the same side (no train/eval leak,
//! even with `dedup` off). Pass 2 re-reads the data and writes `train.jsonl` and
//! `eval.jsonl` (JSON lines keep their original bytes), then `split_manifest.json`
//! with the counts, the seed and the sha256 of both files. Rows keep their input order.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use lora_spec::contracts::dataset::FileFormat;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::analyze::row_hash;
use crate::error::{DatasetError, Result};
use crate::source::{self, ReadOptions, RowCtx, RowSink};

/// What to split and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitOptions {
    /// The dataset (file or folder).
    pub input: PathBuf,
    /// Its format.
    pub format: FileFormat,
    /// Where `train.jsonl`, `eval.jsonl` and `split_manifest.json` go.
    pub out_dir: PathBuf,
    /// Fraction of the kept rows that go to eval (used when `eval_size` is not set).
    pub eval_fraction: f64,
    /// Exact number of eval rows.
    pub eval_size: Option<u64>,
    /// Seed of the split.
    pub seed: u64,
    /// Drop exact duplicates (after whitespace normalisation), keeping the first copy.
    pub dedup: bool,
    /// Longest accepted record in bytes.
    pub max_record_bytes: u64,
}

impl SplitOptions {
    /// Defaults: 10% eval, seed 42, dedup on, 32 MiB records.
    pub fn new(input: impl Into<PathBuf>, out_dir: impl Into<PathBuf>) -> Self {
        Self {
            input: input.into(),
            format: FileFormat::Auto,
            out_dir: out_dir.into(),
            eval_fraction: 0.1,
            eval_size: None,
            seed: 42,
            dedup: true,
            max_record_bytes: 32 * 1024 * 1024,
        }
    }
}

/// What the split wrote (also saved as `split_manifest.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitReport {
    /// The input.
    pub input: String,
    /// The seed.
    pub seed: u64,
    /// Rows written to train.
    pub train_rows: u64,
    /// Rows written to eval.
    pub eval_rows: u64,
    /// Exact duplicates dropped.
    pub duplicates_dropped: u64,
    /// Unreadable rows skipped.
    pub invalid_rows_skipped: u64,
    /// `train.jsonl`.
    pub train_path: String,
    /// `eval.jsonl`.
    pub eval_path: String,
    /// sha256 of `train.jsonl`.
    pub train_sha256: String,
    /// sha256 of `eval.jsonl`.
    pub eval_sha256: String,
}

struct HashSink;

impl RowSink for HashSink {
    type Chunk = Vec<Option<u128>>;
    fn start(&self, _file: usize) -> Self::Chunk {
        Vec::with_capacity(4096)
    }
    fn row(&self, c: &mut Self::Chunk, row: &RowCtx<'_>) {
        let mut scratch = Vec::new();
        c.push(Some(row_hash(row.val, &mut scratch)));
    }
    fn invalid(&self, c: &mut Self::Chunk, _line: Option<u64>, _reason: String) {
        c.push(None);
    }
}

struct WriteSink;

impl RowSink for WriteSink {
    type Chunk = Vec<Option<(u128, Vec<u8>)>>;
    fn start(&self, _file: usize) -> Self::Chunk {
        Vec::with_capacity(4096)
    }
    fn row(&self, c: &mut Self::Chunk, row: &RowCtx<'_>) {
        let mut scratch = Vec::new();
        let h = row_hash(row.val, &mut scratch);
        let bytes = match row.raw {
            Some(r) => r.to_vec(),
            None => serde_json::to_vec(row.val).unwrap_or_default(),
        };
        c.push(Some((h, bytes)));
    }
    fn invalid(&self, c: &mut Self::Chunk, _line: Option<u64>, _reason: String) {
        c.push(None);
    }
}

struct HashingWriter<'f> {
    out: BufWriter<&'f mut std::fs::File>,
    sha: Sha256,
    rows: u64,
}

impl HashingWriter<'_> {
    fn line(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.out.write_all(bytes)?;
        self.out.write_all(b"\n")?;
        self.sha.update(bytes);
        self.sha.update(b"\n");
        self.rows += 1;
        Ok(())
    }
}

/// Splits the dataset; `control(done_bytes, total_bytes)` reports progress and may cancel.
pub fn split_dataset(
    opts: &SplitOptions,
    control: &mut dyn FnMut(u64, u64) -> Result<()>,
) -> Result<SplitReport> {
    if !(0.0..1.0).contains(&opts.eval_fraction) {
        return Err(DatasetError::option(
            "eval_fraction",
            format!("must be in [0, 1) (got {})", opts.eval_fraction),
            "for example 0.1",
        ));
    }
    let resolved = source::resolve(&opts.input, opts.format)?;
    let total: u64 = resolved.files.iter().map(|f| f.size).sum();
    let read = ReadOptions {
        max_record_bytes: opts.max_record_bytes,
        ..ReadOptions::default()
    };
    // Pass 1: keys of kept rows.
    let mut seen: std::collections::HashSet<u128, crate::analyze::PassThroughBuild> =
        Default::default();
    let mut keys: Vec<(u64, u64)> = Vec::new();
    let mut dropped: Vec<u64> = Vec::new();
    let mut row_id = 0u64;
    let mut invalid = 0u64;
    let mut duplicates = 0u64;
    source::read_rows(
        &resolved.files,
        &read,
        &HashSink,
        &mut |chunk| {
            for h in chunk {
                match h {
                    None => invalid += 1,
                    Some(h) => {
                        let id = row_id;
                        row_id += 1;
                        if opts.dedup && !seen.insert(h) {
                            duplicates += 1;
                            let (w, b) = ((id / 64) as usize, id % 64);
                            if dropped.len() <= w {
                                dropped.resize(w + 1, 0);
                            }
                            dropped[w] |= 1 << b;
                            continue;
                        }
                        keys.push((xxh3_64_with_seed(&h.to_le_bytes(), opts.seed), id));
                    }
                }
            }
            Ok(())
        },
        &mut |done| control(done / 2, total),
    )?;
    drop(seen);
    let kept = keys.len() as u64;
    if kept == 0 {
        return Err(DatasetError::invalid(
            &opts.input,
            None,
            "no valid record to split",
            "profile the dataset (lora-trainer dataset analyze) to see why",
        ));
    }
    let eval_n = match opts.eval_size {
        Some(n) => n.min(kept.saturating_sub(1)),
        None => ((kept as f64) * opts.eval_fraction).round() as u64,
    };
    let threshold = if eval_n == 0 {
        None
    } else {
        let k = (eval_n - 1) as usize;
        keys.select_nth_unstable(k);
        Some(keys[k])
    };
    // Which rows go to eval: mark them in a bitset (keys are no longer needed).
    let mut eval_bits: Vec<u64> = vec![0; (row_id as usize).div_ceil(64)];
    if let Some(t) = threshold {
        for &(k, id) in &keys {
            if (k, id) <= t {
                eval_bits[(id / 64) as usize] |= 1 << (id % 64);
            }
        }
    }
    drop(keys);
    let bit = |v: &[u64], id: u64| {
        v.get((id / 64) as usize)
            .is_some_and(|w| w & (1 << (id % 64)) != 0)
    };

    // Pass 2: write.
    let train_path = opts.out_dir.join("train.jsonl");
    let eval_path = opts.out_dir.join("eval.jsonl");
    std::fs::create_dir_all(&opts.out_dir).map_err(|e| DatasetError::io(&opts.out_dir, e))?;
    let mut hashes = (String::new(), String::new(), 0u64, 0u64);
    let mut inner_err: Option<DatasetError> = None;
    let res = lora_skill::fs::write_atomic_with(&train_path, |tf| {
        lora_skill::fs::write_atomic_with(&eval_path, |ef| {
            let mut train = HashingWriter {
                out: BufWriter::with_capacity(1 << 20, tf),
                sha: Sha256::new(),
                rows: 0,
            };
            let mut eval = HashingWriter {
                out: BufWriter::with_capacity(1 << 20, ef),
                sha: Sha256::new(),
                rows: 0,
            };
            let mut id = 0u64;
            let r = source::read_rows(
                &resolved.files,
                &read,
                &WriteSink,
                &mut |chunk| {
                    for row in chunk {
                        let Some((_, bytes)) = row else { continue };
                        let this = id;
                        id += 1;
                        if bit(&dropped, this) {
                            continue;
                        }
                        let w = if bit(&eval_bits, this) {
                            &mut eval
                        } else {
                            &mut train
                        };
                        w.line(&bytes)
                            .map_err(|e| DatasetError::io(&opts.out_dir, e))?;
                    }
                    Ok(())
                },
                &mut |done| control(total / 2 + done / 2, total),
            );
            if let Err(e) = r {
                inner_err = Some(e);
                return Err(std::io::Error::other("split stopped"));
            }
            train.out.flush()?;
            eval.out.flush()?;
            hashes = (
                hex::encode(train.sha.finalize()),
                hex::encode(eval.sha.finalize()),
                train.rows,
                eval.rows,
            );
            Ok(())
        })
    });
    if let Some(e) = inner_err {
        return Err(e);
    }
    res.map_err(|e| DatasetError::io(&opts.out_dir, e))?;
    let report = SplitReport {
        input: opts.input.display().to_string(),
        seed: opts.seed,
        train_rows: hashes.2,
        eval_rows: hashes.3,
        duplicates_dropped: duplicates,
        invalid_rows_skipped: invalid,
        train_path: train_path.display().to_string(),
        eval_path: eval_path.display().to_string(),
        train_sha256: hashes.0,
        eval_sha256: hashes.1,
    };
    let manifest = opts.out_dir.join("split_manifest.json");
    lora_skill::fs::write_json_atomic(&manifest, &report)
        .map_err(|e| DatasetError::io(&manifest, e))?;
    Ok(report)
}

/// The manifest path of a split folder.
pub fn manifest_path(out_dir: &Path) -> PathBuf {
    out_dir.join("split_manifest.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(p: &Path) -> Vec<String> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(String::from)
            .collect()
    }

    #[test]
    fn split_is_seeded_deterministic_deduplicated_and_leak_free() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("d.jsonl");
        let mut s = String::new();
        for i in 0..1000 {
            s.push_str(&format!("{{\"text\": \"row {}\"}}\n", i % 900)); // 100 duplicates
        }
        s.push_str("not json\n");
        std::fs::write(&input, s).unwrap();

        let mut o = SplitOptions::new(&input, dir.path().join("a"));
        let a = split_dataset(&o, &mut |_, _| Ok(())).unwrap();
        assert_eq!(a.duplicates_dropped, 100);
        assert_eq!(a.invalid_rows_skipped, 1);
        assert_eq!((a.train_rows, a.eval_rows), (810, 90));
        let ta = lines(&dir.path().join("a/train.jsonl"));
        let ea = lines(&dir.path().join("a/eval.jsonl"));
        assert_eq!(ta.len(), 810);
        // Original bytes are kept for JSON lines.
        assert!(ta[0].starts_with("{\"text\": \"row "));
        let manifest: SplitReport =
            serde_json::from_slice(&std::fs::read(manifest_path(&dir.path().join("a"))).unwrap())
                .unwrap();
        assert_eq!(manifest, a);
        use sha2::Digest;
        assert_eq!(
            hex::encode(Sha256::digest(
                std::fs::read(dir.path().join("a/eval.jsonl")).unwrap()
            )),
            a.eval_sha256
        );

        // Same seed, same split; another seed, another split.
        o.out_dir = dir.path().join("b");
        let b = split_dataset(&o, &mut |_, _| Ok(())).unwrap();
        assert_eq!(
            (b.train_sha256.clone(), b.eval_sha256.clone()),
            (a.train_sha256.clone(), a.eval_sha256.clone())
        );
        o.out_dir = dir.path().join("c");
        o.seed = 7;
        let c = split_dataset(&o, &mut |_, _| Ok(())).unwrap();
        assert_ne!(c.eval_sha256, a.eval_sha256);

        // Without dedup, copies of a row always land on the same side.
        o.out_dir = dir.path().join("d");
        o.dedup = false;
        o.eval_size = Some(200);
        let d = split_dataset(&o, &mut |_, _| Ok(())).unwrap();
        assert_eq!(d.eval_rows, 200);
        assert_eq!(d.train_rows, 800);
        let train: std::collections::HashSet<String> = lines(&dir.path().join("d/train.jsonl"))
            .into_iter()
            .collect();
        assert!(
            lines(&dir.path().join("d/eval.jsonl"))
                .iter()
                .all(|l| !train.contains(l))
        );
        assert!(ea.iter().all(|l| !ta.contains(l)));
    }

    #[test]
    fn csv_input_becomes_jsonl_and_bad_options_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("d.csv");
        let mut s = String::from("prompt,completion\n");
        for i in 0..20 {
            s.push_str(&format!("\"p, {i}\",c{i}\n"));
        }
        std::fs::write(&input, s).unwrap();
        let mut o = SplitOptions::new(&input, dir.path().join("out"));
        o.eval_fraction = 0.25;
        let r = split_dataset(&o, &mut |_, _| Ok(())).unwrap();
        assert_eq!((r.train_rows, r.eval_rows), (15, 5));
        let first: serde_json::Value =
            serde_json::from_str(&lines(&dir.path().join("out/eval.jsonl"))[0]).unwrap();
        assert!(first["prompt"].as_str().unwrap().starts_with("p, "));
        o.eval_fraction = 1.5;
        let e = split_dataset(&o, &mut |_, _| Ok(())).unwrap_err();
        assert!(e.to_string().contains("eval_fraction"));
        // Cancellation leaves no partial files behind.
        o.eval_fraction = 0.1;
        o.out_dir = dir.path().join("cancelled");
        let e = split_dataset(&o, &mut |_, _| Err(DatasetError::Cancelled)).unwrap_err();
        assert!(matches!(e, DatasetError::Cancelled));
        assert!(!dir.path().join("cancelled/train.jsonl").exists());
    }
}
