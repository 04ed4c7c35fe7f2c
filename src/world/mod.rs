//! ShapeWorld: procedural scenes, prompts, rasterizer and splits. (Being written.)
#[derive(Clone, Debug, PartialEq)]
pub struct PromptSpec;
