//! `vipo pretrain`: rectified-flow pretraining of the embedded policy on rendered
//! ShapeWorld `train` scenes (or, with `modality = "video"`, ShapeWorld-Video clips). Loss: ‖v_θ(z_σ, σ, c) − (ε − x₀)‖² with
//! z_σ = (1−σ)x₀ + σε and σ ~ logit-normal(0, 1) (the SD3 recipe). Deterministic for a
//! seed on CPU: every random draw comes from seeded ChaCha streams.

use anyhow::{Context, Result};
use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::config::Config;
use crate::image::{grid, SampleKind};
use crate::policy::shapeworld::dit::images_to_latents;
use crate::policy::shapeworld::video_dit::{clips_to_latents, VideoPolicy};
use crate::policy::{Condition, FlowModel, ImagePolicy, Policy};
use crate::prompt::Prompt;
use crate::reward::compositional::Compositional;
use crate::run_dir;
use crate::train::optim::{ema_init, ema_update, lr_at, AdamW, AdamWConfig};
use crate::train::rng::RngState;
use crate::world::video::{render_clip, sample_video_scene, video_prompts};
use crate::world::{self, Split};

/// What a pretraining run produced.
pub struct PretrainOutcome {
    pub run_dir: PathBuf,
    pub weights: PathBuf,
    pub final_loss: f64,
    pub first_loss: f64,
    /// Training samples (images or clips) per second.
    pub images_per_s: f64,
    /// The base model's score on (eval, ood) when measured: the compositional reward for
    /// images; for video the mean of the VQ and MQ rewards.
    pub scores: Option<(f64, f64)>,
    /// What `scores` measures.
    pub score_name: String,
}

/// Save the model's weights, or the EMA copy when one is kept.
fn save_weights(vars: &[(String, candle_core::Var)], ema: Option<&[Tensor]>, path: &Path) -> Result<()> {
    let map: std::collections::HashMap<String, Tensor> = match ema {
        None => vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect(),
        Some(e) => vars.iter().map(|(k, _)| k.clone()).zip(e.iter().cloned()).collect(),
    };
    crate::weights::tensors::save_tensors(&map, path)
}

fn validate(p: &crate::config::PretrainConfig) -> Result<()> {
    anyhow::ensure!(p.steps >= 1, "pretrain.steps: must be ≥ 1");
    anyhow::ensure!(p.batch_size >= 1, "pretrain.batch_size: must be ≥ 1");
    anyhow::ensure!(p.prompt_pool >= 1, "pretrain.prompt_pool: must be ≥ 1");
    anyhow::ensure!(p.lr > 0.0 && p.lr.is_finite(), "pretrain.lr: must be > 0");
    anyhow::ensure!((0.0..1.0).contains(&p.ema_decay), "pretrain.ema_decay: must be in [0, 1)");
    anyhow::ensure!((0.0..1.0).contains(&p.cond_dropout), "pretrain.cond_dropout: must be in [0, 1) (got {})", p.cond_dropout);
    anyhow::ensure!(p.sigma_loc.is_finite(), "pretrain.sigma_loc: must be finite");
    anyhow::ensure!(p.sigma_scale > 0.0 && p.sigma_scale.is_finite(), "pretrain.sigma_scale: must be > 0 (got {})", p.sigma_scale);
    Ok(())
}

/// Losses and wall time of the shared loop.
struct LoopOutcome {
    first_loss: f64,
    last_loss: f64,
    secs: f64,
}

impl LoopOutcome {
    fn outcome(&self, run_dir: &Path, weights: PathBuf, p: &crate::config::PretrainConfig, scores: Option<(f64, f64)>, score_name: &str) -> PretrainOutcome {
        PretrainOutcome {
            run_dir: run_dir.to_path_buf(),
            weights,
            final_loss: self.last_loss,
            first_loss: self.first_loss,
            images_per_s: (p.steps * p.batch_size) as f64 / self.secs,
            scores,
            score_name: score_name.into(),
        }
    }
}

