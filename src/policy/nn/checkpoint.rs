//! Block-level activation checkpointing for candle, which has no hook for it: a block runs
//! as one custom graph node whose forward records no graph (only the block's input is
//! kept) and whose backward recomputes the block with a graph, backpropagates the incoming
//! gradient through it and returns the input's gradient. The weights' gradients of that
//! inner backward cannot travel through candle's backprop, so they go to a side store that
//! [`backward`] merges into the caller's [`GradStore`]. A block's several inputs (e.g.
//! image tokens, text tokens and the conditioning vector) travel packed in one tensor.

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, TensorId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A block as a function of one packed tensor.
pub trait PackedBlock: Send + Sync {
    fn forward_packed(&self, packed: &Tensor) -> Result<Tensor>;
}

/// Weight gradients of checkpointed blocks, by tensor id.
#[derive(Clone, Default)]
pub struct SideGrads(Arc<Mutex<HashMap<TensorId, Tensor>>>);

/// `block(packed)` as one checkpointed node. With trainable weights only inside blocks
/// nothing upstream is tracked, and candle records an op only on a tracked input, so an
/// untracked input becomes a leaf; its gradient is then neither computed nor returned, so
/// the step's gradient store holds the trainable tensors only.
pub fn checkpointed(block: Arc<dyn PackedBlock>, packed: &Tensor, grads: &SideGrads) -> Result<Tensor> {
    let packed = packed.contiguous()?;
    let input_grad = packed.track_op();
    let packed = if input_grad { packed } else { candle_core::Var::from_tensor(&packed)?.into_inner() };
    packed.apply_op1(Checkpoint { block, grads: grads.clone(), input_grad })
}

/// `loss.backward()`, plus the weight gradients the checkpointed blocks collected when a
/// model checkpoints (`side` is its store).
pub fn backward_opt(loss: &Tensor, side: Option<&SideGrads>) -> Result<GradStore> {
    match side {
        Some(s) => backward(loss, s),
        None => loss.backward(),
    }
}

/// `loss.backward()` plus the weight gradients the checkpointed blocks collected.
pub fn backward(loss: &Tensor, side: &SideGrads) -> Result<GradStore> {
    side.0.lock().unwrap().clear();
    let mut grads = loss.backward()?;
    for (id, g) in side.0.lock().unwrap().drain() {
        let sum = match grads.get_id(id) {
            Some(prev) => (prev + g)?,
            None => g,
        };
        grads.insert_id(id, sum);
    }
    Ok(grads)
}

struct Checkpoint {
    block: Arc<dyn PackedBlock>,
    grads: SideGrads,
    /// Whether the block's input leads to a trainable tensor (false for the first block).
    input_grad: bool,
}

impl Checkpoint {
    /// The block on a storage without a graph; a fresh contiguous result.
    fn run(&self, storage: candle_core::Storage, layout: &candle_core::Layout) -> Result<(Tensor, candle_core::Shape)> {
        if !layout.is_contiguous() || layout.start_offset() != 0 {
            candle_core::bail!("checkpoint: input must be contiguous from offset 0");
        }
        let t = Tensor::from_storage(storage, layout.shape().clone(), candle_core::op::BackpropOp::none(), false);
        // LoRA weights are Vars, so the block records a graph anyway; detaching drops it.
        let out = self.block.forward_packed(&t)?.detach();
        let out = if out.is_contiguous() && out.layout().start_offset() == 0 { out } else { out.copy()? };
        let shape = out.shape().clone();
        Ok((out, shape))
    }
}

impl candle_core::CustomOp1 for Checkpoint {
    fn name(&self) -> &'static str {
        "block-checkpoint"
    }
    fn cpu_fwd(&self, s: &candle_core::CpuStorage, l: &candle_core::Layout) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (out, shape) = self.run(candle_core::Storage::Cpu(s.clone()), l)?;
        let (st, _) = out.storage_and_layout();
        match &*st {
            candle_core::Storage::Cpu(c) => Ok((c.clone(), shape)),
            _ => candle_core::bail!("checkpoint: result left the CPU"),
        }
    }
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &candle_core::Layout) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        use candle_core::backend::BackendStorage;
        let (out, shape) = self.run(candle_core::Storage::Cuda(s.try_clone(l)?), l)?;
        let (st, ol) = out.storage_and_layout();
        match &*st {
            candle_core::Storage::Cuda(c) => Ok((c.try_clone(ol)?, shape)),
            _ => candle_core::bail!("checkpoint: result left the GPU"),
        }
    }
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        // The input is a variable of the recomputed graph only when its gradient is wanted;
        // otherwise the backward skips it (vendor/candle-core: untracked operands get none).
        let x = if self.input_grad { candle_core::Var::from_tensor(&arg.detach())?.into_inner() } else { arg.detach() };
        let out = self.block.forward_packed(&x)?;
        let mut g = (out * grad_res.detach())?.sum_all()?.backward()?;
        // Detached: candle's gradients can carry ops that reference the recomputed
        // activations, which would keep every block's graph alive until the step ends.
        let gx = g.remove(&x).map(|t| t.detach());
        let mut side = self.grads.0.lock().unwrap();
        for id in g.get_ids().copied().collect::<Vec<_>>() {
            let t = g.get_id(id).unwrap().detach();
            let sum = match side.remove(&id) {
                Some(prev) => (prev + t)?,
                None => t,
            };
            side.insert(id, sum);
        }
        Ok(gx)
    }
}
