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
    "--set",
    "model.image_size=16",
    "--set",
    "model.dim=32",
    "--set",
    "model.depth=1",
    "--set",
    "model.heads=2",
    "--set",
    "model.text_layers=1",
    "--set",
    "pretrain.steps=2",
    "--set",
    "pretrain.batch_size=2",
    "--set",
    "pretrain.eval_prompts=2",
    "--set",
    "pretrain.grid_prompts=2",
    "--set",
    "sample.steps=2",
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
        "train",
        "--set",
        "run_name=g",
        "--set",
        &base_set,
        "--set",
        "train.steps=1",
        "--set",
        "train.prompts_per_step=2",
        "--set",
        "train.group_size=2",
        "--set",
        "train.micro_batch=2",
        "--set",
        "train.grad_accum=1",
        "--set",
        "train.sample_steps=3",
        "--set",
        "train.checkpoint_every=1",
        "--set",
        "train.grid_every=1",
        "--set",
        "train.grid_prompts=2",
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
    // A failed start leaves nothing behind, so the corrected retry is not refused: a base
    // weights file that is not safetensors, a missing one, a backbone weights file that
    // does not exist — each refused before the run directory exists.
    let junk = d.path().join("junk.safetensors");
    std::fs::write(&junk, b"not a safetensors file").unwrap();
    let junk_set = format!("train.base={}", junk.display());
    let missing_bb = format!("backbone.weights={}", d.path().join("nope.safetensors").display());
    for (extra, must) in [
        (vec!["--set", junk_set.as_str()], "junk.safetensors"),
        (vec!["--set", "train.base=/no/such/base.safetensors"], "base.safetensors"),
        (vec!["--set", "train.algo=vipo", "--set", missing_bb.as_str()], "nope.safetensors"),
    ] {
        let mut bad = args.clone();
        bad.extend_from_slice(&["--set", "run_name=retry"]);
        bad.extend_from_slice(&extra);
        let e = err(&vipo(&bad, d.path()));
        assert!(e.contains(must), "{e}");
        assert!(!d.path().join("runs/retry").exists(), "a failed start ({must}) left runs/retry behind");
    }
    let mut retry = args.clone();
    retry.extend_from_slice(&["--set", "run_name=retry"]);
    let o = vipo(&retry, d.path());
    assert!(o.status.success(), "the corrected retry must start: {}", String::from_utf8_lossy(&o.stderr));
    // The same for pretraining: a bad field is refused before runs/p exists.
    let e = err(&vipo(&["pretrain", "--set", "run_name=p", "--set", "pretrain.sigma_scale=0"], d.path()));
    assert!(e.contains("pretrain.sigma_scale"), "{e}");
    assert!(!d.path().join("runs/p").exists());
}

