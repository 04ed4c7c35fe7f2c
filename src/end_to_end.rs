//! End-to-end tests of whole runs on tiny real-generator folders: training, the exports,
//! evaluation, the report and the README's command lines. They sit above every layer (they
//! drive `train`, `eval`, `report` and `cli` together), so no layer's own tests reach up.

use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::run_dir;
use crate::train::grpo::{StepMetrics, Trainer};

/// Train `file` (a tiny real-generator config, its model set by `model`) as run `name`
/// under `out` with `train.algo = algo` and the `extra` overrides: the run directory and
/// its two steps' metrics.
fn train_tiny(file: &Path, model: &str, out: &Path, name: &str, algo: &str, extra: Vec<String>) -> (PathBuf, Vec<StepMetrics>) {
    let mut sets = vec![model.to_string(), format!("out_dir={}", out.display()), format!("run_name={name}"), format!("train.algo={algo}"), "progress=false".into()];
    sets.extend(extra);
    let cfg: Config = crate::config::load(Some(file), &sets).unwrap();
    let dir = out.join(name);
    run_dir::create_run_dir(&dir, &cfg, false).unwrap();
    let mut tr = Trainer::new(&cfg, &dir, false).unwrap();
    let m = tr.train().unwrap();
    assert_eq!(m.len(), 2, "{name}");
    (dir, m)
}

/// `configs/tiny-sd35.toml` on a tiny SD3.5-layout model folder: GRPO and ViPO run end
/// to end (rollouts with CFG through the real-generator policy, rewards on decoded
/// images, ViPO's maps resampled from image resolution to the latent grid, the on-policy
/// parity check), the adapters export for diffusers, the merged single file loads, and
/// `vipo eval` evaluates the run from its last checkpoint. GRPO with block
/// checkpointing trains exactly as without (same rewards, gradient norms to 1e-5); the
/// ViPO run adds the KL penalty against the adapters-off reference and takes its maps
/// from a DINOv2 model folder; a bf16 run passes
/// the on-policy parity check too.
#[test]
fn tiny_sd35_grpo_and_vipo_end_to_end() {
    let d = tempfile::tempdir().unwrap();
    let model = d.path().join("sd35");
    crate::policy::sd3::tests::write_tiny_model(&model);
    let dino = d.path().join("dinov2");
    crate::backbone::dinov2::tests::write_tiny_folder(&dino, 32, 2, 4);
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/tiny-sd35.toml");
    let mut runs = Vec::new();
    let dino_maps = ["backbone.name=dinov2".to_string(), "backbone.tap=last".into(), "backbone.input_size=56".into(), format!("backbone.weights={}", dino.display())];
    for (name, algo, extra) in [
        ("grpo", "grpo", vec![]),
        ("grpo-ckpt", "grpo", vec!["sd3.checkpointing=true"]),
        ("vipo", "vipo", vec!["sd3.checkpointing=true", "train.kl_beta=0.04"]),
        ("vipo-bf16", "vipo", vec!["sd3.checkpointing=true", "sd3.dtype=bf16"]),
    ] {
        let mut sets: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        if name == "vipo" {
            // Real images get DINOv2 maps (a tiny one in the HF folder layout).
            sets.extend(dino_maps.iter().cloned());
        }
        let (dir, m) = train_tiny(&file, &format!("sd3.model={}", model.display()), d.path(), name, algo, sets);
        assert!(m.iter().all(|x| x.reward_mean.is_finite() && x.ratio_dev_first < 1e-5), "{name}: {m:?}");
        if name == "vipo" {
            assert!(dir.join("maps/step_00001.png").is_file());
            // The first optimizer step starts at the base (B = 0), the second (same
            // rollout batch) has moved; the reference stays at the base.
            assert!(m[0].kl > 0.0 && m[1].kl > m[0].kl, "KL {} then {}", m[0].kl, m[1].kl);
        }
        assert!(dir.join("lora/pytorch_lora_weights.safetensors").is_file() && dir.join("lora/adapter_config.json").is_file());
        let merged = crate::weights::tensors::read_tensors(&dir.join(run_dir::FINAL_WEIGHTS), &candle_core::Device::Cpu).unwrap();
        assert!(merged.contains_key("joint_blocks.0.x_block.attn.qkv.weight"), "single-file names");
        let (_, rep) = crate::eval::run::eval_run(&dir, &[], None, Some(2), false).unwrap();
        assert!(rep.row("eval", "compositional").is_some() && rep.row("ood", "compositional").is_some());
        if name == "vipo" {
            // The run's report: well-formed, its grids captioned with the prompts' text.
            let input = crate::run_report::run_report_input(&dir).unwrap();
            crate::report::write_report(&input, &dir.join("report.html")).unwrap();
            let html = std::fs::read_to_string(dir.join("report.html")).unwrap();
            crate::report::check_well_formed(&html).unwrap();
            let grid: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("samples/step_00000.prompts.json")).unwrap()).unwrap();
            let prompt = grid[0]["prompt"].as_str().unwrap();
            assert!(html.contains(&format!("<li>{}</li>", crate::report::escape(prompt))), "no caption {prompt:?}");
        }
        runs.push(m);
    }
    // The README's command lines on the same folder: train, then sample free text, map
    // and report the run.
    let cli = |args: &[&str]| crate::cli::run_args(std::iter::once("vipo").chain(args.iter().copied()).map(String::from));
    let (m, out) = (format!("sd3.model={}", model.display()), format!("out_dir={}", d.path().display()));
    cli(&["train", "--config", file.to_str().unwrap(), "--set", &m, "--set", &out, "--set", "run_name=cli", "--set", "train.algo=vipo", "--quiet"]).unwrap();
    let run = d.path().join("cli");
    let samples = d.path().join("samples");
    cli(&["sample", "--run", run.to_str().unwrap(), "--prompt", "a photo of a cat", "--prompt", "a red bicycle", "--out", samples.to_str().unwrap()]).unwrap();
    let listing: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(samples.join("samples.json")).unwrap()).unwrap();
    assert_eq!(listing[1]["prompt"], "a red bicycle");
    assert!(samples.join("sample_001.png").is_file() && samples.join("grid.png").is_file());
    let maps = d.path().join("maps");
    cli(&["map", "--run", run.to_str().unwrap(), "--n", "2", "--out", maps.to_str().unwrap()]).unwrap();
    assert!(maps.join("sample_001_overlay.png").is_file());
    cli(&["report", run.to_str().unwrap()]).unwrap();
    assert!(run.join("report.html").is_file());
    for (a, b) in runs[0].iter().zip(&runs[1]) {
        assert_eq!(a.reward_mean, b.reward_mean, "checkpointing changed the rollouts");
        assert!((a.grad_norm - b.grad_norm).abs() <= 1e-5 * a.grad_norm.abs().max(1e-12), "grad norm {} vs {} with checkpointing", a.grad_norm, b.grad_norm);
    }
}

