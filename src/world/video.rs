//! ShapeWorld-Video: short clips of ShapeWorld objects that move in straight lines.
//!
//! # Grammar
//! A video prompt names one or two groups of objects (the image grammar's
//! `number colour shape`, at most [`MAX_VIDEO_OBJECTS`] objects in total) and gives each
//! group a motion (lower case, whitespace separated):
//!
//! ```text
//! prompt    := clause | clause "while" clause
//! clause    := group motion
//! group     := number colour shape                      (as in grammar.rs)
//! motion    := "moving" direction [speed] | "stays" "still" | "stay" "still"
//! direction := "left" | "right" | "up" | "down"
//! speed     := "slowly" | "fast"                        (omitted = slowly)
//! ```
//!
//! "stays" goes with one object, "stay" with more. The canonical text
//! ([`VideoSpec::text`]) always writes the speed: "a blue square moving up slowly while
//! a green triangle stays still", "two yellow squares moving left fast". There is no
//! spatial relation between the groups (their positions change over time), and, as
//! in the image grammar, two groups never share a colour–shape pair.
//!
//! # Motion
//! Every object of a group moves with the group's constant velocity, in units of the
//! image side per frame: [`SLOW`] = 0.02 and [`FAST`] = 0.05, i.e. 0.64 and 1.6 px per
//! frame at 32×32, or 4.5 and 11.2 px over the default 8 frames (clearly visible, and a
//! 2.5× ratio the detector separates easily). Clips have 2..=[`MAX_FRAMES`] frames: at
//! ten frames a fast object travels 45 % of the frame, the most for which a layout that
//! keeps three objects inside the frame and apart in every frame is guaranteed.
//!
//! # The split rule
//! A spec is **`Ood`** if any of its groups uses
//! * a held-out motion–shape combination ([`HELD_OUT_MOTIONS`]: circle moving left,
//!   square moving down, triangle moving up, diamond moving right, at either speed), or
//! * a held-out colour–shape pair of the image rule ([`super::split::HELD_OUT_PAIRS`]).
//!
//! Every direction, speed, colour and shape still occurs in training: each shape keeps
//! three directions and "stays still", each direction keeps three shapes.
//! Otherwise the spec is **`Eval`** if the FNV-1a 64-bit hash of its canonical text is
//! ≡ 0 mod 10 (a stable ~10 % bucket, as in [`super::split`]), and **`Train`** if not.

use super::grammar::{vocab, Color, Group, PromptSpec, Shape};
use super::render::{render, DEFAULT_RES};
use super::scene::{Object, Scene, EDGE, SIZES};
use super::split::{fnv1a64, has_held_out_pair, Split};
use crate::image::Image;
use anyhow::{bail, Result};
use rand::Rng;

/// Default number of frames per clip.
pub const DEFAULT_FRAMES: usize = 8;
/// Most frames per clip (see the module docs: the guaranteed-valid layout needs it).
pub const MAX_FRAMES: usize = 10;
/// Smallest image side a clip may be rendered at.
pub const MIN_RES: usize = 8;
/// Most objects a video prompt may ask for.
pub const MAX_VIDEO_OBJECTS: usize = 3;
/// Slow speed: displacement per frame as a fraction of the image side.
pub const SLOW: f32 = 0.02;
/// Fast speed: displacement per frame as a fraction of the image side.
pub const FAST: f32 = 0.05;
/// The longest prompt in tokens: "two red circles moving left slowly while a blue square moving up fast" (13).
pub const MAX_VIDEO_TOKENS: usize = 13;

/// Direction of motion in image coordinates (y down, so `Up` decreases y).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Left,
    Right,
    Up,
    Down,
}

impl Direction {
    /// Every direction, in vocabulary order.
    pub const ALL: &'static [Direction] = &[Direction::Left, Direction::Right, Direction::Up, Direction::Down];

    /// The English word.
    pub fn name(self) -> &'static str {
        match self {
            Direction::Left => "left",
            Direction::Right => "right",
            Direction::Up => "up",
            Direction::Down => "down",
        }
    }

    /// Inverse of [`Direction::name`].
    pub fn from_word(word: &str) -> Option<Direction> {
        Direction::ALL.iter().copied().find(|d| d.name() == word)
    }

    /// Unit vector (x right, y down).
    pub fn unit(self) -> (f32, f32) {
        match self {
            Direction::Left => (-1.0, 0.0),
            Direction::Right => (1.0, 0.0),
            Direction::Up => (0.0, -1.0),
            Direction::Down => (0.0, 1.0),
        }
    }

    /// True for left/right.
    pub fn is_horizontal(self) -> bool {
        matches!(self, Direction::Left | Direction::Right)
    }
}

/// Speed of a moving group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Speed {
    Slow,
    Fast,
}

impl Speed {
    /// Every speed.
    pub const ALL: &'static [Speed] = &[Speed::Slow, Speed::Fast];

