//! Stable Diffusion 3 / 3.5 as a vipo [`Policy`]: the trainable MMDiT ([`crate::policy::sd3::mmdit`],
//! LoRA by diffusers module name), its frozen text side ([`crate::policy::sd3::text`]: CLIP-L,
//! OpenCLIP-bigG, T5) and VAE ([`crate::policy::nn::vae`]), all from one diffusers model folder
//! (`transformer/`, `text_encoder{,_2,_3}/`, `tokenizer{,_2,_3}/` — tokenizer.json, or CLIP's
//! vocab.json + merges.txt — and `vae/`) or a
//! repository id in the local Hugging Face cache. Prompt encodings go through the on-disk
//! embedding cache when one is given; CFG's unconditional input is the encoding of "" (as
//! the diffusers pipeline's negative prompt), not zeros.

pub mod layout;
pub mod mmdit;
pub mod names;
pub mod peft;
pub mod text;

use anyhow::Result;
use candle_core::{Device, Tensor, Var};
use candle_nn::VarMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::encoders::clip::ClipText;
use crate::encoders::tokenizer::Tok;
use crate::image::Samples;
use crate::policy::nn::embed_cache::EmbedCache;
use crate::policy::nn::layers::LoraSpec;
use crate::policy::nn::vae::Sd3Vae;
use crate::policy::sd3::mmdit::{Mmdit, MmditConfig};
use crate::policy::sd3::text::Sd3Text;
use crate::policy::{Condition, FlowModel, Policy};
use crate::prompt::Prompt;
use serde::{Deserialize, Serialize};

/// How the model is run: sampling resolution, T5 tokens, checkpointing.
#[derive(Clone, Debug)]
pub struct Sd3Shape {
    /// Image side in pixels.
    pub resolution: usize,
    /// T5 tokens after CLIP's 77.
    pub t5_tokens: usize,
    /// Block-level activation checkpointing of the trained transformer.
    pub checkpointing: bool,
    /// The transformer's base weights and T5 (LoRA adapters stay f32).
    pub dtype: candle_core::DType,
}

pub struct Sd3Policy {
    pub cfg: MmditConfig,
    base: VarMap,
    lora: Option<VarMap>,
    model: Mmdit,
    frozen: Mmdit,
    /// LoRA runs: the transformer without adapters, untracked (the KL reference).
    base_net: Option<Mmdit>,
    text: Sd3Text,
    toks: [Tok; 3],
    vae: Sd3Vae,
    latent: usize,
    cache: Option<EmbedCache>,
    null: Mutex<Option<Condition>>,
    device: Device,
}

