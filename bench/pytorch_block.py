"""The PyTorch yardstick for `vipo bench block` and `vipo bench policy`-style numbers:
the same DiT block (adaLN modulation, LayerNorm without affine + modulate, 4-head
self-attention, gated residuals, GELU-tanh MLP x4), batch 8, 256 tokens, width 256, f32,
CPU, forward and forward + backward (gradients for every parameter and the input),
median of N runs after a warm-up. Run with the machine's cores, e.g.:

    python bench/pytorch_block.py --threads 2 --iters 7
"""
import argparse
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, d=256, heads=4, mlp=4):
        super().__init__()
        self.heads = heads
        self.ada = nn.Linear(d, 6 * d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.fc1 = nn.Linear(d, mlp * d)
        self.fc2 = nn.Linear(mlp * d, d)

    def forward(self, x, c):
        b, n, d = x.shape
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(F.silu(c)).unsqueeze(1).chunk(6, dim=2)
        h = F.layer_norm(x, (d,), eps=1e-6) * (1 + sc1) + sh1
        q, k, v = self.qkv(h).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + g1 * self.proj(o)
        h = F.layer_norm(x, (d,), eps=1e-6) * (1 + sc2) + sh2
        return x + g2 * self.fc2(F.gelu(self.fc1(h), approximate="tanh"))


def median_ms(f, iters):
    f()
    t = []
    for _ in range(iters):
        s = time.perf_counter()
        f()
        t.append((time.perf_counter() - s) * 1e3)
    return statistics.median(t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--iters", type=int, default=7)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    blk = Block()
    x = torch.randn(8, 256, 256, requires_grad=True)
    c = torch.randn(8, 256)

    def fwd():
        with torch.no_grad():
            blk(x, c)

    def fwd_bwd():
        blk.zero_grad(set_to_none=True)
        x.grad = None
        blk(x, c).square().mean().backward()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, cpu capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"pytorch block b=8 n=256 d=256 h=4: fwd {median_ms(fwd, a.iters):7.1f} ms   fwd+bwd {median_ms(fwd_bwd, a.iters):7.1f} ms")


if __name__ == "__main__":
    main()
