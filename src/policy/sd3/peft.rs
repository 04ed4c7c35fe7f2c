//! LoRA adapters of the SD3 transformer out in the ecosystem's formats: the safetensors
//! file diffusers' `StableDiffusion3Pipeline.load_lora_weights` reads
//! (`transformer.<diffusers module>.lora_A.weight` / `.lora_B.weight`) with PEFT's
//! `adapter_config.json` beside it, and the base weights with the adapters merged
//! (W + α/r · B·A on each adapted row block), in the single-file layout.

use anyhow::{Context, Result};
use candle_core::Tensor;
use std::collections::HashMap;
use std::path::Path;

use crate::policy::nn::adapted::DiffusersNames;

pub const LORA_FILE: &str = "pytorch_lora_weights.safetensors";
pub const ADAPTER_CONFIG: &str = "adapter_config.json";

/// Write `dir/pytorch_lora_weights.safetensors` and `dir/adapter_config.json` from the
/// adapter map of an SD3 transformer (names `<diffusers module>.lora_{A,B}.weight`).
pub fn export(dir: &Path, adapters: &HashMap<String, Tensor>, rank: usize, alpha: f64, targets: &[String]) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let out: HashMap<String, Tensor> = adapters.iter().map(|(k, v)| (format!("transformer.{k}"), v.clone())).collect();
    crate::weights::tensors::save_tensors(&out, &dir.join(LORA_FILE))?;
    let config = serde_json::json!({
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": targets,
        "lora_dropout": 0.0,
        "bias": "none",
        "init_lora_weights": "gaussian",
        "use_rslora": false,
        "use_dora": false,
    });
    crate::io::atomic_write(&dir.join(ADAPTER_CONFIG), serde_json::to_string_pretty(&config)?.as_bytes())
}

