"""The fused non-linear kernels of :mod:`coatflux.kernels.nonlinear` against the plain-PyTorch reference.

What is checked, and how strictly:

* the FP8 copy of the input each forward saves: byte-identical (codes and int8 exponents) to
  :func:`coatflux.core.formats.quantize_reference` -- it is what backward and every recompute read;
* outputs, against the op computed in float64 on the input: SQNR >= 100 dB for fp32 outputs
  (measured ~140 dB), >= 45 dB for bf16 (the output rounding alone is ~50-55 dB);
* gradients (dx, dweight, dbias, dscale, dshift), against float64 autograd of the op on the
  *dequantized* FP8 input (the kernel's input, so FP8 error is not counted): >= 100 dB in fp32,
  >= 40 dB in bf16 (dx is rounded to bf16);
* the core modules with the fused path forced on vs the reference path: the same within FP8 noise
  (both save the same FP8 bytes), and no more saved bytes.

CPU: the whole matrix runs the traced functions op by op (``eager``, ~1 s); a part of it, and the
core-module tests, go through dynamo and AOT autograd (``aot_eager``: the same graphs as training,
eager ops, ~1.5 s per graph on 2 cores); inductor's CPU code for the matrix (fp32 in part) takes
about a minute to compile cold, so that test is ``slow``. Shapes are few on purpose (each new rank or a size of 1 compiles again): 7 x 48
(rows that are a multiple of nothing), one row, 3 x 5 x 40 (a last dimension not a multiple of the
group, for GELU) and 2 x 5 x 32 for the AdaLN modulation (two samples, scale per sample).
CUDA (``gpu``): inductor on a FLUX-sized activation, as training runs it.
"""

from __future__ import annotations

import copy
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from coatflux.core import formats
from coatflux.core import nonlinear as core_nl
from coatflux.core.activation import ActivationCompressor, SavedBytesMeter
from coatflux.core.config import ActivationConfig
from coatflux.core.formats import E4M3, dequantize_reference, quantize_reference, sqnr_db
from coatflux.kernels import nonlinear as kn

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# (name, input shape, center, has weight, has bias, modulated)
NORM_CASES = [
    ("layernorm_affine", (7, 48), True, True, True, False),
    ("rmsnorm_weight_one_row", (1, 48), False, True, False, False),
    ("adaln", (2, 5, 32), True, False, False, True),
]
GELU_SHAPES = [(7, 48), (3, 5, 40)]
DTYPES = [torch.float32, torch.bfloat16]
OUT_DB = {torch.float32: 100.0, torch.bfloat16: 45.0}
GRAD_DB = {torch.float32: 100.0, torch.bfloat16: 40.0}


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def _assert_same_fp8(fast, ref) -> None:
    assert fast.data.shape == ref.data.shape and fast.data.dtype == ref.data.dtype
    assert torch.equal(_bytes(fast.data), _bytes(ref.data))
    assert torch.equal(_bytes(fast.scale), _bytes(ref.scale))
    assert (fast.shape, fast.dtype, fast.group, fast.pow2) == (ref.shape, ref.dtype, ref.group, ref.pow2)


