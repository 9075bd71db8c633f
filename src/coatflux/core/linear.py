"""FP8 linear layer: FP8 weights, FP8 GEMMs, and only an FP8 copy of the input saved for backward.

What: :class:`FP8Linear` replaces ``nn.Linear``. Forward quantizes the input to E4M3 with one
scale per tensor and multiplies it with an E4M3 weight; backward quantizes the incoming gradient
to E5M2 and runs the input-gradient GEMM in FP8 as well; the weight gradient (also FP8) is
computed only when the weight is trainable. The only activation kept for backward is the FP8
input -- half of bf16 -- and it is shared with an optional LoRA adapter (``lora_A``/``lora_B``
passed to ``forward``), whose gradient is computed from the same FP8 copy.

Choices:

* A frozen weight is quantized once at conversion and kept as an FP8 buffer plus one fp32 scale
  (half the memory of bf16, no per-step re-quantization). A trainable weight stays in high
  precision and is quantized on every forward and again in backward (COAT's
  "weight_memory_efficient": no FP8 weight copy lives between the passes).
* Sibling layers that read the same input tensor (to_q, to_k and to_v; proj_mlp) share one FP8
  copy through a weak-keyed cache owned by the model's COAT context, so it is stored once.
* ``linear_granularity: per_group`` stores the input with 1 x G scales; the FP8 GEMM needs one
  scale along K, so that layer multiplies the dequantized input in the compute dtype.
* Shapes ``torch._scaled_mm`` cannot take (K or N not a multiple of 16) and devices without FP8
  tensor cores use the emulated GEMM of :mod:`coatflux.core.gemm`; a layer says so once in the
  log. The LoRA branch multiplies in the input's dtype (bf16), its fp32 weights cast per call:
  its GEMMs have rank-sized dimensions, where FP8 would save nothing and fp32 would leave the
  tensor cores idle. The LoRA scale is applied to the rank-sized tensors, never to an M x N one.
* The FP8 GEMMs accumulate as ``fp8_fast_accumulation`` says (fast by default, as COAT's Triton
  GEMMs on Hopper; see :class:`~coatflux.core.config.ActivationConfig`).
* Inside a block compiled by :func:`coatflux.core.compiled.compile_blocks` the layer runs a
  second, traceable forward (:class:`_TracedFP8Function`: tensors and constants only, no caches,
  observers or timing), so that the whole block is one graph; which tensors are kept for backward
  is then the compiler's decision, and the compiled block's saved-tensor hooks compress them; the
  adapter's terms are added in place there too (:func:`lora_addmm_`: the up-projection into the
  GEMM's output, ``grad_h @ A`` into the input gradient). There
  a GEMM whose shape ``torch._scaled_mm`` takes runs in FP8 (``fp8_gemm_in_graph``, set by
  ``apply_coat`` from the device) unless the layer's ``row_plan`` says FP8 does not pay at this row
  count: then it multiplies the unquantized input with the FP8 weight upcast to the compute dtype
  (:class:`_TracedUpcastFunction`, which keeps only the FP8 weight for backward). The plan is
  measured before compilation (:meth:`GemmPlanner.row_plan`), since no GEMM can be timed while a
  graph is traced; its boundaries become guards of the graph.
* ``range_observer`` (``None`` by default, so nothing runs) is called with every tensor the layer
  quantizes -- ``("input", x, xq)``, ``("weight", w, wq)`` for a trainable weight and
  ``("grad_output", g, gq)`` -- so :class:`coatflux.core.stats.FP8RangeMonitor` can count
  overflow and underflow without patching anything.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakTensorKeyDictionary

from coatflux.core.config import ActivationConfig
from coatflux.core.formats import E4M3, E5M2, QuantizedTensor, dequantize, quantize
from coatflux.core.gemm import GemmPlanner, RowPlan, fp8_for_rows, fp8_gemm_support, fp8_mm, shape_supported
from coatflux.kernels.quant import tensor_scale_ops

logger = logging.getLogger(__name__)

RangeObserver = Callable[[str, torch.Tensor, QuantizedTensor], None]


class InputCache:
    """Per-model cache of quantized linear inputs, keyed weakly by the input tensor object."""

    def __init__(self) -> None:
        self._entries: WeakTensorKeyDictionary = WeakTensorKeyDictionary()

    def lookup(self, x: torch.Tensor) -> QuantizedTensor | None:
        """The FP8 copy made for ``x`` if it is current, else ``None``."""
        hit = self._entries.get(x)
        return hit[1] if hit is not None and hit[0][0] == x._version else None

    def get(self, x: torch.Tensor, granularity: str, group: int) -> QuantizedTensor:
        key = (x._version, granularity, group)
        hit = self._entries.get(x)
        if hit is not None and hit[0] == key:
            return hit[1]
        q = quantize_linear_input(x, granularity, group)
        self._entries[x] = (key, q)
        return q


def quantize_linear_input(x: torch.Tensor, granularity: str, group: int) -> QuantizedTensor:
    """E4M3 copy of a linear input: one fp32 scale per tensor, or 1 x G power-of-two scales."""
    if granularity == "per_tensor":
        return quantize(x.detach(), E4M3, "tensor")
    return quantize(x.detach(), E4M3, "group", group, pow2_scales=True)


class _FP8LinearFunction(torch.autograd.Function):
    """Forward, input-gradient and weight-gradient GEMMs in FP8; LoRA on the saved FP8 input."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                lora_A: torch.Tensor | None, lora_B: torch.Tensor | None,
                layer: FP8Linear, lora_scale: float) -> torch.Tensor:
        xq = layer.quantized_input(x)
        layer.observe_range("input", x, xq)
        w_codes, w_scale = layer.fp8_weight(weight)
        x2 = x.reshape(-1, layer.in_features)
        m = x2.shape[0]
        if xq.granularity == "tensor":
            use = layer.gemm_uses_fp8(x.device, m, layer.out_features, layer.in_features)
            y = fp8_mm(xq.data.reshape(m, -1), xq.scale, w_codes, w_scale, x.dtype, use, bias, layer.fast_accum)
        else:
            y = F.linear(dequantize(xq).reshape(m, -1), _upcast(w_codes, w_scale, x.dtype), _cast(bias, x.dtype))
        h = a = b = None
        if lora_A is not None:
            # cast once: backward multiplies with these same copies and casts its gradients back
            ctx.lora_dtypes = (lora_A.dtype, lora_B.dtype)
            a, b = lora_A.to(x.dtype), lora_B.to(x.dtype)
            h = x2 @ a.t()
            # in place: an out-of-place addmm first copies y into its result (a memcpy per linear)
            y = y.addmm_(h, b.t(), alpha=lora_scale)
        ctx.layer, ctx.lora_scale, ctx.x_shape = layer, lora_scale, x.shape
        if layer.input_saved_by_hooks:
            # The model's activation compressor stores x: as this FP8 copy, or, when x is the
            # output of a fused non-linear op, as a recipe that recomputes it (no bytes at all).
            ctx.x_meta = None
            ctx.save_for_backward(x, None, weight, a, b, h)
        else:
            ctx.x_meta = (xq.granularity, xq.group, xq.shape, x.dtype, xq.pow2)
            ctx.save_for_backward(xq.data, xq.scale, weight, a, b, h)
        return y.reshape(*x.shape[:-1], layer.out_features)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x_saved, x_scale, weight, lora_a, lora_b, h = ctx.saved_tensors  # LoRA weights in the compute dtype
        layer: FP8Linear = ctx.layer
        n, k = layer.out_features, layer.in_features
        g2 = grad_out.reshape(-1, n)
        m = g2.shape[0]
        need_x, need_w, need_b, need_a, need_lb = ctx.needs_input_grad[:5]
        grad_x = grad_w = grad_b = grad_a = grad_lb = None
        gq = quantize(g2, E5M2, "tensor") if (need_x or need_w) else None
        if gq is not None:
            layer.observe_range("grad_output", g2, gq)
        if need_x:
            w_codes, w_scale = layer.fp8_weight(weight)
            use = layer.gemm_uses_fp8(g2.device, m, k, n)
            grad_x = fp8_mm(gq.data, gq.scale, w_codes.t().contiguous(), w_scale, grad_out.dtype, use,
                            fast_accum=layer.fast_accum)
        if need_w:
            grad_w = _weight_grad(gq, g2, _saved_input_fp8(ctx, x_saved, x_scale), weight, layer)
        if need_b:
            grad_b = g2.sum(0).to(grad_out.dtype)
        if lora_a is not None:
            a_dtype, b_dtype = ctx.lora_dtypes
            g_h, grad_lb = _adapter_grads(g2, h, lora_b, ctx.lora_scale, True, need_lb)
            if need_x:
                grad_x = grad_x.addmm_(g_h, lora_a)
            if need_a:
                x_values = _saved_input_values(ctx, x_saved, x_scale, lora_a.dtype).reshape(m, k)
                grad_a = (g_h.t() @ x_values).to(a_dtype)
            if need_lb:
                grad_lb = grad_lb.to(b_dtype)
        if grad_x is not None:
            grad_x = grad_x.reshape(ctx.x_shape)
        return grad_x, grad_w, grad_b, grad_a, grad_lb, None, None


