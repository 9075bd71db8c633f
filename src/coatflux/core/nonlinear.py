"""Non-linear ops that save only an FP8 copy of their input: LayerNorm, RMSNorm and GELU.

What: autograd functions for the three non-linear ops of a DiT block that matter for memory,
and modules that :func:`~coatflux.core.api.apply_coat` swaps in for ``nn.LayerNorm``,
``nn.RMSNorm`` (and diffusers' ``RMSNorm``) and ``nn.GELU`` (and diffusers' ``GELU`` projection).
Each function saves its input once, as FP8 with 1 x G power-of-two scales (plus the per-row mean
and rstd of a norm, exact, in fp32), and registers its *output* with the model's
:class:`~coatflux.core.activation.ActivationCompressor` as recomputable from that FP8 input.

Why not just let the saved-tensor hooks compress whatever PyTorch's own ops save? Because those
ops save more than they need, and in several precisions: diffusers' RMSNorm keeps both the bf16
input and an fp32 copy of it; a LayerNorm output that feeds AdaLN's ``x * (1 + scale)`` is saved
again by the multiply; a GELU output is saved again by the down projection. Compressed one by one
that is three or four FP8 tensors where one suffices. The recompute costs one element-wise pass
in backward (COAT's fused kernels make the same trade), and its error is the FP8 rounding of the
input, the same as storing the output in FP8.

The backward formulas are written out (not re-derived by autograd) so that nothing but the FP8
input and the statistics is kept:

* LayerNorm: ``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))``;
* RMSNorm: ``dx = rstd * (gw - xhat * mean(gw * xhat))`` with ``gw = g * weight``;
* GELU: PyTorch's own ``gelu_backward`` on the dequantized input (tanh or erf form).

Outside a COAT forward (no compressor, grad disabled, or an input that does not need grad) the
modules call the plain PyTorch op, so inference and sampling pay nothing.

AdaLN: diffusers' ``AdaLayerNormZero``, ``AdaLayerNormZeroSingle`` and ``AdaLayerNormContinuous``
(FLUX's ``norm1``, ``norm1_context``, the single blocks' ``norm`` and ``norm_out``) compute
``norm(x) * (1 + scale[:, None]) + shift[:, None]``. They are replaced by modules with the same
children under the same names (``linear``, ``silu``, ``norm``, ``emb``: state-dict keys and LoRA
targets do not change) whose modulation is one op: the FP8 input and the row statistics are saved,
plus the small ``(B, D)`` scale; the normalized and the modulated tensors are never stored.
(FLUX's ``norm2`` modulation is written inline in the block's forward; that one stays a
COATLayerNorm followed by eager multiply-add, whose saved norm output costs nothing.)

Two implementations, one dispatch rule (:func:`uses_fused_kernels`): the plain-PyTorch autograd
functions here are the reference; :mod:`coatflux.kernels.nonlinear` does each forward and backward
(including the FP8 quantization) in one compiled pass. The compiled path is used exactly where the
fused quantizer is (:func:`coatflux.core.formats.uses_fast_path`: a CUDA tensor, no
``COATFLUX_REFERENCE_KERNELS=1``, inductor usable) and the compressor saves per-group FP8; anywhere
else the reference runs, by that rule and not by catching a failure.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from coatflux.core import formats
from coatflux.core.activation import ActivationCompressor
from coatflux.core.formats import QuantizedTensor, dequantize


def _stats(x: torch.Tensor, eps: float, center: bool) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float()
    mean = xf.mean(-1, keepdim=True) if center else torch.zeros_like(xf[..., :1])
    var = (xf - mean).pow(2).mean(-1, keepdim=True)
    return mean, torch.rsqrt(var + eps)


def _normalized(xq: QuantizedTensor, mean: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    return (dequantize(xq, torch.float32) - mean) * rstd


def _quantized(ctx: Any, saved: tuple[torch.Tensor, ...]) -> QuantizedTensor:
    fmt, granularity, group, shape, dtype, pow2 = ctx.q_meta
    return QuantizedTensor(saved[0], saved[1], fmt, granularity, group, shape, dtype, pow2)


def _q_meta(q: QuantizedTensor) -> tuple[Any, ...]:
    return (q.fmt, q.granularity, q.group, q.shape, q.dtype, q.pow2)


class _NormFunction(torch.autograd.Function):
    """Non-affine LayerNorm (``center=True``) or RMSNorm (``center=False``) with an FP8-saved input."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, eps: float, center: bool,
                compressor: ActivationCompressor) -> torch.Tensor:
        mean, rstd = _stats(x, eps, center)
        y = ((x.float() - mean) * rstd).to(x.dtype)
        xq = compressor.quantize_saved(x)
        ctx.q_meta, ctx.center = _q_meta(xq), center
        ctx.save_for_backward(xq.data, xq.scale, mean, rstd)
        dtype = y.dtype  # the recipe must not hold y: ctx (y's grad_fn) keeps it, a cycle autograd cannot free
        compressor.register_derived(y, lambda: _normalized(xq, mean, rstd).to(dtype), ctx)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        codes, scale, mean, rstd = ctx.saved_tensors
        xhat = _normalized(_quantized(ctx, (codes, scale)), mean, rstd)
        g = grad.float()
        centered = g - g.mean(-1, keepdim=True) if ctx.center else g
        dx = rstd * (centered - xhat * (g * xhat).mean(-1, keepdim=True))
        return dx.to(grad.dtype), None, None, None


