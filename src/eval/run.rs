//! `vipo eval --run DIR [--checkpoint STEP]`: ODE samples (EMA weights where the run kept
//! them) on fixed `eval` and `ood` prompts with fixed per-prompt noise, every reward's mean
//! with a 95 % bootstrap interval, the compositional reward term by term, and the OOD gap.
//! Two runs evaluated with the same `n` see identical prompts and noise.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::stats::{bootstrap_ci, mean};
use crate::config::Config;
use crate::image::SampleKind;
use crate::image::{Image, Samples};
use crate::policy::ode::EVAL_SEED;
use crate::policy::Policy;
use crate::prompt::Prompt;
use crate::reward::compositional::Compositional;
use crate::run_dir;
use crate::world::video::VideoSpec;
use crate::world::PromptSpec;

const BOOTSTRAP_RESAMPLES: usize = 2000;

/// One line of `eval.json`: a reward (or a compositional term, `compositional.count` …)
/// on one split.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EvalRow {
    pub split: String,
    pub reward: String,
    pub mean: f64,
    pub ci_low: f64,
    pub ci_high: f64,
    pub n: usize,
}

/// Everything `vipo eval` writes into `eval.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EvalReport {
    pub run: String,
    /// Weights evaluated: "final" or "step_N".
    pub checkpoint: String,
    pub sample_steps: usize,
    pub seed: u64,
    pub n: usize,
    pub rows: Vec<EvalRow>,
    /// eval mean − ood mean, per reward.
    pub ood_gap: HashMap<String, f64>,
    /// Per-prompt scores: split → reward → scores (prompt order as generated).
    pub scores: HashMap<String, HashMap<String, Vec<f64>>>,
}

impl EvalReport {
    pub fn row(&self, split: &str, reward: &str) -> Option<&EvalRow> {
        self.rows.iter().find(|r| r.split == split && r.reward == reward)
    }
}

/// The rewards an evaluation reports: the compositional reward always, then the run's own.
fn reward_names(cfg: &Config) -> Vec<String> {
    let mut names = vec!["compositional".to_string()];
    for e in &cfg.train.rewards {
        if !names.contains(&e.name) {
            names.push(e.name.clone());
        }
    }
    names
}

fn row(split: &str, reward: &str, v: &[f64]) -> EvalRow {
    let (lo, hi) = bootstrap_ci(v, BOOTSTRAP_RESAMPLES, 0xb007);
    EvalRow { split: split.into(), reward: reward.into(), mean: mean(v), ci_low: lo, ci_high: hi, n: v.len() }
}

/// Every reward of `names` on one split's samples, a row each.
fn score_rewards(names: &[String], split: &str, samples: &Samples, prompts: &[Prompt], rows: &mut Vec<EvalRow>) -> Result<HashMap<String, Vec<f64>>> {
    let mut out = HashMap::new();
    for name in names {
        let r = crate::reward::build(name)?;
        let s: Vec<f64> = r.score(samples, prompts)?.into_iter().map(|x| x as f64).collect();
        anyhow::ensure!(s.iter().all(|x| x.is_finite()), "reward {name}: non-finite score on split {split}");
        rows.push(row(split, name, &s));
        out.insert(name.clone(), s);
    }
    Ok(out)
}

/// Score generated images: every reward, plus the compositional terms.
fn score_split(cfg: &Config, split: &str, images: &[Image], prompts: &[PromptSpec], rows: &mut Vec<EvalRow>) -> Result<HashMap<String, Vec<f64>>> {
    let samples = Samples::Images(images.to_vec());
    let out = score_rewards(&reward_names(cfg), split, &samples, &prompts.iter().map(Prompt::image).collect::<Vec<_>>(), rows)?;
    let comp = Compositional::new();
    let bd: Vec<_> = images.iter().zip(prompts).map(|(im, p)| (comp.breakdown(im, p), p.relation.is_some() && p.groups.len() == 2)).collect();
    let terms: [(&str, fn(&crate::reward::compositional::Breakdown) -> f32); 5] =
        [("count", |b| b.count), ("color", |b| b.color), ("shape", |b| b.shape), ("position", |b| b.position), ("quality", |b| b.quality)];
    for (term, get) in terms {
        // Position only means something for prompts with a relation.
        let v: Vec<f64> = bd.iter().filter(|(_, rel)| term != "position" || *rel).map(|(b, _)| get(b) as f64).collect();
        if !v.is_empty() {
            rows.push(row(split, &format!("compositional.{term}"), &v));
        }
    }
    Ok(out)
}

