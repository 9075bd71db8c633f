import math

import pytest
import torch

from coatflux.core.dre import K_MAX, K_MIN, choose_k, dre_dequantize, dre_quantize, target_range
from coatflux.core.formats import E4M3, E5M2, dequantize, quantize


def _moments(seed=0):
    """First and second moments of a real AdamW run on a small regression."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Linear(128, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(256, 32)
    y = torch.sin(x @ torch.randn(32, 32))
    for _ in range(60):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    state = opt.state[model[0].weight]
    return state["exp_avg"], state["exp_avg_sq"]


@pytest.mark.parametrize("m_fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("v_fmt", ["e4m3", "e5m2"])
def test_expansion_lowers_update_error_for_every_format_pair(m_fmt, v_fmt):
    m, v = _moments()
    ref = m / (v.sqrt() + 1e-8)

    def err(mq, vq):
        return ((mq / (vq.sqrt() + 1e-8) - ref) ** 2).mean().item()

    plain = err(dequantize(quantize(m, m_fmt, "block", 128, pow2_scales=True)),
                dequantize(quantize(v, v_fmt, "block", 128, pow2_scales=True)))
    expanded = err(dre_dequantize(dre_quantize(m, m_fmt, 128), 128), dre_dequantize(dre_quantize(v, v_fmt, 128), 128))
    assert expanded < plain


def test_k_is_bounded_and_quantized():
    ratios = torch.tensor([1.0, 1.5, 10.0, 1e3, 1e6, 1e30, 1e38])
    for fmt in (E4M3, E5M2):
        k = choose_k(ratios, fmt)
        assert torch.all(k >= K_MIN) and torch.all(k <= K_MAX)
        assert torch.equal(k * 16, (k * 16).round())
        fits = ratios.double() ** k.double() <= target_range(fmt) * (1 + 1e-6)
        assert torch.all(fits[k > K_MIN])
    assert choose_k(torch.tensor([1.0]), E4M3).item() == K_MAX


def test_zero_block_and_constant_block():
    x = torch.zeros(3 * 128)
    x[128:256] = 0.0371  # constant block
    x[256:] = torch.randn(128)
    enc = dre_quantize(x, "e4m3", 128)
    assert enc.k_code[0].item() == 15 and enc.center_exp[0].item() == 0 and enc.scale_exp[0].item() == 0
    y = dre_dequantize(enc, 128)
    assert torch.equal(y[:128], torch.zeros(128))
    assert torch.allclose(y[128:256], x[128:256], rtol=5e-3)
    assert (enc.k_code[1].item() + 1) / 16 == K_MAX


def test_zeros_stay_zero_and_signs_are_kept():
    x = torch.randn(1000)
    x[::7] = 0
    y = dre_dequantize(dre_quantize(x, "e4m3", 128), 128)
    assert torch.equal(y[::7], torch.zeros_like(y[::7]))
    assert torch.equal(torch.sign(y), torch.sign(x))


def test_wide_range_block_is_compressed_not_flushed():
    # Second-moment entries spanning 1e-30..1 must not become zero (m / sqrt(0) would explode).
    x = torch.logspace(-30, 0, 128)
    y = dre_dequantize(dre_quantize(x, "e4m3", 128), 128)
    assert torch.all(y > 0)
    assert torch.allclose(y.log10(), x.log10(), atol=0.5)


def test_nan_propagates():
    x = torch.randn(256)
    x[5] = math.nan
    y = dre_dequantize(dre_quantize(x, "e4m3", 128), 128)
    assert math.isnan(y[5]) and torch.isfinite(y[128:]).all()


def test_metadata_is_three_bytes_per_block():
    enc = dre_quantize(torch.randn(1000), "e5m2", 128)
    blocks = math.ceil(1000 / 128)
    assert enc.codes.dtype == torch.float8_e5m2 and enc.codes.shape == (1000,)
    for t in (enc.k_code, enc.center_exp, enc.scale_exp):
        assert t.numel() == blocks and t.element_size() == 1
