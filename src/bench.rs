//! Benchmarks (`vipo bench`): wall-clock timings of the DiT block, forward and
//! forward + backward, for the reference and fused paths.

use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use crate::policy::nn::block::{BlockConfig, DitBlock};

pub mod gen_step;
pub mod step;

/// Timings of one DiT block (median milliseconds over the measured iterations).
#[derive(Clone, Debug)]
pub struct BlockBench {
    pub fwd_ms: f64,
    pub fwd_bwd_ms: f64,
    pub fused: bool,
    pub batch: usize,
    pub tokens: usize,
    pub dim: usize,
    pub heads: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Time one DiT block (MLP ratio 4, f32, CPU) on random inputs: a warm-up run, then the
/// median over `iters` of the forward alone and of forward + backward (gradients for all
/// parameters and for the input tokens, as inside a stack of blocks).
pub fn bench_block(batch: usize, tokens: usize, dim: usize, heads: usize, fused: bool, iters: usize) -> anyhow::Result<BlockBench> {
    anyhow::ensure!(iters >= 1, "bench_block: iters must be >= 1");
    anyhow::ensure!(batch >= 1 && tokens >= 1, "bench_block: batch and tokens must be >= 1");
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let cfg = BlockConfig { dim, heads, mlp_ratio: 4, fused };
    let blk = DitBlock::new(&vb.pp("blk"), &cfg, None).context("bench_block: building the block")?;
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (batch, tokens, dim), &dev)?)?;
    let c = Tensor::randn(0f32, 1.0, (batch, dim), &dev)?;

    let fwd = || -> anyhow::Result<Tensor> { Ok(blk.forward(x.as_tensor(), &c)?) };
    let fwd_bwd = || -> anyhow::Result<()> {
        let y = blk.forward(x.as_tensor(), &c)?;
        let grads = y.sum_all()?.backward()?;
        // Touch one gradient so the work cannot be considered dead.
        anyhow::ensure!(grads.get(x.as_tensor()).is_some(), "bench_block: no input gradient");
        Ok(())
    };
    fwd()?;
    fwd_bwd()?;
    let mut tf = Vec::with_capacity(iters);
    let mut tb = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t0 = Instant::now();
        let y = fwd()?;
        drop(y);
        tf.push(t0.elapsed().as_secs_f64() * 1e3);
        let t0 = Instant::now();
        fwd_bwd()?;
        tb.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    Ok(BlockBench { fwd_ms: median(tf), fwd_bwd_ms: median(tb), fused, batch, tokens, dim, heads })
}

/// Whole-policy timings at a config: forward and forward+backward of one training batch.
pub struct PolicyBench {
    pub batch: usize,
    pub fwd_ms: f64,
    pub fwd_bwd_ms: f64,
    pub params: usize,
}

pub fn bench_policy(cfg: &crate::policy::shapeworld::dit::DitConfig, batch: usize, iters: usize) -> anyhow::Result<PolicyBench> {
    use crate::policy::{FlowModel, ImagePolicy, Policy};
    anyhow::ensure!(iters >= 1, "bench: iters must be ≥ 1");
    let dev = crate::runtime::device()?;
    let p = ImagePolicy::new(cfg, &dev, 0)?;
    let prompts = crate::world::prompts(crate::world::Split::Train, batch, 0);
    let cond = p.encode(&prompts.iter().map(crate::prompt::Prompt::image).collect::<Vec<_>>())?;
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
    let z = crate::sampler::randn(&[batch, 3, cfg.image_size, cfg.image_size], &mut rng, &dev)?;
    let sigma = candle_core::Tensor::full(0.5f32, batch, &dev)?;
    let params = p.trainable().iter().map(|(_, v)| v.elem_count()).sum();
    let time = |f: &dyn Fn() -> anyhow::Result<()>| time_ms(iters, f);
    let fwd_ms = time(&|| {
        p.velocity(&z, &sigma, &cond)?.sum_all()?.to_scalar::<f32>()?;
        Ok(())
    })?;
    let fwd_bwd_ms = time(&|| {
        let g = p.velocity(&z, &sigma, &cond)?.sqr()?.mean_all()?.backward()?;
        anyhow::ensure!(!g.get_ids().collect::<Vec<_>>().is_empty());
        Ok(())
    })?;
    Ok(PolicyBench { batch, fwd_ms, fwd_bwd_ms, params })
}

