//! The spatio-temporal policy for ShapeWorld-Video: the image DiT extended with a time
//! axis. Latent space (fixed and documented): the clip itself scaled to [-1, 1], shape
//! (3, T, H, W). Tokens are tubelets of `t_patch` frames × `patch`² pixels; positions are
//! a learned spatial table plus a learned temporal table (factorised, so a token's
//! embedding is "where in the frame" + "when").
//!
//! Two attention layouts (`attention`):
//! * `full` — every block attends over prompt tokens + all T'·gh·gw video tokens;
//! * `factorised` — blocks alternate between *spatial* attention (each frame's tokens plus
//!   the prompt tokens, as context) and *temporal* attention (each spatial position's
//!   tokens across time), as in factorised video transformers. Same block, same
//!   parameter count per block; only the token grouping differs.
//!
//! The blocks are the image policy's [`DitBlock`]s (fused ops with hand-written backward),
//! so everything the image tests guarantee about gradients carries over; this file adds
//! the tubelet (un)patchify and the regrouping.

use candle_core::{Result, Tensor};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};

use crate::image::Image;
use crate::policy::nn::block::{BlockConfig, DitBlock};
use crate::policy::nn::layers::{Linear, LoraCtx};
use crate::policy::shapeworld::dit::{output_to_velocity, AdaHead, Prediction, TextEncoder};

/// Token grouping of the video blocks.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum VideoAttention {
    Full,
    Factorised,
}

/// Architecture of the video policy. Changing any field changes the checkpoint layout.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct VideoDitConfig {
    /// Frame side in pixels (square, RGB).
    pub image_size: usize,
    /// Frames per clip.
    pub frames: usize,
    /// Spatial patch side.
    pub patch: usize,
    /// Frames per tubelet (divides `frames`).
    pub t_patch: usize,
    pub dim: usize,
    /// Blocks (with `factorised`: alternating spatial, temporal, spatial, …).
    pub depth: usize,
    pub heads: usize,
    pub mlp_ratio: usize,
    pub text_layers: usize,
    pub attention: VideoAttention,
    /// Use the fused custom ops (hand-written backward) instead of composed candle ops.
    pub fused: bool,
    /// Network output: velocity ("v", default) or clean clip ("x"), as `model.prediction`;
    /// x gave the video base no clear gain (bench/NOTES.md §7).
    pub prediction: Prediction,
}

impl Default for VideoDitConfig {
    fn default() -> Self {
        Self {
            image_size: 32,
            frames: 8,
            patch: 4,
            t_patch: 2,
            dim: 128,
            depth: 4,
            heads: 4,
            mlp_ratio: 4,
            text_layers: 2,
            attention: VideoAttention::Factorised,
            fused: true,
            prediction: Prediction::V,
        }
    }
}

impl VideoDitConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        crate::policy::shapeworld::dit::validate_dims("video_model", self.image_size, self.patch, self.dim, self.heads, self.depth, self.mlp_ratio)?;
        anyhow::ensure!(self.frames >= 2, "video_model.frames: a clip needs at least 2 frames (got {})", self.frames);
        anyhow::ensure!(self.t_patch > 0 && self.frames.is_multiple_of(self.t_patch), "video_model.t_patch: {} must divide video_model.frames {}", self.t_patch, self.frames);
        Ok(())
    }
    pub fn grid(&self) -> usize {
        self.image_size / self.patch
    }
    /// Tubelets along time.
    pub fn t_grid(&self) -> usize {
        self.frames / self.t_patch
    }
    pub fn latent_shape(&self) -> [usize; 4] {
        [3, self.frames, self.image_size, self.image_size]
    }
    /// Video tokens per clip.
    pub fn tokens(&self) -> usize {
        self.t_grid() * self.grid() * self.grid()
    }
}

/// The video policy network v_θ(z, σ, prompt) on (B, 3, T, H, W) latents.
pub struct VideoDit {
    pub cfg: VideoDitConfig,
    text: TextEncoder,
    x_embed: Linear,
    pos_space: Tensor,
    pos_time: Tensor,
    blocks: Vec<DitBlock>,
    head: AdaHead,
}

/// (B, D) → (B·k, D): each row repeated k times, consecutively.
fn repeat_rows(c: &Tensor, k: usize) -> Result<Tensor> {
    let (b, d) = c.dims2()?;
    c.unsqueeze(1)?.broadcast_as((b, k, d))?.reshape((b * k, d))
}

