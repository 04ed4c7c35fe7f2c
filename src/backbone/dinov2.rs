//! DINOv2 ViT-S/B/L/g (patch 14) in the Hugging Face `facebook/dinov2-*` safetensors layout,
//! frozen. The feature map is the last layer's patch tokens after the final layernorm, CLS (and
//! register tokens, if any) dropped: at 224 a 16×16 grid of 384/768/1024/1536-d vectors.
//!
//! Input: resized (bilinear, antialiased when shrinking) to `input_size²`, which must be a
//! multiple of 14 (default 224), ImageNet-normalised. The position embeddings, trained on a
//! 37×37 grid (518 px), are resampled **bicubically** to the patch grid exactly as the reference
//! implementation does (`F.interpolate(mode="bicubic", align_corners=False,
//! scale_factor=(g + 0.1)/37)`, A = −0.75, edge-clamped taps). candle-transformers' DINOv2
//! uses non-integer nearest interpolation instead, which breaks at 224.

use super::ops::{self, IMAGENET_MEAN, IMAGENET_STD};
use super::{Backbone, FeatureMap};
use crate::image::Image;
use crate::weights::pth::Weights;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Module, Tensor, D};
use candle_nn::{LayerNorm, Linear};

const PATCH: usize = 14;
const LN_EPS: f64 = 1e-6;
/// DINOv2's `interpolate_offset`: a scale-factor nudge that avoids floating-point rounding of
/// the output size; it also shifts the sampling positions slightly, so we reproduce it.
const INTERPOLATE_OFFSET: f64 = 0.1;

/// The published DINOv2 sizes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Variant {
    S,
    B,
    L,
    G,
}

impl Variant {
    /// From a backbone name `dinov2_s|b|l|g` (also `dinov2_small|base|large|giant`).
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "dinov2_s" | "dinov2_small" => Variant::S,
            "dinov2_b" | "dinov2_base" => Variant::B,
            "dinov2_l" | "dinov2_large" => Variant::L,
            "dinov2_g" | "dinov2_giant" => Variant::G,
            _ => return None,
        })
    }
    /// (hidden size, layers, heads)
    pub fn dims(self) -> (usize, usize, usize) {
        match self {
            Variant::S => (384, 12, 6),
            Variant::B => (768, 12, 12),
            Variant::L => (1024, 24, 16),
            Variant::G => (1536, 40, 24),
        }
    }
}

enum Mlp {
    Gelu {
        fc1: Linear,
        fc2: Linear,
    },
    /// ViT-g: `weights_in` → split → silu(x1)·x2 → `weights_out`.
    SwiGlu {
        w_in: Linear,
        w_out: Linear,
    },
}

struct Layer {
    norm1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    ls1: Tensor,
    norm2: LayerNorm,
    mlp: Mlp,
    ls2: Tensor,
}

/// Frozen DINOv2 returning last-layer patch tokens.
pub struct Dinov2 {
    name: String,
    dim: usize,
    heads: usize,
    cls: Tensor,
    registers: Option<Tensor>,
    /// (1, 1 + G², D) as trained.
    pos: Tensor,
    pos_grid: usize,
    proj_w: Tensor,
    proj_b: Tensor,
    layers: Vec<Layer>,
    norm: LayerNorm,
    input_size: usize,
    device: Device,
}

fn linear(w: &Weights, p: &str, out: usize, inp: usize) -> Result<Linear> {
    Ok(Linear::new(w.get(&format!("{p}.weight"), &[out, inp])?, Some(w.get(&format!("{p}.bias"), &[out])?)))
}

fn layer_norm(w: &Weights, p: &str, d: usize) -> Result<LayerNorm> {
    Ok(LayerNorm::new(w.get(&format!("{p}.weight"), &[d])?, w.get(&format!("{p}.bias"), &[d])?, LN_EPS))
}

