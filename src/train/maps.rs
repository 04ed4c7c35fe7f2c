//! Allocation maps for ViPO's per-position advantages: the PSM (frozen backbone → PCA
//! → map, DESIGN.md §1.3) or all ones (the pixel-level-GRPO ablation).

use anyhow::Result;
use candle_core::{Device, Tensor};

use crate::backbone::Backbone;
use crate::config::{Config, MapKind};
use crate::image::Image;
use crate::psm::{self, PsmConfig};
use crate::world::PromptSpec;

/// Maps for a batch of samples on the policy's latent grid (h × w, or t × h × w for
/// video), plus quality stats.
#[derive(Clone, Debug)]
pub struct MapBatch {
    pub maps: Vec<Vec<f32>>,
    pub h: usize,
    pub w: usize,
    /// Frames per map (video); None for images.
    pub t: Option<usize>,
    /// Samples whose extraction failed and got an all-ones map.
    pub fallbacks: usize,
    /// Mean share of map mass on foreground (object) pixels.
    pub object_mass: f64,
    /// Mean share of the image the objects cover.
    pub object_area_frac: f64,
}

impl MapBatch {
    /// Shape of one map: [h, w] or [t, h, w].
    pub fn dims(&self) -> Vec<usize> {
        match self.t {
            None => vec![self.h, self.w],
            Some(t) => vec![t, self.h, self.w],
        }
    }
    /// All maps as one (N, [t,] h, w) tensor.
    pub fn tensor(&self, device: &Device) -> Result<Tensor> {
        let flat: Vec<f32> = self.maps.iter().flatten().copied().collect();
        let mut shape = vec![self.maps.len()];
        shape.extend(self.dims());
        Ok(Tensor::from_vec(flat, shape, device)?)
    }
}

pub trait MapSource {
    fn name(&self) -> String;
    fn maps(&self, images: &[Image], specs: &[PromptSpec]) -> Result<MapBatch>;
}

/// Foreground mask of a generated image: pixels clearly away from the plain ShapeWorld
/// background. (Generated samples have no ground-truth masks, so `map_object_mass` during
/// training measures mass on what the image actually shows.)
pub fn foreground_mask(im: &Image) -> Vec<f32> {
    let bg = crate::world::BACKGROUND;
    (0..im.h * im.w)
        .map(|i| {
            let d: f32 = (0..3).map(|c| (im.data[c * im.h * im.w + i] - bg[c]).powi(2)).sum::<f32>().sqrt();
            if d > 0.25 { 1.0 } else { 0.0 }
        })
        .collect()
}

fn stats(maps: &[Vec<f32>], images: &[Image]) -> (f64, f64) {
    let (mut mass, mut area) = (0.0, 0.0);
    for (m, im) in maps.iter().zip(images) {
        let (a, b) = psm::map_object_mass(m, &foreground_mask(im));
        mass += a as f64;
        area += b as f64;
    }
    let n = maps.len().max(1) as f64;
    (mass / n, area / n)
}

pub struct OnesMap;

impl MapSource for OnesMap {
    fn name(&self) -> String {
        "ones".into()
    }
    fn maps(&self, images: &[Image], _: &[PromptSpec]) -> Result<MapBatch> {
        let (h, w) = (images[0].h, images[0].w);
        let maps = vec![vec![1.0; h * w]; images.len()];
        let (object_mass, object_area_frac) = stats(&maps, images);
        Ok(MapBatch { maps, h, w, t: None, fallbacks: 0, object_mass, object_area_frac })
    }
}

/// The Perceptual Structuring Module: frozen backbone features → per-image PCA → map.
pub struct PsmMap {
    pub backbone: Box<dyn Backbone>,
    pub cfg: PsmConfig,
}

impl MapSource for PsmMap {
    fn name(&self) -> String {
        format!("psm:{}", self.backbone.name())
    }
    fn maps(&self, images: &[Image], _: &[PromptSpec]) -> Result<MapBatch> {
        let (h, w) = (images[0].h, images[0].w);
        let feats = self.backbone.features(images)?;
        let (maps, fallbacks) = psm::allocation_maps(&feats, h, w, &self.cfg);
        let (object_mass, object_area_frac) = stats(&maps, images);
        Ok(MapBatch { maps, h, w, t: None, fallbacks, object_mass, object_area_frac })
    }
}

/// Build the configured map source, validating backbone and PSM settings up front.
pub fn build(cfg: &Config) -> Result<Box<dyn MapSource>> {
    Ok(match cfg.vipo.map {
        MapKind::Ones => Box::new(OnesMap),
        MapKind::Psm => {
            let backbone = crate::backbone::load(&cfg.backbone)?;
            // Probe once so K > D or K > N is reported before training starts.
            let s = match cfg.modality {
                crate::config::Modality::Image => cfg.model.image_size,
                crate::config::Modality::Video => cfg.video_model.image_size,
            };
            let probe = backbone.features(&[Image::filled(s, s, crate::world::BACKGROUND)])?;
            let f = &probe[0];
            cfg.psm.validate(f.d)?;
            anyhow::ensure!(cfg.psm.k <= f.n(), "psm.k = {} exceeds the {} patches of the {} feature grid", cfg.psm.k, f.n(), backbone.name());
            Box::new(PsmMap { backbone, cfg: cfg.psm.clone() })
        }
    })
}
