//! `vipo train`: GRPO and ViPO post-training, readable top to bottom like cleanRL.
//!
//! One step = rollout (SDE sampling with dense log-probs) → decode → rewards (and, for
//! ViPO, allocation maps) → group advantages → clipped-surrogate updates on a random
//! `timestep_fraction` of each sample's trainable transitions → metrics/checkpoints.

use anyhow::{bail, Context, Result};
use candle_core::{Tensor, Var};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::advantage::group_advantages;
use crate::advantage::{map_times_reward_advantages, pixel_advantages};
use crate::config::{Algo, ClipMode, Config, MapTimes, RatioMode, SdeChoice};
use crate::objective::{clipped_surrogate, clipped_surrogate_sample_trust, kl_penalty};
use crate::policy::nn::layers::LoraSpec;
use crate::policy::{guided_velocity, guided_velocity_base, guided_velocity_frozen, Condition, Policy};
use crate::run_dir;
use crate::sampler::{self, LogProbReduction, SdeKind, Trajectory};
use crate::train::optim::{ema_init, ema_update, lr_at, AdamW, AdamWConfig};
use crate::train::rng::RngState;
use crate::train::task::{self, Task};
use crate::weights::tensors::{read_tensors, save_tensors};

/// Everything besides tensors that a checkpoint must restore.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct TrainState {
    step: usize,
    opt_step: usize,
    cursor: usize,
    order: Vec<usize>,
    rng_prompts: RngState,
    rng_noise: RngState,
    rng_timesteps: RngState,
}

/// One step's metrics (a line of metrics.jsonl).
#[derive(Clone, Debug, Default, Serialize)]
pub struct StepMetrics {
    pub step: usize,
    pub reward_mean: f64,
    pub reward_std: f64,
    pub rewards: HashMap<String, f64>,
    pub adv_zero_groups: usize,
    pub ratio_mean: f64,
    pub ratio_dev_first: f64,
    pub clip_frac: f64,
    pub grad_norm: f64,
    pub loss: f64,
    pub kl: f64,
    pub lr: f64,
    pub time_sample_s: f64,
    pub time_reward_s: f64,
    pub time_map_s: f64,
    pub time_update_s: f64,
    pub map_fallbacks: usize,
    pub map_object_mass: f64,
    pub object_area_frac: f64,
    /// Resident memory at the end of the step (MiB); the per-run peak is the max over steps.
    pub rss_mb: f64,
}

pub struct Trainer {
    pub cfg: Config,
    pub run_dir: PathBuf,
    /// The image or video policy being trained (LoRA adapters or every weight).
    pub policy: Box<dyn Policy>,
    /// The KL reference: None without KL; for LoRA runs the policy itself with its adapters
    /// off ([`KlReference::AdaptersOff`]), else a copy of the starting weights.
    kl_ref: Option<KlReference>,
    opt: AdamW,
    ema: Option<Vec<Tensor>>,
    /// Prompts, rewards, maps, grids and evaluation of the modality (`task.rs`).
    task: Box<dyn Task>,
    state: TrainState,
    rng_prompts: ChaCha8Rng,
    rng_noise: ChaCha8Rng,
    rng_timesteps: ChaCha8Rng,
    sigmas: Vec<f64>,
    /// This process's lock on `run_dir`: taken before a resume reads and rewrites the run,
    /// or when training starts; held while the trainer lives.
    lock: Option<crate::io::DirLock>,
}

/// Where the KL penalty's reference velocity comes from.
enum KlReference {
    /// The trained policy's base network with the LoRA adapters switched off: the base
    /// weights never change in a LoRA run, so this is the starting policy, without a
    /// second copy of the model in memory.
    AdaptersOff,
    /// Full fine-tuning changes the base weights: a copy of the starting policy.
    Copy(Box<dyn Policy>),
}

/// Resolve `train.base` ("" = the shipped base when it fits, else the cached base,
/// pretrained on a miss).
pub fn base_weights(cfg: &Config) -> Result<PathBuf> {
    crate::base::resolve(cfg, |c| crate::train::pretrain::default_base(c, false))
}

impl Trainer {
    /// Build a trainer for a fresh run in `run_dir` (already created), or restore the
    /// latest checkpoint of `run_dir` when `resume` is true.
    pub fn new(cfg: &Config, run_dir: &Path, resume: bool) -> Result<Self> {
        cfg.train.validate()?;
        cfg.sample.validate()?;
        let device = crate::runtime::device()?;
        // The task (prompts, rewards, maps) is checked before any weights are loaded.
        let task = task::build(cfg)?;
        let base = base_weights(cfg)?;
        let load = |lora: Option<&LoraSpec>| cfg.load_policy(&base, lora, &device, cfg.seed);
        let policy = load(cfg.train.lora_spec().as_ref())?;
        // Full fine-tuning's KL reference is a second copy of the start.
        let kl_copy = if cfg.train.kl_beta > 0.0 && policy.lora_map().is_none() { Some(load(None)?) } else { None };
        Self::assemble(cfg, run_dir, resume, task, policy, kl_copy)
    }

    /// [`Trainer::new`] for a policy built by the caller (`vipo bench gen-step` builds
    /// real generators' transformers on random weights); `kl_copy`: the frozen start a
    /// full fine-tuning run with `kl_beta > 0` measures its KL against.
    pub fn with_policy(cfg: &Config, run_dir: &Path, resume: bool, policy: Box<dyn Policy>, kl_copy: Option<Box<dyn Policy>>) -> Result<Self> {
        cfg.train.validate()?;
        cfg.sample.validate()?;
        let task = task::build(cfg)?;
        Self::assemble(cfg, run_dir, resume, task, policy, kl_copy)
    }