/// Classifier-free-guidance training: each row of the condition becomes the model's null
/// condition (for the ShapeWorld policies the empty prompt, all padding) with probability
/// `p`, drawn from the data stream.
fn drop_prompts(model: &dyn FlowModel, cond: Condition, p: f64, rng: &mut ChaCha8Rng) -> Result<Condition> {
    if p <= 0.0 {
        return Ok(cond);
    }
    let b = cond.rows()?;
    let keep: Vec<u8> = (0..b).map(|_| (rng.gen::<f64>() >= p) as u8).collect();
    let null = model.null_condition(&cond)?;
    let pick = |c: &Tensor, n: &Tensor| -> candle_core::Result<Tensor> {
        let mut shape = vec![1usize; c.rank()];
        shape[0] = b;
        Tensor::from_vec(keep.clone(), shape, c.device())?.broadcast_as(c.shape())?.where_cond(c, n)
    };
    let pooled = match (&cond.pooled, &null.pooled) {
        (Some(c), Some(n)) => Some(pick(c, n)?),
        _ => None,
    };
    Ok(Condition { seq: pick(&cond.seq, &null.seq)?, pooled })
}

/// The rectified-flow loop both modalities share: `batch` draws (clean latents x₀, token
/// ids) from the data stream; σ ~ logit-normal and ε come from the noise stream. On return
/// the model holds the EMA weights when an EMA is kept.
fn flow_matching_loop(
    cfg: &Config,
    run_dir: &Path,
    model: &dyn FlowModel,
    data_rng: &mut ChaCha8Rng,
    resume: bool,
    mut batch: impl FnMut(&mut ChaCha8Rng) -> Result<(Tensor, Condition)>,
) -> Result<LoopOutcome> {
    let p = &cfg.pretrain;
    let mut opt = AdamW::new(model.base_vars(), AdamWConfig { lr: p.lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: p.weight_decay })?;
    let mut ema = ema_init(opt.vars(), p.ema_decay)?;
    let mut noise_rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x0015e);
    let metrics = run_dir.join(run_dir::METRICS_FILE);
    let (mut first_loss, mut last_loss) = (f64::NAN, f64::NAN);
    let (mut start, mut elapsed_before) = (0usize, 0f64);
    if resume {
        let st = load_resume(run_dir, &mut opt, ema.as_deref_mut(), data_rng, &mut noise_rng)?;
        (start, elapsed_before, first_loss, last_loss) = (st.step, st.elapsed_s, st.first_loss, st.last_loss);
        // Lines a killed process logged after its last checkpoint are redone, so drop them.
        crate::io::truncate_jsonl_from_step(&metrics, start)?;
        eprintln!("resuming {} from step {start} of {}", run_dir.display(), p.steps);
    }
    let bar = crate::runtime::progress((p.steps - start) as u64, "pretrain", cfg.progress);
    let started = Instant::now();
    for step in start..p.steps {
        let (x0, cond) = batch(data_rng)?;
        let b = x0.dim(0)?;
        let cond = drop_prompts(model, cond, p.cond_dropout, data_rng)?;
        let eps = crate::sampler::randn(x0.dims(), &mut noise_rng, model.device())?;
        let sig: Vec<f32> = (0..b)
            .map(|_| {
                let n: f64 = StandardNormal.sample(&mut noise_rng);
                let n = p.sigma_loc + p.sigma_scale * n;
                (1.0 / (1.0 + (-n).exp())) as f32
            })
            .collect();
        let sigma = Tensor::from_vec(sig, b, model.device())?;
        let mut bshape = vec![1usize; x0.rank()];
        bshape[0] = b;
        let sb = sigma.reshape(bshape)?;
        let z = (x0.broadcast_mul(&(1.0 - &sb)?)? + eps.broadcast_mul(&sb)?)?;
        let target = (&eps - &x0)?;
        let v = model.velocity(&z, &sigma, &cond)?;
        let loss = (v - target)?.sqr()?.mean_all()?;
        let loss_v = loss.to_scalar::<f32>()? as f64;
        anyhow::ensure!(loss_v.is_finite(), "pretraining diverged at step {step} (loss {loss_v}); lower pretrain.lr");
        let grads = loss.backward()?;
        let g = opt.collect_grads(&grads)?;
        let mut lr = lr_at(step, p.lr, p.warmup_steps);
        if p.cosine && step >= p.warmup_steps {
            let t = (step - p.warmup_steps) as f64 / (p.steps - p.warmup_steps).max(1) as f64;
            lr = p.lr * 0.5 * (1.0 + (std::f64::consts::PI * t).cos());
        }
        let gn = opt.apply(&g, lr, p.grad_clip)?;
        if let Some(e) = &mut ema {
            ema_update(e, opt.vars(), p.ema_decay)?;
        }
        if step == 0 {
            first_loss = loss_v;
        }
        last_loss = loss_v;
        bar.inc(1);
        if step % p.log_every.max(1) == 0 || step + 1 == p.steps {
            let el = elapsed_before + started.elapsed().as_secs_f64();
            let ips = ((step + 1) * b) as f64 / el;
            bar.set_message(format!("loss {loss_v:.4}"));
            crate::io::append_jsonl(&metrics, &json!({"step": step, "loss": loss_v, "lr": lr, "grad_norm": gn, "images_per_s": ips, "elapsed_s": el}))?;
        }
        if p.checkpoint_every > 0 && (step + 1) % p.checkpoint_every == 0 && step + 1 < p.steps {
            save_weights(opt.vars(), ema.as_deref(), &run_dir.join("checkpoints").join(format!("step_{}.safetensors", step + 1)))?;
            let st = ResumeState {
                step: step + 1,
                first_loss,
                last_loss,
                elapsed_s: elapsed_before + started.elapsed().as_secs_f64(),
                rng_data: RngState::of(data_rng),
                rng_noise: RngState::of(&noise_rng),
            };
            save_resume(run_dir, &opt, ema.as_deref(), &st)?;
        }
    }
    bar.finish_and_clear();
    // From here on the model holds the EMA weights (what is saved, sampled and scored).
    if let Some(e) = &ema {
        for ((_, v), t) in opt.vars().iter().zip(e) {
            v.set(t)?;
        }
    }
    Ok(LoopOutcome { first_loss, last_loss, secs: elapsed_before + started.elapsed().as_secs_f64() })
}