impl Dinov2 {
    /// Builds the model from HF-layout weights, checking every tensor (name and shape).
    /// `expect`, when given, pins hidden size / depth / heads to a published variant so that
    /// e.g. ViT-B weights configured as `dinov2_s` fail here; `heads` is used otherwise.
    pub fn new(w: &Weights, name: &str, expect: Option<Variant>, heads: usize, input_size: usize) -> Result<Self> {
        let file = w.path.display();
        if input_size == 0 || !input_size.is_multiple_of(PATCH) {
            bail!("{name}: input_size {input_size} must be a positive multiple of the patch size 14 (e.g. 224)");
        }
        let cls = w.get_any("embeddings.cls_token")?;
        let dim = match cls.dims() {
            [1, 1, d] => *d,
            s => bail!("{file}: tensor `embeddings.cls_token` has shape {s:?}, expected [1, 1, D]"),
        };
        let layers_n = (0..).take_while(|i| w.contains(&format!("encoder.layer.{i}.norm1.weight"))).count();
        let heads = match expect {
            Some(v) => {
                let (d, l, h) = v.dims();
                if dim != d {
                    bail!("{file}: tensor `embeddings.cls_token` has width {dim}, but {name} has {d} (weights for another DINOv2 size?)");
                }
                if layers_n != l {
                    bail!("{file}: found {layers_n} layers `encoder.layer.N`, but {name} has {l} (weights for another DINOv2 size?)");
                }
                h
            }
            None => heads,
        };
        if layers_n == 0 {
            bail!("{file}: tensor `encoder.layer.0.norm1.weight` is missing (not a DINOv2 checkpoint?)");
        }
        if heads == 0 || dim % heads != 0 {
            bail!("{name}: hidden size {dim} is not divisible into {heads} heads");
        }
        w.get("embeddings.mask_token", &[1, dim])?; // part of the layout; unused for features
        let pos = w.get_any("embeddings.position_embeddings")?;
        let n_pos = match pos.dims() {
            [1, n, d] if *d == dim && *n > 1 => n - 1,
            s => bail!("{file}: tensor `embeddings.position_embeddings` has shape {s:?}, expected [1, 1 + G², {dim}]"),
        };
        let pos_grid = (n_pos as f64).sqrt().round() as usize;
        if pos_grid * pos_grid != n_pos {
            bail!("{file}: tensor `embeddings.position_embeddings` holds {n_pos} patch positions, not a square grid");
        }
        let registers = if w.contains("embeddings.register_tokens") {
            let r = w.get_any("embeddings.register_tokens")?;
            match r.dims() {
                [1, _, d] if *d == dim => Some(r),
                s => bail!("{file}: tensor `embeddings.register_tokens` has shape {s:?}, expected [1, R, {dim}]"),
            }
        } else {
            None
        };
        let proj_w = w.get("embeddings.patch_embeddings.projection.weight", &[dim, 3, PATCH, PATCH])?;
        let proj_b = w.get("embeddings.patch_embeddings.projection.bias", &[dim])?;
        let mut layers = Vec::with_capacity(layers_n);
        for i in 0..layers_n {
            let p = format!("encoder.layer.{i}");
            let mlp = if w.contains(&format!("{p}.mlp.weights_in.weight")) {
                let win = w.get_any(&format!("{p}.mlp.weights_in.weight"))?;
                let hid2 = win.dim(0)?;
                if hid2 % 2 != 0 {
                    bail!("{file}: tensor `{p}.mlp.weights_in.weight` has an odd output width {hid2}");
                }
                Mlp::SwiGlu { w_in: linear(w, &format!("{p}.mlp.weights_in"), hid2, dim)?, w_out: linear(w, &format!("{p}.mlp.weights_out"), dim, hid2 / 2)? }
            } else {
                let hid = w.get_any(&format!("{p}.mlp.fc1.weight"))?.dim(0)?;
                Mlp::Gelu { fc1: linear(w, &format!("{p}.mlp.fc1"), hid, dim)?, fc2: linear(w, &format!("{p}.mlp.fc2"), dim, hid)? }
            };
            let a = format!("{p}.attention");
            layers.push(Layer {
                norm1: layer_norm(w, &format!("{p}.norm1"), dim)?,
                q: linear(w, &format!("{a}.attention.query"), dim, dim)?,
                k: linear(w, &format!("{a}.attention.key"), dim, dim)?,
                v: linear(w, &format!("{a}.attention.value"), dim, dim)?,
                out: linear(w, &format!("{a}.output.dense"), dim, dim)?,
                ls1: w.get(&format!("{p}.layer_scale1.lambda1"), &[dim])?,
                norm2: layer_norm(w, &format!("{p}.norm2"), dim)?,
                mlp,
                ls2: w.get(&format!("{p}.layer_scale2.lambda1"), &[dim])?,
            });
        }
        let norm = layer_norm(w, "layernorm", dim)?;
        Ok(Self { name: name.to_string(), dim, heads, cls, registers, pos, pos_grid, proj_w, proj_b, layers, norm, input_size, device: Device::Cpu })
    }

