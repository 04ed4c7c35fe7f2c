//! Trainable flow-matching policies. A policy predicts velocity for a batch of latents,
//! noise levels and prompt conditioning. Each generator family is one folder
//! (`shapeworld/`, `sd3/`, `flux/`) whose config section implements [`Generator`], the
//! descriptor the rest of vipo asks; `nn/` holds the layers they share.

pub mod cond;
pub mod flux;
pub mod nn;
pub mod ode;
pub mod sd3;
pub mod shapeworld;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use std::path::Path;

pub use crate::image::SampleKind;
use crate::image::Samples;
use crate::prompt::Prompt;
pub use cond::Condition;
use nn::layers::{LoraCtx, LoraSpec};
use shapeworld::dit::{Dit, DitConfig};

/// A generator family as the rest of vipo sees it, implemented by the family's config
/// section (`[model]`, `[video_model]`, `[sd3]`, `[flux]`). `Config::generator` is the one
/// place that maps `modality` to a family; everything else asks this.
pub trait Generator {
    /// The TOML section its settings live in ("model", "sd3", …), for messages.
    fn section(&self) -> &'static str;
    /// What it samples.
    fn sample_kind(&self) -> SampleKind;
    /// Side of a sample (or frame) in pixels.
    fn image_size(&self) -> usize;
    /// A pretrained generator's model spec and the field it comes from ("sd3.model");
    /// None for the ShapeWorld families, which vipo pretrains itself.
    fn model_files(&self) -> Option<(&'static str, &str)> {
        None
    }
    /// A real generator (loaded from model files, prompted with free text), not ShapeWorld.
    fn is_real(&self) -> bool {
        self.model_files().is_some()
    }
    /// The section's own checks, before any work.
    fn validate(&self) -> Result<()>;
    /// Checks that tie the section to the sampler (FLUX is sampled without CFG).
    fn check_sampling(&self, _guidance: f64) -> Result<()> {
        Ok(())
    }
    /// The policy from `weights` (a real generator: its model spec), with fresh LoRA
    /// adapters when `lora` is given.
    fn load(&self, weights: &Path, lora: Option<&LoraSpec>, device: &Device, seed: u64) -> Result<Box<dyn Policy>>;
    /// Name prefix of its cached base under the cache folder ("base", "vbase", "sd3", …).
    fn cache_prefix(&self) -> &'static str;
    /// The section as compact JSON: the family's part of its base-cache key.
    fn section_json(&self) -> String;
    /// Whether vipo ships a pretrained base for it (`weights/`: the ShapeWorld image DiT).
    fn ships_base(&self) -> bool {
        false
    }
    /// A ShapeWorld family's prediction target: a weights file does not record it, so a
    /// base's saved config is checked against it.
    fn prediction(&self) -> Option<shapeworld::dit::Prediction> {
        None
    }
    /// Seeded random weights written to `path` (a ShapeWorld family; `bench step` times
    /// a step on them when no base exists).
    fn save_random(&self, _device: &Device, _seed: u64, _path: &Path) -> Result<()> {
        anyhow::bail!("[{}]: a real generator needs its model files, not random weights", self.section())
    }
    /// A real generator's transformer and settings, for `vipo plan` and `bench gen-step`
    /// (which build it on random weights); None for ShapeWorld.
    fn real(&self) -> Option<RealSettings<'_>> {
        None
    }
}

/// The settings every real generator section has, under its own field names.
#[derive(Clone, Debug)]
pub struct RealSettings<'a> {
    pub section: &'static str,
    /// "sd3.5-medium", "flux.1-dev", … ("" = take the files' shape).
    pub variant: &'a str,
    pub resolution: usize,
    /// Conditioning tokens (SD3: CLIP's 77 + T5's; FLUX: T5's).
    pub text_tokens: usize,
    /// The base weights' dtype as written ("bf16").
    pub dtype: &'a str,
    pub checkpointing: bool,
    /// FLUX.1-dev's guidance input.
    pub guidance: Option<f64>,
    /// The transformer of a named variant.
    pub by_name: fn(&str) -> Result<Transformer>,
}

