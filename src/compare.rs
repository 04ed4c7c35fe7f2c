//! `vipo compare`: GRPO vs ViPO (and any ablation) from the same base checkpoint, the
//! same prompts, the same seeds and the same step budget; each run evaluated on identical
//! prompts and noise; results as JSON + markdown + a self-contained HTML report.
//!
//! Layout of a comparison directory (`out_dir/run_name`, default `runs/compare`):
//! `compare.toml` (the shared config), `base_eval/eval.json`, one train run per method and
//! seed (`NAME-sSEED/`, with `eval/final/eval.json`), `results.json`, `results.md`,
//! `report.html`. It is resumable: finished runs are kept, a run with a checkpoint is
//! resumed from it, and only the rest is trained.

use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::config::{self, Config, MethodSpec};
use crate::eval::run::{self as eval_run, EvalReport, EvalRow};
use crate::eval::stats::{bootstrap_ci, mean, t_ci};
use crate::io::DirLock;
use crate::run_dir;
use crate::train::grpo::Trainer;

pub const COMPARE_FILE: &str = "compare.toml";

/// The resolved config of one method and seed.
pub fn method_config(common: &Config, m: &MethodSpec, index: usize, seed: usize, dir: &Path, base: &str) -> Result<Config> {
    let origin = format!("compare.methods[{index}] ({})", m.name);
    for s in &m.set {
        let key = s.split_once('=').map_or(s.as_str(), |(k, _)| k).trim();
        anyhow::ensure!(
            !matches!(key, "seed" | "out_dir" | "run_name" | "train.base")
                && !key.starts_with("compare.")
                && !key.starts_with("model.")
                && !key.starts_with("video_model.")
                && key != "modality"
                && !key.starts_with("pretrain.")
                && !key.starts_with("sample."),
            "{origin}: may not set {key} (every method shares the base model, seeds, directory and evaluation sampler)"
        );
    }
    let mut c: Config = config::from_toml_str(&config::to_toml(common)?, &origin, &m.set)?;
    c.seed = common.seed + seed as u64;
    c.train.base = base.to_string();
    c.out_dir = dir.to_path_buf();
    c.run_name = run_name(m, seed);
    c.train.eval_prompts = 0; // evaluated afterwards by the shared evaluator
    c.train.validate().with_context(|| origin.clone())?;
    Ok(c)
}

pub fn run_name(m: &MethodSpec, seed: usize) -> String {
    format!("{}-s{seed}", m.name)
}

/// The counts of `[compare]`, checked before a comparison starts and again when a finished
/// one is re-aggregated from its (possibly hand-edited) compare.toml.
fn check_counts(cc: &config::CompareConfig) -> Result<()> {
    anyhow::ensure!(cc.seeds >= 1, "compare.seeds (--seeds): must be ≥ 1 (got {})", cc.seeds);
    anyhow::ensure!(cc.eval_prompts >= 1, "compare.eval_prompts: must be ≥ 1");
    anyhow::ensure!(cc.smooth_steps >= 1, "compare.smooth_steps: must be ≥ 1 (got {})", cc.smooth_steps);
    anyhow::ensure!(cc.jobs >= 1, "compare.jobs (--jobs): must be ≥ 1 (got {})", cc.jobs);
    Ok(())
}

/// Every check that can fail, before any work.
fn validate(cfg: &Config, dir: &Path) -> Result<()> {
    let cc = &cfg.compare;
    // Its evaluation, maps and report are built on the ShapeWorld rewards and prompts.
    anyhow::ensure!(
        !cfg.generator().is_real(),
        "modality: vipo compare runs on the ShapeWorld testbeds (\"image\", \"video\"), not on a real generator (\"{}\"); train each method with vipo train and evaluate with vipo eval",
        cfg.modality
    );
    check_counts(cc)?;
    anyhow::ensure!(!cc.methods.is_empty(), "compare.methods: list at least one method");
    let mut seen = std::collections::HashSet::new();
    for (i, m) in cc.methods.iter().enumerate() {
        anyhow::ensure!(
            !m.name.is_empty() && m.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') && m.name != "base_eval",
            "compare.methods[{i}].name: {:?} must be a non-empty name of letters, digits, '-' or '_'",
            m.name
        );
        anyhow::ensure!(seen.insert(m.name.clone()), "compare.methods[{i}].name: {:?} is used twice; each method needs its own run directory name", m.name);
    }
    let first = method_config(cfg, &cc.methods[0], 0, 0, dir, "<base>")?;
    for (i, m) in cc.methods.iter().enumerate() {
        let c = method_config(cfg, m, i, 0, dir, "<base>")?;
        let (a, b) = (&first.train, &c.train);
        anyhow::ensure!(
            (a.steps, a.prompts_per_step, a.group_size, a.sample_steps) == (b.steps, b.prompts_per_step, b.group_size, b.sample_steps),
            "compare.methods[{i}] ({}): changes the step budget (train.steps/prompts_per_step/group_size/sample_steps); every method must get the same budget",
            m.name
        );
        if c.train.algo == config::Algo::Vipo {
            crate::train::maps::build(&c).with_context(|| format!("compare.methods[{i}] ({})", m.name))?;
        }
    }
    Ok(())
}

