//! The embedded policy: a small DiT-style rectified-flow model on patchified pixels.
//!
//! Latent space (fixed and documented): the image itself, scaled to [-1, 1], shape
//! (3, H, W). The model predicts the velocity v = ε − x₀ of z_σ = (1−σ)·x₀ + σ·ε, so
//! x̂₀ = z − σ·v, matching docs/DESIGN.md §1.1. A prompt is tokenized with the ShapeWorld
//! grammar, encoded by a tiny transformer of its own, and conditions the image in two
//! ways: its tokens join the image tokens in every block's self-attention (in-context
//! conditioning, which carries "which object where"), and its mean-pooled embedding is
//! added to the timestep embedding that drives adaLN.

use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::image::Image;
use crate::policy::nn::block::{BlockConfig, DitBlock};
use crate::policy::nn::conv::{self, ConvHead, ConvStem};
use crate::policy::nn::layers::{layer_norm_plain, timestep_embedding, LayerNorm, Linear, LoraCtx};

/// Architecture of the embedded policy. Changing any field changes the checkpoint layout.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DitConfig {
    /// Image side in pixels (square, RGB).
    pub image_size: usize,
    /// Patch side; tokens = (image_size / patch)².
    pub patch: usize,
    /// Transformer width.
    pub dim: usize,
    /// DiT blocks.
    pub depth: usize,
    /// Attention heads (dim must divide evenly).
    pub heads: usize,
    /// MLP hidden = mlp_ratio · dim.
    pub mlp_ratio: usize,
    /// Layers of the prompt encoder.
    pub text_layers: usize,
    /// Use the fused custom ops (hand-written backward) instead of composed candle ops.
    pub fused: bool,
    /// What the network outputs ([`Prediction`]); the policy always returns a velocity.
    pub prediction: Prediction,
    /// Channels of the convolutional stem and head around the patch tokens (`conv.rs`);
    /// 0 = none, the plain patchify/linear DiT (and the checkpoint layout before this field).
    pub conv_channels: usize,
}

impl Default for DitConfig {
    fn default() -> Self {
        Self { image_size: 32, patch: 4, dim: 128, depth: 4, heads: 4, mlp_ratio: 4, text_layers: 2, fused: true, prediction: Prediction::X, conv_channels: 32 }
    }
}

/// The network's output parametrisation. Either way the policy returns the velocity
/// v = ε − x₀ that samplers, log-probs and the flow-matching loss use. The image default is
/// X (bench/NOTES.md §3); the video default stays V (X gave no clear gain there, §7).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Prediction {
    /// The network outputs v directly.
    V,
    /// The network outputs x̂₀ and v = (z − x̂₀)/max(σ, σ_min). A small pixel-space
    /// transformer cannot reproduce the high-dimensional noise that v contains at high σ
    /// (its x̂₀ = z − σv came out as patch-blocky noise); clean images are far easier to
    /// output (the "let denoisers denoise" argument of JiT, Li & He 2025).
    X,
}

/// σ floor in the x-prediction division, keeping v finite as σ → 0. The flow-matching
/// target stays ε − x₀, so below the floor (≈ 0.2 % of logit-normal training draws) loss and
/// target disagree slightly; default schedules do not step below it (the last σ > 0 is 1/S,
/// ≥ 0.05 for S ≤ 20 steps).
pub const X_PRED_SIGMA_MIN: f64 = 0.05;

/// Network output → velocity for latents z (B, ...) at noise levels σ (B,).
pub(crate) fn output_to_velocity(pred: Prediction, out: Tensor, z: &Tensor, sigma: &Tensor) -> Result<Tensor> {
    match pred {
        Prediction::V => Ok(out),
        Prediction::X => {
            let mut shape = vec![1usize; z.rank()];
            shape[0] = z.dim(0)?;
            let denom = sigma.clamp(X_PRED_SIGMA_MIN, f64::MAX)?.reshape(shape)?;
            (z - out)?.broadcast_div(&denom)
        }
    }
}