    fn assemble(cfg: &Config, run_dir: &Path, resume: bool, task: Box<dyn Task>, policy: Box<dyn Policy>, kl_copy: Option<Box<dyn Policy>>) -> Result<Self> {
        let t = &cfg.train;
        // Every prompt through the policy's text side before any work (a word outside the
        // ShapeWorld vocabulary, a prompt too long for the tokenizer).
        policy.encode(task.pool()).with_context(|| if t.prompt_file.is_empty() { "the train prompts".to_string() } else { format!("train.prompt_file {}", t.prompt_file) })?;
        for (split, prompts) in task.held_out() {
            policy.encode(prompts).with_context(|| format!("held-out split {split:?}"))?;
        }
        let kl_ref = match (t.kl_beta > 0.0, policy.lora_map().is_some(), kl_copy) {
            (false, _, _) => None,
            (true, true, _) => Some(KlReference::AdaptersOff),
            (true, false, Some(copy)) => Some(KlReference::Copy(copy)),
            (true, false, None) => bail!("train.kl_beta = {}: full fine-tuning needs a copy of the starting policy as its KL reference", t.kl_beta),
        };
        let opt = AdamW::new(policy.trainable(), AdamWConfig { lr: t.lr, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: t.weight_decay })?;
        let ema = ema_init(&policy.trainable(), t.ema_decay)?;
        let mut rng_prompts = ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x9701);
        let mut order: Vec<usize> = (0..task.pool().len()).collect();
        order.shuffle(&mut rng_prompts);
        let state = TrainState {
            step: 0,
            opt_step: 0,
            cursor: 0,
            order,
            rng_prompts: RngState::of(&rng_prompts),
            rng_noise: RngState::of(&ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x401e)),
            rng_timesteps: RngState::of(&ChaCha8Rng::seed_from_u64(cfg.seed ^ 0x7157)),
        };
        let mut tr = Self {
            cfg: cfg.clone(),
            run_dir: run_dir.to_path_buf(),
            kl_ref,
            opt,
            ema,
            task,
            rng_prompts: state.rng_prompts.restore()?,
            rng_noise: state.rng_noise.restore()?,
            rng_timesteps: state.rng_timesteps.restore()?,
            state,
            sigmas: sampler::sigmas(t.sample_steps, t.shift),
            policy,
            lock: None,
        };
        if resume {
            tr.lock = Some(crate::io::DirLock::acquire(run_dir)?);
            tr.restore_latest()?;
        }
        Ok(tr)
    }

    fn sde(&self) -> SdeKind {
        match self.cfg.train.sde {
            SdeChoice::Dance => SdeKind::Dance { eta: self.cfg.train.eta },
            SdeChoice::Flow => SdeKind::Flow { a: self.cfg.train.flow_a },
        }
    }

    pub fn step(&self) -> usize {
        self.state.step
    }

    /// Next `prompts_per_step` pool indices from the shuffled pool (reshuffled each epoch).
    fn next_prompts(&mut self) -> Vec<usize> {
        let mut out = Vec::new();
        for _ in 0..self.cfg.train.prompts_per_step {
            if self.state.cursor >= self.state.order.len() {
                self.state.order.shuffle(&mut self.rng_prompts);
                self.state.cursor = 0;
            }
            out.push(self.state.order[self.state.cursor]);
            self.state.cursor += 1;
        }
        out
    }

    /// Roll out the current policy for pool prompts `specs` (one entry per sample).
    fn rollout(&mut self, specs: &[usize]) -> Result<(Trajectory, Condition)> {
        let t = &self.cfg.train;
        let shape = self.policy.latent_shape();
        let z0 = sampler::group_noise(t.prompts_per_step, t.group_size, &shape, t.shared_group_noise, &mut self.rng_noise, self.policy.device())?;
        let cond = self.policy.encode(&task::prompts_at(self.task.as_ref(), specs))?;
        let n = specs.len();
        let policy = &self.policy;
        let kind = self.sde();
        let w = self.cfg.sample.guidance;
        let traj = sampler::sample_mixed(
            |z, s| {
                let sig = Tensor::full(s as f32, n, z.device())?;
                Ok(guided_velocity_frozen(policy.as_ref(), z, &sig, &cond, w)?)
            },
            z0,
            &self.sigmas,
            kind,
            t.stochastic_transitions(),
            &mut self.rng_noise,
            LogProbReduction::Dense,
        )?;
        Ok((traj, cond))
    }

    /// Run steps until `train.steps`, checkpointing as configured.
    pub fn train(&mut self) -> Result<Vec<StepMetrics>> {
        if self.lock.is_none() {
            self.lock = Some(crate::io::DirLock::acquire(&self.run_dir)?);
        }
        let total = self.cfg.train.steps;
        let bar = crate::runtime::progress(total as u64, &crate::config::spelling(&self.cfg.train.algo), self.cfg.progress);
        bar.set_position(self.state.step as u64);
        let mut all = Vec::new();
        if self.state.step == 0 && self.cfg.train.grid_every > 0 {
            self.write_grid(0)?;
        }
        let base_scores = if self.state.step == 0 { self.evaluate()? } else { None };
        while self.state.step < total {
            let m = self.train_step()?;
            bar.inc(1);
            bar.set_message(format!("reward {:.3}", m.reward_mean));
            crate::io::append_jsonl(&self.run_dir.join(run_dir::METRICS_FILE), &serde_json::to_value(&m)?)?;
            let s = self.state.step;
            let ce = self.cfg.train.checkpoint_every;
            if s == total || (ce > 0 && s.is_multiple_of(ce)) {
                self.save_checkpoint()?;
            }
            let ge = self.cfg.train.grid_every;
            if ge > 0 && (s.is_multiple_of(ge) || s == total) {
                self.write_grid(s)?;
            }
            all.push(m);
        }
        bar.finish_and_clear();
        self.export_final()?;
        if let Some(fin) = self.evaluate()? {
            // Keep the base scores of the first run when a run was resumed.
            let path = self.run_dir.join("eval.json");
            let base = match base_scores {
                Some((_, b)) => serde_json::to_value(b)?,
                None => std::fs::read_to_string(&path).ok().and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok()).map(|v| v["base"].clone()).unwrap_or(serde_json::Value::Null),
            };
            let (reward, fin) = fin;
            let v = serde_json::json!({"reward": reward, "n": self.cfg.train.eval_prompts, "sample_steps": self.cfg.sample.steps, "base": base, "final": fin, "step": self.state.step});
            crate::io::atomic_write(&path, serde_json::to_string_pretty(&v)?.as_bytes())?;
        }
        Ok(all)
    }

    /// Held-out reward on fixed eval/ood prompts and noise (EMA weights when on): the
    /// compositional reward for images, VQ/MQ for video.
    fn evaluate(&self) -> Result<Option<(String, HashMap<String, f64>)>> {
        if self.cfg.train.eval_prompts == 0 {
            return Ok(None);
        }
        Ok(Some(self.with_ema(|p| self.task.evaluate(p))?))
    }

    /// Write `model.safetensors`: the full policy weights (EMA when on) in the base layout,
    /// with LoRA adapters merged (W + s·B·A), so `vipo sample/map/eval --run` work on any run.
    pub fn export_final(&self) -> Result<PathBuf> {
        let path = self.run_dir.join(run_dir::FINAL_WEIGHTS);
        self.with_ema(|p| {
            let mut out: HashMap<String, Tensor> = crate::weights::tensors::sorted_vars(p.base_map()).into_iter().map(|(k, v)| (k, v.as_tensor().clone())).collect();
            let Some(l) = p.lora_map() else { return save_tensors(&out, &path) };
            let lv: HashMap<String, Tensor> = crate::weights::tensors::sorted_vars(l).into_iter().map(|(k, v)| (k, v.as_tensor().clone())).collect();
            if let Some(names) = p.diffusers_names() {
                // A real generator: the adapters as diffusers / PEFT load them, and the
                // merged single file.
                let t = &self.cfg.train;
                crate::policy::sd3::peft::export(&self.run_dir.join("lora"), &lv, t.lora_rank, t.lora_alpha, &t.lora_targets)?;
                out = crate::policy::sd3::peft::merge(&out, &lv, t.lora_rank, t.lora_alpha, &*names)?;
            } else {
                let s = self.cfg.train.lora_alpha / self.cfg.train.lora_rank as f64;
                for (name, a) in &lv {
                    if let Some(prefix) = name.strip_suffix(".lora_a") {
                        let b = &lv[&format!("{prefix}.lora_b")];
                        let wname = format!("{prefix}.weight");
                        let w = out.get(&wname).with_context(|| format!("LoRA adapter {prefix} has no base weight"))?;
                        let merged = (w + (b.matmul(a)? * s)?)?;
                        out.insert(wname, merged);
                    }
                }
            }
            save_tensors(&out, &path)
        })?;
        Ok(path)
    }

    /// One GRPO/ViPO step. On a reward error (e.g. NaN) it returns before touching weights.
    pub fn train_step(&mut self) -> Result<StepMetrics> {
        let t = self.cfg.train.clone();
        let mut m = StepMetrics { step: self.state.step + 1, ..Default::default() };

        // 1. Rollout: G samples per prompt, dense per-element log-probs kept.
        let t0 = Instant::now();
        let prompts = self.next_prompts();
        let specs: Vec<usize> = prompts.iter().flat_map(|&p| std::iter::repeat_n(p, t.group_size)).collect();
        let (traj, cond) = self.rollout(&specs)?;
        let samples = self.policy.decode(traj.latents.last().unwrap())?;
        m.time_sample_s = t0.elapsed().as_secs_f64();
        crate::runtime::trace("rollout + decode", m.time_sample_s);

        // 2. Rewards: one score per sample per reward; non-finite scores abort here.
        let t1 = Instant::now();
        let scores = self.task.score(&samples, &specs).with_context(|| format!("step {}: reward failed; weights left untouched", m.step))?;
        m.time_reward_s = t1.elapsed().as_secs_f64();
        crate::runtime::trace("reward", m.time_reward_s);
        let weights = self.task.reward_weights();
        let total = crate::reward::set::weighted_total(&scores, &weights);
        m.reward_mean = mean(&total);
        m.reward_std = std(&total);
        for (info, s) in self.task.reward_infos().iter().zip(&scores) {
            m.rewards.insert(info.name.clone(), mean(s));
        }

        // 3. Allocation maps (ViPO only).
        let t2 = Instant::now();
        let sample_maps = self.task.maps(&samples)?;
        if sample_maps.is_some() {
            m.time_map_s = t2.elapsed().as_secs_f64();
            crate::runtime::trace("maps", m.time_map_s);
        }
        if let Some(mb) = &sample_maps {
            m.map_fallbacks = mb.fallbacks;
            m.map_object_mass = mb.object_mass;
            m.object_area_frac = mb.object_area_frac;
            let every = self.cfg.vipo.map_grid_every;
            if every > 0 && (m.step == 1 || m.step.is_multiple_of(every)) {
                self.write_map_grid(m.step, &samples, mb, &scores, &specs)?;
            }
        }
        // Maps come at the samples' resolution; the per-position ratio lives on the latent
        // grid (the same for the ShapeWorld policies, H/8 × W/8 for SD3.5 / FLUX).
        let grid = self.policy.latent_grid();
        let maps = sample_maps.map(|mb| mb.resample(&grid)).transpose()?;

        // 4. Group-relative advantages, one set per reward.
        let mut advs = Vec::new();
        for s in &scores {
            let ga = group_advantages(s, t.group_size, t.adv_std, t.global_std, t.adv_clip as f32)?;
            m.adv_zero_groups += ga.zero_groups;
            advs.push(ga.adv);
        }
        // ViPO lifts each scalar advantage to a per-position map (docs/DESIGN.md §1.4).
        let device = self.policy.device().clone();
        let adv_tensors = match &maps {
            None => advs.iter().map(|a| Tensor::from_vec(a.clone(), a.len(), &device)).collect::<candle_core::Result<Vec<_>>>()?,
            Some(mb) => {
                let v = &self.cfg.vipo;
                let mut out = Vec::new();
                for (a, s) in advs.iter().zip(&scores) {
                    let pa = match v.map_times {
                        MapTimes::Advantage => pixel_advantages(a, &mb.maps, t.adv_clip as f32),
                        MapTimes::Reward => map_times_reward_advantages(s, &mb.maps, t.group_size, t.adv_std, t.global_std, t.adv_clip as f32)?,
                    };
                    let mut shape = vec![mb.maps.len()];
                    shape.extend(mb.dims());
                    out.push(Tensor::from_vec(pa, shape, &device)?);
                }
                out
            }
        };

        // 5. Policy update on stored transitions.
        let t3 = Instant::now();
        self.update(&traj, &cond, &adv_tensors, &mut m)?;
        m.time_update_s = t3.elapsed().as_secs_f64();
        crate::runtime::trace("update", m.time_update_s);
        m.rss_mb = crate::runtime::memory_mb().map_or(0.0, |(rss, _)| rss);
        self.state.step += 1;
        Ok(m)
    }

    /// Re-run the sampled transitions, compute the clipped surrogate and step the optimizer.
    fn update(&mut self, traj: &Trajectory, cond: &Condition, advs: &[Tensor], m: &mut StepMetrics) -> Result<()> {
        let t = self.cfg.train.clone();
        let n = advs[0].dim(0)?;
        let s_train = t.trainable_transitions(); // the last σ→0 transition is never trained
        let k_train = ((t.timestep_fraction * s_train as f64).round() as usize).clamp(1, s_train);
        // Per sample: a random subset of trainable transitions, in random order.
        let chosen: Vec<Vec<usize>> = (0..n)
            .map(|_| {
                let mut ks: Vec<usize> = (0..s_train).collect();
                ks.shuffle(&mut self.rng_timesteps);
                ks.truncate(k_train);
                ks
            })
            .collect();
        let kind = self.sde();
        let sigma1 = self.sigmas[1];
        let device = self.policy.device().clone();
        let per_opt = t.micro_batch * t.grad_accum;
        let weights: Vec<f64> = self.task.reward_weights().iter().map(|&w| w as f64).collect();
        let (mut ratio_sum, mut ratio_cnt, mut clip_sum, mut loss_sum, mut kl_sum) = (0f64, 0usize, 0f64, 0f64, 0f64);
        let mut dev_first = 0f64;
        let mut grad_norms = Vec::new();
        let mut lr = 0.0;
        for (oi, opt_chunk) in (0..n).collect::<Vec<_>>().chunks(per_opt).enumerate() {
            let mut acc: Option<Vec<Tensor>> = None;
            for mb in opt_chunk.chunks(t.micro_batch) {
                let idx = Tensor::from_vec(mb.iter().map(|&i| i as u32).collect::<Vec<_>>(), mb.len(), &device)?;
                let cond_mb = cond.index_select(&idx)?;
                for j in 0..k_train {
                    // Gather each sample's own transition k = chosen[i][j].
                    let ks: Vec<usize> = mb.iter().map(|&i| chosen[i][j]).collect();
                    let z = Tensor::stack(&mb.iter().zip(&ks).map(|(&i, &k)| traj.latents[k].get(i)).collect::<candle_core::Result<Vec<_>>>()?, 0)?;
                    let z_next = Tensor::stack(&mb.iter().zip(&ks).map(|(&i, &k)| traj.latents[k + 1].get(i)).collect::<candle_core::Result<Vec<_>>>()?, 0)?;
                    let old_dense = Tensor::stack(&mb.iter().zip(&ks).map(|(&i, &k)| traj.log_probs[k].get(i)).collect::<candle_core::Result<Vec<_>>>()?, 0)?;
                    let sig = Tensor::from_vec(ks.iter().map(|&k| self.sigmas[k] as f32).collect::<Vec<_>>(), mb.len(), &device)?;
                    let v = guided_velocity(self.policy.as_ref(), &z, &sig, &cond_mb, self.cfg.sample.guidance)?;
                    // Every row at its own noise level, in one batched transition.
                    let steps: Vec<(f64, f64)> = ks.iter().map(|&k| (self.sigmas[k], self.sigmas[k + 1])).collect();
                    let (mean, stds) = sampler::transition_rows(kind, &z, &v, &steps, sigma1)?;
                    let new_dense = sampler::log_prob_dense_rows(&z_next, &mean, &stds)?;
                    let kl_rows = match &self.kl_ref {
                        Some(r) => {
                            let w = self.cfg.sample.guidance;
                            let vr = match r {
                                KlReference::AdaptersOff => guided_velocity_base(self.policy.as_ref(), &z, &sig, &cond_mb, w)?,
                                KlReference::Copy(refp) => guided_velocity_frozen(refp.as_ref(), &z, &sig, &cond_mb, w)?,
                            };
                            let (mean_ref, _) = sampler::transition_rows(kind, &z, &vr, &steps, sigma1)?;
                            Some(kl_penalty(&mean, &mean_ref, &stds)?)
                        }
                        None => None,
                    };
                    let mut loss = Tensor::zeros((), candle_core::DType::F32, &device)?;
                    let (lp_new, lp_old) = self.reduce_log_probs(&new_dense, &old_dense)?;
                    for (ri, adv) in advs.iter().enumerate() {
                        let adv_mb = adv.index_select(&idx, 0)?;
                        let (lp_new, lp_old) = if lp_new.rank() < adv_mb.rank() {
                            // Per-sample ratio broadcast over the map (the released FLUX code's variant).
                            let shape = adv_mb.shape();
                            let lift = |x: &Tensor| {
                                let mut ones = vec![1usize; adv_mb.rank()];
                                ones[0] = x.dim(0)?;
                                x.reshape(ones)?.broadcast_as(shape)?.contiguous()
                            };
                            (lift(&lp_new)?, lift(&lp_old)?)
                        } else {
                            (lp_new.clone(), lp_old.clone())
                        };
                        let sur =
                            if self.sample_trust() { clipped_surrogate_sample_trust(&lp_new, &lp_old, &adv_mb, t.clip_range)? } else { clipped_surrogate(&lp_new, &lp_old, &adv_mb, t.clip_range)? };
                        if ri == 0 {
                            ratio_sum += sur.ratio_mean;
                            ratio_cnt += 1;
                            clip_sum += sur.clip_frac;
                            if oi == 0 {
                                dev_first = dev_first.max(sur.ratio_max_dev);
                            }
                        }
                        loss = (loss + (sur.loss * weights[ri])?)?;
                    }
                    if let Some(kl_rows) = kl_rows {
                        let kl = (kl_rows.mean_all()? * t.kl_beta)?;
                        kl_sum += kl.to_scalar::<f32>()? as f64;
                        loss = (loss + kl)?;
                    }
                    let loss = (loss / (k_train * opt_chunk.len().div_ceil(t.micro_batch)) as f64)?;
                    loss_sum += loss.to_scalar::<f32>()? as f64;
                    let grads = self.policy.backward(&loss)?;
                    let g = self.opt.collect_grads(&grads)?;
                    acc = Some(match acc {
                        None => g,
                        Some(a) => a.iter().zip(&g).map(|(x, y)| x + y).collect::<candle_core::Result<Vec<_>>>()?,
                    });
                }
            }
            if oi == 0 && dev_first > t.ratio_dev_bound {
                bail!(
                    "on-policy parity check failed at step {}: max |ratio − 1| = {dev_first:.3e} > train.ratio_dev_bound = {:.1e} on the first update (sampling and training log-probs disagree)",
                    m.step,
                    t.ratio_dev_bound
                );
            }
            lr = lr_at(self.state.opt_step, t.lr, t.warmup_steps);
            let g = acc.expect("at least one micro-batch");
            grad_norms.push(self.opt.apply(&g, lr, t.grad_clip)?);
            self.state.opt_step += 1;
            self.update_ema()?;
        }
        m.ratio_mean = ratio_sum / ratio_cnt.max(1) as f64;
        m.clip_frac = clip_sum / ratio_cnt.max(1) as f64;
        m.ratio_dev_first = dev_first;
        m.loss = loss_sum;
        m.kl = kl_sum;
        m.lr = lr;
        m.grad_norm = grad_norms.iter().sum::<f64>() / grad_norms.len().max(1) as f64;
        Ok(())
    }

    /// Log-prob reduction per algorithm: GRPO = mean over all elements (one per sample);
    /// ViPO = sum over channels (one per latent position), or the per-sample mean for the
    /// `ratio = "per-sample"` ablation.
    /// `vipo.clip = "per-sample"` uses the per-element mean over channels instead of the sum.
    fn reduce_log_probs(&self, new_dense: &Tensor, old_dense: &Tensor) -> Result<(Tensor, Tensor)> {
        let how = match (self.cfg.train.algo, self.cfg.vipo.ratio) {
            (Algo::Grpo, _) | (Algo::Vipo, RatioMode::PerSample) => LogProbReduction::MeanAll,
            (Algo::Vipo, RatioMode::PerPosition) if self.sample_trust() => LogProbReduction::MeanChannels,
            (Algo::Vipo, RatioMode::PerPosition) => LogProbReduction::SumChannels,
        };
        Ok((sampler::reduce(new_dense, how)?, sampler::reduce(old_dense, how)?))
    }

    /// ViPO's per-position ratio under the per-sample trust region (`vipo.clip`).
    fn sample_trust(&self) -> bool {
        self.cfg.train.algo == Algo::Vipo && self.cfg.vipo.ratio == RatioMode::PerPosition && self.cfg.vipo.clip == ClipMode::PerSample
    }

    fn update_ema(&mut self) -> Result<()> {
        if let Some(ema) = &mut self.ema {
            ema_update(ema, self.opt.vars(), self.cfg.train.ema_decay)?;
        }
        Ok(())
    }

    /// Run `f` with the EMA weights swapped in (if EMA is on).
    pub fn with_ema<R>(&self, f: impl FnOnce(&dyn Policy) -> Result<R>) -> Result<R> {
        let Some(ema) = &self.ema else { return f(self.policy.as_ref()) };
        let vars = self.policy.trainable();
        let saved: Vec<Tensor> = vars.iter().map(|(_, v)| v.as_tensor().copy()).collect::<candle_core::Result<_>>()?;
        for ((_, v), e) in vars.iter().zip(ema) {
            v.set(e)?;
        }
        let out = f(self.policy.as_ref());
        for ((_, v), s) in vars.iter().zip(&saved) {
            v.set(s)?;
        }
        out
    }

    /// Fixed prompts and noise every time, so grids across steps show progress.
    fn write_grid(&self, step: usize) -> Result<()> {
        let path = self.run_dir.join("samples").join(format!("step_{step:05}.png"));
        self.with_ema(|p| self.task.write_grid(p, &path))
    }

    /// For the first two prompt groups: sample | allocation map | signed advantage overlay
    /// (red = pushed up, blue = pushed down), one row per sample.
    /// Beside it, `step_N.prompts.json`: each row's prompt, reward and advantage.
    fn write_map_grid(&self, step: usize, samples: &crate::image::Samples, mb: &crate::train::maps::MapBatch, scores: &[Vec<f32>], specs: &[usize]) -> Result<()> {
        let t = &self.cfg.train;
        let ga = group_advantages(&scores[0], t.group_size, t.adv_std, t.global_std, t.adv_clip as f32)?;
        let path = self.run_dir.join("maps").join(format!("step_{step:05}.png"));
        let n = 2 * t.group_size;
        self.task.write_map_grid(samples, mb, &ga.adv, n, t.adv_clip as f32 / 2.0, &path)?;
        let cells: Vec<crate::image::LegendCell> = (0..n.min(specs.len()))
            .map(|i| crate::image::LegendCell { prompt: self.task.pool()[specs[i]].text.clone(), score: Some(scores[0][i] as f64), note: format!("advantage {:+.2}", ga.adv[i]) })
            .collect();
        crate::image::write_legend(&path, &cells)
    }

    fn named(vars: &[(String, Var)], prefix: &str) -> HashMap<String, Tensor> {
        vars.iter().map(|(k, v)| (format!("{prefix}{k}"), v.as_tensor().clone())).collect()
    }

    /// Write checkpoints/step_N atomically: build it in a temp folder, then rename.
    pub fn save_checkpoint(&self) -> Result<PathBuf> {
        let ckdir = self.run_dir.join("checkpoints");
        let final_dir = ckdir.join(format!("step_{:06}", self.state.step));
        let tmp = ckdir.join(format!(".step_{:06}.tmp", self.state.step));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp)?;
        }
        std::fs::create_dir_all(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
        let vars = self.policy.trainable();
        save_tensors(&Self::named(&vars, ""), &tmp.join("trainable.safetensors"))?;
        save_tensors(&self.opt.state_tensors(), &tmp.join("optim.safetensors"))?;
        if let Some(ema) = &self.ema {
            let named: HashMap<String, Tensor> = vars.iter().zip(ema).map(|((k, _), e)| (k.clone(), e.clone())).collect();
            save_tensors(&named, &tmp.join("ema.safetensors"))?;
        }
        let mut st = self.state.clone();
        st.rng_prompts = RngState::of(&self.rng_prompts);
        st.rng_noise = RngState::of(&self.rng_noise);
        st.rng_timesteps = RngState::of(&self.rng_timesteps);
        crate::io::atomic_write(&tmp.join("state.json"), serde_json::to_string_pretty(&st)?.as_bytes())?;
        if final_dir.exists() {
            std::fs::remove_dir_all(&final_dir)?;
        }
        std::fs::rename(&tmp, &final_dir).with_context(|| format!("{}: cannot move checkpoint into place", final_dir.display()))?;
        Ok(final_dir)
    }

    /// The newest complete checkpoint of a run (one with a state.json).
    pub fn latest_checkpoint(run_dir: &Path) -> Option<PathBuf> {
        let mut best: Option<(usize, PathBuf)> = None;
        for e in std::fs::read_dir(run_dir.join("checkpoints")).ok()?.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if let Some(n) = name.strip_prefix("step_").and_then(|s| s.parse::<usize>().ok()) {
                if e.path().join("state.json").is_file() && best.as_ref().is_none_or(|(b, _)| n > *b) {
                    best = Some((n, e.path()));
                }
            }
        }
        best.map(|(_, p)| p)
    }

    fn restore_latest(&mut self) -> Result<()> {
        let Some(dir) = Self::latest_checkpoint(&self.run_dir) else {
            bail!("{}: no complete checkpoint to resume from", self.run_dir.display());
        };
        let origin = dir.display().to_string();
        let st: TrainState = serde_json::from_str(&std::fs::read_to_string(dir.join("state.json")).with_context(|| format!("{origin}/state.json: cannot read"))?)
            .with_context(|| format!("{origin}/state.json: corrupted checkpoint state"))?;
        let device = self.policy.device().clone();
        let w = read_tensors(&dir.join("trainable.safetensors"), &device)?;
        let vars = self.policy.trainable();
        for (name, v) in &vars {
            let t = w.get(name).with_context(|| format!("{origin}/trainable.safetensors: tensor {name} missing (checkpoint from a different config?)"))?;
            anyhow::ensure!(t.dims() == v.dims(), "{origin}/trainable.safetensors: tensor {name} has shape {:?}, expected {:?}", t.dims(), v.dims());
        }
        anyhow::ensure!(w.len() == vars.len(), "{origin}/trainable.safetensors: holds {} tensors, the config trains {}", w.len(), vars.len());
        let opt_t = read_tensors(&dir.join("optim.safetensors"), &device)?;
        self.opt.load_state(&opt_t, st.opt_step, &format!("{origin}/optim.safetensors"))?;
        if self.ema.is_some() {
            let e = read_tensors(&dir.join("ema.safetensors"), &device)?;
            let mut out = Vec::new();
            for (name, _) in &vars {
                out.push(e.get(name).with_context(|| format!("{origin}/ema.safetensors: tensor {name} missing"))?.clone());
            }
            self.ema = Some(out);
        }
        for (name, v) in &vars {
            v.set(&w[name])?;
        }
        anyhow::ensure!(st.order.len() == self.task.pool().len(), "{origin}/state.json: prompt pool size differs from the config");
        self.rng_prompts = st.rng_prompts.restore()?;
        self.rng_noise = st.rng_noise.restore()?;
        self.rng_timesteps = st.rng_timesteps.restore()?;
        self.state = st;
        // Drop metrics lines past the checkpoint so the log matches the restored state.
        let mpath = self.run_dir.join(run_dir::METRICS_FILE);
        if let Ok(text) = std::fs::read_to_string(&mpath) {
            let keep: String = text
                .lines()
                .filter(|l| serde_json::from_str::<serde_json::Value>(l).ok().and_then(|v| v["step"].as_u64()).is_some_and(|s| s as usize <= self.state.step))
                .map(|l| format!("{l}\n"))
                .collect();
            crate::io::atomic_write(&mpath, keep.as_bytes())?;
        }
        Ok(())
    }
}

