//! GenEval-style compositional reward for ShapeWorld, computed from pixels only.
//!
//! # Detection
//! 1. **Colour unmixing.** Every palette colour c defines a line from
//!    [`BACKGROUND`] to c; an anti-aliased pixel of colour c lies on it at
//!    α = its coverage. Each pixel is projected onto every line (α clamped to [0,1]);
//!    the line with the smallest residual wins if that residual is below
//!    `resid_tol`, giving a label and a soft coverage α; otherwise the pixel is
//!    unexplained. The RMS residual over the image measures how *clean* it is.
//! 2. **Components.** 8-connected components of pixels with α ≥ ½ per colour; those
//!    whose soft area Σα is below `min_area_frac` of the image are dropped as specks.
//! 3. **Shape.** For each shape hypothesis the ideal shape is fitted to the component
//!    (size from the soft area, centre from the soft centroid), rasterized with the
//!    same supersampling as the renderer, and compared by soft IoU
//!    Σmin(α, α̂)/Σmax(α, α̂). The best IoU gives the shape and its quality.
//!
//! # Score
//! Expected objects (one slot per object of each group) are matched greedily to
//! detections: exact colour+shape first, then colour only, then shape only. With
//! `D = n_expected + unmatched detections` (so spurious objects always cost):
//! * `count`    = exact matches / D;
//! * `color`    = matched slots with the right colour / D;
//! * `shape`    = matched slots with the right shape / D;
//! * `position` = fraction of (group-0 slot, group-1 slot) pairs whose matched
//!   detections satisfy the relation (an unmatched slot fails its pairs); 1 and left
//!   out of the total for prompts without a relation;
//! * `quality`  = clean · Σ_matched q(IoU) / D with q(IoU) = clamp((IoU − 0.55)/0.35)
//!   (1 from IoU 0.9 up) and clean = clamp(1 − (rms_residual − 0.03)/0.17).
//!
//! `total` = weighted mean with weights count 0.3, color 0.15, shape 0.15,
//! position 0.2, quality 0.2 (renormalized when position does not apply).

use super::{Inputs, Reward, RewardInfo};
use crate::image::{Image, Samples};
use crate::prompt::{image_specs, Prompt};
use crate::world::render::{pixel_coverage, pixel_span};
use crate::world::{Color, PromptSpec, Shape, BACKGROUND};
use anyhow::{bail, Result};

/// Per-term scores in [0,1] and their weighted total (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Breakdown {
    pub count: f32,
    pub color: f32,
    pub shape: f32,
    /// 1 for prompts without a relation (then excluded from `total`).
    pub position: f32,
    pub quality: f32,
    pub total: f32,
}

impl Breakdown {
    fn zero(has_relation: bool) -> Self {
        Self { count: 0.0, color: 0.0, shape: 0.0, position: if has_relation { 0.0 } else { 1.0 }, quality: 0.0, total: 0.0 }
    }
}

/// One detected object.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Detection {
    pub color: Color,
    pub shape: Shape,
    /// Soft centroid in [0,1] image coordinates (x right, y down).
    pub cx: f32,
    pub cy: f32,
    /// Soft area as a fraction of the image.
    pub area: f32,
    /// Soft IoU with the best-fitting ideal shape.
    pub iou: f32,
}

/// Everything the detector sees in one image.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Detections {
    pub objects: Vec<Detection>,
    /// RMS of the per-pixel colour-unmixing residual (0 for a clean render).
    pub rms_residual: f32,
}

/// Term weights of the total.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Weights {
    pub count: f32,
    pub color: f32,
    pub shape: f32,
    pub position: f32,
    pub quality: f32,
}

impl Default for Weights {
    fn default() -> Self {
        Self { count: 0.3, color: 0.15, shape: 0.15, position: 0.2, quality: 0.2 }
    }
}

/// The ShapeWorld compositional reward (see the module docs).
#[derive(Clone, Debug)]
pub struct Compositional {
    pub weights: Weights,
    /// Largest colour-unmixing residual (RGB distance) for a pixel to get a label.
    pub resid_tol: f32,
    /// Components with soft area below this fraction of the image are ignored.
    pub min_area_frac: f32,
}