    /// The canonical word ("slowly", "fast").
    pub fn name(self) -> &'static str {
        match self {
            Speed::Slow => "slowly",
            Speed::Fast => "fast",
        }
    }

    /// Displacement per frame as a fraction of the image side ([`SLOW`], [`FAST`]).
    pub fn per_frame(self) -> f32 {
        match self {
            Speed::Slow => SLOW,
            Speed::Fast => FAST,
        }
    }
}

/// What a group does over the clip.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Motion {
    Still,
    Moving(Direction, Speed),
}

impl Motion {
    /// Every motion: still, then each direction at each speed.
    pub fn all() -> Vec<Motion> {
        let mut v = vec![Motion::Still];
        for &d in Direction::ALL {
            v.extend(Speed::ALL.iter().map(|&s| Motion::Moving(d, s)));
        }
        v
    }

    /// Velocity (x, y) in image sides per frame.
    pub fn velocity(self) -> (f32, f32) {
        match self {
            Motion::Still => (0.0, 0.0),
            Motion::Moving(d, s) => {
                let (ux, uy) = d.unit();
                (ux * s.per_frame(), uy * s.per_frame())
            }
        }
    }

    /// Prompted speed in image sides per frame (0 when still).
    pub fn speed(self) -> f32 {
        match self {
            Motion::Still => 0.0,
            Motion::Moving(_, s) => s.per_frame(),
        }
    }

    /// The direction, if moving.
    pub fn direction(self) -> Option<Direction> {
        match self {
            Motion::Still => None,
            Motion::Moving(d, _) => Some(d),
        }
    }

    /// Canonical phrase for a group of `count` objects.
    fn text(self, count: usize) -> String {
        match self {
            Motion::Still if count == 1 => "stays still".into(),
            Motion::Still => "stay still".into(),
            Motion::Moving(d, s) => format!("moving {} {}", d.name(), s.name()),
        }
    }
}

/// A group of objects (count, colour, shape as in the image grammar) and its motion.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct VideoGroup {
    pub group: Group,
    pub motion: Motion,
}

/// What a video prompt says: one or two groups, each with a motion. Total objects 1..=3.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct VideoSpec {
    pub groups: Vec<VideoGroup>,
}

impl VideoSpec {
    /// One group.
    pub fn single(count: usize, color: Color, shape: Shape, motion: Motion) -> Self {
        Self { groups: vec![VideoGroup { group: Group { count, color, shape }, motion }] }
    }

    /// Canonical English (see the module docs).
    pub fn text(&self) -> String {
        let clauses: Vec<String> = self.groups.iter().map(|g| format!("{} {}", PromptSpec::single(g.group.count, g.group.color, g.group.shape).text(), g.motion.text(g.group.count))).collect();
        clauses.join(" while ")
    }

    /// Total number of objects.
    pub fn n_objects(&self) -> usize {
        self.groups.iter().map(|g| g.group.count).sum()
    }

    /// What every single frame should show: the same groups, without motion and
    /// without a relation. Note that a two-group result lies outside the image grammar
    /// ([`PromptSpec::validate`] wants a relation there, and [`PromptSpec::text`] only
    /// names the first group); it is meant for scoring frames with
    /// [`crate::reward::compositional::Compositional`], which then skips the position term.
    pub fn image_spec(&self) -> PromptSpec {
        PromptSpec { groups: self.groups.iter().map(|g| g.group.clone()).collect(), relation: None }
    }

    /// Check the structural rules in the module docs.
    pub fn validate(&self) -> Result<()> {
        if self.groups.is_empty() || self.groups.len() > 2 {
            bail!("video spec: {} groups, need 1 or 2", self.groups.len());
        }
        for (i, g) in self.groups.iter().enumerate() {
            if g.group.count == 0 || g.group.count > MAX_VIDEO_OBJECTS {
                bail!("video spec: groups[{i}].count = {} is outside 1..={MAX_VIDEO_OBJECTS}", g.group.count);
            }
        }
        let n = self.n_objects();
        if n > MAX_VIDEO_OBJECTS {
            bail!("video spec '{}': {n} objects in total, at most {MAX_VIDEO_OBJECTS} allowed", self.text());
        }
        if let [a, b] = &self.groups[..] {
            if (a.group.color, a.group.shape) == (b.group.color, b.group.shape) {
                bail!("video spec '{}': both groups are {} {}s, which is ambiguous", self.text(), a.group.color.name(), a.group.shape.name());
            }
        }
        Ok(())
    }

    /// Parse a prompt of the grammar in the module docs (case-insensitive). Errors name
    /// the offending word and what was expected there.
    pub fn parse(text: &str) -> Result<VideoSpec> {
        let lower = text.to_lowercase();
        let words: Vec<&str> = lower.split_whitespace().collect();
        if words.is_empty() {
            bail!("video prompt '{text}': empty");
        }
        let mut pos = 0;
        let mut groups = vec![parse_clause(text, &words, &mut pos)?];
        if let Some(&w) = words.get(pos) {
            if w != "while" {
                bail!("video prompt '{text}': unexpected word '{w}' (expected a speed (slowly, fast), 'while' or the end)");
            }
            pos += 1;
            groups.push(parse_clause(text, &words, &mut pos)?);
            if let Some(&w) = words.get(pos) {
                bail!("video prompt '{text}': unexpected word '{w}' after the second clause (expected a speed (slowly, fast) or the end)");
            }
        }
        let spec = VideoSpec { groups };
        spec.validate().map_err(|e| anyhow::anyhow!("video prompt '{text}': {e}"))?;
        Ok(spec)
    }
}

