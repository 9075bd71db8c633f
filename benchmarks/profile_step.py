"""Where one training step spends its time: a ``torch.profiler`` breakdown per bench config.

What: builds the bench model of ``--preset`` (``coatflux.bench.model``), prepares it with each
``--configs`` recipe of ``coatflux.bench.configs``, runs ``--warmup`` steps (compilation, GEMM
planning) and profiles one more. It prints, per config: the step's wall time (synchronized, under the profiler), the
time the GPU was busy with kernels (so a step that is bound by Python and launches shows a large
gap), the kernel count, the time per kernel category (GEMM, attention, Triton/compiled,
other element-wise) and the most expensive kernels and CPU-side operators.

Why a separate script rather than a bench flag: the profiler's own overhead would distort the
bench's timings; this answers "why", the bench answers "how fast".

Usage: ``python3 benchmarks/profile_step.py --preset flux-dev --resolution 1024 --configs bf16 coat``
(``--preset tiny --device cpu`` runs it on a CPU, for checking the script only).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from coatflux.bench.configs import CONFIGS, SetupOptions
from coatflux.bench.model import PRESETS, build_transformer, loss_of, make_batch

CATEGORIES = (  # first match wins; kernel names are lower-cased
    ("gemm", ("gemm", "cutlass", "nvjet", "sm90_xmma", "scaled_mm", "cublas", "addmm", "matmul", "mm_")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "efficient")),
    ("compiled", ("triton",)),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
)


def category(name: str) -> str:
    lowered = name.lower()
    for label, keys in CATEGORIES:
        if any(k in lowered for k in keys):
            return label
    return "other"


def _step(model, optimizer, data) -> None:
    loss_of(model, data).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_config(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    preset = PRESETS[args.preset]
    model = build_transformer(preset, device)
    optimizer = CONFIGS[name].setup(model, preset.lora_rank, SetupOptions(fused_optimizer=device.type == "cuda"))
    data = make_batch(preset, args.resolution, args.batch, device)
    for _ in range(args.warmup):
        _step(model, optimizer, data)
    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        _step(model, optimizer, data)
        _sync(device)
        step_ms = (time.perf_counter() - start) * 1000.0
    result = summarize(name, prof, step_ms, device, args.top)
    del model, optimizer, data, prof
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def summarize(name: str, prof, step_ms: float, device: torch.device, top: int) -> dict:
    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if device.type == "cuda" and event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.name][0] += event.time_range.elapsed_us() / 1000.0
            kernels[event.name][1] += 1
    by_category: dict[str, float] = defaultdict(float)
    for kname, (ms, _) in kernels.items():
        by_category[category(kname)] += ms
    cpu_ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {
        "config": name,
        "step_ms": step_ms,
        "gpu_busy_ms": sum(ms for ms, _ in kernels.values()),
        "kernel_launches": sum(n for _, n in kernels.values()),
        "by_category_ms": dict(sorted(by_category.items(), key=lambda kv: -kv[1])),
        "top_kernels": [(k, ms, n) for k, (ms, n) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]],
        "top_cpu_ops": [(e.key, e.self_cpu_time_total / 1000.0, e.count) for e in cpu_ops],
    }


def print_result(r: dict) -> None:
    print(f"\n=== {r['config']}: step {r['step_ms']:.1f} ms (profiled), GPU busy {r['gpu_busy_ms']:.1f} ms, "
          f"{r['kernel_launches']} kernels")
    for label, ms in r["by_category_ms"].items():
        print(f"  {label:10s} {ms:9.1f} ms")
    print("  top kernels (ms, count):")
    for kname, ms, n in r["top_kernels"]:
        print(f"    {ms:8.2f} {n:6d}  {kname[:140]}")
    print("  top CPU operators by self time (ms, count):")
    for key, ms, n in r["top_cpu_ops"]:
        print(f"    {ms:8.2f} {n:6d}  {key[:100]}")


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
            print_result(results[-1])
        except Exception as exc:  # one failing config must not hide the others' profiles
            print(f"\n=== {name}: failed: {type(exc).__name__}: {str(exc)[:300]}")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"card": card, "torch": torch.__version__, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
