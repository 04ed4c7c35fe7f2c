//! The modality side of GRPO/ViPO training. The loop in `grpo.rs` sees prompts only as
//! indices into the task's training pool and decoded samples only through [`Task`]; the
//! image task (ShapeWorld) and the video task (ShapeWorld-Video) differ in prompts,
//! tokenizer, decoder, rewards, allocation maps, grids and evaluation — nothing else.

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

use crate::config::{Algo, Config, TemporalNorm};
use crate::image::{grid, overlay, signed_overlay, Image};
use crate::policy::FlowModel;
use crate::reward::set::RewardSet;
use crate::reward::video::VideoReward;
use crate::reward::RewardInfo;
use crate::train::maps::{MapBatch, MapSource};
use crate::world::video::{video_prompts, VideoSpec};
use crate::world::{self, PromptSpec, Split};

/// Fixed prompts and noise of the progress grids (the same for every run and step).
const GRID_SEED: u64 = 0x9e1d;

/// Decoded samples of one rollout.
pub enum Decoded {
    Images(Vec<Image>),
    Clips(Vec<Vec<Image>>),
}

pub trait Task {
    /// Prompts in the training pool.
    fn pool_len(&self) -> usize;
    /// Token ids (N, L) for pool prompts `idx` (one row per sample).
    fn condition(&self, idx: &[usize], device: &Device) -> Result<Tensor>;
    fn decode(&self, z: &Tensor) -> Result<Decoded>;
    /// Text of pool prompt `idx` (for grid legends).
    fn prompt_text(&self, idx: usize) -> String;
    fn reward_infos(&self) -> Vec<RewardInfo>;
    fn reward_weights(&self) -> Vec<f32>;
    /// `out[k][i]`: reward k on sample i (prompt `idx[i]`); a non-finite score is an error.
    fn score(&self, d: &Decoded, idx: &[usize]) -> Result<Vec<Vec<f32>>>;
    /// Allocation maps on the latent grid ((h, w), or (t, h, w) for video); None for GRPO.
    fn maps(&self, d: &Decoded) -> Result<Option<MapBatch>>;
    /// Progress grid: fixed train prompts and noise, ODE samples of `model`.
    fn write_grid(&self, model: &dyn FlowModel, latent_shape: &[usize], path: &Path) -> Result<()>;
    /// Sample | map | signed advantage for the first `n` samples (`adv[i]`: scalar advantage).
    fn write_map_grid(&self, d: &Decoded, mb: &MapBatch, adv: &[f32], n: usize, adv_scale: f32, path: &Path) -> Result<()>;
    /// Mean held-out reward on fixed `eval`/`ood` prompts and noise: (reward name, split → mean).
    fn evaluate(&self, model: &dyn FlowModel, latent_shape: &[usize], n: usize) -> Result<(String, HashMap<String, f64>)>;
}

/// Build the task of `cfg.modality`, checking rewards and maps before any work.
pub fn build(cfg: &Config) -> Result<Box<dyn Task>> {
    let t = &cfg.train;
    let maps: Option<Box<dyn MapSource>> = match t.algo {
        Algo::Grpo => None,
        Algo::Vipo => Some(crate::train::maps::build(cfg)?),
    };
    cfg.vipo.validate()?;
    Ok(match cfg.modality {
        crate::config::Modality::Image => Box::new(ImageTask::new(cfg, crate::reward::build_set(&t.rewards)?, maps)),
        crate::config::Modality::Video => {
            let mut rewards = Vec::new();
            for (i, e) in t.rewards.iter().enumerate() {
                let r = crate::reward::video::build(&e.name).with_context(|| format!("train.rewards[{i}]: video runs need video rewards"))?;
                rewards.push((r, e.weight as f32));
            }
            let (n, seed) = pool_size_seed(cfg);
            Box::new(VideoTask {
                pool: video_prompts(Split::Train, n, seed),
                rewards,
                maps,
                cfg: cfg.clone(),
            })
        }
    })
}

