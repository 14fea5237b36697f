//! The dataset profile: counts, layouts, invalid rows, targets, duplicates and token lengths,
//! computed in one streaming pass with bounded memory.
//!
//! Memory: the reader holds a few chunks of input; duplicate detection keeps one
//! 128-bit hash and a row reference per distinct row (~40 bytes); the token
//! histogram is an HDR histogram of fixed size; the token sample keeps
//! `sample_size` rows. Near-duplicate search adds 8 band keys per row.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::path::{Path, PathBuf};

use hdrhistogram::Histogram;
use lora_spec::contracts::dataset::{
    ColumnGap, DatasetAnalyzeInput, DatasetProfile, DetectedRecordFormat, HistogramBin, RowIssue,
    TokenCounterInfo, TokenPercentiles,
};
use tokenizers::Tokenizer;
use xxhash_rust::xxh3::xxh3_128;

use crate::error::{DatasetError, Result};
use crate::minhash;
use crate::records::{TargetState, classify};
use crate::source::{self, DataFile, ReadOptions, RowCtx, RowSink};
use crate::tokens::{self, LoadedTokenizer};
use crate::value::Val;

/// A hasher for keys that are already uniform hashes.
#[derive(Default, Clone, Copy)]
pub(crate) struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, i: u64) {
        self.0 = i;
    }
    fn write_u128(&mut self, i: u128) {
        self.0 = i as u64;
    }
}

pub(crate) type PassThroughBuild = BuildHasherDefault<PassThrough>;

/// Appends the whitespace-normalised form of `s` (runs of whitespace become one space,
/// leading and trailing whitespace dropped).
pub(crate) fn push_normalized(s: &str, out: &mut Vec<u8>) {
    let b = s.as_bytes();
    // Fast path: already normalised ASCII (no tab/newline/CR/VT/FF, no double, leading or
    // trailing space) is copied as is. SIMD scans, no per-byte loop.
    if s.is_ascii()
        && memchr::memchr3(b'\t', b'\n', b'\r', b).is_none()
        && memchr::memchr2(0x0b, 0x0c, b).is_none()
        && b.first() != Some(&b' ')
        && b.last() != Some(&b' ')
        && memchr::memmem::find(b, b"  ").is_none()
    {
        out.extend_from_slice(b);
        return;
    }
    if s.is_ascii() {
        let mut pending = false;
        let mut started = false;
        for &b in s.as_bytes() {
            if b.is_ascii_whitespace() || b == 0x0b {
                pending = started;
            } else {
                if pending {
                    out.push(b' ');
                    pending = false;
                }
                out.push(b);
                started = true;
            }
        }
    } else {
        for (i, w) in s.split_whitespace().enumerate() {
            if i > 0 {
                out.push(b' ');
            }
            out.extend_from_slice(w.as_bytes());
        }
    }
}

/// Appends a canonical, whitespace-normalised encoding of `v` (map keys sorted).
pub(crate) fn canonical(v: &Val<'_>, out: &mut Vec<u8>) {
    match v {
        Val::Null => out.extend_from_slice(b"\x00n"),
        Val::Bool(b) => out.extend_from_slice(if *b { b"\x00t" } else { b"\x00f" }),
        Val::Int(i) => {
            out.push(0x01);
            out.extend_from_slice(i.to_string().as_bytes());
        }
        Val::UInt(u) => {
            out.push(0x01);
            out.extend_from_slice(u.to_string().as_bytes());
        }
        Val::Float(x) => {
            out.push(0x01);
            out.extend_from_slice(x.to_string().as_bytes());
        }
        Val::Str(s) => {
            out.push(0x02);
            push_normalized(s, out);
            out.push(0x03);
        }
        Val::List(l) => {
            out.push(0x04);
            for x in l {
                canonical(x, out);
            }
            out.push(0x05);
        }
        Val::Map(m) => {
            out.push(0x06);
            let entry = |i: usize, out: &mut Vec<u8>| {
                out.extend_from_slice(m[i].0.as_bytes());
                out.push(0x1f);
                canonical(&m[i].1, out);
            };
            if !m.windows(2).any(|w| w[0].0 > w[1].0) {
                (0..m.len()).for_each(|i| entry(i, out));
            } else if m.len() <= 16 {
                // Sort key indices without allocating (rows rarely have more than 16 fields).
                let mut idx = [0usize; 16];
                for (i, x) in idx.iter_mut().enumerate().take(m.len()) {
                    *x = i;
                }
                idx[..m.len()].sort_unstable_by(|a, b| m[*a].0.cmp(&m[*b].0));
                idx[..m.len()].iter().for_each(|i| entry(*i, out));
            } else {
                let mut idx: Vec<usize> = (0..m.len()).collect();
                idx.sort_unstable_by(|a, b| m[*a].0.cmp(&m[*b].0));
                idx.into_iter().for_each(|i| entry(i, out));
            }
            out.push(0x07);
        }
    }
}

