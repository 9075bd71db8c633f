"""FP8 matrix multiply: ``torch._scaled_mm`` where the hardware has it, an emulated reference elsewhere.

What: :func:`fp8_mm` computes ``(a * sa) @ (b * sb).T`` for FP8 operands ``a`` (M x K) and
``b`` (N x K) with per-tensor fp32 scales, returning ``out_dtype``. On CUDA devices of compute
capability 8.9 or newer (Ada, Hopper, Blackwell), with K and N multiples of 16 and at least one
E4M3 operand, it calls ``torch._scaled_mm`` (cuBLASLt FP8 tensor cores; fast or promoted-to-fp32
accumulation, as the caller asks).
Everywhere else it dequantizes both operands and multiplies in ``out_dtype``: the same numbers up
to accumulation order, so CPU tests exercise the same code, and :func:`fp8_mm_reference` is the
specification the fast path is tested against.

Where both are possible, :class:`GemmPlanner` times them once per shape and keeps the faster
(FP8 does not pay for small GEMMs). Eagerly it decides per GEMM shape as the GEMM is called; for a
compiled block, where no GEMM can be timed while the graph is traced, it plans ahead: a
:data:`RowPlan` per linear says from which row count on FP8 pays (:meth:`GemmPlanner.row_plan`),
timed as CUDA-graph replays (the GPU's work, :func:`graph_replay_time`) and kept on disk for the
next run (:class:`PlanCache`), since a plan decides which graphs compile.

Why ``_scaled_mm`` rather than a Triton ``tl.dot`` kernel (COAT's choice): cuBLAS handles every
shape and tile size, needs no autotuning and has no boundary bugs of our own. Its epilogue
adds the bias (see :func:`fp8_mm`); other fusions (output quantization) are left to the kernels
that need them.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from coatflux.atomic import atomic_write

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GemmSupport:
    """Whether a device can run FP8 tensor-core GEMMs, and why not if it cannot."""

    available: bool
    reason: str


def fp8_gemm_support(device: torch.device | str) -> GemmSupport:
    """Tell whether ``torch._scaled_mm`` can run on ``device`` (asked on every GEMM, so cached)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _support(device)


@functools.cache
def _support(device: torch.device) -> GemmSupport:
    if not hasattr(torch, "float8_e4m3fn"):
        return GemmSupport(False, f"PyTorch {torch.__version__} has no float8 dtypes")
    if not hasattr(torch, "_scaled_mm"):
        return GemmSupport(False, f"PyTorch {torch.__version__} has no torch._scaled_mm")
    if device.type != "cuda":
        return GemmSupport(False, f"FP8 GEMMs need a CUDA GPU (device is {device.type})")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        return GemmSupport(False, f"FP8 GEMMs need compute capability >= 8.9 (device has {major}.{minor})")
    return GemmSupport(True, "")


def shape_supported(m: int, n: int, k: int) -> bool:
    """``_scaled_mm`` needs K and N to be multiples of 16 (M is free)."""
    return k % 16 == 0 and n % 16 == 0 and m > 0