impl RealSettings<'_> {
    pub fn candle_dtype(&self) -> Result<candle_core::DType> {
        parse_dtype(&format!("{}.dtype", self.section), self.dtype)
    }
    /// The transformer `variant` names (an error for "" or an unknown name).
    pub fn transformer(&self) -> Result<Transformer> {
        (self.by_name)(self.variant)
    }
}

/// A real generator's transformer architecture.
#[derive(Clone, Debug)]
pub enum Transformer {
    Mmdit(sd3::mmdit::MmditConfig),
    Flux(flux::model::FluxConfig),
}

impl Transformer {
    /// The config section of the family the architecture belongs to.
    pub fn section(&self) -> &'static str {
        match self {
            Transformer::Mmdit(_) => "sd3",
            Transformer::Flux(_) => "flux",
        }
    }
}

/// What rectified-flow pretraining and ODE sampling need from any generator (image or
/// video): a velocity for latents, the parameters to train, the device.
pub trait FlowModel {
    /// v_θ(z, σ, c) for latents (B, ...) and per-sample noise levels σ (B,), differentiable
    /// in the trainable weights.
    fn velocity(&self, z: &Tensor, sigma: &Tensor, cond: &Condition) -> candle_core::Result<Tensor>;
    /// The same velocity with no autograd bookkeeping (rollouts, sampling, the KL
    /// reference): candle has no no-grad mode, so every op on a `Var` records a graph edge
    /// and keeps its inputs alive; policies run this on untracked views of their weights.
    fn velocity_frozen(&self, z: &Tensor, sigma: &Tensor, cond: &Condition) -> candle_core::Result<Tensor> {
        Ok(self.velocity(z, sigma, cond)?.detach())
    }
    /// The unconditional input of classifier-free guidance for a batch like `cond`. The
    /// default, all zeros, is the ShapeWorld policies' empty prompt (all-padding token ids,
    /// what `pretrain.cond_dropout` trains on); a policy with a text encoder returns its
    /// encoding of "".
    fn null_condition(&self, cond: &Condition) -> candle_core::Result<Condition> {
        cond.zeros_like()
    }
    /// The base network without the trained adapters, untracked: the KL reference of a
    /// LoRA run, read from the same weights instead of a second copy of the model. None
    /// for a policy without adapters (full fine-tuning keeps a copy of its start).
    fn velocity_base(&self, _z: &Tensor, _sigma: &Tensor, _cond: &Condition) -> Option<candle_core::Result<Tensor>> {
        None
    }
    /// Gradients of `loss` for every trainable weight. A policy that recomputes parts of
    /// its forward in the backward (activation checkpointing) collects their gradients here.
    fn backward(&self, loss: &Tensor) -> candle_core::Result<candle_core::backprop::GradStore> {
        loss.backward()
    }
    /// Every base weight by name (what pretraining trains and saves).
    fn base_vars(&self) -> Vec<(String, Var)>;
    fn device(&self) -> &Device;
}

/// Classifier-free guidance: v = v_null + w·(v_cond − v_null), with the policy's
/// [`FlowModel::null_condition`]. One forward over the batch stacked with its null copy; w = 1 is the plain velocity (one
/// forward of the batch alone). Differentiable, so rollouts and updates use the same
/// guided velocity and the on-policy parity check covers it.
pub fn guided_velocity<M: FlowModel + ?Sized>(model: &M, z: &Tensor, sigma: &Tensor, cond: &Condition, w: f64) -> candle_core::Result<Tensor> {
    guided(model, |z, s, c| model.velocity(z, s, c), z, sigma, cond, w)
}

/// [`guided_velocity`] through [`FlowModel::velocity_frozen`] (sampling, no gradients).
pub fn guided_velocity_frozen<M: FlowModel + ?Sized>(model: &M, z: &Tensor, sigma: &Tensor, cond: &Condition, w: f64) -> candle_core::Result<Tensor> {
    guided(model, |z, s, c| model.velocity_frozen(z, s, c), z, sigma, cond, w)
}

