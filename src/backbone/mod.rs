//! Frozen vision backbones for the PSM: batch of RGB images → spatial feature maps.
//! One file per backbone; none of them is ever in the autograd graph.

use crate::image::Image;

/// One image's spatial features: an h×w grid of d-dimensional vectors, row-major
/// (`data[(y*w + x)*d + k]`), i.e. the N×D patch-feature matrix of DESIGN.md §1.3.
#[derive(Clone, Debug, PartialEq)]
pub struct FeatureMap {
    pub h: usize,
    pub w: usize,
    pub d: usize,
    pub data: Vec<f32>,
}

impl FeatureMap {
    pub fn n(&self) -> usize {
        self.h * self.w
    }
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.d..(i + 1) * self.d]
    }
}

pub trait Backbone: Send + Sync {
    /// Human-readable identity, e.g. "mobilenet_v2:features.13@224".
    fn name(&self) -> String;
    /// Features for each image (frozen forward pass; no gradients).
    fn features(&self, images: &[Image]) -> anyhow::Result<Vec<FeatureMap>>;
}
