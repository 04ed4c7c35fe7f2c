//! The HTML report of a single `vipo train` run (a comparison's report lives in
//! `compare.rs`): reward curves, the latest evaluation, sample and map grids, step-time
//! breakdown, peak memory and the resolved config.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

use crate::report::{EvalRow, Figure, ReportInput, Series, Timing};
use crate::run_dir;

fn pngs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|e| e == "png")).collect();
    v.sort();
    v
}

/// Build the report input of a run directory.
pub fn run_report_input(rd: &Path) -> Result<ReportInput> {
    run_dir::require_run_dir(rd)?;
    let mpath = rd.join(run_dir::METRICS_FILE);
    let text = std::fs::read_to_string(&mpath).with_context(|| format!("{}: cannot read (has the run trained a step?)", mpath.display()))?;
    let cfg_text = std::fs::read_to_string(rd.join(run_dir::CONFIG_FILE))?;
    let name = rd.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "run".into());
    let (mut step, mut wall, mut reward, mut mass) = (vec![], vec![], vec![], vec![]);
    let (mut ts, mut tr, mut tm, mut tu, mut rss) = (0.0, 0.0, 0.0, 0.0, 0f64);
    let mut acc = 0.0;
    for (i, l) in text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
        let v: serde_json::Value = serde_json::from_str(l).with_context(|| format!("{}:{}: corrupt line", mpath.display(), i + 1))?;
        let f = |k: &str| v[k].as_f64().unwrap_or(0.0);
        if v.get("reward_mean").is_none() {
            continue; // a pretraining log: no RL curve
        }
        acc += f("time_sample_s") + f("time_reward_s") + f("time_map_s") + f("time_update_s");
        step.push(f("step"));
        wall.push(acc);
        reward.push(f("reward_mean"));
        mass.push(if f("object_area_frac") > 0.0 { f("map_object_mass") } else { f64::NAN });
        ts += f("time_sample_s");
        tr += f("time_reward_s");
        tm += f("time_map_s");
        tu += f("time_update_s");
        rss = rss.max(f("rss_mb"));
    }
    let n = step.len().max(1) as f64;
    let mut curves = vec![("rollout reward".to_string(), vec![Series { method: name.clone(), seed: 0, step: step.clone(), wall_s: wall.clone(), value: reward }])];
    if mass.iter().any(|x| x.is_finite()) {
        curves.push(("map_object_mass".to_string(), vec![Series { method: name.clone(), seed: 0, step, wall_s: wall, value: mass }]));
    }
    let mut eval_rows = Vec::new();
    let mut summary = vec![format!("run {}", rd.display())];
    let ev = crate::eval::run::eval_dir(rd, "final").join("eval.json");
    let mut sample_grids = Vec::new();
    if ev.is_file() {
        let rep = crate::eval::run::read_report(&ev)?;
        for r in &rep.rows {
            eval_rows.push(EvalRow { method: name.clone(), stat: r.clone() });
        }
        let cfg: crate::config::Config = crate::config::from_toml_str(&cfg_text, &rd.join(run_dir::CONFIG_FILE).display().to_string(), &[])?;
        let primary = crate::eval::run::primary_reward(&cfg);
        if let (Some(e), Some(o)) = (rep.row("eval", primary), rep.row("ood", primary)) {
            summary.push(format!("final {primary} reward: eval {:.3} [{:.3}, {:.3}], ood {:.3} [{:.3}, {:.3}] ({} prompts each)", e.mean, e.ci_low, e.ci_high, o.mean, o.ci_low, o.ci_high, e.n));
        }
        for split in ["eval", "ood"] {
            let p = ev.parent().unwrap().join(format!("grid_{split}.png"));
            if p.is_file() {
                sample_grids.push(Figure { caption: format!("final weights — {split} prompts"), path: p });
            }
        }
    } else {
        summary.push(format!("no evaluation yet: run `vipo eval --run {}`", rd.display()));
    }
    for p in pngs(&rd.join("samples")) {
        sample_grids.push(Figure { caption: format!("training grid {}", p.file_stem().unwrap().to_string_lossy()), path: p });
    }
    let map_grids = pngs(&rd.join("maps"))
        .into_iter()
        .map(|p| Figure { caption: format!("{}: sample | allocation map | signed advantage (red up, blue down)", p.file_stem().unwrap().to_string_lossy()), path: p })
        .collect();
    Ok(ReportInput {
        title: format!("vipo run — {name}"),
        summary,
        curves,
        eval_rows,
        extra_tables: vec![],
        side_by_side: vec![],
        sample_grids,
        map_grids,
        timings: vec![Timing { method: name, sample_s: ts / n, reward_s: tr / n, map_s: tm / n, update_s: tu / n, peak_rss_mb: rss }],
        configs: vec![("config.toml".into(), cfg_text)],
    })
}