/// What block checkpointing buys: one LoRA training forward+backward of an SD3.5-shaped
/// MMDiT (SD3.5-medium's layout shrunk to 8 blocks of 512, 32² latents = 256 image
/// tokens, 77 + 32 text tokens, batch 4), time and the process's peak RSS above what the
/// weights and inputs take. Peak RSS is per process: run once with
/// `--set sd3.checkpointing=true` and once with `false`.
pub struct MmditBench {
    pub depth: usize,
    pub hidden: usize,
    pub image_tokens: usize,
    pub text_tokens: usize,
    pub batch: usize,
    pub params: usize,
    pub checkpointing: bool,
    pub fwd_bwd_ms: f64,
    pub base_mb: f64,
    pub peak_mb: f64,
}

pub fn bench_mmdit(checkpointing: bool, iters: usize) -> anyhow::Result<MmditBench> {
    use crate::policy::nn::layers::{LoraCtx, LoraSpec};
    use crate::policy::sd3::mmdit::{Mmdit, MmditConfig};
    anyhow::ensure!(iters >= 1, "bench: iters must be ≥ 1");
    let dev = crate::runtime::device()?;
    let cfg = MmditConfig { depth: 8, heads: 8, head_dim: 64, pooled_dim: 256, context_dim: 512, pos_embed_max: 32, dual_attention_layers: 4, ..MmditConfig::sd35_medium() };
    let (batch, side, text) = (4usize, 32usize, 77 + 32);
    let base = candle_nn::VarMap::new();
    Mmdit::new(&crate::policy::seeded_var_builder(&base, 0, &dev), &cfg, None)?;
    let lmap = candle_nn::VarMap::new();
    let spec = LoraSpec {
        rank: 8,
        alpha: 8.0,
        targets: ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"].map(String::from).to_vec(),
    };
    let ctx = LoraCtx { vb: crate::policy::seeded_var_builder(&lmap, 1, &dev), spec };
    let m = Mmdit::new(&crate::policy::frozen_builder(&base, &dev), &cfg, Some(&ctx))?;
    let m = if checkpointing { m.checkpointed() } else { m };
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
    let z = crate::sampler::randn(&[batch, cfg.in_channels, side, side], &mut rng, &dev)?;
    let context = crate::sampler::randn(&[batch, text, cfg.context_dim], &mut rng, &dev)?;
    let pooled = crate::sampler::randn(&[batch, cfg.pooled_dim], &mut rng, &dev)?;
    let sigma = candle_core::Tensor::full(0.5f32, batch, &dev)?;
    let params = crate::weights::tensors::sorted_vars(&lmap).iter().map(|(_, v)| v.elem_count()).sum();
    let base_mb = crate::runtime::memory_mb().map_or(0.0, |(rss, _)| rss);
    let fwd_bwd_ms = time_ms(iters, &|| {
        let g = m.backward(&m.forward(&z, &sigma, &context, &pooled)?.sqr()?.mean_all()?)?;
        anyhow::ensure!(crate::weights::tensors::sorted_vars(&lmap).iter().all(|(_, v)| g.get(v.as_tensor()).is_some()), "an adapter got no gradient");
        Ok(())
    })?;
    let peak_mb = crate::runtime::memory_mb().map_or(0.0, |(_, peak)| peak);
    Ok(MmditBench { depth: cfg.depth, hidden: cfg.hidden(), image_tokens: (side / 2) * (side / 2), text_tokens: text, batch, params, checkpointing, fwd_bwd_ms, base_mb, peak_mb })
}

