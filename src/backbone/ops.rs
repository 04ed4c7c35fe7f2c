//! Forward-only building blocks shared by the frozen backbones: image resizing and ImageNet
//! normalisation into a batch tensor, batch-norm folding, a fast depthwise convolution, and
//! feature-map extraction. Nothing here needs (or has) a backward pass.

use crate::image::Image;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

/// ImageNet channel means (torchvision).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations (torchvision).
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Per-output-pixel source taps for 1-D triangle-filter resampling: `(first source index,
/// weights)`. Upsampling gives exactly bilinear interpolation with `align_corners=False` (edge
/// pixels clamp, as in torch); downsampling widens the filter by the scale factor (antialiased,
/// like PIL's bilinear and torch's `antialias=True`), so a 451-px photo does not alias.
fn taps(n_in: usize, n_out: usize) -> Vec<(usize, Vec<f32>)> {
    let scale = n_in as f64 / n_out as f64;
    let support = scale.max(1.0);
    (0..n_out)
        .map(|i| {
            let center = (i as f64 + 0.5) * scale;
            let lo = ((center - support + 0.5).floor().max(0.0)) as usize;
            let hi = ((center + support + 0.5).floor() as usize).min(n_in);
            let mut w: Vec<f32> = (lo..hi)
                .map(|j| {
                    let d = ((j as f64 + 0.5 - center) / support).abs();
                    (1.0 - d).max(0.0) as f32
                })
                .collect();
            let s: f32 = w.iter().sum();
            if s > 0.0 {
                w.iter_mut().for_each(|x| *x /= s);
            } else {
                // Degenerate only for n_in == 0, which callers rule out.
                w.iter_mut().for_each(|x| *x = 0.0);
            }
            (lo, w)
        })
        .collect()
}

/// Resizes an image to `out_h × out_w` with (antialiased when shrinking) bilinear filtering.
pub fn resize_bilinear(img: &Image, out_h: usize, out_w: usize) -> Image {
    if img.h == out_h && img.w == out_w {
        return img.clone();
    }
    let (th, tw) = (taps(img.h, out_h), taps(img.w, out_w));
    let mut tmp = vec![0f32; 3 * img.h * out_w]; // horizontal pass first
    for c in 0..3 {
        for y in 0..img.h {
            let row = &img.data[c * img.h * img.w + y * img.w..][..img.w];
            for (x, (lo, w)) in tw.iter().enumerate() {
                tmp[c * img.h * out_w + y * out_w + x] = w.iter().zip(&row[*lo..]).map(|(a, b)| a * b).sum();
            }
        }
    }
    let mut out = Image::new(out_h, out_w);
    for c in 0..3 {
        for (y, (lo, w)) in th.iter().enumerate() {
            let dst = &mut out.data[c * out_h * out_w + y * out_w..][..out_w];
            for (k, wk) in w.iter().enumerate() {
                let src = &tmp[c * img.h * out_w + (lo + k) * out_w..][..out_w];
                for (d, s) in dst.iter_mut().zip(src) {
                    *d += wk * s;
                }
            }
        }
    }
    out
}

/// Centre crop to `h × w` (must fit).
pub fn center_crop(img: &Image, h: usize, w: usize) -> Result<Image> {
    if h > img.h || w > img.w {
        bail!("centre crop {h}×{w} larger than the {}×{} image", img.h, img.w);
    }
    img.crop((img.h - h) / 2, (img.w - w) / 2, h, w)
}

/// torchvision's eval transform: resize the shorter side to `resize`, centre-crop `crop`.
pub fn imagenet_eval_transform(img: &Image, resize: usize, crop: usize) -> Result<Image> {
    let s = resize as f64 / img.h.min(img.w) as f64;
    let (h, w) = (((img.h as f64 * s).round() as usize).max(resize), ((img.w as f64 * s).round() as usize).max(resize));
    center_crop(&resize_bilinear(img, h, w), crop, crop)
}

/// Resizes every image to `size × size` (non-square inputs are stretched, not cropped, so every
/// feature cell maps back onto the whole image) and normalises with `mean`/`std` into a
/// `(B, 3, size, size)` f32 tensor.
pub fn batch_tensor(images: &[Image], size: usize, mean: [f32; 3], std: [f32; 3], device: &Device) -> Result<Tensor> {
    if images.is_empty() {
        bail!("backbone called with an empty batch");
    }
    let mut data = Vec::with_capacity(images.len() * 3 * size * size);
    for (i, im) in images.iter().enumerate() {
        if im.h == 0 || im.w == 0 || im.data.len() != 3 * im.h * im.w {
            bail!("image {i}: malformed ({}×{} with {} values)", im.h, im.w, im.data.len());
        }
        let r = resize_bilinear(im, size, size);
        for c in 0..3 {
            data.extend(r.data[c * size * size..(c + 1) * size * size].iter().map(|v| (v - mean[c]) / std[c]));
        }
    }
    Ok(Tensor::from_vec(data, (images.len(), 3, size, size), device)?)
}

/// A convolution with batch norm folded in: `w' = w·γ/√(σ²+ε)`, `b' = β − μ·γ/√(σ²+ε)`.
pub struct FoldedConv {
    /// (Cout, Cin/groups, k, k)
    pub w: Tensor,
    /// (Cout)
    pub b: Tensor,
    /// `b` as a slice for the fused in-place bias/activation pass.
    pub bv: Vec<f32>,
    /// `w` as a (Cout, Cin) matrix for 1×1 convolutions.
    w2: Tensor,
}

/// Folds batch norm `bn` (prefix of `.weight/.bias/.running_mean/.running_var`) into conv weight
/// `w` (shape `(Cout, …)`), checking every shape against `cout`.
pub fn fold_bn(weights: &crate::weights::pth::Weights, w: Tensor, bn: &str, cout: usize, eps: f64) -> Result<FoldedConv> {
    let g = weights.get(&format!("{bn}.weight"), &[cout])?;
    let beta = weights.get(&format!("{bn}.bias"), &[cout])?;
    let mean = weights.get(&format!("{bn}.running_mean"), &[cout])?;
    let var = weights.get(&format!("{bn}.running_var"), &[cout])?;
    let scale = (g / (var + eps)?.sqrt()?)?;
    let rank = w.rank();
    let mut shape = vec![cout];
    shape.extend(std::iter::repeat_n(1, rank - 1));
    let w = w.broadcast_mul(&scale.reshape(shape)?)?;
    let b = (beta - (mean * &scale)?)?;
    let bv = b.to_vec1::<f32>()?;
    let w2 = w.flatten_from(1)?.contiguous()?;
    Ok(FoldedConv { w, b, bv, w2 })
}

impl FoldedConv {
    /// Dense convolution (groups = 1) plus bias and activation, NCHW.
    pub fn conv(&self, x: &Tensor, stride: usize, padding: usize, act: Act) -> Result<Tensor> {
        let y = x.conv2d(&self.w, padding, stride, 1, 1)?;
        bias_act(y, &self.bv, act)
    }
    /// Dense k×k convolution plus bias and activation on a channels-first (C, B, H, W) tensor,
    /// as a parallel im2col and one (Cout × Cin·k²)·(Cin·k² × B·h·w) matmul. candle's conv2d
    /// does the im2col single-threaded per image and then transposes; this was 5× slower.
    pub fn conv_cfirst(&self, x: &Tensor, stride: usize, pad: usize, act: Act) -> Result<Tensor> {
        let (cout, cin_w, k, k2) = self.w.dims4()?;
        let (cin, b, h, w) = x.dims4()?;
        if cin != cin_w || k != k2 {
            bail!("conv: weight {:?} applied to {cin} channels", self.w.dims());
        }
        if k == 1 && stride == 1 && pad == 0 {
            return self.pointwise_cfirst(x, act);
        }
        if h + 2 * pad < k || w + 2 * pad < k {
            bail!("conv: {h}×{w} input too small for a {k}×{k} kernel");
        }
        let (oh, ow) = ((h + 2 * pad - k) / stride + 1, (w + 2 * pad - k) / stride + 1);
        let xin = x.to_dtype(DType::F32)?.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let n = b * oh * ow;
        let mut cols = vec![0f32; cin * k * k * n];
        par_planes(&mut cols, n, |r, row| {
            let (ci, ky, kx) = (r / (k * k), (r / k) % k, r % k);
            for bi in 0..b {
                let plane = &xin[(ci * b + bi) * h * w..][..h * w];
                for oy in 0..oh {
                    let iy = (oy * stride + ky) as isize - pad as isize;
                    let dst = &mut row[(bi * oh + oy) * ow..][..ow];
                    if iy < 0 || iy >= h as isize {
                        continue; // stays zero: padding
                    }
                    let src = &plane[iy as usize * w..][..w];
                    // Output columns whose input column ox·stride + kx − pad lies in 0..w;
                    // the rest stay zero (padding).
                    let lo = (pad.saturating_sub(kx)).div_ceil(stride);
                    let hi = (w + pad).saturating_sub(kx).div_ceil(stride).min(ow);
                    if lo < hi {
                        let first = lo * stride + kx - pad;
                        let dst = &mut dst[lo..hi];
                        if stride == 1 {
                            dst.copy_from_slice(&src[first..first + dst.len()]);
                        } else {
                            // Whole stride-sized chunks (the last may be short): no per-element
                            // iterator state, so the loop compiles to plain loads and stores.
                            for (d, c) in dst.iter_mut().zip(src[first..].chunks(stride)) {
                                *d = c[0];
                            }
                        }
                    }
                }
            }
        });
        let cols = Tensor::from_vec(cols, (cin * k * k, n), x.device())?;
        let y = self.w2.matmul(&cols)?;
        bias_act_cfirst(y.reshape((cout, b, oh, ow))?, &self.bv, act)
    }

    /// 1×1 convolution plus bias and activation on a channels-first (C, B, H, W) tensor: a
    /// single (Cout × Cin)·(Cin × B·H·W) matmul, far faster than B small ones.
    pub fn pointwise_cfirst(&self, x: &Tensor, act: Act) -> Result<Tensor> {
        let (cin, b, h, w) = x.dims4()?;
        let cout = self.w2.dim(0)?;
        let y = self.w2.matmul(&x.reshape((cin, b * h * w))?)?;
        bias_act_cfirst(y.reshape((cout, b, h, w))?, &self.bv, act)
    }
    /// 1×1 convolution (one matmul per image) plus bias and activation, NCHW.
    pub fn pointwise(&self, x: &Tensor, act: Act) -> Result<Tensor> {
        let (b, cin, h, w) = x.dims4()?;
        let cout = self.w2.dim(0)?;
        let y = self.w2.broadcast_matmul(&x.reshape((b, cin, h * w))?)?;
        bias_act(y.reshape((b, cout, h, w))?, &self.bv, act)
    }
}

/// Runs `f(plane_index, plane)` over consecutive `plane`-sized chunks of `data` on the
/// global rayon pool (sized by `runtime::init`; its idle workers sleep). Small planes are
/// grouped so that each task has some 16 K values of work.
fn par_planes(data: &mut [f32], plane: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    use rayon::prelude::*;
    let plane = plane.max(1);
    data.par_chunks_mut(plane).with_min_len((16 * 1024 / plane).max(1)).enumerate().for_each(|(i, p)| f(i, p));
}

simd_kernel! {
    /// Bias plus activation over one plane, in place.
    fn bias_act_plane(xs: &mut [f32], b: f32, act: Act) {
        match act {
            Act::Relu6 => xs.iter_mut().for_each(|x| *x = (*x + b).clamp(0.0, 6.0)),
            Act::Relu => xs.iter_mut().for_each(|x| *x = (*x + b).max(0.0)),
            Act::None => xs.iter_mut().for_each(|x| *x += b),
        }
    }
}

simd_kernel! {
    /// One output plane (oh × `ow`) of a 3×3 depthwise convolution from its zero-padded
    /// input: for stride 1 one plane `sw` = pw wide; for stride 2 four `sub_len`-long
    /// sub-planes (row parity × column parity, `sw` = ow + 1 wide), where input (2·oy + ky,
    /// 2·ox + kx) sits in sub-plane (ky % 2, kx % 2) at row oy + ky / 2, column ox + kx / 2.
    /// Either way tap (ky, kx) adds one contiguous run to a "virtual" output `sw` wide
    /// (whose extra columns are dropped), so every loop is a long vector loop. Sums in the
    /// order bias + k0·x0 + k1·x1 + … + k8·x8, as a direct loop would.
    fn dw_plane(pad: &[f32], o: &mut [f32], kk: &[f32; 9], bb: f32, stride: usize, relu6: bool, sw: usize, sub_len: usize, ow: usize) {
        let oh = o.len() / ow;
        let n = (oh - 1) * sw + ow;
        let mut acc = vec![bb; n];
        for ky in 0..3 {
            for kx in 0..3 {
                let start = if stride == 1 { ky * sw + kx } else { ((ky % 2) * 2 + kx % 2) * sub_len + (ky / 2) * sw + kx / 2 };
                let kv = kk[ky * 3 + kx];
                for (d, s) in acc.iter_mut().zip(&pad[start..start + n]) {
                    *d += kv * s;
                }
            }
        }
        if relu6 {
            acc.iter_mut().for_each(|v| *v = v.clamp(0.0, 6.0));
        }
        for (oy, orow) in o.chunks_mut(ow).enumerate() {
            orow.copy_from_slice(&acc[oy * sw..oy * sw + ow]);
        }
    }
}

/// Activation fused into the bias pass.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Act {
    None,
    Relu,
    Relu6,
}