impl std::fmt::Display for VideoSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text())
    }
}

impl std::str::FromStr for VideoSpec {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        VideoSpec::parse(s)
    }
}

fn parse_clause(text: &str, words: &[&str], pos: &mut usize) -> Result<VideoGroup> {
    // The group is exactly the image grammar's three words; reuse its parser and messages.
    let Some(g) = words.get(*pos..*pos + 3) else {
        bail!("video prompt '{text}': ends early, expected a group (number colour shape) and a motion");
    };
    let group = match PromptSpec::parse(&g.join(" ")) {
        Ok(p) if p.groups.len() == 1 => p.groups[0].clone(),
        Ok(_) => bail!("video prompt '{text}': '{}' is not a group", g.join(" ")),
        Err(e) => bail!("video prompt '{text}': {e}"),
    };
    *pos += 3;
    let expected = "a motion ('moving <direction> [slowly|fast]' or 'stays still')";
    let Some(&w) = words.get(*pos) else {
        bail!("video prompt '{text}': ends early, expected {expected} after '{}'", g.join(" "));
    };
    *pos += 1;
    let motion = match w {
        "moving" => {
            let Some(&d) = words.get(*pos) else {
                bail!("video prompt '{text}': ends early, expected a direction (left, right, up, down) after 'moving'");
            };
            *pos += 1;
            let Some(dir) = Direction::from_word(d) else {
                bail!("video prompt '{text}': unknown direction word '{d}' (expected one of left, right, up, down)");
            };
            // An omitted speed means slowly; any other word is left to the caller.
            let speed = match words.get(*pos).copied() {
                Some("slowly") => Some(Speed::Slow),
                Some("fast") => Some(Speed::Fast),
                _ => None,
            };
            if speed.is_some() {
                *pos += 1;
            }
            Motion::Moving(dir, speed.unwrap_or(Speed::Slow))
        }
        "stays" | "stay" => {
            let want = if group.count == 1 { "stays" } else { "stay" };
            if w != want {
                bail!("video prompt '{text}': '{w}' does not agree with count {}; expected '{want}'", group.count);
            }
            match words.get(*pos) {
                Some(&"still") => *pos += 1,
                Some(&o) => bail!("video prompt '{text}': expected 'still' after '{w}', found '{o}'"),
                None => bail!("video prompt '{text}': ends early, expected 'still' after '{w}'"),
            }
            Motion::Still
        }
        _ => bail!("video prompt '{text}': expected {expected}, found '{w}'"),
    };
    Ok(VideoGroup { group, motion })
}

/// The video vocabulary: the image [`vocab`] (same ids) followed by the motion words.
pub fn video_vocab() -> Vec<&'static str> {
    let mut v = vocab();
    // "left" and "right" are already there (relations); appending keeps image ids stable.
    v.extend(["moving", "up", "down", "slowly", "fast", "stays", "stay", "still", "while"]);
    v
}

/// Token ids of `text` in [`video_vocab`] (lower-cased, split on whitespace),
/// right-padded with 0 to `max_len`; errors on an unknown word or a text longer than
/// `max_len`. Like [`super::grammar::tokenize`], only the vocabulary is checked.
pub fn tokenize_video(text: &str, max_len: usize) -> Result<Vec<u32>> {
    super::grammar::tokenize_in(text, max_len, &video_vocab(), "ShapeWorld-Video")
}

// ---------------------------------------------------------------------------------
// Splits

/// Shape–direction combinations never shown in train or eval (at either speed).
pub const HELD_OUT_MOTIONS: &[(Shape, Direction)] = &[(Shape::Circle, Direction::Left), (Shape::Square, Direction::Down), (Shape::Triangle, Direction::Up), (Shape::Diamond, Direction::Right)];

/// Does any group move in a held-out shape–direction combination?
pub fn has_held_out_motion(spec: &VideoSpec) -> bool {
    spec.groups.iter().any(|g| g.motion.direction().is_some_and(|d| HELD_OUT_MOTIONS.contains(&(g.group.shape, d))))
}

/// The split a video spec belongs to (see the module docs for the rule).
pub fn video_split_of(spec: &VideoSpec) -> Split {
    if has_held_out_motion(spec) || has_held_out_pair(&spec.image_spec()) {
        Split::Ood
    } else if fnv1a64(spec.text().as_bytes()).is_multiple_of(10) {
        Split::Eval
    } else {
        Split::Train
    }
}

/// Count pairs for two-group prompts: all with a total ≤ [`MAX_VIDEO_OBJECTS`].
const PAIR_COUNTS: [(usize, usize); 3] = [(1, 1), (1, 2), (2, 1)];

