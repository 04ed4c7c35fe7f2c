//! CLIP-family rewards on real images: **CLIP score** (OpenAI CLIP ViT-L/14) and
//! **PickScore** (a CLIP ViT-H/14 fine-tuned on Pick-a-Pic), both a Hugging Face
//! `CLIPModel` folder: `config.json`, `model.safetensors` (or shards with an index),
//! `tokenizer.json`, optionally `preprocessor_config.json`. The model itself is
//! [`crate::encoders::clip`].
//!
//! * clipscore = cos(image embedding, text embedding) — the usual "CLIP score" is
//!   100·max(cos, 0); the scale does not matter to group-normalised advantages;
//! * pickscore = exp(logit_scale)·cos, PickScore's published scale (≈ 20–23).

use anyhow::Result;
use candle_core::{Device, Tensor, D};
use std::path::PathBuf;

use super::{Inputs, Reward, RewardInfo};
use crate::encoders::clip::{l2_normalize, load_tokenizer, tokenize, ClipModel, Preprocess};
use crate::image::Samples;
use crate::prompt::Prompt;

/// Which score of the CLIP embeddings a reward reports.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    ClipScore,
    PickScore,
}

pub struct ClipReward {
    kind: Kind,
    model: ClipModel,
    tokenizer: tokenizers::Tokenizer,
    pre: Preprocess,
    device: Device,
}

impl ClipReward {
    /// From a model folder, or a repository id in the local Hugging Face cache.
    pub fn load(kind: Kind, spec: &str) -> Result<Self> {
        let dir: PathBuf = crate::weights::hf::resolve(spec)?;
        let device = Device::Cpu;
        let model = ClipModel::load(&dir, &device)?;
        let tokenizer = load_tokenizer(&dir, &model.text)?;
        let pre = Preprocess::load(&dir, model.image_size)?;
        Ok(Self { kind, model, tokenizer, pre, device })
    }

    /// Token ids (B, max_tokens) of prompt texts.
    pub fn tokens(&self, texts: &[String]) -> Result<Tensor> {
        tokenize(&self.tokenizer, texts, self.model.text.max_tokens, &self.device)
    }

    /// Scores for preprocessed pixels (B, 3, S, S) and token ids.
    pub fn score_pixels(&self, pixels: &Tensor, ids: &Tensor) -> Result<Vec<f32>> {
        let i = l2_normalize(&self.model.image_features(pixels)?)?;
        let t = l2_normalize(&self.model.text_features(ids)?)?;
        let cos: Vec<f32> = (i * t)?.sum(D::Minus1)?.to_vec1()?;
        Ok(match self.kind {
            Kind::ClipScore => cos,
            Kind::PickScore => cos.iter().map(|c| self.model.logit_scale.exp() * c).collect(),
        })
    }
}

