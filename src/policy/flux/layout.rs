//! FLUX.1 checkpoints in their two layouts: Black Forest Labs' single file
//! (`flux1-dev.safetensors`, the names [`crate::policy::flux::model`] uses, optionally prefixed
//! `model.diffusion_model.`) and the diffusers `transformer/` folder
//! (`FluxTransformer2DModel`: q, k and v as separate modules, the single blocks' fused
//! linear1 as to_q / to_k / to_v / proj_mlp, `norm_out.linear` with its halves swapped).

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

use crate::policy::flux::model::{diffusers_modules, diffusers_norm, FluxConfig};

/// Blocks named `prefix{i}.` in a tensor set.
fn count(t: &HashMap<String, Tensor>, prefix: &str) -> usize {
    t.keys().filter_map(|k| k.strip_prefix(prefix)?.split('.').next()?.parse::<usize>().ok()).max().map_or(0, |m| m + 1)
}

/// Swap the two halves of a tensor's rows (diffusers' AdaLayerNormContinuous order).
fn swap_halves(t: &Tensor) -> candle_core::Result<Tensor> {
    let h = t.dim(0)? / 2;
    Tensor::cat(&[t.narrow(0, h, h)?, t.narrow(0, 0, h)?], 0)
}

/// The shape a single-file tensor set describes. RoPE's axes are not in the tensors:
/// `axes` (a config.json's `axes_dims_rope`) or FLUX.1's (16, 56, 56) for 128-wide heads.
pub fn infer_config(t: &HashMap<String, Tensor>, axes: Option<Vec<usize>>, source: &str) -> Result<FluxConfig> {
    let get = |name: &str| t.get(name).with_context(|| format!("{source}: tensor {name} missing (not a FLUX transformer?)"));
    let img_in = get("img_in.weight")?.dims2()?;
    let (hidden, in_channels) = img_in;
    let depth = count(t, "double_blocks.");
    anyhow::ensure!(depth > 0, "{source}: no double_blocks.* tensors");
    let head_dim = get("double_blocks.0.img_attn.norm.query_norm.scale")?.dim(0)?;
    anyhow::ensure!(head_dim > 0 && hidden % head_dim == 0, "{source}: width {hidden} is not a multiple of the head width {head_dim}");
    let axes_dim = match axes {
        Some(a) => a,
        None if head_dim == 128 => vec![16, 56, 56],
        None => anyhow::bail!("{source}: {head_dim}-wide heads and no axes_dims_rope (a transformer/config.json) to split them for RoPE"),
    };
    let cfg = FluxConfig {
        in_channels,
        vec_in_dim: get("vector_in.in_layer.weight")?.dim(1)?,
        context_in_dim: get("txt_in.weight")?.dim(1)?,
        hidden,
        mlp_ratio: get("double_blocks.0.img_mlp.0.weight")?.dim(0)? as f64 / hidden as f64,
        heads: hidden / head_dim,
        depth,
        depth_single: count(t, "single_blocks."),
        axes_dim,
        theta: 10_000.0,
        guidance_embed: t.contains_key("guidance_in.in_layer.weight"),
    };
    cfg.validate().with_context(|| source.to_string())?;
    Ok(cfg)
}

/// The shape of a diffusers tensor set, enough to name its layers.
fn diffusers_shape(d: &HashMap<String, Tensor>, source: &str) -> Result<FluxConfig> {
    let get = |name: &str| d.get(name).with_context(|| format!("{source}: tensor {name} missing (not a diffusers FluxTransformer2DModel?)"));
    let (hidden, in_channels) = get("x_embedder.weight")?.dims2()?;
    let single = count(d, "single_transformer_blocks.");
    let mlp = if single > 0 { get("single_transformer_blocks.0.proj_mlp.weight")?.dim(0)? } else { get("transformer_blocks.0.ff.net.0.proj.weight")?.dim(0)? };
    Ok(FluxConfig {
        in_channels,
        vec_in_dim: get("time_text_embed.text_embedder.linear_1.weight")?.dim(1)?,
        context_in_dim: get("context_embedder.weight")?.dim(1)?,
        hidden,
        mlp_ratio: mlp as f64 / hidden as f64,
        heads: 1,
        depth: count(d, "transformer_blocks."),
        depth_single: single,
        axes_dim: vec![],
        theta: 10_000.0,
        guidance_embed: d.contains_key("time_text_embed.guidance_embedder.linear_1.weight"),
    })
}