/// Prepare the comparison directory: fresh, resumed (same config) or replaced (`force`).
/// Returns this process's lock on it: a second `vipo compare` (or `demo`) into a folder
/// whose runs are being trained is refused before it writes anything.
fn prepare_dir(cfg: &Config, dir: &Path, force: bool) -> Result<DirLock> {
    let saved = dir.join(COMPARE_FILE);
    let text = config::to_toml(cfg)?;
    if saved.is_file() {
        let lock = DirLock::acquire(dir)?;
        let old: Config = config::load(Some(&saved), &[])?;
        let mut a = old.clone();
        let mut b = cfg.clone();
        a.progress = false;
        b.progress = false;
        // More (or fewer) seeds extend the same comparison: finished runs are reused. The
        // smoothing window only changes how the finished curves are summarised, and the
        // number of jobs only how many runs train at once.
        a.compare.seeds = b.compare.seeds;
        a.compare.smooth_steps = b.compare.smooth_steps;
        a.compare.jobs = b.compare.jobs;
        if a == b {
            crate::io::atomic_write(&saved, text.as_bytes())?; // resume
            return Ok(lock);
        }
        if !force {
            bail!(
                "{}: holds a different comparison ({} differs: {}); pass --force to replace it, choose another run_name, or --set the saved values to resume it",
                dir.display(),
                saved.display(),
                config::differences(&a, &b, 6)
            );
        }
        std::fs::remove_dir_all(dir).with_context(|| format!("{}: cannot clear", dir.display()))?;
    } else if dir.exists() && std::fs::read_dir(dir).map(|mut d| d.next().is_some()).unwrap_or(true) {
        bail!("{}: exists and is not a vipo comparison (no {COMPARE_FILE}); refusing to touch it", dir.display());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    let lock = DirLock::acquire(dir)?;
    crate::io::atomic_write(&saved, text.as_bytes())?;
    Ok(lock)
}

/// Evaluate the weights of a finished run (or the base) once; reuse the result after.
fn evaluate_once(run_dir: &Path, n: usize) -> Result<EvalReport> {
    let path = eval_run::eval_dir(run_dir, "final").join("eval.json");
    if path.is_file() {
        return eval_run::read_report(&path);
    }
    Ok(eval_run::eval_run(run_dir, &[], None, Some(n), true)?.1)
}

/// Whether a run of the comparison is trained and evaluated.
fn run_done(rd: &Path) -> bool {
    rd.join(run_dir::FINAL_WEIGHTS).is_file() && eval_run::eval_dir(rd, "final").join("eval.json").is_file()
}

/// How many seeds, counted from seed 0, every method has finished. Runs train seed-major,
/// so an interrupted comparison holds a prefix of whole seeds plus the runs of one more.
fn finished_seeds(cfg: &Config, dir: &Path) -> usize {
    (0..cfg.compare.seeds).take_while(|&s| cfg.compare.methods.iter().all(|m| run_done(&dir.join(run_name(m, s))))).count()
}

/// One train run of the comparison, resumed from its checkpoint when it has one.
fn train_one(c: &Config, rd: &Path) -> Result<()> {
    if rd.join(run_dir::FINAL_WEIGHTS).is_file() {
        return Ok(());
    }
    let same_config = config::load::<Config>(Some(&rd.join(run_dir::CONFIG_FILE)), &[]).is_ok_and(|saved| same_run(&saved, c));
    let resume = same_config && Trainer::latest_checkpoint(rd).is_some();
    if !resume {
        run_dir::create_run_dir(rd, c, true)?;
    }
    let mut tr = Trainer::new(c, rd, resume)?;
    tr.train()?;
    Ok(())
}

/// Whether a run folder's saved config trains the same run as `c`. The `[compare]` section
/// rides along in every run's config but training never reads it: growing `--seeds` or
/// changing the smoothing window must resume an interrupted run, not restart it.
fn same_run(saved: &Config, c: &Config) -> bool {
    let (mut a, mut b) = (saved.clone(), c.clone());
    (a.progress, b.progress) = (false, false);
    a.compare = b.compare.clone();
    a == b
}

/// Train and evaluate the runs a comparison still lacks, `jobs` at a time. One job runs on
/// this thread (and the global pool) as a plain loop; several run on threads of their own,
/// each with a pool of threads / jobs workers. When a run fails the others finish the run
/// they are on (it stays resumable) and no new one starts; the first error is returned.
fn run_pending(pending: &[(Config, PathBuf)], jobs: usize, eval_prompts: usize, done_before: usize, total: usize) -> Result<()> {
    let one = |k: usize, quiet: bool| -> Result<()> {
        let (c, rd) = &pending[k];
        let mut c = c.clone();
        // Several progress bars on one terminal overwrite each other; start and end lines instead.
        c.progress &= !quiet;
        let t0 = std::time::Instant::now();
        eprintln!("[{}/{}] {} (seed {})", done_before + k + 1, total, c.run_name, c.seed);
        train_one(&c, rd).with_context(|| format!("{}: training failed", rd.display()))?;
        evaluate_once(rd, eval_prompts)?;
        if quiet {
            eprintln!("[{}/{}] {} done in {:.1} min", done_before + k + 1, total, c.run_name, t0.elapsed().as_secs_f64() / 60.0);
        }
        Ok(())
    };
    let jobs = jobs.min(pending.len());
    if jobs <= 1 {
        return (0..pending.len()).try_for_each(|k| one(k, false));
    }
    let per_job = (crate::runtime::threads() / jobs).max(1);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let first_error = std::sync::Mutex::new(None::<anyhow::Error>);
    let failed = || first_error.lock().unwrap_or_else(|p| p.into_inner()).is_some();
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| {
                let outcome = crate::runtime::pool_builder(per_job).build().map_err(anyhow::Error::from).and_then(|pool| {
                    while !failed() {
                        let k = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        if k >= pending.len() {
                            break;
                        }
                        pool.install(|| one(k, true))?;
                    }
                    Ok(())
                });
                if let Err(e) = outcome {
                    eprintln!("error: {e:#} (runs already started finish; no new one starts)");
                    first_error.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                }
            });
        }
    });
    first_error.into_inner().unwrap_or_else(|p| p.into_inner()).map_or(Ok(()), Err)
}

/// What `vipo compare` returns.
pub struct CompareOutcome {
    pub dir: PathBuf,
    pub results: Results,
    pub trained: usize,
    pub reused: usize,
}

