//! `vipo sample` and the cached base model used by `vipo demo`.

use anyhow::{Context, Result};
use serde_json::json;
use std::path::{Path, PathBuf};

use crate::config::{Config, SampleConfig};
use crate::policy::Policy;
use crate::reward::compositional::Compositional;
use crate::world::PromptSpec;

/// Generate one image per prompt into `out` (`sample_000.png`…, `grid.png`,
/// `samples.json` listing prompt → file → compositional score). Returns the count.
pub fn write_samples(policy: &dyn Policy, prompts: &[PromptSpec], seed: u64, cfg: &SampleConfig, out: &Path) -> Result<usize> {
    let images = crate::eval::generate_images(policy, prompts, seed, cfg)?;
    let scores = Compositional::new().score_specs(&images, prompts)?;
    let entries = prompts.iter().zip(&scores).map(|(p, s)| json!({"prompt": p.text(), "score": s})).collect();
    save_images(&images, entries, out)
}

/// Generate one image per free-text prompt into `out` (any image policy, e.g. SD3):
/// `sample_000.png`…, `grid.png` and `samples.json` (prompt → file). No score: free text
/// has no scene for the compositional reward.
pub fn write_text_samples(policy: &dyn Policy, prompts: &[crate::prompt::Prompt], seed: u64, cfg: &SampleConfig, out: &Path) -> Result<usize> {
    let samples = crate::eval::generate(policy, prompts, seed, cfg)?;
    let entries = prompts.iter().map(|p| json!({"prompt": p.text})).collect();
    save_images(samples.images("vipo sample")?, entries, out)
}

/// `sample_000.png`… for `images`, their grid (tiles scaled by `image::grid_scale`) and
/// `samples.json`: each image's `entries` object with its file name added.
fn save_images(images: &[crate::image::Image], entries: Vec<serde_json::Value>, out: &Path) -> Result<usize> {
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create output directory", out.display()))?;
    let mut listing = Vec::new();
    for (i, (im, mut entry)) in images.iter().zip(entries).enumerate() {
        let name = format!("sample_{i:03}.png");
        im.save_png(&out.join(&name))?;
        entry["file"] = json!(name);
        listing.push(entry);
    }
    let big: Vec<_> = images.iter().map(|im| im.upscale(crate::image::grid_scale(im.w))).collect();
    crate::image::grid(&big, 8).save_png(&out.join("grid.png"))?;
    crate::io::atomic_write(&out.join("samples.json"), serde_json::to_string_pretty(&listing)?.as_bytes())?;
    Ok(images.len())
}

/// Generate one clip per video prompt into `out`: `clip_000.png`… (frames side by side),
/// `grid.png` and `samples.json` (prompt → file → video_quality and motion_quality).
pub fn write_clips(policy: &crate::policy::video_dit::VideoPolicy, specs: &[crate::world::video::VideoSpec], seed: u64, cfg: &SampleConfig, out: &Path) -> Result<usize> {
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create output directory", out.display()))?;
    let clips = crate::eval::generate_clips(policy, specs, seed, cfg)?;
    let vq = crate::reward::video::VideoQuality::new().score_clips(&clips, specs)?;
    let mq = crate::reward::video::MotionQuality::new().score_clips(&clips, specs)?;
    let mut listing = Vec::new();
    let mut strips = Vec::new();
    for (i, (c, s)) in clips.iter().zip(specs).enumerate() {
        let name = format!("clip_{i:03}.png");
        let strip = crate::train::task::frame_strip(c);
        strip.save_png(&out.join(&name))?;
        strips.push(strip.upscale(2));
        listing.push(json!({"prompt": s.text(), "file": name, "video_quality": vq[i], "motion_quality": mq[i]}));
    }
    crate::image::grid(&strips, 1).save_png(&out.join("grid.png"))?;
    crate::io::atomic_write(&out.join("samples.json"), serde_json::to_string_pretty(&listing)?.as_bytes())?;
    Ok(clips.len())
}

/// Where cached base models live: `$VIPO_CACHE`, else `./.vipo-cache`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("VIPO_CACHE").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(".vipo-cache"))
}

/// Where the cached base model for `cfg` lives (it may not exist yet): keyed by a hash
/// of the model + pretrain config, the seed and the sample config.
pub fn cached_base_path(cfg: &Config) -> PathBuf {
    // Image keys are unchanged from before video existed, so existing caches stay valid.
    let (prefix, key) = match cfg.modality {
        crate::config::Modality::Image => ("base", serde_json::to_string(&(&cfg.model, &cfg.pretrain, cfg.seed, &cfg.sample))),
        crate::config::Modality::Video => ("vbase", serde_json::to_string(&(&cfg.video_model, &cfg.pretrain, cfg.seed, &cfg.sample))),
        crate::config::Modality::Sd3 => ("sd3", serde_json::to_string(&cfg.sd3)),
        crate::config::Modality::Flux => ("flux", serde_json::to_string(&cfg.flux)),
    };
    // Fields added later are left out of the key at their old (default-equivalent) values,
    // so caches written before they existed stay valid; they are the last field of their
    // struct, so each is one exact substring.
    let mut key = key.expect("config serializes");
    for legacy in [r#","prediction":"v""#, r#","cond_dropout":0.0"#, r#","guidance":1.0"#, r#","sigma_loc":0.0"#, r#","sigma_scale":1.0"#, r#","conv_channels":0"#, r#","pos_init":"randn""#] {
        key = key.replacen(legacy, "", 1);
    }
    if cfg.modality == crate::config::Modality::Video {
        // The video policy has no such position table: pos_init does not change its base.
        key = key.replacen(r#","pos_init":"sincos""#, "", 1);
    }
    let hash = key.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3));
    cache_dir().join(format!("{prefix}-{hash:016x}")).join(crate::train::run::FINAL_WEIGHTS)
}

/// The base model for `cfg` (keyed by a hash of the model + pretrain config and seed):
/// pretrained once, then reused unless `fresh`.
pub fn cached_base(cfg: &Config, fresh: bool) -> Result<PathBuf> {
    let weights = cached_base_path(cfg);
    let dir = weights.parent().expect("cache path has a parent").to_path_buf();
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("base").to_string();
    if weights.is_file() && !fresh {
        eprintln!("using cached base model {}", weights.display());
        return Ok(weights);
    }
    eprintln!("pretraining the base model into {} (cached for later runs)", dir.display());
    // Pretrain into a temp dir, then rename, so an interrupted pretraining never leaves a
    // half-trained model where the cache expects a finished one.
    let tmp = cache_dir().join(format!(".tmp-{name}"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("{}: cannot clear", tmp.display()))?;
    }
    crate::train::run::create_run_dir(&tmp, cfg, false)?;
    let out = crate::train::pretrain::pretrain(cfg, &tmp)?;
    if let Some((e, o)) = out.scores {
        eprintln!("base score ({}): eval {e:.3}, ood {o:.3}", out.score_name);
    }
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("{}: cannot replace", dir.display()))?;
    }
    std::fs::rename(&tmp, &dir).with_context(|| format!("{}: cannot move into place", dir.display()))?;
    Ok(weights)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Adding config fields must not orphan cached bases: at their legacy values the new
    /// fields stay out of the key (these two hashes are real cache folders written before
    /// `model.prediction`, `pretrain.cond_dropout` and `sample.guidance` existed).
    #[test]
    fn cache_keys_of_legacy_configs_are_unchanged() {
        let mut cfg = Config::default();
        cfg.model.prediction = crate::policy::dit::Prediction::V;
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
