//! The two published layouts of an SD3 / SD3.5 transformer and the conversion between
//! them: Stability AI's single-file names (what [`crate::policy::sd3::mmdit::Mmdit`] reads; optionally
//! under `model.diffusion_model.`) and diffusers' `SD3Transformer2DModel` names (separate
//! `to_q`/`to_k`/`to_v`, `add_*_proj` for the context stream, `[scale; shift]` instead of
//! `[shift; scale]` in the two continuous adaLN layers), following diffusers'
//! `convert_sd3_to_diffusers.py`. The model shape is read off the tensors.

use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use std::collections::HashMap;

use crate::policy::sd3::mmdit::MmditConfig;
use crate::policy::sd3::names::{swapped, BLOCK, GLOBAL, QKV};

const SAI_PREFIX: &str = "model.diffusion_model.";

/// [a; b] → [b; a] along rows (diffusers' AdaLayerNormContinuous order); an involution.
fn swap_halves(t: &Tensor) -> Result<Tensor> {
    let n = t.dim(0)? / 2;
    Ok(Tensor::cat(&[&t.narrow(0, n, n)?, &t.narrow(0, 0, n)?], 0)?)
}

fn depth_of(t: &HashMap<String, Tensor>, prefix: &str) -> usize {
    t.keys().filter_map(|k| k.strip_prefix(prefix)?.split('.').next()?.parse::<usize>().ok()).max().map_or(0, |m| m + 1)
}

/// The tensors of an SD3 transformer in single-file names, from either layout. `source`
/// names the files in errors. Every tensor must be accounted for: a leftover one means
/// another model.
pub fn to_sai(mut t: HashMap<String, Tensor>, source: &str) -> Result<HashMap<String, Tensor>> {
    if t.keys().any(|k| k.starts_with(SAI_PREFIX)) {
        t = t.into_iter().filter_map(|(k, v)| k.strip_prefix(SAI_PREFIX).map(|s| (s.to_string(), v))).collect();
    }
    if t.contains_key("x_embedder.proj.weight") {
        return Ok(t);
    }
    if !t.contains_key("pos_embed.proj.weight") {
        let example = t.keys().min().cloned().unwrap_or_default();
        bail!("{source}: not an SD3 / SD3.5 transformer: neither x_embedder.proj.weight (single file) nor pos_embed.proj.weight (diffusers) is there (first tensor: {example})");
    }
    let depth = depth_of(&t, "transformer_blocks.");
    anyhow::ensure!(depth > 0, "{source}: no transformer_blocks.* tensors");
    let mut out = HashMap::new();
    fn take(out: &mut HashMap<String, Tensor>, t: &mut HashMap<String, Tensor>, from: String, to: String, swap: bool) -> Result<()> {
        if let Some(v) = t.remove(&from) {
            out.insert(to, if swap { swap_halves(&v)? } else { v });
        }
        Ok(())
    }
    for (s, d) in GLOBAL {
        for suf in ["", ".weight", ".bias"] {
            take(&mut out, &mut t, format!("{d}{suf}"), format!("{s}{suf}"), swapped(s, depth))?;
        }
    }
    for i in 0..depth {
        for (s, d) in BLOCK {
            let stem = format!("joint_blocks.{i}.{s}");
            for suf in [".weight", ".bias"] {
                take(&mut out, &mut t, format!("transformer_blocks.{i}.{d}{suf}"), format!("{stem}{suf}"), swapped(&stem, depth))?;
            }
        }
        for (s, parts) in QKV {
            for suf in [".weight", ".bias"] {
                let names: Vec<String> = parts.iter().map(|p| format!("transformer_blocks.{i}.{p}{suf}")).collect();
                if names.iter().all(|n| t.contains_key(n)) {
                    let ps: Vec<Tensor> = names.iter().map(|n| t.remove(n).unwrap()).collect();
                    out.insert(format!("joint_blocks.{i}.{s}{suf}"), Tensor::cat(&ps, 0)?);
                } else if let Some(n) = names.iter().find(|n| t.contains_key(*n)) {
                    bail!("{source}: {n} without the other two of {}", parts.join("/"));
                }
            }
        }
    }
    if let Some(k) = t.keys().min() {
        bail!("{source}: unexpected tensor {k} for an SD3 / SD3.5 transformer in the diffusers layout");
    }
    Ok(out)
}