/// `configs/tiny-flux.toml` on a tiny FLUX.1-dev-layout folder: GRPO and ViPO (with the
/// KL penalty against the adapters-off reference) run end to end through checkpointed
/// blocks, pass the on-policy parity check, export adapters for diffusers and a merged
/// single file, and evaluate from the last checkpoint; `vipo sample` takes free text.
#[test]
fn tiny_flux_grpo_and_vipo_end_to_end() {
    let d = tempfile::tempdir().unwrap();
    let model = d.path().join("flux");
    crate::policy::flux::tests::write_tiny_model(&model);
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/tiny-flux.toml");
    for (name, algo, extra) in [("grpo", "grpo", vec![]), ("vipo", "vipo", vec!["train.kl_beta=0.04", r#"train.rewards=[{name="redness",weight=1.0},{name="compositional",weight=0.5}]"#])] {
        let (dir, m) = train_tiny(&file, &format!("flux.model={}", model.display()), d.path(), name, algo, extra.iter().map(|s| s.to_string()).collect());
        assert!(m.iter().all(|x| x.reward_mean.is_finite() && x.ratio_dev_first < 1e-5 && x.grad_norm > 0.0), "{name}: {m:?}");
        if name == "vipo" {
            assert!(dir.join("maps/step_00001.png").is_file());
            assert!(m[0].kl > 0.0 && m[1].kl > m[0].kl, "KL {} then {}", m[0].kl, m[1].kl);
            // ShapeWorld's object statistics mean nothing on a real generator's images.
            assert!(m.iter().all(|x| x.object_area_frac == 0.0 && x.map_object_mass == 0.0));
        }
        let lora = crate::weights::tensors::read_tensors(&dir.join("lora/pytorch_lora_weights.safetensors"), &candle_core::Device::Cpu).unwrap();
        assert!(lora.contains_key("transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight"), "{:?}", lora.keys().collect::<Vec<_>>());
        let merged = crate::weights::tensors::read_tensors(&dir.join(run_dir::FINAL_WEIGHTS), &candle_core::Device::Cpu).unwrap();
        assert!(merged.contains_key("single_blocks.0.linear1.weight"), "single-file names");
        let (_, rep) = crate::eval::run::eval_run(&dir, &[], None, Some(2), false).unwrap();
        assert!(rep.row("eval", "compositional").is_some());
    }
    let samples = d.path().join("samples");
    let run_dir = d.path().join("vipo");
    let args = ["vipo", "sample", "--run", run_dir.to_str().unwrap(), "--prompt", "a photo of a cat", "--out", samples.to_str().unwrap()];
    crate::cli::run_args(args.iter().map(|s| s.to_string())).unwrap();
    assert!(samples.join("sample_000.png").is_file());
    // CFG is refused before any work, naming the field.
    let cfg: Config = crate::config::load(Some(&file), &[format!("flux.model={}", model.display()), "sample.guidance=4.5".into()]).unwrap();
    let e = format!("{:#}", Trainer::new(&cfg, &d.path().join("cfg"), false).err().unwrap());
    assert!(e.contains("sample.guidance"), "{e}");
}

/// Not a check: writes the tiny SD3.5 and FLUX folders (and a tiny DINOv2) under
/// `$VIPO_TINY_DIR`, for running `configs/tiny-*.toml` by hand or on a GPU machine
/// (`cargo test --release -- --ignored write_tiny_models`).
#[test]
#[ignore]
fn write_tiny_models() {
    let Ok(dir) = std::env::var("VIPO_TINY_DIR") else { panic!("set VIPO_TINY_DIR") };
    let dir = Path::new(&dir);
    crate::policy::sd3::tests::write_tiny_model(&dir.join("sd35"));
    crate::policy::flux::tests::write_tiny_model(&dir.join("flux"));
    crate::backbone::dinov2::tests::write_tiny_folder(&dir.join("dinov2"), 32, 2, 4);
}