class _TracedFP8Function(torch.autograd.Function):
    """The FP8 linear of a compiled block, with its LoRA adapter: tensors and constants only.

    Forward quantizes the input (and a trainable weight) per tensor and multiplies in FP8, the bias
    added in the GEMM's epilogue; backward quantizes the gradient to E5M2 for the input-gradient
    GEMM and, for a trainable weight, the weight-gradient GEMM. The adapter (``lora_a`` and
    ``lora_b`` in the compute dtype, or None) is computed here too rather than by autograd ops
    around the function, so that both of its terms are added in place (:func:`lora_addmm_`): the
    up-projection into the FP8 GEMM's output, and ``grad_h @ A`` into the input gradient. Left to
    autograd, that second sum became an out-of-place ``addmm`` wherever it fed a GEMM, a reduction
    or attention, and with it a copy of the input gradient: 4 per double block, 1.1 ms of a
    FLUX.1-dev step at 1024 px in the H200 profile of 2026-11-27 06:10.
    """

    @staticmethod
    def forward(ctx: Any, x2: torch.Tensor, weight: torch.Tensor | None, w_codes: torch.Tensor | None,
                w_scale: torch.Tensor | None, bias: torch.Tensor | None, lora_a: torch.Tensor | None,
                lora_b: torch.Tensor | None, alpha: float, fp8: bool, fast: bool) -> torch.Tensor:
        xq, x_scale = tensor_scale_ops(x2, E4M3)
        ctx.fp8, ctx.fast, ctx.weight_dtype = fp8, fast, None if weight is None else weight.dtype
        ctx.lora, ctx.alpha = lora_a is not None, alpha
        if weight is not None:  # trainable: quantized here, and the FP8 input kept for the weight gradient
            w_codes, w_scale = tensor_scale_ops(weight.detach(), E4M3)
        ctx.bias_dtype = None if bias is None else bias.dtype
        m, n, k = x2.shape[0], w_codes.shape[0], x2.shape[1]
        y = fp8_mm(xq, x_scale, w_codes, w_scale, x2.dtype, fp8 and shape_supported(m, n, k), bias, fast)
        saved = [w_codes, w_scale]
        if weight is not None:
            saved += [xq, x_scale]
        if ctx.lora:
            h = x2 @ lora_a.t()
            lora_addmm_(y, h, lora_b, alpha)
            saved += [x2, h, lora_a, lora_b]
        ctx.save_for_backward(*saved)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        saved = list(ctx.saved_tensors)
        w_codes, w_scale = saved[:2]
        x2, h, lora_a, lora_b = saved[-4:] if ctx.lora else (None,) * 4
        gq, g_scale = tensor_scale_ops(grad, E5M2)
        (m, n), k = grad.shape, w_codes.shape[1]
        grad_x = grad_w = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = fp8_mm(gq, g_scale, w_codes.t().contiguous(), w_scale, grad.dtype,
                            ctx.fp8 and shape_supported(m, k, n), fast_accum=ctx.fast)
        if ctx.weight_dtype is not None and ctx.needs_input_grad[1]:
            xq, x_scale = saved[2:4]
            grad_w = fp8_mm(gq.t().contiguous(), g_scale, xq.t().contiguous(), x_scale, ctx.weight_dtype,
                            ctx.fp8 and shape_supported(n, k, m), fast_accum=ctx.fast)
        if ctx.lora:
            grad_h, grad_b = _adapter_grads(grad, h, lora_b, ctx.alpha, True, ctx.needs_input_grad[6])
            if grad_x is not None:
                lora_addmm_(grad_x, grad_h, lora_a.t(), 1.0)  # grad_x += grad_h @ A, in place
            grad_a = grad_h.t() @ x2 if ctx.needs_input_grad[5] else None
        return grad_x, grad_w, None, None, _bias_grad(ctx, grad, 4), grad_a, grad_b, None, None, None