/// `vipo bench attention`: the attention op (`policy/nn/attention.rs`, each inside) against
/// the composed attention the blocks ran before, forward and forward + backward, and the
/// largest output difference. CPU: f32 at (1, 8 heads, 1 536 tokens, 64); CUDA: bf16 at
/// FLUX.1-dev's (4, 24 heads, 1 024 + 512 tokens, 128).
/// `shape` (B, H, N, hd) overrides the default (tests).
pub fn bench_attention(iters: usize, shape: Option<(usize, usize, usize, usize)>) -> anyhow::Result<Vec<(String, f64, f64, f64)>> {
    use crate::policy::nn::attention::{sdpa_with, Inside};
    use candle_core::{DType, Tensor, Var, D};
    anyhow::ensure!(iters >= 1, "bench: iters must be ≥ 1");
    let dev = crate::runtime::device()?;
    let (dt, default) = if dev.is_cuda() { (DType::BF16, (4, 24, 1536, 128)) } else { (DType::F32, (1, 8, 1536, 64)) };
    let shape = shape.unwrap_or(default);
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
    let mut var = || -> anyhow::Result<Var> { Ok(Var::from_tensor(&crate::sampler::randn(&[shape.0, shape.1, shape.2, shape.3], &mut rng, &dev)?.to_dtype(dt)?)?) };
    let (q, k, v) = (var()?, var()?, var()?);
    let composed = |q: &Tensor, k: &Tensor, v: &Tensor| -> candle_core::Result<Tensor> {
        let (b, h, n, hd) = q.dims4()?;
        let w = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?;
        let p = crate::policy::nn::layers::in_f32(&w, |w| candle_nn::ops::softmax(w, D::Minus1))?;
        p.matmul(&v.contiguous()?)?.transpose(1, 2)?.reshape((b, n, h * hd))
    };
    let reference = composed(&q, &k, &v)?.to_dtype(DType::F32)?;
    let mut variants: Vec<(String, Box<dyn Fn() -> candle_core::Result<Tensor>>)> = vec![("composed".into(), Box::new(|| composed(&q, &k, &v)))];
    let packed_ok = !dev.is_cuda();
    for inside in [Inside::Auto, Inside::Chunked(0), Inside::Chunked(256)] {
        if inside == Inside::Auto && !packed_ok {
            continue;
        }
        let (q, k, v) = (q.clone(), k.clone(), v.clone());
        variants.push((format!("{inside:?}"), Box::new(move || sdpa_with(&q, &k, &v, inside))));
    }
    let sync = |t: &Tensor| -> anyhow::Result<()> {
        // Reading one value waits for the device.
        t.flatten_all()?.narrow(0, 0, 1)?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        Ok(())
    };
    let mut out = Vec::new();
    for (name, f) in &variants {
        let o = f()?;
        let diff = (o.to_dtype(DType::F32)? - &reference)?.abs()?.max_all()?.to_scalar::<f32>()? as f64;
        let fwd = time_ms(iters, &|| sync(&f()?))?;
        let fwd_bwd = time_ms(iters, &|| {
            let g = f()?.to_dtype(DType::F32)?.sqr()?.mean_all()?.backward()?;
            sync(g.get(q.as_tensor()).ok_or_else(|| anyhow::anyhow!("no gradient for q"))?)
        })?;
        out.push((name.clone(), fwd, fwd_bwd, diff));
    }
    Ok(out)
}

/// Median milliseconds of `iters` runs of `f`, after one warm-up run.
fn time_ms(iters: usize, f: &dyn Fn() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    f()?;
    let mut t = Vec::new();
    for _ in 0..iters {
        let s = std::time::Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(t))
}

/// Forward and forward+backward of the video policy at one layout (random weights and
/// inputs; the prompt is 12 tokens). Used to choose the attention layout (issue 6).
pub fn bench_video(cfg: &crate::policy::shapeworld::video_dit::VideoDitConfig, batch: usize, iters: usize) -> anyhow::Result<PolicyBench> {
    use crate::policy::shapeworld::video_dit::VideoDit;
    anyhow::ensure!(iters >= 1, "bench: iters must be ≥ 1");
    cfg.validate()?;
    let dev = crate::runtime::device()?;
    let map = candle_nn::VarMap::new();
    let m = VideoDit::new(&crate::policy::seeded_var_builder(&map, 0, &dev), cfg, 48, 12, None)?;
    let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
    let [c, t, h, w] = cfg.latent_shape();
    let z = crate::sampler::randn(&[batch, c, t, h, w], &mut rng, &dev)?;
    let sigma = candle_core::Tensor::full(0.5f32, batch, &dev)?;
    let tok = candle_core::Tensor::from_vec((0..batch * 12).map(|i| (i % 48) as u32).collect::<Vec<_>>(), (batch, 12), &dev)?;
    let params = map.all_vars().iter().map(|v| v.elem_count()).sum();
    let time = |f: &dyn Fn() -> anyhow::Result<()>| time_ms(iters, f);
    let fwd_ms = time(&|| {
        m.forward(&z, &sigma, &tok)?.sum_all()?.to_scalar::<f32>()?;
        Ok(())
    })?;
    let fwd_bwd_ms = time(&|| {
        m.forward(&z, &sigma, &tok)?.sqr()?.mean_all()?.backward()?;
        Ok(())
    })?;
    Ok(PolicyBench { batch, fwd_ms, fwd_bwd_ms, params })
}

