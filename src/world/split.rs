//! Train / eval / out-of-domain splits of the prompt space, and prompt sampling.
//!
//! # The split rule
//!
//! A spec is **`Ood`** if either
//! * any of its groups uses a held-out colour–shape pair ([`HELD_OUT_PAIRS`]:
//!   purple triangle, cyan circle, yellow diamond, green square), or
//! * it uses a held-out count/relation combination: relation `Above` whose *first*
//!   (subject) group has count ≥ 2 ("two red circles above a blue square").
//!
//! Every colour, every shape, every count (1–4) and every relation still occurs in
//! training: each colour and shape has other partners, counts 2–3 occur with the other
//! relations and as the second group of `Above`, and "a … above …" stays in train.
//!
//! Otherwise the spec is **`Eval`** if the FNV-1a 64-bit hash of its canonical text
//! ([`PromptSpec::text`]) is ≡ 0 mod 10 (a stable ~10 % bucket, independent of Rust's
//! randomized hasher and of the platform), and **`Train`** if not. Train and eval are
//! therefore disjoint as sets of prompts, and an eval prompt is never seen in training.

use super::grammar::{Color, Group, PromptSpec, Relation, Shape};
use anyhow::bail;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A split of the prompt space.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    Train,
    Eval,
    Ood,
}

impl Split {
    /// The lower-case name used in configs and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Eval => "eval",
            Split::Ood => "ood",
        }
    }
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Split {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s.trim().to_lowercase().as_str() {
            "train" => Ok(Split::Train),
            "eval" => Ok(Split::Eval),
            "ood" => Ok(Split::Ood),
            _ => bail!("unknown split '{s}' (expected train, eval or ood)"),
        }
    }
}

/// Colour–shape pairs never shown in train or eval.
pub const HELD_OUT_PAIRS: &[(Color, Shape)] = &[(Color::Purple, Shape::Triangle), (Color::Cyan, Shape::Circle), (Color::Yellow, Shape::Diamond), (Color::Green, Shape::Square)];

/// FNV-1a, 64 bit: a stable hash for the eval bucket.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Does the spec use a held-out colour–shape pair?
pub fn has_held_out_pair(spec: &PromptSpec) -> bool {
    spec.groups.iter().any(|g| HELD_OUT_PAIRS.contains(&(g.color, g.shape)))
}

/// Does the spec use the held-out count/relation combination (`Above` with a subject
/// group of two or more)?
pub fn has_held_out_layout(spec: &PromptSpec) -> bool {
    spec.relation == Some(Relation::Above) && spec.groups.first().is_some_and(|g| g.count >= 2)
}

/// The split a spec belongs to (see the module docs for the rule).
pub fn split_of(spec: &PromptSpec) -> Split {
    if has_held_out_pair(spec) || has_held_out_layout(spec) {
        Split::Ood
    } else if fnv1a64(spec.text().as_bytes()).is_multiple_of(10) {
        Split::Eval
    } else {
        Split::Train
    }
}

/// Count pairs (first, second) for two-group prompts: all with a total ≤ 4.
const PAIR_COUNTS: [(usize, usize); 6] = [(1, 1), (1, 2), (2, 1), (1, 3), (3, 1), (2, 2)];

/// Draw one valid spec from the whole prompt space (any split): half single-group
/// prompts (count 1–4), half two-group prompts with a relation; colours, shapes and
/// relations uniform.
pub fn sample_spec(rng: &mut impl Rng) -> PromptSpec {
    let color = |rng: &mut dyn rand::RngCore| Color::ALL[rng.gen_range(0..Color::ALL.len())];
    let shape = |rng: &mut dyn rand::RngCore| Shape::ALL[rng.gen_range(0..Shape::ALL.len())];
    if rng.gen_bool(0.5) {
        let count = rng.gen_range(1..=4);
        let (c, s) = (color(rng), shape(rng));
        PromptSpec::single(count, c, s)
    } else {
        let (na, nb) = PAIR_COUNTS[rng.gen_range(0..PAIR_COUNTS.len())];
        let a = Group { count: na, color: color(rng), shape: shape(rng) };
        // Redraw until the second group differs in colour or shape (validity rule).
        let b = loop {
            let b = Group { count: nb, color: color(rng), shape: shape(rng) };
            if (b.color, b.shape) != (a.color, a.shape) {
                break b;
            }
        };
        let rel = Relation::ALL[rng.gen_range(0..Relation::ALL.len())];
        PromptSpec::pair(a, rel, b)
    }
}