def _inputs(shape, dtype, weight, bias, modulated, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    d = shape[-1]
    x = torch.randn(shape, generator=gen) * 3 + 1
    x.view(-1, d)[0, :16] *= 1e-3  # a small group next to large ones: per-group scales matter
    g = torch.randn(shape, generator=gen)
    w = torch.randn(d, generator=gen) if weight else None
    b = torch.randn(d, generator=gen) if bias else None
    s = torch.randn(shape[0], d, generator=gen) * 0.5 if modulated else None
    sh = torch.randn(shape[0], d, generator=gen) if modulated else None
    return [t.to(device=device, dtype=dtype) if t is not None else None for t in (x, g, w, b, s, sh)]


def _norm_truth(x, w, b, s, sh, eps, center):
    """The op in float64 (the plain formula; what both paths approximate)."""
    x = x.double()
    mean = x.mean(-1, keepdim=True) if center else torch.zeros_like(x[..., :1])
    xhat = (x - mean) * torch.rsqrt((x - mean).pow(2).mean(-1, keepdim=True) + eps)
    return _affine_modulated_truth(xhat, *(t.double() if t is not None else None for t in (w, b, s, sh)))


def _affine_modulated_truth(y, w, b, s, sh):
    y = y * w if w is not None else y
    y = y + b if b is not None else y
    if s is not None:
        y = y * (1 + s[:, None]) + sh[:, None]
    return y


def _check_norm(case, dtype, backend, device="cpu"):
    _, shape, center, weight, bias, modulated = case
    x, g, w, b, s, sh = _inputs(shape, dtype, weight, bias, modulated, device)
    eps = 1e-6
    y, xq, mean, rstd = kn.norm_forward(x, w, b, s, sh, eps=eps, center=center, backend=backend)
    _assert_same_fp8(xq, quantize_reference(x, E4M3, "group", 16, pow2_scales=True))
    assert y.shape == x.shape and y.dtype == dtype and mean.shape == rstd.shape == (*shape[:-1], 1)
    assert sqnr_db(_norm_truth(x, w, b, s, sh, eps, center), y) > OUT_DB[dtype]

    # backward and recompute read the FP8 input and the saved statistics: the truth is the reference's
    # written-out formula (core.nonlinear._NormFunction.backward) in float64 on exactly those
    params = [t.double().requires_grad_(True) if t is not None else None for t in (w, b, s, sh)]
    xhat = ((dequantize_reference(xq, torch.float64) - mean.double()) * rstd.double()).requires_grad_(True)
    truth = _affine_modulated_truth(xhat, *params)
    truth.backward(g.double())
    gx = xhat.grad
    centered = gx - gx.mean(-1, keepdim=True) if center else gx
    xd = types.SimpleNamespace(grad=rstd.double() * (centered - xhat.detach() * (gx * xhat.detach()).mean(-1, keepdim=True)))
    needs = tuple(p is not None for p in params)
    grads = kn.norm_backward(g, xq, mean, rstd, w, b, s, center=center, needs=needs, backend=backend)
    for got, want, like in zip(grads, [xd, *params], [x, w, b, s, sh], strict=True):
        if want is None:
            assert got is None
            continue
        assert got.dtype == like.dtype and got.shape == like.shape
        assert sqnr_db(want.grad, got) > GRAD_DB[dtype]
    again = kn.norm_recompute(xq, mean, rstd, w, b, s, sh, backend=backend)
    assert again.dtype == dtype and sqnr_db(truth.detach(), again) > OUT_DB[dtype]
    if modulated:  # only dx: the column sums are skipped, and their gradients come back None
        only_dx = kn.norm_backward(g, xq, mean, rstd, w, b, s, center=center, backend=backend)
        assert only_dx[1:] == (None, None, None, None)
        assert sqnr_db(xd.grad, only_dx[0]) > GRAD_DB[dtype]


def _check_gelu(shape, dtype, backend, approximate="tanh", device="cpu"):
    x, g, *_ = _inputs(shape, dtype, False, False, False, device)
    y, xq = kn.gelu_forward(x, approximate, backend=backend)
    _assert_same_fp8(xq, quantize_reference(x, E4M3, "group", 16, pow2_scales=True))
    assert y.dtype == dtype and sqnr_db(F.gelu(x.double(), approximate=approximate), y) > OUT_DB[dtype]
    xd = dequantize_reference(xq, torch.float64)
    want = torch.ops.aten.gelu_backward(g.double(), xd, approximate=approximate)
    dx = kn.gelu_backward(g, xq, approximate, backend=backend)
    assert dx.dtype == dtype and dx.shape == x.shape and sqnr_db(want, dx) > GRAD_DB[dtype]
    again = kn.gelu_recompute(xq, approximate, backend=backend)
    assert again.dtype == dtype and sqnr_db(F.gelu(xd, approximate=approximate), again) > OUT_DB[dtype]


def _check_all(backend, device="cpu", dtypes=DTYPES, fp32_part=False):
    """The matrix; ``fp32_part``: fp32 for the first norm case and GELU shape only."""
    for dtype in dtypes:
        few = fp32_part and dtype == torch.float32
        for case in NORM_CASES[:1] if few else NORM_CASES:
            _check_norm(case, dtype, backend, device)
        for shape in GELU_SHAPES[:1] if few else GELU_SHAPES:
            _check_gelu(shape, dtype, backend, device=device)


def test_traced_functions_match_reference_on_cpu():
    """The traced functions op by op (``eager``): every op, dtype and shape, in about a second."""
    _check_all("eager")


def test_traced_graphs_match_reference_on_cpu():
    """Through dynamo and AOT autograd (``aot_eager``): the graphs trace whole (``fullgraph``) with
    dynamic sizes, a one-row input and a per-sample modulation. bf16 only: the fp32 graphs are the
    same code, and the core-module tests below trace them."""
    for case in NORM_CASES[1:]:
        _check_norm(case, torch.bfloat16, "aot_eager")
    _check_gelu(GELU_SHAPES[1], torch.bfloat16, "aot_eager")


@pytest.mark.slow
def test_inductor_cpu_kernels_match_reference():
    """Inductor's C++: the whole matrix in bf16 (FLUX's training dtype), a LayerNorm and a GELU in
    fp32 (the same graphs in another dtype; all of fp32 took 77 s of the test's cold compile)."""
    _check_all("inductor", fp32_part=True)


# ---------------------------------------------------------------------------------------------
# Dispatch and the core modules on the fused path.


def test_dispatch_rule(monkeypatch):
    per_group = ActivationCompressor(ActivationConfig())
    per_tensor = ActivationCompressor(ActivationConfig(nonlinear_granularity="per_tensor"))
    x = torch.zeros(2, 16)
    assert not core_nl.uses_fused_kernels(x, per_group)  # CPU: the reference, nothing compiled
    monkeypatch.setattr(formats, "fast_path_available", lambda device_type: True)
    monkeypatch.delenv(formats.REFERENCE_ENV, raising=False)
    cuda = torch.empty(2, 16, device="meta")
    monkeypatch.setattr(formats, "uses_fast_path", lambda device, reference=False: device.type == "meta")
    assert core_nl.uses_fused_kernels(cuda, per_group) and not core_nl.uses_fused_kernels(cuda, per_tensor)
    monkeypatch.undo()
    monkeypatch.setenv(formats.REFERENCE_ENV, "1")
    monkeypatch.setattr(formats, "fast_path_available", lambda device_type: True)
    assert not formats.uses_fast_path(torch.device("cuda"))  # the env var wins, for these ops too


@pytest.fixture
def fused_on_cpu(monkeypatch):
    """The core modules take the fused path on CPU, traced under aot_eager (cheap to compile)."""
    monkeypatch.setattr(core_nl, "uses_fused_kernels", lambda x, compressor: True)
    monkeypatch.setattr(kn, "BACKEND", "aot_eager")


def _run(module, x, g, *extra):
    """Forward under the module's compressor (metered), backward; returns (y, grads of x and extras, bytes)."""
    comp = module.compressor if hasattr(module, "compressor") else module.norm.compressor
    comp.meter = SavedBytesMeter()
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, *extra)]
    with comp():
        y = module(*leaves)
    y = y[0] if isinstance(y, tuple) else y
    y.backward(g)
    return y.detach(), [t.grad for t in leaves], comp.meter.total


