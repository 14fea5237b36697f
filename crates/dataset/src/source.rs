//! Finding the data files behind a dataset path and streaming their rows.
//!
//! [`resolve`] turns a path and a [`FileFormat`] into the list of files to
//! read (one file, a `datasets.save_to_disk` folder, or a hub-style folder of
//! shards). [`read_rows`] streams every row of those files through a
//! [`RowSink`] on worker threads with bounded memory: JSON lines are cut into
//! chunks of whole lines on the reading thread and parsed by the workers; CSV,
//! JSON arrays, Parquet and Arrow are decoded on the reading thread into
//! batches of rows that the workers analyse. Results are merged in file order.
//! A line longer than `max_record_bytes` is skipped without being buffered and
//! reported as an invalid row.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, channel, sync_channel};
use std::sync::{Arc, Mutex};

use lora_spec::contracts::dataset::FileFormat;
use serde::de::{DeserializeSeed, SeqAccess, Visitor};

use crate::columnar;
use crate::error::{DatasetError, Result};
use crate::value::Val;

/// The concrete encoding of one data file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileKind {
    /// JSON lines.
    Jsonl,
    /// A JSON array of objects.
    JsonArray,
    /// Comma-separated values (header row first).
    Csv,
    /// Tab-separated values (header row first).
    Tsv,
    /// Apache Parquet.
    Parquet,
    /// Arrow IPC stream or file.
    Arrow,
}

impl FileKind {
    /// Short name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Jsonl => "jsonl",
            Self::JsonArray => "json",
            Self::Csv => "csv",
            Self::Tsv => "tsv",
            Self::Parquet => "parquet",
            Self::Arrow => "arrow",
        }
    }
}

/// One file to read.
#[derive(Debug, Clone, PartialEq)]
pub struct DataFile {
    /// Where it is.
    pub path: PathBuf,
    /// Its name for reports (relative to the dataset folder).
    pub name: String,
    /// How it is encoded.
    pub kind: FileKind,
    /// Its size in bytes.
    pub size: u64,
}

/// The files behind a dataset path.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    /// The dataset-level format (`jsonl`, `json`, `csv`, `parquet` or `hf`).
    pub format: FileFormat,
    /// The files, in reading order.
    pub files: Vec<DataFile>,
    /// Decisions worth telling the user (split chosen, files ignored).
    pub notes: Vec<String>,
}

const METADATA_JSON: &[&str] = &[
    "dataset_info.json",
    "state.json",
    "dataset_dict.json",
    "dataset_infos.json",
    "config.json",
    "tokenizer_config.json",
    "tokenizer.json",
    "special_tokens_map.json",
    "generation_config.json",
];

fn sniff(path: &Path) -> Result<Vec<u8>> {
    let mut f = File::open(path).map_err(|e| DatasetError::io(path, e))?;
    let mut buf = vec![0u8; 4096];
    let mut n = 0;
    while n < buf.len() {
        let k = f
            .read(&mut buf[n..])
            .map_err(|e| DatasetError::io(path, e))?;
        if k == 0 {
            break;
        }
        n += k;
    }
    buf.truncate(n);
    Ok(buf)
}

fn first_non_ws(bytes: &[u8]) -> Option<u8> {
    let b = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    b.iter().copied().find(|c| !c.is_ascii_whitespace())
}

fn ext_of(path: &Path) -> String {
    path.extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default()
}

