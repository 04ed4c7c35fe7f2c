//! Sampling with log-probabilities (docs/DESIGN.md §1.1): the noise schedule, the SDE/ODE
//! transitions, dense per-element Gaussian log-densities and the trajectory a GRPO/ViPO
//! step trains on.
//!
//! The module is policy-agnostic: the velocity comes from a closure `v(z, σ)`, so the same
//! code drives the embedded DiT, a real FLUX/Wan model or a test's hand-written function.
//!
//! Scalar coefficients are computed in f64 and applied with `affine`, so the tensor graph
//! stays differentiable in `z` and `v` while the schedule math is exact.

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use serde::{Deserialize, Serialize};

/// The sampling schedule: `steps + 1` sigmas from 1 down to 0.
///
/// σ_k = linspace(1, 0, steps+1), then the time shift σ' = sσ / (1 + (s−1)σ)
/// (s = 3 for FLUX-like images, 5–8 for video; s = 1 is the identity).
/// The endpoints are exactly 1 and 0 for any s > 0. `shift` must be positive and
/// finite; [`sample`] validates the schedule it is given and rejects anything that is not
/// strictly decreasing in [0, 1], so a bad shift surfaces as an error there.
pub fn sigmas(steps: usize, shift: f64) -> Vec<f64> {
    if steps == 0 {
        return vec![1.0];
    }
    (0..=steps)
        .map(|k| {
            // Pin the endpoints: 1 − k/S is exact at k = 0 and k = S, and so is the shift there.
            let s = 1.0 - k as f64 / steps as f64;
            if k == 0 {
                1.0
            } else if k == steps {
                0.0
            } else {
                shift * s / (1.0 + (shift - 1.0) * s)
            }
        })
        .collect()
}

/// Which transition kernel the sampler uses.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum SdeKind {
    /// DanceGRPO / ViPO SDE with constant noise level η (0.25–0.3 in the papers).
    Dance { eta: f64 },
    /// Flow-GRPO SDE with noise level a (0.7 in the paper).
    Flow { a: f64 },
    /// Deterministic Euler (evaluation); no log-probs.
    Ode,
}

impl SdeKind {
    /// Error unless the noise level is finite and positive (a zero noise level makes the
    /// Gaussian degenerate: use [`SdeKind::Ode`] for deterministic sampling).
    pub fn validate(&self) -> Result<()> {
        match *self {
            SdeKind::Dance { eta } => {
                ensure!(eta.is_finite() && eta > 0.0, "sampler: Dance-SDE eta must be finite and > 0 (got {eta}); use Ode for deterministic sampling")
            }
            SdeKind::Flow { a } => {
                ensure!(a.is_finite() && a > 0.0, "sampler: Flow-SDE noise level a must be finite and > 0 (got {a}); use Ode for deterministic sampling")
            }
            SdeKind::Ode => {}
        }
        Ok(())
    }

    /// True for the stochastic kinds (which produce log-probs).
    pub fn is_stochastic(&self) -> bool {
        !matches!(self, SdeKind::Ode)
    }
}

/// Mean and std of the transition σ_k → σ_{k+1} given z and v (differentiable in v and z).
///
/// `sigma1` = the schedule's second sigma (Flow-SDE uses 1−σ₁ as the denominator at σ = 1,
/// like the published code). With Δσ = σ_{k+1} − σ_k < 0:
/// * Dance: x̂₀ = z − σv, score = −(z − (1−σ)x̂₀)/σ², μ = z + Δσ·v − ½η²·score·Δσ,
///   std = η√(σ_k − σ_{k+1}).
/// * Flow: σ_t = a√(σ/(1−σ)), μ = z(1 + σ_t²Δσ/(2σ)) + v(1 + σ_t²(1−σ)/(2σ))Δσ,
///   std = σ_t√(−Δσ).
/// * Ode: μ = z + Δσ·v, std = 0.
pub fn transition(kind: SdeKind, z: &Tensor, v: &Tensor, sigma: f64, sigma_next: f64, sigma1: f64) -> Result<(Tensor, f64)> {
    check_shapes(z, v)?;
    let (a, b, std) = transition_coeffs(kind, sigma, sigma_next, sigma1)?;
    Ok(((z.affine(a, 0.0)? + v.affine(b, 0.0)?)?, std))
}

