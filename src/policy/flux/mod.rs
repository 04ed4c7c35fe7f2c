//! FLUX.1 as a vipo [`Policy`]: the trainable transformer ([`crate::policy::flux::model`], LoRA by
//! diffusers module name), its frozen text side — CLIP-L's pooled output (77 tokens) and
//! T5-XXL's token states (`flux.t5_tokens`) — and the 16-channel VAE, from one diffusers
//! model folder (`transformer/`, `text_encoder/`, `text_encoder_2/`,
//! `tokenizer{,_2}/tokenizer.json`, `vae/`) or a repository id in the local Hugging Face
//! cache; the transformer may also come from BFL's single file. FLUX.1-dev takes its
//! guidance scale as an input and is sampled without CFG; schnell has no guidance input.

pub mod layout;
pub mod model;

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::encoders::clip::ClipText;
use crate::encoders::tokenizer::Tok;
use crate::image::Samples;
use crate::policy::flux::model::{Flux, FluxConfig};
use crate::policy::nn::embed_cache::EmbedCache;
use crate::policy::nn::layers::LoraSpec;
use crate::policy::nn::vae::Sd3Vae;
use crate::policy::{Condition, FlowModel, Policy};
use crate::prompt::Prompt;
use serde::{Deserialize, Serialize};

/// How the model is run.
#[derive(Clone, Debug)]
pub struct FluxShape {
    pub resolution: usize,
    pub t5_tokens: usize,
    pub checkpointing: bool,
    /// The transformer's base weights and T5 (LoRA adapters stay f32).
    pub dtype: DType,
    /// FLUX.1-dev's guidance-scale input.
    pub guidance: f64,
}

pub struct FluxPolicy {
    pub cfg: FluxConfig,
    base: VarMap,
    lora: Option<VarMap>,
    model: Flux,
    frozen: Flux,
    base_net: Option<Flux>,
    clip: ClipText,
    t5: Mutex<candle_transformers::models::t5::T5EncoderModel>,
    toks: [Tok; 2],
    vae: Sd3Vae,
    latent: usize,
    guidance: f64,
    cache: Option<EmbedCache>,
    device: Device,
}

impl FluxPolicy {
    /// Load from a diffusers model folder or repository id; `variant` (name, shape) is
    /// checked against the transformer; `cache_root`: where prompt encodings are kept.
    pub fn load(spec: &str, variant: Option<(&str, &FluxConfig)>, shape: &FluxShape, lora: Option<&LoraSpec>, cache_root: Option<&Path>, device: &Device, seed: u64) -> Result<Self> {
        let FluxShape { resolution, t5_tokens, checkpointing, dtype, guidance } = shape.clone();
        let root = crate::weights::hf::resolve(spec)?;
        let (cfg, tensors) = crate::policy::flux::layout::load_transformer(&root, variant, device)?;
        let crate::policy::Nets { base, lora: lora_map, model, frozen, base_net } = crate::policy::Nets::build(tensors, dtype, "flux.dtype", lora, device, seed, |vb, l| Flux::new(vb, &cfg, l))?;
        let model = if checkpointing { model.checkpointed() } else { model };
        let clip = ClipText::load_any(&root.join("text_encoder"), device)?;
        let t5 = crate::encoders::t5::load_t5(&root.join("text_encoder_2"), dtype, device)?;
        let toks = [Tok::load(&root.join("tokenizer"), clip.max_tokens, "<|endoftext|>")?, Tok::load(&root.join("tokenizer_2"), t5_tokens, "<pad>")?];
        let vae = Sd3Vae::load(&root.join("vae"), device)?;
        anyhow::ensure!(vae.latent_channels * 4 == cfg.in_channels, "{}: the VAE has {} latent channels, the transformer packs {}", root.display(), vae.latent_channels, cfg.in_channels);
        anyhow::ensure!(resolution % (vae.factor * 2) == 0, "flux.resolution {resolution}: not a multiple of {} (VAE factor × 2×2 packing)", vae.factor * 2);
        let cache = match cache_root {
            Some(r) => {
                let mut files: Vec<PathBuf> = Vec::new();
                for d in ["text_encoder", "text_encoder_2"] {
                    files.extend(crate::weights::hf::component_files(&root.join(d), "")?);
                }
                Some(EmbedCache::open(r, &files, &format!("flux: t5 {dtype:?}, {t5_tokens} tokens"))?)
            }
            None => None,
        };
        Ok(Self { latent: resolution / vae.factor, cfg, base, lora: lora_map, model, frozen, base_net, clip, t5: Mutex::new(t5), toks, vae, guidance, cache, device: device.clone() })
    }

