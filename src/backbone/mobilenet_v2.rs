//! torchvision MobileNetV2 (ImageNet), frozen, batch norm folded at load time.
//!
//! Weight layout (314 tensors): `features.0.{0,1}` stem conv+BN; `features.1` inverted
//! residual without expansion (`conv.0.{0,1}` depthwise+BN, `conv.1` project, `conv.2` BN);
//! `features.2..=17` with expansion (`conv.0.{0,1}` expand, `conv.1.{0,1}` depthwise,
//! `conv.2` project, `conv.3` BN); `features.18.{0,1}` 1×1 to 1280; `classifier.1` linear.
//!
//! Input: each image is resized with bilinear interpolation (antialiased when shrinking) to
//! `input_size × input_size` (default 224; ShapeWorld's 32×32 images are upsampled 7×), then
//! ImageNet-normalised. The forward stops at the tap block `features.K`, whose output is the
//! feature map: at 224, K = 1 → 112², 2–3 → 56², 4–6 → 28², 7–13 → 14², 14–18 → 7².

use super::ops::{self, depthwise3x3_cfirst, fold_bn, Act, FoldedConv, IMAGENET_MEAN, IMAGENET_STD};
use super::{Backbone, FeatureMap};
use crate::image::Image;
use crate::weights::pth::Weights;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, D};

const BN_EPS: f64 = 1e-5;
/// Number of `features.N` blocks.
pub const NUM_BLOCKS: usize = 19;

/// Depthwise conv with folded BN, kept as plain slices for [`depthwise3x3`].
struct Dw {
    k: Vec<f32>,
    b: Vec<f32>,
    stride: usize,
}

enum Block {
    /// features.0: 3×3 stride-2 conv 3→32 + ReLU6.
    Stem(FoldedConv),
    /// features.1..=17.
    Inverted { expand: Option<FoldedConv>, dw: Dw, project: FoldedConv, residual: bool },
    /// features.18: 1×1 conv 320→1280 + ReLU6.
    Head(FoldedConv),
}

/// Frozen MobileNetV2 exposing the output of `features.K` as its feature map.
pub struct MobileNetV2 {
    blocks: Vec<Block>,
    classifier_w: Tensor,
    classifier_b: Tensor,
    tap: usize,
    input_size: usize,
    device: Device,
}

/// (input channels, output channels, stride, expansion) of features.1..=17.
fn block_specs() -> Vec<(usize, usize, usize, usize)> {
    let settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)];
    let mut specs = Vec::new();
    let mut cin = 32;
    for (t, c, n, s) in settings {
        for i in 0..n {
            specs.push((cin, c, if i == 0 { s } else { 1 }, t));
            cin = c;
        }
    }
    specs
}

/// Parses a tap name `features.K` (K in 0..=18).
pub fn parse_tap(tap: &str) -> Result<usize> {
    let k = tap
        .strip_prefix("features.")
        .and_then(|k| k.parse::<usize>().ok())
        .filter(|&k| k < NUM_BLOCKS)
        .with_context(|| format!("mobilenet_v2: unknown tap `{tap}` (expected features.0 … features.18)"))?;
    Ok(k)
}

/// Network-input pixels per feature-grid cell at tap `features.K` (2 after the stem, then
/// the product of the block strides up to K).
pub fn tap_stride(tap: usize) -> usize {
    2 * block_specs().iter().take(tap).map(|s| s.2).product::<usize>()
}