/// The 128-bit content hash of a row after whitespace normalisation.
pub fn row_hash(v: &Val<'_>, scratch: &mut Vec<u8>) -> u128 {
    scratch.clear();
    canonical(v, scratch);
    xxh3_128(scratch)
}

/// The text of a row for token counting: its text leaves joined by newlines.
pub(crate) fn row_text(v: &Val<'_>, out: &mut String) {
    out.clear();
    v.for_each_text(&mut |s| {
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(s);
    });
}

/// Characters of a row's text leaves (what the chars/4 estimate divides).
pub(crate) fn row_chars(v: &Val<'_>) -> u64 {
    let mut n = 0u64;
    v.for_each_text(&mut |s| {
        n += if s.is_ascii() {
            s.len()
        } else {
            s.chars().count()
        } as u64
    });
    n
}

struct RowFacts {
    hash: u128,
    est_tokens: u64,
    exact_tokens: Option<u64>,
    format: DetectedRecordFormat,
    target: TargetState,
    target_field: &'static str,
    sig: u64,
    bands: Option<Box<[u64; minhash::BANDS]>>,
}

enum Entry {
    Row(Option<u64>, RowFacts),
    Invalid(Option<u64>, String),
}

/// A sampled row, ordered by its sampling key.
pub(crate) struct Sampled {
    pub(crate) key: u64,
    pub(crate) file: usize,
    pub(crate) line: Option<u64>,
    pub(crate) val: Val<'static>,
}

impl PartialEq for Sampled {
    fn eq(&self, o: &Self) -> bool {
        self.key == o.key
    }
}
impl Eq for Sampled {}
impl PartialOrd for Sampled {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Sampled {
    fn cmp(&self, o: &Self) -> Ordering {
        self.key.cmp(&o.key)
    }
}

/// Keeps the `k` entries with the smallest keys.
pub(crate) fn push_bottom_k(
    heap: &mut BinaryHeap<Sampled>,
    k: usize,
    item: impl FnOnce() -> Sampled,
    key: u64,
) {
    if k == 0 {
        return;
    }
    if heap.len() < k {
        heap.push(item());
    } else if heap.peek().is_some_and(|top| key < top.key) {
        heap.pop();
        heap.push(item());
    }
}

struct Chunk {
    file: usize,
    entries: Vec<Entry>,
    sigs: Vec<(u64, Vec<String>)>,
    sample: BinaryHeap<Sampled>,
    scratch: Vec<u8>,
    text: String,
}

struct ProfileSink<'a> {
    exact_all: Option<&'a Tokenizer>,
    near: bool,
    sample_k: usize,
}