fn mean(v: &[f32]) -> f64 {
    v.iter().map(|&x| x as f64).sum::<f64>() / v.len().max(1) as f64
}

fn std(v: &[f32]) -> f64 {
    let m = mean(v);
    (v.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / v.len().max(1) as f64).sqrt()
}

/// `vipo train`: fresh run or `--resume`.
pub fn train_cli(cfg: &Config, run_dir: &Path, resume: bool, force: bool) -> Result<()> {
    let mut tr = if resume {
        run_dir::require_run_dir(run_dir)?;
        Trainer::new(cfg, run_dir, true)?
    } else {
        // Everything that can refuse the start (config, base weights, prompts, rewards,
        // backbone) loads before the run directory exists, so a failed start leaves nothing.
        cfg.train.validate()?;
        run_dir::check_run_dir_free(run_dir, force)?;
        let tr = Trainer::new(cfg, run_dir, false)?;
        run_dir::create_run_dir(run_dir, cfg, force)?;
        tr
    };
    let start = tr.step();
    let ms = tr.train()?;
    if let (Some(f), Some(l)) = (ms.first(), ms.last()) {
        println!("run: {}", run_dir.display());
        println!("steps {}..{}: reward {:.3} → {:.3}", start + 1, tr.step(), f.reward_mean, l.reward_mean);
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::Modality;
    use crate::image::Image;
    use crate::policy::shapeworld::video_dit::VideoPolicy;
    use crate::policy::{FlowModel, ImagePolicy};
    use crate::reward::set::RewardSet;
    use crate::reward::{Reward, RewardInfo};
    use crate::world::{self, PromptSpec, Split};

    /// A tiny base model on disk and a config that trains it for a few cheap steps.
    pub(crate) fn setup(dir: &Path) -> Config {
        let mut cfg = Config::default();
        cfg.model = crate::policy::shapeworld::dit::tests::tiny();
        cfg.out_dir = dir.to_path_buf();
        cfg.progress = false;
        let base = dir.join("base.safetensors");
        if !base.exists() {
            ImagePolicy::new(&cfg.model, &candle_core::Device::Cpu, 1).unwrap().save(&base).unwrap();
        }
        cfg.sample.steps = 3;
        let t = &mut cfg.train;
        t.base = base.display().to_string();
        t.steps = 2;
        t.prompts_per_step = 2;
        t.group_size = 2;
        t.micro_batch = 2;
        t.grad_accum = 1;
        t.sample_steps = 4;
        t.lr = 1e-3;
        t.checkpoint_every = 1;
        t.grid_every = 0;
        t.prompt_pool = 16;
        t.eval_prompts = 2;
        // Redness varies smoothly with any pixel change, so a random tiny policy gets
        // non-zero advantages.
        t.rewards = vec![crate::reward::RewardEntry::new("redness", 1.0)];
        cfg
    }

    fn weights(tr: &Trainer) -> Vec<Vec<f32>> {
        tr.policy.trainable().iter().map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()).collect()
    }

    fn run(cfg: &Config, name: &str) -> (Trainer, Vec<StepMetrics>) {
        let dir = cfg.out_dir.join(name);
        run_dir::create_run_dir(&dir, cfg, false).unwrap();
        let mut tr = Trainer::new(cfg, &dir, false).unwrap();
        let ms = tr.train().unwrap();
        (tr, ms)
    }

    #[test]
    fn grpo_runs_logs_every_field_and_holds_parity() {
        let d = tempfile::tempdir().unwrap();
        let cfg = setup(d.path());
        let (tr, ms) = run(&cfg, "r");
        assert_eq!(ms.len(), 2);
        for m in &ms {
            assert!(m.ratio_dev_first < 1e-5, "parity: {}", m.ratio_dev_first);
            assert!(m.grad_norm > 0.0 && m.grad_norm.is_finite());
            assert_eq!(m.time_map_s, 0.0);
        }
        let text = std::fs::read_to_string(tr.run_dir.join(run_dir::METRICS_FILE)).unwrap();
        let line: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        for k in [
            "step",
            "reward_mean",
            "reward_std",
            "adv_zero_groups",
            "ratio_mean",
            "ratio_dev_first",
            "clip_frac",
            "grad_norm",
            "loss",
            "lr",
            "time_sample_s",
            "time_reward_s",
            "time_map_s",
            "time_update_s",
        ] {
            assert!(line.get(k).is_some(), "metrics.jsonl lacks {k}");
        }
        assert!(Trainer::latest_checkpoint(&tr.run_dir).unwrap().ends_with("step_000002"));
    }

    /// An SDE window, classifier-free guidance and x-prediction all go through the same
    /// sampler/update path: parity holds and only window transitions are trained.
    #[test]
    fn sde_window_guidance_and_x_prediction_keep_parity() {
        let d = tempfile::tempdir().unwrap();
        let mut cfg = setup(d.path());
        cfg.model.prediction = crate::policy::shapeworld::dit::Prediction::X;
        let base = d.path().join("base_x.safetensors");
        ImagePolicy::new(&cfg.model, &candle_core::Device::Cpu, 1).unwrap().save(&base).unwrap();
        cfg.train.base = base.display().to_string();
        cfg.train.sde_steps = 2;
        cfg.sample.guidance = 2.0;
        assert_eq!((cfg.train.trainable_transitions(), cfg.train.stochastic_transitions()), (2, 2));
        let (_, ms) = run(&cfg, "w");
        for m in &ms {
            assert!(m.ratio_dev_first < 1e-5, "parity: {}", m.ratio_dev_first);
            assert!(m.grad_norm > 0.0 && m.grad_norm.is_finite());
        }
        cfg.train.sde_steps = 0;
        assert_eq!((cfg.train.trainable_transitions(), cfg.train.stochastic_transitions()), (3, 4));
    }

    /// A base from a run directory whose config says another prediction mode is refused
    /// (same tensors, different meaning), naming the file, the field and the fix.
    #[test]
    fn base_with_another_prediction_mode_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let mut cfg = setup(d.path());
        let run_dir = d.path().join("pre");
        std::fs::create_dir_all(&run_dir).unwrap();
        let mut saved = cfg.clone();
        saved.model.prediction = crate::policy::shapeworld::dit::Prediction::X;
        std::fs::write(run_dir.join(run_dir::CONFIG_FILE), crate::config::to_toml(&saved).unwrap()).unwrap();
        std::fs::copy(&cfg.train.base, run_dir.join("model.safetensors")).unwrap();
        cfg.train.base = run_dir.join("model.safetensors").display().to_string();
        let e = format!("{:#}", Trainer::new(&cfg, &d.path().join("r"), false).err().unwrap());
        assert!(e.contains("model.prediction") && e.contains("pre/config.toml") && e.contains("--set model.prediction=x"), "{e}");
        cfg.model.prediction = crate::policy::shapeworld::dit::Prediction::X;
        assert!(base_weights(&cfg).is_ok());
    }

    #[test]
    fn resume_is_bit_identical() {
        let d = tempfile::tempdir().unwrap();
        let mut cfg = setup(d.path());
        cfg.train.steps = 3;
        cfg.train.ema_decay = 0.5;
        let (full, _) = run(&cfg, "full");
        let mut short = cfg.clone();
        short.train.steps = 1;
        let (_, _) = run(&short, "part");
        let mut resumed = Trainer::new(&cfg, &d.path().join("part"), true).unwrap();
        assert_eq!(resumed.step(), 1);
        resumed.train().unwrap();
        assert!(weights(&full) == weights(&resumed), "resumed weights differ from the uninterrupted run");
        assert!(full
            .ema
            .as_ref()
            .unwrap()
            .iter()
            .zip(resumed.ema.as_ref().unwrap())
            .all(|(a, b)| a.flatten_all().unwrap().to_vec1::<f32>().unwrap() == b.flatten_all().unwrap().to_vec1::<f32>().unwrap()));
        let lines = std::fs::read_to_string(d.path().join("part").join(run_dir::METRICS_FILE)).unwrap().lines().count();
        assert_eq!(lines, 3);
        // While a trainer lives it holds its run folder: a second resume (which would
        // truncate the metrics and interleave checkpoints) and a --force restart are refused.
        let e = Trainer::new(&cfg, &d.path().join("part"), true).map(|_| ()).unwrap_err().to_string();
        assert!(e.contains("in use by another vipo process"), "{e}");
        let e = run_dir::create_run_dir(&d.path().join("part"), &cfg, true).unwrap_err().to_string();
        assert!(e.contains("in use by another vipo process"), "{e}");
        assert_eq!(std::fs::read_to_string(d.path().join("part").join(run_dir::METRICS_FILE)).unwrap().lines().count(), 3);
        drop(resumed);
        assert!(Trainer::new(&cfg, &d.path().join("part"), true).is_ok());
    }

    #[test]
    fn lora_and_full_both_train() {
        let d = tempfile::tempdir().unwrap();
        for (i, rank) in [0usize, 2].into_iter().enumerate() {
            let mut cfg = setup(d.path());
            cfg.train.steps = 1;
            cfg.train.lora_rank = rank;
            let dir = d.path().join(format!("l{i}"));
            run_dir::create_run_dir(&dir, &cfg, false).unwrap();
            let mut tr = Trainer::new(&cfg, &dir, false).unwrap();
            let before = weights(&tr);
            tr.train().unwrap();
            let after = weights(&tr);
            let changed = before.iter().zip(&after).filter(|(a, b)| a != b).count();
            assert!(changed > 0, "rank {rank}: no trainable tensor changed");
            if rank > 0 {
                assert!(tr.policy.trainable().iter().all(|(n, _)| n.contains("lora_")));
            }
            // The exported model (LoRA merged) reproduces the trained policy's output.
            let merged = ImagePolicy::load(&cfg.model, &dir.join(run_dir::FINAL_WEIGHTS), None, &candle_core::Device::Cpu, 0).unwrap();
            let prompts = world::prompts(Split::Train, 2, 3);
            let texts: Vec<String> = prompts.iter().map(|p| p.text()).collect();
            let cond = Condition::tokens(crate::policy::shapeworld::dit::tokens_for(&texts, &candle_core::Device::Cpu).unwrap());
            let z = Tensor::ones((2, 3, 16, 16), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
            let sig = Tensor::full(0.5f32, 2, &candle_core::Device::Cpu).unwrap();
            let d = (tr.policy.velocity(&z, &sig, &cond).unwrap() - merged.velocity(&z, &sig, &cond).unwrap()).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-4, "rank {rank}: exported model differs by {d}");
        }
    }

    struct NanReward;
    impl Reward for NanReward {
        fn info(&self) -> RewardInfo {
            RewardInfo { name: "nan".into(), version: "0".into(), range: (0.0, 1.0), higher_is_better: true }
        }
        fn inputs(&self) -> crate::reward::Inputs {
            crate::reward::Inputs::Images
        }
        fn score(&self, samples: &crate::image::Samples, _: &[crate::prompt::Prompt]) -> Result<Vec<f32>> {
            Ok((0..samples.len()).map(|i| if i == 1 { f32::NAN } else { 0.5 }).collect())
        }
    }

    #[test]
    fn nan_reward_aborts_the_step_and_leaves_weights_untouched() {
        let d = tempfile::tempdir().unwrap();
        let cfg = setup(d.path());
        let dir = d.path().join("n");
        run_dir::create_run_dir(&dir, &cfg, false).unwrap();
        let mut tr = Trainer::new(&cfg, &dir, false).unwrap();
        tr.task = Box::new(task::ImageTask::new(&cfg, RewardSet::new(vec![(Box::new(NanReward), 1.0)]).unwrap(), None).unwrap());
        let before = weights(&tr);
        let e = format!("{:#}", tr.train_step().err().unwrap());
        assert!(e.contains("nan") && e.contains("untouched"), "{e}");
        assert!(weights(&tr) == before);
    }

    #[test]
    fn bad_settings_are_rejected_before_work() {
        let d = tempfile::tempdir().unwrap();
        let base = setup(d.path());
        let cases: Vec<(Box<dyn Fn(&mut Config)>, &str)> = vec![
            (Box::new(|c| c.train.group_size = 1), "group_size"),
            (Box::new(|c| c.train.timestep_fraction = 0.0), "timestep_fraction"),
            (Box::new(|c| c.train.timestep_fraction = 1.5), "timestep_fraction"),
            (Box::new(|c| c.train.micro_batch = 3), "micro_batch"),
            (
                Box::new(|c| {
                    c.train.lora_rank = 2;
                    c.train.lora_targets = vec!["nothing".into()];
                }),
                "matches no linear layer",
            ),
            (Box::new(|c| c.train.rewards[0].name = "beauty".into()), "unknown reward"),
            (Box::new(|c| c.train.sde_steps = 4), "train.sde_steps"),
            (Box::new(|c| c.sample.guidance = -1.0), "sample.guidance"),
        ];
        for (i, (f, needle)) in cases.iter().enumerate() {
            let mut cfg = base.clone();
            f(&mut cfg);
            let dir = d.path().join(format!("bad{i}"));
            let e = format!("{:#}", Trainer::new(&cfg, &dir, false).err().unwrap());
            assert!(e.contains(needle), "case {i}: {e}");
        }
    }

    #[test]
    fn corrupted_or_missing_checkpoint_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let mut cfg = setup(d.path());
        cfg.train.steps = 1;
        // The run's process has ended (the trainer dropped, its lock released).
        let dir = run(&cfg, "c").0.run_dir.clone();
        let ck = Trainer::latest_checkpoint(&dir).unwrap();
        std::fs::write(ck.join("state.json"), b"{ not json").unwrap();
        let e = format!("{:#}", Trainer::new(&cfg, &dir, true).err().unwrap());
        assert!(e.contains("state.json"), "{e}");
        std::fs::remove_dir_all(dir.join("checkpoints")).unwrap();
        let e = format!("{:#}", Trainer::new(&cfg, &dir, true).err().unwrap());
        assert!(e.contains("no complete checkpoint"), "{e}");
    }

    /// docs/DESIGN.md §1.4: with an all-ones map and one ratio per sample, ViPO is exactly GRPO.
    #[test]
    fn vipo_with_ones_map_and_per_sample_ratio_equals_grpo() {
        let d = tempfile::tempdir().unwrap();
        let mut g = setup(d.path());
        g.train.steps = 1;
        let mut v = g.clone();
        v.train.algo = Algo::Vipo;
        v.vipo.map = crate::config::MapKind::Ones;
        v.vipo.ratio = RatioMode::PerSample;
        let (_, mg) = run(&g, "g");
        let (_, mv) = run(&v, "v");
        let (lg, lv) = (mg[0].loss, mv[0].loss);
        // The loss is a mean of O(1) terms ρ·A that nearly cancel within each group, so
        // "equal to floating-point precision" is an absolute bound at f32 resolution.
        assert!((lg - lv).abs() <= 1e-6, "loss grpo {lg} vs vipo {lv}");
        // Gradients agree too (weights are not compared: Adam's normalisation turns f32
        // rounding in near-zero gradient entries into O(lr) weight differences).
        let (gg, gv) = (mg[0].grad_norm, mv[0].grad_norm);
        assert!((gg - gv).abs() <= 1e-4 * gg, "grad norm grpo {gg} vs vipo {gv}");
        // The per-position ratio is a different objective (sum over channels per position).
        let mut p = v.clone();
        p.vipo.ratio = RatioMode::PerPosition;
        let (_, mp) = run(&p, "p");
        assert!(mp[0].ratio_dev_first < 1e-5, "per-position parity {}", mp[0].ratio_dev_first);
    }

    /// Issue 12 item 4: under the default trust region (`vipo.clip = "per-sample"`), ViPO
    /// with an all-ones map tracks GRPO step for step with several optimizer steps per
    /// rollout batch (identical first gradient, the same clip statistic), while clipping
    /// each position's ratio at the same ε clips far more often.
    #[test]
    fn vipo_with_ones_map_tracks_grpo_under_the_default_trust_region() {
        let d = tempfile::tempdir().unwrap();
        let mut g = setup(d.path());
        g.train.steps = 3;
        g.train.lr = 1e-2; // clip_range stays the default 1e-4
        g.train.micro_batch = 1; // 4 optimizer steps per rollout batch
        let mut v = g.clone();
        v.train.algo = Algo::Vipo;
        v.vipo.map = crate::config::MapKind::Ones;
        assert_eq!(v.vipo.clip, crate::config::ClipMode::PerSample, "the default trust region");
        let mut p = v.clone();
        p.vipo.clip = crate::config::ClipMode::PerPosition;
        let (_, mg) = run(&g, "g");
        let (_, mv) = run(&v, "v");
        let (_, mp) = run(&p, "p");
        for (i, ((a, b), c)) in mg.iter().zip(&mv).zip(&mp).enumerate() {
            eprintln!(
                "step {i}: grpo r {:.5} clip {:.3} gn {:.4} | ones r {:.5} clip {:.3} gn {:.4} | per-position clip r {:.5} clip {:.3} gn {:.4}",
                a.reward_mean, a.clip_frac, a.grad_norm, b.reward_mean, b.clip_frac, b.grad_norm, c.reward_mean, c.clip_frac, c.grad_norm
            );
        }
        assert!((mg[0].grad_norm - mv[0].grad_norm).abs() <= 0.05 * mg[0].grad_norm, "first step: grad norm grpo {} vs ones {}", mg[0].grad_norm, mv[0].grad_norm);
        for (a, b) in mg.iter().zip(&mv) {
            assert!((a.reward_mean - b.reward_mean).abs() <= 0.02 * a.reward_mean.abs().max(1e-3), "reward grpo {} vs ones {}", a.reward_mean, b.reward_mean);
            assert!((a.clip_frac - b.clip_frac).abs() <= 0.26, "clip frac grpo {} vs ones {}", a.clip_frac, b.clip_frac);
        }
        let (cg, cp): (f64, f64) = (mg.iter().map(|m| m.clip_frac).sum(), mp.iter().map(|m| m.clip_frac).sum());
        assert!(cp > cg + 0.1, "per-position clipping should bind far more often: {cp} vs grpo {cg}");
    }

    #[test]
    fn vipo_with_psm_maps_trains_and_writes_map_grids() {
        let d = tempfile::tempdir().unwrap();
        let mut v = setup(d.path());
        v.train.steps = 1;
        v.train.algo = Algo::Vipo;
        v.backbone.input_size = 64;
        v.backbone.tap = "features.6".into();
        v.vipo.map_grid_every = 1;
        let (tr, ms) = run(&v, "psm");
        let m = &ms[0];
        assert!(m.time_map_s > 0.0);
        assert!((0.0..=1.0).contains(&m.map_object_mass) && (0.0..=1.0).contains(&m.object_area_frac));
        assert!(m.ratio_dev_first < 1e-5);
        assert!(tr.run_dir.join("maps/step_00001.png").is_file());
        for (set, needle) in [("psm.k=100000", "psm.k"), ("psm.sigma=-1", "psm.sigma"), ("backbone.tap=features.99", "features.99"), ("backbone.name=vgg", "vgg")] {
            let mut c = v.clone();
            let (k, val) = set.split_once('=').unwrap();
            let text = crate::config::to_toml(&c).unwrap();
            c = crate::config::from_toml_str(&text, "t", &[format!("{k}={val}")]).unwrap();
            let e = format!("{:#}", Trainer::new(&c, &d.path().join("x"), false).err().unwrap());
            assert!(e.contains(needle), "{set}: {e}");
        }
    }

    /// A tiny video base on disk and a config that trains it (4 frames of 16×16).
    fn setup_video(dir: &Path) -> Config {
        use crate::policy::shapeworld::video_dit::{VideoAttention, VideoDitConfig};
        let mut cfg = setup(dir);
        cfg.modality = Modality::Video;
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
        let base = dir.join("vbase.safetensors");
        if !base.exists() {
            VideoPolicy::new(&cfg.video_model, &candle_core::Device::Cpu, 1).unwrap().save(&base).unwrap();
        }
        cfg.train.base = base.display().to_string();
        // Redness is dense on a random policy (non-zero advantages); MQ is the second,
        // separately normalised reward (docs/DESIGN.md §1.5).
        cfg.train.rewards = vec![crate::reward::RewardEntry::new("redness", 1.0), crate::reward::RewardEntry::new("motion_quality", 0.5)];
        cfg.train.grid_every = 1;
        cfg.train.grid_prompts = 2;
        cfg
    }

    /// GRPO and ViPO (PSM maps per frame → temporal map → per-position ratio over
    /// (t, h, w)) both train on video from the same loop, with on-policy parity, and write
    /// frame-strip grids, map grids and a VQ/MQ evaluation.
    #[test]
    fn video_grpo_and_vipo_train() {
        let d = tempfile::tempdir().unwrap();
        let g = setup_video(d.path());
        let (tr, ms) = run(&g, "vg");
        assert_eq!(ms.len(), 2);
        for m in &ms {
            assert!(m.ratio_dev_first < 1e-5 && m.grad_norm > 0.0 && m.grad_norm.is_finite(), "{m:?}");
            assert!(m.rewards.contains_key("redness") && m.rewards.contains_key("motion_quality"));
        }
        assert!(tr.run_dir.join("samples/step_00002.png").is_file() && tr.run_dir.join(run_dir::FINAL_WEIGHTS).is_file());
        let ev: serde_json::Value = serde_json::from_slice(&std::fs::read(tr.run_dir.join("eval.json")).unwrap()).unwrap();
        assert!(ev["final"]["ood.motion_quality"].is_number() && ev["base"]["eval"].is_number(), "{ev}");
        let mut v = g.clone();
        v.train.algo = Algo::Vipo;
        v.backbone.input_size = 64;
        v.vipo.map_grid_every = 1;
        v.vipo.frame_stride = 2;
        let (tv, mv) = run(&v, "vv");
        assert!(mv[0].time_map_s > 0.0 && mv[0].ratio_dev_first < 1e-5 && mv[0].grad_norm > 0.0);
        assert!(tv.run_dir.join("maps/step_00001.png").is_file());
        // The temporal map really is (t, h, w) and the per-position objective uses it:
        // ones map + per-sample ratio reproduces GRPO's loss exactly, per-position differs.
        let mut ones = v.clone();
        ones.train.steps = 1;
        ones.vipo.map = crate::config::MapKind::Ones;
        ones.vipo.ratio = RatioMode::PerSample;
        let mut g1 = g.clone();
        g1.train.steps = 1;
        let (_, a) = run(&g1, "g1");
        let (_, b) = run(&ones, "o1");
        assert!((a[0].loss - b[0].loss).abs() <= 1e-6, "grpo {} vs ones/per-sample {}", a[0].loss, b[0].loss);
        let mut pp = ones.clone();
        pp.vipo.ratio = RatioMode::PerPosition;
        let (_, c) = run(&pp, "p1");
        assert!(c[0].ratio_dev_first < 1e-5);
        // Bad temporal settings fail before any work.
        let mut bad = v.clone();
        bad.vipo.temporal_sigma = -0.5;
        let e = format!("{:#}", Trainer::new(&bad, &d.path().join("bad"), false).err().unwrap());
        assert!(e.contains("vipo.temporal_sigma"), "{e}");
        let mut img_reward = g.clone();
        img_reward.train.rewards = vec![crate::reward::RewardEntry::new("compositional", 1.0)];
        let e = format!("{:#}", Trainer::new(&img_reward, &d.path().join("bad2"), false).err().unwrap());
        assert!(e.contains("train.rewards[0]") && e.contains("video"), "{e}");
    }

    /// The temporal map stage on hand values: two frames [0,1] and [1,0] on a 1×2 grid,
    /// resampled to 4 frames, no smoothing, volume min–max.
    #[test]
    fn temporal_maps_stack_frames_on_the_latent_time_axis() {
        struct Fixed;
        impl crate::train::maps::MapSource for Fixed {
            fn name(&self) -> String {
                "fixed".into()
            }
            fn maps(&self, images: &[Image], _: &[PromptSpec]) -> Result<crate::train::maps::MapBatch> {
                // The map of a frame: its red channel at the two pixels.
                let maps = images.iter().map(|im| vec![im.get(0, 0, 0), im.get(0, 0, 1)]).collect();
                Ok(crate::train::maps::MapBatch { maps, h: 1, w: 2, t: None, fallbacks: 0, object_mass: 0.0, object_area_frac: 0.0 })
            }
        }
        let frame = |a: f32, b: f32| {
            let mut im = Image::new(1, 2);
            im.set(0, 0, 0, a);
            im.set(0, 0, 1, b);
            im
        };
        let clip = vec![frame(0.0, 1.0), frame(0.2, 0.8), frame(1.0, 0.0), frame(0.6, 0.4)];
        // stride 2 keeps frames 0 and 2 → [0,1], [1,0]; torch trilinear to 4 frames:
        // t' = 0.5·(τ+0.5) − 0.5 → 0, 0.25, 0.75, 1 (clamped) → weights of frame 2: 0, .25, .75, 1.
        let mb = task::temporal_maps(&Fixed, &[clip], 2, 0.0, crate::config::TemporalNorm::Volume).unwrap();
        assert_eq!(mb.dims(), vec![4, 1, 2]);
        let want = [0.0, 1.0, 0.25, 0.75, 0.75, 0.25, 1.0, 0.0];
        for (a, b) in mb.maps[0].iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{:?}", mb.maps[0]);
        }
    }

    /// End-to-end direction check: GRPO on the rule-based redness reward must make the
    /// policy's samples redder (same prompts and noise before and after).
    #[test]
    fn grpo_raises_the_redness_reward() {
        let d = tempfile::tempdir().unwrap();
        let mut cfg = setup(d.path());
        cfg.train.steps = 20;
        cfg.train.prompts_per_step = 2;
        cfg.train.group_size = 4;
        cfg.train.micro_batch = 4;
        cfg.train.grad_accum = 2;
        cfg.train.lr = 3e-3;
        cfg.train.lora_rank = 0; // full fine-tuning: the strongest, fastest signal for a direction check
        cfg.train.checkpoint_every = 0;
        let dir = d.path().join("red");
        run_dir::create_run_dir(&dir, &cfg, false).unwrap();
        let mut tr = Trainer::new(&cfg, &dir, false).unwrap();
        let prompts = world::prompts(Split::Train, 8, 5);
        let redness = |tr: &Trainer| {
            let imgs = crate::generate::generate_images(tr.policy.as_ref(), &prompts, 5, &cfg.sample).unwrap();
            crate::generate::mean_score(&crate::reward::redness::Redness, &imgs, &prompts).unwrap()
        };
        let before = redness(&tr);
        tr.train().unwrap();
        let after = redness(&tr);
        assert!(after > before + 0.03, "redness {before:.3} → {after:.3}");
    }
}