/// Checks shared by the image and video policy configs; `section` names the config table
/// in errors ("model" or "video_model").
pub(crate) fn validate_dims(section: &str, image_size: usize, patch: usize, dim: usize, heads: usize, depth: usize, mlp_ratio: usize) -> anyhow::Result<()> {
    anyhow::ensure!(patch > 0 && image_size.is_multiple_of(patch), "{section}.patch: {patch} must divide {section}.image_size {image_size}");
    anyhow::ensure!(heads > 0 && dim.is_multiple_of(heads), "{section}.heads: {heads} must divide {section}.dim {dim}");
    anyhow::ensure!(dim.is_multiple_of(2) && dim >= 8, "{section}.dim: must be even and ≥ 8 (got {dim})");
    anyhow::ensure!(depth >= 1, "{section}.depth: must be ≥ 1");
    anyhow::ensure!(mlp_ratio >= 1, "{section}.mlp_ratio: must be ≥ 1");
    Ok(())
}

impl DitConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        validate_dims("model", self.image_size, self.patch, self.dim, self.heads, self.depth, self.mlp_ratio)
    }
    pub fn grid(&self) -> usize {
        self.image_size / self.patch
    }
    pub fn latent_shape(&self) -> [usize; 3] {
        [3, self.image_size, self.image_size]
    }
}

/// One pre-LN transformer layer of the prompt encoder (composed, differentiable ops; the
/// prompt is ≤ a dozen tokens so speed does not matter here). Shared with the video DiT.
pub(crate) struct TextLayer {
    ln1: LayerNorm,
    qkv: Linear,
    proj: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
}

impl TextLayer {
    pub(crate) fn new(vb: &VarBuilder, dim: usize, heads: usize, lora: Option<&LoraCtx>) -> Result<Self> {
        Ok(Self {
            ln1: LayerNorm::new(&vb.pp("ln1"), dim)?,
            qkv: Linear::new(&vb.pp("attn.qkv"), dim, 3 * dim, true, lora)?,
            proj: Linear::new(&vb.pp("attn.proj"), dim, dim, true, lora)?,
            ln2: LayerNorm::new(&vb.pp("ln2"), dim)?,
            fc1: Linear::new(&vb.pp("mlp.fc1"), dim, 2 * dim, true, lora)?,
            fc2: Linear::new(&vb.pp("mlp.fc2"), 2 * dim, dim, true, lora)?,
            heads,
        })
    }
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        let dh = d / self.heads;
        let qkv = self.qkv.forward(&self.ln1.forward(x)?)?.reshape((b, n, 3, self.heads, dh))?.permute((2, 0, 3, 1, 4))?;
        let (q, k, v) = (qkv.get(0)?.contiguous()?, qkv.get(1)?.contiguous()?, qkv.get(2)?.contiguous()?);
        let att = (q.matmul(&k.t()?)? / (dh as f64).sqrt())?;
        let att = candle_nn::ops::softmax(&att, D::Minus1)?;
        let o = att.matmul(&v)?.transpose(1, 2)?.reshape((b, n, d))?;
        let x = (x + self.proj.forward(&o)?)?;
        let h = self.fc2.forward(&self.fc1.forward(&self.ln2.forward(&x)?)?.gelu()?)?;
        x + h
    }
}

/// The prompt encoder both policies share: token + position embeddings, a few
/// [`TextLayer`]s, a final LayerNorm and a projection. Names: `text.embed`, `text.pos`,
/// `text.layers.{i}.*`, `text.ln`, `text_proj`.
pub(crate) struct TextEncoder {
    embed: Tensor,
    pos: Tensor,
    layers: Vec<TextLayer>,
    ln: LayerNorm,
    proj: Linear,
    dim: usize,
}

impl TextEncoder {
    /// The transformer layers, built on their own: the seeded init draws parameters in
    /// creation order, and the policies create these before their blocks and the rest.
    pub(crate) fn layers(vb: &VarBuilder, n: usize, dim: usize, heads: usize, lora: Option<&LoraCtx>) -> Result<Vec<TextLayer>> {
        let tvb = vb.pp("text");
        (0..n).map(|i| TextLayer::new(&tvb.pp(format!("layers.{i}")), dim, heads, lora)).collect()
    }

    /// The rest of the encoder around already built `layers` (created in this order:
    /// embed, pos, ln, proj).
    pub(crate) fn new(vb: &VarBuilder, layers: Vec<TextLayer>, vocab: usize, max_tokens: usize, dim: usize, lora: Option<&LoraCtx>) -> Result<Self> {
        let tvb = vb.pp("text");
        let small = Init::Randn { mean: 0.0, stdev: 0.02 };
        let embed = tvb.get_with_hints((vocab, dim), "embed", small)?;
        let pos = tvb.get_with_hints((max_tokens, dim), "pos", small)?;
        let ln = LayerNorm::new(&tvb.pp("ln"), dim)?;
        let proj = Linear::new(&vb.pp("text_proj"), dim, dim, true, lora)?;
        Ok(Self { embed, pos, layers, ln, proj, dim })
    }

