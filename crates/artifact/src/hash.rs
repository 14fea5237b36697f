//! The adapter hash: SHA-256 over an adapter folder, defined so that anyone can
//! recompute it with standard tools.
//!
//! # Framing (scheme `sha256-manifest-v1`)
//!
//! 1. Take every regular file under the folder, recursively (a symbolic link to
//!    a file counts as that file; empty folders, and therefore folder structure
//!    alone, do not count; file modes and times do not count).
//! 2. Name each file by its path relative to the folder, components joined by
//!    `/`, in UTF-8. Names must be valid UTF-8 and may not contain a control
//!    character (U+0000 to U+001F, U+007F) or a backslash, so that the line
//!    format below is unambiguous.
//! 3. Sort the files by the bytes of their relative path (what `LC_ALL=C sort`
//!    does, and the code-point order of Python's `sorted`).
//! 4. The manifest is, for each file in that order, the line
//!    `<sha256 of the file's bytes, 64 lowercase hex>` + two spaces + `<relative path>` + `\n`:
//!    exactly the output of `sha256sum` run on the sorted relative paths.
//! 5. `adapter_hash` = SHA-256 of the manifest's bytes, 64 lowercase hex.
//!
//! A shell check: `cd ADAPTER && find . -type f -printf '%P\n' | LC_ALL=C sort |
//! xargs -d '\n' sha256sum | sha256sum`. The store writes the manifest beside
//! each stored adapter (`adapters/<hash>.sha256`), so `sha256sum -c` works there too.
//! Because the hash is built from per-file hashes, the store can check an
//! adapter against its index without reading a byte twice.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use lora_skill::SkillContext;
use sha2::{Digest, Sha256};

use crate::error::{ArtifactError, Result};

/// The name of the hashing scheme, stored in the index.
pub const HASH_SCHEME: &str = "sha256-manifest-v1";

const BUF: usize = 1 << 20;

/// One file of an adapter folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEntry {
    /// Path relative to the folder, `/`-separated.
    pub path: String,
    /// SHA-256 of the bytes, 64 lowercase hex.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
    /// Where the file was read from.
    pub source: PathBuf,
    /// What the source looked like when it was hashed.
    pub(crate) stamp: Stamp,
}

/// A file's size, modification time and identity: if none of them changed,
/// the bytes did not either (unless the file was written within the
/// filesystem's timestamp granularity, see [`Stamp::is_recent`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
    id: (u64, u64),
}

impl Stamp {
    /// The stamp of `path` now.
    pub(crate) fn of(path: &Path) -> io::Result<Self> {
        let m = fs::metadata(path)?;
        #[cfg(unix)]
        let id = {
            use std::os::unix::fs::MetadataExt;
            (m.dev(), m.ino())
        };
        #[cfg(not(unix))]
        let id = (0, 0);
        Ok(Self {
            len: m.len(),
            modified: m.modified().ok(),
            id,
        })
    }

    /// Modified less than two seconds ago (or at an unknown time): a later
    /// write could keep the same timestamp, so the stamp cannot be trusted.
    pub(crate) fn is_recent(&self) -> bool {
        match self.modified {
            Some(m) => SystemTime::now()
                .duration_since(m)
                .map_or(true, |d| d < Duration::from_secs(2)),
            None => true,
        }
    }
}

/// An adapter folder's files and hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeDigest {
    /// `adapter_hash` (see the module docs).
    pub hash: String,
    /// The files, sorted by path.
    pub files: Vec<FileEntry>,
    /// Total bytes.
    pub bytes: u64,
}

/// The manifest text of sorted `(relative path, sha256)` pairs.
pub fn manifest<'a>(entries: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut out = String::new();
    for (path, sha) in entries {
        out.push_str(sha);
        out.push_str("  ");
        out.push_str(path);
        out.push('\n');
    }
    out
}

/// `adapter_hash` of sorted `(relative path, sha256)` pairs.
pub fn tree_hash<'a>(entries: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    hex::encode(Sha256::digest(manifest(entries).as_bytes()))
}

/// SHA-256 (hex) and size of a file's bytes.
pub fn hash_file(path: &Path) -> io::Result<(String, u64)> {
    hash_file_with(path, &mut |_| Ok(()))
}

/// Like [`hash_file`], calling `tick(bytes)` after each chunk; an error from
/// `tick` stops the read.
pub(crate) fn hash_file_with(
    path: &Path,
    tick: &mut dyn FnMut(u64) -> io::Result<()>,
) -> io::Result<(String, u64)> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; BUF];
    let mut n_total = 0u64;
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        h.update(&buf[..n]);
        n_total += n as u64;
        tick(n as u64)?;
    }
    Ok((hex::encode(h.finalize()), n_total))
}

/// Checks one relative path against rule 2 of the framing.
pub fn check_rel_path(rel: &str) -> std::result::Result<(), String> {
    if rel.is_empty() {
        return Err("empty file name".into());
    }
    if let Some(c) = rel.chars().find(|c| c.is_control() || *c == '\\') {
        return Err(format!(
            "file name {rel:?} contains {c:?}; control characters and backslashes are not allowed"
        ));
    }
    Ok(())
}