impl RowSink for ProfileSink<'_> {
    type Chunk = Chunk;

    fn start(&self, file: usize) -> Chunk {
        Chunk {
            file,
            entries: Vec::with_capacity(4096),
            sigs: Vec::new(),
            sample: BinaryHeap::new(),
            scratch: Vec::with_capacity(4096),
            text: String::new(),
        }
    }

    fn row(&self, c: &mut Chunk, row: &RowCtx<'_>) {
        let v = row.val;
        let cls = classify(v);
        if let Some(p) = cls.problem {
            c.entries.push(Entry::Invalid(row.line, p));
            return;
        }
        let hash = row_hash(v, &mut c.scratch);
        let est_tokens = row_chars(v) / 4;
        // Key signature of the row (its field names in order).
        let sig = v.as_map().map_or(0, |m| {
            m.iter().fold(0x51u64, |h, (k, _)| {
                xxhash_rust::xxh3::xxh3_64_with_seed(k.as_bytes(), h)
            })
        });
        if !c.sigs.iter().any(|(s, _)| *s == sig) {
            let keys = v
                .as_map()
                .map(|m| m.iter().map(|(k, _)| k.to_string()).collect())
                .unwrap_or_default();
            c.sigs.push((sig, keys));
        }
        let need_text = self.exact_all.is_some() || self.near;
        if need_text {
            row_text(v, &mut c.text);
        }
        let exact_tokens = self
            .exact_all
            .and_then(|t| tokens::count_tokens(t, &c.text));
        let bands = if self.near {
            minhash::band_keys(&c.text).map(Box::new)
        } else {
            None
        };
        let key = (hash >> 64) as u64;
        let (file, line) = (c.file, row.line);
        push_bottom_k(
            &mut c.sample,
            self.sample_k,
            || Sampled {
                key,
                file,
                line,
                val: v.clone().into_owned(),
            },
            key,
        );
        c.entries.push(Entry::Row(
            row.line,
            RowFacts {
                hash,
                est_tokens,
                exact_tokens,
                format: cls.format,
                target: cls.target,
                target_field: cls.target_field,
                sig,
                bands,
            },
        ));
    }

    fn invalid(&self, c: &mut Chunk, line: Option<u64>, reason: String) {
        c.entries.push(Entry::Invalid(line, reason));
    }
}

/// Token-length statistics accumulator.
pub(crate) struct LenStats {
    hist: Histogram<u64>,
    total: u128,
    max: u64,
    n: u64,
}

impl LenStats {
    pub(crate) fn new() -> Self {
        Self {
            // Auto-resizing, 3 significant digits: exact below 2048, within 0.1% above.
            #[allow(clippy::expect_used)] // reason: only sigfig > 5 is rejected; 3 is a constant
            hist: Histogram::new(3).expect("3 significant digits is a valid histogram precision"),
            total: 0,
            max: 0,
            n: 0,
        }
    }

    pub(crate) fn record(&mut self, v: u64) {
        self.hist.saturating_record(v);
        self.total += u128::from(v);
        self.max = self.max.max(v);
        self.n += 1;
    }

    pub(crate) fn avg(&self) -> f64 {
        if self.n == 0 {
            0.0
        } else {
            self.total as f64 / self.n as f64
        }
    }

    pub(crate) fn percentiles(&self) -> TokenPercentiles {
        if self.n == 0 {
            return TokenPercentiles::default();
        }
        let q = |p: f64| self.hist.value_at_quantile(p).min(self.max);
        TokenPercentiles {
            p50: q(0.50),
            p95: q(0.95),
            p99: q(0.99),
        }
    }

    /// Power-of-two bins from [0, 16) up to the bin holding the maximum.
    pub(crate) fn bins(&self) -> Vec<HistogramBin> {
        if self.n == 0 {
            return Vec::new();
        }
        let bin_of = |v: u64| -> usize {
            if v < 16 {
                0
            } else {
                (63 - v.leading_zeros() as usize) - 3
            }
        };
        let nbins = bin_of(self.max) + 1;
        let mut bins: Vec<HistogramBin> = (0..nbins)
            .map(|i| {
                let lo = if i == 0 { 0 } else { 16u64 << (i - 1) };
                HistogramBin {
                    lo,
                    hi: 16u64 << i,
                    count: 0,
                }
            })
            .collect();
        for it in self.hist.iter_recorded() {
            let v = self
                .hist
                .lowest_equivalent(it.value_iterated_to())
                .min(self.max);
            let b = bin_of(v).min(nbins - 1);
            bins[b].count += it.count_at_value();
        }
        bins
    }
}

/// Where an analysis runs.
#[derive(Debug, Clone, Default)]
pub struct AnalyzeEnv {
    /// Relative dataset and tokenizer paths are resolved against this folder.
    pub base_dir: PathBuf,
    /// The Hugging Face hub cache to look tokenizers up in (default: the usual env vars).
    pub hf_cache: Option<PathBuf>,
    /// Reader settings (`max_record_bytes` is taken from the input).
    pub read: ReadOptions,
}

