//! HPSv2.1 (Human Preference Score v2.1), the reward ViPO's paper reports: an open_clip
//! ViT-H/14 fine-tuned on human preferences, shipped as a torch checkpoint
//! (`HPS_v2.1_compressed.pt`, `{"state_dict": …}`) read by vipo's pickle-free parser. The
//! open_clip names are mapped to Hugging Face `CLIPModel` names (the fused attention
//! input projection split into q/k/v, `text_projection` / `visual.proj` transposed) and run
//! by [`crate::encoders::clip::ClipModel`]; the score is the cosine of the normalised image and text
//! embeddings, as HPSv2's `score` returns (≈ 0.25–0.35). The tokenizer and image
//! preprocessing are CLIP's, from the folder or repository in `train.rewards[].backbone`
//! (default `laion/CLIP-ViT-H-14-laion2B-s32B-b79K`: `tokenizer.json`,
//! `preprocessor_config.json`).

use anyhow::{Context, Result};
use candle_core::{Device, Tensor, D};
use std::collections::HashMap;
use std::path::Path;

use super::{Inputs, Reward, RewardInfo};
use crate::encoders::clip::{l2_normalize, load_tokenizer, tokenize, Act, ClipModel, Preprocess, Tower};
use crate::image::Samples;
use crate::prompt::Prompt;

pub const DEFAULT_TOKENIZER: &str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K";

/// open_clip heads: text 64 wide; vision 64 wide except ViT-H (1280) and bigG (1664), 16.
fn heads(width: usize, vision: bool) -> usize {
    if vision && (width == 1280 || width == 1664) {
        16
    } else {
        (width / 64).max(1)
    }
}

fn layers(t: &HashMap<String, Tensor>, prefix: &str) -> usize {
    t.keys().filter_map(|k| k.strip_prefix(prefix)?.split('.').next()?.parse::<usize>().ok()).max().map_or(0, |m| m + 1)
}

