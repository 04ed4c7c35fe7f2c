//! Fast differentiable custom ops for the DiT block, each with a hand-written backward.
//!
//! Why: candle's autodiff of the composed block spends most of its time in many small
//! elementwise/broadcast/reduction passes (softmax, layer norm, GELU, gates) and in the
//! head split/merge copies, each materialising a full tensor in forward and again in
//! backward. These ops do each piece in one or two passes over contiguous memory:
//!
//! * [`attention_packed`]: q/k/v read in place from the packed `(B, N, 3D)` projection with
//!   strided `gemm` calls (no head permute copies), softmax fused; backward recomputes the
//!   probabilities (flash-style, no N×N tensor kept alive) and writes dQ/dK/dV straight
//!   into the packed gradient.
//! * [`ln_modulate`]: layer norm (no affine, eps 1e-6) + adaLN `·(1+scale)+shift`.
//! * [`gelu_tanh`]: tanh-approximated GELU.
//! * [`gated_residual`]: `x + gate·y` with a per-batch gate.
//!
//! Kernels are generic over f32/f64 (f64 for the finite-difference tests), CPU only;
//! parallelism is rayon over rows or (batch, head) pairs, with sequential `gemm` inside.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, WithDType};
use gemm::Parallelism;
use num_traits::Float;
use rayon::prelude::*;

/// Element types the kernels support.
pub trait Elem: WithDType + Float + Send + Sync + 'static {
    /// eˣ in straight-line code the compiler vectorises (libm's `expf` is a scalar call:
    /// 7 % of a training step in perf).
    fn exp_fast(self) -> Self;
}
impl Elem for f32 {
    #[inline(always)]
    fn exp_fast(self) -> f32 {
        exp_f32(self)
    }
}
impl Elem for f64 {
    #[inline(always)]
    fn exp_fast(self) -> f64 {
        self.exp()
    }
}

/// eˣ = 2ⁿ·eʳ with n = round(x·log₂e), r = x − n·ln 2 (two-part ln 2), |r| ≤ ½ln 2, and a
/// degree-7 Taylor polynomial for eʳ (truncation ≤ 5e-9 relative). Inputs are clamped to
/// [−87, 88] (eˣ of −87 is 1.6e-38, where a softmax or tanh cannot tell it from 0).
/// Branch-free, so a loop over it vectorises.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5·2²³: adding and subtracting it rounds to nearest
                                     // Selects, not f32::max/min, so a NaN stays NaN (a diverged run must not look finite).
    let x = if x < -87.0 { -87.0 } else { x };
    let x = if x > 88.0 { 88.0 } else { x };
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    f32::from_bits(((n as i32 + 127) as u32) << 23) * p
}

simd_kernel! {
    /// Row-wise softmax of an n-column matrix, in place.
    fn softmax_rows<T>(p: &mut [T], n: usize) {
        for row in p.chunks_mut(n) {
            let mx = row.iter().fold(T::neg_infinity(), |a, &b| Float::max(a, b));
            for v in row.iter_mut() {
                *v = (*v - mx).exp_fast();
            }
            let sum = row.iter().fold(T::zero(), |a, &v| a + v);
            let inv = T::one() / sum;
            for v in row.iter_mut() {
                *v *= inv;
            }
        }
    }
}

simd_kernel! {
    /// dS = P ∘ (dP − δ) for an n-column matrix (dP in place).
    fn softmax_bwd_rows<T>(dp: &mut [T], p: &[T], delta: &[T], n: usize) {
        for ((dr, pr), &di) in dp.chunks_mut(n).zip(p.chunks(n)).zip(delta.iter()) {
            for (x, &pv) in dr.iter_mut().zip(pr) {
                *x = pv * (*x - di);
            }
        }
    }
}

/// Raw pointer that may cross rayon threads; every user writes disjoint regions.
#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    // A method (not field access) so closures capture the whole Send wrapper.
    fn get(self) -> *mut T {
        self.0
    }
}

fn contiguous<'a, T: WithDType>(s: &'a [T], l: &Layout, what: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => candle_core::bail!("policy/ops.rs: {what} must be contiguous"),
    }
}

/// Dispatch a generic kernel on the storage dtype (f32 / f64).
macro_rules! dispatch {
    ($st:expr, $name:expr, |$v:ident| $body:expr) => {
        match $st {
            CpuStorage::F32($v) => $body,
            CpuStorage::F64($v) => $body,
            other => candle_core::bail!("policy/ops.rs: {} supports f32/f64, got {:?}", $name, candle_core::backend::BackendStorage::dtype(other)),
        }
    };
}

fn storage<T: Elem>(v: Vec<T>) -> CpuStorage {
    T::to_cpu_storage_owned(v)
}

fn cast<'a, T: Elem>(s: &'a CpuStorage, what: &str) -> Result<&'a [T]> {
    s.as_slice::<T>().map_err(|e| candle_core::Error::Msg(format!("policy/ops.rs: {what}: {e}")))
}

/// (dst, dst_cs, dst_rs) ← beta·lhs·rhs (+ dst if `acc`); a thin safe-ish wrapper over
/// `gemm::gemm` with explicit column/row strides. Sequential: callers parallelise outside.
#[allow(clippy::too_many_arguments)]
unsafe fn mm<T: Elem>(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut T,
    dst_rs: usize,
    dst_cs: usize,
    acc: bool,
    lhs: *const T,
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: *const T,
    rhs_rs: usize,
    rhs_cs: usize,
    beta: T,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        dst_cs as isize,
        dst_rs as isize,
        acc,
        lhs,
        lhs_cs as isize,
        lhs_rs as isize,
        rhs,
        rhs_cs as isize,
        rhs_rs as isize,
        T::one(),
        beta,
        false,
        false,
        false,
        Parallelism::None,
    )
}

