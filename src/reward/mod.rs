//! Rewards: decoded samples (images or clips) + their prompts → one finite score per
//! sample. One file per reward; each implements [`Reward`].

pub mod aesthetic;
pub mod clip;
pub mod compositional;
pub mod hps;
pub mod placebo;
pub mod redness;
pub mod set;
pub mod video;

use crate::image::{SampleKind, Samples};
use crate::prompt::Prompt;
use serde::{Deserialize, Serialize};

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
    pub fn accepts(self, kind: SampleKind) -> bool {
        match self {
            Inputs::Any => true,
            Inputs::Images => kind == SampleKind::Images,
            Inputs::Clips => kind == SampleKind::Clips,
        }
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

const KNOWN: &str = "compositional, redness, placebo, video_quality, motion_quality, clipscore, pickscore, aesthetic, hpsv2";

/// A reward by its config name.
pub fn build(name: &str) -> anyhow::Result<Box<dyn Reward>> {
    Ok(match name {
        "compositional" => Box::new(compositional::Compositional::new()),
        "redness" => Box::new(redness::Redness),
        "placebo" => Box::new(placebo::Placebo),
        "video_quality" => Box::new(video::VideoQuality::new()),
        "motion_quality" => Box::new(video::MotionQuality::new()),
        "clipscore" | "pickscore" | "aesthetic" | "hpsv2" => anyhow::bail!("reward {name:?} needs its model: set train.rewards[].weights to a CLIPModel folder or a Hugging Face repository id"),
        other => anyhow::bail!("train.rewards: unknown reward {other:?} (known: {KNOWN})"),
    })
}

/// A reward of the config with its parameters: its model (the CLIP-family rewards; a file
/// given to a rule-based reward is refused rather than ignored) and its batch size.
pub fn build_entry(i: usize, e: &crate::reward::RewardEntry) -> anyhow::Result<Box<dyn Reward>> {
    use anyhow::Context;
    let r: Box<dyn Reward> = match e.name.as_str() {
        "clipscore" | "pickscore" => {
            anyhow::ensure!(
                !e.weights.is_empty(),
                "train.rewards[{i}].weights: reward {:?} needs its CLIPModel folder or Hugging Face repository id (e.g. {})",
                e.name,
                if e.name == "clipscore" { "openai/clip-vit-large-patch14" } else { "yuvalkirstain/PickScore_v1" }
            );
            let kind = if e.name == "clipscore" { clip::Kind::ClipScore } else { clip::Kind::PickScore };
            Box::new(clip::ClipReward::load(kind, &e.weights).with_context(|| format!("train.rewards[{i}].weights"))?)
        }
        "aesthetic" => {
            anyhow::ensure!(!e.weights.is_empty(), "train.rewards[{i}].weights: reward \"aesthetic\" needs its head (sac+logos+ava1-l14-linearMSE.pth)");
            let clip = if e.backbone.is_empty() { aesthetic::DEFAULT_CLIP } else { e.backbone.as_str() };
            Box::new(aesthetic::Aesthetic::load(std::path::Path::new(&e.weights), clip).with_context(|| format!("train.rewards[{i}]"))?)
        }
        "hpsv2" => {
            anyhow::ensure!(!e.weights.is_empty(), "train.rewards[{i}].weights: reward \"hpsv2\" needs its checkpoint (HPS_v2.1_compressed.pt)");
            let tok = if e.backbone.is_empty() { hps::DEFAULT_TOKENIZER } else { e.backbone.as_str() };
            Box::new(hps::Hps::load(std::path::Path::new(&e.weights), tok).with_context(|| format!("train.rewards[{i}]"))?)
        }
        _ => {
            let r = build(&e.name)?;
            anyhow::ensure!(e.weights.is_empty(), "train.rewards[{i}].weights: reward {:?} has no weights file to load ({:?} given)", e.name, e.weights);
            r
        }
    };
    Ok(if e.batch_size > 0 { Box::new(Batched { inner: r, batch: e.batch_size }) } else { r })
}

/// A reward scored `batch` samples at a time (what fits a reward model's memory).
pub struct Batched {
    pub inner: Box<dyn Reward>,
    pub batch: usize,
}

impl Reward for Batched {
    fn info(&self) -> RewardInfo {
        self.inner.info()
    }
    fn inputs(&self) -> Inputs {
        self.inner.inputs()
    }
    fn check_prompts(&self, prompts: &[Prompt]) -> anyhow::Result<()> {
        self.inner.check_prompts(prompts)
    }
    fn score(&self, samples: &Samples, prompts: &[Prompt]) -> anyhow::Result<Vec<f32>> {
        let mut out = Vec::with_capacity(samples.len());
        for start in (0..samples.len()).step_by(self.batch) {
            let n = self.batch.min(samples.len() - start);
            let p = if prompts.is_empty() { &[][..] } else { &prompts[start..start + n] };
            out.extend(self.inner.score(&samples.slice(start, n), p)?);
        }
        Ok(out)
    }
}

/// The weighted reward set of a run; each reward keeps its own advantage and loss term.
/// Every reward must score what the generator samples (`kind`; `modality` names it in errors).
pub fn build_set(entries: &[crate::reward::RewardEntry], kind: SampleKind, modality: &str) -> anyhow::Result<set::RewardSet> {
    let mut v = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let r = build_entry(i, e)?;
        anyhow::ensure!(
            r.inputs().accepts(kind),
            "train.rewards[{i}]: reward {:?} scores {:?}, and modality = \"{}\" samples {}",
            e.name,
            r.inputs(),
            modality,
            if kind == SampleKind::Clips { "clips (video runs need video rewards)" } else { "images" }
        );
        v.push((r, e.weight as f32));
    }
    set::RewardSet::new(v)
}

/// One reward of the weighted set; each gets its own group advantage and loss term.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RewardEntry {
    /// "compositional" | "redness" | "placebo" (a null control) | "video_quality" | "motion_quality"
    pub name: String,
    /// Coefficient of this reward's loss term.
    pub weight: f64,
    /// The reward model's weights file, for rewards that have one ("" = none).
    #[serde(default)]
    pub weights: String,
    /// Samples per reward call (0 = the whole batch at once).
    #[serde(default)]
    pub batch_size: usize,
    /// The image–text model a reward head sits on ("" = the reward's default; aesthetic:
    /// openai/clip-vit-large-patch14).
    #[serde(default)]
    pub backbone: String,
}

impl RewardEntry {
    pub fn new(name: &str, weight: f64) -> Self {
        Self { name: name.into(), weight, weights: String::new(), batch_size: 0, backbone: String::new() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::Image;
    use crate::reward::RewardEntry;

    /// Scoring in batches gives the scores of one call; a weights file for a reward without
    /// one is refused, naming the entry.
    #[test]
    fn reward_parameters() {
        let imgs: Vec<Image> = (0..5).map(|i| Image::filled(3, 3, [i as f32 / 5.0, 0.2, 0.1])).collect();
        let s = Samples::Images(imgs);
        let whole = build("redness").unwrap().score(&s, &[]).unwrap();
        let batched = build_entry(0, &RewardEntry { batch_size: 2, ..RewardEntry::new("redness", 1.0) }).unwrap();
        assert_eq!(batched.score(&s, &[]).unwrap(), whole);
        let e = build_entry(3, &RewardEntry { weights: "clip.safetensors".into(), ..RewardEntry::new("compositional", 1.0) }).err().unwrap().to_string();
        assert!(e.contains("train.rewards[3].weights") && e.contains("clip.safetensors"), "{e}");
    }
}
