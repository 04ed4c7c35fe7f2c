//! Configuration: one TOML file type for every command, every field documented and
//! defaulted (see `configs/*.toml`). `--set key=value` overrides any field by its dotted
//! path; unknown or malformed fields are errors that name the file and field.

use anyhow::{bail, Context, Result};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::path::{Path, PathBuf};

use crate::image::SampleKind;
use crate::policy::flux::FluxSection;
use crate::policy::nn::layers::LoraSpec;
use crate::policy::sd3::Sd3Config;
use crate::policy::shapeworld::dit::DitConfig;
use crate::policy::{Generator, Policy};
use crate::reward::RewardEntry;
use crate::sampler::SampleConfig;

/// Prompts per split of an evaluation unless a config says otherwise (`train.eval_prompts`,
/// `compare.eval_prompts`, `vipo eval` without `--n`). Two checkpoints' per-prompt scores
/// differ with a standard deviation of ≈ 0.18 on this testbed, so a paired difference over
/// 64 prompts has a 95 % half-width of ≈ 0.045 — as large as the effects being measured;
/// 512 prompts bring it to ≈ 0.016 (bench/NOTES.md §6.2).
pub const DEFAULT_EVAL_PROMPTS: usize = 512;

/// What a run generates.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Modality {
    Image,
    Video,
    /// A real SD3 / SD3.5 generator (`[sd3]`): images from free-text prompts.
    Sd3,
    /// A real FLUX.1 generator (`[flux]`): images from free-text prompts.
    Flux,
}

/// How a config enum value is spelled in TOML (serde's name: `"sd3"`, `"per-sample"`), for
/// messages, labels and folder names. Derived from serde, not from `Debug`, so it cannot drift
/// from what the config file accepts (`Debug` lower-cased gives "persample").
pub fn spelling<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        other => panic!("spelling: not a unit enum variant ({other:?})"),
    }
}

/// The config's spelling (`modality = "sd3"`), so messages name what the user wrote.
impl std::fmt::Display for Modality {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&spelling(self))
    }
}

/// Everything a run needs. Each command reads the sections it uses.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Master seed: every RNG stream of the run derives from it.
    pub seed: u64,
    /// Parent folder of run directories.
    pub out_dir: PathBuf,
    /// Run directory name under `out_dir` ("" = derived from the command).
    pub run_name: String,
    /// Show progress bars (false in CI / logs).
    pub progress: bool,
    /// What is generated: "image" (ShapeWorld, `[model]`) or "video" (ShapeWorld-Video,
    /// `[video_model]`).
    pub modality: Modality,
    /// The image policy architecture.
    pub model: DitConfig,
    /// The video policy architecture (modality = "video").
    pub video_model: crate::policy::shapeworld::video_dit::VideoDitConfig,
    /// `vipo pretrain`: rectified-flow pretraining on rendered ShapeWorld scenes.
    pub pretrain: PretrainConfig,
    /// Sampling for `vipo sample`, sample grids and evaluation.
    pub sample: SampleConfig,
    /// `vipo train`: GRPO / ViPO post-training.
    pub train: TrainConfig,
    /// ViPO: allocation maps and the per-position objective (used when train.algo = "vipo").
    pub vipo: VipoConfig,
    /// The Perceptual Structuring Module: PCA components, aggregation, smoothing.
    pub psm: crate::psm::PsmConfig,
    /// The frozen backbone whose features the PSM uses.
    pub backbone: crate::backbone::BackboneConfig,
    /// `vipo compare`: methods (GRPO, ViPO, ablations) × seeds from one base.
    pub compare: CompareConfig,
    /// A real SD3 / SD3.5 generator (`modality = "sd3"`).
    pub sd3: Sd3Config,
    /// A real FLUX.1 generator (`modality = "flux"`).
    pub flux: FluxSection,
}

impl Config {
    /// A real generator's model spec and the field it comes from ("sd3.model"); None for
    /// the ShapeWorld policies.
    pub fn real_model(&self) -> Option<(&'static str, &str)> {
        self.generator().model_files()
    }

    /// Side of a generated image (or frame) in pixels.
    pub fn image_size(&self) -> usize {
        self.generator().image_size()
    }

    /// The generator family `modality` names, as its config section. The registry: the one
    /// `match` on the family in vipo; a new family is one arm here (and its folder under
    /// `policy/`, and its section above).
    pub fn generator(&self) -> &dyn Generator {
        match self.modality {
            Modality::Image => &self.model,
            Modality::Video => &self.video_model,
            Modality::Sd3 => &self.sd3,
            Modality::Flux => &self.flux,
        }
    }