impl Reward for ClipReward {
    fn info(&self) -> RewardInfo {
        match self.kind {
            Kind::ClipScore => RewardInfo { name: "clipscore".into(), version: "1".into(), range: (-1.0, 1.0), higher_is_better: true },
            Kind::PickScore => RewardInfo { name: "pickscore".into(), version: "1".into(), range: (-self.model.logit_scale.exp(), self.model.logit_scale.exp()), higher_is_better: true },
        }
    }
    fn inputs(&self) -> Inputs {
        Inputs::Images
    }
    fn score(&self, samples: &Samples, prompts: &[Prompt]) -> Result<Vec<f32>> {
        let images = samples.images(&format!("reward '{}'", self.info().name))?;
        anyhow::ensure!(images.len() == prompts.len(), "{}: {} images but {} prompts", self.info().name, images.len(), prompts.len());
        let pixels = self.pre.batch(images, &self.device)?;
        let ids = self.tokens(&prompts.iter().map(|p| p.text.clone()).collect::<Vec<_>>())?;
        self.score_pixels(&pixels, &ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoders::clip::*;
    use crate::image::Image;
    use candle_core::DType;
    use std::path::Path;

    fn dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/clip_tiny")
    }

    fn golden() -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir().join("golden.json")).unwrap()).unwrap()
    }

    fn floats(v: &serde_json::Value) -> Vec<f32> {
        v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
    }

    /// Tokens, embeddings and both scores equal transformers' on a tiny random CLIPModel
    /// (tools/golden/clip_tiny.py); our preprocessing equals the
    /// processor's bit for bit (PIL bicubic), so an image file scores the same too.
    #[test]
    fn matches_transformers_clip_on_tiny_weights() {
        let g = golden();
        let r = ClipReward::load(Kind::PickScore, dir().to_str().unwrap()).unwrap();
        let prompts: Vec<String> = g["prompts"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_string()).collect();
        let ids = r.tokens(&prompts).unwrap();
        let want_ids: Vec<Vec<u32>> = g["input_ids"].as_array().unwrap().iter().map(|r| r.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()).collect();
        assert_eq!(ids.to_vec2::<u32>().unwrap(), want_ids);
        let s = r.pre.crop;
        let px = Tensor::from_vec(floats(&g["pixel_values"]), (1, 3, s, s), &Device::Cpu).unwrap();
        let ie = r.model.image_features(&px).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(max_diff(&ie, &floats(&g["image_embeds"])) < 1e-4, "image embeddings");
        let te = r.model.text_features(&ids).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want_te: Vec<f32> = g["text_embeds"].as_array().unwrap().iter().flat_map(floats).collect();
        assert!(max_diff(&te, &want_te) < 1e-4, "text embeddings");
        let px3 = px.repeat((3, 1, 1, 1)).unwrap();
        let pick = r.score_pixels(&px3, &ids).unwrap();
        assert!(max_diff(&pick, &floats(&g["pickscore"])) < 1e-3, "{pick:?}");
        let clip = ClipReward::load(Kind::ClipScore, dir().to_str().unwrap()).unwrap();
        assert!(max_diff(&clip.score_pixels(&px3, &ids).unwrap(), &floats(&g["cosine"])) < 1e-5);
        // The whole path from an image file.
        let im = Image::load(&dir().join("image.png")).unwrap();
        let ours = r.pre.pixels(&im);
        let gl = max_diff(&ours, &floats(&g["pixel_values"])) * 0.26 * 255.0;
        let mean_d: f32 = ours.iter().zip(floats(&g["pixel_values"])).map(|(a, b)| (a - b).abs()).sum::<f32>() / ours.len() as f32 * 0.27 * 255.0;
        eprintln!("preprocessing: max {gl} grey levels, mean {mean_d}");
        assert!(gl < 1e-3, "preprocessing: {gl} grey levels");
        let ps: Vec<Prompt> = prompts.iter().map(|p| Prompt::text(p)).collect();
        let got = r.score(&Samples::Images(vec![im; 3]), &ps).unwrap();
        assert!(max_diff(&got, &floats(&g["pickscore"])) < 1e-3, "{got:?}");
    }

    /// SD3's conditioning from a CLIP text tower — the penultimate hidden states and the
    /// projected pooled embedding — equals transformers' (hidden_states[-2], text_embeds),
    /// also when the tower is loaded alone as a CLIPTextModelWithProjection folder.
    #[test]
    fn text_tower_states_for_sd3() {
        let g = golden();
        let r = ClipReward::load(Kind::ClipScore, dir().to_str().unwrap()).unwrap();
        let prompts: Vec<String> = g["prompts"].as_array().unwrap().iter().map(|p| p.as_str().unwrap().to_string()).collect();
        let ids = r.tokens(&prompts).unwrap();
        let (pen, pooled) = r.model.text.states(&ids).unwrap();
        assert_eq!(pen.dims(), &[3, 16, 32]);
        assert!(max_diff(&pen.flatten_all().unwrap().to_vec1::<f32>().unwrap(), &floats(&g["penultimate"])) < 1e-4);
        let want_te: Vec<f32> = g["text_embeds"].as_array().unwrap().iter().flat_map(floats).collect();
        assert!(max_diff(&pooled.flatten_all().unwrap().to_vec1::<f32>().unwrap(), &want_te) < 1e-4);
        // The same tower as a text-encoder folder (what diffusers' text_encoder/ holds).
        let d = tempfile::tempdir().unwrap();
        let all = crate::weights::tensors::read_tensors(&dir().join("model.safetensors"), &Device::Cpu).unwrap();
        let text: std::collections::HashMap<String, Tensor> = all.into_iter().filter(|(k, _)| k.starts_with("text_model.") || k == "text_projection.weight").collect();
        crate::weights::tensors::save_tensors(&text, &d.path().join("model.safetensors")).unwrap();
        let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir().join("config.json")).unwrap()).unwrap();
        std::fs::write(d.path().join("config.json"), cfg["text_config"].to_string()).unwrap();
        let t = ClipText::load(d.path(), &Device::Cpu).unwrap();
        let (pen2, pooled2) = t.states(&ids).unwrap();
        assert_eq!(max_diff(&pen2.flatten_all().unwrap().to_vec1::<f32>().unwrap(), &pen.flatten_all().unwrap().to_vec1::<f32>().unwrap()), 0.0);
        assert_eq!(max_diff(&pooled2.flatten_all().unwrap().to_vec1::<f32>().unwrap(), &pooled.flatten_all().unwrap().to_vec1::<f32>().unwrap()), 0.0);
        let e = format!("{:#}", ClipText::load(&dir().join("nope"), &Device::Cpu).err().unwrap());
        assert!(e.contains("nope/config.json"), "{e}");
    }

    #[test]
    fn bad_folders_are_named() {
        let d = tempfile::tempdir().unwrap();
        let e = format!("{:#}", ClipReward::load(Kind::ClipScore, d.path().to_str().unwrap()).err().unwrap());
        assert!(e.contains("config.json"), "{e}");
        std::fs::copy(dir().join("config.json"), d.path().join("config.json")).unwrap();
        let mut t = std::collections::HashMap::new();
        t.insert("decoder.conv_in.weight".to_string(), Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap());
        crate::weights::tensors::save_tensors(&t, &d.path().join("model.safetensors")).unwrap();
        let e = format!("{:#}", ClipReward::load(Kind::ClipScore, d.path().to_str().unwrap()).err().unwrap());
        assert!(e.contains("model.safetensors") && e.contains("not a Hugging Face CLIPModel"), "{e}");
        let e = ClipModel::load(&dir(), &Device::Cpu).map(|_| ()).and_then(|_| {
            let bad = std::collections::HashMap::from([
                ("text_model.embeddings.token_embedding.weight".to_string(), Tensor::zeros((4, 4), DType::F32, &Device::Cpu).unwrap()),
                ("vision_model.embeddings.class_embedding".to_string(), Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap()),
            ]);
            let t = Tower { hidden: 4, heads: 1, layers: 1, inter: 8, act: Act::Gelu, eps: 1e-5 };
            ClipModel::from_tensors(bad, &t, &t, None, "x.pt", &Device::Cpu).map(|_| ())
        });
        assert!(format!("{:#}", e.unwrap_err()).contains("x.pt: tensors do not fit"));
        std::fs::copy(dir().join("model.safetensors"), d.path().join("model.safetensors")).unwrap();
        let e = format!("{:#}", ClipReward::load(Kind::ClipScore, d.path().to_str().unwrap()).err().unwrap());
        assert!(e.contains("no tokenizer.json"), "{e}");
    }
}