impl VideoDit {
    /// Parameters with stable names: `text.*`, `text_proj`, `x_embed`, `pos_space`,
    /// `pos_time`, `t_embed.fc{1,2}`, `y_embed`, `blocks.{i}.*`, `final.*`. `vocab` and
    /// `max_tokens` size the prompt encoder (the video grammar's vocabulary).
    pub fn new(vb: &VarBuilder, cfg: &VideoDitConfig, vocab: usize, max_tokens: usize, lora: Option<&LoraCtx>) -> Result<Self> {
        let d = cfg.dim;
        // Same creation order as the image policy (it fixes the seeded init).
        let layers = TextEncoder::layers(vb, cfg.text_layers, d, cfg.heads, lora)?;
        let bcfg = BlockConfig { dim: d, heads: cfg.heads, mlp_ratio: cfg.mlp_ratio, fused: cfg.fused };
        let blocks = (0..cfg.depth).map(|i| DitBlock::new(&vb.pp(format!("blocks.{i}")), &bcfg, lora)).collect::<Result<Vec<_>>>()?;
        let text = TextEncoder::new(vb, layers, vocab, max_tokens, d, lora)?;
        let pdim = 3 * cfg.t_patch * cfg.patch * cfg.patch;
        let small = Init::Randn { mean: 0.0, stdev: 0.02 };
        let x_embed = Linear::new(&vb.pp("x_embed"), pdim, d, true, lora)?;
        let pos_space = vb.get_with_hints((cfg.grid() * cfg.grid(), d), "pos_space", small)?;
        let pos_time = vb.get_with_hints((cfg.t_grid(), d), "pos_time", small)?;
        let head = AdaHead::new(vb, d, pdim, lora)?;
        Ok(Self { cfg: cfg.clone(), text, x_embed, pos_space, pos_time, blocks, head })
    }

    /// (B, C, T, H, W) → (B, T'·gh·gw, C·tp·p·p), tokens ordered (time, row, column).
    fn patchify(&self, z: &Tensor) -> Result<Tensor> {
        let (b, c, t, h, w) = z.dims5()?;
        let (p, tp) = (self.cfg.patch, self.cfg.t_patch);
        let (tt, gh, gw) = (t / tp, h / p, w / p);
        // Fold each tubelet's frames into channels, then patchify like an image.
        let x = z.reshape((b, c, tt, tp, h * w))?.permute((0, 2, 1, 3, 4))?.reshape((b * tt, c * tp, h, w))?;
        x.reshape((b * tt, c * tp, gh, p, gw, p))?.permute((0, 2, 4, 1, 3, 5))?.reshape((b, tt * gh * gw, c * tp * p * p))
    }

    /// Inverse of [`Self::patchify`].
    fn unpatchify(&self, x: &Tensor, b: usize, c: usize, t: usize, h: usize, w: usize) -> Result<Tensor> {
        let (p, tp) = (self.cfg.patch, self.cfg.t_patch);
        let (tt, gh, gw) = (t / tp, h / p, w / p);
        let x = x.reshape((b * tt, gh, gw, c * tp, p, p))?.permute((0, 3, 1, 4, 2, 5))?.reshape((b, tt, c, tp, h * w))?;
        x.permute((0, 2, 1, 3, 4))?.reshape((b, c, t, h, w))
    }