    /// Loads HF-layout weights (`.safetensors`, or a `.pth`/`.bin` with the same names).
    pub fn load(path: &std::path::Path, variant: Variant, name: &str, input_size: usize) -> Result<Self> {
        Self::new(&Weights::open(path)?, name, Some(variant), variant.dims().2, input_size).with_context(|| format!("{}: cannot build {name}", path.display()))
    }

    /// Any DINOv2 size (width and depth from the tensors, `heads` from the model's config).
    pub fn load_any(path: &std::path::Path, name: &str, heads: usize, input_size: usize) -> Result<Self> {
        Self::new(&Weights::open(path)?, name, None, heads, input_size).with_context(|| format!("{}: cannot build {name}", path.display()))
    }

    /// Position embeddings for a `g × g` patch grid: (1, 1 + g², D).
    fn pos_embed(&self, g: usize) -> Result<Tensor> {
        if g == self.pos_grid {
            return Ok(self.pos.clone());
        }
        let cls = self.pos.narrow(1, 0, 1)?;
        let grid = self.pos.narrow(1, 1, self.pos_grid * self.pos_grid)?.squeeze(0)?; // (G², D)
        let v = grid.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let scale = self.pos_grid as f64 / (g as f64 + INTERPOLATE_OFFSET);
        let out = bicubic_resize_hwc(&v, self.pos_grid, self.pos_grid, self.dim, g, g, scale, scale);
        let grid = Tensor::from_vec(out, (1, g * g, self.dim), &self.device)?;
        Ok(Tensor::cat(&[cls, grid], 1)?)
    }

    /// Final-layernormed last-layer tokens of a normalised `(B, 3, S, S)` batch, patches only:
    /// `(B, g², D)` with g = S / 14.
    pub fn forward_patches(&self, x: &Tensor) -> Result<(Tensor, usize)> {
        let (b, _, s, _) = x.dims4()?;
        let g = s / PATCH;
        let p = x.conv2d(&self.proj_w, 0, PATCH, 1, 1)?.broadcast_add(&self.proj_b.reshape((1, (), 1, 1))?)?;
        let p = p.flatten_from(2)?.transpose(1, 2)?; // (B, g², D)
        let cls = self.cls.broadcast_as((b, 1, self.dim))?;
        let mut h = Tensor::cat(&[cls, p], 1)?.broadcast_add(&self.pos_embed(g)?)?;
        let mut extra = 1;
        if let Some(r) = &self.registers {
            // Register tokens carry no position embedding; they sit between CLS and the patches.
            let nr = r.dim(1)?;
            let r = r.broadcast_as((b, nr, self.dim))?;
            h = Tensor::cat(&[h.narrow(1, 0, 1)?, r, h.narrow(1, 1, g * g)?], 1)?;
            extra += nr;
        }
        for layer in &self.layers {
            h = self.block(layer, &h)?;
        }
        let h = self.norm.forward(&h)?;
        Ok((h.narrow(1, extra, g * g)?, g))
    }

