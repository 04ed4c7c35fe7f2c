//! `vipo plan`: what one GRPO / ViPO step of a real generator costs, before anyone rents a
//! GPU — parameters, trainable parameters, memory (weights, optimizer, activations with
//! and without block checkpointing, the text encoders while prompts are encoded) and
//! FLOPs, from the model shape and the `[train]` / `[sample]` / `[sd3]` settings.
//!
//! Estimates, by rule (each stated in the printout):
//! * weights in `sd3.dtype`; LoRA (or full fine-tuning) parameters kept in f32 with their
//!   gradient and AdamW's two moments: 16 bytes each;
//! * activations kept for the backward, per sample and block: the input of every linear
//!   layer, the elementwise intermediates (norm, modulate, GELU: ≈ 8 widths per token) and
//!   the attention probabilities with their exponentials (2 × heads × queries × keys), all in
//!   `sd3.dtype`; with checkpointing only each block's input is kept, plus one block's
//!   activations while it is recomputed;
//! * an update micro-batch holds `train.micro_batch` samples, doubled by CFG
//!   (`sample.guidance` ≠ 1); the rollout runs in micro-batches too, without a graph;
//! * FLOPs: 2 per multiply-add of every linear layer on its tokens plus 4·q·k·width per
//!   attention; a LoRA backward costs one forward (input gradients only, the base frozen),
//!   a full fine-tuning backward two; checkpointing adds one forward; the KL reference one
//!   forward; the VAE decode, rewards and maps are not counted;
//! * text encoders and the VAE decoder at their published sizes (CLIP-L 123 M,
//!   OpenCLIP-bigG 695 M, T5-XXL encoder 4.76 B, 16-channel VAE decoder ≈ 50 M parameters);
//!   prompts are encoded once and cached, so the encoders leave memory before training.

use anyhow::{Context, Result};

use crate::config::Config;
use crate::policy::sd3::mmdit::{MmditConfig, Tokens};
use crate::policy::Transformer;

const CLIP_L: f64 = 123.0e6;
const CLIP_G: f64 = 695.0e6;
const T5_XXL: f64 = 4.76e9;
const VAE_DECODER: f64 = 50.0e6;
const GIB: f64 = (1u64 << 30) as f64;

/// The numbers of one plan (bytes and FLOPs as f64).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Plan {
    pub model: String,
    pub resolution: usize,
    pub dtype: String,
    pub checkpointing: bool,
    pub params: f64,
    pub trainable: f64,
    pub image_tokens: usize,
    pub text_tokens: usize,
    pub weights_bytes: f64,
    pub optimizer_bytes: f64,
    pub text_encoder_bytes: f64,
    pub vae_bytes: f64,
    pub activations_bytes: f64,
    pub activations_checkpointed_bytes: f64,
    pub rollout_bytes: f64,
    /// Peak while training with the configured checkpointing.
    pub train_peak_bytes: f64,
    /// Peak while encoding prompts (encoders loaded, nothing else).
    pub encode_peak_bytes: f64,
    pub forward_flops: f64,
    pub rollout_flops: f64,
    pub update_flops: f64,
}

/// Forward FLOPs and kept activations (bytes) of one sample.
fn per_sample(m: &MmditConfig, n: usize, l: usize, bytes: f64) -> (f64, f64, f64) {
    let d = m.hidden() as f64;
    let h = m.heads as f64;
    let (nf, lf) = (n as f64, l as f64);
    let tokens = |t: Tokens| match t {
        Tokens::Vector => 1.0,
        Tokens::Text => lf,
        Tokens::Image => nf,
    };
    let mut flops = 0.0;
    let mut act = 0.0;
    for (_, din, dout, t) in m.linear_layers() {
        flops += 2.0 * din as f64 * dout as f64 * tokens(t);
        act += din as f64 * tokens(t);
    }
    let mut block_max: f64 = 0.0;
    for i in 0..m.depth {
        let last = i + 1 == m.depth;
        let q = if last { nf } else { nf + lf };
        let k = nf + lf;
        let mut blk = 2.0 * h * q * k + 8.0 * d * (nf + if last { 0.0 } else { lf });
        flops += 4.0 * q * k * d;
        if i < m.dual_attention_layers {
            flops += 4.0 * nf * nf * d;
            blk += 2.0 * h * nf * nf;
        }
        act += blk;
        block_max = block_max.max(blk + (nf + lf) * d * 12.0);
    }
    (flops, act * bytes, block_max * bytes)
}

