
import copy
import itertools
import json
import logging

import pytest
import torch

from coatflux.core.config import ActivationConfig
from coatflux.core.formats import E4M3, E5M2, quantize, sqnr_db
from coatflux.core.gemm import fp8_gemm_support, fp8_mm, fp8_mm_reference
from coatflux.core.linear import FP8Linear, InputCache

CUDA_FP8 = torch.cuda.is_available() and fp8_gemm_support("cuda").available


def _pair(trainable: bool, bias: bool = True, k: int = 64, n: int = 48):
    torch.manual_seed(0)
    ref = torch.nn.Linear(k, n, bias=bias)
    ref.weight.requires_grad_(trainable)
    layer_src = torch.nn.Linear(k, n, bias=bias)
    layer_src.load_state_dict(ref.state_dict())
    layer_src.weight.requires_grad_(trainable)
    layer = FP8Linear.from_linear(layer_src, ActivationConfig())
    return ref, layer


@pytest.mark.parametrize("trainable", [True, False])
def test_matches_nn_linear_forward_and_backward(trainable):
    ref, layer = _pair(trainable)
    x = torch.randn(4, 10, 64)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_ref, y = ref(x1), layer(x2)
    assert sqnr_db(y_ref, y) > 20
    g = torch.randn_like(y)
    y_ref.backward(g)
    y.backward(g)
    assert sqnr_db(x1.grad, x2.grad) > 15
    assert sqnr_db(ref.bias.grad, layer.bias.grad) > 40
    if trainable:
        assert sqnr_db(ref.weight.grad, layer.weight.grad) > 15
    else:
        assert layer.weight_fp8.dtype == torch.float8_e4m3fn
        assert "weight" not in dict(layer.named_parameters())


def test_frozen_weight_is_stored_once_in_fp8():
    _, layer = _pair(trainable=False)
    assert layer.weight_fp8.element_size() == 1 and layer.weight_scale.numel() == 1
    w = layer.weight
    assert w.shape == (48, 64)


