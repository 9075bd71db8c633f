"""Fused FP8 quantize / dequantize: the reference of :mod:`coatflux.core.formats` in two or three kernels.

What: :func:`quantize_tensor` (one fp32 scale per tensor), :func:`quantize_group_pow2` (1 x G
groups along the last dimension, power-of-two scales stored as int8 exponents) and
:func:`dequantize` (both layouts) return exactly what :func:`coatflux.core.formats.quantize_reference`
and :func:`~coatflux.core.formats.dequantize_reference` return -- the same FP8 bytes, the same
scales and exponents -- which ``tests/test_kernels_quant.py`` checks byte for byte.

Why: the reference is a chain of ~10-15 separate fp32 PyTorch ops (``float``, ``abs``,
``isfinite``, ``where``, ``amax``, ``div``, ``clamp``, ``to``, ``log2``, ``exp2`` ...), each a full
pass over memory, and COAT calls it for every linear input, every incoming gradient and every
saved activation. On an H200 that made a FLUX.1-dev LoRA step 2.1x slower than bf16. Here:

* per tensor: the maxima of fixed blocks of :data:`AMAX_BLOCK` elements (one kernel, a thread
  block per row whatever the tensor's size), their maximum (a small reduction), and one
  element-wise pass that divides, saturates and casts: COAT's "group maxima reduced to a tensor
  scale", no extra pass over the data. Written out rather than left to inductor's own splitting
  of a whole-tensor ``amax``: with ``dynamic=True`` inductor picks the split from the sizes of the
  first call (in FLUX a 1 x 3072 or 4096 x 64 input), and a 4608 x 3072 tensor would then be
  reduced by a handful of thread blocks;
* per group: one kernel that reduces each group of G and writes codes and exponents;
* dequantize: one element-wise kernel.

How: ``torch.compile`` (inductor, ``fullgraph=True``, ``dynamic=True`` so a new token count does
not recompile) of small functions written with the same operations as the reference. Chosen
against a hand-written Triton kernel: inductor gives the same fusion for these memory-bound
shapes, keeps one implementation for CPU and CUDA (CPU tests run the same traced graph), and needs
no tiling code of our own; chosen against ``torch.compile`` of the reference itself: two of its
operations do not compile to the same bits (below).

Exactness, and what it took:

* Triton's ``x / y`` is an approximate division (``div.full.f32``) and inductor turns a division
  by a constant into a multiplication by its reciprocal. The per-tensor path therefore passes the
  format maximum as a tensor (no constant to fold) and compiles with inductor's
  ``eager_numerics.division_rounding`` (IEEE ``div_rn``, as eager); a torch without that option
  gets no CUDA fast path (:func:`available` says why). Inductor's CPU code divides exactly anyway.
* The reference's power-of-two exponent is ``ceil(log2(amax / max))`` followed by a correction;
  that equals the exact smallest ``k`` with ``amax <= max * 2**k`` (clamped to [-127, 127]). It is
  computed here from the bits of ``amax`` -- no ``log2``, ``exp2`` or division, whose last bit may
  differ between libraries -- and ``x / 2**k`` becomes ``x * 2**-k``, which rounds identically
  because ``2**-k`` is an exact normal float for every reachable ``k``.
* Saturation selects a NaN itself rather than trusting ``clamp`` to propagate it: inductor's
  vectorised CPU clamp returns the x86 default NaN, whose sign bit would change the code.
  (Dequantized NaNs may differ in payload bits; they are NaN in the same places.)

The same operations, uncompiled, serve code that is itself being compiled (the FP8 linear and
the saved-tensor hooks of :mod:`coatflux.core.compiled`): :func:`tensor_scale_ops`,
:func:`group_pow2_ops` and :func:`group_pow2_values_ops`, which the enclosing graph's inductor
fuses with their neighbours. One difference: :func:`tensor_scale_ops` takes its maximum per row
rather than per fixed block, so that it fuses into the kernel producing the tensor.

Scope: per-tensor scales without ``pow2`` and per-group scales with ``pow2`` (what COAT uses);
everything else stays on the reference. :mod:`coatflux.core.formats` dispatches here for CUDA
tensors unless ``COATFLUX_REFERENCE_KERNELS=1``.
"""

