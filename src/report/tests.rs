use super::*;

fn png(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    let img = image::RgbImage::from_fn(8, 4, |x, y| image::Rgb([(x * 30) as u8, (y * 60) as u8, 128]));
    img.save(&p).unwrap();
    p
}

fn input(dir: &Path) -> ReportInput {
    let series = |m: &str, seed: u64, off: f64| Series { method: m.into(), seed, step: vec![1.0, 2.0, 3.0], wall_s: vec![1.5, 3.0, 4.5], value: vec![0.2 + off, 0.25 + off, 0.3 + off] };
    ReportInput {
        title: "vipo <compare> & \"friends\"".into(),
        summary: vec!["ViPO − GRPO: +0.01".into()],
        curves: vec![("rollout reward".into(), vec![series("grpo", 0, 0.0), series("grpo", 1, 0.02), series("vipo", 0, 0.01)])],
        eval_rows: vec![EvalRow { method: "vipo".into(), stat: crate::eval::run::EvalRow { split: "ood".into(), reward: "compositional".into(), mean: 0.25, ci_low: 0.2, ci_high: 0.3, n: 64 } }],
        extra_tables: vec![("steps".into(), vec!["method".into(), "steps".into()], vec![vec!["vipo".into(), "12".into()]])],
        side_by_side: vec![Figure { caption: "\"a red circle\" — base 0.40 · vipo 0.55".into(), path: png(dir, "s.png") }],
        sample_grids: vec![Figure { caption: "grid <eval>".into(), path: png(dir, "g.png") }],
        map_grids: vec![Figure { caption: "maps".into(), path: png(dir, "m.png") }],
        timings: vec![Timing { method: "vipo".into(), sample_s: 1.0, reward_s: 0.1, map_s: 0.05, update_s: 2.0, peak_rss_mb: 200.0 }],
        configs: vec![("config.toml".into(), "[train]\nsteps = 3 # <b>".into())],
    }
}

#[test]
fn base64_matches_rfc4648_vectors() {
    for (i, o) in [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("foob", "Zm9vYg=="), ("fooba", "Zm9vYmE="), ("foobar", "Zm9vYmFy")] {
        assert_eq!(base64(i.as_bytes()), o);
    }
}

#[test]
fn report_is_self_contained_balanced_and_escaped() {
    let dir = tempfile::tempdir().unwrap();
    let inp = input(dir.path());
    // The sample grid has a legend: its prompts (escaped), scores and notes become the caption.
    let cells = [("two red circles left of a <blue> square", Some(0.5), ""), ("a cyan diamond", None, "advantage +1.20")].map(|(p, s, n)| crate::image::LegendCell {
        prompt: p.into(),
        score: s,
        note: n.into(),
    });
    crate::image::write_legend(&dir.path().join("g.png"), &cells).unwrap();
    let path = dir.path().join("report.html");
    write_report(&inp, &path).unwrap();
    let html = std::fs::read_to_string(&path).unwrap();
    let n = check_well_formed(&html).unwrap();
    assert!(n > 50, "{n} elements");
    // every image is inline: no src/href that points at a file or the network
    for key in ["src=\"", "href=\""] {
        for part in html.split(key).skip(1) {
            assert!(part.starts_with("data:"), "external reference {key}{}", &part[..40.min(part.len())]);
        }
    }
    assert_eq!(html.matches("<img src=\"data:image/png;base64,").count(), 3);
    assert!(html.contains("<li>two red circles left of a &lt;blue&gt; square (0.50)</li>") && html.contains("<li>a cyan diamond (advantage +1.20)</li>"), "grid legend");
    assert!(html.contains("Same prompt, same noise") && html.contains("&quot;a red circle&quot; — base 0.40 · vipo 0.55"), "side-by-side section");
    assert_eq!(html.matches("prompts in reading order").count(), 1, "only the grid with a legend lists prompts");
    assert!(html.contains("vipo &lt;compare&gt; &amp; &quot;friends&quot;") && html.contains("# &lt;b&gt;") && !html.contains("<b>"));
    // both axes for the curve, the band for grpo's two seeds, the timing bars
    assert!(html.contains("rollout reward vs step") && html.contains("rollout reward vs wall-clock"));
    assert!(html.contains("grpo (2 seeds)") && html.contains("<polygon") && html.contains("mean seconds per RL step"));
    assert!(html.contains("[0.2000, 0.3000]") && html.contains("1.6 %"), "eval table and map share");
    assert!(!dir.path().join("report.html.tmp").exists());
}

#[test]
fn failed_render_leaves_the_old_report_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("report.html");
    std::fs::write(&path, "old").unwrap();
    let mut inp = input(dir.path());
    inp.map_grids.push(Figure { caption: "gone".into(), path: dir.path().join("missing.png") });
    let err = format!("{:#}", write_report(&inp, &path).unwrap_err());
    assert!(err.contains("missing.png"), "{err}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "old");
}

#[test]
fn balance_checker_catches_broken_html() {
    assert!(check_well_formed("<div><p></div>").is_err());
    assert!(check_well_formed("<div>").is_err());
    assert!(check_well_formed("<img src=\"a>").is_err());
    assert_eq!(check_well_formed("<div><img src=\"x\"/><script>if(a<b){}</script></div>"), Ok(3));
}

#[test]
fn headless_browser_loads_report_without_errors() {
    // No skipping: a report nobody could open in a browser is a failure (`.ci/run`
    // installs Debian's chromium when it is missing).
    let browser = browser::find_browser().expect("no headless browser: apt-get install chromium (what .ci/run does), or set VIPO_CHROMIUM");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("report.html");
    write_report(&input(dir.path()), &path).unwrap();
    let c = browser::check(&browser, &path).unwrap();
    assert_eq!((c.images, c.broken_images), (3, 0), "{c:?}");
    assert!(c.console.is_empty(), "{c:?}");
    // the check must be able to fail: a broken image and a script error are seen
    let html = std::fs::read_to_string(&path).unwrap().replace("</body>", "<img src=\"nowhere.png\"/><script>console.error('boom')</script></body>");
    let bad = dir.path().join("bad.html");
    std::fs::write(&bad, html).unwrap();
    let c = browser::check(&browser, &bad).unwrap();
    assert_eq!((c.images, c.broken_images), (4, 1), "{c:?}");
    assert!(c.console.iter().any(|l| l.contains("boom")), "{c:?}");
    assert!(!c.ok());
}
