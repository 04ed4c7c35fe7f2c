//! Differentiable building blocks shared by the trainable policies.
//!
//! Candle's fused `layer_norm`/`rms_norm`/`softmax_last_dim` kernels have no backward
//! (gradients are silently dropped), so trainable code composes plain ops here or uses
//! the custom ops in `ops.rs`, which carry their own backward.

use candle_core::{DType, Result, Tensor, D};
use candle_nn::{Init, VarBuilder};

/// LoRA settings: which linear layers get adapters, and their rank/scale.
#[derive(Clone, Debug)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f64,
    /// Substring patterns matched against the layer's full parameter path
    /// (e.g. "attn.qkv", "mlp"); a layer gets an adapter if any pattern matches.
    pub targets: Vec<String>,
}

/// Where LoRA adapters are created: their own VarBuilder (backed by their own VarMap, so
/// the trainable set is exactly the adapters) plus the spec. `None` = full fine-tuning.
#[derive(Clone)]
pub struct LoraCtx {
    pub vb: VarBuilder<'static>,
    pub spec: LoraSpec,
}

/// Linear layer with an optional LoRA adapter: y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ (no merged copy,
/// so the base weight stays exactly the frozen one).
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<(Tensor, Tensor, f64)>,
}

impl Linear {
    /// `vb` addresses the base weights (`{prefix}.weight`, `{prefix}.bias`).
    pub fn new(vb: &VarBuilder, in_dim: usize, out_dim: usize, bias: bool, lora: Option<&LoraCtx>) -> Result<Self> {
        Self::new_with_init(vb, in_dim, out_dim, bias, lora, None)
    }

    /// Same as `new` but with an explicit weight init (e.g. zeros for adaLN-Zero gates).
    pub fn new_with_init(vb: &VarBuilder, in_dim: usize, out_dim: usize, bias: bool, lora: Option<&LoraCtx>, init: Option<Init>) -> Result<Self> {
        let bound = 1.0 / (in_dim as f64).sqrt();
        let winit = init.unwrap_or(Init::Uniform { lo: -bound, up: bound });
        let weight = vb.get_with_hints((out_dim, in_dim), "weight", winit)?;
        let bias = if bias {
            let binit = match init {
                Some(_) => Init::Const(0.0),
                None => Init::Uniform { lo: -bound, up: bound },
            };
            Some(vb.get_with_hints(out_dim, "bias", binit)?)
        } else {
            None
        };
        let path = vb.prefix();
        let lora = match lora {
            Some(ctx) if ctx.spec.targets.iter().any(|t| path.contains(t.as_str())) => {
                let lvb = ctx.vb.pp(&path);
                let r = ctx.spec.rank;
                // Standard LoRA init: A ~ Kaiming-uniform-ish, B = 0, so the adapted model
                // starts exactly at the base model.
                let a = lvb.get_with_hints((r, in_dim), "lora_a", Init::Uniform { lo: -bound, up: bound })?;
                let b = lvb.get_with_hints((out_dim, r), "lora_b", Init::Const(0.0))?;
                Some((a, b, ctx.spec.alpha / r as f64))
            }
            _ => None,
        };
        Ok(Self { weight, bias, lora })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Flatten leading dims so every product is one plain 2-D matmul.
        let dims = x.dims().to_vec();
        let in_dim = *dims.last().unwrap();
        let rows = x.elem_count() / in_dim;
        let x2 = x.reshape((rows, in_dim))?;
        let mut y = x2.matmul(&self.weight.t()?)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        if let Some((a, b, s)) = &self.lora {
            let low = (x2.matmul(&a.t()?)? * *s)?; // scaled at rank r: a small tensor
            y = (y + low.matmul(&b.t()?)?)?;
        }
        let mut out = dims;
        *out.last_mut().unwrap() = y.dim(1)?;
        y.reshape(out)
    }
}

/// Layer norm without affine parameters, composed from differentiable ops.
pub fn layer_norm_plain(x: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    xc.broadcast_div(&(var + eps)?.sqrt()?)
}

/// `f` computed in f32 for a bf16 / f16 `x` (norms and softmax: mixed precision as torch
/// autocast runs them), the result back in `x`'s dtype; f32 passes straight through.
pub fn in_f32(x: &Tensor, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
    match x.dtype() {
        DType::F32 | DType::F64 => f(x),
        dt => f(&x.to_dtype(DType::F32)?)?.to_dtype(dt),
    }
}

/// Layer norm without affine parameters (eps 1e-6), in f32.
pub fn ln(x: &Tensor) -> Result<Tensor> {
    in_f32(x, |x| layer_norm_plain(x, 1e-6))
}

/// Layer norm with learned scale and shift (used by the text encoder).
#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(vb: &VarBuilder, dim: usize) -> Result<Self> {
        Ok(Self { weight: vb.get_with_hints(dim, "weight", Init::Const(1.0))?, bias: vb.get_with_hints(dim, "bias", Init::Const(0.0))?, eps: 1e-6 })
    }
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm_plain(x, self.eps)?.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)
    }
}

/// Sinusoidal embedding of a scalar per batch element (timestep 1000·σ), shape (B, dim).
pub fn timestep_embedding(t: &Tensor, dim: usize) -> Result<Tensor> {
    let half = dim / 2;
    let dev = t.device();
    let freqs: Vec<f32> = (0..half).map(|i| (-(10000f64.ln()) * i as f64 / half as f64).exp() as f32).collect();
    let freqs = Tensor::from_vec(freqs, (1, half), dev)?.to_dtype(t.dtype())?;
    let args = t.to_dtype(DType::F32)?.to_dtype(t.dtype())?.unsqueeze(1)?.broadcast_mul(&freqs)?;
    Tensor::cat(&[args.cos()?, args.sin()?], 1)
}
