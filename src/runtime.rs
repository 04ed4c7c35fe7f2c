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