    fn encode_raw(&self, prompts: &[Prompt]) -> Result<Condition> {
        let texts: Vec<String> = prompts.iter().map(|p| p.text.clone()).collect();
        let pooled = self.clip.pooler(&self.toks[0].ids(&texts, &self.device)?)?;
        let seq = self.t5.lock().unwrap().forward(&self.toks[1].ids(&texts, &self.device)?)?.to_dtype(DType::F32)?;
        Ok(Condition { seq, pooled: Some(pooled) })
    }

    fn run(&self, m: &Flux, z: &Tensor, sigma: &Tensor, cond: &Condition) -> candle_core::Result<Tensor> {
        let pooled = cond.pooled.as_ref().ok_or_else(|| candle_core::Error::Msg("FLUX: condition without a pooled embedding".into()))?;
        let g = if self.cfg.guidance_embed { Some(Tensor::full(self.guidance as f32, z.dim(0)?, z.device())?) } else { None };
        m.forward(z, sigma, &cond.seq, pooled, g.as_ref())
    }
}

impl FlowModel for FluxPolicy {
    fn velocity(&self, z: &Tensor, sigma: &Tensor, cond: &Condition) -> candle_core::Result<Tensor> {
        self.run(&self.model, z, sigma, cond)
    }
    fn velocity_frozen(&self, z: &Tensor, sigma: &Tensor, cond: &Condition) -> candle_core::Result<Tensor> {
        self.run(&self.frozen, z, sigma, cond)
    }
    fn velocity_base(&self, z: &Tensor, sigma: &Tensor, cond: &Condition) -> Option<candle_core::Result<Tensor>> {
        self.base_net.as_ref().map(|m| self.run(m, z, sigma, cond))
    }
    fn null_condition(&self, _: &Condition) -> candle_core::Result<Condition> {
        candle_core::bail!("FLUX is sampled without classifier-free guidance: set sample.guidance = 1 (flux.guidance is FLUX.1-dev's guidance input)")
    }
    fn backward(&self, loss: &Tensor) -> candle_core::Result<candle_core::backprop::GradStore> {
        self.model.backward(loss)
    }
    fn base_vars(&self) -> Vec<(String, Var)> {
        crate::weights::tensors::sorted_vars(&self.base)
    }
    fn device(&self) -> &Device {
        &self.device
    }
}

impl Policy for FluxPolicy {
    fn encode(&self, prompts: &[Prompt]) -> Result<Condition> {
        match &self.cache {
            Some(c) => c.encode(prompts, &self.device, |ps| self.encode_raw(ps)),
            None => self.encode_raw(prompts),
        }
    }
    fn decode(&self, z: &Tensor) -> Result<Samples> {
        Ok(Samples::Images(self.vae.decode(z)?))
    }
    fn latent_shape(&self) -> Vec<usize> {
        vec![self.cfg.in_channels / 4, self.latent, self.latent]
    }
    fn trainable(&self) -> Vec<(String, Var)> {
        crate::weights::tensors::sorted_vars(self.lora.as_ref().unwrap_or(&self.base))
    }
    fn base_map(&self) -> &VarMap {
        &self.base
    }
    fn lora_map(&self) -> Option<&VarMap> {
        self.lora.as_ref()
    }
    fn diffusers_names(&self) -> Option<crate::policy::nn::adapted::BoxedNames<'_>> {
        Some(Box::new(move |l: &str| crate::policy::flux::model::diffusers_modules(l, &self.cfg)))
    }
}

/// A real FLUX.1 generator: where its files are and how it runs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct FluxSection {
    /// A diffusers FLUX folder (`transformer/`, `text_encoder/` CLIP-L, `text_encoder_2/`
    /// T5-XXL, `tokenizer{,_2}/tokenizer.json`, `vae/`) or "org/name" in the local HF cache.
    pub model: String,
    /// "flux.1-dev" | "flux.1-schnell" | "" (take the files' shape).
    pub variant: String,
    /// Square image side in pixels (latent side = resolution / 8, packed 2×2).
    pub resolution: usize,
    /// T5 tokens (FLUX.1-dev: 512, schnell: 256).
    pub t5_tokens: usize,
    /// Dtype of the transformer's base weights and T5 (adapters, optimizer, latents f32).
    pub dtype: String,
    /// Block-level activation checkpointing.
    pub checkpointing: bool,
    /// FLUX.1-dev's guidance-scale input (distilled CFG; FLUX is sampled without CFG, so
    /// `sample.guidance` must stay 1). Ignored by schnell.
    pub guidance: f64,
}

impl Default for FluxSection {
    fn default() -> Self {
        Self { model: String::new(), variant: "flux.1-dev".into(), resolution: 512, t5_tokens: 512, dtype: "bf16".into(), checkpointing: true, guidance: 3.5 }
    }
}

