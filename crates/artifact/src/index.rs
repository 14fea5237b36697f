//! The SQLite index: schema, migrations and the row-level queries.
//!
//! One file, `index.sqlite`, in WAL mode (readers never block the writer),
//! `synchronous=FULL` (a committed version survives a power cut),
//! `foreign_keys=ON` and a 30 s busy timeout so that concurrent writers queue
//! instead of failing. Every write is one `BEGIN IMMEDIATE` transaction: the
//! write lock is taken up front, so two processes allocating a version number
//! are serialised and a version is either fully registered (row, metrics,
//! tags, file list) or absent.
//!
//! The schema version is SQLite's `user_version`; [`MIGRATIONS`] lists the
//! scripts that bring a store from version `i` to `i + 1`, applied in one
//! immediate transaction so that two processes opening a fresh store at once
//! do not both migrate it.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use lora_spec::contracts::artifact::ArtifactVersion;
use rusqlite::{
    Connection, OpenFlags, OptionalExtension, Transaction, TransactionBehavior, params,
};

use crate::error::{ArtifactError, Result};
use crate::hash::HASH_SCHEME;

/// Schema migrations, in order; entry `i` upgrades version `i` to `i + 1`.
pub const MIGRATIONS: &[&str] = &[
    // v1
    r#"
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE experiments (
    id           INTEGER PRIMARY KEY,
    name         TEXT NOT NULL UNIQUE,
    last_version INTEGER NOT NULL DEFAULT 0,
    created_at   TEXT NOT NULL
);
CREATE TABLE adapters (
    hash       TEXT PRIMARY KEY,
    files      INTEGER NOT NULL,
    bytes      INTEGER NOT NULL,
    created_at TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE adapter_files (
    adapter_hash TEXT NOT NULL REFERENCES adapters(hash) ON DELETE CASCADE,
    path         TEXT NOT NULL,
    blob_hash    TEXT NOT NULL,
    size         INTEGER NOT NULL,
    PRIMARY KEY (adapter_hash, path)
) WITHOUT ROWID;
CREATE INDEX adapter_files_blob ON adapter_files(blob_hash);
CREATE TABLE versions (
    id                INTEGER PRIMARY KEY,
    experiment_id     INTEGER NOT NULL REFERENCES experiments(id),
    number            INTEGER NOT NULL,
    trial_id          INTEGER NOT NULL,
    adapter_hash      TEXT NOT NULL REFERENCES adapters(hash),
    parent_experiment TEXT,
    parent_number     INTEGER,
    source_path       TEXT NOT NULL,
    request_digest    TEXT NOT NULL,
    metadata          TEXT NOT NULL DEFAULT '{}',
    created_at        TEXT NOT NULL,
    UNIQUE (experiment_id, number)
);
CREATE INDEX versions_request ON versions(experiment_id, request_digest);
CREATE INDEX versions_adapter ON versions(adapter_hash);
CREATE TABLE metrics (
    version_id INTEGER NOT NULL REFERENCES versions(id) ON DELETE CASCADE,
    name       TEXT NOT NULL,
    value      REAL NOT NULL,
    PRIMARY KEY (version_id, name)
) WITHOUT ROWID;
CREATE INDEX metrics_name ON metrics(name, value);
CREATE TABLE tags (
    version_id INTEGER NOT NULL REFERENCES versions(id) ON DELETE CASCADE,
    tag        TEXT NOT NULL,
    PRIMARY KEY (version_id, tag)
) WITHOUT ROWID;
CREATE INDEX tags_tag ON tags(tag);
"#,
];

/// The current time as SQLite writes it (RFC 3339, UTC, milliseconds).
pub const NOW: &str = "strftime('%Y-%m-%dT%H:%M:%fZ','now')";

/// How long a connection waits for another's lock before reporting it.
const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// Opens (creating when `create`) the index and brings it to the current schema.
pub fn open(path: &Path, create: bool) -> Result<Connection> {
    let mut flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    if create {
        flags |= OpenFlags::SQLITE_OPEN_CREATE;
    }
    let err = |e| ArtifactError::index(path, e);
    let mut conn = Connection::open_with_flags(path, flags).map_err(err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(err)?;
    // journal_mode=WAL is persistent in the file; setting it again is a no-op.
    // The first switch of a new file needs an exclusive lock, and SQLite
    // reports a rival connection's lock as busy at once, without its busy
    // handler (connections opening a new store together), so retry it here.
    let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
    let mode: String = loop {
        match conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0)) {
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DatabaseBusy
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(5));
            }
            other => break other.map_err(err)?,
        }
    };
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(ArtifactError::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                format!(
                    "the filesystem refused WAL mode (journal_mode={mode}); put the store on a local disk"
                ),
            ),
        ));
    }
    conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;")
        .map_err(err)?;
    migrate(&mut conn, path)?;
    Ok(conn)
}

