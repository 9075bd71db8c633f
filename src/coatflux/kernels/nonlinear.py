"""Fused LayerNorm / RMSNorm / AdaLN / GELU that save FP8: the ops of :mod:`coatflux.core.nonlinear` in one pass each.

What: for every non-linear op whose input COAT saves as FP8 (1 x G groups, power-of-two scales),
one compiled function computes the whole forward -- row statistics, normalisation, optional
affine weight and bias, optional AdaLN modulation ``* (1 + scale[:, None]) + shift[:, None]``,
the output cast *and* the FP8 group quantization of the input that backward will use -- and one
compiled function computes the whole backward from the FP8 codes (dequantize, the written-out
norm or GELU derivative, and the parameter / modulation gradients). A third recomputes the output
from the FP8 input, for the "derived output" recipe the activation compressor calls when a later
op saved that output.

* :func:`norm_forward`, :func:`norm_backward`, :func:`norm_recompute`: LayerNorm (``center=True``)
  and RMSNorm (``center=False``), each with or without weight, bias and modulation;
* :func:`gelu_forward`, :func:`gelu_backward`, :func:`gelu_recompute`: GELU, tanh or erf form.

Why: the reference (plain PyTorch in :mod:`coatflux.core.nonlinear`) runs each of these as a
chain of 8-20 separate ops, each a full read and write of a FLUX-sized activation (4608 x 3072
for one 1024 px image), plus the ~12 ops of the group quantizer; for a LayerNorm feeding AdaLN the
forward reads and writes the activation ~15 times where once suffices. These ops are memory-bound,
so the number of passes is the run time.

How, and what was chosen against: ``torch.compile`` (inductor, ``fullgraph=True``,
``dynamic=True`` so a new token count does not recompile) of small functions written with the
same operations as the reference, exactly as :mod:`coatflux.kernels.quant` does. Chosen against
hand-written Triton: inductor already emits one persistent-reduction kernel per row block for
"reduce a row, then map it" (the shape of every norm here), the quantizer's exact bit arithmetic
is reused from :mod:`coatflux.kernels.quant` rather than re-derived, and the same traced graph
runs on CPU, which is how the tests check it without a GPU. A Triton kernel could fuse the
backward's parameter-gradient column sums with the row pass too; inductor emits those as a second
(small) reduction kernel, which we accept for now.

Exactness: the FP8 codes and exponents are byte-identical to
:func:`coatflux.core.formats.quantize_reference` (the quantizer is a pure function of the input,
computed from its bits). Outputs and gradients are *not* bit-identical to the reference: the
fused forward keeps fp32 through affine and modulation and casts once (the reference rounds to
the input dtype after the norm and again after each multiply), and compiled reductions sum in a
different order. ``tests/test_kernels_nonlinear.py`` bounds the difference by SQNR.

Dispatch lives in :func:`coatflux.core.nonlinear.uses_fused_kernels`: these functions run exactly
where :func:`coatflux.core.formats.uses_fast_path` runs the fused quantizer (CUDA, not
``COATFLUX_REFERENCE_KERNELS=1``) and the compressor saves per-group FP8. Calling them directly
works on any device (the tests run them on CPU); ``backend="aot_eager"`` or ``"eager"`` runs the
same traced functions op by op, for debugging.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from coatflux.core.formats import E4M3, FP8Format, QuantizedTensor, get_format
from coatflux.kernels import quant

# The backend the public functions compile with when none is given (tests may swap it).
BACKEND = "inductor"

Flags = tuple[bool, ...]


def available(device: torch.device | str = "cuda") -> tuple[bool, str]:
    """Whether the compiled path can run on ``device``'s type: the quantizer's rule (same compiler needs)."""
    return quant.available(device)


# ---------------------------------------------------------------------------------------------
# Traced functions. x is always (B, T, D) contiguous: B is the modulation's batch (1 without one).


def _dequantize_rows(codes: torch.Tensor, exponent: torch.Tensor, group: int) -> torch.Tensor:
    """fp32 values of (N, D) codes with (N, ceil(D / group)) exponents; exact (multiply by 2**k)."""
    return quant.group_pow2_values_ops(codes, exponent, group, torch.float32)


def _affine_modulated(xhat: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                      scale: torch.Tensor | None, shift: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z, y)``: ``z = xhat * weight + bias`` and ``y = z * (1 + scale[:, None]) + shift[:, None]``, in fp32."""
    z = xhat
    if weight is not None:
        z = z * weight.float()
    if bias is not None:
        z = z + bias.float()
    y = z
    if scale is not None:
        y = y * (1 + scale.float()[:, None])
    if shift is not None:
        y = y + shift.float()[:, None]
    return z, y