from __future__ import annotations

import functools
import struct
import types
from collections.abc import Callable

import torch

from coatflux.core.formats import FP8Format, QuantizedTensor, get_format

# Inductor options that make compiled float arithmetic round as eager does (where this torch has them).
_EAGER_NUMERICS = ("eager_numerics.division_rounding", "eager_numerics.disable_ftz")


def _inductor_options() -> dict[str, bool]:
    from torch._inductor import config

    present = {}
    for key in _EAGER_NUMERICS:
        section, name = key.split(".")
        if hasattr(getattr(config, section, None), name):
            present[key] = True
    return present


def available(device: torch.device | str = "cuda") -> tuple[bool, str]:
    """Whether the compiled path can run on ``device``'s type, and why not if it cannot."""
    device = torch.device(device)
    if not hasattr(torch, "compile"):
        return False, f"PyTorch {torch.__version__} has no torch.compile"
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return False, "Triton is not importable (inductor cannot compile for CUDA)"
        if "eager_numerics.division_rounding" not in _inductor_options():
            return False, (f"PyTorch {torch.__version__} inductor has no eager_numerics.division_rounding: "
                           "its divisions would not match the reference bit for bit")
    return True, ""


# ---------------------------------------------------------------------------------------------
# Traced functions (same operations as the reference, except where the docstring says).


def _finite_abs(x: torch.Tensor) -> torch.Tensor:
    """``|x|`` as fp32, with 0 for infinities and NaN (the reference's maxima ignore them).

    ``mag < inf`` rather than ``isfinite(mag)``: the same selection (NaN compares false), in one
    comparison where inductor writes ``isfinite`` as three operations and a conjunction. In every
    kernel that takes a maximum of a compiled FLUX.1-dev block: 44.07 to 43.60 G warp instructions
    per step at 1024 px, and one kernel fewer (``benchmarks/kernel_sass.py``, sm_90 code, with
    ``isfinite`` put back by hand for the first figure).
    """
    mag = x.float().abs()
    return torch.where(mag < float("inf"), mag, torch.zeros_like(mag))


def _format_max(fmt: FP8Format) -> float:
    """``fmt.max`` as a literal of this code, which dynamo always treats as a constant.

    Read as an attribute, a float may be traced as a symbolic input under dynamic shapes; in the
    backward of a custom autograd function inside a compiled block that failed to trace (torch
    2.13: "lift_tracked_freevar_to_input should not be called on root SubgraphTracer").
    """
    if fmt.name == "e4m3":
        return 448.0
    if fmt.name == "e5m2":
        return 57344.0
    raise ValueError(f"no FP8 format named {fmt.name!r}")


def _saturate(v: torch.Tensor, fmt: FP8Format) -> torch.Tensor:
    """``v.clamp(-max, max)`` that passes NaN through untouched, as eager's clamp does.

    Inductor's vectorised CPU clamp returns the x86 default NaN (sign bit set), which would encode
    as 0xFF instead of the reference's 0x7F; selecting the NaN itself keeps its bits.
    """
    limit = _format_max(fmt)
    return torch.where(torch.isnan(v), v, v.clamp(-limit, limit))


