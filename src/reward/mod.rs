//! Rewards: decoded images + their prompts → one finite score per sample.
//! One file per reward; each implements [`Reward`].

pub mod compositional;
pub mod redness;
pub mod set;
pub mod video;

use crate::image::Image;
use crate::world::PromptSpec;

/// Static facts about a reward, recorded with every run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RewardInfo {
    pub name: String,
    pub version: String,
    /// Nominal range of the score (min, max).
    pub range: (f32, f32),
    pub higher_is_better: bool,
}

pub trait Reward: Send + Sync {
    fn info(&self) -> RewardInfo;
    /// One score per image. Must be finite; the trainer checks and aborts the step otherwise.
    fn score(&self, images: &[Image], prompts: &[PromptSpec]) -> anyhow::Result<Vec<f32>>;
}

/// A reward by its config name.
pub fn build(name: &str) -> anyhow::Result<Box<dyn Reward>> {
    Ok(match name {
        "compositional" => Box::new(compositional::Compositional::new()),
        "redness" => Box::new(redness::Redness),
        other => anyhow::bail!("train.rewards: unknown reward {other:?} (known: compositional, redness)"),
    })
}

/// The weighted reward set of a run; each reward keeps its own advantage and loss term.
pub fn build_set(entries: &[crate::config::RewardEntry]) -> anyhow::Result<set::RewardSet> {
    let mut v = Vec::new();
    for e in entries {
        v.push((build(&e.name)?, e.weight as f32));
    }
    set::RewardSet::new(v)
}