/// [`transition`] for a batch whose rows sit at different noise levels, `steps[r] = (σ_k,
/// σ_{k+1})` of row r: one broadcast op per term instead of a chain of ops per row. Equal
/// bit for bit to [`transition`] row by row (x·a + 0 = x·a), so rollout and update
/// log-probs agree exactly.
pub fn transition_rows(kind: SdeKind, z: &Tensor, v: &Tensor, steps: &[(f64, f64)], sigma1: f64) -> Result<(Tensor, Vec<f64>)> {
    check_shapes(z, v)?;
    ensure!(z.dim(0)? == steps.len(), "sampler::transition_rows: {} rows but {} noise levels", z.dim(0)?, steps.len());
    let mut coeffs = Vec::with_capacity(steps.len());
    for &(s, sn) in steps {
        coeffs.push(transition_coeffs(kind, s, sn, sigma1)?);
    }
    let a = row_scalars(z, coeffs.iter().map(|c| c.0))?;
    let b = row_scalars(z, coeffs.iter().map(|c| c.1))?;
    let mean = (z.broadcast_mul(&a)? + v.broadcast_mul(&b)?)?;
    Ok((mean, coeffs.iter().map(|c| c.2).collect()))
}

/// Per-row scalars shaped (B, 1, ..., 1) to broadcast over `like` (B, ...).
fn row_scalars(like: &Tensor, vals: impl Iterator<Item = f64>) -> Result<Tensor> {
    let v: Vec<f32> = vals.map(|x| x as f32).collect();
    let mut shape = vec![1usize; like.rank()];
    shape[0] = v.len();
    Ok(Tensor::from_vec(v, shape, like.device())?.to_dtype(like.dtype())?)
}

fn check_shapes(z: &Tensor, v: &Tensor) -> Result<()> {
    ensure!(z.dims() == v.dims(), "sampler::transition: latent z has shape {:?} but velocity v has shape {:?}", z.dims(), v.dims());
    Ok(())
}

/// The transition mean is linear in z and v: μ = a·z + b·v, with (a, b, std) from the
/// formulas of [`transition`] (Dance: x̂₀ = z − σv and score = −(z + (1−σ)v)/σ give
/// a = 1 + ½η²Δσ/σ, b = Δσ + ½η²Δσ(1−σ)/σ).
pub fn transition_coeffs(kind: SdeKind, sigma: f64, sigma_next: f64, sigma1: f64) -> Result<(f64, f64, f64)> {
    ensure!(
        sigma.is_finite() && sigma_next.is_finite() && sigma > 0.0 && sigma <= 1.0 && sigma_next >= 0.0 && sigma_next < sigma,
        "sampler::transition: need 1 >= sigma > sigma_next >= 0, got sigma={sigma}, sigma_next={sigma_next}"
    );
    kind.validate()?;
    let dsigma = sigma_next - sigma; // < 0
    Ok(match kind {
        SdeKind::Ode => (1.0, dsigma, 0.0),
        SdeKind::Dance { eta } => {
            let k = 0.5 * eta * eta * dsigma / sigma;
            (1.0 + k, dsigma + k * (1.0 - sigma), eta * (sigma - sigma_next).sqrt())
        }
        SdeKind::Flow { a } => {
            // The published code replaces 1 − σ by 1 − σ₁ at σ = 1 to avoid dividing by zero.
            let denom = if sigma == 1.0 { 1.0 - sigma1 } else { 1.0 - sigma };
            ensure!(denom > 0.0 && denom.is_finite(), "sampler::transition: Flow-SDE at sigma=1 needs the schedule's second sigma sigma1 < 1 (got {sigma1})");
            let sigma_t = a * (sigma / denom).sqrt();
            let s2 = sigma_t * sigma_t;
            let cz = 1.0 + s2 * dsigma / (2.0 * sigma);
            let cv = (1.0 + s2 * (1.0 - sigma) / (2.0 * sigma)) * dsigma;
            (cz, cv, sigma_t * (-dsigma).sqrt())
        }
    })
}

/// Elementwise log N(x; mean, std²), same shape as `mean`.
///
/// `x_next` is detached (as in the published code: the sample is data, only the mean
/// carries gradient). `std` must be finite and > 0.
pub fn log_prob_dense(x_next: &Tensor, mean: &Tensor, std: f64) -> Result<Tensor> {
    ensure!(std.is_finite() && std > 0.0, "sampler::log_prob_dense: std must be finite and > 0 (got {std})");
    ensure!(x_next.dims() == mean.dims(), "sampler::log_prob_dense: sample has shape {:?} but mean has shape {:?}", x_next.dims(), mean.dims());
    let diff = (x_next.detach() - mean)?;
    let (mul, add) = log_prob_coeffs(std);
    Ok(diff.sqr()?.affine(mul, add)?)
}

/// log N = d²·mul + add with mul = −1/(2 std²), add = −ln std − ½ ln 2π.
fn log_prob_coeffs(std: f64) -> (f64, f64) {
    (-1.0 / (2.0 * std * std), -(std.ln() + 0.5 * (2.0 * std::f64::consts::PI).ln()))
}

