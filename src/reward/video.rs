//! Video rewards for ShapeWorld-Video ([`crate::world::video`]), computed from pixels
//! only: every frame goes through the image detector
//! ([`Compositional::detect`]); scene internals are never used.
//!
//! # `VideoQuality` (VQ-like)
//! The image compositional reward of every frame against [`VideoSpec::image_spec`]
//! (the prompted objects, anywhere in the frame), averaged over frames.
//!
//! # `MotionQuality` (MQ-like)
//! **Tracking.** For each prompted group (n objects of one colour and shape), the
//! detections of exactly that colour and shape in each frame are matched to n tracks,
//! greedily by nearest centroid to each track's last known position; a track that has
//! not started yet takes a leftover detection. Detections left over once all n tracks
//! are matched are *extras* (duplicates).
//!
//! **Per object** (one track), with its visible frames and a least-squares line fitted
//! to its centroid over time (slope v̂ per frame, RMS residual r), speeds in image sides
//! per frame, `ramp(x; d, s) = clamp(1 − max(0, x − d)/s, 0, 1)`:
//! * (a) `direction` — moving: clamp(along/(½·SLOW)) · ramp(|perp|; 0.1·v, 0.5·v), with
//!   `along`/`perp` the components of v̂ along / across the prompted direction and v the
//!   prompted speed; still: ramp(|v̂|; 0.1·SLOW, 0.5·SLOW);
//! * (b) `speed` — moving: ramp(|ln(along/v)|; ln 1.15, ln 2) (0 if along ≤ 0: a slow
//!   object at fast speed scores 0); still: the same stillness as (a);
//!   (a) and (b) are scaled by the fraction of frames the object is visible in (a motion
//!   seen in half the clip is half verified) and are 0 with fewer than two sightings;
//! * (c) `persistence` — visible fraction × the group's mean over frames of
//!   n / (n + extras) (vanishing and duplication both cost);
//! * (d) `flicker` — stable · smooth · background, where `stable` is the mean over
//!   consecutive frame pairs (pairs where the object is absent in both are skipped) of
//!   ramp(|ΔA|/max A; 0.1, 0.3) for the soft area A, and 0 where it appears or disappears;
//!   `smooth` = ramp(r; 0.005, 0.03) (jitter around the straight path; 1 with < 3
//!   sightings); `background` is the clip's mean over frame pairs of
//!   ramp(max_c |Δ median_c| + |Δ rms residual|; 0.01, 0.1) (global brightness flicker,
//!   noise bursts).
//!
//! The object's score is the [`MotionWeights`]-weighted mean of (a)–(d); the clip's score
//! mixes the mean and the worst object: (1 − λ)·mean + λ·min (a clip with one broken
//! object is a broken clip). Defaults: direction 0.3, speed 0.2, persistence 0.25,
//! flicker 0.25, λ = 0.5.

use super::{Inputs, Reward, RewardInfo};
use crate::image::{Image, Samples};
use crate::prompt::{video_specs, Prompt};
use crate::reward::compositional::{Compositional, Detection, Detections};
use crate::world::video::{Motion, VideoSpec, SLOW};
use crate::world::BACKGROUND;
use anyhow::{bail, Result};