/// The reward a comparison ranks methods by: the compositional reward for images; for
/// video the per-clip mean of the VQ- and MQ-like rewards (reported as its own row).
pub fn primary_reward(cfg: &Config) -> &'static str {
    match cfg.sample_kind() {
        SampleKind::Images => "compositional",
        SampleKind::Clips => VQ_MQ,
    }
}

/// Name of the video evaluation's combined row: mean of video_quality and motion_quality.
pub const VQ_MQ: &str = "vq_mq_mean";

/// Video rewards an evaluation reports: VQ, MQ, their mean, then the run's own.
fn video_reward_names(cfg: &Config) -> Vec<String> {
    let mut names = vec!["video_quality".to_string(), "motion_quality".to_string()];
    for e in &cfg.train.rewards {
        if !names.contains(&e.name) && crate::reward::build(&e.name).is_ok_and(|r| r.inputs().accepts(SampleKind::Clips)) {
            names.push(e.name.clone());
        }
    }
    names
}

/// Score generated clips: every video reward, the VQ/MQ mean, and the MQ terms.
fn score_clips(cfg: &Config, split: &str, clips: &[Vec<Image>], specs: &[VideoSpec], rows: &mut Vec<EvalRow>) -> Result<HashMap<String, Vec<f64>>> {
    let samples = Samples::Clips(clips.to_vec());
    let mut out = score_rewards(&video_reward_names(cfg), split, &samples, &specs.iter().map(Prompt::video).collect::<Vec<_>>(), rows)?;
    let both: Vec<f64> = out["video_quality"].iter().zip(&out["motion_quality"]).map(|(a, b)| 0.5 * (a + b)).collect();
    rows.push(row(split, VQ_MQ, &both));
    out.insert(VQ_MQ.to_string(), both);
    let mq = crate::reward::video::MotionQuality::new();
    let bd: Vec<_> = clips.iter().zip(specs).map(|(c, s)| mq.breakdown(c, s)).collect();
    let terms: [(&str, fn(&crate::reward::video::MotionBreakdown) -> f32); 4] =
        [("direction", |b| b.direction), ("speed", |b| b.speed), ("persistence", |b| b.persistence), ("flicker", |b| b.flicker)];
    for (term, get) in terms {
        let v: Vec<f64> = bd.iter().map(|b| get(b) as f64).collect();
        rows.push(row(split, &format!("motion_quality.{term}"), &v));
    }
    Ok(out)
}

/// What an evaluation generated on one split, with the prompt text of each sample.
pub struct SplitSamples {
    pub split: String,
    pub prompts: Vec<String>,
    pub samples: Samples,
}

/// Evaluate a policy (image or video, per `cfg.modality`) on `n` fixed prompts per split;
/// also returns what it generated (for grids).
pub fn evaluate_policy(policy: &dyn Policy, cfg: &Config, n: usize) -> Result<(EvalReport, Vec<SplitSamples>)> {
    anyhow::ensure!(n >= 1, "eval: the number of prompts must be ≥ 1");
    let mut rows = Vec::new();
    let mut scores = HashMap::new();
    let mut grids = Vec::new();
    for (name, prompts) in crate::generate::held_out_splits(cfg, n)? {
        let samples = crate::policy::ode::generate(policy, &prompts, EVAL_SEED, &cfg.sample)?;
        let texts = prompts.iter().map(|p| p.text.clone()).collect();
        let split_scores = match (&samples, crate::prompt::image_specs(&prompts, ""), crate::prompt::video_specs(&prompts, "")) {
            (Samples::Images(images), Ok(specs), _) => score_split(cfg, name, images, &specs, &mut rows)?,
            (Samples::Clips(clips), _, Ok(specs)) => score_clips(cfg, name, clips, &specs, &mut rows)?,
            // Free-text prompts: the run's own rewards.
            _ => score_rewards(&cfg.train.rewards.iter().map(|e| e.name.clone()).collect::<Vec<_>>(), name, &samples, &prompts, &mut rows)?,
        };
        scores.insert(name.to_string(), split_scores);
        grids.push(SplitSamples { split: name.to_string(), prompts: texts, samples });
    }
    let mut ood_gap = HashMap::new();
    if let (Some(e), Some(o)) = (scores.get("eval"), scores.get("ood")) {
        for (name, v) in e {
            if let Some(w) = o.get(name) {
                ood_gap.insert(name.clone(), mean(v) - mean(w));
            }
        }
    }
    let rep = EvalReport { run: String::new(), checkpoint: String::new(), sample_steps: cfg.sample.steps, seed: EVAL_SEED, n, rows, ood_gap, scores };
    Ok((rep, grids))
}

