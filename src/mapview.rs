//! `vipo map`: allocation maps for image files or a run's samples, written as heat-map
//! overlays plus every PSM stage as safetensors, so an independent implementation can
//! check each step (features → PCA → remap → aggregate → smooth → resize).

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::backbone::FeatureMap;
use crate::config::Config;
use crate::image::Image;

/// One image's outputs.
pub struct MapOutput {
    pub name: String,
    pub overlay: PathBuf,
    pub stages: PathBuf,
}

/// Load and check input images before anything is written: RGB, at least one policy patch.
pub fn load_images(paths: &[PathBuf], min_side: usize) -> Result<Vec<(String, Image)>> {
    let mut out = Vec::new();
    for p in paths {
        let im = Image::load(p)?;
        if im.h < min_side || im.w < min_side {
            bail!("{}: image is {}×{}, smaller than one patch ({min_side}×{min_side})", p.display(), im.w, im.h);
        }
        let name = p.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "image".into());
        out.push((name, im));
    }
    Ok(out)
}

fn t(v: &[f32], shape: &[usize]) -> Result<Tensor> {
    Ok(Tensor::from_vec(v.to_vec(), shape, &Device::Cpu)?)
}

/// Compute maps for `images` with the config's backbone and PSM settings and write
/// `<name>_overlay.png` (image | map | overlay) and `<name>_stages.safetensors` into `out`.
/// The map is computed at each image's own resolution.
pub fn write_maps(cfg: &Config, images: &[(String, Image)], out: &Path) -> Result<Vec<MapOutput>> {
    let backbone = crate::backbone::load(&cfg.backbone)?;
    // Features first (all validation happens before the output folder is touched).
    let mut feats: Vec<FeatureMap> = Vec::new();
    for (_, im) in images {
        feats.extend(backbone.features(std::slice::from_ref(im))?);
    }
    let mut stages = Vec::new();
    for ((name, im), f) in images.iter().zip(&feats) {
        cfg.psm.validate(f.d).with_context(|| format!("{name}: backbone {} gives D = {}", backbone.name(), f.d))?;
        stages.push(crate::psm::allocation_map(f, im.h, im.w, &cfg.psm).with_context(|| format!("{name}: allocation map failed"))?);
    }
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create output directory", out.display()))?;
    let mut written = Vec::new();
    for (((name, im), f), s) in images.iter().zip(&feats).zip(&stages) {
        let k = s.explained_variance_ratio.len();
        let (gh, gw) = s.grid;
        let mut tensors = HashMap::new();
        tensors.insert("features".to_string(), t(&f.data, &[f.n(), f.d])?);
        tensors.insert("projections".to_string(), t(&s.projections, &[f.n(), k])?);
        tensors.insert("components".to_string(), t(&s.components, &[k, f.d])?);
        tensors.insert("explained_variance_ratio".to_string(), t(&s.explained_variance_ratio, &[k])?);
        tensors.insert("remapped".to_string(), t(&s.remapped, &[f.n(), k])?);
        tensors.insert("aggregated".to_string(), t(&s.aggregated, &[gh, gw])?);
        tensors.insert("smoothed".to_string(), t(&s.smoothed, &[gh, gw])?);
        tensors.insert("map".to_string(), t(&s.map, &[s.out.0, s.out.1])?);
        let stages_path = out.join(format!("{name}_stages.safetensors"));
        crate::weights::tensors::save_tensors(&tensors, &stages_path)?;
        let scale = (128 / im.h.max(1)).max(1);
        let tiles = [im.upscale(scale), crate::image::heatmap(&s.map, im.h, im.w).upscale(scale), crate::image::overlay(im, &s.map, 0.6).upscale(scale)];
        let overlay_path = out.join(format!("{name}_overlay.png"));
        crate::image::grid(&tiles, 3).save_png(&overlay_path)?;
        written.push(MapOutput { name: name.clone(), overlay: overlay_path, stages: stages_path });
    }
    Ok(written)
}

/// Split a frame strip (frames side by side, as `vipo sample` writes clips) into frames.
pub fn split_strip(path: &Path, frames: usize, min_side: usize) -> Result<Vec<Image>> {
    let strip = Image::load(path)?;
    anyhow::ensure!(frames >= 2, "{}: --frames must be ≥ 2", path.display());
    if strip.w % frames != 0 {
        bail!("{}: strip width {} is not a multiple of --frames {frames}", path.display(), strip.w);
    }
    let w = strip.w / frames;
    if w < min_side || strip.h < min_side {
        bail!("{}: frames are {}×{}, smaller than one patch ({min_side}×{min_side})", path.display(), w, strip.h);
    }
    Ok((0..frames)
        .map(|f| {
            let mut im = Image::new(strip.h, w);
            for c in 0..3 {
                for y in 0..strip.h {
                    for x in 0..w {
                        im.set(c, y, x, strip.get(c, y, f * w + x));
                    }
                }
            }
            im
        })
        .collect())
}