class _GELUFunction(torch.autograd.Function):
    """GELU (tanh or erf form) with an FP8-saved input and a recomputable output."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, approximate: str, compressor: ActivationCompressor) -> torch.Tensor:
        y = F.gelu(x, approximate=approximate)
        xq = compressor.quantize_saved(x)
        ctx.q_meta, ctx.approximate = _q_meta(xq), approximate
        ctx.save_for_backward(xq.data, xq.scale)
        compressor.register_derived(y, lambda: F.gelu(dequantize(xq), approximate=approximate), ctx)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x = dequantize(_quantized(ctx, ctx.saved_tensors), grad.dtype)
        return torch.ops.aten.gelu_backward(grad, x, approximate=ctx.approximate), None, None


def uses_fused_kernels(x: torch.Tensor, compressor: ActivationCompressor) -> bool:
    """The dispatch rule: the compiled kernels where the fused quantizer runs and saved inputs are per group.

    Per-tensor saving (``nonlinear_granularity="per_tensor"``) has no fused kernel here: it needs
    the whole tensor's maximum before any element can be coded, a second pass either way.
    """
    return compressor.config.nonlinear_granularity == "per_group" and formats.uses_fast_path(x.device)


def _kernels() -> Any:
    # imported on first use: the reference path never needs the compiler
    from coatflux.kernels import nonlinear as kernels

    return kernels


class _FusedNormFunction(torch.autograd.Function):
    """LayerNorm / RMSNorm with optional affine and AdaLN modulation, compiled (see :mod:`coatflux.kernels.nonlinear`).

    Saves the FP8 input, fp32 mean and rstd, weight and bias (parameters, stored anyway) and the
    ``(B, D)`` scale; nothing of the output. The shift is needed only to recompute the output, which
    the derived recipe holds.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                scale: torch.Tensor | None, shift: torch.Tensor | None, eps: float, center: bool,
                out_dtype: torch.dtype, compressor: ActivationCompressor) -> torch.Tensor:
        kernels = _kernels()
        y, xq, mean, rstd = kernels.norm_forward(x, weight, bias, scale, shift, eps=eps, center=center,
                                                 out_dtype=out_dtype, group=compressor.config.group_size)
        ctx.q_meta, ctx.center = _q_meta(xq), center
        ctx.has = (weight is not None, bias is not None, scale is not None, shift is not None)
        ctx.save_for_backward(xq.data, xq.scale, mean, rstd, weight, bias, scale)
        compressor.register_derived(
            y, lambda: kernels.norm_recompute(xq, mean, rstd, weight, bias, scale, shift, out_dtype=out_dtype), ctx)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        codes, exponent, mean, rstd, weight, bias, scale = ctx.saved_tensors
        # column sums only for what wants a gradient (a frozen QK-norm weight costs no reduction)
        needs = tuple(has and need for has, need in zip(ctx.has, ctx.needs_input_grad[1:5], strict=True))
        d_x, d_weight, d_bias, d_scale, d_shift = _kernels().norm_backward(
            grad, _quantized(ctx, (codes, exponent)), mean, rstd, weight, bias, scale, center=ctx.center,
            needs=needs)
        return d_x, d_weight, d_bias, d_scale, d_shift, None, None, None, None