/// `vipo bench [block|policy|psm|video|step|gen-step|mmdit|attention|all]` (`all` leaves
/// out the slow `step`, `gen-step`, `mmdit` and `attention`).
pub fn run_cli(what: &str, iters: usize, steps: usize, samples_of: Option<(&std::path::Path, Option<usize>)>, cfg: &crate::config::Config) -> anyhow::Result<()> {
    let known = ["block", "policy", "psm", "video", "step", "gen-step", "mmdit", "attention", "all"];
    anyhow::ensure!(known.contains(&what), "bench: unknown benchmark {what:?} (known: {})", known.join(", "));
    println!("threads: {}", crate::runtime::threads());
    if what == "step" {
        anyhow::ensure!(samples_of.is_none(), "bench: --run applies to `vipo bench psm` only");
        step::print(cfg, &step::bench_step(cfg, iters)?);
        return Ok(());
    }
    if what == "gen-step" {
        anyhow::ensure!(samples_of.is_none(), "bench: --run applies to `vipo bench psm` only");
        gen_step::print(cfg, &gen_step::bench_gen_step(cfg, None, iters, steps)?);
        return Ok(());
    }
    if what == "attention" {
        for (name, fwd, fwd_bwd, diff) in bench_attention(iters, None)? {
            println!("attention {name:<14}: fwd {fwd:8.1} ms   fwd+bwd {fwd_bwd:8.1} ms   max |Δ| vs composed {diff:.2e}");
        }
        return Ok(());
    }
    if what == "mmdit" {
        let b = bench_mmdit(cfg.sd3.checkpointing, iters)?;
        println!(
            "mmdit {} blocks × {} wide, {} image + {} text tokens, batch {}, LoRA r 8 ({} params), checkpointing {}: fwd+bwd {:.0} ms, peak RSS {:.0} MB over the {:.0} MB of weights and inputs",
            b.depth,
            b.hidden,
            b.image_tokens,
            b.text_tokens,
            b.batch,
            b.params,
            if b.checkpointing { "on" } else { "off" },
            b.fwd_bwd_ms,
            b.peak_mb - b.base_mb,
            b.base_mb
        );
        return Ok(());
    }
    if what == "block" || what == "all" {
        for fused in [false, true] {
            let b = bench_block(8, 256, 256, 4, fused, iters)?;
            println!("block b={} n={} d={} h={} {:<9}: fwd {:7.1} ms   fwd+bwd {:7.1} ms", b.batch, b.tokens, b.dim, b.heads, if fused { "fused" } else { "reference" }, b.fwd_ms, b.fwd_bwd_ms);
        }
    }
    if let Some((run, step)) = samples_of {
        anyhow::ensure!(what == "psm", "bench: --run applies to `vipo bench psm` only");
        for input in [224usize, 112] {
            for b in bench_psm_samples(run, step, 64, input, cfg.backbone.pad)? {
                print_psm("samples", &b);
            }
        }
        return Ok(());
    }
    if what == "psm" || what == "all" {
        for input in [224usize, 112, 64] {
            for b in bench_psm(&["features.3", "features.6", "features.13"], input, cfg.backbone.pad, 32)? {
                print_psm("renders", &b);
            }
        }
    }
    if what == "video" || what == "all" {
        use crate::policy::shapeworld::video_dit::{VideoAttention, VideoDitConfig};
        for attention in [VideoAttention::Full, VideoAttention::Factorised] {
            for t_patch in [1usize, 2] {
                let cfg = VideoDitConfig { attention, t_patch, ..Default::default() };
                let b = bench_video(&cfg, 8, iters)?;
                println!(
                    "video policy 8×32×32 {:<10} t_patch {t_patch} ({:4} tokens, {} params, batch {}): fwd {:7.1} ms   fwd+bwd {:7.1} ms   ({:.1} train clips/s)",
                    format!("{attention:?}").to_lowercase(),
                    cfg.tokens(),
                    b.params,
                    b.batch,
                    b.fwd_ms,
                    b.fwd_bwd_ms,
                    b.batch as f64 / (b.fwd_bwd_ms / 1e3)
                );
            }
        }
    }
    if what == "policy" || what == "all" {
        let cfg = crate::policy::shapeworld::dit::DitConfig::default();
        for fused in [false, true] {
            let c = crate::policy::shapeworld::dit::DitConfig { fused, ..cfg.clone() };
            let b = bench_policy(&c, 32, iters)?;
            println!(
                "policy (default config, {} params, batch {}) {:<9}: fwd {:7.1} ms   fwd+bwd {:7.1} ms   ({:.1} train images/s)",
                b.params,
                b.batch,
                if fused { "fused" } else { "reference" },
                b.fwd_ms,
                b.fwd_bwd_ms,
                b.batch as f64 / (b.fwd_bwd_ms / 1e3)
            );
        }
    }
    Ok(())
}