    /// Token ids (B, L) → (token features (B, L, D), pooled (B, D)).
    pub(crate) fn forward(&self, tokens: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, l) = tokens.dims2()?;
        let mut x = self.embed.index_select(&tokens.flatten_all()?, 0)?.reshape((b, l, self.dim))?;
        x = x.broadcast_add(&self.pos.narrow(0, 0, l)?.unsqueeze(0)?)?;
        for layer in &self.layers {
            x = layer.forward(&x)?;
        }
        let x = self.ln.forward(&x)?;
        let pooled = x.mean(1)?;
        Ok((self.proj.forward(&x)?, pooled))
    }
}

/// The conditioning and output head both policies share: timestep embedding + pooled
/// prompt → conditioning vector (`t_embed.fc{1,2}`, `y_embed`), and the final adaLN
/// modulation + linear projection back to patch values (`final.ada`, `final.linear`).
pub(crate) struct AdaHead {
    t_fc1: Linear,
    t_fc2: Linear,
    y_embed: Linear,
    final_ada: Linear,
    final_linear: Linear,
    dim: usize,
}

impl AdaHead {
    /// Created in this order: t_embed.fc1, t_embed.fc2, y_embed, final.ada, final.linear.
    pub(crate) fn new(vb: &VarBuilder, dim: usize, patch_dim: usize, lora: Option<&LoraCtx>) -> Result<Self> {
        let t_fc1 = Linear::new(&vb.pp("t_embed.fc1"), 256, dim, true, lora)?;
        let t_fc2 = Linear::new(&vb.pp("t_embed.fc2"), dim, dim, true, lora)?;
        let y_embed = Linear::new(&vb.pp("y_embed"), dim, dim, true, lora)?;
        let final_ada = Linear::new_with_init(&vb.pp("final.ada"), dim, 2 * dim, true, lora, Some(Init::Uniform { lo: -0.02, up: 0.02 }))?;
        let final_linear = Linear::new_with_init(&vb.pp("final.linear"), dim, patch_dim, true, lora, Some(Init::Uniform { lo: -0.02, up: 0.02 }))?;
        Ok(Self { t_fc1, t_fc2, y_embed, final_ada, final_linear, dim })
    }

    /// Conditioning (B, D) from noise levels σ (B,) and the pooled prompt (B, D).
    pub(crate) fn cond(&self, sigma: &Tensor, pooled: &Tensor) -> Result<Tensor> {
        let t = timestep_embedding(&(sigma * 1000.0)?, 256)?;
        self.t_fc2.forward(&self.t_fc1.forward(&t)?.silu()?)? + self.y_embed.forward(pooled)?
    }

    /// Tokens (B, N, D) → patch values (B, N, patch_dim) under conditioning (B, D).
    pub(crate) fn out(&self, x: &Tensor, cond: &Tensor) -> Result<Tensor> {
        let m = self.final_ada.forward(&cond.silu()?)?.unsqueeze(1)?;
        let (shift, scale) = (m.narrow(2, 0, self.dim)?, m.narrow(2, self.dim, self.dim)?);
        let x = layer_norm_plain(x, 1e-6)?.broadcast_mul(&(scale + 1.0)?)?.broadcast_add(&shift)?;
        self.final_linear.forward(&x)
    }
}

/// DiT's fixed 2-D sin-cos position table for a `grid`×`grid` token grid, row-major:
/// the first half of the width encodes the row, the second the column, each as
/// [sin(pos·ω_k), cos(pos·ω_k)] with ω_k = 10000^(−k/(D/4)). Returns (grid², dim) values.
pub fn sincos_2d(grid: usize, dim: usize) -> Vec<f32> {
    let quarter = dim / 4;
    let mut out = vec![0f32; grid * grid * dim];
    for r in 0..grid {
        for c in 0..grid {
            let row = &mut out[(r * grid + c) * dim..(r * grid + c + 1) * dim];
            for (half, pos) in [(0usize, r as f64), (1, c as f64)] {
                let base = half * dim / 2;
                for k in 0..quarter {
                    let a = pos * 10000f64.powf(-(k as f64) / quarter.max(1) as f64);
                    row[base + k] = a.sin() as f32;
                    row[base + quarter + k] = a.cos() as f32;
                }
            }
        }
    }
    out
}

