//! `cargo run --release --example denoise_check RUN_DIR [OUT.png]`: how well an image base
//! (a `vipo pretrain` run) denoises ground-truth ShapeWorld renders. For σ in 0.1 … 0.98 it
//! prints the velocity loss and the MSE of x̂₀ = z − σ·v, and writes a grid: the renders,
//! then one row of x̂₀ per σ. This is the check behind bench/NOTES.md §3 (x- vs v-prediction):
//! a good base gives smooth, object-shaped x̂₀ at high σ, not noise or a patch checkerboard.
use candle_core::{Device, Tensor};
use rand::SeedableRng;
use std::path::{Path, PathBuf};
use vipo::policy::{FlowModel, ImagePolicy};
use vipo::world::{self, Split};

fn main() -> anyhow::Result<()> {
    let run: PathBuf = std::env::args().nth(1).ok_or_else(|| anyhow::anyhow!("usage: denoise_check RUN_DIR [OUT.png]"))?.into();
    let out: PathBuf = std::env::args().nth(2).map(Into::into).unwrap_or_else(|| run.join("denoise_check.png"));
    let cfg: vipo::config::Config = vipo::config::load(Some(&run.join("config.toml")), &[])?;
    let dev = Device::Cpu;
    let p = ImagePolicy::load(&cfg.model, &run.join("model.safetensors"), None, &dev, 0)?;
    let n = 8;
    let prompts = world::prompts(Split::Train, n, 3);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let imgs: Vec<_> = prompts.iter().map(|s| world::render(&world::sample_scene(s, &mut rng), cfg.model.image_size).image).collect();
    let x0 = vipo::policy::shapeworld::dit::images_to_latents(&imgs, &dev)?;
    let eps = vipo::sampler::randn(x0.dims(), &mut rng, &dev)?;
    let cond = p.condition(&prompts)?;
    let mut rows: Vec<_> = imgs.iter().map(|i| i.upscale(4)).collect();
    println!("model.prediction = {:?}", cfg.model.prediction);
    for s in [0.1f64, 0.3, 0.5, 0.7, 0.9, 0.98] {
        let z = ((&x0 * (1.0 - s))? + (&eps * s)?)?;
        let v = p.velocity(&z, &Tensor::full(s as f32, n, &dev)?, &cond)?;
        let v_loss = (&v - (&eps - &x0)?)?.sqr()?.mean_all()?.to_scalar::<f32>()?;
        let x_hat = (&z - (&v * s)?)?;
        let x_mse = (&x_hat - &x0)?.sqr()?.mean_all()?.to_scalar::<f32>()?;
        println!("sigma {s:4.2}: v-loss {v_loss:.4}  x0-MSE {x_mse:.4}");
        rows.extend(p.decode_images(&x_hat)?.iter().map(|i| i.upscale(4)));
    }
    vipo::image::grid(&rows, n).save_png(Path::new(&out))?;
    println!("wrote {}", out.display());
    Ok(())
}