def _pow2(exponent: torch.Tensor) -> torch.Tensor:
    """Exactly ``2.0 ** exponent`` (integer ``exponent`` in [-127, 127]) as fp32: ``exp2`` of the
    integer, with ``2**-127`` (a subnormal, which a flush-to-zero ``exp2`` would lose) selected apart.

    Three operations per element. Inductor inlines this into every kernel that decodes or encodes a
    per-group scale, recomputed per element. ``benchmarks/kernel_sass.py`` counts a 1024 px COAT
    step's inductor kernels at 43.60 G warp instructions with it (41.7 ms at an H200's issue rate),
    against 47.12 G (45.1 ms) for the product of seven exact power-of-two factors used before and
    43.19 G (41.3 ms) from its bits (``--pow2``; x86_64 CPU compiling for sm_90, torch 2.13, 2026-11-27).

    Exactness: CUDA does not promise ``exp2f`` exact, but at an integer the result is a power of
    two, and the reference (:func:`coatflux.core.formats.scale_from_amax`) computes its scales with
    ``torch.exp2`` too: the GPU tests compare this path with it byte for byte, and check all 255
    exponents on the device, compiled, as the CPU tests do here.

    Chosen against building the float from its bits, which failed to compile for CUDA twice under
    torch 2.11 ("Cannot bitcast data-type of size 64 to data-type of size 32", 2026-11-26;
    "CantSplit" in the standalone quantizer, 2026-11-27, then with a symbolic group size), and
    against that product of factors, some 60 operations (eight per bit of the exponent).
    ``benchmarks/pow2_formulations.py`` compiles and times all three on a GPU.
    """
    k = exponent.to(torch.int32)
    return torch.where(k == -127, torch.full_like(k, 2.0**-127, dtype=torch.float32), torch.exp2(k.float()))


def _fp32_bits(value: float) -> int:
    """The bits of ``value`` as an fp32, as a signed int (what ``view(torch.int32)`` gives)."""
    return struct.unpack("<i", struct.pack("<f", value))[0]


# fp32 bits of each format's maximum, computed once here: neither dynamo nor make_fx can trace struct
_MAX_BITS = {fmt.max: _fp32_bits(fmt.max) for fmt in map(get_format, ("e4m3", "e5m2"))}


def _pow2_exponent_of(amax: torch.Tensor, fmt_max: float) -> torch.Tensor:
    """Smallest ``k`` in [-127, 127] with ``amax <= fmt_max * 2**k`` (0 where ``amax`` is 0); int32.

    With ``amax = m * 2**e`` and ``fmt_max = f * 2**E`` (m, f in [1, 2)): ``k = e - E + (m > f)``.
    A subnormal ``amax`` has ``e = -127`` here, far below the clamp, which is all it needs.
    """
    max_bits = _MAX_BITS[fmt_max]  # a Python int: no tensor constant in a traced graph
    bits = amax.view(torch.int32)
    e = (bits >> 23) - 127
    above = ((bits & 0x7FFFFF) > (max_bits & 0x7FFFFF)).to(torch.int32)
    k = (e - ((max_bits >> 23) - 127) + above).clamp(-127, 127)
    return torch.where(amax > 0, k, torch.zeros_like(k))


AMAX_BLOCK = 4096  # elements per partial maximum of a per-tensor scale


def _quantize_tensor(flat: torch.Tensor, fmt_max: torch.Tensor | float,
                     fmt: FP8Format) -> tuple[torch.Tensor, torch.Tensor]:
    # Zero padding cannot raise a maximum of absolute values, so the result is the reference's.
    # Padded to an even number of blocks: a single block would be a size of 1, which a graph
    # with dynamic shapes specializes on, so a larger tensor later would compile it again.
    blocks = torch.nn.functional.pad(flat, (0, (-flat.shape[0]) % (2 * AMAX_BLOCK))).reshape(-1, AMAX_BLOCK)
    return _codes_and_scale(flat, _finite_abs(blocks).amax(dim=1), fmt_max, fmt)


