//! `vipo pretrain`: rectified-flow pretraining of the embedded policy on rendered
//! ShapeWorld `train` scenes. Loss: ‖v_θ(z_σ, σ, c) − (ε − x₀)‖² with
//! z_σ = (1−σ)x₀ + σε and σ ~ logit-normal(0, 1) (the SD3 recipe). Deterministic for a
//! seed on CPU: every random draw comes from seeded ChaCha streams.

use anyhow::Result;
use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::config::Config;
use crate::image::grid;
use crate::policy::dit::images_to_latents;
use crate::policy::{ImagePolicy, Policy};
use crate::reward::compositional::Compositional;
use crate::train::optim::{ema_init, ema_update, lr_at, AdamW, AdamWConfig};
use crate::train::run;
use crate::world::{self, Split};

/// What a pretraining run produced.
pub struct PretrainOutcome {
    pub run_dir: PathBuf,
    pub weights: PathBuf,
    pub final_loss: f64,
    pub first_loss: f64,
    pub images_per_s: f64,
    /// Compositional score of the base on (eval, ood), when measured.
    pub scores: Option<(f64, f64)>,
}

/// Save the policy's weights, or the EMA copy when one is kept.
fn save_weights(policy: &ImagePolicy, ema: Option<&[Tensor]>, path: &Path) -> Result<()> {
    match ema {
        None => policy.save(path),
        Some(e) => {
            let names = crate::policy::sorted_vars(&policy.base);
            let map: std::collections::HashMap<String, Tensor> = names.into_iter().map(|(k, _)| k).zip(e.iter().cloned()).collect();
            crate::train::checkpoint::save_tensors(&map, path)
        }
    }
}

