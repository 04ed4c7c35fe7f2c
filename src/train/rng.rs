//! Seeded ChaCha streams saved and restored exactly, so a resumed run draws what an
//! uninterrupted one would.

use anyhow::Result;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Saved state of a seeded ChaCha stream (seed, stream, position) for exact resume.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct RngState {
    seed: String,
    stream: u64,
    word_pos: String,
}

impl RngState {
    pub(crate) fn of(r: &ChaCha8Rng) -> Self {
        let seed: String = r.get_seed().iter().map(|b| format!("{b:02x}")).collect();
        Self { seed, stream: r.get_stream(), word_pos: r.get_word_pos().to_string() }
    }
    pub(crate) fn restore(&self) -> Result<ChaCha8Rng> {
        let mut seed = [0u8; 32];
        anyhow::ensure!(self.seed.len() == 64, "rng seed has wrong length");
        for (i, b) in seed.iter_mut().enumerate() {
            *b = u8::from_str_radix(&self.seed[2 * i..2 * i + 2], 16)?;
        }
        let mut r = ChaCha8Rng::from_seed(seed);
        r.set_stream(self.stream);
        r.set_word_pos(self.word_pos.parse()?);
        Ok(r)
    }
}
