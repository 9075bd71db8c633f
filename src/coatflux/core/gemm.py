"""FP8 matrix multiply: ``torch._scaled_mm`` where the hardware has it, an emulated reference elsewhere.

What: :func:`fp8_mm` computes ``(a * sa) @ (b * sb).T`` for FP8 operands ``a`` (M x K) and
``b`` (N x K) with per-tensor fp32 scales, returning ``out_dtype``. On CUDA devices of compute
capability 8.9 or newer (Ada, Hopper, Blackwell), with K and N multiples of 16 and at least one
E4M3 operand, it calls ``torch._scaled_mm`` (cuBLASLt FP8 tensor cores, fp32 accumulation).
Everywhere else it dequantizes both operands and multiplies in ``out_dtype``: the same numbers up
to accumulation order, so CPU tests exercise the same code, and :func:`fp8_mm_reference` is the
specification the fast path is tested against.

Where both are possible, :class:`GemmPlanner` times them once per shape and keeps the faster
(FP8 does not pay for small GEMMs). Eagerly it decides per GEMM shape as the GEMM is called; for a
compiled block, where no GEMM can be timed while the graph is traced, it plans ahead: a
:data:`RowPlan` per linear says from which row count on FP8 pays (:meth:`GemmPlanner.row_plan`).

Why ``_scaled_mm`` rather than a Triton ``tl.dot`` kernel (COAT's choice): cuBLAS handles every
shape and tile size, needs no autotuning and has no boundary bugs of our own; fusing epilogues
(bias, output quantization) is left to the kernels that need it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

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
    a: torch.Tensor, scale_a: torch.Tensor, b: torch.Tensor, scale_b: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """Plain-PyTorch specification: dequantize to fp32, multiply, cast."""
    return ((a.float() * scale_a) @ (b.float() * scale_b).t()).to(out_dtype)


def fp8_mm(
    a: torch.Tensor,
    scale_a: torch.Tensor,
    b: torch.Tensor,
    scale_b: torch.Tensor,
    out_dtype: torch.dtype,
    use_scaled_mm: bool,
) -> torch.Tensor:
    """``(a * scale_a) @ (b * scale_b).T`` with FP8 ``a`` (M x K) and ``b`` (N x K)."""
    if use_scaled_mm:
        # _scaled_mm wants the second operand column-major: b is N x K row-major, so b.t() is.
        return torch._scaled_mm(
            a.contiguous(), b.contiguous().t(), scale_a=scale_a.float(), scale_b=scale_b.float(),
            out_dtype=out_dtype,
        )
    compute = out_dtype if a.is_cuda else torch.float32
    return ((a.to(compute) * scale_a.to(compute)) @ (b.to(compute) * scale_b.to(compute)).t()).to(out_dtype)


Timer = Callable[[Callable[[], object], torch.device], float]


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


#: Row counts (tokens x batch) at which :meth:`GemmPlanner.row_plan` times a linear's two paths:
#: one sample's modulation vector (1), FLUX's text tokens (512), 512 px and 1024 px images (1024,
#: 4096) and what batches make of them.
PLAN_ROWS = (1, 64, 256, 512, 1024, 2048, 4096, 8192, 16384)

#: ``((first row count, FP8?), ...)``: ascending row counts, each decision holding up to the next
#: entry's row count; adjacent decisions differ, and the first entry starts at 1 row.
RowPlan = tuple[tuple[int, bool], ...]


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
    for the rest of the run. A few shapes per resolution, a few milliseconds each.
    """

    def __init__(self, timer: Timer | None = None) -> None:
        self._timer = timer or cuda_event_time
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
        fp8 = self._timer(lambda: fp8_mm(a.data, a.scale, b.data, b.scale, dtype, True), device)
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

        The kernels run eagerly, one per pass, as inductor emits them. Timed once per
        (device, n, k, dtype); adjacent rungs with equal decisions merge, so a plan of one entry
        (FP8 everywhere, or nowhere) costs the compiled graph no guard.
        """
        key = (torch.device(device), n, k, dtype)
        if key not in self._plans:
            decisions = [(rows, self._fp8_linear_is_faster(key[0], rows, n, k, dtype)) for rows in PLAN_ROWS]
            plan = [decisions[0]]
            for rows, use in decisions[1:]:
                if use != plan[-1][1]:
                    plan.append((rows, use))
            self._plans[key] = tuple(plan)
            logger.info("GEMM plan %dx%d (%s): %s", n, k, dtype, ", ".join(
                f"{'FP8' if use else dtype} from {rows} rows" for rows, use in self._plans[key]))
        return self._plans[key]

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
            fp8_mm(x.to(torch.float8_e4m3fn), one, w, one, dtype, True)
            torch.linalg.vector_norm(g, float("inf"))
            return fp8_mm(g.to(torch.float8_e5m2), one, w.t().contiguous(), one, dtype, True)

        def plain() -> torch.Tensor:
            x @ w.to(dtype).t()
            return g @ w.to(dtype)

        return self._timer(fp8, device) < self._timer(plain, device)
