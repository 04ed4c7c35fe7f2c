"""The PyTorch yardstick for one default `vipo train` GRPO step of the embedded image policy:
"the same step in PyTorch on the same machine".

Run with the machine's cores (first step is a warm-up, medians are over steps 2..N):

    python bench/pytorch_step.py --threads 2 --steps 5
    python bench/pytorch_step.py --threads 2 --check-samples /tmp/check.png   # architecture check
    python bench/pytorch_step.py --threads 2 --steps 3 --video    # the video step (configs/video.toml)

Needs torch, safetensors, numpy and pillow (e.g. a throw-away venv:
`python3 -m venv /work/venv-torch && /work/venv-torch/bin/pip install torch safetensors numpy pillow`;
the CPU-only wheel index works too where it can be reached). f32, CPU.

What is replicated (the Rust code is the spec; file names relative to the repository root):

* Model (`src/policy/shapeworld/dit.rs`, `src/policy/nn/{block,conv,layers,ops}.rs`), config
  `configs/default.toml` [model]: 32x32 RGB latents in [-1, 1], a conv stem (3x3 conv 3->32,
  GELU-tanh, 3x3 conv 32->32, GELU-tanh; vipo's im2col weight (C_out, 9*C_in) with input
  index (dy*3+dx)*C_in+c is reshaped to a conv2d kernel), 4x4 patchify of the stem features
  ((py, px, c) order, 512 values per token), x_embed + learned pos_embed, a prompt encoder
  (token + position embeddings of the 8 ShapeWorld token ids, 2 pre-LN layers: LayerNorm
  with affine eps 1e-6, 4-head attention with no padding mask, MLP x2 with GELU-tanh; a final
  LayerNorm; pooled = mean over all 8 tokens, text_proj on the tokens), timestep embedding
  [cos, sin](1000*sigma * 10000^(-i/128)) -> t_embed.fc1 -> SiLU -> fc2, plus y_embed(pooled),
  4 adaLN-Zero DiT blocks over [8 text tokens | 64 image tokens] (LayerNorm without affine
  eps 1e-6, x*(1+scale)+shift, softmax(QK^T/sqrt(32))V via F.scaled_dot_product_attention,
  gated residuals, MLP x4 with GELU-tanh), the final adaLN layer + linear on the image tokens,
  unpatchify, the skip-connected conv head (cat[tokens, stem] -> conv 64->32, GELU-tanh,
  conv 32->3) and x-prediction -> velocity v = (z - x)/max(sigma, 0.05).
* Weights: `weights/base/shapeworld_base.safetensors` (f16 -> f32), every tensor mapped by
  its checkpoint name, strict (each shape checked, none missing, none left over), frozen
  (requires_grad False). LoRA as vipo: rank 8, alpha 16 (scale 2), on every linear whose
  path contains "attn.qkv", "attn.proj", "mlp.fc1" or "mlp.fc2" (2 text layers + 4 blocks
  = 24 adapters, 90,112 trainable values); y = xW^T + b + 2*(xA^T)B^T, A ~ U(+-1/sqrt(in)),
  B = 0 so the first update is exactly on-policy.
* Sampler (`src/sampler.rs`): sigmas linspace(1, 0, 11) (shift 1), Dance-SDE eta 0.3 on all 10
  transitions (sde_steps = 0 makes every transition stochastic, the last sigma 0.1 -> 0
  included; it is sampled but never trained), x0 = z - sigma*v,
  score = -(z - (1-sigma)*x0)/sigma^2, mean = z + dsigma*v - 0.5*eta^2*score*dsigma,
  std = eta*sqrt(sigma - sigma_next); dense per-element Gaussian log-probs stored; one initial
  noise per prompt group (shared_group_noise); guidance 1 (no CFG: one forward per velocity).
* Step (`src/train/grpo.rs` Trainer::train_step/update, `src/objective.rs`,
  `src/advantage.rs`, `src/train/optim.rs`): 8 prompts x group 8 = 64 samples, one rollout
  batch of 64 under torch.no_grad() (timed with the decode to images as vipo's
  time_sample_s); reward: vipo's `redness` reward (mean of R - (G+B)/2 over pixels; the
  default compositional reward takes ~10 ms in vipo and is timed separately there too);
  group advantages (group mean, sample std + 1e-8, clip +-5, 0 for a constant group);
  update: per sample round(0.6*9) = 5 of the 9 trainable transitions in random order,
  micro-batches of 8 samples, for each of the 5 slots one forward of the 8 rows (each row at
  its own sigma), per-row transition mean and dense log-prob, GRPO reduction (mean over all
  3*32*32 elements), ratio = exp(new - old), loss = -mean(min(rho*A, clip(rho, 1 +- 1e-4)*A)),
  divided by 5 slots * 8 micro-batches, backward per (micro-batch, slot) accumulating
  gradients; one AdamW step per 64 samples (lr 3e-4, betas 0.9/0.999, eps 1e-8, wd 1e-4,
  global grad-norm clip 1.0 with vipo's clip/(norm + 1e-6)).

Not replicated (irrelevant to the timing or outside the step): vipo's ChaCha random streams
(torch generators are used, so samples differ from vipo's draw for draw), the prompt pool
(a fixed list of train-split ShapeWorld prompts cycles instead), metrics/checkpoint files.

Output: per-step rollout_s / reward_s / update_s / step_s, then their medians over steps
2..N, the peak RSS (ru_maxrss), the torch version, the thread count and the first update's
max |ratio - 1| (the on-policy check; vipo fails a run above 1e-5).
`--check-samples OUT.png`: 20-step deterministic Euler ODE samples (sigma 1 -> 0) of 16
prompts as a 4x4 grid (each image x4 nearest), the check that the port and the weights are
right: whole coloured shapes on a dark background that match the prompt.

`--video`: the same GRPO step for `vipo bench step --config configs/video.toml`: the
spatio-temporal policy (`src/policy/shapeworld/video_dit.rs`, configs/video.toml [video_model]: clips
(3, 8, 32, 32) in [-1, 1], tubelets of 2 frames x 4x4 pixels (96 values, (c, t, py, px)
order), learned pos_time + pos_space, the same prompt encoder over the 34-word video
vocabulary (13 tokens), 4 blocks alternating spatial attention (each tubelet-frame's 64
tokens after the 13 prompt tokens) and temporal attention (each position's 4 tokens),
v-prediction), on seeded random weights (N(0, 0.02); vipo's `bench step` also uses a
random base when no video base is cached; speed does not depend on the values), LoRA and
step as above (64 clips, 10 steps, 5 of 9 transitions, micro-batches of 8). The reward is
redness over all frames instead of the VQ / MQ pair (vipo times those separately,
≈ 0.09 s); the loss is the one GRPO term (vipo adds one per reward: a few elementwise ops).

Measure on a quiet machine. When other processes hold the cores, PyTorch's spin-waiting
OpenMP threads inflate its times far more than vipo's: with two other jobs running on the
2-core machine (2026-12-03, torch 2.15.0), `--threads 2` took 58-110 s a step, while
`--threads 1` took 9.5-10.3 s (rollout ~5.0 s, update ~5.0 s, reward 0.5 ms). Neither
figure is a yardstick.
"""
import argparse
import math
import os
import resource
import statistics
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_WEIGHTS = os.path.join(ROOT, "weights", "base", "shapeworld_base.safetensors")

