//! AdamW with decoupled weight decay and global grad-norm clipping. Written here (not
//! candle_nn's) because its moments must be saved and restored for exact resume.

use anyhow::Result;
use candle_core::{backprop::GradStore, Tensor, Var};
use std::collections::HashMap;

#[derive(Clone, Debug)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

pub struct AdamW {
    pub cfg: AdamWConfig,
    vars: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    pub step: usize,
}

impl AdamW {
    pub fn new(vars: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let m = vars.iter().map(|(_, v)| v.zeros_like()).collect::<candle_core::Result<Vec<_>>>()?;
        let v2 = vars.iter().map(|(_, v)| v.zeros_like()).collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { cfg, vars, m, v: v2, step: 0 })
    }

    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// Gradients of the trainable vars (zeros where a var got none).
    pub fn collect_grads(&self, grads: &GradStore) -> Result<Vec<Tensor>> {
        self.vars.iter().map(|(_, v)| Ok(grads.get(v.as_tensor()).map(|g| g.detach()).map(Ok).unwrap_or_else(|| v.zeros_like())?)).collect()
    }

    /// Global L2 norm of a gradient list.
    pub fn grad_norm(grads: &[Tensor]) -> Result<f64> {
        let mut s = 0f64;
        for g in grads {
            s += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
        Ok(s.sqrt())
    }

    /// One update with the given (already accumulated) gradients; clips the global norm to
    /// `clip` when > 0. Returns the pre-clip grad norm.
    pub fn apply(&mut self, grads: &[Tensor], lr: f64, clip: f64) -> Result<f64> {
        let norm = Self::grad_norm(grads)?;
        anyhow::ensure!(norm.is_finite(), "gradient norm is not finite ({norm}); weights left untouched");
        let scale = if clip > 0.0 && norm > clip { clip / (norm + 1e-6) } else { 1.0 };
        self.step += 1;
        let c = &self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        for i in 0..self.vars.len() {
            let g = (&grads[i] * scale)?;
            let m = ((&self.m[i] * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            let v = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let var = &self.vars[i].1;
            let upd = ((&m / bc1)? / ((&v / bc2)?.sqrt()? + c.eps)?)?;
            let decayed = (var.as_tensor() * (1.0 - lr * c.weight_decay))?;
            var.set(&(decayed - (upd * lr)?)?)?;
            // Detached so the moments never keep earlier steps' graphs alive.
            self.m[i] = m.detach();
            self.v[i] = v.detach();
        }
        Ok(norm)
    }

    /// Moments as named tensors (`m.NAME`, `v.NAME`) for the checkpoint.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (i, (name, _)) in self.vars.iter().enumerate() {
            out.insert(format!("m.{name}"), self.m[i].clone());
            out.insert(format!("v.{name}"), self.v[i].clone());
        }
        out
    }

    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, step: usize, origin: &str) -> Result<()> {
        for (i, (name, var)) in self.vars.iter().enumerate() {
            for (kind, slot) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                let key = format!("{kind}.{name}");
                let t = tensors.get(&key).ok_or_else(|| anyhow::anyhow!("{origin}: optimizer tensor {key} missing"))?;
                anyhow::ensure!(t.dims() == var.dims(), "{origin}: optimizer tensor {key} has shape {:?}, expected {:?}", t.dims(), var.dims());
                *slot = t.clone();
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Linear warm-up to `lr` over `warmup` steps, then constant.
pub fn lr_at(step: usize, lr: f64, warmup: usize) -> f64 {
    if warmup == 0 || step >= warmup {
        lr
    } else {
        lr * (step + 1) as f64 / warmup as f64
    }
}

/// An exponential moving average of a set of variables (the weights that get sampled and
/// saved). `None` when `decay` is 0.
pub fn ema_init(vars: &[(String, Var)], decay: f64) -> Result<Option<Vec<Tensor>>> {
    if decay <= 0.0 {
        return Ok(None);
    }
    Ok(Some(vars.iter().map(|(_, v)| v.as_tensor().copy()).collect::<candle_core::Result<_>>()?))
}

/// ema ← decay·ema + (1 − decay)·var, for each variable.
pub fn ema_update(ema: &mut [Tensor], vars: &[(String, Var)], decay: f64) -> Result<()> {
    for (e, (_, v)) in ema.iter_mut().zip(vars) {
        // detach: ops on a Var record a graph edge, which would chain every previous EMA
        // tensor and leak memory without bound.
        *e = ((&*e * decay)? + (v.as_tensor() * (1.0 - decay))?)?.detach();
    }
    Ok(())
}
