//! ShapeWorld prompt sets through [`crate::policy::ode`] (ODE sampling on fixed per-prompt
//! noise, so two runs or checkpoints are compared on identical noise), their mean scores,
//! and the held-out prompt splits. Used by training (grids, base/final scores), evaluation
//! and `vipo sample`.

use anyhow::{Context, Result};

use crate::image::Image;
use crate::policy::ode::{generate, EVAL_SEED};
use crate::policy::Policy;
use crate::prompt::Prompt;
use crate::reward::Reward;
use crate::sampler::SampleConfig;
use crate::world::video::VideoSpec;
use crate::world::PromptSpec;

/// [`generate`] for ShapeWorld image prompts (an image policy, EMA-swapped or not).
pub fn generate_images(policy: &dyn Policy, prompts: &[PromptSpec], seed: u64, cfg: &SampleConfig) -> Result<Vec<Image>> {
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    let ps: Vec<Prompt> = prompts.iter().map(Prompt::image).collect();
    Ok(generate(policy, &ps, seed, cfg)?.images("image generation")?.to_vec())
}

/// [`generate`] for ShapeWorld-Video prompts: one clip per prompt.
pub fn generate_clips(policy: &dyn Policy, specs: &[VideoSpec], seed: u64, cfg: &SampleConfig) -> Result<Vec<Vec<Image>>> {
    if specs.is_empty() {
        return Ok(Vec::new());
    }
    let ps: Vec<Prompt> = specs.iter().map(Prompt::video).collect();
    Ok(generate(policy, &ps, seed, cfg)?.clips("video generation")?.to_vec())
}

/// The held-out splits of an evaluation, `n` prompts each: `train.eval_prompt_file` /
/// `train.ood_prompt_file` when set (a fixed seeded choice of `n`), else the ShapeWorld
/// grammar's eval and ood splits of the run's modality (fixed seed). With only an eval
/// file there is no ood split: a user's own prompts have no ShapeWorld counterpart.
pub fn held_out_splits(cfg: &crate::config::Config, n: usize) -> Result<Vec<(&'static str, Vec<Prompt>)>> {
    use crate::world::Split;
    let seed = EVAL_SEED;
    let grammar = |split: Split| crate::prompt::grammar_prompts(cfg.sample_kind(), split, n, seed);
    let file = |path: &str, field: &str| -> Result<Vec<Prompt>> {
        let all = crate::prompt::read_prompt_file(std::path::Path::new(path)).with_context(|| format!("train.{field}"))?;
        Ok(crate::prompt::fixed_subset(&all, n, seed))
    };
    let t = &cfg.train;
    let mut out = vec![("eval", if t.eval_prompt_file.is_empty() { grammar(Split::Eval) } else { file(&t.eval_prompt_file, "eval_prompt_file")? })];
    if !t.ood_prompt_file.is_empty() {
        out.push(("ood", file(&t.ood_prompt_file, "ood_prompt_file")?));
    } else if t.eval_prompt_file.is_empty() {
        out.push(("ood", grammar(Split::Ood)));
    }
    Ok(out)
}

/// Mean of a reward over generated images.
pub fn mean_score(reward: &dyn Reward, images: &[Image], prompts: &[PromptSpec]) -> Result<f64> {
    let s = reward.score(&crate::image::Samples::Images(images.to_vec()), &prompts.iter().map(crate::prompt::Prompt::image).collect::<Vec<_>>())?;
    Ok(s.iter().map(|&v| v as f64).sum::<f64>() / s.len().max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::shapeworld::dit::tests::tiny;
    use crate::policy::ImagePolicy;
    use crate::world::{self, Split};
    use candle_core::Device;

    /// Two runs with the same weights see the same noise and produce bit-identical
    /// images; a different batch size changes only float rounding (gemm blocking), and
    /// different weights or a different seed change the images.
    #[test]
    fn identical_noise_across_runs_and_batchings() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let a = ImagePolicy::new(&tiny(), &Device::Cpu, 3).unwrap();
        a.save(&path).unwrap();
        let b = ImagePolicy::load(&tiny(), &path, None, &Device::Cpu, 77).unwrap(); // another "run", other rng seed
        let prompts = world::prompts(Split::Eval, 5, 11);
        let cfg = |batch_size| SampleConfig { steps: 3, batch_size, ..Default::default() };
        let ia = generate_images(&a, &prompts, 42, &cfg(5)).unwrap();
        let ib = generate_images(&b, &prompts, 42, &cfg(2)).unwrap();
        assert_eq!(ia.len(), 5);
        let ia2 = generate_images(&b, &prompts, 42, &cfg(5)).unwrap();
        for (x, y) in ia.iter().zip(&ia2) {
            assert!(x.data == y.data, "same weights + prompts + seed must give identical images");
        }
        let maxd = ia.iter().zip(&ib).flat_map(|(x, y)| x.data.iter().zip(&y.data).map(|(a, b)| (a - b).abs())).fold(0f32, f32::max);
        assert!(maxd < 1e-4, "batching changed the images by {maxd}");
        let other_seed = generate_images(&a, &prompts, 43, &cfg(5)).unwrap();
        assert!(ia[0].data != other_seed[0].data);
        let other_weights = ImagePolicy::new(&tiny(), &Device::Cpu, 4).unwrap();
        assert!(ia[0].data != generate_images(&other_weights, &prompts, 42, &cfg(5)).unwrap()[0].data);
    }

    /// Grammar splits by default; files replace them (a fixed choice of n); an eval file
    /// alone drops the ood split.
    #[test]
    fn held_out_splits_from_grammar_or_files() {
        let mut cfg = crate::config::Config::default();
        let names = |v: &[(&str, Vec<Prompt>)]| v.iter().map(|(s, p)| (s.to_string(), p.len())).collect::<Vec<_>>();
        let g = held_out_splits(&cfg, 5).unwrap();
        assert_eq!(names(&g), [("eval".to_string(), 5), ("ood".to_string(), 5)]);
        assert_eq!(g[0].1[0], Prompt::image(&world::prompts(Split::Eval, 5, EVAL_SEED)[0]));
        let d = tempfile::tempdir().unwrap();
        let (e, o) = (d.path().join("e.txt"), d.path().join("o.txt"));
        std::fs::write(&e, (0..9).map(|i| format!("prompt {i}\n")).collect::<String>()).unwrap();
        std::fs::write(&o, "a cat\na dog\n").unwrap();
        cfg.train.eval_prompt_file = e.display().to_string();
        let f = held_out_splits(&cfg, 4).unwrap();
        assert_eq!(names(&f), [("eval".to_string(), 4)]);
        assert_eq!(f, held_out_splits(&cfg, 4).unwrap(), "the same prompts every time");
        cfg.train.ood_prompt_file = o.display().to_string();
        assert_eq!(names(&held_out_splits(&cfg, 4).unwrap()), [("eval".to_string(), 4), ("ood".to_string(), 2)]);
        cfg.train.ood_prompt_file = d.path().join("none.txt").display().to_string();
        let err = format!("{:#}", held_out_splits(&cfg, 4).unwrap_err());
        assert!(err.contains("train.ood_prompt_file") && err.contains("none.txt"), "{err}");
    }
}
