//! Benchmarks (`vipo bench`). (Being written.)
