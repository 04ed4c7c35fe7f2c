//! Plots rendered in Rust as inline SVG: line charts with a mean ± 1.96·SE band over
//! seeds, and a stacked bar chart of the step-time breakdown. Hand-written rather than
//! a plotting crate because the report needs only these two shapes, and SVG text is
//! exactly what an inline, self-contained HTML page wants.

use super::{escape, Series, Timing};
use std::collections::BTreeMap;
use std::fmt::Write;

const W: f64 = 560.0;
const H: f64 = 300.0;
const ML: f64 = 62.0; // left margin: y tick labels
const MR: f64 = 14.0;
const MT: f64 = 30.0; // top margin: title
const MB: f64 = 44.0; // bottom margin: x ticks and label

/// Colour-blind-safe palette (Okabe–Ito), cycled by method.
pub const PALETTE: [&str; 8] = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442"];

/// One method's curve aggregated over its seeds.
#[derive(Debug, Clone, PartialEq)]
pub struct Band {
    pub label: String,
    pub x: Vec<f64>,
    pub mean: Vec<f64>,
    pub lo: Vec<f64>,
    pub hi: Vec<f64>,
    /// Most seeds seen at any point (1 ⇒ no band).
    pub seeds: usize,
}

/// Group series by method (in order of first appearance) and aggregate the seeds
/// point by point, matched by step. The x value is the step, or with `wall` the mean
/// wall-clock seconds at that step over the seeds. NaN values are skipped; a point
/// with no finite value is dropped.
pub fn aggregate(series: &[Series], wall: bool) -> Vec<Band> {
    let mut order: Vec<&str> = Vec::new();
    for s in series {
        if !order.contains(&s.method.as_str()) {
            order.push(&s.method);
        }
    }
    order
        .into_iter()
        .map(|m| {
            // step (rounded to an integer key) -> (x values, y values)
            let mut pts: BTreeMap<i64, (Vec<f64>, Vec<f64>)> = BTreeMap::new();
            let mut seeds = 0;
            for s in series.iter().filter(|s| s.method == m) {
                seeds += 1;
                for (i, &st) in s.step.iter().enumerate() {
                    let (Some(&v), x) = (s.value.get(i), if wall { s.wall_s.get(i).copied() } else { Some(st) }) else { continue };
                    let Some(x) = x else { continue };
                    if v.is_finite() && x.is_finite() {
                        let e = pts.entry(st.round() as i64).or_default();
                        e.0.push(x);
                        e.1.push(v);
                    }
                }
            }
            let mut b = Band { label: m.to_string(), x: vec![], mean: vec![], lo: vec![], hi: vec![], seeds };
            for (xs, ys) in pts.values() {
                let n = ys.len() as f64;
                let mean = ys.iter().sum::<f64>() / n;
                let half = if ys.len() > 1 {
                    let var = ys.iter().map(|y| (y - mean).powi(2)).sum::<f64>() / (n - 1.0);
                    1.96 * (var / n).sqrt()
                } else {
                    0.0
                };
                b.x.push(xs.iter().sum::<f64>() / xs.len() as f64);
                b.mean.push(mean);
                b.lo.push(mean - half);
                b.hi.push(mean + half);
            }
            b
        })
        .collect()
}

/// About `n` round tick values covering [lo, hi] (1, 2, 5 × 10^k steps).
pub fn ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let span = (hi - lo).abs().max(1e-12);
    let raw = span / n.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() * step;
    let mut out = Vec::new();
    let mut t = first;
    while t <= hi + step * 1e-9 {
        out.push(if t.abs() < step * 1e-9 { 0.0 } else { t });
        t += step;
    }
    out
}

fn fmt_tick(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if (v - v.round()).abs() < 1e-9 && a < 1e6 {
        format!("{v:.0}")
    } else if !(0.001..1000.0).contains(&a) {
        format!("{v:.1e}")
    } else if a >= 10.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.1}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').to_string()
    }
}

/// Data range padded so flat curves still get a visible axis.
fn range(vals: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
    for v in vals.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo < 1e-9 {
        let d = if lo.abs() > 1e-9 { lo.abs() * 0.05 } else { 0.5 };
        return (lo - d, hi + d);
    }
    (lo, hi)
}

