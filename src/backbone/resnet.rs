//! torchvision ResNet-18/34/50/101/152 (ImageNet layout), frozen, batch norm folded at load.
//!
//! Weight layout: `conv1`, `bn1`, `layer{1..4}.{i}.{conv1,bn1,conv2,bn2[,conv3,bn3]}`,
//! `layer{1..4}.0.downsample.{0,1}` where the shape changes, optional `fc`. Bottleneck blocks
//! are torchvision's v1.5 (stride on the 3×3 conv).
//!
//! Input: resized (bilinear, antialiased when shrinking) to `input_size²`, ImageNet-normalised.
//! The forward stops at the tapped stage; at 224 the grids are layer1 56², layer2 28²,
//! layer3 14², layer4 7² with 64/128/256/512 channels (×4 for bottleneck nets).

use super::ops::{self, fold_bn, Act, FoldedConv, IMAGENET_MEAN, IMAGENET_STD};
use super::{Backbone, FeatureMap};
use crate::image::Image;
use crate::weights::pth::Weights;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};

const BN_EPS: f64 = 1e-5;

/// ResNet depth variants.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Depth {
    R18,
    R34,
    R50,
    R101,
    R152,
}

impl Depth {
    /// From a backbone name like "resnet50".
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "resnet18" => Depth::R18,
            "resnet34" => Depth::R34,
            "resnet50" => Depth::R50,
            "resnet101" => Depth::R101,
            "resnet152" => Depth::R152,
            _ => return None,
        })
    }
    fn blocks(self) -> [usize; 4] {
        match self {
            Depth::R18 => [2, 2, 2, 2],
            Depth::R34 | Depth::R50 => [3, 4, 6, 3],
            Depth::R101 => [3, 4, 23, 3],
            Depth::R152 => [3, 8, 36, 3],
        }
    }
    fn bottleneck(self) -> bool {
        !matches!(self, Depth::R18 | Depth::R34)
    }
    fn name(self) -> &'static str {
        match self {
            Depth::R18 => "resnet18",
            Depth::R34 => "resnet34",
            Depth::R50 => "resnet50",
            Depth::R101 => "resnet101",
            Depth::R152 => "resnet152",
        }
    }
}

/// Parses a tap name `layer1`..`layer4` into a stage count (1..=4).
pub fn parse_tap(tap: &str) -> Result<usize> {
    tap.strip_prefix("layer").and_then(|k| k.parse::<usize>().ok()).filter(|k| (1..=4).contains(k)).with_context(|| format!("resnet: unknown tap `{tap}` (expected layer1, layer2, layer3 or layer4)"))
}

/// Network-input pixels per feature-grid cell at `layerL` (stem and max-pool 4, then ×2 per layer).
pub fn tap_stride(layer: usize) -> usize {
    4 << (layer - 1)
}

struct ResBlock {
    /// (conv, stride, padding) with BN folded; ReLU after all but the last.
    convs: Vec<(FoldedConv, usize, usize)>,
    downsample: Option<(FoldedConv, usize)>,
}

impl ResBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        let n = self.convs.len();
        for (i, (c, stride, pad)) in self.convs.iter().enumerate() {
            let act = if i + 1 < n { Act::Relu } else { Act::None };
            h = c.conv_cfirst(&h, *stride, *pad, act)?;
        }
        let id = match &self.downsample {
            Some((c, s)) => c.conv_cfirst(x, *s, 0, Act::None)?,
            None => x.clone(),
        };
        Ok((h + id)?.relu()?)
    }
}

/// Frozen torchvision ResNet exposing the output of `layer1`..`layer4`.
pub struct ResNet {
    depth: Depth,
    stem: FoldedConv,
    stages: Vec<Vec<ResBlock>>,
    tap: usize,
    input_size: usize,
    device: Device,
}