/// Decides how one file is encoded, from `format`, its extension and its first bytes.
pub fn file_kind(path: &Path, format: FileFormat) -> Result<FileKind> {
    let head = sniff(path)?;
    if head.is_empty() {
        return Err(DatasetError::invalid(
            path,
            None,
            "the file is empty",
            "point dataset_path at a file with at least one record",
        ));
    }
    let ext = ext_of(path);
    let json_kind = || match first_non_ws(&head) {
        Some(b'[') => FileKind::JsonArray,
        _ => FileKind::Jsonl,
    };
    let kind = match format {
        FileFormat::Jsonl => FileKind::Jsonl,
        FileFormat::Json => json_kind(),
        FileFormat::Csv => {
            if ext == "tsv" {
                FileKind::Tsv
            } else {
                FileKind::Csv
            }
        }
        FileFormat::Parquet => FileKind::Parquet,
        FileFormat::Hf => {
            if head.starts_with(b"PAR1") {
                FileKind::Parquet
            } else {
                FileKind::Arrow
            }
        }
        FileFormat::Auto => match ext.as_str() {
            "jsonl" | "ndjson" => FileKind::Jsonl,
            "json" => json_kind(),
            "csv" => FileKind::Csv,
            "tsv" => FileKind::Tsv,
            "parquet" | "pq" => FileKind::Parquet,
            "arrow" | "ipc" | "feather" => FileKind::Arrow,
            _ => {
                if head.starts_with(b"PAR1") {
                    FileKind::Parquet
                } else if head.starts_with(b"ARROW1") || head.starts_with(&[0xFF, 0xFF, 0xFF, 0xFF])
                {
                    FileKind::Arrow
                } else {
                    match first_non_ws(&head) {
                        Some(b'[') => FileKind::JsonArray,
                        Some(b'{') => FileKind::Jsonl,
                        _ if std::str::from_utf8(&head[..head.len().min(1024)])
                            .map(|s| s.lines().next().unwrap_or("").contains(','))
                            .unwrap_or(false) =>
                        {
                            FileKind::Csv
                        }
                        _ => {
                            return Err(DatasetError::unsupported(
                                path,
                                "cannot tell the file format from the extension or the content",
                                "give the file a .jsonl, .json, .csv, .parquet or .arrow extension, or set format",
                            ));
                        }
                    }
                }
            }
        },
    };
    Ok(kind)
}

fn kind_from_ext(path: &Path) -> Option<FileKind> {
    let name = path.file_name()?.to_string_lossy().to_string();
    if name.starts_with('.') || METADATA_JSON.contains(&name.as_str()) {
        return None;
    }
    match ext_of(path).as_str() {
        "jsonl" | "ndjson" => Some(FileKind::Jsonl),
        "json" => Some(FileKind::JsonArray),
        "csv" => Some(FileKind::Csv),
        "tsv" => Some(FileKind::Tsv),
        "parquet" => Some(FileKind::Parquet),
        "arrow" => Some(FileKind::Arrow),
        _ => None,
    }
}

fn data_file(path: PathBuf, root: &Path, kind: FileKind) -> Result<DataFile> {
    let size = std::fs::metadata(&path)
        .map_err(|e| DatasetError::io(&path, e))?
        .len();
    let name = path
        .strip_prefix(root)
        .unwrap_or(&path)
        .display()
        .to_string();
    Ok(DataFile {
        path,
        name,
        kind,
        size,
    })
}

fn walk(dir: &Path, depth: u32, out: &mut Vec<PathBuf>) -> Result<()> {
    let rd = std::fs::read_dir(dir).map_err(|e| DatasetError::io(dir, e))?;
    let mut entries: Vec<PathBuf> = Vec::new();
    for e in rd {
        let e = e.map_err(|e| DatasetError::io(dir, e))?;
        entries.push(e.path());
    }
    entries.sort();
    for p in entries {
        let hidden = p
            .file_name()
            .map(|n| n.to_string_lossy().starts_with('.'))
            .unwrap_or(true);
        if hidden {
            continue;
        }
        if p.is_dir() {
            if depth < 4 {
                walk(&p, depth + 1, out)?;
            }
        } else {
            out.push(p);
        }
    }
    Ok(())
}

fn split_of(rel: &str) -> Option<&'static str> {
    let lower = rel.to_ascii_lowercase();
    for part in lower.split(['/', '\\']) {
        let stem = part.split(['-', '_', '.']).next().unwrap_or("");
        match stem {
            "train" => return Some("train"),
            "test" => return Some("test"),
            "validation" | "valid" | "val" | "dev" | "eval" => return Some("validation"),
            _ => {}
        }
    }
    None
}