impl FluxSection {
    pub fn candle_dtype(&self) -> Result<candle_core::DType> {
        crate::policy::parse_dtype("flux.dtype", &self.dtype)
    }
    pub fn validate(&self) -> Result<()> {
        self.candle_dtype()?;
        anyhow::ensure!(self.resolution >= 16 && self.resolution.is_multiple_of(16), "flux.resolution: {} is not a positive multiple of 16 (8× VAE downsampling, 2×2 packing)", self.resolution);
        anyhow::ensure!(self.guidance.is_finite() && self.guidance >= 0.0, "flux.guidance: {} is not a non-negative number", self.guidance);
        Ok(())
    }
}

/// The FLUX.1 family (`modality = "flux"`, `[flux]`).
impl crate::policy::Generator for FluxSection {
    fn section(&self) -> &'static str {
        "flux"
    }
    fn sample_kind(&self) -> crate::image::SampleKind {
        crate::image::SampleKind::Images
    }
    fn image_size(&self) -> usize {
        self.resolution
    }
    fn model_files(&self) -> Option<(&'static str, &str)> {
        Some(("flux.model", &self.model))
    }
    fn validate(&self) -> Result<()> {
        FluxSection::validate(self)
    }
    fn check_sampling(&self, guidance: f64) -> Result<()> {
        anyhow::ensure!(
            guidance == 1.0,
            "sample.guidance = {guidance}: FLUX is sampled without classifier-free guidance; set it to 1 (flux.guidance = {} is FLUX.1-dev's guidance input)",
            self.guidance
        );
        Ok(())
    }
    /// `weights` is the model folder's spec.
    fn load(&self, _weights: &Path, lora: Option<&LoraSpec>, device: &Device, seed: u64) -> Result<Box<dyn Policy>> {
        let want = if self.variant.is_empty() { None } else { Some(FluxConfig::by_name(&self.variant)?) };
        let cache = crate::runtime::cache_dir().join("embeddings");
        let shape = FluxShape { resolution: self.resolution, t5_tokens: self.t5_tokens, checkpointing: self.checkpointing, dtype: self.candle_dtype()?, guidance: self.guidance };
        Ok(Box::new(FluxPolicy::load(&self.model, want.as_ref().map(|w| (self.variant.as_str(), w)), &shape, lora, Some(&cache), device, seed)?))
    }
    fn cache_prefix(&self) -> &'static str {
        "flux"
    }
    fn section_json(&self) -> String {
        serde_json::to_string(self).expect("config serializes")
    }
    fn real(&self) -> Option<crate::policy::RealSettings<'_>> {
        Some(crate::policy::RealSettings {
            section: "flux",
            variant: &self.variant,
            resolution: self.resolution,
            text_tokens: self.t5_tokens,
            dtype: &self.dtype,
            checkpointing: self.checkpointing,
            guidance: Some(self.guidance),
            by_name: |v| Ok(crate::policy::Transformer::Flux(FluxConfig::by_name(v)?)),
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A tiny FLUX.1-dev-shaped model in the diffusers folder layout: the transformer of
    /// `flux::tests::tiny` (T5 width 10, CLIP pooled 32), CLIP-L as a CLIPTextModel from
    /// tests/data/clip_tiny, a random T5 and 16-channel VAE (FLUX's scale and shift).
    pub(crate) fn write_tiny_model(root: &Path) {
        let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/clip_tiny");
        let cfg = FluxConfig { vec_in_dim: 32, ..crate::policy::flux::model::tests::tiny() };
        let bfl: HashMap<String, Tensor> =
            crate::weights::tensors::sorted_vars(&crate::policy::flux::model::tests::random_weights(&cfg, 31)).into_iter().map(|(k, v)| (k, v.as_tensor().clone())).collect();
        std::fs::create_dir_all(root.join("transformer")).unwrap();
        crate::weights::tensors::save_tensors(&crate::policy::flux::layout::to_diffusers(&bfl, &cfg).unwrap(), &root.join("transformer/diffusion_pytorch_model.safetensors")).unwrap();
        std::fs::write(root.join("transformer/config.json"), r#"{"_class_name": "FluxTransformer2DModel", "axes_dims_rope": [4, 6, 6], "guidance_embeds": true}"#).unwrap();
        let all = crate::weights::tensors::read_tensors(&data.join("model.safetensors"), &Device::Cpu).unwrap();
        let text: HashMap<String, Tensor> = all.into_iter().filter(|(k, _)| k.starts_with("text_model.")).collect();
        let ccfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(data.join("config.json")).unwrap()).unwrap();
        std::fs::create_dir_all(root.join("text_encoder")).unwrap();
        crate::weights::tensors::save_tensors(&text, &root.join("text_encoder/model.safetensors")).unwrap();
        std::fs::write(root.join("text_encoder/config.json"), ccfg["text_config"].to_string()).unwrap();
        for tok in ["tokenizer", "tokenizer_2"] {
            std::fs::create_dir_all(root.join(tok)).unwrap();
            std::fs::copy(data.join("tokenizer.json"), root.join(tok).join("tokenizer.json")).unwrap();
        }
        let t5json = r#"{"vocab_size": 56, "d_model": 10, "d_kv": 4, "d_ff": 16, "num_layers": 1, "num_heads": 2, "relative_attention_num_buckets": 8,
            "dropout_rate": 0.0, "layer_norm_epsilon": 1e-6, "initializer_factor": 1.0, "feed_forward_proj": "gated-gelu",
            "is_encoder_decoder": true, "pad_token_id": 0, "eos_token_id": 1}"#;
        crate::policy::sd3::tests::write_tiny_t5(&root.join("text_encoder_2"), t5json, 8);
        crate::policy::sd3::tests::write_tiny_vae(&root.join("vae"), 0.3611, 0.1159, 9);
    }

    /// The tiny FLUX folder loads as a policy: prompts encode to T5 states and CLIP's pooled
    /// output, sampling without CFG gives images of the configured size, the sampling path
    /// equals the trained velocity, CFG is refused, adapters off is the base.
    #[test]
    fn tiny_flux_policy_end_to_end() {
        let d = tempfile::tempdir().unwrap();
        write_tiny_model(&d.path().join("m"));
        let lora = LoraSpec { rank: 2, alpha: 2.0, targets: vec!["attn.to_q".into(), "attn.add_k_proj".into(), "proj_mlp".into()] };
        let shape = FluxShape { resolution: 16, t5_tokens: 6, checkpointing: true, dtype: DType::F32, guidance: 3.5 };
        let p = FluxPolicy::load(d.path().join("m").to_str().unwrap(), None, &shape, Some(&lora), Some(&d.path().join("cache")), &Device::Cpu, 0).unwrap();
        assert_eq!(p.latent_shape(), vec![16, 8, 8]);
        let prompts = vec![Prompt::text("a red cat"), Prompt::text("a blue square")];
        let c = p.encode(&prompts).unwrap();
        assert_eq!((c.seq.dims(), c.pooled.as_ref().unwrap().dims()), (&[2usize, 6, 10][..], &[2usize, 32][..]));
        let sample = crate::sampler::SampleConfig { steps: 2, guidance: 1.0, ..Default::default() };
        let imgs = crate::policy::ode::generate(&p, &prompts, 3, &sample).unwrap();
        let imgs = imgs.images("test").unwrap();
        assert_eq!((imgs.len(), imgs[0].h, imgs[0].w), (2, 16, 16));
        let cfg_on = crate::sampler::SampleConfig { guidance: 2.0, ..sample };
        assert!(format!("{:#}", crate::policy::ode::generate(&p, &prompts, 3, &cfg_on).err().unwrap()).contains("without classifier-free guidance"));
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(1);
        let z = crate::sampler::randn(&[2, 16, 8, 8], &mut rng, &Device::Cpu).unwrap();
        let s = Tensor::new(&[0.3f32, 0.8], &Device::Cpu).unwrap();
        let diff = |a: Tensor, b: Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(diff(p.velocity(&z, &s, &c).unwrap(), p.velocity_frozen(&z, &s, &c).unwrap()), 0.0, "checkpointed training path vs sampling path");
        for (_, v) in p.trainable() {
            v.set(&(v.as_tensor() + 0.1).unwrap()).unwrap();
        }
        let plain = FluxPolicy::load(d.path().join("m").to_str().unwrap(), None, &FluxShape { checkpointing: false, ..shape.clone() }, None, None, &Device::Cpu, 0).unwrap();
        assert_eq!(diff(p.velocity_base(&z, &s, &c).unwrap().unwrap(), plain.velocity_frozen(&z, &s, &c).unwrap()), 0.0);
        assert!(diff(p.velocity_frozen(&z, &s, &c).unwrap(), plain.velocity_frozen(&z, &s, &c).unwrap()) > 0.0);
        // 2 double × (to_q, add_k_proj) + 2 single × (to_q, proj_mlp), A and B each.
        assert_eq!(p.trainable().len(), 16);
        let e = format!("{:#}", FluxPolicy::load(d.path().join("m").to_str().unwrap(), Some(("flux.1-dev", &FluxConfig::dev())), &shape, None, None, &Device::Cpu, 0).err().unwrap());
        assert!(e.contains("not flux.1-dev"), "{e}");
    }
}
