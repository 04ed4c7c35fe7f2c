//! `vipo bench gen-step`: a real generator's training step at full size on random weights.
//! The transformer of the config's `sd3.variant` / `flux.variant` (SD3.5-Medium, FLUX.1-dev…)
//! and a VAE of the published shape are built with random weights directly on the device
//! (seeded on a GPU; candle's CPU generator takes no seed), in the configured dtype, with
//! the configured LoRA and block checkpointing, and run through the same [`Trainer`] step
//! as `vipo train` (rollout, decode, reward, maps, advantages, update). Speed does not
//! depend on the weights' values, so this times the step where no checkpoint can be
//! downloaded.
//!
//! What is not the real step, by choice: the text side is a fixed random embedding of the
//! encoders' output shape (a real run encodes each prompt once and caches it, so the
//! encoders are not part of a step), the reward is `redness` and the maps come from the
//! embedded MobileNetV2 (the reward models and DINOv2 need their files). It also times one
//! transformer forward + backward of an update micro-batch, the figure
//! `bench/pytorch_gen.py` measures for diffusers' implementation of the same model.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use candle_transformers::models::stable_diffusion::vae::{AutoEncoderKL, AutoEncoderKLConfig};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::config::Config;
use crate::image::Samples;
use crate::policy::flux::model::Flux;
use crate::policy::nn::layers::LoraCtx;
use crate::policy::nn::vae::Sd3Vae;
use crate::policy::sd3::mmdit::Mmdit;
use crate::policy::{Condition, FlowModel, Nets, Policy};
use crate::prompt::Prompt;
use crate::train::grpo::Trainer;

/// The transformer being timed.
pub use crate::policy::Transformer as Shape;

// Built once per bench; the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
enum Net {
    Sd3(Mmdit),
    Flux(Flux),
}

impl Net {
    fn build(shape: &Shape, vb: &VarBuilder, lora: Option<&LoraCtx>, checkpointing: bool) -> candle_core::Result<Self> {
        Ok(match shape {
            Shape::Mmdit(c) => {
                let m = Mmdit::new(vb, c, lora)?;
                Net::Sd3(if checkpointing { m.checkpointed() } else { m })
            }
            Shape::Flux(c) => {
                let m = Flux::new(vb, c, lora)?;
                Net::Flux(if checkpointing { m.checkpointed() } else { m })
            }
        })
    }
}

/// A real generator's transformer and VAE on random weights behind [`Policy`], with a
/// fixed random text embedding (every prompt gets the same conditioning).
pub struct RandomGenerator {
    nets: Nets<Net>,
    vae: Sd3Vae,
    seq: Tensor,
    pooled: Tensor,
    guidance: Option<f32>,
    latent: Vec<usize>,
    device: Device,
}

/// Fresh weights drawn on their device, kept by name: constants as the model asks
/// (norm scales 1, biases 0), every other tensor N(0, 0.02²) (the models' Kaiming inits
/// grow the residual stream over 24–57 blocks). Drawn in f32 and cast, since candle's CUDA
/// RNG has no bf16; nothing passes through host memory, so a 12 B model builds in seconds.
#[derive(Clone, Default)]
struct DeviceRandn(Arc<Mutex<HashMap<String, Tensor>>>);

impl DeviceRandn {
    /// A VarBuilder drawing fresh weights, and a handle to take them back by name.
    fn builder(dtype: DType, device: &Device) -> (Self, VarBuilder<'static>) {
        let me = Self::default();
        (me.clone(), VarBuilder::from_backend(Box::new(me), dtype, device.clone()))
    }
    fn take(&self) -> HashMap<String, Tensor> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

impl candle_nn::var_builder::SimpleBackend for DeviceRandn {
    fn get(&self, s: candle_core::Shape, name: &str, h: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let mut made = self.0.lock().unwrap();
        if let Some(t) = made.get(name) {
            if t.shape() != &s {
                candle_core::bail!("shape mismatch on {name}: {s:?} <> {:?}", t.shape());
            }
            return Ok(t.clone());
        }
        let t = match h {
            candle_nn::Init::Const(c) => (Tensor::ones(s, DType::F32, dev)? * c)?,
            _ => Tensor::randn(0f32, 0.02, s, dev)?,
        }
        .to_dtype(dtype)?;
        made.insert(name.to_string(), t.clone());
        Ok(t)
    }
    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("{name}: not made yet")
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.0.lock().unwrap().contains_key(name)
    }
}

