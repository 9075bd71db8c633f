"""Measurements: step timing, peak memory, the largest batch that fits, and the card's matmul rates.

Timing: on CUDA each step is bracketed by CUDA events (start, before ``optimizer.step()``, end),
recorded without host synchronisation inside the loop, so launch overhead is hidden as it is in
training; one synchronisation per step lets the budget stop a run between steps. On the CPU,
``time.perf_counter``. The figure reported is the median over the timed steps after warm-up
(the first steps allocate the optimizer state, autotune cuBLAS and warm the caching allocator).

Memory: ``torch.cuda.max_memory_allocated`` after resetting the peak before warm-up, so it covers
weights, adapters, optimizer state, saved activations and the transient peak of backward. The
CPU has no allocator statistics: memory is reported as unknown there, never estimated.

Largest batch: batch sizes double from 2 until one runs out of memory or reaches the cap, then
the gap is bisected. Each probe is one full training step. ``torch.cuda.OutOfMemoryError`` is
caught, everything the failed step held is released (``gc.collect`` + ``empty_cache``) before the
next probe. We chose doubling-then-bisecting over a linear scan: log2(cap) probes instead of cap.

Matmul rates: a square bf16 GEMM and an FP8 E4M3 ``torch._scaled_mm`` of side 8192 on FLUX.1-dev
(8192^3 is large enough to reach the card's sustained tensor-core rate), timed after warm-up. The
compute floor of a step is its matmul FLOPs divided by the rate: at the bf16 rate for everything,
and at the FP8 rate for the linears plus the bf16 rate for attention (which stays bf16 in every
recipe). These are measured rates, not datasheet figures.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Release everything unreferenced back to the device (between configs and after an OOM)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(exc: BaseException) -> bool:
    oom_type = getattr(torch.cuda, "OutOfMemoryError", RuntimeError)
    return isinstance(exc, oom_type) or "out of memory" in str(exc).lower()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float | None:
    """Peak allocated GiB since :func:`reset_peak`, or None where the device does not track it."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


@dataclass
class StepTimes:
    """Per-step wall times (s) of the whole step and of its optimizer part."""

    step: list[float] = field(default_factory=list)
    optimizer: list[float] = field(default_factory=list)
    first: float | None = None  # host wall time of the first step: compilation and allocation included
    stopped_early: bool = False

    def median(self) -> float | None:
        return statistics.median(self.step) if self.step else None

    def median_optimizer(self) -> float | None:
        return statistics.median(self.optimizer) if self.optimizer else None


class _Clock:
    """Three marks per step: start, before the optimizer, end."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device

    def mark(self) -> object:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, a: object, b: object) -> float:
        if self.cuda:
            return a.elapsed_time(b) / 1000.0  # type: ignore[attr-defined]
        return float(b) - float(a)  # type: ignore[arg-type]


def time_steps(forward_backward: Callable[[], None], optimizer_step: Callable[[], None],
               device: torch.device, steps: int, warmup: int, deadline: float | None = None,
               on_first: Callable[[float], None] | None = None) -> StepTimes:
    """Run ``warmup`` then ``steps`` training steps; stop early (flagged) once ``deadline`` passes.

    ``on_first(seconds)`` is called after the first step (a compiled config's compile time shows
    in the log even when the run is cut before its timing ends).
    """
    clock, times = _Clock(device), StepTimes()
    began = time.perf_counter()
    for i in range(warmup + steps):
        if deadline is not None and time.monotonic() > deadline and times.step:
            times.stopped_early = True
            break
        start = clock.mark()
        forward_backward()
        middle = clock.mark()
        optimizer_step()
        end = clock.mark()
        synchronize(device)
        if i == 0:
            times.first = time.perf_counter() - began
            if on_first is not None:
                on_first(times.first)
        if i >= warmup:
            times.step.append(clock.seconds(start, end))
            times.optimizer.append(clock.seconds(middle, end))
    return times


@dataclass
class BatchSearch:
    """Outcome of :func:`find_max_batch`: the largest batch that ran and the probes made."""

    max_batch: int | None
    probes: dict[int, bool] = field(default_factory=dict)
    capped: bool = False
    note: str = ""

    def label(self) -> str:
        if self.max_batch is None:
            return "none"
        return f">={self.max_batch}" if self.capped else str(self.max_batch)


def find_max_batch(fits: Callable[[int], bool | None], cap: int, known_fit: int = 1) -> BatchSearch:
    """Largest batch ``b <= cap`` with ``fits(b)``, assuming ``fits`` is monotone; ``known_fit`` ran.

    ``fits`` returns None to decline a probe (the time budget cannot pay for it): the search
    stops there and reports the largest batch seen to fit, with a note.
    """
    search = BatchSearch(known_fit, {known_fit: True})
    lo, hi = known_fit, None
    candidate = known_fit * 2
    while candidate <= cap and hi is None:
        ok = fits(candidate)
        if ok is None:
            return _stopped(search, lo, candidate)
        search.probes[candidate] = ok
        lo, hi = (candidate, None) if ok else (lo, candidate)
        candidate *= 2
    if hi is None:
        search.max_batch, search.capped = lo, True
        return search
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ok = fits(mid)
        if ok is None:
            return _stopped(search, lo, mid)
        search.probes[mid] = ok
        lo, hi = (mid, hi) if ok else (lo, mid)
    search.max_batch = lo
    return search


def _stopped(search: BatchSearch, lo: int, untried: int) -> BatchSearch:
    search.max_batch, search.capped = lo, True
    search.note = f"search stopped by the time budget before batch {untried}"
    return search


@dataclass
class MatmulRates:
    """Measured dense matmul rates in FLOP/s (None where a format cannot run)."""

    size: int
    bf16: float | None
    fp8: float | None
    fp8_note: str = ""


def _rate(fn: Callable[[], object], flops: float, device: torch.device, repeats: int) -> float:
    for _ in range(3):
        fn()
    synchronize(device)
    clock = _Clock(device)
    start = clock.mark()
    for _ in range(repeats):
        fn()
    end = clock.mark()
    synchronize(device)
    return flops * repeats / clock.seconds(start, end)


def measure_matmul_rates(device: torch.device, size: int, repeats: int = 20) -> MatmulRates:
    """bf16 ``a @ b`` and FP8 E4M3 ``torch._scaled_mm`` rates on ``size``^3 products.

    The FP8 rate is that of fast accumulation (``use_fast_accum``), the card's best, so that the
    compute floor is not raised by COAT's own choice of accumulation (runs before 2026-11-27
    measured it with promoted accumulation)."""
    flops = 2.0 * size**3
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    bf16 = _rate(lambda: a @ b, flops, device, repeats)
    fp8, note = None, ""
    try:
        a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t()  # second operand column-major
        one = torch.ones((), device=device)
        fp8 = _rate(lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16,
                                             use_fast_accum=True), flops, device, repeats)
    except (RuntimeError, TypeError, AttributeError) as exc:
        note = f"FP8 GEMM unavailable: {str(exc).splitlines()[0][:120]}"
    free_memory(device)
    return MatmulRates(size, bf16, fp8, note)
