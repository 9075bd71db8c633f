"""FP8RangeMonitor: exact overflow / underflow / non-finite counts per FP8 layer, zero cost when off."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from coatflux.core.api import apply_coat
from coatflux.core.config import ActivationConfig, COATConfig
from coatflux.core.formats import E4M3, E5M2, cast_to_fp8, dequantize, quantize
from coatflux.core.linear import FP8Linear
from coatflux.core.stats import (
    SAVED_ACTIVATIONS,
    FP8RangeMonitor,
    RangeCounts,
    count_range,
    format_counts,
    saturation_threshold,
    total_counts,
)


def _outlier_tensor(n_tiny: int = 5, n_normal: int = 7) -> torch.Tensor:
    """One huge value sets the per-tensor scale: 1e-6 flushes to zero (in E4M3 and E5M2), 1.0 does not."""
    return torch.tensor([1e4] + [1e-6] * n_tiny + [1.0] * n_normal + [0.0] * 3)


def test_tiny_values_flush_under_an_outlier_scale():
    x = _outlier_tensor()
    for fmt in (E4M3, E5M2):
        counts = count_range(x, quantize(x, fmt, "tensor"))
        assert counts == RangeCounts(total=16, overflow=0, underflow=5, nonfinite=0)


def test_group_scaling_keeps_what_tensor_scaling_flushes():
    x = torch.cat([_outlier_tensor(), torch.full((16,), 1e-6)])  # second 1x16 group: only tiny values
    assert count_range(x, quantize(x, E4M3, "tensor")).underflow == 5 + 16
    assert count_range(x, quantize(x, E4M3, "group", 16, pow2_scales=True)).underflow == 5


def test_amax_scaling_never_overflows_but_counts_nonfinite():
    torch.manual_seed(0)
    # Random magnitudes over 60 binades: amax / (amax / max) lands above max by an fp32 ulp for
    # some of them; that rounds to max anyway and must not count as an overflow.
    x = torch.randn(64, 256) * torch.exp2(torch.randint(-30, 30, (64, 1)).float())
    for row in x:
        for fmt in (E4M3, E5M2):
            assert count_range(row, quantize(row, fmt, "tensor")).overflow == 0
    y = torch.tensor([1.0, float("inf"), -float("inf"), float("nan"), 2.0])
    counts = count_range(y, quantize(y, E4M3, "tensor"))
    assert counts == RangeCounts(total=5, overflow=0, underflow=0, nonfinite=3)


def test_forced_saturation_is_counted_exactly():
    x = torch.tensor([1.0, -2.0, 100.0, -1000.0, 0.0, float("inf")])
    scale = torch.tensor(1.0)  # a stale scale, not this tensor's amax / 448
    q = dataclasses.replace(quantize(x, E4M3, "tensor"), data=cast_to_fp8(x / scale, E4M3), scale=scale)
    assert count_range(x, q) == RangeCounts(total=6, overflow=1, underflow=0, nonfinite=1)
    # Just above max but within half an ulp rounds to max without saturation: not an overflow.
    t = saturation_threshold(E4M3)
    assert t == 464.0 and saturation_threshold(E5M2) == 61440.0
    edge = torch.tensor([449.0, t, t + 1.0])
    assert torch.tensor([449.0, t]).to(torch.float8_e4m3fn).float().tolist() == [448.0, 448.0]
    q = dataclasses.replace(q, data=cast_to_fp8(edge, E4M3), shape=edge.shape)
    assert count_range(edge, q).overflow == 1


def test_all_subnormal_tensor_underflows_without_nan():
    # amax / 448 underflows to 0 in fp32; the quantizer then uses scale 1 (a zero scale would make
    # 0/0 = NaN of the zeros), so the tiny values flush to zero: underflow, not overflow.
    x = torch.tensor([1e-44, -1e-44, 0.0])
    q = quantize(x, E4M3, "tensor")
    assert torch.equal(dequantize(q, torch.float32).abs(), torch.zeros(3))
    assert count_range(x, q) == RangeCounts(total=3, overflow=0, underflow=2, nonfinite=0)


class _TwoLinears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(16, 32)
        self.act = nn.GELU(approximate="tanh")
        self.down = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


def _model(trainable: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = _TwoLinears()
    model.requires_grad_(False)
    if trainable:
        model.up.weight.requires_grad_(True)
    config = COATConfig(activation=ActivationConfig(group_size=16, min_saved_numel=1))
    return apply_coat(model, config)


def _outlier_batch(rows: int = 4) -> torch.Tensor:
    x = torch.full((rows, 16), 1e-6)
    x[0, 0] = 1e4
    return x.requires_grad_(True)


def test_counts_per_layer_name_in_a_model():
    model = _model(trainable=True)
    assert isinstance(model.up, FP8Linear) and isinstance(model.down, FP8Linear)
    x = _outlier_batch()
    with FP8RangeMonitor(model) as monitor:
        model(x).sum().backward()
        model(x).sum().backward()  # second step: inputs and gradients counted again, weight not
        counts = monitor.snapshot()
    assert counts["up:input"] == RangeCounts(total=2 * 64, overflow=0, underflow=2 * 63, nonfinite=0)
    assert counts["up:weight"].total == 32 * 16  # trainable: counted once, though quantized 4 times
    assert "down:weight" not in counts  # frozen: quantized at conversion, original gone
    assert counts["down:input"].total == 2 * 4 * 32 and counts["down:grad_output"].total == 2 * 4 * 16
    assert counts["up:grad_output"].total == 2 * 4 * 32
    assert all(c.overflow == 0 and c.nonfinite == 0 for c in counts.values())
    assert counts[SAVED_ACTIVATIONS].total > 0  # the compressor's own copies (GELU input)
    assert set(counts) == {"up:input", "up:weight", "up:grad_output", "down:input", "down:grad_output",
                           SAVED_ACTIVATIONS}
    worst = max(counts, key=lambda k: (counts[k].lost, k))
    lossy = sum(1 for c in counts.values() if c.lost)
    assert worst == "up:input" and lossy >= 2
    line = format_counts(counts, top=1)
    assert line.startswith("FP8 range: 1536 values in 6 tensors; overflow 0, ")
    assert f"worst: {worst} uf={counts[worst].underflow} (" in line and line.endswith(f"; +{lossy - 1} more")


def test_disabled_monitor_counts_nothing_and_attaches_nothing():
    model = _model()
    compressor = model.coat_context.compressor
    monitor = FP8RangeMonitor(model, enabled=False)
    assert "range_observer" not in vars(model.up) and compressor.range_observer is None
    model(_outlier_batch()).sum().backward()
    assert monitor.snapshot() == {}
    monitor.enabled = True
    model(_outlier_batch()).sum().backward()
    assert monitor.snapshot()["up:input"].underflow == 63
    monitor.enabled = False
    model(_outlier_batch()).sum().backward()
    assert monitor.snapshot()["up:input"].underflow == 63
    monitor.reset()
    assert monitor.snapshot() == {}


def test_close_detaches_and_nan_inputs_are_counted():
    model = _model()
    compressor = model.coat_context.compressor
    monitor = FP8RangeMonitor(model)
    assert vars(model.up)["range_observer"] is not None and compressor.range_observer is not None
    x = torch.randn(4, 16)
    x[1, 2] = float("nan")
    model(x)
    assert monitor.snapshot()["up:input"] == RangeCounts(64, 0, 0, 1)
    monitor.close()
    assert FP8Linear.range_observer is None
    assert "range_observer" not in vars(model.up) and "range_observer" not in vars(model.down)
    assert compressor.range_observer is None
    with pytest.raises(RuntimeError):
        monitor.enabled = True
    assert monitor.snapshot()["up:input"].total == 64  # counts stay readable
    with FP8RangeMonitor(model) as again:  # a closed monitor frees the model for another
        model(x)
    assert again.snapshot()["up:input"].total == 64


def test_one_monitor_per_model():
    model = _model()
    with FP8RangeMonitor(model), pytest.raises(RuntimeError, match="already has a range observer"):
        FP8RangeMonitor(model)


def test_range_counts_arithmetic_and_clean_log_line():
    a, b = RangeCounts(10, 1, 2, 3), RangeCounts(5, 0, 1, 0)
    assert a + b == a.merge(b) == RangeCounts(15, 1, 3, 3)
    assert total_counts({"x": a, "y": b}) == total_counts([a, b]) == RangeCounts(15, 1, 3, 3)
    assert format_counts({"x": RangeCounts(8)}) == (
        "FP8 range: 8 values in 1 tensors; overflow 0, underflow 0 (0%), non-finite 0")