def test_only_the_fp8_input_is_saved_for_backward():
    _, layer = _pair(trainable=False, bias=False)
    x = torch.randn(32, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    activations = [t for t in saved if t is not None and t.numel() == x.numel()]
    assert len(activations) == 1 and activations[0].dtype == torch.float8_e4m3fn


def test_lora_on_fp8_base_matches_reference():
    ref, layer = _pair(trainable=False)
    rank, scale = 4, 0.5
    a = torch.randn(rank, 64, requires_grad=True)
    b = torch.randn(48, rank, requires_grad=True)
    a2, b2 = a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    x = torch.randn(3, 7, 64)
    y_ref = ref(x) + scale * (x @ a.t()) @ b.t()
    y = layer(x, a2, b2, scale)
    assert sqnr_db(y_ref, y) > 20
    g = torch.randn_like(y)
    y_ref.backward(g)
    y.backward(g)
    assert sqnr_db(a.grad, a2.grad) > 20
    assert sqnr_db(b.grad, b2.grad) > 25


def test_siblings_share_one_fp8_input():
    cache = InputCache()
    layers = [FP8Linear.from_linear(torch.nn.Linear(64, 64).requires_grad_(False), ActivationConfig(), cache)
              for _ in range(3)]
    x = torch.randn(16, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        for layer in layers:
            layer(x)
    fp8 = {t.untyped_storage().data_ptr() for t in saved if t.dtype == torch.float8_e4m3fn and t.numel() == x.numel()}
    assert len(fp8) == 1


def test_per_group_linear_granularity():
    ref, _ = _pair(trainable=True)
    src = torch.nn.Linear(64, 48)
    src.load_state_dict(ref.state_dict())
    layer = FP8Linear.from_linear(src, ActivationConfig(linear_granularity="per_group", group_size=16))
    x = torch.randn(5, 64)
    assert sqnr_db(ref(x), layer(x)) > 20


def test_emulated_gemm_equals_reference_exactly():
    a = quantize(torch.randn(33, 64), E4M3, "tensor")
    b = quantize(torch.randn(48, 64), E4M3, "tensor")
    out = fp8_mm(a.data, a.scale, b.data, b.scale, torch.float32, use_scaled_mm=False)
    assert torch.equal(out, fp8_mm_reference(a.data, a.scale, b.data, b.scale, torch.float32))


@pytest.mark.parametrize("use_scaled_mm", [False, True])  # torch._scaled_mm runs on CPU too
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_fp8_mm_adds_the_bias_before_its_one_rounding(use_scaled_mm, out_dtype):
    """The bias goes into the GEMM's epilogue: added to the fp32 product, then rounded once (an fp32
    output, which ``_scaled_mm`` takes no bias for, gets it added after: the same numbers)."""
    torch.manual_seed(1)
    a = quantize(torch.randn(33, 64), E4M3, "tensor")
    b = quantize(torch.randn(48, 64), E4M3, "tensor")
    bias = torch.randn(48, dtype=torch.bfloat16) * 4
    out = fp8_mm(a.data, a.scale, b.data, b.scale, out_dtype, use_scaled_mm, bias)
    ref = fp8_mm_reference(a.data, a.scale, b.data, b.scale, out_dtype, bias)
    assert out.dtype == out_dtype
    if use_scaled_mm:
        assert sqnr_db(ref.float(), out.float()) > 40
    else:
        assert torch.equal(out, ref)
    if out_dtype == torch.bfloat16:  # rounding the product first, then the sum, is another result
        twice = fp8_mm_reference(a.data, a.scale, b.data, b.scale, out_dtype) + bias
        assert not torch.equal(twice, ref)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA_FP8, reason="needs a CUDA GPU with FP8 tensor cores (sm_89+)")
@pytest.mark.parametrize(("fmt_a", "with_bias"), [(E4M3, False), (E5M2, False), (E4M3, True)])
@pytest.mark.parametrize("fast_accum", [False, True])
def test_scaled_mm_matches_reference_on_gpu(fmt_a, with_bias, fast_accum):
    torch.manual_seed(0)
    a = quantize(torch.randn(1000, 4096, device="cuda"), fmt_a, "tensor")  # a long sum, as FLUX's
    b = quantize(torch.randn(512, 4096, device="cuda"), E4M3, "tensor")
    bias = torch.randn(512, device="cuda", dtype=torch.bfloat16) if with_bias else None
    fast = fp8_mm(a.data, a.scale, b.data, b.scale, torch.bfloat16, True, bias, fast_accum)
    ref = fp8_mm_reference(a.data, a.scale, b.data, b.scale, torch.float32, bias)
    # fast accumulation: error at most half, in amplitude, of E4M3's own rounding of a tensor (~31 dB)
    assert sqnr_db(ref, fast.float()) > (37 if fast_accum else 40)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA_FP8, reason="needs a CUDA GPU with FP8 tensor cores (sm_89+)")
def test_fp8_linear_on_gpu_matches_cpu_emulation():
    torch.manual_seed(0)
    src = torch.nn.Linear(256, 512, bias=True).to(torch.bfloat16)
    src.weight.requires_grad_(False)
    x = torch.randn(4, 300, 256, dtype=torch.bfloat16)
    cpu = FP8Linear.from_linear(src, ActivationConfig())
    gpu = FP8Linear.from_linear(copy.deepcopy(src).cuda(), ActivationConfig())  # .cuda() moves in place
    xc, xg = x.clone().requires_grad_(True), x.cuda().requires_grad_(True)
    yc, yg = cpu(xc), gpu(xg)
    assert sqnr_db(yc.float(), yg.float().cpu()) > 30
    g = torch.randn_like(yc)
    yc.backward(g)
    yg.backward(g.cuda())
    assert sqnr_db(xc.grad.float(), xg.grad.float().cpu()) > 25


def test_gemm_planner_decides_each_shape_once(monkeypatch):
    from coatflux.core import linear as linear_module
    from coatflux.core.gemm import GemmPlanner, GemmSupport

    class Planner(GemmPlanner):
        def __init__(self):
            super().__init__()
            self.measured = []

        def _fp8_is_faster(self, device, m, n, k, dtype):
            self.measured.append((m, n, k))
            return m >= 256  # stands in for the timing: FP8 pays only for large GEMMs

    monkeypatch.setattr(linear_module, "fp8_gemm_support", lambda device: GemmSupport(True, ""))
    layer = FP8Linear.from_linear(torch.nn.Linear(64, 48).requires_grad_(False), ActivationConfig())
    layer.planner = Planner()
    dev = torch.device("cpu")
    assert layer.gemm_uses_fp8(dev, 1024, 48, 64) is True
    assert layer.gemm_uses_fp8(dev, 16, 48, 64) is False
    assert layer.gemm_uses_fp8(dev, 1024, 48, 64) is True
    assert layer.planner.measured == [(1024, 48, 64), (16, 48, 64)]  # each shape timed once
    assert layer.gemm_uses_fp8(dev, 1024, 40, 64) is False  # N not a multiple of 16: never FP8
    assert len(layer.planner.choices) == 2


