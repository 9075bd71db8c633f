"""Fast paths against the reference: the multi-tensor FP8AdamW step gives the reference's bytes."""

from __future__ import annotations

import io

import pytest
import torch

from coatflux.core.formats import sqnr_db
from coatflux.core.optim import FP8AdamW
from coatflux.kernels.adamw import FusedFP8AdamW

# LoRA-like matrices, a tensor that is not a whole number of 128-blocks, one below the FP8
# threshold (fp32 moments) and a bf16 one (stochastic rounding): the last two take the reference path.
SHAPES = [(16, 3072), (3072, 16), (33, 129), (16, 64), (7,)]


def _pair(device: str, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen) * 0.1 for s in SHAPES * 2]
    params.append(torch.randn(64, 128, generator=gen).to(torch.bfloat16))
    ref = [p.clone().to(device).requires_grad_() for p in params]
    fused = [p.clone().to(device).requires_grad_() for p in params]
    return ref, fused, gen


def _run(ref, fused, gen, opt_ref, opt_fused, steps):
    for _ in range(steps):
        for a, b in zip(ref, fused, strict=True):
            g = torch.randn(a.shape, generator=gen) * 10.0 ** float(torch.randint(-4, 2, (), generator=gen))
            a.grad, b.grad = g.to(a), g.to(b)
        opt_ref.step()
        opt_fused.step()


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype.is_floating_point and t.element_size() == 1 else t


def _assert_same_state(opt_ref, opt_fused, ref, fused):
    for a, b in zip(ref, fused, strict=True):
        sa, sb = opt_ref.state[a], opt_fused.state[b]
        assert sa.keys() == sb.keys()
        for key, va in sa.items():
            vb = sb[key]
            assert (va.dtype, va.shape) == (vb.dtype, vb.shape), key
            assert torch.equal(_bytes(va).cpu(), _bytes(vb).cpu()), (key, a.shape)


@pytest.mark.parametrize("seed", [0, 1])
def test_fused_step_is_byte_identical_to_reference(seed):
    ref, fused, gen = _pair("cpu", seed)
    opt_ref, opt_fused = FP8AdamW(ref, lr=1e-2), FusedFP8AdamW(fused, lr=1e-2)
    _run(ref, fused, gen, opt_ref, opt_fused, steps=4)
    for a, b in zip(ref, fused, strict=True):
        assert torch.equal(a, b)
    _assert_same_state(opt_ref, opt_fused, ref, fused)


def test_fused_state_round_trips_through_torch_save():
    ref, fused, gen = _pair("cpu")
    opt_ref, opt_fused = FP8AdamW(ref, lr=1e-2), FusedFP8AdamW(fused, lr=1e-2)
    _run(ref, fused, gen, opt_ref, opt_fused, steps=2)
    buf = io.BytesIO()
    torch.save(opt_fused.state_dict(), buf)
    buf.seek(0)
    reloaded = FusedFP8AdamW(fused, lr=1e-2)
    reloaded.load_state_dict(torch.load(buf, weights_only=True))
    _run(ref, fused, gen, opt_ref, reloaded, steps=2)
    for a, b in zip(ref, fused, strict=True):
        assert torch.equal(a, b)
    _assert_same_state(opt_ref, reloaded, ref, fused)


def test_skipped_gradients_and_uneven_steps_stay_exact():
    ref, fused, gen = _pair("cpu")
    opt_ref, opt_fused = FP8AdamW(ref, lr=1e-2), FusedFP8AdamW(fused, lr=1e-2)
    _run(ref, fused, gen, opt_ref, opt_fused, steps=1)
    for a, b in zip(ref[::2], fused[::2], strict=True):  # half the tensors get no gradient once
        a.grad = b.grad = None
    opt_ref.step()
    opt_fused.step()
    _run(ref, fused, gen, opt_ref, opt_fused, steps=2)  # now two step counts live in one group
    for a, b in zip(ref, fused, strict=True):
        assert torch.equal(a, b)
    _assert_same_state(opt_ref, opt_fused, ref, fused)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_step_matches_reference_on_cuda():
    ref, fused, gen = _pair("cuda")
    opt_ref, opt_fused = FP8AdamW(ref, lr=1e-2), FusedFP8AdamW(fused, lr=1e-2)
    _run(ref, fused, gen, opt_ref, opt_fused, steps=4)
    for a, b in zip(ref, fused, strict=True):
        assert sqnr_db(a.float() - 0, b.float()) > 60  # expected identical; 60 dB allows FMA contraction
    for a, b in zip(ref, fused, strict=True):
        for moment in ("exp_avg", "exp_avg_sq"):
            da, db = opt_ref._decode(opt_ref.state[a], moment), opt_fused._decode(opt_fused.state[b], moment)
            assert sqnr_db(da, db) > 30
    same = sum(torch.equal(_bytes(opt_ref.state[a]["exp_avg"]), _bytes(opt_fused.state[b]["exp_avg"]))
               for a, b in zip(ref, fused, strict=True))
    print(f"fused FP8AdamW on CUDA: {same}/{len(ref)} first-moment code tensors byte-identical")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_step_on_cuda_does_not_synchronize():
    """After the first (compiling) step, a step queues its work without waiting for the GPU."""
    gen = torch.Generator().manual_seed(0)
    fused = [torch.randn(s, generator=gen).cuda().requires_grad_() for s in SHAPES[:3]]  # all in the bucket
    opt = FusedFP8AdamW(fused, lr=1e-2)
    assert all(opt._fusable(p) for p in fused)
    for p in fused:
        p.grad = torch.randn(p.shape, generator=gen).to(p)
    opt.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_fused_state_is_views_of_flat_buffers_saved_once():
    """The per-tensor state is views of the bucket's buffers; the checkpoint is as small as the reference's."""
    ref, fused, gen = _pair("cpu")
    opt_ref, opt_fused = FP8AdamW(ref, lr=1e-2), FusedFP8AdamW(fused, lr=1e-2)
    _run(ref, fused, gen, opt_ref, opt_fused, steps=2)
    flat = [opt_fused.state[p]["exp_avg"] for p in fused if opt_fused._fusable(p)]
    assert len({t.untyped_storage().data_ptr() for t in flat}) == 1
    sizes = []
    for opt in (opt_ref, opt_fused):
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        sizes.append(buf.tell())
    assert sizes[1] < 1.05 * sizes[0]


