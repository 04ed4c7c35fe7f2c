//! Benchmarks (`vipo bench`). (Being written.)
/// TEMP until the ops branch lands.
pub fn run_cli(_what: &str, _iters: usize) -> anyhow::Result<()> { anyhow::bail!("not yet") }