def _codes_and_scale(x: torch.Tensor, partial_maxima: torch.Tensor, fmt_max: torch.Tensor | float,
                     fmt: FP8Format) -> tuple[torch.Tensor, torch.Tensor]:
    """``x``'s codes and the fp32 scale for its magnitudes' maxima over parts (rows, blocks) of it.

    The scale is the reference's (:func:`coatflux.core.formats.scale_from_amax`): the maximum over
    the parts divided by the format's maximum, 1 where that is 0. Divided in fp64, then rounded to
    fp32: that is the correctly rounded fp32 quotient (double rounding is harmless for division,
    53 >= 2 * 24 + 2), whatever inductor makes of an fp32 division -- Triton's approximate
    ``div.full``, or a multiplication by the reciprocal.

    The division is taken per part, before the last maximum, not after it: rounding a quotient by
    a positive constant never reverses an order, so the maximum of the quotients is the quotient of
    the maximum, bit for bit. Why: inductor inlines a point-wise chain on a scalar into every kernel
    that reads it, so a quotient taken after the maximum was recomputed for every element of ``x``
    in the kernel that writes the codes, the fp64 division included: 31 to 32 SASS instructions per
    element in those kernels of a compiled FLUX.1-dev block, 19 with the division taken before
    (``benchmarks/kernel_sass.py``, sm_90 code). Then the scale is a reduction's output, which the
    codes' kernel loads. ``(amax > 0) & (scale > 0)``, the reference's condition, is
    ``scale > 0``: a positive quotient has a positive dividend.
    """
    scale = (partial_maxima.double() / fmt_max).float().amax()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return _saturate(x.float() / scale, fmt).to(fmt.dtype), scale


