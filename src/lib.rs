//! vipo — reinforcement-learning post-training of flow-matching image and video
//! generators with ViPO (Visual Preference Policy Optimization).
//!
//! The data path of one training step reads top to bottom through the modules:
//!
//! ```text
//! prompt (text + optional scene) → policy (encode; velocity) → sampler (SDE, dense
//!   log-probs) → policy (decode)
//!   → reward (scalars) and psm (allocation maps from a frozen backbone)
//!   → advantage (group-relative, per position) → objective (clipped surrogate)
//!   → train (optimizer, checkpoints, metrics)
//! ```

// Lints that fight this code's shape: numeric kernels index several arrays by one loop
// variable, model constructors take their shapes as arguments, and autograd closures
// have long types. Everything else clippy says is fixed (`.ci/run` runs it with -D warnings).
#![allow(clippy::needless_range_loop, clippy::too_many_arguments, clippy::type_complexity)]
// Tests build configs as "the default, with these fields changed".
#![cfg_attr(test, allow(clippy::field_reassign_with_default))]

#[macro_use]
mod simd;

pub mod advantage;
pub mod backbone;
pub mod base;
pub mod bench;
pub mod cli;
pub mod compare;
pub mod config;
pub mod encoders;
pub mod eval;
pub mod generate;
pub mod image;
pub mod io;
pub mod mapview;
pub mod objective;
pub mod plan;
pub mod policy;
pub mod prompt;
pub mod psm;
pub mod report;
pub mod reward;
pub mod run_dir;
pub mod run_report;
pub mod runtime;
pub mod sample;
pub mod sampler;
pub mod train;
pub mod weights;
pub mod world;

#[cfg(test)]
mod end_to_end;
