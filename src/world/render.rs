//! Anti-aliased rasterizer for ShapeWorld scenes.

use super::grammar::Shape;
use super::scene::Scene;
use crate::image::Image;

/// The plain uniform background colour (dark grey, far from every palette colour).
pub const BACKGROUND: [f32; 3] = [0.1, 0.1, 0.1];
/// Default image side in pixels.
pub const DEFAULT_RES: usize = 32;
/// Sub-samples per pixel side: coverage is estimated on a SUPERSAMPLE² grid per pixel.
pub const SUPERSAMPLE: usize = 4;

/// A rendered scene.
#[derive(Clone, Debug, PartialEq)]
pub struct Rendered {
    pub image: Image,
    /// Per object (same order as `scene.objects`), h·w coverage in [0,1], row-major.
    pub masks: Vec<Vec<f32>>,
}

/// Coverage in [0,1] of pixel (x, y) by `shape` centred at (cx, cy) with half-extents
/// (sx, sy), all in pixel units (pixel (x, y) spans [x, x+1] × [y, y+1]).
/// Estimated on a regular [`SUPERSAMPLE`]² grid, so it is exactly reproducible.
#[inline]
pub fn pixel_coverage(shape: Shape, cx: f32, cy: f32, sx: f32, sy: f32, x: usize, y: usize) -> f32 {
    const N: usize = SUPERSAMPLE;
    let step = 1.0 / N as f32;
    let mut hits = 0u32;
    for j in 0..N {
        let v = (y as f32 + (j as f32 + 0.5) * step - cy) / sy;
        for i in 0..N {
            let u = (x as f32 + (i as f32 + 0.5) * step - cx) / sx;
            hits += shape.contains_unit(u, v) as u32;
        }
    }
    hits as f32 / (N * N) as f32
}

/// Inclusive-exclusive pixel range [lo, hi) overlapping the interval [c − s, c + s].
#[inline]
pub fn pixel_span(c: f32, s: f32, n: usize) -> (usize, usize) {
    let lo = (c - s).floor().max(0.0) as usize;
    let hi = ((c + s).ceil().max(0.0) as usize).min(n);
    (lo.min(n), hi)
}

/// Rasterize `scene` at `res` × `res` pixels (default [`DEFAULT_RES`]): uniform
/// [`BACKGROUND`], each object composited "over" with its supersampled coverage.
/// Deterministic: the same scene always gives the same bytes.
pub fn render(scene: &Scene, res: usize) -> Rendered {
    let (h, w) = (res, res);
    let mut image = Image::filled(h, w, BACKGROUND);
    let mut masks = Vec::with_capacity(scene.objects.len());
    for o in &scene.objects {
        let mut mask = vec![0.0f32; h * w];
        let (cx, cy) = (o.cx * w as f32, o.cy * h as f32);
        let (sx, sy) = (o.size * w as f32, o.size * h as f32);
        if sx > 0.0 && sy > 0.0 {
            let (x0, x1) = pixel_span(cx, sx, w);
            let (y0, y1) = pixel_span(cy, sy, h);
            let rgb = o.color.rgb();
            for y in y0..y1 {
                for x in x0..x1 {
                    let a = pixel_coverage(o.shape, cx, cy, sx, sy, x, y);
                    if a > 0.0 {
                        mask[y * w + x] = a;
                        for (c, &col) in rgb.iter().enumerate() {
                            let old = image.get(c, y, x);
                            image.set(c, y, x, old * (1.0 - a) + col * a);
                        }
                    }
                }
            }
        }
        masks.push(mask);
    }
    Rendered { image, masks }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::grammar::{Color, PromptSpec};
    use crate::world::scene::{sample_scene, Object};
    use crate::world::split::sample_spec;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn render_is_deterministic() {
        let run = |seed| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let spec = sample_spec(&mut rng);
            render(&sample_scene(&spec, &mut rng), 32)
        };
        for seed in 0..20 {
            let (a, b) = (run(seed), run(seed));
            let bytes = |r: &Rendered| r.image.data.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>();
            assert_eq!(bytes(&a), bytes(&b));
            assert_eq!(a.masks, b.masks);
        }
    }

    #[test]
    fn coverage_is_antialiased_and_areas_match() {
        for &shape in Shape::ALL {
            let spec = PromptSpec::single(1, Color::Red, shape);
            let scene = crate::world::Scene { spec, objects: vec![Object { color: Color::Red, shape, cx: 0.5, cy: 0.5, size: 0.3, group: 0 }] };
            let r = render(&scene, 64);
            let m = &r.masks[0];
            let area: f32 = m.iter().sum();
            let s = 0.3 * 64.0;
            let want = shape.area_factor() * s * s;
            assert!((area - want).abs() / want < 0.02, "{shape:?}: area {area} vs {want}");
            // Anti-aliasing: some partially covered pixels on the edges.
            assert!(m.iter().any(|&a| a > 0.05 && a < 0.95), "{shape:?} has no soft edge");
            // The image is the mask-weighted blend of colour and background.
            let (y, x) = (32, 32);
            assert!((r.image.get(0, y, x) - Color::Red.rgb()[0]).abs() < 1e-6);
            assert_eq!(r.image.pixel(0, 0), BACKGROUND);
        }
    }

    #[test]
    fn masks_match_objects() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for _ in 0..50 {
            let spec = sample_spec(&mut rng);
            let scene = sample_scene(&spec, &mut rng);
            let r = render(&scene, 32);
            assert_eq!(r.masks.len(), scene.objects.len());
            for (o, m) in scene.objects.iter().zip(&r.masks) {
                assert_eq!(m.len(), 32 * 32);
                let area: f32 = m.iter().sum();
                let want = o.shape.area_factor() * (o.size * 32.0).powi(2);
                assert!((area - want).abs() / want < 0.1, "area {area} vs {want}");
                assert!(m.iter().all(|&a| (0.0..=1.0).contains(&a)));
            }
            // Objects never share a pixel (no overlaps).
            for p in 0..32 * 32 {
                assert!(r.masks.iter().filter(|m| m[p] > 0.0).count() <= 1);
            }
        }
    }
}