impl MobileNetV2 {
    /// Builds the model from a torchvision state dict, checking every tensor (name and shape)
    /// before returning; errors name the weights file and the tensor.
    pub fn new(weights: &Weights, tap: usize, input_size: usize) -> Result<Self> {
        if tap >= NUM_BLOCKS {
            bail!("mobilenet_v2: tap features.{tap} out of range (0..=18)");
        }
        if input_size < 32 {
            bail!("mobilenet_v2: input_size {input_size} too small (≥ 32)");
        }
        let conv_bn = |conv: &str, bn: &str, cout: usize, cin_per_group: usize, k: usize| -> Result<FoldedConv> {
            let w = weights.get(&format!("{conv}.weight"), &[cout, cin_per_group, k, k])?;
            fold_bn(weights, w, bn, cout, BN_EPS)
        };
        let dw = |p: &str, c: usize, stride: usize| -> Result<Dw> {
            let f = conv_bn(&format!("{p}.0"), &format!("{p}.1"), c, 1, 3)?;
            Ok(Dw { k: f.w.flatten_all()?.to_vec1()?, b: f.b.to_vec1()?, stride })
        };
        let mut blocks = vec![Block::Stem(conv_bn("features.0.0", "features.0.1", 32, 3, 3)?)];
        for (i, (cin, cout, stride, t)) in block_specs().into_iter().enumerate() {
            let p = format!("features.{}.conv", i + 1);
            let hidden = cin * t;
            let block = if t == 1 {
                Block::Inverted {
                    expand: None,
                    dw: dw(&format!("{p}.0"), hidden, stride)?,
                    project: conv_bn(&format!("{p}.1"), &format!("{p}.2"), cout, hidden, 1)?,
                    residual: stride == 1 && cin == cout,
                }
            } else {
                Block::Inverted {
                    expand: Some(conv_bn(&format!("{p}.0.0"), &format!("{p}.0.1"), hidden, cin, 1)?),
                    dw: dw(&format!("{p}.1"), hidden, stride)?,
                    project: conv_bn(&format!("{p}.2"), &format!("{p}.3"), cout, hidden, 1)?,
                    residual: stride == 1 && cin == cout,
                }
            };
            blocks.push(block);
        }
        blocks.push(Block::Head(conv_bn("features.18.0", "features.18.1", 1280, 320, 1)?));
        let classifier_w = weights.get("classifier.1.weight", &[1000, 1280])?;
        let classifier_b = weights.get("classifier.1.bias", &[1000])?;
        Ok(Self { blocks, classifier_w, classifier_b, tap, input_size, device: Device::Cpu })
    }

    /// Loads a weights file (`.safetensors` or `.pth`) and builds the model.
    pub fn load(path: &std::path::Path, tap: usize, input_size: usize) -> Result<Self> {
        Self::new(&Weights::open(path)?, tap, input_size)
    }

    /// The tap block index K of `features.K`.
    pub fn tap(&self) -> usize {
        self.tap
    }

    /// Side of the square network input.
    pub fn input_size(&self) -> usize {
        self.input_size
    }

    /// Runs blocks `features.0..=upto` on a normalised `(B, 3, S, S)` batch and returns the
    /// activations **channels-first**, `(C, B, h, w)`: after the stem everything runs in that
    /// layout so that each 1×1 convolution is one large matmul over the whole batch.
    pub fn forward_to(&self, x: &Tensor, upto: usize) -> Result<Tensor> {
        let mut x = x.clone();
        for block in self.blocks.iter().take(upto + 1) {
            x = match block {
                Block::Stem(c) => c.conv_cfirst(&x.transpose(0, 1)?.contiguous()?, 2, 1, Act::Relu6)?,
                Block::Head(c) => c.pointwise_cfirst(&x, Act::Relu6)?,
                Block::Inverted { expand, dw, project, residual } => {
                    let h = match expand {
                        Some(e) => e.pointwise_cfirst(&x, Act::Relu6)?,
                        None => x.clone(),
                    };
                    let h = depthwise3x3_cfirst(&h, &dw.k, &dw.b, dw.stride, true)?;
                    let y = project.pointwise_cfirst(&h, Act::None)?;
                    if *residual {
                        (y + &x)?
                    } else {
                        y
                    }
                }
            };
        }
        Ok(x)
    }

    fn input(&self, images: &[Image]) -> Result<Tensor> {
        ops::batch_tensor(images, self.input_size, IMAGENET_MEAN, IMAGENET_STD, &self.device)
    }

    /// ImageNet logits (1000 per image): all 19 blocks, global average pool, `classifier.1`.
    pub fn classify(&self, images: &[Image]) -> Result<Vec<Vec<f32>>> {
        let f = self.forward_to(&self.input(images)?, NUM_BLOCKS - 1)?;
        let pooled = f.flatten_from(2)?.mean(D::Minus1)?.t()?; // (1280, B) → (B, 1280)
        let logits = pooled.matmul(&self.classifier_w.t()?)?.broadcast_add(&self.classifier_b)?;
        Ok(logits.to_vec2()?)
    }
}

