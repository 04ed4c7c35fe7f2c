//! A convolutional stem and head around the DiT's patch tokens (`model.conv_channels > 0`).
//!
//! Why: with a plain patchify, a token sees only its own p×p pixels and each output patch
//! comes from one token, so at high noise every token decides "object or background" on
//! disjoint evidence; the samples come out as patch-sized fragments (bench/NOTES.md §3).
//! Two 3×3 convolutions before patchifying give neighbouring tokens overlapping receptive
//! fields, and a skip-connected 3×3 conv head lets every output pixel combine the tokens
//! around it — the locality a small U-Net has, at a fraction of its cost.
//!
//! Tensors are channels-last (B, H, W, C) inside. A 3×3 convolution is im2col (a custom op
//! with col2im as its backward, `ops::im2col3x3`) followed by one GEMM, so every weight is
//! a plain [`Linear`] named
//! `{prefix}.weight` with shape (C_out, 9·C_in), input index (dy·3 + dx)·C_in + c.

use candle_core::{Result, Tensor};
use candle_nn::{Init, VarBuilder};

use crate::policy::nn::layers::{Linear, LoraCtx};
use crate::policy::nn::ops;

/// 3×3 convolution, stride 1, zero padding 1, channels-last.
#[derive(Clone, Debug)]
pub struct Conv3x3 {
    pub lin: Linear,
}

impl Conv3x3 {
    pub fn new(vb: &VarBuilder, c_in: usize, c_out: usize, lora: Option<&LoraCtx>, init: Option<Init>) -> Result<Self> {
        Ok(Self { lin: Linear::new_with_init(vb, 9 * c_in, c_out, true, lora, init)? })
    }

    /// x: (B, H, W, C_in) → (B, H, W, C_out).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::policy::nn::block::fused_linear(&self.lin, &crate::policy::nn::ops::im2col3x3(x)?)
    }
}

/// Pixels (B, H, W, C) → tokens (B, (H/p)·(W/p), p·p·C), row-major over the token grid,
/// each token's values ordered (py, px, c).
pub fn patchify(x: &Tensor, p: usize) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    x.reshape((b, h / p, p, w / p, p, c))?.permute((0, 1, 3, 2, 4, 5))?.reshape((b, (h / p) * (w / p), p * p * c))
}

/// Inverse of [`patchify`]: tokens (B, gh·gw, p·p·C) → pixels (B, gh·p, gw·p, C).
pub fn unpatchify(x: &Tensor, gh: usize, gw: usize, p: usize, c: usize) -> Result<Tensor> {
    let b = x.dim(0)?;
    x.reshape((b, gh, gw, p, p, c))?.permute((0, 1, 3, 2, 4, 5))?.reshape((b, gh * p, gw * p, c))
}

/// Stem: (B, 3, H, W) latents → (B, H, W, C) features: conv(3→C), GELU, conv(C→C), GELU
/// (the fused tanh-GELU: one-pass backward).
#[derive(Clone, Debug)]
pub struct ConvStem {
    c1: Conv3x3,
    c2: Conv3x3,
}

impl ConvStem {
    /// Parameters `stem.conv1`, `stem.conv2`.
    pub fn new(vb: &VarBuilder, channels: usize, lora: Option<&LoraCtx>) -> Result<Self> {
        let c1 = Conv3x3::new(&vb.pp("stem.conv1"), 3, channels, lora, None)?;
        let c2 = Conv3x3::new(&vb.pp("stem.conv2"), channels, channels, lora, None)?;
        Ok(Self { c1, c2 })
    }

    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let x = z.permute((0, 2, 3, 1))?.contiguous()?;
        ops::gelu_tanh(&self.c2.forward(&ops::gelu_tanh(&self.c1.forward(&x)?)?)?)
    }
}

/// Head: unpatchified token features (B, H, W, C) concatenated with the stem features →
/// conv(2C→C), GELU, conv(C→3) → (B, 3, H, W). The last conv starts near zero (like the
/// DiT's final linear) so a fresh model outputs ≈ 0.
#[derive(Clone, Debug)]
pub struct ConvHead {
    c1: Conv3x3,
    c2: Conv3x3,
}