/// The full result of an analysis: the profile, plus the sampled rows for callers
/// that want to look at them (rendering checks).
pub struct Analysis {
    /// The profile (the skill's output).
    pub profile: DatasetProfile,
    /// The loaded tokenizer, when one was asked for.
    pub tokenizer: Option<LoadedTokenizer>,
    /// The seeded sample of rows (up to `sample_size`), by sampling key.
    pub sample: Vec<(String, Option<u64>, Val<'static>)>,
}

impl std::fmt::Debug for Analysis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Analysis")
            .field("profile", &self.profile)
            .field("sample_rows", &self.sample.len())
            .finish()
    }
}

struct Merger {
    names: Vec<String>,
    rows_in_file: Vec<u64>,
    max_examples: usize,
    valid: u64,
    invalid: u64,
    invalid_examples: Vec<RowIssue>,
    /// Content hash -> first row, packed as `file << 40 | row`.
    dups: HashMap<u128, u64, PassThroughBuild>,
    duplicates: u64,
    duplicate_examples: Vec<RowIssue>,
    near: Option<(HashMap<u64, u64, PassThroughBuild>, u64)>,
    est: LenStats,
    exact: Option<LenStats>,
    formats: HashMap<DetectedRecordFormat, u64>,
    missing_targets: u64,
    empty_targets: u64,
    target_examples: Vec<RowIssue>,
    sigs: HashMap<u64, (u64, Vec<String>), PassThroughBuild>,
    columns: Vec<String>,
    sample: BinaryHeap<Sampled>,
    sample_k: usize,
}

impl Merger {
    fn issue(&self, file: usize, row: u64, line: Option<u64>, reason: String) -> RowIssue {
        RowIssue {
            file: self.names.get(file).cloned().unwrap_or_default(),
            row,
            line,
            reason,
        }
    }

    fn merge(&mut self, mut c: Chunk) {
        let file = c.file;
        for e in c.entries.drain(..) {
            self.rows_in_file[file] += 1;
            let row = self.rows_in_file[file];
            match e {
                Entry::Invalid(line, reason) => {
                    self.invalid += 1;
                    if self.invalid_examples.len() < self.max_examples {
                        let i = self.issue(file, row, line, reason);
                        self.invalid_examples.push(i);
                    }
                }
                Entry::Row(line, f) => {
                    self.valid += 1;
                    let rowid = self.valid;
                    let mut exact_dup = false;
                    match self.dups.entry(f.hash) {
                        std::collections::hash_map::Entry::Occupied(o) => {
                            exact_dup = true;
                            self.duplicates += 1;
                            if self.duplicate_examples.len() < self.max_examples {
                                let (of_file, of_row) =
                                    (*o.get() >> 40, *o.get() & ((1 << 40) - 1));
                                let reason = format!(
                                    "duplicate of row {of_row}{}",
                                    if of_file as usize == file {
                                        String::new()
                                    } else {
                                        format!(
                                            " of {}",
                                            self.names
                                                .get(of_file as usize)
                                                .cloned()
                                                .unwrap_or_default()
                                        )
                                    }
                                );
                                let i = self.issue(file, row, line, reason);
                                self.duplicate_examples.push(i);
                            }
                        }
                        std::collections::hash_map::Entry::Vacant(v) => {
                            v.insert(((file as u64) << 40) | (row & ((1 << 40) - 1)));
                        }
                    }
                    if let (Some((map, count)), Some(bands)) = (&mut self.near, &f.bands)
                        && !exact_dup
                    {
                        let mut hit = false;
                        for b in bands.iter() {
                            match map.entry(*b) {
                                std::collections::hash_map::Entry::Occupied(_) => hit = true,
                                std::collections::hash_map::Entry::Vacant(v) => {
                                    v.insert(rowid);
                                }
                            }
                        }
                        if hit {
                            *count += 1;
                        }
                    }
                    self.est.record(f.est_tokens);
                    if let (Some(ex), Some(t)) = (&mut self.exact, f.exact_tokens) {
                        ex.record(t);
                    }
                    *self.formats.entry(f.format).or_default() += 1;
                    let target_problem = match f.target {
                        TargetState::Missing => {
                            self.missing_targets += 1;
                            Some(format!("target {} is missing", f.target_field))
                        }
                        TargetState::Empty => {
                            self.empty_targets += 1;
                            Some(format!("target {} is empty", f.target_field))
                        }
                        _ => None,
                    };
                    if let Some(reason) = target_problem
                        && self.target_examples.len() < self.max_examples
                    {
                        let i = self.issue(file, row, line, reason);
                        self.target_examples.push(i);
                    }
                    let known = self.sigs.contains_key(&f.sig);
                    if known {
                        if let Some(s) = self.sigs.get_mut(&f.sig) {
                            s.0 += 1;
                        }
                    } else {
                        let keys = c
                            .sigs
                            .iter()
                            .find(|(s, _)| *s == f.sig)
                            .map(|(_, k)| k.clone())
                            .unwrap_or_default();
                        for k in &keys {
                            if !self.columns.contains(k) {
                                self.columns.push(k.clone());
                            }
                        }
                        self.sigs.insert(f.sig, (1, keys));
                    }
                }
            }
        }
        for s in c.sample.drain() {
            let key = s.key;
            push_bottom_k(&mut self.sample, self.sample_k, || s, key);
        }
    }
}