/// [`guided_velocity`] through [`FlowModel::velocity_base`] (the adapters switched off).
pub fn guided_velocity_base<M: FlowModel + ?Sized>(model: &M, z: &Tensor, sigma: &Tensor, cond: &Condition, w: f64) -> candle_core::Result<Tensor> {
    let base = |z: &Tensor, s: &Tensor, c: &Condition| model.velocity_base(z, s, c).unwrap_or_else(|| candle_core::bail!("the policy has no adapters to switch off"));
    guided(model, base, z, sigma, cond, w)
}

fn guided<M: FlowModel + ?Sized>(
    model: &M,
    v: impl Fn(&Tensor, &Tensor, &Condition) -> candle_core::Result<Tensor>,
    z: &Tensor,
    sigma: &Tensor,
    cond: &Condition,
    w: f64,
) -> candle_core::Result<Tensor> {
    if w == 1.0 {
        return v(z, sigma, cond);
    }
    let b = z.dim(0)?;
    let v = v(&Tensor::cat(&[z, z], 0)?, &Tensor::cat(&[sigma, sigma], 0)?, &Condition::cat(&[cond, &model.null_condition(cond)?])?)?;
    let (vc, vu) = (v.narrow(0, 0, b)?, v.narrow(0, b, b)?);
    &vu + ((vc - &vu)? * w)?
}

impl FlowModel for ImagePolicy {
    fn velocity(&self, z: &Tensor, sigma: &Tensor, cond: &Condition) -> candle_core::Result<Tensor> {
        self.model.forward(z, sigma, &cond.seq)
    }
    fn velocity_frozen(&self, z: &Tensor, sigma: &Tensor, cond: &Condition) -> candle_core::Result<Tensor> {
        self.frozen.forward(z, sigma, &cond.seq)
    }
    fn velocity_base(&self, z: &Tensor, sigma: &Tensor, cond: &Condition) -> Option<candle_core::Result<Tensor>> {
        self.base_net.as_ref().map(|m| m.forward(z, sigma, &cond.seq))
    }
    fn base_vars(&self) -> Vec<(String, Var)> {
        crate::weights::tensors::sorted_vars(&self.base)
    }
    fn device(&self) -> &Device {
        &self.device
    }
}

/// A generator as the sampler, trainer and evaluation see it (docs/DESIGN.md §2.2): prompts in
/// through its own (frozen) text side, latents out through its own (frozen) decoder, and
/// between them the [`FlowModel`] velocity with its trainable parameters (LoRA adapters or
/// every weight) and the base and adapter maps (to merge and export). The ShapeWorld image
/// and video policies and the real generators are implementations; one trainer serves all.
pub trait Policy: FlowModel {
    /// Conditioning for a batch of prompts, one row per prompt.
    fn encode(&self, prompts: &[Prompt]) -> Result<Condition>;
    /// Latents (B, ...) → decoded samples, outside autograd.
    fn decode(&self, z: &Tensor) -> Result<Samples>;
    /// Latent shape of one sample, e.g. (C, H, W) or (C, T, H, W).
    fn latent_shape(&self) -> Vec<usize>;
    /// The positions of one latent, where the per-position ratio and allocation maps live:
    /// (H, W) or (T, H, W).
    fn latent_grid(&self) -> Vec<usize> {
        self.latent_shape()[1..].to_vec()
    }
    /// The parameters an optimizer updates (LoRA adapters only, or every weight), by name.
    fn trainable(&self) -> Vec<(String, Var)>;
    fn base_map(&self) -> &VarMap;
    fn lora_map(&self) -> Option<&VarMap>;
    /// For a real generator, the diffusers module names of its single-file linear layers
    /// ([`nn::adapted::DiffusersNames`]): its adapters then export for diffusers / PEFT and
    /// merge into the single file. None for the ShapeWorld policies.
    fn diffusers_names(&self) -> Option<nn::adapted::BoxedNames<'_>> {
        None
    }
}

/// The embedded ShapeWorld policy: base weights in one VarMap, optional LoRA adapters in
/// another, so "full" and "LoRA" fine-tuning differ only in which map is trainable.
pub struct ImagePolicy {
    pub cfg: DitConfig,
    pub base: VarMap,
    pub lora: Option<VarMap>,
    /// The network the optimizer trains through: LoRA mode reads the base weights as
    /// untracked views (no gradient is formed for them), full fine-tuning as `Var`s.
    pub model: Dit,
    /// The same network on untracked views of every weight, for sampling.
    frozen: Dit,
    /// LoRA runs: the base network alone, untracked (the KL reference).
    base_net: Option<Dit>,
    device: Device,
}

