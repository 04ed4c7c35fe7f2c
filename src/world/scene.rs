//! Scenes: concrete object layouts that satisfy a [`PromptSpec`].

use super::grammar::{Color, PromptSpec, Relation, Shape};
use rand::Rng;

/// One placed object: centre and size in [0,1] image coordinates (x right, y down).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Object {
    pub color: Color,
    pub shape: Shape,
    pub cx: f32,
    pub cy: f32,
    /// Half-extent: the shape fits in the box [cx ± size] × [cy ± size].
    pub size: f32,
    /// Index into `spec.groups` of the group this object belongs to.
    pub group: usize,
}

/// A prompt and a layout of its objects (group 0's objects first).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Scene {
    pub spec: PromptSpec,
    pub objects: Vec<Object>,
}

/// Half-extents an object is drawn with (small, large), chosen uniformly per object.
pub const SIZES: [f32; 2] = [0.09, 0.13];
/// Minimum empty space between the bounding boxes of two objects (≈ 2 px at 32 px),
/// so that objects stay separate connected components after rasterization.
pub const GAP: f32 = 0.06;
/// Minimum distance between a bounding box and the image border.
pub const EDGE: f32 = 0.02;
/// Minimum separation of the centres along the relation's axis, for every pair.
pub const RELATION_MARGIN: f32 = 0.1;

const MAX_TRIES: usize = 400;

impl Scene {
    /// Does the layout obey every rule: inside the image, no two bounding boxes closer
    /// than [`GAP`], the relation held with [`RELATION_MARGIN`] for every pair, and the
    /// objects matching the spec's groups?
    pub fn is_valid(&self) -> bool {
        let objs = &self.objects;
        let in_bounds = objs.iter().all(|o| o.cx - o.size >= EDGE - 1e-6 && o.cx + o.size <= 1.0 - EDGE + 1e-6 && o.cy - o.size >= EDGE - 1e-6 && o.cy + o.size <= 1.0 - EDGE + 1e-6);
        let groups_ok = self.spec.groups.iter().enumerate().all(|(gi, g)| {
            let members: Vec<_> = objs.iter().filter(|o| o.group == gi).collect();
            members.len() == g.count && members.iter().all(|o| o.color == g.color && o.shape == g.shape)
        }) && objs.len() == self.spec.n_objects();
        in_bounds && groups_ok && no_overlap(objs) && relation_ok(&self.spec, objs)
    }

    /// The same scene with the groups' positions mirrored across the relation's axis,
    /// so that the relation is violated for every pair (used to test rewards).
    /// Scenes without a relation are returned unchanged.
    pub fn with_relation_swapped(&self) -> Scene {
        let mut s = self.clone();
        if let Some(rel) = self.spec.relation {
            for o in &mut s.objects {
                if rel.is_horizontal() {
                    o.cx = 1.0 - o.cx;
                } else {
                    o.cy = 1.0 - o.cy;
                }
            }
        }
        s
    }
}

fn boxes_apart(a: &Object, b: &Object) -> bool {
    let dx = (a.cx - b.cx).abs() - a.size - b.size;
    let dy = (a.cy - b.cy).abs() - a.size - b.size;
    dx >= GAP - 1e-6 || dy >= GAP - 1e-6
}

fn no_overlap(objs: &[Object]) -> bool {
    objs.iter().enumerate().all(|(i, a)| objs[i + 1..].iter().all(|b| boxes_apart(a, b)))
}

fn relation_ok(spec: &PromptSpec, objs: &[Object]) -> bool {
    let Some(rel) = spec.relation else { return true };
    objs.iter().filter(|o| o.group == 0).all(|a| objs.iter().filter(|o| o.group == 1).all(|b| rel.holds((a.cx, a.cy), (b.cx, b.cy), RELATION_MARGIN - 1e-6)))
}

/// Lay out the objects of `spec` at random: sizes from [`SIZES`], uniform positions,
/// rejection sampling until [`Scene::is_valid`]; after [`MAX_TRIES`] failures a fixed
/// column/grid layout with small objects that is valid by construction.
/// `spec` is assumed valid ([`PromptSpec::validate`]); for a spec with more than four
/// objects the fallback may overlap.
pub fn sample_scene(spec: &PromptSpec, rng: &mut impl Rng) -> Scene {
    for _ in 0..MAX_TRIES {
        let objects = random_layout(spec, rng);
        let scene = Scene { spec: spec.clone(), objects };
        if scene.is_valid() {
            return scene;
        }
    }
    Scene { spec: spec.clone(), objects: fallback_layout(spec) }
}

