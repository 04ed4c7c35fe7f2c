//! Training loops (pretraining now; GRPO/ViPO next), the optimizer, checkpoints and run
//! directories.

pub mod checkpoint;
pub mod optim;
pub mod pretrain;
pub mod run;
