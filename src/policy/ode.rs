//! Euler ODE sampling of any policy from fixed per-prompt noise: what evaluation, grids
//! and `vipo sample` draw with, so the same prompt index always gets the same image.

use anyhow::Result;
use candle_core::Tensor;
use rand::SeedableRng;

use crate::image::Samples;
use crate::policy::{Condition, FlowModel, Policy};
use crate::prompt::Prompt;
use crate::sampler::{self, LogProbReduction, SampleConfig, SdeKind};

/// Prompt and noise seed of every evaluation (the trainer's before/after `eval.json` too).
pub const EVAL_SEED: u64 = 0xe7a1;

/// Initial noise for prompt `i` of an evaluation set: derived from (seed, i) alone, so
/// the same prompt index always gets the same noise whatever the batch split.
pub fn eval_noise(seed: u64, index: usize, shape: &[usize], device: &candle_core::Device) -> Result<Tensor> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ index as u64);
    sampler::randn(shape, &mut rng, device)
}

/// Euler ODE sampling of any flow model: one sample per row of `cond` (token ids), the
/// initial noise of sample i from [`eval_noise`]`(seed, i)`, in batches of
/// `cfg.batch_size`. Returns the final latents (N, ...).
pub fn ode_latents(model: &dyn FlowModel, cond: &Condition, shape: &[usize], seed: u64, cfg: &SampleConfig) -> Result<Tensor> {
    cfg.validate()?;
    let sigmas = sampler::sigmas(cfg.steps, cfg.shift);
    let total = cond.rows()?;
    let bs = cfg.batch_size.max(1);
    let mut out = Vec::new();
    let mut dummy = rand_chacha::ChaCha8Rng::seed_from_u64(0); // ODE draws no noise
    for start in (0..total).step_by(bs) {
        let n = bs.min(total - start);
        let noises = (start..start + n).map(|i| eval_noise(seed, i, shape, model.device())).collect::<Result<Vec<_>>>()?;
        let z0 = Tensor::stack(&noises, 0)?;
        let c = cond.narrow(start, n)?;
        let traj = sampler::sample(
            |z, s| {
                let sig = Tensor::full(s as f32, n, z.device())?;
                Ok(crate::policy::guided_velocity_frozen(model, z, &sig, &c, cfg.guidance)?)
            },
            z0,
            &sigmas,
            SdeKind::Ode,
            &mut dummy,
            LogProbReduction::MeanAll,
        )?;
        out.push(traj.latents.last().unwrap().clone());
    }
    Ok(Tensor::cat(&out, 0)?)
}

/// One sample per prompt with Euler ODE sampling: the policy encodes the prompts, samples
/// its latents from [`eval_noise`] and decodes them. `prompts` must not be empty.
pub fn generate(policy: &dyn Policy, prompts: &[Prompt], seed: u64, cfg: &SampleConfig) -> Result<Samples> {
    let cond = policy.encode(prompts)?;
    policy.decode(&ode_latents(policy, &cond, &policy.latent_shape(), seed, cfg)?)
}
