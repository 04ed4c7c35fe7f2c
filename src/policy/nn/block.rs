//! The DiT block (adaLN modulation, multi-head self-attention, GELU MLP) that the
//! trainable policies stack.
//!
//! Two numerically equivalent paths: `fused: false` composes only candle ops that have a
//! backward (the reference, used to validate the fast one), `fused: true` routes the
//! expensive pieces through the custom ops in `ops.rs`, which carry hand-written backward
//! passes.

use candle_core::{Result, Tensor, D};
use candle_nn::{Init, VarBuilder};

use crate::policy::nn::layers::{layer_norm_plain, Linear, LoraCtx};
use crate::policy::nn::ops;

/// Shape of one block.
#[derive(Clone, Debug)]
pub struct BlockConfig {
    /// Token width D.
    pub dim: usize,
    /// Number of attention heads; must divide `dim`.
    pub heads: usize,
    /// MLP hidden width = `mlp_ratio · dim`.
    pub mlp_ratio: usize,
    /// Use the fused custom ops (`ops.rs`) instead of composed candle ops.
    pub fused: bool,
}

/// One adaLN DiT block.
#[derive(Clone, Debug)]
pub struct DitBlock {
    /// adaLN modulation: dim → 6·dim (shift1, scale1, gate1, shift2, scale2, gate2).
    pub ada: Linear,
    /// Fused q/k/v projection: dim → 3·dim.
    pub qkv: Linear,
    /// Attention output projection: dim → dim.
    pub proj: Linear,
    /// MLP up-projection: dim → mlp_ratio·dim.
    pub fc1: Linear,
    /// MLP down-projection: mlp_ratio·dim → dim.
    pub fc2: Linear,
    /// The configuration the block was built with.
    pub cfg: BlockConfig,
}

/// Layer-norm epsilon (DiT uses 1e-6 with no affine parameters).
pub const LN_EPS: f64 = 1e-6;

impl DitBlock {
    /// Parameters under `vb`: "ada" (Linear dim→6·dim, the adaLN modulation), "attn.qkv"
    /// (dim→3·dim, bias), "attn.proj" (dim→dim, bias), "mlp.fc1" (dim→mlp_ratio·dim, bias),
    /// "mlp.fc2" (back, bias). All are LoRA-aware; `lora` is passed through.
    pub fn new(vb: &VarBuilder, cfg: &BlockConfig, lora: Option<&LoraCtx>) -> Result<Self> {
        let d = cfg.dim;
        if cfg.heads == 0 || !d.is_multiple_of(cfg.heads) {
            candle_core::bail!("policy/block.rs: BlockConfig.dim ({d}) must be a positive multiple of BlockConfig.heads ({})", cfg.heads);
        }
        if cfg.mlp_ratio == 0 {
            candle_core::bail!("policy/block.rs: BlockConfig.mlp_ratio must be >= 1");
        }
        // Small random (not zero) modulation weights: with adaLN-Zero every gate starts at 0
        // and the attention/MLP weights get no gradient on the first step, which both hides
        // bugs in tests and wastes the first update.
        let ada = Linear::new_with_init(&vb.pp("ada"), d, 6 * d, true, lora, Some(Init::Uniform { lo: -0.02, up: 0.02 }))?;
        let qkv = Linear::new(&vb.pp("attn.qkv"), d, 3 * d, true, lora)?;
        let proj = Linear::new(&vb.pp("attn.proj"), d, d, true, lora)?;
        let hidden = cfg.mlp_ratio * d;
        let fc1 = Linear::new(&vb.pp("mlp.fc1"), d, hidden, true, lora)?;
        let fc2 = Linear::new(&vb.pp("mlp.fc2"), hidden, d, true, lora)?;
        Ok(Self { ada, qkv, proj, fc1, fc2, cfg: cfg.clone() })
    }