/// `vipo compare`.
pub fn compare(cfg: &Config, force: bool) -> Result<CompareOutcome> {
    let default_name = if cfg.sample_kind() == crate::image::SampleKind::Clips { "compare-video" } else { "compare" };
    let dir = cfg.out_dir.join(if cfg.run_name.is_empty() { default_name } else { cfg.run_name.as_str() });
    validate(cfg, &dir)?;
    // Checks an explicit train.base exists; the default is the shipped or cached base file.
    let base = crate::train::grpo::base_weights(cfg)?;
    let base_str = std::fs::canonicalize(&base).unwrap_or(base.clone()).display().to_string();
    // Load what every method needs (base weights, prompts, rewards, backbone) before the
    // comparison folder is made, so a start that fails leaves nothing behind.
    for (i, m) in cfg.compare.methods.iter().enumerate() {
        let c = method_config(cfg, m, i, 0, &dir, &base_str)?;
        crate::train::task::build(&c).with_context(|| format!("compare.methods[{i}] ({})", m.name))?;
        c.load_policy(&base, None, &crate::runtime::device()?, c.seed).with_context(|| format!("compare.methods[{i}] ({})", m.name))?;
    }
    let _lock = prepare_dir(cfg, &dir, force)?;

    // The base, evaluated once in a run-shaped folder so `vipo eval` can read it.
    let base_dir = dir.join("base_eval");
    if !base_dir.join(run_dir::CONFIG_FILE).is_file() {
        std::fs::create_dir_all(&base_dir)?;
        crate::io::atomic_write(&base_dir.join(run_dir::CONFIG_FILE), config::to_toml(cfg)?.as_bytes())?;
    }
    if !base_dir.join(run_dir::FINAL_WEIGHTS).is_file() {
        std::fs::copy(&base, base_dir.join(run_dir::FINAL_WEIGHTS)).with_context(|| format!("{}: cannot copy the base weights", base.display()))?;
    }
    evaluate_once(&base_dir, cfg.compare.eval_prompts)?;

    // Seed-major: an interrupted comparison already holds every method for the first seeds.
    let mut pending = Vec::new();
    for seed in 0..cfg.compare.seeds {
        for (i, m) in cfg.compare.methods.iter().enumerate() {
            let c = method_config(cfg, m, i, seed, &dir, &base_str)?;
            let rd = dir.join(&c.run_name);
            if !run_done(&rd) {
                pending.push((c, rd));
            }
        }
    }
    let total = cfg.compare.seeds * cfg.compare.methods.len();
    let reused = total - pending.len();
    run_pending(&pending, cfg.compare.jobs, cfg.compare.eval_prompts, reused, total)?;
    let trained = pending.len();
    let results = aggregate(cfg, &dir)?;
    crate::io::atomic_write(&dir.join("results.json"), serde_json::to_string_pretty(&results)?.as_bytes())?;
    crate::io::atomic_write(&dir.join("results.md"), results.markdown().as_bytes())?;
    crate::report::write_report(&report_input(cfg, &dir, &results)?, &dir.join("report.html"))?;
    Ok(CompareOutcome { dir, results, trained, reused })
}

/// One line of the comparison table: a method's reward on a split over seeds (`stat.n`:
/// seeds; for the base row: prompts, its interval being a bootstrap over prompts).
#[derive(Clone, Debug, Serialize)]
pub struct ResultRow {
    pub method: String,
    #[serde(flatten)]
    pub stat: EvalRow,
    pub per_seed: Vec<f64>,
}

/// A method's difference to the reference method, paired by seed.
#[derive(Clone, Debug, Serialize)]
pub struct DiffRow {
    pub method: String,
    pub reference: String,
    pub split: String,
    pub mean: f64,
    pub ci_low: f64,
    pub ci_high: f64,
    /// Seeds paired.
    pub n: usize,
    /// What the interval is over: "seeds" (Student t over paired seeds), or with one
    /// seed "prompts" (paired bootstrap over the eval prompts: same prompts and noise,
    /// so it measures prompt-level noise only, not training-seed variance).
    pub over: String,
}

impl DiffRow {
    /// The plain reading of the interval. Over seeds it is a verdict on the method. With one
    /// seed the interval is over prompts only: it says whether these two runs differ on these
    /// prompts, while a rerun with another seed moves a run by more than that (bench/NOTES.md
    /// §6.2), so it never says "better" or "worse".
    pub fn verdict(&self) -> String {
        let (above, below) = (self.ci_low > 0.0, self.ci_high < 0.0);
        if self.over == "seeds" {
            let v = if above {
                "better"
            } else if below {
                "worse"
            } else {
                "no significant difference"
            };
            format!("{v}; {} seeds", self.n)
        } else {
            let v = if above {
                "this run above the reference's on these prompts"
            } else if below {
                "this run below the reference's on these prompts"
            } else {
                "no difference on these prompts"
            };
            format!("{v}; one seed, CI over prompts only — not a verdict on the method: use --seeds 3 or more")
        }
    }
}

/// Training-side facts of a method (means over seeds).
#[derive(Clone, Debug, Serialize)]
pub struct MethodStats {
    pub method: String,
    /// First step at which the smoothed mean rollout reward reaches the reference's final
    /// smoothed value (`None`: not reached within the budget).
    pub steps_to_reference_final: Option<usize>,
    pub final_rollout_reward: f64,
    pub time_sample_s: f64,
    pub time_reward_s: f64,
    pub time_map_s: f64,
    pub time_update_s: f64,
    /// PSM share of the step time (0 for GRPO).
    pub map_overhead: f64,
    pub peak_rss_mb: f64,
    /// Mean `map_object_mass` / `object_area_frac` over steps (PSM methods).
    pub map_object_mass: Option<f64>,
    pub object_area_frac: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Results {
    pub methods: Vec<String>,
    /// The reward methods are ranked by ("compositional"; video: "vq_mq_mean").
    pub primary: String,
    pub seeds: usize,
    /// Seeds the comparison asks for (`compare.seeds`); more than `seeds` when `vipo report`
    /// aggregated an unfinished comparison over the seeds every method has finished.
    pub seeds_planned: usize,
    pub steps: usize,
    pub eval_prompts: usize,
    /// Trailing window (steps) of the smoothed rollout-reward curves (`compare.smooth_steps`).
    pub smooth_steps: usize,
    pub rows: Vec<ResultRow>,
    pub diffs: Vec<DiffRow>,
    pub stats: Vec<MethodStats>,
    /// Per method: per seed (step, cumulative wall seconds, rollout reward).
    #[serde(skip)]
    pub curves: BTreeMap<String, Vec<Vec<(f64, f64, f64)>>>,
    #[serde(skip)]
    pub mass_curves: BTreeMap<String, Vec<Vec<(f64, f64, f64)>>>,
}

/// A run's metrics.jsonl as JSON values.
fn read_metrics(rd: &Path) -> Result<Vec<serde_json::Value>> {
    let path = rd.join(run_dir::METRICS_FILE);
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}: cannot read", path.display()))?;
    text.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).with_context(|| format!("{}: corrupt line", path.display()))).collect()
}

/// Trailing mean over `window` steps (`compare.smooth_steps`).
fn smooth(v: &[f64], window: usize) -> Vec<f64> {
    (0..v.len()).map(|i| mean(&v[i.saturating_sub(window - 1)..=i])).collect()
}