pub fn pretrain(cfg: &Config, run_dir: &Path) -> Result<PretrainOutcome> {
    let p = &cfg.pretrain;
    anyhow::ensure!(p.steps >= 1, "pretrain.steps: must be ≥ 1");
    anyhow::ensure!(p.batch_size >= 1, "pretrain.batch_size: must be ≥ 1");
    anyhow::ensure!(p.prompt_pool >= 1, "pretrain.prompt_pool: must be ≥ 1");
    anyhow::ensure!(p.lr > 0.0 && p.lr.is_finite(), "pretrain.lr: must be > 0");
    let device = crate::runtime::device()?;
    let policy = ImagePolicy::new(&cfg.model, &device, cfg.seed)?;
    let mut opt = AdamW::new(
        policy.trainable(),
        AdamWConfig { lr: p.lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: p.weight_decay },
    )?;
    anyhow::ensure!((0.0..1.0).contains(&p.ema_decay), "pretrain.ema_decay: must be in [0, 1)");
    let mut ema = ema_init(opt.vars(), p.ema_decay)?;
    let pool = world::prompts(Split::Train, p.prompt_pool, cfg.seed);
    let mut data_rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0xda7a);
    let mut noise_rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x0015e);
    let res = cfg.model.image_size;
    let metrics = run_dir.join(run::METRICS_FILE);
    let bar = crate::cli::progress(p.steps as u64, "pretrain", cfg.progress);
    let started = Instant::now();
    let (mut first_loss, mut last_loss) = (f64::NAN, f64::NAN);
    for step in 0..p.steps {
        let specs: Vec<_> = (0..p.batch_size).map(|_| pool[data_rng.gen_range(0..pool.len())].clone()).collect();
        let images: Vec<_> = specs.iter().map(|s| world::render(&world::sample_scene(s, &mut data_rng), res).image).collect();
        let x0 = images_to_latents(&images, &device)?;
        let eps = crate::sampler::randn(x0.dims(), &mut noise_rng, &device)?;
        let sig: Vec<f32> = (0..p.batch_size)
            .map(|_| {
                let n: f64 = StandardNormal.sample(&mut noise_rng);
                (1.0 / (1.0 + (-n).exp())) as f32
            })
            .collect();
        let sigma = Tensor::from_vec(sig, p.batch_size, &device)?;
        let s4 = sigma.reshape((p.batch_size, 1, 1, 1))?;
        let z = (x0.broadcast_mul(&(1.0 - &s4)?)? + eps.broadcast_mul(&s4)?)?;
        let target = (&eps - &x0)?;
        let cond = policy.condition(&specs)?;
        let v = policy.velocity(&z, &sigma, &cond)?;
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
            let el = started.elapsed().as_secs_f64();
            let ips = ((step + 1) * p.batch_size) as f64 / el;
            bar.set_message(format!("loss {loss_v:.4}"));
            crate::io::append_jsonl(&metrics, &json!({"step": step, "loss": loss_v, "lr": lr, "grad_norm": gn, "images_per_s": ips, "elapsed_s": el}))?;
        }
        if p.checkpoint_every > 0 && (step + 1) % p.checkpoint_every == 0 && step + 1 < p.steps {
            save_weights(&policy, ema.as_deref(), &run_dir.join("checkpoints").join(format!("step_{}.safetensors", step + 1)))?;
        }
    }
    bar.finish_and_clear();
    // From here on the policy holds the EMA weights (what is saved, sampled and scored).
    if let Some(e) = &ema {
        for ((_, v), t) in opt.vars().iter().zip(e) {
            v.set(t)?;
        }
    }
    let train_secs = started.elapsed().as_secs_f64();
    let weights = run_dir.join(run::FINAL_WEIGHTS);
    policy.save(&weights)?;

    // Final sample grid on fixed train prompts and seeds.
    let grid_prompts: Vec<_> = pool.iter().take(p.grid_prompts).cloned().collect();
    if !grid_prompts.is_empty() {
        let imgs = crate::eval::generate(&policy, &grid_prompts, cfg.seed, &cfg.sample)?;
        let big: Vec<_> = imgs.iter().map(|im| im.upscale(4)).collect();
        grid(&big, 8).save_png(&run_dir.join("samples").join("grid.png"))?;
    }
    let scores = if p.eval_prompts > 0 {
        let reward = Compositional::new();
        let mut out = [0.0; 2];
        for (i, split) in [Split::Eval, Split::Ood].into_iter().enumerate() {
            let prompts = world::prompts(split, p.eval_prompts, cfg.seed ^ 0xe7a1);
            let imgs = crate::eval::generate(&policy, &prompts, cfg.seed, &cfg.sample)?;
            out[i] = crate::eval::mean_score(&reward, &imgs, &prompts)?;
        }
        crate::io::atomic_write(
            &run_dir.join("base_scores.json"),
            serde_json::to_string_pretty(&json!({"reward": "compositional", "eval": out[0], "ood": out[1], "n": p.eval_prompts, "sample_steps": cfg.sample.steps}))?.as_bytes(),
        )?;
        Some((out[0], out[1]))
    } else {
        None
    };
    Ok(PretrainOutcome {
        run_dir: run_dir.to_path_buf(),
        weights,
        final_loss: last_loss,
        first_loss,
        images_per_s: (p.steps * p.batch_size) as f64 / train_secs,
        scores,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn tiny_cfg(dir: &Path) -> Config {
        let mut cfg = Config::default();
        cfg.model = crate::policy::dit::tests::tiny();
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
        let a = run::create_run_dir(&dir.path().join("a"), &cfg, false).unwrap();
        let out = pretrain(&cfg, &a).unwrap();
        // Compare early vs late average loss from the metrics log (single steps are noisy).
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(a.join(run::METRICS_FILE)).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert!(lines.len() >= 3);
        assert!(out.final_loss < out.first_loss * 0.8, "loss {} → {}", out.first_loss, out.final_loss);
        assert!(a.join("samples/grid.png").is_file() && a.join("checkpoints/step_15.safetensors").is_file() && a.join("base_scores.json").is_file());
        let b = run::create_run_dir(&dir.path().join("b"), &cfg, false).unwrap();
        let out_b = pretrain(&cfg, &b).unwrap();
        assert_eq!(out.final_loss, out_b.final_loss);
        assert_eq!(std::fs::read(&out.weights).unwrap(), std::fs::read(&out_b.weights).unwrap());
    }

    #[test]
    fn existing_run_dir_is_not_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = tiny_cfg(dir.path());
        let d = dir.path().join("r");
        run::create_run_dir(&d, &cfg, false).unwrap();
        std::fs::write(d.join("keep.txt"), b"x").unwrap();
        let e = run::create_run_dir(&d, &cfg, false).unwrap_err().to_string();
        assert!(e.contains("already exists"), "{e}");
        assert!(d.join("keep.txt").is_file());
    }
}
