//! The self-contained HTML report of a run or a comparison (`report.html`): reward
//! curves (mean and 95 % band over seeds) against step and against wall-clock, the
//! evaluation tables, sample and allocation-map grids, the step-time breakdown and peak
//! memory, and the resolved configs. Images are inlined as data URIs and plots are
//! inline SVG, so the file can be mailed or archived alone; the only script is a tiny
//! inline one that flags images that fail to load (nothing is fetched from anywhere).
//!
//! Callers build a [`ReportInput`] (see `compare.rs`, `run_report.rs`); this module
//! only renders it.

pub mod browser;
pub mod svg;

use anyhow::{Context, Result};
use std::fmt::Write;
use std::path::{Path, PathBuf};

/// One curve of one seed of one method.
#[derive(Debug, Clone)]
pub struct Series {
    pub method: String,
    pub seed: u64,
    pub step: Vec<f64>,
    /// Cumulative training seconds at each step.
    pub wall_s: Vec<f64>,
    pub value: Vec<f64>,
}

/// One line of the evaluation table: a method and its evaluation statistic.
#[derive(Debug, Clone)]
pub struct EvalRow {
    pub method: String,
    pub stat: crate::eval::run::EvalRow,
}

/// An image file to inline, with its caption.
#[derive(Debug, Clone)]
pub struct Figure {
    pub caption: String,
    pub path: PathBuf,
}

/// Mean seconds per RL step in each phase, and the peak resident memory.
#[derive(Debug, Clone)]
pub struct Timing {
    pub method: String,
    pub sample_s: f64,
    pub reward_s: f64,
    pub map_s: f64,
    pub update_s: f64,
    pub peak_rss_mb: f64,
}

/// Everything a report shows.
#[derive(Debug, Clone, Default)]
pub struct ReportInput {
    pub title: String,
    /// A few lines shown first.
    pub summary: Vec<String>,
    /// (quantity name, one series per method × seed).
    pub curves: Vec<(String, Vec<Series>)>,
    pub eval_rows: Vec<EvalRow>,
    /// (title, header, rows) of further tables.
    pub extra_tables: Vec<(String, Vec<String>, Vec<Vec<String>>)>,
    /// Rows of samples on one prompt and one noise across methods (columns named in the
    /// caption), shown before the grids.
    pub side_by_side: Vec<Figure>,
    pub sample_grids: Vec<Figure>,
    pub map_grids: Vec<Figure>,
    pub timings: Vec<Timing>,
    /// (name, text) of the resolved configs.
    pub configs: Vec<(String, String)>,
}

/// Escape text for HTML/SVG element content and attribute values.
pub fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// Standard base64 (RFC 4648, with padding), for data URIs.
pub fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut o = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for k in 0..4 {
            if k <= c.len() {
                o.push(A[(n >> (18 - 6 * k) & 63) as usize] as char);
            } else {
                o.push('=');
            }
        }
    }
    o
}

fn data_uri(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("report: cannot read image {}", path.display()))?;
    let mime = match path.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase()).as_deref() {
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("svg") => "image/svg+xml",
        _ => anyhow::bail!("report: {}: not a png/jpeg/svg image", path.display()),
    };
    Ok(format!("data:{mime};base64,{}", base64(&bytes)))
}

const CSS: &str = "body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1240px;padding:0 16px;color:#222}\
h1{font-size:1.5em}h2{margin-top:2em;border-bottom:1px solid #ddd;padding-bottom:4px}\
table{border-collapse:collapse;margin:8px 0 16px;font-size:13px}th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}\
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}\
.charts{display:flex;flex-wrap:wrap;gap:12px}.chart{border:1px solid #eee;max-width:100%;height:auto}\
figure{display:inline-block;margin:6px 10px 14px 0;vertical-align:top}figcaption{font-size:12px;color:#444;max-width:520px}\
figure img{image-rendering:pixelated;border:1px solid #ddd;max-width:100%}\
ol.legend{font-size:11px;color:#444;margin:4px 0 0;padding-left:22px;columns:2;column-gap:18px;max-width:1200px}\
pre{background:#f7f7f7;padding:8px;overflow:auto;font-size:12px}.summary{font-size:15px}.warn{color:#fff;background:#b00;padding:6px}\
.note{color:#555;font-size:13px}";

/// Flags images that did not load, in the page and as body attributes (which the
/// headless-browser check reads from the dumped DOM).
const SCRIPT: &str = "window.addEventListener('load',function(){var n=0,b=0;\
document.querySelectorAll('img').forEach(function(i){n++;if(!(i.complete&&i.naturalWidth>0))b++;});\
document.body.setAttribute('data-images',n);document.body.setAttribute('data-broken-images',b);\
if(b>0){var p=document.createElement('p');p.className='warn';p.textContent=b+' of '+n+' images failed to load';\
document.body.insertBefore(p,document.body.firstChild);}});";