/// First step (1-based) at which the trailing mean of `curve` reaches `target`. Only full
/// smoothing windows count: a partial window at the start is one or two noisy rollouts
/// and would often "reach" the target at step 1.
fn steps_to_reach(curve: &[f64], target: f64, window: usize) -> Option<usize> {
    let sm = smooth(curve, window);
    let first = if sm.len() >= window { window - 1 } else { 0 };
    sm.iter().skip(first).position(|&v| v >= target).map(|i| i + first + 1)
}

/// Mean over seeds at each step index all seeds reached.
fn mean_curve(seeds: &[Vec<(f64, f64, f64)>]) -> Vec<f64> {
    let len = seeds.iter().map(|s| s.len()).min().unwrap_or(0);
    (0..len).map(|i| mean(&seeds.iter().map(|s| s[i].2).collect::<Vec<_>>())).collect()
}

fn aggregate(cfg: &Config, dir: &Path) -> Result<Results> {
    let cc = &cfg.compare;
    let names: Vec<String> = cc.methods.iter().map(|m| m.name.clone()).collect();
    let mut rows = Vec::new();
    let base = evaluate_once(&dir.join("base_eval"), cc.eval_prompts)?;
    for r in &base.rows {
        rows.push(ResultRow { method: "base".into(), stat: r.clone(), per_seed: vec![r.mean] });
    }
    let mut evals: BTreeMap<String, Vec<EvalReport>> = BTreeMap::new();
    let mut curves = BTreeMap::new();
    let mut mass_curves = BTreeMap::new();
    let mut stats = Vec::new();
    for m in &cc.methods {
        let mut reps = Vec::new();
        let mut cs = Vec::new();
        let mut ms = Vec::new();
        let (mut ts, mut tr, mut tm, mut tu, mut rss) = (vec![], vec![], vec![], vec![], 0f64);
        let (mut mass, mut area) = (vec![], vec![]);
        for seed in 0..cc.seeds {
            let rd = dir.join(run_name(m, seed));
            reps.push(eval_run::read_report(&eval_run::eval_dir(&rd, "final").join("eval.json"))?);
            let mut wall = 0.0;
            let mut curve = Vec::new();
            let mut mc = Vec::new();
            for v in read_metrics(&rd)? {
                let f = |k: &str| v[k].as_f64().unwrap_or(0.0);
                wall += f("time_sample_s") + f("time_reward_s") + f("time_map_s") + f("time_update_s");
                curve.push((f("step"), wall, f("reward_mean")));
                ts.push(f("time_sample_s"));
                tr.push(f("time_reward_s"));
                tm.push(f("time_map_s"));
                tu.push(f("time_update_s"));
                rss = rss.max(f("rss_mb"));
                if f("object_area_frac") > 0.0 {
                    mass.push(f("map_object_mass"));
                    area.push(f("object_area_frac"));
                    mc.push((f("step"), wall, f("map_object_mass")));
                }
            }
            cs.push(curve);
            ms.push(mc);
        }
        let total = mean(&ts) + mean(&tr) + mean(&tm) + mean(&tu);
        let fin = smooth(&mean_curve(&cs), cc.smooth_steps).last().copied().unwrap_or(f64::NAN);
        stats.push(MethodStats {
            method: m.name.clone(),
            steps_to_reference_final: None,
            final_rollout_reward: fin,
            time_sample_s: mean(&ts),
            time_reward_s: mean(&tr),
            time_map_s: mean(&tm),
            time_update_s: mean(&tu),
            map_overhead: if total > 0.0 { mean(&tm) / total } else { 0.0 },
            peak_rss_mb: rss,
            map_object_mass: (!mass.is_empty()).then(|| mean(&mass)),
            object_area_frac: (!area.is_empty()).then(|| mean(&area)),
        });
        evals.insert(m.name.clone(), reps);
        curves.insert(m.name.clone(), cs);
        if ms.iter().any(|c| !c.is_empty()) {
            mass_curves.insert(m.name.clone(), ms);
        }
    }
    // Steps to reach the reference method's final smoothed rollout reward.
    let target = stats[0].final_rollout_reward;
    for s in &mut stats {
        s.steps_to_reference_final = steps_to_reach(&mean_curve(&curves[&s.method]), target, cc.smooth_steps);
    }
    // Eval rows: mean and 95 % t-interval over seeds (one seed: the bootstrap over prompts).
    for m in &names {
        let reps = &evals[m];
        for r0 in &reps[0].rows {
            let per_seed: Vec<f64> = reps.iter().filter_map(|rep| rep.row(&r0.split, &r0.reward).map(|r| r.mean)).collect();
            let (mu, lo, hi) = if per_seed.len() >= 2 { t_ci(&per_seed) } else { (r0.mean, r0.ci_low, r0.ci_high) };
            let stat = EvalRow { split: r0.split.clone(), reward: r0.reward.clone(), mean: mu, ci_low: lo, ci_high: hi, n: per_seed.len() };
            rows.push(ResultRow { method: m.clone(), stat, per_seed });
        }
    }
    // Paired (by seed) differences to the reference on the primary reward.
    let primary = eval_run::primary_reward(cfg);
    let mut diffs = Vec::new();
    for m in names.iter().skip(1) {
        for split in ["eval", "ood"] {
            let get = |name: &str| -> Vec<f64> { evals[name].iter().filter_map(|r| r.row(split, primary).map(|x| x.mean)).collect() };
            let d: Vec<f64> = get(m).iter().zip(get(&names[0])).map(|(a, b)| a - b).collect();
            let (mu, lo, hi, over) = if d.len() >= 2 {
                let (mu, lo, hi) = t_ci(&d);
                (mu, lo, hi, "seeds")
            } else {
                let per_prompt = |name: &str| evals[name][0].scores.get(split).and_then(|s| s.get(primary)).cloned().unwrap_or_default();
                let pd: Vec<f64> = per_prompt(m).iter().zip(per_prompt(&names[0])).map(|(a, b)| a - b).collect();
                let (lo, hi) = if pd.is_empty() { (d[0], d[0]) } else { bootstrap_ci(&pd, 2000, crate::policy::ode::EVAL_SEED) };
                (d[0], lo, hi, "prompts")
            };
            diffs.push(DiffRow { method: m.clone(), reference: names[0].clone(), split: split.into(), mean: mu, ci_low: lo, ci_high: hi, n: d.len(), over: over.into() });
        }
    }
    Ok(Results {
        methods: names,
        primary: primary.to_string(),
        seeds: cc.seeds,
        seeds_planned: cc.seeds,
        steps: cfg.train.steps,
        eval_prompts: cc.eval_prompts,
        smooth_steps: cc.smooth_steps,
        rows,
        diffs,
        stats,
        curves,
        mass_curves,
    })
}

