//! `cargo run --release --example bench_block [iters]`: reference vs fused DiT block timings
//! at the reference size (batch 8, 256 tokens, width 256, 4 heads, MLP ratio 4).
fn main() -> anyhow::Result<()> {
    let iters: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(5);
    let only: Option<String> = std::env::args().nth(2);
    for fused in [false, true] {
        if let Some(o) = &only {
            if (o == "fused") != fused {
                continue;
            }
        }
        let b = vipo::bench::bench_block(8, 256, 256, 4, fused, iters)?;
        println!("fused={:5} fwd {:8.1} ms  fwd+bwd {:8.1} ms", b.fused, b.fwd_ms, b.fwd_bwd_ms);
    }
    Ok(())
}