    /// What the configured generator samples.
    pub fn sample_kind(&self) -> SampleKind {
        self.generator().sample_kind()
    }

    /// The configured generator's policy from `weights` (a real generator: its model
    /// spec), optionally with fresh LoRA adapters; the section and its sampling are
    /// checked first.
    pub fn load_policy(&self, weights: &Path, lora: Option<&LoraSpec>, device: &candle_core::Device, seed: u64) -> Result<Box<dyn Policy>> {
        let g = self.generator();
        g.validate()?;
        g.check_sampling(self.sample.guidance)?;
        g.load(weights, lora, device, seed)
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            seed: 0,
            out_dir: PathBuf::from("runs"),
            run_name: String::new(),
            progress: true,
            modality: Modality::Image,
            model: DitConfig::default(),
            video_model: Default::default(),
            pretrain: PretrainConfig::default(),
            sample: SampleConfig::default(),
            train: TrainConfig::default(),
            vipo: VipoConfig::default(),
            psm: crate::psm::PsmConfig::default(),
            backbone: crate::backbone::BackboneConfig::default(),
            compare: CompareConfig::default(),
            sd3: Sd3Config::default(),
            flux: FluxSection::default(),
        }
    }
}

/// `vipo compare`: every method trains from the same base checkpoint on the same prompts
/// with the same seeds and step budget (`[train]`), then is evaluated on identical noise.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CompareConfig {
    /// Seeds per method: seed, seed+1, … (`--seeds` overrides).
    pub seeds: usize,
    /// Prompts per split in every evaluation (base and each run).
    pub eval_prompts: usize,
    /// The methods; the first is the reference for "steps to reach its final reward".
    pub methods: Vec<MethodSpec>,
    /// Trailing window (steps) of the smoothed rollout-reward curves behind "final rollout
    /// reward" and "steps to reach the reference's final". One step's rollout reward is a
    /// mean over `train.prompts_per_step` prompts and swings by several hundredths, so a
    /// long run wants a longer window (bench/NOTES.md §6.4 uses 24 for 240 steps).
    pub smooth_steps: usize,
    /// Runs trained at once (`--jobs`), each on threads / jobs of the cores. The tiny
    /// ShapeWorld policy does not keep many cores busy: on 2 cores two runs side by side at
    /// one core each train 1.4× the steps per hour of one run at two (bench/NOTES.md §6.5).
    /// Weights and scores do not depend on it; the peak RSS a run logs is then the whole
    /// process's, every job's together.
    pub jobs: usize,
}

/// One method of a comparison: a name (its run directories are `NAME-sSEED`) and the
/// `--set` overrides that define it on top of the shared config.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MethodSpec {
    pub name: String,
    #[serde(default)]
    pub set: Vec<String>,
}

impl Default for CompareConfig {
    fn default() -> Self {
        let m = |name: &str, set: &[&str]| MethodSpec { name: name.into(), set: set.iter().map(|s| s.to_string()).collect() };
        Self { seeds: 3, eval_prompts: DEFAULT_EVAL_PROMPTS, methods: vec![m("grpo", &["train.algo=grpo"]), m("vipo", &["train.algo=vipo"])], smooth_steps: 5, jobs: 1 }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PretrainConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Images per step.
    pub batch_size: usize,
    /// AdamW learning rate (after warm-up).
    pub lr: f64,
    /// Linear warm-up steps.
    pub warmup_steps: usize,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Global gradient-norm clip (0 = off).
    pub grad_clip: f64,
    /// Number of distinct `train` prompts drawn for pretraining (each step renders fresh
    /// layouts of prompts from this pool).
    pub prompt_pool: usize,
    /// Write a checkpoint every N steps (0 = only at the end).
    pub checkpoint_every: usize,
    /// Log metrics every N steps.
    pub log_every: usize,
    /// Prompts in the final sample grid.
    pub grid_prompts: usize,
    /// Prompts per split for the base-model score recorded at the end (0 = skip).
    pub eval_prompts: usize,
    /// EMA decay of the weights; the EMA is what gets saved and sampled (0 = off).
    /// Under-trained flow models sample far more cleanly from an EMA.
    pub ema_decay: f64,
    /// Cosine-decay the learning rate to 0 after warm-up (else constant).
    pub cosine: bool,
    /// Probability that a training prompt is replaced by the empty (all-padding) prompt,
    /// so the model also learns the unconditional velocity that classifier-free guidance
    /// (`sample.guidance`) needs. 0 = off.
    pub cond_dropout: f64,
    /// Training noise levels σ = sigmoid(n), n ~ N(sigma_loc, sigma_scale²) (logit-normal,
    /// the SD3 recipe at 0 / 1). A positive location trains more at high noise, where the
    /// layout is decided (JiT's x-prediction recipe uses ≈ 0.8 / 0.8).
    pub sigma_loc: f64,
    pub sigma_scale: f64,
    /// Initial image-token position table: "sincos" (DiT's fixed 2-D sin-cos values, then
    /// learned: neighbouring tokens start out alike) or "randn" (N(0, 0.02²), the layout
    /// before this field).
    pub pos_init: PosInit,
}

/// Initial values of the image policy's learned position table ([`PretrainConfig::pos_init`]).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PosInit {
    Sincos,
    Randn,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        Self {
            steps: 1200,
            batch_size: 32,
            lr: 1e-3,
            warmup_steps: 50,
            weight_decay: 0.0,
            grad_clip: 1.0,
            prompt_pool: 2000,
            checkpoint_every: 400,
            log_every: 10,
            grid_prompts: 16,
            eval_prompts: 64,
            ema_decay: 0.99,
            cosine: true,
            cond_dropout: 0.0,
            sigma_loc: 0.0,
            sigma_scale: 1.0,
            pos_init: PosInit::Sincos,
        }
    }
}

