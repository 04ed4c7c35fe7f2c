//! The thin command-line layer: parse arguments, load configs, call into the library,
//! print one-line errors (no backtraces for user mistakes).

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use std::path::{Path, PathBuf};

use crate::config::{self, Config};
use crate::image::SampleKind;

#[derive(Parser)]
#[command(name = "vipo", version, about = "ViPO: pixel-level policy optimization for flow-matching generators")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Clone)]
struct ConfigArgs {
    /// TOML config file (every field optional; defaults documented in configs/).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override any config field: --set pretrain.steps=100 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Replace an existing run directory of the same name.
    #[arg(long)]
    force: bool,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Pretrain the base policy on rendered ShapeWorld scenes.
    Pretrain(PretrainArgs),
    /// Post-train with GRPO or ViPO (train.algo).
    Train(TrainArgs),
    /// Sample images from a checkpoint with the Euler ODE sampler.
    Sample(SampleArgs),
    /// The main job: pretrain the base (cached), compare GRPO vs ViPO from it, evaluate, write report.html.
    Demo(DemoArgs),
    /// GRPO vs ViPO (and ablations) × seeds from one base; results tables and report.html.
    Compare(CompareArgs),
    /// Write report.html for a run or a comparison directory.
    Report {
        /// A `vipo train` run or a `vipo compare` directory.
        dir: PathBuf,
        /// Then load it in headless chromium: fail on console messages or images that do not load.
        #[arg(long)]
        check: bool,
    },
    /// Evaluate a run on fixed eval/ood prompts and noise: rewards with 95% CIs, per-criterion breakdown, OOD gap.
    Eval(EvalArgs),
    /// Allocation maps (PSM) for image files or a run's samples: overlays + every stage.
    Map(MapArgs),
    /// Convert a torch .pth (zip or legacy pickle; never executed) to safetensors.
    ConvertWeights {
        src: PathBuf,
        dst: PathBuf,
        /// Store as f16 (halves the size; how weights/mobilenet_v2.safetensors was made).
        #[arg(long)]
        f16: bool,
    },
    /// Store a finished image pretraining run as the shipped base: f16 weights, `vipo eval`
    /// of the stored file and PROVENANCE.json with its sha256 (weights/base/ by default).
    ExportBase {
        /// The `vipo pretrain` run directory.
        #[arg(long)]
        run: PathBuf,
        /// Export the (EMA) checkpoint after this many steps instead of the final weights.
        #[arg(long)]
        checkpoint: Option<usize>,
        /// Output directory (default: weights/base of this source tree).
        #[arg(long)]
        out: Option<PathBuf>,
        /// The exact command that produced the run (recorded).
        #[arg(long)]
        command: String,
        /// The commit of the code that produced the run (recorded).
        #[arg(long)]
        commit: String,
        /// The machine it ran on (recorded).
        #[arg(long, default_value = "")]
        machine: String,
    },
    /// Print the resolved config (defaults + file + --set) as TOML.
    Config(ConfigArgs),
    /// Speed benchmarks (release build recommended).
    Bench(BenchArgs),
    /// What one GRPO/ViPO step of the [sd3] generator needs: parameters, memory, FLOPs.
    Plan(ConfigArgs),
}

#[derive(Args)]
struct TrainArgs {
    /// Continue the run in this directory from its latest checkpoint (its saved config
    /// is used; --set may only change train.steps).
    #[arg(long)]
    resume: Option<PathBuf>,
    #[command(flatten)]
    cfg: ConfigArgs,
}

#[derive(Args)]
struct PretrainArgs {
    /// Continue the pretraining run in this directory from its latest checkpoint, exactly
    /// (its saved config is used; no --config or --set).
    #[arg(long)]
    resume: Option<PathBuf>,
    #[command(flatten)]
    cfg: ConfigArgs,
}

#[derive(Args)]
struct SampleArgs {
    /// A run directory (uses its config and final weights) ...
    #[arg(long)]
    run: Option<PathBuf>,
    /// ... or a weights file (with --config for the model section).
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// A prompt (repeatable).
    #[arg(long)]
    prompt: Vec<String>,
    /// A file with one prompt per line (blank lines and # comments ignored).
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Noise seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    cfg: ConfigArgs,
}