impl Sd3Policy {
    /// Load from a diffusers model folder or repository id; `variant` (name, shape) is
    /// checked against the transformer; `cache_root`: where prompt encodings are kept
    /// (None: encode every time).
    pub fn load(spec: &str, variant: Option<(&str, &MmditConfig)>, shape: &Sd3Shape, lora: Option<&LoraSpec>, cache_root: Option<&Path>, device: &Device, seed: u64) -> Result<Self> {
        let Sd3Shape { resolution, t5_tokens, checkpointing, dtype } = shape.clone();
        let root = crate::weights::hf::resolve(spec)?;
        let (cfg, tensors) = crate::policy::sd3::layout::load_transformer(root.to_str().unwrap_or(spec), variant, device)?;
        let crate::policy::Nets { base, lora: lora_map, model, frozen, base_net } = crate::policy::Nets::build(tensors, dtype, "sd3.dtype", lora, device, seed, |vb, l| Mmdit::new(vb, &cfg, l))?;
        let model = if checkpointing { model.checkpointed() } else { model };
        let clip_l = ClipText::load(&root.join("text_encoder"), device)?;
        let clip_g = ClipText::load(&root.join("text_encoder_2"), device)?;
        let t5_dir = root.join("text_encoder_3");
        let t5 = if t5_dir.is_dir() { Some(Mutex::new(crate::encoders::t5::load_t5(&t5_dir, dtype, device)?)) } else { None };
        let text = Sd3Text { clip_l, clip_g, t5, context_dim: cfg.context_dim };
        let toks = [
            Tok::load(&root.join("tokenizer"), text.clip_l.max_tokens, "<|endoftext|>")?,
            Tok::load(&root.join("tokenizer_2"), text.clip_g.max_tokens, "!")?,
            if text.t5.is_some() { Tok::load(&root.join("tokenizer_3"), t5_tokens, "<pad>")? } else { Tok::load(&root.join("tokenizer"), t5_tokens, "<pad>")? },
        ];
        let vae = Sd3Vae::load(&root.join("vae"), device)?;
        anyhow::ensure!(vae.latent_channels == cfg.in_channels, "{}: the VAE has {} latent channels, the transformer {}", root.display(), vae.latent_channels, cfg.in_channels);
        anyhow::ensure!(resolution % (vae.factor * cfg.patch) == 0, "sd3.resolution {resolution}: not a multiple of {} (VAE factor × patch)", vae.factor * cfg.patch);
        let latent = resolution / vae.factor;
        let cache = match cache_root {
            Some(r) => {
                // The encoders' weight files identify their encodings.
                let mut files: Vec<PathBuf> = Vec::new();
                for d in ["text_encoder", "text_encoder_2", "text_encoder_3"].map(|d| root.join(d)).iter().filter(|d| d.is_dir()) {
                    files.extend(crate::weights::hf::component_files(d, "")?);
                }
                // The T5 dtype and token count change the encodings too.
                Some(EmbedCache::open(r, &files, &format!("t5 {dtype:?}, {t5_tokens} tokens"))?)
            }
            None => None,
        };
        Ok(Self { cfg, base, lora: lora_map, model, frozen, base_net, text, toks, vae, latent, cache, null: Mutex::new(None), device: device.clone() })
    }

    fn encode_raw(&self, prompts: &[Prompt]) -> Result<Condition> {
        let texts: Vec<String> = prompts.iter().map(|p| p.text.clone()).collect();
        let ids: Vec<Tensor> = self.toks.iter().map(|t| t.ids(&texts, &self.device)).collect::<Result<_>>()?;
        self.text.encode_ids(&ids[0], &ids[1], &ids[2])
    }
}

impl FlowModel for Sd3Policy {
    fn velocity(&self, z: &Tensor, sigma: &Tensor, cond: &Condition) -> candle_core::Result<Tensor> {
        let pooled = cond.pooled.as_ref().ok_or_else(|| candle_core::Error::Msg("SD3: condition without a pooled embedding".into()))?;
        self.model.forward(z, sigma, &cond.seq, pooled)
    }
    fn velocity_frozen(&self, z: &Tensor, sigma: &Tensor, cond: &Condition) -> candle_core::Result<Tensor> {
        let pooled = cond.pooled.as_ref().ok_or_else(|| candle_core::Error::Msg("SD3: condition without a pooled embedding".into()))?;
        self.frozen.forward(z, sigma, &cond.seq, pooled)
    }
    fn velocity_base(&self, z: &Tensor, sigma: &Tensor, cond: &Condition) -> Option<candle_core::Result<Tensor>> {
        let pooled = cond.pooled.as_ref()?;
        self.base_net.as_ref().map(|m| m.forward(z, sigma, &cond.seq, pooled))
    }
    fn backward(&self, loss: &Tensor) -> candle_core::Result<candle_core::backprop::GradStore> {
        self.model.backward(loss)
    }
    fn null_condition(&self, cond: &Condition) -> candle_core::Result<Condition> {
        let mut null = self.null.lock().unwrap();
        if null.is_none() {
            *null = Some(self.encode(&[Prompt::text("")]).map_err(|e| candle_core::Error::Msg(format!("SD3: encoding the empty prompt: {e:#}")))?);
        }
        null.as_ref().unwrap().repeat_rows(cond.rows()?)
    }
    fn base_vars(&self) -> Vec<(String, Var)> {
        crate::weights::tensors::sorted_vars(&self.base)
    }
    fn device(&self) -> &Device {
        &self.device
    }
}

impl Policy for Sd3Policy {
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
        vec![self.cfg.in_channels, self.latent, self.latent]
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
        let depth = self.cfg.depth;
        Some(Box::new(move |l: &str| crate::policy::sd3::names::diffusers_parts(l, depth)))
    }
}