impl Backbone for MobileNetV2 {
    fn name(&self) -> String {
        format!("mobilenet_v2:features.{}@{}", self.tap, self.input_size)
    }
    fn features(&self, images: &[Image]) -> Result<Vec<FeatureMap>> {
        let f = self.forward_to(&self.input(images)?, self.tap)?;
        ops::nchw_to_maps(&f.transpose(0, 1)?)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::path::{Path, PathBuf};

    /// A random state dict in the exact torchvision layout (314 tensors).
    pub(crate) fn random_state_dict() -> HashMap<String, Tensor> {
        let dev = Device::Cpu;
        let mut m = HashMap::new();
        let add_conv = |m: &mut HashMap<String, Tensor>, name: &str, shape: &[usize]| {
            let fan: usize = shape[1..].iter().product();
            let t = (Tensor::randn(0f32, 1.0, shape, &dev).unwrap() / (fan as f64).sqrt()).unwrap();
            m.insert(format!("{name}.weight"), t);
        };
        let add_bn = |m: &mut HashMap<String, Tensor>, name: &str, c: usize| {
            let dev = Device::Cpu;
            m.insert(format!("{name}.weight"), Tensor::rand(0.5f32, 1.5, c, &dev).unwrap());
            m.insert(format!("{name}.bias"), Tensor::randn(0f32, 0.1, c, &dev).unwrap());
            m.insert(format!("{name}.running_mean"), Tensor::randn(0f32, 0.1, c, &dev).unwrap());
            m.insert(format!("{name}.running_var"), Tensor::rand(0.5f32, 1.5, c, &dev).unwrap());
            m.insert(format!("{name}.num_batches_tracked"), Tensor::new(0i64, &dev).unwrap());
        };
        add_conv(&mut m, "features.0.0", &[32, 3, 3, 3]);
        add_bn(&mut m, "features.0.1", 32);
        for (i, (cin, cout, _s, t)) in block_specs().into_iter().enumerate() {
            let p = format!("features.{}.conv", i + 1);
            let hid = cin * t;
            if t == 1 {
                add_conv(&mut m, &format!("{p}.0.0"), &[hid, 1, 3, 3]);
                add_bn(&mut m, &format!("{p}.0.1"), hid);
                add_conv(&mut m, &format!("{p}.1"), &[cout, hid, 1, 1]);
                add_bn(&mut m, &format!("{p}.2"), cout);
            } else {
                add_conv(&mut m, &format!("{p}.0.0"), &[hid, cin, 1, 1]);
                add_bn(&mut m, &format!("{p}.0.1"), hid);
                add_conv(&mut m, &format!("{p}.1.0"), &[hid, 1, 3, 3]);
                add_bn(&mut m, &format!("{p}.1.1"), hid);
                add_conv(&mut m, &format!("{p}.2"), &[cout, hid, 1, 1]);
                add_bn(&mut m, &format!("{p}.3"), cout);
            }
        }
        add_conv(&mut m, "features.18.0", &[1280, 320, 1, 1]);
        add_bn(&mut m, "features.18.1", 1280);
        m.insert("classifier.1.weight".into(), Tensor::randn(0f32, 0.03, (1000, 1280), &dev).unwrap());
        m.insert("classifier.1.bias".into(), Tensor::zeros(1000, candle_core::DType::F32, &dev).unwrap());
        m
    }

    fn shape_image(seed: usize) -> Image {
        let mut im = Image::filled(32, 32, [0.9, 0.9, 0.9]);
        for y in 8..24 {
            for x in (4 + seed)..(20 + seed) {
                im.set(0, y, x, 0.8);
                im.set(1, y, x, 0.1);
                im.set(2, y, x, 0.1);
            }
        }
        im
    }

    #[test]
    fn random_weights_taps_shapes_and_errors() {
        let sd = random_state_dict();
        assert_eq!(sd.len(), 314);
        let w = Weights::from_map(Path::new("rand.safetensors"), sd.clone());
        for (tap, grid, d) in [(3, 28, 24), (6, 14, 32), (13, 7, 96)] {
            let m = MobileNetV2::new(&w, tap, 112).unwrap();
            let f = m.features(&[shape_image(0), shape_image(5)]).unwrap();
            assert_eq!(f.len(), 2);
            assert_eq!((f[0].h, f[0].w, f[0].d), (grid, grid, d), "tap {tap}");
            assert!(f[0].data.iter().all(|v| v.is_finite()));
            assert_ne!(f[0], f[1], "different images must give different features");
        }
        // Batching must not change per-image results.
        let m = MobileNetV2::new(&w, 6, 64).unwrap();
        let both = m.features(&[shape_image(0), shape_image(5)]).unwrap();
        let one = m.features(&[shape_image(5)]).unwrap();
        let diff = both[1].data.iter().zip(&one[0].data).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(diff < 1e-4, "{diff}");
        assert_eq!(m.classify(&[shape_image(1)]).unwrap()[0].len(), 1000);

        // Missing and mis-shaped tensors name the file and tensor.
        let mut bad = sd.clone();
        bad.remove("features.7.conv.1.1.running_var");
        let e = format!("{:#}", MobileNetV2::new(&Weights::from_map(Path::new("bad.pth"), bad), 3, 224).err().unwrap());
        assert!(e.contains("bad.pth") && e.contains("features.7.conv.1.1.running_var"), "{e}");
        let mut bad = sd;
        bad.insert("features.2.conv.2.weight".into(), Tensor::zeros((24, 95, 1, 1), candle_core::DType::F32, &Device::Cpu).unwrap());
        let e = format!("{:#}", MobileNetV2::new(&Weights::from_map(Path::new("bad.pth"), bad), 3, 224).err().unwrap());
        assert!(e.contains("bad.pth") && e.contains("features.2.conv.2.weight") && e.contains("95"), "{e}");
        assert!(parse_tap("features.19").is_err() && parse_tap("layer3").is_err());
        assert_eq!(parse_tap("features.13").unwrap(), 13);
    }

    /// Forward timings of the real model (batch 16 of ShapeWorld-sized 32×32 images):
    /// `cargo test --lib mobilenet_v2::tests::timings -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn timings() {
        // Process CPU seconds (utime + stime from /proc/self/stat, Linux): on a shared machine
        // wall time mostly measures the neighbours; CPU time measures our work.
        fn cpu_s() -> f64 {
            let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
            let f: Vec<&str> = s.rsplit(')').next().unwrap_or("").split_whitespace().collect();
            let tick = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            (tick(11) + tick(12)) / 100.0
        }
        let w = Weights::open(&committed_weights()).unwrap();
        let images: Vec<Image> = (0..16).map(|i| shape_image(i % 12)).collect();
        let taps: Vec<usize> = match std::env::var("VIPO_TIMING_TAPS") {
            Ok(v) => v.split(',').filter_map(|t| t.trim().parse().ok()).collect(),
            Err(_) => vec![3, 6, 13, 17],
        };
        for size in [224, 160, 112] {
            for &tap in &taps {
                let m = MobileNetV2::new(&w, tap, size).unwrap();
                m.features(&images).unwrap(); // warm-up
                let n = 4;
                let (t, c) = (std::time::Instant::now(), cpu_s());
                let mut best = f64::MAX;
                for _ in 0..n {
                    let t = std::time::Instant::now();
                    m.features(&images).unwrap();
                    best = best.min(t.elapsed().as_secs_f64());
                }
                let (wall, cpu) = (t.elapsed().as_secs_f64() / n as f64, (cpu_s() - c) / n as f64);
                let f = m.features(&images[..1]).unwrap();
                println!("input {size}: features.{tap} ({}×{}×{}): batch of 16: wall {:.0} ms mean / {:.0} ms best, CPU {:.0} ms", f[0].h, f[0].w, f[0].d, wall * 1e3, best * 1e3, cpu * 1e3);
            }
        }
    }