/// The policy network v_θ(z, σ, prompt).
pub struct Dit {
    pub cfg: DitConfig,
    text: TextEncoder,
    x_embed: Linear,
    pos_embed: Tensor,
    blocks: Vec<DitBlock>,
    head: AdaHead,
    conv: Option<(ConvStem, ConvHead)>,
}

impl Dit {
    /// Build (or bind to already loaded) parameters under `vb`, with stable names:
    /// `text.*`, `x_embed`, `pos_embed`, `t_embed.fc{1,2}`, `y_embed`, `blocks.{i}.*`, `final.*`.
    pub fn new(vb: &VarBuilder, cfg: &DitConfig, lora: Option<&LoraCtx>) -> Result<Self> {
        let d = cfg.dim;
        // Creation order is part of the seeded init: text layers, blocks, the rest.
        let layers = TextEncoder::layers(vb, cfg.text_layers, d, cfg.heads, lora)?;
        let bcfg = BlockConfig { dim: d, heads: cfg.heads, mlp_ratio: cfg.mlp_ratio, fused: cfg.fused };
        let blocks = (0..cfg.depth).map(|i| DitBlock::new(&vb.pp(format!("blocks.{i}")), &bcfg, lora)).collect::<Result<Vec<_>>>()?;
        let text = TextEncoder::new(vb, layers, crate::world::vocab().len(), crate::world::MAX_TOKENS, d, lora)?;
        // Values per token in and out: the patch's pixels, or its stem features.
        let in_ch = if cfg.conv_channels > 0 { cfg.conv_channels } else { 3 };
        let pdim = in_ch * cfg.patch * cfg.patch;
        let x_embed = Linear::new(&vb.pp("x_embed"), pdim, d, true, lora)?;
        let pos_embed = vb.get_with_hints((cfg.grid() * cfg.grid(), d), "pos_embed", Init::Randn { mean: 0.0, stdev: 0.02 })?;
        let head = AdaHead::new(vb, d, pdim, lora)?;
        let conv = match cfg.conv_channels {
            0 => None,
            c => Some((ConvStem::new(vb, c, lora)?, ConvHead::new(vb, c, lora)?)),
        };
        Ok(Self { cfg: cfg.clone(), text, x_embed, pos_embed, blocks, head, conv })
    }

    /// Encode token ids (B, L) → (token features (B, L, D), pooled (B, D)).
    pub fn encode_text(&self, tokens: &Tensor) -> Result<(Tensor, Tensor)> {
        self.text.forward(tokens)
    }

    /// Velocity for latents z (B, 3, H, W) at noise levels sigma (B,) given token ids (B, L).
    pub fn forward(&self, z: &Tensor, sigma: &Tensor, tokens: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = z.dims4()?;
        let p = self.cfg.patch;
        let (gh, gw) = (h / p, w / p);
        let stem = match &self.conv {
            Some((stem, _)) => Some(stem.forward(z)?),
            None => None,
        };
        let x = match &stem {
            Some(f) => conv::patchify(f, p)?,
            // Patchify: (B,C,H,W) → (B, gh·gw, C·p·p).
            None => z.reshape((b, c, gh, p, gw, p))?.permute((0, 2, 4, 1, 3, 5))?.reshape((b, gh * gw, c * p * p))?,
        };
        let x = self.x_embed.forward(&x)?.broadcast_add(&self.pos_embed.unsqueeze(0)?)?;
        let (txt, pooled) = self.text.forward(tokens)?;
        let cond = self.head.cond(sigma, &pooled)?;
        let n_txt = txt.dim(1)?;
        let mut seq = Tensor::cat(&[&txt, &x], 1)?;
        for block in &self.blocks {
            seq = block.forward(&seq, &cond)?;
        }
        let out = self.head.out(&seq.narrow(1, n_txt, gh * gw)?, &cond)?;
        let out = match (&self.conv, &stem) {
            (Some((_, head)), Some(f)) => head.forward(&conv::unpatchify(&out, gh, gw, p, self.cfg.conv_channels)?, f)?,
            // Unpatchify back to (B, C, H, W).
            _ => out.reshape((b, gh, gw, c, p, p))?.permute((0, 3, 1, 4, 2, 5))?.reshape((b, c, h, w))?,
        };
        output_to_velocity(self.cfg.prediction, out, z, sigma)
    }
}