impl Default for Compositional {
    fn default() -> Self {
        Self::new()
    }
}

const NO_LABEL: u8 = u8::MAX;
const NO_COMP: u32 = u32::MAX;

impl Compositional {
    /// The reward with its documented default weights and thresholds.
    pub fn new() -> Self {
        Self { weights: Weights::default(), resid_tol: 0.2, min_area_frac: 0.004 }
    }

    /// Detect objects from the pixels of `image`. Values are clamped to [0,1];
    /// non-finite values count as background. A malformed image (data length not
    /// 3·h·w) yields no detections and the worst residual.
    pub fn detect(&self, image: &Image) -> Detections {
        let (h, w) = (image.h, image.w);
        let hw = h * w;
        if hw == 0 || image.data.len() != 3 * hw {
            return Detections { objects: vec![], rms_residual: 1.0 };
        }
        let bg = BACKGROUND;
        let dirs: Vec<([f32; 3], f32)> = Color::ALL
            .iter()
            .map(|c| {
                let rgb = c.rgb();
                let d = [rgb[0] - bg[0], rgb[1] - bg[1], rgb[2] - bg[2]];
                (d, 1.0 / (d[0] * d[0] + d[1] * d[1] + d[2] * d[2]))
            })
            .collect();
        let tol2 = self.resid_tol * self.resid_tol;
        let mut label = vec![NO_LABEL; hw];
        let mut alpha = vec![0.0f32; hw];
        let mut resid_sum = 0.0f64;
        for p in 0..hw {
            let mut e = [0.0f32; 3];
            for (c, ec) in e.iter_mut().enumerate() {
                let v = image.data[c * hw + p];
                let v = if v.is_finite() { v.clamp(0.0, 1.0) } else { bg[c] };
                *ec = v - bg[c];
            }
            let (mut best_r2, mut best_k, mut best_a) = (f32::INFINITY, 0usize, 0.0f32);
            for (k, (d, inv)) in dirs.iter().enumerate() {
                let a = ((e[0] * d[0] + e[1] * d[1] + e[2] * d[2]) * inv).clamp(0.0, 1.0);
                let r = [e[0] - a * d[0], e[1] - a * d[1], e[2] - a * d[2]];
                let r2 = r[0] * r[0] + r[1] * r[1] + r[2] * r[2];
                if r2 < best_r2 {
                    (best_r2, best_k, best_a) = (r2, k, a);
                }
            }
            resid_sum += best_r2 as f64;
            if best_r2 <= tol2 && best_a > 0.02 {
                label[p] = best_k as u8;
                alpha[p] = best_a;
            }
        }
        let rms_residual = (resid_sum / hw as f64).sqrt() as f32;

        // 8-connected components of confident pixels, per colour.
        let mut comp = vec![NO_COMP; hw];
        let mut objects = Vec::new();
        let mut stack = Vec::new();
        let mut members = Vec::new();
        let min_area = self.min_area_frac * hw as f32;
        let mut next_id = 0u32;
        for start in 0..hw {
            if comp[start] != NO_COMP || label[start] == NO_LABEL || alpha[start] < 0.5 {
                continue;
            }
            let k = label[start];
            let id = next_id;
            next_id += 1;
            members.clear();
            stack.push(start);
            comp[start] = id;
            while let Some(p) = stack.pop() {
                members.push(p);
                let (py, px) = ((p / w) as isize, (p % w) as isize);
                for dy in -1..=1isize {
                    for dx in -1..=1isize {
                        let (ny, nx) = (py + dy, px + dx);
                        if ny < 0 || nx < 0 || ny >= h as isize || nx >= w as isize {
                            continue;
                        }
                        let q = ny as usize * w + nx as usize;
                        if comp[q] == NO_COMP && label[q] == k && alpha[q] >= 0.5 {
                            comp[q] = id;
                            stack.push(q);
                        }
                    }
                }
            }
            if let Some(d) = self.fit_component(&members, id, k, &label, &alpha, &comp, h, w, min_area) {
                objects.push(d);
            }
        }
        Detections { objects, rms_residual }
    }