fn table(out: &mut String, header: &[String], rows: &[Vec<String>]) {
    out.push_str("<table><thead><tr>");
    for h in header {
        let _ = write!(out, "<th>{}</th>", escape(h));
    }
    out.push_str("</tr></thead><tbody>");
    for r in rows {
        out.push_str("<tr>");
        for c in r {
            let num = c.trim_start_matches(['+', '-', '[']).chars().next().is_some_and(|ch| ch.is_ascii_digit());
            let _ = write!(out, "<td{}>{}</td>", if num { " class=\"num\"" } else { "" }, escape(c));
        }
        out.push_str("</tr>");
    }
    out.push_str("</tbody></table>");
}

fn figures(out: &mut String, figs: &[Figure]) -> Result<()> {
    for f in figs {
        // Grids are small (32×32 tiles): show them at 2× with crisp pixels.
        let (w, _) = image::image_dimensions(&f.path).with_context(|| format!("report: cannot read image {}", f.path.display()))?;
        let _ = write!(
            out,
            r#"<figure><img src="{}" width="{}" alt="{}"/><figcaption>{}{}</figcaption></figure>"#,
            data_uri(&f.path)?,
            (w * 2).min(1200),
            escape(&f.caption),
            escape(&f.caption),
            legend_html(&f.path)
        );
    }
    Ok(())
}

/// The grid's prompts in reading order (from its `.prompts.json` legend), with each cell's
/// score and note; empty when the grid has no legend.
fn legend_html(png: &Path) -> String {
    let Some(cells) = crate::image::read_legend(png) else { return String::new() };
    let mut s = String::from(" — prompts in reading order:<ol class=\"legend\">");
    for c in cells {
        let mut extra: Vec<String> = c.score.map(|v| format!("{v:.2}")).into_iter().collect();
        if !c.note.is_empty() {
            extra.push(c.note.clone());
        }
        let tail = if extra.is_empty() { String::new() } else { format!(" ({})", extra.join(", ")) };
        let _ = write!(s, "<li>{}{}</li>", escape(&c.prompt), escape(&tail));
    }
    s.push_str("</ol>");
    s
}

