//! Finding published model files on disk, offline: a diffusers / transformers folder
//! (`transformer/`, `text_encoder/`, `vae/`…, each a `*.safetensors` file or shards named by
//! a `*.safetensors.index.json`), a single safetensors file, or a repository id resolved in
//! the local Hugging Face cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `~/.cache/huggingface/hub`: `models--{org}--{name}/snapshots/{revision}/`, the revision
//! from `refs/main`). Nothing here downloads.

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The hub cache folder the Hugging Face libraries use.
pub fn hub_cache() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("HF_HOME") {
        return Some(PathBuf::from(p).join("hub"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub"))
}

/// A local path as given, or a repository id ("org/name", optionally "@revision") found
/// in the hub cache.
pub fn resolve(spec: &str) -> Result<PathBuf> {
    resolve_in(spec, hub_cache().as_deref())
}

/// [`resolve`] with the hub cache folder given (tests pass theirs: no process-wide
/// environment to race on).
pub fn resolve_in(spec: &str, hub: Option<&Path>) -> Result<PathBuf> {
    let p = PathBuf::from(spec);
    if p.exists() {
        return Ok(p);
    }
    let (repo, rev) = spec.split_once('@').map_or((spec, None), |(r, v)| (r, Some(v)));
    let looks_like_repo = repo.matches('/').count() == 1 && !repo.starts_with('/') && !repo.starts_with('.');
    if !looks_like_repo {
        bail!("{spec}: no such file or folder");
    }
    let cache = hub.map(Path::to_path_buf).with_context(|| format!("{spec}: not a local path, and no Hugging Face cache folder is set (HF_HOME / HF_HUB_CACHE)"))?;
    let root = cache.join(format!("models--{}", repo.replace('/', "--")));
    anyhow::ensure!(
        root.is_dir(),
        "{spec}: not a local path, and not in the Hugging Face cache {} (nothing is downloaded: fetch it where there is network, e.g. `huggingface-cli download {repo}`)",
        cache.display()
    );
    let rev = match rev {
        Some(r) => r.to_string(),
        None => {
            let refs = root.join("refs/main");
            match std::fs::read_to_string(&refs) {
                Ok(r) => r.trim().to_string(),
                // No refs/main: the only snapshot, if there is exactly one.
                Err(_) => {
                    let snaps: Vec<_> = std::fs::read_dir(root.join("snapshots")).into_iter().flatten().flatten().collect();
                    anyhow::ensure!(snaps.len() == 1, "{}: no refs/main and {} snapshots; name one as {repo}@REVISION", root.display(), snaps.len());
                    snaps[0].file_name().to_string_lossy().to_string()
                }
            }
        }
    };
    let snap = root.join("snapshots").join(&rev);
    anyhow::ensure!(snap.is_dir(), "{}: revision {rev} is not in the cache", root.display());
    Ok(snap)
}

/// The safetensors files of one component: `path` itself (a file), or in the folder
/// `path[/subfolder]` its single `*.safetensors` file or the shards its
/// `*.safetensors.index.json` names (each checked to exist).
pub fn component_files(path: &Path, subfolder: &str) -> Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let dir = if !subfolder.is_empty() && path.join(subfolder).is_dir() { path.join(subfolder) } else { path.to_path_buf() };
    anyhow::ensure!(dir.is_dir(), "{}: no such folder", dir.display());
    let mut index = None;
    let mut singles = Vec::new();
    for e in std::fs::read_dir(&dir).with_context(|| format!("{}: cannot list", dir.display()))?.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.ends_with(".safetensors.index.json") {
            index = Some(e.path());
        } else if name.ends_with(".safetensors") {
            singles.push(e.path());
        }
    }
    if let Some(index) = index {
        let text = std::fs::read_to_string(&index).with_context(|| format!("{}: cannot read", index.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", index.display()))?;
        let map = v["weight_map"].as_object().with_context(|| format!("{}: no \"weight_map\" object", index.display()))?;
        let mut shards: Vec<String> = map.values().filter_map(|s| s.as_str().map(str::to_string)).collect();
        shards.sort();
        shards.dedup();
        anyhow::ensure!(!shards.is_empty(), "{}: weight_map names no shard", index.display());
        let mut out = Vec::new();
        for s in shards {
            let p = dir.join(&s);
            let tensor = map.iter().find(|(_, f)| f.as_str() == Some(s.as_str())).map(|(k, _)| k.clone()).unwrap_or_default();
            anyhow::ensure!(p.is_file(), "{}: shard {s} (holding {tensor}) is missing", index.display());
            out.push(p);
        }
        return Ok(out);
    }
    singles.sort();
    match singles.len() {
        0 => bail!("{}: no .safetensors file", dir.display()),
        1 => Ok(singles),
        _ => bail!("{}: {} .safetensors files and no index.json to say which belong together", dir.display(), singles.len()),
    }
}

/// A JSON file (a model's `config.json`), errors naming it.
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))
}