impl ImagePolicy {
    /// Fresh randomly-initialised weights (deterministic: candle's CPU init RNG is not
    /// seedable, so the init is redrawn from our own seeded stream).
    pub fn new(cfg: &DitConfig, device: &Device, seed: u64) -> Result<Self> {
        cfg.validate()?;
        let base = VarMap::new();
        let vb = seeded_var_builder(&base, seed, device);
        let model = Dit::new(&vb, cfg, None)?;
        let frozen = Dit::new(&frozen_builder(&base, device), cfg, None)?;
        Ok(Self { cfg: cfg.clone(), base, lora: None, model, frozen, base_net: None, device: device.clone() })
    }

    /// Load base weights from a safetensors checkpoint (names and shapes checked against
    /// the config), optionally adding fresh LoRA adapters.
    pub fn load(cfg: &DitConfig, weights: &Path, lora: Option<&LoraSpec>, device: &Device, seed: u64) -> Result<Self> {
        cfg.validate()?;
        let base = VarMap::new();
        let vb = seeded_var_builder(&base, seed, device);
        // Build once to create the variables, then overwrite them from the file.
        let _ = Dit::new(&vb, cfg, None)?;
        if let Err(e) = crate::weights::tensors::load_varmap(&base, weights) {
            return Err(explain_conv_mismatch(e, cfg, weights));
        }
        let frozen_base = frozen_builder(&base, device);
        let (lora_map, model, frozen, base_net) = match lora {
            None => (None, Dit::new(&vb, cfg, None)?, Dit::new(&frozen_base, cfg, None)?, None),
            Some(spec) => {
                let lmap = VarMap::new();
                let ctx = LoraCtx { vb: seeded_var_builder(&lmap, seed ^ 0x10_2a, device), spec: spec.clone() };
                let model = Dit::new(&frozen_base, cfg, Some(&ctx))?;
                let n = lmap.all_vars().len();
                anyhow::ensure!(n > 0, "lora.targets {:?}: pattern matches no linear layer of the policy", spec.targets);
                let frozen_ctx = LoraCtx { vb: frozen_builder(&lmap, device), spec: spec.clone() };
                let frozen = Dit::new(&frozen_base, cfg, Some(&frozen_ctx))?;
                (Some(lmap), model, frozen, Some(Dit::new(&frozen_base, cfg, None)?))
            }
        };
        Ok(Self { cfg: cfg.clone(), base, lora: lora_map, model, frozen, base_net, device: device.clone() })
    }

    /// Overwrite the image-token position table with DiT's 2-D sin-cos values
    /// (`pretrain.pos_init = "sincos"`): neighbouring tokens then start out alike, which a
    /// N(0, 0.02²) table must first learn. The other weights keep their seeded init.
    pub fn init_positions_sincos(&self) -> Result<()> {
        let data = self.base.data().lock().unwrap();
        let var = data.get("pos_embed").context("pos_embed: missing from the policy")?;
        let (n, d) = var.dims2()?;
        let grid = self.cfg.grid();
        anyhow::ensure!(n == grid * grid, "pos_embed: {n} rows for a {grid}x{grid} grid");
        let t = Tensor::from_vec(shapeworld::dit::sincos_2d(grid, d), (n, d), var.device())?.to_dtype(var.dtype())?;
        var.set(&t)?;
        Ok(())
    }

    /// Save the base weights (safetensors, atomic).
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::weights::tensors::save_varmap(&self.base, path)
    }

    /// [`Policy::encode`] of ShapeWorld scenes.
    pub fn condition(&self, specs: &[crate::world::PromptSpec]) -> Result<Condition> {
        self.encode(&specs.iter().map(Prompt::image).collect::<Vec<_>>())
    }

    /// [`Policy::decode`] as images.
    pub fn decode_images(&self, z: &Tensor) -> Result<Vec<crate::image::Image>> {
        Ok(shapeworld::dit::latents_to_images(z)?)
    }
}