/// `n` specs of `split`, drawn (with replacement) by rejection from [`sample_spec`]
/// with a ChaCha8 stream seeded by `seed`: the same arguments always give the same list.
pub fn prompts(split: Split, n: usize, seed: u64) -> Vec<PromptSpec> {
    draw_split(split, n, seed, sample_spec, split_of)
}

/// `n` draws of `sample` that `split_of` puts in `split`, by rejection from a ChaCha8 stream
/// seeded by `seed` (image and video prompts alike).
pub fn draw_split<T>(split: Split, n: usize, seed: u64, mut sample: impl FnMut(&mut ChaCha8Rng) -> T, split_of: impl Fn(&T) -> Split) -> Vec<T> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        // Every split holds ≥ ~5 % of the sampling mass, so this terminates quickly.
        let spec = sample(&mut rng);
        if split_of(&spec) == split {
            out.push(spec);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// Every drawn scene is valid and its text parses back to it (the grammar's round trip).
    #[test]
    fn parse_text_roundtrip() {
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
        for _ in 0..2000 {
            let spec = sample_spec(&mut rng);
            spec.validate().unwrap();
            let text = spec.text();
            assert_eq!(PromptSpec::parse(&text).unwrap(), spec, "{text}");
            let toks = crate::world::grammar::tokenize(&text, crate::world::grammar::MAX_TOKENS).unwrap();
            assert_eq!(toks.len(), crate::world::grammar::MAX_TOKENS);
            assert!(toks[0] != 0);
        }
    }

    #[test]
    fn split_from_str_and_display() {
        for s in [Split::Train, Split::Eval, Split::Ood] {
            assert_eq!(s.to_string().parse::<Split>().unwrap(), s);
        }
        assert_eq!(" OOD ".parse::<Split>().unwrap(), Split::Ood);
        let e = "test".parse::<Split>().unwrap_err().to_string();
        assert!(e.contains("'test'") && e.contains("train"), "{e}");
    }

    #[test]
    fn fnv_known_values() {
        // Reference values of FNV-1a 64.
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
    }

    #[test]
    fn train_prompts_respect_holdouts_and_cover_vocabulary() {
        let train = prompts(Split::Train, 3000, 7);
        let (mut colors, mut shapes, mut counts, mut rels) = (HashSet::new(), HashSet::new(), HashSet::new(), HashSet::new());
        for s in &train {
            s.validate().unwrap();
            assert!(!has_held_out_pair(s), "held-out pair in train: {}", s.text());
            assert!(!has_held_out_layout(s), "held-out layout in train: {}", s.text());
            assert_eq!(split_of(s), Split::Train);
            for g in &s.groups {
                colors.insert(g.color);
                shapes.insert(g.shape);
                counts.insert(g.count);
            }
            rels.extend(s.relation);
        }
        assert_eq!(colors.len(), Color::ALL.len());
        assert_eq!(shapes.len(), Shape::ALL.len());
        assert_eq!(counts, (1..=4).collect::<HashSet<_>>());
        assert_eq!(rels.len(), Relation::ALL.len());
        // Counts ≥ 2 are seen with Above too (as the second group).
        assert!(train.iter().any(|s| s.relation == Some(Relation::Above) && s.groups[1].count >= 2));
    }

    #[test]
    fn eval_train_disjoint_and_ood_is_held_out() {
        let train: HashSet<_> = prompts(Split::Train, 3000, 1).into_iter().collect();
        let eval: HashSet<_> = prompts(Split::Eval, 500, 2).into_iter().collect();
        let ood = prompts(Split::Ood, 500, 3);
        assert!(train.is_disjoint(&eval));
        assert!(eval.iter().all(|s| !has_held_out_pair(s) && !has_held_out_layout(s)));
        assert!(ood.iter().all(|s| has_held_out_pair(s) || has_held_out_layout(s)));
        assert!(ood.iter().any(|s| !has_held_out_pair(s)), "layout hold-out never drawn");
        // The eval bucket is roughly 10 % of the non-OOD mass.
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let all: Vec<_> = (0..4000).map(|_| sample_spec(&mut rng)).collect();
        let non_ood: Vec<_> = all.iter().filter(|s| split_of(s) != Split::Ood).collect();
        let frac = non_ood.iter().filter(|s| split_of(s) == Split::Eval).count() as f64 / non_ood.len() as f64;
        assert!((0.05..0.15).contains(&frac), "eval fraction {frac}");
    }

    #[test]
    fn prompts_deterministic() {
        assert_eq!(prompts(Split::Train, 50, 42), prompts(Split::Train, 50, 42));
        assert_ne!(prompts(Split::Train, 50, 42), prompts(Split::Train, 50, 43));
        assert_eq!(prompts(Split::Ood, 20, 5), prompts(Split::Ood, 20, 5));
    }
}