def fp8_mm_reference(
    a: torch.Tensor, scale_a: torch.Tensor, b: torch.Tensor, scale_b: torch.Tensor, out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-PyTorch specification: dequantize to fp32, multiply, add the bias in fp32, cast once."""
    out = (a.float() * scale_a) @ (b.float() * scale_b).t()
    return (out if bias is None else out + bias.float()).to(out_dtype)


def fp8_mm(
    a: torch.Tensor,
    scale_a: torch.Tensor,
    b: torch.Tensor,
    scale_b: torch.Tensor,
    out_dtype: torch.dtype,
    use_scaled_mm: bool,
    bias: torch.Tensor | None = None,
    fast_accum: bool = False,
) -> torch.Tensor:
    """``(a * scale_a) @ (b * scale_b).T + bias`` with FP8 ``a`` (M x K), ``b`` (N x K) and an optional
    ``bias`` (N).

    ``fast_accum`` lets ``torch._scaled_mm`` keep the tensor cores' own accumulator over the whole K
    (``use_fast_accum``) instead of promoting its partial sums to fp32 at intervals: faster on
    Hopper and less exact over long sums (see :class:`~coatflux.core.config.ActivationConfig`). The
    emulated path accumulates in ``out_dtype`` (fp32 on the CPU) either way.

    The bias is added in the GEMM's epilogue (cuBLASLt adds it to the fp32 result before the one
    rounding to ``out_dtype``), not by a kernel of its own: an add after the GEMM reads and writes
    the whole M x N output once more. In FLUX.1-dev's compiled blocks those adds were about half
    of the bytes COAT's forward kernels moved beyond bf16's (whose cuBLAS ``addmm`` adds the bias
    itself), 9.0 of 101.5 GB per step at 512 px (``benchmarks/kernel_launches.py``).
    ``torch._scaled_mm`` takes a bias only for a half-precision output; an fp32 output gets it
    added after.
    """
    fused_bias = bias is not None and out_dtype in (torch.bfloat16, torch.float16)
    if use_scaled_mm:
        # _scaled_mm wants the second operand column-major: b is N x K row-major, so b.t() is.
        out = torch._scaled_mm(
            a.contiguous(), b.contiguous().t(), scale_a=scale_a.float(), scale_b=scale_b.float(),
            bias=bias.to(out_dtype) if fused_bias else None, out_dtype=out_dtype, use_fast_accum=fast_accum,
        )
        return out if bias is None or fused_bias else out + bias.to(out_dtype)
    compute = out_dtype if a.is_cuda else torch.float32
    out = (a.to(compute) * scale_a.to(compute)) @ (b.to(compute) * scale_b.to(compute)).t()
    out = out if bias is None else out + bias.to(compute)
    # No `.to` where the dtype is already right: an autograd.Function whose forward returned such a
    # no-op cast (the same tensor again) got zero input gradients under torch.compile in torch 2.11
    # (not in 2.12 or 2.13). That is this path on a GPU, which multiplies in out_dtype: a compiled
    # block's linear on a card without FP8, or with activation.fp8_gemm off.
    return out if out.dtype == out_dtype else out.to(out_dtype)


Timer = Callable[[Callable[[], object], torch.device], float]


def graph_replay_time(fn: Callable[[], object], device: torch.device, repeats: int = 5, warmup: int = 1) -> float:
    """Median milliseconds of ``fn``'s GPU work: ``fn`` captured once as a CUDA graph, each replay timed.

    Why not time ``fn`` itself: a small GEMM with its casts is a handful of kernels of a few
    microseconds each, and launched one by one from Python the host is slower than the GPU, so
    the timing measures launches. A compiled block launches those kernels from inductor's wrapper
    (or replays them as a CUDA graph): what a row plan must compare is the GPU's work. Falls back
    to :func:`cuda_event_time`, with a warning, where ``fn`` cannot be captured.
    """
    try:
        # Warm up on the stream that captures, as PyTorch's CUDA graph notes advise: lazy
        # per-stream set-up (cuBLAS handles and workspaces) must not happen during the capture.
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(max(warmup, 1)):
                fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        torch.cuda.synchronize(device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            fn()
    except RuntimeError as error:
        logger.warning("GEMM timing: CUDA graph capture failed (%s); timing launches from Python instead",
                       str(error).splitlines()[0][:160])
        return cuda_event_time(fn, device, repeats, warmup)
    return cuda_event_time(graph.replay, device, repeats, warmup)


def cuda_event_time(fn: Callable[[], object], device: torch.device, repeats: int = 5, warmup: int = 1) -> float:
    """Median milliseconds of ``fn`` on ``device`` after ``warmup`` calls, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def median_ms(fn: Callable[[], object], device: torch.device, repeats: int = 5, warmup: int = 1) -> float:
    """Median milliseconds of ``fn`` after ``warmup`` calls: CUDA events on a GPU (see
    :func:`cuda_event_time`), the host's clock elsewhere (a CPU check of a benchmark, not a GPU figure)."""
    if device.type == "cuda":
        return cuda_event_time(fn, device, repeats, warmup)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