impl RandomGenerator {
    /// `shape` at `resolution`² with `text_tokens` conditioning tokens, base weights in
    /// `dtype`, LoRA per `cfg.train`, on `device`.
    pub fn new(cfg: &Config, shape: &Shape, device: &Device) -> Result<Self> {
        // The same checks as a real run (dtype, resolution a multiple of 16, guidance).
        let g = cfg.generator();
        g.validate()?;
        let r = match g.real() {
            Some(r) if r.section == shape.section() => r,
            _ => anyhow::bail!("bench gen-step: modality \"{}\" does not match the transformer {shape:?}", cfg.modality),
        };
        let (resolution, text_tokens, dtype, checkpointing) = (r.resolution, r.text_tokens, r.candle_dtype()?, r.checkpointing);
        let guidance = match shape {
            Shape::Flux(c) if c.guidance_embed => r.guidance.map(|g| g as f32),
            _ => None,
        };
        if let Device::Cuda(_) = device {
            device.set_seed(cfg.seed)?;
        }
        let (context_dim, pooled_dim) = match shape {
            Shape::Mmdit(c) => (c.context_dim, c.pooled_dim),
            Shape::Flux(c) => (c.context_in_dim, c.vec_in_dim),
        };
        // The base weights: asked for by the model's own constructor, so every published
        // tensor exists with its shape.
        let (made, vb) = DeviceRandn::builder(dtype, device);
        Net::build(shape, &vb, None, false)?;
        let tensors = made.take();
        let field = format!("{}.dtype", r.section);
        let lora = cfg.train.lora_spec();
        let nets = Nets::build(tensors, dtype, &field, lora.as_ref(), device, cfg.seed, |vb, l| Net::build(shape, vb, l, checkpointing))?;
        // SD3's and FLUX's VAE: 4 blocks (×8), 16 latent channels, their scale and shift.
        let vcfg =
            AutoEncoderKLConfig { block_out_channels: vec![128, 256, 512, 512], layers_per_block: 2, latent_channels: 16, norm_num_groups: 32, use_quant_conv: false, use_post_quant_conv: false };
        let vae = AutoEncoderKL::new(DeviceRandn::builder(DType::F32, device).1, 3, 3, vcfg)?;
        let (scale, shift) = if matches!(shape, Shape::Mmdit(_)) { (1.5305, 0.0609) } else { (0.3611, 0.1159) };
        let vae = Sd3Vae::new(vae, 16, 4, scale, shift);
        let seq = Tensor::randn(0f32, 1.0, (1, text_tokens, context_dim), device)?;
        let pooled = Tensor::randn(0f32, 1.0, (1, pooled_dim), device)?;
        Ok(Self { nets, vae, seq, pooled, guidance, latent: vec![16, resolution / 8, resolution / 8], device: device.clone() })
    }

    fn run(&self, m: &Net, z: &Tensor, sigma: &Tensor, cond: &Condition) -> candle_core::Result<Tensor> {
        let pooled = cond.pooled.as_ref().ok_or_else(|| candle_core::Error::Msg("condition without a pooled embedding".into()))?;
        match m {
            Net::Sd3(m) => m.forward(z, sigma, &cond.seq, pooled),
            Net::Flux(m) => {
                let g = self.guidance.map(|g| Tensor::full(g, z.dim(0)?, z.device())).transpose()?;
                m.forward(z, sigma, &cond.seq, pooled, g.as_ref())
            }
        }
    }
}