    /// Velocity for latents z (B, 3, T, H, W) at noise levels sigma (B,) given token ids (B, L).
    pub fn forward(&self, z: &Tensor, sigma: &Tensor, tokens: &Tensor) -> Result<Tensor> {
        let (b, c, t, h, w) = z.dims5()?;
        let d = self.cfg.dim;
        let (tt, s) = (t / self.cfg.t_patch, (h / self.cfg.patch) * (w / self.cfg.patch));
        let pos = self.pos_time.unsqueeze(1)?.broadcast_add(&self.pos_space.unsqueeze(0)?)?.reshape((tt * s, d))?;
        let x = self.x_embed.forward(&self.patchify(z)?)?.broadcast_add(&pos.unsqueeze(0)?)?;
        let (txt, pooled) = self.text.forward(tokens)?;
        let cond = self.head.cond(sigma, &pooled)?;
        let n_txt = txt.dim(1)?;
        let vid = match self.cfg.attention {
            VideoAttention::Full => {
                let mut seq = Tensor::cat(&[&txt, &x], 1)?;
                for block in &self.blocks {
                    seq = block.forward(&seq, &cond)?;
                }
                seq.narrow(1, n_txt, tt * s)?
            }
            VideoAttention::Factorised => {
                // Prompt tokens are context for every frame (kept fixed, like cross-attention).
                let txt_f = txt.unsqueeze(1)?.broadcast_as((b, tt, n_txt, d))?.reshape((b * tt, n_txt, d))?;
                let (cond_f, cond_s) = (repeat_rows(&cond, tt)?, repeat_rows(&cond, s)?);
                let mut x = x; // (B, T'·S, D), time-major
                for (i, block) in self.blocks.iter().enumerate() {
                    x = if i % 2 == 0 {
                        let seq = Tensor::cat(&[&txt_f, &x.reshape((b * tt, s, d))?], 1)?;
                        block.forward(&seq, &cond_f)?.narrow(1, n_txt, s)?.reshape((b, tt * s, d))?
                    } else {
                        let seq = x.reshape((b, tt, s, d))?.transpose(1, 2)?.reshape((b * s, tt, d))?;
                        block.forward(&seq, &cond_s)?.reshape((b, s, tt, d))?.transpose(1, 2)?.reshape((b, tt * s, d))?
                    };
                }
                x
            }
        };
        let out = self.unpatchify(&self.head.out(&vid, &cond)?, b, c, t, h, w)?;
        output_to_velocity(self.cfg.prediction, out, z, sigma)
    }
}

/// The embedded ShapeWorld-Video policy: base weights in a VarMap, prompts tokenized with
/// the video grammar ([`crate::world::video::tokenize_video`]).
pub struct VideoPolicy {
    pub cfg: VideoDitConfig,
    pub base: candle_nn::VarMap,
    pub lora: Option<candle_nn::VarMap>,
    /// Trained through (base weights untracked in LoRA mode), as in `ImagePolicy`.
    pub model: VideoDit,
    /// Every weight untracked, for sampling.
    frozen: VideoDit,
    /// LoRA runs: the base network alone, untracked (the KL reference).
    base_net: Option<VideoDit>,
    device: candle_core::Device,
}

impl VideoPolicy {
    fn build(cfg: &VideoDitConfig, device: &candle_core::Device, seed: u64, weights: Option<&std::path::Path>, lora: Option<&crate::policy::nn::layers::LoraSpec>) -> anyhow::Result<Self> {
        use crate::world::video::{video_vocab, MAX_VIDEO_TOKENS};
        cfg.validate()?;
        let (vocab, max_tokens) = (video_vocab().len(), MAX_VIDEO_TOKENS);
        let base = candle_nn::VarMap::new();
        let vb = crate::policy::seeded_var_builder(&base, seed, device);
        let mut model = VideoDit::new(&vb, cfg, vocab, max_tokens, None)?;
        if let Some(w) = weights {
            crate::weights::tensors::load_varmap(&base, w)?;
        }
        let frozen_base = crate::policy::frozen_builder(&base, device);
        let mut lora_map = None;
        let mut base_net = None;
        let mut frozen = VideoDit::new(&frozen_base, cfg, vocab, max_tokens, None)?;
        if let Some(spec) = lora {
            // Same scheme as the image policy: adapters in their own map, bound to the base.
            let lmap = candle_nn::VarMap::new();
            let ctx = LoraCtx { vb: crate::policy::seeded_var_builder(&lmap, seed ^ 0x10_2a, device), spec: spec.clone() };
            model = VideoDit::new(&frozen_base, cfg, vocab, max_tokens, Some(&ctx))?;
            anyhow::ensure!(!lmap.all_vars().is_empty(), "lora.targets {:?}: pattern matches no linear layer of the video policy", spec.targets);
            let frozen_ctx = LoraCtx { vb: crate::policy::frozen_builder(&lmap, device), spec: spec.clone() };
            base_net = Some(std::mem::replace(&mut frozen, VideoDit::new(&frozen_base, cfg, vocab, max_tokens, Some(&frozen_ctx))?));
            lora_map = Some(lmap);
        }
        Ok(Self { cfg: cfg.clone(), base, lora: lora_map, model, frozen, base_net, device: device.clone() })
    }