/// [`log_prob_dense`] with one std per row (the rows of [`transition_rows`]); equal bit
/// for bit to it row by row.
pub fn log_prob_dense_rows(x_next: &Tensor, mean: &Tensor, stds: &[f64]) -> Result<Tensor> {
    ensure!(stds.iter().all(|s| s.is_finite() && *s > 0.0), "sampler::log_prob_dense: std must be finite and > 0 (got {stds:?})");
    ensure!(x_next.dims() == mean.dims() && mean.dim(0)? == stds.len(), "sampler::log_prob_dense: sample has shape {:?}, mean {:?}, {} stds", x_next.dims(), mean.dims(), stds.len());
    let diff = (x_next.detach() - mean)?;
    let mul = row_scalars(mean, stds.iter().map(|&s| log_prob_coeffs(s).0))?;
    let add = row_scalars(mean, stds.iter().map(|&s| log_prob_coeffs(s).1))?;
    Ok(diff.sqr()?.broadcast_mul(&mul)?.broadcast_add(&add)?)
}

/// How a dense (B, C, [T,] H, W) log-prob is reduced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogProbReduction {
    /// Mean over all non-batch elements → (B,): GRPO as published.
    MeanAll,
    /// Sum over the channel dim 1 → (B, [T,] H, W): one log-prob per latent position (ViPO).
    SumChannels,
    /// Mean over the channel dim 1 → (B, [T,] H, W): per-element log-prob at each position
    /// (ViPO under the per-sample trust region, whose position mean is GRPO's MeanAll).
    MeanChannels,
    /// Unchanged (B, C, [T,] H, W).
    Dense,
}

/// Apply a [`LogProbReduction`] to a dense log-prob (differentiable).
pub fn reduce(lp: &Tensor, how: LogProbReduction) -> Result<Tensor> {
    match how {
        LogProbReduction::Dense => Ok(lp.clone()),
        LogProbReduction::MeanAll => {
            ensure!(lp.rank() >= 2, "sampler::reduce: mean-all needs a batched tensor (B, ...), got shape {:?}", lp.dims());
            let b = lp.dim(0)?;
            Ok(lp.reshape((b, ()))?.mean(1)?)
        }
        LogProbReduction::SumChannels => {
            ensure!(lp.rank() >= 3, "sampler::reduce: sum-channels needs (B, C, ...) with spatial dims, got shape {:?}", lp.dims());
            Ok(lp.sum(1)?)
        }
        LogProbReduction::MeanChannels => {
            ensure!(lp.rank() >= 3, "sampler::reduce: mean-channels needs (B, C, ...) with spatial dims, got shape {:?}", lp.dims());
            Ok(lp.mean(1)?)
        }
    }
}

/// A sampled trajectory: everything the policy update needs to recompute log-probs.
#[derive(Debug, Clone)]
pub struct Trajectory {
    /// The schedule used (len = steps + 1).
    pub sigmas: Vec<f64>,
    /// steps+1 entries, each (B, C, [T,] H, W), detached; `latents[0]` is the initial noise.
    pub latents: Vec<Tensor>,
    /// One per step (reduced as asked), detached; empty for Ode.
    pub log_probs: Vec<Tensor>,
    pub init_noise: Tensor,
}

impl Trajectory {
    /// Number of transitions.
    pub fn steps(&self) -> usize {
        self.sigmas.len().saturating_sub(1)
    }
    /// The final (clean) latent.
    pub fn last(&self) -> &Tensor {
        // `sample` always stores at least the initial latent.
        &self.latents[self.latents.len() - 1]
    }
}

/// Error unless `sigmas` is a usable schedule: ≥ 2 entries, finite, in [0, 1], strictly decreasing.
pub fn validate_sigmas(sigmas: &[f64]) -> Result<()> {
    ensure!(sigmas.len() >= 2, "sampler: schedule needs at least 2 sigmas (1 step), got {}", sigmas.len());
    for (k, &s) in sigmas.iter().enumerate() {
        ensure!(s.is_finite() && (0.0..=1.0).contains(&s), "sampler: sigma[{k}] = {s} is not a finite value in [0, 1]");
        if k > 0 {
            ensure!(s < sigmas[k - 1], "sampler: schedule must be strictly decreasing, but sigma[{k}] = {s} >= sigma[{}] = {}", k - 1, sigmas[k - 1]);
        }
    }
    Ok(())
}

/// Run the sampler. `velocity(z, sigma)` returns v for the batch at scalar sigma (the caller
/// turns σ into the model's timestep 1000·σ). Noise comes from `rng` (ChaCha8Rng) via
/// `rand_distr::StandardNormal` → `Tensor::from_vec` — not `Tensor::randn` (candle's CPU RNG
/// cannot be seeded), so runs are reproducible and resumable. Latents are detached every step
/// (candle has no no-grad mode). The noise of step k is drawn after the velocity of step k
/// is evaluated, one standard normal per element in row-major order.
pub fn sample(velocity: impl FnMut(&Tensor, f64) -> Result<Tensor>, init_noise: Tensor, sigmas: &[f64], kind: SdeKind, rng: &mut ChaCha8Rng, reduction: LogProbReduction) -> Result<Trajectory> {
    let steps = sigmas.len().saturating_sub(1);
    sample_mixed(velocity, init_noise, sigmas, kind, steps, rng, reduction)
}

