//! The LAION aesthetic predictor (improved-aesthetic-predictor, `sac+logos+ava1-l14-
//! linearMSE.pth`): a stack of linear layers (`layers.0`, `layers.2`, `layers.4`,
//! `layers.6`, `layers.7`; dropouts between, no activations) on the L2-normalised CLIP
//! ViT-L/14 image embedding, as Flow-GRPO and DDPO score aesthetics. The head is a torch
//! state dict read by vipo's pickle-free parser (or safetensors); the CLIP model is a
//! Hugging Face `CLIPModel` folder or repository id (`train.rewards[].backbone`, default
//! `openai/clip-vit-large-patch14`). Prompt-free.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, D};
use std::path::Path;

use super::{Inputs, Reward, RewardInfo};
use crate::encoders::clip::{ClipModel, Preprocess};
use crate::image::Samples;
use crate::prompt::Prompt;

pub const DEFAULT_CLIP: &str = "openai/clip-vit-large-patch14";

pub struct Aesthetic {
    clip: ClipModel,
    pre: Preprocess,
    /// (weight (out, in), bias) in order.
    head: Vec<(Tensor, Tensor)>,
}

impl Aesthetic {
    pub fn load(head_file: &Path, clip: &str) -> Result<Self> {
        let dir = crate::weights::hf::resolve(clip).context("the aesthetic predictor's CLIP model")?;
        let model = ClipModel::load(&dir, &Device::Cpu)?;
        let pre = Preprocess::load(&dir, model.image_size)?;
        let w = crate::weights::pth::load_weights(head_file)?;
        let mut idx: Vec<usize> = w.keys().filter_map(|k| k.strip_prefix("layers.")?.strip_suffix(".weight")?.parse().ok()).collect();
        idx.sort_unstable();
        anyhow::ensure!(!idx.is_empty(), "{}: no layers.N.weight tensors (not an aesthetic predictor head)", head_file.display());
        let mut head = Vec::new();
        let mut width = model.projection_dim();
        for i in idx {
            let get = |n: &str| w.get(&format!("layers.{i}.{n}")).with_context(|| format!("{}: tensor layers.{i}.{n} missing", head_file.display()));
            let (wt, b) = (get("weight")?.to_dtype(DType::F32)?, get("bias")?.to_dtype(DType::F32)?);
            let (o, inp) = wt.dims2().with_context(|| format!("{}: layers.{i}.weight is not a matrix", head_file.display()))?;
            anyhow::ensure!(inp == width, "{}: layers.{i}.weight takes {inp} inputs, the previous layer (or CLIP's {} embedding) gives {width}", head_file.display(), model.projection_dim());
            width = o;
            head.push((wt, b));
        }
        anyhow::ensure!(width == 1, "{}: the last layer gives {width} outputs, not one score", head_file.display());
        Ok(Self { clip: model, pre, head })
    }

    /// Scores of preprocessed pixels (B, 3, S, S).
    pub fn score_pixels(&self, pixels: &Tensor) -> Result<Vec<f32>> {
        let e = self.clip.image_features(pixels)?;
        let mut x = e.broadcast_div(&e.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)?;
        for (w, b) in &self.head {
            x = x.matmul(&w.t()?)?.broadcast_add(b)?;
        }
        Ok(x.squeeze(1)?.to_vec1()?)
    }
}

impl Reward for Aesthetic {
    fn info(&self) -> RewardInfo {
        RewardInfo { name: "aesthetic".into(), version: "1".into(), range: (0.0, 10.0), higher_is_better: true }
    }
    fn inputs(&self) -> Inputs {
        Inputs::Images
    }
    fn score(&self, samples: &Samples, _prompts: &[Prompt]) -> Result<Vec<f32>> {
        let images = samples.images("reward 'aesthetic'")?;
        self.score_pixels(&self.pre.batch(images, &Device::Cpu)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::Image;

    /// The head on the tiny CLIP equals torch's (golden from tools/golden/clip_tiny.py,
    /// the head read from a torch.save zip); a head that does not fit is refused.
    #[test]
    fn matches_torch_head_on_tiny_clip() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/clip_tiny");
        let g: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
        let a = Aesthetic::load(&dir.join("aesthetic.pth"), dir.to_str().unwrap()).unwrap();
        let want = g["aesthetic"][0].as_f64().unwrap() as f32;
        let px: Vec<f32> = g["pixel_values"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
        let got = a.score_pixels(&Tensor::from_vec(px, (1, 3, 32, 32), &Device::Cpu).unwrap()).unwrap()[0];
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        let im = Image::load(&dir.join("image.png")).unwrap();
        let s = a.score(&Samples::Images(vec![im]), &[]).unwrap();
        assert!((s[0] - want).abs() < 1e-5, "{s:?}");
        // A head for another embedding width.
        let d = tempfile::tempdir().unwrap();
        let bad = d.path().join("head.safetensors");
        let t: std::collections::HashMap<String, Tensor> =
            [("layers.0.weight".to_string(), Tensor::zeros((4, 768), DType::F32, &Device::Cpu).unwrap()), ("layers.0.bias".to_string(), Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap())].into();
        crate::weights::tensors::save_tensors(&t, &bad).unwrap();
        let e = Aesthetic::load(&bad, dir.to_str().unwrap()).err().unwrap().to_string();
        assert!(e.contains("head.safetensors") && e.contains("takes 768 inputs") && e.contains("16"), "{e}");
    }
}
