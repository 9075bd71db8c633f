"""Host time of one optimizer step over a FLUX.1 LoRA's 988 tensors, and what the fused step launches.

What: 494 rank-16 adapters (A: 16 x n, B: n x 16) whose long side is ``--width`` (FLUX.1-dev's
is 3072; the default 8 makes the arithmetic negligible on a CPU, so the time is what the host
spends issuing the step, as on a GPU), every tensor FP8-quantized (``min_quantized_numel: 0``).
Prints the median of ``--repeats`` timings of ``--steps`` steps each.

``--count`` instead counts, for the adapters of FLUX.1-dev's real shapes (every LoRA target of the
bench, 18.8 M elements), what one step of :class:`FusedFP8AdamW`'s update over the flat buffers
does: eagerly, the PyTorch operations it runs and the bytes their inputs and outputs hold (views
not counted); compiled, the Triton kernels inductor writes for a GPU and the bytes they move by
inductor's own estimate (generated on this CPU as ``kernel_launches.py`` does; needs Triton).

Usage: ``python benchmarks/optimizer_step.py [--width 8] [--steps 10] [--repeats 3] [--device cpu]``
or ``python benchmarks/optimizer_step.py --count``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

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


def _flux_lora_params() -> list[torch.nn.Parameter]:
    """Random A and B matrices of the bench's rank-16 LoRA on FLUX.1-dev (shapes from a meta model)."""
    from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel

    from coatflux.bench.model import FLUX_DEV_CONFIG
    from coatflux.flux.lora import find_lora_targets

    with torch.device("meta"):
        model = FluxTransformer2DModel(**FLUX_DEV_CONFIG)
    gen = torch.Generator().manual_seed(0)
    params = []
    for name in find_lora_targets(model):
        linear = model.get_submodule(name)
        for shape in ((16, linear.in_features), (linear.out_features, 16)):
            p = torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.01)
            p.grad = torch.randn(shape, generator=gen) * 1e-3
            params.append(p)
    return params


class _Recorder(TorchDispatchMode):
    """The aten operations run under it, with the bytes of their tensor inputs and outputs."""

    VIEWS = frozenset({"view", "_unsafe_view", "reshape", "slice", "select", "unsqueeze", "squeeze", "alias",
                       "split", "split_with_sizes", "expand", "t", "transpose", "permute", "as_strided"})

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ not in self.VIEWS:
            leaves = tree_leaves((args, kwargs, out))
            moved = sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))
            self.ops.append((func.overloadpacket.__name__, moved))
        return out


def count_eager(params: list[torch.nn.Parameter]) -> tuple[int, int]:
    """Operations and bytes (in their inputs and outputs) of one eager update over the flat buffers."""
    optimizer = FusedFP8AdamW(params, lr=1e-4, fp8_config=FP8QuantizationConfig(min_quantized_numel=0),
                              compiled=False)
    optimizer.step()  # builds the flat buffers; the next step is the one counted
    recorder = _Recorder()
    with recorder:
        optimizer.step()
    update = [moved for name, moved in recorder.ops if name != "_foreach_copy_"]
    return len(update), sum(update)


def count_compiled(params: list[torch.nn.Parameter]) -> tuple[int, int]:
    """Triton kernel launches and bytes (inductor's estimate) of the compiled update, generated here."""
    from coatflux.kernels import quant
    from coatflux.kernels.adamw import bucket_update_
    from kernel_launches import _backend, _bytes, _count, _generate_only

    codes = _generate_only()
    optimizer = FusedFP8AdamW(params, lr=1e-4, fp8_config=FP8QuantizationConfig(min_quantized_numel=0),
                              compiled=True)
    options = quant._inductor_options()  # as FusedFP8AdamW compiles it
    optimizer._compiled_update = torch.compile(bucket_update_, backend=_backend(codes, options), fullgraph=True)
    optimizer.step()
    return sum(_count(code)[0] for code in codes), sum(_bytes(code)[0] for code in codes)


def count(params: list[torch.nn.Parameter]) -> None:
    import importlib.util
    import sys

    elements = sum(p.numel() for p in params)
    print(f"optimizer_step --count: {platform.machine()}, torch {torch.__version__}, {len(params)} tensors, "
          f"{elements / 1e6:.1f} M elements (FLUX.1-dev, LoRA rank 16 on every block linear)")
    ops, moved = count_eager(params)
    print(f"eager update: {ops} operations, {moved / 1e9:.2f} GB in their inputs and outputs "
          "(views not counted; the gradients' and parameters' _foreach_copy_ apart)")
    if importlib.util.find_spec("triton") is None:
        sys.exit("optimizer_step --count: the compiled count needs Triton (pip install triton)")
    launches, moved = count_compiled(params)
    print(f"compiled update: {launches} Triton kernel launch(es), {moved / 1e9:.2f} GB by inductor's estimate")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--count", action="store_true",
                        help="count the fused update's operations and kernels at FLUX.1-dev's shapes instead")
    args = parser.parse_args()
    if args.count:
        count(_flux_lora_params())
        return
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