fn print_psm(on: &str, b: &PsmBench) {
    println!(
        "psm {on} mobilenet_v2 {:<12} @{:3} pad {} {:<9} grid {:>2}x{:<2}: map_object_mass {:.3} (object area {:.3}, ratio {:.2})   backbone {:6.1} ms/img   pca+map {:5.2} ms/img",
        b.tap,
        b.input_size,
        b.pad,
        crate::config::spelling(&b.orient),
        b.grid.0,
        b.grid.1,
        b.object_mass,
        b.area_frac,
        b.object_mass / b.area_frac.max(1e-9),
        b.backbone_ms,
        b.psm_ms
    );
}

/// PSM quality and cost per backbone tap on ground-truth ShapeWorld renders: mean share
/// of map mass on object pixels (vs. their area share) and ms per image for the backbone
/// and for the PCA→map stages.
pub struct PsmBench {
    pub tap: String,
    pub pad: usize,
    pub orient: crate::psm::Orient,
    pub input_size: usize,
    pub grid: (usize, usize),
    pub object_mass: f64,
    pub area_frac: f64,
    pub backbone_ms: f64,
    pub psm_ms: f64,
}

pub fn bench_psm(taps: &[&str], input_size: usize, pad: usize, n_images: usize) -> anyhow::Result<Vec<PsmBench>> {
    use rand::SeedableRng;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let prompts = crate::world::prompts(crate::world::Split::Eval, n_images, 11);
    let mut images = Vec::new();
    let mut masks = Vec::new();
    for p in &prompts {
        let r = crate::world::render(&crate::world::sample_scene(p, &mut rng), 32);
        let mut m = vec![0f32; 32 * 32];
        for om in &r.masks {
            for (a, b) in m.iter_mut().zip(om) {
                *a = a.max(*b);
            }
        }
        images.push(r.image);
        masks.push(m);
    }
    psm_mass(&images, &masks, taps, input_size, pad)
}

/// Map mass on objects for every orientation rule, on `images` with object `masks` (one
/// value per pixel in [0, 1]), for each MobileNetV2 tap at `input_size` with `pad` cells of
/// context padding (`backbone.pad`).
pub fn psm_mass(images: &[crate::image::Image], masks: &[Vec<f32>], taps: &[&str], input_size: usize, pad: usize) -> anyhow::Result<Vec<PsmBench>> {
    anyhow::ensure!(!images.is_empty() && images.len() == masks.len(), "psm bench: {} images, {} masks", images.len(), masks.len());
    let n_images = images.len();
    let (h, w) = (images[0].h, images[0].w);
    let mut out = Vec::new();
    for tap in taps {
        let cfg = crate::backbone::BackboneConfig { tap: tap.to_string(), input_size, pad, ..Default::default() };
        let bb = crate::backbone::load(&cfg)?;
        let _ = bb.features(&images[..1])?; // warm-up
        let t0 = std::time::Instant::now();
        let feats = bb.features(images)?;
        let backbone_ms = t0.elapsed().as_secs_f64() * 1e3 / n_images as f64;
        for orient in [crate::psm::Orient::Border, crate::psm::Orient::Minority, crate::psm::Orient::Sklearn] {
            let t1 = std::time::Instant::now();
            let pc = crate::psm::PsmConfig { orient, ..Default::default() };
            let (maps, _) = crate::psm::allocation_maps(&feats, h, w, &pc);
            let psm_ms = t1.elapsed().as_secs_f64() * 1e3 / n_images as f64;
            let (mut mass, mut area) = (0.0, 0.0);
            for (m, o) in maps.iter().zip(masks) {
                let (a, b) = crate::psm::map_object_mass(m, o);
                mass += a as f64;
                area += b as f64;
            }
            out.push(PsmBench {
                tap: tap.to_string(),
                pad,
                orient,
                input_size,
                grid: (feats[0].h, feats[0].w),
                object_mass: mass / n_images as f64,
                area_frac: area / n_images as f64,
                backbone_ms,
                psm_ms,
            });
        }
    }
    Ok(out)
}