/// Finds the files behind `path` for `format`.
pub fn resolve(path: &Path, format: FileFormat) -> Result<Resolved> {
    let meta = std::fs::metadata(path).map_err(|e| DatasetError::io(path, e))?;
    if meta.is_file() {
        let kind = file_kind(path, format)?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| path.display().to_string());
        let f = DataFile {
            path: path.to_path_buf(),
            name,
            kind,
            size: meta.len(),
        };
        let format = match (format, kind) {
            (FileFormat::Hf, _) | (_, FileKind::Arrow) => FileFormat::Hf,
            (_, FileKind::Jsonl) => FileFormat::Jsonl,
            (_, FileKind::JsonArray) => FileFormat::Json,
            (_, FileKind::Csv | FileKind::Tsv) => FileFormat::Csv,
            (_, FileKind::Parquet) => FileFormat::Parquet,
        };
        return Ok(Resolved {
            format,
            files: vec![f],
            notes: Vec::new(),
        });
    }
    let mut notes = Vec::new();
    // A DatasetDict: pick the train split (or the first one).
    let dict = path.join("dataset_dict.json");
    if dict.is_file() {
        let text = std::fs::read_to_string(&dict).map_err(|e| DatasetError::io(&dict, e))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            DatasetError::invalid(
                &dict,
                Some(e.line() as u64),
                format!("bad JSON: {e}"),
                "re-run save_to_disk",
            )
        })?;
        let splits: Vec<String> = v
            .get("splits")
            .and_then(|s| s.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        let chosen = if splits.iter().any(|s| s == "train") {
            "train".to_string()
        } else {
            splits.first().cloned().ok_or_else(|| {
                DatasetError::invalid(
                    &dict,
                    None,
                    "dataset_dict.json lists no splits",
                    "re-run save_to_disk",
                )
            })?
        };
        notes.push(format!(
            "DatasetDict with splits [{}]: profiling split {chosen:?}",
            splits.join(", ")
        ));
        let mut r = resolve(&path.join(&chosen), FileFormat::Hf)?;
        for f in &mut r.files {
            f.name = format!("{chosen}/{}", f.name);
        }
        notes.append(&mut r.notes);
        r.notes = notes;
        return Ok(r);
    }
    // A Dataset written by save_to_disk: state.json names the arrow files in order.
    let state = path.join("state.json");
    if state.is_file() {
        let text = std::fs::read_to_string(&state).map_err(|e| DatasetError::io(&state, e))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            DatasetError::invalid(
                &state,
                Some(e.line() as u64),
                format!("bad JSON: {e}"),
                "re-run save_to_disk",
            )
        })?;
        let names: Vec<String> = v
            .get("_data_files")
            .and_then(|d| d.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.get("filename").and_then(|f| f.as_str()).map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        if names.is_empty() {
            return Err(DatasetError::invalid(
                &state,
                None,
                "state.json lists no _data_files",
                "re-run datasets.save_to_disk",
            ));
        }
        let mut files = Vec::new();
        for n in names {
            files.push(data_file(path.join(&n), path, FileKind::Arrow)?);
        }
        return Ok(Resolved {
            format: FileFormat::Hf,
            files,
            notes,
        });
    }
    // A hub-style folder of shards.
    let mut all = Vec::new();
    walk(path, 0, &mut all)?;
    let mut by_kind: BTreeMap<&'static str, Vec<(PathBuf, FileKind)>> = BTreeMap::new();
    for p in all {
        if let Some(k) = kind_from_ext(&p) {
            let k = match (format, k) {
                (FileFormat::Jsonl, FileKind::JsonArray) => FileKind::Jsonl,
                (_, FileKind::JsonArray) => file_kind(&p, FileFormat::Json)?,
                (_, k) => k,
            };
            let family = match k {
                FileKind::Jsonl | FileKind::JsonArray => "json",
                FileKind::Csv | FileKind::Tsv => "csv",
                FileKind::Parquet => "parquet",
                FileKind::Arrow => "arrow",
            };
            by_kind.entry(family).or_default().push((p, k));
        }
    }
    if by_kind.is_empty() {
        return Err(DatasetError::invalid(
            path,
            None,
            "the folder holds no data files (.jsonl, .json, .csv, .parquet, .arrow)",
            "point dataset_path at a data file or a folder of shards",
        ));
    }
    if by_kind.len() > 1 {
        let what: Vec<String> = by_kind
            .iter()
            .map(|(k, v)| format!("{} {k}", v.len()))
            .collect();
        return Err(DatasetError::invalid(
            path,
            None,
            format!("the folder mixes data file types ({})", what.join(", ")),
            "point dataset_path at one file or at a subfolder that holds one kind of shard",
        ));
    }
    let (_, mut shards) = by_kind.into_iter().next().unwrap_or_default();
    let splits: Vec<Option<&str>> = shards
        .iter()
        .map(|(p, _)| split_of(&p.strip_prefix(path).unwrap_or(p).display().to_string()))
        .collect();
    if splits.contains(&Some("train")) && splits.iter().any(|s| *s != Some("train")) {
        let skipped = splits.iter().filter(|s| **s != Some("train")).count();
        notes.push(format!(
            "hub-style folder with several splits: profiling the train shards, {skipped} other file(s) skipped"
        ));
        let mut i = 0;
        shards.retain(|_| {
            let keep = splits[i] == Some("train");
            i += 1;
            keep
        });
    }
    let mut files = Vec::new();
    for (p, k) in shards {
        files.push(data_file(p, path, k)?);
    }
    Ok(Resolved {
        format: FileFormat::Hf,
        files,
        notes,
    })
}