    /// Measure one component (soft area, centroid) and fit the ideal shapes to it.
    #[allow(clippy::too_many_arguments)]
    fn fit_component(&self, members: &[usize], id: u32, k: u8, label: &[u8], alpha: &[f32], comp: &[u32], h: usize, w: usize, min_area: f32) -> Option<Detection> {
        let (mut x0, mut x1, mut y0, mut y1) = (w, 0, h, 0);
        for &p in members {
            let (y, x) = (p / w, p % w);
            (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
        }
        // The soft region: the component's box grown by one pixel, so the
        // anti-aliased rim (α < ½) counts, but not pixels of another component.
        let (rx0, rx1, ry0, ry1) = (x0.saturating_sub(1), (x1 + 2).min(w), y0.saturating_sub(1), (y1 + 2).min(h));
        let obs = |x: usize, y: usize| -> f32 {
            if x < rx0 || x >= rx1 || y < ry0 || y >= ry1 {
                return 0.0;
            }
            let p = y * w + x;
            if label[p] == k && (comp[p] == id || comp[p] == NO_COMP) {
                alpha[p]
            } else {
                0.0
            }
        };
        let (mut area, mut sx, mut sy) = (0.0f32, 0.0f32, 0.0f32);
        for y in ry0..ry1 {
            for x in rx0..rx1 {
                let a = obs(x, y);
                area += a;
                sx += a * (x as f32 + 0.5);
                sy += a * (y as f32 + 0.5);
            }
        }
        if area < min_area.max(1e-6) {
            return None;
        }
        let (gx, gy) = (sx / area, sy / area);
        let (mut best_shape, mut best_iou) = (Shape::Circle, -1.0f32);
        for &shape in Shape::ALL {
            let s = (area / shape.area_factor()).sqrt();
            let (cx, cy) = (gx, gy - shape.centroid_dy() * s);
            let (fx0, fx1) = pixel_span(cx, s, w);
            let (fy0, fy1) = pixel_span(cy, s, h);
            let (wx0, wx1, wy0, wy1) = (fx0.min(rx0), fx1.max(rx1), fy0.min(ry0), fy1.max(ry1));
            let (mut inter, mut union) = (0.0f32, 0.0f32);
            for y in wy0..wy1 {
                for x in wx0..wx1 {
                    let a = obs(x, y);
                    let b = pixel_coverage(shape, cx, cy, s, s, x, y);
                    inter += a.min(b);
                    union += a.max(b);
                }
            }
            let iou = if union > 0.0 { inter / union } else { 0.0 };
            if iou > best_iou {
                (best_shape, best_iou) = (shape, iou);
            }
        }
        Some(Detection { color: Color::ALL[k as usize], shape: best_shape, cx: gx / w as f32, cy: gy / h as f32, area: area / (h * w) as f32, iou: best_iou.max(0.0) })
    }

    /// Score `image` against `spec`, term by term.
    pub fn breakdown(&self, image: &Image, spec: &PromptSpec) -> Breakdown {
        let det = self.detect(image);
        self.score_detections(&det, spec)
    }

    /// The scoring half of [`Compositional::breakdown`], for precomputed detections.
    pub fn score_detections(&self, det: &Detections, spec: &PromptSpec) -> Breakdown {
        let has_rel = spec.relation.is_some() && spec.groups.len() == 2;
        // One slot per expected object: (group index, colour, shape).
        let slots: Vec<(usize, Color, Shape)> = spec.groups.iter().enumerate().flat_map(|(gi, g)| std::iter::repeat_n((gi, g.color, g.shape), g.count)).collect();
        if slots.is_empty() {
            return Breakdown::zero(has_rel);
        }
        let dets = &det.objects;
        let mut used = vec![false; dets.len()];
        let mut assigned: Vec<Option<usize>> = vec![None; slots.len()];
        // Greedy matching in three passes of decreasing strictness.
        for pass in 0..3 {
            for (si, &(_, col, shp)) in slots.iter().enumerate() {
                if assigned[si].is_some() {
                    continue;
                }
                let ok = |d: &Detection| match pass {
                    0 => d.color == col && d.shape == shp,
                    1 => d.color == col,
                    _ => d.shape == shp,
                };
                if let Some(di) = (0..dets.len()).find(|&di| !used[di] && ok(&dets[di])) {
                    used[di] = true;
                    assigned[si] = Some(di);
                }
            }
        }
        let unmatched = used.iter().filter(|u| !**u).count();
        let denom = (slots.len() + unmatched) as f32;
        let (mut exact, mut col_ok, mut shp_ok, mut qual) = (0usize, 0usize, 0usize, 0.0f32);
        for (si, a) in assigned.iter().enumerate() {
            if let Some(di) = *a {
                let d = &dets[di];
                let (c, s) = (d.color == slots[si].1, d.shape == slots[si].2);
                exact += (c && s) as usize;
                col_ok += c as usize;
                shp_ok += s as usize;
                qual += ((d.iou - 0.55) / 0.35).clamp(0.0, 1.0);
            }
        }
        let clean = (1.0 - (det.rms_residual - 0.03) / 0.17).clamp(0.0, 1.0);
        let position = match (spec.relation, has_rel) {
            (Some(rel), true) => {
                let of_group = |g: usize| slots.iter().enumerate().filter(move |(_, s)| s.0 == g).map(|(i, _)| i);
                let (mut ok, mut total) = (0usize, 0usize);
                for si in of_group(0) {
                    for sj in of_group(1) {
                        total += 1;
                        if let (Some(di), Some(dj)) = (assigned[si], assigned[sj]) {
                            let (p, q) = (&dets[di], &dets[dj]);
                            ok += rel.holds((p.cx, p.cy), (q.cx, q.cy), 0.0) as usize;
                        }
                    }
                }
                if total > 0 {
                    ok as f32 / total as f32
                } else {
                    0.0
                }
            }
            _ => 1.0,
        };
        let mut b = Breakdown { count: exact as f32 / denom, color: col_ok as f32 / denom, shape: shp_ok as f32 / denom, position, quality: clean * qual / denom, total: 0.0 };
        let wt = &self.weights;
        let mut num = wt.count * b.count + wt.color * b.color + wt.shape * b.shape + wt.quality * b.quality;
        let mut den = wt.count + wt.color + wt.shape + wt.quality;
        if has_rel {
            num += wt.position * b.position;
            den += wt.position;
        }
        b.total = if den > 0.0 { (num / den).clamp(0.0, 1.0) } else { 0.0 };
        b
    }
}

impl Reward for Compositional {
    fn info(&self) -> RewardInfo {
        RewardInfo { name: "compositional".into(), version: "1".into(), range: (0.0, 1.0), higher_is_better: true }
    }
    fn inputs(&self) -> Inputs {
        Inputs::Images
    }
    fn score(&self, samples: &Samples, prompts: &[Prompt]) -> Result<Vec<f32>> {
        self.score_specs(samples.images("reward 'compositional'")?, &image_specs(prompts, "reward 'compositional'")?)
    }
    fn check_prompts(&self, prompts: &[Prompt]) -> Result<()> {
        image_specs(prompts, "reward 'compositional'").map(|_| ())
    }
}

impl Compositional {
    /// One score per image against its ShapeWorld scene.
    pub fn score_specs(&self, images: &[Image], prompts: &[PromptSpec]) -> Result<Vec<f32>> {
        if images.len() != prompts.len() {
            bail!("compositional reward: {} images but {} prompts", images.len(), prompts.len());
        }
        images
            .iter()
            .zip(prompts)
            .enumerate()
            .map(|(i, (im, spec))| {
                if im.data.len() != 3 * im.h * im.w {
                    bail!("compositional reward: images[{i}] has {} values, expected 3·{}·{}", im.data.len(), im.h, im.w);
                }
                Ok(self.breakdown(im, spec).total)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::{prompts, render, sample_scene, Scene, Split};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use rand_distr::{Distribution, Normal};

    const N: usize = 300;

    fn scenes(seed: u64, only_relations: bool) -> Vec<Scene> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        prompts(Split::Train, N * 3, seed).into_iter().filter(|s| !only_relations || s.relation.is_some()).take(N).map(|spec| sample_scene(&spec, &mut rng)).collect()
    }

    fn mean_total(r: &Compositional, items: &[(Image, PromptSpec)]) -> f32 {
        items.iter().map(|(im, s)| r.breakdown(im, s).total).sum::<f32>() / items.len() as f32
    }

    fn gt(scenes: &[Scene]) -> Vec<(Image, PromptSpec)> {
        scenes.iter().map(|s| (render(s, 32).image, s.spec.clone())).collect()
    }

    fn perturbed(scenes: &[Scene], seed: u64, f: impl Fn(&mut Scene, &mut ChaCha8Rng)) -> Vec<(Image, PromptSpec)> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        scenes
            .iter()
            .map(|s| {
                let mut p = s.clone();
                f(&mut p, &mut rng);
                (render(&p, 32).image, s.spec.clone())
            })
            .collect()
    }

    fn box_blur(im: &Image, r: isize) -> Image {
        let mut out = im.clone();
        let (h, w) = (im.h as isize, im.w as isize);
        for c in 0..3 {
            for y in 0..h {
                for x in 0..w {
                    let (mut s, mut n) = (0.0, 0.0);
                    for dy in -r..=r {
                        for dx in -r..=r {
                            let (yy, xx) = ((y + dy).clamp(0, h - 1), (x + dx).clamp(0, w - 1));
                            s += im.get(c, yy as usize, xx as usize);
                            n += 1.0;
                        }
                    }
                    out.set(c, y as usize, x as usize, s / n);
                }
            }
        }
        out
    }

    fn assert_drop(name: &str, base: f32, bad: f32) {
        eprintln!("{name}: ground truth {base:.3}, perturbed {bad:.3}");
        assert!(base - bad >= 0.1, "{name}: drop {base:.3} → {bad:.3} is < 0.1");
    }

    #[test]
    fn ground_truth_scores_high() {
        let r = Compositional::new();
        let sc = scenes(1, false);
        let items = gt(&sc);
        let m = mean_total(&r, &items);
        let worst = items.iter().map(|(im, s)| r.breakdown(im, s).total).fold(1.0f32, f32::min);
        eprintln!("ground truth mean {m:.4}, worst {worst:.3}");
        assert!(m >= 0.98, "mean ground-truth score {m}");
        // Also per term, on the structure: the detector finds exactly the objects.
        for (im, s) in items.iter().take(50) {
            let d = r.detect(im);
            assert_eq!(d.objects.len(), s.n_objects(), "'{}'", s.text());
            assert!(d.rms_residual < 0.01);
        }
    }

    #[test]
    fn missing_wrong_colour_wrong_shape_score_lower() {
        let r = Compositional::new();
        let sc = scenes(2, false);
        let base = mean_total(&r, &gt(&sc));
        let missing = perturbed(&sc, 3, |s, rng| {
            let i = rng.gen_range(0..s.objects.len());
            s.objects.remove(i);
        });
        assert_drop("missing object", base, mean_total(&r, &missing));
        let recolour = perturbed(&sc, 4, |s, rng| {
            let i = rng.gen_range(0..s.objects.len());
            let o = &mut s.objects[i];
            let others: Vec<_> = Color::ALL.iter().copied().filter(|c| *c != o.color).collect();
            o.color = others[rng.gen_range(0..others.len())];
        });
        assert_drop("wrong colour", base, mean_total(&r, &recolour));
        let reshape = perturbed(&sc, 5, |s, rng| {
            let i = rng.gen_range(0..s.objects.len());
            let o = &mut s.objects[i];
            let others: Vec<_> = Shape::ALL.iter().copied().filter(|c| *c != o.shape).collect();
            o.shape = others[rng.gen_range(0..others.len())];
        });
        assert_drop("wrong shape", base, mean_total(&r, &reshape));
        // Spurious extra object: a clearly costs something on every image.
        let (im, spec) = &gt(&sc[..1])[0];
        let clean = r.breakdown(im, spec).total;
        let mut with_extra = im.clone();
        // Paint a 4×4 block of a colour in the corner (objects keep EDGE from the border,
        // but the block may touch one: then it is still an extra component or a bigger one).
        let col = Color::ALL.iter().copied().find(|c| spec.groups.iter().all(|g| g.color != *c)).unwrap();
        for y in 0..4 {
            for x in 0..4 {
                for (c, v) in col.rgb().iter().enumerate() {
                    with_extra.set(c, y, x, *v);
                }
            }
        }
        assert!(r.breakdown(&with_extra, spec).total < clean - 0.05);
    }

    #[test]
    fn swapped_relation_scores_lower() {
        let r = Compositional::new();
        let sc = scenes(6, true);
        let base = mean_total(&r, &gt(&sc));
        let swapped: Vec<_> = sc.iter().map(|s| (render(&s.with_relation_swapped(), 32).image, s.spec.clone())).collect();
        let bad = mean_total(&r, &swapped);
        assert_drop("swapped relation", base, bad);
        assert!(swapped.iter().all(|(im, s)| r.breakdown(im, s).position == 0.0));
    }

    #[test]
    fn blur_and_noise_score_lower() {
        let r = Compositional::new();
        let sc = scenes(7, false);
        let items = gt(&sc);
        let base = mean_total(&r, &items);
        let blurred: Vec<_> = items.iter().map(|(im, s)| (box_blur(im, 2), s.clone())).collect();
        assert_drop("box blur r=2", base, mean_total(&r, &blurred));
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let normal = Normal::new(0.0f32, 0.3).unwrap();
        let noisy: Vec<_> = items
            .iter()
            .map(|(im, s)| {
                let mut n = im.clone();
                for v in &mut n.data {
                    *v = (*v + normal.sample(&mut rng)).clamp(0.0, 1.0);
                }
                (n, s.clone())
            })
            .collect();
        assert_drop("gaussian noise 0.3", base, mean_total(&r, &noisy));
        // Mild noise is tolerated: the reward degrades gracefully, not as a cliff.
        let mild = Normal::new(0.0f32, 0.03).unwrap();
        let slightly: Vec<_> = items
            .iter()
            .map(|(im, s)| {
                let mut n = im.clone();
                n.data.iter_mut().for_each(|v| *v = (*v + mild.sample(&mut rng)).clamp(0.0, 1.0));
                (n, s.clone())
            })
            .collect();
        let m = mean_total(&r, &slightly);
        eprintln!("gaussian noise 0.03: {m:.3}");
        assert!(m > 0.85, "mild noise scored {m}");
    }

    #[test]
    fn reward_trait_and_bad_input() {
        let r = Compositional::new();
        let info = r.info();
        assert_eq!((info.name.as_str(), info.version.as_str(), info.range), ("compositional", "1", (0.0, 1.0)));
        let sc = scenes(9, false);
        let items = gt(&sc[..4]);
        let (ims, specs): (Vec<_>, Vec<_>) = items.into_iter().unzip();
        let s = r.score_specs(&ims, &specs).unwrap();
        assert!(s.iter().all(|v| v.is_finite() && (0.0..=1.0).contains(v)));
        assert!(r.score_specs(&ims[..3], &specs).unwrap_err().to_string().contains("3 images but 4"));
        let mut broken = ims.clone();
        broken[1].data.pop();
        assert!(r.score_specs(&broken, &specs).unwrap_err().to_string().contains("images[1]"));
        // NaN / out-of-range pixels and an empty image give finite scores.
        let mut nan = ims[0].clone();
        nan.data.iter_mut().step_by(7).for_each(|v| *v = f32::NAN);
        nan.data.iter_mut().step_by(11).for_each(|v| *v = 5.0);
        assert!(r.score_specs(&[nan], &specs[..1]).unwrap()[0].is_finite());
        let blank = Image::filled(32, 32, BACKGROUND);
        assert_eq!(r.breakdown(&blank, &specs[0]).total, 0.0);
    }

    #[test]
    fn scorer_is_fast() {
        let r = Compositional::new();
        let items = gt(&scenes(10, false)[..100]);
        let t = std::time::Instant::now();
        let mut acc = 0.0;
        for (im, s) in &items {
            acc += r.breakdown(im, s).total;
        }
        let per = t.elapsed().as_secs_f64() / items.len() as f64;
        eprintln!("scorer: {:.1} µs per image", per * 1e6);
        assert!(acc > 0.0);
        // Generous bound for slow, shared CI machines with the opt-level 1 test profile.
        assert!(per < 2e-3, "{per} s per image");
    }
}