fn random_layout(spec: &PromptSpec, rng: &mut impl Rng) -> Vec<Object> {
    // For a relation, the axis is cut at t: group 0 on one side, group 1 on the other,
    // the cut leaning towards giving the bigger group more room.
    let cut = spec.relation.map(|rel| {
        let (na, nb) = (spec.groups[0].count as f32, spec.groups[1].count as f32);
        let share = na / (na + nb);
        let t = (share + rng.gen_range(-0.08..0.08)).clamp(0.3, 0.7);
        (rel, t)
    });
    let mut objects = Vec::with_capacity(spec.n_objects());
    for (gi, g) in spec.groups.iter().enumerate() {
        for _ in 0..g.count {
            let size = SIZES[rng.gen_range(0..SIZES.len())];
            let (lo, hi) = (size + EDGE, 1.0 - size - EDGE);
            let mut xr = (lo, hi);
            let mut yr = (lo, hi);
            if let Some((rel, t)) = cut {
                // "first" = the side where group 0 goes (left for LeftOf, top for Above).
                let first_low = matches!(rel, Relation::LeftOf | Relation::Above);
                let boundary = if first_low { t } else { 1.0 - t };
                let half = RELATION_MARGIN * 0.5;
                let low_side = (gi == 0) == first_low;
                let r = if low_side { (lo, hi.min(boundary - half)) } else { (lo.max(boundary + half), hi) };
                if rel.is_horizontal() {
                    xr = r;
                } else {
                    yr = r;
                }
            }
            let pick = |rng: &mut dyn rand::RngCore, (a, b): (f32, f32)| if b > a { rng.gen_range(a..b) } else { a };
            let cx = pick(rng, xr);
            let cy = pick(rng, yr);
            objects.push(Object { color: g.color, shape: g.shape, cx, cy, size, group: gi });
        }
    }
    objects
}

fn fallback_layout(spec: &PromptSpec) -> Vec<Object> {
    let size = SIZES[0];
    let mut objects = Vec::new();
    match spec.relation {
        None => {
            let g = &spec.groups[0];
            const GRID: [(f32, f32); 4] = [(0.25, 0.25), (0.75, 0.25), (0.25, 0.75), (0.75, 0.75)];
            for i in 0..g.count {
                let (cx, cy) = GRID[i % 4];
                objects.push(Object { color: g.color, shape: g.shape, cx, cy, size, group: 0 });
            }
        }
        Some(rel) => {
            // Group 0 in one column (or row) at 0.25, group 1 at 0.75, evenly spaced.
            let first_pos = if matches!(rel, Relation::LeftOf | Relation::Above) { 0.25 } else { 0.75 };
            for (gi, g) in spec.groups.iter().enumerate() {
                let main = if gi == 0 { first_pos } else { 1.0 - first_pos };
                for i in 0..g.count {
                    let other = (i as f32 + 0.5) / g.count as f32;
                    let (cx, cy) = if rel.is_horizontal() { (main, other) } else { (other, main) };
                    objects.push(Object { color: g.color, shape: g.shape, cx, cy, size, group: gi });
                }
            }
        }
    }
    objects
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::world::split::sample_spec;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn sampled_scenes_are_valid_and_use_both_sizes() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut sizes = std::collections::HashSet::new();
        let mut fallbacks = 0;
        for _ in 0..500 {
            let spec = sample_spec(&mut rng);
            let scene = sample_scene(&spec, &mut rng);
            assert!(scene.is_valid(), "invalid layout for '{}': {:?}", spec.text(), scene.objects);
            fallbacks += (scene.objects == fallback_layout(&spec)) as usize;
            sizes.extend(scene.objects.iter().map(|o| o.size.to_bits()));
        }
        assert!(sizes.len() >= 2);
        // Rejection sampling almost always succeeds, so layouts stay varied.
        assert!(fallbacks <= 5, "{fallbacks} of 500 layouts used the fixed fallback");
    }

    #[test]
    fn fallback_layouts_are_valid() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        for _ in 0..300 {
            let spec = sample_spec(&mut rng);
            let scene = Scene { spec: spec.clone(), objects: fallback_layout(&spec) };
            assert!(scene.is_valid(), "invalid fallback for '{}'", spec.text());
        }
    }

    #[test]
    fn swapped_relation_violates_every_pair() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut n = 0;
        while n < 100 {
            let spec = sample_spec(&mut rng);
            let Some(rel) = spec.relation else { continue };
            let s = sample_scene(&spec, &mut rng).with_relation_swapped();
            for a in s.objects.iter().filter(|o| o.group == 0) {
                for b in s.objects.iter().filter(|o| o.group == 1) {
                    assert!(!rel.holds((a.cx, a.cy), (b.cx, b.cy), 0.0));
                }
            }
            n += 1;
        }
    }
}