def test_row_plan_merges_equal_rungs_and_times_each_shape_once():
    from coatflux.core.gemm import PLAN_ROWS, GemmPlanner, fp8_for_rows

    measured = []

    class Planner(GemmPlanner):
        def _fp8_linear_is_faster(self, device, m, n, k, dtype):
            measured.append((m, n, k))
            return m == 1 or m >= 1024  # stands in for the timing: a GEMV and large GEMMs pay

    planner = Planner()
    dev = torch.device("cpu")
    plan = planner.row_plan(dev, 48, 64, torch.bfloat16)
    assert plan == ((1, True), (64, False), (1024, True))
    assert planner.row_plan(dev, 48, 64, torch.bfloat16) is plan
    assert measured == [(m, 48, 64) for m in PLAN_ROWS]  # one timing per rung, once per shape
    planner.row_plan(dev, 64, 64, torch.bfloat16)
    assert len(measured) == 2 * len(PLAN_ROWS) and len(planner.plans) == 2
    decisions = {rows: fp8_for_rows(plan, rows) for rows in (1, 2, 63, 64, 1023, 1024, 10**6)}
    assert decisions == {1: True, 2: True, 63: True, 64: False, 1023: False, 1024: True, 10**6: True}
    assert fp8_for_rows(((1, False),), 10**6) is False


def test_row_plan_times_the_fp8_and_the_plain_linear():
    from coatflux.core.gemm import GemmPlanner

    outputs = []

    def timer(fn, device):
        outputs.append(fn())
        return -float(len(outputs))  # the path timed second (plain) is reported faster

    planner = GemmPlanner(timer=timer)
    try:
        faster = planner._fp8_linear_is_faster(torch.device("cpu"), 32, 48, 64, torch.bfloat16)
    except (RuntimeError, NotImplementedError):
        pytest.skip("this PyTorch build has no CPU torch._scaled_mm to time")
    fp8, plain = outputs
    assert faster is False
    # both paths end with the input gradient of the same random linear, FP8 (E5M2 gradient) or not
    assert fp8.shape == plain.shape == (32, 64) and fp8.dtype == plain.dtype == torch.bfloat16
    assert sqnr_db(plain.float(), fp8.float()) > 20


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA_FP8, reason="needs a CUDA GPU with FP8 tensor cores (sm_89+)")
def test_row_plan_on_gpu_is_measured_and_well_formed():
    from coatflux.core.gemm import GemmPlanner

    planner = GemmPlanner()
    for n, k in ((3072, 3072), (12288, 3072), (3072, 12288)):  # FLUX.1-dev's attention and MLP linears
        plan = planner.row_plan(torch.device("cuda"), n, k, torch.bfloat16)
        rows = [r for r, _ in plan]
        assert rows[0] == 1 and rows == sorted(set(rows))
        assert all(a[1] != b[1] for a, b in itertools.pairwise(plan))


def test_gemm_planner_compares_the_two_real_gemm_paths():
    from coatflux.core.gemm import GemmPlanner

    seen = []

    def timer(fn, device):
        seen.append(fn())
        return float(len(seen))  # the first path timed (FP8) is reported faster

    planner = GemmPlanner(timer=timer)
    try:
        decision = planner.use_fp8(torch.device("cpu"), 32, 16, 32, torch.float32)
    except (RuntimeError, NotImplementedError):
        pytest.skip("this PyTorch build has no CPU torch._scaled_mm to time")
    assert decision is True and seen[0].shape == seen[1].shape == (32, 16)
    assert sqnr_db(seen[1], seen[0].float()) > 30


