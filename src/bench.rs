//! Benchmarks (`vipo bench`): wall-clock timings of the DiT block, forward and
//! forward + backward, for the reference and fused paths.

use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use crate::policy::block::{BlockConfig, DitBlock};

/// Timings of one DiT block (median milliseconds over the measured iterations).
#[derive(Clone, Debug)]
pub struct BlockBench {
    pub fwd_ms: f64,
    pub fwd_bwd_ms: f64,
    pub fused: bool,
    pub batch: usize,
    pub tokens: usize,
    pub dim: usize,
    pub heads: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Time one DiT block (MLP ratio 4, f32, CPU) on random inputs: a warm-up run, then the
/// median over `iters` of the forward alone and of forward + backward (gradients for all
/// parameters and for the input tokens, as inside a stack of blocks).
pub fn bench_block(batch: usize, tokens: usize, dim: usize, heads: usize, fused: bool, iters: usize) -> anyhow::Result<BlockBench> {
    anyhow::ensure!(iters >= 1, "bench_block: iters must be >= 1");
    anyhow::ensure!(batch >= 1 && tokens >= 1, "bench_block: batch and tokens must be >= 1");
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let cfg = BlockConfig { dim, heads, mlp_ratio: 4, fused };
    let blk = DitBlock::new(&vb.pp("blk"), &cfg, None).context("bench_block: building the block")?;
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (batch, tokens, dim), &dev)?)?;
    let c = Tensor::randn(0f32, 1.0, (batch, dim), &dev)?;

    let fwd = || -> anyhow::Result<Tensor> { Ok(blk.forward(x.as_tensor(), &c)?) };
    let fwd_bwd = || -> anyhow::Result<()> {
        let y = blk.forward(x.as_tensor(), &c)?;
        let grads = y.sum_all()?.backward()?;
        // Touch one gradient so the work cannot be considered dead.
        anyhow::ensure!(grads.get(x.as_tensor()).is_some(), "bench_block: no input gradient");
        Ok(())
    };
    fwd()?;
    fwd_bwd()?;
    let mut tf = Vec::with_capacity(iters);
    let mut tb = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t0 = Instant::now();
        let y = fwd()?;
        drop(y);
        tf.push(t0.elapsed().as_secs_f64() * 1e3);
        let t0 = Instant::now();
        fwd_bwd()?;
        tb.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    Ok(BlockBench { fwd_ms: median(tf), fwd_bwd_ms: median(tb), fused, batch, tokens, dim, heads })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_block_runs_small() {
        for fused in [false, true] {
            let b = bench_block(1, 8, 16, 2, fused, 3).unwrap();
            assert!(b.fwd_ms > 0.0 && b.fwd_bwd_ms >= 0.0 && b.fwd_ms.is_finite());
            assert_eq!((b.batch, b.tokens, b.dim, b.heads, b.fused), (1, 8, 16, 2, fused));
        }
        assert!(bench_block(1, 8, 16, 2, false, 0).is_err());
    }
}