/// What a pretraining checkpoint needs beyond tensors to continue exactly (`vipo pretrain
/// --resume`): the step, both RNG streams' positions and the bookkeeping of the log.
#[derive(serde::Serialize, serde::Deserialize)]
struct ResumeState {
    step: usize,
    first_loss: f64,
    last_loss: f64,
    elapsed_s: f64,
    rng_data: RngState,
    rng_noise: RngState,
}

/// `checkpoints/resume/`: the raw (non-EMA) weights `w.NAME`, the EMA `ema.NAME`, AdamW's
/// moments `m.NAME`/`v.NAME` in `state.safetensors`, then `state.json` (written last, so a
/// half-written checkpoint is never taken for a complete one). Only the latest is kept: it
/// is 4× the model, and the per-step EMA weights stay in `checkpoints/step_N.safetensors`.
fn save_resume(run_dir: &Path, opt: &AdamW, ema: Option<&[Tensor]>, st: &ResumeState) -> Result<()> {
    let dir = run_dir.join("checkpoints").join("resume");
    std::fs::create_dir_all(&dir)?;
    let _ = std::fs::remove_file(dir.join("state.json"));
    let mut t = opt.state_tensors();
    for (i, (name, v)) in opt.vars().iter().enumerate() {
        t.insert(format!("w.{name}"), v.as_tensor().clone());
        if let Some(e) = ema {
            t.insert(format!("ema.{name}"), e[i].clone());
        }
    }
    crate::weights::tensors::save_tensors(&t, &dir.join("state.safetensors"))?;
    crate::io::atomic_write(&dir.join("state.json"), serde_json::to_string_pretty(&st)?.as_bytes())
}

