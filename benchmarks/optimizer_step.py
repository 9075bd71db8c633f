"""Host time of one optimizer step over a FLUX.1 LoRA's 988 tensors: FusedFP8AdamW, FP8AdamW, AdamW.

What: 494 rank-16 adapters (A: 16 x n, B: n x 16) whose long side is ``--width`` (FLUX.1-dev's
is 3072; the default 8 makes the arithmetic negligible on a CPU, so the time is what the host
spends issuing the step, as on a GPU), every tensor FP8-quantized (``min_quantized_numel: 0``).
Prints the median of ``--repeats`` timings of ``--steps`` steps each.

Usage: ``python benchmarks/optimizer_step.py [--width 8] [--steps 10] [--repeats 3] [--device cpu]``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from coatflux.core.config import FP8QuantizationConfig
from coatflux.core.optim import FP8AdamW
from coatflux.kernels.adamw import FusedFP8AdamW

ADAPTERS = 494  # FLUX.1's LoRA targets inside the blocks (ai-toolkit's default)


def _params(width: int, device: str) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    params = []
    for _ in range(ADAPTERS):
        for shape in ((16, width), (width, 16)):
            p = torch.nn.Parameter((torch.randn(shape, generator=gen) * 0.1).to(device))
            p.grad = torch.randn(shape, generator=gen).to(device)
            params.append(p)
    return params


def _ms_per_step(optimizer: torch.optim.Optimizer, steps: int, repeats: int, device: str) -> float:
    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(3):
        optimizer.step()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        for _ in range(steps):
            optimizer.step()
        sync()
        times.append((time.perf_counter() - start) / steps * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    fp8 = FP8QuantizationConfig(min_quantized_numel=0)
    makers = {
        "FusedFP8AdamW": lambda ps: FusedFP8AdamW(ps, lr=1e-4, fp8_config=fp8),
        "FP8AdamW (reference)": lambda ps: FP8AdamW(ps, lr=1e-4, fp8_config=fp8),
        "torch AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=args.device.startswith("cuda") or None),
    }
    print(f"optimizer_step: {platform.machine()}, torch {torch.__version__}, {args.device}, 1 thread, "
          f"{2 * ADAPTERS} tensors of 16 x {args.width}")
    for name, make in makers.items():
        ms = _ms_per_step(make(_params(args.width, args.device)), args.steps, args.repeats, args.device)
        print(f"{name:22s} {ms:7.1f} ms per step")


if __name__ == "__main__":
    main()