impl FlowModel for RandomGenerator {
    fn velocity(&self, z: &Tensor, sigma: &Tensor, cond: &Condition) -> candle_core::Result<Tensor> {
        self.run(&self.nets.model, z, sigma, cond)
    }
    fn velocity_frozen(&self, z: &Tensor, sigma: &Tensor, cond: &Condition) -> candle_core::Result<Tensor> {
        self.run(&self.nets.frozen, z, sigma, cond)
    }
    fn velocity_base(&self, z: &Tensor, sigma: &Tensor, cond: &Condition) -> Option<candle_core::Result<Tensor>> {
        self.nets.base_net.as_ref().map(|m| self.run(m, z, sigma, cond))
    }
    fn backward(&self, loss: &Tensor) -> candle_core::Result<candle_core::backprop::GradStore> {
        match &self.nets.model {
            Net::Sd3(m) => m.backward(loss),
            Net::Flux(m) => m.backward(loss),
        }
    }
    fn base_vars(&self) -> Vec<(String, Var)> {
        crate::weights::tensors::sorted_vars(&self.nets.base)
    }
    fn device(&self) -> &Device {
        &self.device
    }
}

impl Policy for RandomGenerator {
    fn encode(&self, prompts: &[Prompt]) -> Result<Condition> {
        let n = prompts.len();
        Ok(Condition { seq: self.seq.repeat((n, 1, 1))?, pooled: Some(self.pooled.repeat((n, 1))?) })
    }
    fn decode(&self, z: &Tensor) -> Result<Samples> {
        Ok(Samples::Images(self.vae.decode(z)?))
    }
    fn latent_shape(&self) -> Vec<usize> {
        self.latent.clone()
    }
    fn trainable(&self) -> Vec<(String, Var)> {
        crate::weights::tensors::sorted_vars(self.nets.lora.as_ref().unwrap_or(&self.nets.base))
    }
    fn base_map(&self) -> &VarMap {
        &self.nets.base
    }
    fn lora_map(&self) -> Option<&VarMap> {
        self.nets.lora.as_ref()
    }
}

/// What one run measured.
#[derive(Clone, Debug)]
pub struct GenStepBench {
    pub params: usize,
    pub trainable: usize,
    pub samples: usize,
    /// Median of `iters` transformer forward + backward passes of one update micro-batch
    /// (classifier-free guidance doubles the batch), milliseconds.
    pub fwd_bwd_ms: f64,
    /// The same micro-batch's forward through the rollout network (no graph), ms.
    pub fwd_ms: f64,
    pub micro_batch: usize,
    pub step: Option<super::step::StepBench>,
}

/// The transformer of the config's variant (`sd3.variant` / `flux.variant`).
pub fn shape_of(cfg: &Config) -> Result<Shape> {
    let m = cfg.modality;
    let r = cfg.generator().real().with_context(|| format!("bench gen-step: modality \"{m}\" is not a real generator (use a config with modality = \"sd3\" or \"flux\")"))?;
    r.transformer().with_context(|| format!("bench gen-step needs a named {}.variant", r.section))
}

/// The config as the bench runs it: redness as the reward, the embedded MobileNetV2 for
/// the maps, a small prompt file (the text side ignores the words), no evaluation or grids.
fn bench_config(cfg: &Config, scratch: &std::path::Path) -> Result<Config> {
    let mut c = cfg.clone();
    c.progress = false;
    c.train.eval_prompts = 0;
    c.train.grid_every = 0;
    c.vipo.map_grid_every = 0;
    // A bench usually runs fewer samples than the config: keep one optimizer step per
    // rollout batch, as the shipped configs do.
    let (n, mb) = (c.train.prompts_per_step * c.train.group_size, c.train.micro_batch.max(1));
    if n % (mb * c.train.grad_accum.max(1)) != 0 && n % mb == 0 {
        c.train.grad_accum = n / mb;
    }
    c.train.rewards = vec![crate::reward::RewardEntry::new("redness", 1.0)];
    c.backbone = Config::default().backbone;
    let prompts = scratch.join("prompts.txt");
    std::fs::write(&prompts, (0..c.train.prompts_per_step.max(1)).map(|i| format!("a photograph, take {i}\n")).collect::<String>())?;
    c.train.prompt_file = prompts.display().to_string();
    Ok(c)
}

