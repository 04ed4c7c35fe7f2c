//! Training loops (pretraining now; GRPO/ViPO next), the optimizer, checkpoints and run
//! directories.

pub mod checkpoint;
pub mod grpo;
pub mod maps;
pub mod optim;
pub mod pretrain;
pub mod run;
pub mod task;