/// Plan a GRPO / ViPO step of the `[sd3]` generator under `[train]`.
pub fn sd3(cfg: &Config) -> Result<Plan> {
    let s = &cfg.sd3;
    s.validate()?;
    cfg.train.validate()?;
    let m = MmditConfig::by_name(&s.variant)?;
    let bytes = s.weight_bytes()? as f64;
    let lat = s.resolution / 8;
    let n = (lat / m.patch) * (lat / m.patch);
    anyhow::ensure!(
        lat / m.patch <= m.pos_embed_max,
        "sd3.resolution {}: a {}×{} patch grid exceeds {}'s {}×{} position table",
        s.resolution,
        lat / m.patch,
        lat / m.patch,
        s.variant,
        m.pos_embed_max,
        m.pos_embed_max
    );
    let l = 77 + s.t5_tokens;
    let params = m.param_count() as f64;
    let trainable = trainable(cfg, params, |r, ts| m.lora_param_count(r, ts), &s.variant, "attn.to_out.0")?;
    let (fwd, act, block) = per_sample(&m, n, l, bytes);
    Ok(assemble(
        cfg,
        Arch {
            model: s.variant.clone(),
            resolution: s.resolution,
            dtype: s.dtype.clone(),
            checkpointing: s.checkpointing,
            params,
            trainable,
            n,
            l,
            fwd,
            act,
            block,
            blocks: m.depth,
            hidden: m.hidden(),
            bytes,
            text_encoders: CLIP_L + CLIP_G + T5_XXL,
        },
    ))
}

/// Trainable parameters: every one for full fine-tuning, else the LoRA parameters
/// `lora(rank, targets)` counts (a target set matching nothing in `variant` is an error;
/// `example` is a third target name worth suggesting for it).
fn trainable(cfg: &Config, params: f64, lora: impl Fn(usize, &[String]) -> usize, variant: &str, example: &str) -> Result<f64> {
    let t = &cfg.train;
    if t.lora_rank == 0 {
        return Ok(params);
    }
    let n = lora(t.lora_rank, &t.lora_targets) as f64;
    anyhow::ensure!(n > 0.0, "train.lora_targets {:?}: no layer of {variant} matches (targets are diffusers module names, e.g. attn.to_q, attn.add_k_proj, {example})", t.lora_targets);
    Ok(n)
}

/// What a plan needs from one architecture.
struct Arch {
    model: String,
    resolution: usize,
    dtype: String,
    checkpointing: bool,
    params: f64,
    trainable: f64,
    /// Image and text tokens.
    n: usize,
    l: usize,
    /// Forward FLOPs, kept activations and one block's activations (bytes) per sample.
    fwd: f64,
    act: f64,
    block: f64,
    /// Checkpointed blocks and the width of their inputs.
    blocks: usize,
    hidden: usize,
    bytes: f64,
    /// Text encoder parameters.
    text_encoders: f64,
}

fn assemble(cfg: &Config, a: Arch) -> Plan {
    let t = &cfg.train;
    let cfg_mult = if cfg.sample.guidance != 1.0 { 2.0 } else { 1.0 };
    let rows = t.micro_batch as f64 * cfg_mult;
    let act_full = a.act * rows;
    // Checkpointed: every block's input (image + text tokens), plus one block live.
    let act_ckpt = rows * (a.blocks as f64 * (a.n + a.l) as f64 * a.hidden as f64 * a.bytes + a.block);
    let activations = if a.checkpointing { act_ckpt } else { act_full };
    let weights = a.params * a.bytes;
    // Full fine-tuning with a KL term needs a frozen copy; LoRA turns its adapters off.
    let reference = if t.kl_beta > 0.0 && t.lora_rank == 0 { weights } else { 0.0 };
    let optimizer = a.trainable * 16.0;
    let vae = VAE_DECODER * a.bytes;
    let rollout = rows * a.block;
    let samples = (t.prompts_per_step * t.group_size) as f64;
    let k_train = ((t.timestep_fraction * t.trainable_transitions() as f64).round()).max(1.0);
    let bwd = if t.lora_rank > 0 { 1.0 } else { 2.0 } + if a.checkpointing { 1.0 } else { 0.0 };
    let kl = if t.kl_beta > 0.0 { 1.0 } else { 0.0 };
    Plan {
        model: a.model,
        resolution: a.resolution,
        dtype: a.dtype,
        checkpointing: a.checkpointing,
        params: a.params,
        trainable: a.trainable,
        image_tokens: a.n,
        text_tokens: a.l,
        weights_bytes: weights + reference,
        optimizer_bytes: optimizer,
        text_encoder_bytes: a.text_encoders * a.bytes,
        vae_bytes: vae,
        activations_bytes: act_full,
        activations_checkpointed_bytes: act_ckpt,
        rollout_bytes: rollout,
        train_peak_bytes: weights + reference + optimizer + vae + activations.max(rollout),
        encode_peak_bytes: a.text_encoders * a.bytes,
        forward_flops: a.fwd,
        rollout_flops: samples * t.sample_steps as f64 * a.fwd * cfg_mult,
        update_flops: samples * k_train * a.fwd * cfg_mult * (1.0 + bwd + kl),
    }
}

