//! One run per experiment folder: a lock file holding the runner's process id.
//! A lock left by a dead process (kill -9) is taken over.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::OrchestratorError;

/// The lock file's name inside the experiment folder.
pub const LOCK_FILE: &str = "run.lock";

/// A held lock; dropping it removes the file.
#[derive(Debug)]
pub struct RunLock {
    path: PathBuf,
}

fn alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    // Linux and most Unixes with procfs; elsewhere a lock is treated as stale.
    Path::new("/proc").join(pid.to_string()).exists()
}

impl RunLock {
    /// Takes the lock of `dir`.
    pub fn acquire(dir: &Path) -> Result<Self, OrchestratorError> {
        let path = dir.join(LOCK_FILE);
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut f) => {
                    f.write_all(std::process::id().to_string().as_bytes())
                        .and_then(|_| f.sync_all())
                        .map_err(|e| OrchestratorError::io(&path, e))?;
                    return Ok(Self { path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let text = std::fs::read_to_string(&path).unwrap_or_default();
                    match text.trim().parse::<u32>() {
                        Ok(pid) if pid != std::process::id() && alive(pid) => {
                            return Err(OrchestratorError::Locked { path, pid });
                        }
                        // Our own stale lock, a dead process's, or a torn write: take it over.
                        _ => {
                            std::fs::remove_file(&path)
                                .map_err(|e| OrchestratorError::io(&path, e))?;
                        }
                    }
                }
                Err(e) => return Err(OrchestratorError::io(&path, e)),
            }
        }
        Err(OrchestratorError::io(
            &path,
            std::io::Error::other("could not take the lock (another run raced for it)"),
        ))
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_lock_blocks_and_a_dead_one_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        {
            let _l = RunLock::acquire(dir.path()).unwrap();
            assert!(dir.path().join(LOCK_FILE).exists());
        }
        assert!(!dir.path().join(LOCK_FILE).exists());
        // PID 1 is always alive on Linux.
        std::fs::write(dir.path().join(LOCK_FILE), "1").unwrap();
        let err = RunLock::acquire(dir.path()).unwrap_err();
        assert!(matches!(err, OrchestratorError::Locked { pid: 1, .. }));
        // A process id that cannot exist.
        std::fs::write(dir.path().join(LOCK_FILE), "4194304").unwrap();
        let _l = RunLock::acquire(dir.path()).unwrap();
    }
}