// ---------------------------------------------------------------------------------------
// Attention on the packed qkv projection.

/// Multi-head full (non-causal) attention reading q, k, v from the packed projection
/// `qkv: (B, N, 3D)` laid out `[q | k | v]` with heads contiguous inside each part (the
/// layout of `reshape(B, N, 3, H, dh)`), returning the merged heads `(B, N, D)`.
pub fn attention_packed(qkv: &Tensor, heads: usize) -> Result<Tensor> {
    let (_, _, d3) = qkv.dims3()?;
    if d3 % 3 != 0 || heads == 0 || (d3 / 3) % heads != 0 {
        candle_core::bail!("policy/ops.rs: attention_packed: qkv width {d3} is not 3·heads·dh (heads {heads})");
    }
    qkv.contiguous()?.apply_op1(Attention { heads })
}

struct Attention {
    heads: usize,
}
struct AttentionBwd {
    heads: usize,
}

/// Compute P = softmax(scale·Q Kᵀ) for one (b, h) into `p` (N×N, row-major).
unsafe fn attn_probs<T: Elem>(qkv: *const T, n: usize, d: usize, scale: T, dh: usize, p: &mut [T]) {
    let q = qkv;
    let k = qkv.add(d);
    // S = Q · Kᵀ: Kᵀ(j, col) = K[col, j] → row stride 1, column stride 3D.
    mm(n, n, dh, p.as_mut_ptr(), n, 1, false, q, 3 * d, 1, k, 1, 3 * d, scale);
    softmax_rows(p, n);
}

fn attention_fwd<T: Elem>(qkv: &[T], b: usize, n: usize, d: usize, heads: usize) -> Vec<T> {
    let dh = d / heads;
    let scale = T::from(1.0 / (dh as f64).sqrt()).unwrap_or_else(T::one);
    let mut out = vec![T::zero(); b * n * d];
    let out_p = SendPtr(out.as_mut_ptr());
    let in_p = SendPtr(qkv.as_ptr() as *mut T);
    (0..b * heads).into_par_iter().for_each_init(
        || vec![T::zero(); n * n],
        |p, bh| {
            let (bi, h) = (bh / heads, bh % heads);
            // SAFETY: (bi, h) selects a disjoint column block of `out`; inputs are read-only
            // and sized b·n·3d by the caller.
            unsafe {
                let base = in_p.get().add(bi * n * 3 * d + h * dh) as *const T;
                attn_probs(base, n, d, scale, dh, p);
                let v = base.add(2 * d);
                let o = out_p.get().add(bi * n * d + h * dh);
                mm(n, dh, n, o, d, 1, false, p.as_ptr(), n, 1, v, 3 * d, 1, T::one());
            }
        },
    );
    out
}

fn attention_bwd<T: Elem>(qkv: &[T], o: &[T], go: &[T], b: usize, n: usize, d: usize, heads: usize) -> Vec<T> {
    let dh = d / heads;
    let scale = T::from(1.0 / (dh as f64).sqrt()).unwrap_or_else(T::one);
    let mut dqkv = vec![T::zero(); b * n * 3 * d];
    let dp_ = SendPtr(dqkv.as_mut_ptr());
    let in_p = SendPtr(qkv.as_ptr() as *mut T);
    (0..b * heads).into_par_iter().for_each_init(
        || (vec![T::zero(); n * n], vec![T::zero(); n * n], vec![T::zero(); n]),
        |(p, dpm, delta), bh| {
            let (bi, h) = (bh / heads, bh % heads);
            // SAFETY: each (bi, h) writes its own column blocks of dq/dk/dv.
            unsafe {
                let base = in_p.get().add(bi * n * 3 * d + h * dh) as *const T;
                let (q, k, v) = (base, base.add(d), base.add(2 * d));
                attn_probs(base, n, d, scale, dh, p);
                let go_b = go.as_ptr().add(bi * n * d + h * dh);
                let dbase = dp_.get().add(bi * n * 3 * d + h * dh);
                // dV = Pᵀ dO
                mm(n, dh, n, dbase.add(2 * d), 3 * d, 1, false, p.as_ptr(), 1, n, go_b, d, 1, T::one());
                // rowsum(dP ∘ P) = rowsum(dO ∘ O)
                for i in 0..n {
                    let r = (bi * n + i) * d + h * dh;
                    delta[i] = (0..dh).fold(T::zero(), |a, j| a + go[r + j] * o[r + j]);
                }
                // dP = dO Vᵀ
                mm(n, n, dh, dpm.as_mut_ptr(), n, 1, false, go_b, d, 1, v, 1, 3 * d, T::one());
                // dS = P ∘ (dP − delta)
                softmax_bwd_rows(dpm, p, delta, n);
                // dQ = s·dS K ; dK = s·dSᵀ Q
                mm(n, dh, n, dbase, 3 * d, 1, false, dpm.as_ptr(), n, 1, k, 3 * d, 1, scale);
                mm(n, dh, n, dbase.add(d), 3 * d, 1, false, dpm.as_ptr(), 1, n, q, 3 * d, 1, scale);
            }
        },
    );
    dqkv
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "vipo-attention-packed"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, n, d3) = l.shape().dims3()?;
        let d = d3 / 3;
        let out = dispatch!(s, "attention", |v| storage(attention_fwd(contiguous(v, l, "qkv")?, b, n, d, self.heads)));
        Ok((out, Shape::from((b, n, d))))
    }
    fn bwd(&self, arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let g = grad_res.contiguous()?;
        Ok(Some(arg.apply_op3_no_bwd(res, &g, &AttentionBwd { heads: self.heads })?))
    }
}