/// The schema version of an open index.
pub fn schema_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("PRAGMA user_version", [], |r| r.get(0))
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<()> {
    let err = |e| ArtifactError::index(path, e);
    let supported = MIGRATIONS.len() as i64;
    // Cheap read first: most opens find the schema current.
    let found = schema_version(conn).map_err(err)?;
    if found == supported {
        return Ok(());
    }
    if found > supported {
        return Err(ArtifactError::SchemaTooNew {
            path: path.to_path_buf(),
            found,
            supported,
        });
    }
    let tx = Transaction::new(conn, TransactionBehavior::Immediate).map_err(err)?;
    // Re-read under the write lock: another process may have migrated meanwhile.
    let found = schema_version(&tx).map_err(err)?;
    if found > supported {
        return Err(ArtifactError::SchemaTooNew {
            path: path.to_path_buf(),
            found,
            supported,
        });
    }
    for sql in &MIGRATIONS[found.max(0) as usize..] {
        tx.execute_batch(sql).map_err(err)?;
    }
    tx.execute(
        "INSERT OR REPLACE INTO meta(key, value) VALUES ('adapter_hash_scheme', ?1)",
        [HASH_SCHEME],
    )
    .map_err(err)?;
    tx.pragma_update(None, "user_version", supported)
        .map_err(err)?;
    tx.commit().map_err(err)
}

/// Which versions to load.
#[derive(Debug, Default, Clone)]
pub struct Scope<'a> {
    /// Only this experiment.
    pub experiment: Option<&'a str>,
    /// Only this version number (with `experiment`).
    pub number: Option<i64>,
    /// Only this trial.
    pub trial_id: Option<u32>,
}

/// A loaded version with its row id.
#[derive(Debug, Clone)]
pub struct Row {
    /// `versions.id`.
    pub id: i64,
    /// The version as reported (stored_path relative to the store root).
    pub version: ArtifactVersion,
}