/// A line chart of aggregated bands. Returns a standalone `<svg>` element. Each band's
/// colour is its label's position in `methods` (so a method keeps its colour across every
/// chart of a report); labels not listed take the next free colours.
pub fn line_chart(title: &str, x_label: &str, y_label: &str, bands: &[Band], methods: &[String]) -> String {
    let (x0, x1) = range(bands.iter().flat_map(|b| b.x.iter().copied()));
    let (y0, y1) = range(bands.iter().flat_map(|b| b.lo.iter().chain(b.hi.iter()).copied()));
    let pad = (y1 - y0) * 0.05;
    let (y0, y1) = (y0 - pad, y1 + pad);
    let px = |x: f64| ML + (x - x0) / (x1 - x0) * (W - ML - MR);
    let py = |y: f64| MT + (1.0 - (y - y0) / (y1 - y0)) * (H - MT - MB);
    let mut s = String::new();
    let _ = write!(s, r#"<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" aria-label="{t}">"#, t = escape(title));
    let _ = write!(s, r#"<rect x="0" y="0" width="{W}" height="{H}" fill="white"/>"#);
    let _ = write!(s, r#"<text x="{}" y="18" text-anchor="middle" font-size="13" font-weight="bold">{}</text>"#, W / 2.0, escape(title));
    for t in ticks(y0, y1, 5) {
        let y = py(t);
        let _ = write!(s, r##"<line x1="{ML}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#e3e3e3"/>"##, W - MR);
        let _ = write!(s, r#"<text x="{}" y="{:.1}" text-anchor="end" font-size="11">{}</text>"#, ML - 5.0, y + 4.0, fmt_tick(t));
    }
    for t in ticks(x0, x1, 6) {
        let x = px(t);
        let _ = write!(s, r##"<line x1="{x:.1}" x2="{x:.1}" y1="{}" y2="{}" stroke="#999"/>"##, H - MB, H - MB + 4.0);
        let _ = write!(s, r#"<text x="{x:.1}" y="{}" text-anchor="middle" font-size="11">{}</text>"#, H - MB + 16.0, fmt_tick(t));
    }
    let _ = write!(s, r##"<rect x="{ML}" y="{MT}" width="{}" height="{}" fill="none" stroke="#999"/>"##, W - ML - MR, H - MT - MB);
    let _ = write!(s, r#"<text x="{}" y="{}" text-anchor="middle" font-size="12">{}</text>"#, (ML + W - MR) / 2.0, H - 8.0, escape(x_label));
    let _ = write!(s, r#"<text x="14" y="{y}" text-anchor="middle" font-size="12" transform="rotate(-90 14 {y})">{}</text>"#, escape(y_label), y = (MT + H - MB) / 2.0);
    for (i, b) in bands.iter().enumerate() {
        let ci = methods.iter().position(|m| *m == b.label).unwrap_or(methods.len() + i);
        let c = PALETTE[ci % PALETTE.len()];
        if b.seeds > 1 && b.x.len() > 1 {
            let mut pts: Vec<String> = b.x.iter().zip(&b.hi).map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y))).collect();
            pts.extend(b.x.iter().zip(&b.lo).rev().map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y))));
            let _ = write!(s, r#"<polygon points="{}" fill="{c}" fill-opacity="0.18" stroke="none"/>"#, pts.join(" "));
        }
        if b.x.len() == 1 {
            let _ = write!(s, r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{c}"/>"#, px(b.x[0]), py(b.mean[0]));
        } else if !b.x.is_empty() {
            let pts: Vec<String> = b.x.iter().zip(&b.mean).map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y))).collect();
            let _ = write!(s, r#"<polyline points="{}" fill="none" stroke="{c}" stroke-width="1.8"/>"#, pts.join(" "));
        }
        // legend, top-left inside the plot
        let ly = MT + 14.0 + 15.0 * i as f64;
        let _ = write!(s, r#"<line x1="{}" x2="{}" y1="{ly:.1}" y2="{ly:.1}" stroke="{c}" stroke-width="3"/>"#, ML + 8.0, ML + 26.0);
        let seeds = if b.seeds > 1 { format!(" ({} seeds)", b.seeds) } else { String::new() };
        let _ = write!(s, r#"<text x="{}" y="{:.1}" font-size="11">{}{}</text>"#, ML + 31.0, ly + 4.0, escape(&b.label), seeds);
    }
    s.push_str("</svg>");
    s
}

/// Horizontal stacked bars: mean seconds per step in each phase, one bar per method.
pub fn timing_chart(timings: &[Timing]) -> String {
    let phases = ["sample", "reward", "map", "update"];
    let bar_h = 22.0;
    let h = MT + 26.0 + bar_h * 1.5 * timings.len() as f64 + 30.0;
    let label_w = 130.0;
    let total = |t: &Timing| t.sample_s + t.reward_s + t.map_s + t.update_s;
    let xmax = timings.iter().map(total).fold(0.0, f64::max).max(1e-6);
    let px = |v: f64| label_w + v / xmax * (W - label_w - 70.0);
    let mut s = String::new();
    let _ = write!(s, r#"<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {W} {h}" width="{W}" height="{h}" role="img" aria-label="step time">"#);
    let _ = write!(s, r#"<rect x="0" y="0" width="{W}" height="{h}" fill="white"/>"#);
    let _ = write!(s, r#"<text x="{}" y="18" text-anchor="middle" font-size="13" font-weight="bold">mean seconds per RL step</text>"#, W / 2.0);
    for (k, p) in phases.iter().enumerate() {
        let x = label_w + 90.0 * k as f64;
        let _ = write!(s, r#"<rect x="{x}" y="{}" width="12" height="12" fill="{}"/>"#, MT - 4.0, PALETTE[k]);
        let _ = write!(s, r#"<text x="{}" y="{}" font-size="11">{p}</text>"#, x + 16.0, MT + 6.0);
    }
    for (i, t) in timings.iter().enumerate() {
        let y = MT + 26.0 + bar_h * 1.5 * i as f64;
        let _ = write!(s, r#"<text x="{}" y="{}" text-anchor="end" font-size="11">{}</text>"#, label_w - 6.0, y + bar_h * 0.7, escape(&t.method));
        let mut acc = 0.0;
        for (k, v) in [t.sample_s, t.reward_s, t.map_s, t.update_s].into_iter().enumerate() {
            let (a, b) = (px(acc), px(acc + v.max(0.0)));
            let _ =
                write!(s, r#"<rect x="{a:.1}" y="{y:.1}" width="{:.1}" height="{bar_h}" fill="{}"><title>{}: {} {v:.3} s</title></rect>"#, (b - a).max(0.0), PALETTE[k], escape(&t.method), phases[k]);
            acc += v.max(0.0);
        }
        let _ = write!(s, r#"<text x="{:.1}" y="{}" font-size="11">{:.2} s</text>"#, px(acc) + 5.0, y + bar_h * 0.7, acc);
    }
    s.push_str("</svg>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ser(method: &str, seed: u64, vals: &[f64]) -> Series {
        Series { method: method.into(), seed, step: (1..=vals.len()).map(|i| i as f64).collect(), wall_s: (1..=vals.len()).map(|i| 2.0 * i as f64 + seed as f64).collect(), value: vals.to_vec() }
    }

    #[test]
    fn aggregate_mean_and_band_over_seeds() {
        let s = vec![ser("a", 0, &[1.0, 2.0]), ser("b", 0, &[5.0, 5.0]), ser("a", 1, &[3.0, f64::NAN])];
        let b = aggregate(&s, false);
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].label, "a");
        assert_eq!(b[0].seeds, 2);
        assert_eq!(b[0].x, vec![1.0, 2.0]);
        assert_eq!(b[0].mean, vec![2.0, 2.0]);
        // step 1: values 1 and 3 → sample std √2, SE 1, half-width 1.96
        assert!((b[0].hi[0] - 3.96).abs() < 1e-12 && (b[0].lo[0] - 0.04).abs() < 1e-12);
        // step 2: only one finite value → no band
        assert_eq!(b[0].lo[1], b[0].hi[1]);
        assert_eq!(b[1].lo, b[1].mean);
        let w = aggregate(&s, true);
        assert_eq!(w[0].x, vec![2.5, 4.0]); // mean wall over seeds (2,3) then only seed 0's point
    }

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(ticks(0.0, 1.0, 5), vec![0.0, 0.2, 0.4, 0.6000000000000001, 0.8, 1.0]);
        let t = ticks(0.231, 0.287, 5);
        assert!(t.len() >= 3 && t.iter().all(|v| (0.231..=0.287).contains(v)));
        assert_eq!(ticks(1.0, 30.0, 6), vec![5.0, 10.0, 15.0, 20.0, 25.0, 30.0]);
    }

    #[test]
    fn chart_draws_band_only_with_seeds_and_escapes_labels() {
        let one = line_chart("r<1>", "step", "reward", &aggregate(&[ser("x&y", 0, &[0.1, 0.2, 0.3])], false), &[]);
        assert!(one.contains("r&lt;1&gt;") && one.contains("x&amp;y") && one.contains("<polyline") && !one.contains("<polygon"));
        let two = line_chart("r", "step", "reward", &aggregate(&[ser("a", 0, &[0.1, 0.2]), ser("a", 1, &[0.2, 0.4])], false), &["z".into(), "a".into()]);
        assert!(two.contains("<polygon") && two.contains("(2 seeds)"));
        assert!(two.contains(PALETTE[1]) && !two.contains(PALETTE[0]), "colour follows the method's global position");
        assert_eq!(fmt_tick(5.0), "5");
        assert_eq!(fmt_tick(0.25), "0.25");
        let bars = timing_chart(&[Timing { method: "vipo".into(), sample_s: 1.0, reward_s: 0.1, map_s: 0.2, update_s: 2.0, peak_rss_mb: 10.0 }]);
        assert!(bars.contains("3.30 s") && bars.matches("<rect").count() >= 1 + 4 + 4);
    }
}
