//! The plain RGB image type that flows between the world, the decoder, rewards and the PSM.

use anyhow::{bail, Context, Result};
use std::path::Path;

/// An RGB image, channel-major (C=3, H, W), values in [0, 1].
#[derive(Clone, Debug, PartialEq)]
pub struct Image {
    pub h: usize,
    pub w: usize,
    /// Length 3·h·w, laid out as data[c*h*w + y*w + x].
    pub data: Vec<f32>,
}

/// What a generator samples: still images, or clips of frames. Rewards, prompts and tasks
/// ask this, never which generator family made them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SampleKind {
    Images,
    Clips,
}

/// Decoded samples of a batch: what rewards, maps and grids receive from a policy's decoder.
#[derive(Clone, Debug)]
pub enum Samples {
    Images(Vec<Image>),
    /// One clip per sample, each a list of frames.
    Clips(Vec<Vec<Image>>),
}

impl Samples {
    pub fn len(&self) -> usize {
        match self {
            Samples::Images(v) => v.len(),
            Samples::Clips(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Samples `start..start + n` (clones).
    pub fn slice(&self, start: usize, n: usize) -> Samples {
        match self {
            Samples::Images(v) => Samples::Images(v[start..start + n].to_vec()),
            Samples::Clips(v) => Samples::Clips(v[start..start + n].to_vec()),
        }
    }
    /// The images, for a consumer (`who`) that only takes images.
    pub fn images(&self, who: &str) -> Result<&[Image]> {
        match self {
            Samples::Images(v) => Ok(v),
            Samples::Clips(_) => bail!("{who} scores images, and this run samples video clips"),
        }
    }
    /// The clips, for a consumer (`who`) that only takes clips.
    pub fn clips(&self, who: &str) -> Result<&[Vec<Image>]> {
        match self {
            Samples::Clips(v) => Ok(v),
            Samples::Images(_) => bail!("{who} scores video clips, and this run samples images"),
        }
    }
}

impl Image {
    pub fn new(h: usize, w: usize) -> Self {
        Self { h, w, data: vec![0.0; 3 * h * w] }
    }
    pub fn filled(h: usize, w: usize, rgb: [f32; 3]) -> Self {
        let mut im = Self::new(h, w);
        for c in 0..3 {
            im.data[c * h * w..(c + 1) * h * w].fill(rgb[c]);
        }
        im
    }
    #[inline]
    pub fn get(&self, c: usize, y: usize, x: usize) -> f32 {
        self.data[c * self.h * self.w + y * self.w + x]
    }
    #[inline]
    pub fn set(&mut self, c: usize, y: usize, x: usize, v: f32) {
        let (h, w) = (self.h, self.w);
        self.data[c * h * w + y * w + x] = v;
    }
    #[inline]
    pub fn pixel(&self, y: usize, x: usize) -> [f32; 3] {
        [self.get(0, y, x), self.get(1, y, x), self.get(2, y, x)]
    }

    /// Convert to 8-bit RGB for saving.
    pub fn to_rgb8(&self) -> image::RgbImage {
        let mut out = image::RgbImage::new(self.w as u32, self.h as u32);
        for y in 0..self.h {
            for x in 0..self.w {
                let p = self.pixel(y, x);
                let q = p.map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8);
                out.put_pixel(x as u32, y as u32, image::Rgb(q));
            }
        }
        out
    }

    pub fn from_rgb8(img: &image::RgbImage) -> Self {
        let (w, h) = (img.width() as usize, img.height() as usize);
        let mut out = Self::new(h, w);
        for (x, y, p) in img.enumerate_pixels() {
            for c in 0..3 {
                out.set(c, y as usize, x as usize, p.0[c] as f32 / 255.0);
            }
        }
        out
    }

    /// Load a PNG/JPEG. Errors name the file; non-RGB images (grey, RGBA with
    /// transparency) are rejected rather than silently converted.
    pub fn load(path: &Path) -> Result<Self> {
        let dynimg = image::open(path).with_context(|| format!("{}: cannot read image", path.display()))?;
        match dynimg.color() {
            image::ColorType::Rgb8 | image::ColorType::Rgb16 | image::ColorType::Rgb32F => {}
            other => bail!("{}: image is {:?}, expected RGB", path.display(), other),
        }
        Ok(Self::from_rgb8(&dynimg.to_rgb8()))
    }

    /// Save as PNG (atomically: temp file + rename).
    pub fn save_png(&self, path: &Path) -> Result<()> {
        crate::io::atomic_write_with(path, |tmp| self.to_rgb8().save_with_format(tmp, image::ImageFormat::Png).with_context(|| format!("{}: cannot write PNG", path.display())))
    }

    /// The `h`×`w` window whose top-left pixel is (y0, x0).
    pub fn crop(&self, y0: usize, x0: usize, h: usize, w: usize) -> Result<Image> {
        if y0 + h > self.h || x0 + w > self.w {
            bail!("crop {h}×{w} at ({y0}, {x0}) lies outside the {}×{} image", self.h, self.w);
        }
        let mut out = Image::new(h, w);
        for c in 0..3 {
            for y in 0..h {
                for x in 0..w {
                    out.set(c, y, x, self.get(c, y0 + y, x0 + x));
                }
            }
        }
        Ok(out)
    }

    /// Nearest-neighbour upscale by an integer factor (for viewing 32x32 samples).
    pub fn upscale(&self, f: usize) -> Self {
        let mut out = Self::new(self.h * f, self.w * f);
        for c in 0..3 {
            for y in 0..out.h {
                for x in 0..out.w {
                    out.set(c, y, x, self.get(c, y / f, x / f));
                }
            }
        }
        out
    }
}

/// Upscale factor of a grid tile `w` pixels wide: ShapeWorld's small images 4×, real
/// generators' (≥ 128²) about as they are.
pub fn grid_scale(w: usize) -> usize {
    if w <= 64 {
        4
    } else {
        (256 / w).max(1)
    }
}

/// Tile images into a grid with a 1-pixel white border, `cols` per row.
pub fn grid(images: &[Image], cols: usize) -> Image {
    if images.is_empty() {
        return Image::new(1, 1);
    }
    let (h, w) = (images[0].h, images[0].w);
    let cols = cols.max(1).min(images.len());
    let rows = images.len().div_ceil(cols);
    let mut out = Image::filled(rows * (h + 1) + 1, cols * (w + 1) + 1, [1.0, 1.0, 1.0]);
    for (i, im) in images.iter().enumerate() {
        let (oy, ox) = (1 + (i / cols) * (h + 1), 1 + (i % cols) * (w + 1));
        for c in 0..3 {
            for y in 0..h.min(im.h) {
                for x in 0..w.min(im.w) {
                    out.set(c, oy + y, ox + x, im.get(c, y, x));
                }
            }
        }
    }
    out
}

/// Cell `i` of an image made by [`grid`] from `cell_h`×`cell_w` tiles in `cols` columns.
pub fn grid_cell(g: &Image, cell_h: usize, cell_w: usize, cols: usize, i: usize) -> Result<Image> {
    let (oy, ox) = (1 + (i / cols) * (cell_h + 1), 1 + (i % cols) * (cell_w + 1));
    g.crop(oy, ox, cell_h, cell_w).with_context(|| format!("grid cell {i} ({cell_h}x{cell_w}, {cols} columns)"))
}

/// What a grid image shows, cell by cell in reading order: the prompt of each sample, its
/// score, and a note. Written beside the PNG as `NAME.prompts.json`, so reports can caption
/// every grid with its prompts.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LegendCell {
    pub prompt: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<f64>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub note: String,
}

/// `grid.png` → `grid.prompts.json`.
pub fn legend_path(png: &Path) -> std::path::PathBuf {
    png.with_extension("prompts.json")
}

/// Write the legend of the grid image `png`.
pub fn write_legend(png: &Path, cells: &[LegendCell]) -> Result<()> {
    crate::io::atomic_write(&legend_path(png), serde_json::to_string_pretty(cells)?.as_bytes())
}

/// The legend of `png`, if one was written (None when absent or unreadable).
pub fn read_legend(png: &Path) -> Option<Vec<LegendCell>> {
    serde_json::from_str(&std::fs::read_to_string(legend_path(png)).ok()?).ok()
}

/// A heat-map image of `values` (h×w, expected in [0, 1]): dark blue → yellow.
pub fn heatmap(values: &[f32], h: usize, w: usize) -> Image {
    let mut out = Image::new(h, w);
    for y in 0..h {
        for x in 0..w {
            let v = values[y * w + x].clamp(0.0, 1.0);
            // A compact perceptual ramp (approximately viridis at 3 stops).
            let c = if v < 0.5 {
                let t = v / 0.5;
                [0.27 * (1.0 - t) + 0.13 * t, 0.0 + 0.57 * t, 0.33 * (1.0 - t) + 0.55 * t]
            } else {
                let t = (v - 0.5) / 0.5;
                [0.13 * (1.0 - t) + 0.99 * t, 0.57 * (1.0 - t) + 0.91 * t, 0.55 * (1.0 - t) + 0.14 * t]
            };
            for (ch, cv) in c.iter().enumerate() {
                out.set(ch, y, x, *cv);
            }
        }
    }
    out
}

/// Blend a heat map of `values` over `img` (same h×w) with opacity `alpha`.
pub fn overlay(img: &Image, values: &[f32], alpha: f32) -> Image {
    let hm = heatmap(values, img.h, img.w);
    let mut out = img.clone();
    for (o, m) in out.data.iter_mut().zip(&hm.data) {
        *o = (1.0 - alpha) * *o + alpha * m;
    }
    out
}

/// Signed overlay: red where `values` > 0 (pushed up), blue where < 0 (pushed down),
/// intensity ∝ |value| / `scale`, over a dimmed copy of `img`.
pub fn signed_overlay(img: &Image, values: &[f32], scale: f32) -> Image {
    let mut out = img.clone();
    let n = img.h * img.w;
    for i in 0..n {
        let a = (values[i] / scale.max(1e-8)).clamp(-1.0, 1.0);
        let col = if a >= 0.0 { [1.0, 0.1, 0.1] } else { [0.1, 0.3, 1.0] };
        let t = a.abs() * 0.8;
        for c in 0..3 {
            let base = img.data[c * n + i] * 0.5;
            out.data[c * n + i] = (1.0 - t) * base + t * col[c];
        }
    }
    out
}

/// A clip as one image: its frames side by side.
pub fn frame_strip(frames: &[Image]) -> Image {
    let (h, w) = (frames[0].h, frames[0].w);
    let mut out = Image::new(h, w * frames.len());
    for (t, f) in frames.iter().enumerate() {
        for c in 0..3 {
            for y in 0..h {
                for x in 0..w {
                    out.set(c, y, t * w + x, f.get(c, y, x));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `grid_cell` cuts back exactly the tiles `grid` laid out; a cell outside is an error.
    #[test]
    fn grid_cells_round_trip_and_legends_persist() {
        let tiles: Vec<Image> = (0..5).map(|i| Image::filled(3, 4, [i as f32 / 5.0, 0.5, 1.0 - i as f32 / 5.0])).collect();
        let g = grid(&tiles, 2);
        for (i, t) in tiles.iter().enumerate() {
            assert_eq!(grid_cell(&g, 3, 4, 2, i).unwrap(), *t, "cell {i}");
        }
        assert!(grid_cell(&g, 3, 4, 2, 6).is_err());
        let dir = tempfile::tempdir().unwrap();
        let png = dir.path().join("g.png");
        assert_eq!(read_legend(&png), None);
        let cells = vec![LegendCell { prompt: "a red circle".into(), score: Some(0.25), note: String::new() }];
        write_legend(&png, &cells).unwrap();
        assert_eq!(read_legend(&png), Some(cells));
        assert!(dir.path().join("g.prompts.json").is_file());
    }
}
