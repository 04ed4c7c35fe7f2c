//! Frozen vision backbones for the PSM: batch of RGB images → spatial feature maps.
//! One file per backbone; none of them is ever in the autograd graph.

pub mod context_pad;
pub mod dinov2;
pub mod mobilenet_v2;
pub mod ops;
pub mod resnet;

use crate::image::Image;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// One image's spatial features: an h×w grid of d-dimensional vectors, row-major
/// (`data[(y*w + x)*d + k]`), i.e. the N×D patch-feature matrix of docs/DESIGN.md §1.3.
#[derive(Clone, Debug, PartialEq)]
pub struct FeatureMap {
    pub h: usize,
    pub w: usize,
    pub d: usize,
    pub data: Vec<f32>,
}

impl FeatureMap {
    pub fn n(&self) -> usize {
        self.h * self.w
    }
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.d..(i + 1) * self.d]
    }
}

pub trait Backbone: Send + Sync {
    /// Human-readable identity, e.g. "mobilenet_v2:features.13@224".
    fn name(&self) -> String;
    /// Features for each image (frozen forward pass; no gradients).
    fn features(&self, images: &[Image]) -> anyhow::Result<Vec<FeatureMap>>;
}

/// Which frozen backbone the PSM uses, which layer it taps and at what input resolution.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackboneConfig {
    /// "mobilenet_v2" (offline default, weights ship in `weights/`), "resnet18", "resnet34",
    /// "resnet50", "resnet101", "resnet152" (torchvision layout), "dinov2_s", "dinov2_b",
    /// "dinov2_l", "dinov2_g" (Hugging Face `facebook/dinov2-*` layout, size checked), or
    /// "dinov2" (any size, read from the model folder's config.json).
    pub name: String,
    /// Layer whose output is the feature map: "features.K" (K = 0..=18) for MobileNetV2,
    /// "layer1".."layer4" for ResNet, "last" for DINOv2 (final-layernormed last-layer patch
    /// tokens, CLS and register tokens dropped).
    pub tap: String,
    /// Weights file (.safetensors or .pth). Default for mobilenet_v2: `mobilenet_v2.safetensors`
    /// in `$VIPO_WEIGHTS` if set, else in the crate's `weights/` directory; required otherwise.
    /// DINOv2 also takes its Hugging Face folder or repository id (`facebook/dinov2-base`,
    /// looked up in the local cache).
    pub weights: Option<PathBuf>,
    /// Images are resized (bilinear, antialiased when shrinking) to input_size × input_size.
    /// 224 is the ImageNet resolution; 112 is ~4× faster with a 2× coarser grid. DINOv2 needs a
    /// multiple of 14.
    pub input_size: usize,
    /// Context padding, in feature-grid cells per side: the resized image is extended by
    /// reflection, the network runs on the larger input, and the extra cells are cropped off,
    /// so the map's border cells see image content instead of the network's zero padding.
    /// 0 = off (the released recipe). Default 2: on ShapeWorld rollout samples MobileNetV2's
    /// zero padding otherwise lights a frame around every map (bench/NOTES.md §5.1). With
    /// pad > 0, input_size must be a multiple of the tap's stride (MobileNetV2 features.K:
    /// 2, 4, 8, 16 or 32; ResNet layerL: 4·2^(L−1)). DINOv2, a ViT without zero padding,
    /// ignores it. Costs ((input_size + 2·pad·stride) / input_size)² the backbone time
    /// (1.65× at the default 112 px, features.6).
    pub pad: usize,
}

impl Default for BackboneConfig {
    fn default() -> Self {
        Self { name: "mobilenet_v2".into(), tap: "features.6".into(), weights: None, input_size: 112, pad: 2 }
    }
}

/// Where a weights file shipped with vipo is looked up: `$VIPO_WEIGHTS/<file>` when the
/// variable is set, else `<crate>/weights/<file>`.
pub fn default_weights(file: &str) -> PathBuf {
    match std::env::var_os("VIPO_WEIGHTS") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir).join(file),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("weights").join(file),
    }
}

/// DINOv2 weights given as a file, a Hugging Face model folder, or a repository id in the
/// local Hugging Face cache (`facebook/dinov2-base`): the safetensors (or .pth) file and
/// the head count from the `config.json` beside it, when there is one.
fn dinov2_files(spec: &std::path::Path) -> Result<(PathBuf, Option<usize>)> {
    let path = crate::weights::hf::resolve(&spec.to_string_lossy())?;
    let file = if path.is_dir() {
        let files = crate::weights::hf::component_files(&path, "")?;
        anyhow::ensure!(files.len() == 1, "{}: DINOv2 weights in {} shards; vipo reads one file", path.display(), files.len());
        files[0].clone()
    } else {
        path
    };
    let config = file.parent().map(|d| d.join("config.json")).filter(|c| c.is_file());
    let heads = match config {
        Some(c) => Some(crate::weights::hf::read_json(&c)?["num_attention_heads"].as_u64().with_context(|| format!("{}: no num_attention_heads", c.display()))? as usize),
        None => None,
    };
    Ok((file, heads))
}