    /// A ShapeWorld-like 32×32 scene (1–3 discs/squares/triangles on a plain background) and
    /// its union object mask; deterministic in `seed`.
    fn toy_scene(seed: u64) -> (Image, Vec<bool>) {
        let mut st = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let mut rnd = move || {
            st = st.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((st >> 33) as f32) / (1u64 << 31) as f32
        };
        let bg = [0.75 + 0.2 * rnd(), 0.75 + 0.2 * rnd(), 0.75 + 0.2 * rnd()];
        let mut im = Image::filled(32, 32, bg);
        let mut mask = vec![false; 32 * 32];
        let n = 1 + (rnd() * 3.0) as usize % 3;
        for _ in 0..n {
            let (cx, cy, r) = (6.0 + 20.0 * rnd(), 6.0 + 20.0 * rnd(), 3.0 + 4.0 * rnd());
            let kind = (rnd() * 3.0) as usize;
            let col = [0.7 * rnd(), 0.7 * rnd(), 0.7 * rnd()];
            for y in 0..32 {
                for x in 0..32 {
                    let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
                    let inside = match kind {
                        0 => dx * dx + dy * dy <= r * r,
                        1 => dx.abs() <= r && dy.abs() <= r,
                        _ => dy <= r && dy >= -r && dx.abs() <= (dy + r) * 0.5,
                    };
                    if inside {
                        mask[y * 32 + x] = true;
                        for (c, v) in col.iter().enumerate() {
                            im.set(c, y, x, *v);
                        }
                    }
                }
            }
        }
        (im, mask)
    }