/// A real SD3 / SD3.5 generator: where its files are and how it runs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Sd3Config {
    /// Weights: a diffusers folder, a single-file .safetensors, or "org/name" in the local
    /// Hugging Face cache ("" = none; `vipo plan` works from `variant` alone).
    pub model: String,
    /// The architecture the files must have: "sd3.5-medium" | "sd3.5-large" | "sd3-medium".
    pub variant: String,
    /// Square image side in pixels (latent side = resolution / 8).
    pub resolution: usize,
    /// T5 tokens in the context (after SD3's 77 CLIP tokens).
    pub t5_tokens: usize,
    /// Dtype of the transformer's base weights and T5: "bf16" | "f16" | "f32". Activations
    /// run in it (norms and softmax in f32); LoRA adapters, the optimizer and the sampler's
    /// latents stay f32. Full fine-tuning needs "f32". On a CPU bf16 is slower than f32.
    pub dtype: String,
    /// Block-level activation checkpointing (recompute each block in the backward).
    pub checkpointing: bool,
}

impl Default for Sd3Config {
    fn default() -> Self {
        Self { model: String::new(), variant: "sd3.5-medium".into(), resolution: 512, t5_tokens: 256, dtype: "bf16".into(), checkpointing: true }
    }
}

impl Sd3Config {
    /// `dtype` as a candle dtype.
    pub fn candle_dtype(&self) -> Result<candle_core::DType> {
        crate::policy::parse_dtype("sd3.dtype", &self.dtype)
    }

    /// Bytes per weight of `dtype`.
    pub fn weight_bytes(&self) -> Result<usize> {
        Ok(self.candle_dtype()?.size_in_bytes())
    }
    pub fn validate(&self) -> Result<()> {
        self.weight_bytes()?;
        anyhow::ensure!(self.resolution >= 16 && self.resolution.is_multiple_of(16), "sd3.resolution: {} is not a positive multiple of 16 (8× VAE downsampling, 2×2 patches)", self.resolution);
        Ok(())
    }
}