/// Build the random generator for `cfg` (shape given, or the config's variant), time
/// `iters` micro-batch forwards and forward + backward passes (after one warm-up each),
/// then `steps` training steps (0 = none).
pub fn bench_gen_step(cfg: &Config, shape: Option<Shape>, iters: usize, steps: usize) -> Result<GenStepBench> {
    anyhow::ensure!(iters >= 1, "bench gen-step: iters must be ≥ 1");
    let shape = match shape {
        Some(s) => s,
        None => shape_of(cfg)?,
    };
    let scratch = super::step::Scratch::new("gen-step")?;
    let cfg = bench_config(cfg, &scratch.0)?;
    cfg.train.validate()?;
    let device = crate::runtime::device()?;
    let t0 = std::time::Instant::now();
    let policy = RandomGenerator::new(&cfg, &shape, &device)?;
    device.synchronize()?;
    // Progress on stderr: on a lent GPU a stage may be cut off by its time limit.
    eprintln!("gen-step: built in {:.1} s", t0.elapsed().as_secs_f64());
    let params = policy.base_vars().iter().map(|(_, v)| v.elem_count()).sum();
    let trainable = policy.trainable().iter().map(|(_, v)| v.elem_count()).sum();
    // One update micro-batch through the trained network, as the update runs it.
    let mb = cfg.train.micro_batch;
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(cfg.seed);
    let mut lat = vec![mb];
    lat.extend(policy.latent_shape());
    let z = crate::sampler::randn(&lat, &mut rng, &device)?;
    let sigma = Tensor::full(0.5f32, mb, &device)?;
    let cond = policy.encode(&vec![Prompt::text("a photograph"); mb])?;
    let w = cfg.sample.guidance;
    let logged = |what: &str, f: &dyn Fn() -> Result<()>| -> Result<()> {
        let t = std::time::Instant::now();
        f()?;
        eprintln!("gen-step: {what} {:.0} ms", t.elapsed().as_secs_f64() * 1e3);
        Ok(())
    };
    let fwd_ms = super::time_ms(iters, &|| {
        logged("forward (rollout network, no graph)", &|| {
            crate::policy::guided_velocity_frozen(&policy, &z, &sigma, &cond, w)?;
            device.synchronize()?;
            Ok(())
        })
    })?;
    let fwd_bwd_ms = super::time_ms(iters, &|| {
        logged("forward + backward", &|| {
            let v = crate::policy::guided_velocity(&policy, &z, &sigma, &cond, w)?;
            let g = policy.backward(&v.to_dtype(DType::F32)?.sqr()?.mean_all()?)?;
            anyhow::ensure!(policy.trainable().iter().all(|(_, v)| g.get(v.as_tensor()).is_some()), "a trainable tensor got no gradient");
            device.synchronize()?;
            Ok(())
        })
    })?;
    eprintln!("gen-step: micro-batch {mb}: forward {fwd_ms:.0} ms, forward + backward {fwd_bwd_ms:.0} ms (medians)");
    let step = if steps > 0 {
        let mut tr = Trainer::with_policy(&cfg, &scratch.0, false, Box::new(policy), None)?;
        // No warm-up step: the timings above have warmed the transformer's kernels (the
        // VAE's and the backbone's first use falls in the first step's decode and maps).
        Some(super::step::time_steps(&mut tr, &cfg, steps, false)?)
    } else {
        None
    };
    Ok(GenStepBench { params, trainable, samples: cfg.train.prompts_per_step * cfg.train.group_size, fwd_ms, fwd_bwd_ms, micro_batch: mb, step })
}