    fn block(&self, l: &Layer, x: &Tensor) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let (nh, dh) = (self.heads, d / self.heads);
        let y = l.norm1.forward(x)?;
        let split = |t_: Tensor| -> Result<Tensor> { Ok(t_.reshape((b, t, nh, dh))?.transpose(1, 2)?.contiguous()?) };
        let q = (split(l.q.forward(&y)?)? * (1.0 / (dh as f64).sqrt()))?;
        let k = split(l.k.forward(&y)?)?;
        let v = split(l.v.forward(&y)?)?;
        let att = candle_nn::ops::softmax_last_dim(&q.matmul(&k.t()?)?)?; // frozen: fused kernel is fine
        let ctx = att.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d))?;
        let x = (x + l.out.forward(&ctx)?.broadcast_mul(&l.ls1)?)?;
        let y = l.norm2.forward(&x)?;
        let y = match &l.mlp {
            Mlp::Gelu { fc1, fc2 } => fc2.forward(&fc1.forward(&y)?.gelu_erf()?)?,
            Mlp::SwiGlu { w_in, w_out } => {
                let hcat = w_in.forward(&y)?;
                let half = hcat.dim(D::Minus1)? / 2;
                let (x1, x2) = (hcat.narrow(D::Minus1, 0, half)?, hcat.narrow(D::Minus1, half, half)?);
                w_out.forward(&(candle_nn::ops::silu(&x1)? * x2)?)?
            }
        };
        Ok((x + y.broadcast_mul(&l.ls2)?)?)
    }
}

impl Backbone for Dinov2 {
    fn name(&self) -> String {
        format!("{}:last@{}", self.name, self.input_size)
    }
    fn features(&self, images: &[Image]) -> Result<Vec<FeatureMap>> {
        let x = ops::batch_tensor(images, self.input_size, IMAGENET_MEAN, IMAGENET_STD, &self.device)?;
        let (tokens, g) = self.forward_patches(&x)?;
        ops::tokens_to_maps(&tokens, g, g)
    }
}

/// torch's cubic convolution weights (A = −0.75) for fractional offset `t`, taps −1, 0, 1, 2.
fn cubic_weights(t: f64) -> [f64; 4] {
    const A: f64 = -0.75;
    let near = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0; // |x| ≤ 1
    let far = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A; // 1 < |x| < 2
    [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)]
}