def _norm_forward_fn(fmt: FP8Format, group: int, eps: float, center: bool, out_dtype: torch.dtype) -> Callable:
    def fn(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
           scale: torch.Tensor | None, shift: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        xf = x.float()
        # two-pass variance (as the reference): one kernel either way, and no cancellation when |mean| >> std
        mean = xf.mean(-1, keepdim=True) if center else torch.zeros_like(xf[..., :1])
        rstd = torch.rsqrt((xf - mean).pow(2).mean(-1, keepdim=True) + eps)
        _, y = _affine_modulated((xf - mean) * rstd, weight, bias, scale, shift)
        codes, exponent = quant.group_pow2_ops(x.reshape(-1, x.shape[-1]), fmt, group)
        return y.to(out_dtype), codes, exponent, mean, rstd

    return fn


def _norm_backward_fn(group: int, center: bool, needs: Flags, x_dtype: torch.dtype) -> Callable:
    need_weight, need_bias, need_scale, need_shift = needs

    def fn(grad: torch.Tensor, codes: torch.Tensor, exponent: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
           weight: torch.Tensor | None, bias: torch.Tensor | None,
           scale: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        xhat = (_dequantize_rows(codes, exponent, group).reshape(grad.shape) - mean) * rstd
        g = grad.float()
        d_weight = d_bias = d_scale = d_shift = None
        if need_shift:
            d_shift = g.sum(1)
        if need_scale:
            z, _ = _affine_modulated(xhat, weight, bias, None, None)
            d_scale = (g * z).sum(1)
        if scale is not None:
            g = g * (1 + scale.float()[:, None])  # gradient w.r.t. z
        if need_weight:
            d_weight = (g * xhat).sum((0, 1))
        if need_bias:
            d_bias = g.sum((0, 1))
        if weight is not None:
            g = g * weight.float()  # gradient w.r.t. xhat
        # LayerNorm: rstd * (g - mean(g) - xhat * mean(g * xhat)); RMSNorm drops the mean(g) term
        centered = g - g.mean(-1, keepdim=True) if center else g
        d_x = rstd * (centered - xhat * (g * xhat).mean(-1, keepdim=True))
        return d_x.to(x_dtype), d_weight, d_bias, d_scale, d_shift

    return fn


def _norm_recompute_fn(group: int, out_dtype: torch.dtype) -> Callable:
    def fn(codes: torch.Tensor, exponent: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
           weight: torch.Tensor | None, bias: torch.Tensor | None,
           scale: torch.Tensor | None, shift: torch.Tensor | None) -> torch.Tensor:
        x = _dequantize_rows(codes, exponent, group).reshape(*mean.shape[:-1], codes.shape[-1])
        _, y = _affine_modulated((x - mean) * rstd, weight, bias, scale, shift)
        return y.to(out_dtype)

    return fn


def _gelu_forward_fn(fmt: FP8Format, group: int, approximate: str) -> Callable:
    def fn(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        codes, exponent = quant.group_pow2_ops(x, fmt, group)
        return F.gelu(x, approximate=approximate), codes, exponent

    return fn


def _gelu_backward_fn(group: int, approximate: str) -> Callable:
    def fn(grad: torch.Tensor, codes: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
        # the dequantized input in grad's dtype, as the reference (exact: FP8 x 2**k fits bf16 and fp32)
        x = _dequantize_rows(codes, exponent, group).to(grad.dtype)
        return torch.ops.aten.gelu_backward(grad, x, approximate=approximate)

    return fn


def _gelu_recompute_fn(group: int, approximate: str, out_dtype: torch.dtype) -> Callable:
    def fn(codes: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
        return F.gelu(_dequantize_rows(codes, exponent, group).to(out_dtype), approximate=approximate)

    return fn


# Keys also carry what the builders do not need -- which optional tensors are present, the input
# dtype -- so that each variant gets its own dynamo cache instead of piling guards (and recompiles,
# with fullgraph=True an error past the limit) onto one code object.
_BUILDERS: dict[str, Callable[..., Callable]] = {
    "norm_forward": lambda fmt, group, eps, center, _has, _in, out: _norm_forward_fn(fmt, group, eps, center, out),
    "norm_backward": lambda group, center, _has, needs, x_dtype: _norm_backward_fn(group, center, needs, x_dtype),
    "norm_recompute": lambda group, _has, out: _norm_recompute_fn(group, out),
    "gelu_forward": _gelu_forward_fn,
    "gelu_backward": _gelu_backward_fn,
    "gelu_recompute": _gelu_recompute_fn,
}


def _key_name(k: object) -> str:
    if isinstance(k, tuple):
        return "".join("1" if v else "0" for v in k)
    return (getattr(k, "name", None) or str(k).replace("torch.", "")).replace(".", "p").replace("-", "m")


@functools.cache
def _compiled(kind: str, key: tuple, backend: str) -> Callable:
    """One compiled function per op, format, group, flags and dtypes (each with its own dynamo cache)."""
    fn = _BUILDERS[kind](*key)
    if backend == "eager":
        return fn
    return quant.compile_kernel(fn, f"coatflux_{kind}_{'_'.join(_key_name(k) for k in key)}", backend)


def _present(*tensors: torch.Tensor | None) -> Flags:
    return tuple(t is not None for t in tensors)


def _plain(t: torch.Tensor | None, shape: tuple[int, ...] | None = None) -> torch.Tensor | None:
    """``t`` detached, contiguous and not a view (so dynamo has no strides of a base to guard on)."""
    if t is None:
        return None
    t = t.detach()
    return (t.reshape(shape) if shape is not None else t).contiguous().detach()


def _as_batched(x: torch.Tensor, modulated: bool) -> tuple[int, int, int]:
    """(B, T, D) of ``x``: its three dimensions when modulated (scale is per B), else (1, rows, D)."""
    if modulated:
        if x.dim() != 3:
            raise ValueError(f"modulated norm expects (batch, tokens, dim) input, got shape {tuple(x.shape)}")
        return x.shape[0], x.shape[1], x.shape[2]
    width = x.shape[-1]
    return 1, x.numel() // width if width else 0, width


def norm_forward(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                 scale: torch.Tensor | None = None, shift: torch.Tensor | None = None, *, eps: float,
                 center: bool = True, out_dtype: torch.dtype | None = None, fmt: str | FP8Format = E4M3,
                 group: int = 16, backend: str | None = None
                 ) -> tuple[torch.Tensor, QuantizedTensor, torch.Tensor, torch.Tensor]:
    """``(y, xq, mean, rstd)`` of a LayerNorm (``center``) or RMSNorm over the last dimension, in one pass.

    ``y = ((x - mean) * rstd * weight + bias) * (1 + scale[:, None]) + shift[:, None]`` (each factor
    optional; ``scale``/``shift`` are ``(B, D)`` for an ``(B, T, D)`` input) in ``out_dtype``
    (default ``x.dtype``). ``xq`` is ``quantize_reference(x, fmt, "group", group, pow2_scales=True)``,
    byte for byte; ``mean`` and ``rstd`` are fp32 with shape ``x.shape[:-1] + (1,)`` (mean is 0
    for RMSNorm).
    """
    fmt = get_format(fmt)
    b, t, d = _as_batched(x, scale is not None or shift is not None)
    key = (fmt, group, float(eps), center, _present(weight, bias, scale, shift), x.dtype, out_dtype or x.dtype)
    compiled = _compiled("norm_forward", key, backend or BACKEND)
    y, codes, exponent, mean, rstd = compiled(_plain(x, (b, t, d)), _plain(weight), _plain(bias),
                                              _plain(scale), _plain(shift))
    xq = QuantizedTensor(codes.reshape(x.shape), exponent, fmt, "group", group, x.shape, x.dtype, True)
    stats_shape = (*x.shape[:-1], 1)
    return y.reshape(x.shape), xq, mean.reshape(stats_shape), rstd.reshape(stats_shape)


def norm_backward(grad: torch.Tensor, xq: QuantizedTensor, mean: torch.Tensor, rstd: torch.Tensor,
                  weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                  scale: torch.Tensor | None = None, *, center: bool = True,
                  needs: tuple[bool, bool, bool, bool] = (False, False, False, False), backend: str | None = None
                  ) -> tuple[torch.Tensor | None, ...]:
    """``(dx, dweight, dbias, dscale, dshift)`` of :func:`norm_forward` from its FP8 input and statistics.

    ``needs`` says which of weight, bias, scale, shift want a gradient (the others come back
    ``None``, and their column sums are not computed). ``dx`` is in the input's dtype, the others
    in their tensor's dtype.
    """
    b, t, d = _as_batched(grad, scale is not None or needs[3])
    if needs[2] and scale is None:
        raise ValueError("norm_backward: a scale gradient needs the scale")
    key = (xq.group, center, _present(weight, bias, scale), tuple(bool(n) for n in needs), xq.dtype)
    d_x, *rest = _compiled("norm_backward", key, backend or BACKEND)(
        _plain(grad, (b, t, d)), _plain(xq.data, (b * t, d)), _plain(xq.scale), _plain(mean, (b, t, 1)),
        _plain(rstd, (b, t, 1)), _plain(weight), _plain(bias), _plain(scale))
    dtypes = [getattr(p, "dtype", None) for p in (weight, bias, scale, scale)]
    rest = [r.to(dt or r.dtype) if r is not None else None for r, dt in zip(rest, dtypes, strict=True)]
    return (d_x.reshape(grad.shape), *rest)


def norm_recompute(xq: QuantizedTensor, mean: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                   shift: torch.Tensor | None = None, *, out_dtype: torch.dtype | None = None,
                   backend: str | None = None) -> torch.Tensor:
    """The output of :func:`norm_forward` again, from the FP8 input (the derived-output recipe)."""
    b, t, d = _as_batched(torch.empty(xq.shape, device="meta"), scale is not None or shift is not None)
    key = (xq.group, _present(weight, bias, scale, shift), out_dtype or xq.dtype)
    compiled = _compiled("norm_recompute", key, backend or BACKEND)
    y = compiled(_plain(xq.data, (b * t, d)), _plain(xq.scale), _plain(mean, (b, t, 1)), _plain(rstd, (b, t, 1)),
                 _plain(weight), _plain(bias), _plain(scale), _plain(shift))
    return y.reshape(xq.shape)


def gelu_forward(x: torch.Tensor, approximate: str = "tanh", *, fmt: str | FP8Format = E4M3, group: int = 16,
                 backend: str | None = None) -> tuple[torch.Tensor, QuantizedTensor]:
    """``(F.gelu(x, approximate), xq)`` in one pass; ``xq`` byte-identical to the reference group quantizer."""
    fmt = get_format(fmt)
    width = x.shape[-1] if x.dim() else 1
    compiled = _compiled("gelu_forward", (fmt, group, approximate), backend or BACKEND)
    y, codes, exponent = compiled(_plain(x, (-1, width)))
    return y.reshape(x.shape), QuantizedTensor(codes.reshape(x.shape), exponent, fmt, "group", group, x.shape,
                                               x.dtype, True)


def gelu_backward(grad: torch.Tensor, xq: QuantizedTensor, approximate: str = "tanh", *,
                  backend: str | None = None) -> torch.Tensor:
    """``aten.gelu_backward(grad, dequantize(xq, grad.dtype))`` in one pass."""
    width = xq.shape[-1] if len(xq.shape) else 1
    compiled = _compiled("gelu_backward", (xq.group, approximate), backend or BACKEND)
    return compiled(_plain(grad, (-1, width)), _plain(xq.data, (-1, width)), _plain(xq.scale)).reshape(grad.shape)


def gelu_recompute(xq: QuantizedTensor, approximate: str = "tanh", *, out_dtype: torch.dtype | None = None,
                   backend: str | None = None) -> torch.Tensor:
    """``F.gelu(dequantize(xq), approximate)`` in one pass (the derived-output recipe)."""
    width = xq.shape[-1] if len(xq.shape) else 1
    compiled = _compiled("gelu_recompute", (xq.group, approximate, out_dtype or xq.dtype), backend or BACKEND)
    return compiled(_plain(xq.data, (-1, width)), _plain(xq.scale)).reshape(xq.shape)
