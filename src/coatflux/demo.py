"""``coatflux demo``: the core on a small model, on the CPU, in about a minute.

It builds a small DiT-style regression model (AdaLN-modulated LayerNorm, attention, GELU-tanh
MLP, gated residuals -- the shape of a FLUX block at toy width), trains one copy with
``torch.optim.AdamW`` in full precision and one converted with :func:`coatflux.apply_coat` and
trained with :class:`coatflux.FP8AdamW`, on the same data and seed, and prints both losses and a
measured memory table: optimizer state, bytes saved for backward, weights.
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch
from torch import nn

from coatflux.core.accounting import module_bytes, optimizer_state_bytes, saved_activation_bytes
from coatflux.core.api import apply_coat
from coatflux.core.config import COATConfig
from coatflux.core.optim import FP8AdamW


class DemoBlock(nn.Module):
    """One FLUX-like block: LayerNorm + AdaLN modulation, attention, GELU-tanh MLP, gates."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.modulation = nn.Linear(dim, 6 * dim)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        mods = self.modulation(nn.functional.silu(cond)).unsqueeze(1).chunk(6, dim=-1)
        shift1, scale1, gate1, shift2, scale2, gate2 = mods
        h = self.norm(x) * (1 + scale1) + shift1
        b, n, d = h.shape
        q, k, v = self.qkv(h).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + gate1 * self.proj(attn)
        h = self.norm(x) * (1 + scale2) + shift2
        return x + gate2 * self.fc2(nn.functional.gelu(self.fc1(h), approximate="tanh"))


class DemoModel(nn.Module):
    def __init__(self, dim: int = 128, heads: int = 4, depth: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(DemoBlock(dim, heads) for _ in range(depth))
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, cond)
        return self.out(x)


def _data(dim: int, tokens: int, batch: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, dim, generator=g)
    cond = torch.randn(batch, dim, generator=g)
    teacher = torch.randn(dim, dim, generator=g) / dim**0.5
    # Targets carry noise (std 0.05), as real data does: the loss floor is 0.0025, and the
    # comparison shows whether FP8 training reaches it, not how far below it fp32 can overfit.
    y = torch.tanh(x @ teacher + cond[:, None, :] * 0.1) + 0.05 * torch.randn(x.shape, generator=g)
    return x, cond, y


def _train(model: nn.Module, opt: torch.optim.Optimizer, data: tuple[torch.Tensor, ...], steps: int) -> list[float]:
    x, cond, y = data
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x, cond), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=300, help="training steps per run (default 300)")
    parser.add_argument("--dim", type=int, default=128, help="model width (default 128)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per sample (default 64)")
    parser.add_argument("--batch", type=int, default=16, help="batch size (default 16)")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    reference = DemoModel(args.dim)
    coat_model = copy.deepcopy(reference)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # CPU: no FP8 GEMMs, said in the table below
        apply_coat(coat_model, COATConfig())
    data = _data(args.dim, args.tokens, args.batch, args.seed)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    coat_opt = FP8AdamW(coat_model.parameters(), lr=1e-3)

    start = time.perf_counter()
    ref_losses = _train(reference, ref_opt, data, args.steps)
    mid = time.perf_counter()
    coat_losses = _train(coat_model, coat_opt, data, args.steps)
    end = time.perf_counter()

    x, cond, _ = data
    rows = [
        ("final loss (mean of last 10 steps)", f"{sum(ref_losses[-10:]) / 10:.5f}", f"{sum(coat_losses[-10:]) / 10:.5f}"),
        ("optimizer state", _mib(optimizer_state_bytes(ref_opt)), _mib(optimizer_state_bytes(coat_opt))),
        ("saved for backward (one step)", _mib(saved_activation_bytes(reference, lambda: reference(x, cond))),
         _mib(saved_activation_bytes(coat_model, lambda: coat_model(x, cond)))),
        ("weights", _mib(module_bytes(reference)), _mib(module_bytes(coat_model))),
        ("wall time", f"{mid - start:.1f} s", f"{end - mid:.1f} s"),
    ]
    print(f"\nDemo: {args.steps} steps, width {args.dim}, {args.tokens} tokens x batch {args.batch}, "
          f"fp32 model on {torch.get_num_threads()} CPU threads")
    print("On CPU the FP8 GEMMs are emulated (dequantize then multiply): memory is saved, speed is not.\n")
    _print(["", "fp32 AdamW", "COAT + FP8AdamW"], rows)
    return 0


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def _print(header: list[str], rows: list[tuple[str, ...]]) -> None:
    table = [header, *[list(r) for r in rows]]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for i, row in enumerate(table):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