    /// x: (B, N, D) tokens, c: (B, D) conditioning (timestep + pooled prompt) → (B, N, D).
    pub fn forward(&self, x: &Tensor, c: &Tensor) -> Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        if d != self.cfg.dim {
            candle_core::bail!("policy/block.rs: tokens x have width {d}, block expects {}", self.cfg.dim);
        }
        let (cb, cd) = c.dims2()?;
        if cb != b || cd != d {
            candle_core::bail!("policy/block.rs: conditioning c has shape ({cb}, {cd}), expected ({b}, {d})");
        }
        // The fused ops are CPU kernels; elsewhere the reference path (same numbers) runs.
        if self.cfg.fused && x.device().is_cpu() {
            self.forward_fused(x, c, b, n, d)
        } else {
            self.forward_reference(x, c, b, n, d)
        }
    }

    /// Reference path: only candle ops with a backward.
    fn forward_reference(&self, x: &Tensor, c: &Tensor, b: usize, n: usize, d: usize) -> Result<Tensor> {
        let h_ = self.cfg.heads;
        let dh = d / h_;
        let m = self.ada.forward(&candle_nn::ops::silu(c)?)?; // (B, 6D)
        let chunk = |i: usize| m.narrow(1, i * d, d)?.unsqueeze(1); // (B, 1, D)
        let (shift1, scale1, gate1) = (chunk(0)?, chunk(1)?, chunk(2)?);
        let (shift2, scale2, gate2) = (chunk(3)?, chunk(4)?, chunk(5)?);

        let h = layer_norm_plain(x, LN_EPS)?.broadcast_mul(&(scale1 + 1.0)?)?.broadcast_add(&shift1)?;
        let qkv = self.qkv.forward(&h)?; // (B, N, 3D)
        let qkv = qkv.reshape((b, n, 3, h_, dh))?.permute((2, 0, 3, 1, 4))?; // (3, B, H, N, dh)
        let q = qkv.get(0)?.contiguous()?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        let s = (q.matmul(&k.t()?)? * (1.0 / (dh as f64).sqrt()))?;
        let p = candle_nn::ops::softmax(&s, D::Minus1)?;
        let o = p.matmul(&v)?; // (B, H, N, dh)
        let o = o.transpose(1, 2)?.reshape((b, n, d))?;
        let x = (x + self.proj.forward(&o)?.broadcast_mul(&gate1)?)?;

        let h = layer_norm_plain(&x, LN_EPS)?.broadcast_mul(&(scale2 + 1.0)?)?.broadcast_add(&shift2)?;
        let y = self.fc2.forward(&self.fc1.forward(&h)?.gelu()?)?;
        x + y.broadcast_mul(&gate2)?
    }

    /// Fast path: the same computation through the fused custom ops of `ops.rs`.
    fn forward_fused(&self, x: &Tensor, c: &Tensor, _b: usize, _n: usize, d: usize) -> Result<Tensor> {
        let m = fused_linear(&self.ada, &candle_nn::ops::silu(c)?)?; // (B, 6D)
        let chunk = |i: usize| m.narrow(1, i * d, d); // (B, D)
        let x = x.contiguous()?;
        let h = ops::ln_modulate(&x, &chunk(0)?, &chunk(1)?)?;
        let o = ops::attention_packed(&fused_linear(&self.qkv, &h)?, self.cfg.heads)?;
        let x = ops::gated_residual(&x, &fused_linear(&self.proj, &o)?, &chunk(2)?)?;
        let h = ops::ln_modulate(&x, &chunk(3)?, &chunk(4)?)?;
        let y = fused_linear(&self.fc2, &ops::gelu_tanh(&fused_linear(&self.fc1, &h)?)?)?;
        ops::gated_residual(&x, &y, &chunk(5)?)
    }
}

