//! The clipped surrogate objective (docs/DESIGN.md §1.4) and Flow-GRPO's optional KL term.
//!
//!   L = − mean( min(ρ·A, clip(ρ, 1−ε, 1+ε)·A) ),   ρ = exp(logp_new − logp_old)
//!
//! The same function serves GRPO (per-sample log-probs and advantages, shape (B,)), ViPO
//! (per-position log-probs and advantages, (B, [T,] H, W)) and the published FLUX code's
//! "per-sample ratio" ablation (per-sample log-probs broadcast over a per-position
//! advantage map). Shapes are aligned from the batch dim (leading dims), not numpy-style
//! from the trailing dims, so a (B,) tensor broadcasts against (B, H, W) as (B, 1, 1).

use anyhow::{bail, ensure, Result};
use candle_core::{Shape, Tensor};

/// The loss and the ratio statistics worth logging.
#[derive(Debug, Clone)]
pub struct Surrogate {
    /// Scalar, differentiable w.r.t. `logp_new`.
    pub loss: Tensor,
    /// Mean of ρ over the ratio elements.
    pub ratio_mean: f64,
    /// max |ρ − 1| over the ratio elements.
    pub ratio_max_dev: f64,
    /// Fraction of ratio elements with |ρ − 1| > ε (Flow-GRPO's `clipfrac`).
    pub clip_frac: f64,
}

/// Pad `dims` with trailing 1s up to `rank`: a (B,) tensor becomes (B, 1, 1).
fn pad_trailing(dims: &[usize], rank: usize) -> Vec<usize> {
    let mut d = dims.to_vec();
    d.resize(rank.max(dims.len()), 1);
    d
}

/// Broadcast `a` and `b` to a common shape, aligning from the batch dim.
fn broadcast_leading(a: &Tensor, b: &Tensor, what: (&str, &str)) -> Result<(Tensor, Tensor)> {
    let rank = a.rank().max(b.rank());
    let (da, db) = (pad_trailing(a.dims(), rank), pad_trailing(b.dims(), rank));
    let mut out = Vec::with_capacity(rank);
    for (&x, &y) in da.iter().zip(&db) {
        out.push(match (x, y) {
            _ if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => bail!("objective: {} shape {:?} does not broadcast against {} shape {:?} (dims are aligned from the batch dim)", what.0, a.dims(), what.1, b.dims()),
        });
    }
    let shape = Shape::from(out);
    Ok((a.reshape(da)?.broadcast_as(&shape)?, b.reshape(db)?.broadcast_as(&shape)?))
}

/// L = −mean( min(ρ·A, clip(ρ, 1−ε, 1+ε)·A) ), ρ = exp(logp_new − logp_old). `adv` broadcasts
/// against the log-prob shape: (B,) for per-sample log-probs, or (B, [T,] H, W) per position
/// (or (B,1,1) broadcast). The mean runs over the broadcast shape (samples × positions).
///
/// `logp_old` and `adv` are treated as constants (detached); the gradient flows to `logp_new`
/// only, and is exactly zero where the clipped branch is the minimum.
pub fn clipped_surrogate(logp_new: &Tensor, logp_old: &Tensor, adv: &Tensor, eps: f64) -> Result<Surrogate> {
    ensure!(eps.is_finite() && eps > 0.0 && eps < 1.0, "objective: clip range eps must be in (0, 1) (got {eps})");
    ensure!(logp_new.dims() == logp_old.dims(), "objective: logp_new shape {:?} differs from logp_old shape {:?}", logp_new.dims(), logp_old.dims());
    ensure!(logp_new.rank() >= 1, "objective: log-probs need a batch dim, got a scalar");
    let ratio = (logp_new - logp_old.detach())?.exp()?;
    let (rho, a) = broadcast_leading(&ratio, &adv.detach().to_dtype(ratio.dtype())?, ("log-prob", "advantage"))?;
    let unclipped = (&rho * &a)?;
    let clipped = (rho.clamp(1.0 - eps, 1.0 + eps)? * &a)?;
    let loss = unclipped.minimum(&clipped)?.mean_all()?.neg()?;

    let r: Vec<f32> = ratio.detach().flatten_all()?.to_vec1()?;
    let n = r.len().max(1) as f64;
    let ratio_mean = r.iter().map(|&x| x as f64).sum::<f64>() / n;
    let ratio_max_dev = r.iter().map(|&x| (x as f64 - 1.0).abs()).fold(0.0, f64::max);
    let clip_frac = r.iter().filter(|&&x| (x as f64 - 1.0).abs() > eps).count() as f64 / n;
    if !ratio_mean.is_finite() {
        bail!("objective: importance ratio is not finite (logp_new − logp_old overflowed)");
    }
    Ok(Surrogate { loss, ratio_mean, ratio_max_dev, clip_frac })
}

