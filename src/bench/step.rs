//! `vipo bench step`: the configured GRPO/ViPO training step, timed phase by phase, as
//! `vipo train` runs it (same trainer, same code path), on the default base when one is
//! available and on seeded random weights otherwise (speed does not depend on the values).
//! The PyTorch yardstick for the same step is `bench/pytorch_step.py`.

use anyhow::{Context, Result};
use std::path::PathBuf;

use crate::config::Config;
use crate::train::grpo::{StepMetrics, Trainer};

/// Median seconds per phase over the measured steps (after one warm-up step), and the
/// process's peak resident memory.
#[derive(Clone, Debug)]
pub struct StepBench {
    pub steps: usize,
    pub samples: usize,
    pub rollout_s: f64,
    pub reward_s: f64,
    pub map_s: f64,
    pub update_s: f64,
    pub step_s: f64,
    pub peak_rss_mb: f64,
    pub ratio_dev_first: f64,
    pub threads: usize,
}

impl StepBench {
    /// The maps' share of the step (ViPO's overhead over GRPO's step).
    pub fn map_share(&self) -> f64 {
        self.map_s / self.step_s.max(1e-12)
    }
}

/// A scratch run directory removed on drop (map grids of a ViPO step land there).
pub(super) struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(what: &str) -> Result<Self> {
        let p = std::env::temp_dir().join(format!("vipo-bench-{what}-{}", std::process::id()));
        std::fs::create_dir_all(&p).with_context(|| format!("bench {what}: cannot create {}", p.display()))?;
        Ok(Self(p))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Run `iters + 1` training steps of `cfg` (the first is a warm-up) and report medians.
pub fn bench_step(cfg: &Config, iters: usize) -> Result<StepBench> {
    anyhow::ensure!(iters >= 1, "bench step: iters must be ≥ 1");
    let scratch = Scratch::new("step")?;
    let mut cfg = cfg.clone();
    cfg.progress = false;
    cfg.train.eval_prompts = 0;
    if cfg.train.base.is_empty() {
        let base = match crate::base::existing_default_base(&cfg)? {
            Some(p) => p,
            None => random_base(&cfg, &scratch.0)?,
        };
        cfg.train.base = base.display().to_string();
    }
    let mut tr = Trainer::new(&cfg, &scratch.0, false)?;
    time_steps(&mut tr, &cfg, iters, true)
}

/// `iters` steps of a built trainer (after one warm-up step if `warm_up`), medians per phase.
pub(super) fn time_steps(tr: &mut Trainer, cfg: &Config, iters: usize, warm_up: bool) -> Result<StepBench> {
    let mut ms: Vec<StepMetrics> = Vec::new();
    let mut totals = Vec::new();
    for i in 0..iters + usize::from(warm_up) {
        let t = std::time::Instant::now();
        let m = tr.train_step()?;
        if i > 0 || !warm_up {
            totals.push(t.elapsed().as_secs_f64());
            ms.push(m);
        }
    }
    let med = |f: fn(&StepMetrics) -> f64| super::median(ms.iter().map(f).collect());
    Ok(StepBench {
        steps: iters,
        samples: cfg.train.prompts_per_step * cfg.train.group_size,
        rollout_s: med(|m| m.time_sample_s),
        reward_s: med(|m| m.time_reward_s),
        map_s: med(|m| m.time_map_s),
        update_s: med(|m| m.time_update_s),
        step_s: super::median(totals),
        peak_rss_mb: crate::runtime::memory_mb().map_or(0.0, |(_, peak)| peak),
        ratio_dev_first: ms.iter().map(|m| m.ratio_dev_first).fold(0.0, f64::max),
        threads: crate::runtime::threads(),
    })
}

/// Seeded random base weights for a modality with no shipped or cached base.
fn random_base(cfg: &Config, dir: &std::path::Path) -> Result<PathBuf> {
    let dev = crate::runtime::device()?;
    let path = dir.join("random_base.safetensors");
    cfg.generator().save_random(&dev, cfg.seed, &path).context("vipo bench step")?;
    Ok(path)
}

pub fn print(cfg: &Config, b: &StepBench) {
    let algo = crate::config::spelling(&cfg.train.algo);
    let modality = cfg.modality;
    println!(
        "step {modality} {algo} ({} samples, {} threads, median of {} steps after a warm-up): rollout {:.2} s   reward {:.3} s   maps {:.3} s ({:.1} % of the step)   update {:.2} s   step {:.2} s   peak RSS {:.0} MB   max |ratio-1| {:.1e}",
        b.samples,
        b.threads,
        b.steps,
        b.rollout_s,
        b.reward_s,
        b.map_s,
        100.0 * b.map_share(),
        b.update_s,
        b.step_s,
        b.peak_rss_mb,
        b.ratio_dev_first
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The benchmark runs the real step: phases are timed, the parity check holds, and
    /// ViPO's maps are computed (their time is non-zero) while GRPO's are not.
    #[test]
    fn bench_step_times_every_phase_of_a_tiny_step() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = crate::train::grpo::tests::setup(dir.path());
        cfg.train.prompts_per_step = 2;
        cfg.train.group_size = 2;
        for algo in [crate::config::Algo::Grpo, crate::config::Algo::Vipo] {
            cfg.train.algo = algo;
            let b = bench_step(&cfg, 1).unwrap();
            assert_eq!(b.samples, 4);
            assert!(b.rollout_s > 0.0 && b.update_s > 0.0 && b.step_s >= b.rollout_s + b.update_s, "{b:?}");
            assert!(b.ratio_dev_first <= cfg.train.ratio_dev_bound, "{b:?}");
            assert_eq!(b.map_s > 0.0, algo == crate::config::Algo::Vipo, "{b:?}");
            assert!(b.peak_rss_mb > 0.0);
        }
    }
}