/// Which algorithm `vipo train` runs.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Algo {
    /// Scalar group-relative advantage, one log-prob per sample (DanceGRPO / Flow-GRPO).
    Grpo,
    /// Per-position advantage from the allocation map, per-position ratio (ViPO).
    Vipo,
}

/// The stochastic sampler used for rollouts (docs/DESIGN.md §1.1).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum SdeChoice {
    /// DanceGRPO's SDE with constant noise level `eta`.
    Dance,
    /// Flow-GRPO's SDE with noise level `flow_a`.
    Flow,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// "grpo" or "vipo".
    pub algo: Algo,
    /// Base weights (safetensors). "" = the cached base of `vipo demo` for this config
    /// (pretrained on first use).
    pub base: String,
    /// RL steps (one rollout batch each).
    pub steps: usize,
    /// Distinct prompts per step.
    pub prompts_per_step: usize,
    /// Samples per prompt (G); ≥ 2.
    pub group_size: usize,
    /// Samples per forward/backward in the update.
    pub micro_batch: usize,
    /// Micro-batches accumulated per optimizer step. Optimizer steps per rollout batch =
    /// prompts_per_step·group_size / (micro_batch·grad_accum).
    pub grad_accum: usize,
    /// Sampling steps S of the rollout.
    pub sample_steps: usize,
    /// Time shift s of the rollout schedule (1 = none; the embedded base is trained unshifted).
    pub shift: f64,
    /// "dance" (DanceGRPO/ViPO default) or "flow" (Flow-GRPO).
    pub sde: SdeChoice,
    /// Dance-SDE noise level η.
    pub eta: f64,
    /// Flow-SDE noise level a.
    pub flow_a: f64,
    /// Stochastic (and trainable) transitions: the SDE runs on the first `sde_steps`
    /// transitions and deterministic Euler after them (Flow-GRPO-Fast / MixGRPO); 0 = all
    /// S (the published DanceGRPO/ViPO setting).
    pub sde_steps: usize,
    /// Share of the trainable transitions (min(S−1, sde_steps)) trained per sample, in (0, 1].
    pub timestep_fraction: f64,
    /// PPO clip range ε.
    pub clip_range: f64,
    /// Advantages are clipped to ±adv_clip.
    pub adv_clip: f64,
    /// "sample" (torch .std(), the official code) or "population" group std.
    pub adv_std: crate::advantage::StdKind,
    /// Normalise by the std over the whole batch instead of per group.
    pub global_std: bool,
    /// One initial noise per prompt group (diversity then comes from the SDE noise only).
    pub shared_group_noise: bool,
    /// AdamW learning rate.
    pub lr: f64,
    /// Linear warm-up steps (optimizer steps).
    pub warmup_steps: usize,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Global grad-norm clip.
    pub grad_clip: f64,
    /// LoRA rank; 0 = full fine-tuning.
    pub lora_rank: usize,
    /// LoRA alpha (scale = alpha / rank).
    pub lora_alpha: f64,
    /// Substrings of parameter paths that get LoRA adapters.
    pub lora_targets: Vec<String>,
    /// EMA decay of the trained weights (0 = off); EMA weights are used for sample grids/eval.
    pub ema_decay: f64,
    /// Flow-GRPO KL coefficient β against the frozen base (0 = off, as in DanceGRPO/ViPO).
    pub kl_beta: f64,
    /// Fail the run if the first inner update's |ratio − 1| exceeds this (on-policy parity).
    pub ratio_dev_bound: f64,
    /// Rewards and their loss coefficients.
    pub rewards: Vec<RewardEntry>,
    /// Checkpoint every N steps (0 = only at the end).
    pub checkpoint_every: usize,
    /// Sample grid every N steps (0 = off), same prompts and noise each time.
    pub grid_every: usize,
    /// Prompts in the sample grid.
    pub grid_prompts: usize,
    /// Distinct train prompts cycled through (shuffled per epoch).
    pub prompt_pool: usize,
    /// Prompts per split (eval, ood) scored with ODE sampling on fixed noise before the
    /// first and after the last step, into eval.json (0 = skip).
    pub eval_prompts: usize,
    /// Train prompts from a file ("" = `prompt_pool` draws of the ShapeWorld grammar).
    pub prompt_file: String,
    /// Held-out prompts from a file ("" = the grammar's eval split).
    pub eval_prompt_file: String,
    /// Out-of-domain prompts from a file ("" = the grammar's ood split, or no ood split when
    /// `eval_prompt_file` is set).
    pub ood_prompt_file: String,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            algo: Algo::Grpo,
            base: String::new(),
            steps: 30,
            prompts_per_step: 8,
            group_size: 8,
            micro_batch: 8,
            grad_accum: 8,
            sample_steps: 10,
            sde_steps: 0,
            shift: 1.0,
            sde: SdeChoice::Dance,
            eta: 0.3,
            flow_a: 0.7,
            timestep_fraction: 0.6,
            clip_range: 1e-4,
            adv_clip: 5.0,
            adv_std: crate::advantage::StdKind::Sample,
            global_std: false,
            shared_group_noise: true,
            lr: 3e-4,
            warmup_steps: 0,
            weight_decay: 1e-4,
            grad_clip: 1.0,
            lora_rank: 8,
            lora_alpha: 16.0,
            lora_targets: vec!["attn.qkv".into(), "attn.proj".into(), "mlp.fc1".into(), "mlp.fc2".into()],
            ema_decay: 0.0,
            kl_beta: 0.0,
            ratio_dev_bound: 1e-5,
            rewards: vec![RewardEntry::new("compositional", 1.0)],
            checkpoint_every: 10,
            grid_every: 10,
            grid_prompts: 8,
            prompt_pool: 512,
            eval_prompts: DEFAULT_EVAL_PROMPTS,
            prompt_file: String::new(),
            eval_prompt_file: String::new(),
            ood_prompt_file: String::new(),
        }
    }
}