#[derive(Args)]
struct MapArgs {
    /// PNG/JPEG RGB images (repeatable) ...
    #[arg(long)]
    image: Vec<PathBuf>,
    /// ... or clips given as frame strips (frames side by side; repeatable) ...
    #[arg(long)]
    clip: Vec<PathBuf>,
    /// Frames per strip with --clip (default: video_model.frames).
    #[arg(long)]
    frames: Option<usize>,
    /// ... or a run directory: maps of its model's samples on eval prompts (clips for a
    /// video run).
    #[arg(long)]
    run: Option<PathBuf>,
    /// Number of samples with --run.
    #[arg(long, default_value_t = 8)]
    n: usize,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    cfg: ConfigArgs,
}

#[derive(Args)]
struct CompareArgs {
    /// Runs per method (overrides compare.seeds).
    #[arg(long)]
    seeds: Option<usize>,
    /// Runs trained at once, each on cores / N threads (overrides compare.jobs).
    #[arg(long)]
    jobs: Option<usize>,
    #[command(flatten)]
    cfg: ConfigArgs,
}

#[derive(Args)]
struct EvalArgs {
    /// The run directory (`vipo pretrain` or `vipo train`).
    #[arg(long)]
    run: PathBuf,
    /// Evaluate this checkpoint step instead of the final weights.
    #[arg(long)]
    checkpoint: Option<usize>,
    /// Prompts per split (default: the run's train.eval_prompts, or 512 when that is 0).
    #[arg(long)]
    n: Option<usize>,
    /// Override [sample] fields, e.g. --set sample.steps=40 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Replace an existing evaluation of the same weights.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct DemoArgs {
    /// Ignore the shipped and cached base models and pretrain a short base again
    /// (`[pretrain]` defaults: ≈ 13 min on 2 cores).
    #[arg(long)]
    fresh: bool,
    /// Seeds per method (the comparison of bench/NOTES.md §6.1 uses 3).
    #[arg(long, default_value_t = 1)]
    seeds: usize,
    /// RL steps per run (default 20 for images — fewer than train.steps' 30 so that the
    /// demo, pretraining included, stays under 15 minutes on 2 cores — and 10 for video).
    #[arg(long)]
    steps: Option<usize>,
    /// The video demo: ShapeWorld-Video, the spatio-temporal policy, VQ/MQ rewards
    /// (the embedded configs/video.toml unless --config is given).
    #[arg(long)]
    video: bool,
    #[command(flatten)]
    cfg: ConfigArgs,
}

#[derive(Args)]
struct BenchArgs {
    /// What to measure: block | policy | psm | video | step | gen-step | mmdit | attention | all (all = every one but step, gen-step, mmdit and attention).
    /// gen-step: a real generator's step (the config's sd3/flux variant) at full size on random weights
    #[arg(default_value = "all")]
    what: String,
    /// Timed iterations (median reported).
    #[arg(long, default_value_t = 5)]
    iters: usize,
    /// `gen-step` only: timed training steps after the transformer timings, with no
    /// warm-up step of their own (0: only the transformer forward and forward + backward).
    #[arg(long, default_value_t = 1)]
    steps: usize,
    /// `psm` only: measure map mass on this run's own samples (64 `vipo eval` prompts,
    /// foreground masks) instead of on ground-truth renders.
    #[arg(long)]
    run: Option<PathBuf>,
    /// With --run: a checkpoint step instead of the final weights.
    #[arg(long)]
    checkpoint: Option<usize>,
    /// `step` only: the config whose training step is timed (default: configs/default.toml's values).
    #[command(flatten)]
    cfg: ConfigArgs,
}

pub fn main() -> i32 {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => 0,
        Err(e) => {
            // One line per cause, no backtrace: these are user-facing errors.
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            1
        }
    }
}

/// Run one command line (`["vipo", "train", …]`) as `main` would, returning its error.
pub fn run_args<I: IntoIterator<Item = String>>(args: I) -> Result<()> {
    run(Cli::try_parse_from(args)?)
}

