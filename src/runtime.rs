//! The one place that decides the device and the ShapeWorld policies' dtype (docs/DESIGN.md
//! §3): f32 on every device, and CUDA only behind the `cuda` feature. Real generators take
//! their base weights' dtype from their own section (`sd3.dtype`, `flux.dtype`).

use candle_core::{DType, Device};

/// `mi_option_purge_delay` in the mimalloc v3 that libmimalloc-sys 0.1.49 builds (its Rust
/// bindings do not name it; checked against the C header).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Process set-up for the CLI, before any work: thread counts and the allocator.
///
/// - Threads: `VIPO_THREADS`, else `RAYON_NUM_THREADS`, else the cores this process may
///   actually use (`available_parallelism` follows the affinity mask and the cgroup CPU
///   quota). The count is written back to `RAYON_NUM_THREADS`, which candle reads on
///   every matmul (unset, it re-parses /proc/cpuinfo each time: 1.5 % of a step).
/// - candle's elementwise barrier pool spins 25 000 rounds per op; on few cores that costs
///   more than it saves (16.6 → 23 images/s pretraining on 2 cores), so it gets one thread
///   unless `CANDLE_NUM_THREADS` says otherwise. Matmuls and vipo's fused ops use rayon,
///   whose idle workers sleep.
/// - mimalloc returns freed pages to the OS after a delay and every step faults them back
///   in (16 % of a step in perf: the kernel zeroing pages); vipo's working set is the same
///   every step, so it keeps them (`MIMALLOC_PURGE_DELAY` overrides).
/// - SIGPIPE: the default action, so output piped into `head` ends vipo without a panic.
pub fn init() {
    let n = thread_count(std::env::var("VIPO_THREADS").ok().as_deref(), std::env::var("RAYON_NUM_THREADS").ok().as_deref(), std::thread::available_parallelism().map_or(1, |n| n.get()));
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    let _ = pool_builder(n).build_global();
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    // Rust starts with SIGPIPE ignored, so a print to a closed pipe (`vipo report DIR | head`)
    // panicked with "Broken pipe"; the default action ends vipo quietly, like any Unix tool.
    #[cfg(unix)]
    // SAFETY: setting one signal's disposition, before any thread but this one exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: a plain option store, before any thread but this one exists.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
}

/// A rayon pool of `n` workers with large stacks: candle's backprop walks the graph
/// recursively, and `run` puts the whole program on a pool thread. For the global pool and
/// for the per-job pools of `vipo compare --jobs`.
pub fn pool_builder(n: usize) -> rayon::ThreadPoolBuilder {
    rayon::ThreadPoolBuilder::new().num_threads(n).stack_size(256 << 20)
}

/// Run `f` on a thread of the global pool. A parallel op issued from outside the pool
/// is injected into it and the caller sleeps until a worker has finished it: two thread
/// wake-ups per op, thousands of ops per step. From a pool thread the caller takes part
/// in the work and the other workers steal it.
pub fn run<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

/// `VIPO_THREADS`, else `RAYON_NUM_THREADS`, else the available cores; unparsable or zero
/// values are skipped.
fn thread_count(vipo: Option<&str>, rayon: Option<&str>, available: usize) -> usize {
    let parse = |v: Option<&str>| v.and_then(|v| v.trim().parse::<usize>().ok()).filter(|&n| n > 0);
    parse(vipo).or_else(|| parse(rayon)).unwrap_or(available.max(1))
}

/// Worker threads for matmuls and fused ops.
pub fn threads() -> usize {
    rayon::current_num_threads()
}

/// Device for trainable and frozen models: the CPU, or in a build with `--features cuda`
/// GPU 0 unless `VIPO_DEVICE=cpu` (how a CUDA build runs its tests on a machine without one).
pub fn device() -> anyhow::Result<Device> {
    // A CUDA build runs on the GPU unless VIPO_DEVICE=cpu; without one it says so in one
    // line before any work.
    #[cfg(feature = "cuda")]
    {
        if std::env::var("VIPO_DEVICE").map(|v| v != "cpu").unwrap_or(true) {
            // One device per process: candle gives every `new_cuda` its own id and refuses
            // to combine tensors of two (the policy's with the reward's or the backbone's).
            static GPU: std::sync::OnceLock<Device> = std::sync::OnceLock::new();
            if let Some(d) = GPU.get() {
                return Ok(d.clone());
            }
            let d = Device::new_cuda(0).map_err(|e| {
                // The first line: candle appends a backtrace when RUST_BACKTRACE is set.
                let why = e.to_string().lines().next().unwrap_or_default().trim().to_string();
                anyhow::anyhow!("no CUDA device ({why}); this is a CUDA build of vipo: run it on a machine with an NVIDIA GPU and driver, or set VIPO_DEVICE=cpu")
            })?;
            return Ok(GPU.get_or_init(|| d).clone());
        }
    }
    Ok(Device::Cpu)
}

/// With `VIPO_TRACE` set, each phase of a training step prints its time to stderr as it
/// ends (how a run cut off by a time limit still says where its time went).
pub fn trace(what: &str, secs: f64) {
    if std::env::var_os("VIPO_TRACE").is_some() {
        eprintln!("trace: {what} {secs:.2} s");
    }
}

/// Compute dtype of the ShapeWorld policies: f32 on every device (they are tiny, and f32
/// keeps the on-policy parity checks exact; bf16 is ~3× slower on a CPU).
pub fn dtype(_device: &Device) -> DType {
    DType::F32
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

/// A progress bar with rate and ETA, or a hidden one in quiet mode.
pub fn progress(len: u64, what: &str, show: bool) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(indicatif::ProgressStyle::with_template(&format!("{what} [{{bar:30}}] {{pos}}/{{len}} {{per_sec}} eta {{eta}} {{msg}}")).unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()));
    bar
}

/// Where cached base models live: `$VIPO_CACHE`, else `./.vipo-cache`.
pub fn cache_dir() -> std::path::PathBuf {
    std::env::var_os("VIPO_CACHE").map(std::path::PathBuf::from).unwrap_or_else(|| std::path::PathBuf::from(".vipo-cache"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn thread_count_prefers_vipo_threads_then_rayon_then_the_available_cores() {
        use super::thread_count;
        assert_eq!(thread_count(Some("3"), Some("5"), 2), 3);
        assert_eq!(thread_count(None, Some("5"), 2), 5);
        assert_eq!(thread_count(Some("0"), Some("x"), 2), 2);
        assert_eq!(thread_count(Some(" 4 "), None, 2), 4);
        assert_eq!(thread_count(None, None, 0), 1);
    }

    /// The hand-written option index is mimalloc's purge delay: its v3 default (1000 ms)
    /// is what option 15 reads in a process that did not set it (tests
    /// run without `MIMALLOC_PURGE_DELAY` in the environment).
    #[test]
    fn purge_delay_option_index_matches_mimalloc() {
        let v = unsafe { libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY) };
        assert_eq!(v, 1000);
    }
}