    /// First principal component scores of an N×D feature matrix (power iteration).
    fn pc1(f: &FeatureMap) -> Vec<f32> {
        let (n, d) = (f.n(), f.d);
        let mut mean = vec![0f64; d];
        for i in 0..n {
            for (m, v) in mean.iter_mut().zip(f.row(i)) {
                *m += *v as f64 / n as f64;
            }
        }
        let mut cov = vec![0f64; d * d];
        for i in 0..n {
            let r: Vec<f64> = f.row(i).iter().zip(&mean).map(|(v, m)| *v as f64 - m).collect();
            for a in 0..d {
                for b in 0..d {
                    cov[a * d + b] += r[a] * r[b];
                }
            }
        }
        let mut v = vec![1.0f64; d];
        for _ in 0..200 {
            let mut w = vec![0f64; d];
            for a in 0..d {
                w[a] = (0..d).map(|b| cov[a * d + b] * v[b]).sum();
            }
            let norm = w.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-30);
            v = w.into_iter().map(|x| x / norm).collect();
        }
        (0..n).map(|i| f.row(i).iter().zip(&mean).zip(&v).map(|((x, m), e)| (*x as f64 - m) * e).sum::<f64>() as f32).collect()
    }

    /// Sign-free ROC AUC of `score` for separating `pos` cells from the rest.
    fn auc(score: &[f32], pos: &[bool]) -> f64 {
        let (p, q): (Vec<f32>, Vec<f32>) = {
            let p = score.iter().zip(pos).filter(|(_, &m)| m).map(|(s, _)| *s).collect();
            let q = score.iter().zip(pos).filter(|(_, &m)| !m).map(|(s, _)| *s).collect();
            (p, q)
        };
        if p.is_empty() || q.is_empty() {
            return f64::NAN;
        }
        let mut wins = 0f64;
        for a in &p {
            for b in &q {
                wins += if a > b {
                    1.0
                } else if a == b {
                    0.5
                } else {
                    0.0
                };
            }
        }
        let a = wins / (p.len() * q.len()) as f64;
        a.max(1.0 - a)
    }

    /// Which tap suits the PSM: mean AUC of each image's own first principal component for
    /// object-vs-background cells, on 48 toy scenes.
    /// `cargo test --lib mobilenet_v2::tests::tap_quality -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn tap_quality() {
        let w = Weights::open(&committed_weights()).unwrap();
        let scenes: Vec<(Image, Vec<bool>)> = (0..48).map(toy_scene).collect();
        let images: Vec<Image> = scenes.iter().map(|s| s.0.clone()).collect();
        for size in [224, 112] {
            for tap in [3, 6, 13, 17] {
                let m = MobileNetV2::new(&w, tap, size).unwrap();
                let mut total = 0.0;
                let mut count = 0;
                let mut grid = 0;
                for (chunk, sc) in images.chunks(16).zip(scenes.chunks(16)) {
                    for (f, (_, mask)) in m.features(chunk).unwrap().iter().zip(sc) {
                        grid = f.h;
                        // Object label of a cell: the mask at the cell centre in the 32×32 image.
                        let pos: Vec<bool> = (0..f.n())
                            .map(|i| {
                                let (y, x) = (i / f.w, i % f.w);
                                let (py, px) = ((y * 32 + 16) / f.h, (x * 32 + 16) / f.w);
                                mask[py.min(31) * 32 + px.min(31)]
                            })
                            .collect();
                        let a = auc(&pc1(f), &pos);
                        if a.is_finite() {
                            total += a;
                            count += 1;
                        }
                    }
                }
                println!("input {size}: features.{tap} ({grid}×{grid}): PC1 object AUC {:.3} over {count} scenes", total / count as f64);
            }
        }
    }

    /// End to end through the file loaders: the same random state dict saved as a zip `.pth`,
    /// a legacy `.pth` and a safetensors file gives identical features.
    #[test]
    fn loads_random_checkpoints_from_pth_and_safetensors_files() {
        let sd = random_state_dict();
        let dir = tempfile::tempdir().unwrap();
        let zip = dir.path().join("mnv2_zip.pth");
        let legacy = dir.path().join("mnv2_legacy.pth");
        let st = dir.path().join("mnv2.safetensors");
        std::fs::write(&zip, crate::weights::pth::tests::torch_checkpoint_bytes(&sd, false)).unwrap();
        std::fs::write(&legacy, crate::weights::pth::tests::torch_checkpoint_bytes(&sd, true)).unwrap();
        candle_core::safetensors::save(&sd, &st).unwrap();
        let images = [shape_image(3)];
        let reference = MobileNetV2::new(&Weights::from_map(Path::new("mem"), sd), 6, 64).unwrap().features(&images).unwrap();
        for p in [&zip, &legacy, &st] {
            let f = MobileNetV2::load(p, 6, 64).unwrap().features(&images).unwrap();
            assert_eq!(f, reference, "{}", p.display());
        }
        // A truncated .pth fails at load, naming the file.
        let bytes = std::fs::read(&legacy).unwrap();
        std::fs::write(&legacy, &bytes[..bytes.len() / 2]).unwrap();
        let e = format!("{:#}", MobileNetV2::load(&legacy, 6, 64).err().unwrap());
        assert!(e.contains("mnv2_legacy.pth") && e.contains("truncated"), "{e}");
    }

    /// The committed weights, converted once from torchvision's file (weights/PROVENANCE.md).
    pub(crate) fn committed_weights() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("weights/mobilenet_v2.safetensors")
    }

    /// Real ImageNet weights on real photographs (tests/data: CC0 / public domain, see README).
    #[test]
    fn real_weights_classify_photographs() {
        let m = MobileNetV2::load(&committed_weights(), 13, 224).unwrap();
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
        // (file, accepted ImageNet indices, how many top guesses may contain one of them). The
        // rocket photo is a launch pad in smoke: torchvision's MobileNetV2 ranks "drilling platform"
        // (540) first and "space shuttle" (812) second, so it is checked at top-5.
        let cases: [(&str, &[usize], usize); 3] = [
            ("chelsea.jpg", &[281, 282, 285], 1), // tabby, tiger cat, Egyptian cat
            ("coffee.jpg", &[967, 968, 504], 1),  // espresso, cup, coffee mug
            ("rocket.jpg", &[657, 744, 812], 5),  // missile, projectile, space shuttle
        ];
        let images: Vec<Image> = cases
            .iter()
            .map(|(f, _, _)| {
                let im = Image::load(&dir.join(f)).unwrap();
                ops::imagenet_eval_transform(&im, 256, 224).unwrap()
            })
            .collect();
        let logits = m.classify(&images).unwrap();
        for ((f, ok, k), l) in cases.iter().zip(&logits) {
            let mut idx: Vec<usize> = (0..l.len()).collect();
            idx.sort_by(|&a, &b| l[b].total_cmp(&l[a]));
            let mx = l[idx[0]];
            let z: f32 = l.iter().map(|v| (v - mx).exp()).sum();
            println!("{f}: top-5 {:?} p {:?}", &idx[..5], idx[..5].iter().map(|&i| (l[i] - mx).exp() / z).collect::<Vec<_>>());
            assert!(idx[..*k].iter().any(|i| ok.contains(i)), "{f}: top-{k} {:?} has none of {ok:?}", &idx[..*k]);
        }
    }
}
