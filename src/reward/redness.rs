//! The paper's rule-based toy reward: r = mean over pixels of (R − ½(G + B)).
//! Pure red scores 1, pure cyan −1, any grey 0.

use super::{Inputs, Reward, RewardInfo};
use crate::image::{Image, Samples};
use crate::prompt::Prompt;
use anyhow::{ensure, Result};

/// Redness reward; ignores the prompt.
#[derive(Clone, Copy, Debug, Default)]
pub struct Redness;

impl Redness {
    /// Score one image.
    pub fn score_one(img: &Image) -> Result<f32> {
        let n = img.h * img.w;
        ensure!(n > 0, "redness: image is empty ({}x{})", img.h, img.w);
        ensure!(img.data.len() == 3 * n, "redness: image data has {} values, expected 3*{}*{} = {}", img.data.len(), img.h, img.w, 3 * n);
        let (r, rest) = img.data.split_at(n);
        let (g, b) = rest.split_at(n);
        // Accumulate in f64: the mean of many small differences loses digits in f32.
        let sum: f64 = (0..n).map(|i| r[i] as f64 - 0.5 * (g[i] as f64 + b[i] as f64)).sum();
        Ok((sum / n as f64) as f32)
    }
}

impl Reward for Redness {
    fn info(&self) -> RewardInfo {
        RewardInfo { name: "redness".into(), version: "1".into(), range: (-1.0, 1.0), higher_is_better: true }
    }

    fn inputs(&self) -> Inputs {
        Inputs::Any
    }
    /// Images: the mean over pixels; clips: the mean over frames of that.
    fn score(&self, samples: &Samples, _prompts: &[Prompt]) -> Result<Vec<f32>> {
        match samples {
            Samples::Images(images) => images.iter().enumerate().map(|(i, im)| Self::score_one(im).map_err(|e| e.context(format!("redness: sample {i}")))).collect(),
            Samples::Clips(clips) => clips
                .iter()
                .enumerate()
                .map(|(i, c)| {
                    anyhow::ensure!(!c.is_empty(), "redness: clip {i} has no frames");
                    let mut s = 0.0;
                    for f in c {
                        s += Self::score_one(f).map_err(|e| e.context(format!("redness: clip {i}")))?;
                    }
                    Ok(s / c.len() as f32)
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_images() {
        let cases: [([f32; 3], f32); 5] = [([1.0, 0.0, 0.0], 1.0), ([0.0, 1.0, 1.0], -1.0), ([0.5, 0.5, 0.5], 0.0), ([0.8, 0.2, 0.4], 0.5), ([0.0, 0.0, 1.0], -0.5)];
        let images: Vec<Image> = cases.iter().map(|(c, _)| Image::filled(4, 5, *c)).collect();
        let s = Redness.score(&Samples::Images(images), &[]).unwrap();
        for ((_, want), got) in cases.iter().zip(&s) {
            assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        }
    }

    #[test]
    fn mean_over_pixels_and_bad_images() {
        // Half red, half black: 0.5.
        let mut im = Image::new(2, 2);
        im.set(0, 0, 0, 1.0);
        im.set(0, 0, 1, 1.0);
        assert!((Redness::score_one(&im).unwrap() - 0.5).abs() < 1e-6);
        let bad = Image { h: 2, w: 2, data: vec![0.0; 5] };
        let e = Redness.score(&Samples::Images(vec![im, bad]), &[]).unwrap_err();
        assert!(format!("{e:#}").contains("sample 1"), "{e:#}");
        assert_eq!(Redness.info().name, "redness");
    }
}