/// Token ids for a batch of prompts, (B, MAX_TOKENS) u32.
pub fn tokens_for(texts: &[String], device: &Device) -> anyhow::Result<Tensor> {
    let l = crate::world::MAX_TOKENS;
    let mut ids = Vec::with_capacity(texts.len() * l);
    for t in texts {
        ids.extend(crate::world::tokenize(t, l)?);
    }
    Ok(Tensor::from_vec(ids, (texts.len(), l), device)?)
}

/// Images → latents in [-1, 1], (B, 3, H, W).
pub fn images_to_latents(images: &[Image], device: &Device) -> Result<Tensor> {
    let (h, w) = (images[0].h, images[0].w);
    let mut data = Vec::with_capacity(images.len() * 3 * h * w);
    for im in images {
        data.extend(im.data.iter().map(|v| v * 2.0 - 1.0));
    }
    Tensor::from_vec(data, (images.len(), 3, h, w), device)
}

/// Latents → images (the embedded "decoder" is the identity up to scaling and clamping).
pub fn latents_to_images(z: &Tensor) -> Result<Vec<Image>> {
    let (b, c, h, w) = z.dims4()?;
    assert_eq!(c, 3);
    let flat: Vec<f32> = z.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    Ok((0..b).map(|i| Image { h, w, data: flat[i * 3 * h * w..(i + 1) * 3 * h * w].iter().map(|v| ((v + 1.0) * 0.5).clamp(0.0, 1.0)).collect() }).collect())
}