/// In place: per-channel bias then activation on a contiguous (B, C, …) f32 tensor, in one
/// pass. candle's broadcast_add + clamp take three passes and two fresh allocations, which
/// dominated MobileNetV2's run time at 224×224.
struct BiasAct<'a> {
    bias: &'a [f32],
    act: Act,
    /// Channels on dim 0 (C, B, …) instead of dim 1 (B, C, …).
    cfirst: bool,
}

impl candle_core::InplaceOp1 for BiasAct<'_> {
    fn name(&self) -> &'static str {
        "vipo-bias-act"
    }
    fn cpu_fwd(&self, storage: &mut candle_core::CpuStorage, layout: &candle_core::Layout) -> candle_core::Result<()> {
        let candle_core::CpuStorage::F32(v) = storage else { candle_core::bail!("bias-act: f32 only") };
        let Some((start, end)) = layout.contiguous_offsets() else { candle_core::bail!("bias-act: contiguous only") };
        let dims = layout.dims();
        let c = self.bias.len();
        if dims.len() < 2 || dims[if self.cfirst { 0 } else { 1 }] != c {
            candle_core::bail!("bias-act: {} biases for shape {:?}", c, dims);
        }
        let plane: usize = dims[2..].iter().product();
        let d1 = dims[1];
        par_planes(&mut v[start..end], plane, |p, xs| {
            bias_act_plane(xs, self.bias[if self.cfirst { p / d1 } else { p % c }], self.act);
        });
        Ok(())
    }
}

