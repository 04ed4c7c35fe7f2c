//! The base model RL starts from (`train.base = ""`): the base shipped in `weights/base/`
//! when the run's `[model]` is the one it was pretrained with, else a base pretrained for
//! the config and cached (`train::pretrain::default_base` pretrains it on a miss).
//!
//! The shipped base comes with `PROVENANCE.json`: the exact `vipo pretrain` command, the
//! commit, seed, steps, wall time, machine, its `vipo eval` scores and the sha256 of the
//! weights file, which is checked every time the file is used.

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::policy::shapeworld::dit::DitConfig;

/// The shipped weights file (f16 safetensors) inside [`shipped_dir`].
pub const SHIPPED_WEIGHTS: &str = "shapeworld_base.safetensors";
/// Its provenance record inside [`shipped_dir`].
pub const PROVENANCE: &str = "PROVENANCE.json";

/// `weights/base/` of this source tree.
pub fn shipped_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("weights").join("base")
}

/// Scores of one split as `vipo eval` reports them (the compositional reward and its terms).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SplitScores {
    pub compositional: f64,
    pub ci95: [f64; 2],
    pub count: f64,
    pub color: f64,
    pub shape: f64,
    pub position: f64,
    pub quality: f64,
}

/// What `PROVENANCE.json` records.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Provenance {
    pub file: String,
    pub sha256: String,
    pub bytes: u64,
    pub dtype: String,
    /// The `vipo pretrain` command that produced the run (deterministic on CPU).
    pub command: String,
    pub commit: String,
    pub seed: u64,
    pub steps: usize,
    pub wall_s: f64,
    pub images_per_s: f64,
    pub machine: String,
    /// The architecture; the base is used by default only for runs with this `[model]`.
    pub model: DitConfig,
    /// `vipo eval` of the shipped (f16) file with the default `[sample]`: `n` prompts per split.
    pub eval_n: usize,
    pub eval: SplitScores,
    pub ood: SplitScores,
    /// A small evaluation (`check_n` prompts per split) that the tests reproduce.
    pub check_n: usize,
    pub check: [f64; 2],
}

/// Hex sha256 of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    Ok(Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect())
}

/// Read `dir/PROVENANCE.json` (None when the directory has no shipped base).
pub fn read_provenance(dir: &Path) -> Result<Option<Provenance>> {
    let p = dir.join(PROVENANCE);
    if !p.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&p).with_context(|| format!("{}: cannot read", p.display()))?;
    let prov: Provenance = serde_json::from_str(&text).with_context(|| format!("{}: not a valid provenance record", p.display()))?;
    Ok(Some(prov))
}

/// The verified shipped weights in `dir`: the file must exist and match the recorded sha256.
pub fn verified_weights(dir: &Path, prov: &Provenance) -> Result<PathBuf> {
    let w = dir.join(&prov.file);
    ensure!(w.is_file(), "{}: the shipped base's weights file is missing (named in {})", w.display(), dir.join(PROVENANCE).display());
    let got = sha256_file(&w)?;
    if got != prov.sha256 {
        bail!(
            "{}: sha256 {got} does not match {} (recorded {}); the file is damaged or was replaced — restore it with `git checkout -- {}` or re-run the recorded command",
            w.display(),
            dir.join(PROVENANCE).display(),
            prov.sha256,
            w.display()
        );
    }
    Ok(w)
}

/// The shipped base in `dir` when it fits `cfg` (image modality, the same `[model]`), verified.
pub fn shipped_in(dir: &Path, cfg: &Config) -> Result<Option<PathBuf>> {
    if !cfg.generator().ships_base() {
        return Ok(None);
    }
    match read_provenance(dir)? {
        Some(prov) if prov.model == cfg.model => Ok(Some(verified_weights(dir, &prov)?)),
        _ => Ok(None),
    }
}

/// The default base (`train.base = ""`) without pretraining anything (`train::pretrain::default_base` pretrains on a miss): the shipped base or an existing cache entry.
pub fn existing_default_base(cfg: &Config) -> Result<Option<PathBuf>> {
    if let Some(p) = shipped_in(&shipped_dir(), cfg)? {
        return Ok(Some(p));
    }
    let p = cached_base_path(cfg);
    Ok(p.is_file().then_some(p))
}

/// The base weights of a run, resolved once for training and evaluation: a real
/// generator's model spec; an explicit `train.base` (its prediction checked against the
/// config it was pretrained with); else the shipped or cached default, and on a miss
/// whatever `on_miss` does (training pretrains it, evaluation refuses).
pub fn resolve(cfg: &Config, on_miss: impl FnOnce(&Config) -> Result<PathBuf>) -> Result<PathBuf> {
    if let Some((field, model)) = cfg.real_model() {
        ensure!(!model.is_empty(), "{field}: empty; set it to a diffusers model folder or a Hugging Face repository id in the local cache");
        return Ok(PathBuf::from(model));
    }
    if !cfg.train.base.is_empty() {
        let p = PathBuf::from(&cfg.train.base);
        ensure!(p.is_file(), "train.base: {} does not exist", p.display());
        check_base_prediction(cfg, &p)?;
        return Ok(p);
    }
    match existing_default_base(cfg)? {
        Some(p) => Ok(p),
        None => on_miss(cfg),
    }
}