impl Policy for ImagePolicy {
    /// Token ids of the ShapeWorld grammar (a word outside its vocabulary is an error).
    fn encode(&self, prompts: &[Prompt]) -> Result<Condition> {
        let texts: Vec<String> = prompts.iter().map(|p| p.text.clone()).collect();
        Ok(Condition::tokens(shapeworld::dit::tokens_for(&texts, &self.device)?))
    }
    /// The latent is the image in [-1, 1].
    fn decode(&self, z: &Tensor) -> Result<Samples> {
        Ok(Samples::Images(shapeworld::dit::latents_to_images(z)?))
    }
    fn latent_shape(&self) -> Vec<usize> {
        self.cfg.latent_shape().to_vec()
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
}

/// A base pretrained with or without the conv stem (`model.conv_channels`) has a different
/// checkpoint layout; say which setting the file needs instead of naming a missing tensor.
fn explain_conv_mismatch(e: anyhow::Error, cfg: &DitConfig, weights: &Path) -> anyhow::Error {
    let Ok(file) = crate::weights::tensors::read_tensors(weights, &Device::Cpu) else { return e };
    let file_conv = file.get("stem.conv1.weight").map(|t| t.dim(0).unwrap_or(0)).unwrap_or(0);
    if file_conv != cfg.conv_channels {
        return e.context(format!(
            "{}: pretrained with model.conv_channels = {file_conv}, this config has {}; pass --set model.conv_channels={file_conv} (bases from before the conv stem existed have 0)",
            weights.display(),
            cfg.conv_channels
        ));
    }
    e
}

/// The networks of a real generator over one set of base weights: the trained one (LoRA
/// adapters on untracked base views, or every weight a `Var` for full fine-tuning), the
/// same on untracked views for sampling, and for LoRA runs the base alone (the KL
/// reference), all sharing the weights' storage.
pub struct Nets<M> {
    pub base: VarMap,
    pub lora: Option<VarMap>,
    pub model: M,
    pub frozen: M,
    pub base_net: Option<M>,
}

impl<M> Nets<M> {
    /// `tensors` as base weights in `dtype` (full fine-tuning needs f32); `build` makes a
    /// network on a VarBuilder with optional adapters; `field` names the dtype setting.
    pub fn build(
        tensors: std::collections::HashMap<String, Tensor>,
        dtype: candle_core::DType,
        field: &str,
        lora: Option<&LoraSpec>,
        device: &Device,
        seed: u64,
        build: impl Fn(&VarBuilder, Option<&LoraCtx>) -> candle_core::Result<M>,
    ) -> Result<Self> {
        anyhow::ensure!(lora.is_some() || dtype == candle_core::DType::F32, "{field} = {dtype:?}: full fine-tuning (train.lora_rank = 0) updates the base weights and needs {field} = \"f32\"");
        // bf16's range does not fit f16: a bf16 checkpoint would overflow silently.
        if let Some((name, _)) = tensors.iter().find(|(_, t)| t.dtype() == candle_core::DType::BF16 && dtype == candle_core::DType::F16) {
            anyhow::bail!("{field} = \"f16\": the checkpoint is bf16 (tensor {name}), whose range f16 cannot hold; use \"bf16\" or \"f32\"");
        }
        let base = VarMap::new();
        {
            let mut data = base.data().lock().unwrap();
            for (k, t) in tensors {
                data.insert(k, Var::from_tensor(&t.to_dtype(dtype)?)?);
            }
        }
        let frozen_vb = frozen_builder_as(&base, dtype, device);
        Ok(match lora {
            None => Self { model: build(&VarBuilder::from_varmap(&base, dtype, device), None)?, frozen: build(&frozen_vb, None)?, base_net: None, lora: None, base },
            Some(spec) => {
                let lmap = VarMap::new();
                let model = build(&frozen_vb, Some(&LoraCtx { vb: seeded_var_builder(&lmap, seed ^ 0x10_2a, device), spec: spec.clone() }))?;
                let frozen = build(&frozen_vb, Some(&LoraCtx { vb: frozen_builder(&lmap, device), spec: spec.clone() }))?;
                Self { model, frozen, base_net: Some(build(&frozen_vb, None)?), lora: Some(lmap), base }
            }
        })
    }
}

/// A weights dtype field ("bf16" | "f16" | "f32").
pub fn parse_dtype(field: &str, s: &str) -> Result<candle_core::DType> {
    Ok(match s {
        "bf16" => candle_core::DType::BF16,
        "f16" => candle_core::DType::F16,
        "f32" => candle_core::DType::F32,
        other => anyhow::bail!("{field}: unknown {other:?} (bf16, f16 or f32)"),
    })
}

/// Test guard against candle ops that silently drop gradients: every variable got a
/// finite, non-zero gradient from `grads`.
#[cfg(test)]
pub(crate) fn assert_every_var_has_gradient(grads: &candle_core::backprop::GradStore, vars: Vec<(String, Var)>, what: &str) {
    assert!(vars.len() > 20, "{what}: only {} variables", vars.len());
    for (name, v) in vars {
        let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient ({what})"));
        let a: f32 = g.abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(a.is_finite() && a > 0.0, "{name}: gradient sum |g| = {a} ({what})");
    }
}

/// Test guard for issue 37 item 1: after a LoRA update's backward the gradient store holds
/// exactly the trainable tensors, nothing for frozen weights, inputs or intermediates.
/// Returns a digest of the gradients' bytes in name order (to compare across builds).
#[cfg(test)]
pub(crate) fn assert_store_holds_exactly(grads: &candle_core::backprop::GradStore, vars: &[(String, Var)], what: &str) -> String {
    use sha2::Digest;
    let want: std::collections::HashSet<_> = vars.iter().map(|(_, v)| v.as_tensor().id()).collect();
    let have: std::collections::HashSet<_> = grads.get_ids().copied().collect();
    let mut h = sha2::Sha256::new();
    for (_, v) in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            for x in g.flatten_all().unwrap().to_vec1::<f32>().unwrap() {
                h.update(x.to_le_bytes());
            }
        }
    }
    let digest = format!("{:x}", h.finalize());
    eprintln!("{what}: {} gradients, {} trainable, digest {digest}", have.len(), want.len());
    assert_eq!(have.len(), want.len(), "{what}: the store holds {} gradients for {} trainable tensors", have.len(), want.len());
    assert_eq!(have, want, "{what}: the store holds other tensors than the trainable ones");
    digest
}