#: Row counts (tokens x batch) at which :meth:`GemmPlanner.row_plan` times a linear's two paths:
#: one sample's modulation vector (1), FLUX's text tokens (512), 512 px and 1024 px images (1024,
#: 4096) and what batches make of them.
PLAN_ROWS = (1, 64, 256, 512, 1024, 2048, 4096, 8192, 16384)

#: ``((first row count, FP8?), ...)``: ascending row counts, each decision holding up to the next
#: entry's row count; adjacent decisions differ, and the first entry starts at 1 row.
RowPlan = tuple[tuple[int, bool], ...]

#: Environment variable naming the folder of :class:`PlanCache`'s file (default ``~/.cache/coatflux``).
CACHE_DIR_VARIABLE = "COATFLUX_CACHE_DIR"


class PlanCache:
    """Row plans kept on disk, one JSON file per machine user, keyed by card, software and shape.

    Why: a plan decides which graph a compiled block compiles, and near a boundary both paths take
    about the same time, so timing again can decide the other way (two H200 runs of 2026-11-26
    disagreed on five of twelve FLUX.1-dev shapes). A new plan is a new graph: inductor's on-disk
    cache misses and the blocks compile from scratch (100-160 s on an H200). Kept, a plan makes
    the next run's graphs the same as this one's, and costs no timing. The key holds the card, its
    compute capability, the torch and CUDA versions and the rungs of :data:`PLAN_ROWS`; a change
    of any of them times again. Chosen against keeping plans in memory per process only: the
    bench and the trainer build one model per process, so that would keep nothing.

    A file that cannot be read as this cache is reported (named) and replaced on the next write.
    Writes are atomic and merge with what is on disk then, so processes sharing the file (the
    ranks of a multi-GPU run) keep each other's plans.
    """

    VERSION = 1

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._plans: dict[str, RowPlan] | None = None

    @classmethod
    def default(cls) -> PlanCache:
        """The cache in ``$COATFLUX_CACHE_DIR`` or ``~/.cache/coatflux``."""
        folder = os.environ.get(CACHE_DIR_VARIABLE) or Path.home() / ".cache" / "coatflux"
        return cls(Path(folder) / "gemm_row_plans.json")

    @staticmethod
    def key(device: torch.device, n: int, k: int, dtype: torch.dtype, fast_accum: bool = False) -> str:
        if device.type == "cuda":
            major, minor = torch.cuda.get_device_capability(device)
            card = f"{torch.cuda.get_device_name(device)} sm{major}{minor} cuda {torch.version.cuda}"
        else:
            card = device.type
        rows = ",".join(map(str, PLAN_ROWS))
        accumulation = " | fast accumulation" if fast_accum else ""  # plans made before the option keep their keys
        return f"{card} | torch {torch.__version__} | {n}x{k} {str(dtype).replace('torch.', '')} | rows {rows}{accumulation}"

    def get(self, key: str) -> RowPlan | None:
        if self._plans is None:
            self._plans = self._read()
        return self._plans.get(key)

    def put(self, key: str, plan: RowPlan) -> None:
        plans = {**self._read(), key: plan}
        text = json.dumps({"version": self.VERSION, "plans": {k: [list(e) for e in v] for k, v in plans.items()}},
                          indent=1, sort_keys=True)
        try:
            atomic_write(self.path, lambda tmp: Path(tmp).write_text(text + "\n"))
        except OSError as error:  # a read-only home must not stop training; the plan still holds
            logger.warning("GEMM plans: cannot write %s (%s); plans will be timed again next run", self.path, error)
        self._plans = plans

    def _read(self) -> dict[str, RowPlan]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            logger.warning("GEMM plans: %s is not readable as a plan cache (%s); timing again", self.path, error)
            return {}
        if not isinstance(data, dict) or data.get("version") != self.VERSION or not isinstance(data.get("plans"), dict):
            logger.warning("GEMM plans: %s is not a version-%d plan cache; timing again", self.path, self.VERSION)
            return {}
        plans = {}
        for key, entries in data["plans"].items():
            try:
                plan = tuple((int(rows), bool(use)) for rows, use in entries)
            except (TypeError, ValueError):
                logger.warning("GEMM plans: %s: entry %r is malformed; timing it again", self.path, key)
                continue
            if plan and plan[0][0] == 1:
                plans[key] = plan
        return plans