impl CustomOp3 for AttentionBwd {
    fn name(&self) -> &'static str {
        "vipo-attention-packed-bwd"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, n, d3) = l1.shape().dims3()?;
        let d = d3 / 3;
        let out = dispatch!(s1, "attention bwd", |v| {
            let o = contiguous(cast(s2, "attention out")?, l2, "attention out")?;
            let go = contiguous(cast(s3, "attention grad")?, l3, "attention grad")?;
            storage(attention_bwd(contiguous(v, l1, "qkv")?, o, go, b, n, d, self.heads))
        });
        Ok((out, l1.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------
// Layer norm + adaLN modulation.

/// `LN(x)·(1+scale)+shift` with LN over the last dim, no affine, eps 1e-6.
/// x: (B, N, D); shift, scale: (B, D) → (B, N, D).
pub fn ln_modulate(x: &Tensor, shift: &Tensor, scale: &Tensor) -> Result<Tensor> {
    let (b, _, d) = x.dims3()?;
    for (t, name) in [(shift, "shift"), (scale, "scale")] {
        if t.dims() != [b, d] {
            candle_core::bail!("policy/ops.rs: ln_modulate: {name} has shape {:?}, expected ({b}, {d})", t.dims());
        }
    }
    x.contiguous()?.apply_op3(&shift.contiguous()?, &scale.contiguous()?, LnModulate)
}

const LN_EPS: f64 = 1e-6;

struct LnModulate;
struct LnModulateBwd;

fn row_stats<T: Elem>(row: &[T]) -> (T, T) {
    let d = T::from(row.len()).unwrap_or_else(T::one);
    let mean = row.iter().fold(T::zero(), |a, &v| a + v) / d;
    let var = row.iter().fold(T::zero(), |a, &v| a + (v - mean) * (v - mean)) / d;
    (mean, T::one() / (var + T::from(LN_EPS).unwrap_or_else(T::zero)).sqrt())
}

fn ln_mod_fwd<T: Elem>(x: &[T], shift: &[T], scale: &[T], n: usize, d: usize) -> Vec<T> {
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(d).zip(x.par_chunks(d)).enumerate().for_each(|(r, (yr, xr))| {
        let bi = r / n;
        let (mean, rstd) = row_stats(xr);
        let (sh, sc) = (&shift[bi * d..(bi + 1) * d], &scale[bi * d..(bi + 1) * d]);
        modulate_row(yr, xr, sc, sh, mean, rstd)
    });
    y
}

simd_kernel! {
    /// y = (x − mean)·rstd·(1 + scale) + shift for one row.
    fn modulate_row<T>(yr: &mut [T], xr: &[T], sc: &[T], sh: &[T], mean: T, rstd: T) {
        for (((y, &xv), &s), &h) in yr.iter_mut().zip(xr).zip(sc).zip(sh) {
            *y = (xv - mean) * rstd * (T::one() + s) + h;
        }
    }
}

/// Returns packed [dx (B·N·D) | dshift (B·D) | dscale (B·D)].
fn ln_mod_bwd<T: Elem>(x: &[T], scale: &[T], dy: &[T], b: usize, n: usize, d: usize) -> Vec<T> {
    let mut out = vec![T::zero(); b * n * d + 2 * b * d];
    let (dx, rest) = out.split_at_mut(b * n * d);
    let per_b: Vec<(Vec<T>, Vec<T>)> = dx
        .par_chunks_mut(n * d)
        .enumerate()
        .map(|(bi, dxb)| {
            let sc = &scale[bi * d..(bi + 1) * d];
            let mut dsh = vec![T::zero(); d];
            let mut dsc = vec![T::zero(); d];
            let mut g = vec![T::zero(); d];
            let mut xh = vec![T::zero(); d];
            let inv_d = T::one() / T::from(d).unwrap_or_else(T::one);
            for i in 0..n {
                let off = (bi * n + i) * d;
                let (xr, dyr) = (&x[off..off + d], &dy[off..off + d]);
                let (mean, rstd) = row_stats(xr);
                let (mut mg, mut mgx) = (T::zero(), T::zero());
                for j in 0..d {
                    xh[j] = (xr[j] - mean) * rstd;
                    g[j] = dyr[j] * (T::one() + sc[j]);
                    mg += g[j];
                    mgx += g[j] * xh[j];
                    dsh[j] += dyr[j];
                    dsc[j] += dyr[j] * xh[j];
                }
                mg *= inv_d;
                mgx *= inv_d;
                let dxr = &mut dxb[i * d..(i + 1) * d];
                for j in 0..d {
                    dxr[j] = rstd * (g[j] - mg - xh[j] * mgx);
                }
            }
            (dsh, dsc)
        })
        .collect();
    let (dshift, dscale) = rest.split_at_mut(b * d);
    for (bi, (dsh, dsc)) in per_b.into_iter().enumerate() {
        dshift[bi * d..(bi + 1) * d].copy_from_slice(&dsh);
        dscale[bi * d..(bi + 1) * d].copy_from_slice(&dsc);
    }
    out
}

impl CustomOp3 for LnModulate {
    fn name(&self) -> &'static str {
        "vipo-ln-modulate"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, n, d) = l1.shape().dims3()?;
        let out = dispatch!(s1, "ln_modulate", |v| {
            let sh = contiguous(cast(s2, "ln_modulate shift")?, l2, "shift")?;
            let sc = contiguous(cast(s3, "ln_modulate scale")?, l3, "scale")?;
            storage(ln_mod_fwd(contiguous(v, l1, "x")?, sh, sc, n, d))
        });
        Ok((out, l1.shape().clone()))
    }
    fn bwd(&self, x: &Tensor, _shift: &Tensor, scale: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, n, d) = x.dims3()?;
        let g = grad.contiguous()?;
        let packed = x.apply_op3_no_bwd(scale, &g, &LnModulateBwd)?;
        let dx = packed.narrow(0, 0, b * n * d)?.reshape((b, n, d))?;
        let dshift = packed.narrow(0, b * n * d, b * d)?.reshape((b, d))?;
        let dscale = packed.narrow(0, b * n * d + b * d, b * d)?.reshape((b, d))?;
        Ok((Some(dx), Some(dshift), Some(dscale)))
    }
}

