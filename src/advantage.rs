//! Group-relative advantages (docs/DESIGN.md §1.2): A_i = (r_i − mean_G r)/(std_G r + 1e-8)
//! per prompt group, optionally with one std over the whole batch, clipped to ±clip.
//!
//! The per-position (ViPO) advantage A_i^p = clip(M_i(p)·A_i, ±clip) is built from these
//! scalars and the PSM map downstream; this module only produces the scalars.

use anyhow::{ensure, Result};

/// Which standard deviation normalises the advantages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StdKind {
    /// Sample std (divides by n−1), torch's `.std()`: what the official DanceGRPO/ViPO code uses.
    #[default]
    Sample,
    /// Population std (divides by n).
    Population,
}

/// Advantages for one batch of rewards.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupAdvantages {
    /// One advantage per sample, same order as the rewards.
    pub adv: Vec<f32>,
    /// Number of groups whose rewards were all equal (no learning signal; advantages exactly 0).
    pub zero_groups: usize,
}

/// The 1e-8 the published code adds to the std.
const STD_EPS: f64 = 1e-8;

fn std_of(xs: &[f64], kind: StdKind) -> f64 {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let ss: f64 = xs.iter().map(|x| (x - mean).powi(2)).sum();
    let denom = match kind {
        StdKind::Sample => n - 1.0,
        StdKind::Population => n,
    };
    (ss / denom).sqrt()
}

/// A_i = (r_i − mean_G r)/(std_G r + 1e-8) per consecutive group of `group_size`; `global_std`:
/// divide by the std over the whole batch instead; clip to ±clip. Groups with all-equal
/// rewards → exactly 0 and counted.
///
/// Errors if the length is not a multiple of `group_size`, `group_size < 2`, a reward is
/// non-finite (naming its index), or `clip` is NaN or not positive (`f32::INFINITY` = no clip).
/// Arithmetic is in f64.
pub fn group_advantages(rewards: &[f32], group_size: usize, std: StdKind, global_std: bool, clip: f32) -> Result<GroupAdvantages> {
    ensure!(group_size >= 2, "advantage: group_size must be >= 2 for group-relative advantages (got {group_size})");
    ensure!(rewards.len().is_multiple_of(group_size), "advantage: {} rewards is not a multiple of group_size {group_size}", rewards.len());
    ensure!(clip > 0.0, "advantage: clip must be > 0 (got {clip}); use inf for no clipping");
    if let Some(i) = rewards.iter().position(|r| !r.is_finite()) {
        anyhow::bail!("advantage: reward at index {i} is not finite ({})", rewards[i]);
    }
    let r: Vec<f64> = rewards.iter().map(|&x| x as f64).collect();
    let global = if global_std && !r.is_empty() { Some(std_of(&r, std)) } else { None };
    let clip = clip as f64;
    let mut adv = Vec::with_capacity(r.len());
    let mut zero_groups = 0;
    for g in r.chunks(group_size) {
        if g.iter().all(|&x| x == g[0]) {
            // No preference inside the group: exactly zero rather than 0/1e-8 round-off.
            zero_groups += 1;
            adv.extend(std::iter::repeat_n(0.0f32, g.len()));
            continue;
        }
        let mean = g.iter().sum::<f64>() / g.len() as f64;
        let sd = global.unwrap_or_else(|| std_of(g, std)) + STD_EPS;
        adv.extend(g.iter().map(|&x| ((x - mean) / sd).clamp(-clip, clip) as f32));
    }
    Ok(GroupAdvantages { adv, zero_groups })
}

/// ViPO pixel advantages (docs/DESIGN.md §1.4): A_i^p = clip(M_i(p)·A_i, ±clip). `maps[i]` is
/// sample i's allocation map (values in [0,1], so the sign of A_i never flips). Returns the
/// flattened (N, positions) values.
pub fn pixel_advantages(adv: &[f32], maps: &[Vec<f32>], clip: f32) -> Vec<f32> {
    adv.iter().zip(maps).flat_map(|(&a, m)| m.iter().map(move |&mp| (mp * a).clamp(-clip, clip))).collect()
}