fn load_resume(run_dir: &Path, opt: &mut AdamW, ema: Option<&mut [Tensor]>, data_rng: &mut ChaCha8Rng, noise_rng: &mut ChaCha8Rng) -> Result<ResumeState> {
    use anyhow::Context;
    let dir = run_dir.join("checkpoints").join("resume");
    let json = dir.join("state.json");
    let text = std::fs::read_to_string(&json).with_context(|| format!("{}: no complete pretraining checkpoint to resume from (pretrain.checkpoint_every > 0 writes one)", run_dir.display()))?;
    let st: ResumeState = serde_json::from_str(&text).with_context(|| format!("{}: corrupted checkpoint state", json.display()))?;
    let file = dir.join("state.safetensors");
    let origin = file.display().to_string();
    let device = opt.vars().first().map(|(_, v)| v.device().clone()).unwrap_or(candle_core::Device::Cpu);
    let t = crate::weights::tensors::read_tensors(&file, &device)?;
    for (name, v) in opt.vars() {
        let w = t.get(&format!("w.{name}")).with_context(|| format!("{origin}: tensor w.{name} missing (does the checkpoint match this model config?)"))?;
        anyhow::ensure!(w.dims() == v.dims(), "{origin}: tensor w.{name} has shape {:?}, the model config expects {:?}", w.dims(), v.dims());
    }
    if let Some(e) = ema {
        for (slot, (name, _)) in e.iter_mut().zip(opt.vars()) {
            *slot = t.get(&format!("ema.{name}")).with_context(|| format!("{origin}: tensor ema.{name} missing (was pretrain.ema_decay changed?)"))?.clone();
        }
    }
    for (name, v) in opt.vars() {
        v.set(&t[&format!("w.{name}")])?;
    }
    opt.load_state(&t, st.step, &origin)?;
    *data_rng = st.rng_data.restore()?;
    *noise_rng = st.rng_noise.restore()?;
    Ok(st)
}

/// Every check `vipo pretrain` makes before any work (call it before creating the run
/// directory): the pretraining, sampling and model settings of the configured modality.
pub fn validate_config(cfg: &Config) -> Result<()> {
    validate(&cfg.pretrain)?;
    cfg.sample.validate()?; // the grid and base scores at the end sample with it
    let g = cfg.generator();
    anyhow::ensure!(!g.is_real(), "modality = \"{}\": vipo post-trains a pretrained real generator; there is nothing to pretrain", cfg.modality);
    g.validate()
}

/// `vipo pretrain` for the configured modality.
pub fn pretrain(cfg: &Config, run_dir: &Path) -> Result<PretrainOutcome> {
    pretrain_from(cfg, run_dir, false)
}

/// `vipo pretrain`, fresh or (`resume`) continued from the run's latest checkpoint: the
/// result is bit-identical to an uninterrupted run (tested).
pub fn pretrain_from(cfg: &Config, run_dir: &Path, resume: bool) -> Result<PretrainOutcome> {
    validate_config(cfg)?;
    let _lock = crate::io::DirLock::acquire(run_dir)?;
    match cfg.sample_kind() {
        SampleKind::Images => pretrain_image(cfg, run_dir, resume),
        SampleKind::Clips => pretrain_video(cfg, run_dir, resume),
    }
}

/// The image policy pretraining starts from: the seeded init, with the position table
/// set as `pretrain.pos_init` says.
fn fresh_image_policy(cfg: &Config, device: &candle_core::Device) -> Result<ImagePolicy> {
    let policy = ImagePolicy::new(&cfg.model, device, cfg.seed)?;
    if cfg.pretrain.pos_init == crate::config::PosInit::Sincos {
        policy.init_positions_sincos()?;
    }
    Ok(policy)
}