impl TrainConfig {
    /// The configured LoRA adapters (`train.lora_rank` 0 = full fine-tuning).
    pub fn lora_spec(&self) -> Option<crate::policy::nn::layers::LoraSpec> {
        (self.lora_rank > 0).then(|| crate::policy::nn::layers::LoraSpec { rank: self.lora_rank, alpha: self.lora_alpha, targets: self.lora_targets.clone() })
    }

    /// Transitions the update may train: the stochastic ones, never the last σ→0 step.
    pub fn trainable_transitions(&self) -> usize {
        let s = self.sample_steps - 1;
        if self.sde_steps == 0 {
            s
        } else {
            self.sde_steps.min(s)
        }
    }
    /// Transitions the sampler runs stochastically.
    pub fn stochastic_transitions(&self) -> usize {
        if self.sde_steps == 0 {
            self.sample_steps
        } else {
            self.sde_steps
        }
    }

    /// Reject impossible settings before any work, saying which numbers to change.
    pub fn validate(&self) -> Result<()> {
        anyhow::ensure!(self.group_size >= 2, "train.group_size: must be ≥ 2 (got {}); group-relative advantages need at least two samples per prompt", self.group_size);
        anyhow::ensure!(self.prompts_per_step >= 1, "train.prompts_per_step: must be ≥ 1");
        anyhow::ensure!(self.timestep_fraction > 0.0 && self.timestep_fraction <= 1.0, "train.timestep_fraction: must be in (0, 1] (got {})", self.timestep_fraction);
        anyhow::ensure!(self.sample_steps >= 2, "train.sample_steps: must be ≥ 2 (the last transition is never trained)");
        anyhow::ensure!(self.sde_steps < self.sample_steps, "train.sde_steps: {} must be < train.sample_steps {} (0 = every step stochastic)", self.sde_steps, self.sample_steps);
        anyhow::ensure!(self.micro_batch >= 1 && self.grad_accum >= 1, "train.micro_batch and train.grad_accum: must be ≥ 1");
        let batch = self.prompts_per_step * self.group_size;
        anyhow::ensure!(
            batch.is_multiple_of(self.micro_batch * self.grad_accum),
            "train: prompts_per_step·group_size = {batch} samples must be a multiple of micro_batch·grad_accum = {}·{} = {}; change train.micro_batch or train.grad_accum (or prompts_per_step/group_size)",
            self.micro_batch, self.grad_accum, self.micro_batch * self.grad_accum
        );
        anyhow::ensure!(self.clip_range > 0.0, "train.clip_range: must be > 0");
        anyhow::ensure!(self.adv_clip > 0.0, "train.adv_clip: must be > 0");
        anyhow::ensure!(self.lr > 0.0 && self.lr.is_finite(), "train.lr: must be > 0");
        anyhow::ensure!(self.eta >= 0.0 && self.flow_a >= 0.0, "train.eta / train.flow_a: must be ≥ 0");
        anyhow::ensure!((0.0..1.0).contains(&self.ema_decay), "train.ema_decay: must be in [0, 1)");
        anyhow::ensure!(self.kl_beta >= 0.0, "train.kl_beta: must be ≥ 0");
        anyhow::ensure!(!self.rewards.is_empty(), "train.rewards: at least one reward");
        for (i, r) in self.rewards.iter().enumerate() {
            anyhow::ensure!(r.weight.is_finite(), "train.rewards[{i}].weight: must be finite");
        }
        if self.lora_rank > 0 {
            anyhow::ensure!(!self.lora_targets.is_empty(), "train.lora_targets: empty while lora_rank > 0");
        }
        Ok(())
    }
}

