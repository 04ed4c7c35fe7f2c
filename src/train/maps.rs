//! Allocation maps for ViPO's per-position advantages: the PSM (frozen backbone → PCA
//! → map, docs/DESIGN.md §1.3) or all ones (the pixel-level-GRPO ablation).

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
    /// The maps on another grid (`dims` = [h, w] or [t, h, w], as [`MapBatch::dims`]):
    /// each target cell is the area-weighted mean of the source cells it overlaps, axis by
    /// axis. This is how a map computed on the decoded image reaches a policy whose latent
    /// grid is coarser (SD3.5 / FLUX: H/8 × W/8; Wan: also T/4), so the per-position ratio
    /// always multiplies a map on its own grid. Values stay in the source's range.
    pub fn resample(&self, dims: &[usize]) -> Result<MapBatch> {
        let from = self.dims();
        anyhow::ensure!(dims.len() == from.len(), "maps: cannot resample {from:?} maps to a {dims:?} grid");
        if dims == from.as_slice() {
            return Ok(self.clone());
        }
        anyhow::ensure!(dims.iter().all(|&d| d > 0), "maps: empty target grid {dims:?}");
        let maps = self.maps.iter().map(|m| resample_axes(m, &from, dims)).collect();
        let (t, h, w) = match dims {
            [h, w] => (None, *h, *w),
            [t, h, w] => (Some(*t), *h, *w),
            _ => unreachable!(),
        };
        Ok(MapBatch { maps, h, w, t, ..self.clone() })
    }

    /// All maps as one (N, [t,] h, w) tensor.
    pub fn tensor(&self, device: &Device) -> Result<Tensor> {
        let flat: Vec<f32> = self.maps.iter().flatten().copied().collect();
        let mut shape = vec![self.maps.len()];
        shape.extend(self.dims());
        Ok(Tensor::from_vec(flat, shape, device)?)
    }
}

/// Weights of a 1-D area resampling from `n` cells to `m`: row i holds (source cell, share)
/// pairs, the shares of target cell i summing to 1.
fn area_weights(n: usize, m: usize) -> Vec<Vec<(usize, f64)>> {
    let scale = n as f64 / m as f64;
    (0..m)
        .map(|i| {
            let (a, b) = (i as f64 * scale, (i + 1) as f64 * scale);
            let mut row = Vec::new();
            let mut j = a.floor() as usize;
            while (j as f64) < b && j < n {
                let overlap = (b.min(j as f64 + 1.0) - a.max(j as f64)).max(0.0);
                if overlap > 0.0 {
                    row.push((j, overlap / scale));
                }
                j += 1;
            }
            row
        })
        .collect()
}

/// Separable area resampling of a row-major array of shape `from` to shape `to`.
fn resample_axes(v: &[f32], from: &[usize], to: &[usize]) -> Vec<f32> {
    let mut cur: Vec<f64> = v.iter().map(|&x| x as f64).collect();
    let mut shape = from.to_vec();
    for axis in 0..from.len() {
        if shape[axis] == to[axis] {
            continue;
        }
        let wts = area_weights(shape[axis], to[axis]);
        let outer: usize = shape[..axis].iter().product();
        let inner: usize = shape[axis + 1..].iter().product();
        let mut next = vec![0.0; outer * to[axis] * inner];
        for o in 0..outer {
            for (i, row) in wts.iter().enumerate() {
                let dst = &mut next[(o * to[axis] + i) * inner..(o * to[axis] + i + 1) * inner];
                for &(j, share) in row {
                    let src = &cur[(o * shape[axis] + j) * inner..(o * shape[axis] + j + 1) * inner];
                    for (d, s) in dst.iter_mut().zip(src) {
                        *d += share * s;
                    }
                }
            }
        }
        cur = next;
        shape[axis] = to[axis];
    }
    cur.into_iter().map(|x| x as f32).collect()
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
            if d > 0.25 {
                1.0
            } else {
                0.0
            }
        })
        .collect()
}

/// (map mass on object pixels, object area share), averaged; (0, 0) — "not measured" —
/// for a real generator's images, whose objects no ShapeWorld background colour marks.
fn stats(maps: &[Vec<f32>], images: &[Image], shapeworld: bool) -> (f64, f64) {
    if !shapeworld {
        return (0.0, 0.0);
    }
    let (mut mass, mut area) = (0.0, 0.0);
    for (m, im) in maps.iter().zip(images) {
        let (a, b) = psm::map_object_mass(m, &foreground_mask(im));
        mass += a as f64;
        area += b as f64;
    }
    let n = maps.len().max(1) as f64;
    (mass / n, area / n)
}

pub struct OnesMap {
    /// ShapeWorld samples (object statistics measurable).
    pub shapeworld: bool,
}

impl MapSource for OnesMap {
    fn name(&self) -> String {
        "ones".into()
    }
    fn maps(&self, images: &[Image], _: &[PromptSpec]) -> Result<MapBatch> {
        let (h, w) = (images[0].h, images[0].w);
        let maps = vec![vec![1.0; h * w]; images.len()];
        let (object_mass, object_area_frac) = stats(&maps, images, self.shapeworld);
        Ok(MapBatch { maps, h, w, t: None, fallbacks: 0, object_mass, object_area_frac })
    }
}