# configs/default.toml [model]
IMAGE_SIZE, PATCH, DIM, DEPTH, HEADS, MLP_RATIO, TEXT_LAYERS, CONV_CHANNELS = 32, 4, 128, 4, 4, 4, 2, 32
LN_EPS = 1e-6  # block.rs LN_EPS, layers.rs LayerNorm eps
X_PRED_SIGMA_MIN = 0.05  # dit.rs
# configs/default.toml [train]
PROMPTS_PER_STEP, GROUP_SIZE, MICRO_BATCH, GRAD_ACCUM = 8, 8, 8, 8
SAMPLE_STEPS, SHIFT, ETA = 10, 1.0, 0.3
TIMESTEP_FRACTION, CLIP_RANGE, ADV_CLIP = 0.6, 1e-4, 5.0
LR, WEIGHT_DECAY, GRAD_CLIP = 3e-4, 1e-4, 1.0
LORA_RANK, LORA_ALPHA = 8, 16.0
LORA_TARGETS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")

# src/world/grammar.rs: the closed vocabulary ("<pad>" = 0) and MAX_TOKENS.
COLORS = ["red", "green", "blue", "yellow", "purple", "cyan"]
SHAPES = ["circle", "square", "triangle", "diamond"]
PLURALS = [s + "s" for s in SHAPES]
VOCAB = ["<pad>", "a", "one", "two", "three", "four"] + COLORS + SHAPES + PLURALS + ["left", "right", "of", "above", "below"]
MAX_TOKENS = 8
# src/world/video.rs: video_vocab() (the image vocabulary + motion words) and MAX_VIDEO_TOKENS;
# configs/video.toml [video_model] (defaults otherwise).
VIDEO_VOCAB = VOCAB + ["moving", "up", "down", "slowly", "fast", "stays", "stay", "still", "while"]
MAX_VIDEO_TOKENS = 13
FRAMES, T_PATCH = 8, 2
VIDEO_PROMPTS = [
    "a red circle moving left", "two blue squares moving up", "a green triangle stays still",
    "a yellow diamond moving right fast", "a purple square moving down slowly",
    "a cyan circle moving left while a red square stays still", "three green circles moving right",
    "a blue triangle moving up slowly",
]
# The latent of one sample: (3, H, W) for images, (3, T, H, W) for clips (set in main).
LATENT = (3, IMAGE_SIZE, IMAGE_SIZE)