/// Common input checks: matching lengths, at least `min_frames` frames per clip, every
/// frame well-formed and of the clip's first frame size, valid specs.
fn check_inputs(name: &str, clips: &[Vec<Image>], specs: &[VideoSpec], min_frames: usize) -> Result<()> {
    if clips.len() != specs.len() {
        bail!("{name} reward: {} clips but {} prompts", clips.len(), specs.len());
    }
    for (i, (clip, spec)) in clips.iter().zip(specs).enumerate() {
        if clip.len() < min_frames {
            bail!("{name} reward: clips[{i}] has {} frame(s), need at least {min_frames}", clip.len());
        }
        let (h, w) = (clip[0].h, clip[0].w);
        for (t, f) in clip.iter().enumerate() {
            if (f.h, f.w) != (h, w) {
                bail!("{name} reward: clips[{i}] frame {t} is {}×{}, frame 0 is {h}×{w}", f.h, f.w);
            }
            if f.data.len() != 3 * f.h * f.w || f.h * f.w == 0 {
                bail!("{name} reward: clips[{i}] frame {t} has {} values, expected 3·{}·{}", f.data.len(), f.h, f.w);
            }
        }
        spec.validate().map_err(|e| anyhow::anyhow!("{name} reward: prompts[{i}]: {e}"))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// VQ

/// Per-frame compositional quality (see the module docs).
#[derive(Clone, Debug, Default)]
pub struct VideoQuality {
    pub image: Compositional,
}

impl VideoQuality {
    pub fn new() -> Self {
        Self { image: Compositional::new() }
    }

    /// The image reward's total for every frame.
    pub fn frame_scores(&self, frames: &[Image], spec: &VideoSpec) -> Vec<f32> {
        let ispec = spec.image_spec();
        frames.iter().map(|f| self.image.breakdown(f, &ispec).total).collect()
    }
}

impl Reward for VideoQuality {
    fn info(&self) -> RewardInfo {
        RewardInfo { name: "video_quality".into(), version: "1".into(), range: (0.0, 1.0), higher_is_better: true }
    }
    fn inputs(&self) -> Inputs {
        Inputs::Clips
    }
    fn score(&self, samples: &Samples, prompts: &[Prompt]) -> Result<Vec<f32>> {
        let who = "reward 'video_quality'";
        self.score_clips(samples.clips(who)?, &video_specs(prompts, who)?)
    }
    fn check_prompts(&self, prompts: &[Prompt]) -> Result<()> {
        video_specs(prompts, "reward 'video_quality'").map(|_| ())
    }
}

impl VideoQuality {
    /// One score per clip against its ShapeWorld-Video scene.
    pub fn score_clips(&self, clips: &[Vec<Image>], specs: &[VideoSpec]) -> Result<Vec<f32>> {
        check_inputs("video_quality", clips, specs, 1)?;
        Ok(clips
            .iter()
            .zip(specs)
            .map(|(c, s)| {
                let f = self.frame_scores(c, s);
                f.iter().sum::<f32>() / f.len() as f32
            })
            .collect())
    }
}

// ---------------------------------------------------------------------------------
// MQ

/// Weights of the motion terms and of the worst object (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct MotionWeights {
    /// (a) right direction, little perpendicular drift (still: no motion).
    pub direction: f32,
    /// (b) prompted speed (still: no motion).
    pub speed: f32,
    /// (c) visible in every frame, no duplicates.
    pub persistence: f32,
    /// (d) stable area, smooth path, stable background.
    pub flicker: f32,
    /// λ: share of the worst object in the clip score (the rest is the mean).
    pub worst_object: f32,
}

impl Default for MotionWeights {
    fn default() -> Self {
        Self { direction: 0.3, speed: 0.2, persistence: 0.25, flicker: 0.25, worst_object: 0.5 }
    }
}

/// MQ terms of one clip: (a)–(d) averaged over the prompted objects, the clip-level
/// background stability (already inside `flicker`) and the total.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct MotionBreakdown {
    pub direction: f32,
    pub speed: f32,
    pub persistence: f32,
    pub flicker: f32,
    pub background: f32,
    pub total: f32,
}

/// Motion correctness and temporal coherence (see the module docs).
#[derive(Clone, Debug, Default)]
pub struct MotionQuality {
    pub weights: MotionWeights,
    pub detector: Compositional,
}

/// One sighting of a tracked object: frame index, centroid (image sides) and soft area.
#[derive(Clone, Copy, Debug)]
struct Sighting {
    t: usize,
    x: f32,
    y: f32,
    area: f32,
}

#[inline]
fn ramp(x: f32, dead: f32, scale: f32) -> f32 {
    if !x.is_finite() {
        return 0.0;
    }
    (1.0 - (x - dead).max(0.0) / scale).clamp(0.0, 1.0)
}