/// Reading limits.
#[derive(Debug, Clone, Copy)]
pub struct ReadOptions {
    /// Longest accepted line / record, in bytes.
    pub max_record_bytes: u64,
    /// Worker threads (0 = one per core).
    pub threads: usize,
    /// Bytes of JSON lines handed to a worker at a time.
    pub chunk_bytes: usize,
}

impl Default for ReadOptions {
    fn default() -> Self {
        Self {
            max_record_bytes: 32 * 1024 * 1024,
            threads: 0,
            chunk_bytes: 2 * 1024 * 1024,
        }
    }
}

/// One valid row as a worker sees it.
#[derive(Debug)]
pub struct RowCtx<'a> {
    /// Index of the file in [`Resolved::files`].
    pub file: usize,
    /// 1-based line, for line-oriented files.
    pub line: Option<u64>,
    /// The row's original bytes (JSON lines only).
    pub raw: Option<&'a [u8]>,
    /// The row (always a map).
    pub val: &'a Val<'a>,
}

/// What the workers do with rows. One `Chunk` collects the rows of one work unit,
/// in order; chunks are merged in file order by the caller of [`read_rows`].
pub trait RowSink: Sync {
    /// Per-work-unit accumulator.
    type Chunk: Send;
    /// A fresh accumulator for rows of file `file`.
    fn start(&self, file: usize) -> Self::Chunk;
    /// A valid row.
    fn row(&self, chunk: &mut Self::Chunk, row: &RowCtx<'_>);
    /// A row that could not be read.
    fn invalid(&self, chunk: &mut Self::Chunk, line: Option<u64>, reason: String);
}

/// What [`read_rows`] learned beyond the rows.
#[derive(Debug, Default, Clone)]
pub struct ReadTotals {
    /// Bytes read.
    pub bytes: u64,
    /// Columns declared by file schemas (csv header, parquet/arrow schema), in order.
    pub schema_columns: Vec<String>,
    /// Notes (unsupported column types ...).
    pub notes: Vec<String>,
}

enum Work {
    Lines {
        file: usize,
        data: Vec<u8>,
        first_line: u64,
    },
    Rows {
        file: usize,
        rows: Vec<(Option<u64>, std::result::Result<Val<'static>, String>)>,
    },
}

fn serde_reason(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    let msg = match msg.rfind(" at line ") {
        Some(i) => &msg[..i],
        None => &msg,
    };
    let what = match e.classify() {
        serde_json::error::Category::Eof => "truncated JSON",
        serde_json::error::Category::Syntax => "malformed JSON",
        serde_json::error::Category::Data => "bad JSON value",
        serde_json::error::Category::Io => "read error",
    };
    format!("{what}: {msg} (column {})", e.column())
}

fn process<S: RowSink>(sink: &S, work: Work) -> S::Chunk {
    match work {
        Work::Lines {
            file,
            data,
            first_line,
        } => {
            let mut chunk = sink.start(file);
            let mut line_no = first_line;
            let mut start = 0usize;
            let len = data.len();
            while start < len {
                let end = memchr::memchr(b'\n', &data[start..]).map_or(len, |i| start + i);
                let mut line = &data[start..end];
                if let Some(l) = line.strip_suffix(b"\r") {
                    line = l;
                }
                if line_no == 1 {
                    line = line.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(line);
                }
                if !line.iter().all(u8::is_ascii_whitespace) {
                    match serde_json::from_slice::<Val>(line) {
                        Ok(v @ Val::Map(_)) => sink.row(
                            &mut chunk,
                            &RowCtx {
                                file,
                                line: Some(line_no),
                                raw: Some(line),
                                val: &v,
                            },
                        ),
                        Ok(v) => sink.invalid(
                            &mut chunk,
                            Some(line_no),
                            format!("expected a JSON object, found {}", v.type_name()),
                        ),
                        Err(e) => sink.invalid(&mut chunk, Some(line_no), serde_reason(&e)),
                    }
                }
                start = end + 1;
                line_no += 1;
            }
            chunk
        }
        Work::Rows { file, rows } => {
            let mut chunk = sink.start(file);
            for (line, r) in rows {
                match r {
                    Ok(v @ Val::Map(_)) => sink.row(
                        &mut chunk,
                        &RowCtx {
                            file,
                            line,
                            raw: None,
                            val: &v,
                        },
                    ),
                    Ok(v) => sink.invalid(
                        &mut chunk,
                        line,
                        format!("expected an object, found {}", v.type_name()),
                    ),
                    Err(reason) => sink.invalid(&mut chunk, line, reason),
                }
            }
            chunk
        }
    }
}

/// Feeds work to the pool and hands finished chunks, in order, to `merge`.
struct Feeder<'m, C> {
    tx: Option<SyncSender<(u64, Work)>>,
    rx: Receiver<(u64, C)>,
    next_send: u64,
    next_merge: u64,
    pending: BTreeMap<u64, C>,
    merge: &'m mut dyn FnMut(C) -> Result<()>,
    control: &'m mut dyn FnMut(u64) -> Result<()>,
    bytes: u64,
}

impl<C> Feeder<'_, C> {
    fn send(&mut self, w: Work, bytes: u64) -> Result<()> {
        let seq = self.next_send;
        self.next_send += 1;
        if let Some(tx) = &self.tx
            && tx.send((seq, w)).is_err()
        {
            return Err(DatasetError::invalid(
                "",
                None,
                "a worker thread stopped unexpectedly",
                "re-run; report a bug if it repeats",
            ));
        }
        while let Ok((s, c)) = self.rx.try_recv() {
            self.pending.insert(s, c);
        }
        self.drain()?;
        self.bytes += bytes;
        (self.control)(self.bytes)
    }