def _compressor():
    return ActivationCompressor(ActivationConfig(min_saved_numel=1))


@pytest.mark.parametrize("make", [lambda: nn.LayerNorm(48), lambda: nn.RMSNorm(48, eps=1e-6),
                                  lambda: nn.GELU(approximate="tanh")], ids=["layernorm", "rmsnorm", "gelu"])
def test_core_modules_fused_path_matches_reference_path(make, monkeypatch):
    torch.manual_seed(0)
    module = core_nl.fused_replacement(make(), _compressor())
    x, g = torch.randn(7, 48) * 3 + 1, torch.randn(7, 48)
    y0, (dx0,), bytes0 = _run(module, x, g)
    params0 = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    monkeypatch.setattr(core_nl, "uses_fused_kernels", lambda x, compressor: True)
    monkeypatch.setattr(kn, "BACKEND", "aot_eager")
    y1, (dx1,), bytes1 = _run(module, x, g)
    # same FP8 input on both paths: the difference is fp32 rounding and summation order
    assert sqnr_db(y0, y1) > 100 and sqnr_db(dx0, dx1) > 100
    for p0, p in zip(params0, module.parameters(), strict=True):
        assert sqnr_db(p0, p.grad) > 100
    assert bytes1 <= bytes0


def test_fused_output_is_recomputed_when_saved(fused_on_cpu):
    # LayerNorm output multiplied by a learnable factor: the multiply saves the output, which the
    # compressor must replace by the recompute recipe (0 bytes), and backward must still be right
    comp = _compressor()
    ln = core_nl.COATLayerNorm(nn.LayerNorm(48, elementwise_affine=False), comp)
    comp.meter = SavedBytesMeter()
    x = (torch.randn(7, 48) * 2).requires_grad_(True)
    factor = torch.randn(48, requires_grad=True)
    with comp():
        y = ln(x) * factor
    fp8 = x.numel() + x.numel() // 16
    assert comp.meter.total <= fp8 + 2 * 7 * 4 + factor.numel() * 4
    y.backward(torch.ones_like(y))
    expected = F.layer_norm(x.detach(), (48,)).sum(0)
    assert sqnr_db(expected, factor.grad) > 25