pub fn print(cfg: &Config, b: &GenStepBench) {
    let (what, res) = match cfg.generator().real() {
        Some(r) => (format!("{} {}", r.section, r.variant), r.resolution),
        None => (cfg.modality.to_string(), cfg.image_size()),
    };
    let cfg_x = if cfg.sample.guidance != 1.0 { " (×2 for CFG)" } else { "" };
    println!("gen-step {what} at {res}², random weights: {:.3} B parameters, {:.2} M trainable", b.params as f64 / 1e9, b.trainable as f64 / 1e6);
    println!("  transformer, micro-batch {}{cfg_x}: forward {:.0} ms, forward + backward {:.0} ms", b.micro_batch, b.fwd_ms, b.fwd_bwd_ms);
    if let Some(s) = &b.step {
        println!(
            "  step ({} samples, {} rollout steps): rollout {:.2} s  reward {:.2} s  maps {:.2} s  update {:.2} s  total {:.2} s (median of {}, no warm-up step)",
            b.samples, cfg.train.sample_steps, s.rollout_s, s.reward_s, s.map_s, s.update_s, s.step_s, s.steps
        );
        println!("  first-update |ratio − 1| max {:.2e}", s.ratio_dev_first);
    }
    // Device memory is read from outside (nvidia-smi): candle's CUDA allocator keeps no peak.
    println!("  peak host RSS {:.0} MB", crate::runtime::memory_mb().map_or(0.0, |(_, p)| p));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::flux::model::FluxConfig;
    use crate::policy::sd3::mmdit::MmditConfig;

    /// A config that is not a real generator, or has no named variant, is refused in one
    /// line before anything is built.
    #[test]
    fn gen_step_refuses_configs_without_a_real_generator() {
        let e = format!("{:#}", bench_gen_step(&Config::default(), None, 1, 0).err().unwrap());
        assert!(e.contains("not a real generator"), "{e}");
        let cfg: Config = crate::config::load(None, &["modality=flux".to_string(), "flux.variant=".to_string()]).unwrap();
        let e = format!("{:#}", bench_gen_step(&cfg, None, 1, 0).err().unwrap());
        assert!(e.contains("flux.variant"), "{e}");
    }

    /// The random generator runs a GRPO and a ViPO step through the trainer on the CPU at
    /// a shrunk shape: finite rewards, on-policy first ratio, every adapter trained.
    #[test]
    fn random_generators_train_a_step() {
        for (modality, shape) in [
            (
                "flux",
                Shape::Flux(FluxConfig {
                    in_channels: 64,
                    vec_in_dim: 32,
                    context_in_dim: 24,
                    hidden: 32,
                    mlp_ratio: 2.0,
                    heads: 2,
                    depth: 1,
                    depth_single: 1,
                    axes_dim: vec![4, 6, 6],
                    theta: 10_000.0,
                    guidance_embed: true,
                }),
            ),
            ("sd3", Shape::Mmdit(MmditConfig { depth: 2, heads: 2, head_dim: 16, pooled_dim: 24, context_dim: 24, pos_embed_max: 8, dual_attention_layers: 1, ..MmditConfig::sd35_medium() })),
        ] {
            for algo in ["grpo", "vipo"] {
                let sets: Vec<String> = [
                    format!("modality={modality}"),
                    format!("{modality}.resolution=32"),
                    format!("{modality}.t5_tokens=3"),
                    format!("{modality}.dtype=f32"),
                    format!("train.algo={algo}"),
                    "train.prompts_per_step=1".into(),
                    "train.group_size=2".into(),
                    "train.micro_batch=2".into(),
                    "train.grad_accum=1".into(),
                    r#"train.lora_targets=["attn.to_q", "attn.to_v", "attn.add_k_proj"]"#.into(),
                    "train.sample_steps=3".into(),
                    "train.lora_rank=2".into(),
                    format!("sample.guidance={}", if modality == "sd3" { 2.0 } else { 1.0 }),
                ]
                .into();
                let cfg: Config = crate::config::load(None, &sets).unwrap();
                let b = bench_gen_step(&cfg, Some(shape.clone()), 1, 1).unwrap();
                let s = b.step.unwrap();
                assert!(b.trainable > 0 && b.params > b.trainable, "{modality} {algo}");
                assert!(s.step_s > 0.0 && s.update_s > 0.0 && s.ratio_dev_first < 1e-4, "{modality} {algo}: {s:?}");
                assert_eq!(s.map_s > 0.0, algo == "vipo", "{modality} {algo}: maps only for ViPO");
            }
        }
    }
}
