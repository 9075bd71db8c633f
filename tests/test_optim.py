import io

import pytest
import torch

from coatflux.core.accounting import optimizer_state_bytes_per_param
from coatflux.core.config import FP8QuantizationConfig
from coatflux.core.optim import FP8AdamW

FORMAT_PAIRS = [("e4m3", "e4m3"), ("e4m3", "e5m2"), ("e5m2", "e4m3"), ("e5m2", "e5m2")]


def _regression(seed=0):
    torch.manual_seed(seed)
    x = torch.randn(2048, 64)
    y = torch.tanh(x @ torch.randn(64, 16) / 4) + 0.1 * torch.randn(2048, 16)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.SiLU(), torch.nn.Linear(128, 16))
    return model, x, y


def _train(make_opt, steps=300, seed=0):
    model, x, y = _regression(seed)
    opt = make_opt(model.parameters())
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
    return loss.item(), model, opt


@pytest.mark.parametrize("m1,m2", FORMAT_PAIRS)
@pytest.mark.parametrize("dre", [True, False])
def test_final_loss_within_3_percent_of_adamw(m1, m2, dre):
    ref, _, _ = _train(lambda p: torch.optim.AdamW(p, lr=5e-3, weight_decay=0.01))
    cfg = FP8QuantizationConfig(m1_format=m1, m2_format=m2, use_dynamic_range_expansion=dre, min_quantized_numel=1024)
    ours, _, opt = _train(lambda p: FP8AdamW(p, lr=5e-3, weight_decay=0.01, fp8_config=cfg))
    assert abs(ours - ref) / ref < 0.03, (ours, ref)
    assert opt.state[next(iter(opt.state))]["exp_avg"].dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


def test_small_transformer_within_3_percent():
    def run(make_opt):
        torch.manual_seed(1)
        layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        head = torch.nn.Linear(32, 8)
        model = torch.nn.Sequential(layer, head)
        x = torch.randn(512, 12, 32)
        y = torch.tanh(x.cumsum(1)[..., :8] / 4) + 0.1 * torch.randn(512, 12, 8)
        opt = make_opt(model.parameters())
        for _ in range(300):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
        return loss.item()

    ref = run(lambda p: torch.optim.AdamW(p, lr=3e-3))
    ours = run(lambda p: FP8AdamW(p, lr=3e-3, fp8_config=FP8QuantizationConfig(min_quantized_numel=1024)))
    assert abs(ours - ref) / ref < 0.03, (ours, ref)


def test_small_tensors_follow_adamw_exactly():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(10, 10))
    b = torch.nn.Parameter(a.detach().clone())
    ref = torch.optim.AdamW([a], lr=1e-2, weight_decay=0.1)
    ours = FP8AdamW([b], lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        g = torch.randn(10, 10)
        a.grad, b.grad = g.clone(), g.clone()
        ref.step()
        ours.step()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_state_bytes_per_param_below_2_13():
    p = torch.nn.Parameter(torch.randn(1024, 1024))
    opt = FP8AdamW([p], lr=1e-3)
    p.grad = torch.randn_like(p)
    opt.step()
    assert optimizer_state_bytes_per_param(opt) <= 2.13
    assert optimizer_state_bytes_per_param(opt) == pytest.approx(2 + 6 / 128)


def test_state_dict_loads_weights_only_and_resume_is_bit_identical():
    torch.manual_seed(0)
    model, x, y = _regression()
    cfg = FP8QuantizationConfig(m2_format="e5m2", min_quantized_numel=1024)
    opt = FP8AdamW(model.parameters(), lr=1e-3, fp8_config=cfg)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 20)

    def steps(model, opt, sched, n):
        for _ in range(n):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            sched.step()

    steps(model, opt, sched, 5)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    steps(model, opt, sched, 5)

    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2, _, _ = _regression(seed=123)
    model2.load_state_dict(ckpt["model"])
    opt2 = FP8AdamW(model2.parameters(), lr=1e-3, fp8_config=cfg)
    opt2.load_state_dict(ckpt["opt"])
    sched2 = torch.optim.lr_scheduler.CosineAnnealingLR(opt2, 20)
    sched2.load_state_dict(ckpt["sched"])
    steps(model2, opt2, sched2, 5)
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
    key = next(iter(opt2.state))
    assert opt2.state[key]["exp_avg"].dtype == torch.float8_e4m3fn


def test_param_groups_and_zero_grad():
    a, b = torch.nn.Parameter(torch.randn(64, 64)), torch.nn.Parameter(torch.randn(64, 64))
    opt = FP8AdamW([{"params": [a], "lr": 0.0}, {"params": [b], "lr": 1e-2}], weight_decay=0.0)
    a0, b0 = a.detach().clone(), b.detach().clone()
    a.grad, b.grad = torch.ones_like(a), torch.ones_like(b)
    opt.step()
    assert torch.equal(a, a0) and not torch.equal(b, b0)
    opt.zero_grad()
    assert a.grad is None and b.grad is None


def test_bf16_parameters_use_stochastic_rounding():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.ones(8192, dtype=torch.bfloat16))
    opt = FP8AdamW([p], lr=1e-4, weight_decay=0.0)  # each step moves by ~1e-4 < half a bf16 ulp at 1.0
    for _ in range(20):
        p.grad = torch.ones_like(p)
        opt.step()
    assert p.dtype == torch.bfloat16
    # round-to-nearest would leave every weight at exactly 1.0; SR moves the mean by ~20 * 1e-4
    assert 0.997 < p.float().mean().item() < 0.999


def test_bad_arguments():
    p = [torch.nn.Parameter(torch.randn(4))]
    with pytest.raises(ValueError, match="learning rate"):
        FP8AdamW(p, lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        FP8AdamW(p, betas=(0.9, 1.5))
    with pytest.raises(TypeError, match="not floating point"):
        FP8AdamW([torch.zeros(4, dtype=torch.int64)])
    with pytest.raises(ValueError, match=r"m2_format.*'e6m1'.*e4m3, e5m2"):
        FP8QuantizationConfig(m2_format="e6m1")
    with pytest.raises(ValueError, match=r"block_size.*power of two"):
        FP8QuantizationConfig(block_size=100)