/// Test weights: every variable of `map` redrawn from N(0, scale²), in name order, from a
/// stream seeded by `seed` (initialisers leave gates, heads and norms at constants, which
/// would hide what a parity test must see).
#[cfg(test)]
pub(crate) fn randomize_vars(map: &VarMap, seed: u64, scale: f64) {
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(seed);
    for (_, v) in crate::weights::tensors::sorted_vars(map) {
        v.set(&(crate::sampler::randn(v.dims(), &mut rng, v.device()).unwrap() * scale).unwrap()).unwrap();
    }
}

/// A VarMap backend whose fresh variables are drawn from a seeded ChaCha stream, in
/// creation order (candle's CPU RNG cannot be seeded), so a seed fixes the init exactly.
struct SeededVarMap {
    map: VarMap,
    rng: std::sync::Mutex<rand_chacha::ChaCha8Rng>,
}

impl candle_nn::var_builder::SimpleBackend for SeededVarMap {
    fn get(&self, s: candle_core::Shape, name: &str, h: candle_nn::Init, dtype: candle_core::DType, dev: &Device) -> candle_core::Result<Tensor> {
        use rand::Rng;
        use rand_distr::{Distribution, Normal};
        let mut data = self.map.data().lock().unwrap();
        if let Some(v) = data.get(name) {
            if v.shape() != &s {
                candle_core::bail!("shape mismatch on {name}: {s:?} <> {:?}", v.shape());
            }
            return Ok(v.as_tensor().clone());
        }
        let n = s.elem_count();
        let mut rng = self.rng.lock().unwrap();
        let vals: Vec<f32> = match h {
            candle_nn::Init::Const(c) => vec![c as f32; n],
            candle_nn::Init::Randn { mean, stdev } => {
                let d = Normal::new(mean, stdev).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                (0..n).map(|_| d.sample(&mut *rng) as f32).collect()
            }
            candle_nn::Init::Uniform { lo, up } => (0..n).map(|_| rng.gen_range(lo..up) as f32).collect(),
            candle_nn::Init::Kaiming { .. } => {
                // fan-in = all dims but the first; uniform bound √(6/fan_in) (ReLU gain).
                let fan_in = (n / s.dims().first().copied().unwrap_or(1).max(1)).max(1);
                let b = (6.0 / fan_in as f64).sqrt();
                (0..n).map(|_| rng.gen_range(-b..b) as f32).collect()
            }
        };
        let var = Var::from_tensor(&Tensor::from_vec(vals, s, dev)?.to_dtype(dtype)?)?;
        data.insert(name.to_string(), var.clone());
        Ok(var.as_tensor().clone())
    }
    fn get_unchecked(&self, name: &str, _: candle_core::DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("{name}: get_unchecked is not supported for a seeded VarMap")
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.map.data().lock().unwrap().contains_key(name)
    }
}

