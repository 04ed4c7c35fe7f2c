//! SD3 / SD3.5's frozen text side, as diffusers' `StableDiffusion3Pipeline.encode_prompt`
//! builds it: CLIP-L and OpenCLIP-bigG (`text_encoder/`, `text_encoder_2/`, each a
//! `CLIPTextModelWithProjection`) give their penultimate hidden states, concatenated on
//! channels (768 + 1280) and zero-padded to T5's width, followed along the sequence by
//! T5-XXL's final hidden states (`text_encoder_3/`; candle-transformers' T5 encoder, used as
//! is) — or zeros of the same shape when T5 is left out, as SD3 allows; the pooled
//! condition is the two CLIPs' projected pooled embeddings side by side (2048).
//! Outputs are a [`Condition`] { seq (B, 77 + T, 4096), pooled (B, 2048) }.

use anyhow::Result;
use candle_core::{DType, Tensor, D};
use std::sync::Mutex;

use crate::encoders::clip::ClipText;
use crate::policy::Condition;

pub struct Sd3Text {
    pub clip_l: ClipText,
    pub clip_g: ClipText,
    /// None: T5 left out (zeros in its place).
    pub t5: Option<Mutex<candle_transformers::models::t5::T5EncoderModel>>,
    /// Width of the context tokens (T5's d_model; 4096 for T5-XXL).
    pub context_dim: usize,
}

impl Sd3Text {
    /// The condition of a batch from its token ids: CLIP-L's and bigG's (B, 77) and T5's
    /// (B, T).
    pub fn encode_ids(&self, ids_l: &Tensor, ids_g: &Tensor, ids_t5: &Tensor) -> Result<Condition> {
        let (hl, pl) = self.clip_l.states(ids_l)?;
        let (hg, pg) = self.clip_g.states(ids_g)?;
        let clip = Tensor::cat(&[&hl, &hg], D::Minus1)?;
        let (b, l, w) = clip.dims3()?;
        anyhow::ensure!(w <= self.context_dim, "SD3 text: CLIP widths {w} exceed the context width {}", self.context_dim);
        let clip = Tensor::cat(&[&clip, &Tensor::zeros((b, l, self.context_dim - w), DType::F32, clip.device())?], D::Minus1)?;
        let t = ids_t5.dim(1)?;
        let t5 = match &self.t5 {
            Some(m) => m.lock().unwrap().forward(ids_t5)?.to_dtype(DType::F32)?,
            None => Tensor::zeros((b, t, self.context_dim), DType::F32, clip.device())?,
        };
        anyhow::ensure!(t5.dim(2)? == self.context_dim, "SD3 text: T5 width {} is not the context width {}", t5.dim(2)?, self.context_dim);
        Ok(Condition { seq: Tensor::cat(&[&clip, &t5], 1)?, pooled: Some(Tensor::cat(&[&pl, &pg], D::Minus1)?) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use std::path::Path;

    /// Shapes and assembly rules on tiny towers: the tiny CLIP text tower stands in for both
    /// CLIPs, a tiny random T5 encoder (T5 v1.1 config layout) for T5-XXL.
    #[test]
    fn condition_layout_as_diffusers_builds_it() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/clip_tiny");
        let d = tempfile::tempdir().unwrap();
        let all = crate::weights::tensors::read_tensors(&dir.join("model.safetensors"), &Device::Cpu).unwrap();
        let text: std::collections::HashMap<String, Tensor> = all.into_iter().filter(|(k, _)| k.starts_with("text_model.") || k == "text_projection.weight").collect();
        crate::weights::tensors::save_tensors(&text, &d.path().join("model.safetensors")).unwrap();
        let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
        std::fs::write(d.path().join("config.json"), cfg["text_config"].to_string()).unwrap();
        let load = || ClipText::load(d.path(), &Device::Cpu).unwrap();
        let t5cfg: candle_transformers::models::t5::Config = serde_json::from_str(
            r#"{"vocab_size": 40, "d_model": 64, "d_kv": 8, "d_ff": 96, "num_layers": 2, "num_heads": 8, "relative_attention_num_buckets": 8,
                "dropout_rate": 0.0, "layer_norm_epsilon": 1e-6, "initializer_factor": 1.0, "feed_forward_proj": "gated-gelu",
                "is_encoder_decoder": true, "pad_token_id": 0, "eos_token_id": 1}"#,
        )
        .unwrap();
        let vm = candle_nn::VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let t5 = candle_transformers::models::t5::T5EncoderModel::load(vb, &t5cfg).unwrap();
        // VarMap-created weights start at candle's defaults (some zero): draw them all.
        crate::policy::randomize_vars(&vm, 4, 0.3);
        let mut s = Sd3Text { clip_l: load(), clip_g: load(), t5: Some(Mutex::new(t5)), context_dim: 64 };
        let ids = Tensor::new(&[[54u32, 17, 35, 37, 55, 55, 55, 55, 55, 55, 55, 55, 55, 55, 55, 55], [54, 17, 50, 51, 55, 55, 55, 55, 55, 55, 55, 55, 55, 55, 55, 55]], &Device::Cpu).unwrap();
        let t5_ids = Tensor::new(&[[5u32, 9, 1, 0, 0], [7, 1, 0, 0, 0]], &Device::Cpu).unwrap();
        let c = s.encode_ids(&ids, &ids, &t5_ids).unwrap();
        // 16 CLIP tokens then 5 T5 tokens, 64 wide; pooled: two 16-wide projections.
        assert_eq!(c.seq.dims(), &[2, 16 + 5, 64]);
        let (pen, pooled) = s.clip_l.states(&ids).unwrap();
        let v = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let clip_rows = c.seq.narrow(1, 0, 16).unwrap();
        assert_eq!(v(clip_rows.narrow(2, 0, 32).unwrap()), v(pen.clone()), "CLIP-L's penultimate states first");
        assert_eq!(v(clip_rows.narrow(2, 32, 32).unwrap()), v(pen), "then bigG's");
        assert_eq!(v(c.pooled.clone().unwrap()), v(Tensor::cat(&[&pooled, &pooled], 1).unwrap()));
        let t5_rows: f32 = c.seq.narrow(1, 16, 5).unwrap().abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(t5_rows > 0.0, "T5's states follow");
        // T5 left out: zeros in its rows; a wider context pads the CLIP channels with zeros.
        s.t5 = None;
        s.context_dim = 80;
        let c = s.encode_ids(&ids, &ids, &t5_ids).unwrap();
        assert_eq!(c.seq.dims(), &[2, 21, 80]);
        let pad: f32 = c.seq.narrow(2, 64, 16).unwrap().abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
        let t5rows: f32 = c.seq.narrow(1, 16, 5).unwrap().abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert_eq!((pad, t5rows), (0.0, 0.0));
        s.context_dim = 40;
        assert!(s.encode_ids(&ids, &ids, &t5_ids).unwrap_err().to_string().contains("exceed the context width"));
    }
}