fn sample_motion(rng: &mut impl Rng) -> Motion {
    // Still as often as each direction (1/5); speeds uniform.
    let k = rng.gen_range(0..=Direction::ALL.len());
    if k == 0 {
        Motion::Still
    } else {
        Motion::Moving(Direction::ALL[k - 1], Speed::ALL[rng.gen_range(0..Speed::ALL.len())])
    }
}

fn sample_group(rng: &mut impl Rng, count: usize) -> VideoGroup {
    let color = Color::ALL[rng.gen_range(0..Color::ALL.len())];
    let shape = Shape::ALL[rng.gen_range(0..Shape::ALL.len())];
    VideoGroup { group: Group { count, color, shape }, motion: sample_motion(rng) }
}

/// Draw one valid spec from the whole video prompt space (any split): half one-group
/// prompts (count 1–3), half two groups (counts (1,1), (1,2) or (2,1)); colours, shapes
/// and directions uniform, "still" as likely as each direction.
pub fn sample_video_spec(rng: &mut impl Rng) -> VideoSpec {
    if rng.gen_bool(0.5) {
        let count = rng.gen_range(1..=MAX_VIDEO_OBJECTS);
        VideoSpec { groups: vec![sample_group(rng, count)] }
    } else {
        let (na, nb) = PAIR_COUNTS[rng.gen_range(0..PAIR_COUNTS.len())];
        let a = sample_group(rng, na);
        // Redraw until the second group differs in colour or shape (validity rule).
        let b = loop {
            let b = sample_group(rng, nb);
            if (b.group.color, b.group.shape) != (a.group.color, a.group.shape) {
                break b;
            }
        };
        VideoSpec { groups: vec![a, b] }
    }
}

/// `n` video specs of `split`, drawn (with replacement) by rejection from
/// [`sample_video_spec`] with a ChaCha8 stream seeded by `seed`: deterministic.
pub fn video_prompts(split: Split, n: usize, seed: u64) -> Vec<VideoSpec> {
    super::split::draw_split(split, n, seed, sample_video_spec, video_split_of)
}

// ---------------------------------------------------------------------------------
// Scenes and rendering

/// One moving object: start position (frame 0), size and velocity, in image sides
/// (x right, y down). Its centre at frame t is (cx + vx·t, cy + vy·t).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VideoObject {
    pub color: Color,
    pub shape: Shape,
    pub cx: f32,
    pub cy: f32,
    /// Half-extent, as in [`Object::size`].
    pub size: f32,
    pub vx: f32,
    pub vy: f32,
    /// Index into `spec.groups`.
    pub group: usize,
}

impl VideoObject {
    /// The object as placed at frame `t`.
    pub fn at(&self, t: usize) -> Object {
        let t = t as f32;
        Object { color: self.color, shape: self.shape, cx: self.cx + self.vx * t, cy: self.cy + self.vy * t, size: self.size, group: self.group }
    }
}

/// A video prompt and the trajectories of its objects (group 0's objects first).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VideoScene {
    pub spec: VideoSpec,
    pub objects: Vec<VideoObject>,
}

impl VideoScene {
    /// The still scene at frame `t` (its spec is [`VideoSpec::image_spec`]).
    pub fn frame(&self, t: usize) -> Scene {
        Scene { spec: self.spec.image_spec(), objects: self.objects.iter().map(|o| o.at(t)).collect() }
    }

    /// Does every frame of a `frames`-long clip obey the image layout rules
    /// ([`Scene::is_valid`]: inside the image, boxes apart by the gap, objects matching
    /// the groups), and does every object move with its group's velocity?
    pub fn is_valid(&self, frames: usize) -> bool {
        let motion_ok = self.objects.iter().all(|o| {
            self.spec.groups.get(o.group).is_some_and(|g| {
                let (vx, vy) = g.motion.velocity();
                (o.vx - vx).abs() < 1e-6 && (o.vy - vy).abs() < 1e-6
            })
        });
        motion_ok && (0..frames).all(|t| self.frame(t).is_valid())
    }
}

/// A rendered clip.
#[derive(Clone, Debug, PartialEq)]
pub struct Clip {
    /// One image per frame.
    pub frames: Vec<Image>,
    /// `masks[t][k]`: coverage (h·w, row-major, values in 0..=1) of object k (order of
    /// `scene.objects`) in frame t.
    pub masks: Vec<Vec<Vec<f32>>>,
}

/// Check clip dimensions: 2..=[`MAX_FRAMES`] frames and a side of at least [`MIN_RES`].
pub fn check_clip_dims(frames: usize, res: usize) -> Result<()> {
    if !(2..=MAX_FRAMES).contains(&frames) {
        bail!("video: frames = {frames} is outside 2..={MAX_FRAMES}");
    }
    if res < MIN_RES {
        bail!("video: res = {res} is below the minimum {MIN_RES}");
    }
    Ok(())
}

const MAX_TRIES: usize = 1000;