/// The SD3 / SD3.5 family (`modality = "sd3"`, `[sd3]`).
impl crate::policy::Generator for Sd3Config {
    fn section(&self) -> &'static str {
        "sd3"
    }
    fn sample_kind(&self) -> crate::image::SampleKind {
        crate::image::SampleKind::Images
    }
    fn image_size(&self) -> usize {
        self.resolution
    }
    fn model_files(&self) -> Option<(&'static str, &str)> {
        Some(("sd3.model", &self.model))
    }
    fn validate(&self) -> Result<()> {
        Sd3Config::validate(self)
    }
    /// `weights` is the model folder's spec.
    fn load(&self, _weights: &Path, lora: Option<&LoraSpec>, device: &Device, seed: u64) -> Result<Box<dyn Policy>> {
        let want = if self.variant.is_empty() { None } else { Some(MmditConfig::by_name(&self.variant)?) };
        let cache = crate::runtime::cache_dir().join("embeddings");
        let shape = Sd3Shape { resolution: self.resolution, t5_tokens: self.t5_tokens, checkpointing: self.checkpointing, dtype: self.candle_dtype()? };
        Ok(Box::new(Sd3Policy::load(&self.model, want.as_ref().map(|w| (self.variant.as_str(), w)), &shape, lora, Some(&cache), device, seed)?))
    }
    fn cache_prefix(&self) -> &'static str {
        "sd3"
    }
    fn section_json(&self) -> String {
        serde_json::to_string(self).expect("config serializes")
    }
    fn real(&self) -> Option<crate::policy::RealSettings<'_>> {
        Some(crate::policy::RealSettings {
            section: "sd3",
            variant: &self.variant,
            resolution: self.resolution,
            text_tokens: 77 + self.t5_tokens,
            dtype: &self.dtype,
            checkpointing: self.checkpointing,
            guidance: None,
            by_name: |v| Ok(crate::policy::Transformer::Mmdit(MmditConfig::by_name(v)?)),
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::DType;
    use std::collections::HashMap;

    /// The transformer shape of the tiny model folder: 16 latent channels (the VAE's), the
    /// two tiny 16-wide CLIP projections pooled (32), T5's 64-wide context.
    pub(crate) fn tiny_cfg() -> MmditConfig {
        MmditConfig { patch: 2, in_channels: 16, depth: 2, heads: 2, head_dim: 8, pooled_dim: 32, context_dim: 64, pos_embed_max: 8, freq_dim: 16, qk_norm: true, dual_attention_layers: 1 }
    }

    /// A tiny SD3.5-shaped model in the diffusers folder layout: every component random,
    /// the tokenizers the tiny CLIP BPE of tests/data/clip_tiny.
    pub(crate) fn write_tiny_model(root: &Path) {
        let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/clip_tiny");
        let save = |dir: &str, file: &str, t: &HashMap<String, Tensor>| {
            std::fs::create_dir_all(root.join(dir)).unwrap();
            crate::weights::tensors::save_tensors(t, &root.join(dir).join(file)).unwrap();
        };
        let sai: HashMap<String, Tensor> =
            crate::weights::tensors::sorted_vars(&crate::policy::sd3::mmdit::tests::random_weights(&tiny_cfg(), 21)).into_iter().map(|(k, v)| (k, v.as_tensor().clone())).collect();
        save("transformer", "diffusion_pytorch_model.safetensors", &crate::policy::sd3::layout::to_diffusers(&sai).unwrap());
        let all = crate::weights::tensors::read_tensors(&data.join("model.safetensors"), &Device::Cpu).unwrap();
        let text: HashMap<String, Tensor> = all.into_iter().filter(|(k, _)| k.starts_with("text_model.") || k == "text_projection.weight").collect();
        let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(data.join("config.json")).unwrap()).unwrap();
        for (enc, tok) in [("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"), ("text_encoder_3", "tokenizer_3")] {
            std::fs::create_dir_all(root.join(tok)).unwrap();
            std::fs::copy(data.join("tokenizer.json"), root.join(tok).join("tokenizer.json")).unwrap();
            if enc != "text_encoder_3" {
                save(enc, "model.safetensors", &text);
                std::fs::write(root.join(enc).join("config.json"), cfg["text_config"].to_string()).unwrap();
            }
        }
        let t5json = r#"{"vocab_size": 56, "d_model": 64, "d_kv": 8, "d_ff": 96, "num_layers": 2, "num_heads": 8, "relative_attention_num_buckets": 8,
            "dropout_rate": 0.0, "layer_norm_epsilon": 1e-6, "initializer_factor": 1.0, "feed_forward_proj": "gated-gelu",
            "is_encoder_decoder": true, "pad_token_id": 0, "eos_token_id": 1}"#;
        write_tiny_t5(&root.join("text_encoder_3"), t5json, 5);
        write_tiny_vae(&root.join("vae"), 1.5305, 0.0609, 6);
    }

    /// A random T5 encoder folder (transformers' layout) of the config `json`.
    pub(crate) fn write_tiny_t5(dir: &Path, json: &str, seed: u64) {
        let t5cfg: candle_transformers::models::t5::Config = serde_json::from_str(json).unwrap();
        let vm = VarMap::new();
        candle_transformers::models::t5::T5EncoderModel::load(candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu), &t5cfg).unwrap();
        crate::policy::randomize_vars(&vm, seed, 0.3);
        std::fs::create_dir_all(dir).unwrap();
        crate::weights::tensors::save_varmap(&vm, &dir.join("model.safetensors")).unwrap();
        std::fs::write(dir.join("config.json"), json).unwrap();
    }

    /// A random 16-channel diffusers AutoencoderKL folder (2 blocks: 2× downsampling) with
    /// the given latent scale and shift.
    pub(crate) fn write_tiny_vae(dir: &Path, scale: f64, shift: f64, seed: u64) {
        let vcfg = candle_transformers::models::stable_diffusion::vae::AutoEncoderKLConfig {
            block_out_channels: vec![8, 16],
            layers_per_block: 1,
            latent_channels: 16,
            norm_num_groups: 4,
            use_quant_conv: false,
            use_post_quant_conv: false,
        };
        let vm = VarMap::new();
        candle_transformers::models::stable_diffusion::vae::AutoEncoderKL::new(candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu), 3, 3, vcfg).unwrap();
        crate::policy::randomize_vars(&vm, seed, 0.2);
        std::fs::create_dir_all(dir).unwrap();
        crate::weights::tensors::save_varmap(&vm, &dir.join("diffusion_pytorch_model.safetensors")).unwrap();
        std::fs::write(
            dir.join("config.json"),
            format!(r#"{{"block_out_channels": [8, 16], "layers_per_block": 1, "latent_channels": 16, "norm_num_groups": 4, "use_quant_conv": false, "use_post_quant_conv": false, "scaling_factor": {scale}, "shift_factor": {shift}}}"#),
        )
        .unwrap();
    }

    /// The tiny SD3.5-shaped folder loads as a policy: prompts encode (through the cache,
    /// once), ODE sampling with CFG produces images of the configured size, the sampling
    /// path equals the trained velocity, LoRA adapters are the trainable set and start at
    /// the base.
    /// A CLIP tokenizer folder with only the slow files (vocab.json + merges.txt, as
    /// diffusers ships SD3's and FLUX's) tokenizes exactly as transformers' fast
    /// tokenizer.json of the same vocabulary.
    #[test]
    fn clip_tokenizer_from_vocab_and_merges() {
        let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/clip_tiny");
        let fast: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(data.join("tokenizer.json")).unwrap()).unwrap();
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("vocab.json"), fast["model"]["vocab"].to_string()).unwrap();
        let merges: Vec<String> = fast["model"]["merges"].as_array().unwrap().iter().map(|m| format!("{} {}", m[0].as_str().unwrap(), m[1].as_str().unwrap())).collect();
        std::fs::write(d.path().join("merges.txt"), format!("#version: 0.2\n{}\n", merges.join("\n"))).unwrap();
        let built = crate::encoders::tokenizer::clip_tokenizer_from_files(d.path()).unwrap();
        let reference = tokenizers::Tokenizer::from_file(data.join("tokenizer.json")).unwrap();
        for text in ["a red cat", "A  RED\tcat's", "two blue squares, left of 3 circles!", "", "reddish careers"] {
            let (a, b) = (built.encode(text, true).unwrap(), reference.encode(text, true).unwrap());
            assert_eq!(a.get_ids(), b.get_ids(), "{text:?}");
        }
        // And Tok loads such a folder.
        let t = Tok::load(d.path(), 8, "<|endoftext|>").unwrap();
        assert_eq!(t.ids(&["a red cat".into()], &Device::Cpu).unwrap().dims(), &[1, 8]);
        std::fs::remove_file(d.path().join("merges.txt")).unwrap();
        assert!(Tok::load(d.path(), 8, "!").err().unwrap().to_string().contains("merges.txt"));
    }

    fn shape(resolution: usize) -> Sd3Shape {
        Sd3Shape { resolution, t5_tokens: 5, checkpointing: false, dtype: DType::F32 }
    }

    #[test]
    fn tiny_sd35_policy_end_to_end() {
        let d = tempfile::tempdir().unwrap();
        write_tiny_model(&d.path().join("m"));
        let lora = LoraSpec { rank: 2, alpha: 2.0, targets: vec!["attn.to_q".into(), "attn.to_v".into(), "attn.add_k_proj".into()] };
        let cfg = tiny_cfg();
        let p = Sd3Policy::load(d.path().join("m").to_str().unwrap(), Some(("tiny", &cfg)), &shape(16), Some(&lora), Some(&d.path().join("cache")), &Device::Cpu, 0).unwrap();
        assert_eq!(p.latent_shape(), vec![16, 8, 8]);
        let prompts = vec![Prompt::text("a red cat"), Prompt::text("a blue square")];
        let c = p.encode(&prompts).unwrap();
        assert_eq!((c.seq.dims(), c.pooled.as_ref().unwrap().dims()), (&[2usize, 16 + 5, 64][..], &[2usize, 32][..]));
        let sample = crate::sampler::SampleConfig { steps: 2, guidance: 2.0, ..Default::default() };
        let imgs = crate::policy::ode::generate(&p, &prompts, 3, &sample).unwrap();
        let imgs = imgs.images("test").unwrap();
        assert_eq!((imgs.len(), imgs[0].h, imgs[0].w), (2, 16, 16));
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(1);
        let z = crate::sampler::randn(&[2, 16, 8, 8], &mut rng, &Device::Cpu).unwrap();
        let s = Tensor::new(&[0.3f32, 0.8], &Device::Cpu).unwrap();
        let (a, b) = (p.velocity(&z, &s, &c).unwrap(), p.velocity_frozen(&z, &s, &c).unwrap());
        assert_eq!((a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        let names: Vec<String> = p.trainable().into_iter().map(|(k, _)| k).collect();
        // 2 blocks × (to_q, to_v, add_k_proj) × (A, B); attn2.to_q does not contain "attn.to_q".
        assert_eq!(names.len(), 12, "{names:?}");
        assert!(names.iter().all(|n| n.contains(".lora_")), "{names:?}");
        // Adapters moved: the KL reference (adapters off) is still the base as loaded.
        for (_, v) in p.trainable() {
            v.set(&(v.as_tensor() + 0.1).unwrap()).unwrap();
        }
        let plain = Sd3Policy::load(d.path().join("m").to_str().unwrap(), None, &shape(16), None, None, &Device::Cpu, 0).unwrap();
        let diff = |a: Tensor, b: Tensor| (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(diff(p.velocity_base(&z, &s, &c).unwrap().unwrap(), plain.velocity_frozen(&z, &s, &c).unwrap()), 0.0);
        assert!(diff(p.velocity_frozen(&z, &s, &c).unwrap(), plain.velocity_frozen(&z, &s, &c).unwrap()) > 0.0);
        // bf16 base weights (and T5), f32 adapters: the velocity within bf16 precision of
        // the f32 one, f32 out, and gradients reach the adapters.
        let bf = Sd3Policy::load(d.path().join("m").to_str().unwrap(), None, &Sd3Shape { dtype: DType::BF16, ..shape(16) }, Some(&lora), None, &Device::Cpu, 0).unwrap();
        for (_, v) in bf.trainable() {
            assert_eq!(v.dtype(), DType::F32);
            v.set(&(v.as_tensor() + 0.1).unwrap()).unwrap();
        }
        let cb = bf.encode(&prompts).unwrap();
        let (vf, vb) = (p.velocity(&z, &s, &c).unwrap(), bf.velocity(&z, &s, &cb).unwrap());
        assert_eq!(vb.dtype(), DType::F32);
        let rel = diff(vf.clone(), vb.clone()) / vf.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(rel > 0.0 && rel < 0.05, "bf16 vs f32: {rel}");
        let g = bf.backward(&vb.sqr().unwrap().mean_all().unwrap()).unwrap();
        for (k, v) in bf.trainable().iter().filter(|(k, _)| k.contains("lora_B")) {
            let a = g.get(v.as_tensor()).unwrap_or_else(|| panic!("{k}: no gradient")).abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(a.is_finite() && a > 0.0, "{k}: {a}");
        }
        let e = Sd3Policy::load(d.path().join("m").to_str().unwrap(), None, &Sd3Shape { dtype: DType::BF16, ..shape(16) }, None, None, &Device::Cpu, 0).err().unwrap().to_string();
        assert!(e.contains("full fine-tuning"), "{e}");
        let null = p.null_condition(&c).unwrap();
        assert_eq!(null.seq.dims(), c.seq.dims());
        assert!(d.path().join("cache").read_dir().unwrap().count() >= 2, "encodings cached");
        // Another variant than configured is refused before anything else loads.
        let e = Sd3Policy::load(d.path().join("m").to_str().unwrap(), Some(("sd3.5-medium", &MmditConfig::sd35_medium())), &shape(16), None, None, &Device::Cpu, 0).err().unwrap().to_string();
        assert!(e.contains("not sd3.5-medium"), "{e}");
        assert!(Sd3Policy::load(d.path().join("m").to_str().unwrap(), None, &shape(18), None, None, &Device::Cpu, 0).err().unwrap().to_string().contains("sd3.resolution 18"));
    }
}