/// Plan a GRPO / ViPO step of the `[flux]` generator under `[train]` (same rules as SD3:
/// double blocks attend over text + image tokens in two streams, single blocks over the
/// joint sequence; text encoders CLIP-L and T5-XXL).
pub fn flux(cfg: &Config) -> Result<Plan> {
    let f = &cfg.flux;
    f.validate()?;
    cfg.train.validate()?;
    let m = crate::policy::flux::model::FluxConfig::by_name(&f.variant)?;
    let bytes = f.candle_dtype()?.size_in_bytes() as f64;
    let n = (f.resolution / 16) * (f.resolution / 16);
    let l = f.t5_tokens;
    let params = m.param_count() as f64;
    let trainable = trainable(cfg, params, |r, ts| m.lora_param_count(r, ts), &f.variant, "proj_mlp")?;
    let (nf, lf, d, h) = (n as f64, l as f64, m.hidden as f64, m.heads as f64);
    let (mut fwd, mut act) = (0.0, 0.0);
    for (name, din, dout) in m.linear_layers() {
        let tokens = if name.starts_with("single_blocks.") && !name.ends_with("modulation.lin") {
            nf + lf
        } else if name.ends_with("_mod.lin")
            || name.ends_with("modulation.lin")
            || name.starts_with("time_in")
            || name.starts_with("vector_in")
            || name.starts_with("guidance_in")
            || name.starts_with("final_layer.adaLN")
        {
            1.0
        } else if name.starts_with("txt_in") || name.contains(".txt_") {
            lf
        } else {
            nf
        };
        fwd += 2.0 * din as f64 * dout as f64 * tokens;
        act += din as f64 * tokens;
    }
    let s = nf + lf;
    let blk = 2.0 * h * s * s + 8.0 * d * s;
    fwd += (m.depth + m.depth_single) as f64 * 4.0 * s * s * d;
    act += (m.depth + m.depth_single) as f64 * blk;
    let block = blk + s * d * 12.0;
    Ok(assemble(
        cfg,
        Arch {
            model: f.variant.clone(),
            resolution: f.resolution,
            dtype: f.dtype.clone(),
            checkpointing: f.checkpointing,
            params,
            trainable,
            n,
            l,
            fwd,
            act: act * bytes,
            block: block * bytes,
            blocks: m.depth + m.depth_single,
            hidden: m.hidden,
            bytes,
            text_encoders: CLIP_L + T5_XXL,
        },
    ))
}

/// The plan of the configured real generator.
pub fn plan(cfg: &Config) -> Result<Plan> {
    let real = cfg.generator().real().with_context(|| format!("vipo plan: modality = \"{}\" is a ShapeWorld generator; plan budgets a real one (sd3, flux)", cfg.modality))?;
    // The cost model is the architecture's (a match on architectures, not families).
    match real.transformer()? {
        Transformer::Mmdit(_) => sd3(cfg),
        Transformer::Flux(_) => flux(cfg),
    }
}

