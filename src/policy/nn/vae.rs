//! SD3 / SD3.5's frozen 16-channel VAE (diffusers' `vae/` folder: `config.json` +
//! safetensors), run by candle-transformers' `AutoEncoderKL` as is. Latents are decoded as
//! the pipeline does: x = decode(z / scaling_factor + shift_factor) (1.5305 and 0.0609 for
//! SD3), then [-1, 1] → [0, 1] images.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_transformers::models::stable_diffusion::vae::{AutoEncoderKL, AutoEncoderKLConfig};
use std::path::Path;

use crate::image::Image;

pub struct Sd3Vae {
    vae: AutoEncoderKL,
    pub scaling_factor: f64,
    pub shift_factor: f64,
    pub latent_channels: usize,
    /// Image side / latent side: 2^(blocks − 1) (8 for SD3's VAE).
    pub factor: usize,
}

impl Sd3Vae {
    pub fn new(vae: AutoEncoderKL, latent_channels: usize, blocks: usize, scaling_factor: f64, shift_factor: f64) -> Self {
        Self { vae, scaling_factor, shift_factor, latent_channels, factor: 1 << blocks.saturating_sub(1) }
    }

    /// A diffusers `vae/` folder (the component folder or its model root).
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let dir = if path.join("vae").is_dir() { path.join("vae") } else { path.to_path_buf() };
        let cfg_path = dir.join("config.json");
        let v = crate::weights::hf::read_json(&cfg_path)?;
        let num = |k: &str| v[k].as_u64().map(|x| x as usize).with_context(|| format!("{}: {k} missing", cfg_path.display()));
        let blocks: Vec<usize> =
            v["block_out_channels"].as_array().with_context(|| format!("{}: block_out_channels missing", cfg_path.display()))?.iter().filter_map(|x| x.as_u64().map(|x| x as usize)).collect();
        let latent_channels = num("latent_channels")?;
        let n_blocks = blocks.len();
        anyhow::ensure!(n_blocks > 0, "{}: block_out_channels is empty", cfg_path.display());
        let cfg = AutoEncoderKLConfig {
            block_out_channels: blocks,
            layers_per_block: num("layers_per_block")?,
            latent_channels,
            norm_num_groups: num("norm_num_groups")?,
            use_quant_conv: v["use_quant_conv"].as_bool().unwrap_or(true),
            use_post_quant_conv: v["use_post_quant_conv"].as_bool().unwrap_or(true),
        };
        let (tensors, source) = crate::weights::hf::read_folder(&dir, device)?;
        anyhow::ensure!(tensors.contains_key("decoder.conv_in.weight"), "{source}: not a diffusers AutoencoderKL (no decoder.conv_in.weight)");
        let vb = candle_nn::VarBuilder::from_tensors(tensors, DType::F32, device);
        let vae = AutoEncoderKL::new(vb, 3, 3, cfg).with_context(|| format!("{source}: does not match {}", cfg_path.display()))?;
        Ok(Self::new(vae, latent_channels, n_blocks, v["scaling_factor"].as_f64().unwrap_or(1.5305), v["shift_factor"].as_f64().unwrap_or(0.0609)))
    }

    /// Latents (B, C, h, w) → decoder output in [-1, 1], (B, 3, 8h, 8w) for SD3's VAE.
    pub fn decode_tensor(&self, z: &Tensor) -> Result<Tensor> {
        anyhow::ensure!(z.dim(1)? == self.latent_channels, "VAE: latents have {} channels, the VAE {}", z.dim(1)?, self.latent_channels);
        Ok(self.vae.decode(&((z.to_dtype(DType::F32)? / self.scaling_factor)? + self.shift_factor)?)?)
    }

    /// Latents → images in [0, 1].
    pub fn decode(&self, z: &Tensor) -> Result<Vec<Image>> {
        let x = self.decode_tensor(z)?;
        let (b, c, h, w) = x.dims4()?;
        anyhow::ensure!(c == 3, "VAE: decoder gives {c} channels");
        let flat: Vec<f32> = x.flatten_all()?.to_vec1()?;
        Ok((0..b).map(|i| Image { h, w, data: flat[i * 3 * h * w..(i + 1) * 3 * h * w].iter().map(|v| ((v + 1.0) * 0.5).clamp(0.0, 1.0)).collect() }).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny 16-channel VAE in the diffusers layout loads from its folder (config read,
    /// no quant convs, as SD3's) and decodes z as decode(z / scale + shift) into [0, 1]
    /// images 2^(blocks−1) times larger; wrong latents and folders are refused.
    #[test]
    fn decodes_like_the_pipeline() {
        let cfg = AutoEncoderKLConfig { block_out_channels: vec![8, 16], layers_per_block: 1, latent_channels: 16, norm_num_groups: 4, use_quant_conv: false, use_post_quant_conv: false };
        let vm = candle_nn::VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        AutoEncoderKL::new(vb, 3, 3, cfg.clone()).unwrap();
        crate::policy::randomize_vars(&vm, 3, 0.2);
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(7);
        let d = tempfile::tempdir().unwrap();
        let vae_dir = d.path().join("model/vae");
        std::fs::create_dir_all(&vae_dir).unwrap();
        crate::weights::tensors::save_varmap(&vm, &vae_dir.join("diffusion_pytorch_model.safetensors")).unwrap();
        std::fs::write(
            vae_dir.join("config.json"),
            r#"{"_class_name": "AutoencoderKL", "block_out_channels": [8, 16], "layers_per_block": 1, "latent_channels": 16, "norm_num_groups": 4,
                "use_quant_conv": false, "use_post_quant_conv": false, "scaling_factor": 1.5305, "shift_factor": 0.0609}"#,
        )
        .unwrap();
        let v = Sd3Vae::load(&d.path().join("model"), &Device::Cpu).unwrap();
        let z = crate::sampler::randn(&[2, 16, 3, 4], &mut rng, &Device::Cpu).unwrap();
        let imgs = v.decode(&z).unwrap();
        assert_eq!((imgs.len(), imgs[0].h, imgs[0].w), (2, 6, 8));
        assert_eq!(v.factor, 2);
        assert!(imgs.iter().all(|im| im.data.iter().all(|x| (0.0..=1.0).contains(x))));
        let direct = AutoEncoderKL::new(candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu), 3, 3, cfg).unwrap().decode(&((&z / 1.5305).unwrap() + 0.0609).unwrap()).unwrap();
        let diff: f32 = (v.decode_tensor(&z).unwrap() - direct).unwrap().abs().unwrap().max_all().unwrap().to_scalar().unwrap();
        assert_eq!(diff, 0.0);
        assert!(v.decode(&Tensor::zeros((1, 4, 3, 4), DType::F32, &Device::Cpu).unwrap()).unwrap_err().to_string().contains("4 channels"));
        std::fs::write(vae_dir.join("config.json"), "{}").unwrap();
        assert!(Sd3Vae::load(&vae_dir, &Device::Cpu).err().unwrap().to_string().contains("block_out_channels missing"));
    }
}