    /// Fresh, seeded weights.
    pub fn new(cfg: &VideoDitConfig, device: &candle_core::Device, seed: u64) -> anyhow::Result<Self> {
        Self::build(cfg, device, seed, None, None)
    }

    /// Weights from a safetensors checkpoint (names and shapes checked against the config),
    /// optionally with fresh LoRA adapters (seeded by `seed`).
    pub fn load(cfg: &VideoDitConfig, weights: &std::path::Path, lora: Option<&crate::policy::nn::layers::LoraSpec>, device: &candle_core::Device, seed: u64) -> anyhow::Result<Self> {
        Self::build(cfg, device, seed, Some(weights), lora)
    }

    pub fn save(&self, path: &std::path::Path) -> anyhow::Result<()> {
        crate::weights::tensors::save_varmap(&self.base, path)
    }
}

impl crate::policy::Policy for VideoPolicy {
    /// Token ids (B, MAX_VIDEO_TOKENS) of the ShapeWorld-Video grammar.
    fn encode(&self, prompts: &[crate::prompt::Prompt]) -> anyhow::Result<crate::policy::Condition> {
        let texts: Vec<String> = prompts.iter().map(|p| p.text.clone()).collect();
        Ok(crate::policy::Condition::tokens(tokens_for_video_texts(&texts, &self.device)?))
    }
    /// The latent is the clip in [-1, 1].
    fn decode(&self, z: &Tensor) -> anyhow::Result<crate::image::Samples> {
        Ok(crate::image::Samples::Clips(latents_to_clips(z)?))
    }
    fn latent_shape(&self) -> Vec<usize> {
        self.cfg.latent_shape().to_vec()
    }
    fn trainable(&self) -> Vec<(String, candle_core::Var)> {
        crate::weights::tensors::sorted_vars(self.lora.as_ref().unwrap_or(&self.base))
    }
    fn base_map(&self) -> &candle_nn::VarMap {
        &self.base
    }
    fn lora_map(&self) -> Option<&candle_nn::VarMap> {
        self.lora.as_ref()
    }
}

impl crate::policy::FlowModel for VideoPolicy {
    fn velocity(&self, z: &Tensor, sigma: &Tensor, cond: &crate::policy::Condition) -> Result<Tensor> {
        self.model.forward(z, sigma, &cond.seq)
    }
    fn velocity_frozen(&self, z: &Tensor, sigma: &Tensor, cond: &crate::policy::Condition) -> Result<Tensor> {
        self.frozen.forward(z, sigma, &cond.seq)
    }
    fn velocity_base(&self, z: &Tensor, sigma: &Tensor, cond: &crate::policy::Condition) -> Option<Result<Tensor>> {
        self.base_net.as_ref().map(|m| m.forward(z, sigma, &cond.seq))
    }
    fn base_vars(&self) -> Vec<(String, candle_core::Var)> {
        crate::weights::tensors::sorted_vars(&self.base)
    }
    fn device(&self) -> &candle_core::Device {
        &self.device
    }
}

/// Token ids for a batch of video prompts, (B, MAX_VIDEO_TOKENS) u32.
pub fn tokens_for_video(specs: &[crate::world::video::VideoSpec], device: &candle_core::Device) -> anyhow::Result<Tensor> {
    tokens_for_video_texts(&specs.iter().map(|s| s.text()).collect::<Vec<_>>(), device)
}

/// Token ids for prompt texts in the ShapeWorld-Video vocabulary, (B, MAX_VIDEO_TOKENS) u32.
pub fn tokens_for_video_texts(texts: &[String], device: &candle_core::Device) -> anyhow::Result<Tensor> {
    let l = crate::world::video::MAX_VIDEO_TOKENS;
    let mut ids = Vec::with_capacity(texts.len() * l);
    for t in texts {
        ids.extend(crate::world::video::tokenize_video(t, l)?);
    }
    Ok(Tensor::from_vec(ids, (texts.len(), l), device)?)
}

/// Clips (each a list of frames) → latents in [-1, 1], (B, 3, T, H, W).
pub fn clips_to_latents(clips: &[Vec<Image>], device: &candle_core::Device) -> Result<Tensor> {
    let (t, h, w) = (clips[0].len(), clips[0][0].h, clips[0][0].w);
    let mut data = Vec::with_capacity(clips.len() * 3 * t * h * w);
    for clip in clips {
        if clip.len() != t || clip.iter().any(|f| f.h != h || f.w != w) {
            candle_core::bail!("clips_to_latents: every clip must have {t} frames of {h}×{w}");
        }
        for ch in 0..3 {
            for f in clip {
                data.extend(f.data[ch * h * w..(ch + 1) * h * w].iter().map(|v| v * 2.0 - 1.0));
            }
        }
    }
    Tensor::from_vec(data, (clips.len(), 3, t, h, w), device)
}

