//! The bottom layer for model files: safetensors in and out (`tensors`), torch `.pth`
//! checkpoints read without executing pickle code (`pth`), and Hugging Face model folders
//! and the local hub cache (`hf`). Nothing here knows a model, a config or a run.

pub mod hf;
pub mod pth;
pub mod tensors;