/// [`sample`] with `kind` on the first `sde_steps` transitions only and deterministic Euler
/// after them (Flow-GRPO-Fast / MixGRPO style: all exploration, and so all credit, sits in
/// the high-noise steps where layout is decided). `log_probs` then holds those
/// `sde_steps` transitions; `sde_steps ≥ steps` is plain [`sample`].
pub fn sample_mixed(
    mut velocity: impl FnMut(&Tensor, f64) -> Result<Tensor>,
    init_noise: Tensor,
    sigmas: &[f64],
    kind: SdeKind,
    sde_steps: usize,
    rng: &mut ChaCha8Rng,
    reduction: LogProbReduction,
) -> Result<Trajectory> {
    validate_sigmas(sigmas)?;
    kind.validate()?;
    let init_noise = init_noise.detach();
    let sigma1 = sigmas[1];
    let steps = sigmas.len() - 1;
    let mut latents = Vec::with_capacity(steps + 1);
    let mut log_probs = Vec::with_capacity(if kind.is_stochastic() { steps.min(sde_steps) } else { 0 });
    latents.push(init_noise.clone());
    for k in 0..steps {
        let z = &latents[k];
        let (sigma, sigma_next) = (sigmas[k], sigmas[k + 1]);
        let v = velocity(z, sigma).with_context(|| format!("sampler: velocity at step {k} (sigma={sigma})"))?.detach();
        ensure!(v.dims() == z.dims(), "sampler: velocity at step {k} has shape {:?}, expected the latent shape {:?}", v.dims(), z.dims());
        let step_kind = if k < sde_steps { kind } else { SdeKind::Ode };
        let (mean, std) = transition(step_kind, z, &v, sigma, sigma_next, sigma1)?;
        let next = if step_kind.is_stochastic() {
            let xi = randn(z.dims(), rng, z.device())?.to_dtype(z.dtype())?;
            let next = (&mean + xi.affine(std, 0.0)?)?.detach();
            let lp = log_prob_dense(&next, &mean, std)?;
            log_probs.push(reduce(&lp, reduction)?.detach());
            next
        } else {
            mean.detach()
        };
        latents.push(next);
    }
    Ok(Trajectory { sigmas: sigmas.to_vec(), latents, log_probs, init_noise })
}

/// Standard-normal f32 tensor drawn from `rng` (reproducible, unlike `Tensor::randn` on CPU).
pub fn randn(shape: &[usize], rng: &mut ChaCha8Rng, device: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| rng.sample::<f32, _>(StandardNormal)).collect();
    Tensor::from_vec(data, shape, device).with_context(|| format!("sampler::randn: cannot build a tensor of shape {shape:?}"))
}

/// Initial noise for G-sized groups, shape (n_groups·group_size, ...shape).
///
/// `shared = true`: one noise per group, repeated G times (samples g·G .. (g+1)·G share it;
/// the group's diversity then comes from the SDE noise, as in DanceGRPO/ViPO).
/// `shared = false`: an independent noise per sample.
pub fn group_noise(n_groups: usize, group_size: usize, shape: &[usize], shared: bool, rng: &mut ChaCha8Rng, device: &Device) -> Result<Tensor> {
    if n_groups == 0 || group_size == 0 {
        bail!("sampler::group_noise: need n_groups >= 1 and group_size >= 1 (got {n_groups}, {group_size})");
    }
    let mut full = vec![n_groups * group_size];
    full.extend_from_slice(shape);
    if !shared {
        return randn(&full, rng, device);
    }
    let mut per_group = vec![n_groups, 1];
    per_group.extend_from_slice(shape);
    let noise = randn(&per_group, rng, device)?;
    let mut rep = vec![n_groups, group_size];
    rep.extend_from_slice(shape);
    // broadcast_as gives a strided view; reshape copies it into the (N, ...) layout.
    Ok(noise.broadcast_as(rep)?.contiguous()?.reshape(full)?.to_dtype(DType::F32)?)
}

/// ODE sampling for `vipo sample`, grids and evaluation (`[sample]`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SampleConfig {
    /// Euler ODE steps for evaluation sampling.
    pub steps: usize,
    /// Time shift s of the sigma schedule (σ' = sσ/(1+(s−1)σ)); 1 = none.
    pub shift: f64,
    /// Images per forward pass.
    pub batch_size: usize,
    /// Classifier-free guidance scale w: v = v_null + w·(v_prompt − v_null), one forward
    /// over [prompt; empty prompt]. 1 = off (one forward). Needs a base pretrained with
    /// `pretrain.cond_dropout` > 0.
    pub guidance: f64,
}