impl ResNet {
    /// Builds the model from a torchvision state dict, checking every tensor of conv1…layer4
    /// (name and shape) first; `fc` is not needed. Errors name the file and tensor.
    pub fn new(weights: &Weights, depth: Depth, tap: usize, input_size: usize) -> Result<Self> {
        if !(1..=4).contains(&tap) {
            bail!("resnet: tap layer{tap} out of range (layer1..layer4)");
        }
        if input_size < 32 {
            bail!("resnet: input_size {input_size} too small (≥ 32)");
        }
        let conv_bn = |conv: &str, bn: &str, shape: [usize; 4]| -> Result<FoldedConv> {
            let w = weights.get(&format!("{conv}.weight"), &shape)?;
            fold_bn(weights, w, bn, shape[0], BN_EPS)
        };
        let stem = conv_bn("conv1", "bn1", [64, 3, 7, 7])?;
        let expansion = if depth.bottleneck() { 4 } else { 1 };
        let mut inplanes = 64;
        let mut stages = Vec::new();
        for (li, &n) in depth.blocks().iter().enumerate() {
            let planes = 64 << li;
            let mut blocks = Vec::new();
            for bi in 0..n {
                let p = format!("layer{}.{bi}", li + 1);
                let stride = if li > 0 && bi == 0 { 2 } else { 1 };
                let convs = if depth.bottleneck() {
                    vec![
                        (conv_bn(&format!("{p}.conv1"), &format!("{p}.bn1"), [planes, inplanes, 1, 1])?, 1, 0),
                        (conv_bn(&format!("{p}.conv2"), &format!("{p}.bn2"), [planes, planes, 3, 3])?, stride, 1),
                        (conv_bn(&format!("{p}.conv3"), &format!("{p}.bn3"), [planes * 4, planes, 1, 1])?, 1, 0),
                    ]
                } else {
                    vec![
                        (conv_bn(&format!("{p}.conv1"), &format!("{p}.bn1"), [planes, inplanes, 3, 3])?, stride, 1),
                        (conv_bn(&format!("{p}.conv2"), &format!("{p}.bn2"), [planes, planes, 3, 3])?, 1, 1),
                    ]
                };
                let downsample = if bi == 0 && (stride != 1 || inplanes != planes * expansion) {
                    let c = conv_bn(&format!("{p}.downsample.0"), &format!("{p}.downsample.1"), [planes * expansion, inplanes, 1, 1])?;
                    Some((c, stride))
                } else {
                    if weights.contains(&format!("{p}.downsample.0.weight")) {
                        bail!("{}: unexpected tensor `{p}.downsample.0.weight` (weights for a different ResNet depth?)", weights.path.display());
                    }
                    None
                };
                blocks.push(ResBlock { convs, downsample });
                inplanes = planes * expansion;
            }
            stages.push(blocks);
        }
        // A deeper net's extra block would otherwise be silently ignored.
        for (li, &n) in depth.blocks().iter().enumerate() {
            if weights.contains(&format!("layer{}.{n}.conv1.weight", li + 1)) {
                bail!("{}: unexpected tensor `layer{}.{n}.conv1.weight`: these weights are deeper than {}", weights.path.display(), li + 1, depth.name());
            }
        }
        Ok(Self { depth, stem, stages, tap, input_size, device: Device::Cpu })
    }

    /// Loads a weights file (`.safetensors` or `.pth`) and builds the model.
    pub fn load(path: &std::path::Path, depth: Depth, tap: usize, input_size: usize) -> Result<Self> {
        Self::new(&Weights::open(path)?, depth, tap, input_size)
    }

    /// Runs the stem and stages `layer1..=upto` on a normalised `(B, 3, S, S)` batch; returns
    /// channels-first `(C, B, h, w)` activations (every conv is one batched matmul).
    pub fn forward_to(&self, x: &Tensor, upto: usize) -> Result<Tensor> {
        let x = self.stem.conv_cfirst(&x.transpose(0, 1)?.contiguous()?, 2, 3, Act::Relu)?;
        // Max-pool 3×3/2 with padding 1: inputs are ≥ 0 after ReLU, so zero padding equals -∞.
        let mut x = x.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?.max_pool2d_with_stride(3, 2)?;
        for stage in self.stages.iter().take(upto) {
            for block in stage {
                x = block.forward(&x)?;
            }
        }
        Ok(x)
    }
}