/// The same measurement on a run's own samples: 20-step ODE samples (fixed noise) of the
/// run's weights on `n` `vipo eval` prompts, with the foreground masks the trainer's
/// `map_object_mass` uses (generated images have no ground-truth masks), for MobileNetV2's
/// taps `features.{3,6,13}` at `input_size`.
pub fn bench_psm_samples(run_dir: &std::path::Path, step: Option<usize>, n: usize, input_size: usize, pad: usize) -> anyhow::Result<Vec<PsmBench>> {
    let cfg: crate::config::Config = crate::config::load(Some(&run_dir.join(crate::run_dir::CONFIG_FILE)), &[])?;
    anyhow::ensure!(cfg.sample_kind() == crate::image::SampleKind::Images && !cfg.generator().is_real(), "bench psm --run: {} is not an image run", run_dir.display());
    let (policy, _) = crate::eval::run::load_run_policy(run_dir, &cfg, step)?;
    let prompts = crate::world::prompts(crate::world::Split::Eval, n, crate::policy::ode::EVAL_SEED);
    let images = crate::generate::generate_images(policy.as_ref(), &prompts, crate::policy::ode::EVAL_SEED, &cfg.sample)?;
    let masks: Vec<Vec<f32>> = images.iter().map(crate::train::maps::foreground_mask).collect();
    psm_mass(&images, &masks, &["features.3", "features.6", "features.13"], input_size, pad)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every variant runs, takes positive time and agrees with the composed attention.
    #[test]
    fn bench_attention_runs_small() {
        let rows = bench_attention(1, Some((1, 2, 40, 8))).unwrap();
        let names: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
        assert_eq!(names, ["composed", "Auto", "Chunked(0)", "Chunked(256)"]);
        for (name, fwd, fwd_bwd, diff) in &rows {
            assert!(*fwd > 0.0 && *fwd_bwd > 0.0 && fwd.is_finite() && fwd_bwd.is_finite(), "{name}");
            assert!(*diff < 1e-5, "{name}: {diff}");
        }
        assert!(bench_attention(0, Some((1, 2, 40, 8))).is_err());
    }

    #[test]
    fn bench_block_runs_small() {
        for fused in [false, true] {
            let b = bench_block(1, 8, 16, 2, fused, 3).unwrap();
            assert!(b.fwd_ms > 0.0 && b.fwd_bwd_ms > 0.0 && b.fwd_ms.is_finite() && b.fwd_bwd_ms.is_finite());
            assert_eq!((b.batch, b.tokens, b.dim, b.heads, b.fused), (1, 8, 16, 2, fused));
        }
        assert!(bench_block(1, 8, 16, 2, false, 0).is_err());
    }

    /// Context padding (`backbone.pad`) moves map mass onto the objects of ground-truth
    /// renders under the default (minority) orientation: 2.53× → 3.05× on the 32-image bench.
    #[test]
    fn context_padding_puts_more_map_on_objects() {
        let ratio = |pad| {
            let b = bench_psm(&["features.6"], 112, pad, 16).unwrap();
            let m = b.iter().find(|b| b.orient == crate::psm::Orient::Minority).unwrap();
            assert_eq!((m.pad, m.grid), (pad, (14, 14)));
            m.object_mass / m.area_frac
        };
        let (r0, r2) = (ratio(0), ratio(2));
        assert!(r2 > r0 + 0.25, "pad 2: {r2:.2}× vs pad 0: {r0:.2}×");
    }
}
