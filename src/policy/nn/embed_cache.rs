//! An on-disk cache of prompt encodings. Real text encoders are big (T5-XXL alone is
//! 4.76 B parameters) and their output for a prompt never changes, so each prompt is
//! encoded once, ever, and the encoders can leave memory before training. Entries are
//! keyed by the encoders' identity — the sha256 of their weight files (memoised by path,
//! size and modification time, so a 10 GB file is hashed once) — and the prompt text:
//! other weights, other entries; never a stale one.
//!
//! Layout: `ROOT/<encoder key>/<sha256 of the text>.safetensors` holding `seq` and, when the
//! encoder has one, `pooled` (one row each).

use anyhow::{Context, Result};
use candle_core::Device;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::policy::Condition;
use crate::prompt::Prompt;

pub struct EmbedCache {
    dir: PathBuf,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// sha256 of a file, memoised in `root/file_hashes.json` by (path, size, mtime).
pub fn file_digest(root: &Path, path: &Path) -> Result<String> {
    let meta = std::fs::metadata(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let mtime = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
    let key = format!("{}|{}|{mtime}", path.canonicalize().unwrap_or(path.to_path_buf()).display(), meta.len());
    let memo_path = root.join("file_hashes.json");
    let mut memo: HashMap<String, String> = std::fs::read_to_string(&memo_path).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default();
    if let Some(h) = memo.get(&key) {
        return Ok(h.clone());
    }
    let mut f = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut f, &mut hasher).with_context(|| format!("{}: cannot read", path.display()))?;
    let h = hex(&hasher.finalize());
    memo.insert(key, h.clone());
    std::fs::create_dir_all(root).with_context(|| format!("{}: cannot create", root.display()))?;
    crate::io::atomic_write(&memo_path, serde_json::to_string_pretty(&memo)?.as_bytes())?;
    Ok(h)
}

impl EmbedCache {
    /// The cache of the encoders whose weights are `files` (in their order), run as
    /// `setting` says (dtype, token counts: anything else that changes an encoding), under
    /// `root`.
    pub fn open(root: &Path, files: &[PathBuf], setting: &str) -> Result<Self> {
        let mut h = Sha256::new();
        h.update(setting.as_bytes());
        for f in files {
            h.update(file_digest(root, f)?.as_bytes());
        }
        let dir = root.join(&hex(&h.finalize())[..16]);
        std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create the embedding cache", dir.display()))?;
        Ok(Self { dir })
    }

    fn path(&self, text: &str) -> PathBuf {
        self.dir.join(format!("{}.safetensors", hex(&Sha256::digest(text.as_bytes()))))
    }

    fn get(&self, text: &str, device: &Device) -> Result<Option<Condition>> {
        let p = self.path(text);
        if !p.is_file() {
            return Ok(None);
        }
        let mut t = crate::weights::tensors::read_tensors(&p, device).with_context(|| format!("embedding cache entry for {text:?}; delete it to re-encode"))?;
        let seq = t.remove("seq").with_context(|| format!("{}: no tensor seq; delete it to re-encode", p.display()))?;
        Ok(Some(Condition { seq, pooled: t.remove("pooled") }))
    }

    fn put(&self, text: &str, c: &Condition) -> Result<()> {
        let mut t = HashMap::from([("seq".to_string(), c.seq.clone())]);
        if let Some(p) = &c.pooled {
            t.insert("pooled".into(), p.clone());
        }
        crate::weights::tensors::save_tensors(&t, &self.path(text))
    }

