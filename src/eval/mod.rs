//! Evaluation: every reward on fixed held-out prompts and noise with bootstrap intervals
//! (`run`), the statistics (`stats`), and storing a pretraining run as the shipped base
//! (`export`).

pub mod export;
pub mod run;
pub mod stats;
