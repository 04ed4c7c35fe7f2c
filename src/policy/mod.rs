//! Trainable flow-matching policies.
pub mod layers;