/// Images per backbone forward in [`PsmMap`] (4–8 measured best on 2 cores at 112²).
const BACKBONE_CHUNK: usize = 8;

/// The Perceptual Structuring Module: frozen backbone features → per-image PCA → map.
pub struct PsmMap {
    pub backbone: Box<dyn Backbone>,
    pub cfg: PsmConfig,
    /// ShapeWorld samples (object statistics measurable).
    pub shapeworld: bool,
}

impl MapSource for PsmMap {
    fn name(&self) -> String {
        format!("psm:{}", self.backbone.name())
    }
    fn maps(&self, images: &[Image], _: &[PromptSpec]) -> Result<MapBatch> {
        let (h, w) = (images[0].h, images[0].w);
        // Backbone and PCA chunk by chunk, the chunks side by side on the pool: at 112² a
        // video step's 512 frames in one batch made ~0.6 GB of activations per layer, fresh
        // pages every step; a chunk's stay in cache, and whole chunks in parallel need fewer
        // barriers than op-by-op parallelism (2.0 → 0.8 ms per frame on 2 cores).
        use rayon::prelude::*;
        let per_chunk: Vec<(Vec<Vec<f32>>, usize)> =
            images.par_chunks(BACKBONE_CHUNK).map(|chunk| Ok(psm::allocation_maps(&self.backbone.features(chunk)?, h, w, &self.cfg))).collect::<Result<_>>()?;
        let fallbacks: usize = per_chunk.iter().map(|(_, f)| f).sum();
        let maps: Vec<Vec<f32>> = per_chunk.into_iter().flat_map(|(m, _)| m).collect();
        let (object_mass, object_area_frac) = stats(&maps, images, self.shapeworld);
        Ok(MapBatch { maps, h, w, t: None, fallbacks, object_mass, object_area_frac })
    }
}

/// Build the configured map source, validating backbone and PSM settings up front.
pub fn build(cfg: &Config) -> Result<Box<dyn MapSource>> {
    Ok(match cfg.vipo.map {
        MapKind::Ones => Box::new(OnesMap { shapeworld: !cfg.generator().is_real() }),
        MapKind::Psm => {
            let backbone = crate::backbone::load(&cfg.backbone)?;
            // Probe once so K > D or K > N is reported before training starts.
            let s = cfg.image_size();
            let probe = backbone.features(&[Image::filled(s, s, crate::world::BACKGROUND)])?;
            let f = &probe[0];
            cfg.psm.validate(f.d)?;
            anyhow::ensure!(cfg.psm.k <= f.n(), "psm.k = {} exceeds the {} patches of the {} feature grid", cfg.psm.k, f.n(), backbone.name());
            Box::new(PsmMap { backbone, cfg: cfg.psm.clone(), shapeworld: !cfg.generator().is_real() })
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(maps: Vec<Vec<f32>>, dims: &[usize]) -> MapBatch {
        let (t, h, w) = match dims {
            [h, w] => (None, *h, *w),
            [t, h, w] => (Some(*t), *h, *w),
            _ => unreachable!(),
        };
        MapBatch { maps, h, w, t, fallbacks: 0, object_mass: 0.0, object_area_frac: 0.0 }
    }

    /// A map at image resolution reaches an 8× coarser latent grid as block means, so a
    /// known per-position pattern survives; non-integer factors split cells by area; the
    /// same grid is left alone; video maps resample in time too.
    #[test]
    fn maps_resample_to_the_latent_grid() {
        // 16×16 image map whose 8×8 blocks hold 0, 1, 2, 3 (+ a 0.5 pixel-level checker).
        let mut m = vec![0.0f32; 256];
        for y in 0..16 {
            for x in 0..16 {
                m[y * 16 + x] = ((y / 8) * 2 + x / 8) as f32 + if (x + y) % 2 == 0 { 0.5 } else { -0.5 };
            }
        }
        let mb = batch(vec![m.clone()], &[16, 16]);
        let r = mb.resample(&[2, 2]).unwrap();
        assert_eq!((r.h, r.w, r.t), (2, 2, None));
        for (got, want) in r.maps[0].iter().zip([0.0, 1.0, 2.0, 3.0]) {
            assert!((got - want).abs() < 1e-6, "{:?}", r.maps[0]);
        }
        assert_eq!(mb.resample(&[16, 16]).unwrap().maps, mb.maps);
        // 3 → 2: the middle cell is shared half and half.
        let r = batch(vec![vec![0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0]], &[3, 3]).resample(&[3, 2]).unwrap();
        for (got, want) in r.maps[0].iter().zip([1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0]) {
            assert!((got - want).abs() < 1e-6, "{:?}", r.maps[0]);
        }
        // (t=4, 2, 2) → (2, 1, 1): frame pairs averaged.
        let v: Vec<f32> = (0..16).map(|i| (i / 4) as f32).collect();
        let r = batch(vec![v], &[4, 2, 2]).resample(&[2, 1, 1]).unwrap();
        assert_eq!((r.t, r.h, r.w), (Some(2), 1, 1));
        assert!((r.maps[0][0] - 0.5).abs() < 1e-6 && (r.maps[0][1] - 2.5).abs() < 1e-6, "{:?}", r.maps[0]);
        assert!(mb.resample(&[2, 2, 2]).is_err());
    }
}