fn load_config(a: &ConfigArgs) -> Result<Config> {
    quiet(config::load(a.config.as_deref(), &a.set)?, a)
}

/// No progress bars with --quiet or under CI.
fn quiet(mut cfg: Config, a: &ConfigArgs) -> Result<Config> {
    if a.quiet || std::env::var_os("CI").is_some() {
        cfg.progress = false;
    }
    Ok(cfg)
}

fn run_dir_for(cfg: &Config, default_name: &str) -> PathBuf {
    let name = if cfg.run_name.is_empty() { default_name } else { cfg.run_name.as_str() };
    cfg.out_dir.join(name)
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Pretrain(PretrainArgs { resume: Some(dir), cfg: a }) => {
            crate::run_dir::require_run_dir(&dir)?;
            anyhow::ensure!(a.config.is_none() && a.set.is_empty(), "--resume uses the run's saved config ({}); drop --config/--set", dir.join(crate::run_dir::CONFIG_FILE).display());
            let ca = ConfigArgs { config: Some(dir.join(crate::run_dir::CONFIG_FILE)), ..a };
            let cfg = load_config(&ca)?;
            let out = crate::train::pretrain::pretrain_from(&cfg, &dir, true)?;
            print_pretrain(&out);
            Ok(())
        }
        Cmd::Pretrain(PretrainArgs { resume: None, cfg: a }) => {
            let cfg = load_config(&a)?;
            crate::train::pretrain::validate_config(&cfg)?;
            let dir = crate::run_dir::create_run_dir(&run_dir_for(&cfg, "pretrain"), &cfg, a.force)?;
            let out = crate::train::pretrain::pretrain(&cfg, &dir)?;
            print_pretrain(&out);
            Ok(())
        }
        Cmd::Train(a) => train_cmd(a),
        Cmd::Map(a) => map_cmd(a),
        Cmd::ConvertWeights { src, dst, f16 } => {
            let n = crate::weights::pth::convert_pth_to_safetensors(&src, &dst, f16)?;
            println!("wrote {n} tensors to {}", dst.display());
            Ok(())
        }
        Cmd::ExportBase { run, checkpoint, out, command, commit, machine } => {
            let out = out.unwrap_or_else(crate::base::shipped_dir);
            let p = crate::eval::export::export(&run, checkpoint, &out, &command, &commit, &machine)?;
            println!("wrote {} (sha256 {}); vipo eval: {:.3} eval / {:.3} ood", out.join(&p.file).display(), p.sha256, p.eval.compositional, p.ood.compositional);
            Ok(())
        }
        Cmd::Config(a) => {
            print!("{}", config::to_toml(&load_config(&a)?)?);
            Ok(())
        }
        Cmd::Sample(a) => sample_cmd(a),
        Cmd::Demo(a) => demo(a),
        Cmd::Compare(a) => {
            let mut cfg = load_config(&a.cfg)?;
            if let Some(n) = a.seeds {
                cfg.compare.seeds = n;
            }
            if let Some(n) = a.jobs {
                cfg.compare.jobs = n;
            }
            let out = crate::compare::compare(&cfg, a.cfg.force)?;
            for l in out.results.summary() {
                println!("{l}");
            }
            println!("{} runs trained, {} reused; results: {}", out.trained, out.reused, out.dir.join("results.md").display());
            println!("report: {}", out.dir.join("report.html").display());
            Ok(())
        }
        Cmd::Report { dir, check } => {
            let path = dir.join("report.html");
            if dir.join(crate::compare::COMPARE_FILE).is_file() {
                for l in crate::compare::rewrite_report(&dir)?.summary() {
                    println!("{l}");
                }
            } else {
                crate::report::write_report(&crate::run_report::run_report_input(&dir)?, &path)?;
            }
            println!("report: {}", path.display());
            if check {
                let browser = crate::report::browser::find_browser().ok_or_else(|| anyhow::anyhow!("--check needs a headless browser: apt-get install chromium, or set VIPO_CHROMIUM"))?;
                let c = crate::report::browser::check(&browser, &path)?;
                println!("browser check ({}): {} images, {} broken, {} console messages", browser.display(), c.images, c.broken_images, c.console.len());
                for l in &c.console {
                    println!("  {l}");
                }
                anyhow::ensure!(c.ok(), "{}: failed the browser check", path.display());
            }
            Ok(())
        }
        Cmd::Eval(a) => {
            let (out, rep) = crate::eval::run::eval_run(&a.run, &a.set, a.checkpoint, a.n, a.force)?;
            crate::eval::run::print_report(&rep);
            println!("wrote {}", out.join("eval.json").display());
            Ok(())
        }
        Cmd::Plan(a) => {
            let cfg = load_config(&a)?;
            print!("{}", crate::plan::render(&crate::plan::plan(&cfg)?, &cfg));
            Ok(())
        }
        Cmd::Bench(a) => crate::bench::run_cli(&a.what, a.iters, a.steps, a.run.as_deref().map(|r| (r, a.checkpoint)), &load_config(&a.cfg)?),
    }
}