/// Lists the regular files under `dir` as sorted `(relative path, absolute path)`.
pub fn list_files(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let meta = fs::metadata(dir).map_err(|e| ArtifactError::io(dir, e))?;
    if !meta.is_dir() {
        return Err(ArtifactError::InvalidAdapter {
            path: dir.to_path_buf(),
            reason: "is not a folder".into(),
            hint: "pass the adapter folder (the one holding adapter_config.json)".into(),
        });
    }
    let mut out = Vec::new();
    walk(dir, "", &mut out)?;
    out.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
    Ok(out)
}

fn walk(dir: &Path, prefix: &str, out: &mut Vec<(String, PathBuf)>) -> Result<()> {
    let rd = fs::read_dir(dir).map_err(|e| ArtifactError::io(dir, e))?;
    for entry in rd {
        let entry = entry.map_err(|e| ArtifactError::io(dir, e))?;
        let path = entry.path();
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            return Err(ArtifactError::InvalidAdapter {
                path,
                reason: "file name is not valid UTF-8".into(),
                hint: "rename the file; adapter file names must be UTF-8".into(),
            });
        };
        let rel = if prefix.is_empty() {
            name.to_string()
        } else {
            format!("{prefix}/{name}")
        };
        if let Err(reason) = check_rel_path(&rel) {
            return Err(ArtifactError::InvalidAdapter {
                path,
                reason,
                hint: "rename the file".into(),
            });
        }
        let ft = entry.file_type().map_err(|e| ArtifactError::io(&path, e))?;
        if ft.is_dir() {
            walk(&path, &rel, out)?;
        } else if ft.is_file() {
            out.push((rel, path));
        } else if ft.is_symlink() {
            let target = fs::metadata(&path).map_err(|e| ArtifactError::io(&path, e))?;
            if target.is_file() {
                out.push((rel, path));
            } else {
                return Err(ArtifactError::InvalidAdapter {
                    path,
                    reason: "is a symbolic link to something other than a file".into(),
                    hint: "replace the link with a copy of what it points to".into(),
                });
            }
        } else {
            return Err(ArtifactError::InvalidAdapter {
                path,
                reason: "is neither a file nor a folder".into(),
                hint: "remove it from the adapter folder".into(),
            });
        }
    }
    Ok(())
}

/// Hashes an adapter folder (see the module docs for the framing).
pub fn hash_adapter_dir(dir: &Path) -> Result<TreeDigest> {
    hash_adapter_dir_in(dir, None)
}