/// Least-squares velocity (per frame) of the sightings and the RMS residual of the fit.
fn fit_line(s: &[Sighting]) -> (f32, f32, f32) {
    let n = s.len() as f32;
    let tm = s.iter().map(|p| p.t as f32).sum::<f32>() / n;
    let xm = s.iter().map(|p| p.x).sum::<f32>() / n;
    let ym = s.iter().map(|p| p.y).sum::<f32>() / n;
    let stt: f32 = s.iter().map(|p| (p.t as f32 - tm).powi(2)).sum();
    if stt <= 0.0 {
        return (0.0, 0.0, 0.0);
    }
    let vx = s.iter().map(|p| (p.t as f32 - tm) * (p.x - xm)).sum::<f32>() / stt;
    let vy = s.iter().map(|p| (p.t as f32 - tm) * (p.y - ym)).sum::<f32>() / stt;
    let r2 = s
        .iter()
        .map(|p| {
            let dt = p.t as f32 - tm;
            (p.x - xm - vx * dt).powi(2) + (p.y - ym - vy * dt).powi(2)
        })
        .sum::<f32>()
        / n;
    (vx, vy, r2.sqrt())
}

/// Match the detections of one group to `n` tracks frame by frame (module docs).
/// Returns the tracks and the number of extra detections per frame.
fn track_group(per_frame: &[Vec<&Detection>], n: usize) -> (Vec<Vec<Sighting>>, Vec<usize>) {
    let mut tracks: Vec<Vec<Sighting>> = vec![Vec::new(); n];
    let mut extras = Vec::with_capacity(per_frame.len());
    for (t, dets) in per_frame.iter().enumerate() {
        let mut det_used = vec![false; dets.len()];
        let mut trk_used = vec![false; n];
        let mut pairs: Vec<(f32, usize, usize)> = Vec::new();
        for (k, tr) in tracks.iter().enumerate() {
            if let Some(last) = tr.last() {
                for (j, d) in dets.iter().enumerate() {
                    pairs.push(((d.cx - last.x).hypot(d.cy - last.y), k, j));
                }
            }
        }
        pairs.sort_by(|a, b| a.0.total_cmp(&b.0));
        let see = |d: &Detection| Sighting { t, x: d.cx, y: d.cy, area: d.area };
        for (_, k, j) in pairs {
            if !trk_used[k] && !det_used[j] {
                trk_used[k] = true;
                det_used[j] = true;
                tracks[k].push(see(dets[j]));
            }
        }
        // Tracks that have not started take leftover detections (scan order).
        for tr in tracks.iter_mut().filter(|tr| tr.is_empty()) {
            if let Some(j) = (0..dets.len()).find(|&j| !det_used[j]) {
                det_used[j] = true;
                tr.push(see(dets[j]));
            }
        }
        extras.push(det_used.iter().filter(|u| !**u).count());
    }
    (tracks, extras)
}

/// Per-channel median of a frame (non-finite values count as background).
fn median_rgb(im: &Image) -> [f32; 3] {
    let hw = im.h * im.w;
    let mut out = [0.0; 3];
    let mut buf = vec![0.0f32; hw];
    for (c, o) in out.iter_mut().enumerate() {
        for (b, v) in buf.iter_mut().zip(&im.data[c * hw..(c + 1) * hw]) {
            *b = if v.is_finite() { v.clamp(0.0, 1.0) } else { BACKGROUND[c] };
        }
        let mid = hw / 2;
        *o = *buf.select_nth_unstable_by(mid, |a, b| a.total_cmp(b)).1;
    }
    out
}

impl MotionQuality {
    pub fn new() -> Self {
        Self { weights: MotionWeights::default(), detector: Compositional::new() }
    }

    /// Score one clip (at least two frames) term by term.
    pub fn breakdown(&self, frames: &[Image], spec: &VideoSpec) -> MotionBreakdown {
        let dets: Vec<Detections> = frames.iter().map(|f| self.detector.detect(f)).collect();
        self.score_detections(frames, &dets, spec)
    }

