//! Scaled dot-product attention as one differentiable op that never keeps the
//! (B, H, Nq, Nk) score matrix across the backward (issue 37 item 2).
//!
//! Composed from candle ops, attention keeps S = QKᵀ, its f32 copy, the softmax's
//! intermediates and P alive from the forward to the backward: ≈ 10 full passes and, for
//! FLUX.1-dev at batch 4, 226 M scores per layer. Here the forward walks query chunks
//! (S = q_c Kᵀ → fused row softmax in f32 → P V) and keeps only the output; the backward
//! recomputes each chunk's P and applies dV += Pᵀ dO, dS = P ⊙ (dP − rowsum(dO ⊙ O)),
//! dQ = s·dS K, dK += s·dSᵀ Q. Peak extra memory is one chunk's scores.
//!
//! Two insides behind one interface:
//! * CPU, f32 / f64, self-attention (Nq = Nk): the packed flash-style kernel of
//!   [`super::ops::attention_packed`] (per (batch, head), rayon, no N×N kept).
//! * everything else (CUDA, bf16, cross-attention): the chunked op below, written with
//!   candle tensor ops so the same code runs and is tested on the CPU; its softmax is
//!   candle's fused `softmax_last_dim` kernel (CPU and CUDA).
//!
//! A faster GPU kernel (flash-style via NVRTC, or cuDNN's SDPA) would replace the inside
//! of [`Chunked`] without changing [`sdpa`].

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor, D};

/// Bytes of f32 scores one chunk may hold (per forward or backward chunk).
const CHUNK_BYTES: usize = 256 << 20;

/// Which inside [`sdpa`] uses; `Auto` picks by device and dtype (tests pin the others).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inside {
    Auto,
    /// The packed CPU kernel (f32 / f64, Nq = Nk).
    Packed,
    /// The chunked op, with at most this many query rows per chunk (0: by memory).
    Chunked(usize),
}

/// softmax(q kᵀ / √hd) v for q (B, H, Nq, hd) and k, v (B, H, Nk, hd), returned with the
/// heads merged: (B, Nq, H·hd), the layout the output projections read.
pub fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    sdpa_with(q, k, v, Inside::Auto)
}

/// [`sdpa`] for token-major q (B, Nq, D) and k, v (B, Nk, D) with `heads` heads: the
/// packed kernel reads them without the head split and merge copies.
pub fn sdpa_tokens(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, nq, d) = q.dims3()?;
    let nk = k.dim(1)?;
    if heads == 0 || d % heads != 0 || k.dims3()? != (b, nk, d) || v.dims3()? != (b, nk, d) {
        candle_core::bail!("attention: q {:?}, k {:?}, v {:?} with {heads} heads do not agree", q.dims(), k.dims(), v.dims());
    }
    if matches!(q.device(), Device::Cpu) && matches!(q.dtype(), DType::F32 | DType::F64) && nq == nk {
        return super::ops::attention_packed(&Tensor::cat(&[q, k, v], 2)?, heads);
    }
    let split = |t: &Tensor| t.reshape((b, t.dim(1)?, heads, d / heads))?.transpose(1, 2);
    sdpa_with(&split(q)?, &split(k)?, &split(v)?, Inside::Chunked(0))
}

pub fn sdpa_with(q: &Tensor, k: &Tensor, v: &Tensor, inside: Inside) -> Result<Tensor> {
    let (b, h, nq, hd) = q.dims4()?;
    let (bk, hk, nk, hdk) = k.dims4()?;
    if (bk, hk, hdk) != (b, h, hd) || v.dims4()? != (b, h, nk, hd) {
        candle_core::bail!("attention: q {:?}, k {:?}, v {:?} do not agree", q.dims(), k.dims(), v.dims());
    }
    let packed_ok = matches!(q.device(), Device::Cpu) && matches!(q.dtype(), DType::F32 | DType::F64) && nq == nk;
    let inside = match inside {
        Inside::Auto if packed_ok => Inside::Packed,
        Inside::Auto => Inside::Chunked(0),
        Inside::Packed if !packed_ok => candle_core::bail!("attention: the packed kernel needs CPU f32/f64 self-attention"),
        i => i,
    };
    match inside {
        Inside::Packed => {
            // (B, H, N, hd) → (B, N, H·hd) per part, then [q | k | v] as the kernel reads it.
            let merge = |t: &Tensor| t.transpose(1, 2)?.reshape((b, nq, h * hd));
            let qkv = Tensor::cat(&[merge(q)?, merge(k)?, merge(v)?], 2)?;
            super::ops::attention_packed(&qkv, h)
        }
        Inside::Chunked(rows) => {
            let rows = if rows > 0 { rows } else { (CHUNK_BYTES / (4 * b * h * nk).max(1)).max(1) };
            let o = q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, Chunked { scale: 1.0 / (hd as f64).sqrt(), rows })?;
            o.transpose(1, 2)?.reshape((b, nq, h * hd))
        }
        Inside::Auto => unreachable!(),
    }
}