/// Builds the configured backbone. The name, tap and input size are checked first, then
/// every tensor of the weights file (name and shape), so a wrong architecture fails here,
/// naming the file and the tensor, before any image is processed.
pub fn load(cfg: &BackboneConfig) -> Result<Box<dyn Backbone>> {
    match (cfg.pad, cnn_stride(cfg)?) {
        (cells @ 1.., Some(stride)) => Ok(Box::new(context_pad::ContextPad::new(cfg.input_size, cells, stride, |size| load_at(cfg, size))?)),
        _ => load_at(cfg, cfg.input_size),
    }
}

/// Network-input pixels per feature-grid cell at the configured tap of a CNN; None for
/// DINOv2, a ViT without zero padding (so `pad` has no frame to remove and is ignored), and
/// for names `load_at` rejects.
fn cnn_stride(cfg: &BackboneConfig) -> Result<Option<usize>> {
    Ok(match cfg.name.as_str() {
        "mobilenet_v2" => Some(mobilenet_v2::tap_stride(mobilenet_v2::parse_tap(&cfg.tap)?)),
        name if resnet::Depth::from_name(name).is_some() => Some(resnet::tap_stride(resnet::parse_tap(&cfg.tap)?)),
        _ => None,
    })
}

/// The configured backbone, built for `input_size` network-input pixels.
fn load_at(cfg: &BackboneConfig, input_size: usize) -> Result<Box<dyn Backbone>> {
    let need_weights = || -> Result<PathBuf> {
        match &cfg.weights {
            Some(p) => Ok(p.clone()),
            None => bail!("backbone `{}` has no bundled weights: set backbone.weights to its .safetensors or .pth file", cfg.name),
        }
    };
    match cfg.name.as_str() {
        name if resnet::Depth::from_name(name).is_some() => {
            let depth = resnet::Depth::from_name(name).unwrap_or(resnet::Depth::R18);
            let tap = resnet::parse_tap(&cfg.tap)?;
            Ok(Box::new(resnet::ResNet::load(&need_weights()?, depth, tap, input_size)?))
        }
        name if name == "dinov2" || dinov2::Variant::from_name(name).is_some() => {
            if cfg.tap != "last" {
                bail!("{name}: unknown tap `{}` (DINOv2 exposes `last`: final-layernormed last-layer patch tokens)", cfg.tap);
            }
            if input_size == 0 || !input_size.is_multiple_of(14) {
                bail!("{name}: input_size {} must be a multiple of the patch size 14 (e.g. 224)", input_size);
            }
            let (file, heads) = dinov2_files(&need_weights()?)?;
            Ok(Box::new(match dinov2::Variant::from_name(name) {
                Some(variant) => dinov2::Dinov2::load(&file, variant, name, input_size)?,
                None => {
                    let heads = heads.with_context(|| format!("backbone.name = \"dinov2\": the size comes from the model's config.json (num_attention_heads), and there is none beside {}; name the size instead (dinov2_s, dinov2_b, dinov2_l, dinov2_g)", file.display()))?;
                    dinov2::Dinov2::load_any(&file, name, heads, input_size)?
                }
            }))
        }
        "mobilenet_v2" => {
            let tap = mobilenet_v2::parse_tap(&cfg.tap)?;
            let path = cfg.weights.clone().unwrap_or_else(|| default_weights("mobilenet_v2.safetensors"));
            if !path.exists() {
                bail!("{}: MobileNetV2 weights not found (set backbone.weights or VIPO_WEIGHTS; see weights/PROVENANCE.md)", path.display());
            }
            Ok(Box::new(mobilenet_v2::MobileNetV2::load(&path, tap, input_size)?))
        }
        other => bail!("unknown backbone `{other}` (known: mobilenet_v2, resnet18, resnet34, resnet50, resnet101, resnet152, dinov2_s, dinov2_b, dinov2_l, dinov2_g, dinov2)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factory_defaults_and_errors() {
        let cfg = BackboneConfig::default();
        let toml_cfg: BackboneConfig = toml::from_str("input_size = 112").unwrap();
        assert_eq!(toml_cfg, BackboneConfig { input_size: 112, ..cfg.clone() });
        assert!(toml::from_str::<BackboneConfig>("inputsize = 112").is_err());

        let b = load(&BackboneConfig { input_size: 64, tap: "features.13".into(), ..cfg.clone() }).unwrap();
        assert_eq!(b.name(), "mobilenet_v2:features.13@64+pad2");
        let f = b.features(&[Image::filled(32, 32, [0.5, 0.2, 0.1])]).unwrap();
        assert_eq!((f[0].h, f[0].w, f[0].d), (4, 4, 96));

        let err = |c: BackboneConfig| format!("{:#}", load(&c).err().unwrap());
        let e = err(BackboneConfig { name: "vgg16".into(), ..cfg.clone() });
        assert!(e.contains("vgg16") && e.contains("mobilenet_v2"), "{e}");
        let e = err(BackboneConfig { tap: "layer3".into(), ..cfg.clone() });
        assert!(e.contains("layer3") && e.contains("features.18"), "{e}");
        let e = err(BackboneConfig { name: "resnet50".into(), tap: "layer3".into(), ..cfg.clone() });
        assert!(e.contains("resnet50") && e.contains("weights"), "{e}");
        let e = err(BackboneConfig { name: "resnet50".into(), ..cfg.clone() });
        assert!(e.contains("features.6") && e.contains("layer4"), "{e}");
        let e = err(BackboneConfig { name: "dinov2_b".into(), ..cfg.clone() });
        assert!(e.contains("features.6") && e.contains("last"), "{e}");
        let e = err(BackboneConfig { name: "dinov2_b".into(), tap: "last".into(), input_size: 100, ..cfg.clone() });
        assert!(e.contains("multiple"), "{e}");
        let e = err(BackboneConfig { name: "dinov2_g".into(), tap: "last".into(), ..cfg.clone() });
        assert!(e.contains("dinov2_g") && e.contains("weights"), "{e}");
        let e = err(BackboneConfig { weights: Some("/nonexistent/w.safetensors".into()), ..cfg.clone() });
        assert!(e.contains("/nonexistent/w.safetensors"), "{e}");

        // A weights file for another architecture fails at load, naming file and tensor.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("other.safetensors");
        let t = candle_core::Tensor::zeros((8, 3, 3, 3), candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
        candle_core::safetensors::save(&std::collections::HashMap::from([("conv1.weight".to_string(), t)]), &path).unwrap();
        let e = err(BackboneConfig { weights: Some(path.clone()), ..cfg.clone() });
        assert!(e.contains("other.safetensors") && e.contains("features.0.0.weight"), "{e}");
    }

    /// Context padding keeps the grid of the unpadded input, and on a plain image removes
    /// most of the border-vs-interior difference that the network's zero padding makes
    /// (the frame the PCA would otherwise light up).
    #[test]
    fn context_padding_keeps_the_grid_and_flattens_a_plain_image() {
        let img = Image::filled(32, 32, [0.06, 0.05, 0.08]);
        let spread = |pad: usize| {
            let b = load(&BackboneConfig { pad, ..Default::default() }).unwrap();
            assert_eq!(b.name(), if pad == 0 { "mobilenet_v2:features.6@112".to_string() } else { format!("mobilenet_v2:features.6@112+pad{pad}") });
            let f = &b.features(std::slice::from_ref(&img)).unwrap()[0];
            assert_eq!((f.h, f.w), (14, 14));
            let c = f.row(7 * 14 + 7);
            let norm = c.iter().map(|v| v * v).sum::<f32>().sqrt();
            (0..f.n()).map(|i| f.row(i).iter().zip(c).map(|(a, b)| (a - b).powi(2)).sum::<f32>().sqrt()).fold(0f32, f32::max) / norm
        };
        let (s0, s1, s2) = (spread(0), spread(1), spread(2));
        eprintln!("largest cell distance from the centre ÷ its norm: pad 0 {s0:.3}, pad 1 {s1:.3}, pad 2 {s2:.3}");
        assert!(s1 < s0 && s2 < 0.25 * s0, "pad 0 {s0}, pad 1 {s1}, pad 2 {s2}");

        // Whole cells only: the input side must be a multiple of the tap's stride (8 here).
        let e = format!("{:#}", load(&BackboneConfig { input_size: 100, pad: 1, ..Default::default() }).err().unwrap());
        assert!(e.contains("backbone.pad") && e.contains("100") && e.contains("stride 8"), "{e}");
        assert_eq!(mobilenet_v2::tap_stride(0), 2);
        assert_eq!(mobilenet_v2::tap_stride(6), 8);
        assert_eq!(mobilenet_v2::tap_stride(13), 16);
        assert_eq!(mobilenet_v2::tap_stride(18), 32);
        assert_eq!(resnet::tap_stride(3), 16);
    }
}