    fn score_detections(&self, frames: &[Image], dets: &[Detections], spec: &VideoSpec) -> MotionBreakdown {
        let nf = frames.len();
        let zero = MotionBreakdown { direction: 0.0, speed: 0.0, persistence: 0.0, flicker: 0.0, background: 0.0, total: 0.0 };
        if nf < 2 || spec.n_objects() == 0 {
            return zero;
        }
        // Background stability, shared by every object.
        let med: Vec<[f32; 3]> = frames.iter().map(median_rgb).collect();
        let background = (1..nf)
            .map(|t| {
                let dm = (0..3).map(|c| (med[t][c] - med[t - 1][c]).abs()).fold(0.0f32, f32::max);
                ramp(dm + (dets[t].rms_residual - dets[t - 1].rms_residual).abs(), 0.01, 0.1)
            })
            .sum::<f32>()
            / (nf - 1) as f32;

        let w = &self.weights;
        let wsum = w.direction + w.speed + w.persistence + w.flicker;
        let mut per_object: Vec<[f32; 4]> = Vec::new();
        for g in &spec.groups {
            let n = g.group.count;
            let per_frame: Vec<Vec<&Detection>> = dets.iter().map(|d| d.objects.iter().filter(|o| o.color == g.group.color && o.shape == g.group.shape).collect()).collect();
            let (tracks, extras) = track_group(&per_frame, n);
            let dup = extras.iter().map(|&e| n as f32 / (n + e) as f32).sum::<f32>() / nf as f32;
            for tr in &tracks {
                let cover = tr.len() as f32 / nf as f32;
                let (mut a, mut b, mut smooth) = (0.0, 0.0, 1.0);
                if tr.len() >= 2 {
                    let (vx, vy, resid) = fit_line(tr);
                    (a, b) = motion_terms(g.motion, vx, vy);
                    (a, b) = (a * cover, b * cover);
                    if tr.len() >= 3 {
                        smooth = ramp(resid, 0.005, 0.03);
                    }
                }
                let c = cover * dup;
                // Area stability over consecutive frame pairs; appearing/disappearing is a flicker.
                let mut seen = vec![None; nf];
                for s in tr {
                    seen[s.t] = Some(s.area);
                }
                let (mut stab, mut pairs) = (0.0f32, 0usize);
                for t in 1..nf {
                    match (seen[t - 1], seen[t]) {
                        (None, None) => continue,
                        (Some(p), Some(q)) => stab += ramp((q - p).abs() / p.max(q).max(1e-6), 0.1, 0.3),
                        _ => {}
                    }
                    pairs += 1;
                }
                let stable = if pairs > 0 { stab / pairs as f32 } else { 0.0 };
                let d = stable * smooth * background;
                per_object.push([a, b, c, d]);
            }
        }
        let k = per_object.len() as f32;
        let mean = |i: usize| per_object.iter().map(|o| o[i]).sum::<f32>() / k;
        let object_score = |o: &[f32; 4]| (w.direction * o[0] + w.speed * o[1] + w.persistence * o[2] + w.flicker * o[3]) / wsum.max(1e-12);
        let scores: Vec<f32> = per_object.iter().map(object_score).collect();
        let mean_score = scores.iter().sum::<f32>() / k;
        let worst = scores.iter().copied().fold(1.0f32, f32::min);
        let lam = w.worst_object.clamp(0.0, 1.0);
        let total = ((1.0 - lam) * mean_score + lam * worst).clamp(0.0, 1.0);
        MotionBreakdown { direction: mean(0), speed: mean(1), persistence: mean(2), flicker: mean(3), background, total: if total.is_finite() { total } else { 0.0 } }
    }
}

/// Terms (a) direction and (b) speed for a fitted velocity (module docs).
fn motion_terms(motion: Motion, vx: f32, vy: f32) -> (f32, f32) {
    match motion {
        Motion::Still => {
            let s = ramp(vx.hypot(vy), 0.1 * SLOW, 0.5 * SLOW);
            (s, s)
        }
        Motion::Moving(d, sp) => {
            let v = sp.per_frame();
            let (ux, uy) = d.unit();
            let along = vx * ux + vy * uy;
            let perp = (vx * uy - vy * ux).abs();
            let sign = (along / (0.5 * SLOW)).clamp(0.0, 1.0);
            let a = sign * ramp(perp, 0.1 * v, 0.5 * v);
            let b = if along > 0.0 { ramp((along / v).ln().abs(), 1.15f32.ln(), 2f32.ln()) } else { 0.0 };
            (a, b)
        }
    }
}