/// Where the allocation map comes from.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum MapKind {
    /// The Perceptual Structuring Module (PCA of frozen backbone features).
    Psm,
    /// All ones (= pixel-level GRPO; ablation).
    Ones,
}

/// What the map multiplies.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum MapTimes {
    /// A^p = clip(M(p)·A) — ViPO.
    Advantage,
    /// Per-position rewards M(p)·r, group-normalised per position (ablation).
    Reward,
}

/// Likelihood ratio granularity.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum RatioMode {
    /// One ratio per latent position (log-prob summed over channels) — vipo's default.
    PerPosition,
    /// One ratio per sample broadcast over the map, as in the released FLUX code (ablation).
    PerSample,
}

/// Where PPO's clip is decided for the per-position ratio (`objective.rs`).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ClipMode {
    /// Clip every position's ratio on its own (the paper's objective, log-prob summed over
    /// channels); at GRPO's ε this is a much tighter trust region (bench/NOTES.md §4.2).
    PerPosition,
    /// Decide the clip once per sample on GRPO's own ratio (the mean log-ratio over the
    /// image); the gradient stays per position (∝ the map's advantage there).
    PerSample,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct VipoConfig {
    /// "psm" or "ones".
    pub map: MapKind,
    /// "advantage" or "reward".
    pub map_times: MapTimes,
    /// "per-position" or "per-sample".
    pub ratio: RatioMode,
    /// Trust region of the per-position ratio: "per-sample" or "per-position" ([`ClipMode`]).
    pub clip: ClipMode,
    /// Write a sample | map | signed-advantage grid every N steps (0 = off).
    pub map_grid_every: usize,
    /// Video: σ_t (in frames) of the 1-D Gaussian along time over the stacked per-frame
    /// maps (docs/DESIGN.md §1.3 step 7); 0 = off.
    pub temporal_sigma: f64,
    /// Video: min–max normalise the map over the whole volume or each frame on its own.
    pub temporal_norm: TemporalNorm,
    /// Video: compute PSM maps on every k-th frame only and resample to all frames
    /// (k = 1: every frame; larger k trades map detail in time for backbone time).
    pub frame_stride: usize,
}

/// How a video's allocation map is min–max normalised.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum TemporalNorm {
    Volume,
    PerFrame,
}

impl Default for VipoConfig {
    fn default() -> Self {
        Self {
            map: MapKind::Psm,
            map_times: MapTimes::Advantage,
            ratio: RatioMode::PerPosition,
            clip: ClipMode::PerSample,
            map_grid_every: 10,
            temporal_sigma: 0.3,
            temporal_norm: TemporalNorm::Volume,
            frame_stride: 1,
        }
    }
}

