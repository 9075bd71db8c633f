"""FP8 compression of the activations that non-linear ops save for backward (COAT's mixed granularity).

What: while a COAT-converted model runs forward, every floating-point tensor an autograd op
saves for backward -- the input of a LayerNorm or RMSNorm, of GELU-tanh or SiLU, the operands of
an element-wise multiply (AdaLN modulation, gates) -- is stored as FP8 E4M3 with one
power-of-two scale per 1 x ``group_size`` group (1.0625 bytes per element instead of 2 for bf16
or 4 for fp32 norm statistics) and restored to its original dtype when backward needs it.
Scaled-dot-product attention's saved tensors (q, k, v, output, log-sum-exp) stay as they are by
default, as in COAT. Inputs of :class:`~coatflux.core.linear.FP8Linear` layers are stored as the
per-tensor FP8 copy their GEMM already made (mixed granularity: per tensor for linears, per group
for everything else).

How, and what we chose against: COAT rewrites each Llama decoder layer as hand-fused autograd
functions, which covers one architecture. Here the compression sits on PyTorch's own seam for
saved tensors, ``torch.autograd.graph.saved_tensors_hooks``: saved tensors stay visible to
autograd, any model works unchanged, and non-reentrant ``torch.utils.checkpoint`` composes
because its own hooks are innermost inside a checkpointed region (those tensors are recomputed,
not stored). Attention is recognised with a ``TorchFunctionMode`` that marks the span of each
``scaled_dot_product_attention`` call, inside which tensors pass through; nothing is
monkey-patched. Such a mode sees every torch call made while it is active, which costs CPU time
on each of them (17% of a tiny FLUX model's forward and backward on a CPU), so
:func:`coatflux.core.api.apply_coat` activates it only inside the model's attention modules
(:func:`is_attention_module`) and model-wide only when it finds none.

A tensor saved by several ops (LayerNorm output used by three modulations, say) is compressed
once: packed copies are cached weakly by the identity and version of the source tensor. Two
kinds of tensor are not compressed again at all:

* *linear inputs*: an :class:`~coatflux.core.linear.FP8Linear` already made a per-tensor FP8 copy
  for its GEMM (kept in the model's input cache); that copy is what gets stored;
* *derived outputs*: the fused non-linear ops of :mod:`coatflux.core.nonlinear` register their
  outputs with a recipe (a LayerNorm output is ``(x - mean) * rstd`` of the FP8 input it already
  saved, a GELU output is ``gelu`` of it). Saving such an output costs no bytes; backward
  recomputes it from the FP8 input. This is what keeps one FLUX block's saved bytes near half of
  bf16 on a GPU, where the LayerNorm output feeding the AdaLN modulation and the GELU output
  feeding the down projection would otherwise each be stored a second time;
* *concatenations of known parts*: a saved ``torch.cat`` output whose parts are derived outputs or
  outputs of attention modules (registered with :meth:`ActivationCompressor.register_part`) is
  stored as its parts -- derived parts as their recipes, the others in FP8 per group, once -- and
  concatenated again in backward. FLUX's single blocks concatenate the attention output with the
  GELU output (4 x wider) and feed that to ``proj_out``; storing the concatenation's own FP8 copy
  stored the GELU output a second time (COAT's Llama kernels likewise save nothing extra for the
  output projection: its input is the attention output, already kept). The parts are found from
  the autograd graph: the ``CatBackward0`` node's inputs are the parts' own nodes.
Parameters (and views of them, such as the transposed weight ``nn.Linear`` saves), constants
without autograd history, per-row statistics whose last dimension is below ``group_size`` (norm
mean and rstd) and tensors smaller than ``min_saved_numel`` pass through untouched: they cost
little or are alive anyway, and an error in rstd would scale every gradient of its row.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakTensorKeyDictionary

from coatflux.core.config import ActivationConfig
from coatflux.core.formats import E4M3, QuantizedTensor, dequantize, quantize

_ATTENTION_FUNCTIONS = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}


class _AttentionScope(TorchFunctionMode):
    """Marks the span of each scaled-dot-product-attention call so its saved tensors pass through.

    It flips a counter on the compressor rather than pushing pass-through hooks: hooks pushed
    here would be innermost and take the saved tensors away from a surrounding non-reentrant
    checkpoint, whose recomputation would then no longer match its forward.
    """

    def __init__(self, compressor: ActivationCompressor) -> None:
        super().__init__()
        self._compressor = compressor

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func not in _ATTENTION_FUNCTIONS:
            return func(*args, **kwargs)
        self._compressor.attention_depth += 1
        try:
            return func(*args, **kwargs)
        finally:
            self._compressor.attention_depth -= 1


def is_attention_module(module: torch.nn.Module) -> bool:
    """Modules inside which scaled-dot-product attention is looked for: classes named ``*Attention``.

    That covers diffusers' ``Attention`` and ``FluxAttention`` and ``nn.MultiheadAttention``.
    """
    return type(module).__name__.endswith("Attention")


def is_weight_or_constant(t: torch.Tensor) -> bool:
    """A saved tensor that stays as it is: a weight (or its transpose, as ``nn.Linear`` saves it),
    stored anyway, or a constant without autograd history (RoPE tables, masks), usually alive
    elsewhere and cheap to keep exact."""
    if isinstance(t, torch.nn.Parameter) or isinstance(t._base, torch.nn.Parameter):
        return True
    return t.grad_fn is None and not t.requires_grad


class _Packed:
    """A saved tensor in FP8 form; shared by every op that saved the same source tensor."""

    __slots__ = ("q",)

    def __init__(self, q: QuantizedTensor) -> None:
        self.q = q

    def nbytes(self) -> int:
        return self.q.nbytes()

    def materialize(self) -> torch.Tensor:
        return dequantize(self.q)


class _Derived:
    """A saved tensor that backward recomputes from FP8 tensors its producer already saved."""

    __slots__ = ("recompute",)

    def __init__(self, recompute: Callable[[], torch.Tensor]) -> None:
        self.recompute = recompute

    def nbytes(self) -> int:
        return 0

    def materialize(self) -> torch.Tensor:
        return self.recompute()


class _Concat:
    """A saved concatenation stored as its parts, re-joined in backward.

    A part is a ``_Packed`` or ``_Derived``, or the tensor itself when it is too small to compress.
    """

    __slots__ = ("dim", "parts")

    def __init__(self, parts: tuple[Any, ...], dim: int) -> None:
        self.parts = parts
        self.dim = dim

    def nbytes(self) -> int:
        return 0  # its parts are counted on their own (a packed part may be shared with other saves)

    def materialize(self) -> torch.Tensor:
        return torch.cat([ActivationCompressor.unpack(part) for part in self.parts], self.dim)


def _signed(dim: int) -> int:
    """``CatBackward0._saved_dim`` as a Python int (a negative dim reads back as its unsigned 64-bit form)."""
    return dim - (1 << 64) if dim >= 1 << 63 else dim


class ActivationCompressor:
    """Pack/unpack hooks that store saved activations as FP8 with per-group (or per-tensor) scales.

    Use it as a context manager around a forward pass, or let
    :func:`coatflux.core.api.apply_coat` install it on a module.
    """

    def __init__(self, config: ActivationConfig, linear_inputs: Any = None) -> None:
        self.config = config
        self.meter: SavedBytesMeter | None = None
        self.attention_depth = 0
        self.linear_inputs = linear_inputs  # the model's InputCache: tensor -> its FP8 GEMM copy
        # Called as observer(original, quantized) after each quantization when set (see core.stats);
        # None costs nothing.
        self.range_observer: Callable[[torch.Tensor, QuantizedTensor], None] | None = None
        self._packed: WeakTensorKeyDictionary = WeakTensorKeyDictionary()
        self._derived: WeakTensorKeyDictionary = WeakTensorKeyDictionary()
        # id(autograd node) -> (that node, the registered part it produced, weakly); cleared after
        # each forward. The node is held: under torch 2.11 and 2.12 the Python object of a built-in
        # node (a ViewBackward0) was made anew on each `grad_fn` read once none was alive, so
        # neither its id nor `is` would find it again at the concatenation.
        self._parts: dict[int, tuple[Any, weakref.ref]] = {}

    def quantize_saved(self, t: torch.Tensor) -> QuantizedTensor:
        """The FP8 form this compressor stores activations in (per group or per tensor)."""
        if self.config.nonlinear_granularity == "per_group":
            q = quantize(t.detach(), E4M3, "group", self.config.group_size, pow2_scales=True)
        else:
            q = quantize(t.detach(), E4M3, "tensor")
        if self.range_observer is not None:
            self.range_observer(t, q)
        return q

    def register_derived(self, output: torch.Tensor, recompute: Callable[[], torch.Tensor],
                         node: Any = None) -> None:
        """Declare that ``output`` can be recomputed from tensors already saved (see module doc).

        ``node`` is the ``ctx`` of the autograd function that produced ``output`` (its ``grad_fn``
        to be): marked with the recipe, it lets a concatenation that reads ``output`` find it.
        """
        derived = _Derived(recompute)
        self._derived[output] = (output._version, derived)
        if node is not None:
            node.coat_derived = derived

    def register_part(self, t: Any) -> None:
        """Declare ``t`` (a module's output) a part that a saved concatenation may be stored as."""
        node = t.grad_fn if isinstance(t, torch.Tensor) else None
        if node is not None:
            self._parts[id(node)] = (node, weakref.ref(t))

    def should_compress(self, t: torch.Tensor) -> bool:
        """Activations only: not weights, not constants, not per-row statistics."""
        if not t.is_floating_point() or t.element_size() == 1 or t.layout != torch.strided:
            return False
        if is_weight_or_constant(t):
            return False
        if t.dim() == 0 or t.shape[-1] < self.config.group_size:
            return False  # norm statistics (mean, rstd): tiny, and every gradient is multiplied by them
        return t.numel() >= max(self.config.min_saved_numel, 1)

    def pack(self, t: torch.Tensor) -> Any:
        packed = self._pack(t)
        if self.meter is not None:
            self.meter.add(packed)
        return packed

    def _pack(self, t: torch.Tensor) -> Any:
        if self.attention_depth > 0 or not self.should_compress(t):
            return t
        for table in (self._derived, self._packed):
            hit = table.get(t)
            if hit is not None and hit[0] == t._version:
                return hit[1]
        concat = self._concatenation(t)
        if concat is not None:
            self._packed[t] = (t._version, concat)
            return concat
        linear_copy = self.linear_inputs.lookup(t) if self.linear_inputs is not None else None
        packed = _Packed(linear_copy if linear_copy is not None else self.quantize_saved(t))
        self._packed[t] = (t._version, packed)
        return packed

    def _concatenation(self, t: torch.Tensor) -> _Concat | None:
        """``t`` stored as its parts if it is a ``torch.cat`` of derived or registered tensors, else None.

        A part is recognised by its autograd node: a fused op's node carries its recipe, a registered
        part is looked up by node. An in-place change of a part before the concatenation gives the
        part a new node, so it is then not recognised and ``t`` is stored as usual.
        """
        node = t.grad_fn
        if node is None or type(node).__name__ != "CatBackward0":
            return None
        parts = []
        for part_node, output_nr in node.next_functions:
            derived = getattr(part_node, "coat_derived", None)
            if derived is not None and output_nr == 0:
                parts.append(derived)
                continue
            registered, ref = self._parts.get(id(part_node), (None, None))
            part = ref() if registered is part_node else None
            if part is None or part.grad_fn is not part_node or part.output_nr != output_nr:
                return None
            parts.append(self._pack(part))
        return _Concat(tuple(parts), _signed(node._saved_dim))

    @staticmethod
    def unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, _Packed | _Derived | _Concat):
            return packed.materialize()
        return packed

    @contextlib.contextmanager
    def __call__(self, find_attention: bool = True) -> Iterator[None]:
        """Context in which saved activations are compressed (attention kept as configured).

        ``find_attention=False`` leaves finding attention to :meth:`attention_scope` contexts that
        the caller opens around the modules that run it (what ``apply_coat`` does).
        """
        with contextlib.ExitStack() as stack:
            stack.callback(self._parts.clear)  # parts are joined within one forward
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack))
            if find_attention:
                stack.enter_context(self.attention_scope())
            yield

    def attention_scope(self) -> contextlib.AbstractContextManager:
        """Within it, tensors saved by scaled-dot-product attention are kept as they are (if configured)."""
        return _AttentionScope(self) if self.config.keep_attention_bf16 else contextlib.nullcontext()


class SavedBytesMeter:
    """Counts the bytes an autograd graph keeps for backward, each storage once.

    Plain tensors are counted by their whole storage (a saved view keeps all of it alive);
    FP8-packed tensors by their codes plus scales. Parameters and module buffers are excluded:
    they are weights, not activations.
    """

    def __init__(self, exclude: set[int] | None = None) -> None:
        self.exclude = exclude or set()
        self.total = 0
        self._seen: set[int] = set()

    def add(self, obj: Any) -> None:
        if isinstance(obj, _Concat):
            for part in obj.parts:
                self.add(part)
            return
        if isinstance(obj, _Packed | _Derived):
            key, size = id(obj), obj.nbytes()
        elif torch.is_tensor(obj):
            if isinstance(obj, torch.nn.Parameter):
                return
            storage = obj.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if key in self.exclude:
                return
        else:
            return
        if key not in self._seen:
            self._seen.add(key)
            self.total += size

    def pack(self, t: Any) -> Any:
        """A pack hook for models without COAT: count, then keep the tensor as it is."""
        self.add(t)
        return t