/// Temporal allocation maps of clips (docs/DESIGN.md §1.3 step 7): per-frame PSM maps, stacked,
/// resampled to the clip's frames, Gaussian along time (`vipo.temporal_sigma`), min–max
/// over the volume (or per frame). Writes `<name>_frames.png` (rows: frames | map | overlay)
/// and `<name>_maps.safetensors` (`frame_maps` and `map`, both (T, H, W)).
pub fn write_clip_maps(cfg: &Config, clips: &[(String, Vec<Image>)], out: &Path) -> Result<usize> {
    cfg.vipo.validate()?;
    let backbone = crate::backbone::load(&cfg.backbone)?;
    let mut all = Vec::new();
    for (name, frames) in clips {
        let feats = backbone.features(frames)?;
        if let Some(f) = feats.first() {
            cfg.psm.validate(f.d).with_context(|| format!("{name}: backbone {} gives D = {}", backbone.name(), f.d))?;
        }
        let (h, w) = (frames[0].h, frames[0].w);
        let (per_frame, _) = crate::psm::allocation_maps(&feats, h, w, &cfg.psm);
        let map = crate::psm::temporal_map(&per_frame, h, w, frames.len(), cfg.vipo.temporal_sigma, cfg.vipo.temporal_norm == crate::config::TemporalNorm::PerFrame);
        all.push((name, frames, per_frame, map));
    }
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create output directory", out.display()))?;
    for (name, frames, per_frame, map) in &all {
        let (t_, h, w) = (frames.len(), frames[0].h, frames[0].w);
        let flat: Vec<f32> = per_frame.iter().flatten().copied().collect();
        let mut tensors = HashMap::new();
        tensors.insert("frame_maps".to_string(), t(&flat, &[t_, h, w])?);
        tensors.insert("map".to_string(), t(map, &[t_, h, w])?);
        crate::weights::tensors::save_tensors(&tensors, &out.join(format!("{name}_maps.safetensors")))?;
        let hw = h * w;
        let heat: Vec<Image> = (0..t_).map(|f| crate::image::heatmap(&map[f * hw..(f + 1) * hw], h, w)).collect();
        let over: Vec<Image> = frames.iter().enumerate().map(|(f, im)| crate::image::overlay(im, &map[f * hw..(f + 1) * hw], 0.6)).collect();
        let scale = (64 / h.max(1)).max(1);
        let rows = [crate::image::frame_strip(frames).upscale(scale), crate::image::frame_strip(&heat).upscale(scale), crate::image::frame_strip(&over).upscale(scale)];
        crate::image::grid(&rows, 1).save_png(&out.join(format!("{name}_frames.png")))?;
    }
    Ok(all.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_overlay_and_every_stage_and_rejects_bad_images_first() {
        let d = tempfile::tempdir().unwrap();
        let mut cfg = Config::default();
        cfg.backbone.input_size = 64;
        cfg.backbone.tap = "features.6".into();
        let spec = crate::world::prompts(crate::world::Split::Train, 1, 0).remove(0);
        let scene = crate::world::sample_scene(&spec, &mut <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0));
        let im = crate::world::render(&scene, 32).image;
        let png = d.path().join("scene.png");
        im.save_png(&png).unwrap();
        let imgs = load_images(std::slice::from_ref(&png), 4).unwrap();
        let out = d.path().join("out");
        let w = write_maps(&cfg, &imgs, &out).unwrap();
        assert!(w[0].overlay.is_file());
        let st = crate::weights::tensors::read_tensors(&w[0].stages, &Device::Cpu).unwrap();
        for k in ["features", "projections", "components", "explained_variance_ratio", "remapped", "aggregated", "smoothed", "map"] {
            assert!(st.contains_key(k), "missing stage {k}");
        }
        let m: Vec<f32> = st["map"].flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(st["map"].dims(), &[32, 32]);
        assert_eq!(m.iter().cloned().fold(f32::INFINITY, f32::min), 0.0);
        assert_eq!(m.iter().cloned().fold(f32::NEG_INFINITY, f32::max), 1.0);

        // A grey image and a too-small image are rejected naming the file; nothing written.
        let grey = d.path().join("grey.png");
        image::GrayImage::new(32, 32).save(&grey).unwrap();
        let e = load_images(&[grey], 4).err().unwrap().to_string();
        assert!(e.contains("grey.png") && e.contains("RGB"), "{e}");
        let tiny = d.path().join("tiny.png");
        Image::new(2, 2).save_png(&tiny).unwrap();
        let e = load_images(&[tiny], 4).err().unwrap().to_string();
        assert!(e.contains("tiny.png") && e.contains("smaller than one patch"), "{e}");
        let mut bad = cfg.clone();
        bad.psm.k = 10_000;
        let out2 = d.path().join("out2");
        assert!(write_maps(&bad, &imgs, &out2).is_err());
        assert!(!out2.exists(), "nothing may be written when the settings are invalid");
    }
}