/// Size and seed of the RL training prompt pool (either modality).
fn pool_size_seed(cfg: &Config) -> (usize, u64) {
    (cfg.train.prompt_pool.max(cfg.train.prompts_per_step), cfg.seed ^ 0x7a41)
}

fn mean(v: &[f32]) -> f64 {
    v.iter().map(|&x| x as f64).sum::<f64>() / v.len().max(1) as f64
}

// ---------------------------------------------------------------------------------------
// Images: ShapeWorld

pub struct ImageTask {
    pool: Vec<PromptSpec>,
    rewards: RewardSet,
    maps: Option<Box<dyn MapSource>>,
    cfg: Config,
}

impl ImageTask {
    /// The ShapeWorld task with the given rewards and map source (the pool as in [`build`]).
    pub fn new(cfg: &Config, rewards: RewardSet, maps: Option<Box<dyn MapSource>>) -> Self {
        let (n, seed) = pool_size_seed(cfg);
        Self { pool: world::prompts(Split::Train, n, seed), rewards, maps, cfg: cfg.clone() }
    }
    fn specs(&self, idx: &[usize]) -> Vec<PromptSpec> {
        idx.iter().map(|&i| self.pool[i].clone()).collect()
    }
    fn generate(&self, model: &dyn FlowModel, shape: &[usize], prompts: &[PromptSpec], seed: u64) -> Result<Vec<Image>> {
        crate::eval::generate_images(model, shape, prompts, seed, &self.cfg.sample)
    }
}

/// Legend cells of a grid of prompts (no scores).
fn legend(texts: impl Iterator<Item = String>) -> Vec<crate::image::LegendCell> {
    texts.map(|prompt| crate::image::LegendCell { prompt, score: None, note: String::new() }).collect()
}

fn images(d: &Decoded) -> &[Image] {
    match d {
        Decoded::Images(v) => v,
        Decoded::Clips(_) => panic!("image task got clips"),
    }
}

fn clips(d: &Decoded) -> &[Vec<Image>] {
    match d {
        Decoded::Clips(v) => v,
        Decoded::Images(_) => panic!("video task got images"),
    }
}

impl Task for ImageTask {
    fn pool_len(&self) -> usize {
        self.pool.len()
    }
    fn condition(&self, idx: &[usize], device: &Device) -> Result<Tensor> {
        let texts: Vec<String> = idx.iter().map(|&i| self.pool[i].text()).collect();
        crate::policy::dit::tokens_for(&texts, device)
    }
    fn decode(&self, z: &Tensor) -> Result<Decoded> {
        Ok(Decoded::Images(crate::policy::dit::latents_to_images(z)?))
    }
    fn prompt_text(&self, idx: usize) -> String {
        self.pool[idx].text()
    }
    fn reward_infos(&self) -> Vec<RewardInfo> {
        self.rewards.infos()
    }
    fn reward_weights(&self) -> Vec<f32> {
        self.rewards.weights()
    }
    fn score(&self, d: &Decoded, idx: &[usize]) -> Result<Vec<Vec<f32>>> {
        self.rewards.score(images(d), &self.specs(idx))
    }
    fn maps(&self, d: &Decoded) -> Result<Option<MapBatch>> {
        self.maps.as_ref().map(|m| m.maps(images(d), &[])).transpose()
    }
    fn write_grid(&self, model: &dyn FlowModel, shape: &[usize], path: &Path) -> Result<()> {
        let prompts = world::prompts(Split::Train, self.cfg.train.grid_prompts, GRID_SEED);
        let imgs = self.generate(model, shape, &prompts, GRID_SEED)?;
        let big: Vec<Image> = imgs.iter().map(|im| im.upscale(4)).collect();
        grid(&big, 8).save_png(path)?;
        crate::image::write_legend(path, &legend(prompts.iter().map(|p| p.text())))
    }
    fn write_map_grid(&self, d: &Decoded, mb: &MapBatch, adv: &[f32], n: usize, adv_scale: f32, path: &Path) -> Result<()> {
        let ims = images(d);
        let mut tiles = Vec::new();
        for i in 0..n.min(ims.len()) {
            let pa: Vec<f32> = mb.maps[i].iter().map(|m| m * adv[i]).collect();
            tiles.push(ims[i].upscale(4));
            tiles.push(overlay(&ims[i], &mb.maps[i], 0.7).upscale(4));
            tiles.push(signed_overlay(&ims[i], &pa, adv_scale).upscale(4));
        }
        grid(&tiles, 6).save_png(path)
    }
    fn evaluate(&self, model: &dyn FlowModel, shape: &[usize], n: usize) -> Result<(String, HashMap<String, f64>)> {
        let reward = crate::reward::compositional::Compositional::new();
        let mut out = HashMap::new();
        for (name, split) in [("eval", Split::Eval), ("ood", Split::Ood)] {
            let prompts = world::prompts(split, n, crate::eval::run::EVAL_SEED);
            let imgs = self.generate(model, shape, &prompts, crate::eval::run::EVAL_SEED)?;
            out.insert(name.to_string(), crate::eval::mean_score(&reward, &imgs, &prompts)?);
        }
        Ok(("compositional".into(), out))
    }
}