/// The resolved base weights of a train run without pretraining anything.
fn train_base(cfg: &Config, run_dir: &Path) -> Result<PathBuf> {
    crate::base::resolve(cfg, |c| {
        anyhow::bail!("the run's base model (the cached demo base {}) is missing; run `vipo demo` with the same config to rebuild it", crate::base::cached_base_path(c).display())
    })
    .with_context(|| run_dir.join(run_dir::CONFIG_FILE).display().to_string())
}

/// Checkpoint steps a run holds (sorted).
pub fn checkpoint_steps(run_dir: &Path) -> Vec<usize> {
    let mut v: Vec<usize> = std::fs::read_dir(run_dir.join("checkpoints"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let stem = name.strip_prefix("step_")?;
            let stem = stem.strip_suffix(".safetensors").unwrap_or(stem);
            let ok = e.path().is_file() || e.path().join("state.json").is_file();
            ok.then(|| stem.parse().ok()).flatten()
        })
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// Load a run's weights: the final model, or checkpoint `step` (EMA copy when kept).
/// Works for `vipo pretrain` runs (checkpoints/step_N.safetensors) and `vipo train` runs
/// (checkpoints/step_NNNNNN/ with trainable/ema tensors on top of the base).
pub fn load_run_policy(run_dir: &Path, cfg: &Config, step: Option<usize>) -> Result<(Box<dyn Policy>, String)> {
    let device = crate::runtime::device()?;
    let final_w = run_dir.join(run_dir::FINAL_WEIGHTS);
    let Some(step) = step else {
        // A real generator loads from its model folder, so its final weights are its last
        // checkpoint (adapters on top of that folder's base).
        if cfg.generator().is_real() {
            let Some(&last) = checkpoint_steps(run_dir).last() else {
                bail!("{}: a real-generator run (modality = \"{}\") has no checkpoint", run_dir.display(), cfg.modality);
            };
            let (p, _) = load_run_policy(run_dir, cfg, Some(last))?;
            return Ok((p, "final".into()));
        }
        if final_w.is_file() {
            return Ok((cfg.load_policy(&final_w, None, &device, cfg.seed)?, "final".into()));
        }
        let Some(&last) = checkpoint_steps(run_dir).last() else {
            bail!("{}: run has no final weights ({}) and no checkpoint", run_dir.display(), run_dir::FINAL_WEIGHTS);
        };
        return load_run_policy(run_dir, cfg, Some(last));
    };
    let flat = run_dir.join("checkpoints").join(format!("step_{step}.safetensors"));
    if flat.is_file() {
        return Ok((cfg.load_policy(&flat, None, &device, cfg.seed)?, format!("step_{step}")));
    }
    let dir = run_dir.join("checkpoints").join(format!("step_{step:06}"));
    if !dir.join("state.json").is_file() {
        let have = checkpoint_steps(run_dir);
        bail!("{}: no checkpoint for step {step} (available: {})", run_dir.display(), if have.is_empty() { "none".into() } else { format!("{have:?}") });
    }
    let lora = cfg.train.lora_spec();
    let policy = cfg.load_policy(&train_base(cfg, run_dir)?, lora.as_ref(), &device, cfg.seed)?;
    let file = if dir.join("ema.safetensors").is_file() { dir.join("ema.safetensors") } else { dir.join("trainable.safetensors") };
    let w = crate::weights::tensors::read_tensors(&file, &device)?;
    for (name, v) in policy.trainable() {
        let t = w.get(&name).with_context(|| format!("{}: tensor {name} missing", file.display()))?;
        anyhow::ensure!(t.dims() == v.dims(), "{}: tensor {name} has shape {:?}, expected {:?}", file.display(), t.dims(), v.dims());
        v.set(t)?;
    }
    Ok((policy, format!("step_{step}")))
}

/// Where `vipo eval` writes: DIR/eval/final or DIR/eval/step_N.
pub fn eval_dir(run_dir: &Path, checkpoint: &str) -> PathBuf {
    run_dir.join("eval").join(checkpoint)
}

/// Read a finished evaluation back.
pub fn read_report(path: &Path) -> Result<EvalReport> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not a vipo eval.json", path.display()))
}