impl Reward for MotionQuality {
    fn info(&self) -> RewardInfo {
        RewardInfo { name: "motion_quality".into(), version: "1".into(), range: (0.0, 1.0), higher_is_better: true }
    }
    fn inputs(&self) -> Inputs {
        Inputs::Clips
    }
    fn score(&self, samples: &Samples, prompts: &[Prompt]) -> Result<Vec<f32>> {
        let who = "reward 'motion_quality'";
        self.score_clips(samples.clips(who)?, &video_specs(prompts, who)?)
    }
    fn check_prompts(&self, prompts: &[Prompt]) -> Result<()> {
        video_specs(prompts, "reward 'motion_quality'").map(|_| ())
    }
}

impl MotionQuality {
    /// One score per clip against its ShapeWorld-Video scene.
    pub fn score_clips(&self, clips: &[Vec<Image>], specs: &[VideoSpec]) -> Result<Vec<f32>> {
        check_inputs("motion_quality", clips, specs, 2)?;
        Ok(clips.iter().zip(specs).map(|(c, s)| self.breakdown(c, s).total).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The unified trait on clips and their scenes.
    fn score(r: &dyn Reward, clips: &[Vec<Image>], specs: &[VideoSpec]) -> Result<Vec<f32>> {
        r.score(&Samples::Clips(clips.to_vec()), &specs.iter().map(Prompt::video).collect::<Vec<_>>())
    }
    use crate::world::render::render;
    use crate::world::video::{render_clip, sample_video_scene, video_prompts, VideoScene, DEFAULT_FRAMES, MAX_FRAMES};
    use crate::world::{Color, Scene, Split, DEFAULT_RES};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use rand_distr::{Distribution, Normal};

    const N: usize = 30;
    const F: usize = DEFAULT_FRAMES;
    const RES: usize = DEFAULT_RES;

    /// `N` train scenes; with `moving`, only specs with at least one moving group.
    fn scenes(seed: u64, moving: bool) -> Vec<VideoScene> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        video_prompts(Split::Train, N * 4, seed)
            .into_iter()
            .filter(|s| !moving || s.groups.iter().any(|g| g.motion != Motion::Still))
            .take(N)
            .map(|s| sample_video_scene(&s, F, &mut rng).unwrap())
            .collect()
    }

    fn clean(sc: &VideoScene) -> Vec<Image> {
        render_clip(sc, F, RES).unwrap().frames
    }

    /// Render frame by frame after editing each frame's scene.
    fn edited(sc: &VideoScene, f: impl Fn(usize, &mut Scene)) -> Vec<Image> {
        (0..F)
            .map(|t| {
                let mut s = sc.frame(t);
                f(t, &mut s);
                render(&s, RES).image
            })
            .collect()
    }

    fn mean(r: &dyn Reward, clips: &[Vec<Image>], sc: &[VideoScene]) -> f32 {
        let specs: Vec<_> = sc.iter().map(|s| s.spec.clone()).collect();
        let v = score(r, clips, &specs).unwrap();
        assert!(v.iter().all(|x| x.is_finite() && (0.0..=1.0).contains(x)));
        v.iter().sum::<f32>() / v.len() as f32
    }

    /// Mean VQ and MQ of the clean clips and of `bad`, printed; asserts the MQ drop.
    fn check_drop(name: &str, sc: &[VideoScene], bad: &[Vec<Image>], min_mq_drop: f32) -> (f32, f32) {
        let (vq, mq) = (VideoQuality::new(), MotionQuality::new());
        let good: Vec<_> = sc.iter().map(clean).collect();
        let (vq0, mq0) = (mean(&vq, &good, sc), mean(&mq, &good, sc));
        let (vq1, mq1) = (mean(&vq, bad, sc), mean(&mq, bad, sc));
        eprintln!("{name}: VQ {vq0:.3} → {vq1:.3}, MQ {mq0:.3} → {mq1:.3}");
        assert!(mq1 < mq0 - min_mq_drop, "{name}: MQ {mq0:.3} → {mq1:.3}, drop < {min_mq_drop}");
        (vq0 - vq1, mq0 - mq1)
    }

    #[test]
    fn ground_truth_scores_high() {
        let sc = scenes(1, false);
        let clips: Vec<_> = sc.iter().map(clean).collect();
        let (vq, mq) = (VideoQuality::new(), MotionQuality::new());
        let (v, m) = (mean(&vq, &clips, &sc), mean(&mq, &clips, &sc));
        let specs: Vec<_> = sc.iter().map(|s| s.spec.clone()).collect();
        let worst = score(&mq, &clips, &specs).unwrap().into_iter().fold(1.0f32, f32::min);
        eprintln!("ground truth: VQ {v:.4}, MQ {m:.4} (worst MQ {worst:.3})");
        for (c, s) in clips.iter().zip(&specs) {
            let b = mq.breakdown(c, s);
            if b.total < 0.95 {
                eprintln!("  '{}': {b:?}", s.text());
            }
        }
        assert!(v >= 0.9, "VQ {v}");
        assert!(m >= 0.95, "MQ {m}");
        // Speeds are relative to the image side, so other resolutions and lengths score as well.
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for (i, spec) in video_prompts(Split::Train, 8, 11).into_iter().enumerate() {
            let (frames, res) = [(MAX_FRAMES, 32), (4, 48), (DEFAULT_FRAMES, 24), (2, 64)][i % 4];
            let scene = sample_video_scene(&spec, frames, &mut rng).unwrap();
            let clip = render_clip(&scene, frames, res).unwrap().frames;
            let (v, m) = (score(&vq, std::slice::from_ref(&clip), std::slice::from_ref(&spec)).unwrap()[0], mq.breakdown(&clip, &spec));
            assert!(v > 0.9 && m.total > 0.9, "'{}' at {frames} frames, {res} px: VQ {v}, MQ {m:?}", spec.text());
        }
        assert!(crate::reward::build("motion_quality").is_ok() && crate::reward::build("video_quality").is_ok());
        assert!(crate::reward::build("vq").err().unwrap().to_string().contains("\"vq\""));
    }

    // Measured (30 seeded train clips each, 8 frames at 32×32), mean VQ / MQ, clean → corrupted:
    //   reversed motion     VQ 1.000 → 1.000   MQ 1.000 → 0.525
    //   frozen object       VQ 1.000 → 1.000   MQ 1.000 → 0.624
    //   vanishing object    VQ 1.000 → 0.744   MQ 1.000 → 0.669
    //   blinking object     VQ 1.000 → 0.778   MQ 1.000 → 0.549
    //   brightness flicker  VQ 1.000 → 0.500   MQ 1.000 → 0.375
    //   noise flicker       VQ 1.000 → 0.682   MQ 1.000 → 0.463
    //   wrong colour        VQ 1.000 → 0.703   MQ 1.000 → 0.236
    // VQ is blind to motion by design (reversed / frozen keep every frame correct).

    #[test]
    fn reversed_motion_scores_lower() {
        let sc = scenes(2, true);
        let bad: Vec<_> = sc
            .iter()
            .map(|s| {
                // Negated velocity from the end position: the same path, backwards.
                let mut r = s.clone();
                for o in &mut r.objects {
                    (o.cx, o.cy) = (o.cx + o.vx * (F - 1) as f32, o.cy + o.vy * (F - 1) as f32);
                    (o.vx, o.vy) = (-o.vx, -o.vy);
                }
                clean(&r)
            })
            .collect();
        check_drop("reversed motion", &sc, &bad, 0.2);
    }

    #[test]
    fn frozen_object_scores_lower() {
        let sc = scenes(3, true);
        let bad: Vec<_> = sc
            .iter()
            .map(|s| {
                // The first moving object stays at its start (or end, if the start collides).
                let k = s.objects.iter().position(|o| o.vx != 0.0 || o.vy != 0.0).unwrap();
                let o = s.objects[k];
                let freeze = |at: usize| move |_: usize, f: &mut Scene| (f.objects[k].cx, f.objects[k].cy) = (o.at(at).cx, o.at(at).cy);
                let ok = |at: usize| {
                    (0..F).all(|t| {
                        let mut f = s.frame(t);
                        freeze(at)(t, &mut f);
                        f.is_valid()
                    })
                };
                let at = if ok(0) { 0 } else { F - 1 };
                edited(s, freeze(at))
            })
            .collect();
        check_drop("frozen object", &sc, &bad, 0.2);
    }

    #[test]
    fn vanishing_object_scores_lower() {
        let sc = scenes(4, false);
        let mut rng = ChaCha8Rng::seed_from_u64(40);
        let bad: Vec<_> = sc
            .iter()
            .map(|s| {
                let k = rng.gen_range(0..s.objects.len());
                edited(s, |t, f| {
                    if t >= F / 2 {
                        f.objects.remove(k);
                    }
                })
            })
            .collect();
        check_drop("vanishing object", &sc, &bad, 0.2);
    }

    #[test]
    fn flicker_scores_lower() {
        let sc = scenes(5, false);
        let mut rng = ChaCha8Rng::seed_from_u64(50);
        // (1) An object missing in every other frame.
        let blink: Vec<_> = sc
            .iter()
            .map(|s| {
                let k = rng.gen_range(0..s.objects.len());
                edited(s, |t, f| {
                    if t % 2 == 1 {
                        f.objects.remove(k);
                    }
                })
            })
            .collect();
        check_drop("blinking object", &sc, &blink, 0.2);
        // (2) Every other frame strongly brightened.
        let bright: Vec<_> = sc
            .iter()
            .map(|s| {
                let mut c = clean(s);
                for f in c.iter_mut().skip(1).step_by(2) {
                    f.data.iter_mut().for_each(|v| *v = (*v + 0.25).min(1.0));
                }
                c
            })
            .collect();
        check_drop("brightness flicker", &sc, &bright, 0.2);
        // (3) Every other frame noised.
        let normal = Normal::new(0.0f32, 0.2).unwrap();
        let noisy: Vec<_> = sc
            .iter()
            .map(|s| {
                let mut c = clean(s);
                for f in c.iter_mut().skip(1).step_by(2) {
                    f.data.iter_mut().for_each(|v| *v = (*v + normal.sample(&mut rng)).clamp(0.0, 1.0));
                }
                c
            })
            .collect();
        check_drop("noise flicker", &sc, &noisy, 0.2);
    }

    #[test]
    fn wrong_colour_lowers_vq() {
        let sc = scenes(6, false);
        let mut rng = ChaCha8Rng::seed_from_u64(60);
        let bad: Vec<_> = sc
            .iter()
            .map(|s| {
                let k = rng.gen_range(0..s.objects.len());
                let unused: Vec<_> = Color::ALL.iter().copied().filter(|c| s.spec.groups.iter().all(|g| g.group.color != *c)).collect();
                let col = unused[rng.gen_range(0..unused.len())];
                edited(s, |_, f| f.objects[k].color = col)
            })
            .collect();
        let vq = VideoQuality::new();
        let good: Vec<_> = sc.iter().map(clean).collect();
        let (v0, v1) = (mean(&vq, &good, &sc), mean(&vq, &bad, &sc));
        let mq = MotionQuality::new();
        eprintln!("wrong colour: VQ {v0:.3} → {v1:.3}, MQ {:.3} → {:.3}", mean(&mq, &good, &sc), mean(&mq, &bad, &sc));
        assert!(v1 < v0 - 0.1, "VQ {v0:.3} → {v1:.3}");
    }

    #[test]
    fn still_and_speed_are_distinguished() {
        // A slow prompt rendered fast (and vice versa) loses the speed term entirely,
        // a still prompt rendered moving loses both motion terms.
        let mq = MotionQuality::new();
        use crate::world::video::{Direction, Speed};
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for (prompt, shown) in [
            (Motion::Moving(Direction::Right, Speed::Slow), Motion::Moving(Direction::Right, Speed::Fast)),
            (Motion::Moving(Direction::Down, Speed::Fast), Motion::Moving(Direction::Down, Speed::Slow)),
            (Motion::Still, Motion::Moving(Direction::Up, Speed::Slow)),
            (Motion::Moving(Direction::Left, Speed::Fast), Motion::Moving(Direction::Up, Speed::Fast)),
        ] {
            let spec = VideoSpec::single(1, Color::Red, crate::world::Shape::Square, prompt);
            let shown_spec = VideoSpec::single(1, Color::Red, crate::world::Shape::Square, shown);
            let scene = sample_video_scene(&shown_spec, F, &mut rng).unwrap();
            let frames = clean(&scene);
            let good = mq.breakdown(&frames, &shown_spec);
            let bad = mq.breakdown(&frames, &spec);
            eprintln!("{prompt:?} shown as {shown:?}: {bad:?} (right prompt {:.3})", good.total);
            assert!(good.total > 0.95, "{good:?}");
            assert!(bad.speed < 0.05, "{bad:?}");
            assert!(bad.total <= good.total - 0.15, "{bad:?}");
        }
    }

    #[test]
    fn trait_and_bad_input() {
        let (vq, mq) = (VideoQuality::new(), MotionQuality::new());
        assert_eq!((vq.info().name.as_str(), vq.info().range), ("video_quality", (0.0, 1.0)));
        assert_eq!((mq.info().name.as_str(), mq.info().version.as_str()), ("motion_quality", "1"));
        let sc = scenes(8, false);
        let clips: Vec<_> = sc[..3].iter().map(clean).collect();
        let specs: Vec<_> = sc[..3].iter().map(|s| s.spec.clone()).collect();
        let rewards: [&dyn Reward; 2] = [&vq, &mq];
        for r in rewards {
            let e = score(r, &clips[..2], &specs).unwrap_err().to_string();
            assert!(e.contains("2 clips but 3"), "{e}");
            let mut broken = clips.clone();
            broken[1][2].data.pop();
            let e = score(r, &broken, &specs).unwrap_err().to_string();
            assert!(e.contains("clips[1] frame 2"), "{e}");
            let mut resized = clips.clone();
            resized[0][3] = Image::new(16, 16);
            let e = score(r, &resized, &specs).unwrap_err().to_string();
            assert!(e.contains("clips[0] frame 3"), "{e}");
            let e = score(r, &[vec![]], &specs[..1]).unwrap_err().to_string();
            assert!(e.contains("clips[0] has 0 frame"), "{e}");
            // NaN / out-of-range pixels and blank clips give finite scores in range.
            let mut nan = clips[0].clone();
            nan.iter_mut().for_each(|f| f.data.iter_mut().step_by(7).for_each(|v| *v = f32::NAN));
            nan[0].data.iter_mut().step_by(11).for_each(|v| *v = 5.0);
            let blank = vec![Image::filled(RES, RES, BACKGROUND); F];
            let s = score(r, &[nan, blank], &specs[..2]).unwrap();
            assert!(s.iter().all(|v| v.is_finite() && (0.0..=1.0).contains(v)), "{s:?}");
            assert_eq!(s[1], 0.0);
        }
        // MQ needs motion: a single frame is an error; VQ scores it.
        let one = vec![clips[0][..1].to_vec()];
        assert!(score(&mq, &one, &specs[..1]).unwrap_err().to_string().contains("need at least 2"));
        assert!(score(&vq, &one, &specs[..1]).unwrap()[0] > 0.9);
        let bad_spec = VideoSpec { groups: vec![] };
        assert!(score(&mq, &clips[..1], &[bad_spec]).unwrap_err().to_string().contains("prompts[0]"));
    }
}
