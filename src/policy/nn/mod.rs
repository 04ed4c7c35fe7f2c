//! Layers shared by the generator families: differentiable norms and attention, the fused
//! DiT-block ops, LoRA-carrying linears, block checkpointing, the 16-channel VAE and the
//! prompt-embedding cache.

pub mod adapted;
pub mod attention;
pub mod block;
pub mod checkpoint;
pub mod conv;
pub mod embed_cache;
pub mod layers;
pub mod ops;
pub mod vae;
