"""Compile time of the compiled-block recipes: the first training step against the steady one.

What: for each ``--configs`` recipe of ``coatflux bench`` (the compiled ones are the point), a
FLUX model of the preset's block shapes but only ``--double``/``--single`` blocks (compile cost
depends on the block graphs, not on how many blocks reuse them), one first step (dynamo +
AOTAutograd + inductor + kernel compilation) and ``--steps`` more, timed. Prints the first-step
time, the median later step, the kernels inductor generated, dynamo's compile-time breakdown
(its largest entries), the times dynamo restarted a trace, and the machine. ``--stack-after S``
dumps every thread's stack if a config is still running after S seconds (where a slow compile
spends its time).

Usage: ``python benchmarks/compile_time.py [--preset tiny] [--resolution 32]
[--configs bf16-compiled coat-compiled] [--double 1] [--single 1] [--steps 3] [--stack-after 0]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import platform
import statistics
import sys
import time

import torch

from coatflux.bench import model as bench_model
from coatflux.bench.configs import CONFIGS, SetupOptions
from coatflux.flux.attention import attention_policy


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(model, optimizer, preset, resolution: int, device: torch.device) -> float:
    start = time.perf_counter()
    batch = bench_model.make_batch(preset, resolution, 1, device)
    bench_model.loss_of(model, batch).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    _sync(device)
    return time.perf_counter() - start


def _top_compile_times(limit: int) -> str:
    table = torch._dynamo.utils.compile_times(repr="csv", aggregate=True)
    names, values = table if isinstance(table, tuple) else ([], [])
    pairs = sorted(zip(names, values, strict=True), key=lambda kv: -float(kv[1]))[:limit]
    return "; ".join(f"{name} {float(value):.1f} s" for name, value in pairs)


def _cache_counters() -> str:
    from torch._dynamo.utils import counters

    found = {f"{group}.{key}": value for group in ("inductor", "aot_autograd")
             for key, value in counters[group].items() if "cache" in key}
    return ", ".join(f"{key} {value}" for key, value in sorted(found.items())) or "none recorded"


def _restarts() -> str:
    from torch._dynamo.utils import get_compilation_metrics

    reasons = [reason for metrics in get_compilation_metrics() for reason in (metrics.restart_reasons or ())]
    return f"{len(reasons)} ({'; '.join(sorted(set(reasons)))})" if reasons else "0"


def measure(name: str, args: argparse.Namespace, device: torch.device) -> None:
    from torch._inductor import metrics

    base = bench_model.PRESETS[args.preset]
    preset = dataclasses.replace(base, config=dict(base.config, num_layers=args.double,
                                                   num_single_layers=args.single))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch._dynamo.utils.clear_compilation_metrics()
    metrics.reset()
    if args.stack_after > 0:
        faulthandler.dump_traceback_later(args.stack_after, exit=False, file=sys.stderr)
    model = bench_model.build_transformer(preset, device)
    optimizer = CONFIGS[name].setup(model, base.lora_rank, SetupOptions(device.type == "cuda", args.backend,
                                                                         args.dynamic))
    first = _step(model, optimizer, preset, args.resolution, device)
    later = [_step(model, optimizer, preset, args.resolution, device) for _ in range(args.steps)]
    faulthandler.cancel_dump_traceback_later()
    print(f"{name}: first step {first:.1f} s, later steps {statistics.median(later) * 1e3:.1f} ms (median of "
          f"{len(later)}), {metrics.generated_kernel_count} kernels generated", flush=True)
    print(f"  compile time, largest entries: {_top_compile_times(8)}", flush=True)
    print(f"  caches: {_cache_counters()}; dynamo restarts: {_restarts()}", flush=True)
    del model, optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(bench_model.PRESETS), default="tiny")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=["bf16-compiled", "coat-compiled"])
    parser.add_argument("--double", type=int, default=1, help="double-stream blocks")
    parser.add_argument("--single", type=int, default=1, help="single-stream blocks")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--dynamic", action=argparse.BooleanOptionalAction, default=True,
                        help="dynamic shapes (the trainer's default)")
    parser.add_argument("--stack-after", type=float, default=0.0, help="dump stacks after this many seconds (0: off)")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"machine: {card}; torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
          f"preset {args.preset} with {args.double}+{args.single} blocks at {args.resolution} px", flush=True)
    with attention_policy(allow_cudnn=False):  # as the bench's default; no attention hook installed here
        for name in args.configs:
            measure(name, args, device)


if __name__ == "__main__":
    main()
