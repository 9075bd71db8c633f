"""Where one training step spends its time: a ``torch.profiler`` summary of one step.

What: :func:`profile_step` runs one training step under ``torch.profiler`` and returns a summary:
the step's wall time (synchronized, under the profiler), the time the GPU was busy with kernels,
the kernel count, the time per kernel category (GEMM, attention, compiled/Triton, optimizer,
other) and the most expensive kernels and CPU-side operators. A step whose GPU busy time is far
below its wall time is bound by the host: Python, dispatch and kernel launches.

Why in the bench (``coatflux bench --profile CONFIG ...``) and not only in a separate script:
a compiled FLUX.1-dev config spends 100-160 s compiling on an H200, so a profiling script that
builds and compiles its own model pays that a second time; the bench profiles the model it has
just timed, after the timed steps, so the profiler's own overhead never touches the timings.
``benchmarks/profile_step.py`` uses the same summary for a profile without a bench run.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

#: Kernel categories, first match wins; kernel names are lower-cased. Attention comes first:
#: FlashAttention's kernels name CUTLASS in their template arguments.
CATEGORIES = (
    ("attention", ("flash", "fmha", "attention", "sdpa", "efficient")),
    ("gemm", ("gemm", "cutlass", "nvjet", "sm90_xmma", "scaled_mm", "cublas", "addmm", "matmul", "mm_")),
    ("compiled", ("triton",)),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
)


def category(name: str) -> str:
    """The :data:`CATEGORIES` label of a kernel name (``other`` when none matches)."""
    lowered = name.lower()
    for label, keys in CATEGORIES:
        if any(k in lowered for k in keys):
            return label
    return "other"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_step(step: Callable[[], None], device: torch.device, name: str, top: int = 20) -> dict[str, Any]:
    """Run ``step`` once under the profiler (after a synchronisation) and summarize it."""
    from torch.profiler import ProfilerActivity, profile

    _sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        step()
        _sync(device)
        step_ms = (time.perf_counter() - start) * 1000.0
    return summarize(name, prof, step_ms, device, top)


def summarize(name: str, prof: Any, step_ms: float, device: torch.device, top: int) -> dict[str, Any]:
    """The summary :func:`profile_step` returns, from a finished ``torch.profiler.profile``."""
    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    by_category: dict[str, float] = defaultdict(float)
    on_gpu = [e for e in prof.events() if device.type == "cuda" and e.device_type == torch.autograd.DeviceType.CUDA]
    # A user annotation on the GPU timeline (``Optimizer.step#...``) spans kernels counted on their
    # own; counting it too would count that time twice. What runs inside the optimizer's span is
    # the optimizer's, whatever its kernels are called (the fused FP8AdamW's update is a Triton
    # kernel of its own, its moments' decoding element-wise kernels when it runs eagerly).
    optimizer = [(e.time_range.start, e.time_range.end) for e in on_gpu
                 if e.is_user_annotation and e.name.startswith("Optimizer.step")]
    for event in on_gpu:
        if event.is_user_annotation:
            continue
        ms = event.time_range.elapsed_us() / 1000.0
        kernels[event.name][0] += ms
        kernels[event.name][1] += 1
        inside = any(start <= event.time_range.start < end for start, end in optimizer)
        by_category["optimizer" if inside else category(event.name)] += ms
    cpu_ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    top_kernels = [(k, ms, int(n)) for k, (ms, n) in sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]]
    return {
        "config": name,
        "step_ms": step_ms,
        "gpu_busy_ms": sum(ms for ms, _ in kernels.values()),
        "kernel_launches": int(sum(n for _, n in kernels.values())),
        "by_category_ms": dict(sorted(by_category.items(), key=lambda kv: -kv[1])),
        "top_kernels": top_kernels,
        "kernel_launchers": launchers(prof, {k for k, _, _ in top_kernels}),
        "top_cpu_ops": [(e.key, e.self_cpu_time_total / 1000.0, e.count) for e in cpu_ops],
    }


def launchers(prof: Any, names: set[str], most: int = 3) -> dict[str, list[tuple[str, int]]]:
    """For each kernel name in ``names``, the CPU-side events it was launched from, most frequent
    first, with counts (the profiler attaches a kernel to the operator or range active at its
    launch: an eager ``aten::copy_``, or the compiled graph whose replay launched it).

    Why: a kernel's name does not say who asked for it. On the H100 (2026-11-27) 532 ``memcpy128``
    kernels took 12.6 ms of the compiled COAT step and their name left open whether CUDA-graph
    trees copied inputs into static buffers or the model copied tensors itself.
    """
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CPU:
            continue
        for kernel in getattr(event, "kernels", None) or ():
            if kernel.name in names:
                counts[kernel.name][event.name] += 1
    return {name: sorted(ops.items(), key=lambda kv: -kv[1])[:most] for name, ops in counts.items()}


def headline(summary: dict[str, Any]) -> str:
    """One line: the profiled step, the GPU's busy share and the kernel count."""
    step, busy = summary["step_ms"], summary["gpu_busy_ms"]
    share = f" ({busy / step:.0%} of the step)" if step > 0 else ""
    return (f"{summary['config']}: step {step:.1f} ms (profiled), GPU busy {busy:.1f} ms{share}, "
            f"{summary['kernel_launches']} kernels")


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as text: the headline, time per category, top kernels and CPU operators."""
    lines = [f"=== {headline(summary)}"]
    lines += [f"  {label:10s} {ms:9.1f} ms" for label, ms in summary["by_category_ms"].items()]
    lines.append("  top kernels (ms, count; launched from):")
    launched = summary.get("kernel_launchers", {})
    for kname, ms, n in summary["top_kernels"]:
        lines.append(f"    {ms:8.2f} {n:6d}  {kname[:140]}")
        if launched.get(kname):
            lines.append("             from " + ", ".join(f"{op[:80]} x{count}" for op, count in launched[kname]))
    lines.append("  top CPU operators by self time (ms, count):")
    lines += [f"    {ms:8.2f} {n:6d}  {key[:100]}" for key, ms, n in summary["top_cpu_ops"]]
    return "\n".join(lines)
