//! The data side of GRPO/ViPO training. The loop in `grpo.rs` draws prompts as indices
//! into the task's training pool, hands them to the policy (which encodes them and decodes
//! its latents) and gives the decoded samples back to the task for rewards, maps, grids
//! and evaluation; the image task (ShapeWorld) and the video task (ShapeWorld-Video)
//! differ in prompts, allocation maps, grids and evaluation — nothing else.

use anyhow::{Context, Result};
use std::collections::HashMap;
use std::path::Path;

use crate::config::{Algo, Config, TemporalNorm};
use crate::image::{grid, grid_scale, overlay, signed_overlay, Image, SampleKind, Samples};
use crate::policy::Policy;
use crate::prompt::Prompt;
use crate::reward::set::RewardSet;
use crate::reward::RewardInfo;
use crate::train::maps::{MapBatch, MapSource};
use crate::world::Split;

/// Fixed prompts and noise of the progress grids (the same for every run and step).
const GRID_SEED: u64 = 0x9e1d;

pub trait Task {
    /// The training pool, one prompt per entry.
    fn pool(&self) -> &[Prompt];
    fn reward_infos(&self) -> Vec<RewardInfo>;
    fn reward_weights(&self) -> Vec<f32>;
    /// `out[k][i]`: reward k on sample i (prompt `idx[i]` of the pool); a non-finite score
    /// is an error.
    fn score(&self, d: &Samples, idx: &[usize]) -> Result<Vec<Vec<f32>>>;
    /// Allocation maps at the samples' resolution ((h, w), or (t, h, w) for video); None for
    /// GRPO. The trainer resamples them to the policy's latent grid.
    fn maps(&self, d: &Samples) -> Result<Option<MapBatch>>;
    /// Progress grid: fixed train prompts and noise, ODE samples of `policy`.
    fn write_grid(&self, policy: &dyn Policy, path: &Path) -> Result<()>;
    /// Sample | map | signed advantage for the first `n` samples (`adv[i]`: scalar advantage).
    fn write_map_grid(&self, d: &Samples, mb: &MapBatch, adv: &[f32], n: usize, adv_scale: f32, path: &Path) -> Result<()>;
    /// The held-out splits (`train.eval_prompts` prompts each; none when that is 0), read
    /// once when the task is built.
    fn held_out(&self) -> &[(&'static str, Vec<Prompt>)];
    /// Mean held-out reward on the fixed [`Task::held_out`] prompts and noise: (reward name,
    /// split → mean).
    fn evaluate(&self, policy: &dyn Policy) -> Result<(String, HashMap<String, f64>)>;
}

/// Pool prompts `idx`, one per sample.
pub fn prompts_at(task: &dyn Task, idx: &[usize]) -> Vec<Prompt> {
    idx.iter().map(|&i| task.pool()[i].clone()).collect()
}

/// Build the task of `cfg.modality`, checking prompts, rewards and maps before any work.
pub fn build(cfg: &Config) -> Result<Box<dyn Task>> {
    let t = &cfg.train;
    let maps: Option<Box<dyn MapSource>> = match t.algo {
        Algo::Grpo => None,
        Algo::Vipo => Some(crate::train::maps::build(cfg)?),
    };
    cfg.vipo.validate()?;
    let rewards = crate::reward::build_set(&t.rewards, cfg.sample_kind(), &cfg.modality.to_string())?;
    let pool = train_pool(cfg)?;
    let what = if t.prompt_file.is_empty() { "the ShapeWorld prompts".to_string() } else { format!("train.prompt_file {}", t.prompt_file) };
    rewards.check_prompts(&pool).with_context(|| what)?;
    let held_out = held_out(cfg)?;
    for (split, prompts) in &held_out {
        rewards.check_prompts(prompts).with_context(|| format!("held-out split {split:?}"))?;
    }
    Ok(match cfg.sample_kind() {
        SampleKind::Images => Box::new(ImageTask { pool, held_out, rewards, maps, cfg: cfg.clone() }),
        SampleKind::Clips => Box::new(VideoTask { pool, held_out, rewards, maps, cfg: cfg.clone() }),
    })
}

/// The held-out splits of the run's evaluations (none when `train.eval_prompts` is 0).
fn held_out(cfg: &Config) -> Result<Vec<(&'static str, Vec<Prompt>)>> {
    match cfg.train.eval_prompts {
        0 => Ok(Vec::new()),
        n => crate::generate::held_out_splits(cfg, n),
    }
}

/// The RL training prompts: `train.prompt_file`, else `prompt_pool` draws of the
/// modality's grammar (at least `prompts_per_step`).
fn train_pool(cfg: &Config) -> Result<Vec<Prompt>> {
    let t = &cfg.train;
    if !t.prompt_file.is_empty() {
        return crate::prompt::read_prompt_file(Path::new(&t.prompt_file)).context("train.prompt_file");
    }
    let (n, seed) = (t.prompt_pool.max(t.prompts_per_step), cfg.seed ^ 0x7a41);
    Ok(crate::prompt::grammar_prompts(cfg.sample_kind(), Split::Train, n, seed))
}

/// Prompts of the progress grids: fixed grammar train prompts, or a fixed choice from
/// `train.prompt_file`.
fn grid_prompts(cfg: &Config, pool: &[Prompt]) -> Vec<Prompt> {
    let n = cfg.train.grid_prompts;
    if !cfg.train.prompt_file.is_empty() {
        return crate::prompt::fixed_subset(pool, n, GRID_SEED);
    }
    crate::prompt::grammar_prompts(cfg.sample_kind(), Split::Train, n, GRID_SEED)
}

fn mean(v: &[f32]) -> f64 {
    v.iter().map(|&x| x as f64).sum::<f64>() / v.len().max(1) as f64
}

// ---------------------------------------------------------------------------------------
// Images: ShapeWorld

pub struct ImageTask {
    pool: Vec<Prompt>,
    held_out: Vec<(&'static str, Vec<Prompt>)>,
    rewards: RewardSet,
    maps: Option<Box<dyn MapSource>>,
    cfg: Config,
}

impl ImageTask {
    /// The image task with the given rewards and map source (the pool as in [`build`]).
    pub fn new(cfg: &Config, rewards: RewardSet, maps: Option<Box<dyn MapSource>>) -> Result<Self> {
        Ok(Self { pool: train_pool(cfg)?, held_out: held_out(cfg)?, rewards, maps, cfg: cfg.clone() })
    }
}

/// Legend cells of a grid of prompts (no scores).
fn legend(texts: impl Iterator<Item = String>) -> Vec<crate::image::LegendCell> {
    texts.map(|prompt| crate::image::LegendCell { prompt, score: None, note: String::new() }).collect()
}

impl Task for ImageTask {
    fn pool(&self) -> &[Prompt] {
        &self.pool
    }
    fn reward_infos(&self) -> Vec<RewardInfo> {
        self.rewards.infos()
    }
    fn reward_weights(&self) -> Vec<f32> {
        self.rewards.weights()
    }
    fn score(&self, d: &Samples, idx: &[usize]) -> Result<Vec<Vec<f32>>> {
        self.rewards.score(d, &prompts_at(self, idx))
    }
    fn maps(&self, d: &Samples) -> Result<Option<MapBatch>> {
        self.maps.as_ref().map(|m| m.maps(d.images("allocation maps")?, &[])).transpose()
    }
    fn write_grid(&self, policy: &dyn Policy, path: &Path) -> Result<()> {
        let prompts = grid_prompts(&self.cfg, &self.pool);
        if prompts.is_empty() {
            return Ok(());
        }
        let s = crate::policy::ode::generate(policy, &prompts, GRID_SEED, &self.cfg.sample)?;
        let big: Vec<Image> = s.images("progress grid")?.iter().map(|im| im.upscale(grid_scale(im.w))).collect();
        grid(&big, 8).save_png(path)?;
        crate::image::write_legend(path, &legend(prompts.iter().map(|p| p.text.clone())))
    }
    fn write_map_grid(&self, d: &Samples, mb: &MapBatch, adv: &[f32], n: usize, adv_scale: f32, path: &Path) -> Result<()> {
        let ims = d.images("map grid")?;
        let mut tiles = Vec::new();
        for i in 0..n.min(ims.len()) {
            let pa: Vec<f32> = mb.maps[i].iter().map(|m| m * adv[i]).collect();
            let f = grid_scale(ims[i].w);
            tiles.push(ims[i].upscale(f));
            tiles.push(overlay(&ims[i], &mb.maps[i], 0.7).upscale(f));
            tiles.push(signed_overlay(&ims[i], &pa, adv_scale).upscale(f));
        }
        grid(&tiles, 6).save_png(path)
    }
    /// The compositional reward on ShapeWorld prompts; on other prompts the run's rewards
    /// (their weighted total).
    fn held_out(&self) -> &[(&'static str, Vec<Prompt>)] {
        &self.held_out
    }
    fn evaluate(&self, policy: &dyn Policy) -> Result<(String, HashMap<String, f64>)> {
        let comp = crate::reward::compositional::Compositional::new();
        let mut out = HashMap::new();
        let mut name = String::new();
        for (split, prompts) in &self.held_out {
            let samples = crate::policy::ode::generate(policy, prompts, crate::policy::ode::EVAL_SEED, &self.cfg.sample)?;
            let scores = if prompts.iter().all(|p| p.image_spec().is_some()) {
                name = "compositional".into();
                crate::reward::Reward::score(&comp, &samples, prompts)?
            } else {
                name = weighted_name(&self.rewards);
                crate::reward::set::weighted_total(&self.rewards.score(&samples, prompts)?, &self.rewards.weights())
            };
            out.insert(split.to_string(), mean(&scores));
        }
        Ok((name, out))
    }
}

/// How a weighted total of a reward set is named in eval.json.
fn weighted_name(rewards: &RewardSet) -> String {
    let parts: Vec<String> = rewards.infos().iter().zip(rewards.weights()).map(|(i, w)| format!("{w}·{}", i.name)).collect();
    format!("weighted total {}", parts.join(" + "))
}

// ---------------------------------------------------------------------------------------
// Video: ShapeWorld-Video

pub struct VideoTask {
    pool: Vec<Prompt>,
    held_out: Vec<(&'static str, Vec<Prompt>)>,
    rewards: RewardSet,
    maps: Option<Box<dyn MapSource>>,
    cfg: Config,
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
    let maps = fm.maps.chunks(k).map(|per_clip| crate::psm::temporal_map(per_clip, h, w, t, sigma_t, norm == TemporalNorm::PerFrame)).collect();
    Ok(MapBatch { maps, h, w, t: Some(t), fallbacks: fm.fallbacks, object_mass: fm.object_mass, object_area_frac: fm.object_area_frac })
}

impl Task for VideoTask {
    fn pool(&self) -> &[Prompt] {
        &self.pool
    }
    fn reward_infos(&self) -> Vec<RewardInfo> {
        self.rewards.infos()
    }
    fn reward_weights(&self) -> Vec<f32> {
        self.rewards.weights()
    }
    fn score(&self, d: &Samples, idx: &[usize]) -> Result<Vec<Vec<f32>>> {
        self.rewards.score(d, &prompts_at(self, idx))
    }
    fn maps(&self, d: &Samples) -> Result<Option<MapBatch>> {
        let v = &self.cfg.vipo;
        let clips = d.clips("allocation maps")?;
        self.maps.as_ref().map(|m| temporal_maps(m.as_ref(), clips, v.frame_stride, v.temporal_sigma, v.temporal_norm)).transpose()
    }
    fn write_grid(&self, policy: &dyn Policy, path: &Path) -> Result<()> {
        let prompts = grid_prompts(&self.cfg, &self.pool);
        if prompts.is_empty() {
            return Ok(());
        }
        let s = crate::policy::ode::generate(policy, &prompts, GRID_SEED, &self.cfg.sample)?;
        let strips: Vec<Image> = s.clips("progress grid")?.iter().map(|c| crate::image::frame_strip(c).upscale(2)).collect();
        grid(&strips, 1).save_png(path)?;
        crate::image::write_legend(path, &legend(prompts.iter().map(|p| p.text.clone())))
    }
    /// Per sample, three rows: frames | map overlay per frame | signed advantage per frame.
    fn write_map_grid(&self, d: &Samples, mb: &MapBatch, adv: &[f32], n: usize, adv_scale: f32, path: &Path) -> Result<()> {
        let cl = d.clips("map grid")?;
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
            rows.push(crate::image::frame_strip(&cl[i]).upscale(2));
            rows.push(crate::image::frame_strip(&ov).upscale(2));
            rows.push(crate::image::frame_strip(&sg).upscale(2));
        }
        grid(&rows, 1).save_png(path)
    }
    fn held_out(&self) -> &[(&'static str, Vec<Prompt>)] {
        &self.held_out
    }
    fn evaluate(&self, policy: &dyn Policy) -> Result<(String, HashMap<String, f64>)> {
        let mut out = HashMap::new();
        for (split, prompts) in &self.held_out {
            let cl = crate::policy::ode::generate(policy, prompts, crate::policy::ode::EVAL_SEED, &self.cfg.sample)?;
            let scores = self.rewards.score(&cl, prompts)?;
            for (info, s) in self.rewards.infos().iter().zip(&scores) {
                out.insert(format!("{split}.{}", info.name), mean(s));
            }
            let per_sample: Vec<f32> = (0..cl.len()).map(|i| scores.iter().map(|s| s[i]).sum::<f32>() / scores.len() as f32).collect();
            out.insert(split.to_string(), mean(&per_sample));
        }
        Ok((format!("mean of {}", self.rewards.infos().iter().map(|r| r.name.clone()).collect::<Vec<_>>().join(" and ")), out))
    }
}
