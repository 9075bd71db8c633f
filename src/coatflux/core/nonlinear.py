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
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

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
        compressor.register_derived(y, lambda: _normalized(xq, mean, rstd).to(y.dtype))
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
        compressor.register_derived(y, lambda: F.gelu(dequantize(xq), approximate=approximate))
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x = dequantize(_quantized(ctx, ctx.saved_tensors), grad.dtype)
        return torch.ops.aten.gelu_backward(grad, x, approximate=ctx.approximate), None, None


def _active(compressor: ActivationCompressor | None, x: torch.Tensor) -> bool:
    return compressor is not None and torch.is_grad_enabled() and x.requires_grad


class COATLayerNorm(nn.Module):
    """``nn.LayerNorm`` over the last dimension whose input is saved once, in FP8."""

    def __init__(self, norm: nn.LayerNorm, compressor: ActivationCompressor) -> None:
        super().__init__()
        self.normalized_shape, self.eps = tuple(norm.normalized_shape), norm.eps
        self.weight, self.bias = norm.weight, norm.bias
        self.compressor = compressor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _active(self.compressor, x):
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        y = _NormFunction.apply(x, self.eps, True, self.compressor)
        if self.weight is not None:
            y = y * self.weight.to(y.dtype)
        return y + self.bias.to(y.dtype) if self.bias is not None else y


class COATRMSNorm(nn.Module):
    """RMSNorm (``torch.nn.RMSNorm`` or diffusers' ``RMSNorm``) whose input is saved once, in FP8."""

    def __init__(self, norm: nn.Module, compressor: ActivationCompressor) -> None:
        super().__init__()
        self.eps = norm.eps if norm.eps is not None else torch.finfo(torch.float32).eps
        self.weight = getattr(norm, "weight", None)
        self.bias = getattr(norm, "bias", None)
        self.compressor = compressor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _active(self.compressor, x):
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
        return _GELUFunction.apply(x, self.approximate, self.compressor)


def fused_replacement(module: nn.Module, compressor: ActivationCompressor) -> nn.Module | None:
    """The FP8-saving replacement for ``module``, or ``None`` if it is not one we fuse.

    Matched by type for torch's own modules and by class name plus attributes for diffusers'
    (``RMSNorm`` with ``eps``; ``GELU`` with ``proj`` and ``approximate``), so that the core does
    not import diffusers. Affine LayerNorms keep their weight and bias parameters.
    """
    name = type(module).__name__
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        return COATLayerNorm(module, compressor)
    if isinstance(module, nn.RMSNorm) or (name == "RMSNorm" and hasattr(module, "eps")):
        return COATRMSNorm(module, compressor)
    if isinstance(module, nn.GELU):
        return COATGELU(module.approximate, compressor)
    if name == "GELU" and isinstance(getattr(module, "proj", None), nn.Module) and hasattr(module, "approximate"):
        return COATGELU(module.approximate, compressor, proj=module.proj)
    return None