/// Profiles the dataset described by `input`. `control(done_bytes, total_bytes)` is called
/// as the read progresses; an error from it (cancellation) stops the analysis.
pub fn analyze(
    input: &DatasetAnalyzeInput,
    env: &AnalyzeEnv,
    control: &mut dyn FnMut(u64, u64) -> Result<()>,
) -> Result<Analysis> {
    if input.max_record_bytes < 1024 {
        return Err(DatasetError::option(
            "max_record_bytes",
            format!("must be at least 1024 (got {})", input.max_record_bytes),
            "the default is 33554432 (32 MiB)",
        ));
    }
    let path = if Path::new(&input.dataset_path).is_absolute() {
        PathBuf::from(&input.dataset_path)
    } else {
        env.base_dir.join(&input.dataset_path)
    };
    let resolved = source::resolve(&path, input.format)?;
    let tokenizer = match &input.tokenizer_name {
        Some(name) if !name.trim().is_empty() => Some(tokens::load_tokenizer(
            name,
            &env.base_dir,
            env.hf_cache.as_deref(),
        )?),
        _ => None,
    };
    let exact_all = input.sample_size == 0;
    let sample_k = if input.sample_size == 0 {
        // Every row is counted exactly; keep a small sample for rendering checks.
        if input.template.is_some() { 1000 } else { 0 }
    } else if tokenizer.is_some() || input.template.is_some() {
        usize::try_from(input.sample_size)
            .unwrap_or(usize::MAX)
            .min(1_000_000)
    } else {
        0
    };
    let sink = ProfileSink {
        exact_all: if exact_all {
            tokenizer.as_ref().map(|t| &t.tokenizer)
        } else {
            None
        },
        near: input.near_duplicates,
        sample_k,
    };
    let mut merger = Merger {
        names: resolved.files.iter().map(|f| f.name.clone()).collect(),
        rows_in_file: vec![0; resolved.files.len()],
        max_examples: input.max_examples as usize,
        valid: 0,
        invalid: 0,
        invalid_examples: Vec::new(),
        dups: HashMap::default(),
        duplicates: 0,
        duplicate_examples: Vec::new(),
        near: input.near_duplicates.then(|| (HashMap::default(), 0)),
        est: LenStats::new(),
        exact: (exact_all && tokenizer.is_some()).then(LenStats::new),
        formats: HashMap::new(),
        missing_targets: 0,
        empty_targets: 0,
        target_examples: Vec::new(),
        sigs: HashMap::default(),
        columns: Vec::new(),
        sample: BinaryHeap::new(),
        sample_k,
    };
    let total_bytes: u64 = resolved.files.iter().map(|f| f.size).sum();
    let read = ReadOptions {
        max_record_bytes: input.max_record_bytes,
        ..env.read
    };
    let totals = source::read_rows(
        &resolved.files,
        &read,
        &sink,
        &mut |c| {
            merger.merge(c);
            Ok(())
        },
        &mut |done| control(done.min(total_bytes), total_bytes),
    )?;

    if merger.valid == 0 {
        let first = merger.invalid_examples.first();
        let file0 = resolved
            .files
            .first()
            .map_or(path.clone(), |f| f.path.clone());
        return Err(match first {
            Some(i) => DatasetError::invalid(
                resolved
                    .files
                    .iter()
                    .find(|f| f.name == i.file)
                    .map_or(file0, |f| f.path.clone()),
                i.line,
                format!(
                    "no valid record among {} row(s); row {}: {}",
                    merger.invalid, i.row, i.reason
                ),
                "fix the file (one JSON object per line for .jsonl; a header row for .csv), or check format",
            ),
            None => DatasetError::invalid(
                file0,
                None,
                "the dataset has no records",
                "point dataset_path at a file with at least one record",
            ),
        });
    }

    // Exact token counts on the seeded sample.
    let sample: Vec<Sampled> = merger.sample.into_sorted_vec();
    let mut exact = merger.exact;
    let mut rows_counted = merger.valid;
    if let (Some(t), None) = (&tokenizer, &exact) {
        let texts: Vec<String> = sample
            .iter()
            .map(|s| {
                let mut out = String::new();
                row_text(&s.val, &mut out);
                out
            })
            .collect();
        let counts = count_parallel(&t.tokenizer, &texts, env.read.threads);
        let mut st = LenStats::new();
        for c in counts.into_iter().flatten() {
            st.record(c);
        }
        rows_counted = st.n;
        exact = Some(st);
    }
    let (stats, counter) = match (&tokenizer, &exact) {
        (Some(t), Some(st)) => (
            st,
            TokenCounterInfo {
                kind: "tokenizer".into(),
                exact: true,
                tokenizer_file: Some(t.file.display().to_string()),
                rows_counted,
                note: if rows_counted == merger.valid {
                    "exact: every row's text fields joined by newlines, no special tokens or template".into()
                } else {
                    format!(
                        "exact on a seeded sample of {rows_counted} of {} rows (text fields joined by newlines, no special tokens or template); sample_size 0 counts every row",
                        merger.valid
                    )
                },
            },
        ),
        _ => (
            &merger.est,
            TokenCounterInfo {
                kind: "chars_div_4".into(),
                exact: false,
                tokenizer_file: None,
                rows_counted: merger.valid,
                note: "estimate: characters of all text fields / 4, rounded down per row (no tokenizer_name given)".into(),
            },
        ),
    };

    let mut columns = totals.schema_columns.clone();
    for c in &merger.columns {
        if !columns.contains(c) {
            columns.push(c.clone());
        }
    }
    let mut column_gaps = Vec::new();
    for c in &columns {
        let present: u64 = merger
            .sigs
            .values()
            .filter(|(_, keys)| keys.contains(c))
            .map(|(n, _)| *n)
            .sum();
        if present < merger.valid {
            column_gaps.push(ColumnGap {
                column: c.clone(),
                rows_missing: merger.valid - present,
            });
        }
    }
    let mut formats: Vec<(DetectedRecordFormat, u64)> = merger.formats.into_iter().collect();
    formats.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let record_format = formats
        .first()
        .map_or(DetectedRecordFormat::Unknown, |f| f.0);

    let mut warnings: Vec<String> = resolved.notes.clone();
    warnings.extend(totals.notes.iter().cloned());
    let total_rows = merger.valid + merger.invalid;
    let pct = |n: u64| 100.0 * n as f64 / total_rows.max(1) as f64;
    if merger.invalid > 0 {
        warnings.push(format!(
            "{} of {total_rows} rows ({:.2}%) could not be read and are skipped (see invalid_examples)",
            merger.invalid,
            pct(merger.invalid)
        ));
    }
    if merger.duplicates > 0 {
        warnings.push(format!(
            "{} exact duplicate rows ({:.2}%): they over-weight those samples and can leak into an eval split",
            merger.duplicates,
            pct(merger.duplicates)
        ));
    }
    if merger.missing_targets + merger.empty_targets > 0 {
        warnings.push(format!(
            "{} rows have a missing and {} an empty target: they teach the model nothing (or to stop at once)",
            merger.missing_targets, merger.empty_targets
        ));
    }
    if formats.len() > 1 {
        let list: Vec<String> = formats
            .iter()
            .map(|(f, n)| format!("{} {n}", f.as_str()))
            .collect();
        warnings.push(format!("rows have mixed layouts: {}", list.join(", ")));
    }
    if record_format == DetectedRecordFormat::Unknown {
        warnings.push(
            "no known record layout: use instruction/input/output (alpaca), messages [{role, content}], conversations [{from, value}], prompt/completion, question/sql or text"
                .into(),
        );
    }
    if merger.valid < 100 {
        warnings.push(format!(
            "only {} samples: LoRA usually needs at least a few hundred",
            merger.valid
        ));
    }

    let formats_map = formats
        .iter()
        .map(|(f, n)| (f.as_str().to_string(), *n))
        .collect();
    let profile = DatasetProfile {
        total_samples: merger.valid,
        format_detected: resolved.format.as_str().to_string(),
        has_instruction: columns.iter().any(|c| c == "instruction"),
        has_output: columns.iter().any(|c| c == "output"),
        avg_tokens: (stats.avg() * 100.0).round() / 100.0,
        max_tokens: stats.max,
        columns,
        duplicates_found: merger.duplicates,
        record_format,
        record_formats: formats_map,
        files: resolved.files.iter().map(|f| f.name.clone()).collect(),
        bytes_read: totals.bytes,
        invalid_rows: merger.invalid,
        invalid_examples: merger.invalid_examples,
        missing_targets: merger.missing_targets,
        empty_targets: merger.empty_targets,
        target_examples: merger.target_examples,
        column_gaps,
        duplicate_examples: merger.duplicate_examples,
        near_duplicates_found: merger.near.map(|(_, n)| n),
        token_counter: counter,
        token_percentiles: stats.percentiles(),
        token_histogram: stats.bins(),
        render_check: None,
        warnings,
    };
    let names: Vec<String> = resolved
        .files
        .iter()
        .map(|f: &DataFile| f.name.clone())
        .collect();
    Ok(Analysis {
        profile,
        tokenizer,
        sample: sample
            .into_iter()
            .map(|s| {
                (
                    names.get(s.file).cloned().unwrap_or_default(),
                    s.line,
                    s.val,
                )
            })
            .collect(),
    })
}