impl CustomOp3 for LnModulateBwd {
    fn name(&self) -> &'static str {
        "vipo-ln-modulate-bwd"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, n, d) = l1.shape().dims3()?;
        let out = dispatch!(s1, "ln_modulate bwd", |v| {
            let sc = contiguous(cast(s2, "ln_modulate scale")?, l2, "scale")?;
            let dy = contiguous(cast(s3, "ln_modulate grad")?, l3, "grad")?;
            storage(ln_mod_bwd(contiguous(v, l1, "x")?, sc, dy, b, n, d))
        });
        Ok((out, Shape::from(b * n * d + 2 * b * d)))
    }
}

// ---------------------------------------------------------------------------------------
// GELU (tanh approximation), same formula as candle's `gelu`.

/// Tanh-approximated GELU with a single-pass backward.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() {
        return x.gelu(); // candle's tanh-approximated GELU, with its backward
    }
    x.contiguous()?.apply_op1(Gelu)
}

struct Gelu;
struct GeluBwd;

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const GELU_C: f64 = 0.044_715;

/// tanh through one `exp` (libm's `tanhf` goes through `expm1f` and was ~18 % of the fused
/// block's profile); absolute error ~1e-7 in f32, which is all GELU needs since it uses 1+tanh.
#[inline(always)]
fn tanh_fast<T: Elem>(u: T) -> T {
    let two = T::one() + T::one();
    T::one() - two / ((two * u).exp_fast() + T::one())
}

fn gelu_fwd<T: Elem>(x: &[T]) -> Vec<T> {
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(4096).zip(x.par_chunks(4096)).for_each(|(yc, xc)| gelu_chunk(yc, xc));
    y
}

simd_kernel! {
    fn gelu_chunk<T>(yc: &mut [T], xc: &[T]) {
        let (k, c, half) = (T::from(SQRT_2_OVER_PI).unwrap(), T::from(GELU_C).unwrap(), T::from(0.5).unwrap());
        for (o, &v) in yc.iter_mut().zip(xc) {
            *o = half * v * (T::one() + tanh_fast(k * (v + c * v * v * v)));
        }
    }
}

simd_kernel! {
    fn gelu_bwd_chunk<T>(oc: &mut [T], xc: &[T], gc: &[T]) {
        let (k, c, half) = (T::from(SQRT_2_OVER_PI).unwrap(), T::from(GELU_C).unwrap(), T::from(0.5).unwrap());
        let three = T::from(3.0).unwrap();
        for ((o, &v), &g) in oc.iter_mut().zip(xc).zip(gc) {
            let t = tanh_fast(k * (v + c * v * v * v));
            let dt = (T::one() - t * t) * k * (T::one() + three * c * v * v);
            *o = g * (half * (T::one() + t) + half * v * dt);
        }
    }
}

fn gelu_bwd<T: Elem>(x: &[T], dy: &[T]) -> Vec<T> {
    let mut dx = vec![T::zero(); x.len()];
    dx.par_chunks_mut(4096).zip(x.par_chunks(4096).zip(dy.par_chunks(4096))).for_each(|(oc, (xc, gc))| gelu_bwd_chunk(oc, xc, gc));
    dx
}

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "vipo-gelu-tanh"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = dispatch!(s, "gelu", |v| storage(gelu_fwd(contiguous(v, l, "x")?)));
        Ok((out, l.shape().clone()))
    }
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(&grad_res.contiguous()?, &GeluBwd)?))
    }
}

impl CustomOp2 for GeluBwd {
    fn name(&self) -> &'static str {
        "vipo-gelu-tanh-bwd"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = dispatch!(s1, "gelu bwd", |v| {
            let g = contiguous(cast(s2, "gelu grad")?, l2, "grad")?;
            storage(gelu_bwd(contiguous(v, l1, "x")?, g))
        });
        Ok((out, l1.shape().clone()))
    }
}

// ---------------------------------------------------------------------------------------
// Gated residual.

/// `x + gate·y` with x, y: (B, N, D) and a per-batch gate (B, D).
pub fn gated_residual(x: &Tensor, y: &Tensor, gate: &Tensor) -> Result<Tensor> {
    let (b, _, d) = x.dims3()?;
    if y.dims() != x.dims() || gate.dims() != [b, d] {
        candle_core::bail!("policy/ops.rs: gated_residual: shapes x {:?}, y {:?}, gate {:?} do not match", x.dims(), y.dims(), gate.dims());
    }
    x.contiguous()?.apply_op3(&y.contiguous()?, &gate.contiguous()?, GatedResidual)
}

struct GatedResidual;
struct GatedResidualBwd;

impl CustomOp3 for GatedResidual {
    fn name(&self) -> &'static str {
        "vipo-gated-residual"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, n, d) = l1.shape().dims3()?;
        fn k<T: Elem>(x: &[T], y: &[T], g: &[T], n: usize, d: usize) -> Vec<T> {
            let mut o = vec![T::zero(); x.len()];
            o.par_chunks_mut(d).enumerate().for_each(|(r, or)| {
                let (off, gb) = (r * d, (r / n) * d);
                for j in 0..d {
                    or[j] = x[off + j] + g[gb + j] * y[off + j];
                }
            });
            o
        }
        let out = dispatch!(s1, "gated_residual", |v| {
            let y = contiguous(cast(s2, "gated_residual y")?, l2, "y")?;
            let g = contiguous(cast(s3, "gated_residual gate")?, l3, "gate")?;
            storage(k(contiguous(v, l1, "x")?, y, g, n, d))
        });
        Ok((out, l1.shape().clone()))
    }
    fn bwd(&self, _x: &Tensor, y: &Tensor, gate: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, n, d) = y.dims3()?;
        let g = grad.contiguous()?;
        let packed = y.apply_op3_no_bwd(gate, &g, &GatedResidualBwd)?;
        let dy = packed.narrow(0, 0, b * n * d)?.reshape((b, n, d))?;
        let dgate = packed.narrow(0, b * n * d, b * d)?.reshape((b, d))?;
        Ok((Some(g), Some(dy), Some(dgate)))
    }
}