impl Results {
    /// The statistic of `method` on `split` for `reward`.
    pub fn row(&self, method: &str, split: &str, reward: &str) -> Option<&EvalRow> {
        self.rows.iter().map(|r| (&r.method, &r.stat)).find(|(m, t)| *m == method && t.split == split && t.reward == reward).map(|(_, t)| t)
    }

    /// Three lines for the terminal.
    pub fn summary(&self) -> Vec<String> {
        let mut out = Vec::new();
        let fmt = |m: &str| -> String {
            let e = self.row(m, "eval", &self.primary);
            let o = self.row(m, "ood", &self.primary);
            match (e, o) {
                (Some(e), Some(o)) => format!("{m}: eval {:.3} [{:.3}, {:.3}], ood {:.3} [{:.3}, {:.3}]", e.mean, e.ci_low, e.ci_high, o.mean, o.ci_low, o.ci_high),
                _ => format!("{m}: no evaluation"),
            }
        };
        if self.seeds < self.seeds_planned {
            let over = if self.seeds == 1 { "seed 0".to_string() } else { format!("seeds 0–{}", self.seeds - 1) };
            out.push(format!(
                "UNFINISHED: {} of {} seeds are trained and evaluated for every method; these tables are over {over} only (vipo compare resumes the rest)",
                self.seeds, self.seeds_planned
            ));
        }
        out.push(format!("{} reward, {} seed(s) × {} steps, {} prompts/split — {}", self.primary, self.seeds, self.steps, self.eval_prompts, fmt("base")));
        out.push(self.methods.iter().map(|m| fmt(m)).collect::<Vec<_>>().join("; "));
        let d: Vec<String> = self.diffs.iter().map(|d| format!("{} − {} on {}: {:+.3} [{:+.3}, {:+.3}] ({})", d.method, d.reference, d.split, d.mean, d.ci_low, d.ci_high, d.verdict())).collect();
        out.push(if d.is_empty() { "one method: nothing to compare".into() } else { d.join("; ") });
        out
    }

    /// The comparison as markdown tables.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!(
            "# vipo compare\n\n{} seed(s) per method, {} RL steps, {} prompts per split (identical prompts and noise for every run). \
             Intervals: 95 % Student-t over seeds (the base row, and any single-seed row: 95 % bootstrap over prompts).\n\n",
            self.seeds, self.steps, self.eval_prompts
        ));
        for l in self.summary() {
            s.push_str(&format!("- {l}\n"));
        }
        s.push_str("\n## Rewards\n\n| method | split | reward | mean | 95 % CI | n |\n|---|---|---|---|---|---|\n");
        for r in &self.rows {
            let t = &r.stat;
            s.push_str(&format!("| {} | {} | {} | {:.3} | [{:.3}, {:.3}] | {} |\n", r.method, t.split, t.reward, t.mean, t.ci_low, t.ci_high, t.n));
        }
        if !self.diffs.is_empty() {
            s.push_str(&format!(
                "\n## Difference to the reference ({}, paired by seed)\n\n| method | reference | split | mean diff | 95 % CI | seeds | CI over |\n|---|---|---|---|---|---|---|\n",
                self.primary
            ));
            for d in &self.diffs {
                s.push_str(&format!("| {} | {} | {} | {:+.3} | [{:+.3}, {:+.3}] | {} | {} |\n", d.method, d.reference, d.split, d.mean, d.ci_low, d.ci_high, d.n, d.over));
            }
        }
        s.push_str(&format!(
            "\n## Training\n\nRollout rewards smoothed by a trailing mean of {} steps (`compare.smooth_steps`).\n\n| method | final rollout reward (smoothed) | steps to reach {}'s final | sample s | reward s | map s | update s | PSM share of step | peak RSS MB | map_object_mass | object_area_frac |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
            self.smooth_steps, self.methods[0]
        ));
        for st in &self.stats {
            let opt = |v: Option<f64>| v.map_or("–".to_string(), |x| format!("{x:.3}"));
            s.push_str(&format!(
                "| {} | {:.3} | {} | {:.2} | {:.3} | {:.3} | {:.2} | {:.1} % | {:.0} | {} | {} |\n",
                st.method,
                st.final_rollout_reward,
                st.steps_to_reference_final.map_or("not reached".into(), |v| v.to_string()),
                st.time_sample_s,
                st.time_reward_s,
                st.time_map_s,
                st.time_update_s,
                100.0 * st.map_overhead,
                st.peak_rss_mb,
                opt(st.map_object_mass),
                opt(st.object_area_frac)
            ));
        }
        s
    }
}

/// PNG files of a folder whose names start with `prefix`, sorted.
fn pngs(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "png") && p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(prefix)))
        .collect();
    v.sort();
    v
}

fn series(curves: &BTreeMap<String, Vec<Vec<(f64, f64, f64)>>>) -> Vec<crate::report::Series> {
    let mut out = Vec::new();
    for (m, seeds) in curves {
        for (s, c) in seeds.iter().enumerate() {
            out.push(crate::report::Series {
                method: m.clone(),
                seed: s as u64,
                step: c.iter().map(|p| p.0).collect(),
                wall_s: c.iter().map(|p| p.1).collect(),
                value: c.iter().map(|p| p.2).collect(),
            });
        }
    }
    out
}

