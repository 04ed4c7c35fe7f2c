//! T5 encoders (SD3's `text_encoder_3/`, FLUX's `text_encoder_2/`), frozen.

use candle_core::DType;

/// A T5 encoder folder (transformers' `T5EncoderModel`: config.json + safetensors), its
/// weights in `dtype`, run by candle-transformers as is.
pub fn load_t5(dir: &std::path::Path, dtype: DType, device: &candle_core::Device) -> anyhow::Result<candle_transformers::models::t5::T5EncoderModel> {
    use anyhow::Context;
    let cpath = dir.join("config.json");
    let t5cfg: candle_transformers::models::t5::Config = serde_json::from_value(crate::weights::hf::read_json(&cpath)?).with_context(|| format!("{}: not a T5 config", cpath.display()))?;
    let (tensors, source) = crate::weights::hf::read_folder(dir, device)?;
    let vb = candle_nn::VarBuilder::from_tensors(tensors, dtype, device);
    candle_transformers::models::t5::T5EncoderModel::load(vb, &t5cfg).with_context(|| format!("{source}: does not match {}", cpath.display()))
}