fn print_pretrain(out: &crate::train::pretrain::PretrainOutcome) {
    println!("run: {}", out.run_dir.display());
    println!("loss {:.4} → {:.4}, {:.1} samples/s", out.first_loss, out.final_loss, out.images_per_s);
    if let Some((e, o)) = out.scores {
        println!("base score ({}): eval {e:.3}, ood {o:.3}", out.score_name);
    }
    println!("weights: {}", out.weights.display());
}

/// Parse prompts (with `parse`) from the command line and/or a file; errors name the
/// file and line.
fn read_prompts_with<T>(cli: &[String], file: Option<&Path>, parse: impl Fn(&str) -> Result<T>) -> Result<Vec<T>> {
    let mut out = Vec::new();
    for p in cli {
        out.push(parse(p).with_context(|| format!("--prompt {p:?}"))?);
    }
    if let Some(f) = file {
        let text = std::fs::read_to_string(f).with_context(|| format!("{}: cannot read prompt file", f.display()))?;
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            out.push(parse(line).with_context(|| format!("{}:{}", f.display(), i + 1))?);
        }
    }
    anyhow::ensure!(!out.is_empty(), "no prompts: give --prompt TEXT or --prompts FILE");
    Ok(out)
}

/// Image prompts from the command line and/or a file.
pub fn read_prompts(cli: &[String], file: Option<&Path>) -> Result<Vec<crate::world::PromptSpec>> {
    read_prompts_with(cli, file, crate::world::PromptSpec::parse)
}

fn train_cmd(a: TrainArgs) -> Result<()> {
    match &a.resume {
        None => {
            let cfg = load_config(&a.cfg)?;
            let dir = run_dir_for(&cfg, &config::spelling(&cfg.train.algo));
            crate::train::grpo::train_cli(&cfg, &dir, false, a.cfg.force)
        }
        Some(dir) => {
            crate::run_dir::require_run_dir(dir)?;
            let saved_path = dir.join(crate::run_dir::CONFIG_FILE);
            let saved: Config = config::load(Some(&saved_path), &[])?;
            let mut ca = a.cfg.clone();
            if let Some(user) = &a.cfg.config {
                // A config given with --resume must describe the same run.
                let given: Config = config::load(Some(user), &a.cfg.set)?;
                let mut g = given.clone();
                g.train.steps = saved.train.steps;
                g.progress = saved.progress;
                anyhow::ensure!(
                    g == saved,
                    "{}: --config differs from the run's saved config {} ({}); resume uses the saved config",
                    user.display(),
                    saved_path.display(),
                    config::differences(&saved, &g, 6)
                );
            }
            ca.config = Some(saved_path.clone());
            let cfg = load_config(&ca)?;
            let mut c2 = cfg.clone();
            c2.train.steps = saved.train.steps;
            c2.progress = saved.progress;
            anyhow::ensure!(c2 == saved, "--set with --resume may only change train.steps (the run's config is in {}; {})", saved_path.display(), config::differences(&saved, &c2, 6));
            // Record the extended step budget in the run's config.
            crate::io::atomic_write(&saved_path, config::to_toml(&cfg)?.as_bytes())?;
            crate::train::grpo::train_cli(&cfg, dir, true, false)
        }
    }
}

