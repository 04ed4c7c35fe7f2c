//! Context padding around any backbone: the feature map's outer cells see mirrored image
//! content instead of the network's zero padding.
//!
//! Why: a CNN's border cells are computed partly from zero-padded (after ImageNet
//! normalisation: mid-grey-ish) input, so their features differ from the interior's for
//! reasons that have nothing to do with the picture. On ShapeWorld samples with one small
//! object that difference is as large as the object's, and the PCA turns it into a bright
//! frame around the map. Padding the resized image by reflection, running the network on the
//! larger input and cropping the extra cells off gives a map of the same grid whose border
//! cells are computed from image content on all sides.

use super::ops::resize_bilinear;
use super::{Backbone, FeatureMap};
use crate::image::Image;
use anyhow::{bail, Result};

/// Wraps a backbone built for `size + 2·cells·stride` input pixels (see [`ContextPad::new`]).
pub struct ContextPad {
    inner: Box<dyn Backbone>,
    /// The inner backbone's name at the unpadded size, `+pad{cells}`.
    name: String,
    /// The unpadded network input side (`backbone.input_size`).
    size: usize,
    /// Grid cells added (and cropped) on each side.
    cells: usize,
    /// Input pixels per grid cell at the tap.
    stride: usize,
}

impl ContextPad {
    /// Pads by `cells` grid cells of `stride` input pixels; `build(n)` builds the inner
    /// backbone for `n`-pixel inputs, called only once the sizes are checked (before any
    /// weights are read).
    pub fn new(size: usize, cells: usize, stride: usize, build: impl FnOnce(usize) -> Result<Box<dyn Backbone>>) -> Result<Self> {
        if stride == 0 || !size.is_multiple_of(stride) {
            bail!("backbone.pad = {cells}: input_size {size} must be a multiple of the tap's stride {stride} so that whole grid cells can be cropped (or set backbone.pad = 0)");
        }
        let padded = size + 2 * cells * stride;
        let inner = build(padded)?;
        // Named by the input size the user configured, not the padded one the network sees.
        let name = format!("{}+pad{cells}", inner.name().replacen(&format!("@{padded}"), &format!("@{size}"), 1));
        Ok(Self { inner, name, size, cells, stride })
    }
}

/// Mirror index for reflection padding without repeating the edge pixel (numpy "reflect").
fn reflect(i: isize, n: usize) -> usize {
    if n == 1 {
        return 0;
    }
    let period = 2 * (n as isize - 1);
    let m = i.rem_euclid(period);
    (if m < n as isize { m } else { period - m }) as usize
}

/// `img` extended by `p` pixels on each side by reflection.
pub fn reflect_pad(img: &Image, p: usize) -> Image {
    let (h, w) = (img.h + 2 * p, img.w + 2 * p);
    let mut data = Vec::with_capacity(3 * h * w);
    for c in 0..3 {
        let plane = &img.data[c * img.h * img.w..(c + 1) * img.h * img.w];
        for y in 0..h {
            let sy = reflect(y as isize - p as isize, img.h);
            for x in 0..w {
                data.push(plane[sy * img.w + reflect(x as isize - p as isize, img.w)]);
            }
        }
    }
    Image { h, w, data }
}

impl Backbone for ContextPad {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn features(&self, images: &[Image]) -> Result<Vec<FeatureMap>> {
        let px = self.cells * self.stride;
        let padded: Vec<Image> = images.iter().map(|im| reflect_pad(&resize_bilinear(im, self.size, self.size), px)).collect();
        let grid = self.size / self.stride;
        self.inner
            .features(&padded)?
            .into_iter()
            .map(|f| {
                if f.h != grid + 2 * self.cells || f.w != grid + 2 * self.cells {
                    bail!("{}: padded feature grid {}×{}, expected {} (grid {grid} + 2·{} cells)", self.name(), f.h, f.w, grid + 2 * self.cells, self.cells);
                }
                let c = self.cells;
                let mut data = Vec::with_capacity(grid * grid * f.d);
                for y in c..c + grid {
                    data.extend_from_slice(&f.data[(y * f.w + c) * f.d..(y * f.w + c + grid) * f.d]);
                }
                Ok(FeatureMap { h: grid, w: grid, d: f.d, data })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reflect_pad_mirrors_without_repeating_the_edge() {
        let img = Image { h: 1, w: 3, data: [[1., 2., 3.]; 3].concat() };
        let p = reflect_pad(&img, 2);
        assert_eq!((p.h, p.w), (5, 7));
        // Row 2 is the image row; columns: 3 2 | 1 2 3 | 2 1.
        assert_eq!(&p.data[2 * 7..3 * 7], &[3., 2., 1., 2., 3., 2., 1.]);
        // A 1-pixel-high image repeats its only row.
        assert_eq!(&p.data[0..7], &p.data[2 * 7..3 * 7]);
        assert_eq!(reflect(-5, 3), 1);
        assert_eq!(reflect(7, 3), 1);
    }
}
