"""Host (CPU) time of one forward + backward of the tiny FLUX model: bf16 against COAT and its parts.

What: builds the bench's ``tiny`` FLUX (2 double + 2 single blocks, hidden 64) with a rank-16
LoRA, and times forward + backward at 32 px (4 image tokens), where the arithmetic is negligible
and the time is what the host spends issuing operations: Python, autograd, dispatch, compiled-
function calls. On a GPU that host time is what a step cannot go below, and an H200 run showed
COAT's FLUX.1-dev step to be bound by it (1.10 s at 1024 px, 0.96 s at 512 px). The figure is a
proxy: CPU tensors take the emulated FP8 GEMM (more conversions than ``torch._scaled_mm``), and
``--kernels compiled`` makes the CPU take the compiled quantization and non-linear kernels that
CUDA tensors take (by default CPU tensors use the plain-PyTorch reference).

Usage: ``python benchmarks/host_overhead.py [--kernels compiled] [--repeats 3 --steps 20]``.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import time
import warnings
from unittest import mock

import torch

from coatflux.bench.model import PRESETS, build_transformer, loss_of, make_batch
from coatflux.core import formats
from coatflux.core.api import apply_coat, replace_linear_with_fp8
from coatflux.core.compiled import compile_blocks
from coatflux.core.config import ActivationConfig, COATConfig
from coatflux.flux.lora import find_lora_targets, inject_lora, lora_parameters

RECIPES = {
    "bf16": "plain bf16 linears",
    "fp8-linears": "replace_linear_with_fp8 only (FP8 weights and GEMMs, activations not compressed)",
    "coat-unfused": "apply_coat with fused_nonlinear: false",
    "coat": "apply_coat (the default: fused norm/GELU kernels)",
    "coat-compiled": "apply_coat with compile_blocks: true (one inductor graph per block)",
    "bf16-compiled": "plain bf16 linears, blocks compiled with inductor",
}


def _model(recipe: str) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    preset = PRESETS["tiny"]
    model = build_transformer(preset, "cpu").requires_grad_(False)
    if recipe == "fp8-linears":
        replace_linear_with_fp8(model)
    elif recipe == "bf16-compiled":
        compile_blocks(model)
    elif recipe != "bf16":
        apply_coat(model, COATConfig(activation=ActivationConfig(fused_nonlinear=recipe == "coat",
                                                                 compile_blocks=recipe == "coat-compiled")))
    inject_lora(model, preset.lora_rank, float(preset.lora_rank), find_lora_targets(model))
    return model, lora_parameters(model)


def _ms_per_step(model: torch.nn.Module, params: list[torch.nn.Parameter], steps: int, repeats: int) -> float:
    data = make_batch(PRESETS["tiny"], 32, 1, "cpu")

    def step() -> None:
        loss_of(model, data).backward()
        for p in params:
            p.grad = None

    for _ in range(3):  # compilation, GEMM planning
        step()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        best = min(best, (time.perf_counter() - start) / steps * 1000)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", choices=("reference", "compiled"), default="compiled")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--recipes", nargs="+", choices=tuple(RECIPES), default=tuple(RECIPES))
    args = parser.parse_args()
    torch.set_num_threads(1)  # host overhead, not arithmetic: one thread, as a GPU step's host side
    compiled = args.kernels == "compiled"
    patch = (mock.patch.object(formats, "uses_fast_path", lambda device, reference=False: not reference)
             if compiled else contextlib.nullcontext())
    print(f"host_overhead: {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, "
          f"1 thread, tiny FLUX at 32 px, {args.kernels} kernels")
    with patch, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "FP8 GEMMs need a CUDA GPU": expected here
        times = {recipe: _ms_per_step(*_model(recipe), args.steps, args.repeats) for recipe in args.recipes}
    baseline = times.get("bf16")
    for recipe, ms in times.items():
        ratio = f"({ms / baseline:.2f}x bf16)" if baseline else ""
        print(f"{recipe:13s} forward+backward {ms:6.1f} ms {ratio}  {RECIPES[recipe]}")


if __name__ == "__main__":
    main()
