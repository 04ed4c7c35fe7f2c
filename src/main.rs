fn main() {
    // On few cores candle's elementwise thread pool spends more time in spin barriers than
    // it saves (measured: 16.6 → 23 images/s pretraining on 2 cores); matmuls still use
    // every core through gemm. Users can override by setting the variable.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    std::process::exit(vipo::cli::main());
}

// glibc malloc returns freed tensor buffers to the OS and page-faults them back on the
// next step (~25 % of a training step in perf); mimalloc keeps them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