    fn drain(&mut self) -> Result<()> {
        while let Some(c) = self.pending.remove(&self.next_merge) {
            self.next_merge += 1;
            (self.merge)(c)?;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        self.tx = None;
        while self.next_merge < self.next_send {
            match self.rx.recv() {
                Ok((s, c)) => {
                    self.pending.insert(s, c);
                    self.drain()?;
                }
                Err(_) => break,
            }
        }
        Ok(())
    }
}

/// Streams every row of `files` through `sink` on worker threads; `merge` receives the
/// chunks in file order; `control(bytes_so_far)` is called after each unit of work and
/// stops the read when it returns an error (cancellation).
pub fn read_rows<S: RowSink>(
    files: &[DataFile],
    opts: &ReadOptions,
    sink: &S,
    merge: &mut dyn FnMut(S::Chunk) -> Result<()>,
    control: &mut dyn FnMut(u64) -> Result<()>,
) -> Result<ReadTotals> {
    let threads = if opts.threads == 0 {
        std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .min(16)
    } else {
        opts.threads
    };
    let mut totals = ReadTotals::default();
    std::thread::scope(|scope| -> Result<()> {
        let (work_tx, work_rx) = sync_channel::<(u64, Work)>(threads);
        let work_rx = Arc::new(Mutex::new(work_rx));
        let (res_tx, res_rx) = channel::<(u64, S::Chunk)>();
        for _ in 0..threads {
            let work_rx = Arc::clone(&work_rx);
            let res_tx = res_tx.clone();
            scope.spawn(move || {
                loop {
                    let item = match work_rx.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => break,
                    };
                    match item {
                        Ok((seq, w)) => {
                            if res_tx.send((seq, process(sink, w))).is_err() {
                                break;
                            }
                        }
                        Err(_) => break,
                    }
                }
            });
        }
        drop(res_tx);
        let mut feeder = Feeder {
            tx: Some(work_tx),
            rx: res_rx,
            next_send: 0,
            next_merge: 0,
            pending: BTreeMap::new(),
            merge,
            control,
            bytes: 0,
        };
        let result = (|| -> Result<()> {
            for (i, f) in files.iter().enumerate() {
                match f.kind {
                    FileKind::Jsonl => read_jsonl(i, f, opts, &mut feeder)?,
                    FileKind::JsonArray => read_json_array(i, f, &mut feeder)?,
                    FileKind::Csv | FileKind::Tsv => {
                        read_csv(i, f, opts, &mut feeder, &mut totals)?
                    }
                    FileKind::Parquet | FileKind::Arrow => {
                        read_columnar(i, f, &mut feeder, &mut totals)?
                    }
                }
            }
            feeder.finish()
        })();
        // Stop the workers whatever happened.
        feeder.tx = None;
        result
    })?;
    totals.bytes = files.iter().map(|f| f.size).sum();
    Ok(totals)
}