/// The ShapeWorld image family (`modality = "image"`, `[model]`).
impl crate::policy::Generator for DitConfig {
    fn section(&self) -> &'static str {
        "model"
    }
    fn sample_kind(&self) -> crate::image::SampleKind {
        crate::image::SampleKind::Images
    }
    fn image_size(&self) -> usize {
        self.image_size
    }
    fn validate(&self) -> anyhow::Result<()> {
        DitConfig::validate(self)
    }
    fn load(&self, weights: &std::path::Path, lora: Option<&crate::policy::nn::layers::LoraSpec>, device: &Device, seed: u64) -> anyhow::Result<Box<dyn crate::policy::Policy>> {
        Ok(Box::new(crate::policy::ImagePolicy::load(self, weights, lora, device, seed)?))
    }
    fn cache_prefix(&self) -> &'static str {
        "base"
    }
    fn section_json(&self) -> String {
        serde_json::to_string(self).expect("config serializes")
    }
    fn ships_base(&self) -> bool {
        true
    }
    fn prediction(&self) -> Option<Prediction> {
        Some(self.prediction)
    }
    fn save_random(&self, device: &Device, seed: u64, path: &std::path::Path) -> anyhow::Result<()> {
        crate::policy::ImagePolicy::new(self, device, seed)?.save(path)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::policy::{FlowModel, ImagePolicy, Policy};
    use crate::world::{self, Split};

    pub(crate) fn tiny() -> DitConfig {
        DitConfig { image_size: 16, patch: 4, dim: 32, depth: 2, heads: 2, mlp_ratio: 2, text_layers: 1, fused: true, prediction: Prediction::V, conv_channels: 0 }
    }

    /// `tiny()` with the conv stem and head.
    pub(crate) fn tiny_conv() -> DitConfig {
        DitConfig { conv_channels: 8, ..tiny() }
    }

    fn batch(p: &ImagePolicy, n: usize) -> (Tensor, Tensor, crate::policy::Condition) {
        let prompts = world::prompts(Split::Train, n, 1);
        let cond = p.condition(&prompts).unwrap();
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(3);
        let z = crate::sampler::randn(&[n, 3, 16, 16], &mut rng, &Device::Cpu).unwrap();
        let sigma = Tensor::from_vec((0..n).map(|i| 0.1 + 0.8 * i as f32 / n as f32).collect::<Vec<_>>(), n, &Device::Cpu).unwrap();
        (z, sigma, cond)
    }

    #[test]
    fn shapes() {
        let p = ImagePolicy::new(&tiny(), &Device::Cpu, 0).unwrap();
        let (z, s, c) = batch(&p, 3);
        let v = p.velocity(&z, &s, &c).unwrap();
        assert_eq!(v.dims(), &[3, 3, 16, 16]);
        assert_eq!(p.latent_shape(), vec![3, 16, 16]);
        let imgs = p.decode_images(&v).unwrap();
        assert_eq!((imgs.len(), imgs[0].h, imgs[0].w), (3, 16, 16));
    }

    /// x-prediction: v = (z − x̂₀)/max(σ, σ_min), on hand-made numbers.
    #[test]
    fn x_prediction_velocity_formula() {
        let dev = Device::Cpu;
        let z = Tensor::from_vec(vec![1.0f32, 2.0, -1.0, 0.5], (2, 2), &dev).unwrap();
        let out = Tensor::from_vec(vec![0.5f32, 1.0, 0.0, 0.0], (2, 2), &dev).unwrap();
        let sigma = Tensor::from_vec(vec![0.5f32, 0.01], 2, &dev).unwrap();
        let v: Vec<f32> = output_to_velocity(Prediction::X, out.clone(), &z, &sigma).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let want = [1.0, 2.0, -1.0 / 0.05, 0.5 / 0.05];
        for (a, b) in v.iter().zip(want) {
            assert!((a - b).abs() < 1e-4, "{v:?} vs {want:?}");
        }
        let v: Vec<f32> = output_to_velocity(Prediction::V, out, &z, &sigma).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(v, vec![0.5, 1.0, 0.0, 0.0]);
        // A policy with x-prediction returns a velocity whose Euler step to σ = 0 lands on x̂₀:
        // the same weights with prediction V return the raw network output x̂₀ (σ ≥ σ_min here).
        let p = ImagePolicy::new(&DitConfig { prediction: Prediction::X, ..tiny() }, &dev, 0).unwrap();
        let raw = ImagePolicy::new(&tiny(), &dev, 0).unwrap();
        let (zb, s, c) = batch(&p, 2);
        let v = p.velocity(&zb, &s, &c).unwrap();
        assert_eq!(v.dims(), zb.dims());
        let landed = (&zb - v.broadcast_mul(&s.reshape((2, 1, 1, 1)).unwrap()).unwrap()).unwrap();
        let d = (landed - raw.velocity(&zb, &s, &c).unwrap()).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-4, "z − σ·v differs from x̂₀ by {d}");
    }

    /// Classifier-free guidance equals v_null + w·(v_cond − v_null) from two separate
    /// forwards, and w = 1 is the plain velocity.
    #[test]
    fn guidance_combines_prompt_and_empty_prompt() {
        let p = ImagePolicy::new(&tiny(), &Device::Cpu, 0).unwrap();
        let (z, s, c) = batch(&p, 3);
        let plain = p.velocity(&z, &s, &c).unwrap();
        let w1 = crate::policy::guided_velocity(&p, &z, &s, &c, 1.0).unwrap();
        assert_eq!(plain.flatten_all().unwrap().to_vec1::<f32>().unwrap(), w1.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        let vu = p.velocity(&z, &s, &c.zeros_like().unwrap()).unwrap();
        let want = (&vu + ((&plain - &vu).unwrap() * 2.5).unwrap()).unwrap();
        let got = crate::policy::guided_velocity(&p, &z, &s, &c, 2.5).unwrap();
        let d = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-4, "guided velocity differs by {d}");
    }

    /// The guard against candle ops that silently drop gradients: one backward pass must
    /// reach every trainable tensor with a finite, non-zero gradient — for both paths.
    #[test]
    fn every_parameter_gets_a_gradient() {
        for (fused, prediction, conv) in [(false, Prediction::V, 0), (true, Prediction::V, 0), (true, Prediction::X, 0), (false, Prediction::X, 8), (true, Prediction::X, 8)] {
            let cfg = DitConfig { fused, prediction, conv_channels: conv, ..tiny() };
            let p = ImagePolicy::new(&cfg, &Device::Cpu, 0).unwrap();
            let (z, s, c) = batch(&p, 2);
            let loss = p.velocity(&z, &s, &c).unwrap().sqr().unwrap().mean_all().unwrap();
            let grads = loss.backward().unwrap();
            crate::policy::assert_every_var_has_gradient(&grads, p.trainable(), &format!("fused={fused} {prediction:?} conv={conv}"));
        }
    }

    /// With the conv stem and head, the fused and composed block paths agree (same weights).
    #[test]
    fn conv_stem_fused_and_reference_paths_agree() {
        let fused = ImagePolicy::new(&tiny_conv(), &Device::Cpu, 3).unwrap();
        let reference = ImagePolicy::new(&DitConfig { fused: false, ..tiny_conv() }, &Device::Cpu, 3).unwrap();
        let (z, s, c) = batch(&fused, 2);
        let d = (fused.velocity(&z, &s, &c).unwrap() - reference.velocity(&z, &s, &c).unwrap()).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-4, "fused vs reference: {d}");
    }

    /// DiT's 2-D sin-cos table: row r, column c → [sin, cos](r·ω) ‖ [sin, cos](c·ω), so
    /// tokens of one row share the first half and nearby tokens have nearby codes.
    #[test]
    fn sincos_table_encodes_row_and_column() {
        let (g, d) = (4usize, 16usize);
        let t = sincos_2d(g, d);
        let tok = |r: usize, c: usize| &t[(r * g + c) * d..(r * g + c + 1) * d];
        assert_eq!(&tok(2, 0)[..d / 2], &tok(2, 3)[..d / 2], "same row, same first half");
        assert_eq!(&tok(0, 1)[d / 2..], &tok(3, 1)[d / 2..], "same column, same second half");
        // Frequency 0 of the row half: sin(r), cos(r).
        assert!((tok(3, 0)[0] - 3f32.sin()).abs() < 1e-6 && (tok(3, 0)[d / 4] - 3f32.cos()).abs() < 1e-6);
        let dist = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f32>();
        assert!(dist(tok(1, 1), tok(1, 2)) < dist(tok(1, 1), tok(3, 3)), "neighbours are closer than far tokens");
    }

    #[test]
    fn same_seed_same_init_and_checkpoint_roundtrip() {
        let dir = tempfile::tempdir().unwrap();
        let a = ImagePolicy::new(&tiny(), &Device::Cpu, 5).unwrap();
        let b = ImagePolicy::new(&tiny(), &Device::Cpu, 5).unwrap();
        let (z, s, c) = batch(&a, 2);
        let va: Vec<f32> = a.velocity(&z, &s, &c).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let vb: Vec<f32> = b.velocity(&z, &s, &c).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert!(va == vb, "same seed must give the same init");
        let path = dir.path().join("m.safetensors");
        a.save(&path).unwrap();
        let c2 = ImagePolicy::load(&tiny(), &path, None, &Device::Cpu, 9).unwrap();
        let vc: Vec<f32> = c2.velocity(&z, &s, &c).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        assert!(va == vc, "checkpoint round trip must preserve outputs");
    }

    #[test]
    fn mismatched_or_truncated_checkpoint_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        ImagePolicy::new(&tiny(), &Device::Cpu, 0).unwrap().save(&path).unwrap();
        let other = DitConfig { dim: 48, heads: 2, ..tiny() };
        let e = ImagePolicy::load(&other, &path, None, &Device::Cpu, 0).err().unwrap().to_string();
        assert!(e.contains("m.safetensors") && e.contains("shape"), "{e}");
        let deeper = DitConfig { depth: 3, ..tiny() };
        let e = ImagePolicy::load(&deeper, &path, None, &Device::Cpu, 0).err().unwrap().to_string();
        assert!(e.contains("blocks.2") && e.contains("missing"), "{e}");
        let bytes = std::fs::read(&path).unwrap();
        let cut = dir.path().join("cut.safetensors");
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        let e = ImagePolicy::load(&tiny(), &cut, None, &Device::Cpu, 0).err().unwrap().to_string();
        assert!(e.contains("cut.safetensors"), "{e}");
        // A base from before the conv stem, loaded with it on (and the other way round):
        // the error says which setting the file needs.
        let e = format!("{:#}", ImagePolicy::load(&tiny_conv(), &path, None, &Device::Cpu, 0).err().unwrap());
        assert!(e.contains("--set model.conv_channels=0"), "{e}");
        let conv_path = dir.path().join("conv.safetensors");
        ImagePolicy::new(&tiny_conv(), &Device::Cpu, 0).unwrap().save(&conv_path).unwrap();
        let e = format!("{:#}", ImagePolicy::load(&tiny(), &conv_path, None, &Device::Cpu, 0).err().unwrap());
        assert!(e.contains("--set model.conv_channels=8"), "{e}");
    }

    #[test]
    fn lora_starts_at_base_and_trains_only_adapters() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let base = ImagePolicy::new(&tiny(), &Device::Cpu, 0).unwrap();
        base.save(&path).unwrap();
        let spec = crate::policy::nn::layers::LoraSpec { rank: 2, alpha: 4.0, targets: vec!["attn.qkv".into()] };
        let l = ImagePolicy::load(&tiny(), &path, Some(&spec), &Device::Cpu, 0).unwrap();
        let (z, s, c) = batch(&base, 2);
        let d = (base.velocity(&z, &s, &c).unwrap() - l.velocity(&z, &s, &c).unwrap()).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(d, 0.0, "LoRA B = 0 at init, so the adapted model equals the base");
        let names: Vec<String> = l.trainable().into_iter().map(|(n, _)| n).collect();
        assert!(!names.is_empty() && names.iter().all(|n| n.contains("attn.qkv") && n.contains("lora_")), "{names:?}");
        let bad = crate::policy::nn::layers::LoraSpec { rank: 2, alpha: 4.0, targets: vec!["nope".into()] };
        let e = ImagePolicy::load(&tiny(), &path, Some(&bad), &Device::Cpu, 0).err().unwrap().to_string();
        assert!(e.contains("matches no linear layer"), "{e}");
    }

    /// The sampling path (untracked views of the weights) equals the training path bit for
    /// bit, records no graph, sees in-place weight updates (what the optimizer does), and
    /// the training path under LoRA gives gradients to the adapters only.
    #[test]
    fn frozen_velocity_equals_the_trained_one_and_follows_weight_updates() {
        use crate::policy::FlowModel;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let base = ImagePolicy::new(&tiny_conv(), &Device::Cpu, 0).unwrap();
        base.save(&path).unwrap();
        let spec = crate::policy::nn::layers::LoraSpec { rank: 2, alpha: 4.0, targets: vec!["attn.qkv".into(), "mlp".into()] };
        let l = ImagePolicy::load(&tiny_conv(), &path, Some(&spec), &Device::Cpu, 0).unwrap();
        let (z, s, c) = batch(&l, 2);
        let same = |l: &ImagePolicy| {
            let (a, b) = (l.velocity(&z, &s, &c).unwrap(), l.velocity_frozen(&z, &s, &c).unwrap());
            assert!(!b.track_op(), "the sampling path recorded a graph");
            let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert_eq!(d, 0.0, "sampling and training velocities differ by {d}");
        };
        same(&l);
        // An optimizer-style in-place update of every adapter shows through the views.
        let before = l.velocity_frozen(&z, &s, &c).unwrap();
        for (_, v) in l.trainable() {
            v.set(&(v.as_tensor() + 0.05).unwrap()).unwrap();
        }
        let moved = (l.velocity_frozen(&z, &s, &c).unwrap() - before).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(moved > 0.0, "the frozen views did not see the adapters' update");
        same(&l);
        // The KL reference of a LoRA run: the adapters switched off is the base as loaded,
        // bit for bit, untracked; a policy without adapters has none.
        let plain = ImagePolicy::load(&tiny_conv(), &path, None, &Device::Cpu, 0).unwrap();
        let r = l.velocity_base(&z, &s, &c).unwrap().unwrap();
        assert!(!r.track_op());
        let d = (r - plain.velocity_frozen(&z, &s, &c).unwrap()).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(d, 0.0, "adapters off differs from the base by {d}");
        assert!(plain.velocity_base(&z, &s, &c).is_none());
        let g = l.velocity(&z, &s, &c).unwrap().sqr().unwrap().mean_all().unwrap().backward().unwrap();
        for (name, v) in l.base_vars() {
            assert!(g.get(v.as_tensor()).is_none(), "{name}: a frozen base weight got a gradient");
        }
        for (name, v) in l.trainable() {
            let a: f32 = g.get(v.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient")).abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
            assert!(a.is_finite() && a > 0.0, "{name}: gradient sum |g| = {a}");
        }
    }
}