/// The dtype scores and gradient sums are kept in: f32, or f64 for f64 inputs.
fn wide(dt: DType) -> DType {
    if dt == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// The chunked attention op: inputs q, k, v (B, H, N, hd), output (B, H, Nq, hd).
struct Chunked {
    scale: f64,
    rows: usize,
}

impl Chunked {
    /// P for the query rows [start, start + len): softmax in f32 (f64 stays f64).
    fn probs(&self, q: &Tensor, k: &Tensor, start: usize, len: usize) -> Result<Tensor> {
        let s = q.narrow(2, start, len)?.matmul(&k.t()?)?.to_dtype(wide(q.dtype()))?;
        candle_nn::ops::softmax_last_dim(&(s * self.scale)?)
    }

    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (dt, nq) = (q.dtype(), q.dim(2)?);
        let mut outs = Vec::with_capacity(nq.div_ceil(self.rows));
        for start in (0..nq).step_by(self.rows) {
            let len = self.rows.min(nq - start);
            outs.push(self.probs(q, k, start, len)?.to_dtype(dt)?.matmul(v)?);
        }
        Tensor::cat(&outs, 2)
    }

    /// Runs the forward on tensors made from the op's storages (no graph is recorded:
    /// they are not tracked) and hands back the result's storage.
    fn forward_storages(&self, parts: [(candle_core::Storage, &Layout); 3]) -> Result<(candle_core::Storage, Shape)> {
        let t: Vec<Tensor> = parts
            .into_iter()
            .map(|(s, l)| {
                if !l.is_contiguous() || l.start_offset() != 0 {
                    candle_core::bail!("attention: inputs must be contiguous from offset 0");
                }
                Ok(Tensor::from_storage(s, l.shape().clone(), candle_core::op::BackpropOp::none(), false))
            })
            .collect::<Result<_>>()?;
        let o = self.forward(&t[0], &t[1], &t[2])?.contiguous()?;
        let shape = o.shape().clone();
        drop(t);
        let (st, _) = o.storage_and_layout();
        let owned = match &*st {
            candle_core::Storage::Cpu(c) => candle_core::Storage::Cpu(c.clone()),
            candle_core::Storage::Cuda(c) => {
                use candle_core::backend::BackendStorage;
                candle_core::Storage::Cuda(c.try_clone(o.layout())?)
            }
            _ => candle_core::bail!("attention: unsupported device"),
        };
        Ok((owned, shape))
    }
}

