"""FP8 formats and scaled quantization: the plain-PyTorch reference every fast path is tested against.

What: the two OCP FP8 formats (E4M3 "fn", max 448, no infinities; E5M2, max 57344) and
quantization with one scale per tensor, per group (1 x G along the last dimension) or per block
(flattened runs of B elements). Values are divided by their scale, saturated to the format's
largest finite value and cast with PyTorch's round-to-nearest-even.

Special values, on purpose:

* zeros and all-zero groups get scale 1, so they round-trip exactly and no 0/0 appears;
* a constant group maps its value to the format maximum (relative error at most half an ulp);
* subnormals of the format are used as PyTorch's cast produces them (no flush to zero);
* ``+-inf`` saturates to ``+-max * scale`` and the scale is computed from the *finite* values
  only, so one overflowed element does not zero out its neighbours;
* NaN stays NaN (both formats encode it), so a diverged run is visible rather than hidden.

Scales are fp32 by default. ``pow2_scales=True`` rounds each scale up to a power of two and stores
its exponent as ``int8`` (the MX "E8M0" idea): one byte instead of four per group, exact
dequantization by a power of two, and at most the top binade of the format left unused, which for
a floating-point format costs range, not relative precision. Activation compression uses it.

Dispatch: :func:`quantize_reference` and :func:`dequantize_reference` are the specification.
:func:`quantize` and :func:`dequantize` return the same bytes; for CUDA tensors in the two layouts
COAT uses (per-tensor fp32 scales, per-group power-of-two scales) they run the fused compiled
kernels of :mod:`coatflux.kernels.quant`, everywhere else the reference. ``reference=True`` or the
environment variable ``COATFLUX_REFERENCE_KERNELS=1`` forces the reference (to bisect a numerical
problem, or where compilation is unwanted).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch

FORMAT_NAMES = ("e4m3", "e5m2")


@dataclass(frozen=True)
class FP8Format:
    """One FP8 format: its storage dtype and the magnitudes that bound it."""

    name: str
    dtype: torch.dtype
    max: float  # largest finite value
    min_normal: float
    min_subnormal: float
    mantissa_bits: int

    @property
    def dynamic_range(self) -> float:
        """Ratio of the largest finite value to the smallest non-zero subnormal."""
        return self.max / self.min_subnormal


E4M3 = FP8Format("e4m3", torch.float8_e4m3fn, 448.0, 2.0**-6, 2.0**-9, 3)
E5M2 = FP8Format("e5m2", torch.float8_e5m2, 57344.0, 2.0**-14, 2.0**-16, 2)
_FORMATS = {"e4m3": E4M3, "e5m2": E5M2}


def get_format(name: str | FP8Format) -> FP8Format:
    """Return the format called ``name`` (``"e4m3"`` or ``"e5m2"``)."""
    if isinstance(name, FP8Format):
        return name
    try:
        return _FORMATS[str(name).lower()]
    except KeyError:
        raise ValueError(f"unknown FP8 format {name!r}; choose one of {', '.join(FORMAT_NAMES)}") from None


def cast_to_fp8(x: torch.Tensor, fmt: FP8Format) -> torch.Tensor:
    """Saturating round-to-nearest cast of already-scaled values (NaN kept, inf saturated)."""
    return x.float().clamp(-fmt.max, fmt.max).to(fmt.dtype)


def _finite_amax(x: torch.Tensor, dim: int | None) -> torch.Tensor:
    mag = x.float().abs()
    mag = torch.where(torch.isfinite(mag), mag, torch.zeros((), dtype=mag.dtype, device=mag.device))
    return mag.amax() if dim is None else mag.amax(dim=dim, keepdim=True)


def scale_from_amax(amax: torch.Tensor, fmt: FP8Format, pow2: bool = False) -> torch.Tensor:
    """Scale that maps ``amax`` to the format maximum (1 where ``amax`` is 0).

    Also 1 where ``amax / max`` underflows to 0 in fp32 (``amax`` below ~6e-43): a zero scale would
    turn the tensor's zeros into 0/0 = NaN; with scale 1 its values flush to zero, an underflow.

    With ``pow2`` the scale is the smallest power of two at or above ``amax / max``, returned as
    fp32; :func:`pow2_exponent` gives its int8 exponent for storage.
    """
    amax = amax.float()
    # A divisor tensor on amax's device, not the Python float: eager CUDA divides by a CPU scalar
    # as a multiplication by its reciprocal, which is an ulp off the quotient for some amax (an
    # H100 run, torch 2.11, found one). Tensor by tensor it is the correctly rounded quotient on
    # every device, which the compiled quantizer computes too.
    scale = amax / torch.full_like(amax, fmt.max)
    if pow2:
        exponent = torch.ceil(torch.log2(scale)).clamp(-127, 127)
        scale = torch.exp2(exponent)
        # log2 of a non-power-of-two can round down by an ulp; fix the rare case it did.
        scale = torch.where(amax / scale > fmt.max, scale * 2, scale)
    return torch.where((amax > 0) & (scale > 0), scale, torch.ones_like(scale))


def pow2_exponent(scale: torch.Tensor) -> torch.Tensor:
    """Exact int8 exponent of a power-of-two scale made by :func:`scale_from_amax`."""
    return torch.log2(scale).round().clamp(-127, 127).to(torch.int8)


def pow2_from_exponent(exponent: torch.Tensor) -> torch.Tensor:
    return torch.exp2(exponent.float())


@dataclass
class QuantizedTensor:
    """FP8 codes plus the scales needed to recover a tensor of ``shape`` and ``dtype``.

    ``granularity`` is ``"tensor"``, ``"group"`` (1 x ``group`` along the last dimension) or
    ``"block"`` (``group`` consecutive elements of the flattened tensor). Padding needed to fill the
    last group or block lives only in the scales' count, never in ``data``.
    """

    data: torch.Tensor
    scale: torch.Tensor  # fp32 scales, or int8 exponents when pow2
    fmt: FP8Format
    granularity: str
    group: int
    shape: torch.Size
    dtype: torch.dtype
    pow2: bool = False

    def scales(self) -> torch.Tensor:
        return pow2_from_exponent(self.scale) if self.pow2 else self.scale

    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scale.numel() * self.scale.element_size()

    def dequantize(self) -> torch.Tensor:
        return dequantize(self)


REFERENCE_ENV = "COATFLUX_REFERENCE_KERNELS"


@functools.cache
def fast_path_available(device_type: str) -> bool:
    """Whether :mod:`coatflux.kernels.quant` can run on this device type (checked once per type)."""
    try:
        from coatflux.kernels import quant
    except ImportError:
        return False
    return quant.available(device_type)[0]


def uses_fast_path(device: torch.device, reference: bool = False) -> bool:
    """The dispatch rule: CUDA tensors use the fused kernels unless the reference is asked for.

    ``reference=True`` or the environment variable ``COATFLUX_REFERENCE_KERNELS=1`` (read on every
    call) select the reference; so does a CUDA setup where the fused kernels cannot compile
    exactly (no Triton, or an inductor without IEEE division: see ``coatflux.kernels.quant``).
    """
    if reference or device.type != "cuda" or os.environ.get(REFERENCE_ENV, "0") not in ("", "0"):
        return False
    return fast_path_available(device.type)


def _pad_last(x: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = (-x.shape[-1]) % multiple
    return torch.nn.functional.pad(x, (0, pad)) if pad else x


def quantize(
    x: torch.Tensor,
    fmt: str | FP8Format = "e4m3",
    granularity: str = "tensor",
    group: int = 0,
    pow2_scales: bool = False,
    *,
    reference: bool = False,
) -> QuantizedTensor:
    """Quantize ``x`` to FP8 with one scale per tensor, per 1 x ``group`` group or per block.

    Same result as :func:`quantize_reference`, computed by the fused kernels of
    :mod:`coatflux.kernels.quant` when :func:`uses_fast_path` says so (``reference=True`` or
    ``COATFLUX_REFERENCE_KERNELS=1`` forces the reference).
    """
    fmt = get_format(fmt)
    fast_layout = (granularity == "tensor" and not pow2_scales) or (granularity == "group" and pow2_scales and group >= 1)
    if fast_layout and x.is_floating_point() and x.numel() and uses_fast_path(x.device, reference):
        from coatflux.kernels import quant

        if granularity == "tensor":
            return quant.quantize_tensor(x, fmt)
        return quant.quantize_group_pow2(x, fmt, group)
    return quantize_reference(x, fmt, granularity, group, pow2_scales)


def quantize_reference(
    x: torch.Tensor,
    fmt: str | FP8Format = "e4m3",
    granularity: str = "tensor",
    group: int = 0,
    pow2_scales: bool = False,
) -> QuantizedTensor:
    """The specification of :func:`quantize`, in plain PyTorch (every device, every layout)."""
    fmt = get_format(fmt)
    if not x.is_floating_point():
        raise TypeError(f"quantize expects a floating-point tensor, got {x.dtype}")
    if granularity == "tensor":
        scale = scale_from_amax(_finite_amax(x, None), fmt, pow2_scales)
        data = cast_to_fp8(x.float() / scale, fmt)
    elif granularity in ("group", "block"):
        if group < 1:
            raise ValueError(f"{granularity} quantization needs a positive group size, got {group}")
        rows = x.reshape(-1, x.shape[-1] if x.dim() else 1) if granularity == "group" else x.reshape(1, -1)
        padded = _pad_last(rows.float(), group)
        groups = padded.reshape(padded.shape[0], -1, group)
        scale = scale_from_amax(_finite_amax(groups, -1), fmt, pow2_scales)
        codes = cast_to_fp8(groups / scale, fmt).reshape(padded.shape)[..., : rows.shape[-1]]
        data = codes.reshape(x.shape)
        scale = scale.squeeze(-1)
    else:
        raise ValueError(f"unknown granularity {granularity!r}; choose tensor, group or block")
    stored = pow2_exponent(scale) if pow2_scales else scale
    return QuantizedTensor(data, stored, fmt, granularity, group, x.shape, x.dtype, pow2_scales)


def dequantize(q: QuantizedTensor, dtype: torch.dtype | None = None, *, reference: bool = False) -> torch.Tensor:
    """Inverse of :func:`quantize` (up to rounding), in ``dtype`` or the original dtype.

    Same result as :func:`dequantize_reference`; dispatched like :func:`quantize`.
    """
    fast_layout = (q.granularity, q.pow2) in (("tensor", False), ("group", True))
    if fast_layout and q.data.numel() and uses_fast_path(q.data.device, reference):
        from coatflux.kernels import quant

        return quant.dequantize(q, dtype)
    return dequantize_reference(q, dtype)


def dequantize_reference(q: QuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The specification of :func:`dequantize`, in plain PyTorch."""
    dtype = dtype or q.dtype
    scale = q.scales()
    if q.granularity == "tensor":
        return (q.data.float() * scale).to(dtype)
    width = q.shape[-1] if (q.granularity == "group" and len(q.shape)) else None
    rows = q.data.reshape(-1, width) if width else q.data.reshape(1, -1)
    padded = _pad_last(rows.float(), q.group)
    values = (padded.reshape(padded.shape[0], -1, q.group) * scale.unsqueeze(-1)).reshape(padded.shape)
    return values[..., : rows.shape[-1]].reshape(q.shape).to(dtype)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 20 log10(||ref|| / ||ref - approx||)."""
    ref = reference.detach().double()
    noise = (ref - approx.detach().double()).norm()
    signal = ref.norm()
    if noise == 0:
        return math.inf
    return float(20 * torch.log10(signal / noise))