def _adaln_modules():
    from diffusers.models.normalization import (
        AdaLayerNormContinuous,
        AdaLayerNormZero,
        AdaLayerNormZeroSingle,
    )

    return [AdaLayerNormZero(32), AdaLayerNormZeroSingle(32),
            AdaLayerNormContinuous(32, 32, elementwise_affine=False, eps=1e-6),
            AdaLayerNormContinuous(32, 32, elementwise_affine=True, eps=1e-6, norm_type="rms_norm")]


@pytest.mark.parametrize("index", range(4), ids=["zero", "zero_single", "continuous", "continuous_rms_affine"])
def test_adaln_replacement_matches_diffusers(index, monkeypatch):
    torch.manual_seed(0)
    original = _adaln_modules()[index]
    replacement = core_nl.fused_replacement(copy.deepcopy(original), _compressor())
    assert type(replacement).__name__ == f"COAT{type(original).__name__}"
    assert list(replacement.state_dict()) == list(original.state_dict())  # LoRA targets, checkpoints
    x, g, emb = torch.randn(2, 5, 32) * 2 + 1, torch.randn(2, 5, 32), torch.randn(2, 32)

    def plain(x, emb):
        return original(x, emb=emb) if "Zero" in type(original).__name__ else original(x, emb)

    def coat(x, emb):
        return replacement(x, emb=emb) if "Zero" in type(original).__name__ else replacement(x, emb)

    xr, er = x.clone().requires_grad_(True), emb.clone().requires_grad_(True)
    yr = plain(xr, er)
    outs_r = yr if isinstance(yr, tuple) else (yr,)
    outs_r[0].backward(g)
    with torch.no_grad():  # outside training: the replacement is the original op, exactly
        outs_n = coat(x, emb)
        assert torch.equal((outs_n if isinstance(outs_n, tuple) else (outs_n,))[0], outs_r[0].detach())
    for fused in (False, True):
        if fused:
            monkeypatch.setattr(core_nl, "uses_fused_kernels", lambda x, compressor: True)
            monkeypatch.setattr(kn, "BACKEND", "aot_eager")
        replacement.zero_grad()
        y, (dx, demb), _ = _run_adaln(coat, replacement, x, g, emb)
        assert sqnr_db(outs_r[0].detach(), y) > 25
        assert sqnr_db(xr.grad, dx) > 25 and sqnr_db(er.grad, demb) > 25
        lin = replacement.linear.weight.grad
        assert sqnr_db(original.linear.weight.grad, lin) > 25
    for rest_r, rest in zip(outs_r[1:], (outs_n[1:] if isinstance(outs_n, tuple) else ()), strict=True):
        assert torch.equal(rest_r.detach(), rest)  # gates, shifts and scales for the MLP pass through