/// Loads versions in `scope`, oldest first, with their metrics and tags.
pub fn load(conn: &Connection, scope: &Scope<'_>) -> rusqlite::Result<Vec<Row>> {
    let mut cond = vec!["1=1".to_string()];
    let mut args: Vec<rusqlite::types::Value> = Vec::new();
    if let Some(e) = scope.experiment {
        args.push(e.to_string().into());
        cond.push(format!("e.name = ?{}", args.len()));
    }
    if let Some(n) = scope.number {
        args.push(n.into());
        cond.push(format!("v.number = ?{}", args.len()));
    }
    if let Some(t) = scope.trial_id {
        args.push(i64::from(t).into());
        cond.push(format!("v.trial_id = ?{}", args.len()));
    }
    let where_sql = cond.join(" AND ");
    let sql = format!(
        "SELECT v.id, e.name, v.number, v.trial_id, v.adapter_hash, v.parent_experiment,
                v.parent_number, v.created_at, v.metadata, a.files, a.bytes
         FROM versions v JOIN experiments e ON e.id = v.experiment_id
                         JOIN adapters a ON a.hash = v.adapter_hash
         WHERE {where_sql} ORDER BY v.id"
    );
    let mut stmt = conn.prepare(&sql)?;
    let mut rows: Vec<Row> = stmt
        .query_map(rusqlite::params_from_iter(args.iter()), |r| {
            let experiment_id: String = r.get(1)?;
            let number: i64 = r.get(2)?;
            let trial: i64 = r.get(3)?;
            let hash: String = r.get(4)?;
            let pe: Option<String> = r.get(5)?;
            let pn: Option<i64> = r.get(6)?;
            let meta: String = r.get(8)?;
            let files: i64 = r.get(9)?;
            let bytes: i64 = r.get(10)?;
            Ok(Row {
                id: r.get(0)?,
                version: ArtifactVersion {
                    experiment_id,
                    version: format!("v{number}"),
                    trial_id: u32::try_from(trial).unwrap_or(u32::MAX),
                    stored_path: format!("adapters/{hash}"),
                    adapter_hash: hash,
                    metrics: BTreeMap::new(),
                    tags: Vec::new(),
                    parent: match (pe, pn) {
                        (Some(e), Some(n)) => Some(format!("{e}/v{n}")),
                        _ => None,
                    },
                    created_at: r.get(7)?,
                    files: u64::try_from(files).unwrap_or(0),
                    bytes: u64::try_from(bytes).unwrap_or(0),
                    metadata: serde_json::from_str(&meta).unwrap_or_default(),
                },
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    if rows.is_empty() {
        return Ok(rows);
    }
    let pos: BTreeMap<i64, usize> = rows.iter().enumerate().map(|(i, r)| (r.id, i)).collect();
    let sub = format!(
        "SELECT v.id FROM versions v JOIN experiments e ON e.id = v.experiment_id WHERE {where_sql}"
    );
    let mut stmt = conn.prepare(&format!(
        "SELECT version_id, name, value FROM metrics WHERE version_id IN ({sub}) ORDER BY name"
    ))?;
    let mut q = stmt.query(rusqlite::params_from_iter(args.iter()))?;
    while let Some(r) = q.next()? {
        let id: i64 = r.get(0)?;
        if let Some(&i) = pos.get(&id) {
            rows[i].version.metrics.insert(r.get(1)?, r.get(2)?);
        }
    }
    let mut stmt = conn.prepare(&format!(
        "SELECT version_id, tag FROM tags WHERE version_id IN ({sub}) ORDER BY tag"
    ))?;
    let mut q = stmt.query(rusqlite::params_from_iter(args.iter()))?;
    while let Some(r) = q.next()? {
        let id: i64 = r.get(0)?;
        if let Some(&i) = pos.get(&id) {
            rows[i].version.tags.push(r.get(1)?);
        }
    }
    Ok(rows)
}

/// The id of experiment `name`, creating it when missing.
pub fn ensure_experiment(tx: &Transaction<'_>, name: &str) -> rusqlite::Result<i64> {
    tx.execute(
        &format!("INSERT OR IGNORE INTO experiments(name, created_at) VALUES (?1, {NOW})"),
        [name],
    )?;
    tx.query_row("SELECT id FROM experiments WHERE name = ?1", [name], |r| {
        r.get(0)
    })
}

/// The number of an existing version with this request digest, if any.
pub fn find_request(
    conn: &Connection,
    experiment: &str,
    digest: &str,
) -> rusqlite::Result<Option<i64>> {
    conn.query_row(
        "SELECT v.number FROM versions v JOIN experiments e ON e.id = v.experiment_id
         WHERE e.name = ?1 AND v.request_digest = ?2 ORDER BY v.id LIMIT 1",
        params![experiment, digest],
        |r| r.get(0),
    )
    .optional()
}

/// Experiment names with their version counts and last version number.
pub fn experiments(conn: &Connection) -> rusqlite::Result<Vec<(String, u64, i64, String)>> {
    let mut stmt = conn.prepare(
        "SELECT e.name, COUNT(v.id), e.last_version, e.created_at
         FROM experiments e LEFT JOIN versions v ON v.experiment_id = e.id
         GROUP BY e.id ORDER BY e.name",
    )?;
    stmt.query_map([], |r| {
        let n: i64 = r.get(1)?;
        Ok((
            r.get(0)?,
            u64::try_from(n).unwrap_or(0),
            r.get(2)?,
            r.get(3)?,
        ))
    })?
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Connections opening one new index at once: the first switch to WAL
    /// needs an exclusive lock, and SQLite answers it with "database is
    /// locked" without calling the busy handler. Every open must succeed.
    #[test]
    fn connections_opening_a_new_index_at_once_all_succeed() {
        for round in 0..20 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("index.sqlite");
            let results: Vec<Result<()>> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..6)
                    .map(|_| s.spawn(|| open(&path, true).map(drop)))
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for r in results {
                assert!(r.is_ok(), "round {round}: {}", r.unwrap_err());
            }
        }
    }
}