def fp8_for_rows(plan: RowPlan, rows: Any) -> bool:
    """The decision of ``plan`` for a GEMM of ``rows`` rows.

    ``rows`` may be a symbolic size inside a traced graph: each comparison made here then becomes a
    guard of the graph, so a plan with one entry adds no guard, and a row count on the other side
    of a boundary compiles the graph again (a new resolution or batch, not a new step).
    """
    use = plan[0][1]
    for start, decision in plan[1:]:
        if rows < start:
            break
        use = decision
    return use


class GemmPlanner:
    """Decides per GEMM shape whether the FP8 tensor-core GEMM pays, by timing both ways once.

    For small GEMMs (a 512x512 image is 1024 tokens; the AdaLN linears have one row per sample)
    ``_scaled_mm`` can lose to a plain multiply of the dequantized operands, because its fixed
    costs do not amortise. Rather than a hand-set size threshold, which would be wrong on the next
    card, each distinct (device, M, N, K, dtype) is timed once on random operands -- both paths
    take the same FP8 inputs, so only the GEMM itself is compared -- and the faster is remembered
    for the rest of the run. A few shapes per resolution, a few milliseconds each. The FP8 GEMMs
    are timed as the layers run them, with or without ``fast_accum``.
    """

    def __init__(self, timer: Timer | None = None, plan_timer: Timer | None = None,
                 cache: PlanCache | None = None, fast_accum: bool = False) -> None:
        self._timer = timer or cuda_event_time
        self._plan_timer = plan_timer or timer or graph_replay_time
        self._cache = cache
        self.fast_accum = fast_accum
        self._choices: dict[tuple, bool] = {}
        self._plans: dict[tuple, RowPlan] = {}

    def use_fp8(self, device: torch.device, m: int, n: int, k: int, dtype: torch.dtype) -> bool:
        key = (device, m, n, k, dtype)
        if key not in self._choices:
            self._choices[key] = self._fp8_is_faster(device, m, n, k, dtype)
            logger.info("GEMM %dx%dx%d (%s): %s", m, n, k, dtype,
                        "FP8 tensor cores" if self._choices[key] else f"{dtype} (faster than FP8 at this size)")
        return self._choices[key]

    @property
    def choices(self) -> dict[tuple, bool]:
        """Every decision made so far: (device, M, N, K, dtype) -> FP8 chosen."""
        return dict(self._choices)

    @torch.no_grad()
    def _fp8_is_faster(self, device: torch.device, m: int, n: int, k: int, dtype: torch.dtype) -> bool:
        from coatflux.core.formats import E4M3, quantize

        a = quantize(torch.randn(m, k, device=device, dtype=dtype), E4M3, "tensor")
        b = quantize(torch.randn(n, k, device=device, dtype=dtype), E4M3, "tensor")
        fp8 = self._timer(lambda: fp8_mm(a.data, a.scale, b.data, b.scale, dtype, True, None, self.fast_accum), device)
        plain = self._timer(lambda: fp8_mm(a.data, a.scale, b.data, b.scale, dtype, False), device)
        return fp8 < plain

    def row_plan(self, device: torch.device, n: int, k: int, dtype: torch.dtype) -> RowPlan:
        """From which row count on an ``n x k`` frozen FP8 linear is faster in FP8 than in ``dtype``.

        For compiled blocks, planned before they compile. Each rung of :data:`PLAN_ROWS` times what a
        compiled block runs per linear for a forward and its input gradient, both ways:

        * FP8: the input's and the gradient's per-tensor maximum and cast (one pass each, as
          inductor fuses them), the transposed copy of the FP8 weight that the input-gradient GEMM
          needs (cuBLASLt's FP8 GEMMs take both operands K-major), and the two ``torch._scaled_mm``;
        * plain: the weight upcast to ``dtype`` for each GEMM (it is recomputed, never stored) and
          the two ``dtype`` GEMMs, of the unquantized input.

        The kernels run one per pass, as inductor emits them, captured as a CUDA graph and timed
        by replay (:func:`graph_replay_time`): the GPU's work, not Python's launches. Timed once per
        (device, n, k, dtype) and kept in the :class:`PlanCache`, if the planner has one, for
        later runs; adjacent rungs with equal decisions merge, so a plan of one entry (FP8
        everywhere, or nowhere) costs the compiled graph no guard.
        """
        key = (torch.device(device), n, k, dtype)
        if key in self._plans:
            return self._plans[key]
        cache_key = PlanCache.key(key[0], n, k, dtype, self.fast_accum)
        plan, source = (self._cache.get(cache_key) if self._cache is not None else None), "timed"
        if plan is None:
            plan = self._time_row_plan(key[0], n, k, dtype)
            if self._cache is not None:
                self._cache.put(cache_key, plan)
        else:
            source = f"from {self._cache.path}"
        self._plans[key] = plan
        logger.info("GEMM plan %dx%d (%s, %s): %s", n, k, dtype, source, ", ".join(
            f"{'FP8' if use else dtype} from {rows} rows" for rows, use in plan))
        return plan

    def _time_row_plan(self, device: torch.device, n: int, k: int, dtype: torch.dtype) -> RowPlan:
        decisions = [(rows, self._fp8_linear_is_faster(device, rows, n, k, dtype)) for rows in PLAN_ROWS]
        plan = [decisions[0]]
        for rows, use in decisions[1:]:
            if use != plan[-1][1]:
                plan.append((rows, use))
        return tuple(plan)

    @property
    def plans(self) -> dict[tuple, RowPlan]:
        """Every row plan made so far: (device, N, K, dtype) -> plan."""
        return dict(self._plans)

    @torch.no_grad()
    def _fp8_linear_is_faster(self, device: torch.device, m: int, n: int, k: int, dtype: torch.dtype) -> bool:
        # Scales of one: the probe's two paths then compute the same products, and the plain path's
        # upcast is the single cast that inductor's fused upcast-and-scale costs.
        x = torch.randn(m, k, device=device, dtype=dtype)
        g = torch.randn(m, n, device=device, dtype=dtype)
        w = torch.randn(n, k, device=device, dtype=dtype).to(torch.float8_e4m3fn)
        one = torch.ones((), device=device)

        def fp8() -> torch.Tensor:
            torch.linalg.vector_norm(x, float("inf"))  # the per-tensor maximum, then the scaled cast
            fp8_mm(x.to(torch.float8_e4m3fn), one, w, one, dtype, True, None, self.fast_accum)
            torch.linalg.vector_norm(g, float("inf"))
            return fp8_mm(g.to(torch.float8_e5m2), one, w.t().contiguous(), one, dtype, True, None, self.fast_accum)

        def plain() -> torch.Tensor:
            x @ w.to(dtype).t()
            return g @ w.to(dtype)

        return self._plan_timer(fp8, device) < self._plan_timer(plain, device)