/// Every tensor of the component in folder `dir` ([`component_files`], [`read_component`]),
/// and a name for it in errors (its file, or its first shard).
pub fn read_folder(dir: &Path, device: &Device) -> Result<(HashMap<String, Tensor>, String)> {
    let files = component_files(dir, "")?;
    Ok((read_component(&files, device)?, files[0].display().to_string()))
}

/// Every tensor of a component's files (a tensor in two shards is an error).
pub fn read_component(files: &[PathBuf], device: &Device) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for f in files {
        for (k, t) in crate::weights::tensors::read_tensors(f, device)? {
            anyhow::ensure!(!out.contains_key(&k), "{}: tensor {k} also appears in another shard", f.display());
            out.insert(k, t);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn save(path: &Path, names: &[&str]) {
        let t: HashMap<String, Tensor> = names.iter().map(|n| (n.to_string(), Tensor::zeros(2, candle_core::DType::F32, &Device::Cpu).unwrap())).collect();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        crate::weights::tensors::save_tensors(&t, path).unwrap();
    }

    #[test]
    fn files_of_a_component_single_sharded_and_bad() {
        let d = tempfile::tempdir().unwrap();
        let tr = d.path().join("m/transformer");
        save(&tr.join("diffusion_pytorch_model-00001-of-00002.safetensors"), &["a"]);
        save(&tr.join("diffusion_pytorch_model-00002-of-00002.safetensors"), &["b"]);
        let index = tr.join("diffusion_pytorch_model.safetensors.index.json");
        std::fs::write(&index, r#"{"weight_map": {"a": "diffusion_pytorch_model-00001-of-00002.safetensors", "b": "diffusion_pytorch_model-00002-of-00002.safetensors"}}"#).unwrap();
        let files = component_files(&d.path().join("m"), "transformer").unwrap();
        assert_eq!(files.len(), 2);
        let all = read_component(&files, &Device::Cpu).unwrap();
        assert!(all.contains_key("a") && all.contains_key("b"));
        // The component folder itself works too, and a single file.
        assert_eq!(component_files(&tr, "transformer").unwrap(), files);
        assert_eq!(component_files(&files[0], "").unwrap(), vec![files[0].clone()]);
        // An index naming a missing shard.
        std::fs::write(&index, r#"{"weight_map": {"a": "diffusion_pytorch_model-00001-of-00002.safetensors", "c": "gone.safetensors"}}"#).unwrap();
        let e = component_files(&tr, "").unwrap_err().to_string();
        assert!(e.contains("shard gone.safetensors (holding c) is missing") && e.contains("index.json"), "{e}");
        std::fs::write(&index, "{").unwrap();
        assert!(component_files(&tr, "").unwrap_err().to_string().contains("invalid JSON"));
        std::fs::remove_file(&index).unwrap();
        assert!(component_files(&tr, "").unwrap_err().to_string().contains("no index.json"));
        assert!(component_files(&d.path().join("empty"), "").is_err());
    }

    /// A repository id is found in the hub cache through refs/main or an explicit revision.
    #[test]
    fn repository_ids_resolve_in_the_local_cache() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("hub/models--stabilityai--stable-diffusion-3.5-medium");
        std::fs::create_dir_all(root.join("snapshots/abc123/transformer")).unwrap();
        std::fs::create_dir_all(root.join("snapshots/old999")).unwrap();
        std::fs::create_dir_all(root.join("refs")).unwrap();
        std::fs::write(root.join("refs/main"), "abc123\n").unwrap();
        let hub = Some(d.path().join("hub"));
        let r = resolve_in("stabilityai/stable-diffusion-3.5-medium", hub.as_deref());
        let r2 = resolve_in("stabilityai/stable-diffusion-3.5-medium@old999", hub.as_deref());
        let missing = resolve_in("stabilityai/nothing-here", hub.as_deref());
        assert_eq!(r.unwrap(), root.join("snapshots/abc123"));
        assert_eq!(r2.unwrap(), root.join("snapshots/old999"));
        let e = missing.unwrap_err().to_string();
        assert!(e.contains("stabilityai/nothing-here") && e.contains("not in the Hugging Face cache"), "{e}");
        assert!(resolve("/no/such/file.safetensors").unwrap_err().to_string().contains("no such file"));
    }
}
