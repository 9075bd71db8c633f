import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from coatflux import COATConfig, apply_coat, saved_activation_bytes
from coatflux.core.activation import ActivationCompressor
from coatflux.core.config import ActivationConfig
from coatflux.core.formats import sqnr_db
from coatflux.core.nonlinear import COATGELU, COATLayerNorm, COATRMSNorm, fused_replacement


def _grads(module, x, g):
    x = x.clone().requires_grad_(True)
    with_hooks = getattr(module, "compressor", None)
    ctx = with_hooks() if with_hooks is not None else torch.enable_grad()
    with ctx:
        y = module(x)
    y.backward(g)
    return y.detach(), x.grad


@pytest.mark.parametrize("make", [
    lambda: nn.LayerNorm(64, elementwise_affine=False, eps=1e-6),
    lambda: nn.LayerNorm(64),
    lambda: nn.RMSNorm(64, eps=1e-6),
    lambda: nn.GELU(approximate="tanh"),
    lambda: nn.GELU(),
])
def test_fused_ops_match_pytorch(make):
    torch.manual_seed(0)
    ref = make()
    comp = ActivationCompressor(ActivationConfig(min_saved_numel=1))
    fused = fused_replacement(copy.deepcopy(ref), comp)
    assert fused is not None
    x = torch.randn(4, 32, 64) * 3 + 1
    g = torch.randn(4, 32, 64)
    y0, gx0 = _grads(ref, x, g)
    y1, gx1 = _grads(fused, x, g)
    assert sqnr_db(y0, y1) > 60  # forward is exact up to fp32 rounding
    assert sqnr_db(gx0, gx1) > 25  # backward sees the FP8 input


def test_fused_modules_are_plain_outside_training():
    comp = ActivationCompressor(ActivationConfig())
    ln = COATLayerNorm(nn.LayerNorm(16), comp)
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert torch.equal(ln(x), nn.functional.layer_norm(x, (16,), ln.weight, ln.bias, ln.eps))


def test_outputs_are_recomputed_not_stored():
    # LayerNorm -> modulation multiply: the multiply saves the norm output, which must cost nothing
    comp = ActivationCompressor(ActivationConfig(min_saved_numel=1))
    ln = COATLayerNorm(nn.LayerNorm(64, elementwise_affine=False), comp)
    x = torch.randn(8, 64, 64, requires_grad=True)
    scale = torch.randn(64, requires_grad=True)
    from coatflux.core.activation import SavedBytesMeter

    meter = SavedBytesMeter()
    comp.meter = meter
    with comp():
        y = ln(x * 1.0) * (1 + scale)
    fp8_input_bytes = x.numel() + x.numel() // 16  # codes + one int8 exponent per 16
    stats = 2 * 8 * 64 * 4  # mean and rstd, fp32
    assert meter.total <= fp8_input_bytes + stats + scale.numel() * 4 + 64
    g = torch.randn_like(y)
    y.backward(g)
    expected = (nn.functional.layer_norm(x.detach(), (64,)) * g).sum((0, 1))
    assert sqnr_db(expected, scale.grad) > 20


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(64, elementwise_affine=False)
        self.q_norm = nn.RMSNorm(64)
        self.fc1 = nn.Linear(64, 256)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(256, 64)

    def forward(self, x):
        h = self.q_norm(self.norm(x) * 1.5)
        return x + self.fc2(self.act(self.fc1(h)))


def test_apply_coat_fuses_and_composes_with_checkpoint():
    torch.manual_seed(0)
    ref = _Block()

    class Ck(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return checkpoint(self.inner, x, use_reentrant=False)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        coat = apply_coat(copy.deepcopy(ref), COATConfig(activation=ActivationConfig(min_saved_numel=1)))
        ck = apply_coat(Ck(copy.deepcopy(ref)), COATConfig(activation=ActivationConfig(min_saved_numel=1)))
    assert isinstance(coat.norm, COATLayerNorm) and isinstance(coat.q_norm, COATRMSNorm)
    assert isinstance(coat.act, COATGELU)
    assert set(coat.coat_context.fused) == {"norm", "q_norm", "act"}
    x = torch.randn(2, 32, 64)
    g = torch.randn(2, 32, 64)
    outs = []
    for model in (ref, coat, ck):
        xi = (x * 1.0).requires_grad_(True)
        y = model(xi)
        y.backward(g)
        outs.append((y.detach(), xi.grad))
    assert sqnr_db(outs[0][0], outs[1][0]) > 20 and sqnr_db(outs[0][1], outs[1][1]) > 15
    assert torch.equal(outs[1][0], outs[2][0]) and sqnr_db(outs[0][1], outs[2][1]) > 15
    xr = torch.randn(2, 32, 64, requires_grad=True) * 1.0
    assert saved_activation_bytes(coat, lambda: coat(xr)) < 0.5 * saved_activation_bytes(ref, lambda: ref(xr))


def test_fused_nonlinear_can_be_switched_off():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        model = apply_coat(_Block(), COATConfig(activation=ActivationConfig(fused_nonlinear=False)))
    assert type(model.norm) is nn.LayerNorm and model.coat_context.fused == []