@torch.library.custom_op("coatflux::lora_addmm_", mutates_args={"y"})
def lora_addmm_(y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, alpha: float) -> None:
    """``y += alpha * h @ b.T`` in place: the LoRA up-projection added into the base GEMM's output.

    Why an operator of its own: a compiled block given ``torch.addmm(y, h, b.T)`` keeps the bf16
    ``addmm`` whole (inductor's ``keep_addmm_fused_for_half_dtypes``) and ATen's out-of-place
    ``addmm`` first copies ``y`` into its result, a ``memcpy`` of the whole M x N output per adapter
    (418 of the 494 copies, 7.1 ms in all, of a FLUX.1-dev step at 1024 px in the H200 profile of
    2026-11-27 06:10).
    Declared as mutating ``y``, the compiler functionalizes it and then runs it in place again,
    since nothing else reads the base output: cuBLAS accumulates into ``y`` (beta = 1), no copy.
    The backward of :class:`_TracedFP8Function` adds ``grad_h @ A`` into the FP8 input gradient
    the same way.
    ``y.addmm_`` is also the plain-PyTorch definition, so there is no second implementation to test.
    """
    y.addmm_(h, b.t(), alpha=alpha)


class _TracedLoRAAdd(torch.autograd.Function):
    """``y + alpha * h @ b.T`` for a compiled block, written into ``y`` (see :func:`lora_addmm_`).

    The adapter of a linear whose row plan has it multiply without FP8 at this row count;
    :class:`_TracedFP8Function` adds its own. ``y`` is the base GEMM's fresh output,
    read by nothing else; ``h`` is the adapter's down-projection and ``b`` its up-projection in the
    compute dtype.
    """

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor, h: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
        lora_addmm_(y, h, b, alpha)
        ctx.mark_dirty(y)
        ctx.save_for_backward(h, b)
        ctx.alpha = alpha
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h, b = ctx.saved_tensors
        grad_h, grad_b = _adapter_grads(grad, h, b, ctx.alpha, ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        return grad, grad_h, grad_b, None


def _adapter_grads(grad: torch.Tensor, h: torch.Tensor, b: torch.Tensor, alpha: float, need_h: bool,
                   need_b: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A LoRA up-projection's gradients from its output's ``grad`` (M x N): ``alpha * grad @ B``
    for its input ``h`` (M x r) and ``alpha * grad.T @ h`` for ``B`` (N x r), each if needed; the
    scale multiplies the rank-sized products only."""
    grad_h = _times(grad @ b, alpha) if need_h else None
    grad_b = _times(grad.t() @ h, alpha) if need_b else None
    return grad_h, grad_b


def _times(t: torch.Tensor, alpha: float) -> torch.Tensor:
    """``t * alpha`` in place, skipped for 1 (the usual LoRA scale): in a compiled block the product
    of a GEMM's output would be a kernel launch of its own."""
    return t if alpha == 1 else t.mul_(alpha)


class _TracedUpcastFunction(torch.autograd.Function):
    """``x2 @ (w_codes * w_scale).T + bias`` in the input's dtype, keeping only the FP8 weight for backward.

    A compiled block's linear where its row plan says FP8 does not pay. The upcast weight is made
    again for the input gradient rather than kept (it would bring back the bf16 weights): the
    compiler merges the two upcasts into one node, and COAT's partitioner settings
    (:data:`~coatflux.core.compiled.COAT_PARTITIONER`) let it recompute that node in backward,
    where PyTorch's default would store it as the input of a GEMM.
    """

    @staticmethod
    def forward(ctx: Any, x2: torch.Tensor, w_codes: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(w_codes, w_scale)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.linear(x2, _upcast(w_codes, w_scale, x2.dtype), _cast(bias, x2.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        w_codes, w_scale = ctx.saved_tensors
        grad_x = grad @ _upcast(w_codes, w_scale, grad.dtype) if ctx.needs_input_grad[0] else None
        return grad_x, None, None, _bias_grad(ctx, grad, 3)


def _upcast(w_codes: torch.Tensor, w_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return w_codes.to(dtype) * w_scale.to(dtype)


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def _bias_grad(ctx: Any, grad: torch.Tensor, index: int) -> torch.Tensor | None:
    """The bias gradient of a traced function whose bias is argument ``index``, if it needs one."""
    if ctx.bias_dtype is None or not ctx.needs_input_grad[index]:
        return None
    return grad.sum(0).to(ctx.bias_dtype)


def _saved_input_fp8(ctx: Any, x_saved: torch.Tensor, x_scale: torch.Tensor | None) -> QuantizedTensor:
    """The FP8 input for the weight-gradient GEMM (re-quantized if the compressor returned values)."""
    if ctx.x_meta is None:
        return quantize_linear_input(x_saved, ctx.layer.config.linear_granularity, ctx.layer.config.group_size)
    granularity, group, x_shape, x_dtype, pow2 = ctx.x_meta
    return QuantizedTensor(x_saved, x_scale, E4M3, granularity, group, x_shape, x_dtype, pow2)


def _saved_input_values(ctx: Any, x_saved: torch.Tensor, x_scale: torch.Tensor | None,
                        dtype: torch.dtype) -> torch.Tensor:
    """The input in ``dtype`` for the LoRA gradient (no re-quantization needed for it)."""
    if ctx.x_meta is None:
        return x_saved.to(dtype)
    return dequantize(_saved_input_fp8(ctx, x_saved, x_scale), dtype)


def _weight_grad(gq: QuantizedTensor, g2: torch.Tensor, xq: QuantizedTensor, weight: torch.Tensor,
                 layer: FP8Linear) -> torch.Tensor:
    n, k, m = layer.out_features, layer.in_features, g2.shape[0]
    if xq.granularity != "tensor":  # per-group inputs have no single scale along K: multiply in fp32
        return (g2.t().float() @ dequantize(xq, torch.float32).reshape(m, k)).to(weight.dtype)
    use = layer.gemm_uses_fp8(g2.device, n, k, m)
    return fp8_mm(gq.data.t().contiguous(), gq.scale, xq.data.reshape(m, k).t().contiguous(),
                  xq.scale, weight.dtype, use, fast_accum=layer.fast_accum)


class FP8Linear(nn.Module):
    """Drop-in ``nn.Linear`` with FP8 GEMMs and an FP8-only saved input.

    Build it with :meth:`from_linear`. ``forward(x, lora_A=None, lora_B=None, lora_scale=1.0)``
    returns ``x W^T + b + lora_scale * (x A^T) B^T``.
    """

    # Called as (kind, original tensor, its QuantizedTensor) for each quantization; see module doc.
    range_observer: RangeObserver | None = None

    def __init__(self, in_features: int, out_features: int, config: ActivationConfig,
                 input_cache: InputCache | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.config = config
        self.input_cache = input_cache
        self.input_saved_by_hooks = False  # set by apply_coat when an ActivationCompressor stores inputs
        self.planner: GemmPlanner | None = None  # set by apply_coat: per-shape FP8-or-not decisions
        self.register_parameter("weight", None)
        self.bias: nn.Parameter | None = None
        self.register_buffer("weight_fp8", None)
        self.register_buffer("weight_scale", None)
        self._fallback_logged = False
        self.fp8_gemm_in_graph = False  # set by apply_coat: FP8 GEMMs inside compiled blocks
        self.row_plan: RowPlan | None = None  # set by apply_coat: inside compiled blocks, FP8 by row count

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: ActivationConfig | None = None,
                    input_cache: InputCache | None = None, trainable: bool | None = None) -> FP8Linear:
        """Convert ``linear``; its weight becomes an FP8 buffer unless it is ``trainable``."""
        config = config or ActivationConfig()
        layer = cls(linear.in_features, linear.out_features, config, input_cache)
        trainable = linear.weight.requires_grad if trainable is None else trainable
        if trainable:
            layer.register_parameter("weight", linear.weight)
        else:
            q = quantize(linear.weight.detach(), E4M3, "tensor")
            layer.weight_fp8, layer.weight_scale = q.data, q.scale
        layer.bias = linear.bias
        return layer

    @property
    def weight(self) -> torch.Tensor:
        """The weight in high precision (dequantized for a frozen FP8 weight; allocates)."""
        if self._parameters.get("weight") is not None:
            return self._parameters.get("weight")
        return _upcast(self.weight_fp8, self.weight_scale, self.compute_dtype)

    @property
    def fast_accum(self) -> bool:
        """Whether this layer's FP8 GEMMs keep the tensor cores' accumulator (``fp8_fast_accumulation``)."""
        return self.config.fp8_fast_accumulation

    @property
    def compute_dtype(self) -> torch.dtype:
        if self._parameters.get("weight") is not None:
            return self._parameters.get("weight").dtype
        return self.bias.dtype if self.bias is not None else torch.bfloat16

    def fp8_weight(self, weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if weight is None:
            return self.weight_fp8, self.weight_scale
        q = quantize(weight.detach(), E4M3, "tensor")
        self.observe_range("weight", weight, q)
        return q.data, q.scale

    def observe_range(self, kind: str, x: torch.Tensor, q: QuantizedTensor) -> None:
        """Hand one quantization to :attr:`range_observer`, if one is attached (else a no-op)."""
        if self.range_observer is not None:
            self.range_observer(kind, x, q)

    def quantized_input(self, x: torch.Tensor) -> QuantizedTensor:
        granularity, group = self.config.linear_granularity, self.config.group_size
        if self.input_cache is not None:
            return self.input_cache.get(x, granularity, group)
        return quantize_linear_input(x, granularity, group)

    def gemm_uses_fp8(self, device: torch.device, m: int, n: int, k: int) -> bool:
        """Whether this GEMM runs on FP8 tensor cores; logs the first fallback of this layer."""
        if not self.config.fp8_gemm:
            return False
        support = fp8_gemm_support(device)
        if support.available and shape_supported(m, n, k):
            return self.planner is None or self.planner.use_fp8(device, m, n, k, self.compute_dtype)
        if support.available and not self._fallback_logged:
            logger.info("FP8Linear(%d -> %d): GEMM of shape %dx%dx%d not supported by torch._scaled_mm; "
                        "this layer multiplies in %s", self.in_features, self.out_features, m, n, k,
                        self.compute_dtype)
            self._fallback_logged = True
        return False

    def forward(self, x: torch.Tensor, lora_A: torch.Tensor | None = None,
                lora_B: torch.Tensor | None = None, lora_scale: float = 1.0) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self._traced_forward(x, lora_A, lora_B, float(lora_scale))
        return _FP8LinearFunction.apply(x, self._parameters.get("weight"), self.bias, lora_A, lora_B, self, float(lora_scale))

    def _traced_forward(self, x: torch.Tensor, lora_A: torch.Tensor | None, lora_B: torch.Tensor | None,
                        lora_scale: float) -> torch.Tensor:
        """The forward traced into a compiled block (see the module docstring)."""
        if self.config.linear_granularity != "per_tensor":
            raise NotImplementedError("FP8Linear in a compiled block quantizes its input per tensor; "
                                      "activation.linear_granularity per_group runs eagerly only")
        x2 = x.reshape(-1, self.in_features)
        weight = self._parameters.get("weight")
        a, b = (None, None) if lora_A is None else (lora_A.to(x.dtype), lora_B.to(x.dtype))
        if not self._plain_in_graph(x2.shape[0]):
            y = _TracedFP8Function.apply(x2, weight, self.weight_fp8, self.weight_scale, self.bias, a, b,
                                         lora_scale, self.fp8_gemm_in_graph, self.fast_accum)
            return y.reshape(*x.shape[:-1], self.out_features)
        y = (_TracedUpcastFunction.apply(x2, self.weight_fp8, self.weight_scale, self.bias) if weight is None
             else F.linear(x2, weight.to(x.dtype), _cast(self.bias, x.dtype)))
        if a is not None:
            y = _TracedLoRAAdd.apply(y, x2 @ a.t(), b, lora_scale)
        return y.reshape(*x.shape[:-1], self.out_features)

    def _plain_in_graph(self, rows: Any) -> bool:
        """Whether a compiled block multiplies ``rows`` rows in the compute dtype (a guard if symbolic)."""
        return self.fp8_gemm_in_graph and self.row_plan is not None and not fp8_for_rows(self.row_plan, rows)

    def extra_repr(self) -> str:
        kind = "trainable" if self._parameters.get("weight") is not None else "frozen fp8"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, weight={kind}, input={self.config.linear_granularity}")
