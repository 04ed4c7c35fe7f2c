//! A weighted set of rewards (docs/DESIGN.md §1.5). Each reward keeps its own scores so that it
//! gets its own group-normalised advantage and clipped loss downstream; the set never
//! pre-sums them (only [`weighted_total`], for logging).

use super::{Reward, RewardInfo};
use crate::image::Samples;
use crate::prompt::Prompt;
use anyhow::{bail, ensure, Result};

/// Rewards with their loss coefficients.
pub struct RewardSet {
    entries: Vec<(Box<dyn Reward>, f32)>,
}

impl RewardSet {
    /// Build a set; errors on an empty set or a non-finite weight.
    pub fn new(entries: Vec<(Box<dyn Reward>, f32)>) -> Result<Self> {
        ensure!(!entries.is_empty(), "reward set: at least one reward is needed");
        for (r, w) in &entries {
            ensure!(w.is_finite(), "reward set: weight of reward '{}' is not finite ({w})", r.info().name);
        }
        Ok(Self { entries })
    }

    /// Number of rewards.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Always false for a constructed set (kept for clippy's `len_without_is_empty`).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every reward can score these prompts (e.g. the ShapeWorld rewards need scenes).
    pub fn check_prompts(&self, prompts: &[Prompt]) -> Result<()> {
        for (r, _) in &self.entries {
            r.check_prompts(prompts)?;
        }
        Ok(())
    }

    /// Static info of each reward, in order.
    pub fn infos(&self) -> Vec<RewardInfo> {
        self.entries.iter().map(|(r, _)| r.info()).collect()
    }

    /// Weight of each reward, in order.
    pub fn weights(&self) -> Vec<f32> {
        self.entries.iter().map(|(_, w)| *w).collect()
    }

    /// Scores per reward, per sample: `out[k][i]` is reward k on sample i. Errors (naming the
    /// reward and sample index) if a reward fails, returns the wrong count, or any NaN/Inf.
    /// `prompts` holds one prompt per sample, or is empty when every reward ignores prompts
    /// (a reward that needs them then errors itself).
    pub fn score(&self, samples: &Samples, prompts: &[Prompt]) -> Result<Vec<Vec<f32>>> {
        ensure!(prompts.is_empty() || samples.len() == prompts.len(), "reward set: {} samples but {} prompts", samples.len(), prompts.len());
        let mut out = Vec::with_capacity(self.entries.len());
        for (reward, _) in &self.entries {
            let name = reward.info().name;
            let s = reward.score(samples, prompts).map_err(|e| e.context(format!("reward '{name}' failed")))?;
            check_scores(&name, &s, samples.len())?;
            out.push(s);
        }
        Ok(out)
    }
}

/// Σ_k w_k·scores[k][i] per sample, for logging only (training uses one advantage per
/// reward). Rewards missing from `scores` contribute nothing; samples are those of the
/// first reward. Used for image and video reward sets alike.
pub fn weighted_total(scores: &[Vec<f32>], weights: &[f32]) -> Vec<f32> {
    let n = scores.first().map_or(0, |s| s.len());
    let mut total = vec![0.0f32; n];
    for (w, s) in weights.iter().zip(scores) {
        for (t, x) in total.iter_mut().zip(s) {
            *t += w * x;
        }
    }
    total
}

/// One reward's scores must be one per sample and all finite (errors name the reward and
/// the sample). Shared by image and video reward sets.
pub fn check_scores(name: &str, s: &[f32], n: usize) -> Result<()> {
    ensure!(s.len() == n, "reward '{name}' returned {} scores for {n} samples", s.len());
    if let Some(i) = s.iter().position(|x| !x.is_finite()) {
        bail!("reward '{name}' gave a non-finite score ({}) for sample {i}", s[i]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reward::redness::Redness;

    /// Returns fixed scores; used to inject NaN/Inf.
    struct Fixed(Vec<f32>);
    impl Reward for Fixed {
        fn info(&self) -> RewardInfo {
            RewardInfo { name: "fixed".into(), version: "0".into(), range: (-1.0, 1.0), higher_is_better: true }
        }
        fn inputs(&self) -> crate::reward::Inputs {
            crate::reward::Inputs::Any
        }
        fn score(&self, _samples: &Samples, _prompts: &[Prompt]) -> Result<Vec<f32>> {
            Ok(self.0.clone())
        }
    }

    fn imgs() -> Samples {
        Samples::Images(vec![crate::image::Image::filled(2, 2, [1.0, 0.0, 0.0]), crate::image::Image::filled(2, 2, [0.0, 1.0, 1.0])])
    }
    /// These rewards ignore prompts, so pass none.
    fn prompts() -> Vec<Prompt> {
        Vec::new()
    }

    #[test]
    fn scores_per_reward_and_weighted_total() {
        let set = RewardSet::new(vec![(Box::new(Redness), 2.0), (Box::new(Fixed(vec![0.5, 0.25])), -1.0)]).unwrap();
        let s = set.score(&imgs(), &prompts()).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0], vec![1.0, -1.0]);
        assert_eq!(s[1], vec![0.5, 0.25]);
        assert_eq!(weighted_total(&s, &set.weights()), vec![1.5, -2.25]);
        assert_eq!(set.weights(), vec![2.0, -1.0]);
        assert_eq!(set.infos()[0].name, "redness");
    }

    #[test]
    fn rejects_non_finite_scores_naming_reward_and_sample() {
        let set = RewardSet::new(vec![(Box::new(Redness), 1.0), (Box::new(Fixed(vec![0.0, f32::NAN])), 1.0)]).unwrap();
        let e = set.score(&imgs(), &prompts()).unwrap_err().to_string();
        assert!(e.contains("'fixed'") && e.contains("sample 1"), "{e}");
        let set = RewardSet::new(vec![(Box::new(Fixed(vec![f32::INFINITY, 0.0])), 1.0)]).unwrap();
        assert!(set.score(&imgs(), &prompts()).unwrap_err().to_string().contains("sample 0"));
        // Wrong count and mismatched prompts are errors too.
        let set = RewardSet::new(vec![(Box::new(Fixed(vec![0.0])), 1.0)]).unwrap();
        assert!(set.score(&imgs(), &prompts()).is_err());
        assert!(RewardSet::new(vec![]).is_err());
        assert!(RewardSet::new(vec![(Box::new(Redness), f32::NAN)]).is_err());
    }
}
