fn main() {
    vipo::runtime::init();
    std::process::exit(vipo::runtime::run(vipo::cli::main));
}

// glibc malloc returns freed tensor buffers to the OS and page-faults them back on the
// next step (~25 % of a training step in perf); mimalloc keeps them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
