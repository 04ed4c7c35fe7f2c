"""The PyTorch yardstick for `vipo bench gen-step`: diffusers' implementation of the same
transformer (SD3.5-Medium or FLUX.1-dev shape, random weights in bf16, PEFT LoRA r 32 /
alpha 64 on the eight attention projections, gradient checkpointing on) timed for one
update micro-batch forward + backward, and for one forward without gradients (a rollout
step), at 512^2 with the text lengths of vipo's configs.

    python3 bench/pytorch_gen.py --model flux --batch 4
    python3 bench/pytorch_gen.py --model sd3 --batch 16      # micro-batch 8 x 2 for CFG
    python3 bench/pytorch_gen.py --model flux --tiny          # shrunk shape, for a CPU check

Needs torch, diffusers and peft (a throw-away virtualenv; vipo itself never needs Python).
"""
import argparse
import json
import statistics
import time

import torch

TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]


def build(kind, tiny):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    if kind == "flux":
        cfg = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                   num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                   guidance_embeds=True, axes_dims_rope=(16, 56, 56))
        if tiny:
            cfg.update(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                       joint_attention_dim=24, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
        return FluxTransformer2DModel(**cfg), cfg
    cfg = dict(sample_size=64, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
               num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
               pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
               dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
    if tiny:
        cfg.update(num_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                   caption_projection_dim=32, pooled_projection_dim=24, pos_embed_max_size=8,
                   dual_attention_layers=(0,))
    return SD3Transformer2DModel(**cfg), cfg


def inputs(kind, cfg, batch, res, dev, dtype):
    side = res // 8  # the VAE's latent side
    g = torch.Generator(device="cpu").manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(dev, dtype)
    if kind == "flux":
        n, t = (side // 2) ** 2, 512 if res >= 256 else 3
        ids = torch.zeros(side // 2, side // 2, 3)
        ids[..., 1] = torch.arange(side // 2)[:, None]
        ids[..., 2] = torch.arange(side // 2)[None, :]
        return dict(hidden_states=r(batch, n, cfg["in_channels"]), encoder_hidden_states=r(batch, t, cfg["joint_attention_dim"]),
                    pooled_projections=r(batch, cfg["pooled_projection_dim"]), timestep=torch.full((batch,), 0.5, device=dev, dtype=dtype),
                    guidance=torch.full((batch,), 3.5, device=dev, dtype=dtype), img_ids=ids.reshape(-1, 3).to(dev, dtype),
                    txt_ids=torch.zeros(t, 3, device=dev, dtype=dtype))
    t = 77 + 256 if res >= 256 else 80
    return dict(hidden_states=r(batch, 16, side, side), encoder_hidden_states=r(batch, t, cfg["joint_attention_dim"]),
                pooled_projections=r(batch, cfg["pooled_projection_dim"]), timestep=torch.full((batch,), 500.0, device=dev, dtype=dtype))


def timed(fn, iters, dev):
    fn()
    fn()
    out = []
    for _ in range(iters):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        s = time.perf_counter()
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        out.append((time.perf_counter() - s) * 1e3)
    return statistics.median(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["flux", "sd3"], required=True)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--res", type=int, default=512)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--no-checkpointing", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="a shrunk shape (CPU check of the script)")
    a = ap.parse_args()
    from peft import LoraConfig

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        # torch 2.11's cuDNN attention hit an illegal memory access in FLUX's backward
        # (H200, 2026-12-04); the flash / memory-efficient kernels are what users get anyway.
        torch.backends.cuda.enable_cudnn_sdp(False)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    res = 32 if a.tiny else a.res
    with torch.device(dev):
        model, cfg = build(a.model, a.tiny)
    model = model.to(dtype)
    params = sum(p.numel() for p in model.parameters())
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=2 if a.tiny else 32, lora_alpha=2 if a.tiny else 64, target_modules=TARGETS, init_lora_weights="gaussian"))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # adapters in f32, as vipo keeps them
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not a.no_checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    x = inputs(a.model, cfg, a.batch, res, dev, dtype)

    def fwd_bwd():
        for p in trainable:
            p.grad = None
        with torch.autocast(dev.type, dtype=dtype, enabled=dev.type == "cuda"):
            out = model(**x, return_dict=False)[0]
        out.float().square().mean().backward()

    def fwd():
        with torch.no_grad(), torch.autocast(dev.type, dtype=dtype, enabled=dev.type == "cuda"):
            model(**x, return_dict=False)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    fb = timed(fwd_bwd, a.iters, dev)
    peak = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else None
    f = timed(fwd, a.iters, dev)
    r = dict(model=a.model, batch=a.batch, res=res, params=params, trainable=sum(p.numel() for p in trainable),
             checkpointing=not a.no_checkpointing, fwd_bwd_ms=round(fb, 1), fwd_ms=round(f, 1), peak_alloc_mb=peak,
             device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", torch=torch.__version__)
    print(json.dumps(r))


if __name__ == "__main__":
    main()