fn map_cmd(a: MapArgs) -> Result<()> {
    // Clips: temporal maps (from strips, or a video run's samples).
    let video_run = match &a.run {
        Some(run) => {
            crate::run_dir::require_run_dir(run)?;
            let saved: Config = config::load(Some(&run.join(crate::run_dir::CONFIG_FILE)), &[])?;
            saved.sample_kind() == SampleKind::Clips
        }
        None => false,
    };
    if !a.clip.is_empty() || video_run {
        anyhow::ensure!(a.image.is_empty() && (a.clip.is_empty() || a.run.is_none()), "give --image FILE, --clip STRIP or --run DIR, one kind only");
        let (cfg, clips) = if let Some(run) = &a.run {
            let mut ca = a.cfg.clone();
            ca.config = Some(run.join(crate::run_dir::CONFIG_FILE));
            let cfg = load_config(&ca)?;
            let device = crate::runtime::device()?;
            let policy = crate::policy::shapeworld::video_dit::VideoPolicy::load(&cfg.video_model, &run.join(crate::run_dir::FINAL_WEIGHTS), None, &device, 0)?;
            let specs = crate::world::video::video_prompts(crate::world::Split::Eval, a.n, 7);
            let clips = crate::generate::generate_clips(&policy, &specs, 0, &cfg.sample)?;
            (cfg, clips.into_iter().enumerate().map(|(i, c)| (format!("clip_{i:03}"), c)).collect::<Vec<_>>())
        } else {
            let cfg = load_config(&a.cfg)?;
            let frames = a.frames.unwrap_or(cfg.video_model.frames);
            let mut clips = Vec::new();
            for p in &a.clip {
                let name = p.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "clip".into());
                clips.push((name, crate::mapview::split_strip(p, frames, cfg.video_model.patch)?));
            }
            (cfg, clips)
        };
        let n = crate::mapview::write_clip_maps(&cfg, &clips, &a.out)?;
        println!("wrote {n} temporal maps to {} (<name>_frames.png, <name>_maps.safetensors)", a.out.display());
        return Ok(());
    }
    let (cfg, images) = match (&a.run, a.image.is_empty()) {
        (None, false) => {
            let cfg = load_config(&a.cfg)?;
            let imgs = crate::mapview::load_images(&a.image, cfg.model.patch)?;
            (cfg, imgs)
        }
        (Some(run), true) => {
            crate::run_dir::require_run_dir(run)?;
            let mut ca = a.cfg.clone();
            ca.config = Some(run.join(crate::run_dir::CONFIG_FILE));
            let cfg = load_config(&ca)?;
            let imgs = if cfg.generator().is_real() {
                // The run's held-out eval prompts, from its last checkpoint.
                let (policy, _) = crate::eval::run::load_run_policy(run, &cfg, None)?;
                let prompts = crate::generate::held_out_splits(&cfg, a.n)?.remove(0).1;
                crate::policy::ode::generate(policy.as_ref(), &prompts, 0, &cfg.sample)?.images("vipo map")?.to_vec()
            } else {
                let device = crate::runtime::device()?;
                let policy = crate::policy::ImagePolicy::load(&cfg.model, &run.join(crate::run_dir::FINAL_WEIGHTS), None, &device, cfg.seed)?;
                let prompts = crate::world::prompts(crate::world::Split::Eval, a.n, 7);
                crate::generate::generate_images(&policy, &prompts, 0, &cfg.sample)?
            };
            (cfg, imgs.into_iter().enumerate().map(|(i, im)| (format!("sample_{i:03}"), im)).collect())
        }
        _ => anyhow::bail!("give --image FILE (repeatable) or --run DIR, not both"),
    };
    let outs = crate::mapview::write_maps(&cfg, &images, &a.out)?;
    println!("wrote {} maps to {} (<name>_overlay.png, <name>_stages.safetensors)", outs.len(), a.out.display());
    Ok(())
}