def tokenize(text, vocab=VOCAB, max_tokens=MAX_TOKENS):
    """grammar.rs tokenize (video.rs tokenize_video with the video vocabulary): lower-case,
    split on whitespace, ids into the vocabulary, right-pad with 0."""
    ids = []
    for w in text.lower().split():
        if w not in vocab[1:]:
            raise ValueError(f"tokenize {text!r}: unknown word {w!r}")
        ids.append(vocab.index(w, 1))
    if len(ids) > max_tokens:
        raise ValueError(f"tokenize {text!r}: {len(ids)} tokens > {max_tokens}")
    return ids + [0] * (max_tokens - len(ids))


def tokens_for(texts, vocab=VOCAB, max_tokens=MAX_TOKENS):
    """dit.rs tokens_for: (B, max_tokens) token ids."""
    return torch.tensor([tokenize(t, vocab, max_tokens) for t in texts], dtype=torch.long)


# Train-split prompts of the ShapeWorld grammar (no held-out colour-shape pair, no
# "N>=2 ... above"), used round-robin as the step's 8 prompts.
TRAIN_PROMPTS = [
    "a red circle", "two blue squares", "a green triangle", "three yellow circles",
    "a purple square left of a red circle", "two blue squares left of a green triangle",
    "a cyan square above a red triangle", "a yellow triangle below a blue circle",
    "four red diamonds", "a green circle right of a purple diamond", "two cyan triangles",
    "a blue diamond above a yellow square", "three purple circles", "a red square below a green diamond",
    "two yellow squares right of a blue triangle", "a purple circle",
]
CHECK_PROMPTS = [
    "a red circle", "a blue square", "a green triangle", "a yellow circle",
    "two blue squares", "three red circles", "a purple diamond", "four cyan squares",
    "two blue squares left of a green triangle", "a red circle above a blue square",
    "a yellow square below a red triangle", "a green circle right of a purple square",
    "two red triangles", "a cyan diamond", "a blue circle left of a yellow triangle", "a purple circle",
]


# ---------------------------------------------------------------------------------------
# Model (src/policy/*.rs). Module paths mirror the checkpoint names exactly.

class Linear(nn.Module):
    """layers.rs Linear: y = x W^T + b (+ s (x A^T) B^T with a LoRA adapter)."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        self.bias = nn.Parameter(torch.empty(out_dim))
        self.lora_a = None
        self.lora_b = None
        self.lora_scale = 0.0

    def add_lora(self, rank, alpha, gen):
        bound = 1.0 / math.sqrt(self.in_dim)
        a = (torch.rand(rank, self.in_dim, generator=gen) * 2.0 - 1.0) * bound  # Uniform(+-1/sqrt(in))
        self.lora_a = nn.Parameter(a)
        self.lora_b = nn.Parameter(torch.zeros(self.out_dim, rank))  # B = 0: starts at the base
        self.lora_scale = alpha / rank

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.lora_a is not None:
            y = y + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.lora_scale
        return y


class LayerNorm(nn.Module):
    """layers.rs LayerNorm (affine, eps 1e-6), named weight/bias as in the checkpoint."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.bias = nn.Parameter(torch.empty(dim))

    def forward(self, x):
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, eps=LN_EPS)


def gelu(x):
    return F.gelu(x, approximate="tanh")  # candle's gelu and ops::gelu_tanh


def ln_modulate(x, shift, scale):
    """ops::ln_modulate: LayerNorm without affine (eps 1e-6), then x*(1+scale)+shift."""
    return F.layer_norm(x, (x.shape[-1],), eps=LN_EPS) * (1.0 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def attention(qkv, heads):
    """ops::attention_packed: qkv (B, N, 3D) laid out reshape(B, N, 3, H, dh) -> (B, N, D)."""
    b, n, d3 = qkv.shape
    d = d3 // 3
    q, k, v = qkv.reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4).unbind(0)
    o = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(dh), no mask
    return o.transpose(1, 2).reshape(b, n, d)