impl ConvHead {
    /// Parameters `head_conv.conv1`, `head_conv.conv2`.
    pub fn new(vb: &VarBuilder, channels: usize, lora: Option<&LoraCtx>) -> Result<Self> {
        let c1 = Conv3x3::new(&vb.pp("head_conv.conv1"), 2 * channels, channels, lora, None)?;
        let c2 = Conv3x3::new(&vb.pp("head_conv.conv2"), channels, 3, lora, Some(Init::Uniform { lo: -0.02, up: 0.02 }))?;
        Ok(Self { c1, c2 })
    }

    pub fn forward(&self, tokens_px: &Tensor, skip: &Tensor) -> Result<Tensor> {
        let x = Tensor::cat(&[tokens_px, skip], 3)?;
        let y = self.c2.forward(&ops::gelu_tanh(&self.c1.forward(&x)?)?)?;
        y.permute((0, 3, 1, 2))?.contiguous()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    /// The im2col convolution equals a direct 3×3 cross-correlation with zero padding.
    #[test]
    fn conv3x3_matches_direct_loop() {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let vb = crate::policy::seeded_var_builder(&vm, 3, &dev);
        let (b, h, w, ci, co) = (2usize, 5usize, 4usize, 3usize, 2usize);
        let conv = Conv3x3::new(&vb.pp("c"), ci, co, None, None).unwrap();
        let x = Tensor::randn(0f32, 1.0, (b, h, w, ci), &dev).unwrap();
        let y: Vec<f32> = conv.forward(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let wt: Vec<f32> = conv.lin.weight.flatten_all().unwrap().to_vec1().unwrap();
        let bias: Vec<f32> = conv.lin.bias.as_ref().unwrap().to_vec1().unwrap();
        for n in 0..b {
            for i in 0..h {
                for j in 0..w {
                    for o in 0..co {
                        let mut acc = bias[o];
                        for dy in 0..3 {
                            for dx in 0..3 {
                                let (yy, xx) = (i as isize + dy as isize - 1, j as isize + dx as isize - 1);
                                if yy < 0 || xx < 0 || yy >= h as isize || xx >= w as isize {
                                    continue;
                                }
                                for c in 0..ci {
                                    let xv = xs[((n * h + yy as usize) * w + xx as usize) * ci + c];
                                    acc += wt[o * 9 * ci + (dy * 3 + dx) * ci + c] * xv;
                                }
                            }
                        }
                        let got = y[((n * h + i) * w + j) * co + o];
                        assert!((got - acc).abs() < 1e-5, "({n},{i},{j},{o}): {got} vs {acc}");
                    }
                }
            }
        }
    }

    /// Gradient of a scalar of the conv output with respect to its input, against central
    /// finite differences (col2im + the linear's backward).
    #[test]
    fn conv3x3_input_gradient_matches_finite_differences() {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let vb = crate::policy::seeded_var_builder(&vm, 5, &dev);
        let conv = Conv3x3::new(&vb.pp("c"), 2, 3, None, None).unwrap();
        let x0 = Tensor::randn(0f64, 1.0, (1, 4, 3, 2), &dev).unwrap().to_dtype(DType::F32).unwrap();
        let xv = candle_core::Var::from_tensor(&x0).unwrap();
        let f = |x: &Tensor| conv.forward(x).unwrap().sqr().unwrap().sum_all().unwrap();
        let g = f(xv.as_tensor()).backward().unwrap();
        let grad: Vec<f32> = g.get(xv.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let base: Vec<f32> = x0.flatten_all().unwrap().to_vec1().unwrap();
        let eps = 1e-2f32;
        for k in 0..base.len() {
            let mut p = base.clone();
            p[k] += eps;
            let mut m = base.clone();
            m[k] -= eps;
            let fp: f32 = f(&Tensor::from_vec(p, (1, 4, 3, 2), &dev).unwrap()).to_scalar().unwrap();
            let fm: f32 = f(&Tensor::from_vec(m, (1, 4, 3, 2), &dev).unwrap()).to_scalar().unwrap();
            let fd = (fp - fm) / (2.0 * eps);
            assert!((fd - grad[k]).abs() < 2e-2 * (1.0 + fd.abs()), "x[{k}]: analytic {} vs fd {fd}", grad[k]);
        }
    }

    #[test]
    fn patchify_roundtrip() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 8, 12, 3), &dev).unwrap();
        let t = patchify(&x, 4).unwrap();
        assert_eq!(t.dims(), &[2, 6, 48]);
        let back = unpatchify(&t, 2, 3, 4, 3).unwrap();
        let d: f32 = (back - &x).unwrap().abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert_eq!(d, 0.0);
    }
}