impl Backbone for ResNet {
    fn name(&self) -> String {
        format!("{}:layer{}@{}", self.depth.name(), self.tap, self.input_size)
    }
    fn features(&self, images: &[Image]) -> Result<Vec<FeatureMap>> {
        let x = ops::batch_tensor(images, self.input_size, IMAGENET_MEAN, IMAGENET_STD, &self.device)?;
        ops::nchw_to_maps(&self.forward_to(&x, self.tap)?.transpose(0, 1)?)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::path::Path;

    /// A random state dict in torchvision's exact layout (with `fc` and `num_batches_tracked`).
    pub(crate) fn random_state_dict(depth: Depth) -> HashMap<String, Tensor> {
        let dev = Device::Cpu;
        let mut m = HashMap::new();
        let conv = |m: &mut HashMap<String, Tensor>, name: &str, shape: [usize; 4]| {
            let fan: usize = shape[1..].iter().product();
            let t = (Tensor::randn(0f32, 1.0, &shape, &Device::Cpu).unwrap() / (fan as f64).sqrt()).unwrap();
            m.insert(format!("{name}.weight"), t);
        };
        let bn = |m: &mut HashMap<String, Tensor>, name: &str, c: usize| {
            let dev = Device::Cpu;
            m.insert(format!("{name}.weight"), Tensor::rand(0.5f32, 1.0, c, &dev).unwrap());
            m.insert(format!("{name}.bias"), Tensor::randn(0f32, 0.1, c, &dev).unwrap());
            m.insert(format!("{name}.running_mean"), Tensor::randn(0f32, 0.1, c, &dev).unwrap());
            m.insert(format!("{name}.running_var"), Tensor::rand(0.5f32, 1.5, c, &dev).unwrap());
            m.insert(format!("{name}.num_batches_tracked"), Tensor::new(0i64, &dev).unwrap());
        };
        conv(&mut m, "conv1", [64, 3, 7, 7]);
        bn(&mut m, "bn1", 64);
        let e = if depth.bottleneck() { 4 } else { 1 };
        let mut inp = 64;
        for (li, &n) in depth.blocks().iter().enumerate() {
            let pl = 64 << li;
            for bi in 0..n {
                let p = format!("layer{}.{bi}", li + 1);
                if depth.bottleneck() {
                    conv(&mut m, &format!("{p}.conv1"), [pl, inp, 1, 1]);
                    conv(&mut m, &format!("{p}.conv2"), [pl, pl, 3, 3]);
                    conv(&mut m, &format!("{p}.conv3"), [pl * 4, pl, 1, 1]);
                    bn(&mut m, &format!("{p}.bn1"), pl);
                    bn(&mut m, &format!("{p}.bn2"), pl);
                    bn(&mut m, &format!("{p}.bn3"), pl * 4);
                } else {
                    conv(&mut m, &format!("{p}.conv1"), [pl, inp, 3, 3]);
                    conv(&mut m, &format!("{p}.conv2"), [pl, pl, 3, 3]);
                    bn(&mut m, &format!("{p}.bn1"), pl);
                    bn(&mut m, &format!("{p}.bn2"), pl);
                }
                if bi == 0 && (li > 0 || inp != pl * e) {
                    conv(&mut m, &format!("{p}.downsample.0"), [pl * e, inp, 1, 1]);
                    bn(&mut m, &format!("{p}.downsample.1"), pl * e);
                }
                inp = pl * e;
            }
        }
        m.insert("fc.weight".into(), Tensor::randn(0f32, 0.01, (1000, inp), &dev).unwrap());
        m.insert("fc.bias".into(), Tensor::zeros(1000, candle_core::DType::F32, &dev).unwrap());
        m
    }

    fn img(shift: usize) -> Image {
        let mut im = Image::filled(32, 32, [0.1, 0.3, 0.8]);
        for y in 4..20 {
            for x in shift..shift + 10 {
                im.set(1, y, x, 0.9);
            }
        }
        im
    }

    #[test]
    fn resnet18_and_50_layouts_taps_and_errors() {
        let sd18 = random_state_dict(Depth::R18);
        assert_eq!(sd18.len(), 122); // torchvision resnet18 state_dict size
        let w = Weights::from_map(Path::new("r18.safetensors"), sd18.clone());
        for (tap, grid, d) in [(1, 16, 64), (2, 8, 128), (3, 4, 256), (4, 2, 512)] {
            let m = ResNet::new(&w, Depth::R18, tap, 64).unwrap();
            let f = m.features(&[img(2), img(12)]).unwrap();
            assert_eq!((f.len(), f[0].h, f[0].w, f[0].d), (2, grid, grid, d), "layer{tap}");
            assert!(f[0].data.iter().all(|v| v.is_finite() && *v >= 0.0), "post-ReLU features");
            assert_ne!(f[0], f[1]);
        }
        let sd50 = random_state_dict(Depth::R50);
        assert_eq!(sd50.len(), 320); // torchvision resnet50 state_dict size
        let w50 = Weights::from_map(Path::new("r50.pth"), sd50);
        let m = ResNet::new(&w50, Depth::R50, 3, 64).unwrap();
        let f = m.features(&[img(0)]).unwrap();
        assert_eq!((f[0].h, f[0].w, f[0].d), (4, 4, 1024));
        assert_eq!(m.name(), "resnet50:layer3@64");

        // resnet50 weights loaded as resnet18 (and vice versa) fail naming file and tensor.
        let e = format!("{:#}", ResNet::new(&w50, Depth::R18, 3, 64).err().unwrap());
        assert!(e.contains("r50.pth") && e.contains("layer1.0.conv1.weight"), "{e}");
        let e = format!("{:#}", ResNet::new(&w, Depth::R50, 3, 64).err().unwrap());
        assert!(e.contains("r18.safetensors") && e.contains("layer1.0.conv1.weight"), "{e}");
        let mut bad = sd18;
        bad.remove("layer3.1.bn2.running_var");
        let e = format!("{:#}", ResNet::new(&Weights::from_map(Path::new("r18.pth"), bad), Depth::R18, 1, 64).err().unwrap());
        assert!(e.contains("r18.pth") && e.contains("layer3.1.bn2.running_var"), "{e}");
        assert!(parse_tap("layer5").is_err() && parse_tap("features.3").is_err());
    }

    /// Forward timings with random weights (batch of 16 ShapeWorld-sized images):
    /// `cargo test --release --lib resnet::tests::timings -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn timings() {
        let images: Vec<Image> = (0..16).map(|i| img(i % 20)).collect();
        for depth in [Depth::R18, Depth::R50] {
            let w = Weights::from_map(Path::new("random"), random_state_dict(depth));
            for size in [224, 112] {
                for tap in [2, 3, 4] {
                    let m = ResNet::new(&w, depth, tap, size).unwrap();
                    m.features(&images).unwrap();
                    let t = std::time::Instant::now();
                    m.features(&images).unwrap();
                    println!("{}: {:.0} ms per batch of 16", m.name(), t.elapsed().as_secs_f64() * 1e3);
                }
            }
        }
    }
}