fn read_jsonl<C>(
    file: usize,
    f: &DataFile,
    opts: &ReadOptions,
    feeder: &mut Feeder<'_, C>,
) -> Result<()> {
    let path = &f.path;
    let mut rd = File::open(path).map_err(|e| DatasetError::io(path, e))?;
    let chunk = opts.chunk_bytes.max(4096);
    let max_line = usize::try_from(opts.max_record_bytes)
        .unwrap_or(usize::MAX)
        .max(1);
    let mut buf: Vec<u8> = Vec::with_capacity(chunk + 4096);
    let mut line_no: u64 = 1;
    let mut eof = false;
    let mut want = chunk;
    let mut tmp = vec![0u8; 256 * 1024];
    loop {
        while buf.len() < want && !eof {
            let room = (want - buf.len()).min(tmp.len());
            let n = rd
                .read(&mut tmp[..room])
                .map_err(|e| DatasetError::io(path, e))?;
            if n == 0 {
                eof = true;
            } else {
                buf.extend_from_slice(&tmp[..n]);
            }
        }
        if buf.is_empty() {
            break;
        }
        let cut = if eof {
            buf.len()
        } else {
            match memchr::memrchr(b'\n', &buf) {
                Some(i) => i + 1,
                None if buf.len() > max_line => {
                    // One line longer than the limit: skip it without buffering it.
                    let mut skipped = buf.len() as u64;
                    buf.clear();
                    let mut rest = Vec::new();
                    loop {
                        let n = rd.read(&mut tmp).map_err(|e| DatasetError::io(path, e))?;
                        if n == 0 {
                            eof = true;
                            break;
                        }
                        if let Some(i) = memchr::memchr(b'\n', &tmp[..n]) {
                            skipped += i as u64;
                            rest.extend_from_slice(&tmp[i + 1..n]);
                            break;
                        }
                        skipped += n as u64;
                    }
                    let reason = format!(
                        "line is {skipped} bytes long, over the max_record_bytes limit of {}; skipped",
                        opts.max_record_bytes
                    );
                    feeder.send(
                        Work::Rows {
                            file,
                            rows: vec![(Some(line_no), Err(reason))],
                        },
                        skipped,
                    )?;
                    line_no += 1;
                    buf = rest;
                    want = chunk;
                    continue;
                }
                None => {
                    // A long line: read more before cutting.
                    want = (buf.len() * 2).min(max_line + 1);
                    continue;
                }
            }
        };
        let rest = buf.split_off(cut);
        let data = std::mem::replace(&mut buf, rest);
        let lines = memchr::memchr_iter(b'\n', &data).count() as u64;
        let n = data.len() as u64;
        feeder.send(
            Work::Lines {
                file,
                data,
                first_line: line_no,
            },
            n,
        )?;
        line_no += lines;
        want = chunk;
        if eof && buf.is_empty() {
            break;
        }
    }
    Ok(())
}

const ROW_BATCH: usize = 1024;

struct ArraySeed<'a, 'f, C> {
    file: usize,
    feeder: &'a mut Feeder<'f, C>,
    failure: &'a mut Option<DatasetError>,
}