/// ViPO's per-position surrogate under GRPO's trust region (`vipo.clip = "per-sample"`).
///
/// `logp_new`/`logp_old` are per-position log-probs (B, [T,] H, W) averaged over channels,
/// so ρ_p = exp(Δ_p) is the per-element geometric-mean ratio at position p, and the sample
/// ratio ρ_s = exp(mean_p Δ_p) is exactly GRPO's ratio (a mean over all elements). The loss
/// is −mean(ρ_p·A_p) with the gradient cut at every position of a sample whose ρ_s left
/// [1−ε, 1+ε] in the direction of A_p — PPO's clip, decided once per sample as GRPO decides
/// it. Why: a single position's ratio moves ≈ √(H·W) times more than the mean over the
/// image, so clipping it per position at GRPO's ε is a far tighter trust region
/// (bench/NOTES.md §4.2); this keeps the per-position credit (∂L/∂Δ_p ∝ A_p) and makes the
/// all-ones map reduce to GRPO (identical gradient while ρ = 1). Stats are on ρ_s.
pub fn clipped_surrogate_sample_trust(logp_new: &Tensor, logp_old: &Tensor, adv: &Tensor, eps: f64) -> Result<Surrogate> {
    ensure!(eps.is_finite() && eps > 0.0 && eps < 1.0, "objective: clip range eps must be in (0, 1) (got {eps})");
    ensure!(logp_new.dims() == logp_old.dims(), "objective: logp_new shape {:?} differs from logp_old shape {:?}", logp_new.dims(), logp_old.dims());
    ensure!(logp_new.rank() >= 2, "objective: the per-sample trust region needs per-position log-probs (B, ...), got shape {:?}", logp_new.dims());
    let b = logp_new.dim(0)?;
    let delta = (logp_new - logp_old.detach())?;
    let rho = delta.exp()?;
    let rho_s = delta.detach().reshape((b, ()))?.mean(1)?.exp()?; // (B,)
    let (rho_b, a) = broadcast_leading(&rho, &adv.detach().to_dtype(rho.dtype())?, ("log-prob", "advantage"))?;
    let (rs, _) = broadcast_leading(&rho_s, &a, ("sample ratio", "advantage"))?;
    // Clipped branch of min(ρA, clip(ρ)A): A > 0 with ρ_s > 1+ε, or A < 0 with ρ_s < 1−ε.
    let over = rs.gt(1.0 + eps)?.to_dtype(a.dtype())?;
    let under = rs.lt(1.0 - eps)?.to_dtype(a.dtype())?;
    let pos = a.gt(0.0)?.to_dtype(a.dtype())?;
    let neg = a.lt(0.0)?.to_dtype(a.dtype())?;
    let clipped = ((over * pos)? + (under * neg)?)?;
    let keep = clipped.affine(-1.0, 1.0)?;
    let term = ((&rho_b * &a)? * &keep)?;
    let frozen = ((rho_b.detach() * &a)? * &clipped)?;
    let loss = (term + frozen)?.mean_all()?.neg()?;

    let r: Vec<f32> = rho_s.to_vec1()?;
    let n = r.len().max(1) as f64;
    let ratio_mean = r.iter().map(|&x| x as f64).sum::<f64>() / n;
    let rp: Vec<f32> = rho.detach().flatten_all()?.to_vec1()?;
    let ratio_max_dev = rp.iter().map(|&x| (x as f64 - 1.0).abs()).fold(0.0, f64::max);
    let clip_frac = r.iter().filter(|&&x| (x as f64 - 1.0).abs() > eps).count() as f64 / n;
    if !ratio_mean.is_finite() || !ratio_max_dev.is_finite() {
        bail!("objective: importance ratio is not finite (logp_new − logp_old overflowed)");
    }
    Ok(Surrogate { loss, ratio_mean, ratio_max_dev, clip_frac })
}

