//! Checkpoints: safetensors weights written atomically, loaded with every name and shape
//! checked so a mismatched file is an error naming the tensor, never a silent partial load.

use anyhow::{bail, Context, Result};
use candle_core::Var;
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use std::collections::HashMap;
use std::path::Path;

/// Save a set of named tensors atomically.
pub fn save_tensors(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    crate::io::atomic_write_with(path, |tmp| candle_core::safetensors::save(tensors, tmp).with_context(|| format!("{}: cannot write safetensors", path.display())))
}

/// Read every tensor of a safetensors file, with errors naming the file.
pub fn read_tensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read checkpoint", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file ({e})", path.display()))?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let t = candle_core::safetensors::Load::load(&view, device).with_context(|| format!("{}: tensor {name}: cannot decode", path.display()))?;
        out.insert(name, t);
    }
    Ok(out)
}

pub fn save_varmap(map: &VarMap, path: &Path) -> Result<()> {
    let tensors: HashMap<String, Tensor> = sorted_vars(map).into_iter().map(|(k, v)| (k, v.as_tensor().clone())).collect();
    save_tensors(&tensors, path)
}

/// Overwrite every variable of `map` from `path`. Missing, extra or mis-shaped tensors are
/// errors naming the tensor; nothing is modified unless the whole file matches.
pub fn load_varmap(map: &VarMap, path: &Path) -> Result<()> {
    let vars = sorted_vars(map);
    let device = vars.first().map(|(_, v)| v.device().clone()).unwrap_or(Device::Cpu);
    let file = read_tensors(path, &device)?;
    for (name, var) in &vars {
        let t = file.get(name).with_context(|| format!("{}: tensor {name} missing (does the checkpoint match this model config?)", path.display()))?;
        if t.dims() != var.dims() {
            bail!("{}: tensor {name} has shape {:?}, the model config expects {:?}", path.display(), t.dims(), var.dims());
        }
    }
    if let Some(extra) = file.keys().find(|k| !vars.iter().any(|(n, _)| n == *k)) {
        bail!("{}: unexpected tensor {extra} (checkpoint is for a different model config)", path.display());
    }
    for (name, var) in &vars {
        var.set(&file[name].to_dtype(var.dtype())?)?;
    }
    Ok(())
}

/// Variables of a map sorted by name (a stable order for optimizers and checkpoints).
pub fn sorted_vars(map: &VarMap) -> Vec<(String, Var)> {
    let data = map.data().lock().unwrap();
    let mut v: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}