impl<'de, C> DeserializeSeed<'de> for ArraySeed<'_, '_, C> {
    type Value = u64;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> std::result::Result<u64, D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de, C> Visitor<'de> for ArraySeed<'_, '_, C> {
    type Value = u64;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON array of objects")
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<u64, A::Error> {
        let mut batch = Vec::with_capacity(ROW_BATCH);
        let mut n = 0u64;
        loop {
            let next = seq.next_element::<Val<'de>>();
            match next {
                Ok(Some(v)) => {
                    n += 1;
                    batch.push((None, Ok(v.into_owned())));
                }
                Ok(None) => break,
                Err(e) => {
                    let flush = std::mem::take(&mut batch);
                    let _ = self.feeder.send(
                        Work::Rows {
                            file: self.file,
                            rows: flush,
                        },
                        0,
                    );
                    return Err(e);
                }
            }
            if batch.len() >= ROW_BATCH {
                let flush = std::mem::replace(&mut batch, Vec::with_capacity(ROW_BATCH));
                if let Err(e) = self.feeder.send(
                    Work::Rows {
                        file: self.file,
                        rows: flush,
                    },
                    0,
                ) {
                    *self.failure = Some(e);
                    return Err(serde::de::Error::custom("stopped"));
                }
            }
        }
        if !batch.is_empty()
            && let Err(e) = self.feeder.send(
                Work::Rows {
                    file: self.file,
                    rows: batch,
                },
                0,
            )
        {
            *self.failure = Some(e);
            return Err(serde::de::Error::custom("stopped"));
        }
        Ok(n)
    }
}

fn read_json_array<C>(file: usize, f: &DataFile, feeder: &mut Feeder<'_, C>) -> Result<()> {
    let path = &f.path;
    let rd = File::open(path).map_err(|e| DatasetError::io(path, e))?;
    let mut de = serde_json::Deserializer::from_reader(BufReader::with_capacity(1 << 20, rd));
    let mut failure = None;
    let res = ArraySeed {
        file,
        feeder: &mut *feeder,
        failure: &mut failure,
    }
    .deserialize(&mut de);
    if let Some(e) = failure {
        return Err(e);
    }
    match res.and_then(|_| de.end()) {
        Ok(()) => {}
        Err(e) => {
            // The array cannot be resynchronised after a syntax error: report it as one
            // invalid row at the position and stop reading this file.
            let reason = format!(
                "{}; the rest of the file is not read (line {}, column {})",
                serde_reason(&e),
                e.line(),
                e.column()
            );
            feeder.send(
                Work::Rows {
                    file,
                    rows: vec![(Some(e.line() as u64), Err(reason))],
                },
                0,
            )?;
        }
    }
    feeder.send(
        Work::Rows {
            file,
            rows: Vec::new(),
        },
        f.size,
    )
}

/// Counts bytes handed to the CSV parser and fails once one record grows past the limit.
struct CappedReader<R> {
    inner: R,
    since_record: Arc<std::sync::atomic::AtomicU64>,
    cap: u64,
}

impl<R: Read> Read for CappedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        use std::sync::atomic::Ordering;
        let n = self.inner.read(buf)?;
        let total = self.since_record.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
        if total > self.cap {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "a record is longer than the max_record_bytes limit of {} bytes (an unclosed quote, or a huge field)",
                    self.cap
                ),
            ));
        }
        Ok(n)
    }
}

