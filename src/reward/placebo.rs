//! A placebo reward for null controls: each sample gets a pseudo-random score in [0, 1)
//! from a hash of its pixels. It carries no information about the image, so whatever a
//! policy does under it (drift, collapse) is what the estimator's noise alone does to it —
//! the control to hold a real reward's run against. Deterministic (the same pixels always
//! score the same), so runs stay reproducible.

use super::{Inputs, Reward, RewardInfo};
use crate::image::{Image, Samples};
use crate::prompt::Prompt;
use anyhow::Result;

/// The placebo reward; ignores the prompt and what the image shows.
#[derive(Clone, Copy, Debug, Default)]
pub struct Placebo;

/// SplitMix64's finaliser: a cheap hash with good avalanche, so neighbouring pixel values
/// give unrelated scores.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn hash_image(h: u64, img: &Image) -> u64 {
    let h = mix(h ^ ((img.h as u64) << 32 | img.w as u64));
    img.data.iter().fold(h, |h, v| mix(h ^ v.to_bits() as u64))
}

/// A hash's top 24 bits as a score in [0, 1) (exact in f32).
fn unit(h: u64) -> f32 {
    (h >> 40) as f32 / (1u64 << 24) as f32
}

impl Reward for Placebo {
    fn info(&self) -> RewardInfo {
        RewardInfo { name: "placebo".into(), version: "1".into(), range: (0.0, 1.0), higher_is_better: true }
    }
    fn inputs(&self) -> Inputs {
        Inputs::Any
    }
    fn score(&self, samples: &Samples, _prompts: &[Prompt]) -> Result<Vec<f32>> {
        Ok(match samples {
            Samples::Images(images) => images.iter().map(|im| unit(hash_image(0x9e37_79b9_7f4a_7c15, im))).collect(),
            Samples::Clips(clips) => clips.iter().map(|c| unit(c.iter().fold(0x9e37_79b9_7f4a_7c15, hash_image))).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn images(n: usize, seed: u64) -> Vec<Image> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| Image { h: 8, w: 8, data: (0..192).map(|_| rng.gen::<f32>()).collect() }).collect()
    }

    #[test]
    fn deterministic_in_range_and_spread_like_a_uniform() {
        let ims = images(2000, 1);
        let a = Placebo.score(&Samples::Images(ims.clone()), &[]).unwrap();
        let b = Placebo.score(&Samples::Images(ims), &[]).unwrap();
        assert_eq!(a, b);
        assert!(a.iter().all(|s| (0.0..1.0).contains(s)));
        let mean = a.iter().sum::<f32>() / a.len() as f32;
        let var = a.iter().map(|s| (s - mean).powi(2)).sum::<f32>() / a.len() as f32;
        // Uniform: mean 1/2 ± 3·0.29/√2000, variance 1/12.
        assert!((mean - 0.5).abs() < 0.02, "mean {mean}");
        assert!((var - 1.0 / 12.0).abs() < 0.006, "var {var}");
    }

    #[test]
    fn carries_no_information_about_the_image() {
        // Images whose redness rises steadily: the placebo's scores must not follow it, and
        // a one-bit change of one pixel must give an unrelated score.
        let n = 1000;
        let ims: Vec<Image> = (0..n).map(|i| Image::filled(4, 4, [i as f32 / n as f32, 0.2, 0.3])).collect();
        let s = Placebo.score(&Samples::Images(ims), &[]).unwrap();
        let x: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let (mx, ms) = (x.iter().sum::<f32>() / n as f32, s.iter().sum::<f32>() / n as f32);
        let cov: f32 = x.iter().zip(&s).map(|(a, b)| (a - mx) * (b - ms)).sum();
        let sx = x.iter().map(|a| (a - mx).powi(2)).sum::<f32>().sqrt();
        let ss = s.iter().map(|b| (b - ms).powi(2)).sum::<f32>().sqrt();
        let corr = cov / (sx * ss);
        assert!(corr.abs() < 0.1, "correlation with redness {corr}");
        let mut im = images(1, 2).remove(0);
        let before = Placebo.score(&Samples::Images(vec![im.clone()]), &[]).unwrap()[0];
        im.data[17] = f32::from_bits(im.data[17].to_bits() ^ 1);
        let after = Placebo.score(&Samples::Images(vec![im]), &[]).unwrap()[0];
        assert!((before - after).abs() > 1e-3, "{before} vs {after}");
    }

    #[test]
    fn clips_score_their_frames_in_order() {
        let f = images(2, 3);
        let s = Placebo.score(&Samples::Clips(vec![f.clone(), vec![f[1].clone(), f[0].clone()]]), &[]).unwrap();
        assert_ne!(s[0], s[1]);
        assert!(s.iter().all(|v| (0.0..1.0).contains(v)));
    }

    #[test]
    fn built_by_its_config_name() {
        let r = crate::reward::build("placebo").unwrap();
        assert_eq!(r.info().name, "placebo");
        let ims = images(3, 4);
        assert_eq!(r.score(&Samples::Images(ims.clone()), &[]).unwrap(), Placebo.score(&Samples::Images(ims), &[]).unwrap());
    }
}