/// diffusers names → single-file names (fused layers concatenated, norm_out swapped).
pub fn to_bfl(d: &HashMap<String, Tensor>, source: &str) -> Result<HashMap<String, Tensor>> {
    let shape = diffusers_shape(d, source)?;
    let mut out = HashMap::new();
    for (layer, _, _) in shape.linear_layers() {
        let (modules, swapped) = diffusers_modules(&layer, &shape).with_context(|| format!("{layer}: no diffusers name"))?;
        for suffix in ["weight", "bias"] {
            let parts: Vec<&Tensor> = modules.iter().map(|(m, _)| d.get(&format!("{m}.{suffix}")).with_context(|| format!("{source}: tensor {m}.{suffix} missing"))).collect::<Result<_>>()?;
            let t = Tensor::cat(&parts, 0)?;
            out.insert(format!("{layer}.{suffix}"), if swapped { swap_halves(&t)? } else { t });
        }
    }
    for i in 0..shape.depth {
        for n in ["img_attn.norm.query_norm.scale", "img_attn.norm.key_norm.scale", "txt_attn.norm.query_norm.scale", "txt_attn.norm.key_norm.scale"] {
            norm(d, &mut out, &format!("double_blocks.{i}.{n}"), source)?;
        }
    }
    for i in 0..shape.depth_single {
        for n in ["norm.query_norm.scale", "norm.key_norm.scale"] {
            norm(d, &mut out, &format!("single_blocks.{i}.{n}"), source)?;
        }
    }
    Ok(out)
}

fn norm(d: &HashMap<String, Tensor>, out: &mut HashMap<String, Tensor>, bfl: &str, source: &str) -> Result<()> {
    let name = diffusers_norm(bfl).with_context(|| format!("{bfl}: no diffusers name"))?;
    out.insert(bfl.to_string(), d.get(&name).with_context(|| format!("{source}: tensor {name} missing"))?.clone());
    Ok(())
}

/// Single-file names → diffusers names (for tests and exports).
pub fn to_diffusers(t: &HashMap<String, Tensor>, cfg: &FluxConfig) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for (layer, _, dout) in cfg.linear_layers() {
        let (modules, swapped) = diffusers_modules(&layer, cfg).with_context(|| format!("{layer}: no diffusers name"))?;
        let ranges = crate::policy::nn::adapted::row_ranges(modules, dout);
        for suffix in ["weight", "bias"] {
            let full = t.get(&format!("{layer}.{suffix}")).with_context(|| format!("{layer}.{suffix} missing"))?;
            let full = if swapped { swap_halves(full)? } else { full.clone() };
            for (m, rows) in &ranges {
                out.insert(format!("{m}.{suffix}"), full.narrow(0, rows.start, rows.len())?);
            }
        }
    }
    for (k, v) in t {
        if let Some(d) = diffusers_norm(k) {
            out.insert(d, v.clone());
        }
    }
    Ok(out)
}