impl CustomOp3 for Chunked {
    fn name(&self) -> &'static str {
        "vipo-attention-chunked"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        use candle_core::Storage::Cpu;
        match self.forward_storages([(Cpu(s1.clone()), l1), (Cpu(s2.clone()), l2), (Cpu(s3.clone()), l3)])? {
            (Cpu(c), shape) => Ok((c, shape)),
            _ => candle_core::bail!("attention: result left the CPU"),
        }
    }

    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::Storage::Cuda;
        // try_clone shares nothing: the inputs are copied once per forward (small next to
        // the chunk scores); a kernel of our own would read them in place.
        match self.forward_storages([(Cuda(s1.try_clone(l1)?), l1), (Cuda(s2.try_clone(l2)?), l2), (Cuda(s3.try_clone(l3)?), l3)])? {
            (Cuda(c), shape) => Ok((c, shape)),
            _ => candle_core::bail!("attention: result left the GPU"),
        }
    }

    fn bwd(&self, q: &Tensor, k: &Tensor, v: &Tensor, o: &Tensor, go: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (q, k, v, o) = (q.detach(), k.detach(), v.detach(), o.detach());
        let go = go.detach().contiguous()?;
        let (dt, nq) = (q.dtype(), q.dim(2)?);
        let f32 = |t: &Tensor| t.to_dtype(wide(dt));
        let (mut dk, mut dv): (Option<Tensor>, Option<Tensor>) = (None, None);
        let mut dqs = Vec::with_capacity(nq.div_ceil(self.rows));
        let acc = |sum: &mut Option<Tensor>, t: Tensor| -> Result<()> {
            *sum = Some(match sum.take() {
                Some(s) => (s + t)?,
                None => t,
            });
            Ok(())
        };
        for start in (0..nq).step_by(self.rows) {
            let len = self.rows.min(nq - start);
            let p = self.probs(&q, &k, start, len)?;
            let go_c = go.narrow(2, start, len)?;
            // dV += Pᵀ dO (in the input dtype on the tensor cores, summed in f32).
            acc(&mut dv, f32(&p.to_dtype(dt)?.t()?.matmul(&go_c)?)?)?;
            // dS = P ⊙ (dO Vᵀ − rowsum(dO ⊙ O)), times the scale of S.
            let dp = f32(&go_c.matmul(&v.t()?)?)?;
            let delta = (f32(&go_c)? * f32(&o.narrow(2, start, len)?)?)?.sum_keepdim(D::Minus1)?;
            let ds = ((p * dp.broadcast_sub(&delta)?)? * self.scale)?.to_dtype(dt)?;
            dqs.push(ds.matmul(&k)?);
            acc(&mut dk, f32(&ds.t()?.matmul(&q.narrow(2, start, len)?)?)?)?;
        }
        let dq = Tensor::cat(&dqs, 2)?;
        let dk = dk.map(|t| t.to_dtype(dt)).transpose()?;
        let dv = dv.map(|t| t.to_dtype(dt)).transpose()?;
        Ok((Some(dq), dk, dv))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    /// The composed reference: what the MMDiT and FLUX blocks ran before this op.
    fn composed(q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        let (b, h, nq, hd) = q.dims4().unwrap();
        let w = (q.matmul(&k.t().unwrap()).unwrap() * (1.0 / (hd as f64).sqrt())).unwrap();
        let p = crate::policy::nn::layers::in_f32(&w, |w| candle_nn::ops::softmax(w, D::Minus1)).unwrap();
        p.matmul(v).unwrap().transpose(1, 2).unwrap().reshape((b, nq, h * hd)).unwrap()
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
        (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap()).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap()
    }

    fn qkv(dt: DType, nq: usize, nk: usize, seed: u64) -> [Var; 3] {
        let dev = Device::Cpu;
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(seed);
        let mut t = |n: usize| {
            let v: Vec<f64> = (0..2 * 3 * n * 8).map(|_| rand_distr::Distribution::sample(&rand_distr::StandardNormal, &mut rng)).collect();
            Var::from_tensor(&Tensor::from_vec(v, (2, 3, n, 8), &dev).unwrap().to_dtype(dt).unwrap()).unwrap()
        };
        [t(nq), t(nk), t(nk)]
    }

    /// Output and gradients of every inside equal the composed attention (f32, f64),
    /// for self-attention (all insides) and cross-attention (chunked), with chunks that
    /// do not divide the rows.
    #[test]
    fn every_inside_matches_the_composed_attention() {
        for dt in [DType::F32, DType::F64] {
            for (nq, nk) in [(7, 7), (5, 9)] {
                let [q, k, v] = qkv(dt, nq, nk, 3);
                let w = Tensor::randn(0f64, 1.0, (2, nq, 24), &Device::Cpu).unwrap().to_dtype(dt).unwrap();
                let run = |f: &dyn Fn() -> Tensor| {
                    let o = f();
                    let g = (&o * &w).unwrap().sum_all().unwrap().backward().unwrap();
                    (o, [&q, &k, &v].map(|x| g.get(x.as_tensor()).unwrap().clone()))
                };
                let (o0, g0) = run(&|| composed(&q, &k, &v));
                let mut insides = vec![Inside::Chunked(2), Inside::Chunked(3), Inside::Chunked(0), Inside::Auto];
                if nq == nk {
                    insides.push(Inside::Packed);
                }
                let tol = if dt == DType::F64 { 1e-12 } else { 2e-5 };
                for inside in insides {
                    let (o1, g1) = run(&|| sdpa_with(&q, &k, &v, inside).unwrap());
                    assert!(max_abs(&o0, &o1) < tol, "{dt:?} {inside:?} out {}", max_abs(&o0, &o1));
                    for (i, (a, b)) in g0.iter().zip(&g1).enumerate() {
                        assert!(max_abs(a, b) < tol, "{dt:?} {inside:?} grad {i}: {}", max_abs(a, b));
                    }
                }
            }
        }
    }

    /// The chunked op's backward against f64 central differences of its own forward.
    #[test]
    fn chunked_gradients_match_finite_differences() {
        let [q, k, v] = qkv(DType::F64, 4, 6, 5);
        let w = Tensor::randn(0f64, 1.0, (2, 4, 24), &Device::Cpu).unwrap();
        let f = |q: &Tensor, k: &Tensor, v: &Tensor| (sdpa_with(q, k, v, Inside::Chunked(3)).unwrap() * &w).unwrap().sum_all().unwrap();
        let g = f(q.as_tensor(), k.as_tensor(), v.as_tensor()).backward().unwrap();
        let eps = 1e-6;
        for which in 0..3 {
            let base = [&q, &k, &v][which].as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let grad = g.get([&q, &k, &v][which].as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
            for i in (0..base.len()).step_by(7) {
                let at = |d: f64| {
                    let mut x = base.clone();
                    x[i] += d;
                    let x = Tensor::from_vec(x, [&q, &k, &v][which].dims(), &Device::Cpu).unwrap();
                    let mut args = [q.as_tensor().clone(), k.as_tensor().clone(), v.as_tensor().clone()];
                    args[which] = x;
                    f(&args[0], &args[1], &args[2]).to_scalar::<f64>().unwrap()
                };
                let fd = (at(eps) - at(-eps)) / (2.0 * eps);
                assert!((fd - grad[i]).abs() < 1e-6 * (1.0 + fd.abs()), "input {which} entry {i}: fd {fd} vs {}", grad[i]);
            }
        }
    }

    /// bf16 (the GPU dtype), run on the CPU: the chunked op stays as close to the f32
    /// answer as the composed bf16 attention does (bounds: 2× the composed error, and
    /// absolute bounds that bf16's 8-bit mantissa allows at these magnitudes).
    #[test]
    fn chunked_bf16_is_within_bf16_bounds() {
        let [q, k, v] = qkv(DType::F32, 16, 16, 9);
        let bf = |x: &Var| Var::from_tensor(&x.as_tensor().to_dtype(DType::BF16).unwrap()).unwrap();
        let [qb, kb, vb] = [&q, &k, &v].map(bf);
        let w = Tensor::randn(0f32, 1.0, (2, 16, 24), &Device::Cpu).unwrap();
        let grads = |o: Tensor, xs: [&Var; 3]| {
            let g = (o.to_dtype(DType::F32).unwrap() * &w).unwrap().sum_all().unwrap().backward().unwrap();
            (o, xs.map(|x| g.get(x.as_tensor()).unwrap().clone()))
        };
        let (o32, g32) = grads(composed(&q, &k, &v), [&q, &k, &v]);
        let (oc, gc) = grads(composed(&qb, &kb, &vb), [&qb, &kb, &vb]);
        let (ob, gb) = grads(sdpa_with(&qb, &kb, &vb, Inside::Chunked(5)).unwrap(), [&qb, &kb, &vb]);
        assert_eq!(ob.dtype(), DType::BF16);
        let (ec, eb) = (max_abs(&o32, &oc), max_abs(&o32, &ob));
        assert!(eb < 0.05 && eb <= 2.0 * ec + 1e-3, "bf16 out error {eb} (composed bf16: {ec})");
        for i in 0..3 {
            let (ec, eb) = (max_abs(&g32[i], &gc[i]), max_abs(&g32[i], &gb[i]));
            assert_eq!(gb[i].dtype(), DType::BF16);
            assert!(eb < 0.1 && eb <= 2.0 * ec + 1e-2, "bf16 grad {i} error {eb} (composed bf16: {ec})");
        }
    }

    /// The op keeps no score-sized tensor: after the forward, the only tensor the graph
    /// holds beyond the inputs is the (B, H, Nq, hd) output.
    #[test]
    fn the_forward_keeps_no_score_matrix() {
        let [q, k, v] = qkv(DType::F32, 12, 12, 1);
        let o = sdpa_with(&q, &k, &v, Inside::Chunked(4)).unwrap();
        let nodes = o.sorted_nodes();
        let score = 2 * 3 * 12 * 12;
        for n in &nodes {
            assert!(n.elem_count() < score, "a node of shape {:?} holds scores", n.dims());
        }
        assert!(nodes.len() <= 8, "{} nodes", nodes.len());
    }

    /// The token-major entry gives the same as the head-major one, packed and chunked.
    #[test]
    fn token_major_entry_matches() {
        for (nq, nk) in [(6, 6), (4, 7)] {
            let [q, k, v] = qkv(DType::F64, nq, nk, 4);
            let tok = |t: &Var| t.as_tensor().transpose(1, 2).unwrap().reshape((2, t.dim(2).unwrap(), 24)).unwrap();
            let a = sdpa_tokens(&tok(&q), &tok(&k), &tok(&v), 3).unwrap();
            assert!(max_abs(&a, &composed(&q, &k, &v)) < 1e-12);
        }
    }

    #[test]
    fn mismatched_shapes_are_refused() {
        let [q, k, _] = qkv(DType::F32, 4, 6, 2);
        let e = sdpa(q.as_tensor(), k.as_tensor(), q.as_tensor()).unwrap_err().to_string();
        assert!(e.contains("do not agree"), "{e}");
    }
}
