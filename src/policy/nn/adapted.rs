//! A linear layer addressed by its checkpoint name that carries LoRA adapters named the
//! way diffusers and PEFT name them (`transformer_blocks.3.attn.to_q`, …), so the adapter
//! map is the exported state dict. A fused checkpoint layer (SD3's qkv, FLUX's qkv or its
//! single blocks' qkv + MLP projection) is several diffusers modules, each a row block of
//! the output with its own adapter.

use candle_core::{Result, Tensor, D};
use candle_nn::{Init, VarBuilder};

use crate::policy::nn::layers::{Linear, LoraCtx};

/// The diffusers modules of a checkpoint-named linear layer (a path without `.weight`):
/// each module's name and its output rows (0: an equal share of the layer's rows), and
/// whether LoRA is refused there (layers whose output halves the two layouts store
/// swapped). None for a name outside the layout.
pub type DiffusersNames<'a> = &'a dyn Fn(&str) -> Option<(Vec<(String, usize)>, bool)>;

/// [`DiffusersNames`] boxed, as a policy hands it out ([`crate::policy::Policy::diffusers_names`]).
pub type BoxedNames<'a> = Box<dyn Fn(&str) -> Option<(Vec<(String, usize)>, bool)> + 'a>;

/// Each diffusers module's rows of a layer with `dout` output rows, in order (a module
/// given 0 rows takes an equal share).
pub fn row_ranges(modules: Vec<(String, usize)>, dout: usize) -> Vec<(String, std::ops::Range<usize>)> {
    let share = dout / modules.len().max(1);
    let mut start = 0;
    modules
        .into_iter()
        .map(|(name, rows)| {
            let rows = if rows == 0 { share } else { rows };
            start += rows;
            (name, start - rows..start)
        })
        .collect()
}

/// LoRA for a transformer: the adapter spec and where its names come from.
pub struct Lora<'a> {
    pub ctx: &'a LoraCtx,
    pub names: DiffusersNames<'a>,
    /// The model, for errors ("SD3 transformer").
    pub model: &'static str,
}

/// One LoRA adapter on a row block of a layer's output.
struct Part {
    rows: std::ops::Range<usize>,
    a: Tensor,
    b: Tensor,
    scale: f64,
}

/// A linear layer with LoRA on each of its diffusers-named parts that matches a target.
pub struct Proj {
    pub base: Linear,
    parts: Vec<Part>,
}

impl Proj {
    pub fn new(vb: &VarBuilder, din: usize, dout: usize, init: Option<Init>, lora: Option<&Lora>) -> Result<Self> {
        let base = Linear::new_with_init(vb, din, dout, true, None, init)?;
        let mut parts = Vec::new();
        if let Some(l) = lora {
            let path = vb.prefix();
            let Some((names, swapped)) = (l.names)(&path) else {
                candle_core::bail!("{}: layer {path} has no diffusers name", l.model);
            };
            let spec = &l.ctx.spec;
            let bound = 1.0 / (din as f64).sqrt();
            let ranges = row_ranges(names, dout);
            let covered = ranges.last().map_or(0, |(_, r)| r.end);
            if covered != dout {
                candle_core::bail!("{}: the diffusers modules of {path} cover {covered} of its {dout} output rows", l.model);
            }
            for (name, range) in ranges {
                if !spec.targets.iter().any(|t| name.contains(t.as_str())) {
                    continue;
                }
                if swapped {
                    candle_core::bail!("train.lora_targets: LoRA on {name} (a continuous adaLN layer whose halves diffusers stores swapped) is not supported");
                }
                let lvb = l.ctx.vb.pp(&name);
                let a = lvb.get_with_hints((spec.rank, din), "lora_A.weight", Init::Uniform { lo: -bound, up: bound })?;
                let b = lvb.get_with_hints((range.len(), spec.rank), "lora_B.weight", Init::Const(0.0))?;
                parts.push(Part { rows: range, a, b, scale: spec.alpha / spec.rank as f64 });
            }
        }
        Ok(Self { base, parts })
    }

    /// Adapters on this layer.
    pub fn adapters(&self) -> usize {
        self.parts.len()
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.base.forward(x)?;
        if self.parts.is_empty() {
            return Ok(y);
        }
        let din = x.dim(D::Minus1)?;
        let x2 = x.reshape((x.elem_count() / din, din))?;
        let dout = self.base.weight.dim(0)?;
        let mut segs = Vec::new();
        let mut at = 0;
        for p in &self.parts {
            if p.rows.start > at {
                segs.push(Tensor::zeros((x2.dim(0)?, p.rows.start - at), y.dtype(), y.device())?);
            }
            // Adapters stay f32 (the optimizer's precision) under bf16 base weights.
            // Scaled at rank r (the small tensor), as in `block::fused_linear`.
            segs.push((x2.matmul(&p.a.to_dtype(x2.dtype())?.t()?)? * p.scale)?.matmul(&p.b.to_dtype(x2.dtype())?.t()?)?);
            at = p.rows.end;
        }
        if at < dout {
            segs.push(Tensor::zeros((x2.dim(0)?, dout - at), y.dtype(), y.device())?);
        }
        let delta = Tensor::cat(&segs, 1)?.reshape(y.shape())?;
        y + delta
    }
}