/// Counts tokens of `texts` on up to `threads` threads (0 = one per core).
pub(crate) fn count_parallel(
    tok: &Tokenizer,
    texts: &[String],
    threads: usize,
) -> Vec<Option<u64>> {
    let threads = if threads == 0 {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    } else {
        threads
    }
    .max(1);
    let per = texts.len().div_ceil(threads).max(1);
    let mut out: Vec<Option<u64>> = Vec::with_capacity(texts.len());
    std::thread::scope(|s| {
        let handles: Vec<_> = texts
            .chunks(per)
            .map(|part| {
                s.spawn(move || {
                    part.iter()
                        .map(|t| tokens::count_tokens(tok, t))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for h in handles {
            match h.join() {
                Ok(v) => out.extend(v),
                Err(_) => out.extend(std::iter::repeat_n(None, per)),
            }
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(s: &str) -> String {
        let mut out = Vec::new();
        push_normalized(s, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn whitespace_normalisation_fast_and_slow_paths_agree() {
        assert_eq!(norm("a b c"), "a b c");
        assert_eq!(norm("  a  b\tc\n"), "a b c");
        assert_eq!(norm("a\u{0b}b\u{0c}c\r\n"), "a b c");
        assert_eq!(norm("ünï  côde\u{a0}x "), "ünï côde x");
        assert_eq!(norm(""), "");
        assert_eq!(norm("   "), "");
        let mut a = Vec::new();
        let mut b = Vec::new();
        let v1: Val = serde_json::from_str(r#"{"b":"x  y","a":[1,"z"]}"#).unwrap();
        let v2: Val = serde_json::from_str(r#"{"a":[1," z "],"b":"x y"}"#).unwrap();
        assert_eq!(
            row_hash(&v1, &mut a),
            row_hash(&v2, &mut b),
            "key order and spacing do not matter"
        );
        let v3: Val = serde_json::from_str(r#"{"a":[1,"z"],"b":"xy"}"#).unwrap();
        assert_ne!(row_hash(&v1, &mut a), row_hash(&v3, &mut b));
    }
}