/// Single-file names → diffusers names (the inverse of [`to_sai`]'s conversion).
pub fn to_diffusers(t: &HashMap<String, Tensor>) -> Result<HashMap<String, Tensor>> {
    let depth = depth_of(t, "joint_blocks.");
    let mut out = HashMap::new();
    for (k, v) in t {
        let (stem, suf) = match k.rsplit_once('.') {
            Some((s, x @ ("weight" | "bias"))) => (s.to_string(), format!(".{x}")),
            _ => (k.clone(), String::new()),
        };
        let v = if swapped(&stem, depth) { swap_halves(v)? } else { v.clone() };
        if let Some((_, d)) = GLOBAL.iter().find(|(s, _)| *s == stem || *s == k.as_str()) {
            let name = if GLOBAL.iter().any(|(s, _)| *s == k.as_str()) { d.to_string() } else { format!("{d}{suf}") };
            out.insert(name, v);
            continue;
        }
        let rest = stem.strip_prefix("joint_blocks.").with_context(|| format!("tensor {k}: not part of an SD3 transformer"))?;
        let (i, within) = rest.split_once('.').with_context(|| format!("tensor {k}: no block suffix"))?;
        if let Some((_, parts)) = QKV.iter().find(|(s, _)| *s == within) {
            for (j, p) in v.chunk(3, 0)?.into_iter().zip(parts.iter()) {
                out.insert(format!("transformer_blocks.{i}.{p}{suf}"), j);
            }
        } else if let Some((_, d)) = BLOCK.iter().find(|(s, _)| *s == within) {
            out.insert(format!("transformer_blocks.{i}.{d}{suf}"), v);
        } else {
            bail!("tensor {k}: no diffusers name");
        }
    }
    Ok(out)
}

/// The model shape a single-file-named tensor set describes (`source` names the files).
pub fn infer_config(t: &HashMap<String, Tensor>, source: &str) -> Result<MmditConfig> {
    let get = |name: &str| t.get(name).with_context(|| format!("{source}: tensor {name} missing"));
    let pw = get("x_embedder.proj.weight")?.dims().to_vec();
    anyhow::ensure!(pw.len() == 4 && pw[2] == pw[3], "{source}: x_embedder.proj.weight has shape {pw:?}, expected (hidden, channels, p, p)");
    let (hidden, in_channels, patch) = (pw[0], pw[1], pw[2]);
    let depth = depth_of(t, "joint_blocks.");
    anyhow::ensure!(depth > 0, "{source}: no joint_blocks.* tensors");
    let qk_norm = t.contains_key("joint_blocks.0.x_block.attn.ln_q.weight");
    // SD3 heads are 64 wide; with QK norm the norm's width says so exactly.
    let head_dim = if qk_norm { get("joint_blocks.0.x_block.attn.ln_q.weight")?.dim(0)? } else { 64 };
    anyhow::ensure!(hidden % head_dim == 0, "{source}: width {hidden} is not a multiple of the head width {head_dim}");
    let dual: Vec<usize> = (0..depth).filter(|i| t.contains_key(&format!("joint_blocks.{i}.x_block.attn2.qkv.weight"))).collect();
    anyhow::ensure!(dual.iter().enumerate().all(|(j, &i)| i == j), "{source}: MMDiT-X blocks {dual:?} are not the first ones, which is the only arrangement supported");
    let pos = get("pos_embed")?.dims().to_vec();
    let side = (pos.get(1).copied().unwrap_or(0) as f64).sqrt().round() as usize;
    anyhow::ensure!(pos.len() == 3 && side * side == pos[1], "{source}: pos_embed has shape {pos:?}, expected (1, side², hidden)");
    let cfg = MmditConfig {
        patch,
        in_channels,
        depth,
        heads: hidden / head_dim,
        head_dim,
        pooled_dim: get("y_embedder.mlp.0.weight")?.dim(1)?,
        context_dim: get("context_embedder.weight")?.dim(1)?,
        pos_embed_max: side,
        freq_dim: get("t_embedder.mlp.0.weight")?.dim(1)?,
        qk_norm,
        dual_attention_layers: dual.len(),
    };
    cfg.validate().with_context(|| source.to_string())?;
    Ok(cfg)
}

/// Load an SD3 transformer: `spec` is a single `.safetensors` file, a diffusers model folder
/// (its `transformer/` is used) or component folder, or a repository id in the local
/// Hugging Face cache. Returns its single-file-named tensors and shape; when `expect` is
/// given (the configured variant), a model of another shape is refused naming the folder
/// and what differs.
pub fn load_transformer(spec: &str, expect: Option<(&str, &MmditConfig)>, device: &candle_core::Device) -> Result<(MmditConfig, HashMap<String, Tensor>)> {
    let root = crate::weights::hf::resolve(spec)?;
    let files = crate::weights::hf::component_files(&root, "transformer")?;
    let source = if files.len() == 1 { files[0].display().to_string() } else { format!("{} ({} shards)", files[0].parent().unwrap_or(&root).display(), files.len()) };
    let t = to_sai(crate::weights::hf::read_component(&files, device)?, &source)?;
    let found = infer_config(&t, &source)?;
    if let Some((name, want)) = expect {
        check_variant(&found, want, name, &source)?;
    }
    Ok((found, t))
}

