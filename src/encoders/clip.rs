//! CLIP (Hugging Face `CLIPModel` folders): the text and vision towers, the tokenizer, and
//! `CLIPImageProcessor`'s preprocessing. Frozen and inference-only; shared by the CLIP-family
//! rewards (`reward::clip`, `reward::hps`, `reward::aesthetic`) and by the text side of
//! SD3 / FLUX (`ClipText`).
//!
//! Preprocessing as `CLIPImageProcessor`: the image as 8-bit RGB, PIL's bicubic resize of
//! the shortest side (reimplemented bit for bit: fixed-point weights, 8-bit intermediate),
//! centre crop, rescale by 1/255, normalise with the configured mean / std. (PIL's resize
//! is what open_clip's / HPSv2's transforms and transformers' PIL backend use;
//! transformers 5 switches to torchvision's resize when torchvision is installed, which
//! differs by up to one grey level.) Frozen and inference-only,
//! so candle's fused kernels are fine here. The towers' activations come from the config
//! (OpenAI's CLIP uses quick_gelu; ViT-H models use gelu).

use anyhow::{Context, Result};
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{layer_norm, linear, linear_no_bias, LayerNorm, Linear, VarBuilder};
use std::path::Path;

use crate::image::Image;

#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Act {
    QuickGelu,
    Gelu,
}

impl Act {
    fn parse(s: &str, file: &Path, field: &str) -> Result<Self> {
        Ok(match s {
            "quick_gelu" => Act::QuickGelu,
            "gelu" => Act::Gelu,
            other => anyhow::bail!("{}: {field} = {other:?} is not supported (quick_gelu or gelu)", file.display()),
        })
    }
    fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Act::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
            Act::Gelu => x.gelu_erf(),
        }
    }
}

/// The shape of one tower (text or vision).
pub(crate) struct Tower {
    pub hidden: usize,
    pub heads: usize,
    pub layers: usize,
    pub inter: usize,
    pub act: Act,
    pub eps: f64,
}

pub(crate) fn tower(v: &serde_json::Value, file: &Path, name: &str) -> Result<Tower> {
    let get = |k: &str| v[k].as_u64().map(|x| x as usize).with_context(|| format!("{}: {name}.{k} missing", file.display()));
    Ok(Tower {
        hidden: get("hidden_size")?,
        heads: get("num_attention_heads")?,
        layers: get("num_hidden_layers")?,
        inter: get("intermediate_size")?,
        act: Act::parse(v["hidden_act"].as_str().unwrap_or("quick_gelu"), file, &format!("{name}.hidden_act"))?,
        eps: v["layer_norm_eps"].as_f64().unwrap_or(1e-5),
    })
}

struct Layer {
    ln1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    act: Act,
}

impl Layer {
    fn new(vb: VarBuilder, t: &Tower) -> candle_core::Result<Self> {
        let d = t.hidden;
        let a = vb.pp("self_attn");
        Ok(Self {
            ln1: layer_norm(d, t.eps, vb.pp("layer_norm1"))?,
            q: linear(d, d, a.pp("q_proj"))?,
            k: linear(d, d, a.pp("k_proj"))?,
            v: linear(d, d, a.pp("v_proj"))?,
            o: linear(d, d, a.pp("out_proj"))?,
            ln2: layer_norm(d, t.eps, vb.pp("layer_norm2"))?,
            fc1: linear(d, t.inter, vb.pp("mlp.fc1"))?,
            fc2: linear(t.inter, d, vb.pp("mlp.fc2"))?,
            heads: t.heads,
            act: t.act,
        })
    }
    fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let (b, n, d) = x.dims3()?;
        let hd = d / self.heads;
        let h = self.ln1.forward(x)?;
        let split = |t: Tensor| t.reshape((b, n, self.heads, hd))?.transpose(1, 2)?.contiguous();
        let q = split((self.q.forward(&h)? * (hd as f64).powf(-0.5))?)?;
        let (k, v) = (split(self.k.forward(&h)?)?, split(self.v.forward(&h)?)?);
        let mut w = q.matmul(&k.t()?)?;
        if let Some(m) = mask {
            w = w.broadcast_add(m)?;
        }
        let o = candle_nn::ops::softmax_last_dim(&w)?.matmul(&v)?.transpose(1, 2)?.reshape((b, n, d))?;
        let x = (x + self.o.forward(&o)?)?;
        let h = self.act.apply(&self.fc1.forward(&self.ln2.forward(&x)?)?)?;
        x + self.fc2.forward(&h)?
    }
}