// ---------------------------------------------------------------------------------------
// Video: ShapeWorld-Video

pub struct VideoTask {
    pool: Vec<VideoSpec>,
    rewards: Vec<(Box<dyn VideoReward>, f32)>,
    maps: Option<Box<dyn MapSource>>,
    cfg: Config,
}

impl VideoTask {
    fn generate(&self, model: &dyn FlowModel, shape: &[usize], specs: &[VideoSpec], seed: u64) -> Result<Vec<Vec<Image>>> {
        crate::policy::video_dit::generate_clips(model, shape, specs, seed, &self.cfg.sample)
    }
    fn score_specs(&self, clips: &[Vec<Image>], specs: &[VideoSpec]) -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::new();
        for (r, _) in &self.rewards {
            let name = r.info().name;
            let s = r.score(clips, specs).with_context(|| format!("reward '{name}' failed"))?;
            crate::reward::set::check_scores(&name, &s, clips.len())?;
            out.push(s);
        }
        Ok(out)
    }
}

/// Per-frame maps of `clips` from an image map source, combined into one map per clip on
/// the latent (t, h, w) grid by [`crate::psm::temporal_map`]: maps on every
/// `stride`-th frame, resampled along time to all frames, Gaussian σ_t along time, min–max
/// over the volume (or per frame).
pub fn temporal_maps(src: &dyn MapSource, clips: &[Vec<Image>], stride: usize, sigma_t: f64, norm: TemporalNorm) -> Result<MapBatch> {
    let t = clips[0].len();
    let picked: Vec<usize> = (0..t).step_by(stride.max(1)).collect();
    let frames: Vec<Image> = clips.iter().flat_map(|c| picked.iter().map(move |&f| c[f].clone())).collect();
    let fm = src.maps(&frames, &[])?;
    let (h, w) = (fm.h, fm.w);
    let k = picked.len();
    let maps = fm
        .maps
        .chunks(k)
        .map(|per_clip| crate::psm::temporal_map(per_clip, h, w, t, sigma_t, norm == TemporalNorm::PerFrame))
        .collect();
    Ok(MapBatch { maps, h, w, t: Some(t), fallbacks: fm.fallbacks, object_mass: fm.object_mass, object_area_frac: fm.object_area_frac })
}

/// A clip as one image: its frames side by side.
pub fn frame_strip(frames: &[Image]) -> Image {
    let (h, w) = (frames[0].h, frames[0].w);
    let mut out = Image::new(h, w * frames.len());
    for (t, f) in frames.iter().enumerate() {
        for c in 0..3 {
            for y in 0..h {
                for x in 0..w {
                    out.set(c, y, t * w + x, f.get(c, y, x));
                }
            }
        }
    }
    out
}