/// Latents (B, 3, T, H, W) → clips of RGB frames (clamped to [0, 1]).
pub fn latents_to_clips(z: &Tensor) -> Result<Vec<Vec<Image>>> {
    let (b, c, t, h, w) = z.dims5()?;
    assert_eq!(c, 3);
    let flat: Vec<f32> = z.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?;
    let hw = h * w;
    Ok((0..b)
        .map(|i| {
            (0..t)
                .map(|f| {
                    let mut data = Vec::with_capacity(3 * hw);
                    for ch in 0..3 {
                        let o = ((i * 3 + ch) * t + f) * hw;
                        data.extend(flat[o..o + hw].iter().map(|v| ((v + 1.0) * 0.5).clamp(0.0, 1.0)));
                    }
                    Image { h, w, data }
                })
                .collect()
        })
        .collect())
}

/// The ShapeWorld video family (`modality = "video"`, `[video_model]`).
impl crate::policy::Generator for VideoDitConfig {
    fn section(&self) -> &'static str {
        "video_model"
    }
    fn sample_kind(&self) -> crate::image::SampleKind {
        crate::image::SampleKind::Clips
    }
    fn image_size(&self) -> usize {
        self.image_size
    }
    fn validate(&self) -> anyhow::Result<()> {
        VideoDitConfig::validate(self)?;
        crate::world::video::check_clip_dims(self.frames, self.image_size).map_err(|e| e.context("video_model"))
    }
    fn load(&self, weights: &std::path::Path, lora: Option<&crate::policy::nn::layers::LoraSpec>, device: &candle_core::Device, seed: u64) -> anyhow::Result<Box<dyn crate::policy::Policy>> {
        Ok(Box::new(VideoPolicy::load(self, weights, lora, device, seed)?))
    }
    fn cache_prefix(&self) -> &'static str {
        "vbase"
    }
    fn section_json(&self) -> String {
        serde_json::to_string(self).expect("config serializes")
    }
    fn prediction(&self) -> Option<Prediction> {
        Some(self.prediction)
    }
    fn save_random(&self, device: &candle_core::Device, seed: u64, path: &std::path::Path) -> anyhow::Result<()> {
        VideoPolicy::new(self, device, seed)?.save(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::seeded_var_builder;
    use candle_core::Device;
    use candle_nn::VarMap;

    fn tiny(attention: VideoAttention, fused: bool) -> VideoDitConfig {
        VideoDitConfig { image_size: 8, frames: 4, patch: 4, t_patch: 2, dim: 32, depth: 2, heads: 2, mlp_ratio: 2, text_layers: 1, attention, fused, prediction: Prediction::V }
    }

    fn build(cfg: &VideoDitConfig) -> (VarMap, VideoDit) {
        let map = VarMap::new();
        let vb = seeded_var_builder(&map, 1, &Device::Cpu);
        let m = VideoDit::new(&vb, cfg, 20, 6, None).unwrap();
        (map, m)
    }

    fn inputs(cfg: &VideoDitConfig, b: usize) -> (Tensor, Tensor, Tensor) {
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(4);
        let [c, t, h, w] = cfg.latent_shape();
        let z = crate::sampler::randn(&[b, c, t, h, w], &mut rng, &Device::Cpu).unwrap();
        let sigma = Tensor::from_vec((0..b).map(|i| 0.2 + 0.5 * i as f32).collect::<Vec<_>>(), b, &Device::Cpu).unwrap();
        let tok = Tensor::from_vec((0..b * 6).map(|i| (i % 20) as u32).collect::<Vec<_>>(), (b, 6), &Device::Cpu).unwrap();
        (z, sigma, tok)
    }

    #[test]
    fn patchify_roundtrip_and_latent_layout() {
        let cfg = tiny(VideoAttention::Full, true);
        let (_, m) = build(&cfg);
        let (z, _, _) = inputs(&cfg, 2);
        let x = m.patchify(&z).unwrap();
        assert_eq!(x.dims(), &[2, cfg.tokens(), 3 * 2 * 16]);
        let back = m.unpatchify(&x, 2, 3, 4, 8, 8).unwrap();
        let diff: f32 = (back - &z).unwrap().abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert_eq!(diff, 0.0);
        // Token 0 holds frames 0..2 of the top-left patch: its first value is z[0,0,0,0,0],
        // the (t_patch=1) block starts after 16 pixels with z[0,0,1,0,0].
        let x0: Vec<f32> = x.get(0).unwrap().get(0).unwrap().to_vec1().unwrap();
        let zz: Vec<f32> = z.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(x0[0], zz[0]);
        assert_eq!(x0[16], zz[64]);
        // Clips ↔ latents
        let clips = latents_to_clips(&z.clamp(-1f32, 1f32).unwrap()).unwrap();
        assert_eq!((clips.len(), clips[0].len(), clips[0][0].h), (2, 4, 8));
        let z2 = clips_to_latents(&clips, &Device::Cpu).unwrap();
        let d: f32 = (z2 - z.clamp(-1f32, 1f32).unwrap()).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        assert!(d < 1e-6);
    }

    /// Every parameter gets a finite, non-zero gradient, in both layouts and both paths.
    #[test]
    fn every_parameter_gets_a_gradient() {
        for attention in [VideoAttention::Full, VideoAttention::Factorised] {
            for (fused, prediction) in [(false, Prediction::V), (true, Prediction::V), (true, Prediction::X)] {
                let cfg = VideoDitConfig { prediction, ..tiny(attention, fused) };
                let (map, m) = build(&cfg);
                let (z, s, tok) = inputs(&cfg, 2);
                let v = m.forward(&z, &s, &tok).unwrap();
                assert_eq!(v.dims(), z.dims());
                let grads = v.sqr().unwrap().mean_all().unwrap().backward().unwrap();
                crate::policy::assert_every_var_has_gradient(&grads, crate::weights::tensors::sorted_vars(&map), &format!("{attention:?}, fused={fused}, {prediction:?}"));
            }
        }
    }

    /// Fused and reference paths agree; factorised temporal blocks really mix frames
    /// (changing the last frame changes the first frame's output), and spatial-only
    /// layouts do not leak across clips in a batch.
    #[test]
    fn paths_agree_and_time_is_mixed() {
        for attention in [VideoAttention::Full, VideoAttention::Factorised] {
            let (_, a) = build(&tiny(attention, true));
            let (_, r) = build(&tiny(attention, false));
            let (z, s, tok) = inputs(&a.cfg, 2);
            let va = a.forward(&z, &s, &tok).unwrap();
            let vr = r.forward(&z, &s, &tok).unwrap();
            let d: f32 = (&va - &vr).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
            assert!(d < 1e-4, "{attention:?}: fused vs reference {d}");
            // Perturb the last two frames (the last tubelet) of clip 0 only.
            let pert = z.narrow(2, 2, 2).unwrap().affine(1.0, 0.5).unwrap();
            let z2 = Tensor::cat(&[&z.narrow(2, 0, 2).unwrap(), &pert], 2).unwrap();
            let z2 = Tensor::cat(&[&z2.narrow(0, 0, 1).unwrap(), &z.narrow(0, 1, 1).unwrap()], 0).unwrap();
            let vb = a.forward(&z2, &s, &tok).unwrap();
            let first = |v: &Tensor, i: usize| v.get(i).unwrap().narrow(1, 0, 2).unwrap();
            let moved: f32 = (first(&va, 0) - first(&vb, 0)).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
            assert!(moved > 1e-6, "{attention:?}: the first frames must see the last ones");
            let other: f32 = (va.get(1).unwrap() - vb.get(1).unwrap()).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
            assert_eq!(other, 0.0, "{attention:?}: clips in a batch must not interact");
        }
    }

    #[test]
    fn bad_shapes_are_clear_errors() {
        let mut c = VideoDitConfig::default();
        c.t_patch = 3;
        assert!(c.validate().unwrap_err().to_string().contains("video_model.t_patch"));
        c = VideoDitConfig { frames: 1, ..Default::default() };
        assert!(c.validate().unwrap_err().to_string().contains("video_model.frames"));
        c = VideoDitConfig { heads: 3, ..Default::default() };
        assert!(c.validate().unwrap_err().to_string().contains("video_model.heads"));
    }
}