impl VipoConfig {
    pub fn validate(&self) -> Result<()> {
        anyhow::ensure!(self.temporal_sigma.is_finite() && self.temporal_sigma >= 0.0, "vipo.temporal_sigma: must be ≥ 0 (got {})", self.temporal_sigma);
        anyhow::ensure!(self.frame_stride >= 1, "vipo.frame_stride: must be ≥ 1");
        Ok(())
    }
}

/// Load a config from TOML text, then apply `--set` overrides. `origin` names the source in errors.
pub fn from_toml_str<T: DeserializeOwned + Serialize + Default>(text: &str, origin: &str, overrides: &[String]) -> Result<T> {
    let mut value: toml::Value =
        if text.trim().is_empty() { toml::Value::Table(Default::default()) } else { toml::from_str(text).map_err(|e| anyhow::anyhow!("{origin}: {} {}", e.message().trim(), format_span(&e)))? };
    legacy_fields(&mut value, origin);
    // Fill defaults first so `--set` can address any field, then check the override exists.
    let defaults = toml::Value::try_from(T::default())?;
    let mut merged = defaults.clone();
    merge(&mut merged, &value);
    for ov in overrides {
        let (key, raw) = ov.split_once('=').with_context(|| format!("--set {ov}: expected key=value"))?;
        let key = key.trim();
        // Optional fields (absent from the defaults) are allowed when their table exists;
        // deserialization (deny_unknown_fields) then rejects names that do not exist.
        let parent = key.rsplit_once('.').map(|(p, _)| p);
        let known = lookup(&defaults, key).is_some() || parent.is_some_and(|p| lookup(&defaults, p).is_some_and(|v| v.is_table()));
        if !known {
            bail!("--set {key}: unknown config field");
        }
        let like = lookup(&defaults, key).cloned().unwrap_or(toml::Value::String(String::new()));
        let parsed = parse_value(raw.trim(), &like);
        set_path(&mut merged, key, parsed);
    }
    value = merged;
    T::deserialize(value).map_err(|e| anyhow::anyhow!("{origin}: {}", e.message().trim()))
}

/// Fields whose default changed after runs were saved without them. A run's saved config
/// is a complete dump; a field missing from it means the run was made before the field
/// existed, and it gets the value that reproduces that run, not today's default (else a
/// `--resume`, `vipo eval --run` or a comparison reusing the run would silently change it).
///
/// - `model.prediction`: a complete `[model]` table without it predicted v (default now "x",
///   which would sample garbage from such a checkpoint); without `conv_channels`, the plain DiT.
/// - `backbone.pad`: a dumped config (it has every top-level scalar a dump has) whose complete
///   `[backbone]` table lacks it ran the PSM without context padding (default now 2).
fn legacy_fields(value: &mut toml::Value, origin: &str) {
    // Keys every dump has at top level and a hand-written config rarely repeats.
    let dumped = ["seed", "out_dir", "run_name", "progress", "modality"].iter().all(|k| value.get(k).is_some());
    if let Some(b) = value.get_mut("backbone").and_then(|b| b.as_table_mut()) {
        if dumped && !b.contains_key("pad") && ["name", "tap", "input_size"].iter().all(|k| b.contains_key(*k)) {
            eprintln!("note: {origin}: a saved config whose [backbone] has no `pad` (written before it existed) means backbone.pad = 0");
            b.insert("pad".into(), toml::Value::Integer(0));
        }
    }
    const OLD_FIELDS: [&str; 8] = ["image_size", "patch", "dim", "depth", "heads", "mlp_ratio", "text_layers", "fused"];
    if let Some(m) = value.get_mut("model").and_then(|m| m.as_table_mut()) {
        if !m.contains_key("prediction") && OLD_FIELDS.iter().all(|k| m.contains_key(*k)) {
            eprintln!("note: {origin}: a complete [model] table without `prediction` (written before it existed) means model.prediction = \"v\"");
            m.insert("prediction".into(), toml::Value::String("v".into()));
        }
        // Likewise a complete table from before `conv_channels` describes the plain DiT.
        if !m.contains_key("conv_channels") && m.contains_key("prediction") && OLD_FIELDS.iter().all(|k| m.contains_key(*k)) {
            m.insert("conv_channels".into(), toml::Value::Integer(0));
        }
    }
}

fn format_span(e: &toml::de::Error) -> String {
    match e.span() {
        Some(s) => format!("(at bytes {}..{})", s.start, s.end),
        None => String::new(),
    }
}

/// Read a config file (or defaults when `path` is None) and apply overrides.
pub fn load<T: DeserializeOwned + Serialize + Default>(path: Option<&Path>, overrides: &[String]) -> Result<T> {
    match path {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("{}: cannot read config", p.display()))?;
            from_toml_str(&text, &p.display().to_string(), overrides)
        }
        None => from_toml_str("", "<defaults>", overrides),
    }
}