/// A CLIP text tower with its projection: the text half of a `CLIPModel`, or a
/// `CLIPTextModelWithProjection` (SD3's `text_encoder` and `text_encoder_2`); or without
/// one, a `CLIPTextModel` (FLUX's `text_encoder`, pooled output only).
pub struct ClipText {
    tok_emb: Tensor,
    pos: Tensor,
    layers: Vec<Layer>,
    final_ln: LayerNorm,
    proj: Option<Linear>,
    eos_id: Option<u32>,
    pub max_tokens: usize,
}

impl ClipText {
    /// On `vb` holding `text_model.*` and `text_projection.weight`.
    fn new(vb: &VarBuilder, tt: &Tower, eos_id: Option<u32>) -> candle_core::Result<Self> {
        let t = vb.pp("text_model");
        let pos = t.get_unchecked("embeddings.position_embedding.weight")?;
        let proj = match vb.get_unchecked("text_projection.weight") {
            Ok(w) => Some(linear_no_bias(tt.hidden, w.dim(0)?, vb.pp("text_projection"))?),
            Err(_) => None,
        };
        Ok(Self {
            tok_emb: t.get_unchecked("embeddings.token_embedding.weight")?,
            max_tokens: pos.dim(0)?,
            pos,
            layers: (0..tt.layers).map(|i| Layer::new(t.pp(format!("encoder.layers.{i}")), tt)).collect::<candle_core::Result<_>>()?,
            final_ln: layer_norm(tt.hidden, tt.eps, t.pp("final_layer_norm"))?,
            proj,
            eos_id,
        })
    }

    /// A `CLIPTextModelWithProjection` folder (config.json with the text settings at the top
    /// level, its safetensors).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let t = Self::load_any(dir, device)?;
        anyhow::ensure!(t.proj.is_some(), "{}: not a CLIPTextModelWithProjection (no text_projection.weight)", dir.display());
        Ok(t)
    }

    /// A `CLIPTextModel` or `CLIPTextModelWithProjection` folder.
    pub fn load_any(dir: &Path, device: &Device) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let cfg = crate::weights::hf::read_json(&cfg_path)?;
        let tt = tower(&cfg, &cfg_path, "config")?;
        let (tensors, source) = crate::weights::hf::read_folder(dir, device)?;
        anyhow::ensure!(tensors.contains_key("text_model.embeddings.token_embedding.weight"), "{source}: not a CLIP text model (no text_model.embeddings.token_embedding.weight)");
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        Self::new(&vb, &tt, cfg["eos_token_id"].as_u64().map(|x| x as u32)).with_context(|| format!("{source}: tensors do not fit {}", cfg_path.display()))
    }

    /// The penultimate layer's hidden states (B, L, D) — what SD3 conditions on — and the
    /// projected pooled embedding (B, P): the final, normed hidden state at the first
    /// end-of-text token (the highest id when the config names none, as OpenAI's CLIP).
    pub fn states(&self, ids: &Tensor) -> Result<(Tensor, Tensor)> {
        let (penultimate, pooler) = self.run(ids)?;
        let proj = self.proj.as_ref().context("CLIP text model without text_projection: no projected embedding")?;
        Ok((penultimate, proj.forward(&pooler)?))
    }

    /// The pooled output before the projection (`pooler_output` of transformers'
    /// `CLIPTextModel`, FLUX's pooled text input), (B, hidden).
    pub fn pooler(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.run(ids)?.1)
    }

    /// (penultimate hidden states, final-normed state at the end-of-text token).
    fn run(&self, ids: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, l) = ids.dims2()?;
        let mut x = self.tok_emb.embedding(&ids.flatten_all()?)?.reshape((b, l, ()))?.broadcast_add(&self.pos.narrow(0, 0, l)?)?;
        let mask: Vec<f32> = (0..l * l).map(|i| if i % l > i / l { f32::NEG_INFINITY } else { 0.0 }).collect();
        let mask = Tensor::from_vec(mask, (1, 1, l, l), ids.device())?;
        let mut penultimate = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x, Some(&mask))?;
            if i + 2 == self.layers.len() {
                penultimate = x.clone();
            }
        }
        let x = self.final_ln.forward(&x)?;
        let rows: Vec<Vec<u32>> = ids.to_vec2()?;
        let mut pooled = Vec::with_capacity(b);
        for (i, r) in rows.iter().enumerate() {
            let pos = match self.eos_id {
                Some(e) => r.iter().position(|&t| t == e).unwrap_or(l - 1),
                None => r.iter().enumerate().max_by_key(|(j, &t)| (t, std::cmp::Reverse(*j))).map_or(0, |(j, _)| j),
            };
            pooled.push(x.get(i)?.get(pos)?);
        }
        Ok((penultimate, Tensor::stack(&pooled, 0)?))
    }
}

