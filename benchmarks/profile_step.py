"""Where one training step spends its time: a ``torch.profiler`` breakdown per bench config.

What: builds the bench model of ``--preset`` (``coatflux.bench.model``), prepares it with each
``--configs`` recipe of ``coatflux.bench.configs``, runs ``--warmup`` steps (compilation, GEMM
planning) and profiles one more. It prints, per config: the step's wall time (synchronized, under the profiler), the
time the GPU was busy with kernels (so a step that is bound by Python and launches shows a large
gap), the kernel count, the time per kernel category (GEMM, attention, Triton/compiled,
other element-wise) and the most expensive kernels and CPU-side operators.

The bench's ``--profile`` profiles the models it has just timed, which saves a compiled config's
second compilation; this script profiles without a bench run (the summary is the same,
:mod:`coatflux.bench.profile`).

Usage: ``python3 benchmarks/profile_step.py --preset flux-dev --resolution 1024 --configs bf16 coat``
(``--preset tiny --device cpu`` runs it on a CPU, for checking the script only).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform

import torch

from coatflux.bench.configs import CONFIGS, SetupOptions
from coatflux.bench.model import PRESETS, build_transformer, make_batch, step_functions
from coatflux.bench.profile import format_summary, profile_step


def profile_config(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    preset = PRESETS[args.preset]
    model = build_transformer(preset, device)
    config = CONFIGS[name]
    options = SetupOptions(fused_optimizer=device.type == "cuda")
    optimizer = config.setup(model, preset.lora_rank, options)
    data = make_batch(preset, args.resolution, args.batch, device)
    forward_backward, optimizer_step = step_functions(model, optimizer, data, config.cudagraphs(options))

    def step() -> None:
        forward_backward()
        optimizer_step()

    for _ in range(args.warmup):
        step()
    return profile_step(step, device, name, args.top)  # model and optimizer die with this frame


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="flux-dev")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=["bf16", "coat"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--device", default=None)
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"profile_step: {card}, torch {torch.__version__}, {args.preset} at {args.resolution}px batch {args.batch}")
    if hasattr(torch.backends.cuda, "enable_cudnn_sdp"):
        torch.backends.cuda.enable_cudnn_sdp(False)  # as the bench does (see coatflux.bench.cli)
    results = []
    for name in args.configs:
        try:
            results.append(profile_config(name, args, device))
            print(format_summary(results[-1]))
        except Exception as exc:  # one failing config must not hide the others' profiles
            print(f"\n=== {name}: failed: {type(exc).__name__}: {str(exc)[:300]}")
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"card": card, "torch": torch.__version__, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