fn pretrain_image(cfg: &Config, run_dir: &Path, resume: bool) -> Result<PretrainOutcome> {
    let p = &cfg.pretrain;
    let device = crate::runtime::device()?;
    let policy = fresh_image_policy(cfg, &device)?;
    let pool = world::prompts(Split::Train, p.prompt_pool, cfg.seed);
    let mut data_rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0xda7a);
    let res = cfg.model.image_size;
    let lo = flow_matching_loop(cfg, run_dir, &policy, &mut data_rng, resume, |rng| {
        let specs: Vec<_> = (0..p.batch_size).map(|_| pool[rng.gen_range(0..pool.len())].clone()).collect();
        let images: Vec<_> = specs.iter().map(|s| world::render(&world::sample_scene(s, rng), res).image).collect();
        Ok((images_to_latents(&images, &device)?, policy.encode(&specs.iter().map(Prompt::image).collect::<Vec<_>>())?))
    })?;
    let weights = run_dir.join(run_dir::FINAL_WEIGHTS);
    policy.save(&weights)?;

    // Final sample grid on fixed train prompts and seeds.
    let grid_prompts: Vec<_> = pool.iter().take(p.grid_prompts).cloned().collect();
    if !grid_prompts.is_empty() {
        let imgs = crate::generate::generate_images(&policy, &grid_prompts, cfg.seed, &cfg.sample)?;
        let big: Vec<_> = imgs.iter().map(|im| im.upscale(4)).collect();
        grid(&big, 8).save_png(&run_dir.join("samples").join("grid.png"))?;
    }
    let scores = if p.eval_prompts > 0 {
        let reward = Compositional::new();
        let mut out = [0.0; 2];
        for (i, split) in [Split::Eval, Split::Ood].into_iter().enumerate() {
            let prompts = world::prompts(split, p.eval_prompts, cfg.seed ^ 0xe7a1);
            let imgs = crate::generate::generate_images(&policy, &prompts, cfg.seed, &cfg.sample)?;
            out[i] = crate::generate::mean_score(&reward, &imgs, &prompts)?;
        }
        crate::io::atomic_write(
            &run_dir.join("base_scores.json"),
            serde_json::to_string_pretty(&json!({"reward": "compositional", "eval": out[0], "ood": out[1], "n": p.eval_prompts, "sample_steps": cfg.sample.steps}))?.as_bytes(),
        )?;
        Some((out[0], out[1]))
    } else {
        None
    };
    Ok(lo.outcome(run_dir, weights, p, scores, "compositional"))
}

fn pretrain_video(cfg: &Config, run_dir: &Path, resume: bool) -> Result<PretrainOutcome> {
    let p = &cfg.pretrain;
    let vm = &cfg.video_model;
    crate::world::video::check_clip_dims(vm.frames, vm.image_size)?;
    let device = crate::runtime::device()?;
    let policy = VideoPolicy::new(vm, &device, cfg.seed)?;
    let pool = video_prompts(Split::Train, p.prompt_pool, cfg.seed);
    let mut data_rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0xda7a);
    let lo = flow_matching_loop(cfg, run_dir, &policy, &mut data_rng, resume, |rng| {
        let specs: Vec<_> = (0..p.batch_size).map(|_| pool[rng.gen_range(0..pool.len())].clone()).collect();
        let mut clips = Vec::with_capacity(specs.len());
        for s in &specs {
            clips.push(render_clip(&sample_video_scene(s, vm.frames, rng)?, vm.frames, vm.image_size)?.frames);
        }
        Ok((clips_to_latents(&clips, &device)?, policy.encode(&specs.iter().map(Prompt::video).collect::<Vec<_>>())?))
    })?;
    let weights = run_dir.join(run_dir::FINAL_WEIGHTS);
    policy.save(&weights)?;
    let grid_prompts: Vec<_> = pool.iter().take(p.grid_prompts).cloned().collect();
    if !grid_prompts.is_empty() {
        let clips = crate::generate::generate_clips(&policy, &grid_prompts, cfg.seed, &cfg.sample)?;
        let strips: Vec<_> = clips.iter().map(|c| crate::image::frame_strip(c).upscale(2)).collect();
        grid(&strips, 1).save_png(&run_dir.join("samples").join("grid.png"))?;
        let listing: Vec<_> = grid_prompts.iter().map(|s| s.text()).collect();
        crate::io::atomic_write(&run_dir.join("samples").join("grid_prompts.json"), serde_json::to_string_pretty(&listing)?.as_bytes())?;
    }
    let scores = if p.eval_prompts > 0 {
        let rewards = [crate::reward::build("video_quality")?, crate::reward::build("motion_quality")?];
        let mut table = serde_json::Map::new();
        let mut both = [0.0; 2];
        for (i, split) in [Split::Eval, Split::Ood].into_iter().enumerate() {
            let specs = video_prompts(split, p.eval_prompts, cfg.seed ^ 0xe7a1);
            let clips = crate::generate::generate_clips(&policy, &specs, cfg.seed, &cfg.sample)?;
            for r in &rewards {
                let s = r.score(&crate::image::Samples::Clips(clips.clone()), &specs.iter().map(Prompt::video).collect::<Vec<_>>())?;
                let m = s.iter().map(|&v| v as f64).sum::<f64>() / s.len() as f64;
                table.entry(r.info().name).or_insert_with(|| json!({}))[split.name()] = json!(m);
                both[i] += m / rewards.len() as f64;
            }
        }
        crate::io::atomic_write(&run_dir.join("base_scores.json"), serde_json::to_string_pretty(&json!({"rewards": table, "n": p.eval_prompts, "sample_steps": cfg.sample.steps}))?.as_bytes())?;
        Some((both[0], both[1]))
    } else {
        None
    };
    Ok(lo.outcome(run_dir, weights, p, scores, "mean of video_quality and motion_quality"))
}

