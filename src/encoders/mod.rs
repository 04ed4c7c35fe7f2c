//! Frozen pretrained encoders shared by the policies (text conditioning) and the rewards
//! (image and text embeddings). Inference only: nothing here is trained.

pub mod clip;
pub mod t5;
pub mod tokenizer;
