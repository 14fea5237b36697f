//! [`ArtifactStore`]: the store on disk and its operations.
//!
//! # Layout
//!
//! ```text
//! <root>/index.sqlite            the index (WAL: also index.sqlite-wal, -shm)
//! <root>/store.lock              advisory lock (shared: store, verify; exclusive: gc)
//! <root>/gate.lock               taken briefly before store.lock; gc holds it, so it is not starved
//! <root>/blobs/<h[0..2]>/<h>     one read-only file per distinct file content, h = its SHA-256
//! <root>/adapters/<H>/...        a stored adapter folder: hard links to its blobs, H = adapter_hash
//! <root>/adapters/<H>.sha256     its manifest (`sha256sum -c` format; H = SHA-256 of this file)
//! ```
//!
//! Identical files are stored once (one blob), identical adapters once (one
//! folder); a version is a row pointing at an adapter hash.
//!
//! # Crash safety
//!
//! A store writes, in order: the missing blobs (each temp + fsync + rename),
//! the adapter folder (built under a temporary name, then renamed into place),
//! then one SQLite transaction that registers the version, its metrics, tags
//! and file list. A writer killed at any point leaves either a fully
//! registered version or none; what it wrote before the commit is
//! unreferenced and goes at the next [`gc`](ArtifactStore::gc).
//!
//! # Why gc never deletes the blobs of a store in flight
//!
//! The race: a store finds blob B missing and writes it, gc (seeing no row that
//! references B) deletes it, then the store commits a row referencing B. It is
//! closed by the lock file: a store holds a *shared* lock on `store.lock` from
//! the moment it checks which blobs exist until its transaction has committed,
//! and gc holds it *exclusively* for its whole run. So gc runs only when no
//! store is between "checked/wrote its files" and "committed", and a store that
//! starts after a gc re-checks which blobs exist under the lock. Hashing the
//! source happens before the lock is taken, so a long hash does not block gc.
//! The locks are `flock`-style: the kernel drops them when a process dies, so a
//! killed writer never wedges the store. Verify takes the shared lock too, so a
//! concurrent gc cannot make it report a file as missing.
//!
//! Shared locks overlap, so a steady stream of stores could keep gc waiting
//! forever. Everyone therefore passes through `gate.lock` (exclusively, for a
//! moment) before taking `store.lock`; gc keeps the gate while it waits for the
//! stores in flight to drain, so new stores queue behind it.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use lora_skill::SkillContext;
use lora_spec::contracts::artifact::{
    ArtifactStoreInput, ArtifactStoreOutput, ArtifactVersion, GcReport, MetricGoal, ProblemKind,
    VerifyProblem, VerifyReport, VersionFilter,
};
use rusqlite::{Connection, OptionalExtension, Transaction, TransactionBehavior, params};
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::{ArtifactError, Result};
use crate::hash::{self, TreeDigest};
use crate::index::{self, NOW, Scope};
use crate::reference::{Selector, VersionRef, check_experiment_id, check_name};

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A point in a store, reported to the observer of [`ArtifactStore::store_observed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorePhase {
    /// The adapter folder is hashed; nothing is written yet.
    Hashed,
    /// The store lock is held and every blob is on disk.
    BlobsWritten,
    /// The adapter folder is published under `adapters/<hash>`.
    AdapterPublished,
    /// The version is registered (the transaction committed).
    Committed,
}

/// Options of [`ArtifactStore::gc`].
#[derive(Debug, Clone, Copy)]
pub struct GcOptions {
    /// Report without removing.
    pub dry_run: bool,
    /// How long to wait for running stores to release the lock.
    pub wait: Duration,
}

impl Default for GcOptions {
    fn default() -> Self {
        Self {
            dry_run: false,
            wait: Duration::from_secs(60),
        }
    }
}

/// One experiment of the store.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExperimentSummary {
    /// The experiment id.
    pub experiment_id: String,
    /// Versions in the index.
    pub versions: u64,
    /// The highest version number ever given (deleted ones included).
    pub last_version: i64,
    /// When its first version was stored.
    pub created_at: String,
}

/// One file of a stored adapter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredFile {
    /// Path relative to the adapter folder.
    pub path: String,
    /// SHA-256 of its bytes.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
    /// The file in the stored adapter folder.
    pub stored_path: String,
    /// Its blob.
    pub blob_path: String,
}

/// The artifact store rooted at one folder.
#[derive(Debug)]
pub struct ArtifactStore {
    root: PathBuf,
    conn: Connection,
}

struct Layout<'a>(&'a Path);

impl Layout<'_> {
    fn index(&self) -> PathBuf {
        self.0.join("index.sqlite")
    }
    fn lock(&self) -> PathBuf {
        self.0.join("store.lock")
    }
    fn gate(&self) -> PathBuf {
        self.0.join("gate.lock")
    }
    fn blobs(&self) -> PathBuf {
        self.0.join("blobs")
    }
    fn blob(&self, sha: &str) -> PathBuf {
        self.0.join("blobs").join(&sha[..2]).join(sha)
    }
    fn adapters(&self) -> PathBuf {
        self.0.join("adapters")
    }
    fn adapter(&self, hash: &str) -> PathBuf {
        self.0.join("adapters").join(hash)
    }
    fn manifest(&self, hash: &str) -> PathBuf {
        self.0.join("adapters").join(format!("{hash}.sha256"))
    }
}

fn rel_join(base: &Path, rel: &str) -> PathBuf {
    let mut p = base.to_path_buf();
    for c in rel.split('/') {
        p.push(c);
    }
    p
}

fn is_hex64(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// JSON with object keys sorted at every level, so equal values serialise equally.
fn canonical(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let sorted: BTreeMap<&String, Value> =
                m.iter().map(|(k, v)| (k, canonical(v))).collect();
            Value::Object(sorted.into_iter().map(|(k, v)| (k.clone(), v)).collect())
        }
        Value::Array(a) => Value::Array(a.iter().map(canonical).collect()),
        other => other.clone(),
    }
}

/// A held advisory lock; released on drop (and by the kernel if the process dies).
/// Holding the files is the lock.
struct LockGuard {
    _gate: Option<File>,
    _lock: File,
}

impl ArtifactStore {
    /// Opens the store at `root`, creating it (folders and index) when missing.
    pub fn open(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref();
        for d in [
            root.to_path_buf(),
            root.join("blobs"),
            root.join("adapters"),
        ] {
            fs::create_dir_all(&d).map_err(|e| ArtifactError::io(&d, e))?;
        }
        Self::open_inner(root, true)
    }

    /// Opens an existing store; [`ArtifactError::NoStore`] when `root` holds none.
    pub fn open_existing(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref();
        if !Layout(root).index().is_file() {
            return Err(ArtifactError::NoStore {
                root: root.to_path_buf(),
            });
        }
        Self::open_inner(root, false)
    }

    fn open_inner(root: &Path, create: bool) -> Result<Self> {
        let root = fs::canonicalize(root).map_err(|e| ArtifactError::io(root, e))?;
        let conn = index::open(&Layout(&root).index(), create)?;
        Ok(Self { root, conn })
    }

    /// The store's folder (absolute).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The index schema version.
    pub fn schema_version(&self) -> Result<i64> {
        index::schema_version(&self.conn).map_err(|e| self.db_err(e))
    }

    fn db_err(&self, e: rusqlite::Error) -> ArtifactError {
        ArtifactError::index(Layout(&self.root).index(), e)
    }

    fn absolute(&self, mut v: ArtifactVersion) -> ArtifactVersion {
        v.stored_path = rel_join(&self.root, &v.stored_path).display().to_string();
        v
    }

    fn lock(
        &self,
        exclusive: bool,
        wait: Duration,
        ctx: Option<&SkillContext>,
    ) -> Result<LockGuard> {
        let layout = Layout(&self.root);
        let start = Instant::now();
        // Through the gate first: gc keeps it while it waits, so new stores queue
        // behind a waiting gc instead of starving it with overlapping shared locks.
        let gate = self.acquire(&layout.gate(), true, start, wait, ctx)?;
        let lock = self.acquire(&layout.lock(), exclusive, start, wait, ctx)?;
        Ok(LockGuard {
            _gate: exclusive.then_some(gate),
            _lock: lock,
        })
    }

    fn acquire(
        &self,
        path: &Path,
        exclusive: bool,
        start: Instant,
        wait: Duration,
        ctx: Option<&SkillContext>,
    ) -> Result<File> {
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| ArtifactError::io(path, e))?;
        loop {
            let r = if exclusive {
                f.try_lock()
            } else {
                f.try_lock_shared()
            };
            match r {
                Ok(()) => return Ok(f),
                Err(fs::TryLockError::WouldBlock) => {}
                Err(fs::TryLockError::Error(e)) => return Err(ArtifactError::io(path, e)),
            }
            if ctx.is_some_and(SkillContext::is_cancelled) {
                return Err(ArtifactError::Cancelled);
            }
            if start.elapsed() >= wait {
                return Err(ArtifactError::Busy {
                    root: self.root.clone(),
                    what: if exclusive {
                        "stores or a verify are running".into()
                    } else {
                        "a gc is running".into()
                    },
                    waited_s: start.elapsed().as_secs_f64(),
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    // ----------------------------------------------------------------- store

    /// Stores the adapter folder `input.adapter_path` (resolved against
    /// `ctx.work_dir()`) as the next version of `input.experiment_id`.
    /// `input.store_root` is not used here (the store is already open).
    pub fn store(
        &mut self,
        input: &ArtifactStoreInput,
        ctx: &SkillContext,
    ) -> Result<ArtifactStoreOutput> {
        self.store_observed(input, ctx, &mut |_| {})
    }

    /// Like [`store`](Self::store), calling `observer` at each [`StorePhase`].
    pub fn store_observed(
        &mut self,
        input: &ArtifactStoreInput,
        ctx: &SkillContext,
        observer: &mut dyn FnMut(StorePhase),
    ) -> Result<ArtifactStoreOutput> {
        let exp = input.experiment_id.as_str();
        check_experiment_id(exp).map_err(|m| ArtifactError::input("experiment_id", m, ""))?;
        if input.adapter_path.trim().is_empty() {
            return Err(ArtifactError::input(
                "adapter_path",
                "is empty",
                "pass the adapter folder (the one holding adapter_config.json)",
            ));
        }
        for (k, v) in &input.metrics {
            check_name("metric", k)
                .map_err(|m| ArtifactError::input(format!("metrics.{k}"), m, ""))?;
            if !v.is_finite() {
                return Err(ArtifactError::input(
                    format!("metrics.{k}"),
                    format!("must be a finite number (got {v})"),
                    "leave a metric out rather than storing NaN or infinity",
                ));
            }
        }
        let mut tags: Vec<String> = Vec::with_capacity(input.tags.len());
        for (i, t) in input.tags.iter().enumerate() {
            check_name("tag", t).map_err(|m| ArtifactError::input(format!("tags[{i}]"), m, ""))?;
            tags.push(t.clone());
        }
        tags.sort();
        tags.dedup();
        let parent = match &input.parent {
            None => None,
            Some(p) => {
                let r = VersionRef::parse(p).map_err(|m| ArtifactError::input("parent", m, ""))?;
                Some(r)
            }
        };

        let src = ctx.resolve(&input.adapter_path);
        let digest = hash::hash_adapter_dir_in(&src, Some(ctx))?;
        observer(StorePhase::Hashed);

        let request_digest = {
            let doc = serde_json::json!({
                "adapter_hash": digest.hash,
                "trial_id": input.trial_id,
                "metrics": input.metrics,
                "tags": tags,
                "parent": input.parent.as_deref().map(str::trim),
                "metadata": canonical(&Value::Object(input.metadata.clone())),
            });
            hex::encode(Sha256::digest(doc.to_string().as_bytes()))
        };

        let _guard = self.lock(false, Duration::from_secs(600), Some(ctx))?;
        if let Some(n) =
            index::find_request(&self.conn, exp, &request_digest).map_err(|e| self.db_err(e))?
        {
            let v = self.get_number(exp, n)?;
            ctx.info(format!(
                "{exp}/v{n} already holds this adapter with these metrics and tags"
            ));
            return Ok(ArtifactStoreOutput {
                version: v.version,
                adapter_hash: v.adapter_hash,
                stored_path: v.stored_path,
                experiment_id: v.experiment_id,
                trial_id: v.trial_id,
                created_at: v.created_at,
                reused: true,
                files: v.files,
                bytes: v.bytes,
                bytes_written: 0,
            });
        }

        let bytes_written = self.write_blobs(&digest, ctx)?;
        observer(StorePhase::BlobsWritten);
        self.publish_adapter(&digest)?;
        observer(StorePhase::AdapterPublished);
        ctx.check_cancelled()
            .map_err(|_| ArtifactError::Cancelled)?;

        let metadata = Value::Object(input.metadata.clone()).to_string();
        let source = src.display().to_string();
        let index_path = Layout(&self.root).index();
        let res: std::result::Result<(i64, String), ArtifactError> = (|| {
            let err = |e| ArtifactError::index(&index_path, e);
            let tx =
                Transaction::new(&mut self.conn, TransactionBehavior::Immediate).map_err(err)?;
            let exp_row = index::ensure_experiment(&tx, exp).map_err(err)?;
            let (pe, pn) = match &parent {
                None => (None, None),
                Some(r) => {
                    let pexp = r.experiment.clone().unwrap_or_else(|| exp.to_string());
                    let n = resolve_in(&tx, &pexp, &r.selector)
                        .map_err(err)?
                        .ok_or_else(|| ArtifactError::NotFound {
                            what: format!(
                                "parent {pexp}/{} is not in the store",
                                describe(&r.selector)
                            ),
                            hint: "store the parent first, or check `lora-trainer artifacts list`"
                                .into(),
                        })?;
                    (Some(pexp), Some(n))
                }
            };
            let new = tx
                .execute(
                    &format!("INSERT OR IGNORE INTO adapters(hash, files, bytes, created_at) VALUES (?1, ?2, ?3, {NOW})"),
                    params![digest.hash, digest.files.len() as i64, digest.bytes as i64],
                )
                .map_err(err)?;
            if new == 1 {
                let mut stmt = tx
                    .prepare("INSERT INTO adapter_files(adapter_hash, path, blob_hash, size) VALUES (?1, ?2, ?3, ?4)")
                    .map_err(err)?;
                for f in &digest.files {
                    stmt.execute(params![digest.hash, f.path, f.sha256, f.size as i64])
                        .map_err(err)?;
                }
            }
            let number: i64 = tx
                .query_row(
                    "UPDATE experiments SET last_version = last_version + 1 WHERE id = ?1 RETURNING last_version",
                    [exp_row],
                    |r| r.get(0),
                )
                .map_err(err)?;
            tx.execute(
                &format!(
                    "INSERT INTO versions(experiment_id, number, trial_id, adapter_hash, parent_experiment,
                       parent_number, source_path, request_digest, metadata, created_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, {NOW})"
                ),
                params![exp_row, number, i64::from(input.trial_id), digest.hash, pe, pn, source, request_digest, metadata],
            )
            .map_err(err)?;
            let vid = tx.last_insert_rowid();
            for (k, v) in &input.metrics {
                tx.execute(
                    "INSERT INTO metrics(version_id, name, value) VALUES (?1, ?2, ?3)",
                    params![vid, k, v],
                )
                .map_err(err)?;
            }
            for t in &tags {
                tx.execute(
                    "INSERT INTO tags(version_id, tag) VALUES (?1, ?2)",
                    params![vid, t],
                )
                .map_err(err)?;
            }
            let created: String = tx
                .query_row(
                    "SELECT created_at FROM versions WHERE id = ?1",
                    [vid],
                    |r| r.get(0),
                )
                .map_err(err)?;
            tx.commit().map_err(err)?;
            Ok((number, created))
        })();
        let (number, created_at) = res?;
        observer(StorePhase::Committed);
        ctx.info(format!(
            "stored {exp}/v{number}: {} files, {} bytes ({} new)",
            digest.files.len(),
            digest.bytes,
            bytes_written
        ));
        Ok(ArtifactStoreOutput {
            version: format!("v{number}"),
            stored_path: Layout(&self.root)
                .adapter(&digest.hash)
                .display()
                .to_string(),
            adapter_hash: digest.hash,
            experiment_id: exp.to_string(),
            trial_id: input.trial_id,
            created_at,
            reused: false,
            files: digest.files.len() as u64,
            bytes: digest.bytes,
            bytes_written,
        })
    }

    /// Copies the blobs the store lacks; returns the bytes written. Call with the lock held.
    fn write_blobs(&self, digest: &TreeDigest, ctx: &SkillContext) -> Result<u64> {
        let layout = Layout(&self.root);
        let missing: Vec<_> = {
            let mut seen = BTreeSet::new();
            digest
                .files
                .iter()
                .filter(|f| seen.insert(f.sha256.as_str()))
                .filter(|f| !layout.blob(&f.sha256).is_file())
                .collect()
        };
        let total: u64 = missing.iter().map(|f| f.size).sum();
        if missing.is_empty() {
            return Ok(0);
        }
        let mut progress = ctx.progress("store blobs", Some(total), "bytes");
        let mut done = 0u64;
        for f in missing {
            let blob = layout.blob(&f.sha256);
            let mut changed = false;
            let mut cancelled = false;
            // A source untouched for a while whose stamp is unchanged after the copy
            // has the bytes it was hashed with: let the kernel copy it (copy_file_range,
            // a reflink on CoW filesystems). A recently written one is re-hashed while
            // copied, because a write within the timestamp granularity leaves no trace.
            let trust_stamp = !f.stamp.is_recent();
            let r = lora_skill::fs::write_atomic_with(&blob, |out| {
                let mut perms = out.metadata()?.permissions();
                perms.set_readonly(true);
                out.set_permissions(perms)?;
                let mut input = File::open(&f.source)?;
                let mut n_total = 0u64;
                if trust_stamp {
                    loop {
                        let n = io::copy(&mut Read::take(&input, 64 << 20), out)?;
                        if n == 0 {
                            break;
                        }
                        n_total += n;
                        done += n;
                        progress.update(done, None, &[]);
                        if ctx.is_cancelled() {
                            cancelled = true;
                            return Err(io::Error::other("cancelled"));
                        }
                    }
                    if n_total != f.size || hash::Stamp::of(&f.source)? != f.stamp {
                        changed = true;
                        return Err(io::Error::other("source changed"));
                    }
                    return Ok(());
                }
                let mut h = Sha256::new();
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let n = match input.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(e),
                    };
                    h.update(&buf[..n]);
                    out.write_all(&buf[..n])?;
                    n_total += n as u64;
                    done += n as u64;
                    progress.update(done, None, &[]);
                    if ctx.is_cancelled() {
                        cancelled = true;
                        return Err(io::Error::other("cancelled"));
                    }
                }
                if n_total != f.size || hex::encode(h.finalize()) != f.sha256 {
                    changed = true;
                    return Err(io::Error::other("source changed"));
                }
                Ok(())
            });
            match r {
                Ok(()) => {}
                Err(_) if cancelled => return Err(ArtifactError::Cancelled),
                Err(_) if changed => {
                    return Err(ArtifactError::SourceChanged {
                        path: f.source.clone(),
                    });
                }
                Err(e) => {
                    // A missing source is about the source; anything else is about the blob.
                    let path = if f.source.exists() {
                        blob
                    } else {
                        f.source.clone()
                    };
                    return Err(ArtifactError::io(path, e));
                }
            }
        }
        progress.finish(format!("{total} bytes"));
        Ok(total)
    }

    /// Builds `adapters/<hash>` from blobs (hard links, copies where links fail). Call with the lock held.
    fn publish_adapter(&self, digest: &TreeDigest) -> Result<()> {
        let layout = Layout(&self.root);
        let target = layout.adapter(&digest.hash);
        if target.is_dir() {
            return Ok(());
        }
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let tmp = layout.adapters().join(format!(
            ".tmp-{}-{}-{n}",
            &digest.hash[..16],
            std::process::id()
        ));
        let io_err = |p: &Path, e| ArtifactError::io(p, e);
        let result = (|| {
            fs::create_dir_all(&tmp).map_err(|e| io_err(&tmp, e))?;
            let mut dirs = BTreeSet::new();
            dirs.insert(tmp.clone());
            for f in &digest.files {
                let dst = rel_join(&tmp, &f.path);
                if let Some(parent) = dst.parent()
                    && !dirs.contains(parent)
                {
                    fs::create_dir_all(parent).map_err(|e| io_err(parent, e))?;
                    let mut p = parent.to_path_buf();
                    while p.starts_with(&tmp) && dirs.insert(p.clone()) {
                        if !p.pop() {
                            break;
                        }
                    }
                }
                let blob = layout.blob(&f.sha256);
                if fs::hard_link(&blob, &dst).is_err() {
                    fs::copy(&blob, &dst).map_err(|e| io_err(&dst, e))?;
                    let mut perms = fs::metadata(&dst)
                        .map_err(|e| io_err(&dst, e))?
                        .permissions();
                    perms.set_readonly(true);
                    fs::set_permissions(&dst, perms).map_err(|e| io_err(&dst, e))?;
                    File::open(&dst)
                        .and_then(|f| f.sync_all())
                        .map_err(|e| io_err(&dst, e))?;
                }
            }
            for d in &dirs {
                lora_skill::fs::sync_dir(Some(d)).map_err(|e| io_err(d, e))?;
            }
            let text = hash::manifest(
                digest
                    .files
                    .iter()
                    .map(|f| (f.path.as_str(), f.sha256.as_str())),
            );
            let mpath = layout.manifest(&digest.hash);
            lora_skill::fs::write_atomic(&mpath, text.as_bytes()).map_err(|e| io_err(&mpath, e))?;
            match lora_skill::fs::publish_dir(&tmp, &target) {
                Ok(()) => Ok(()),
                // Another process published the same adapter first: same bytes, keep theirs.
                Err(_) if target.is_dir() => {
                    let _ = fs::remove_dir_all(&tmp);
                    Ok(())
                }
                Err(e) => Err(io_err(&target, e)),
            }
        })();
        if result.is_err() {
            let _ = fs::remove_dir_all(&tmp);
        }
        result
    }

    // --------------------------------------------------------------- queries

    /// Every experiment with its version count.
    pub fn experiments(&self) -> Result<Vec<ExperimentSummary>> {
        Ok(index::experiments(&self.conn)
            .map_err(|e| self.db_err(e))?
            .into_iter()
            .map(
                |(experiment_id, versions, last_version, created_at)| ExperimentSummary {
                    experiment_id,
                    versions,
                    last_version,
                    created_at,
                },
            )
            .collect())
    }

    /// Every version (of `experiment`, or of all experiments), oldest first.
    pub fn list(&self, experiment: Option<&str>) -> Result<Vec<ArtifactVersion>> {
        let scope = Scope {
            experiment,
            ..Scope::default()
        };
        self.load(&scope)
    }

    fn load(&self, scope: &Scope<'_>) -> Result<Vec<ArtifactVersion>> {
        Ok(index::load(&self.conn, scope)
            .map_err(|e| self.db_err(e))?
            .into_iter()
            .map(|r| self.absolute(r.version))
            .collect())
    }

    fn get_number(&self, experiment: &str, number: i64) -> Result<ArtifactVersion> {
        let scope = Scope {
            experiment: Some(experiment),
            number: Some(number),
            trial_id: None,
        };
        self.load(&scope)?
            .into_iter()
            .next()
            .ok_or_else(|| ArtifactError::NotFound {
                what: format!("version {experiment}/v{number} is not in the store"),
                hint: "see `lora-trainer artifacts list`".into(),
            })
    }

    /// Resolves a reference (`v3`, `latest`, `best:eval_loss`, `exp/v3`) to a version number.
    fn resolve(&self, reference: &str, default_experiment: &str) -> Result<(String, i64)> {
        let r =
            VersionRef::parse(reference).map_err(|m| ArtifactError::input("reference", m, ""))?;
        let exp = r
            .experiment
            .clone()
            .unwrap_or_else(|| default_experiment.to_string());
        check_experiment_id(&exp).map_err(|m| ArtifactError::input("experiment_id", m, ""))?;
        let n = resolve_in(&self.conn, &exp, &r.selector)
            .map_err(|e| self.db_err(e))?
            .ok_or_else(|| {
                let known = self
                    .experiments()
                    .map(|es| {
                        es.into_iter()
                            .map(|e| e.experiment_id)
                            .collect::<Vec<_>>()
                            .join(", ")
                    })
                    .unwrap_or_default();
                ArtifactError::NotFound {
                    what: format!(
                        "version {exp}/{} is not in the store",
                        describe(&r.selector)
                    ),
                    hint: if known.is_empty() {
                        "the store is empty".into()
                    } else {
                        format!(
                            "experiments in the store: {known}; see `lora-trainer artifacts list`"
                        )
                    },
                }
            })?;
        Ok((exp, n))
    }

    /// The files of a stored adapter (sorted by path), with where each one lives.
    pub fn adapter_files(&self, adapter_hash: &str) -> Result<Vec<StoredFile>> {
        let layout = Layout(&self.root);
        let dir = layout.adapter(adapter_hash);
        let mut stmt = self
            .conn
            .prepare(
                "SELECT path, blob_hash, size FROM adapter_files WHERE adapter_hash = ?1 ORDER BY path",
            )
            .map_err(|e| self.db_err(e))?;
        let rows = stmt
            .query_map([adapter_hash], |r| {
                let size: i64 = r.get(2)?;
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, size))
            })
            .and_then(|it| it.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| self.db_err(e))?;
        if rows.is_empty() {
            return Err(ArtifactError::NotFound {
                what: format!("no stored adapter {adapter_hash}"),
                hint: "see `lora-trainer artifacts list`".into(),
            });
        }
        Ok(rows
            .into_iter()
            .map(|(path, sha256, size)| StoredFile {
                stored_path: rel_join(&dir, &path).display().to_string(),
                blob_path: layout.blob(&sha256).display().to_string(),
                path,
                sha256,
                size: u64::try_from(size).unwrap_or(0),
            })
            .collect())
    }

    /// One version by reference; a bare reference is looked up in `default_experiment`.
    pub fn get(&self, reference: &str, default_experiment: &str) -> Result<ArtifactVersion> {
        let (exp, n) = self.resolve(reference, default_experiment)?;
        self.get_number(&exp, n)
    }

    /// The version with the best `metric` (ties go to the older version) among
    /// those of `experiment` (all when `None`) carrying every tag in `tags`;
    /// also returns how many versions had the metric.
    pub fn best(
        &self,
        experiment: Option<&str>,
        metric: &str,
        goal: MetricGoal,
        tags: &[String],
    ) -> Result<(Option<ArtifactVersion>, u64)> {
        let filter = VersionFilter {
            experiment_id: experiment.map(str::to_string),
            tags: tags.to_vec(),
            ..VersionFilter::default()
        };
        self.best_of(&filter, metric, goal)
    }

    /// Like [`best`](Self::best), among the versions meeting `filter`.
    pub fn best_of(
        &self,
        filter: &VersionFilter,
        metric: &str,
        goal: MetricGoal,
    ) -> Result<(Option<ArtifactVersion>, u64)> {
        let mut best: Option<ArtifactVersion> = None;
        let mut n = 0u64;
        for v in self.filter(filter)? {
            let Some(&x) = v.metrics.get(metric) else {
                continue;
            };
            n += 1;
            let better = match &best {
                None => true,
                Some(b) => {
                    let y = b.metrics.get(metric).copied().unwrap_or(f64::NAN);
                    match goal {
                        MetricGoal::Min => x < y,
                        MetricGoal::Max => x > y,
                    }
                }
            };
            if better {
                best = Some(v);
            }
        }
        Ok((best, n))
    }

    /// Versions meeting every condition of `filter`, oldest first.
    pub fn filter(&self, filter: &VersionFilter) -> Result<Vec<ArtifactVersion>> {
        let scope = Scope {
            experiment: filter.experiment_id.as_deref(),
            number: None,
            trial_id: filter.trial_id,
        };
        Ok(self
            .load(&scope)?
            .into_iter()
            .filter(|v| filter.tags.iter().all(|t| v.tags.contains(t)))
            .filter(|v| {
                filter.any_tags.is_empty() || filter.any_tags.iter().any(|t| v.tags.contains(t))
            })
            .filter(|v| {
                filter
                    .metric_min
                    .iter()
                    .all(|(k, lo)| v.metrics.get(k).is_some_and(|x| x >= lo))
            })
            .filter(|v| {
                filter
                    .metric_max
                    .iter()
                    .all(|(k, hi)| v.metrics.get(k).is_some_and(|x| x <= hi))
            })
            .collect())
    }

    /// Removes a version from the index (metrics and tags with it); its files
    /// stay until [`gc`](Self::gc). The number is never given again.
    pub fn delete(&mut self, reference: &str, default_experiment: &str) -> Result<ArtifactVersion> {
        let (exp, n) = self.resolve(reference, default_experiment)?;
        let v = self.get_number(&exp, n)?;
        let index_path = Layout(&self.root).index();
        let err = |e| ArtifactError::index(&index_path, e);
        let tx = Transaction::new(&mut self.conn, TransactionBehavior::Immediate).map_err(err)?;
        let removed = tx
            .execute(
                "DELETE FROM versions WHERE number = ?1 AND experiment_id = (SELECT id FROM experiments WHERE name = ?2)",
                params![n, exp],
            )
            .map_err(err)?;
        tx.commit().map_err(err)?;
        if removed == 0 {
            return Err(ArtifactError::NotFound {
                what: format!("version {exp}/v{n} was deleted by another process"),
                hint: String::new(),
            });
        }
        Ok(v)
    }

    // -------------------------------------------------------------------- gc

    /// Removes adapter folders and blobs no version references, and the
    /// leftovers of interrupted stores. Waits up to `opts.wait` for running
    /// stores (see the module docs for why it must).
    pub fn gc(&mut self, opts: GcOptions, ctx: &SkillContext) -> Result<GcReport> {
        let _guard = self.lock(true, opts.wait, Some(ctx))?;
        let layout = Layout(&self.root);
        let index_path = layout.index();
        let err = |e| ArtifactError::index(&index_path, e);
        let strings = |conn: &Connection, sql: &str| -> rusqlite::Result<BTreeSet<String>> {
            let mut stmt = conn.prepare(sql)?;
            stmt.query_map([], |r| r.get::<_, String>(0))?.collect()
        };
        let tx = Transaction::new(&mut self.conn, TransactionBehavior::Immediate).map_err(err)?;
        let orphan_rows = strings(
            &tx,
            "SELECT hash FROM adapters WHERE hash NOT IN (SELECT adapter_hash FROM versions)",
        )
        .map_err(err)?;
        let live_adapters = strings(
            &tx,
            "SELECT hash FROM adapters WHERE hash IN (SELECT adapter_hash FROM versions)",
        )
        .map_err(err)?;
        let live_blobs = strings(
            &tx,
            "SELECT DISTINCT blob_hash FROM adapter_files WHERE adapter_hash IN (SELECT adapter_hash FROM versions)",
        )
        .map_err(err)?;
        if !opts.dry_run {
            tx.execute(
                "DELETE FROM adapters WHERE hash NOT IN (SELECT adapter_hash FROM versions)",
                [],
            )
            .map_err(err)?;
        }
        tx.commit().map_err(err)?;

        let mut report = GcReport {
            dry_run: opts.dry_run,
            ..GcReport::default()
        };
        let mut removed_adapters: BTreeSet<String> = orphan_rows;
        let remove = |path: &Path, report: &mut GcReport| -> Result<u64> {
            let meta = fs::symlink_metadata(path).map_err(|e| ArtifactError::io(path, e))?;
            let bytes = if meta.is_dir() {
                dir_bytes(path)
            } else {
                meta.len()
            };
            if !opts.dry_run {
                let r = if meta.is_dir() {
                    fs::remove_dir_all(path)
                } else {
                    fs::remove_file(path)
                };
                match r {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(ArtifactError::io(path, e)),
                }
            }
            report.removed.push(path.display().to_string());
            Ok(bytes)
        };

        // Adapter folders, manifests and temporary folders.
        let adapters = layout.adapters();
        for entry in read_dir_sorted(&adapters)? {
            ctx.check_cancelled()
                .map_err(|_| ArtifactError::Cancelled)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            if name.starts_with('.') {
                report.bytes_freed += remove(&path, &mut report)?;
                report.temp_removed += 1;
            } else if let Some(stem) = name.strip_suffix(".sha256") {
                if is_hex64(stem) && !live_adapters.contains(stem) {
                    remove(&path, &mut report)?;
                }
            } else if is_hex64(&name) && !live_adapters.contains(&name) {
                // Hard links to blobs: the bytes are counted with the blobs.
                remove(&path, &mut report)?;
                removed_adapters.insert(name);
            }
        }
        // Blobs and their temporary files.
        let blobs = layout.blobs();
        for shard in read_dir_sorted(&blobs)? {
            if !shard.path().is_dir() {
                continue;
            }
            for entry in read_dir_sorted(&shard.path())? {
                ctx.check_cancelled()
                    .map_err(|_| ArtifactError::Cancelled)?;
                let name = entry.file_name().to_string_lossy().into_owned();
                let path = entry.path();
                if name.starts_with('.') {
                    report.bytes_freed += remove(&path, &mut report)?;
                    report.temp_removed += 1;
                } else if is_hex64(&name) && !live_blobs.contains(&name) {
                    report.bytes_freed += remove(&path, &mut report)?;
                    report.blobs_removed += 1;
                }
            }
            if !opts.dry_run {
                // Only succeeds when empty, which is the point.
                let _ = fs::remove_dir(shard.path());
            }
        }
        report.adapters_removed = removed_adapters.len() as u64;
        ctx.info(format!(
            "gc{}: {} adapters, {} blobs, {} temporary files, {} bytes",
            if opts.dry_run { " (dry run)" } else { "" },
            report.adapters_removed,
            report.blobs_removed,
            report.temp_removed,
            report.bytes_freed
        ));
        Ok(report)
    }

    // ---------------------------------------------------------------- verify

    /// Re-hashes the files of every version (or of `reference` only) and reports
    /// each damaged, missing or unexpected file by path.
    pub fn verify(
        &self,
        reference: Option<&str>,
        default_experiment: &str,
        ctx: &SkillContext,
    ) -> Result<VerifyReport> {
        let versions = match reference {
            Some(r) => vec![self.get(r, default_experiment)?],
            None => self.list(None)?,
        };
        let _guard = self.lock(false, Duration::from_secs(600), Some(ctx))?;
        let layout = Layout(&self.root);
        let mut by_adapter: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for v in &versions {
            by_adapter
                .entry(v.adapter_hash.clone())
                .or_default()
                .push(format!("{}/{}", v.experiment_id, v.version));
        }
        let mut files_of: BTreeMap<String, Vec<(String, String, u64)>> = BTreeMap::new();
        {
            let mut stmt = self
                .conn
                .prepare("SELECT path, blob_hash, size FROM adapter_files WHERE adapter_hash = ?1 ORDER BY path")
                .map_err(|e| self.db_err(e))?;
            for h in by_adapter.keys() {
                let rows: Vec<(String, String, u64)> = stmt
                    .query_map([h], |r| {
                        let size: i64 = r.get(2)?;
                        Ok((r.get(0)?, r.get(1)?, u64::try_from(size).unwrap_or(0)))
                    })
                    .and_then(|it| it.collect())
                    .map_err(|e| self.db_err(e))?;
                files_of.insert(h.clone(), rows);
            }
        }
        let total: u64 = files_of.values().flatten().map(|f| f.2).sum();
        // Every version a blob serves (a blob can be shared by several adapters).
        let mut blob_users: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
        for (adapter, files) in &files_of {
            for (_, sha, _) in files {
                let users = blob_users.entry(sha.as_str()).or_default();
                for l in by_adapter.get(adapter).into_iter().flatten() {
                    users.insert(l.as_str());
                }
            }
        }
        let mut report = VerifyReport {
            versions_checked: versions.len() as u64,
            adapters_checked: by_adapter.len() as u64,
            ..VerifyReport::default()
        };
        let mut progress = ctx.progress("verify", Some(total), "bytes");
        // blob hash -> (actual hash if readable, file identity)
        let mut blob_state: BTreeMap<String, Option<String>> = BTreeMap::new();
        let mut done = 0u64;
        let problem = |kind,
                       path: &Path,
                       expected: Option<&str>,
                       actual: Option<String>,
                       versions: &[String],
                       message: String| {
            VerifyProblem {
                kind,
                path: path.display().to_string(),
                expected_sha256: expected.map(str::to_string),
                actual_sha256: actual,
                versions: versions.to_vec(),
                message,
            }
        };
        for (adapter, labels) in &by_adapter {
            let files = files_of.get(adapter).map(Vec::as_slice).unwrap_or_default();
            let recomputed =
                hash::tree_hash(files.iter().map(|(p, h, _)| (p.as_str(), h.as_str())));
            if recomputed != *adapter {
                report.problems.push(problem(
                    ProblemKind::IndexMismatch,
                    &layout.index(),
                    Some(adapter),
                    Some(recomputed),
                    labels,
                    format!("the index's file list of adapter {adapter} does not hash to it"),
                ));
            }
            let dir = layout.adapter(adapter);
            for (rel, sha, size) in files {
                ctx.check_cancelled()
                    .map_err(|_| ArtifactError::Cancelled)?;
                let blob = layout.blob(sha);
                if !blob_state.contains_key(sha) {
                    let users: Vec<String> = blob_users
                        .get(sha.as_str())
                        .map(|u| u.iter().map(|l| l.to_string()).collect())
                        .unwrap_or_default();
                    let actual = match hash::hash_file(&blob) {
                        Ok((h, n)) => {
                            report.bytes_hashed += n;
                            Some(h)
                        }
                        Err(_) => None,
                    };
                    report.blobs_checked += 1;
                    match &actual {
                        None => report.problems.push(problem(
                            ProblemKind::MissingBlob,
                            &blob,
                            Some(sha),
                            None,
                            &users,
                            format!("blob of {rel} is missing or unreadable"),
                        )),
                        Some(h) if h != sha => report.problems.push(problem(
                            ProblemKind::CorruptBlob,
                            &blob,
                            Some(sha),
                            Some(h.clone()),
                            &users,
                            format!("blob of {rel} no longer matches its hash"),
                        )),
                        Some(_) => {}
                    }
                    blob_state.insert(sha.clone(), actual);
                }
                let file = rel_join(&dir, rel);
                let actual = if same_file(&file, &blob) {
                    blob_state.get(sha).cloned().flatten()
                } else {
                    match hash::hash_file(&file) {
                        Ok((h, n)) => {
                            report.bytes_hashed += n;
                            Some(h)
                        }
                        Err(_) => None,
                    }
                };
                match actual {
                    None => report.problems.push(problem(
                        ProblemKind::MissingFile,
                        &file,
                        Some(sha),
                        None,
                        labels,
                        "stored adapter file is missing or unreadable".into(),
                    )),
                    Some(h) if h != *sha => report.problems.push(problem(
                        ProblemKind::CorruptFile,
                        &file,
                        Some(sha),
                        Some(h),
                        labels,
                        "stored adapter file differs from what was stored".into(),
                    )),
                    Some(_) => {}
                }
                done += size;
                progress.update(done, None, &[]);
            }
            // Files that were never stored.
            if dir.is_dir() {
                let expected: BTreeSet<&str> = files.iter().map(|f| f.0.as_str()).collect();
                if let Ok(listed) = hash::list_files(&dir) {
                    for (rel, path) in listed {
                        if !expected.contains(rel.as_str()) {
                            report.problems.push(problem(
                                ProblemKind::UnexpectedFile,
                                &path,
                                None,
                                None,
                                labels,
                                "file was added to a stored adapter folder".into(),
                            ));
                        }
                    }
                }
            }
            // The manifest beside the folder.
            let mpath = layout.manifest(adapter);
            let text = hash::manifest(files.iter().map(|(p, h, _)| (p.as_str(), h.as_str())));
            match fs::read(&mpath) {
                Ok(b) if b == text.as_bytes() => {}
                Ok(b) => report.problems.push(problem(
                    ProblemKind::CorruptFile,
                    &mpath,
                    Some(adapter),
                    Some(hex::encode(Sha256::digest(&b))),
                    labels,
                    "manifest differs from the index".into(),
                )),
                Err(_) => report.problems.push(problem(
                    ProblemKind::MissingFile,
                    &mpath,
                    Some(adapter),
                    None,
                    labels,
                    "manifest is missing or unreadable".into(),
                )),
            }
        }
        report.ok = report.problems.is_empty();
        progress.finish(if report.ok {
            "ok".to_string()
        } else {
            format!("{} problems", report.problems.len())
        });
        Ok(report)
    }
}

fn describe(s: &Selector) -> String {
    match s {
        Selector::Number(n) => format!("v{n}"),
        Selector::Latest => "latest".into(),
        Selector::Best { metric, goal } => match goal {
            MetricGoal::Min => format!("best:{metric}"),
            MetricGoal::Max => format!("best:{metric}:max"),
        },
    }
}

/// The version number a selector names in `experiment`, if any.
fn resolve_in(
    conn: &Connection,
    experiment: &str,
    sel: &Selector,
) -> rusqlite::Result<Option<i64>> {
    let base = "FROM versions v JOIN experiments e ON e.id = v.experiment_id";
    match sel {
        Selector::Number(n) => conn
            .query_row(
                &format!("SELECT v.number {base} WHERE e.name = ?1 AND v.number = ?2"),
                params![experiment, n],
                |r| r.get(0),
            )
            .optional(),
        Selector::Latest => conn.query_row(
            &format!("SELECT MAX(v.number) {base} WHERE e.name = ?1"),
            [experiment],
            |r| r.get::<_, Option<i64>>(0),
        ),
        Selector::Best { metric, goal } => {
            let order = match goal {
                MetricGoal::Min => "ASC",
                MetricGoal::Max => "DESC",
            };
            conn.query_row(
                &format!(
                    "SELECT v.number {base} JOIN metrics m ON m.version_id = v.id
                     WHERE e.name = ?1 AND m.name = ?2 ORDER BY m.value {order}, v.number ASC LIMIT 1"
                ),
                params![experiment, metric],
                |r| r.get(0),
            )
            .optional()
        }
    }
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<fs::DirEntry>> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(ArtifactError::io(dir, e)),
    };
    let mut v: Vec<fs::DirEntry> = rd
        .collect::<io::Result<_>>()
        .map_err(|e| ArtifactError::io(dir, e))?;
    v.sort_by_key(fs::DirEntry::file_name);
    Ok(v)
}

fn dir_bytes(dir: &Path) -> u64 {
    hash::list_files(dir)
        .map(|fs_| {
            fs_.iter()
                .filter_map(|(_, p)| fs::symlink_metadata(p).ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

#[cfg(unix)]
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (fs::metadata(a), fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(_a: &Path, _b: &Path) -> bool {
    false
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests: a panic is the failure report.
mod tests {
    use super::*;
    use lora_skill::SkillError;
    use std::sync::mpsc;

    /// An adapter folder: a shared config, weights that depend on `seed`, a nested file.
    fn adapter(dir: &Path, seed: u32) {
        fs::create_dir_all(dir.join("nested")).unwrap();
        fs::write(
            dir.join("adapter_config.json"),
            br#"{"r": 8, "lora_alpha": 16}"#,
        )
        .unwrap();
        let w: Vec<u8> = (0..200_000u32)
            .map(|i| (i.wrapping_mul(seed + 3) % 253) as u8)
            .collect();
        fs::write(dir.join("adapter_model.safetensors"), &w).unwrap();
        fs::write(dir.join("nested/notes.txt"), format!("trial {seed}")).unwrap();
    }

    fn input(path: &Path, trial: u32, loss: f64, tags: &[&str]) -> ArtifactStoreInput {
        let mut i = ArtifactStoreInput::new(path.display().to_string(), trial);
        i.metrics.insert("eval_loss".into(), loss);
        i.metrics.insert("accuracy".into(), 1.0 - loss);
        i.tags = tags.iter().map(|s| s.to_string()).collect();
        i
    }

    fn blob_files(root: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for shard in fs::read_dir(root.join("blobs")).unwrap() {
            for f in fs::read_dir(shard.unwrap().path()).unwrap() {
                out.push(f.unwrap().path());
            }
        }
        out
    }

    fn ctx() -> SkillContext {
        SkillContext::new(std::env::temp_dir())
    }

    #[test]
    fn store_versions_and_query_them() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = ArtifactStore::open(tmp.path().join("store")).unwrap();
        assert_eq!(s.schema_version().unwrap(), MIGRATIONS_LEN);
        let mut outs = Vec::new();
        for (i, loss) in [0.9, 0.4, 0.6].into_iter().enumerate() {
            let a = tmp.path().join(format!("a{i}"));
            adapter(&a, i as u32);
            let tags: &[&str] = if i == 1 { &["lora", "good"] } else { &["lora"] };
            let o = s
                .store(&input(&a, i as u32 + 1, loss, tags), &ctx())
                .unwrap();
            assert_eq!(o.adapter_hash, hash::hash_adapter_dir(&a).unwrap().hash);
            // The stored copy hashes to the same value.
            assert_eq!(
                hash::hash_adapter_dir(Path::new(&o.stored_path))
                    .unwrap()
                    .hash,
                o.adapter_hash
            );
            assert!(!o.reused);
            outs.push(o);
        }
        let names: Vec<_> = outs.iter().map(|o| o.version.as_str()).collect();
        assert_eq!(names, ["v1", "v2", "v3"]);
        // The config file is shared: 3 weights + 3 notes + 1 config.
        assert_eq!(blob_files(s.root()).len(), 7);
        assert_eq!(outs[1].bytes_written, outs[1].bytes - 26);

        let all = s.list(Some("default")).unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(all[1].tags, ["good", "lora"]);
        assert_eq!(all[1].metrics["eval_loss"], 0.4);
        assert_eq!(all[1].trial_id, 2);
        assert!(all[0].created_at.ends_with('Z'));
        assert_eq!(s.get("latest", "default").unwrap().version, "v3");
        assert_eq!(s.get("best:eval_loss", "default").unwrap().version, "v2");
        assert_eq!(s.get("default/v1", "other").unwrap().trial_id, 1);
        let (b, n) = s.best(None, "accuracy", MetricGoal::Max, &[]).unwrap();
        assert_eq!((b.unwrap().version.as_str(), n), ("v2", 3));
        let (b, _) = s
            .best(Some("default"), "eval_loss", MetricGoal::Max, &[])
            .unwrap();
        assert_eq!(b.unwrap().version, "v1");
        let (b, n) = s.best(None, "bleu", MetricGoal::Max, &[]).unwrap();
        assert!(b.is_none() && n == 0);
        let f = s
            .filter(&VersionFilter {
                tags: vec!["good".into()],
                ..VersionFilter::default()
            })
            .unwrap();
        assert_eq!(f.len(), 1);
        let f = s
            .filter(&VersionFilter {
                metric_max: [("eval_loss".to_string(), 0.6)].into(),
                ..VersionFilter::default()
            })
            .unwrap();
        assert_eq!(
            f.iter().map(|v| v.version.as_str()).collect::<Vec<_>>(),
            ["v2", "v3"]
        );

        // Delete v3: the number is never given again.
        assert_eq!(s.delete("v3", "default").unwrap().version, "v3");
        assert!(matches!(
            s.get("v3", "default"),
            Err(ArtifactError::NotFound { .. })
        ));
        let a = tmp.path().join("a9");
        adapter(&a, 9);
        assert_eq!(
            s.store(&input(&a, 9, 0.5, &[]), &ctx()).unwrap().version,
            "v4"
        );
        let files = s.adapter_files(&all[0].adapter_hash).unwrap();
        let names: Vec<_> = files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(
            names,
            [
                "adapter_config.json",
                "adapter_model.safetensors",
                "nested/notes.txt"
            ]
        );
        assert!(
            files
                .iter()
                .all(|f| Path::new(&f.stored_path).is_file() && Path::new(&f.blob_path).is_file())
        );
        assert!(s.adapter_files(&"0".repeat(64)).is_err());
        let ex = s.experiments().unwrap();
        assert_eq!((ex[0].versions, ex[0].last_version), (3, 4));
    }

    #[test]
    fn identical_adapters_are_stored_once_and_retries_are_idempotent() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = ArtifactStore::open(tmp.path().join("store")).unwrap();
        let a = tmp.path().join("a");
        let b = tmp.path().join("b");
        adapter(&a, 1);
        adapter(&b, 1);
        let o1 = s.store(&input(&a, 1, 0.5, &["x"]), &ctx()).unwrap();
        // Same bytes from another trial: a new version, no new bytes.
        let o2 = s.store(&input(&b, 2, 0.5, &["x"]), &ctx()).unwrap();
        assert_eq!((o2.version.as_str(), o2.bytes_written), ("v2", 0));
        assert_eq!(o1.stored_path, o2.stored_path);
        // The same request again (tags in another order): the existing version.
        let o3 = s.store(&input(&b, 2, 0.5, &["x", "x"]), &ctx()).unwrap();
        assert!(o3.reused);
        assert_eq!(o3.version, "v2");
        // Other metrics: a new version.
        let o4 = s.store(&input(&b, 2, 0.25, &["x"]), &ctx()).unwrap();
        assert_eq!(o4.version, "v3");
        assert_eq!(blob_files(s.root()).len(), 3);
        // Experiments number separately.
        let mut i = input(&a, 1, 0.5, &[]);
        i.experiment_id = "sweep-2".into();
        assert_eq!(s.store(&i, &ctx()).unwrap().version, "v1");
    }

    #[test]
    fn parents_are_resolved_and_checked() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = ArtifactStore::open(tmp.path().join("store")).unwrap();
        let a = tmp.path().join("a");
        adapter(&a, 1);
        s.store(&input(&a, 1, 0.5, &[]), &ctx()).unwrap();
        let b = tmp.path().join("b");
        adapter(&b, 2);
        let mut i = input(&b, 2, 0.4, &[]);
        i.parent = Some("latest".into());
        s.store(&i, &ctx()).unwrap();
        assert_eq!(
            s.get("v2", "default").unwrap().parent.as_deref(),
            Some("default/v1")
        );
        i.parent = Some("v7".into());
        let e = s.store(&i, &ctx()).unwrap_err();
        assert!(matches!(e, ArtifactError::NotFound { .. }), "{e}");
        assert!(e.to_string().contains("default/v7"), "{e}");
        // Nothing was registered by the failed store.
        assert_eq!(s.list(None).unwrap().len(), 2);
    }

    #[test]
    fn bad_inputs_are_named() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = ArtifactStore::open(tmp.path().join("store")).unwrap();
        let a = tmp.path().join("a");
        adapter(&a, 1);
        let mut i = input(&a, 1, f64::NAN, &[]);
        let e: SkillError = s.store(&i, &ctx()).unwrap_err().into();
        assert_eq!(e.field.as_deref(), Some("metrics.accuracy"));
        i = input(&a, 1, 0.1, &[""]);
        let e: SkillError = s.store(&i, &ctx()).unwrap_err().into();
        assert_eq!(e.field.as_deref(), Some("tags[0]"));
        i = input(&a, 1, 0.1, &[]);
        i.experiment_id = "a/b".into();
        let e: SkillError = s.store(&i, &ctx()).unwrap_err().into();
        assert_eq!(e.field.as_deref(), Some("experiment_id"));
        i = input(&tmp.path().join("nope"), 1, 0.1, &[]);
        let e: SkillError = s.store(&i, &ctx()).unwrap_err().into();
        assert_eq!(e.kind, lora_skill::ErrorKind::NotFound);
        assert!(e.to_string().contains("nope"), "{e}");
        let e: SkillError = s.get("v1x", "default").unwrap_err().into();
        assert_eq!(e.field.as_deref(), Some("reference"));
        let e: SkillError = ArtifactStore::open_existing(tmp.path().join("empty"))
            .unwrap_err()
            .into();
        assert_eq!(e.kind, lora_skill::ErrorKind::NotFound);
        assert!(e.hint.is_some());
        assert!(s.list(None).unwrap().is_empty());
    }

    #[test]
    fn a_source_changed_between_hash_and_copy_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = ArtifactStore::open(tmp.path().join("store")).unwrap();
        // Old files take the kernel-copy path (stamp check), fresh ones the re-hashing path.
        for old in [true, false] {
            let a = tmp.path().join(format!("a-{old}"));
            adapter(&a, if old { 1 } else { 2 });
            let w = a.join("adapter_model.safetensors");
            if old {
                let past = std::time::SystemTime::now() - Duration::from_secs(3600);
                File::options()
                    .write(true)
                    .open(&w)
                    .unwrap()
                    .set_modified(past)
                    .unwrap();
            }
            let e = s
                .store_observed(&input(&a, 1, 0.5, &[]), &ctx(), &mut |phase| {
                    if phase == StorePhase::Hashed {
                        // Same size, other bytes: only the content (or the stamp) tells.
                        let mut b = fs::read(&w).unwrap();
                        b[10] ^= 1;
                        fs::write(&w, &b).unwrap();
                    }
                })
                .unwrap_err();
            assert!(
                matches!(e, ArtifactError::SourceChanged { .. }),
                "old={old}: {e}"
            );
            assert!(s.list(None).unwrap().is_empty());
        }
        // Nothing half-written: no temporary files, no blob for the changed weights.
        let leftovers: Vec<_> = blob_files(s.root())
            .into_iter()
            .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("store");
        drop(ArtifactStore::open(&root).unwrap());
        let c = Connection::open(root.join("index.sqlite")).unwrap();
        c.pragma_update(None, "user_version", 99).unwrap();
        drop(c);
        let e = ArtifactStore::open_existing(&root).unwrap_err();
        assert!(
            matches!(e, ArtifactError::SchemaTooNew { found: 99, .. }),
            "{e}"
        );
    }

    #[test]
    fn gc_removes_only_unreferenced_files_and_leftovers() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = ArtifactStore::open(tmp.path().join("store")).unwrap();
        for i in 0..3 {
            let a = tmp.path().join(format!("a{i}"));
            adapter(&a, i);
            s.store(&input(&a, i, 0.5, &[]), &ctx()).unwrap();
        }
        let v2 = s.get("v2", "default").unwrap();
        s.delete("v2", "default").unwrap();
        // Leftovers of a killed writer: a blob temp file and a half-built folder.
        let shard = s.root().join("blobs/00");
        fs::create_dir_all(&shard).unwrap();
        fs::write(shard.join(".0000.tmp-1-1"), b"half a blob").unwrap();
        fs::create_dir_all(s.root().join("adapters/.tmp-abc-1-1/nested")).unwrap();
        let before = blob_files(s.root()).len();

        let dry = s
            .gc(
                GcOptions {
                    dry_run: true,
                    ..GcOptions::default()
                },
                &ctx(),
            )
            .unwrap();
        assert!(dry.dry_run);
        assert_eq!(
            (dry.adapters_removed, dry.blobs_removed, dry.temp_removed),
            (1, 2, 2)
        );
        assert_eq!(blob_files(s.root()).len(), before);
        assert!(Path::new(&v2.stored_path).is_dir());

        let r = s.gc(GcOptions::default(), &ctx()).unwrap();
        assert_eq!(
            (r.adapters_removed, r.blobs_removed, r.temp_removed),
            (1, 2, 2)
        );
        assert_eq!(r.bytes_freed, 200_000 + 7 + 11);
        assert!(!Path::new(&v2.stored_path).exists());
        assert!(!Path::new(&format!("{}.sha256", v2.stored_path)).exists());
        // The shared config blob is still there; what remains verifies.
        assert_eq!(blob_files(s.root()).len(), before - 3);
        assert!(s.verify(None, "default", &ctx()).unwrap().ok);
        let again = s.gc(GcOptions::default(), &ctx()).unwrap();
        assert!(again.removed.is_empty(), "{again:?}");
        // A deleted adapter can be stored again afterwards.
        let a = tmp.path().join("a1");
        let o = s.store(&input(&a, 1, 0.5, &[]), &ctx()).unwrap();
        assert_eq!(o.stored_path, v2.stored_path);
        assert!(s.verify(None, "default", &ctx()).unwrap().ok);
    }

    fn make_writable(p: &Path) {
        let mut perms = fs::metadata(p).unwrap().permissions();
        #[allow(clippy::permissions_set_readonly_false)] // The test corrupts a file on purpose.
        perms.set_readonly(false);
        fs::set_permissions(p, perms).unwrap();
    }

    #[test]
    fn verify_reports_corruption_by_path() {
        let tmp = tempfile::tempdir().unwrap();
        let mut s = ArtifactStore::open(tmp.path().join("store")).unwrap();
        for i in 0..2 {
            let a = tmp.path().join(format!("a{i}"));
            adapter(&a, i);
            s.store(&input(&a, i, 0.5, &[]), &ctx()).unwrap();
        }
        let r = s.verify(None, "default", &ctx()).unwrap();
        assert!(r.ok, "{r:?}");
        assert_eq!(
            (r.versions_checked, r.adapters_checked, r.blobs_checked),
            (2, 2, 5)
        );

        let v1 = s.get("v1", "default").unwrap();
        let w = hash::hash_file(&Path::new(&v1.stored_path).join("adapter_model.safetensors"))
            .unwrap()
            .0;
        let blob = Layout(s.root()).blob(&w);
        make_writable(&blob);
        let mut bytes = fs::read(&blob).unwrap();
        bytes[1234] ^= 0x40;
        // Rewrite in place (keeps the hard link, as bit rot or a stray editor would).
        fs::OpenOptions::new()
            .write(true)
            .open(&blob)
            .unwrap()
            .write_all(&bytes)
            .unwrap();

        let r = s.verify(None, "default", &ctx()).unwrap();
        assert!(!r.ok);
        let corrupt: Vec<_> = r
            .problems
            .iter()
            .filter(|p| p.kind == ProblemKind::CorruptBlob)
            .collect();
        assert_eq!(corrupt.len(), 1, "{r:?}");
        assert_eq!(corrupt[0].path, blob.display().to_string());
        assert_eq!(corrupt[0].versions, ["default/v1"]);
        assert_eq!(corrupt[0].expected_sha256.as_deref(), Some(w.as_str()));
        // The user-facing path (a hard link to the blob) is named too.
        assert!(
            r.problems.iter().any(|p| p.kind == ProblemKind::CorruptFile
                && p.path.ends_with("adapter_model.safetensors"))
        );
        // Only v1 is affected.
        assert!(s.verify(Some("v2"), "default", &ctx()).unwrap().ok);

        // A missing blob and a stray file.
        let v2 = s.get("v2", "default").unwrap();
        let n = hash::hash_file(&Path::new(&v2.stored_path).join("nested/notes.txt"))
            .unwrap()
            .0;
        fs::remove_file(Layout(s.root()).blob(&n)).unwrap();
        fs::write(Path::new(&v2.stored_path).join("stray.bin"), b"?").unwrap();
        let r = s.verify(Some("v2"), "default", &ctx()).unwrap();
        let kinds: BTreeSet<_> = r.problems.iter().map(|p| format!("{:?}", p.kind)).collect();
        assert_eq!(
            kinds.into_iter().collect::<Vec<_>>(),
            ["MissingBlob", "UnexpectedFile"],
            "{r:?}"
        );
        // A blob shared by both versions names both.
        let c = hash::hash_file(&Path::new(&v2.stored_path).join("adapter_config.json"))
            .unwrap()
            .0;
        let blob = Layout(s.root()).blob(&c);
        make_writable(&blob);
        fs::write(&blob, b"{}").unwrap();
        let r = s.verify(None, "default", &ctx()).unwrap();
        let p = r
            .problems
            .iter()
            .find(|p| p.kind == ProblemKind::CorruptBlob && p.path == blob.display().to_string())
            .unwrap();
        assert_eq!(p.versions, ["default/v1", "default/v2"]);
    }

    #[test]
    fn gc_waits_for_a_store_in_flight() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("store");
        let a = tmp.path().join("a");
        adapter(&a, 5);
        drop(ArtifactStore::open(&root).unwrap());
        let (at_blobs_tx, at_blobs_rx) = mpsc::channel();
        let (go_tx, go_rx) = mpsc::channel::<()>();
        let writer = {
            let root = root.clone();
            let a = a.clone();
            std::thread::spawn(move || {
                let mut s = ArtifactStore::open(&root).unwrap();
                s.store_observed(&input(&a, 1, 0.5, &[]), &ctx(), &mut |phase| {
                    if phase == StorePhase::BlobsWritten {
                        at_blobs_tx.send(()).unwrap();
                        go_rx.recv().unwrap();
                    }
                })
                .unwrap()
            })
        };
        at_blobs_rx.recv().unwrap();
        // The blobs are on disk and unreferenced, but a store holds them: gc must not run.
        let mut s = ArtifactStore::open_existing(&root).unwrap();
        assert_eq!(blob_files(&root).len(), 3);
        let opts = GcOptions {
            dry_run: false,
            wait: Duration::from_millis(200),
        };
        let e = s.gc(opts, &ctx()).unwrap_err();
        assert!(matches!(e, ArtifactError::Busy { .. }), "{e}");
        assert_eq!(blob_files(&root).len(), 3);
        go_tx.send(()).unwrap();
        let out = writer.join().unwrap();
        assert_eq!(out.version, "v1");
        let r = s.gc(opts, &ctx()).unwrap();
        assert_eq!(r.blobs_removed, 0);
        assert!(s.verify(None, "default", &ctx()).unwrap().ok);
    }

    const MIGRATIONS_LEN: i64 = index::MIGRATIONS.len() as i64;
}