/// A weights file does not say whether its network predicts x̂₀ or v, and both have the
/// same tensors, so a mismatch would sample garbage silently. When the base sits in a run
/// directory (pretrain runs and the cache do), its `config.toml` says; refuse a mismatch.
fn check_base_prediction(cfg: &Config, base: &Path) -> Result<()> {
    let Some(saved_path) = base.parent().map(|d| d.join(crate::run_dir::CONFIG_FILE)).filter(|p| p.is_file()) else {
        return Ok(());
    };
    let Ok(mut saved) = crate::config::load::<Config>(Some(&saved_path), &[]) else {
        return Ok(()); // not a vipo config: nothing to compare against
    };
    // Compare like with like: the saved config's section of this run's family.
    saved.modality = cfg.modality;
    let g = cfg.generator();
    let (Some(mine), Some(theirs)) = (g.prediction(), saved.generator().prediction()) else {
        return Ok(());
    };
    let section = g.section();
    anyhow::ensure!(
        mine == theirs,
        "train.base {}: pretrained with {section}.prediction = {theirs:?} (its {}) but this run has {mine:?}; pass --set {section}.prediction={}",
        base.display(),
        saved_path.display(),
        format!("{theirs:?}").to_lowercase()
    );
    Ok(())
}

/// A base's cache prefix and key before legacy fields are dropped. A real generator's key
/// is its section; a pretrained family's is the JSON array [section, pretrain, seed,
/// sample] (what serde writes for that tuple).
fn raw_key(cfg: &Config) -> (&'static str, String) {
    let g = cfg.generator();
    let key = if g.is_real() {
        g.section_json()
    } else {
        let pretrain = serde_json::to_string(&cfg.pretrain).expect("config serializes");
        let sample = serde_json::to_string(&cfg.sample).expect("config serializes");
        format!("[{},{pretrain},{},{sample}]", g.section_json(), cfg.seed)
    };
    (g.cache_prefix(), key)
}

/// Where the cached base model for `cfg` lives (it may not exist yet): keyed by a hash
/// of the model + pretrain config, the seed and the sample config.
pub fn cached_base_path(cfg: &Config) -> PathBuf {
    // Image keys are unchanged from before video existed, so existing caches stay valid.
    let g = cfg.generator();
    let (prefix, mut key) = raw_key(cfg);
    // Fields added later are left out of the key at their old (default-equivalent) values,
    // so caches written before they existed stay valid; they are the last field of their
    // struct, so each is one exact substring.
    for legacy in [r#","prediction":"v""#, r#","cond_dropout":0.0"#, r#","guidance":1.0"#, r#","sigma_loc":0.0"#, r#","sigma_scale":1.0"#, r#","conv_channels":0"#, r#","pos_init":"randn""#] {
        key = key.replacen(legacy, "", 1);
    }
    if g.sample_kind() == crate::image::SampleKind::Clips {
        // The video policy has no such position table: pos_init does not change its base.
        key = key.replacen(r#","pos_init":"sincos""#, "", 1);
    }
    let hash = key.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3));
    crate::runtime::cache_dir().join(format!("{prefix}-{hash:016x}")).join(crate::run_dir::FINAL_WEIGHTS)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Adding config fields must not orphan cached bases: at their legacy values the new
    /// fields stay out of the key (these two hashes are real cache folders written before
    /// `model.prediction`, `pretrain.cond_dropout` and `sample.guidance` existed).
    /// The key is what serde writes for the tuple (section, pretrain, seed, sample) — the
    /// form every cache entry so far was keyed by — for each family's section.
    #[test]
    fn cache_key_is_the_tuple_serialization() {
        use crate::config::Modality;
        let mut cfg = Config::default();
        cfg.seed = 7;
        let tuple = |c: &Config, section: String| format!("[{section},{},{},{}]", serde_json::to_string(&c.pretrain).unwrap(), c.seed, serde_json::to_string(&c.sample).unwrap());
        assert_eq!(raw_key(&cfg), ("base", serde_json::to_string(&(&cfg.model, &cfg.pretrain, cfg.seed, &cfg.sample)).unwrap()));
        assert_eq!(raw_key(&cfg).1, tuple(&cfg, serde_json::to_string(&cfg.model).unwrap()));
        cfg.modality = Modality::Video;
        assert_eq!(raw_key(&cfg), ("vbase", serde_json::to_string(&(&cfg.video_model, &cfg.pretrain, cfg.seed, &cfg.sample)).unwrap()));
        cfg.modality = Modality::Sd3;
        assert_eq!(raw_key(&cfg), ("sd3", serde_json::to_string(&cfg.sd3).unwrap()));
        cfg.modality = Modality::Flux;
        assert_eq!(raw_key(&cfg), ("flux", serde_json::to_string(&cfg.flux).unwrap()));
    }

    #[test]
    fn cache_keys_of_legacy_configs_are_unchanged() {
        let mut cfg = Config::default();
        cfg.model.prediction = crate::policy::shapeworld::dit::Prediction::V;
        cfg.model.conv_channels = 0;
        cfg.pretrain.pos_init = crate::config::PosInit::Randn;
        assert!(cached_base_path(&cfg).parent().unwrap().ends_with("base-cd1b27bee18d41f2"), "{}", cached_base_path(&cfg).display());
        let video: Config = crate::config::load(Some(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/configs/video.toml"))), &[]).unwrap();
        assert!(cached_base_path(&video).parent().unwrap().ends_with("vbase-2070df40716fb457"), "{}", cached_base_path(&video).display());
        // The new defaults (x-prediction, the conv stem) are different models, so different keys.
        assert_ne!(cached_base_path(&Config::default()), cached_base_path(&cfg));
        let mut plain = Config::default();
        plain.model.conv_channels = 0;
        assert_ne!(cached_base_path(&Config::default()), cached_base_path(&plain));
        cfg.sample.guidance = 2.0;
        assert!(!cached_base_path(&cfg).parent().unwrap().ends_with("base-cd1b27bee18d41f2"));
    }
}