/// `vipo pretrain --resume` continues a run from its checkpoint to the same weights as an
/// uninterrupted run (the shipped base's provenance relies on it).
/// Train and held-out prompts from files (lines and JSONL): the run trains on the file's
/// prompts, evaluates on a fixed choice of the eval file's, and `vipo eval` reports that
/// split alone; prompts a reward or the policy cannot take, and malformed files, are refused
/// before the run directory exists.
#[test]
fn train_and_eval_from_prompt_files() {
    let d = tempfile::tempdir().unwrap();
    let run = pretrain_tiny(d.path());
    let base_set = format!("train.base={}", run.join("model.safetensors").display());
    std::fs::write(d.path().join("train.txt"), "# ShapeWorld prompts as free text\ntwo red circles\n\na blue square left of a green triangle\n").unwrap();
    std::fs::write(d.path().join("held.jsonl"), "{\"prompt\": \"a red square\", \"source\": \"mine\"}\n{\"prompt\": \"two blue circles\"}\n{\"prompt\": \"a green triangle\"}\n").unwrap();
    let mut args = vec![
        "train",
        "--set",
        &base_set,
        "--set",
        "train.steps=1",
        "--set",
        "train.prompts_per_step=2",
        "--set",
        "train.group_size=2",
        "--set",
        "train.micro_batch=2",
        "--set",
        "train.grad_accum=1",
        "--set",
        "train.sample_steps=3",
        "--set",
        "train.grid_every=1",
        "--set",
        "train.grid_prompts=2",
        "--set",
        "train.eval_prompts=2",
        "--set",
        "train.eval_prompt_file=held.jsonl",
    ];
    args.extend_from_slice(TINY);
    let mut ok = args.clone();
    ok.extend_from_slice(&["--set", "run_name=pf", "--set", "train.prompt_file=train.txt"]);
    let o = vipo(&ok, d.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let pf = d.path().join("runs/pf");
    let legend = std::fs::read_to_string(pf.join("samples/step_00001.prompts.json")).unwrap();
    assert!(legend.contains("two red circles") && legend.contains("a blue square left of a green triangle"), "{legend}");
    let ev: serde_json::Value = serde_json::from_slice(&std::fs::read(pf.join("eval.json")).unwrap()).unwrap();
    assert!(ev["final"]["eval"].is_number() && ev["final"].get("ood").is_none(), "{ev}");
    let o = vipo(&["eval", "--run", pf.to_str().unwrap()], d.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rep: serde_json::Value = serde_json::from_slice(&std::fs::read(pf.join("eval/final/eval.json")).unwrap()).unwrap();
    assert_eq!(rep["scores"]["eval"]["compositional"].as_array().unwrap().len(), 2);
    assert!(rep["scores"].get("ood").is_none(), "{rep}");

    std::fs::write(d.path().join("cats.txt"), "a photo of a cat\n").unwrap();
    std::fs::write(d.path().join("broken.jsonl"), "{\"prompt\": \"a red square\"}\n{\"prompt\": \"two\"\n").unwrap();
    for (set, must) in [
        // The compositional reward needs ShapeWorld scenes.
        ("train.prompt_file=cats.txt", "cats.txt"),
        ("train.prompt_file=missing.txt", "missing.txt"),
        ("train.eval_prompt_file=broken.jsonl", "broken.jsonl:2: invalid JSON"),
    ] {
        let mut bad = args.clone();
        bad.extend_from_slice(&["--set", "run_name=bad", "--set", set]);
        let e = err(&vipo(&bad, d.path()));
        assert!(e.contains(must), "{set}: {e}");
        assert!(!d.path().join("runs/bad").exists(), "{set}: a refused start left runs/bad behind");
    }
    // A prompt-free reward takes any text, but the ShapeWorld policy's tokenizer does not.
    let mut bad = args.clone();
    bad.extend_from_slice(&["--set", "run_name=bad", "--set", "train.prompt_file=cats.txt", "--set", "train.rewards=[{name=\"redness\",weight=1.0}]"]);
    let e = err(&vipo(&bad, d.path()));
    assert!(e.contains("cats.txt") && e.contains("photo"), "{e}");
    assert!(!d.path().join("runs/bad").exists());
}

#[test]
fn pretrain_resume_from_the_cli_matches_an_uninterrupted_run() {
    let d = tempfile::tempdir().unwrap();
    let mut args = vec!["pretrain", "--set", "run_name=full"];
    args.extend_from_slice(TINY);
    // Later --set values win.
    args.extend_from_slice(&["--set", "pretrain.steps=4", "--set", "pretrain.checkpoint_every=2"]);
    let o = vipo(&args, d.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let full = d.path().join("runs/full");
    // A process that ended after the step-2 checkpoint: the final outputs are gone.
    let cut = d.path().join("runs/cut");
    std::fs::create_dir_all(cut.join("checkpoints/resume")).unwrap();
    std::fs::copy(full.join("config.toml"), cut.join("config.toml")).unwrap();
    for f in ["state.json", "state.safetensors"] {
        std::fs::copy(full.join("checkpoints/resume").join(f), cut.join("checkpoints/resume").join(f)).unwrap();
    }
    let o = vipo(&["pretrain", "--resume", cut.to_str().unwrap()], d.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(std::fs::read(full.join("model.safetensors")).unwrap(), std::fs::read(cut.join("model.safetensors")).unwrap());
    let e = err(&vipo(&["pretrain", "--resume", cut.to_str().unwrap(), "--set", "pretrain.lr=1"], d.path()));
    assert!(e.contains("--resume uses the run's saved config"), "{e}");
}

const TRAIN_TINY: &[&str] = &[
    "--set",
    "train.steps=2",
    "--set",
    "train.prompts_per_step=2",
    "--set",
    "train.group_size=2",
    "--set",
    "train.micro_batch=2",
    "--set",
    "train.grad_accum=1",
    "--set",
    "train.sample_steps=3",
    "--set",
    "train.checkpoint_every=1",
    "--set",
    "train.grid_every=1",
    "--set",
    "train.grid_prompts=2",
    "--set",
    "vipo.map_grid_every=1",
    "--set",
    "compare.eval_prompts=3",
];

#[test]
fn demo_pretrains_once_compares_and_reports_then_uses_the_cache() {
    let d = tempfile::tempdir().unwrap();
    let cache = d.path().join("cache");
    let run = |extra: &[&str]| {
        let mut args = vec!["demo", "--steps", "2"];
        args.extend_from_slice(TINY);
        args.extend_from_slice(TRAIN_TINY);
        args.extend_from_slice(extra);
        Command::new(env!("CARGO_BIN_EXE_vipo")).args(&args).current_dir(d.path()).env("CI", "1").env("VIPO_CACHE", &cache).output().unwrap()
    };
    let o = run(&[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("pretraining the base model"));
    let demo = d.path().join("runs/demo");
    for f in
        ["compare.toml", "results.json", "results.md", "report.html", "base_eval/eval/final/eval.json", "grpo-s0/eval/final/eval.json", "vipo-s0/eval/final/eval.json", "vipo-s0/maps/step_00001.png"]
    {
        assert!(demo.join(f).is_file(), "{f} missing");
    }
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(out.contains("report: ") && out.contains("vipo − grpo on eval") && out.contains("one seed, CI over prompts only"), "{out}");
    let res: serde_json::Value = serde_json::from_slice(&std::fs::read(demo.join("results.json")).unwrap()).unwrap();
    let rows = res["rows"].as_array().unwrap();
    for m in ["base", "grpo", "vipo"] {
        for split in ["eval", "ood"] {
            let r = rows.iter().find(|r| r["method"] == m && r["split"] == split && r["reward"] == "compositional").unwrap_or_else(|| panic!("{m}/{split} missing"));
            let (lo, mu, hi) = (r["ci_low"].as_f64().unwrap(), r["mean"].as_f64().unwrap(), r["ci_high"].as_f64().unwrap());
            assert!(lo <= mu && mu <= hi && (0.0..=1.0).contains(&mu), "{r}");
        }
    }
    check_report(
        &demo.join("report.html"),
        &["grpo", "vipo", "base — eval prompts", "vs wall-clock", "mean seconds per RL step", "signed advantage", "Same prompt, same noise", "prompts in reading order"],
    );
    // One image per shown prompt: base | grpo | vipo cut from the three eval grids, same noise.
    let row = image::open(demo.join("side_by_side/eval_0.png")).unwrap();
    assert_eq!(row.height(), 4 * 16 + 2, "one 4×-upscaled 16-px tile high");
    assert_eq!(row.width(), 3 * (4 * 16 + 1) + 1, "three columns");
    // Second run: cached base, finished runs reused (nothing retrained, report rewritten).
    let o = run(&[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("using cached base model"));
    let o = run(&["--fresh"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("pretraining the base model"));
}

#[test]
fn compare_resumes_and_rejects_bad_input_and_eval_reports() {
    let d = tempfile::tempdir().unwrap();
    let run = pretrain_tiny(d.path());
    let base_set = format!("train.base={}", run.join("model.safetensors").display());
    let cf = d.path().join("cmp.toml");
    std::fs::write(&cf, "[[compare.methods]]\nname = \"grpo\"\nset = [\"train.algo=grpo\"]\n[[compare.methods]]\nname = \"vipo-ones\"\nset = [\"train.algo=vipo\", \"vipo.map=ones\"]\n").unwrap();
    let mut args = vec!["compare", "--config", cf.to_str().unwrap(), "--seeds", "2", "--set", "run_name=cmp", "--set", &base_set];
    args.extend_from_slice(TINY);
    args.extend_from_slice(TRAIN_TINY);
    let o = vipo(&args, d.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("4 runs trained, 0 reused"), "{}", String::from_utf8_lossy(&o.stdout));
    let cmp = d.path().join("runs/cmp");
    let md = std::fs::read_to_string(cmp.join("results.md")).unwrap();
    assert!(md.contains("| vipo-ones | eval | compositional |") && md.contains("| 2 |"), "{md}");
    // --jobs 2: the same four runs, two at a time on one thread each, give the same
    // weights and scores (what a run computes does not depend on the thread count).
    let par_args: Vec<&str> = args.iter().map(|a| if *a == "run_name=cmp" { "run_name=cmp-par" } else { a }).chain(["--jobs", "2"]).collect();
    let o = vipo(&par_args, d.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("4 runs trained, 0 reused"), "{}", String::from_utf8_lossy(&o.stdout));
    let log = String::from_utf8_lossy(&o.stderr);
    assert_eq!(log.matches(" done in ").count(), 4, "{log}");
    assert!(log.find("[2/4]").unwrap() < log.find(" done in ").unwrap(), "the second run did not start beside the first: {log}");
    for r in ["grpo-s0", "grpo-s1", "vipo-ones-s0", "vipo-ones-s1"] {
        let par = d.path().join("runs/cmp-par").join(r);
        assert_eq!(std::fs::read(par.join("model.safetensors")).unwrap(), std::fs::read(cmp.join(r).join("model.safetensors")).unwrap(), "{r}: --jobs 2 trained other weights");
        let rows = |dir: &Path| serde_json::from_slice::<serde_json::Value>(&std::fs::read(dir.join("eval/final/eval.json")).unwrap()).unwrap()["rows"].clone();
        assert_eq!(rows(&par), rows(&cmp.join(r)), "{r}");
    }
    // Interrupt one run (no final weights, no evaluation) and rerun: only it is trained again.
    std::fs::remove_file(cmp.join("vipo-ones-s1/model.safetensors")).unwrap();
    std::fs::remove_dir_all(cmp.join("vipo-ones-s1/eval")).unwrap();
    let keep = std::fs::read(cmp.join("grpo-s0/model.safetensors")).unwrap();
    // vipo report on the unfinished comparison: the tables over seed 0 (the seed every
    // method has finished), saying so; the one-seed interval is then over prompts.
    let o = vipo(&["report", cmp.to_str().unwrap()], d.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("UNFINISHED: 1 of 2 seeds"), "{}", String::from_utf8_lossy(&o.stdout));
    let md = std::fs::read_to_string(cmp.join("results.md")).unwrap();
    assert!(md.contains("UNFINISHED: 1 of 2 seeds") && md.contains("over seed 0 only") && md.contains("1 seed(s) per method") && md.contains("one seed, CI over prompts only"), "{md}");
    // With no seed finished by every method there is nothing to aggregate: refused by run.
    std::fs::remove_file(d.path().join("runs/cmp-par/grpo-s0/eval/final/eval.json")).unwrap();
    let e = err(&vipo(&["report", d.path().join("runs/cmp-par").to_str().unwrap()], d.path()));
    assert!(e.contains("no seed is finished") && e.contains("grpo-s0") && !e.contains("vipo-ones-s0"), "{e}");
    let o = vipo(&args, d.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("1 runs trained, 3 reused"), "{}", String::from_utf8_lossy(&o.stdout));
    assert_eq!(std::fs::read(cmp.join("grpo-s0/model.safetensors")).unwrap(), keep);
    // A different comparison into the same directory is refused without --force.
    let mut other = args.clone();
    other.extend_from_slice(&["--set", "train.lr=0.01"]);
    let e = err(&vipo(&other, d.path()));
    assert!(e.contains("different comparison") && e.contains("--force"), "{e}");
    assert_eq!(std::fs::read(cmp.join("grpo-s0/model.safetensors")).unwrap(), keep);
    // --seeds 0; two methods with one name; a method that changes the budget.
    let mut zero = args.clone();
    zero[4] = "0";
    let e = err(&vipo(&zero, d.path()));
    assert!(e.contains("seeds"), "{e}");
    let mut no_jobs = args.clone();
    no_jobs.extend_from_slice(&["--jobs", "0"]);
    let e = err(&vipo(&no_jobs, d.path()));
    assert!(e.contains("compare.jobs (--jobs)") && e.contains("got 0"), "{e}");
    let dup = d.path().join("dup.toml");
    std::fs::write(&dup, "[[compare.methods]]\nname = \"a\"\n[[compare.methods]]\nname = \"a\"\n").unwrap();
    let e = err(&vipo(&["compare", "--config", dup.to_str().unwrap(), "--set", "run_name=dup"], d.path()));
    assert!(e.contains("\"a\"") && e.contains("twice"), "{e}");
    assert!(!d.path().join("runs/dup").exists());
    let budget = d.path().join("budget.toml");
    std::fs::write(&budget, "[[compare.methods]]\nname = \"a\"\n[[compare.methods]]\nname = \"b\"\nset = [\"train.steps=99\"]\n").unwrap();
    let e = err(&vipo(&["compare", "--config", budget.to_str().unwrap(), "--set", "run_name=budget"], d.path()));
    assert!(e.contains("budget"), "{e}");

    // vipo eval: a checkpoint, a missing checkpoint, not a run, no overwrite without --force.
    let g = cmp.join("grpo-s0");
    let o = vipo(&["eval", "--run", g.to_str().unwrap(), "--checkpoint", "1", "--n", "4"], d.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ev: serde_json::Value = serde_json::from_slice(&std::fs::read(g.join("eval/step_1/eval.json")).unwrap()).unwrap();
    let row = ev["rows"].as_array().unwrap().iter().find(|r| r["split"] == "ood" && r["reward"] == "compositional").unwrap().clone();
    for k in ["mean", "ci_low", "ci_high", "n"] {
        assert!(row[k].is_number(), "{k} missing in {row}");
    }
    assert!(g.join("eval/step_1/grid_eval.png").is_file() && g.join("eval/step_1/grid_ood.png").is_file());
    let e = err(&vipo(&["eval", "--run", g.to_str().unwrap(), "--checkpoint", "7"], d.path()));
    assert!(e.contains("step 7") && e.contains("[1, 2]"), "{e}");
    let e = err(&vipo(&["eval", "--run", g.to_str().unwrap(), "--checkpoint", "1"], d.path()));
    assert!(e.contains("--force"), "{e}");
    let e = err(&vipo(&["eval", "--run", d.path().to_str().unwrap()], d.path()));
    assert!(e.contains("not a vipo run"), "{e}");
    // A single run's report.
    let o = vipo(&["report", g.to_str().unwrap()], d.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    check_report(&g.join("report.html"), &["grpo-s0", "rollout reward vs step", "[train]"]);
    // The comparison's report: curves with a band over the two seeds.
    check_report(&cmp.join("report.html"), &["vipo-ones (2 seeds)", "<polygon"]);
}

/// A report parses, inlines every image (no reference to a file or the network), shows
/// `must`, and — where chromium is installed — loads in it with no console message and
/// no broken image.
fn check_report(path: &Path, must: &[&str]) {
    let html = std::fs::read_to_string(path).unwrap();
    let n = vipo::report::check_well_formed(&html).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(n > 20, "{n} elements");
    for key in ["src=\"", "href=\""] {
        for part in html.split(key).skip(1) {
            assert!(part.starts_with("data:"), "{}: external reference {key}{}", path.display(), &part[..40.min(part.len())]);
        }
    }
    assert!(html.contains("<img src=\"data:image/png;base64,"), "no images in {}", path.display());
    for m in must {
        assert!(html.contains(m), "{} lacks {m:?}", path.display());
    }
    // The real-browser check never skips (`.ci/run` installs chromium when it is missing).
    assert!(vipo::report::browser::find_browser().is_some(), "no headless browser for the check of {}: apt-get install chromium", path.display());
    let o = vipo(&["report", path.parent().unwrap().to_str().unwrap(), "--check"], path.parent().unwrap());
    assert!(o.status.success(), "{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains(" 0 broken, 0 console messages"), "{}", String::from_utf8_lossy(&o.stdout));
}

#[test]
fn video_pretrain_sample_and_bad_input() {
    let d = tempfile::tempdir().unwrap();
    let vid: &[&str] = &[
        "--set",
        "modality=video",
        "--set",
        "run_name=vbase",
        "--set",
        "video_model.image_size=16",
        "--set",
        "video_model.frames=4",
        "--set",
        "video_model.dim=32",
        "--set",
        "video_model.depth=2",
        "--set",
        "video_model.heads=2",
        "--set",
        "video_model.text_layers=1",
        "--set",
        "pretrain.steps=2",
        "--set",
        "pretrain.batch_size=2",
        "--set",
        "pretrain.eval_prompts=2",
        "--set",
        "pretrain.grid_prompts=2",
        "--set",
        "sample.steps=2",
    ];
    let mut args = vec!["pretrain"];
    args.extend_from_slice(vid);
    let o = vipo(&args, d.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("video_quality and motion_quality"));
    let run = d.path().join("runs/vbase");
    let out = d.path().join("clips");
    let o = vipo(&["sample", "--run", run.to_str().unwrap(), "--prompt", "a red circle moving right fast", "--out", out.to_str().unwrap()], d.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let listing: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("samples.json")).unwrap()).unwrap();
    assert_eq!(listing[0]["prompt"], "a red circle moving right fast");
    assert!(listing[0]["motion_quality"].is_number() && out.join("clip_000.png").is_file() && out.join("grid.png").is_file());
    // A motion word outside the grammar; frames the policy cannot take; video training.
    let e = err(&vipo(&["sample", "--run", run.to_str().unwrap(), "--prompt", "a red circle moving sideways", "--out", out.to_str().unwrap()], d.path()));
    assert!(e.contains("sideways"), "{e}");
    let mut bad = vec!["pretrain"];
    bad.extend_from_slice(vid);
    bad.extend_from_slice(&["--set", "video_model.frames=3", "--set", "run_name=bad"]);
    let e = err(&vipo(&bad, d.path()));
    assert!(e.contains("video_model.t_patch"), "{e}");
    assert!(!d.path().join("runs/bad").exists());
    // Temporal maps: of a strip written by `vipo sample`, and of a video run's samples.
    let maps = d.path().join("maps");
    let o = vipo(&["map", "--clip", out.join("clip_000.png").to_str().unwrap(), "--frames", "4", "--out", maps.to_str().unwrap(), "--set", "backbone.input_size=64"], d.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(maps.join("clip_000_frames.png").is_file() && maps.join("clip_000_maps.safetensors").is_file());
    let e = err(&vipo(&["map", "--clip", out.join("clip_000.png").to_str().unwrap(), "--frames", "3", "--out", maps.to_str().unwrap()], d.path()));
    assert!(e.contains("clip_000.png") && e.contains("--frames 3"), "{e}");
    let o = vipo(&["map", "--run", run.to_str().unwrap(), "--n", "1", "--out", d.path().join("rmaps").to_str().unwrap(), "--set", "backbone.input_size=64"], d.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(d.path().join("rmaps/clip_000_frames.png").is_file());
    let bad_sigma = vipo(&["map", "--clip", out.join("clip_000.png").to_str().unwrap(), "--frames", "4", "--out", maps.to_str().unwrap(), "--set", "vipo.temporal_sigma=-1"], d.path());
    assert!(err(&bad_sigma).contains("vipo.temporal_sigma"));

    // The video demo (built-in configs/video.toml, tiny overrides): GRPO vs ViPO on clips,
    // VQ/MQ evaluation, report with frame strips; then `vipo eval` of one of its runs.
    let cache = d.path().join("cache");
    let mut demo = vec!["demo", "--video", "--steps", "1"];
    let vid_sets: Vec<&str> = vid.chunks(2).filter(|c| c[1] != "modality=video" && c[1] != "run_name=vbase").flat_map(|c| c.iter().copied()).collect();
    demo.extend_from_slice(&vid_sets);
    demo.extend_from_slice(&[
        "--set",
        "train.prompts_per_step=2",
        "--set",
        "train.group_size=2",
        "--set",
        "train.micro_batch=2",
        "--set",
        "train.grad_accum=2",
        "--set",
        "train.sample_steps=3",
        "--set",
        "train.grid_prompts=2",
        "--set",
        "vipo.map_grid_every=1",
        "--set",
        "compare.eval_prompts=2",
        "--set",
        "backbone.input_size=64",
    ]);
    let o = Command::new(env!("CARGO_BIN_EXE_vipo")).args(&demo).current_dir(d.path()).env("CI", "1").env("VIPO_CACHE", &cache).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out_s = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(out_s.contains("vq_mq_mean reward") && out_s.contains("vipo − grpo on eval"), "{out_s}");
    let dv = d.path().join("runs/demo-video");
    for f in ["results.md", "report.html", "vipo-s0/maps/step_00001.png", "grpo-s0/eval/final/grid_ood.png"] {
        assert!(dv.join(f).is_file(), "{f} missing");
    }
    let md = std::fs::read_to_string(dv.join("results.md")).unwrap();
    assert!(md.contains("| vipo | ood | motion_quality |") && md.contains("motion_quality.direction"), "{md}");
    check_report(&dv.join("report.html"), &["vq_mq_mean", "motion_quality"]);
    let o = vipo(&["eval", "--run", dv.join("vipo-s0").to_str().unwrap(), "--n", "2", "--force"], d.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("vq_mq_mean"));

    // Video training with the image reward of the default config: a clear error.
    let e = err(&vipo(&["train", "--set", "modality=video", "--set", &format!("train.base={}", run.join("model.safetensors").display())], d.path()));
    assert!(e.contains("train.rewards[0]") && e.contains("video"), "{e}");
}

/// `vipo export-base` stores a pretraining run's final weights or one of its checkpoints as
/// f16 with a provenance record whose sha256, step count and scores describe that file; it
/// refuses to overwrite a record and names a missing checkpoint.
#[test]
fn export_base_records_provenance_of_final_weights_and_checkpoints() {
    let d = tempfile::tempdir().unwrap();
    let mut args = vec!["pretrain", "--set", "run_name=base", "--set", "pretrain.checkpoint_every=1"];
    args.extend_from_slice(TINY);
    args.extend_from_slice(&["--set", "pretrain.steps=3"]);
    let o = vipo(&args, d.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let run = d.path().join("runs/base");
    let export = |out: &str, ck: Option<&str>| {
        let mut a = vec!["export-base", "--run", run.to_str().unwrap(), "--out", out, "--command", "vipo pretrain (test)", "--commit", "abc", "--machine", "test"];
        if let Some(c) = ck {
            a.extend_from_slice(&["--checkpoint", c]);
        }
        vipo(&a, d.path())
    };
    for (out, ck, steps) in [("final", None, 3u64), ("ck2", Some("2"), 2)] {
        let o = export(out, ck);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let prov: serde_json::Value = serde_json::from_slice(&std::fs::read(d.path().join(out).join("PROVENANCE.json")).unwrap()).unwrap();
        assert_eq!(prov["steps"], steps, "{out}");
        assert_eq!(prov["dtype"], "f16");
        let bytes = std::fs::read(d.path().join(out).join("shapeworld_base.safetensors")).unwrap();
        use sha2::Digest;
        let sha: String = sha2::Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(prov["sha256"], sha.as_str());
        assert!(prov["eval"]["compositional"].as_f64().unwrap().is_finite());
    }
    let e = err(&export("final", None));
    assert!(e.contains("already exists"), "{e}");
    let e = err(&export("ck9", Some("9")));
    assert!(e.contains("step_9.safetensors"), "{e}");
}

/// `vipo plan` on the shipped SD3.5-medium config prints the budget; a bad field is named.
#[test]
fn plan_prints_the_sd35_budget() {
    let d = tempfile::tempdir().unwrap();
    let cfg = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/sd35-medium.toml");
    let o = vipo(&["plan", "--config", cfg.to_str().unwrap()], d.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout);
    for want in ["sd3.5-medium at 512²", "parameters", "LoRA r 32 α 64", "with block checkpointing", "fits one 141 GB GPU (90 % usable): yes"] {
        assert!(out.contains(want), "{want} missing from:\n{out}");
    }
    let e = err(&vipo(&["plan", "--config", cfg.to_str().unwrap(), "--set", "sd3.dtype=f8"], d.path()));
    assert!(e.contains("sd3.dtype"), "{e}");
}

/// A reader that goes away (`vipo config | head -1`) ends vipo by SIGPIPE, quietly, as it
/// ends any Unix tool: no "failed printing to stdout: Broken pipe" panic. The read end is
/// closed before vipo starts, so its first print always meets a closed pipe.
#[cfg(unix)]
#[test]
fn a_closed_stdout_pipe_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let d = tempfile::tempdir().unwrap();
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let o = Command::new(env!("CARGO_BIN_EXE_vipo")).arg("config").current_dir(d.path()).stdout(writer).output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!e.contains("panicked") && !e.contains("Broken pipe"), "{e}");
    const SIGPIPE: i32 = 13; // Linux and the BSDs; tests/ does not link libc
    assert_eq!(o.status.signal(), Some(SIGPIPE), "{:?}: {e}", o.status);
}