impl Task for VideoTask {
    fn pool_len(&self) -> usize {
        self.pool.len()
    }
    fn condition(&self, idx: &[usize], device: &Device) -> Result<Tensor> {
        let specs: Vec<VideoSpec> = idx.iter().map(|&i| self.pool[i].clone()).collect();
        crate::policy::video_dit::tokens_for_video(&specs, device)
    }
    fn decode(&self, z: &Tensor) -> Result<Decoded> {
        Ok(Decoded::Clips(crate::policy::video_dit::latents_to_clips(z)?))
    }
    fn prompt_text(&self, idx: usize) -> String {
        self.pool[idx].text()
    }
    fn reward_infos(&self) -> Vec<RewardInfo> {
        self.rewards.iter().map(|(r, _)| r.info()).collect()
    }
    fn reward_weights(&self) -> Vec<f32> {
        self.rewards.iter().map(|(_, w)| *w).collect()
    }
    fn score(&self, d: &Decoded, idx: &[usize]) -> Result<Vec<Vec<f32>>> {
        let specs: Vec<VideoSpec> = idx.iter().map(|&i| self.pool[i].clone()).collect();
        self.score_specs(clips(d), &specs)
    }
    fn maps(&self, d: &Decoded) -> Result<Option<MapBatch>> {
        let v = &self.cfg.vipo;
        self.maps.as_ref().map(|m| temporal_maps(m.as_ref(), clips(d), v.frame_stride, v.temporal_sigma, v.temporal_norm)).transpose()
    }
    fn write_grid(&self, model: &dyn FlowModel, shape: &[usize], path: &Path) -> Result<()> {
        let specs = video_prompts(Split::Train, self.cfg.train.grid_prompts, GRID_SEED);
        let cl = self.generate(model, shape, &specs, GRID_SEED)?;
        let strips: Vec<Image> = cl.iter().map(|c| frame_strip(c).upscale(2)).collect();
        grid(&strips, 1).save_png(path)?;
        crate::image::write_legend(path, &legend(specs.iter().map(|p| p.text())))
    }
    /// Per sample, three rows: frames | map overlay per frame | signed advantage per frame.
    fn write_map_grid(&self, d: &Decoded, mb: &MapBatch, adv: &[f32], n: usize, adv_scale: f32, path: &Path) -> Result<()> {
        let cl = clips(d);
        let hw = mb.h * mb.w;
        let mut rows = Vec::new();
        for i in 0..n.min(cl.len()) {
            let m = &mb.maps[i];
            let ov: Vec<Image> = cl[i].iter().enumerate().map(|(f, im)| overlay(im, &m[f * hw..(f + 1) * hw], 0.7)).collect();
            let sg: Vec<Image> = cl[i]
                .iter()
                .enumerate()
                .map(|(f, im)| {
                    let pa: Vec<f32> = m[f * hw..(f + 1) * hw].iter().map(|x| x * adv[i]).collect();
                    signed_overlay(im, &pa, adv_scale)
                })
                .collect();
            rows.push(frame_strip(&cl[i]).upscale(2));
            rows.push(frame_strip(&ov).upscale(2));
            rows.push(frame_strip(&sg).upscale(2));
        }
        grid(&rows, 1).save_png(path)
    }
    fn evaluate(&self, model: &dyn FlowModel, shape: &[usize], n: usize) -> Result<(String, HashMap<String, f64>)> {
        let mut out = HashMap::new();
        for split in [Split::Eval, Split::Ood] {
            let specs = video_prompts(split, n, crate::eval::run::EVAL_SEED);
            let cl = self.generate(model, shape, &specs, crate::eval::run::EVAL_SEED)?;
            let scores = self.score_specs(&cl, &specs)?;
            for ((r, _), s) in self.rewards.iter().zip(&scores) {
                out.insert(format!("{}.{}", split.name(), r.info().name), mean(s));
            }
            let per_sample: Vec<f32> = (0..cl.len()).map(|i| scores.iter().map(|s| s[i]).sum::<f32>() / scores.len() as f32).collect();
            out.insert(split.name().to_string(), mean(&per_sample));
        }
        Ok((format!("mean of {}", self.rewards.iter().map(|(r, _)| r.info().name).collect::<Vec<_>>().join(" and ")), out))
    }
}
