//! End-to-end checks of the `vipo` binary: bad input gets a one-line error naming the
//! file (and field/tensor), a non-zero exit, no panic, and nothing already written is lost.

use std::path::Path;
use std::process::{Command, Output};

fn vipo(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vipo")).args(args).current_dir(cwd).env("CI", "1").output().unwrap()
}

fn err(o: &Output) -> String {
    assert!(!o.status.success(), "expected failure, got success: {}", String::from_utf8_lossy(&o.stdout));
    let e = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!e.contains("panicked") && !e.contains("RUST_BACKTRACE"), "panic instead of an error: {e}");
    e
}

const TINY: &[&str] = &[
    "--set", "model.image_size=16", "--set", "model.dim=32", "--set", "model.depth=1", "--set", "model.heads=2",
    "--set", "model.text_layers=1", "--set", "pretrain.steps=2", "--set", "pretrain.batch_size=2",
    "--set", "pretrain.eval_prompts=2", "--set", "pretrain.grid_prompts=2", "--set", "sample.steps=2",
];

fn pretrain_tiny(dir: &Path) -> std::path::PathBuf {
    let mut args = vec!["pretrain", "--set", "run_name=base"];
    args.extend_from_slice(TINY);
    let o = vipo(&args, dir);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    dir.join("runs/base")
}

#[test]
fn pretrain_sample_and_bad_inputs() {
    let d = tempfile::tempdir().unwrap();
    let run = pretrain_tiny(d.path());
    for f in ["config.toml", "metrics.jsonl", "model.safetensors", "samples/grid.png", "base_scores.json"] {
        assert!(run.join(f).is_file(), "{f} missing");
    }
    let out = d.path().join("s");
    let o = vipo(&["sample", "--run", run.to_str().unwrap(), "--prompt", "two red circles left of a blue square", "--out", out.to_str().unwrap()], d.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let listing: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("samples.json")).unwrap()).unwrap();
    assert_eq!(listing[0]["prompt"], "two red circles left of a blue square");
    assert!(out.join("sample_000.png").is_file() && out.join("grid.png").is_file());

    // Prompt file with an unknown colour: error names the file and line.
    let pf = d.path().join("prompts.txt");
    std::fs::write(&pf, "a red circle\na magenta circle\n").unwrap();
    let e = err(&vipo(&["sample", "--run", run.to_str().unwrap(), "--prompts", pf.to_str().unwrap(), "--out", "x"], d.path()));
    assert!(e.contains("prompts.txt:2") && e.contains("magenta"), "{e}");
    // Unparsable prompt.
    let e = err(&vipo(&["sample", "--run", run.to_str().unwrap(), "--prompt", "circles red two", "--out", "x"], d.path()));
    assert!(e.contains("circles red two"), "{e}");
    // Checkpoint that does not match the config.
    let e = err(&vipo(&["sample", "--checkpoint", run.join("model.safetensors").to_str().unwrap(), "--prompt", "a red circle", "--out", "x"], d.path()));
    assert!(e.contains("model.safetensors") && (e.contains("shape") || e.contains("missing")), "{e}");
    // Truncated safetensors.
    let cut = d.path().join("cut.safetensors");
    let bytes = std::fs::read(run.join("model.safetensors")).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    let mut args = vec!["sample", "--checkpoint", cut.to_str().unwrap(), "--prompt", "a red circle", "--out", "x"];
    args.extend_from_slice(TINY);
    let e = err(&vipo(&args, d.path()));
    assert!(e.contains("cut.safetensors"), "{e}");
    // Unwritable output directory (a file where a folder should be).
    let blocker = d.path().join("blocker");
    std::fs::write(&blocker, b"keep").unwrap();
    let e = err(&vipo(&["sample", "--run", run.to_str().unwrap(), "--prompt", "a red circle", "--out", blocker.join("sub").to_str().unwrap()], d.path()));
    assert!(e.contains("blocker"), "{e}");
    assert_eq!(std::fs::read(&blocker).unwrap(), b"keep");
    // An existing run is not overwritten without --force.
    let before = std::fs::read(run.join("model.safetensors")).unwrap();
    let mut args = vec!["pretrain", "--set", "run_name=base"];
    args.extend_from_slice(TINY);
    let e = err(&vipo(&args, d.path()));
    assert!(e.contains("already exists"), "{e}");
    assert_eq!(std::fs::read(run.join("model.safetensors")).unwrap(), before);
    // Malformed config file.
    let cf = d.path().join("bad.toml");
    std::fs::write(&cf, "[pretrain]\nsteps = \"lots\"\n").unwrap();
    let e = err(&vipo(&["pretrain", "--config", cf.to_str().unwrap()], d.path()));
    assert!(e.contains("bad.toml"), "{e}");
}

#[test]
fn train_grpo_then_resume_from_the_cli() {
    let d = tempfile::tempdir().unwrap();
    let run = pretrain_tiny(d.path());
    let base = run.join("model.safetensors");
    let base_set = format!("train.base={}", base.display());
    let mut args = vec![
        "train", "--set", "run_name=g", "--set", &base_set, "--set", "train.steps=1", "--set", "train.prompts_per_step=2",
        "--set", "train.group_size=2", "--set", "train.micro_batch=2", "--set", "train.grad_accum=1", "--set", "train.sample_steps=3",
        "--set", "train.checkpoint_every=1", "--set", "train.grid_every=1", "--set", "train.grid_prompts=2",
    ];
    args.extend_from_slice(TINY);
    let o = vipo(&args, d.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let g = d.path().join("runs/g");
    assert!(g.join("checkpoints/step_000001/state.json").is_file() && g.join("model.safetensors").is_file());
    let o = vipo(&["train", "--resume", g.to_str().unwrap(), "--set", "train.steps=2"], d.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read_to_string(g.join("metrics.jsonl")).unwrap().lines().count(), 2);
    // Changing anything but train.steps on resume is refused.
    let e = err(&vipo(&["train", "--resume", g.to_str().unwrap(), "--set", "train.lr=0.5"], d.path()));
    assert!(e.contains("train.steps"), "{e}");
    // Group size 1 is rejected before any work.
    let mut bad = args.clone();
    bad.extend_from_slice(&["--set", "train.group_size=1", "--set", "run_name=bad"]);
    let e = err(&vipo(&bad, d.path()));
    assert!(e.contains("group_size"), "{e}");
    assert!(!d.path().join("runs/bad").exists(), "a rejected run must not leave a directory");
}

#[test]
fn demo_pretrains_once_then_uses_the_cache() {
    let d = tempfile::tempdir().unwrap();
    let cache = d.path().join("cache");
    let run = |extra: &[&str]| {
        let mut args = vec!["demo"];
        args.extend_from_slice(TINY);
        args.extend_from_slice(extra);
        Command::new(env!("CARGO_BIN_EXE_vipo")).args(&args).current_dir(d.path()).env("CI", "1").env("VIPO_CACHE", &cache).output().unwrap()
    };
    let o = run(&[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("pretraining the base model"));
    assert!(d.path().join("runs/demo/base_samples/grid.png").is_file());
    let o = run(&[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("using cached base model"));
    let o = run(&["--fresh"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("pretraining the base model"));
}