/// Adds a per-channel bias and applies `act` to a freshly computed (B, C, …) tensor, in place.
pub fn bias_act(x: Tensor, bias: &[f32], act: Act) -> Result<Tensor> {
    let x = x.contiguous()?;
    x.inplace_op1(&BiasAct { bias, act, cfirst: false })?;
    Ok(x)
}

/// [`bias_act`] for a channels-first (C, B, …) tensor.
pub fn bias_act_cfirst(x: Tensor, bias: &[f32], act: Act) -> Result<Tensor> {
    let x = x.contiguous()?;
    x.inplace_op1(&BiasAct { bias, act, cfirst: true })?;
    Ok(x)
}

/// Depthwise 3×3 convolution (padding 1, stride 1 or 2) with bias and optional ReLU6, NCHW,
/// on plain slices: candle's grouped conv2d splits into one conv per channel, which is ~100×
/// slower for depthwise layers. Parallel over (image, channel) planes.
pub fn depthwise3x3(x: &Tensor, k: &[f32], bias: &[f32], stride: usize, relu6: bool) -> Result<Tensor> {
    depthwise3x3_impl(x, k, bias, stride, relu6, false)
}

/// [`depthwise3x3`] on a channels-first (C, B, H, W) tensor.
pub fn depthwise3x3_cfirst(x: &Tensor, k: &[f32], bias: &[f32], stride: usize, relu6: bool) -> Result<Tensor> {
    depthwise3x3_impl(x, k, bias, stride, relu6, true)
}