def _run_adaln(coat, replacement, x, g, emb):
    comp = replacement.norm.compressor
    comp.meter = SavedBytesMeter()
    xl, el = x.clone().requires_grad_(True), emb.clone().requires_grad_(True)
    with comp():
        y = coat(xl, el)
    y = y[0] if isinstance(y, tuple) else y
    y.backward(g)
    return y.detach(), (xl.grad, el.grad), comp.meter.total


def test_apply_coat_replaces_adaln_once():
    from diffusers.models.normalization import AdaLayerNormZero

    from coatflux import COATConfig, apply_coat

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1 = AdaLayerNormZero(32)
            self.norm2 = nn.LayerNorm(32, elementwise_affine=False, eps=1e-6)

        def forward(self, x, temb):
            h, gate, shift, scale, _ = self.norm1(x, emb=temb)
            return x + gate[:, None] * (self.norm2(h) * (1 + scale[:, None]) + shift[:, None])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        model = apply_coat(Block(), COATConfig(activation=ActivationConfig(min_saved_numel=1)))
    assert isinstance(model.norm1, core_nl.COATAdaLayerNormZero)
    assert isinstance(model.norm1.norm, core_nl.COATLayerNorm)
    assert sorted(model.coat_context.fused) == ["norm1", "norm2"]  # nothing listed inside the replacement
    x, temb = torch.randn(2, 5, 32, requires_grad=True), torch.randn(2, 32)
    model(x, temb).sum().backward()
    assert torch.isfinite(x.grad).all()


# ---------------------------------------------------------------------------------------------
# CUDA: inductor, as training runs it.


@pytest.mark.gpu
@needs_cuda
def test_cuda_kernels_match_reference():
    ok, reason = kn.available("cuda")
    assert ok, reason
    for case in NORM_CASES:
        _check_norm(case, torch.bfloat16, "inductor", "cuda")
    _check_gelu((7, 48), torch.bfloat16, "inductor", device="cuda")


@pytest.mark.gpu
@needs_cuda
def test_cuda_modules_dispatch_to_fused_path(monkeypatch):
    """On CUDA the core modules take the fused path by themselves; FLUX-sized AdaLN, bf16."""
    comp = ActivationCompressor(ActivationConfig())
    norm = core_nl.COATLayerNorm(nn.LayerNorm(3072, elementwise_affine=False, eps=1e-6), comp)
    gen = torch.Generator(device="cuda").manual_seed(0)
    x, g = (torch.randn(1, 4608, 3072, device="cuda", generator=gen).bfloat16() for _ in range(2))
    scale, shift = (torch.randn(1, 3072, device="cuda", generator=gen).bfloat16() for _ in range(2))
    runs = []
    for reference in ("1", "0"):
        monkeypatch.setenv(formats.REFERENCE_ENV, reference)
        assert core_nl.uses_fused_kernels(x, comp) == (reference == "0")
        xi = x.clone().requires_grad_(True)
        with comp():
            y = norm.modulated(xi, scale, shift)
        y.backward(g)
        runs.append((y.detach(), xi.grad))
    (y0, dx0), (y1, dx1) = runs
    assert sqnr_db(y0, y1) > 40 and sqnr_db(dx0, dx1) > 35