/// `found` must be the configured variant `name` (`want`).
pub fn check_variant(found: &MmditConfig, want: &MmditConfig, name: &str, source: &str) -> Result<()> {
    let mut diffs = Vec::new();
    let mut cmp = |field: &str, a: usize, b: usize| {
        if a != b {
            diffs.push(format!("{field} {a} (expected {b})"));
        }
    };
    cmp("blocks", found.depth, want.depth);
    cmp("heads", found.heads, want.heads);
    cmp("head width", found.head_dim, want.head_dim);
    cmp("latent channels", found.in_channels, want.in_channels);
    cmp("dual-attention blocks", found.dual_attention_layers, want.dual_attention_layers);
    cmp("position table side", found.pos_embed_max, want.pos_embed_max);
    cmp("QK norm", found.qk_norm as usize, want.qk_norm as usize);
    anyhow::ensure!(diffs.is_empty(), "{source}: not {name} (sd3.variant): {}", diffs.join(", "));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::sd3::mmdit::{tests::random_weights, tests::tiny, Mmdit};
    use candle_core::{DType, Device};
    use candle_nn::VarBuilder;

    fn tensors(map: &candle_nn::VarMap) -> HashMap<String, Tensor> {
        crate::weights::tensors::sorted_vars(map).into_iter().map(|(k, v)| (k, v.as_tensor().clone())).collect()
    }

    fn forward(t: HashMap<String, Tensor>, cfg: &MmditConfig) -> Tensor {
        let m = Mmdit::new(&VarBuilder::from_tensors(t, DType::F32, &Device::Cpu), cfg, None).unwrap();
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(1);
        let z = crate::sampler::randn(&[1, cfg.in_channels, 4, 4], &mut rng, &Device::Cpu).unwrap();
        let ctx = crate::sampler::randn(&[1, 3, cfg.context_dim], &mut rng, &Device::Cpu).unwrap();
        let pooled = crate::sampler::randn(&[1, cfg.pooled_dim], &mut rng, &Device::Cpu).unwrap();
        m.forward(&z, &Tensor::new(&[0.6f32], &Device::Cpu).unwrap(), &ctx, &pooled).unwrap()
    }

    /// Single file (with the `model.diffusion_model.` prefix) and a sharded diffusers
    /// folder found through the hub cache load to the same model, whose shape is read off
    /// the tensors; the diffusers names are the published ones.
    #[test]
    fn both_layouts_load_to_the_same_model() {
        let cfg = tiny();
        let sai = tensors(&random_weights(&cfg, 7));
        let want = forward(sai.clone(), &cfg);
        let diff = to_diffusers(&sai).unwrap();
        for name in [
            "pos_embed.proj.weight",
            "time_text_embed.text_embedder.linear_2.bias",
            "transformer_blocks.0.attn.to_k.weight",
            "transformer_blocks.0.attn.add_v_proj.bias",
            "transformer_blocks.0.attn2.norm_q.weight",
            "transformer_blocks.2.attn.norm_added_k.weight",
            "transformer_blocks.1.ff_context.net.0.proj.weight",
            "transformer_blocks.2.norm1_context.linear.weight",
            "norm_out.linear.bias",
            "proj_out.weight",
        ] {
            assert!(diff.contains_key(name), "{name} missing from {:?}", diff.keys().collect::<Vec<_>>());
        }
        assert!(!diff.contains_key("transformer_blocks.2.attn.to_add_out.weight"), "the last context stream is pre-only");
        let fused = sai.keys().filter(|k| k.contains(".qkv.")).count();
        assert_eq!(fused, 2 * (2 * cfg.depth + cfg.dual_attention_layers));
        assert_eq!(diff.len(), sai.len() + 2 * fused, "each fused qkv tensor becomes three");
        // [shift; scale] → [scale; shift] in the final adaLN.
        let (a, b) = (&sai["final_layer.adaLN_modulation.1.bias"], &diff["norm_out.linear.bias"]);
        let d = cfg.hidden();
        assert_eq!(a.narrow(0, 0, d).unwrap().to_vec1::<f32>().unwrap(), b.narrow(0, d, d).unwrap().to_vec1::<f32>().unwrap());

        let dir = tempfile::tempdir().unwrap();
        let snap = dir.path().join("hub/models--org--tiny-sd35/snapshots/r1");
        let tr = snap.join("transformer");
        std::fs::create_dir_all(&tr).unwrap();
        let mut names: Vec<&String> = diff.keys().collect();
        names.sort();
        let (first, second) = names.split_at(names.len() / 2);
        let mut weight_map = serde_json::Map::new();
        for (shard, part) in [("diffusion_pytorch_model-00001-of-00002.safetensors", first), ("diffusion_pytorch_model-00002-of-00002.safetensors", second)] {
            let t: HashMap<String, Tensor> = part.iter().map(|k| ((*k).clone(), diff[*k].clone())).collect();
            crate::weights::tensors::save_tensors(&t, &tr.join(shard)).unwrap();
            for k in part {
                weight_map.insert((*k).clone(), shard.into());
            }
        }
        std::fs::write(tr.join("diffusion_pytorch_model.safetensors.index.json"), serde_json::json!({"weight_map": weight_map}).to_string()).unwrap();
        std::fs::create_dir_all(dir.path().join("hub/models--org--tiny-sd35/refs")).unwrap();
        std::fs::write(dir.path().join("hub/models--org--tiny-sd35/refs/main"), "r1").unwrap();
        let root = crate::weights::hf::resolve_in("org/tiny-sd35", Some(&dir.path().join("hub")));
        let files = crate::weights::hf::component_files(&root.unwrap(), "transformer").unwrap();
        let loaded = to_sai(crate::weights::hf::read_component(&files, &Device::Cpu).unwrap(), "tiny").unwrap();
        assert_eq!(infer_config(&loaded, "tiny").unwrap(), cfg);
        let got = forward(loaded, &cfg);
        assert_eq!((got - &want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);

        let prefixed: HashMap<String, Tensor> = sai.iter().map(|(k, v)| (format!("model.diffusion_model.{k}"), v.clone())).collect();
        let single = to_sai(prefixed, "single").unwrap();
        assert_eq!(infer_config(&single, "single").unwrap(), cfg);
    }

    /// A model of another shape than the configured variant is refused, naming the
    /// folder and every difference; the same shape loads.
    #[test]
    fn another_variant_is_refused() {
        let cfg = tiny();
        let d = tempfile::tempdir().unwrap();
        let tr = d.path().join("model/transformer");
        std::fs::create_dir_all(&tr).unwrap();
        crate::weights::tensors::save_tensors(&tensors(&random_weights(&cfg, 9)), &tr.join("diffusion_pytorch_model.safetensors")).unwrap();
        let spec = d.path().join("model");
        let (found, _) = load_transformer(spec.to_str().unwrap(), Some(("tiny", &cfg)), &Device::Cpu).unwrap();
        assert_eq!(found, cfg);
        let other = MmditConfig { dual_attention_layers: 0, qk_norm: false, ..cfg.clone() };
        let e = load_transformer(spec.to_str().unwrap(), Some(("sd3-medium", &other)), &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("diffusion_pytorch_model.safetensors: not sd3-medium (sd3.variant)") && e.contains("dual-attention blocks 1 (expected 0)") && e.contains("QK norm 1 (expected 0)"), "{e}");
        let e = load_transformer(spec.to_str().unwrap(), Some(("sd3.5-medium", &MmditConfig::sd35_medium())), &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("blocks 3 (expected 24)"), "{e}");
    }

    /// Not a transformer, a leftover tensor, a half-split qkv: errors naming source and
    /// tensor.
    #[test]
    fn wrong_tensors_are_named() {
        let z = || Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
        let vae: HashMap<String, Tensor> = [("decoder.conv_in.weight".to_string(), z())].into();
        let e = to_sai(vae, "vae.safetensors").unwrap_err().to_string();
        assert!(e.contains("vae.safetensors") && e.contains("not an SD3") && e.contains("decoder.conv_in.weight"), "{e}");
        let mut diff = to_diffusers(&tensors(&random_weights(&tiny(), 8))).unwrap();
        diff.insert("transformer_blocks.0.attn.to_q.lora_A.weight".into(), z());
        let e = to_sai(diff.clone(), "t").unwrap_err().to_string();
        assert!(e.contains("unexpected tensor transformer_blocks.0.attn.to_q.lora_A.weight"), "{e}");
        diff.remove("transformer_blocks.0.attn.to_q.lora_A.weight");
        diff.remove("transformer_blocks.1.attn.to_v.bias");
        let e = to_sai(diff, "t").unwrap_err().to_string();
        assert!(e.contains("without the other two"), "{e}");
        let mut sai = tensors(&random_weights(&tiny(), 8));
        sai.remove("context_embedder.weight");
        assert!(infer_config(&sai, "m.safetensors").unwrap_err().to_string().contains("m.safetensors: tensor context_embedder.weight missing"));
    }
}