/// The "map × reward" ablation: per-position rewards r_i^p = M_i(p)·r_i, group-normalised
/// at each position across the group (same std convention as the scalar advantage), then
/// clipped. Flattened (N, positions).
pub fn map_times_reward_advantages(rewards: &[f32], maps: &[Vec<f32>], group_size: usize, std: StdKind, global_std: bool, clip: f32) -> anyhow::Result<Vec<f32>> {
    let n = rewards.len();
    anyhow::ensure!(maps.len() == n, "map_times_reward_advantages: {} maps for {} rewards", maps.len(), n);
    let p = maps.first().map_or(0, |m| m.len());
    let mut out = vec![0f32; n * p];
    let mut column = vec![0f32; n];
    for pos in 0..p {
        for i in 0..n {
            column[i] = maps[i][pos] * rewards[i];
        }
        let ga = group_advantages(&column, group_size, std, global_std, clip)?;
        for i in 0..n {
            out[i * p + pos] = ga.adv[i];
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f32], b: &[f64]) {
        assert_eq!(a.len(), b.len());
        for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
            assert!((x as f64 - y).abs() < 1e-5, "index {i}: {x} vs {y}");
        }
    }

    #[test]
    fn sample_and_population_std() {
        // Group [1, 2, 3]: mean 2, sample std 1, population std sqrt(2/3).
        let a = group_advantages(&[1.0, 2.0, 3.0], 3, StdKind::Sample, false, 5.0).unwrap();
        close(&a.adv, &[-1.0, 0.0, 1.0]);
        assert_eq!(a.zero_groups, 0);
        let p = group_advantages(&[1.0, 2.0, 3.0], 3, StdKind::Population, false, 5.0).unwrap();
        let s = (2.0f64 / 3.0).sqrt();
        close(&p.adv, &[-1.0 / s, 0.0, 1.0 / s]);
        assert_eq!(StdKind::default(), StdKind::Sample);
    }

    #[test]
    fn groups_are_independent_and_zero_groups_counted() {
        let a = group_advantages(&[0.0, 2.0, 5.0, 5.0, 10.0, 30.0], 2, StdKind::Sample, false, 5.0).unwrap();
        // Group [0, 2]: mean 1, sample std sqrt(2).
        let s = 2f64.sqrt();
        close(&a.adv, &[-1.0 / s, 1.0 / s, 0.0, 0.0, -1.0 / s, 1.0 / s]);
        assert_eq!(a.adv[2], 0.0);
        assert_eq!(a.adv[3], 0.0);
        assert_eq!(a.zero_groups, 1);
        // Group means are zero.
        for g in a.adv.chunks(2) {
            assert!(g.iter().sum::<f32>().abs() < 1e-6);
        }
    }

    #[test]
    fn global_std_and_clip() {
        let r = [0.0f32, 2.0, 10.0, 30.0];
        let a = group_advantages(&r, 2, StdKind::Population, true, 100.0).unwrap();
        // Global population std of [0, 2, 10, 30]: mean 10.5, var = (110.25+72.25+0.25+380.25)/4.
        let gs = ((110.25f64 + 72.25 + 0.25 + 380.25) / 4.0).sqrt();
        close(&a.adv, &[-1.0 / gs, 1.0 / gs, -10.0 / gs, 10.0 / gs]);
        // Clip: group [0, 100, 100, 100, 100, 100, 100, 100] gives −2.47 for the outlier (sample std).
        let mut r = vec![100.0f32; 8];
        r[0] = 0.0;
        let c = group_advantages(&r, 8, StdKind::Sample, false, 1.5).unwrap();
        assert_eq!(c.adv[0], -1.5);
        assert!(c.adv[1] > 0.0 && c.adv[1] < 1.5);
        let u = group_advantages(&r, 8, StdKind::Sample, false, f32::INFINITY).unwrap();
        assert!(u.adv[0] < -2.0);
    }

    #[test]
    fn errors_name_the_problem() {
        let e = group_advantages(&[1.0, f32::NAN, 0.0, 1.0], 2, StdKind::Sample, false, 5.0).unwrap_err();
        assert!(e.to_string().contains("index 1"), "{e}");
        assert!(group_advantages(&[1.0, 2.0, 3.0], 2, StdKind::Sample, false, 5.0).is_err());
        assert!(group_advantages(&[1.0, 2.0], 1, StdKind::Sample, false, 5.0).is_err());
        assert!(group_advantages(&[1.0, 2.0], 2, StdKind::Sample, false, f32::NAN).is_err());
        assert!(group_advantages(&[1.0, f32::INFINITY], 2, StdKind::Sample, false, 5.0).is_err());
    }

    #[test]
    fn std_kind_serde_is_kebab_case() {
        assert_eq!(serde_json::to_string(&StdKind::Population).unwrap(), "\"population\"");
        let k: StdKind = serde_json::from_str("\"sample\"").unwrap();
        assert_eq!(k, StdKind::Sample);
    }
}