/// Flow-GRPO KL per sample: the mean over a sample's elements of ‖μ_θ − μ_ref‖²/(2σ²) (the
/// per-element KL between two Gaussians with the same std σ), each row with its own
/// transition std → (B,). Flow-GRPO then averages over the batch and multiplies by β (the
/// caller's part). `mean_ref` is detached.
pub fn kl_penalty(mean_new: &Tensor, mean_ref: &Tensor, stds: &[f64]) -> Result<Tensor> {
    ensure!(stds.iter().all(|s| s.is_finite() && *s > 0.0), "objective::kl_penalty: std must be finite and > 0 (got {stds:?})");
    ensure!(
        mean_new.dims() == mean_ref.dims() && mean_new.dim(0)? == stds.len(),
        "objective::kl_penalty: policy mean shape {:?}, reference mean shape {:?}, {} stds",
        mean_new.dims(),
        mean_ref.dims(),
        stds.len()
    );
    let b = stds.len();
    let per_row = (mean_new - mean_ref.detach())?.sqr()?.reshape((b, ()))?.mean(1)?;
    let w = Tensor::from_vec(stds.iter().map(|s| (1.0 / (2.0 * s * s)) as f32).collect::<Vec<_>>(), b, mean_new.device())?.to_dtype(per_row.dtype())?;
    Ok((per_row * w)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn t(data: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_vec(data.to_vec(), shape, &Device::Cpu).unwrap()
    }
    fn flat(x: &Tensor) -> Vec<f32> {
        x.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }
    fn scalar(x: &Tensor) -> f64 {
        x.to_scalar::<f32>().unwrap() as f64
    }

    // ρ = [1.5, 1.5, 0.5, 0.5, 1.1], A = [+1, −1, +1, −1, +2], ε = 0.2:
    //   min(1.5, 1.2)  = 1.2   clipped (zero grad)
    //   min(−1.5, −1.2) = −1.5 unclipped
    //   min(0.5, 0.8)  = 0.5   unclipped
    //   min(−0.5, −0.8) = −0.8 clipped (zero grad)
    //   min(2.2, 2.2)  = 2.2   inside the range
    // L = −(1.2 − 1.5 + 0.5 − 0.8 + 2.2)/5 = −0.32.
    const RHO: [f32; 5] = [1.5, 1.5, 0.5, 0.5, 1.1];
    const ADV: [f32; 5] = [1.0, -1.0, 1.0, -1.0, 2.0];

    fn logp_new() -> Var {
        Var::from_tensor(&t(&RHO.map(f32::ln), &[5])).unwrap()
    }

    #[test]
    fn loss_and_stats_by_hand() {
        let lp = logp_new();
        let s = clipped_surrogate(lp.as_tensor(), &t(&[0.0; 5], &[5]), &t(&ADV, &[5]), 0.2).unwrap();
        assert!((scalar(&s.loss) + 0.32).abs() < 1e-6, "{}", scalar(&s.loss));
        assert!((s.clip_frac - 0.8).abs() < 1e-12);
        assert!((s.ratio_max_dev - 0.5).abs() < 1e-6);
        assert!((s.ratio_mean - 1.02).abs() < 1e-6);
    }

    #[test]
    fn gradient_is_zero_where_clipped() {
        let lp = logp_new();
        let old = Var::from_tensor(&t(&[0.0; 5], &[5])).unwrap();
        let s = clipped_surrogate(lp.as_tensor(), old.as_tensor(), &t(&ADV, &[5]), 0.2).unwrap();
        let g = s.loss.backward().unwrap();
        // dL/dlogp = −ρ·A/N on the unclipped terms, 0 on the clipped ones.
        let want = [0.0, 1.5 / 5.0, -0.5 / 5.0, 0.0, -2.2 / 5.0];
        let got = flat(g.get(lp.as_tensor()).unwrap());
        for (i, (&x, &y)) in got.iter().zip(&want).enumerate() {
            assert!((x as f64 - y).abs() < 1e-6, "index {i}: {x} vs {y}");
        }
        assert!(g.get(old.as_tensor()).is_none(), "logp_old must be a constant");
    }

    #[test]
    fn gradient_matches_finite_differences_inside_the_range() {
        // Away from the clip boundaries the loss is smooth: compare autograd to central differences.
        let base = [0.01f32, -0.02, 0.3, -0.25];
        let adv = t(&[0.7, -1.3, 0.4, -0.9], &[4]);
        let old = t(&[0.0; 4], &[4]);
        let lp = Var::from_tensor(&t(&base, &[4])).unwrap();
        let g = flat(clipped_surrogate(lp.as_tensor(), &old, &adv, 0.1).unwrap().loss.backward().unwrap().get(lp.as_tensor()).unwrap());
        let h = 1e-3f32;
        for i in 0..4 {
            let mut p = base;
            let mut m = base;
            p[i] += h;
            m[i] -= h;
            let lp_ = scalar(&clipped_surrogate(&t(&p, &[4]), &old, &adv, 0.1).unwrap().loss);
            let lm_ = scalar(&clipped_surrogate(&t(&m, &[4]), &old, &adv, 0.1).unwrap().loss);
            let fd = (lp_ - lm_) / (2.0 * h as f64);
            assert!((fd - g[i] as f64).abs() < 1e-3, "index {i}: fd {fd} vs autograd {}", g[i]);
        }
        // ρ = 1.35 with A > 0 and ρ = 0.78 with A < 0 sit on the clipped branch: zero gradient.
        assert!(g[0] != 0.0 && g[1] != 0.0);
        assert_eq!((g[2], g[3]), (0.0, 0.0));
    }

    #[test]
    fn per_position_with_constant_map_equals_per_sample() {
        let (b, h, w) = (2usize, 2usize, 3usize);
        let lp_new: Vec<f32> = (0..b * h * w).map(|i| 0.05 * ((i as f32) * 0.7).sin()).collect();
        let lp_new = t(&lp_new, &[b, h, w]);
        let lp_old = lp_new.zeros_like().unwrap();
        let a = [1.3f32, -0.6];
        let per_sample = clipped_surrogate(&lp_new, &lp_old, &t(&a, &[b]), 0.03).unwrap();
        let b11 = clipped_surrogate(&lp_new, &lp_old, &t(&a, &[b, 1, 1]), 0.03).unwrap();
        let map: Vec<f32> = a.iter().flat_map(|&x| std::iter::repeat_n(x, h * w)).collect();
        let dense = clipped_surrogate(&lp_new, &lp_old, &t(&map, &[b, h, w]), 0.03).unwrap();
        let l = scalar(&per_sample.loss);
        assert!((l - scalar(&b11.loss)).abs() < 1e-7);
        assert!((l - scalar(&dense.loss)).abs() < 1e-7);
        assert_eq!(per_sample.clip_frac, dense.clip_frac);

        // The "per-sample ratio" ablation: (B,) log-probs against a constant (B, H, W) map equals plain GRPO.
        let lps = t(&[0.02, -0.01], &[b]);
        let grpo = clipped_surrogate(&lps, &lps.zeros_like().unwrap(), &t(&a, &[b]), 0.03).unwrap();
        let ablation = clipped_surrogate(&lps, &lps.zeros_like().unwrap(), &t(&map, &[b, h, w]), 0.03).unwrap();
        assert!((scalar(&grpo.loss) - scalar(&ablation.loss)).abs() < 1e-7);
    }

    /// With a constant map, the per-sample trust region gives GRPO's loss and clip mask:
    /// per-position log-probs whose mean is GRPO's per-sample log-prob get the same loss
    /// while ρ = 1, the same clip decisions, and the same total gradient on each sample.
    #[test]
    fn sample_trust_with_constant_map_is_grpo() {
        let (b, h, w) = (3usize, 2usize, 2usize);
        let eps = 0.05;
        // Sample 0 inside the range, sample 1 above 1+ε (A > 0: clipped), sample 2 below 1−ε (A > 0: kept).
        let per_pos: Vec<f32> = [[0.01f32, -0.02, 0.03, 0.0], [0.2, 0.1, 0.05, 0.05], [-0.2, -0.1, 0.0, -0.1]].concat();
        let lp = Var::from_tensor(&t(&per_pos, &[b, h, w])).unwrap();
        let old = t(&[0.0; 12], &[b, h, w]);
        let a = [0.8f32, 1.1, 0.5];
        let s = clipped_surrogate_sample_trust(lp.as_tensor(), &old, &t(&a, &[b]), eps).unwrap();
        let mean_lp = lp.as_tensor().reshape((b, ())).unwrap().mean(1).unwrap();
        let g = clipped_surrogate(&mean_lp, &mean_lp.zeros_like().unwrap(), &t(&a, &[b]), eps).unwrap();
        assert_eq!(s.clip_frac, g.clip_frac);
        assert!((s.ratio_mean - g.ratio_mean).abs() < 1e-6);
        let gs = flat(s.loss.backward().unwrap().get(lp.as_tensor()).unwrap());
        let gg = flat(g.loss.backward().unwrap().get(lp.as_tensor()).unwrap());
        for i in 0..b {
            let sum_s: f32 = gs[i * 4..(i + 1) * 4].iter().sum();
            let sum_g: f32 = gg[i * 4..(i + 1) * 4].iter().sum();
            // Same zero pattern; the kept samples differ only by ρ_p vs ρ_s weights (≈ 1 ± 0.2 here).
            assert_eq!(sum_s == 0.0, sum_g == 0.0, "sample {i}: {sum_s} vs {sum_g}");
            assert!((sum_s - sum_g).abs() <= 0.25 * sum_g.abs() + 1e-7, "sample {i}: {sum_s} vs {sum_g}");
        }
        assert_eq!(gs[4..8].iter().map(|x| x.abs()).sum::<f32>(), 0.0, "sample 1 is clipped");
        // At ρ = 1 everywhere the two gradients are identical.
        let z = Var::from_tensor(&t(&[0.0; 12], &[b, h, w])).unwrap();
        let s0 = clipped_surrogate_sample_trust(z.as_tensor(), &old, &t(&a, &[b]), eps).unwrap();
        let m0 = z.as_tensor().reshape((b, ())).unwrap().mean(1).unwrap();
        let g0 = clipped_surrogate(&m0, &m0.zeros_like().unwrap(), &t(&a, &[b]), eps).unwrap();
        let (x, y) = (flat(s0.loss.backward().unwrap().get(z.as_tensor()).unwrap()), flat(g0.loss.backward().unwrap().get(z.as_tensor()).unwrap()));
        for (p, q) in x.iter().zip(&y) {
            assert!((p - q).abs() < 1e-7, "{p} vs {q}");
        }
    }

    /// A spatial map moves the gradient between positions but not the clip decision.
    #[test]
    fn sample_trust_keeps_per_position_credit() {
        let lp = Var::from_tensor(&t(&[0.0; 4], &[1, 2, 2])).unwrap();
        let old = t(&[0.0; 4], &[1, 2, 2]);
        let adv = t(&[2.0, 0.5, 0.5, 1.0], &[1, 2, 2]);
        let s = clipped_surrogate_sample_trust(lp.as_tensor(), &old, &adv, 0.1).unwrap();
        let g = flat(s.loss.backward().unwrap().get(lp.as_tensor()).unwrap());
        assert_eq!(g, vec![-0.5, -0.125, -0.125, -0.25]);
    }

    #[test]
    fn shape_errors_are_reported() {
        let lp = t(&[0.0; 6], &[2, 3]);
        let e = clipped_surrogate(&lp, &lp, &t(&[1.0; 3], &[3]), 0.1).unwrap_err();
        assert!(e.to_string().contains("advantage shape"), "{e}");
        assert!(clipped_surrogate(&lp, &t(&[0.0; 2], &[2]), &t(&[1.0; 2], &[2]), 0.1).is_err());
        assert!(clipped_surrogate(&lp, &lp, &t(&[1.0; 2], &[2]), 0.0).is_err());
    }

    #[test]
    fn kl_value_and_gradient() {
        let m = Var::from_tensor(&t(&[1.0, 2.0, 0.0, -1.0], &[1, 4])).unwrap();
        let r = t(&[0.0, 2.0, 1.0, 1.0], &[1, 4]);
        let kl = kl_penalty(m.as_tensor(), &r, &[0.5]).unwrap().sum_all().unwrap();
        // Squared diffs 1, 0, 1, 4 → mean 1.5; / (2·0.25) = 3.
        assert!((scalar(&kl) - 3.0).abs() < 1e-6);
        let g = flat(kl.backward().unwrap().get(m.as_tensor()).unwrap());
        // d/dμ = 2(μ − μ_ref)/(N·2σ²) = (μ − μ_ref)/(4·0.25).
        let want = [1.0, 0.0, -1.0, -2.0];
        for (x, y) in g.iter().zip(want) {
            assert!((x - y).abs() < 1e-6);
        }
        assert!(kl_penalty(m.as_tensor(), &r, &[0.0]).is_err());
        assert!(kl_penalty(m.as_tensor(), &t(&[0.0; 4], &[4]), &[1.0]).is_err());
    }

    /// Each row is averaged over its own elements and scaled by its own std.
    #[test]
    fn kl_rows_use_their_own_std() {
        let m = t(&[1.0, 2.0, 0.0, -1.0], &[2, 2]);
        let r = t(&[0.0, 2.0, 1.0, 1.0], &[2, 2]);
        let rows = flat(&kl_penalty(&m, &r, &[0.5, 0.25]).unwrap());
        // Row 0: squared diffs 1, 0 → 0.5 / (2·0.25) = 1; row 1: 1, 4 → 2.5 / (2·0.0625) = 20.
        for (got, want) in rows.iter().zip([1.0f32, 20.0]) {
            assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        }
        assert!(kl_penalty(&m, &r, &[0.5]).is_err());
    }
}

#[cfg(test)]
mod vipo_tests {
    use super::*;
    use candle_core::{Device, Var};

    /// On a toy policy whose SDE mean is a free parameter per latent element, ViPO's
    /// per-position objective puts the gradient where the allocation map is high.
    #[test]
    fn per_position_gradient_concentrates_on_high_map_positions() {
        let dev = Device::Cpu;
        let (c, h, w) = (3usize, 4usize, 4usize);
        let theta = Var::from_tensor(&Tensor::zeros((1, c, h, w), candle_core::DType::F32, &dev).unwrap()).unwrap();
        let x_next = Tensor::full(0.1f32, (1, c, h, w), &dev).unwrap();
        let std = 0.3;
        let lp = crate::sampler::log_prob_dense(&x_next, theta.as_tensor(), std).unwrap();
        let lp_pos = crate::sampler::reduce(&lp, crate::sampler::LogProbReduction::SumChannels).unwrap();
        let old = lp_pos.detach();
        // Map: 1 on the left half, 0.1 on the right half; scalar advantage +1.
        let map: Vec<f32> = (0..h * w).map(|i| if i % w < w / 2 { 1.0 } else { 0.1 }).collect();
        let adv = crate::advantage::pixel_advantages(&[1.0], std::slice::from_ref(&map), 5.0);
        let adv = Tensor::from_vec(adv, (1, h, w), &dev).unwrap();
        let s = clipped_surrogate(&lp_pos, &old, &adv, 1e-4).unwrap();
        let g = s.loss.backward().unwrap();
        let g: Vec<f32> = g.get(theta.as_tensor()).unwrap().abs().unwrap().sum(1).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let hi: f32 = (0..h * w).filter(|&i| map[i] > 0.5).map(|i| g[i]).sum();
        let lo: f32 = (0..h * w).filter(|&i| map[i] <= 0.5).map(|i| g[i]).sum();
        let ratio = hi / lo;
        assert!((ratio - 10.0).abs() < 1e-3, "gradient mass high/low map = {ratio}, expected the map ratio 10");
    }
}
