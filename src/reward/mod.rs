//! Rewards: decoded images + their prompts → one finite score per sample.
//! One file per reward; each implements [`Reward`].

pub mod compositional;
pub mod redness;
pub mod set;

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