/// Render the report as one HTML string.
pub fn render(input: &ReportInput) -> Result<String> {
    let mut o = String::new();
    let _ = write!(o, "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"/><title>{}</title><style>{CSS}</style><script>{SCRIPT}</script></head><body>", escape(&input.title));
    let _ = write!(o, "<h1>{}</h1>", escape(&input.title));
    if !input.summary.is_empty() {
        o.push_str("<div class=\"summary\">");
        for l in &input.summary {
            let _ = write!(o, "<p>{}</p>", escape(l));
        }
        o.push_str("</div>");
    }
    if !input.curves.is_empty() {
        o.push_str("<h2>Training curves</h2><p class=\"note\">Line: mean over seeds; band: mean ± 1.96 standard errors over seeds (shown when a method has more than one seed). Wall-clock is the sum of the measured step phases (sample + reward + map + update).</p>");
        let mut methods: Vec<String> = Vec::new();
        for s in input.curves.iter().flat_map(|(_, v)| v) {
            if !methods.contains(&s.method) {
                methods.push(s.method.clone());
            }
        }
        for (name, series) in &input.curves {
            // "quantity (explanation)": the short quantity labels the axes, the whole name
            // is the caption.
            let short = name.split(" (").next().unwrap_or(name);
            let _ = write!(o, "<h3>{}</h3><div class=\"charts\">", escape(name));
            o.push_str(&svg::line_chart(&format!("{short} vs step"), "step", short, &svg::aggregate(series, false), &methods));
            o.push_str(&svg::line_chart(&format!("{short} vs wall-clock"), "training seconds", short, &svg::aggregate(series, true), &methods));
            o.push_str("</div>");
        }
    }
    if !input.eval_rows.is_empty() {
        o.push_str("<h2>Evaluation</h2><p class=\"note\">ODE samples on fixed prompts and seeds (identical noise across methods); 95 % confidence interval: over seeds (Student t) when a method has several seeds, otherwise a bootstrap over prompts.</p>");
        let header = ["method", "split", "reward", "mean", "95 % CI", "n"].map(String::from);
        let rows: Vec<Vec<String>> = input
            .eval_rows
            .iter()
            .map(|r| {
                let t = &r.stat;
                vec![r.method.clone(), t.split.clone(), t.reward.clone(), format!("{:.4}", t.mean), format!("[{:.4}, {:.4}]", t.ci_low, t.ci_high), t.n.to_string()]
            })
            .collect();
        table(&mut o, &header, &rows);
    }
    for (title, header, rows) in &input.extra_tables {
        if rows.is_empty() {
            continue;
        }
        let _ = write!(o, "<h2>{}</h2>", escape(title));
        table(&mut o, header, rows);
    }
    if !input.side_by_side.is_empty() {
        o.push_str("<h2>Same prompt, same noise</h2><p class=\"note\">Each image: the base model and every method (seed 0), left to right, sampled from the same initial noise on the same held-out prompt; the caption gives the prompt and each column's reward.</p>");
        figures(&mut o, &input.side_by_side)?;
    }
    if !input.sample_grids.is_empty() {
        o.push_str("<h2>Samples</h2>");
        figures(&mut o, &input.sample_grids)?;
    }
    if !input.map_grids.is_empty() {
        o.push_str("<h2>Allocation maps and signed advantages</h2><p class=\"note\">Each row: a generated sample, its allocation map (bright = more of the group advantage), and the per-pixel advantage (red = pushed up, blue = pushed down).</p>");
        figures(&mut o, &input.map_grids)?;
    }
    if !input.timings.is_empty() {
        o.push_str("<h2>Step time and memory</h2>");
        o.push_str(&svg::timing_chart(&input.timings));
        let header = ["method", "sample s", "reward s", "map s", "update s", "total s", "map share", "peak RSS MiB"].map(String::from);
        let rows: Vec<Vec<String>> = input
            .timings
            .iter()
            .map(|t| {
                let tot = t.sample_s + t.reward_s + t.map_s + t.update_s;
                vec![
                    t.method.clone(),
                    format!("{:.3}", t.sample_s),
                    format!("{:.3}", t.reward_s),
                    format!("{:.3}", t.map_s),
                    format!("{:.3}", t.update_s),
                    format!("{tot:.3}"),
                    format!("{:.1} %", if tot > 0.0 { 100.0 * t.map_s / tot } else { 0.0 }),
                    format!("{:.0}", t.peak_rss_mb),
                ]
            })
            .collect();
        table(&mut o, &header, &rows);
    }
    if !input.configs.is_empty() {
        o.push_str("<h2>Resolved configs</h2>");
        for (name, text) in &input.configs {
            let _ = write!(o, "<details><summary>{}</summary><pre>{}</pre></details>", escape(name), escape(text));
        }
    }
    o.push_str("</body></html>\n");
    Ok(o)
}

/// Render and write atomically (temp file + rename), so a failed render never leaves a
/// half-written report in place of a good one.
pub fn write_report(input: &ReportInput, path: &Path) -> Result<()> {
    let html = render(input)?;
    let tmp = path.with_extension("html.tmp");
    std::fs::write(&tmp, html).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// Minimal well-formedness check for the HTML this module emits (used by the tests): every non-void element is
/// closed in order (script/style bodies are raw text), and attribute quotes balance.
/// Returns the number of elements.
pub fn check_well_formed(html: &str) -> std::result::Result<usize, String> {
    const VOID: [&str; 6] = ["meta", "img", "br", "hr", "input", "link"];
    let mut stack: Vec<String> = Vec::new();
    let mut i = 0;
    let mut count = 0;
    while let Some(off) = html[i..].find('<') {
        let s = i + off;
        let e = s + html[s..].find('>').ok_or(format!("unclosed tag at {s}"))?;
        let tag = &html[s + 1..e];
        i = e + 1;
        if tag.starts_with('!') {
            continue;
        }
        if !tag.matches('"').count().is_multiple_of(2) {
            return Err(format!("odd quotes in <{tag}>"));
        }
        if let Some(name) = tag.strip_prefix('/') {
            let top = stack.pop().ok_or(format!("</{name}> with nothing open"))?;
            if top != name {
                return Err(format!("</{name}> closes <{top}>"));
            }
            continue;
        }
        let name: String = tag.chars().take_while(|c| c.is_ascii_alphanumeric()).collect();
        count += 1;
        if tag.ends_with('/') || VOID.contains(&name.as_str()) {
            continue;
        }
        if name == "script" || name == "style" {
            let close = format!("</{name}>");
            let j = html[i..].find(&close).ok_or(format!("<{name}> never closed"))?;
            i += j + close.len();
            continue;
        }
        stack.push(name);
    }
    if let Some(t) = stack.last() {
        return Err(format!("<{t}> never closed"));
    }
    Ok(count)
}

#[cfg(test)]
mod tests;