/// A VarBuilder over untracked views of `map`'s variables (every name must exist). The
/// views share the variables' storage, so optimizer steps, EMA swaps and checkpoint
/// restores (all `Var::set`, in place) show through without rebuilding the network.
pub fn frozen_builder(map: &VarMap, device: &Device) -> VarBuilder<'static> {
    frozen_builder_as(map, crate::runtime::dtype(device), device)
}

/// [`frozen_builder`] for weights kept in `dtype` (a bf16 base).
pub fn frozen_builder_as(map: &VarMap, dtype: candle_core::DType, device: &Device) -> VarBuilder<'static> {
    let data = map.data().lock().unwrap();
    let views = data.iter().map(|(k, v)| (k.clone(), v.as_tensor().detach())).collect();
    VarBuilder::from_tensors(views, dtype, device)
}

/// A VarBuilder over `map` whose new variables come from a stream seeded with `seed`.
pub fn seeded_var_builder(map: &VarMap, seed: u64, device: &Device) -> VarBuilder<'static> {
    use rand::SeedableRng;
    let backend = SeededVarMap { map: map.clone(), rng: std::sync::Mutex::new(rand_chacha::ChaCha8Rng::seed_from_u64(seed)) };
    VarBuilder::from_backend(Box::new(backend), crate::runtime::dtype(device), device.clone())
}

#[cfg(test)]
mod nets_tests {
    use super::*;

    /// A bf16 checkpoint is refused in f16, full fine-tuning in bf16; LoRA in bf16 keeps
    /// the base in bf16 and the adapters in f32.
    #[test]
    fn dtype_rules() {
        let t = std::collections::HashMap::from([
            ("w.weight".to_string(), Tensor::ones((4, 3), candle_core::DType::BF16, &Device::Cpu).unwrap()),
            ("w.bias".to_string(), Tensor::zeros(4, candle_core::DType::BF16, &Device::Cpu).unwrap()),
        ]);
        let spec = LoraSpec { rank: 1, alpha: 1.0, targets: vec!["w".into()] };
        let lin = |vb: &VarBuilder, l: Option<&LoraCtx>| nn::layers::Linear::new(&vb.pp("w"), 3, 4, true, l);
        let e = Nets::build(t.clone(), candle_core::DType::F16, "flux.dtype", Some(&spec), &Device::Cpu, 0, lin).err().unwrap().to_string();
        assert!(e.contains("flux.dtype") && e.contains("bf16") && e.contains("w."), "{e}");
        let e = Nets::build(t.clone(), candle_core::DType::BF16, "sd3.dtype", None, &Device::Cpu, 0, lin).err().unwrap().to_string();
        assert!(e.contains("full fine-tuning"), "{e}");
        let n = Nets::build(t, candle_core::DType::BF16, "sd3.dtype", Some(&spec), &Device::Cpu, 0, lin).unwrap();
        assert!(crate::weights::tensors::sorted_vars(&n.base).iter().all(|(_, v)| v.dtype() == candle_core::DType::BF16));
        assert!(n.base_net.is_some() && crate::weights::tensors::sorted_vars(n.lora.as_ref().unwrap()).iter().all(|(_, v)| v.dtype() == candle_core::DType::F32));
    }
}