def _quantize_tensor_fn(fmt: FP8Format) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    def fn(flat: torch.Tensor, fmt_max: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _quantize_tensor(flat, fmt_max, fmt)

    return fn


def _quantize_group_fn(fmt: FP8Format, group: int) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    def fn(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        width = rows.shape[-1]
        padded = torch.nn.functional.pad(rows.float(), (0, (-width) % group))
        groups = padded.reshape(padded.shape[0], -1, group)
        exponent = _pow2_exponent_of(_finite_abs(groups).amax(dim=-1, keepdim=True), _format_max(fmt))
        scaled = groups * _pow2(-exponent)  # == groups / 2**exponent, exactly
        # contiguous: the reference keeps the padded buffer behind a view; the bytes are the same
        codes = _saturate(scaled, fmt).to(fmt.dtype).reshape(padded.shape)[..., :width].contiguous()
        return codes, exponent.squeeze(-1).to(torch.int8)

    return fn


def _dequantize_tensor_fn(dtype: torch.dtype) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def fn(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return (codes.float() * scale).to(dtype)

    return fn


def _dequantize_group_fn(group: int, dtype: torch.dtype) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def fn(rows: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
        width = rows.shape[-1]
        padded = torch.nn.functional.pad(rows.float(), (0, (-width) % group))
        scale = _pow2(exponent.to(torch.int32)).unsqueeze(-1)
        values = (padded.reshape(padded.shape[0], -1, group) * scale).reshape(padded.shape)
        return values[..., :width].to(dtype)

    return fn


def group_pow2_ops(rows: torch.Tensor, fmt: str | FP8Format, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-group quantizer's operations, uncompiled: ``(codes, int8 exponents)`` of 2-D ``rows``.

    For code that is itself being traced by ``torch.compile`` (the compiled blocks of
    :mod:`coatflux.core.compiled`), where a nested compiled function would break the graph: the
    enclosing graph's inductor compiles these operations along with their neighbours.
    """
    return _quantize_group_fn(get_format(fmt), group)(rows)


def group_pow2_values_ops(rows: torch.Tensor, exponent: torch.Tensor, group: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`group_pow2_ops`, uncompiled (same use)."""
    return _dequantize_group_fn(group, dtype)(rows, exponent)


def tensor_scale_ops(x: torch.Tensor, fmt: str | FP8Format, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-tensor quantizer's operations, uncompiled: ``(codes shaped like x, fp32 scale)``.

    For code that is itself being compiled (the FP8 linear in a compiled block), so ``x`` is a
    node of a larger graph. The maximum is taken per row (last dimension) and then over the rows,
    not over fixed blocks as :func:`quantize_tensor` does: a row reduction iterates like the kernel
    that produces ``x`` (a GELU, a norm, a gradient's sum), so inductor computes the row maxima in
    that kernel and the maximum costs no pass over ``x`` of its own; the blocks of a padded or a
    whole-tensor ``amax`` (which inductor splits its own way) match no producer, and were a
    separate read of every linear input and output gradient (``benchmarks/kernel_launches.py``:
    5.0 of 92.5 GB fewer bytes per FLUX.1-dev step at 512 px). The second reduction is over one value per
    row. The scale is the reference's for the values inductor computes (a maximum does not depend
    on its order; the division as in :func:`_codes_and_scale`), but where the maximum and the codes
    are fused into the kernel of a bf16 producer, inductor takes them from the producer's unrounded
    fp32 values, so the scale and some codes can differ from eager's by that bf16 rounding
    (``benchmarks/scale_fusion.py`` shows it); the codes' division also follows the enclosing
    graph's inductor options. The compiled paths' SQNR tests allow both;
    :func:`quantize_tensor` is the byte-exact entry point. (A tensor
    made for it inside a custom autograd function's backward fails to trace with dynamic shapes
    in torch 2.13.)

    ``chunk`` takes the first maxima over chunks of that many elements of each row instead, where
    the row's width is a static multiple of it (per row otherwise; the scale is the same). A wide
    row's maximum makes its producer a looped reduction kernel; chunks make it a reduction without
    a loop, which inductor does not fuse with the producer. ``benchmarks/scale_fusion.py`` times
    both: for the single block's GELU backward on an H200 (2026-11-27 14:35), 0.631 ms per row and
    0.674 ms per chunk of 256, so the compiled blocks take the row.
    """
    fmt = get_format(fmt)
    return _codes_and_scale(x, _partial_maxima(x, chunk), _format_max(fmt), fmt)


def _partial_maxima(x: torch.Tensor, chunk: int | None) -> torch.Tensor:
    """The maxima of ``x``'s finite magnitudes per row, or per ``chunk`` elements of a row."""
    magnitude = _finite_abs(x)
    width = x.shape[-1]
    if chunk is not None and isinstance(width, int) and width % chunk == 0:
        magnitude = magnitude.reshape(*x.shape[:-1], width // chunk, chunk)
    return magnitude.amax(dim=-1)


# ---------------------------------------------------------------------------------------------
# Compiled entry points (one compiled function per format / group size / dtype / backend).


def _own_code(fn: Callable, name: str) -> Callable:
    """``fn`` with a code object of its own, so dynamo keeps a separate cache (and recompile count) for it.

    Dynamo caches compiled graphs per code object, and every closure made by one builder shares
    its code: E4M3 and E5M2, bf16 and fp32 inputs, G = 16 and 32 would all count against one
    recompile limit (and ``fullgraph=True`` turns hitting it into an error).
    """
    code = fn.__code__.replace(co_name=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


_BUILDERS: dict[str, Callable[..., Callable]] = {
    "quantize_tensor": lambda fmt, _in: _quantize_tensor_fn(fmt),
    "quantize_group": lambda fmt, group, _in: _quantize_group_fn(fmt, group),
    "dequantize_tensor": lambda _codes, dtype: _dequantize_tensor_fn(dtype),
    "dequantize_group": lambda group, _codes, dtype: _dequantize_group_fn(group, dtype),
}


def compile_kernel(fn: Callable, name: str, backend: str | Callable) -> Callable:
    """``fn`` (tensors in, tensors out; every other number a constant of its closure) compiled with
    dynamic sizes and constant numbers, under ``name`` (see :func:`_own_code`).

    ``dynamic=True`` keeps one graph for every token count. On its own it also makes dynamo trace
    the closure's Python ints and floats -- the group size, a norm's ``eps`` -- as symbols, since
    a closure cell is a local source: the group's reduction then had a symbolic length (a loop
    where a group of 16 needs none), and with ``2**k`` built from its bits inductor's CUDA tiling
    failed to prove the padded row divisible by it ("CantSplit": the per-group quantizer's GPU
    test and the COAT bench on an H200, 2026-11-27 14:35). Each compiled function has one value
    of each, fixed when it is built, so they are traced as constants: dynamo's ``specialize_int``
    and ``specialize_float``, patched around each call, since any call may compile (a few config
    assignments per call, as :func:`coatflux.core.compiled.compile_module` pays for the blocks).
    """
    options = _inductor_options() if backend == "inductor" else None
    compiled = torch.compile(_own_code(fn, name), backend=backend, dynamic=True, fullgraph=True, options=options)
    return torch._dynamo.config.patch(specialize_int=True, specialize_float=True)(compiled)


@functools.cache
def _compiled(kind: str, key: tuple, backend: str) -> Callable:
    """The compiled function for one layout, format, group size and input/output dtypes."""
    fn = _BUILDERS[kind](*key)
    if backend == "eager":  # the traced functions run op by op: for debugging
        return fn
    suffix = "_".join(getattr(k, "name", None) or str(k).replace("torch.", "") for k in key)
    return compile_kernel(fn, f"coatflux_{kind}_{suffix}", backend)


@functools.cache
def _fmt_max_tensor(fmt_name: str, device: torch.device) -> torch.Tensor:
    return torch.tensor(get_format(fmt_name).max, dtype=torch.float32, device=device)


def _flat_rows(t: torch.Tensor, last: tuple[int, ...] | torch.Size | None) -> torch.Tensor:
    """``t`` as contiguous rows of width ``last`` (1 for a 0-d tensor), or 1-D when ``last`` is None.

    Compiled functions always see the same rank and a tensor that is not a view (``detach``
    drops the view link), so dynamo has no base-tensor strides to guard on and recompile for.
    """
    if last is None:
        return t.detach().reshape(-1).contiguous().detach()
    width = int(last[0]) if len(last) else (t.shape[-1] if t.dim() else 1)
    return t.detach().reshape(-1, width).contiguous().detach()


def quantize_tensor(x: torch.Tensor, fmt: str | FP8Format = "e4m3", *, backend: str = "inductor") -> QuantizedTensor:
    """``quantize_reference(x, fmt, "tensor")``: one fp32 scale, a reduction and an element-wise pass."""
    fmt = get_format(fmt)
    compiled = _compiled("quantize_tensor", (fmt, x.dtype), backend)
    codes, scale = compiled(_flat_rows(x, None), _fmt_max_tensor(fmt.name, x.device))
    return QuantizedTensor(codes.reshape(x.shape), scale, fmt, "tensor", 0, x.shape, x.dtype, False)


def quantize_group_pow2(x: torch.Tensor, fmt: str | FP8Format, group: int, *,
                        backend: str = "inductor") -> QuantizedTensor:
    """``quantize_reference(x, fmt, "group", group, pow2_scales=True)``: one kernel."""
    fmt = get_format(fmt)
    codes, exponent = _compiled("quantize_group", (fmt, group, x.dtype), backend)(_flat_rows(x, x.shape[-1:]))
    return QuantizedTensor(codes.reshape(x.shape), exponent, fmt, "group", group, x.shape, x.dtype, True)


def supports(q_or_granularity: QuantizedTensor | str, pow2: bool = False) -> bool:
    """Whether this module has a fast path for that layout (tensor without pow2, group with pow2)."""
    if isinstance(q_or_granularity, QuantizedTensor):
        q_or_granularity, pow2 = q_or_granularity.granularity, q_or_granularity.pow2
    return (q_or_granularity, pow2) in (("tensor", False), ("group", True))


def dequantize(q: QuantizedTensor, dtype: torch.dtype | None = None, *, backend: str = "inductor") -> torch.Tensor:
    """``dequantize_reference(q, dtype)`` for the layouts :func:`supports` accepts: one kernel."""
    if not supports(q):
        raise ValueError(f"no fast dequantize for {q.granularity} scales with pow2={q.pow2}")
    dtype = dtype or q.dtype
    if q.granularity == "tensor":
        values = _compiled("dequantize_tensor", (q.data.dtype, dtype), backend)(_flat_rows(q.data, None), q.scale)
        return values.reshape(q.shape)
    rows = _flat_rows(q.data, q.shape[-1:])
    values = _compiled("dequantize_group", (q.group, q.data.dtype, dtype), backend)(rows, _flat_rows(q.scale, ()))
    return values.reshape(q.shape)