impl CustomOp3 for GatedResidualBwd {
    fn name(&self) -> &'static str {
        "vipo-gated-residual-bwd"
    }
    /// Inputs (y, gate, grad) → packed [dy (B·N·D) | dgate (B·D)].
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, n, d) = l1.shape().dims3()?;
        fn k<T: Elem>(y: &[T], g: &[T], dz: &[T], b: usize, n: usize, d: usize) -> Vec<T> {
            let mut out = vec![T::zero(); b * n * d + b * d];
            let (dy, dg) = out.split_at_mut(b * n * d);
            dy.par_chunks_mut(n * d).zip(dg.par_chunks_mut(d)).enumerate().for_each(|(bi, (dyb, dgb))| {
                for i in 0..n {
                    let off = (bi * n + i) * d;
                    for j in 0..d {
                        dyb[i * d + j] = dz[off + j] * g[bi * d + j];
                        dgb[j] += dz[off + j] * y[off + j];
                    }
                }
            });
            out
        }
        let out = dispatch!(s1, "gated_residual bwd", |v| {
            let g = contiguous(cast(s2, "gated_residual gate")?, l2, "gate")?;
            let dz = contiguous(cast(s3, "gated_residual grad")?, l3, "grad")?;
            storage(k(contiguous(v, l1, "y")?, g, dz, b, n, d))
        });
        Ok((out, Shape::from(b * n * d + b * d)))
    }
}

// ---------------------------------------------------------------------------------------
// Linear with bias (base weights of `layers::Linear`; LoRA is added on top by the caller).

/// `y = x·Wᵀ + b` for x: (..., in), W: (out, in), b: (out). One op instead of candle's
/// matmul + transposed view + broadcast add, so the backward is three direct gemm-like
/// passes (dx = dy·W, dW = dyᵀ·x written in W's own layout, db = column sums) with no
/// transposed-gradient accumulation.
pub fn linear_bias(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (out_dim, in_dim) = w.dims2()?;
    let dims = x.dims().to_vec();
    if dims.last() != Some(&in_dim) || b.dims() != [out_dim] {
        candle_core::bail!("policy/ops.rs: linear_bias: x {:?}, weight {:?}, bias {:?} do not match", dims, w.dims(), b.dims());
    }
    let rows = x.elem_count() / in_dim;
    let y = x.reshape((rows, in_dim))?.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, LinearBias)?;
    let mut out = dims;
    *out.last_mut().unwrap_or(&mut 0) = out_dim;
    y.reshape(out)
}

struct LinearBias;
struct LinearBiasBwd {
    params: bool,
}

fn par() -> Parallelism {
    Parallelism::Rayon(rayon::current_num_threads().max(1))
}

fn linear_fwd<T: Elem>(x: &[T], w: &[T], b: &[T], rows: usize, i: usize, o: usize) -> Vec<T> {
    let mut y: Vec<T> = Vec::with_capacity(rows * o);
    for _ in 0..rows {
        y.extend_from_slice(b);
    }
    // SAFETY: sizes checked by the caller's shapes; y is rows×o row-major.
    unsafe {
        gemm::gemm(rows, o, i, y.as_mut_ptr(), 1, o as isize, true, x.as_ptr(), 1, i as isize, w.as_ptr(), i as isize, 1, T::one(), T::one(), false, false, false, par());
    }
    y
}

/// Packed [dx (rows·i) | dW (o·i) | db (o)], the parameter parts only when `params`
/// (frozen base weights under LoRA get no gradient: that would be +40 % update FLOPs
/// thrown away).
fn linear_bwd<T: Elem>(x: &[T], w: &[T], dy: &[T], rows: usize, i: usize, o: usize, params: bool) -> Vec<T> {
    let len = rows * i + if params { o * i + o } else { 0 };
    // Not zero-filled: the gemms overwrite dx and dW without reading them (with an empty
    // inner dimension gemm writes zeros); that memset was 2 % of a step.
    let mut out: Vec<T> = Vec::with_capacity(len);
    let p = out.as_mut_ptr();
    // SAFETY: all regions lie inside `out`'s capacity (sized from rows, i, o); each is fully
    // written (gemm without reading dst, or write_bytes: all-zero bytes are 0.0 for f32 and
    // f64) before `set_len`.
    unsafe {
        // dx = dy · W
        gemm::gemm(rows, i, o, p, 1, i as isize, false, dy.as_ptr(), 1, o as isize, w.as_ptr(), 1, i as isize, T::zero(), T::one(), false, false, false, par());
        if params {
            // dW = dyᵀ · x
            let dw = p.add(rows * i);
            gemm::gemm(o, i, rows, dw, 1, i as isize, false, dy.as_ptr(), o as isize, 1, x.as_ptr(), 1, i as isize, T::zero(), T::one(), false, false, false, par());
            let db = p.add(rows * i + o * i);
            std::ptr::write_bytes(db, 0, o);
            let db = std::slice::from_raw_parts_mut(db, o);
            for r in dy.chunks(o) {
                for (a, &g) in db.iter_mut().zip(r) {
                    *a += g;
                }
            }
        }
        out.set_len(len);
    }
    out
}