/// Resolve the base for `train.base = ""`: the shipped base when it fits (unless `fresh`),
/// else the cached base for this config (pretrained on first use, or again when `fresh`).
pub fn default_base(cfg: &Config, fresh: bool) -> Result<PathBuf> {
    if !fresh {
        if let Some(p) = crate::base::shipped_in(&crate::base::shipped_dir(), cfg)? {
            eprintln!("using the shipped base model {}", p.display());
            return Ok(p);
        }
    }
    cached_base(cfg, fresh)
}

/// The base model for `cfg` (keyed by a hash of the model + pretrain config and seed):
/// pretrained once, then reused unless `fresh`.
fn cached_base(cfg: &Config, fresh: bool) -> Result<PathBuf> {
    let weights = crate::base::cached_base_path(cfg);
    let dir = weights.parent().expect("cache path has a parent").to_path_buf();
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("base").to_string();
    if weights.is_file() && !fresh {
        eprintln!("using cached base model {}", weights.display());
        return Ok(weights);
    }
    eprintln!("pretraining the base model into {} (cached for later runs)", dir.display());
    // Pretrain into a temp dir, then rename, so an interrupted pretraining never leaves a
    // half-trained model where the cache expects a finished one.
    let tmp = crate::runtime::cache_dir().join(format!(".tmp-{name}"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("{}: cannot clear", tmp.display()))?;
    }
    crate::run_dir::create_run_dir(&tmp, cfg, false)?;
    let out = pretrain(cfg, &tmp)?;
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

    pub(crate) fn tiny_cfg(dir: &Path) -> Config {
        let mut cfg = Config::default();
        cfg.model = crate::policy::shapeworld::dit::tests::tiny();
        cfg.out_dir = dir.to_path_buf();
        cfg.progress = false;
        cfg.pretrain.steps = 30;
        cfg.pretrain.batch_size = 8;
        cfg.pretrain.lr = 2e-3;
        cfg.pretrain.warmup_steps = 0;
        cfg.pretrain.checkpoint_every = 15;
        cfg.pretrain.grid_prompts = 4;
        cfg.pretrain.eval_prompts = 4;
        cfg.sample.steps = 4;
        cfg
    }

    #[test]
    fn short_pretraining_lowers_the_loss_and_is_deterministic() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = tiny_cfg(dir.path());
        let a = run_dir::create_run_dir(&dir.path().join("a"), &cfg, false).unwrap();
        let out = pretrain(&cfg, &a).unwrap();
        // Compare early vs late average loss from the metrics log (single steps are noisy).
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(a.join(run_dir::METRICS_FILE)).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert!(lines.len() >= 3);
        assert!(out.final_loss < out.first_loss * 0.8, "loss {} → {}", out.first_loss, out.final_loss);
        assert!(a.join("samples/grid.png").is_file() && a.join("checkpoints/step_15.safetensors").is_file() && a.join("base_scores.json").is_file());
        let b = run_dir::create_run_dir(&dir.path().join("b"), &cfg, false).unwrap();
        let out_b = pretrain(&cfg, &b).unwrap();
        assert_eq!(out.final_loss, out_b.final_loss);
        assert_eq!(std::fs::read(&out.weights).unwrap(), std::fs::read(&out_b.weights).unwrap());
    }

    /// `pretrain.pos_init`: "sincos" starts the position table at DiT's 2-D sin-cos values
    /// (then trains it), "randn" keeps the seeded N(0, 0.02²) draw; every other weight starts
    /// identical, so the seeded init of the rest is unchanged.
    #[test]
    fn position_table_init_follows_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = tiny_cfg(dir.path());
        let mut init = |pos_init| {
            cfg.pretrain.pos_init = pos_init;
            let p = fresh_image_policy(&cfg, &candle_core::Device::Cpu).unwrap();
            crate::weights::tensors::sorted_vars(&p.base).into_iter().map(|(k, v)| (k, v.as_tensor().clone())).collect::<std::collections::HashMap<_, _>>()
        };
        let (s, r) = (init(crate::config::PosInit::Sincos), init(crate::config::PosInit::Randn));
        let grid = cfg.model.grid();
        let want = crate::policy::shapeworld::dit::sincos_2d(grid, cfg.model.dim);
        assert_eq!(s["pos_embed"].flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
        let rv = r["pos_embed"].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(rv.iter().all(|v| v.abs() < 0.2) && rv.iter().any(|v| *v != 0.0), "randn table");
        for (name, t) in &s {
            if name != "pos_embed" {
                assert_eq!(t.flatten_all().unwrap().to_vec1::<f32>().unwrap(), r[name].flatten_all().unwrap().to_vec1::<f32>().unwrap(), "{name}");
            }
        }
    }

    /// A pretraining run continued from its checkpoint (what `vipo pretrain --resume` does
    /// after a process ended mid-run) ends with byte-identical weights and the same log.
    #[test]
    fn resumed_pretraining_is_bit_identical() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = tiny_cfg(dir.path());
        let a = run_dir::create_run_dir(&dir.path().join("a"), &cfg, false).unwrap();
        let out = pretrain(&cfg, &a).unwrap();
        // "Kill" a copy after its step-15 checkpoint: drop everything written later, and
        // leave a stray log line from past the checkpoint, as a killed process would.
        let b = dir.path().join("b");
        std::fs::create_dir_all(b.join("checkpoints")).unwrap();
        std::fs::copy(a.join(run_dir::CONFIG_FILE), b.join(run_dir::CONFIG_FILE)).unwrap();
        let resume = a.join("checkpoints/resume");
        std::fs::create_dir_all(b.join("checkpoints/resume")).unwrap();
        for f in ["state.json", "state.safetensors"] {
            std::fs::copy(resume.join(f), b.join("checkpoints/resume").join(f)).unwrap();
        }
        let log = std::fs::read_to_string(a.join(run_dir::METRICS_FILE)).unwrap();
        let early: Vec<&str> = log.lines().filter(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap() < 20).collect();
        std::fs::write(b.join(run_dir::METRICS_FILE), early.join("\n") + "\n").unwrap();
        let out_b = pretrain_from(&cfg, &b, true).unwrap();
        assert_eq!(std::fs::read(&out.weights).unwrap(), std::fs::read(&out_b.weights).unwrap(), "resumed weights differ");
        assert_eq!(out.final_loss, out_b.final_loss);
        assert_eq!(out.first_loss, out_b.first_loss);
        let steps = |d: &Path| -> Vec<(u64, String)> {
            std::fs::read_to_string(d.join(run_dir::METRICS_FILE))
                .unwrap()
                .lines()
                .map(|l| {
                    let v: serde_json::Value = serde_json::from_str(l).unwrap();
                    (v["step"].as_u64().unwrap(), v["loss"].to_string())
                })
                .collect()
        };
        assert_eq!(steps(&a), steps(&b), "the log must hold each step once, with the same losses");
        // No checkpoint to resume from is a clear error.
        let c = run_dir::create_run_dir(&dir.path().join("c"), &cfg, false).unwrap();
        let e = pretrain_from(&cfg, &c, true).err().unwrap().to_string();
        assert!(e.contains("no complete pretraining checkpoint"), "{e}");
    }

    /// The video path: the loss falls, the run is deterministic, and the base gets a
    /// frame-strip grid and VQ/MQ scores on eval/ood video prompts.
    #[test]
    fn short_video_pretraining_lowers_the_loss_and_scores_the_base() {
        use crate::policy::shapeworld::video_dit::{VideoAttention, VideoDitConfig};
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = tiny_cfg(dir.path());
        cfg.modality = crate::config::Modality::Video;
        cfg.video_model = VideoDitConfig {
            image_size: 16,
            frames: 4,
            patch: 4,
            t_patch: 2,
            dim: 32,
            depth: 2,
            heads: 2,
            mlp_ratio: 2,
            text_layers: 1,
            attention: VideoAttention::Factorised,
            fused: true,
            ..Default::default()
        };
        cfg.pretrain.steps = 20;
        cfg.pretrain.batch_size = 4;
        cfg.pretrain.checkpoint_every = 10;
        cfg.pretrain.grid_prompts = 2;
        cfg.pretrain.eval_prompts = 2;
        cfg.sample.steps = 3;
        let a = run_dir::create_run_dir(&dir.path().join("a"), &cfg, false).unwrap();
        let out = pretrain(&cfg, &a).unwrap();
        assert!(out.final_loss < out.first_loss * 0.8, "loss {} → {}", out.first_loss, out.final_loss);
        let (e, o) = out.scores.unwrap();
        assert!((0.0..=1.0).contains(&e) && (0.0..=1.0).contains(&o));
        let scores: serde_json::Value = serde_json::from_slice(&std::fs::read(a.join("base_scores.json")).unwrap()).unwrap();
        for r in ["video_quality", "motion_quality"] {
            for s in ["eval", "ood"] {
                assert!(scores["rewards"][r][s].is_number(), "{r}/{s} missing: {scores}");
            }
        }
        let grid = image::open(a.join("samples/grid.png")).unwrap();
        assert_eq!((grid.width(), grid.height()), (2 + 4 * 16 * 2, 3 + 2 * 16 * 2), "one row per prompt, its 4 frames side by side at 2x");
        assert!(a.join("checkpoints/step_10.safetensors").is_file());
        let b = run_dir::create_run_dir(&dir.path().join("b"), &cfg, false).unwrap();
        assert_eq!(std::fs::read(&out.weights).unwrap(), std::fs::read(pretrain(&cfg, &b).unwrap().weights).unwrap());
        // The weights load back into a video policy.
        let p = VideoPolicy::load(&cfg.video_model, &out.weights, None, &candle_core::Device::Cpu, 0).unwrap();
        assert_eq!(p.latent_shape(), vec![3, 4, 16, 16]);
    }

    /// Prompt dropout blanks whole rows (all padding) at about the asked rate, leaves the
    /// other rows untouched, and is a no-op at p = 0 (drawing no randomness).
    #[test]
    fn prompt_dropout_blanks_whole_rows() {
        let texts: Vec<String> = crate::world::prompts(crate::world::Split::Train, 400, 2).iter().map(|p| p.text()).collect();
        let ids = crate::policy::shapeworld::dit::tokens_for(&texts, &candle_core::Device::Cpu).unwrap();
        let cond = Condition::tokens(ids.clone());
        let model = ImagePolicy::new(&crate::policy::shapeworld::dit::tests::tiny(), &candle_core::Device::Cpu, 0).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let before = rng.clone();
        assert_eq!(drop_prompts(&model, cond.clone(), 0.0, &mut rng).unwrap().seq.to_vec2::<u32>().unwrap(), ids.to_vec2::<u32>().unwrap());
        assert_eq!(rng, before);
        let out = drop_prompts(&model, cond, 0.25, &mut rng).unwrap().seq.to_vec2::<u32>().unwrap();
        let orig = ids.to_vec2::<u32>().unwrap();
        let mut blank = 0;
        for (o, i) in out.iter().zip(&orig) {
            if o.iter().all(|&t| t == 0) {
                blank += 1;
            } else {
                assert_eq!(o, i, "a kept row must be unchanged");
            }
        }
        assert!((70..=130).contains(&blank), "{blank} of 400 rows blanked at p = 0.25");
    }

    #[test]
    fn existing_run_dir_is_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = tiny_cfg(dir.path());
        let d = dir.path().join("r");
        run_dir::create_run_dir(&d, &cfg, false).unwrap();
        std::fs::write(d.join("keep.txt"), b"x").unwrap();
        let e = run_dir::create_run_dir(&d, &cfg, false).unwrap_err().to_string();
        assert!(e.contains("already exists"), "{e}");
        assert!(d.join("keep.txt").is_file());
    }
}
