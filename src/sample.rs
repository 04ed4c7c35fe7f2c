//! `vipo sample` and the cached base model used by `vipo demo`.

use anyhow::{Context, Result};
use serde_json::json;
use std::path::Path;

use crate::policy::Policy;
use crate::reward::compositional::Compositional;
use crate::sampler::SampleConfig;
use crate::world::PromptSpec;

/// Generate one image per prompt into `out` (`sample_000.png`…, `grid.png`,
/// `samples.json` listing prompt → file → compositional score). Returns the count.
pub fn write_samples(policy: &dyn Policy, prompts: &[PromptSpec], seed: u64, cfg: &SampleConfig, out: &Path) -> Result<usize> {
    let images = crate::generate::generate_images(policy, prompts, seed, cfg)?;
    let scores = Compositional::new().score_specs(&images, prompts)?;
    let entries = prompts.iter().zip(&scores).map(|(p, s)| json!({"prompt": p.text(), "score": s})).collect();
    save_images(&images, entries, out)
}

/// Generate one image per free-text prompt into `out` (any image policy, e.g. SD3):
/// `sample_000.png`…, `grid.png` and `samples.json` (prompt → file). No score: free text
/// has no scene for the compositional reward.
pub fn write_text_samples(policy: &dyn Policy, prompts: &[crate::prompt::Prompt], seed: u64, cfg: &SampleConfig, out: &Path) -> Result<usize> {
    let samples = crate::policy::ode::generate(policy, prompts, seed, cfg)?;
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
pub fn write_clips(policy: &crate::policy::shapeworld::video_dit::VideoPolicy, specs: &[crate::world::video::VideoSpec], seed: u64, cfg: &SampleConfig, out: &Path) -> Result<usize> {
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create output directory", out.display()))?;
    let clips = crate::generate::generate_clips(policy, specs, seed, cfg)?;
    let vq = crate::reward::video::VideoQuality::new().score_clips(&clips, specs)?;
    let mq = crate::reward::video::MotionQuality::new().score_clips(&clips, specs)?;
    let mut listing = Vec::new();
    let mut strips = Vec::new();
    for (i, (c, s)) in clips.iter().zip(specs).enumerate() {
        let name = format!("clip_{i:03}.png");
        let strip = crate::image::frame_strip(c);
        strip.save_png(&out.join(&name))?;
        strips.push(strip.upscale(2));
        listing.push(json!({"prompt": s.text(), "file": name, "video_quality": vq[i], "motion_quality": mq[i]}));
    }
    crate::image::grid(&strips, 1).save_png(&out.join("grid.png"))?;
    crate::io::atomic_write(&out.join("samples.json"), serde_json::to_string_pretty(&listing)?.as_bytes())?;
    Ok(clips.len())
}