    /// The conditions of `prompts` (one row each), calling `encode` once on the prompts
    /// not cached yet and storing them.
    pub fn encode(&self, prompts: &[Prompt], device: &Device, encode: impl FnOnce(&[Prompt]) -> Result<Condition>) -> Result<Condition> {
        let mut rows: Vec<Option<Condition>> = prompts.iter().map(|p| self.get(&p.text, device)).collect::<Result<_>>()?;
        let missing: Vec<usize> = (0..prompts.len()).filter(|&i| rows[i].is_none()).collect();
        if !missing.is_empty() {
            // Each distinct text once.
            let mut uniq: Vec<Prompt> = Vec::new();
            for &i in &missing {
                if !uniq.iter().any(|u| u.text == prompts[i].text) {
                    uniq.push(prompts[i].clone());
                }
            }
            let fresh = encode(&uniq)?;
            anyhow::ensure!(fresh.rows()? == uniq.len(), "text encoder returned {} rows for {} prompts", fresh.rows()?, uniq.len());
            for (j, u) in uniq.iter().enumerate() {
                let c = fresh.narrow(j, 1)?;
                self.put(&u.text, &c)?;
                for &i in &missing {
                    if prompts[i].text == u.text {
                        rows[i] = Some(c.clone());
                    }
                }
            }
        }
        let rows: Vec<Condition> = rows.into_iter().map(|r| r.expect("every row filled")).collect();
        Ok(Condition::cat(&rows.iter().collect::<Vec<_>>())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Tensor;
    use std::cell::Cell;

    fn fake_encoder<'a>(calls: &'a Cell<usize>, seen: &'a Cell<usize>) -> impl FnOnce(&[Prompt]) -> Result<Condition> + 'a {
        move |ps: &[Prompt]| {
            calls.set(calls.get() + 1);
            seen.set(seen.get() + ps.len());
            let seq: Vec<f32> = ps.iter().flat_map(|p| (0..6).map(move |i| p.text.len() as f32 + i as f32)).collect();
            let pooled: Vec<f32> = ps.iter().map(|p| p.text.len() as f32 * 10.0).collect();
            Ok(Condition { seq: Tensor::from_vec(seq, (ps.len(), 3, 2), &Device::Cpu)?, pooled: Some(Tensor::from_vec(pooled, (ps.len(), 1), &Device::Cpu)?) })
        }
    }

    /// A prompt is encoded once (duplicates in a batch too), later batches come from disk
    /// in their own order, other encoder weights or settings get their own entries, and a damaged
    /// entry is an error naming it.
    #[test]
    fn each_prompt_is_encoded_once_per_encoder() {
        let d = tempfile::tempdir().unwrap();
        let (w1, w2) = (d.path().join("t5.safetensors"), d.path().join("t5b.safetensors"));
        std::fs::write(&w1, b"weights one").unwrap();
        std::fs::write(&w2, b"weights two").unwrap();
        let root = d.path().join("cache");
        let cache = EmbedCache::open(&root, std::slice::from_ref(&w1), "a").unwrap();
        let ps = |t: &[&str]| t.iter().map(|s| Prompt::text(s)).collect::<Vec<_>>();
        let (calls, seen) = (Cell::new(0), Cell::new(0));
        let a = cache.encode(&ps(&["a cat", "a dog", "a cat"]), &Device::Cpu, fake_encoder(&calls, &seen)).unwrap();
        assert_eq!((calls.get(), seen.get()), (1, 2));
        assert_eq!(a.seq.dims(), &[3, 3, 2]);
        let b = cache.encode(&ps(&["a dog", "a cat", "a bird"]), &Device::Cpu, fake_encoder(&calls, &seen)).unwrap();
        assert_eq!((calls.get(), seen.get()), (2, 3), "only 'a bird' is new");
        assert_eq!(b.pooled.unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(), vec![50.0, 50.0, 60.0]);
        assert_eq!(a.seq.get(0).unwrap().to_vec2::<f32>().unwrap(), b.seq.get(1).unwrap().to_vec2::<f32>().unwrap());
        // Reopened: everything from disk, no encoder call.
        let again = EmbedCache::open(&root, std::slice::from_ref(&w1), "a").unwrap();
        again.encode(&ps(&["a bird"]), &Device::Cpu, |_| panic!("must not encode")).unwrap();
        // Other weights: their own entries.
        let other = EmbedCache::open(&root, &[w2], "a").unwrap();
        other.encode(&ps(&["a bird"]), &Device::Cpu, fake_encoder(&calls, &seen)).unwrap();
        assert_eq!(calls.get(), 3);
        // The same weights run otherwise (another dtype or token count): their own entries.
        let otherwise = EmbedCache::open(&root, std::slice::from_ref(&w1), "b").unwrap();
        otherwise.encode(&ps(&["a bird"]), &Device::Cpu, fake_encoder(&calls, &seen)).unwrap();
        assert_eq!(calls.get(), 4);
        // A damaged entry.
        std::fs::write(again.path("a bird"), b"garbage").unwrap();
        let e = format!("{:#}", again.encode(&ps(&["a bird"]), &Device::Cpu, |_| panic!("must not encode")).unwrap_err());
        assert!(e.contains("embedding cache entry for \"a bird\"") && e.contains("delete it"), "{e}");
    }
}