fn read_csv<C>(
    file: usize,
    f: &DataFile,
    opts: &ReadOptions,
    feeder: &mut Feeder<'_, C>,
    totals: &mut ReadTotals,
) -> Result<()> {
    use std::sync::atomic::Ordering;
    let path = &f.path;
    let rd = File::open(path).map_err(|e| DatasetError::io(path, e))?;
    let counter = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let capped = CappedReader {
        inner: rd,
        since_record: Arc::clone(&counter),
        // The parser reads ahead in 64 KiB blocks.
        cap: opts.max_record_bytes.saturating_add(128 * 1024),
    };
    let mut rdr = csv::ReaderBuilder::new()
        .delimiter(if f.kind == FileKind::Tsv { b'\t' } else { b',' })
        .flexible(true)
        .has_headers(true)
        .buffer_capacity(64 * 1024)
        .from_reader(capped);
    let header = rdr.byte_headers().map_err(|e| {
        DatasetError::invalid(
            path,
            Some(1),
            format!("cannot read the CSV header: {e}"),
            "the first line must name the columns",
        )
    })?;
    let mut names = Vec::with_capacity(header.len());
    for (i, h) in header.iter().enumerate() {
        let h = std::str::from_utf8(h).map_err(|_| {
            DatasetError::invalid(
                path,
                Some(1),
                format!("header column {} is not valid UTF-8", i + 1),
                "save the file as UTF-8",
            )
        })?;
        let h = if i == 0 {
            h.trim_start_matches('\u{feff}')
        } else {
            h
        };
        names.push(h.to_string());
    }
    if names.is_empty() || names.iter().all(|n| n.is_empty()) {
        return Err(DatasetError::invalid(
            path,
            Some(1),
            "the CSV header is empty",
            "the first line must name the columns",
        ));
    }
    for n in &names {
        if !totals.schema_columns.contains(n) {
            totals.schema_columns.push(n.clone());
        }
    }
    counter.store(0, Ordering::Relaxed);
    let mut rec = csv::ByteRecord::new();
    let mut batch = Vec::with_capacity(ROW_BATCH);
    let mut last_pos = 0u64;
    loop {
        match rdr.read_byte_record(&mut rec) {
            Ok(false) => break,
            Ok(true) => {
                counter.store(0, Ordering::Relaxed);
                let line = rec.position().map(|p| p.line());
                let row = if rec.len() != names.len() {
                    Err(format!(
                        "has {} fields, the header has {} (check quoting)",
                        rec.len(),
                        names.len()
                    ))
                } else {
                    let mut m = Vec::with_capacity(names.len());
                    let mut bad = None;
                    for (i, field) in rec.iter().enumerate() {
                        match std::str::from_utf8(field) {
                            Ok(s) => m.push((
                                Cow::Owned(names[i].clone()),
                                Val::Str(Cow::Owned(s.to_string())),
                            )),
                            Err(e) => {
                                bad = Some(format!(
                                    "invalid UTF-8 in column {:?} at byte {}",
                                    names[i],
                                    e.valid_up_to()
                                ));
                                break;
                            }
                        }
                    }
                    match bad {
                        Some(b) => Err(b),
                        None => Ok(Val::Map(m)),
                    }
                };
                batch.push((line, row));
            }
            Err(e) => {
                let line = e.position().map(|p| p.line());
                let fatal = matches!(e.kind(), csv::ErrorKind::Io(_));
                batch.push((line, Err(format!("unreadable CSV record: {e}"))));
                if fatal {
                    break;
                }
            }
        }
        if batch.len() >= ROW_BATCH {
            let pos = rec.position().map_or(last_pos, |p| p.byte());
            let flush = std::mem::replace(&mut batch, Vec::with_capacity(ROW_BATCH));
            feeder.send(
                Work::Rows { file, rows: flush },
                pos.saturating_sub(last_pos),
            )?;
            last_pos = pos;
        }
    }
    feeder.send(
        Work::Rows { file, rows: batch },
        f.size.saturating_sub(last_pos),
    )
}

fn read_columnar<C>(
    file: usize,
    f: &DataFile,
    feeder: &mut Feeder<'_, C>,
    totals: &mut ReadTotals,
) -> Result<()> {
    let mut reader = match f.kind {
        FileKind::Parquet => columnar::open_parquet(&f.path)?,
        _ => columnar::open_arrow(&f.path)?,
    };
    for c in columnar::schema_columns(reader.as_ref()) {
        if !totals.schema_columns.contains(&c) {
            totals.schema_columns.push(c);
        }
    }
    let mut notes = columnar::TypeNotes::default();
    let mut batches = 0u64;
    loop {
        match reader.next() {
            None => break,
            Some(Ok(b)) => {
                batches += 1;
                let rows = columnar::batch_rows(&b, &mut notes)
                    .into_iter()
                    .map(|v| (None, Ok(v)))
                    .collect();
                feeder.send(Work::Rows { file, rows }, 0)?;
            }
            Some(Err(e)) => {
                let reason = format!(
                    "cannot decode record batch {}: {e}; the rest of the file is not read",
                    batches + 1
                );
                feeder.send(
                    Work::Rows {
                        file,
                        rows: vec![(None, Err(reason))],
                    },
                    0,
                )?;
                break;
            }
        }
    }
    for n in notes.notes {
        totals.notes.push(format!("{}: {n}", f.name));
    }
    feeder.send(
        Work::Rows {
            file,
            rows: Vec::new(),
        },
        f.size,
    )
}
