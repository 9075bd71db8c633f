"""Per-layer FP8 overflow and underflow counts: how much of each tensor FP8 could not represent.

What: :class:`FP8RangeMonitor` watches the quantizations of a COAT model and counts, per layer
and per kind of tensor, the elements quantized and how many of them

* *overflowed*: finite values whose scaled magnitude lay beyond what rounds to the format maximum,
  so the quantizer saturated them to ``+-max`` (information lost at the top);
* *underflowed*: finite non-zero values that came back as exactly zero (flushed: lost at the
  bottom, typically small entries of a tensor whose scale is set by one huge outlier);
* were *non-finite* (inf or NaN) on input, counted apart: inf saturates and NaN stays NaN, and
  either one means something upstream already went wrong.

Kinds, as keys ``"<module name>:<kind>"`` of :meth:`FP8RangeMonitor.snapshot`:

* ``input``: the E4M3 copy an :class:`~coatflux.core.linear.FP8Linear` makes of its input (each
  forward; siblings sharing one cached copy each count it);
* ``weight``: a trainable weight's E4M3 copy, counted once per :meth:`~FP8RangeMonitor.reset`
  period. Frozen weights were quantized at conversion, before any monitor existed, and their
  originals are gone: they are not counted here (per-tensor amax scaling cannot saturate them;
  for their underflow call :func:`count_range` on the original checkpoint's weight and
  ``quantize(w, E4M3, "tensor")``);
* ``grad_output``: the E5M2 copy of the output gradient made in backward;
* ``saved_activations`` (one key for the whole model, no module prefix): what the model's
  :class:`~coatflux.core.activation.ActivationCompressor` quantizes itself (norm / activation
  inputs; linear inputs it stores are the linears' own copies, counted as ``input``).

Why: per-tensor amax scaling never saturates a finite value, so in COAT the failure mode to
watch is underflow -- a layer whose gradient has a few outliers flushes most of its small
entries -- and non-finite values appearing. Counts per layer name point at the layer.
Overflow is still counted, because a scale that is not the tensor's own amax (a hand-made or
delayed scale, or a scale that itself underflowed to zero for an all-subnormal tensor) does
saturate. The threshold is the format maximum plus half an ulp of its top binade (464 for E4M3,
61440 for E5M2): a scaled amax that lands one fp32 ulp above ``max`` -- which ``amax / (amax /
max)`` does for several percent of amax values -- rounds to ``max`` anyway and is not an overflow
(an exact tie at the threshold counts as in range; for E5M2 it would round to inf).

How, and what we chose against: ``FP8Linear.range_observer`` is an explicit hook, ``None`` by
default, that the layer calls with (kind, original, :class:`~coatflux.core.formats.QuantizedTensor`);
overflow is read from ``original / per-element scale`` and underflow from the dequantized
values, so the counts follow the quantizer's own definitions and work for every granularity.
The monitor attaches its observers only while :attr:`FP8RangeMonitor.enabled` is true, so a
disabled monitor costs nothing at all: no kernels, no host syncs, not even the Python call.
Enabled, it runs a few element-wise kernels per quantization and keeps the counts on the device;
:meth:`~FP8RangeMonitor.snapshot` syncs once per device. The activation compressor has the same
kind of hook, ``ActivationCompressor.range_observer`` (pass ``activations=False`` to leave it
alone). Alternatives:
histograms of exponents (far more data than a log line wants), or ``torch.compile``-side
instrumentation (ties the counts to one backend); global monkey-patching of ``quantize`` would
lose the layer names.

Typical use, in a training loop::

    monitor = FP8RangeMonitor(model, enabled=False)
    ...
    monitor.enabled = logger.isEnabledFor(logging.DEBUG) and step % log_every == 0
    loss.backward()
    if monitor.enabled:
        logger.debug("%s", format_counts(monitor.snapshot()))
        monitor.reset()
    monitor.enabled = False
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from coatflux.core.formats import FP8Format, QuantizedTensor, dequantize, dequantize_reference
from coatflux.core.linear import FP8Linear

KINDS = ("input", "weight", "grad_output")
SAVED_ACTIVATIONS = "saved_activations"


@dataclass(frozen=True)
class RangeCounts:
    """Elements quantized and how many overflowed, underflowed or were non-finite on input."""

    total: int = 0
    overflow: int = 0
    underflow: int = 0
    nonfinite: int = 0

    def merge(self, *others: RangeCounts) -> RangeCounts:
        """Element-wise sum of these counts and ``others``."""
        fields = ("total", "overflow", "underflow", "nonfinite")
        return RangeCounts(*(getattr(self, f) + sum(getattr(o, f) for o in others) for f in fields))

    def __add__(self, other: RangeCounts) -> RangeCounts:
        if not isinstance(other, RangeCounts):
            return NotImplemented
        return self.merge(other)

    @property
    def lost(self) -> int:
        """Elements not represented: overflowed, underflowed or non-finite."""
        return self.overflow + self.underflow + self.nonfinite

    def rate(self, count: int) -> float:
        return count / self.total if self.total else 0.0


def saturation_threshold(fmt: FP8Format) -> float:
    """Smallest scaled magnitude above which a value would not round to ``fmt.max`` unsaturated."""
    top_binade = math.floor(math.log2(fmt.max))
    return fmt.max + 2.0 ** (top_binade - fmt.mantissa_bits - 1)


def _element_scales(q: QuantizedTensor) -> torch.Tensor:
    """The scale each element was divided by, broadcastable to ``q.shape`` (fp32)."""
    if q.granularity == "tensor":
        return q.scales().float()
    # Dequantizing code 1.0 everywhere yields exactly each element's scale, in q's own layout.
    ones = torch.ones(q.data.shape, device=q.data.device).to(q.data.dtype)
    return dequantize_reference(dataclasses.replace(q, data=ones), torch.float32)


def _count_on_device(x: torch.Tensor, q: QuantizedTensor) -> torch.Tensor:
    """``[overflow, underflow, nonfinite]`` of quantizing ``x`` to ``q``, as an int64 device tensor."""
    with torch.no_grad():
        x = x.detach()
        finite = torch.isfinite(x)
        scaled = x.float() / _element_scales(q)  # exactly what the quantizer cast (before saturation)
        overflow = finite & (scaled.abs() > saturation_threshold(q.fmt))
        underflow = finite & (x != 0) & (dequantize(q, torch.float32) == 0)
        return torch.stack([overflow.sum(), underflow.sum(), (~finite).sum()])


def count_range(x: torch.Tensor, q: QuantizedTensor) -> RangeCounts:
    """Counts of one quantization: ``x`` the original, ``q`` what quantizing it produced (syncs)."""
    overflow, underflow, nonfinite = _count_on_device(x, q).tolist()
    return RangeCounts(x.numel(), overflow, underflow, nonfinite)


class FP8RangeMonitor:
    """Counts FP8 overflow, underflow and non-finite inputs per layer of a COAT model (see module doc).

    ``model`` is searched once, at construction, for :class:`FP8Linear` modules and for the
    activation compressor that :func:`~coatflux.core.api.apply_coat` attached
    (``model.coat_context.compressor``). Counting happens only while :attr:`enabled` is true.
    One monitor per model: a layer that already has another observer is an error. Layers inside
    blocks compiled by ``activation.compile_blocks`` are left out, with a warning that says how
    many: their quantization is part of a compiled graph, where no observer runs.
    """

    def __init__(self, model: nn.Module, *, enabled: bool = True, activations: bool = True) -> None:
        context = getattr(model, "coat_context", None)
        compiled = tuple(f"{name}." for name in getattr(context, "compiled_blocks", ()))
        found = {name: module for name, module in model.named_modules() if isinstance(module, FP8Linear)}
        self.layers: dict[str, FP8Linear] = {name: m for name, m in found.items() if not name.startswith(compiled)}
        if len(self.layers) < len(found):
            warnings.warn(f"FP8RangeMonitor: {len(found) - len(self.layers)} FP8 linears inside compiled blocks "
                          "are not counted (coat.activation.compile_blocks: false counts them)",
                          RuntimeWarning, stacklevel=2)
        self.compressor: Any = getattr(context, "compressor", None) if activations else None
        self._totals: dict[str, int] = {}
        self._device_counts: dict[str, torch.Tensor] = {}
        self._weights_seen: set[str] = set()
        self._attached = False
        self._closed = False
        self.enabled = enabled

    # -- switching ---------------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """Whether quantizations are counted now; false detaches every observer (zero cost)."""
        return self._attached

    @enabled.setter
    def enabled(self, value: bool) -> None:
        if value and self._closed:
            raise RuntimeError("FP8RangeMonitor: closed; create a new monitor")
        if bool(value) == self._attached:
            return
        if value:
            self._attach()
        else:
            self._detach()

    def _attach(self) -> None:
        for name, layer in self.layers.items():
            if layer.__dict__.get("range_observer") is not None:
                raise RuntimeError(f"FP8RangeMonitor: layer {name!r} already has a range observer")
        for name, layer in self.layers.items():
            layer.range_observer = self._layer_observer(name)
        if self.compressor is not None:
            if self.compressor.range_observer is not None:
                raise RuntimeError("FP8RangeMonitor: the activation compressor already has a range observer")
            self.compressor.range_observer = lambda t, q: self._record(SAVED_ACTIVATIONS, t, q)
        self._attached = True

    def _detach(self) -> None:
        for layer in self.layers.values():
            layer.__dict__.pop("range_observer", None)
        if self.compressor is not None:
            self.compressor.range_observer = None
        self._attached = False

    def _layer_observer(self, name: str) -> Callable[[str, torch.Tensor, QuantizedTensor], None]:
        def observe(kind: str, x: torch.Tensor, q: QuantizedTensor) -> None:
            if kind == "weight":
                if name in self._weights_seen:
                    return  # static between optimizer steps: once per reset period is enough
                self._weights_seen.add(name)
            self._record(f"{name}:{kind}", x, q)

        return observe

    def _record(self, key: str, x: torch.Tensor, q: QuantizedTensor) -> None:
        if not x.is_floating_point() or x.numel() == 0:
            return
        counts = _count_on_device(x, q)
        previous = self._device_counts.get(key)
        self._device_counts[key] = counts if previous is None else previous + counts.to(previous.device)
        self._totals[key] = self._totals.get(key, 0) + x.numel()

    # -- results -----------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, RangeCounts]:
        """Counts since construction or the last :meth:`reset`, per key (one host sync per device)."""
        keys_by_device: dict[torch.device, list[str]] = {}
        for key, counts in self._device_counts.items():
            keys_by_device.setdefault(counts.device, []).append(key)
        result: dict[str, RangeCounts] = {}
        for keys in keys_by_device.values():
            rows = torch.stack([self._device_counts[k] for k in keys]).tolist()
            for key, (overflow, underflow, nonfinite) in zip(keys, rows, strict=True):
                result[key] = RangeCounts(self._totals[key], overflow, underflow, nonfinite)
        return dict(sorted(result.items()))

    def reset(self) -> None:
        """Forget all counts (trainable weights are counted again at their next quantization)."""
        self._device_counts.clear()
        self._totals.clear()
        self._weights_seen.clear()

    def close(self) -> None:
        """Detach everything this monitor attached; its counts stay readable."""
        self.enabled = False
        self._closed = True

    def __enter__(self) -> FP8RangeMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def total_counts(counts: Mapping[str, RangeCounts] | Iterable[RangeCounts]) -> RangeCounts:
    """Sum of many counts (the values of a :meth:`FP8RangeMonitor.snapshot`, say)."""
    values = counts.values() if isinstance(counts, Mapping) else counts
    return RangeCounts().merge(*values)


def format_counts(counts: Mapping[str, RangeCounts], top: int = 10) -> str:
    """One log line: totals, then the ``top`` keys with the most lost elements (none if all clean)."""
    total = total_counts(counts)
    head = (f"FP8 range: {total.total} values in {len(counts)} tensors; overflow {total.overflow}, "
            f"underflow {total.underflow} ({100 * total.rate(total.underflow):.3g}%), "
            f"non-finite {total.nonfinite}")
    worst = sorted(((k, c) for k, c in counts.items() if c.lost), key=lambda kc: (-kc[1].lost, kc[0]))
    if not worst:
        return head
    parts = []
    for key, c in worst[:top]:
        part = f"{key} uf={c.underflow} ({100 * c.rate(c.underflow):.3g}%)"
        if c.overflow:
            part += f" of={c.overflow}"
        if c.nonfinite:
            part += f" nonfinite={c.nonfinite}"
        parts.append(part)
    more = f"; +{len(worst) - top} more" if len(worst) > top else ""
    return f"{head}; worst: " + ", ".join(parts) + more
