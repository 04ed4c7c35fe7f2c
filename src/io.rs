//! File helpers: atomic writes (temp file + rename) so a kill never leaves a half-written
//! file where a good one was, JSON-lines metrics, and the lock that keeps two processes
//! out of one run or comparison folder.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

fn tmp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

/// Write `bytes` to `path` atomically.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    atomic_write_with(path, |tmp| std::fs::write(tmp, bytes).with_context(|| format!("{}: cannot write", path.display())))
}

/// Run `write` against a temp path in the same folder, then rename it over `path`.
pub fn atomic_write_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create directory", dir.display()))?;
        }
    }
    let tmp = tmp_path(path);
    if let Err(e) = write(&tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot rename into place", path.display()))
}

/// The lock file of a run or comparison folder.
pub const LOCK_FILE: &str = ".vipo-lock";

/// An exclusive lock on a folder (`DIR/.vipo-lock`), held until dropped. Two processes
/// training into one folder would interleave checkpoints and metrics, and `--force` would
/// delete a run under a live process. The lock is the kernel's advisory file lock, which is
/// released when the process ends however it ends, so a killed run never leaves a stale lock.
#[derive(Debug)]
pub struct DirLock {
    _file: std::fs::File,
}

impl DirLock {
    /// Take the lock of `dir` (an existing folder), or fail naming the process holding it.
    pub fn acquire(dir: &Path) -> Result<DirLock> {
        use std::io::Write;
        let mut f = Self::lock_file(dir)?;
        // The holder's pid, for the message another process prints.
        let path = dir.join(LOCK_FILE);
        f.set_len(0).and_then(|_| f.write_all(std::process::id().to_string().as_bytes())).with_context(|| format!("{}: cannot write", path.display()))?;
        Ok(DirLock { _file: f })
    }

    /// Fail if another process holds the lock of `dir`: a check before deleting or
    /// replacing the folder. Takes the lock for a moment and leaves the file as it was.
    pub fn check_free(dir: &Path) -> Result<()> {
        if dir.join(LOCK_FILE).is_file() {
            drop(Self::lock_file(dir)?);
        }
        Ok(())
    }

    /// The open, locked lock file of `dir`.
    fn lock_file(dir: &Path) -> Result<std::fs::File> {
        use std::io::Read;
        let path = dir.join(LOCK_FILE);
        let mut f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path).with_context(|| format!("{}: cannot open", path.display()))?;
        match f.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = f.read_to_string(&mut holder);
                let pid = if holder.trim().is_empty() { String::new() } else { format!(" (pid {})", holder.trim()) };
                anyhow::bail!("{}: in use by another vipo process{pid}; wait for it to finish or stop it", dir.display());
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e).with_context(|| format!("{}: cannot lock", path.display())),
        }
        Ok(f)
    }
}

/// Append one JSON object as a line to a metrics file.
pub fn append_jsonl(path: &Path, value: &serde_json::Value) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).with_context(|| format!("{}: cannot open for append", path.display()))?;
    writeln!(f, "{}", value).with_context(|| format!("{}: cannot append", path.display()))
}

/// Drop the lines of a metrics file whose `"step"` is ≥ `step` (what a resumed run redoes),
/// keeping every other line byte for byte. A missing file is fine (nothing logged yet).
pub fn truncate_jsonl_from_step(path: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    let kept: String = text
        .lines()
        .filter(|l| serde_json::from_str::<serde_json::Value>(l).ok().and_then(|v| v.get("step").and_then(|s| s.as_u64())).is_none_or(|s| (s as usize) < step))
        .flat_map(|l| [l, "\n"])
        .collect();
    atomic_write(path, kept.as_bytes())
}