def test_plan_cache_keeps_row_plans_for_the_next_run(tmp_path, caplog):
    """A plan timed once is read back by a later planner (a later run) instead of being timed again,
    so the compiled graphs stay the same; the key carries the card, software and rungs."""
    from coatflux.core.gemm import PLAN_ROWS, GemmPlanner, PlanCache

    timed = []

    class Planner(GemmPlanner):
        def _fp8_linear_is_faster(self, device, m, n, k, dtype):
            timed.append(m)
            return m >= 512

    dev, path = torch.device("cpu"), tmp_path / "cache" / "plans.json"
    first = Planner(cache=PlanCache(path)).row_plan(dev, 48, 64, torch.bfloat16)
    assert first == ((1, False), (512, True)) and len(timed) == len(PLAN_ROWS) and path.is_file()
    with caplog.at_level(logging.INFO, logger="coatflux.core.gemm"):
        again = Planner(cache=PlanCache(path)).row_plan(dev, 48, 64, torch.bfloat16)
    assert again == first and len(timed) == len(PLAN_ROWS)  # not timed again
    assert f"from {path}" in caplog.text
    Planner(cache=PlanCache(path)).row_plan(dev, 64, 64, torch.bfloat16)  # another shape joins the file
    key = PlanCache.key(dev, 48, 64, torch.bfloat16)
    assert torch.__version__ in key and ",".join(map(str, PLAN_ROWS)) in key and "48x64 bfloat16" in key
    assert {key, PlanCache.key(dev, 64, 64, torch.bfloat16)} == set(json.loads(path.read_text())["plans"])
    # GEMMs with fast accumulation are timed apart: their plan has a key of its own
    Planner(cache=PlanCache(path), fast_accum=True).row_plan(dev, 48, 64, torch.bfloat16)
    assert len(timed) == 3 * len(PLAN_ROWS)
    assert PlanCache.key(dev, 48, 64, torch.bfloat16, fast_accum=True) in json.loads(path.read_text())["plans"]


@pytest.mark.parametrize("fast", [False, True])
def test_fp8_linear_gives_its_accumulation_choice_to_every_gemm(monkeypatch, fast):
    """``fp8_fast_accumulation`` reaches the forward, input-gradient and weight-gradient GEMMs."""
    from coatflux.core import linear as linear_mod

    seen, real = [], linear_mod.fp8_mm

    def spy(*args, **kwargs):
        seen.append(kwargs["fast_accum"] if "fast_accum" in kwargs else args[7])
        return real(*args, **kwargs)

    monkeypatch.setattr(linear_mod, "fp8_mm", spy)
    layer = FP8Linear.from_linear(torch.nn.Linear(64, 48, dtype=torch.bfloat16),
                                  ActivationConfig(fp8_fast_accumulation=fast), trainable=True)
    x = torch.randn(8, 64, dtype=torch.bfloat16, requires_grad=True)
    layer(x).float().sum().backward()
    assert seen == [fast] * 3


@pytest.mark.parametrize("content", ["{not json", '{"version": 99, "plans": {}}', '[1, 2]'])
def test_plan_cache_that_cannot_be_read_is_named_and_replaced(tmp_path, caplog, content):
    from coatflux.core.gemm import GemmPlanner, PlanCache

    class Planner(GemmPlanner):
        def _fp8_linear_is_faster(self, device, m, n, k, dtype):
            return True

    path = tmp_path / "plans.json"
    path.write_text(content)
    with caplog.at_level(logging.WARNING, logger="coatflux.core.gemm"):
        plan = Planner(cache=PlanCache(path)).row_plan(torch.device("cpu"), 48, 64, torch.bfloat16)
    assert plan == ((1, True),) and str(path) in caplog.text
    assert json.loads(path.read_text())["version"] == PlanCache.VERSION  # rewritten whole, readable


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_replay_time_measures_the_gpu_work():
    """Replaying a captured GEMM takes about as long as the GEMM; launched one small kernel at a time
    from Python, the same work takes longer (host-bound)."""
    from coatflux.core.gemm import cuda_event_time, graph_replay_time

    dev = torch.device("cuda")
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    big = graph_replay_time(lambda: a @ a, dev)
    assert 0.5 < big / cuda_event_time(lambda: a @ a, dev) < 1.5
    x = torch.randn(64, device=dev)

    def many_small() -> None:
        for _ in range(200):
            x.mul_(1.0)

    assert graph_replay_time(many_small, dev) < cuda_event_time(many_small, dev)