impl CustomOp3 for LinearBias {
    fn name(&self) -> &'static str {
        "vipo-linear-bias"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, i) = l1.shape().dims2()?;
        let (o, _) = l2.shape().dims2()?;
        let out = dispatch!(s1, "linear_bias", |v| {
            let w = contiguous(cast(s2, "linear weight")?, l2, "weight")?;
            let b = contiguous(cast(s3, "linear bias")?, l3, "bias")?;
            storage(linear_fwd(contiguous(v, l1, "x")?, w, b, rows, i, o))
        });
        Ok((out, Shape::from((rows, o))))
    }
    fn bwd(&self, x: &Tensor, w: &Tensor, b: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (rows, i) = x.dims2()?;
        let (o, _) = w.dims2()?;
        // Untracked weight and bias (a frozen base under LoRA): only dx is needed.
        let params = w.track_op() || b.track_op();
        let packed = x.apply_op3_no_bwd(w, &grad.contiguous()?, &LinearBiasBwd { params })?;
        let dx = packed.narrow(0, 0, rows * i)?.reshape((rows, i))?;
        if !params {
            return Ok((Some(dx), None, None));
        }
        let dw = packed.narrow(0, rows * i, o * i)?.reshape((o, i))?;
        let db = packed.narrow(0, rows * i + o * i, o)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

impl CustomOp3 for LinearBiasBwd {
    fn name(&self) -> &'static str {
        "vipo-linear-bias-bwd"
    }
    /// Inputs (x, W, dy) → packed [dx | dW | db].
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, i) = l1.shape().dims2()?;
        let (o, _) = l2.shape().dims2()?;
        let out = dispatch!(s1, "linear_bias bwd", |v| {
            let w = contiguous(cast(s2, "linear weight")?, l2, "weight")?;
            let dy = contiguous(cast(s3, "linear grad")?, l3, "grad")?;
            storage(linear_bwd(contiguous(v, l1, "x")?, w, dy, rows, i, o, self.params))
        });
        Ok((out, Shape::from(rows * i + if self.params { o * i + o } else { 0 })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// Compare autodiff gradients of `sum(f(inputs)·w)` against f64 central differences
    /// for every entry of every input.
    fn fd_check(shapes: &[&[usize]], f: impl Fn(&[Tensor]) -> Result<Tensor>) {
        let dev = Device::Cpu;
        let vars: Vec<Var> = shapes.iter().map(|s| Var::from_tensor(&Tensor::randn(0f64, 1.0, *s, &dev).unwrap()).unwrap()).collect();
        let ts = |vs: &[Var]| vs.iter().map(|v| v.as_tensor().clone()).collect::<Vec<_>>();
        let y = f(&ts(&vars)).unwrap();
        let w = Tensor::randn(0f64, 1.0, y.dims(), &dev).unwrap();
        let grads = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let loss = |vs: &[Var]| -> f64 { (f(&ts(vs)).unwrap() * &w).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap() };
        let eps = 1e-6;
        for (vi, var) in vars.iter().enumerate() {
            let g: Vec<f64> = grads.get(var.as_tensor()).expect("missing grad").flatten_all().unwrap().to_vec1().unwrap();
            let orig: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            for idx in 0..orig.len() {
                let mut num = [0.0; 2];
                for (s, sign) in [1.0, -1.0].iter().enumerate() {
                    let mut v = orig.clone();
                    v[idx] += sign * eps;
                    var.set(&Tensor::from_vec(v, var.as_tensor().dims(), &dev).unwrap()).unwrap();
                    num[s] = loss(&vars);
                }
                var.set(&Tensor::from_vec(orig.clone(), var.as_tensor().dims(), &dev).unwrap()).unwrap();
                let fd = (num[0] - num[1]) / (2.0 * eps);
                assert!((fd - g[idx]).abs() <= 1e-6 * (1.0 + fd.abs()), "input {vi}[{idx}]: fd {fd} vs analytic {}", g[idx]);
            }
        }
    }

    /// The vendored candle-core's backprop stores a node's first gradient as it is
    /// (vendor/candle-core/VIPO_PATCH.md). Every way a gradient can arrive is exercised:
    /// a node used several times (accumulation), transposed and narrowed views feeding a
    /// matmul's backward (which refuses strided gradients), broadcasts, a custom op.
    #[test]
    fn backprop_patch_matches_finite_differences() {
        fd_check(&[&[3, 4], &[2], &[3, 2, 2]], |t| {
            let (x, b, q) = (&t[0], &t[1], &t[2]);
            let shared = x.t()?.matmul(x)?; // x twice, one of them a transposed view
            let narrowed = x.narrow(1, 1, 2)?.broadcast_add(b)?.sqr()?;
            let doubled = (x + x)?;
            let batched = x.reshape((3, 2, 2))?.transpose(1, 2)?.matmul(q)?.transpose(1, 2)?.matmul(q)?;
            let custom = gelu_tanh(&(x * 0.5)?)?;
            let parts = [shared, narrowed, doubled, batched, custom];
            Tensor::cat(&parts.iter().map(|p| p.flatten_all()).collect::<Result<Vec<_>>>()?, 0)
        });
    }

    /// Reference attention composed from candle ops (same layout convention).
    fn attention_ref(qkv: &Tensor, heads: usize) -> Result<Tensor> {
        let (b, n, d3) = qkv.dims3()?;
        let d = d3 / 3;
        let dh = d / heads;
        let t = qkv.reshape((b, n, 3, heads, dh))?.permute((2, 0, 3, 1, 4))?;
        let (q, k, v) = (t.get(0)?.contiguous()?, t.get(1)?.contiguous()?, t.get(2)?.contiguous()?);
        let p = candle_nn::ops::softmax(&(q.matmul(&k.t()?)? * (1.0 / (dh as f64).sqrt()))?, candle_core::D::Minus1)?;
        p.matmul(&v)?.transpose(1, 2)?.reshape((b, n, d))
    }

    #[test]
    fn attention_matches_reference_and_fd() {
        let qkv = Tensor::randn(0f32, 1.0, (2, 7, 24), &Device::Cpu).unwrap();
        let a = attention_packed(&qkv, 2).unwrap();
        let r = attention_ref(&qkv, 2).unwrap();
        let diff = (a - r).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "attention forward differs by {diff}");
        fd_check(&[&[2, 5, 12]], |t| attention_packed(&t[0], 2));
        assert!(attention_packed(&qkv, 5).is_err());
    }

    #[test]
    fn ln_modulate_fd_and_forward() {
        fd_check(&[&[2, 3, 6], &[2, 6], &[2, 6]], |t| ln_modulate(&t[0], &t[1], &t[2]));
        let x = Tensor::randn(0f32, 1.0, (2, 3, 6), &Device::Cpu).unwrap();
        let sh = Tensor::randn(0f32, 1.0, (2, 6), &Device::Cpu).unwrap();
        let sc = Tensor::randn(0f32, 1.0, (2, 6), &Device::Cpu).unwrap();
        let a = ln_modulate(&x, &sh, &sc).unwrap();
        let r = crate::policy::nn::layers::layer_norm_plain(&x, 1e-6).unwrap().broadcast_mul(&(sc.unsqueeze(1).unwrap() + 1.0).unwrap()).unwrap().broadcast_add(&sh.unsqueeze(1).unwrap()).unwrap();
        let diff = (a - r).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "ln_modulate forward differs by {diff}");
        assert!(ln_modulate(&x, &sh.narrow(1, 0, 5).unwrap(), &sc).is_err());
    }

    #[test]
    fn gelu_fd_and_matches_candle() {
        fd_check(&[&[3, 7]], |t| gelu_tanh(&t[0]));
        let x = Tensor::randn(0f32, 2.0, (5, 9), &Device::Cpu).unwrap();
        let diff = (gelu_tanh(&x).unwrap() - x.gelu().unwrap()).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "gelu differs from candle's by {diff}");
    }

    #[test]
    fn gated_residual_fd() {
        fd_check(&[&[2, 3, 4], &[2, 3, 4], &[2, 4]], |t| gated_residual(&t[0], &t[1], &t[2]));
        let x = Tensor::zeros((2, 3, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(gated_residual(&x, &x, &x).is_err());
    }

    #[test]
    fn linear_bias_fd_and_forward() {
        fd_check(&[&[2, 3, 4], &[5, 4], &[5]], |t| linear_bias(&t[0], &t[1], &t[2]));
        let x = Tensor::randn(0f32, 1.0, (2, 3, 4), &Device::Cpu).unwrap();
        let w = Tensor::randn(0f32, 1.0, (5, 4), &Device::Cpu).unwrap();
        let b = Tensor::randn(0f32, 1.0, 5, &Device::Cpu).unwrap();
        let r = x.broadcast_matmul(&w.t().unwrap()).unwrap().broadcast_add(&b).unwrap();
        let diff = (linear_bias(&x, &w, &b).unwrap() - r).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-5, "linear_bias differs by {diff}");
        assert!(linear_bias(&x, &w.t().unwrap(), &b).is_err());
    }

    /// The vectorisable exp: within 3e-7 relative of libm's over the range softmax and
    /// tanh use, exact at 0, and no overflow or negative values at the clamps.
    #[test]
    fn exp_fast_matches_libm() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0f32 + (175.0 * i as f32) / 200_000.0;
            let (got, want) = (exp_f32(x) as f64, (x as f64).exp());
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 3e-7, "max relative error {worst:e}");
        assert_eq!(exp_f32(0.0), 1.0);
        for x in [-1e4f32, -200.0, f32::NEG_INFINITY] {
            let v = exp_f32(x);
            assert!((0.0..1e-37).contains(&v), "exp({x}) = {v}");
        }
        assert!(exp_f32(1e4).is_finite() && exp_f32(1e4) > 1e38);
        assert!(exp_f32(f32::NAN).is_nan());
    }

    /// Untracked (frozen) weight and bias: the backward skips dW/db and gives the same dx
    /// as with tracked ones.
    #[test]
    fn linear_bias_with_frozen_weights_gives_the_same_input_gradient() {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1.0, (6, 4), &dev).unwrap();
        let w = Var::randn(0f32, 1.0, (5, 4), &dev).unwrap();
        let b = Var::randn(0f32, 1.0, 5, &dev).unwrap();
        let wt = Tensor::randn(0f32, 1.0, (6, 5), &dev).unwrap();
        let loss = |w: &Tensor, b: &Tensor| (linear_bias(x.as_tensor(), w, b).unwrap() * &wt).unwrap().sum_all().unwrap().backward().unwrap();
        let tracked = loss(w.as_tensor(), b.as_tensor());
        let (wd, bd) = (w.as_tensor().detach(), b.as_tensor().detach());
        let frozen = loss(&wd, &bd);
        assert!(tracked.get(w.as_tensor()).is_some() && tracked.get(b.as_tensor()).is_some());
        // candle stores whatever a backward returns, so a computed dW would show up here.
        assert!(frozen.get(&wd).is_none() && frozen.get(&bd).is_none(), "dW/db formed for frozen weights");
        let (gt, gf) = (tracked.get(x.as_tensor()).unwrap(), frozen.get(x.as_tensor()).unwrap());
        let d = (gt - gf).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(d, 0.0, "dx differs by {d}");
    }
}