/// The transformer of `root` — a diffusers model folder (`transformer/`, sharded or not,
/// with its config.json), a diffusers `transformer` folder, or a single file — in
/// single-file names, with its shape; `variant` (name, shape) is checked against it.
pub fn load_transformer(root: &Path, variant: Option<(&str, &FluxConfig)>, device: &Device) -> Result<(FluxConfig, HashMap<String, Tensor>)> {
    let dir = if root.join("transformer").is_dir() { root.join("transformer") } else { root.to_path_buf() };
    let (tensors, axes, source) = if dir.is_dir() {
        let (d, source) = crate::weights::hf::read_folder(&dir, device)?;
        let axes = std::fs::read_to_string(dir.join("config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["axes_dims_rope"].as_array().map(|a| a.iter().filter_map(|x| x.as_u64().map(|x| x as usize)).collect::<Vec<_>>()));
        (to_bfl(&d, &source)?, axes, source)
    } else {
        let t = crate::weights::tensors::read_tensors(&dir, device)?;
        let t: HashMap<String, Tensor> = t.into_iter().map(|(k, v)| (k.strip_prefix("model.diffusion_model.").map(str::to_string).unwrap_or(k), v)).collect();
        (t, None, dir.display().to_string())
    };
    let axes = axes.or_else(|| variant.map(|(_, c)| c.axes_dim.clone()));
    let cfg = infer_config(&tensors, axes, &source)?;
    if let Some((name, want)) = variant {
        anyhow::ensure!(&cfg == want, "{source}: a FLUX transformer of shape {cfg:?}, not {name} ({want:?})");
    }
    Ok((cfg, tensors))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::flux::model::tests::{random_weights, tiny};

    /// single file → diffusers → single file is the identity; both load to the same
    /// tensors and shape (the diffusers folder's config.json carries the RoPE axes), and
    /// another variant than configured is refused by name.
    #[test]
    fn both_layouts_load_the_same_transformer() {
        let cfg = tiny();
        let bfl: HashMap<String, Tensor> = crate::weights::tensors::sorted_vars(&random_weights(&cfg, 2)).into_iter().map(|(k, v)| (k, v.as_tensor().clone())).collect();
        let d = to_diffusers(&bfl, &cfg).unwrap();
        assert!(d.contains_key("single_transformer_blocks.1.proj_mlp.weight") && d.contains_key("transformer_blocks.0.attn.norm_added_k.weight"));
        assert_eq!(d["single_transformer_blocks.0.proj_mlp.weight"].dims(), &[cfg.mlp(), cfg.hidden]);
        let back = to_bfl(&d, "test").unwrap();
        assert_eq!(back.len(), bfl.len());
        for (k, v) in &bfl {
            let diff = (v - &back[k]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert_eq!(diff, 0.0, "{k}");
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("m/transformer")).unwrap();
        crate::weights::tensors::save_tensors(&d, &dir.path().join("m/transformer/diffusion_pytorch_model.safetensors")).unwrap();
        std::fs::write(dir.path().join("m/transformer/config.json"), r#"{"_class_name": "FluxTransformer2DModel", "axes_dims_rope": [4, 6, 6]}"#).unwrap();
        let (c, t) = load_transformer(&dir.path().join("m"), None, &Device::Cpu).unwrap();
        assert_eq!((c, t.len()), (cfg.clone(), bfl.len()));
        let prefixed: HashMap<String, Tensor> = bfl.iter().map(|(k, v)| (format!("model.diffusion_model.{k}"), v.clone())).collect();
        crate::weights::tensors::save_tensors(&prefixed, &dir.path().join("flux1-tiny.safetensors")).unwrap();
        let (c, _) = load_transformer(&dir.path().join("flux1-tiny.safetensors"), Some(("tiny", &cfg)), &Device::Cpu).unwrap();
        assert_eq!(c, cfg);
        let e = format!("{:#}", load_transformer(&dir.path().join("m"), Some(("flux.1-dev", &FluxConfig::dev())), &Device::Cpu).err().unwrap());
        assert!(e.contains("not flux.1-dev"), "{e}");
        // A single file without RoPE axes and narrow heads cannot be split.
        let e = format!("{:#}", load_transformer(&dir.path().join("flux1-tiny.safetensors"), None, &Device::Cpu).err().unwrap());
        assert!(e.contains("axes_dims_rope"), "{e}");
        let mut broken = d.clone();
        broken.remove("transformer_blocks.1.attn.add_v_proj.weight");
        let e = format!("{:#}", to_bfl(&broken, "x.safetensors").err().unwrap());
        assert!(e.contains("x.safetensors") && e.contains("transformer_blocks.1.attn.add_v_proj.weight"), "{e}");
    }
}