/// A Hugging Face `CLIPModel` (inference).
pub struct ClipModel {
    pub text: ClipText,
    class_emb: Tensor,
    patch: Tensor,
    patch_size: usize,
    vis_pos: Tensor,
    pre_ln: LayerNorm,
    vis_layers: Vec<Layer>,
    post_ln: LayerNorm,
    vis_proj: Linear,
    pub logit_scale: f32,
    pub image_size: usize,
}

impl ClipModel {
    /// Load from a model folder (see the module docs).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let cfg = crate::weights::hf::read_json(&cfg_path)?;
        let (tc, vc) = (&cfg["text_config"], &cfg["vision_config"]);
        anyhow::ensure!(tc.is_object() && vc.is_object(), "{}: not a CLIPModel config (no text_config / vision_config)", cfg_path.display());
        let tt = tower(tc, &cfg_path, "text_config")?;
        let vt = tower(vc, &cfg_path, "vision_config")?;
        let (tensors, source) = crate::weights::hf::read_folder(dir, device)?;
        let eos = tc["eos_token_id"].as_u64().map(|x| x as u32);
        Self::from_tensors(tensors, &tt, &vt, eos, &source, device).with_context(|| format!("(config {})", cfg_path.display()))
    }

    /// From tensors in the Hugging Face `CLIPModel` names; `source` names them in errors.
    /// `eos_id`: the end-of-text token pooled for the text embedding (None: the highest id).
    pub(crate) fn from_tensors(tensors: std::collections::HashMap<String, Tensor>, tt: &Tower, vt: &Tower, eos_id: Option<u32>, source: &str, device: &Device) -> Result<Self> {
        anyhow::ensure!(
            tensors.contains_key("text_model.embeddings.token_embedding.weight") && tensors.contains_key("vision_model.embeddings.class_embedding"),
            "{source}: not a Hugging Face CLIPModel (no text_model.embeddings.token_embedding.weight / vision_model.embeddings.class_embedding)"
        );
        let logit_scale = tensors.get("logit_scale").map(|t| t.to_dtype(DType::F32).and_then(|t| t.flatten_all()?.get(0)?.to_scalar::<f32>())).transpose()?.unwrap_or(4.6052);
        let vb = VarBuilder::from_tensors(tensors, DType::F32, device);
        let load = || -> candle_core::Result<Self> {
            let text = ClipText::new(&vb, tt, eos_id)?;
            let v = vb.pp("vision_model");
            let patch = v.get_unchecked("embeddings.patch_embedding.weight")?;
            let vis_pos = v.get_unchecked("embeddings.position_embedding.weight")?;
            let proj_dim = vb.get_unchecked("text_projection.weight")?.dim(0)?;
            let patch_size = patch.dim(3)?;
            let grid = ((vis_pos.dim(0)? - 1) as f64).sqrt().round() as usize;
            Ok(Self {
                text,
                class_emb: v.get(vt.hidden, "embeddings.class_embedding")?,
                patch_size,
                patch,
                vis_pos,
                pre_ln: layer_norm(vt.hidden, vt.eps, v.pp("pre_layrnorm"))?,
                vis_layers: (0..vt.layers).map(|i| Layer::new(v.pp(format!("encoder.layers.{i}")), vt)).collect::<candle_core::Result<_>>()?,
                post_ln: layer_norm(vt.hidden, vt.eps, v.pp("post_layernorm"))?,
                vis_proj: linear_no_bias(vt.hidden, proj_dim, vb.pp("visual_projection"))?,
                logit_scale,
                image_size: grid * patch_size,
            })
        };
        load().with_context(|| format!("{source}: tensors do not fit the model shape"))
    }

    /// Width of the joint embedding.
    pub fn projection_dim(&self) -> usize {
        self.vis_proj.weight().dim(0).unwrap_or(0)
    }

    /// Text embeddings (B, P) for token ids (B, L) (see [`ClipText::states`]).
    pub fn text_features(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.text.states(ids)?.1)
    }

    /// Image embeddings (B, P) for preprocessed pixels (B, 3, S, S).
    pub fn image_features(&self, pixels: &Tensor) -> Result<Tensor> {
        let b = pixels.dim(0)?;
        let x = pixels.conv2d(&self.patch, 0, self.patch_size, 1, 1)?;
        let d = x.dim(1)?;
        let x = x.flatten_from(2)?.transpose(1, 2)?;
        let cls = self.class_emb.reshape((1, 1, d))?.broadcast_as((b, 1, d))?;
        let x = Tensor::cat(&[&cls, &x], 1)?.broadcast_add(&self.vis_pos)?;
        let mut x = self.pre_ln.forward(&x)?;
        for layer in &self.vis_layers {
            x = layer.forward(&x, None)?;
        }
        let cls = self.post_ln.forward(&x.narrow(1, 0, 1)?.squeeze(1)?)?;
        Ok(self.vis_proj.forward(&cls)?)
    }
}

