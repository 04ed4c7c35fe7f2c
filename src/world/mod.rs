//! ShapeWorld (image): a procedural testbed whose prompts name objects by count,
//! colour, shape and relative position ("two red circles left of a blue square").
//!
//! * [`grammar`] — vocabulary enums, [`PromptSpec`] with canonical text and parsing,
//!   the tokenizer for the policy's text encoder;
//! * [`split`] — the train / eval / out-of-domain rule and deterministic prompt draws;
//! * [`scene`] — random layouts that obey the prompt (sizes, no overlaps, relation);
//! * [`render`] — the anti-aliased rasterizer producing images and per-object masks;
//! * [`video`] — ShapeWorld-Video: prompts with motions, moving scenes, clips, splits.
//!
//! The matching pixel-level scorer is [`crate::reward::compositional`].

pub mod grammar;
pub mod render;
pub mod scene;
pub mod split;
pub mod video;

pub use grammar::{tokenize, vocab, Color, Group, PromptSpec, Relation, Shape, MAX_OBJECTS, MAX_TOKENS};
pub use render::{render, Rendered, BACKGROUND, DEFAULT_RES};
pub use scene::{sample_scene, Object, Scene};
pub use split::{prompts, sample_spec, split_of, Split};