fn sample_cmd(a: SampleArgs) -> Result<()> {
    let (cfg, weights) = match (&a.run, &a.checkpoint) {
        (Some(run), None) => {
            crate::run_dir::require_run_dir(run)?;
            let mut ca = a.cfg.clone();
            ca.config = Some(run.join(crate::run_dir::CONFIG_FILE));
            (load_config(&ca)?, run.join(crate::run_dir::FINAL_WEIGHTS))
        }
        (None, Some(ck)) => (load_config(&a.cfg)?, ck.clone()),
        _ => anyhow::bail!("give exactly one of --run DIR or --checkpoint FILE"),
    };
    if cfg.generator().is_real() {
        // Free text through the run's own text encoders, from its last checkpoint.
        let run = a.run.as_ref().context("vipo sample: a real generator loads from its run (--run DIR), not from a weights file")?;
        let mut prompts: Vec<crate::prompt::Prompt> = a.prompt.iter().map(|t| crate::prompt::Prompt::text(t)).collect();
        if let Some(f) = &a.prompts {
            prompts.extend(crate::prompt::read_prompt_file(f)?);
        }
        anyhow::ensure!(!prompts.is_empty(), "vipo sample: no prompts (--prompt TEXT or --prompts FILE)");
        let (policy, which) = crate::eval::run::load_run_policy(run, &cfg, None)?;
        policy.encode(&prompts).context("vipo sample: the prompts")?;
        let n = crate::sample::write_text_samples(policy.as_ref(), &prompts, a.seed, &cfg.sample, &a.out)?;
        println!("wrote {n} samples ({which} weights) and grid.png to {} (prompts in samples.json)", a.out.display());
        return Ok(());
    }
    let device = crate::runtime::device()?;
    if cfg.sample_kind() == SampleKind::Clips {
        let specs = read_prompts_with(&a.prompt, a.prompts.as_deref(), crate::world::video::VideoSpec::parse)?;
        let policy = crate::policy::shapeworld::video_dit::VideoPolicy::load(&cfg.video_model, &weights, None, &device, 0)?;
        let n = crate::sample::write_clips(&policy, &specs, a.seed, &cfg.sample, &a.out)?;
        println!("wrote {n} clips (frame strips) and grid.png to {} (VQ/MQ scores in samples.json)", a.out.display());
        return Ok(());
    }
    let prompts = read_prompts(&a.prompt, a.prompts.as_deref())?;
    let policy = crate::policy::ImagePolicy::load(&cfg.model, &weights, None, &device, cfg.seed)?;
    let files = crate::sample::write_samples(&policy, &prompts, a.seed, &cfg.sample, &a.out)?;
    println!("wrote {} samples and grid.png to {} (scores in samples.json)", files, a.out.display());
    Ok(())
}

/// configs/video.toml, built in so `vipo demo --video` needs no files.
const VIDEO_CONFIG: &str = include_str!("../configs/video.toml");

fn demo(a: DemoArgs) -> Result<()> {
    let started = std::time::Instant::now();
    let mut cfg = if a.video && a.cfg.config.is_none() { quiet(config::from_toml_str(VIDEO_CONFIG, "configs/video.toml (built in)", &a.cfg.set)?, &a.cfg)? } else { load_config(&a.cfg)? };
    if a.video {
        anyhow::ensure!(cfg.sample_kind() == SampleKind::Clips, "--video: the config sets modality = \"{}\"", cfg.modality);
    }
    let video = cfg.sample_kind() == SampleKind::Clips;
    if cfg.run_name.is_empty() {
        cfg.run_name = if video { "demo-video".into() } else { "demo".into() };
    }
    cfg.compare.seeds = a.seeds;
    cfg.train.steps = a.steps.unwrap_or(if video { 10 } else { 20 });
    // Pretrain (or reuse) the cached base, then compare GRPO and ViPO from it.
    let base = crate::train::pretrain::default_base(&cfg, a.fresh)?;
    cfg.train.base = base.display().to_string();
    let out = crate::compare::compare(&cfg, a.cfg.force)?;
    println!("base model: {}", base.display());
    for l in out.results.summary() {
        println!("{l}");
    }
    println!("report: {}  ({:.1} min)", out.dir.join("report.html").display(), started.elapsed().as_secs_f64() / 60.0);
    Ok(())
}