/// The fields where two configs differ, as `key: old → new` (dotted keys; at most `max`,
/// then "…"), for messages that refuse a mismatched resume.
pub fn differences<T: Serialize>(old: &T, new: &T, max: usize) -> String {
    fn walk(prefix: &str, a: Option<&toml::Value>, b: Option<&toml::Value>, out: &mut Vec<String>) {
        match (a, b) {
            (Some(toml::Value::Table(x)), Some(toml::Value::Table(y))) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    walk(&key, x.get(k), y.get(k), out);
                }
            }
            (a, b) if a != b => {
                let show = |v: Option<&toml::Value>| v.map_or("(unset)".to_string(), |v| v.to_string());
                out.push(format!("{prefix}: {} → {}", show(a), show(b)));
            }
            _ => {}
        }
    }
    let (a, b) = (toml::Value::try_from(old).ok(), toml::Value::try_from(new).ok());
    let mut out = Vec::new();
    walk("", a.as_ref(), b.as_ref(), &mut out);
    if out.len() > max {
        out.truncate(max);
        out.push("…".into());
    }
    out.join("; ")
}

/// The resolved config as TOML (saved into every run directory).
pub fn to_toml<T: Serialize>(cfg: &T) -> Result<String> {
    Ok(toml::to_string_pretty(cfg)?)
}

fn merge(base: &mut toml::Value, over: &toml::Value) {
    match (base, over) {
        (toml::Value::Table(b), toml::Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(k) {
                    Some(bv) if bv.is_table() && v.is_table() => merge(bv, v),
                    // Unknown keys are kept so deserialization (deny_unknown_fields) reports them.
                    _ => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (b, o) => *b = o.clone(),
    }
}

fn lookup<'a>(v: &'a toml::Value, path: &str) -> Option<&'a toml::Value> {
    path.split('.').try_fold(v, |cur, k| cur.as_table()?.get(k))
}

fn set_path(v: &mut toml::Value, path: &str, new: toml::Value) {
    let mut cur = v;
    let parts: Vec<&str> = path.split('.').collect();
    for k in &parts[..parts.len() - 1] {
        cur = cur.as_table_mut().unwrap().entry(k.to_string()).or_insert(toml::Value::Table(Default::default()));
    }
    cur.as_table_mut().unwrap().insert(parts[parts.len() - 1].to_string(), new);
}