/// Lay out `spec` for a `frames`-long clip: sizes from [`SIZES`], start positions
/// uniform among those that keep the whole trajectory inside the image, rejection
/// sampling until [`VideoScene::is_valid`]; after 1000 failures a fixed lane
/// layout with small objects that is valid by construction. Errors on an invalid spec
/// or frames outside 2..=[`MAX_FRAMES`].
pub fn sample_video_scene(spec: &VideoSpec, frames: usize, rng: &mut impl Rng) -> Result<VideoScene> {
    spec.validate()?;
    check_clip_dims(frames, MIN_RES)?;
    for _ in 0..MAX_TRIES {
        if let Some(objects) = random_layout(spec, frames, rng) {
            let scene = VideoScene { spec: spec.clone(), objects };
            if scene.is_valid(frames) {
                return Ok(scene);
            }
        }
    }
    Ok(VideoScene { spec: spec.clone(), objects: fallback_layout(spec) })
}

fn random_layout(spec: &VideoSpec, frames: usize, rng: &mut impl Rng) -> Option<Vec<VideoObject>> {
    let steps = (frames - 1) as f32;
    let mut objects = Vec::with_capacity(spec.n_objects());
    for (gi, g) in spec.groups.iter().enumerate() {
        let (vx, vy) = g.motion.velocity();
        for _ in 0..g.group.count {
            let size = SIZES[rng.gen_range(0..SIZES.len())];
            // Start range that keeps [start, start + v·steps] ± size inside [EDGE, 1 − EDGE].
            let range = |v: f32| (EDGE + size - (v * steps).min(0.0), 1.0 - EDGE - size - (v * steps).max(0.0));
            let pick = |rng: &mut dyn rand::RngCore, (a, b): (f32, f32)| -> Option<f32> {
                if b > a {
                    Some(rng.gen_range(a..b))
                } else if b == a {
                    Some(a)
                } else {
                    None
                }
            };
            let cx = pick(rng, range(vx))?;
            let cy = pick(rng, range(vy))?;
            objects.push(VideoObject { color: g.group.color, shape: g.group.shape, cx, cy, size, vx, vy, group: gi });
        }
    }
    Some(objects)
}

/// Lanes: up to three objects moving along one axis (or still) in parallel lanes
/// across the other axis, each confined to `[EDGE, LANE_END]` along its motion axis;
/// at most one object moving along the other axis in a side lane beyond LANE_END.
/// With small objects and ≤ [`MAX_FRAMES`] frames every trajectory fits
/// (EDGE + 2·0.09 + 0.05·9 = 0.65) and the lanes never meet.
fn fallback_layout(spec: &VideoSpec) -> Vec<VideoObject> {
    const LANE_END: f32 = 0.65;
    const SIDE_LANE: f32 = 0.81;
    let size = SIZES[0];
    // Start coordinate along the motion axis for a signed velocity component.
    let start = |v: f32| if v >= 0.0 { EDGE + size } else { LANE_END - size };
    let vertical = |m: Motion| m.direction().is_some_and(|d| !d.is_horizontal());
    let n_vertical: usize = spec.groups.iter().filter(|g| vertical(g.motion)).map(|g| g.group.count).sum();
    // Main lanes hold the objects moving along x (or still) unless two or more move along y.
    let transpose = n_vertical >= 2;
    let mut lane = 0usize;
    let mut objects = Vec::new();
    for (gi, g) in spec.groups.iter().enumerate() {
        let (vx, vy) = g.motion.velocity();
        for _ in 0..g.group.count {
            let in_main = vertical(g.motion) == transpose;
            let (cx, cy) = if in_main {
                let across = (lane as f32 + 0.5) / 3.0;
                lane += 1;
                if transpose {
                    (across, start(vy))
                } else {
                    (start(vx), across)
                }
            } else if transpose {
                (start(vx), SIDE_LANE)
            } else {
                (SIDE_LANE, start(vy))
            };
            objects.push(VideoObject { color: g.group.color, shape: g.group.shape, cx, cy, size, vx, vy, group: gi });
        }
    }
    objects
}

/// Render `frames` frames of `scene` at `res` × `res` with the image rasterizer
/// ([`render`]), one [`Scene`] per frame. Errors on frames outside 2..=[`MAX_FRAMES`]
/// or res < [`MIN_RES`].
pub fn render_clip(scene: &VideoScene, frames: usize, res: usize) -> Result<Clip> {
    check_clip_dims(frames, res)?;
    let mut clip = Clip { frames: Vec::with_capacity(frames), masks: Vec::with_capacity(frames) };
    for t in 0..frames {
        let r = render(&scene.frame(t), res);
        clip.frames.push(r.image);
        clip.masks.push(r.masks);
    }
    Ok(clip)
}