/// `vipo eval`: evaluate a run (its saved config, `overrides` applied to `[sample]` only)
/// and write `eval.json` plus one sample grid per split. Returns the output folder.
pub fn eval_run(run_dir: &Path, overrides: &[String], step: Option<usize>, n: Option<usize>, force: bool) -> Result<(PathBuf, EvalReport)> {
    run_dir::require_run_dir(run_dir)?;
    let saved_path = run_dir.join(run_dir::CONFIG_FILE);
    let saved: Config = crate::config::load(Some(&saved_path), &[])?;
    // Overrides apply to the already parsed config (one read of the file, one legacy note).
    let cfg: Config = crate::config::from_toml_str(&crate::config::to_toml(&saved)?, &saved_path.display().to_string(), overrides)?;
    let mut only_sample = cfg.clone();
    only_sample.sample = saved.sample.clone();
    anyhow::ensure!(only_sample == saved, "--set with vipo eval may only change [sample] fields (the run's config is {})", saved_path.display());
    let n = n.unwrap_or(if cfg.train.eval_prompts > 0 { cfg.train.eval_prompts } else { crate::config::DEFAULT_EVAL_PROMPTS });
    let (policy, ck) = load_run_policy(run_dir, &saved, step)?;
    let out = eval_dir(run_dir, &ck);
    if out.join("eval.json").exists() && !force {
        bail!("{}: an evaluation already exists; pass --force to replace it", out.join("eval.json").display());
    }
    std::fs::create_dir_all(&out).with_context(|| format!("{}: cannot create", out.display()))?;
    let (mut rep, grids) = evaluate_policy(policy.as_ref(), &cfg, n)?;
    rep.run = run_dir.display().to_string();
    rep.checkpoint = ck;
    for g in &grids {
        let scores = rep.scores.get(&g.split).and_then(|m| m.get(primary_reward(&cfg)));
        save_grid(g, scores.map(Vec::as_slice), &out.join(format!("grid_{}.png", g.split)))?;
    }
    crate::io::atomic_write(&out.join("eval.json"), serde_json::to_string_pretty(&rep)?.as_bytes())?;
    Ok((out, rep))
}

/// Columns of an image evaluation grid ([`save_grid`]; tiles upscaled by `image::grid_scale`).
pub const GRID_COLS: usize = 8;
/// Samples an evaluation grid shows: 4 rows of images, or 16 clips.
const GRID_IMAGES: usize = 4 * GRID_COLS;
const GRID_CLIPS: usize = 16;

/// The first 32 images (8 per row, small ones 4×: `image::grid_scale`) or the first 16 clips (one frame strip per row, 2×),
/// and beside the PNG its legend: the prompt of each shown sample with its `scores` entry.
pub fn save_grid(g: &SplitSamples, scores: Option<&[f64]>, path: &Path) -> Result<()> {
    let shown = match &g.samples {
        Samples::Images(images) => {
            let big: Vec<Image> = images.iter().take(GRID_IMAGES).map(|im| im.upscale(crate::image::grid_scale(im.w))).collect();
            crate::image::grid(&big, GRID_COLS).save_png(path)?;
            big.len()
        }
        Samples::Clips(clips) => {
            let strips: Vec<Image> = clips.iter().take(GRID_CLIPS).map(|c| crate::image::frame_strip(c).upscale(2)).collect();
            crate::image::grid(&strips, 1).save_png(path)?;
            strips.len()
        }
    };
    let cells: Vec<crate::image::LegendCell> =
        g.prompts.iter().take(shown).enumerate().map(|(i, prompt)| crate::image::LegendCell { prompt: prompt.clone(), score: scores.and_then(|v| v.get(i).copied()), note: String::new() }).collect();
    crate::image::write_legend(path, &cells)
}

/// Print an evaluation as a short table.
pub fn print_report(rep: &EvalReport) {
    println!("{:<24} {:>6} {:>8} {:>18}", "reward", "split", "mean", "95% CI");
    for r in &rep.rows {
        println!("{:<24} {:>6} {:>8.3} {:>8.3} – {:<8.3}", r.reward, r.split, r.mean, r.ci_low, r.ci_high);
    }
    let mut gaps: Vec<_> = rep.ood_gap.iter().collect();
    gaps.sort_by(|a, b| a.0.cmp(b.0));
    for (k, g) in gaps {
        println!("OOD gap ({k}): {g:+.3} (eval − ood)");
    }
}