/// The single-file base weights with every adapter merged in; `names` maps a
/// single-file layer to its diffusers modules (the policy's [`crate::policy::Policy::diffusers_names`]).
pub fn merge(base: &HashMap<String, Tensor>, adapters: &HashMap<String, Tensor>, rank: usize, alpha: f64, names: DiffusersNames) -> Result<HashMap<String, Tensor>> {
    // diffusers module → (single-file layer, its output rows)
    let mut place: HashMap<String, (String, std::ops::Range<usize>)> = HashMap::new();
    for (k, w) in base {
        if let Some(layer) = k.strip_suffix(".weight") {
            if let Some((modules, _)) = names(layer) {
                for (name, rows) in crate::policy::nn::adapted::row_ranges(modules, w.dim(0)?) {
                    place.insert(name, (layer.to_string(), rows));
                }
            }
        }
    }
    let mut out = base.clone();
    let s = alpha / rank as f64;
    for (k, a) in adapters {
        let Some(module) = k.strip_suffix(".lora_A.weight") else { continue };
        let b = adapters.get(&format!("{module}.lora_B.weight")).with_context(|| format!("adapter {module}: lora_A without lora_B"))?;
        let (layer, rows) = place.get(module).with_context(|| format!("adapter {module}: no such layer in the base weights"))?;
        let wname = format!("{layer}.weight");
        let w = &out[&wname];
        let delta = (b.matmul(a)? * s)?.to_dtype(w.dtype())?;
        let mut blocks = Vec::new();
        if rows.start > 0 {
            blocks.push(w.narrow(0, 0, rows.start)?);
        }
        blocks.push((w.narrow(0, rows.start, rows.len())? + delta)?);
        if rows.end < w.dim(0)? {
            blocks.push(w.narrow(0, rows.end, w.dim(0)? - rows.end)?);
        }
        let merged = Tensor::cat(&blocks, 0)?;
        out.insert(wname, merged);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::nn::layers::{LoraCtx, LoraSpec};
    use crate::policy::sd3::mmdit::{tests::random_weights, tests::tiny, Mmdit};
    use candle_core::{DType, Device};
    use candle_nn::{VarBuilder, VarMap};

    /// Flow-GRPO's SD3 targets on the tiny model: exported names and shapes are diffusers'
    /// (one adapter per projection, B of the projection's rows), the config is PEFT's, and
    /// the merged single-file weights give the adapted model's output.
    #[test]
    fn peft_names_and_merged_weights() {
        let cfg = tiny();
        let base = random_weights(&cfg, 11);
        let targets: Vec<String> =
            ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v"].iter().map(|s| s.to_string()).collect();
        let lmap = VarMap::new();
        let ctx = LoraCtx { vb: crate::policy::seeded_var_builder(&lmap, 3, &Device::Cpu), spec: LoraSpec { rank: 2, alpha: 4.0, targets: targets.clone() } };
        let m = Mmdit::new(&crate::policy::frozen_builder(&base, &Device::Cpu), &cfg, Some(&ctx)).unwrap();
        // Move B off zero so the merge has something to show.
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(2);
        for (k, v) in crate::weights::tensors::sorted_vars(&lmap) {
            if k.ends_with("lora_B.weight") {
                v.set(&(crate::sampler::randn(v.dims(), &mut rng, &Device::Cpu).unwrap() * 0.3).unwrap()).unwrap();
            }
        }
        let adapters: HashMap<String, Tensor> = crate::weights::tensors::sorted_vars(&lmap).into_iter().map(|(k, v)| (k, v.as_tensor().clone())).collect();
        let d = tempfile::tempdir().unwrap();
        export(d.path(), &adapters, 2, 4.0, &targets).unwrap();
        let file = crate::weights::tensors::read_tensors(&d.path().join(LORA_FILE), &Device::Cpu).unwrap();
        let h = cfg.hidden();
        // Blocks 0 and 1 have every target; the pre-only last block has no to_add_out.
        assert_eq!(file.len(), 2 * (8 * 2 + 7));
        for (name, shape) in [
            ("transformer.transformer_blocks.0.attn.to_q.lora_A.weight", vec![2, h]),
            ("transformer.transformer_blocks.0.attn.to_q.lora_B.weight", vec![h, 2]),
            ("transformer.transformer_blocks.2.attn.add_v_proj.lora_B.weight", vec![h, 2]),
            ("transformer.transformer_blocks.1.attn.to_add_out.lora_A.weight", vec![2, h]),
        ] {
            assert_eq!(file.get(name).unwrap_or_else(|| panic!("{name} missing")).dims(), shape.as_slice(), "{name}");
        }
        assert!(!file.contains_key("transformer.transformer_blocks.2.attn.to_add_out.lora_A.weight"));
        let conf: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.path().join(ADAPTER_CONFIG)).unwrap()).unwrap();
        assert_eq!((conf["peft_type"].as_str(), conf["r"].as_u64(), conf["lora_alpha"].as_f64()), (Some("LORA"), Some(2), Some(4.0)));
        assert_eq!(conf["target_modules"].as_array().unwrap().len(), 8);

        let base_t: HashMap<String, Tensor> = crate::weights::tensors::sorted_vars(&base).into_iter().map(|(k, v)| (k, v.as_tensor().clone())).collect();
        let depth = cfg.depth;
        let names = move |l: &str| crate::policy::sd3::names::diffusers_parts(l, depth);
        let merged = merge(&base_t, &adapters, 2, 4.0, &names).unwrap();
        let mm = Mmdit::new(&VarBuilder::from_tensors(merged, DType::F32, &Device::Cpu), &cfg, None).unwrap();
        let z = crate::sampler::randn(&[1, cfg.in_channels, 4, 4], &mut rng, &Device::Cpu).unwrap();
        let c = crate::sampler::randn(&[1, 3, cfg.context_dim], &mut rng, &Device::Cpu).unwrap();
        let p = crate::sampler::randn(&[1, cfg.pooled_dim], &mut rng, &Device::Cpu).unwrap();
        let s = Tensor::new(&[0.4f32], &Device::Cpu).unwrap();
        let (a, b) = (m.forward(&z, &s, &c, &p).unwrap(), mm.forward(&z, &s, &c, &p).unwrap());
        let base_out = Mmdit::new(&VarBuilder::from_varmap(&base, DType::F32, &Device::Cpu), &cfg, None).unwrap().forward(&z, &s, &c, &p).unwrap();
        let diff = |x: &Tensor, y: &Tensor| (x - y).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(diff(&a, &base_out) > 1e-3, "the adapters must change the output");
        assert!(diff(&a, &b) < 1e-4, "merged weights differ from the adapted model by {}", diff(&a, &b));
    }
}