/// [`render_clip`] at the defaults ([`DEFAULT_FRAMES`] frames of [`DEFAULT_RES`] px).
pub fn render_default_clip(scene: &VideoScene) -> Result<Clip> {
    render_clip(scene, DEFAULT_FRAMES, DEFAULT_RES)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use std::collections::HashSet;

    fn all_structures() -> Vec<VideoSpec> {
        // Every count pattern × every motion combination (colours/shapes fixed: only
        // geometry matters for layouts).
        let (a, b) = ((Color::Red, Shape::Circle), (Color::Blue, Shape::Square));
        let mut out = Vec::new();
        for m in Motion::all() {
            for n in 1..=MAX_VIDEO_OBJECTS {
                out.push(VideoSpec::single(n, a.0, a.1, m));
            }
            for m2 in Motion::all() {
                for (na, nb) in PAIR_COUNTS {
                    out.push(VideoSpec {
                        groups: vec![VideoGroup { group: Group { count: na, color: a.0, shape: a.1 }, motion: m }, VideoGroup { group: Group { count: nb, color: b.0, shape: b.1 }, motion: m2 }],
                    });
                }
            }
        }
        out
    }

    #[test]
    fn text_examples() {
        let s = VideoSpec::parse("a red circle moving right").unwrap();
        assert_eq!(s, VideoSpec::single(1, Color::Red, Shape::Circle, Motion::Moving(Direction::Right, Speed::Slow)));
        assert_eq!(s.text(), "a red circle moving right slowly");
        let s = VideoSpec::parse("a red circle moving right fast").unwrap();
        assert_eq!(s.groups[0].motion, Motion::Moving(Direction::Right, Speed::Fast));
        let t = "a blue square moving up slowly while a green triangle stays still";
        let s = VideoSpec::parse(t).unwrap();
        assert_eq!(s.text(), t);
        assert_eq!(s.groups[1].motion, Motion::Still);
        assert_eq!(s.n_objects(), 2);
        let s = VideoSpec::parse("Two Yellow Squares moving LEFT").unwrap();
        assert_eq!(s.text(), "two yellow squares moving left slowly");
        assert_eq!(VideoSpec::parse("three cyan diamonds stay still").unwrap().text(), "three cyan diamonds stay still");
        let s = VideoSpec::parse("a red circle moving left while two blue squares moving down fast").unwrap();
        let im = s.image_spec();
        assert_eq!(im.groups.len(), 2);
        assert_eq!(im.relation, None);
        assert_eq!(im.n_objects(), 3);
    }

    #[test]
    fn parse_text_roundtrip() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        for _ in 0..3000 {
            let spec = sample_video_spec(&mut rng);
            spec.validate().unwrap();
            let text = spec.text();
            assert_eq!(VideoSpec::parse(&text).unwrap(), spec, "{text}");
            assert_eq!(text.parse::<VideoSpec>().unwrap().to_string(), text);
            let toks = tokenize_video(&text, MAX_VIDEO_TOKENS).unwrap();
            assert_eq!(toks.len(), MAX_VIDEO_TOKENS);
            assert!(toks[0] != 0);
        }
    }

    #[test]
    fn parse_errors_name_the_word() {
        let err = |t: &str| VideoSpec::parse(t).unwrap_err().to_string();
        let e = err("a red circle moving sideways");
        assert!(e.contains("'sideways'") && e.contains("direction"), "{e}");
        let e = err("a red circle moving right quickly");
        assert!(e.contains("'quickly'") && e.contains("speed"), "{e}");
        let e = err("a red circle jumping left");
        assert!(e.contains("'jumping'") && e.contains("motion"), "{e}");
        let e = err("a pink circle moving left");
        assert!(e.contains("'pink'") && e.contains("colour"), "{e}");
        let e = err("a red circle");
        assert!(e.contains("ends early") && e.contains("motion"), "{e}");
        let e = err("a red circle moving");
        assert!(e.contains("ends early") && e.contains("direction"), "{e}");
        let e = err("a red circle stay still");
        assert!(e.contains("'stay'") && e.contains("'stays'"), "{e}");
        let e = err("two red circles stays still");
        assert!(e.contains("'stays'") && e.contains("'stay'"), "{e}");
        let e = err("a red circle stays put");
        assert!(e.contains("'put'") && e.contains("'still'"), "{e}");
        let e = err("a red circle moving left and a blue square moving up");
        assert!(e.contains("'and'") && e.contains("'while'"), "{e}");
        let e = err("a red circle moving left while a blue square moving up fast now");
        assert!(e.contains("'now'"), "{e}");
        let e = err("four red circles moving left");
        assert!(e.contains("4") && e.contains("1..=3"), "{e}");
        let e = err("two red circles moving left while two blue squares stay still");
        assert!(e.contains("4 objects"), "{e}");
        let e = err("a red circle moving left while a red circle moving right");
        assert!(e.contains("ambiguous"), "{e}");
        let e = err("a red circle moving left while");
        assert!(e.contains("ends early"), "{e}");
        assert!(err("  ").contains("empty"));
    }

    #[test]
    fn vocab_and_tokenize() {
        let v = video_vocab();
        let img = vocab();
        assert_eq!(v[..img.len()], img[..], "image token ids must stay valid");
        let set: HashSet<_> = v.iter().collect();
        assert_eq!(set.len(), v.len(), "duplicate vocabulary word");
        let t = tokenize_video("a red circle moving up fast", 8).unwrap();
        assert_eq!(v[t[3] as usize], "moving");
        assert_eq!(v[t[5] as usize], "fast");
        assert_eq!(t[6..], [0, 0]);
        let e = tokenize_video("a red circle moving sideways", 8).unwrap_err().to_string();
        assert!(e.contains("'sideways'"), "{e}");
        let longest = "two red circles moving left slowly while a blue square moving up fast";
        assert_eq!(longest.split_whitespace().count(), MAX_VIDEO_TOKENS);
        assert!(tokenize_video(longest, MAX_VIDEO_TOKENS - 1).unwrap_err().to_string().contains("max_len"));
        // Every word the parser accepts is in the vocabulary.
        for t in ["one red circle moving down", "two red circles stay still while a blue square stays still"] {
            VideoSpec::parse(t).unwrap();
            tokenize_video(t, MAX_VIDEO_TOKENS).unwrap();
        }
    }

    #[test]
    fn split_rule_holds_out_and_covers() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let all: Vec<_> = (0..5000).map(|_| sample_video_spec(&mut rng)).collect();
        let (mut colors, mut shapes, mut dirs, mut speeds, mut counts) = (HashSet::new(), HashSet::new(), HashSet::new(), HashSet::new(), HashSet::new());
        let mut still = false;
        let mut n = [0usize; 3];
        for s in &all {
            let split = video_split_of(s);
            n[split as usize] += 1;
            let held = has_held_out_motion(s) || has_held_out_pair(&s.image_spec());
            assert_eq!(split == Split::Ood, held, "{}", s.text());
            if split != Split::Train {
                continue;
            }
            for g in &s.groups {
                assert!(!held_out_group(g), "held-out combination in train: {}", s.text());
                colors.insert(g.group.color);
                shapes.insert(g.group.shape);
                counts.insert(g.group.count);
                match g.motion {
                    Motion::Still => still = true,
                    Motion::Moving(d, sp) => {
                        dirs.insert(d);
                        speeds.insert(sp);
                    }
                }
            }
        }
        assert_eq!(colors.len(), Color::ALL.len());
        assert_eq!(shapes.len(), Shape::ALL.len());
        assert_eq!(dirs.len(), Direction::ALL.len());
        assert_eq!(speeds.len(), Speed::ALL.len());
        assert_eq!(counts, (1..=MAX_VIDEO_OBJECTS).collect::<HashSet<_>>());
        assert!(still);
        // Every direction occurs with three shapes in train.
        for &d in Direction::ALL {
            let with: HashSet<_> = all.iter().filter(|s| video_split_of(s) == Split::Train).flat_map(|s| s.groups.iter().filter(|g| g.motion.direction() == Some(d)).map(|g| g.group.shape)).collect();
            assert_eq!(with.len(), 3, "{d:?}: {with:?}");
        }
        // Each split holds a healthy share; eval ≈ 10 % of the non-OOD mass.
        let frac = n[1] as f64 / (n[0] + n[1]) as f64;
        eprintln!("train {} eval {} ood {} (eval fraction of non-ood {frac:.3})", n[0], n[1], n[2]);
        assert!((0.05..0.15).contains(&frac), "eval fraction {frac}");
        assert!(n[2] > 500 && n[0] > 1500);
    }

    fn held_out_group(g: &VideoGroup) -> bool {
        super::super::split::HELD_OUT_PAIRS.contains(&(g.group.color, g.group.shape)) || g.motion.direction().is_some_and(|d| HELD_OUT_MOTIONS.contains(&(g.group.shape, d)))
    }

    #[test]
    fn prompts_deterministic_and_disjoint() {
        assert_eq!(video_prompts(Split::Train, 50, 42), video_prompts(Split::Train, 50, 42));
        assert_ne!(video_prompts(Split::Train, 50, 42), video_prompts(Split::Train, 50, 43));
        let train: HashSet<_> = video_prompts(Split::Train, 2000, 1).into_iter().collect();
        let eval: HashSet<_> = video_prompts(Split::Eval, 300, 2).into_iter().collect();
        assert!(train.is_disjoint(&eval));
        let ood = video_prompts(Split::Ood, 300, 3);
        assert!(ood.iter().all(|s| video_split_of(s) == Split::Ood));
        assert!(ood.iter().any(|s| !has_held_out_pair(&s.image_spec())), "motion hold-out never drawn alone");
        assert!(train.iter().chain(&eval).all(|s| !has_held_out_motion(s) && s.validate().is_ok()));
    }

    #[test]
    fn sampled_scenes_are_valid() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut fallbacks = 0;
        for i in 0..400 {
            let spec = sample_video_spec(&mut rng);
            let frames = [DEFAULT_FRAMES, 2, MAX_FRAMES][i % 3];
            let scene = sample_video_scene(&spec, frames, &mut rng).unwrap();
            assert!(scene.is_valid(frames), "invalid layout for '{}': {:?}", spec.text(), scene.objects);
            fallbacks += (scene.objects == fallback_layout(&spec)) as usize;
        }
        assert!(fallbacks <= 4, "{fallbacks} of 400 layouts used the fixed fallback");
        // The hardest structures still lay out at random most of the time.
        for spec in all_structures().iter().filter(|s| s.n_objects() == 3).step_by(7) {
            let scene = sample_video_scene(spec, MAX_FRAMES, &mut rng).unwrap();
            assert!(scene.is_valid(MAX_FRAMES), "{}", spec.text());
        }
    }

    #[test]
    fn fallback_layouts_are_valid() {
        for spec in all_structures() {
            for frames in 2..=MAX_FRAMES {
                let scene = VideoScene { spec: spec.clone(), objects: fallback_layout(&spec) };
                assert!(scene.is_valid(frames), "invalid fallback for '{}' at {frames} frames", spec.text());
            }
        }
    }

    #[test]
    fn bad_dimensions_rejected() {
        let spec = VideoSpec::parse("a red circle moving left").unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let e = sample_video_scene(&spec, 1, &mut rng).unwrap_err().to_string();
        assert!(e.contains("frames = 1"), "{e}");
        let e = sample_video_scene(&spec, MAX_FRAMES + 1, &mut rng).unwrap_err().to_string();
        assert!(e.contains("frames = 11"), "{e}");
        let scene = sample_video_scene(&spec, DEFAULT_FRAMES, &mut rng).unwrap();
        let e = render_clip(&scene, 1, 32).unwrap_err().to_string();
        assert!(e.contains("frames = 1"), "{e}");
        let e = render_clip(&scene, 8, 7).unwrap_err().to_string();
        assert!(e.contains("res = 7"), "{e}");
        let bad = VideoSpec { groups: vec![] };
        assert!(sample_video_scene(&bad, 8, &mut rng).unwrap_err().to_string().contains("0 groups"));
        let clip = render_default_clip(&scene).unwrap();
        assert_eq!((clip.frames.len(), clip.frames[0].h, clip.masks[0][0].len()), (DEFAULT_FRAMES, DEFAULT_RES, DEFAULT_RES * DEFAULT_RES));
    }

    /// Soft centroid (pixels) and area of a mask.
    fn centroid(m: &[f32], res: usize) -> (f32, f32, f32) {
        let (mut a, mut sx, mut sy) = (0.0, 0.0, 0.0);
        for (p, &v) in m.iter().enumerate() {
            a += v;
            sx += v * ((p % res) as f32 + 0.5);
            sy += v * ((p / res) as f32 + 0.5);
        }
        (sx / a, sy / a, a)
    }

    #[test]
    fn rendered_objects_move_as_prompted() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let res = 32;
        let mut seen = HashSet::new();
        for i in 0..120 {
            let spec = sample_video_spec(&mut rng);
            let frames = if i % 2 == 0 { DEFAULT_FRAMES } else { MAX_FRAMES };
            let scene = sample_video_scene(&spec, frames, &mut rng).unwrap();
            let clip = render_clip(&scene, frames, res).unwrap();
            assert_eq!((clip.frames.len(), clip.masks.len()), (frames, frames));
            for (k, o) in scene.objects.iter().enumerate() {
                let motion = spec.groups[o.group].motion;
                seen.insert(motion);
                let (x0, y0, a0) = centroid(&clip.masks[0][k], res);
                let (x1, y1, _) = centroid(&clip.masks[frames - 1][k], res);
                let (vx, vy) = motion.velocity();
                let want = (vx * (frames - 1) as f32 * res as f32, vy * (frames - 1) as f32 * res as f32);
                // Within the rasterizer's 1/SUPERSAMPLE px quantization (plus margin).
                assert!((x1 - x0 - want.0).abs() < 0.3 && (y1 - y0 - want.1).abs() < 0.3, "'{}' object {k}: moved ({}, {}) px, want {want:?}", spec.text(), x1 - x0, y1 - y0);
                if let Some(d) = motion.direction() {
                    let (ux, uy) = d.unit();
                    assert!((x1 - x0) * ux + (y1 - y0) * uy > 4.0, "'{}' object {k} moved too little", spec.text());
                }
                // Whole object inside the frame in every frame: its box stays EDGE from the
                // border (so no coverage is cut off) and its area is the unclipped area.
                let want_area = o.shape.area_factor() * (o.size * res as f32).powi(2);
                for t in 0..frames {
                    let p = o.at(t);
                    assert!(p.cx - p.size >= EDGE - 1e-5 && p.cx + p.size <= 1.0 - EDGE + 1e-5, "'{}' object {k} leaves the frame at {t}", spec.text());
                    assert!(p.cy - p.size >= EDGE - 1e-5 && p.cy + p.size <= 1.0 - EDGE + 1e-5, "'{}' object {k} leaves the frame at {t}", spec.text());
                    let a = clip.masks[t][k].iter().sum::<f32>();
                    // Supersampled coverage of a small shape varies by a few % with its subpixel phase.
                    assert!((a - want_area).abs() / want_area < 0.12 && (a - a0).abs() / a0 < 0.12, "area {a} vs {a0}, {want_area}");
                }
            }
            // Objects never share a pixel in any frame.
            for masks in &clip.masks {
                for p in 0..res * res {
                    assert!(masks.iter().filter(|m| m[p] > 0.0).count() <= 1, "'{}': overlap", spec.text());
                }
            }
        }
        assert_eq!(seen.len(), Motion::all().len(), "not every motion was rendered");
    }
}