/// Parse an override as a TOML literal; bare words become strings when the field is a string.
fn parse_value(raw: &str, like: &toml::Value) -> toml::Value {
    if like.is_str() && !(raw.starts_with('"') || raw.starts_with('\'')) {
        return toml::Value::String(raw.to_string());
    }
    let doc = format!("v = {raw}");
    match toml::from_str::<toml::Table>(&doc) {
        Ok(mut t) => t.remove("v").unwrap_or(toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modality_display_is_the_config_spelling() {
        // Messages print Display; the config file is read through serde: they must agree.
        for m in [Modality::Image, Modality::Video, Modality::Sd3, Modality::Flux] {
            assert_eq!(serde_json::to_string(&m).unwrap(), format!("\"{m}\""));
        }
        // Multi-word variants keep their hyphen, as the config file spells them.
        assert_eq!(spelling(&RatioMode::PerSample), "per-sample");
        assert_eq!(spelling(&Modality::Sd3), "sd3");
        assert_eq!(spelling(&Algo::Vipo), "vipo");
    }

    /// A resolved config from before `model.prediction` keeps meaning "v"; a user config
    /// that names only some model fields gets the current default.
    #[test]
    fn legacy_run_configs_keep_v_prediction() {
        let old = "[model]\nimage_size = 32\npatch = 4\ndim = 128\ndepth = 4\nheads = 4\nmlp_ratio = 4\ntext_layers = 2\nfused = true\n";
        let c: Config = from_toml_str(old, "old.toml", &[]).unwrap();
        assert_eq!(c.model.prediction, crate::policy::shapeworld::dit::Prediction::V);
        assert_eq!(c.model.conv_channels, 0, "a table from before the conv stem is the plain DiT");
        let x_old = format!("{old}prediction = \"x\"\n");
        let c: Config = from_toml_str(&x_old, "old-x.toml", &[]).unwrap();
        assert_eq!((c.model.prediction, c.model.conv_channels), (crate::policy::shapeworld::dit::Prediction::X, 0));
        let c: Config = from_toml_str("[model]\ndim = 64\n", "user.toml", &[]).unwrap();
        assert_eq!(c.model.prediction, crate::policy::shapeworld::dit::Prediction::X);
        assert_eq!(c.model.conv_channels, 32);
        let c: Config = from_toml_str(&to_toml(&Config::default()).unwrap(), "new.toml", &[]).unwrap();
        assert_eq!(c, Config::default());
    }

    /// A run saved before `backbone.pad` existed keeps its unpadded maps on resume; a fresh
    /// dump keeps its value; a user config that leaves `pad` out gets today's default.
    #[test]
    fn legacy_run_configs_keep_unpadded_maps() {
        let mut old: toml::Value = toml::Value::try_from(Config::default()).unwrap();
        old["backbone"].as_table_mut().unwrap().remove("pad");
        let c: Config = from_toml_str(&toml::to_string(&old).unwrap(), "old-run/config.toml", &[]).unwrap();
        assert_eq!(c.backbone.pad, 0);
        assert_eq!(Config::default().backbone.pad, 2);
        let c: Config = from_toml_str(&to_toml(&Config::default()).unwrap(), "new-run/config.toml", &[]).unwrap();
        assert_eq!(c.backbone.pad, 2);
        let c: Config = from_toml_str("[backbone]\nname = \"mobilenet_v2\"\ntap = \"features.6\"\ninput_size = 224\n", "user.toml", &[]).unwrap();
        assert_eq!(c.backbone.pad, 2, "a user file is not a saved run");
        // `--resume` of an old run takes no --set, but a comparison may pass one: it wins.
        let c: Config = from_toml_str(&toml::to_string(&old).unwrap(), "old-run/config.toml", &["backbone.pad=1".into()]).unwrap();
        assert_eq!(c.backbone.pad, 1);
    }

    #[test]
    fn differences_name_the_fields() {
        let a = Config::default();
        let b: Config = from_toml_str("", "x", &["backbone.pad=0".into(), "train.steps=7".into()]).unwrap();
        let d = differences(&a, &b, 5);
        assert!(d.contains("backbone.pad: 2 → 0") && d.contains("train.steps:") && d.contains("→ 7"), "{d}");
        assert_eq!(differences(&a, &a, 5), "");
        assert!(differences(&a, &b, 1).ends_with("; …"));
    }

    #[test]
    fn defaults_roundtrip_and_overrides() {
        let c: Config = from_toml_str("", "x", &[]).unwrap();
        assert_eq!(c, Config::default());
        let c: Config = from_toml_str("seed = 3\n[pretrain]\nsteps = 7\n", "f.toml", &["pretrain.lr=0.5".into(), "run_name=abc".into(), "model.depth=2".into()]).unwrap();
        assert_eq!(c.seed, 3);
        assert_eq!(c.pretrain.steps, 7);
        assert_eq!(c.pretrain.lr, 0.5);
        assert_eq!(c.run_name, "abc");
        assert_eq!(c.model.depth, 2);
        let text = to_toml(&c).unwrap();
        let back: Config = from_toml_str(&text, "resolved", &[]).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn shipped_configs_parse_and_default_toml_is_the_defaults() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        let d: Config = load(Some(&dir.join("default.toml")), &[]).unwrap();
        assert_eq!(d, Config::default(), "configs/default.toml drifted from the built-in defaults");
        for f in std::fs::read_dir(&dir).unwrap() {
            let p = f.unwrap().path();
            let c: Config = load(Some(&p), &[]).unwrap();
            c.train.validate().unwrap();
            c.model.validate().unwrap();
            c.video_model.validate().unwrap();
        }
    }

    #[test]
    fn unknown_and_malformed_fields_name_the_field() {
        let e = from_toml_str::<Config>("[pretrain]\nstepz = 3\n", "f.toml", &[]).unwrap_err().to_string();
        assert!(e.contains("f.toml") && e.contains("stepz"), "{e}");
        let e = from_toml_str::<Config>("[pretrain]\nsteps = \"many\"\n", "f.toml", &[]).unwrap_err().to_string();
        assert!(e.contains("f.toml"), "{e}");
        let e = from_toml_str::<Config>("", "f.toml", &["pretrain.nope=1".into()]).unwrap_err().to_string();
        assert!(e.contains("nope"), "{e}");
        let e = from_toml_str::<Config>("", "f.toml", &["nosuch.field=1".into()]).unwrap_err().to_string();
        assert!(e.contains("nosuch.field"), "{e}");
        let e = from_toml_str::<Config>("seed = [", "bad.toml", &[]).unwrap_err().to_string();
        assert!(e.contains("bad.toml"), "{e}");
    }
}