fn depthwise3x3_impl(x: &Tensor, k: &[f32], bias: &[f32], stride: usize, relu6: bool, cfirst: bool) -> Result<Tensor> {
    let c = x.dim(if cfirst { 0 } else { 1 })?;
    if k.len() != c * 9 || bias.len() != c || !(stride == 1 || stride == 2) {
        bail!("depthwise3x3: kernel for {} channels (stride {stride}) applied to {c}", bias.len());
    }
    Ok(x.to_dtype(DType::F32)?.contiguous()?.apply_op1_no_bwd(&Depthwise { k, bias, stride, relu6, cfirst })?)
}

struct Depthwise<'a> {
    k: &'a [f32],
    bias: &'a [f32],
    stride: usize,
    relu6: bool,
    cfirst: bool,
}

impl candle_core::CustomOp1 for Depthwise<'_> {
    fn name(&self) -> &'static str {
        "vipo-depthwise3x3"
    }
    fn cpu_fwd(&self, storage: &candle_core::CpuStorage, layout: &candle_core::Layout) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let candle_core::CpuStorage::F32(v) = storage else { candle_core::bail!("depthwise: f32 only") };
        let Some((start, end)) = layout.contiguous_offsets() else { candle_core::bail!("depthwise: contiguous only") };
        let xin = &v[start..end];
        let (b, c, h, w) = layout.shape().dims4()?;
        let stride = self.stride;
        let (oh, ow) = ((h - 1) / stride + 1, (w - 1) / stride + 1);
        let mut out = vec![0f32; b * c * oh * ow];
        let (pw, ph) = (w + 2, h + 2);
        par_planes(&mut out, oh * ow, |p, o| {
            // The zero-padded plane (ph × pw), for stride 2 split into its four (row parity,
            // column parity) sub-planes, each `sw` wide and oh + 1 high, so that every tap
            // of the 3×3 kernel reads one contiguous run (see `dw_plane`).
            let src = &xin[p * h * w..(p + 1) * h * w];
            let (sw, sub_len) = if stride == 1 { (pw, ph * pw) } else { (ow + 1, (oh + 1) * (ow + 1)) };
            let mut pad = vec![0f32; sub_len * stride * stride];
            for y in 0..h {
                let s = &src[y * w..(y + 1) * w];
                if stride == 1 {
                    pad[(y + 1) * pw + 1..][..w].copy_from_slice(s);
                } else {
                    // Padded (py, px) = (y + 1, x + 1): even x goes to the odd-column
                    // sub-plane at x / 2, odd x to the even-column one at (x + 1) / 2.
                    let py = y + 1;
                    let row = (py % 2 * 2) * sub_len + (py / 2) * sw;
                    let (even_cols, odd_cols) = pad[row..].split_at_mut(sub_len);
                    for (j, pair) in s.chunks_exact(2).enumerate() {
                        odd_cols[j] = pair[0];
                        even_cols[j + 1] = pair[1];
                    }
                    if w % 2 == 1 {
                        odd_cols[w / 2] = s[w - 1];
                    }
                }
            }
            // (B, C, H, W): plane p is channel p % C; (C, B, H, W): channel p / B (named b and c below).
            let ch = if self.cfirst { p / c } else { p % c };
            let kk: &[f32; 9] = self.k[ch * 9..ch * 9 + 9].try_into().unwrap_or(&[0.0; 9]);
            let bb = self.bias[ch];
            dw_plane(&pad, o, kk, bb, stride, self.relu6, sw, sub_len, ow);
        });
        Ok((candle_core::CpuStorage::F32(out), candle_core::Shape::from((b, c, oh, ow))))
    }
}

