//! Run directories: `config.toml` (resolved), `metrics.jsonl`, `checkpoints/`, `samples/`.
//! A run directory is never silently overwritten.

use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};

pub const CONFIG_FILE: &str = "config.toml";
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const FINAL_WEIGHTS: &str = "model.safetensors";

/// Create (or, with `force`, clear) a run directory and write the resolved config into it.
/// Fails before touching anything if the directory holds a run and `force` is false, or if
/// it cannot be written.
pub fn create_run_dir<T: Serialize>(dir: &Path, cfg: &T, force: bool) -> Result<PathBuf> {
    check_run_dir_free(dir, force)?;
    // Past the check, a non-empty directory is a run that --force replaces.
    if dir.exists() && std::fs::read_dir(dir).map(|mut d| d.next().is_some()).unwrap_or(true) {
        std::fs::remove_dir_all(dir).with_context(|| format!("{}: cannot clear", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create run directory", dir.display()))?;
    // Probe writability before any work.
    let probe = dir.join(".write-probe");
    std::fs::write(&probe, b"").with_context(|| format!("{}: run directory is not writable", dir.display()))?;
    let _ = std::fs::remove_file(probe);
    crate::io::atomic_write(&dir.join(CONFIG_FILE), crate::config::to_toml(cfg)?.as_bytes())?;
    Ok(dir.to_path_buf())
}

/// The checks of [`create_run_dir`] without touching anything: call it before loading
/// weights, prompts and backbones, so a start that is going to be refused is refused first,
/// and create the directory only once everything has loaded.
pub fn check_run_dir_free(dir: &Path, force: bool) -> Result<()> {
    if dir.exists() {
        anyhow::ensure!(dir.is_dir(), "{}: exists and is not a directory", dir.display());
        let non_empty = std::fs::read_dir(dir).map(|mut d| d.next().is_some()).unwrap_or(true);
        if non_empty {
            crate::io::DirLock::check_free(dir)?;
            if !force {
                bail!("{}: run directory already exists; choose another run_name or pass --force to replace it", dir.display());
            }
            if !dir.join(CONFIG_FILE).exists() {
                bail!("{}: not a vipo run directory (no {CONFIG_FILE}); refusing to delete it even with --force", dir.display());
            }
        }
    }
    Ok(())
}

/// Check that `dir` is a vipo run directory (has a config).
pub fn require_run_dir(dir: &Path) -> Result<()> {
    if !dir.join(CONFIG_FILE).is_file() {
        bail!("{}: not a vipo run directory (no {CONFIG_FILE})", dir.display());
    }
    Ok(())
}
