//! Trainable flow-matching policies.
pub mod block;
pub mod layers;
pub mod ops;