/// Splits a `(B, C, h, w)` tensor into per-image feature maps (`data[(y·w + x)·C + k]`).
pub fn nchw_to_maps(x: &Tensor) -> Result<Vec<crate::backbone::FeatureMap>> {
    let (b, c, h, w) = x.dims4()?;
    let v = x.permute((0, 2, 3, 1))?.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
    Ok(v.chunks(h * w * c).take(b).map(|d| crate::backbone::FeatureMap { h, w, d: c, data: d.to_vec() }).collect())
}

/// Splits a `(B, N, D)` token tensor laid out on an `h × w` grid into feature maps.
pub fn tokens_to_maps(x: &Tensor, h: usize, w: usize) -> Result<Vec<crate::backbone::FeatureMap>> {
    let (b, n, d) = x.dims3()?;
    if n != h * w {
        bail!("{n} tokens do not form a {h}×{w} grid");
    }
    let v = x.contiguous()?.flatten_all()?.to_vec1::<f32>().context("tokens to feature maps")?;
    Ok(v.chunks(n * d).take(b).map(|c| crate::backbone::FeatureMap { h, w, d, data: c.to_vec() }).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upsampling_matches_bilinear_align_corners_false() {
        // 2 → 4: torch gives [a, .75a+.25b, .25a+.75b, b].
        let mut im = Image::new(1, 2);
        for c in 0..3 {
            im.set(c, 0, 0, 0.0);
            im.set(c, 0, 1, 1.0);
        }
        let r = resize_bilinear(&im, 1, 4);
        let row: Vec<f32> = (0..4).map(|x| r.get(0, 0, x)).collect();
        for (a, b) in row.iter().zip([0.0, 0.25, 0.75, 1.0]) {
            assert!((a - b).abs() < 1e-6, "{row:?}");
        }
    }

    #[test]
    fn downsampling_is_antialiased_and_preserves_constants() {
        // A 1-px checkerboard shrunk 4× must average to grey, not alias to black or white.
        let mut im = Image::new(16, 16);
        for y in 0..16 {
            for x in 0..16 {
                for c in 0..3 {
                    im.set(c, y, x, ((x + y) % 2) as f32);
                }
            }
        }
        let r = resize_bilinear(&im, 4, 4);
        assert!(r.data.iter().all(|v| (v - 0.5).abs() < 0.05), "{:?}", &r.data[..16]);
        let k = resize_bilinear(&Image::filled(7, 9, [0.2, 0.4, 0.6]), 23, 5);
        assert!(k.data[..23 * 5].iter().all(|v| (v - 0.2).abs() < 1e-6));
    }

    #[test]
    fn folded_batch_norm_matches_conv_then_bn() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 6, 5), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (4, 3, 3, 3), &dev).unwrap();
        let g = Tensor::new(&[1.5f32, 0.5, 1.0, 2.0], &dev).unwrap();
        let beta = Tensor::new(&[0.1f32, -0.2, 0.3, 0.0], &dev).unwrap();
        let mean = Tensor::new(&[0.2f32, 0.0, -0.5, 1.0], &dev).unwrap();
        let var = Tensor::new(&[0.5f32, 2.0, 1.0, 0.1], &dev).unwrap();
        let wts = crate::weights::pth::Weights::from_map(
            std::path::Path::new("bn"),
            [("bn.weight", &g), ("bn.bias", &beta), ("bn.running_mean", &mean), ("bn.running_var", &var)].into_iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
        );
        let f = fold_bn(&wts, w.clone(), "bn", 4, 1e-5).unwrap();
        let ours = f.conv(&x, 2, 1, Act::Relu).unwrap();
        let r = |t: &Tensor| t.reshape((1, 4, 1, 1)).unwrap();
        let y = x.conv2d(&w, 1, 2, 1, 1).unwrap();
        let reference =
            y.broadcast_sub(&r(&mean)).unwrap().broadcast_div(&r(&(var + 1e-5).unwrap().sqrt().unwrap())).unwrap().broadcast_mul(&r(&g)).unwrap().broadcast_add(&r(&beta)).unwrap().relu().unwrap();
        let d = (ours - reference).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-4, "{d}"); // outputs are O(10): f32 rounding of two evaluation orders
    }

    #[test]
    fn channels_first_convs_match_candle() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 9, 8), &dev).unwrap();
        let xc = x.transpose(0, 1).unwrap().contiguous().unwrap();
        for (k, stride, pad) in [(3, 2, 1), (3, 1, 1), (7, 2, 3), (1, 2, 0), (1, 1, 0)] {
            let w = Tensor::randn(0f32, 1.0, (4, 3, k, k), &dev).unwrap();
            let bias = Tensor::new(&[0.1f32, -0.2, 0.3, 0.0], &dev).unwrap();
            let f = FoldedConv { w2: w.flatten_from(1).unwrap().contiguous().unwrap(), bv: bias.to_vec1().unwrap(), w: w.clone(), b: bias.clone() };
            let ours = f.conv_cfirst(&xc, stride, pad, Act::None).unwrap().transpose(0, 1).unwrap();
            let reference = f.conv(&x, stride, pad, Act::None).unwrap();
            assert_eq!(ours.dims(), reference.dims(), "k{k} s{stride}");
            let d = (ours - reference).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-4, "k{k} s{stride} p{pad}: {d}");
        }
        // Depthwise in both layouts agrees.
        let kv: Vec<f32> = (0..27).map(|i| (i as f32 * 0.37).sin()).collect();
        let bias = [0.5f32, -0.5, 0.1];
        let a = depthwise3x3(&x, &kv, &bias, 2, true).unwrap();
        let c = depthwise3x3_cfirst(&xc, &kv, &bias, 2, true).unwrap().transpose(0, 1).unwrap();
        let d = (a - c).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-6, "{d}");
    }

    #[test]
    fn depthwise_matches_candle_grouped_conv() {
        // Odd and even sides (the stride-2 path splits rows and columns by parity), a 1×1
        // plane, ReLU6 on and off, and the channels-first layout.
        let dev = Device::Cpu;
        let k = Tensor::randn(0f32, 1.0, (3, 1, 3, 3), &dev).unwrap();
        let kv = k.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let bias = [0.1f32, -0.2, 0.3];
        for (h, w) in [(7, 6), (6, 7), (4, 4), (5, 5), (1, 1), (2, 3)] {
            let x = Tensor::randn(0f32, 1.0, (2, 3, h, w), &dev).unwrap();
            for stride in [1, 2] {
                for relu6 in [false, true] {
                    let ours = depthwise3x3(&x, &kv, &bias, stride, relu6).unwrap();
                    let mut reference = x.conv2d(&k, 1, stride, 1, 3).unwrap().broadcast_add(&Tensor::new(&bias, &dev).unwrap().reshape((1, 3, 1, 1)).unwrap()).unwrap();
                    if relu6 {
                        reference = reference.clamp(0f32, 6f32).unwrap();
                    }
                    assert_eq!(ours.dims(), reference.dims());
                    let d = (&ours - reference).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
                    assert!(d < 1e-5, "{h}×{w} stride {stride} relu6 {relu6}: {d}");
                    let cf = depthwise3x3_cfirst(&x.transpose(0, 1).unwrap().contiguous().unwrap(), &kv, &bias, stride, relu6).unwrap();
                    let same = cf.transpose(0, 1).unwrap().contiguous().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    assert_eq!(same, ours.flatten_all().unwrap().to_vec1::<f32>().unwrap(), "channels-first {h}×{w} stride {stride}");
                }
            }
        }
    }
}