def test_fused_buckets_follow_the_tensors_that_step_together():
    ref, fused, gen = _pair("cpu")
    opt_ref, opt_fused = FP8AdamW(ref, lr=1e-2), FusedFP8AdamW(fused, lr=1e-2)
    _run(ref, fused, gen, opt_ref, opt_fused, steps=1)
    assert len(opt_fused._buckets) == 1
    for a, b in zip(ref[::2], fused[::2], strict=True):
        a.grad = b.grad = None
    opt_ref.step()
    opt_fused.step()
    assert len(opt_fused._buckets) == 1  # the old bucket (all tensors) was dropped with its buffers
    _run(ref, fused, gen, opt_ref, opt_fused, steps=1)
    assert len(opt_fused._buckets) == 2  # two step counts: two buckets, nothing stale
    _assert_same_state(opt_ref, opt_fused, ref, fused)


def test_fused_step_reuses_its_plan_until_the_tensors_with_gradients_change(monkeypatch):
    ref, fused, gen = _pair("cpu")
    opt_ref, opt_fused = FP8AdamW(ref, lr=1e-2), FusedFP8AdamW(fused, lr=1e-2)
    plans = []
    make_plan = opt_fused._plan
    monkeypatch.setattr(opt_fused, "_plan", lambda *a: plans.append(make_plan(*a)) or plans[-1])
    _run(ref, fused, gen, opt_ref, opt_fused, steps=3)
    assert len(plans) == 1  # planned on the first step, reused on the next two
    for a, b in zip(ref[:3], fused[:3], strict=True):
        a.grad = b.grad = None
    opt_ref.step()
    opt_fused.step()
    assert len(plans) == 2  # fewer tensors with gradients: planned again
    _run(ref, fused, gen, opt_ref, opt_fused, steps=1)
    assert len(plans) == 3  # all of them again, now with two step counts
    _assert_same_state(opt_ref, opt_fused, ref, fused)
    for a, b in zip(ref, fused, strict=True):
        assert torch.equal(a, b)


def test_compiled_update_matches_the_eager_one_and_compiles_once():
    """The compiled bucket update (what a GPU runs) against the eager one, on inductor's CPU code:
    codes and metadata identical, parameters within a fused multiply-add's rounding; and the step's
    numbers are inputs, so steps with new learning rates and bias corrections reuse the one graph."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from coatflux.kernels import quant
    from coatflux.kernels.adamw import bucket_update_

    eager, compiled, gen = _pair("cpu", seed=3)
    opt_eager, opt_compiled = FusedFP8AdamW(eager, lr=1e-2), FusedFP8AdamW(compiled, lr=1e-2, compiled=True)
    counter = CompileCounterWithBackend("inductor")
    opt_compiled._compiled_update = torch.compile(bucket_update_, backend=counter, fullgraph=True)
    with torch._inductor.config.patch(quant._inductor_options()):  # as FusedFP8AdamW compiles it
        for step in range(4):
            for group in (*opt_eager.param_groups, *opt_compiled.param_groups):
                group["lr"] = 1e-2 / (step + 1)
            _run(eager, compiled, gen, opt_eager, opt_compiled, steps=1)
    assert counter.frame_count == 1
    _assert_same_state(opt_eager, opt_compiled, eager, compiled)
    for a, b in zip(eager, compiled, strict=True):  # a rounding of the tensor's largest values at most
        ulp = torch.finfo(torch.float32).eps * a.detach().abs().max()
        torch.testing.assert_close(b, a, rtol=0, atol=float(ulp))


def test_compiled_option_is_checked_and_defaults_to_where_the_fast_kernels_run():
    with pytest.raises(TypeError, match="compiled must be true, false or null"):
        FusedFP8AdamW([torch.zeros(4, requires_grad=True)], compiled="yes")
    cpu = torch.zeros(4)
    assert not FusedFP8AdamW([torch.zeros(4, requires_grad=True)])._compile(cpu)  # a CPU runs the eager update
    assert FusedFP8AdamW([torch.zeros(4, requires_grad=True)], compiled=True)._compile(cpu)