// ---------------------------------------------------------------------------------------
// im2col for 3×3 convolutions (channels-last), with col2im as its backward.

/// x: (B, H, W, C) → (B, H, W, 9·C): for every pixel, its 3×3 neighbourhood (zero padded),
/// tap-major (tap = dy·3 + dx, offsets −1..=1) then channel. The composed version (pad, nine
/// narrows, cat) spent most of its backward building zero-padded copies.
pub fn im2col3x3(x: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() {
        return im2col3x3_composed(x); // the kernel is CPU code
    }
    x.contiguous()?.apply_op1(Im2Col)
}

/// [`im2col3x3`] from candle ops (pad, nine shifted views, cat): the same numbers on any
/// device.
pub fn im2col3x3_composed(x: &Tensor) -> Result<Tensor> {
    let (_, h, w, _) = x.dims4()?;
    let p = x.pad_with_zeros(1, 1, 1)?.pad_with_zeros(2, 1, 1)?;
    let taps: Vec<Tensor> = (0..9).map(|t| p.narrow(1, t / 3, h)?.narrow(2, t % 3, w)).collect::<Result<_>>()?;
    Tensor::cat(&taps, 3)
}

struct Im2Col;
struct Col2Im;

fn im2col_fwd<T: Elem>(x: &[T], b: usize, h: usize, w: usize, c: usize) -> Vec<T> {
    // Every element is written once below (a copy or a padding zero), so the buffer is not
    // zero-filled first: that memset was 2 % of a training step.
    let len = b * h * w * 9 * c;
    let mut out: Vec<T> = Vec::with_capacity(len);
    out.spare_capacity_mut()[..len].par_chunks_mut(w * 9 * c).enumerate().for_each(|(r, orow)| {
        let (n, i) = (r / h, r % h);
        for j in 0..w {
            for dy in 0..3 {
                let yy = i as isize + dy as isize - 1;
                for dx in 0..3 {
                    let xx = j as isize + dx as isize - 1;
                    let dst = &mut orow[(j * 9 + dy * 3 + dx) * c..][..c];
                    if yy < 0 || yy >= h as isize || xx < 0 || xx >= w as isize {
                        dst.iter_mut().for_each(|d| {
                            d.write(T::zero());
                        });
                    } else {
                        let src = &x[((n * h + yy as usize) * w + xx as usize) * c..][..c];
                        dst.iter_mut().zip(src).for_each(|(d, &v)| {
                            d.write(v);
                        });
                    }
                }
            }
        }
    });
    // SAFETY: the loop above initialised all `len` elements (9 taps × c for every pixel).
    unsafe { out.set_len(len) };
    out
}