/// Like [`hash_adapter_dir`], reporting progress in bytes to `ctx` and stopping when it is cancelled.
pub fn hash_adapter_dir_in(dir: &Path, ctx: Option<&SkillContext>) -> Result<TreeDigest> {
    let listed = list_files(dir)?;
    if listed.is_empty() {
        return Err(ArtifactError::InvalidAdapter {
            path: dir.to_path_buf(),
            reason: "holds no files".into(),
            hint: "point adapter_path at a saved adapter (adapter_config.json + adapter_model.safetensors)".into(),
        });
    }
    let mut total = 0u64;
    for (_, p) in &listed {
        total += fs::metadata(p).map_err(|e| ArtifactError::io(p, e))?.len();
    }
    let mut progress = ctx.map(|c| c.progress("hash adapter", Some(total), "bytes"));
    let mut done = 0u64;
    let mut files = Vec::with_capacity(listed.len());
    for (rel, path) in listed {
        let mut tick = |n: u64| -> io::Result<()> {
            done += n;
            if let Some(p) = progress.as_mut() {
                p.update(done, None, &[]);
            }
            match ctx {
                Some(c) if c.is_cancelled() => {
                    Err(io::Error::new(io::ErrorKind::Interrupted, "cancelled"))
                }
                _ => Ok(()),
            }
        };
        let stamp = Stamp::of(&path).map_err(|e| ArtifactError::io(&path, e))?;
        let (sha256, size) = hash_file_with(&path, &mut tick).map_err(|e| {
            if ctx.is_some_and(|c| c.is_cancelled()) {
                ArtifactError::Cancelled
            } else {
                ArtifactError::io(&path, e)
            }
        })?;
        let after = Stamp::of(&path).map_err(|e| ArtifactError::io(&path, e))?;
        if after != stamp || size != stamp.len {
            return Err(ArtifactError::SourceChanged { path });
        }
        files.push(FileEntry {
            path: rel,
            sha256,
            size,
            source: path,
            stamp,
        });
    }
    if let Some(p) = progress {
        p.finish(format!("{} files", files.len()));
    }
    let hash = tree_hash(files.iter().map(|f| (f.path.as_str(), f.sha256.as_str())));
    let bytes = files.iter().map(|f| f.size).sum();
    Ok(TreeDigest { hash, files, bytes })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests: a panic is the failure report.
mod tests {
    use super::*;
    use std::process::Command;

    fn sample(dir: &Path) {
        fs::create_dir_all(dir.join("sub/deeper")).unwrap();
        fs::create_dir_all(dir.join("empty")).unwrap();
        fs::write(dir.join("adapter_config.json"), br#"{"r": 8}"#).unwrap();
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        fs::write(dir.join("adapter_model.safetensors"), &big).unwrap();
        fs::write(dir.join("sub/deeper/z.txt"), b"").unwrap();
        fs::write(dir.join("sub/a b.txt"), "unicode é ü".as_bytes()).unwrap();
        fs::write(dir.join("README.md"), b"readme").unwrap();
        fs::write(
            dir.join("sub.txt"),
            b"sorts after sub/ by bytes? no: '.' < '/'",
        )
        .unwrap();
    }

    #[test]
    fn framing_matches_an_independent_python_computation() {
        let dir = tempfile::tempdir().unwrap();
        sample(dir.path());
        let d = hash_adapter_dir(dir.path()).unwrap();
        assert_eq!(d.hash.len(), 64);
        assert_eq!(d.files.len(), 6);
        // Python's hashlib, walking the folder on its own.
        let script = r#"
import hashlib, os, sys
root = sys.argv[1]
files = []
for dp, dn, fn in os.walk(root):
    for n in fn:
        p = os.path.join(dp, n)
        files.append(os.path.relpath(p, root).replace(os.sep, "/"))
m = b""
for rel in sorted(files, key=lambda s: s.encode("utf-8")):
    with open(os.path.join(root, rel), "rb") as f:
        m += hashlib.sha256(f.read()).hexdigest().encode() + b"  " + rel.encode("utf-8") + b"\n"
print(hashlib.sha256(m).hexdigest())
"#;
        let out = Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(dir.path())
            .output()
            .expect("python3 is needed for this test");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), d.hash);
    }

    #[test]
    fn framing_matches_coreutils_sha256sum() {
        let dir = tempfile::tempdir().unwrap();
        sample(dir.path());
        let d = hash_adapter_dir(dir.path()).unwrap();
        let out = Command::new("sh")
            .arg("-c")
            .arg("find . -type f -printf '%P\\n' | LC_ALL=C sort | xargs -d '\\n' sha256sum | sha256sum")
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(text.split_whitespace().next(), Some(d.hash.as_str()));
    }

    #[test]
    fn hash_depends_on_names_bytes_and_nothing_else() {
        let a = tempfile::tempdir().unwrap();
        sample(a.path());
        let h = hash_adapter_dir(a.path()).unwrap().hash;
        // Empty folders and file modes do not count.
        fs::create_dir_all(a.path().join("another/empty")).unwrap();
        assert_eq!(hash_adapter_dir(a.path()).unwrap().hash, h);
        // One byte changes it.
        fs::write(a.path().join("README.md"), b"readmE").unwrap();
        let h2 = hash_adapter_dir(a.path()).unwrap().hash;
        assert_ne!(h2, h);
        // A rename changes it.
        fs::rename(a.path().join("README.md"), a.path().join("README.txt")).unwrap();
        assert_ne!(hash_adapter_dir(a.path()).unwrap().hash, h2);
        // Moving bytes between files changes it (no concatenation ambiguity).
        let b = tempfile::tempdir().unwrap();
        fs::write(b.path().join("a"), b"xy").unwrap();
        fs::write(b.path().join("b"), b"z").unwrap();
        let c = tempfile::tempdir().unwrap();
        fs::write(c.path().join("a"), b"x").unwrap();
        fs::write(c.path().join("b"), b"yz").unwrap();
        assert_ne!(
            hash_adapter_dir(b.path()).unwrap().hash,
            hash_adapter_dir(c.path()).unwrap().hash
        );
    }

    #[test]
    fn bad_folders_are_clear_errors() {
        let d = tempfile::tempdir().unwrap();
        let e = hash_adapter_dir(d.path()).unwrap_err();
        assert!(e.to_string().contains("holds no files"), "{e}");
        let e = hash_adapter_dir(&d.path().join("missing")).unwrap_err();
        assert!(matches!(e, ArtifactError::Io { .. }), "{e}");
        fs::write(d.path().join("bad\nname"), b"x").unwrap();
        let e = hash_adapter_dir(d.path()).unwrap_err();
        assert!(e.to_string().contains("control characters"), "{e}");
        let s: lora_skill::SkillError = e.into();
        assert_eq!(s.field.as_deref(), Some("adapter_path"));
        assert!(s.hint.is_some());
    }

    #[cfg(unix)]
    #[test]
    fn symlinked_files_count_as_their_target() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("w.bin"), b"weights").unwrap();
        std::os::unix::fs::symlink(outside.path().join("w.bin"), d.path().join("w.bin")).unwrap();
        let copy = tempfile::tempdir().unwrap();
        fs::write(copy.path().join("w.bin"), b"weights").unwrap();
        assert_eq!(
            hash_adapter_dir(d.path()).unwrap().hash,
            hash_adapter_dir(copy.path()).unwrap().hash
        );
        std::os::unix::fs::symlink(outside.path(), d.path().join("dirlink")).unwrap();
        assert!(hash_adapter_dir(d.path()).is_err());
    }
}