class _FusedGELUFunction(torch.autograd.Function):
    """GELU with the FP8 quantization of its input fused into the forward, compiled."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, approximate: str, compressor: ActivationCompressor) -> torch.Tensor:
        kernels = _kernels()
        y, xq = kernels.gelu_forward(x, approximate, group=compressor.config.group_size)
        ctx.q_meta, ctx.approximate = _q_meta(xq), approximate
        ctx.save_for_backward(xq.data, xq.scale)
        compressor.register_derived(y, lambda: kernels.gelu_recompute(xq, approximate), ctx)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xq = _quantized(ctx, ctx.saved_tensors)
        return _kernels().gelu_backward(grad, xq, ctx.approximate), None, None


def _active(compressor: ActivationCompressor | None, x: torch.Tensor) -> bool:
    return compressor is not None and torch.is_grad_enabled() and x.requires_grad


class _COATNorm(nn.Module):
    """What COATLayerNorm and COATRMSNorm share: the fused path and the AdaLN modulation."""

    center: bool
    eps: float
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    compressor: ActivationCompressor

    def _out_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype the reference path returns (the fused path must return the same)."""
        raise NotImplementedError

    def _fused(self, x: torch.Tensor, scale: torch.Tensor | None = None,
               shift: torch.Tensor | None = None) -> torch.Tensor:
        out_dtype = self._out_dtype(x)
        if scale is not None:
            out_dtype = torch.promote_types(torch.promote_types(out_dtype, scale.dtype), shift.dtype)
        return _FusedNormFunction.apply(x, self.weight, self.bias, scale, shift, self.eps, self.center,
                                        out_dtype, self.compressor)

    def modulated(self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """``self(x) * (1 + scale[:, None]) + shift[:, None]`` (AdaLN), one fused op where the kernels run.

        ``x`` is ``(B, T, D)``, ``scale`` and ``shift`` ``(B, D)``. The reference path is exactly
        that expression; its multiply saves the norm output, a derived tensor that costs nothing.
        """
        if _active(self.compressor, x) and uses_fused_kernels(x, self.compressor):
            return self._fused(x, scale, shift)
        return self(x) * (1 + scale[:, None]) + shift[:, None]


class COATLayerNorm(_COATNorm):
    """``nn.LayerNorm`` over the last dimension whose input is saved once, in FP8."""

    center = True

    def __init__(self, norm: nn.LayerNorm, compressor: ActivationCompressor) -> None:
        super().__init__()
        self.normalized_shape, self.eps = tuple(norm.normalized_shape), norm.eps
        self.weight, self.bias = norm.weight, norm.bias
        self.compressor = compressor

    def _out_dtype(self, x: torch.Tensor) -> torch.dtype:
        return x.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _active(self.compressor, x):
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        if uses_fused_kernels(x, self.compressor):
            return self._fused(x)
        y = _NormFunction.apply(x, self.eps, True, self.compressor)
        if self.weight is not None:
            y = y * self.weight.to(y.dtype)
        return y + self.bias.to(y.dtype) if self.bias is not None else y


class COATRMSNorm(_COATNorm):
    """RMSNorm (``torch.nn.RMSNorm`` or diffusers' ``RMSNorm``) whose input is saved once, in FP8."""

    center = False

    def __init__(self, norm: nn.Module, compressor: ActivationCompressor) -> None:
        super().__init__()
        self.eps = norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps
        self.weight = getattr(norm, "weight", None)
        self.bias = getattr(norm, "bias", None)
        self.compressor = compressor

    def _out_dtype(self, x: torch.Tensor) -> torch.dtype:
        dtype = x.dtype if self.weight is None else self.weight.dtype
        return dtype if self.bias is None else torch.promote_types(dtype, self.bias.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _active(self.compressor, x):
            if uses_fused_kernels(x, self.compressor):
                return self._fused(x)
            y = _NormFunction.apply(x, self.eps, False, self.compressor)
        else:
            y = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        if self.weight is not None:
            y = y.to(self.weight.dtype) * self.weight
        return y + self.bias if self.bias is not None else y


class COATGELU(nn.Module):
    """``nn.GELU`` (either form) with an FP8-saved input; with ``proj``, diffusers' ``GELU`` block."""

    def __init__(self, approximate: str, compressor: ActivationCompressor, proj: nn.Module | None = None) -> None:
        super().__init__()
        self.approximate = approximate
        self.compressor = compressor
        if proj is not None:
            self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "proj"):
            x = self.proj(x)
        if not _active(self.compressor, x):
            return F.gelu(x, approximate=self.approximate)
        if uses_fused_kernels(x, self.compressor):
            return _FusedGELUFunction.apply(x, self.approximate, self.compressor)
        return _GELUFunction.apply(x, self.approximate, self.compressor)


class _COATAdaLayerNorm(nn.Module):
    """A diffusers AdaLN module with the same children (same names) and a fused norm + modulation."""

    def __init__(self, module: nn.Module, norm: _COATNorm) -> None:
        super().__init__()
        for name, child in module.named_children():
            setattr(self, name, child)  # linear, silu (and emb): LoRA targets and state-dict keys unchanged
        self.emb = getattr(module, "emb", None)
        self.norm = norm
        self.train(module.training)


class COATAdaLayerNormZero(_COATAdaLayerNorm):
    """diffusers' ``AdaLayerNormZero`` (FLUX ``norm1`` / ``norm1_context``): same inputs, same outputs."""

    def forward(self, x: torch.Tensor, timestep: torch.Tensor | None = None, class_labels: torch.Tensor | None = None,
                hidden_dtype: torch.dtype | None = None, emb: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        if self.emb is not None:
            emb = self.emb(timestep, class_labels, hidden_dtype=hidden_dtype)
        emb = self.linear(self.silu(emb))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = emb.chunk(6, dim=1)
        return self.norm.modulated(x, scale_msa, shift_msa), gate_msa, shift_mlp, scale_mlp, gate_mlp


class COATAdaLayerNormZeroSingle(_COATAdaLayerNorm):
    """diffusers' ``AdaLayerNormZeroSingle`` (FLUX single blocks' ``norm``)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        shift_msa, scale_msa, gate_msa = self.linear(self.silu(emb)).chunk(3, dim=1)
        return self.norm.modulated(x, scale_msa, shift_msa), gate_msa


class COATAdaLayerNormContinuous(_COATAdaLayerNorm):
    """diffusers' ``AdaLayerNormContinuous`` (FLUX ``norm_out``); note its chunk order: scale, then shift."""

    def forward(self, x: torch.Tensor, conditioning_embedding: torch.Tensor) -> torch.Tensor:
        # the cast mirrors diffusers: the conditioning may be fp32 while x is bf16
        scale, shift = torch.chunk(self.linear(self.silu(conditioning_embedding).to(x.dtype)), 2, dim=1)
        return self.norm.modulated(x, scale, shift)


_ADALN = {"AdaLayerNormZero": COATAdaLayerNormZero, "AdaLayerNormZeroSingle": COATAdaLayerNormZeroSingle,
          "AdaLayerNormContinuous": COATAdaLayerNormContinuous}


def fused_replacement(module: nn.Module, compressor: ActivationCompressor) -> nn.Module | None:
    """The FP8-saving replacement for ``module``, or ``None`` if it is not one we fuse.

    Matched by type for torch's own modules and by class name plus attributes for diffusers'
    (``RMSNorm`` with ``eps``; ``GELU`` with ``proj`` and ``approximate``; the three AdaLN classes
    with ``linear``, ``silu`` and a ``norm`` we fuse), so that the core does not import diffusers.
    Affine LayerNorms keep their weight and bias parameters. An AdaLN replacement holds the
    original's children; the caller must not fuse inside the replaced module again (``apply_coat``
    skips everything below a replacement).
    """
    name = type(module).__name__
    if name in _ADALN and isinstance(getattr(module, "linear", None), nn.Module) and hasattr(module, "silu"):
        norm = getattr(module, "norm", None)
        coat_norm = fused_replacement(norm, compressor) if isinstance(norm, nn.Module) else None
        if isinstance(coat_norm, _COATNorm):
            return _ADALN[name](module, coat_norm)
        return None
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        return COATLayerNorm(module, compressor)
    if isinstance(module, nn.RMSNorm) or (name == "RMSNorm" and hasattr(module, "eps")):
        return COATRMSNorm(module, compressor)
    if isinstance(module, nn.GELU):
        return COATGELU(module.approximate, compressor)
    if name == "GELU" and isinstance(getattr(module, "proj", None), nn.Module) and hasattr(module, "approximate"):
        return COATGELU(module.approximate, compressor, proj=module.proj)
    return None