/// open_clip CLIP tensors → Hugging Face CLIPModel tensors, plus the two towers' shapes.
fn to_hf(mut t: HashMap<String, Tensor>, source: &str) -> Result<(HashMap<String, Tensor>, Tower, Tower)> {
    for prefix in ["state_dict.", "module."] {
        if t.keys().all(|k| k.starts_with(prefix)) {
            t = t.into_iter().map(|(k, v)| (k[prefix.len()..].to_string(), v)).collect();
        }
    }
    anyhow::ensure!(t.contains_key("token_embedding.weight") && t.contains_key("visual.conv1.weight"), "{source}: not an open_clip CLIP state dict (no token_embedding.weight / visual.conv1.weight)");
    let mut out = HashMap::new();
    let mv = |from: &str, to: String, t: &mut HashMap<String, Tensor>, out: &mut HashMap<String, Tensor>| -> Result<()> {
        let v = t.remove(from).with_context(|| format!("{source}: tensor {from} missing"))?;
        out.insert(to, v);
        Ok(())
    };
    let mut towers = Vec::new();
    for (src, dst, vision) in [("transformer.resblocks.", "text_model.encoder.layers.", false), ("visual.transformer.resblocks.", "vision_model.encoder.layers.", true)] {
        let n = layers(&t, src);
        anyhow::ensure!(n > 0, "{source}: no {src}* tensors");
        let width = t.get(&format!("{src}0.ln_1.weight")).with_context(|| format!("{source}: tensor {src}0.ln_1.weight missing"))?.dim(0)?;
        let inter = t.get(&format!("{src}0.mlp.c_fc.weight")).with_context(|| format!("{source}: tensor {src}0.mlp.c_fc.weight missing"))?.dim(0)?;
        for i in 0..n {
            let (s, d) = (format!("{src}{i}"), format!("{dst}{i}"));
            for (a, b) in [("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")] {
                for suf in ["weight", "bias"] {
                    mv(&format!("{s}.{a}.{suf}"), format!("{d}.{b}.{suf}"), &mut t, &mut out)?;
                }
            }
            for suf in ["weight", "bias"] {
                let name = format!("{s}.attn.in_proj_{suf}");
                let qkv = t.remove(&name).with_context(|| format!("{source}: tensor {name} missing"))?;
                for (j, p) in qkv.chunk(3, 0)?.into_iter().zip(["q_proj", "k_proj", "v_proj"]) {
                    out.insert(format!("{d}.self_attn.{p}.{suf}"), j);
                }
            }
        }
        towers.push(Tower { hidden: width, heads: heads(width, vision), layers: n, inter, act: Act::Gelu, eps: 1e-5 });
    }
    for (a, b) in [
        ("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
        ("positional_embedding", "text_model.embeddings.position_embedding.weight"),
        ("ln_final.weight", "text_model.final_layer_norm.weight"),
        ("ln_final.bias", "text_model.final_layer_norm.bias"),
        ("visual.class_embedding", "vision_model.embeddings.class_embedding"),
        ("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight"),
        ("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight"),
        ("visual.ln_pre.weight", "vision_model.pre_layrnorm.weight"),
        ("visual.ln_pre.bias", "vision_model.pre_layrnorm.bias"),
        ("visual.ln_post.weight", "vision_model.post_layernorm.weight"),
        ("visual.ln_post.bias", "vision_model.post_layernorm.bias"),
    ] {
        mv(a, b.to_string(), &mut t, &mut out)?;
    }
    for (a, b) in [("text_projection", "text_projection.weight"), ("visual.proj", "visual_projection.weight")] {
        let v = t.remove(a).with_context(|| format!("{source}: tensor {a} missing"))?;
        out.insert(b.to_string(), v.t()?.contiguous()?);
    }
    if let Some(s) = t.remove("logit_scale") {
        out.insert("logit_scale".into(), s);
    }
    let vision = towers.pop().unwrap();
    let text = towers.pop().unwrap();
    Ok((out, text, vision))
}

pub struct Hps {
    model: ClipModel,
    tokenizer: tokenizers::Tokenizer,
    pre: Preprocess,
}

impl Hps {
    /// The checkpoint, and the folder or repository id with CLIP's tokenizer.json (and
    /// preprocessor_config.json).
    pub fn load(checkpoint: &Path, tokenizer_from: &str) -> Result<Self> {
        let source = checkpoint.display().to_string();
        let raw = crate::weights::pth::load_weights(checkpoint)?;
        let raw = raw.into_iter().map(|(k, v)| Ok((k, v.to_dtype(candle_core::DType::F32)?))).collect::<Result<HashMap<_, _>>>()?;
        let (tensors, text, vision) = to_hf(raw, &source)?;
        let model = ClipModel::from_tensors(tensors, &text, &vision, None, &source, &Device::Cpu)?;
        let dir = crate::weights::hf::resolve(tokenizer_from).context("HPSv2's tokenizer (train.rewards[].backbone)")?;
        let tokenizer = load_tokenizer(&dir, &model.text)?;
        let pre = Preprocess::load(&dir, model.image_size)?;
        Ok(Self { model, tokenizer, pre })
    }

    pub fn score_pixels(&self, pixels: &Tensor, ids: &Tensor) -> Result<Vec<f32>> {
        let i = l2_normalize(&self.model.image_features(pixels)?)?;
        let t = l2_normalize(&self.model.text_features(ids)?)?;
        Ok((i * t)?.sum(D::Minus1)?.to_vec1()?)
    }
}

impl Reward for Hps {
    fn info(&self) -> RewardInfo {
        RewardInfo { name: "hpsv2".into(), version: "2.1".into(), range: (-1.0, 1.0), higher_is_better: true }
    }
    fn inputs(&self) -> Inputs {
        Inputs::Images
    }
    fn score(&self, samples: &Samples, prompts: &[Prompt]) -> Result<Vec<f32>> {
        let images = samples.images("reward 'hpsv2'")?;
        anyhow::ensure!(images.len() == prompts.len(), "hpsv2: {} images but {} prompts", images.len(), prompts.len());
        let pixels = self.pre.batch(images, &Device::Cpu)?;
        let ids = tokenize(&self.tokenizer, &prompts.iter().map(|p| p.text.clone()).collect::<Vec<_>>(), self.model.text.max_tokens, &Device::Cpu)?;
        self.score_pixels(&pixels, &ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny open_clip CLIP saved as HPSv2 ships it scores as open_clip does
    /// (tools/golden/hps_tiny.py); other files are refused naming the tensor.
    #[test]
    fn matches_open_clip_on_a_tiny_checkpoint() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/clip_tiny");
        let g: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
        let gh: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("golden_hps.json")).unwrap()).unwrap();
        let h = Hps::load(&dir.join("hps_tiny.pt"), dir.to_str().unwrap()).unwrap();
        let ids: Vec<u32> = g["input_ids"].as_array().unwrap().iter().flat_map(|r| r.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32)).collect();
        let ids = Tensor::from_vec(ids, (3, 16), &Device::Cpu).unwrap();
        let px: Vec<f32> = g["pixel_values"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
        let px = Tensor::from_vec(px, (1, 3, 32, 32), &Device::Cpu).unwrap().repeat((3, 1, 1, 1)).unwrap();
        let got = h.score_pixels(&px, &ids).unwrap();
        let want: Vec<f32> = gh["hps"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
        assert_eq!((got.len(), want.len()), (3, 3), "one score per golden");
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{got:?} vs {want:?}");
        }
        let prompts: Vec<Prompt> = g["prompts"].as_array().unwrap().iter().map(|p| Prompt::text(p.as_str().unwrap())).collect();
        let im = crate::image::Image::load(&dir.join("image.png")).unwrap();
        let s = h.score(&Samples::Images(vec![im; 3]), &prompts).unwrap();
        assert_eq!(s.len(), want.len());
        for (a, b) in s.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{s:?} vs {want:?}");
        }
        let e = format!("{:#}", Hps::load(&dir.join("aesthetic.pth"), dir.to_str().unwrap()).err().unwrap());
        assert!(e.contains("aesthetic.pth") && e.contains("not an open_clip CLIP state dict"), "{e}");
    }
}
