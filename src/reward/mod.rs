//! Rewards: decoded samples (images or clips) + their prompts → one finite score per
//! sample. One file per reward; each implements [`Reward`].

pub mod compositional;
pub mod redness;
pub mod set;
pub mod video;

use crate::image::Samples;
use crate::prompt::Prompt;

/// Static facts about a reward, recorded with every run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RewardInfo {
    pub name: String,
    pub version: String,
    /// Nominal range of the score (min, max).
    pub range: (f32, f32),
    pub higher_is_better: bool,
}

/// What a reward scores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inputs {
    Images,
    Clips,
    Any,
}

impl Inputs {
    pub fn accepts(self, modality: crate::config::Modality) -> bool {
        use crate::config::Modality;
        matches!((self, modality), (Inputs::Any, _) | (Inputs::Images, Modality::Image) | (Inputs::Clips, Modality::Video))
    }
}

/// One reward over a batch of samples. Like Flow-GRPO's `reward(images, prompts,
/// metadata)`: the prompt's text, its ShapeWorld scene when it has one, and the metadata of
/// its JSONL line all come in [`Prompt`].
pub trait Reward: Send + Sync {
    fn info(&self) -> RewardInfo;
    fn inputs(&self) -> Inputs;
    /// One score per sample (`prompts[i]` is sample i's). Must be finite; the trainer checks
    /// and aborts the step otherwise.
    fn score(&self, samples: &Samples, prompts: &[Prompt]) -> anyhow::Result<Vec<f32>>;
    /// Whether the reward can score samples of these prompts, checked before a run starts
    /// (a rule-based ShapeWorld reward needs each prompt's scene).
    fn check_prompts(&self, _prompts: &[Prompt]) -> anyhow::Result<()> {
        Ok(())
    }
}

const KNOWN: &str = "compositional, redness, video_quality, motion_quality";

/// A reward by its config name.
pub fn build(name: &str) -> anyhow::Result<Box<dyn Reward>> {
    Ok(match name {
        "compositional" => Box::new(compositional::Compositional::new()),
        "redness" => Box::new(redness::Redness),
        "video_quality" => Box::new(video::VideoQuality::new()),
        "motion_quality" => Box::new(video::MotionQuality::new()),
        other => anyhow::bail!("train.rewards: unknown reward {other:?} (known: {KNOWN})"),
    })
}

/// The weighted reward set of a run; each reward keeps its own advantage and loss term.
/// Every reward must score what `modality` samples.
pub fn build_set(entries: &[crate::config::RewardEntry], modality: crate::config::Modality) -> anyhow::Result<set::RewardSet> {
    let mut v = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let r = build(&e.name)?;
        anyhow::ensure!(
            r.inputs().accepts(modality),
            "train.rewards[{i}]: reward {:?} scores {:?}, and modality = {:?} samples {}",
            e.name,
            r.inputs(),
            modality,
            if modality == crate::config::Modality::Video { "clips (video runs need video rewards)" } else { "images" }
        );
        v.push((r, e.weight as f32));
    }
    set::RewardSet::new(v)
}