fn col2im<T: Elem>(g: &[T], b: usize, h: usize, w: usize, c: usize) -> Vec<T> {
    let mut dx = vec![T::zero(); b * h * w * c];
    // Output pixel (n, i, j) gathers tap (dy, dx) of the column at (i − dy + 1, j − dx + 1).
    dx.par_chunks_mut(w * c).enumerate().for_each(|(r, drow)| {
        let (n, i) = (r / h, r % h);
        for dy in 0..3 {
            let yy = i as isize - dy as isize + 1;
            if yy < 0 || yy >= h as isize {
                continue;
            }
            let grow = &g[(n * h + yy as usize) * w * 9 * c..][..w * 9 * c];
            for j in 0..w {
                let d = &mut drow[j * c..][..c];
                for ddx in 0..3 {
                    let xx = j as isize - ddx as isize + 1;
                    if xx < 0 || xx >= w as isize {
                        continue;
                    }
                    let src = &grow[(xx as usize * 9 + dy * 3 + ddx) * c..][..c];
                    for (o, &v) in d.iter_mut().zip(src) {
                        *o += v;
                    }
                }
            }
        }
    });
    dx
}

fn dims4(l: &Layout, what: &str) -> Result<(usize, usize, usize, usize)> {
    match l.shape().dims() {
        &[b, h, w, c] => Ok((b, h, w, c)),
        d => candle_core::bail!("policy/ops.rs: {what}: expected (B, H, W, C), got {d:?}"),
    }
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "vipo-im2col3x3"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, h, w, c) = dims4(l, "im2col3x3")?;
        let out = dispatch!(s, "im2col3x3", |v| storage(im2col_fwd(contiguous(v, l, "x")?, b, h, w, c)));
        Ok((out, Shape::from((b, h, w, 9 * c))))
    }
    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad_res.contiguous()?.apply_op1_no_bwd(&Col2Im)?))
    }
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "vipo-col2im3x3"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, h, w, c9) = dims4(l, "col2im3x3")?;
        let c = c9 / 9;
        let out = dispatch!(s, "col2im3x3", |v| storage(col2im(contiguous(v, l, "grad")?, b, h, w, c)));
        Ok((out, Shape::from((b, h, w, c))))
    }
}

#[cfg(test)]
mod device_fallback_tests {
    use super::*;
    use candle_core::Device;

    /// The composed im2col a GPU runs equals the CPU kernel, values and gradients.
    #[test]
    fn im2col_composed_equals_the_kernel() {
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(3);
        let x = candle_core::Var::from_tensor(&crate::sampler::randn(&[2, 5, 4, 3], &mut rng, &Device::Cpu).unwrap()).unwrap();
        let (a, b) = (im2col3x3(x.as_tensor()).unwrap(), im2col3x3_composed(x.as_tensor()).unwrap());
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(flat(&a), flat(&b));
        let w = crate::sampler::randn(a.dims(), &mut rng, &Device::Cpu).unwrap();
        let ga = (&a * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (&b * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let (ga, gb) = (flat(ga.get(x.as_tensor()).unwrap()), flat(gb.get(x.as_tensor()).unwrap()));
        assert!(ga.iter().zip(&gb).all(|(p, q)| (p - q).abs() < 1e-5));
        let g = gelu_tanh(x.as_tensor()).unwrap();
        let r = x.as_tensor().gelu().unwrap();
        assert!(flat(&g).iter().zip(flat(&r)).all(|(p, q)| (p - q).abs() < 1e-5), "the GPU's gelu is the same tanh GELU");
    }
}