impl SampleConfig {
    pub fn validate(&self) -> Result<()> {
        anyhow::ensure!(self.steps >= 1, "sample.steps: must be ≥ 1");
        anyhow::ensure!(self.shift.is_finite() && self.shift > 0.0, "sample.shift: must be > 0 (got {})", self.shift);
        anyhow::ensure!(self.guidance.is_finite() && self.guidance >= 0.0, "sample.guidance: must be ≥ 0 (got {}; 1 = off)", self.guidance);
        Ok(())
    }
}

impl Default for SampleConfig {
    fn default() -> Self {
        Self { steps: 20, shift: 1.0, batch_size: 64, guidance: 1.0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn t(data: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_vec(data.to_vec(), shape, &Device::Cpu).unwrap()
    }
    fn flat(x: &Tensor) -> Vec<f32> {
        x.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }
    fn close(a: &[f32], b: &[f64], tol: f64) {
        assert_eq!(a.len(), b.len());
        for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
            assert!((x as f64 - y).abs() <= tol * (1.0 + y.abs()), "index {i}: {x} vs {y}");
        }
    }

    const Z: [f32; 4] = [0.5, -1.0, 2.0, 0.25];
    const V: [f32; 4] = [1.5, 0.3, -0.7, 0.0];

    #[test]
    fn schedule_endpoints_and_shift() {
        let s = sigmas(4, 1.0);
        assert_eq!(s, vec![1.0, 0.75, 0.5, 0.25, 0.0]);
        let s3 = sigmas(4, 3.0);
        assert_eq!(s3.len(), 5);
        assert_eq!(s3[0], 1.0);
        assert_eq!(s3[4], 0.0);
        // σ=0.5, s=3: 1.5/2 = 0.75; σ=0.25: 0.75/1.5 = 0.5; σ=0.75: 2.25/2.5 = 0.9.
        assert!((s3[1] - 0.9).abs() < 1e-12);
        assert!((s3[2] - 0.75).abs() < 1e-12);
        assert!((s3[3] - 0.5).abs() < 1e-12);
        assert!(s3.windows(2).all(|w| w[1] < w[0]));
        validate_sigmas(&s3).unwrap();
        assert!(validate_sigmas(&[1.0, 1.0, 0.0]).is_err());
        assert!(validate_sigmas(&sigmas(4, f64::NAN)).is_err());
    }

    #[test]
    fn dance_step_matches_hand_formula() {
        let (sigma, sn, eta) = (0.75f64, 0.5f64, 0.3f64);
        let (mean, std) = transition(SdeKind::Dance { eta }, &t(&Z, &[1, 1, 2, 2]), &t(&V, &[1, 1, 2, 2]), sigma, sn, 0.75).unwrap();
        let ds = sn - sigma;
        let want: Vec<f64> = Z
            .iter()
            .zip(V)
            .map(|(&z, v)| {
                let (z, v) = (z as f64, v as f64);
                let x0 = z - sigma * v;
                let score = -(z - (1.0 - sigma) * x0) / (sigma * sigma);
                z + ds * v - 0.5 * eta * eta * score * ds
            })
            .collect();
        close(&flat(&mean), &want, 1e-6);
        assert!((std - eta * (0.25f64).sqrt()).abs() < 1e-15);
        assert_eq!(mean.dims(), &[1, 1, 2, 2]);
    }

    #[test]
    fn flow_step_matches_hand_formula_including_sigma_one() {
        let a = 0.7f64;
        for &(sigma, sn, sigma1) in &[(0.6f64, 0.4f64, 0.8f64), (1.0, 0.8, 0.8)] {
            let (mean, std) = transition(SdeKind::Flow { a }, &t(&Z, &[2, 2]), &t(&V, &[2, 2]), sigma, sn, sigma1).unwrap();
            // At σ = 1 the denominator is 1 − σ₁ = 0.2, not 0.
            let denom = if sigma == 1.0 { 1.0 - sigma1 } else { 1.0 - sigma };
            let st = a * (sigma / denom).sqrt();
            let dt = sn - sigma;
            let want: Vec<f64> = Z
                .iter()
                .zip(V)
                .map(|(&z, v)| {
                    let (z, v) = (z as f64, v as f64);
                    z * (1.0 + st * st * dt / (2.0 * sigma)) + v * (1.0 + st * st * (1.0 - sigma) / (2.0 * sigma)) * dt
                })
                .collect();
            close(&flat(&mean), &want, 1e-6);
            assert!((std - st * (-dt).sqrt()).abs() < 1e-12, "sigma {sigma}");
            assert!(std.is_finite());
        }
        // σ = 1 with σ₁ = 1 would divide by zero: an error, not inf.
        assert!(transition(SdeKind::Flow { a }, &t(&Z, &[4]), &t(&V, &[4]), 1.0, 0.5, 1.0).is_err());
    }

    #[test]
    fn ode_step_is_euler() {
        let (mean, std) = transition(SdeKind::Ode, &t(&Z, &[4]), &t(&V, &[4]), 0.5, 0.25, 0.75).unwrap();
        assert_eq!(std, 0.0);
        let want: Vec<f64> = Z.iter().zip(V).map(|(&z, v)| z as f64 - 0.25 * v as f64).collect();
        close(&flat(&mean), &want, 1e-7);
    }

    /// The update's batched transition (one noise level per row) equals the rollout's
    /// scalar transition row by row, bit for bit, for every kind: the on-policy ratio
    /// check relies on it.
    #[test]
    fn row_wise_transition_and_log_prob_equal_the_scalar_ones_exactly() {
        let dev = Device::Cpu;
        let z = Tensor::randn(0f32, 1.0, (4, 3, 2, 2), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (4, 3, 2, 2), &dev).unwrap();
        let x = Tensor::randn(0f32, 1.0, (4, 3, 2, 2), &dev).unwrap();
        let steps = [(1.0, 0.9), (0.9, 0.6), (0.6, 0.3), (0.3, 0.1)];
        for kind in [SdeKind::Dance { eta: 0.3 }, SdeKind::Flow { a: 0.7 }, SdeKind::Ode] {
            let (mean, stds) = transition_rows(kind, &z, &v, &steps, 0.9).unwrap();
            for (r, &(s, sn)) in steps.iter().enumerate() {
                let (m1, std1) = transition(kind, &z.narrow(0, r, 1).unwrap(), &v.narrow(0, r, 1).unwrap(), s, sn, 0.9).unwrap();
                assert_eq!(stds[r], std1);
                assert_eq!(flat(&mean.narrow(0, r, 1).unwrap()), flat(&m1), "{kind:?} row {r}");
            }
            if kind.is_stochastic() {
                let lp = log_prob_dense_rows(&x, &mean, &stds).unwrap();
                for r in 0..steps.len() {
                    let l1 = log_prob_dense(&x.narrow(0, r, 1).unwrap(), &mean.narrow(0, r, 1).unwrap(), stds[r]).unwrap();
                    assert_eq!(flat(&lp.narrow(0, r, 1).unwrap()), flat(&l1), "{kind:?} row {r}");
                }
            }
        }
        assert!(transition_rows(SdeKind::Ode, &z, &v, &steps[..3], 0.9).is_err());
        assert!(log_prob_dense_rows(&x, &z, &[1.0, 1.0, 0.0, 1.0]).is_err());
    }

    /// The coefficient form μ = a·z + b·v equals Dance-SDE's published chain
    /// (x̂₀ = z − σv, score = −(z − (1−σ)x̂₀)/σ², μ = z + Δσ·v − ½η²·score·Δσ).
    #[test]
    fn dance_coefficients_equal_the_published_chain() {
        let (z, v, eta) = (0.7f64, -1.3f64, 0.3f64);
        for (s, sn) in [(1.0, 0.9), (0.5, 0.4), (0.2, 0.05)] {
            let x0 = z - s * v;
            let score = -(z - (1.0 - s) * x0) / (s * s);
            let want = z + (sn - s) * v - 0.5 * eta * eta * score * (sn - s);
            let (a, b, _) = transition_coeffs(SdeKind::Dance { eta }, s, sn, 0.9).unwrap();
            assert!((a * z + b * v - want).abs() < 1e-12, "σ {s}: {} vs {want}", a * z + b * v);
        }
    }

    #[test]
    fn transition_rejects_bad_input() {
        let z = t(&Z, &[4]);
        assert!(transition(SdeKind::Ode, &z, &t(&Z, &[2, 2]), 0.5, 0.25, 0.75).is_err());
        assert!(transition(SdeKind::Ode, &z, &z, 0.5, 0.5, 0.75).is_err());
        assert!(transition(SdeKind::Dance { eta: 0.0 }, &z, &z, 0.5, 0.25, 0.75).is_err());
        assert!(transition(SdeKind::Flow { a: f64::NAN }, &z, &z, 0.5, 0.25, 0.75).is_err());
    }

    #[test]
    fn log_prob_matches_gaussian() {
        let x = t(&[0.1, -0.4, 2.0], &[3]);
        let m = t(&[0.0, 0.3, 1.0], &[3]);
        let std = 0.37f64;
        let lp = flat(&log_prob_dense(&x, &m, std).unwrap());
        let want: Vec<f64> = [(0.1f64, 0.0f64), (-0.4, 0.3), (2.0, 1.0)]
            .iter()
            .map(|&(x, m)| {
                let (x, m) = (x as f32 as f64, m as f32 as f64);
                -(x - m).powi(2) / (2.0 * std * std) - std.ln() - 0.5 * (2.0 * std::f64::consts::PI).ln()
            })
            .collect();
        close(&lp, &want, 1e-6);
        assert!(log_prob_dense(&x, &m, 0.0).is_err());
        assert!(log_prob_dense(&x, &t(&[0.0], &[1]), 1.0).is_err());
    }

    #[test]
    fn log_prob_gradient_flows_to_mean_only() {
        let x = candle_core::Var::from_tensor(&t(&[0.5, 1.0], &[2])).unwrap();
        let m = candle_core::Var::from_tensor(&t(&[0.0, 0.0], &[2])).unwrap();
        let lp = log_prob_dense(x.as_tensor(), m.as_tensor(), 0.5).unwrap().sum_all().unwrap();
        let g = lp.backward().unwrap();
        assert!(g.get(x.as_tensor()).is_none(), "sample must be detached");
        // d/dm −(x−m)²/(2s²) = (x−m)/s² = 4(x−m).
        close(&flat(g.get(m.as_tensor()).unwrap()), &[2.0, 4.0], 1e-6);
    }

    #[test]
    fn reductions_shapes_and_values() {
        let data: Vec<f32> = (0..24).map(|i| i as f32).collect();
        let lp = t(&data, &[2, 3, 2, 2]);
        let dense = reduce(&lp, LogProbReduction::Dense).unwrap();
        assert_eq!(dense.dims(), &[2, 3, 2, 2]);
        let m = reduce(&lp, LogProbReduction::MeanAll).unwrap();
        assert_eq!(m.dims(), &[2]);
        close(&flat(&m), &[5.5, 17.5], 1e-6);
        let s = reduce(&lp, LogProbReduction::SumChannels).unwrap();
        assert_eq!(s.dims(), &[2, 2, 2]);
        // Position (b=0, y=0, x=0): channels at 0, 4, 8.
        close(&flat(&s)[..4], &[12.0, 15.0, 18.0, 21.0], 1e-6);
        // Video (B, C, T, H, W): sum over C keeps T.
        let v = Tensor::ones((2, 3, 4, 2, 2), DType::F32, &Device::Cpu).unwrap();
        let sv = reduce(&v, LogProbReduction::SumChannels).unwrap();
        assert_eq!(sv.dims(), &[2, 4, 2, 2]);
        assert!(flat(&sv).iter().all(|&x| x == 3.0));
        assert!(reduce(&t(&[1.0], &[1]), LogProbReduction::MeanAll).is_err());
    }

    /// A velocity with some structure so that the trajectory is non-trivial.
    fn toy_velocity(z: &Tensor, sigma: f64) -> Result<Tensor> {
        Ok((z.affine(0.8, 0.0)? + z.sin()?.affine(sigma, 0.1)?)?)
    }

    #[test]
    fn recomputed_log_prob_equals_sampling_time() {
        let steps = 4;
        let sig = sigmas(steps, 3.0);
        for kind in [SdeKind::Dance { eta: 0.3 }, SdeKind::Flow { a: 0.7 }] {
            for red in [LogProbReduction::MeanAll, LogProbReduction::SumChannels, LogProbReduction::Dense] {
                let mut rng = ChaCha8Rng::seed_from_u64(7);
                let init = randn(&[2, 3, 4, 4], &mut rng, &Device::Cpu).unwrap();
                let traj = sample(toy_velocity, init, &sig, kind, &mut rng, red).unwrap();
                assert_eq!(traj.latents.len(), steps + 1);
                assert_eq!(traj.log_probs.len(), steps);
                for k in 0..steps {
                    let z = &traj.latents[k];
                    let v = toy_velocity(z, sig[k]).unwrap();
                    let (mean, std) = transition(kind, z, &v, sig[k], sig[k + 1], sig[1]).unwrap();
                    let lp = reduce(&log_prob_dense(&traj.latents[k + 1], &mean, std).unwrap(), red).unwrap();
                    let (a, b) = (flat(&lp), flat(&traj.log_probs[k]));
                    for (x, y) in a.iter().zip(&b) {
                        assert!((x - y).abs() <= 1e-6, "{kind:?} {red:?} step {k}: {x} vs {y}");
                    }
                    assert!(a.iter().all(|x| x.is_finite()));
                }
            }
        }
    }

    /// SDE on the first k transitions only: k log-probs (recomputable as before), and the
    /// transitions after k are exact Euler steps drawing no noise.
    #[test]
    fn mixed_sampling_is_stochastic_only_in_the_window() {
        let steps = 5;
        let sig = sigmas(steps, 1.0);
        let kind = SdeKind::Dance { eta: 0.3 };
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let init = randn(&[2, 3, 4, 4], &mut rng, &Device::Cpu).unwrap();
        let tr = sample_mixed(toy_velocity, init, &sig, kind, 2, &mut rng, LogProbReduction::MeanAll).unwrap();
        assert_eq!((tr.latents.len(), tr.log_probs.len()), (steps + 1, 2));
        for k in 0..steps {
            let z = &tr.latents[k];
            let v = toy_velocity(z, sig[k]).unwrap();
            let step_kind = if k < 2 { kind } else { SdeKind::Ode };
            let (mean, std) = transition(step_kind, z, &v, sig[k], sig[k + 1], sig[1]).unwrap();
            if k < 2 {
                let lp = reduce(&log_prob_dense(&tr.latents[k + 1], &mean, std).unwrap(), LogProbReduction::MeanAll).unwrap();
                close(&flat(&lp), &flat(&tr.log_probs[k]).iter().map(|&x| x as f64).collect::<Vec<_>>(), 1e-6);
                assert_ne!(flat(&mean), flat(&tr.latents[k + 1]), "step {k} must be noisy");
            } else {
                assert_eq!(flat(&mean), flat(&tr.latents[k + 1]), "step {k} must be Euler");
            }
        }
        // sde_steps ≥ steps is plain `sample`.
        let run = |f: &dyn Fn(&mut ChaCha8Rng, Tensor) -> Trajectory| {
            let mut rng = ChaCha8Rng::seed_from_u64(4);
            let init = randn(&[1, 3, 4, 4], &mut rng, &Device::Cpu).unwrap();
            flat(f(&mut rng, init).last())
        };
        let a = run(&|r, i| sample(toy_velocity, i, &sig, kind, r, LogProbReduction::MeanAll).unwrap());
        let b = run(&|r, i| sample_mixed(toy_velocity, i, &sig, kind, 99, r, LogProbReduction::MeanAll).unwrap());
        assert_eq!(a, b);
    }

    #[test]
    fn sampling_is_deterministic_with_a_seed() {
        let sig = sigmas(3, 3.0);
        let run = |seed: u64| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let init = randn(&[2, 2, 3, 3], &mut rng, &Device::Cpu).unwrap();
            let tr = sample(toy_velocity, init, &sig, SdeKind::Dance { eta: 0.3 }, &mut rng, LogProbReduction::MeanAll).unwrap();
            (flat(tr.last()), flat(&tr.log_probs[1]))
        };
        assert_eq!(run(11), run(11));
        assert_ne!(run(11).0, run(12).0);
    }

