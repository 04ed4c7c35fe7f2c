//! Training: rectified-flow pretraining of the ShapeWorld generators (`pretrain`), GRPO and
//! ViPO post-training (`grpo`: rollout → decode → rewards and maps → advantages → update),
//! the task each modality trains on, the allocation maps, AdamW and the resumable RNG state.

pub mod grpo;
pub mod maps;
pub mod optim;
pub mod pretrain;
pub mod rng;
pub mod task;