/// `dir/tokenizer.json`, truncating and padding to the model's context (padding with the
/// end-of-text id, or 0 when pooling takes the highest id).
pub(crate) fn load_tokenizer(dir: &Path, text: &ClipText) -> Result<tokenizers::Tokenizer> {
    let tpath = dir.join("tokenizer.json");
    anyhow::ensure!(tpath.is_file(), "{}: no tokenizer.json (PickScore's and HPSv2's weights come without one: use laion/CLIP-ViT-H-14-laion2B-s32B-b79K's)", dir.display());
    let mut tokenizer = tokenizers::Tokenizer::from_file(&tpath).map_err(|e| anyhow::anyhow!("{}: cannot load ({e})", tpath.display()))?;
    tokenizer.with_truncation(Some(tokenizers::TruncationParams { max_length: text.max_tokens, ..Default::default() })).map_err(|e| anyhow::anyhow!("{}: {e}", tpath.display()))?;
    tokenizer.with_padding(Some(tokenizers::PaddingParams { strategy: tokenizers::PaddingStrategy::Fixed(text.max_tokens), pad_id: text.eos_id.unwrap_or(0), ..Default::default() }));
    Ok(tokenizer)
}

/// Token ids (B, max_tokens) of prompt texts.
pub(crate) fn tokenize(tokenizer: &tokenizers::Tokenizer, texts: &[String], max_tokens: usize, device: &Device) -> Result<Tensor> {
    let enc = tokenizer.encode_batch(texts.to_vec(), true).map_err(|e| anyhow::anyhow!("CLIP tokenizer: {e}"))?;
    let ids: Vec<u32> = enc.iter().flat_map(|e| e.get_ids().to_vec()).collect();
    anyhow::ensure!(ids.len() == texts.len() * max_tokens, "CLIP tokenizer: {} ids for {} prompts of {max_tokens} tokens", ids.len(), texts.len());
    Ok(Tensor::from_vec(ids, (texts.len(), max_tokens), device)?)
}

/// Unit-length rows.
pub(crate) fn l2_normalize(t: &Tensor) -> candle_core::Result<Tensor> {
    t.broadcast_div(&t.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?)
}

