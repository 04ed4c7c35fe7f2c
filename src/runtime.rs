//! The one place that decides device and dtype (DESIGN.md §3): f32 on CPU
//! (bf16 is ~3x slower there), and CUDA only behind the `cuda` feature.

use candle_core::{DType, Device};

/// Device for trainable and frozen models. CPU unless built with `--features cuda`
/// and `VIPO_DEVICE=cuda` is set (so a CUDA build still runs its CPU tests).
pub fn device() -> anyhow::Result<Device> {
    #[cfg(feature = "cuda")]
    {
        if std::env::var("VIPO_DEVICE").map(|v| v == "cuda").unwrap_or(false) {
            return Ok(Device::new_cuda(0)?);
        }
    }
    Ok(Device::Cpu)
}

/// Compute dtype for a device: f32 on CPU, bf16 would be chosen on GPU for real-scale models.
pub fn dtype(device: &Device) -> DType {
    match device {
        Device::Cpu => DType::F32,
        _ => DType::F32, // the embedded testbed is tiny; f32 everywhere keeps parity checks exact
    }
}

/// Resident memory of this process in MiB (`VmRSS`), and its peak so far (`VmHWM`), from
/// /proc/self/status; `None` where that file does not exist.
pub fn memory_mb() -> Option<(f64, f64)> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| -> Option<f64> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace().nth(1)?.parse::<f64>().ok().map(|kb| kb / 1024.0)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}