    #[test]
    fn ode_has_no_log_probs_and_no_noise() {
        let sig = sigmas(3, 1.0);
        let init = t(&Z, &[1, 1, 2, 2]);
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let before = rng.clone();
        // Constant velocity v = 1: Euler integrates z − 1 exactly over σ: 1 → 0.
        let ones = |z: &Tensor, _s: f64| Ok(z.ones_like()?);
        let tr = sample(ones, init, &sig, SdeKind::Ode, &mut rng, LogProbReduction::MeanAll).unwrap();
        assert!(tr.log_probs.is_empty());
        assert_eq!(tr.steps(), 3);
        let want: Vec<f64> = Z.iter().map(|&z| z as f64 - 1.0).collect();
        close(&flat(tr.last()), &want, 1e-6);
        assert_eq!(rng, before, "ODE sampling must not consume randomness");
    }

    #[test]
    fn sample_rejects_bad_velocity_shape() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let bad = |_z: &Tensor, _s: f64| Ok(Tensor::zeros(3, DType::F32, &Device::Cpu)?);
        let err = sample(bad, t(&Z, &[1, 4]), &sigmas(2, 1.0), SdeKind::Ode, &mut rng, LogProbReduction::Dense).unwrap_err();
        assert!(format!("{err:#}").contains("velocity at step 0"), "{err:#}");
    }

    #[test]
    fn group_noise_shared_and_independent() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let n = group_noise(2, 3, &[2, 2, 2], true, &mut rng, &Device::Cpu).unwrap();
        assert_eq!(n.dims(), &[6, 2, 2, 2]);
        let rows: Vec<Vec<f32>> = (0..6).map(|i| flat(&n.get(i).unwrap())).collect();
        assert_eq!(rows[0], rows[1]);
        assert_eq!(rows[0], rows[2]);
        assert_eq!(rows[3], rows[5]);
        assert_ne!(rows[0], rows[3]);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let m = group_noise(2, 3, &[2, 2, 2], false, &mut rng, &Device::Cpu).unwrap();
        assert_eq!(m.dims(), &[6, 2, 2, 2]);
        let rows: Vec<Vec<f32>> = (0..6).map(|i| flat(&m.get(i).unwrap())).collect();
        assert_ne!(rows[0], rows[1]);
        assert!(group_noise(0, 3, &[2], true, &mut rng, &Device::Cpu).is_err());
    }

    #[test]
    fn randn_is_roughly_standard_normal() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let x = flat(&randn(&[10000], &mut rng, &Device::Cpu).unwrap());
        let mean = x.iter().map(|&v| v as f64).sum::<f64>() / x.len() as f64;
        let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / x.len() as f64;
        assert!(mean.abs() < 0.05 && (var - 1.0).abs() < 0.05, "mean {mean} var {var}");
    }
}