/// `CLIPImageProcessor`'s settings.
pub struct Preprocess {
    pub shortest_edge: usize,
    pub crop: usize,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Preprocess {
    /// From `preprocessor_config.json` when present, else CLIP's defaults at `image_size`.
    pub fn load(dir: &Path, image_size: usize) -> Result<Self> {
        let mut p = Self { shortest_edge: image_size, crop: image_size, mean: [0.481_454_66, 0.457_827_5, 0.408_210_7], std: [0.268_629_54, 0.261_302_6, 0.275_777_1] };
        let path = dir.join("preprocessor_config.json");
        if let Ok(text) = std::fs::read_to_string(&path) {
            let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))?;
            let num = |x: &serde_json::Value| x.as_u64().map(|n| n as usize);
            p.shortest_edge = num(&v["size"]["shortest_edge"]).or(num(&v["size"])).unwrap_or(p.shortest_edge);
            p.crop = num(&v["crop_size"]["height"]).or(num(&v["crop_size"])).unwrap_or(p.crop);
            for (k, dst) in [("image_mean", &mut p.mean), ("image_std", &mut p.std)] {
                if let Some(a) = v[k].as_array() {
                    anyhow::ensure!(a.len() == 3, "{}: {k} needs 3 values", path.display());
                    for (d, x) in dst.iter_mut().zip(a) {
                        *d = x.as_f64().with_context(|| format!("{}: {k} is not numeric", path.display()))? as f32;
                    }
                }
            }
        }
        Ok(p)
    }

    /// Pixels (B, 3, crop, crop) of a batch of images.
    pub fn batch(&self, images: &[Image], device: &Device) -> Result<Tensor> {
        let px: Vec<f32> = images.iter().flat_map(|im| self.pixels(im)).collect();
        Ok(Tensor::from_vec(px, (images.len(), 3, self.crop, self.crop), device)?)
    }

    /// Pixels (3, crop, crop) of one image.
    pub fn pixels(&self, im: &Image) -> Vec<f32> {
        let rgb = im.to_rgb8();
        let (w, h) = (rgb.width() as usize, rgb.height() as usize);
        let s = self.shortest_edge;
        let (nw, nh) = if w <= h { (s, (s * h) / w) } else { ((s * w) / h, s) };
        let src: Vec<[u8; 3]> = rgb.pixels().map(|p| p.0).collect();
        let r = pil_bicubic(&src, w, h, nw, nh);
        let c = self.crop;
        let (top, left) = (nh.saturating_sub(c) / 2, nw.saturating_sub(c) / 2);
        let mut out = vec![0f32; 3 * c * c];
        for y in 0..c.min(nh) {
            for x in 0..c.min(nw) {
                let px = r[(top + y) * nw + left + x];
                for ch in 0..3 {
                    out[ch * c * c + y * c + x] = (px[ch] as f32 / 255.0 - self.mean[ch]) / self.std[ch];
                }
            }
        }
        out
    }
}

/// PIL's bicubic filter (a = −0.5).
fn bicubic(x: f64) -> f64 {
    let a = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * a
    } else {
        0.0
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// PIL's resampling coefficients from `n` to `m` cells: (first source cell, fixed-point
/// weights), the filter widened by the shrink factor (antialiasing).
fn pil_coeffs(n: usize, m: usize) -> Vec<(usize, Vec<i64>)> {
    let scale = n as f64 / m as f64;
    let fs = scale.max(1.0);
    let support = 2.0 * fs;
    (0..m)
        .map(|i| {
            let center = (i as f64 + 0.5) * scale;
            let lo = ((center - support + 0.5) as i64).max(0) as usize;
            let hi = ((center + support + 0.5) as i64).min(n as i64) as usize;
            let k: Vec<f64> = (lo..hi).map(|j| bicubic((j as f64 - center + 0.5) / fs)).collect();
            let sum: f64 = k.iter().sum();
            let one = (1u64 << PRECISION_BITS) as f64;
            let fixed = k.iter().map(|w| w / sum).map(|w| if w < 0.0 { (-0.5 + w * one) as i64 } else { (0.5 + w * one) as i64 }).collect();
            (lo, fixed)
        })
        .collect()
}

fn clip8(v: i64) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// `PIL.Image.resize(…, BICUBIC)` of 8-bit RGB, bit for bit: horizontal pass, then
/// vertical, each rounding to 8 bits as PIL does.
fn pil_bicubic(src: &[[u8; 3]], w: usize, h: usize, nw: usize, nh: usize) -> Vec<[u8; 3]> {
    let pass = |src: &[[u8; 3]], len: usize, lines: usize, m: usize, stride_in: usize, step_in: usize, stride_out: usize, step_out: usize| -> Vec<[u8; 3]> {
        let co = pil_coeffs(len, m);
        let mut out = vec![[0u8; 3]; lines * m];
        for l in 0..lines {
            for (i, (lo, k)) in co.iter().enumerate() {
                let mut acc = [1i64 << (PRECISION_BITS - 1); 3];
                for (j, wt) in k.iter().enumerate() {
                    let p = src[l * stride_in + (lo + j) * step_in];
                    for c in 0..3 {
                        acc[c] += p[c] as i64 * wt;
                    }
                }
                out[l * stride_out + i * step_out] = [clip8(acc[0]), clip8(acc[1]), clip8(acc[2])];
            }
        }
        out
    };
    let horiz = if nw != w { pass(src, w, h, nw, w, 1, nw, 1) } else { src.to_vec() };
    if nh != h {
        pass(&horiz, h, nw, nh, 1, nw, 1, nw)
    } else {
        horiz
    }
}