/// The plan as the table `vipo plan` prints.
pub fn render(p: &Plan, cfg: &Config) -> String {
    let g = |b: f64| format!("{:.1} GiB", b / GIB);
    let t = &cfg.train;
    let mut o = String::new();
    o.push_str(&format!(
        "{} at {}², {} image + {} text tokens; {} prompts × group {} = {} samples, {} rollout steps, micro-batch {}{}\n",
        p.model,
        p.resolution,
        p.image_tokens,
        p.text_tokens,
        t.prompts_per_step,
        t.group_size,
        t.prompts_per_step * t.group_size,
        t.sample_steps,
        t.micro_batch,
        if cfg.sample.guidance != 1.0 { format!(", CFG {} (×2 rows)", cfg.sample.guidance) } else { String::new() }
    ));
    o.push_str(&format!("parameters          {:>10.3} B (transformer)\n", p.params / 1e9));
    o.push_str(&format!(
        "trainable           {:>10.2} M ({})\n",
        p.trainable / 1e6,
        if t.lora_rank > 0 { format!("LoRA r {} α {} on {}", t.lora_rank, t.lora_alpha, t.lora_targets.join(", ")) } else { "full fine-tuning".into() }
    ));
    o.push_str(&format!("memory ({}):\n", p.dtype));
    o.push_str(&format!("  weights           {:>10}\n", g(p.weights_bytes)));
    o.push_str(&format!("  optimizer         {:>10}  (f32 params + grads + AdamW moments)\n", g(p.optimizer_bytes)));
    o.push_str(&format!("  VAE decoder       {:>10}\n", g(p.vae_bytes)));
    o.push_str(&format!("  activations       {:>10}  per update micro-batch, no checkpointing\n", g(p.activations_bytes)));
    o.push_str(&format!("  activations       {:>10}  with block checkpointing\n", g(p.activations_checkpointed_bytes)));
    o.push_str(&format!("  rollout working   {:>10}  one block of a rollout micro-batch\n", g(p.rollout_bytes)));
    o.push_str(&format!("  text encoders     {:>10}  while prompts are encoded (then cached and offloaded)\n", g(p.text_encoder_bytes)));
    o.push_str(&format!("peak, training      {:>10}  (checkpointing {})\n", g(p.train_peak_bytes), if p.checkpointing { "on" } else { "off" }));
    o.push_str(&format!("peak, encoding      {:>10}\n", g(p.encode_peak_bytes)));
    for card in [80.0, 141.0] {
        let fits = p.train_peak_bytes.max(p.encode_peak_bytes) / GIB <= card * 0.9;
        o.push_str(&format!("fits one {card:.0} GB GPU (90 % usable): {}\n", if fits { "yes" } else { "no" }));
    }
    o.push_str(&format!("FLOPs: forward {:.2} TFLOP/sample; rollout {:.1} PFLOP, update {:.1} PFLOP per step\n", p.forward_flops / 1e12, p.rollout_flops / 1e15, p.update_flops / 1e15));
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The published Flow-GRPO SD3.5-medium recipe fits one 141 GB card with block
    /// checkpointing; turning checkpointing off, full fine-tuning and CFG all cost what
    /// they should, in the right direction; bad settings are refused.
    #[test]
    fn sd35_medium_plan() {
        let mut cfg = Config::default();
        cfg.train.lora_rank = 32;
        cfg.train.lora_alpha = 64.0;
        cfg.train.lora_targets =
            ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v"].iter().map(|s| s.to_string()).collect();
        cfg.sample.guidance = 4.5;
        let p = sd3(&cfg).unwrap();
        assert_eq!((p.image_tokens, p.text_tokens), (1024, 333));
        // 24 blocks × (4 x-stream + 4 context projections, less the pre-only to_add_out) × 32·(1536 + 1536).
        assert_eq!(p.trainable as usize, (24 * 8 - 1) * 32 * (1536 + 1536));
        assert!(p.train_peak_bytes / GIB < 141.0 * 0.9, "{}", render(&p, &cfg));
        assert!(p.activations_checkpointed_bytes < p.activations_bytes / 4.0);
        let mut full = cfg.clone();
        full.train.lora_rank = 0;
        assert!(sd3(&full).unwrap().optimizer_bytes > 30.0 * GIB);
        let mut no_cfg = cfg.clone();
        no_cfg.sample.guidance = 1.0;
        let q = sd3(&no_cfg).unwrap();
        assert!((p.rollout_flops / q.rollout_flops - 2.0).abs() < 1e-9);
        assert!(render(&p, &cfg).contains("fits one 141 GB GPU (90 % usable): yes"));
        let mut bad = cfg.clone();
        bad.sd3.resolution = 500;
        assert!(sd3(&bad).unwrap_err().to_string().contains("sd3.resolution"));
        bad.sd3.resolution = 8192;
        assert!(sd3(&bad).unwrap_err().to_string().contains("position table"));
        let mut bad = cfg.clone();
        bad.train.lora_targets = vec!["attn.qkv".into()];
        assert!(sd3(&bad).unwrap_err().to_string().contains("no layer of sd3.5-medium matches"));
        let mut bad = cfg;
        bad.sd3.variant = "sd4".into();
        assert!(sd3(&bad).unwrap_err().to_string().contains("sd3.variant"));
    }

    /// configs/flux-dev.toml: FLUX.1-dev's 11.9 B transformer with LoRA fits one 80 GB card
    /// with checkpointing; the papers' full fine-tuning (f32 weights and AdamW) fits no
    /// single card; 1 024 image tokens at 512² (2×2-packed 64² latents).
    #[test]
    fn flux_dev_plan() {
        let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/flux-dev.toml");
        let cfg: Config = crate::config::load(Some(&file), &[]).unwrap();
        let p = plan(&cfg).unwrap();
        assert_eq!((p.image_tokens, p.text_tokens), (1024, 512));
        assert!((11.8e9..12.0e9).contains(&p.params));
        assert!(p.train_peak_bytes / GIB < 80.0 * 0.9, "{}", render(&p, &cfg));
        let full: Config = crate::config::load(Some(&file), &["train.lora_rank=0".into(), "flux.dtype=f32".into()]).unwrap();
        assert!(plan(&full).unwrap().train_peak_bytes / GIB > 141.0);
        assert!(render(&p, &cfg).starts_with("flux.1-dev at 512²"));
    }
}