/// The comparison's report: curves, tables, grids on identical prompts and noise, maps,
/// timings and the resolved configs.
fn report_input(cfg: &Config, dir: &Path, res: &Results) -> Result<crate::report::ReportInput> {
    use crate::report::{EvalRow as ReportRow, Figure, ReportInput, Timing};
    let mut curves = vec![("rollout reward (train prompts, SDE samples)".to_string(), series(&res.curves))];
    if !res.mass_curves.is_empty() {
        curves.push(("map_object_mass (share of allocation-map mass on object pixels)".to_string(), series(&res.mass_curves)));
    }
    let eval_rows = res.rows.iter().filter(|r| !r.stat.reward.contains('.')).map(|r| ReportRow { method: r.method.clone(), stat: r.stat.clone() }).collect();
    let mut extra = Vec::new();
    let crit: Vec<Vec<String>> = res
        .rows
        .iter()
        .filter(|r| r.stat.reward.contains('.'))
        .map(|r| {
            let t = &r.stat;
            vec![r.method.clone(), t.split.clone(), t.reward.clone(), format!("{:.3}", t.mean), format!("[{:.3}, {:.3}]", t.ci_low, t.ci_high)]
        })
        .collect();
    extra.push(("Reward terms by criterion".to_string(), ["method", "split", "criterion", "mean", "95 % CI"].map(String::from).to_vec(), crit));
    if !res.diffs.is_empty() {
        let rows = res
            .diffs
            .iter()
            .map(|d| vec![d.method.clone(), d.reference.clone(), d.split.clone(), format!("{:+.3}", d.mean), format!("[{:+.3}, {:+.3}]", d.ci_low, d.ci_high), d.n.to_string(), d.over.clone()])
            .collect();
        extra.push((
            format!("Difference to the reference ({}, paired by seed)", res.primary),
            ["method", "reference", "split", "mean diff", "95 % CI", "seeds", "CI over"].map(String::from).to_vec(),
            rows,
        ));
    }
    let rows = res
        .stats
        .iter()
        .map(|s| {
            vec![
                s.method.clone(),
                format!("{:.3}", s.final_rollout_reward),
                s.steps_to_reference_final.map_or("not reached".into(), |v| v.to_string()),
                format!("{:.1} %", 100.0 * s.map_overhead),
                s.map_object_mass.map_or("–".into(), |v| format!("{v:.3}")),
                s.object_area_frac.map_or("–".into(), |v| format!("{v:.3}")),
            ]
        })
        .collect();
    extra.push((
        format!("Training (steps to reach {}'s final smoothed rollout reward)", res.methods[0]),
        ["method", "final rollout reward", "steps to reference final", "PSM share of step", "map_object_mass", "object_area_frac"].map(String::from).to_vec(),
        rows,
    ));
    let mut sample_grids = Vec::new();
    for split in ["eval", "ood"] {
        let base = eval_run::eval_dir(&dir.join("base_eval"), "final").join(format!("grid_{split}.png"));
        if base.is_file() {
            sample_grids.push(Figure { caption: format!("base — {split} prompts"), path: base });
        }
        for m in &cfg.compare.methods {
            let p = eval_run::eval_dir(&dir.join(run_name(m, 0)), "final").join(format!("grid_{split}.png"));
            if p.is_file() {
                sample_grids.push(Figure { caption: format!("{} (seed 0) — {split} prompts, same noise", m.name), path: p });
            }
        }
    }
    let side_by_side = side_by_side(cfg, dir)?;
    for m in &cfg.compare.methods {
        for p in pngs(&dir.join(run_name(m, 0)).join("samples"), "step_") {
            let step = p.file_stem().unwrap().to_string_lossy().trim_start_matches("step_").trim_start_matches('0').to_string();
            sample_grids.push(Figure { caption: format!("{} (seed 0) at step {} — training grid prompts", m.name, if step.is_empty() { "0".into() } else { step }), path: p });
        }
    }
    let mut map_grids = Vec::new();
    for m in &cfg.compare.methods {
        let all = pngs(&dir.join(run_name(m, 0)).join("maps"), "step_");
        for p in all.first().into_iter().chain(all.last().filter(|_| all.len() > 1)) {
            map_grids
                .push(Figure { caption: format!("{} (seed 0) {}: sample | allocation map | signed advantage (red up, blue down)", m.name, p.file_stem().unwrap().to_string_lossy()), path: p.clone() });
        }
    }
    let timings = res
        .stats
        .iter()
        .map(|s| Timing { method: s.method.clone(), sample_s: s.time_sample_s, reward_s: s.time_reward_s, map_s: s.time_map_s, update_s: s.time_update_s, peak_rss_mb: s.peak_rss_mb })
        .collect();
    let mut configs = vec![("compare.toml (shared)".to_string(), std::fs::read_to_string(dir.join(COMPARE_FILE)).unwrap_or_default())];
    for m in &cfg.compare.methods {
        let p = dir.join(run_name(m, 0)).join(run_dir::CONFIG_FILE);
        configs.push((format!("{} (seed 0)", m.name), std::fs::read_to_string(&p).with_context(|| format!("{}: cannot read", p.display()))?));
    }
    Ok(ReportInput {
        title: format!("vipo compare — {}", res.methods.join(" vs ")),
        summary: res.summary(),
        curves,
        eval_rows,
        extra_tables: extra,
        side_by_side,
        sample_grids,
        map_grids,
        timings,
        configs,
    })
}

/// Prompts shown side by side: the first few `eval` prompts.
const SIDE_BY_SIDE_ROWS: usize = 6;

/// Base | method 1 | method 2 … (seed 0) on the same eval prompt and the same noise, one
/// image per prompt: cells cut from each run's `grid_eval.png` (they share prompts and
/// noise by construction), written to `DIR/side_by_side/eval_K.png`, captioned with the
/// prompt and each column's score from the grids' legends.
fn side_by_side(cfg: &Config, dir: &Path) -> Result<Vec<crate::report::Figure>> {
    if cfg.sample_kind() != crate::image::SampleKind::Images {
        return Ok(Vec::new());
    }
    let mut cols: Vec<(String, PathBuf)> = vec![("base".into(), eval_run::eval_dir(&dir.join("base_eval"), "final").join("grid_eval.png"))];
    cols.extend(cfg.compare.methods.iter().map(|m| (m.name.clone(), eval_run::eval_dir(&dir.join(run_name(m, 0)), "final").join("grid_eval.png"))));
    // Grids written before legends existed get no side-by-side rows.
    let Some(legends) = cols.iter().map(|(_, png)| crate::image::read_legend(png)).collect::<Option<Vec<_>>>() else { return Ok(Vec::new()) };
    let grids = cols.iter().map(|(_, png)| crate::image::Image::load(png)).collect::<Result<Vec<_>>>()?;
    let out_dir = dir.join("side_by_side");
    std::fs::create_dir_all(&out_dir).with_context(|| format!("{}: cannot create", out_dir.display()))?;
    let cell = crate::image::grid_scale(cfg.model.image_size) * cfg.model.image_size;
    let mut figs = Vec::new();
    for (i, first) in legends[0].iter().take(SIDE_BY_SIDE_ROWS).enumerate() {
        let tiles = grids.iter().map(|g| crate::image::grid_cell(g, cell, cell, eval_run::GRID_COLS, i)).collect::<Result<Vec<_>>>()?;
        let path = out_dir.join(format!("eval_{i}.png"));
        crate::image::grid(&tiles, tiles.len()).save_png(&path)?;
        let scores: Vec<String> = cols
            .iter()
            .zip(&legends)
            .map(|((name, _), l)| match l.get(i).and_then(|c| c.score) {
                Some(v) => format!("{name} {v:.2}"),
                None => name.clone(),
            })
            .collect();
        figs.push(crate::report::Figure { caption: format!("\"{}\" — {}", first.prompt, scores.join(" · ")), path });
    }
    Ok(figs)
}