class Attn(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.qkv = Linear(dim, 3 * dim)
        self.proj = Linear(dim, dim)


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.fc2 = Linear(hidden, dim)


class TextLayer(nn.Module):
    """dit.rs TextLayer: pre-LN, attention, MLP x2 with GELU-tanh."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.ln1 = LayerNorm(dim)
        self.attn = Attn(dim)
        self.ln2 = LayerNorm(dim)
        self.mlp = Mlp(dim, 2 * dim)

    def forward(self, x):
        x = x + self.attn.proj(attention(self.attn.qkv(self.ln1(x)), self.heads))
        return x + self.mlp.fc2(gelu(self.mlp.fc1(self.ln2(x))))


class TextEncoder(nn.Module):
    def __init__(self, vocab, max_tokens, dim, heads, n_layers):
        super().__init__()
        self.embed = nn.Parameter(torch.empty(vocab, dim))
        self.pos = nn.Parameter(torch.empty(max_tokens, dim))
        self.layers = nn.ModuleList([TextLayer(dim, heads) for _ in range(n_layers)])
        self.ln = LayerNorm(dim)

    def forward(self, tokens):
        x = self.embed[tokens] + self.pos[: tokens.shape[1]].unsqueeze(0)
        for layer in self.layers:
            x = layer(x)
        return self.ln(x)


class DitBlock(nn.Module):
    """block.rs DitBlock (the fused path's math)."""

    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.heads = heads
        self.ada = Linear(dim, 6 * dim)
        self.attn = Attn(dim)
        self.mlp = Mlp(dim, mlp_ratio * dim)

    def forward(self, x, c):
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(F.silu(c)).chunk(6, dim=1)
        h = ln_modulate(x, sh1, sc1)
        x = x + g1.unsqueeze(1) * self.attn.proj(attention(self.attn.qkv(h), self.heads))
        h = ln_modulate(x, sh2, sc2)
        return x + g2.unsqueeze(1) * self.mlp.fc2(gelu(self.mlp.fc1(h)))


class Conv3x3(nn.Module):
    """conv.rs Conv3x3: stride 1, zero padding 1. The checkpoint weight is vipo's im2col
    matrix (C_out, 9*C_in) with input index (dy*3+dx)*C_in + c; stored as such, viewed as a
    conv2d kernel (C_out, C_in, 3, 3) in the forward."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.c_in, self.c_out = c_in, c_out
        self.weight = nn.Parameter(torch.empty(c_out, 9 * c_in))
        self.bias = nn.Parameter(torch.empty(c_out))

    def forward(self, x):  # (B, C_in, H, W) -> (B, C_out, H, W)
        w = self.weight.view(self.c_out, 3, 3, self.c_in).permute(0, 3, 1, 2)
        return F.conv2d(x, w, self.bias, padding=1)


class ConvPair(nn.Module):
    def __init__(self, c_in, c_mid, c_out):
        super().__init__()
        self.conv1 = Conv3x3(c_in, c_mid)
        self.conv2 = Conv3x3(c_mid, c_out)


class TEmbed(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fc1 = Linear(256, dim)
        self.fc2 = Linear(dim, dim)


class Final(nn.Module):
    def __init__(self, dim, pdim):
        super().__init__()
        self.ada = Linear(dim, 2 * dim)
        self.linear = Linear(dim, pdim)


def timestep_embedding(t, dim=256):
    """layers.rs timestep_embedding: [cos, sin](t * exp(-ln(10000) i / half)), t = 1000 sigma."""
    half = dim // 2
    freqs = torch.tensor([math.exp(-math.log(10000.0) * i / half) for i in range(half)], dtype=torch.float32)
    args = t.unsqueeze(1) * freqs.unsqueeze(0)
    return torch.cat([args.cos(), args.sin()], dim=1)


class Dit(nn.Module):
    """dit.rs Dit with conv_channels > 0 and prediction = "x": velocity for latents z
    (B, 3, H, W) at noise levels sigma (B,) given token ids (B, L)."""

    def __init__(self):
        super().__init__()
        d, c = DIM, CONV_CHANNELS
        pdim = c * PATCH * PATCH
        self.text = TextEncoder(len(VOCAB), MAX_TOKENS, d, HEADS, TEXT_LAYERS)
        self.text_proj = Linear(d, d)
        self.x_embed = Linear(pdim, d)
        self.pos_embed = nn.Parameter(torch.empty((IMAGE_SIZE // PATCH) ** 2, d))
        self.t_embed = TEmbed(d)
        self.y_embed = Linear(d, d)
        self.blocks = nn.ModuleList([DitBlock(d, HEADS, MLP_RATIO) for _ in range(DEPTH)])
        self.final = Final(d, pdim)
        self.stem = ConvPair(3, c, c)
        self.head_conv = ConvPair(2 * c, c, 3)

    def forward(self, z, sigma, tokens):
        b, _, h, w = z.shape
        p, c = PATCH, CONV_CHANNELS
        gh, gw = h // p, w // p
        # Conv stem: conv(3->C), GELU, conv(C->C), GELU.
        stem = gelu(self.stem.conv2(gelu(self.stem.conv1(z))))  # (B, C, H, W)
        # conv.rs patchify of channels-last features: tokens ordered (py, px, c).
        x = stem.reshape(b, c, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, p * p * c)
        x = self.x_embed(x) + self.pos_embed.unsqueeze(0)
        # Prompt encoder; y_embed sees the pooled LayerNormed tokens, the blocks text_proj(tokens).
        t = self.text(tokens)
        pooled = t.mean(1)
        txt = self.text_proj(t)
        cond = self.t_embed.fc2(F.silu(self.t_embed.fc1(timestep_embedding(sigma * 1000.0)))) + self.y_embed(pooled)
        n_txt = txt.shape[1]
        seq = torch.cat([txt, x], dim=1)
        for blk in self.blocks:
            seq = blk(seq, cond)
        # Final adaLN layer on the image tokens.
        shift, scale = self.final.ada(F.silu(cond)).chunk(2, dim=1)
        out = self.final.linear(ln_modulate(seq[:, n_txt:], shift, scale))  # (B, N, p*p*C)
        # conv.rs unpatchify, then the skip-connected conv head.
        px = out.reshape(b, gh, gw, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)
        xhat = self.head_conv.conv2(gelu(self.head_conv.conv1(torch.cat([px, stem], dim=1))))
        # x-prediction -> velocity.
        return (z - xhat) / sigma.clamp(min=X_PRED_SIGMA_MIN).view(b, 1, 1, 1)


class VideoDit(nn.Module):
    """video_dit.rs VideoDit with attention = "factorised" and prediction = "v": velocity for
    clips z (B, 3, T, H, W) at noise levels sigma (B,) given token ids (B, L)."""

    def __init__(self):
        super().__init__()
        d = DIM
        self.pdim = 3 * T_PATCH * PATCH * PATCH
        self.text = TextEncoder(len(VIDEO_VOCAB), MAX_VIDEO_TOKENS, d, HEADS, TEXT_LAYERS)
        self.text_proj = Linear(d, d)
        self.x_embed = Linear(self.pdim, d)
        self.pos_space = nn.Parameter(torch.empty((IMAGE_SIZE // PATCH) ** 2, d))
        self.pos_time = nn.Parameter(torch.empty(FRAMES // T_PATCH, d))
        self.t_embed = TEmbed(d)
        self.y_embed = Linear(d, d)
        self.blocks = nn.ModuleList([DitBlock(d, HEADS, MLP_RATIO) for _ in range(DEPTH)])
        self.final = Final(d, self.pdim)

    def forward(self, z, sigma, tokens):
        b, c, t, h, w = z.shape
        p, tp, d = PATCH, T_PATCH, DIM
        tt, gh, gw = t // tp, h // p, w // p
        s = gh * gw
        # patchify: tubelet frames folded into channels, then (c, t, py, px) per token.
        x = z.reshape(b, c, tt, tp, h * w).permute(0, 2, 1, 3, 4).reshape(b * tt, c * tp, h, w)
        x = x.reshape(b * tt, c * tp, gh, p, gw, p).permute(0, 2, 4, 1, 3, 5).reshape(b, tt * s, c * tp * p * p)
        pos = (self.pos_time.unsqueeze(1) + self.pos_space.unsqueeze(0)).reshape(tt * s, d)
        x = self.x_embed(x) + pos.unsqueeze(0)
        tks = self.text(tokens)
        pooled = tks.mean(1)
        txt = self.text_proj(tks)
        cond = self.t_embed.fc2(F.silu(self.t_embed.fc1(timestep_embedding(sigma * 1000.0)))) + self.y_embed(pooled)
        n_txt = txt.shape[1]
        txt_f = txt.unsqueeze(1).expand(b, tt, n_txt, d).reshape(b * tt, n_txt, d)
        cond_f, cond_s = cond.repeat_interleave(tt, 0), cond.repeat_interleave(s, 0)
        for i, blk in enumerate(self.blocks):
            if i % 2 == 0:  # spatial: each tubelet-frame's tokens after the prompt tokens
                seq = torch.cat([txt_f, x.reshape(b * tt, s, d)], dim=1)
                x = blk(seq, cond_f)[:, n_txt:].reshape(b, tt * s, d)
            else:  # temporal: each position's tokens across time
                seq = x.reshape(b, tt, s, d).transpose(1, 2).reshape(b * s, tt, d)
                x = blk(seq, cond_s).reshape(b, s, tt, d).transpose(1, 2).reshape(b, tt * s, d)
        shift, scale = self.final.ada(F.silu(cond)).chunk(2, dim=1)
        out = self.final.linear(ln_modulate(x, shift, scale))  # (B, T'*S, pdim)
        # unpatchify
        out = out.reshape(b * tt, gh, gw, c * tp, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, tt, c, tp, h * w)
        return out.permute(0, 2, 1, 3, 4).reshape(b, c, t, h, w)  # v-prediction: the velocity


def init_random(model, seed):
    """Seeded N(0, 0.02) base weights (frozen), for a model with no shipped checkpoint."""
    gen = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                continue
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            p.requires_grad_(False)
            n += 1
    return n


def load_base(model, path):
    """Strict load: every model base tensor from the checkpoint by name, shapes checked, f16 -> f32,
    nothing left over."""
    from safetensors.torch import load_file

    ckpt = load_file(path)
    own = {k: v for k, v in model.named_parameters() if ".lora_" not in k}
    missing = sorted(set(own) - set(ckpt))
    extra = sorted(set(ckpt) - set(own))
    if missing or extra:
        raise SystemExit(f"{path}: missing tensors {missing}, unused tensors {extra}")
    with torch.no_grad():
        for k, p in own.items():
            t = ckpt[k]
            if tuple(t.shape) != tuple(p.shape):
                raise SystemExit(f"{path}: tensor {k} has shape {tuple(t.shape)}, the model expects {tuple(p.shape)}")
            p.copy_(t.to(torch.float32))
            p.requires_grad_(False)
    return len(own)


def add_lora(model, gen):
    """Fresh adapters on every Linear whose path matches a target (layers.rs); returns the
    trainable parameters."""
    for name, m in model.named_modules():
        if isinstance(m, Linear) and any(t in name for t in LORA_TARGETS):
            m.add_lora(LORA_RANK, LORA_ALPHA, gen)
    params = [p for n, p in model.named_parameters() if ".lora_" in n]
    assert all(p.requires_grad for p in params)
    return params


# ---------------------------------------------------------------------------------------
# Sampler (src/sampler.rs).

def sigmas_for(steps, shift):
    out = []
    for k in range(steps + 1):
        s = 1.0 - k / steps
        out.append(1.0 if k == 0 else 0.0 if k == steps else shift * s / (1.0 + (shift - 1.0) * s))
    return out


def dance_transition(z, v, sigma, sigma_next, eta):
    """Dance-SDE mean and std of sigma -> sigma_next (scalars as Python floats)."""
    ds = sigma_next - sigma
    x0 = z - v * sigma
    score = (z - x0 * (1.0 - sigma)) * (-1.0 / (sigma * sigma))
    mean = (z + v * ds) - score * (0.5 * eta * eta * ds)
    return mean, eta * math.sqrt(sigma - sigma_next)


def log_prob_dense(x_next, mean, std):
    log_norm = math.log(std) + 0.5 * math.log(2.0 * math.pi)
    return (x_next.detach() - mean).square() * (-1.0 / (2.0 * std * std)) - log_norm


@torch.no_grad()
def rollout(model, tokens, sig, gen):
    """Group-shared initial noise, Dance-SDE on every transition; returns latents
    (S+1, N, *LATENT) and dense log-probs (S, N, *LATENT)."""
    n = tokens.shape[0]
    noise = torch.randn(n // GROUP_SIZE, 1, *LATENT, generator=gen)
    z = noise.expand(-1, GROUP_SIZE, *([-1] * len(LATENT))).reshape(n, *LATENT).contiguous()
    latents, logps = [z], []
    for k in range(len(sig) - 1):
        v = model(z, torch.full((n,), sig[k], dtype=torch.float32), tokens)
        mean, std = dance_transition(z, v, sig[k], sig[k + 1], ETA)
        z = mean + torch.randn(z.shape, generator=gen) * std
        logps.append(log_prob_dense(z, mean, std))
        latents.append(z)
    return torch.stack(latents), torch.stack(logps)


@torch.no_grad()
def ode_sample(model, tokens, steps, gen):
    sig = sigmas_for(steps, 1.0)
    n = tokens.shape[0]
    z = torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
    for k in range(steps):
        v = model(z, torch.full((n,), sig[k], dtype=torch.float32), tokens)
        z = z + v * (sig[k + 1] - sig[k])
    return z


def decode(z):
    """dit.rs latents_to_images: ((z + 1)/2) clamped to [0, 1]."""
    return ((z + 1.0) * 0.5).clamp(0.0, 1.0)


def redness(images):
    """reward/redness.rs: mean over pixels (and frames) of R - (G + B)/2, accumulated in f64."""
    x = images.double()
    return (x[:, 0] - 0.5 * (x[:, 1] + x[:, 2])).flatten(1).mean(1).float()


def group_advantages(rewards, g):
    """advantage.rs: per group (r - mean)/(sample std + 1e-8), clipped, 0 for a constant group."""
    r = rewards.double().view(-1, g)
    mean = r.mean(1, keepdim=True)
    sd = r.std(1, unbiased=True, keepdim=True) + 1e-8
    adv = ((r - mean) / sd).clamp(-ADV_CLIP, ADV_CLIP)
    const = (r == r[:, :1]).all(1, keepdim=True)
    return torch.where(const, torch.zeros_like(adv), adv).float().view(-1)


# ---------------------------------------------------------------------------------------
# The step (src/train/grpo.rs).

class Stepper:
    def __init__(self, model, params, seed, video=False):
        self.video = video
        self.model = model
        self.params = params
        self.opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WEIGHT_DECAY)
        self.sig = sigmas_for(SAMPLE_STEPS, SHIFT)
        self.gen_noise = torch.Generator().manual_seed(seed ^ 0x401E)
        self.gen_timesteps = torch.Generator().manual_seed(seed ^ 0x7157)
        self.cursor = 0

    def next_prompts(self):
        pool = VIDEO_PROMPTS if self.video else TRAIN_PROMPTS
        out = [pool[(self.cursor + i) % len(pool)] for i in range(PROMPTS_PER_STEP)]
        self.cursor += PROMPTS_PER_STEP
        return out

    def step(self):
        t0 = time.perf_counter()
        prompts = self.next_prompts()
        texts = [p for p in prompts for _ in range(GROUP_SIZE)]
        tokens = tokens_for(texts, VIDEO_VOCAB, MAX_VIDEO_TOKENS) if self.video else tokens_for(texts)
        latents, logps = rollout(self.model, tokens, self.sig, self.gen_noise)
        images = decode(latents[-1])
        t1 = time.perf_counter()
        rewards = redness(images)
        t2 = time.perf_counter()
        adv = group_advantages(rewards, GROUP_SIZE)
        t3 = time.perf_counter()
        stats = self.update(latents, logps, tokens, adv)
        t4 = time.perf_counter()
        stats.update(rollout_s=t1 - t0, reward_s=t2 - t1, update_s=t4 - t3, step_s=t4 - t0,
                     reward_mean=rewards.mean().item())
        return stats

    def update(self, latents, logps, tokens, adv):
        n = tokens.shape[0]
        s_train = SAMPLE_STEPS - 1  # the last sigma -> 0 transition is never trained
        k_train = min(max(int(math.floor(TIMESTEP_FRACTION * s_train + 0.5)), 1), s_train)
        chosen = torch.stack([torch.randperm(s_train, generator=self.gen_timesteps)[:k_train] for _ in range(n)])  # (N, K)
        sig = self.sig
        per_opt = MICRO_BATCH * GRAD_ACCUM
        dev_first, ratio_sum, ratio_cnt, clip_sum, loss_sum, grad_norms = 0.0, 0.0, 0, 0.0, 0.0, []
        for oi, start in enumerate(range(0, n, per_opt)):
            chunk = list(range(start, min(start + per_opt, n)))
            n_mb = math.ceil(len(chunk) / MICRO_BATCH)
            self.opt.zero_grad(set_to_none=True)
            for m0 in range(0, len(chunk), MICRO_BATCH):
                idx = torch.tensor(chunk[m0:m0 + MICRO_BATCH])
                tok_mb, adv_mb = tokens[idx], adv[idx]
                for j in range(k_train):
                    ks = chosen[idx, j]
                    z, z_next, old = latents[ks, idx], latents[ks + 1, idx], logps[ks, idx]
                    ks = ks.tolist()
                    v = self.model(z, torch.tensor([sig[k] for k in ks], dtype=torch.float32), tok_mb)
                    new = []
                    for r, k in enumerate(ks):
                        mean_r, std_r = dance_transition(z[r:r + 1], v[r:r + 1], sig[k], sig[k + 1], ETA)
                        new.append(log_prob_dense(z_next[r:r + 1], mean_r, std_r))
                    new = torch.cat(new)
                    b = new.shape[0]
                    lp_new, lp_old = new.reshape(b, -1).mean(1), old.reshape(b, -1).mean(1)
                    ratio = (lp_new - lp_old).exp()
                    loss = -torch.minimum(ratio * adv_mb, ratio.clamp(1.0 - CLIP_RANGE, 1.0 + CLIP_RANGE) * adv_mb).mean()
                    loss = loss / (k_train * n_mb)
                    loss.backward()
                    r = ratio.detach()
                    ratio_sum += r.mean().item()
                    ratio_cnt += 1
                    clip_sum += ((r - 1.0).abs() > CLIP_RANGE).float().mean().item()
                    if oi == 0:
                        dev_first = max(dev_first, (r.double() - 1.0).abs().max().item())
                    loss_sum += loss.item()
            grad_norms.append(torch.nn.utils.clip_grad_norm_(self.params, GRAD_CLIP).item())
            self.opt.step()
        return dict(ratio_dev_first=dev_first, ratio_mean=ratio_sum / max(ratio_cnt, 1),
                    clip_frac=clip_sum / max(ratio_cnt, 1), loss=loss_sum,
                    grad_norm=sum(grad_norms) / max(len(grad_norms), 1))


def write_png(path, images, cols, up):
    """images (B, 3, H, W) in [0, 1] -> a cols-wide grid, each image upscaled x`up` (nearest)."""
    from PIL import Image

    x = (images.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    x = x.repeat(up, axis=1).repeat(up, axis=2)
    b, h, w, _ = x.shape
    rows, gap = math.ceil(b / cols), 2
    grid = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap, 3), 224, dtype=np.uint8)  # light separators
    for i in range(b):
        r, c = (i // cols) * (h + gap), (i % cols) * (w + gap)
        grid[r:r + h, c:c + w] = x[i]
    Image.fromarray(grid).save(path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="GRPO steps; the first is a warm-up")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weights", default=DEFAULT_WEIGHTS)
    ap.add_argument("--check-samples", metavar="OUT.png", help="write 16 ODE samples (20 Euler steps) and exit")
    ap.add_argument("--video", action="store_true", help="the video step (configs/video.toml) on random weights")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    global LATENT

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu capability {torch.backends.cpu.get_cpu_capability()}")
    if a.video:
        if a.check_samples:
            raise SystemExit("--check-samples needs the shipped image base; --video runs on random weights")
        LATENT = (3, FRAMES, IMAGE_SIZE, IMAGE_SIZE)
        model = VideoDit()
        print(f"video policy: {init_random(model, a.seed)} base tensors, seeded random N(0, 0.02) (frozen)")
    else:
        model = Dit()
        n_base = load_base(model, a.weights)
        print(f"loaded {n_base} base tensors from {a.weights} (frozen)")

    if a.check_samples:
        model.eval()
        tokens = tokens_for(CHECK_PROMPTS)
        t0 = time.perf_counter()
        z = ode_sample(model, tokens, 20, torch.Generator().manual_seed(a.seed))
        write_png(a.check_samples, decode(z), cols=4, up=4)
        print(f"{len(CHECK_PROMPTS)} ODE samples in {time.perf_counter() - t0:.2f} s -> {a.check_samples}; row-major prompts:")
        for i, p in enumerate(CHECK_PROMPTS):
            print(f"  ({i // 4}, {i % 4}) {p}")
        return

    params = add_lora(model, torch.Generator().manual_seed(a.seed ^ 0x102A))
    print(f"LoRA rank {LORA_RANK} alpha {LORA_ALPHA}: {len(params) // 2} adapters, {sum(p.numel() for p in params)} trainable values")
    stepper = Stepper(model, params, a.seed, video=a.video)
    rows = []
    for s in range(1, a.steps + 1):
        m = stepper.step()
        rows.append(m)
        print(f"step {s}: rollout_s {m['rollout_s']:.3f}  reward_s {m['reward_s']:.4f}  update_s {m['update_s']:.3f}  "
              f"step_s {m['step_s']:.3f}  reward {m['reward_mean']:+.4f}  ratio_dev_first {m['ratio_dev_first']:.2e}  "
              f"clip_frac {m['clip_frac']:.3f}  grad_norm {m['grad_norm']:.3e}", flush=True)
    timed = rows[1:] if len(rows) > 1 else rows
    med = {k: statistics.median(r[k] for r in timed) for k in ("rollout_s", "reward_s", "update_s", "step_s")}
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    print(f"median over steps {2 if len(rows) > 1 else 1}..{len(rows)}: rollout_s {med['rollout_s']:.3f}  reward_s {med['reward_s']:.4f}  "
          f"update_s {med['update_s']:.3f}  step_s {med['step_s']:.3f}")
    print(f"peak RSS {rss_mb:.0f} MB; torch {torch.__version__}; {torch.get_num_threads()} threads; "
          f"first update max |ratio - 1| = {rows[0]['ratio_dev_first']:.2e}")


if __name__ == "__main__":
    main()