/// `Linear::forward` through the fused `ops::linear_bias` (LoRA term added with candle ops).
pub(crate) fn fused_linear(l: &Linear, x: &Tensor) -> Result<Tensor> {
    let Some(bias) = &l.bias else { return l.forward(x) };
    if !x.device().is_cpu() {
        return l.forward(x); // the fused kernel is CPU code
    }
    let y = ops::linear_bias(x, &l.weight, bias)?;
    match &l.lora {
        None => Ok(y),
        Some((a, b, s)) => {
            // Scaled at rank r, not at the output width: one pass over a 1/r-sized tensor.
            let low = (x.broadcast_matmul(&a.t()?)? * *s)?.broadcast_matmul(&b.t()?)?;
            y + low
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use candle_nn::VarMap;

    pub(crate) fn build(fused: bool, dtype: DType) -> (VarMap, DitBlock) {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, dtype, &Device::Cpu);
        let cfg = BlockConfig { dim: 16, heads: 2, mlp_ratio: 4, fused };
        let blk = DitBlock::new(&vb.pp("blk"), &cfg, None).unwrap();
        (vm, blk)
    }

    fn inputs(dtype: DType) -> (Tensor, Tensor) {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 5, 16), &dev).unwrap().to_dtype(dtype).unwrap();
        let c = Tensor::randn(0f32, 1.0, (2, 16), &dev).unwrap().to_dtype(dtype).unwrap();
        (x, c)
    }

    #[test]
    fn reference_shapes_and_bad_inputs() {
        let (_vm, blk) = build(false, DType::F32);
        let (x, c) = inputs(DType::F32);
        let y = blk.forward(&x, &c).unwrap();
        assert_eq!(y.dims(), &[2, 5, 16]);
        let bad_c = Tensor::zeros((3, 16), DType::F32, &Device::Cpu).unwrap();
        assert!(blk.forward(&x, &bad_c).is_err());
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let cfg = BlockConfig { dim: 10, heads: 3, mlp_ratio: 4, fused: false };
        assert!(DitBlock::new(&vb, &cfg, None).is_err());
    }

    /// Every parameter gets a finite, non-zero gradient from one backward pass.
    fn every_param_gets_grad(fused: bool) {
        let (vm, blk) = build(fused, DType::F32);
        let (x, c) = inputs(DType::F32);
        let x = Var::from_tensor(&x).unwrap();
        let c = Var::from_tensor(&c).unwrap();
        let y = blk.forward(x.as_tensor(), c.as_tensor()).unwrap();
        // A non-symmetric scalar so no gradient cancels by construction.
        let w = Tensor::randn(0f32, 1.0, y.dims(), &Device::Cpu).unwrap();
        let loss = (y * w).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let data = vm.data().lock().unwrap();
        assert_eq!(data.len(), 10, "5 linears x (weight, bias)");
        let mut all: Vec<(String, Tensor)> = data.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
        all.push(("x".into(), x.as_tensor().clone()));
        all.push(("c".into(), c.as_tensor().clone()));
        for (name, t) in all {
            let g = grads.get(&t).unwrap_or_else(|| panic!("no gradient for {name}"));
            assert_eq!(g.dims(), t.dims(), "{name}");
            let v: Vec<f32> = g.flatten_all().unwrap().to_vec1().unwrap();
            assert!(v.iter().all(|a| a.is_finite()), "non-finite gradient for {name}");
            let nz = v.iter().filter(|a| **a != 0.0).count();
            assert!(nz > 0, "all-zero gradient for {name}");
        }
    }

    #[test]
    fn reference_every_param_gets_grad() {
        every_param_gets_grad(false);
    }

    /// f64 finite differences through the whole reference block, for a few parameter entries
    /// of every tensor plus inputs: guards the composition (gates, modulation, head split).
    #[test]
    fn reference_block_finite_difference_f64() {
        let (vm, blk) = build(false, DType::F64);
        let (x, c) = inputs(DType::F64);
        let w = Tensor::randn(0f64, 1.0, (2, 5, 16), &Device::Cpu).unwrap();
        let loss_of = |x: &Tensor, c: &Tensor| -> f64 { (blk.forward(x, c).unwrap() * &w).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap() };
        let xv = Var::from_tensor(&x).unwrap();
        let cv = Var::from_tensor(&c).unwrap();
        let loss = (blk.forward(xv.as_tensor(), cv.as_tensor()).unwrap() * &w).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let eps = 1e-6;
        let vars: Vec<(String, Var)> = vm.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let mut checks: Vec<(String, Var)> = vars;
        checks.push(("x".into(), xv.clone()));
        checks.push(("c".into(), cv.clone()));
        for (name, var) in checks {
            let g: Vec<f64> = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let orig: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            let n = orig.len();
            for idx in [0, n / 3, n / 2, n - 1] {
                let eval = |delta: f64| {
                    let mut v = orig.clone();
                    v[idx] += delta;
                    var.set(&Tensor::from_vec(v, var.as_tensor().dims(), &Device::Cpu).unwrap()).unwrap();
                    loss_of(xv.as_tensor(), cv.as_tensor())
                };
                let fd = (eval(eps) - eval(-eps)) / (2.0 * eps);
                var.set(&Tensor::from_vec(orig.clone(), var.as_tensor().dims(), &Device::Cpu).unwrap()).unwrap();
                let err = (fd - g[idx]).abs();
                assert!(err <= 1e-5 * (1.0 + fd.abs()), "{name}[{idx}]: fd {fd} vs autodiff {}", g[idx]);
            }
        }
    }

    #[test]
    fn fused_every_param_gets_grad() {
        every_param_gets_grad(true);
    }

    /// Fused and reference paths agree on outputs and on every gradient (same weights).
    #[test]
    fn fused_matches_reference_outputs_and_grads() {
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let mk = |fused| DitBlock::new(&vb.pp("blk"), &BlockConfig { dim: 32, heads: 4, mlp_ratio: 4, fused }, None).unwrap();
        let (reference, fused) = (mk(false), mk(true));
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 9, 32), &Device::Cpu).unwrap()).unwrap();
        let c = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 32), &Device::Cpu).unwrap()).unwrap();
        let w = Tensor::randn(0f32, 1.0, (3, 9, 32), &Device::Cpu).unwrap();
        let run = |blk: &DitBlock| {
            let y = blk.forward(x.as_tensor(), c.as_tensor()).unwrap();
            let g = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            (y, g)
        };
        let (yr, gr) = run(&reference);
        let (yf, gf) = run(&fused);
        let rel = |a: &Tensor, b: &Tensor| -> f32 {
            let num = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let den = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            num / den.max(1e-12)
        };
        assert!(rel(&yf, &yr) < 1e-4, "outputs differ: {}", rel(&yf, &yr));
        let mut all: Vec<(String, Tensor)> = vm.data().lock().unwrap().iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
        all.push(("x".into(), x.as_tensor().clone()));
        all.push(("c".into(), c.as_tensor().clone()));
        for (name, t) in all {
            let (a, b) = (gf.get(&t).unwrap(), gr.get(&t).unwrap());
            assert!(rel(a, b) < 1e-4, "gradient of {name} differs: {}", rel(a, b));
        }
    }

    /// With LoRA adapters on every linear, fused and reference agree on outputs and on the
    /// adapter gradients (B starts at zero, so perturb it to make the test meaningful).
    #[test]
    fn fused_matches_reference_with_lora() {
        use crate::policy::nn::layers::{LoraCtx, LoraSpec};
        let dev = Device::Cpu;
        let base = VarMap::new();
        let lora_vm = VarMap::new();
        let ctx = LoraCtx { vb: VarBuilder::from_varmap(&lora_vm, DType::F32, &dev), spec: LoraSpec { rank: 2, alpha: 4.0, targets: vec!["attn".into(), "mlp".into(), "ada".into()] } };
        let vb = VarBuilder::from_varmap(&base, DType::F32, &dev);
        let mk = |fused| DitBlock::new(&vb.pp("blk"), &BlockConfig { dim: 16, heads: 2, mlp_ratio: 2, fused }, Some(&ctx)).unwrap();
        let (reference, fused) = (mk(false), mk(true));
        for (_, v) in lora_vm.data().lock().unwrap().iter() {
            v.set(&Tensor::randn(0f32, 0.1, v.as_tensor().dims(), &dev).unwrap()).unwrap();
        }
        let (x, c) = inputs(DType::F32);
        let run = |blk: &DitBlock| {
            let y = blk.forward(&x, &c).unwrap();
            let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            (y, g)
        };
        let ((yr, gr), (yf, gf)) = (run(&reference), run(&fused));
        let err = |a: &Tensor, b: &Tensor| -> f32 {
            let n = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            n / b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-12)
        };
        assert!(err(&yf, &yr) < 1e-4);
        let data = lora_vm.data().lock().unwrap();
        assert_eq!(data.len(), 10, "5 adapters x (lora_a, lora_b)");
        for (name, v) in data.iter() {
            let (a, b) = (gf.get(v.as_tensor()).unwrap(), gr.get(v.as_tensor()).unwrap());
            assert!(err(a, b) < 1e-4, "LoRA gradient {name} differs: {}", err(a, b));
        }
    }
}