/// Bicubic resampling of an `h × w × c` (channels-last) grid to `oh × ow × c`, matching
/// `torch.nn.functional.interpolate(mode="bicubic", align_corners=False)` where the source
/// coordinate is `scale·(dst + 0.5) − 0.5` (not clamped) and out-of-range taps clamp to the edge.
#[allow(clippy::too_many_arguments)] // two shapes and two scales; a struct would add nothing
pub fn bicubic_resize_hwc(v: &[f32], h: usize, w: usize, c: usize, oh: usize, ow: usize, scale_h: f64, scale_w: f64) -> Vec<f32> {
    let taps = |n_in: usize, n_out: usize, scale: f64| -> Vec<([usize; 4], [f64; 4])> {
        (0..n_out)
            .map(|o| {
                let real = scale * (o as f64 + 0.5) - 0.5;
                let i0 = real.floor();
                let t = real - i0;
                let idx = [-1i64, 0, 1, 2].map(|k| (i0 as i64 + k).clamp(0, n_in as i64 - 1) as usize);
                (idx, cubic_weights(t))
            })
            .collect()
    };
    let (ty, tx) = (taps(h, oh, scale_h), taps(w, ow, scale_w));
    let mut out = vec![0f32; oh * ow * c];
    let mut acc = vec![0f64; c];
    for (oy, (iy, wy)) in ty.iter().enumerate() {
        for (ox, (ix, wx)) in tx.iter().enumerate() {
            acc.iter_mut().for_each(|a| *a = 0.0);
            for a in 0..4 {
                for b in 0..4 {
                    let wgt = wy[a] * wx[b];
                    let src = &v[(iy[a] * w + ix[b]) * c..][..c];
                    acc.iter_mut().zip(src).for_each(|(s, &x)| *s += wgt * x as f64);
                }
            }
            out[(oy * ow + ox) * c..][..c].iter_mut().zip(&acc).for_each(|(o, &a)| *o = a as f32);
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::path::Path;

    /// A random checkpoint in the HF layout with a small width and depth but the real 37×37
    /// position grid; `swiglu` switches to ViT-g's MLP names.
    fn random_checkpoint(dim: usize, layers: usize, swiglu: bool) -> HashMap<String, Tensor> {
        let dev = Device::Cpu;
        let r = |shape: &[usize], s: f64| (Tensor::randn(0f32, 1.0, shape, &dev).unwrap() * s).unwrap();
        let mut m = HashMap::new();
        m.insert("embeddings.cls_token".to_string(), r(&[1, 1, dim], 1.0));
        m.insert("embeddings.mask_token".to_string(), r(&[1, dim], 0.0));
        m.insert("embeddings.position_embeddings".to_string(), r(&[1, 1 + 37 * 37, dim], 0.5));
        m.insert("embeddings.patch_embeddings.projection.weight".to_string(), r(&[dim, 3, 14, 14], 0.05));
        m.insert("embeddings.patch_embeddings.projection.bias".to_string(), r(&[dim], 0.1));
        let lin = |m: &mut HashMap<String, Tensor>, p: String, o: usize, i: usize| {
            m.insert(format!("{p}.weight"), r(&[o, i], 1.0 / (i as f64).sqrt()));
            m.insert(format!("{p}.bias"), r(&[o], 0.1));
        };
        for l in 0..layers {
            let p = format!("encoder.layer.{l}");
            for n in ["norm1", "norm2"] {
                m.insert(format!("{p}.{n}.weight"), Tensor::ones(dim, candle_core::DType::F32, &dev).unwrap());
                m.insert(format!("{p}.{n}.bias"), Tensor::zeros(dim, candle_core::DType::F32, &dev).unwrap());
            }
            for n in ["query", "key", "value"] {
                lin(&mut m, format!("{p}.attention.attention.{n}"), dim, dim);
            }
            lin(&mut m, format!("{p}.attention.output.dense"), dim, dim);
            if swiglu {
                lin(&mut m, format!("{p}.mlp.weights_in"), 2 * 2 * dim, dim);
                lin(&mut m, format!("{p}.mlp.weights_out"), dim, 2 * dim);
            } else {
                lin(&mut m, format!("{p}.mlp.fc1"), 4 * dim, dim);
                lin(&mut m, format!("{p}.mlp.fc2"), dim, 4 * dim);
            }
            m.insert(format!("{p}.layer_scale1.lambda1"), Tensor::full(0.5f32, dim, &dev).unwrap());
            m.insert(format!("{p}.layer_scale2.lambda1"), Tensor::full(0.5f32, dim, &dev).unwrap());
        }
        m.insert("layernorm.weight".to_string(), Tensor::ones(dim, candle_core::DType::F32, &dev).unwrap());
        m.insert("layernorm.bias".to_string(), Tensor::zeros(dim, candle_core::DType::F32, &dev).unwrap());
        m
    }

    fn img(k: usize) -> Image {
        let mut im = Image::filled(32, 32, [0.2, 0.2, 0.2]);
        for y in 10..22 {
            for x in k..k + 12 {
                im.set(0, y, x, 1.0);
            }
        }
        im
    }

    #[test]
    fn cubic_weights_match_torch_and_reproduce_linear_ramps() {
        // torch's bicubic taps at t = 0.5 with A = −0.75.
        let w = cubic_weights(0.5);
        for (a, b) in w.iter().zip([-0.09375, 0.59375, 0.59375, -0.09375]) {
            assert!((a - b).abs() < 1e-12, "{w:?}");
        }
        assert_eq!(cubic_weights(0.0), [0.0, 1.0, 0.0, 0.0]);
        // Partition of unity for every offset; constants survive resampling.
        for t in [0.0, 0.1, 0.37, 0.5, 0.93] {
            assert!((cubic_weights(t).iter().sum::<f64>() - 1.0).abs() < 1e-12);
        }
        let flat = vec![0.25f32; 37 * 37 * 2];
        let out = bicubic_resize_hwc(&flat, 37, 37, 2, 16, 16, 37.0 / 16.1, 37.0 / 16.1);
        assert!(out.iter().all(|v| (v - 0.25).abs() < 1e-6));
        // A = −0.75 does not reproduce ramps exactly (only A = −0.5 would), but stays close and
        // monotone; the sample positions follow scale·(o + 0.5) − 0.5.
        let ramp: Vec<f32> = (0..37).map(|x| x as f32).collect();
        let out = bicubic_resize_hwc(&ramp, 1, 37, 1, 1, 16, 1.0, 37.0 / 16.1);
        for (o, v) in out.iter().enumerate().skip(1).take(14) {
            let expect = (37.0 / 16.1) * (o as f64 + 0.5) - 0.5;
            assert!((*v as f64 - expect).abs() < 0.05, "{o}: {v} vs {expect}");
        }
        assert!(out.windows(2).all(|p| p[1] > p[0]));
        // Same size and unit scale is the identity.
        let v: Vec<f32> = (0..2 * 3 * 4).map(|i| (i as f32).sin()).collect();
        let same = bicubic_resize_hwc(&v, 2, 3, 4, 2, 3, 1.0, 1.0);
        assert!(v.iter().zip(&same).all(|(a, b)| (a - b).abs() < 1e-6));
    }

    #[test]
    fn random_hf_checkpoint_gives_patch_grid_features() {
        for swiglu in [false, true] {
            let w = Weights::from_map(Path::new("dino.safetensors"), random_checkpoint(32, 2, swiglu));
            let m = Dinov2::new(&w, "dinov2_test", None, 2, 112).unwrap();
            let f = m.features(&[img(2), img(14)]).unwrap();
            assert_eq!((f.len(), f[0].h, f[0].w, f[0].d), (2, 8, 8, 32));
            // Final layernorm (weight 1, bias 0): every token has ~zero mean and unit variance.
            let row = f[0].row(5);
            let mean = row.iter().sum::<f32>() / 32.0;
            let var = row.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / 32.0;
            assert!(mean.abs() < 1e-4 && (var - 1.0).abs() < 1e-2, "{mean} {var}");
            assert_ne!(f[0], f[1]);
            // At 518 px the trained 37×37 grid is used as is.
            let m = Dinov2::new(&w, "dinov2_test", None, 2, 518).unwrap();
            assert_eq!(m.pos_embed(37).unwrap().dims(), &[1, 1 + 37 * 37, 32]);
            assert_eq!(m.pos_embed(16).unwrap().dims(), &[1, 1 + 16 * 16, 32]);
        }
    }

    /// A DINOv2 model folder in the HF layout, with the config.json of `heads` heads.
    pub(crate) fn write_tiny_folder(dir: &Path, dim: usize, layers: usize, heads: usize) {
        std::fs::create_dir_all(dir).unwrap();
        crate::weights::tensors::save_tensors(&random_checkpoint(dim, layers, false), &dir.join("model.safetensors")).unwrap();
        std::fs::write(dir.join("config.json"), format!(r#"{{"model_type": "dinov2", "hidden_size": {dim}, "num_hidden_layers": {layers}, "num_attention_heads": {heads}}}"#)).unwrap();
    }

    /// `backbone.weights` as a model folder or the file in it; `dinov2` takes its size from
    /// config.json, a named size is checked against the tensors.
    #[test]
    fn loads_from_a_model_folder_or_the_hf_cache() {
        let d = tempfile::tempdir().unwrap();
        let snap = d.path().join("dinov2-tiny");
        write_tiny_folder(&snap, 32, 2, 4);
        let cfg = |name: &str, w: &str| crate::backbone::BackboneConfig { name: name.into(), tap: "last".into(), weights: Some(w.into()), input_size: 28, pad: 0 };
        let f = crate::backbone::load(&cfg("dinov2", snap.to_str().unwrap())).unwrap().features(&[img(2)]).unwrap();
        assert_eq!((f[0].h, f[0].w, f[0].d), (2, 2, 32));
        // A ViT has no zero padding to hide: `backbone.pad` (default 2) is ignored.
        let padded = crate::backbone::BackboneConfig { pad: 2, ..cfg("dinov2", snap.to_str().unwrap()) };
        let b = crate::backbone::load(&padded).unwrap();
        assert!(!b.name().contains("pad"), "{}", b.name());
        assert_eq!(b.features(&[img(2)]).unwrap(), f);
        // (Repository ids resolve through hf::resolve, tested in hf.rs; the environment
        // variable is not set here, tests run in parallel.)
        assert!(crate::backbone::load(&cfg("dinov2", snap.join("model.safetensors").to_str().unwrap())).is_ok());
        let e = format!("{:#}", crate::backbone::load(&cfg("dinov2_b", snap.to_str().unwrap())).err().unwrap());
        assert!(e.contains("768"), "{e}");
        std::fs::remove_file(snap.join("config.json")).unwrap();
        let e = format!("{:#}", crate::backbone::load(&cfg("dinov2", snap.to_str().unwrap())).err().unwrap());
        assert!(e.contains("config.json") && e.contains("dinov2_s"), "{e}");
    }

    #[test]
    fn wrong_sizes_and_missing_tensors_are_named() {
        let sd = random_checkpoint(32, 2, false);
        let w = Weights::from_map(Path::new("d.safetensors"), sd.clone());
        let e = format!("{:#}", Dinov2::new(&w, "dinov2_s", Some(Variant::S), 6, 224).err().unwrap());
        assert!(e.contains("d.safetensors") && e.contains("embeddings.cls_token") && e.contains("384"), "{e}");
        let e = format!("{:#}", Dinov2::new(&w, "dinov2_test", None, 2, 100).err().unwrap());
        assert!(e.contains("multiple of the patch size"), "{e}");
        let mut bad = sd;
        bad.remove("encoder.layer.1.attention.attention.value.bias");
        let e = format!("{:#}", Dinov2::new(&Weights::from_map(Path::new("d.pth"), bad), "t", None, 2, 224).err().unwrap());
        assert!(e.contains("d.pth") && e.contains("encoder.layer.1.attention.attention.value.bias"), "{e}");
    }

    /// Forward timing of a random ViT-S/14 (real size) at 224 on a batch of 16:
    /// `cargo test --release --lib dinov2::tests::timings -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn timings() {
        let w = Weights::from_map(Path::new("random"), random_checkpoint(384, 12, false));
        let images: Vec<Image> = (0..16).map(|i| img(i % 20)).collect();
        for size in [224, 112] {
            let m = Dinov2::new(&w, "dinov2_s", Some(Variant::S), 6, size).unwrap();
            m.features(&images).unwrap();
            let t = std::time::Instant::now();
            m.features(&images).unwrap();
            println!("{}: {:.0} ms per batch of 16", m.name(), t.elapsed().as_secs_f64() * 1e3);
        }
    }
}