/// Re-aggregate a comparison directory and rewrite its results and report. An unfinished
/// comparison (still training, or interrupted) is aggregated over the seeds every method has
/// finished, and says so; with no finished seed there is nothing to aggregate.
pub fn rewrite_report(dir: &Path) -> Result<Results> {
    let path = dir.join(COMPARE_FILE);
    let mut cfg: Config = config::load(Some(&path), &[])?;
    check_counts(&cfg.compare).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let planned = cfg.compare.seeds;
    let done = finished_seeds(&cfg, dir);
    if done == 0 {
        let missing: Vec<String> = cfg.compare.methods.iter().map(|m| run_name(m, 0)).filter(|r| !run_done(&dir.join(r))).collect();
        bail!("{}: no seed is finished for every method yet ({} not trained and evaluated); run vipo compare to train them", dir.display(), missing.join(", "));
    }
    cfg.compare.seeds = done;
    let mut results = aggregate(&cfg, dir)?;
    results.seeds_planned = planned;
    crate::io::atomic_write(&dir.join("results.json"), serde_json::to_string_pretty(&results)?.as_bytes())?;
    crate::io::atomic_write(&dir.join("results.md"), results.markdown().as_bytes())?;
    crate::report::write_report(&report_input(&cfg, dir, &results)?, &dir.join("report.html"))?;
    Ok(results)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One seed's interval is over prompts: it may say the two runs differ, never that the
    /// method is better or worse (the demo once printed "better" for +0.005 [+0.000, +0.009]
    /// between two runs that had not moved from the base). Over seeds it is a verdict.
    #[test]
    fn one_seed_never_claims_better_or_worse() {
        let d = |lo: f64, hi: f64, over: &str, n: usize| DiffRow {
            method: "vipo".into(),
            reference: "grpo".into(),
            split: "eval".into(),
            mean: (lo + hi) / 2.0,
            ci_low: lo,
            ci_high: hi,
            n,
            over: over.into(),
        };
        for (lo, hi, want) in [(0.001, 0.009, "above"), (-0.009, -0.001, "below"), (-0.01, 0.01, "no difference")] {
            let v = d(lo, hi, "prompts", 1).verdict();
            assert!(v.contains(want) && v.contains("not a verdict on the method") && v.contains("one seed, CI over prompts only"), "{v}");
            assert!(!v.contains("better") && !v.contains("worse"), "{v}");
        }
        assert_eq!(d(0.001, 0.009, "seeds", 5).verdict(), "better; 5 seeds");
        assert_eq!(d(-0.009, -0.001, "seeds", 3).verdict(), "worse; 3 seeds");
        assert_eq!(d(-0.01, 0.01, "seeds", 3).verdict(), "no significant difference; 3 seeds");
    }

    /// Methods share the base, the seeds and the evaluation sampler: keys that would change
    /// them are refused, naming the method and key.
    #[test]
    fn methods_may_not_change_shared_settings() {
        let common = Config::default();
        for key in ["sample.guidance=3", "model.dim=64", "pretrain.steps=5", "seed=3", "train.base=x"] {
            let m = MethodSpec { name: "m".into(), set: vec![key.into()] };
            let e = method_config(&common, &m, 1, 0, Path::new("/tmp"), "b").unwrap_err().to_string();
            assert!(e.contains("compare.methods[1] (m)") && e.contains(key.split('=').next().unwrap()), "{e}");
        }
        let ok = MethodSpec { name: "m".into(), set: vec!["train.algo=vipo".into()] };
        assert!(method_config(&common, &ok, 1, 0, Path::new("/tmp"), "b").is_ok());
    }

    /// Every shipped comparison config passes the same checks `vipo compare` makes before
    /// any work, so a typo in a method's `set` fails here and not hours into a comparison.
    #[test]
    fn shipped_comparison_configs_resolve() {
        for name in ["compare.toml", "ablations.toml", "g16.toml"] {
            let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs").join(name);
            let cfg: Config = config::load(Some(&p), &[]).unwrap();
            assert!(cfg.compare.methods.len() >= 2, "{name}");
            validate(&cfg, Path::new("/nonexistent/compare")).unwrap_or_else(|e| panic!("{name}: {e:#}"));
            let algos: Vec<_> = cfg.compare.methods.iter().enumerate().map(|(i, m)| method_config(&cfg, m, i, 1, Path::new("/x"), "b").unwrap()).collect();
            assert_eq!(algos[0].train.algo, config::Algo::Grpo, "{name}: GRPO is the reference method");
            assert_eq!(algos[0].seed, cfg.seed + 1);
        }
    }

    /// `configs/g16.toml` is the first two methods of `configs/ablations.toml`, run for run:
    /// numbers from either describe the same GRPO and ViPO runs.
    #[test]
    fn g16_config_is_the_ablations_first_two_methods() {
        let load = |n: &str| config::load::<Config>(Some(&Path::new(env!("CARGO_MANIFEST_DIR")).join("configs").join(n)), &[]).unwrap();
        let (pair, all) = (load("g16.toml"), load("ablations.toml"));
        assert_eq!(pair.compare.methods.len(), 2);
        for (i, m) in pair.compare.methods.iter().enumerate() {
            let a = &all.compare.methods[i];
            assert_eq!((&m.name, &m.set), (&a.name, &a.set));
            // `same_run` is what decides whether compare reuses a run ([compare] ignored).
            let resolve = |c: &Config, m: &MethodSpec| method_config(c, m, i, 2, Path::new("/x"), "b").unwrap();
            assert!(same_run(&resolve(&pair, m), &resolve(&all, a)), "{}: g16.toml and ablations.toml train it differently", m.name);
        }
    }

    /// `train.base = ""` means the shipped base here too, not a freshly pretrained cache
    /// entry (a comparison with the default [model] once pretrained its own base).
    #[test]
    fn default_base_is_the_shipped_one() {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/ablations.toml");
        let cfg: Config = config::load(Some(&p), &[]).unwrap();
        let shipped = crate::base::shipped_in(&crate::base::shipped_dir(), &cfg).unwrap().expect("the shipped base fits the default [model]");
        assert_eq!(crate::train::grpo::base_weights(&cfg).unwrap(), shipped);
        // An explicit train.base is used as given.
        let mut other = cfg.clone();
        other.train.base = shipped.display().to_string();
        assert_eq!(crate::train::grpo::base_weights(&other).unwrap(), shipped);
    }

    /// A real generator's config is refused before any work, naming the field (it once
    /// failed later with a misleading "train.base … does not exist").
    #[test]
    fn real_generators_are_refused_up_front() {
        for name in ["tiny-sd35.toml", "tiny-flux.toml"] {
            let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs").join(name);
            let mut cfg: Config = config::load(Some(&p), &[]).unwrap();
            cfg.compare = config::load::<Config>(Some(&Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/compare.toml")), &[]).unwrap().compare;
            let dir = std::env::temp_dir().join(format!("vipo-compare-real-{}-{name}", std::process::id()));
            cfg.out_dir = dir.clone();
            let e = compare(&cfg, false).err().map(|e| format!("{e:#}")).unwrap_or_default();
            assert!(e.starts_with("modality: vipo compare runs on the ShapeWorld testbeds"), "{name}: {e}");
            assert!(e.contains(&format!("(\"{}\")", cfg.modality)) && !e.contains("Sd3") && !e.contains("Flux"), "{name}: the config spelling, not the Rust name: {e}");
            assert!(!dir.exists());
        }
    }

    #[test]
    fn steps_to_reach_ignores_partial_windows() {
        // A lucky first rollout must not count as reaching the target.
        let c = [0.9, 0.1, 0.1, 0.1, 0.1, 0.5, 0.5, 0.5, 0.5, 0.5];
        let target = smooth(&c, 5).last().copied().unwrap();
        assert_eq!(target, 0.5);
        assert_eq!(steps_to_reach(&c, target, 5), Some(10));
        assert_eq!(steps_to_reach(&c, 0.3, 5), Some(8)); // steps 4..8: (0.1·2 + 0.5·3)/5 = 0.34
        assert_eq!(steps_to_reach(&c, 0.6, 5), None);
        assert_eq!(steps_to_reach(&[0.2, 0.4], 0.3, 5), Some(2)); // shorter than a window: partial means
                                                                  // A longer window needs more of the curve at the level: steps 1..8 average 0.35.
        assert_eq!(steps_to_reach(&c, 0.3, 8), Some(8));
        assert_eq!(steps_to_reach(&c, 0.4, 8), None); // the last window, steps 3..10, averages 0.35
        assert_eq!(steps_to_reach(&c, 0.4, 5), Some(9));
        // A one-step spike reaches a target under a 1-step window, not under a 5-step one.
        let spike = [0.1, 0.1, 0.1, 0.1, 0.1, 0.9, 0.1, 0.1];
        assert_eq!(steps_to_reach(&spike, 0.5, 1), Some(6));
        assert_eq!(steps_to_reach(&spike, 0.5, 5), None);
    }

    /// The `[compare]` section rides along in each run's config, but training never reads
    /// it: an interrupted run resumes after `--seeds` grows or the smoothing window
    /// changes, and restarts only when a training setting differs.
    #[test]
    fn runs_resume_across_compare_only_changes() {
        let saved = Config::default();
        let mut c = saved.clone();
        c.compare.seeds += 2;
        c.compare.smooth_steps = 24;
        c.progress = !saved.progress;
        assert!(same_run(&saved, &c));
        c.train.lr *= 2.0;
        assert!(!same_run(&saved, &c));
    }

    /// Growing the seeds or changing the smoothing window or the jobs reuses the comparison folder;
    /// any other change is refused without --force, and nothing in the folder is touched.
    #[test]
    fn a_comparison_folder_is_reused_only_for_the_same_comparison() {
        let dir = std::env::temp_dir().join(format!("vipo-compare-prepare-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cfg = Config::default();
        prepare_dir(&cfg, &dir, false).unwrap();
        std::fs::write(dir.join("keep"), "x").unwrap();
        let mut more = cfg.clone();
        more.compare.seeds = 9;
        more.compare.smooth_steps = 24;
        more.compare.jobs = 2;
        prepare_dir(&more, &dir, false).unwrap();
        let saved: Config = config::load(Some(&dir.join(COMPARE_FILE)), &[]).unwrap();
        assert_eq!((saved.compare.seeds, saved.compare.smooth_steps), (9, 24));
        let mut other = more.clone();
        other.train.lr *= 2.0;
        let e = prepare_dir(&other, &dir, false).unwrap_err().to_string();
        assert!(e.contains("different comparison") && e.contains("--force"), "{e}");
        assert!(dir.join("keep").is_file());
        // While one comparison holds the folder, a second start is refused (even with
        // --force, which would delete the runs under it), naming the holder's pid.
        let held = prepare_dir(&more, &dir, false).unwrap();
        for force in [false, true] {
            let e = prepare_dir(&other, &dir, force).unwrap_err().to_string();
            assert!(e.contains("in use by another vipo process") && e.contains(&format!("pid {}", std::process::id())), "{e}");
        }
        assert!(dir.join("keep").is_file());
        drop(held);
        // A hand-edited window of 0 is refused by name before anything is re-aggregated.
        let text = std::fs::read_to_string(dir.join(COMPARE_FILE)).unwrap().replace("smooth_steps = 24", "smooth_steps = 0");
        std::fs::write(dir.join(COMPARE_FILE), text).unwrap();
        let e = rewrite_report(&dir).unwrap_err().to_string();
        assert!(e.contains("compare.toml") && e.contains("compare.smooth_steps"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
