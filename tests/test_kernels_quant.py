"""The fused quantize/dequantize of :mod:`coatflux.kernels.quant` against the reference, byte for byte.

Codes and scales must be byte-identical; dequantized values too, except a NaN's payload bits.

CPU: the traced graphs run under ``aot_eager`` (same graph, same ops; fp32, ~15 s on 2 cores), and
inductor's CPU code for both dtypes on part of the matrix (~35 s to compile cold, so that test is ``slow``).
CUDA (``gpu``): inductor, as training runs it, directly and through ``formats.quantize``.
"""

from __future__ import annotations

import pytest
import torch

from coatflux.core import formats
from coatflux.core.formats import E4M3, E5M2, dequantize_reference, quantize_reference
from coatflux.kernels import quant

FORMATS = [E4M3, E5M2]
SHAPES = [(64, 48), (3, 5, 21), (1,)]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _input(shape: tuple[int, ...], dtype: torch.dtype, device: str, seed: int = 0) -> torch.Tensor:
    """Random values over many binades, plus zeros, a constant group, saturating values, inf and NaN."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * torch.exp2(torch.randint(-20, 20, shape, generator=gen).float())
    flat = x.view(-1)
    if flat.numel() >= 64:
        flat[:16] = 0.0  # an all-zero group
        flat[16:32] = 3.0  # a constant group
        flat[33] = 1e30  # saturates any scale made without it
        flat[40], flat[41], flat[42] = float("inf"), float("-inf"), float("nan")
        flat[50] = 2.0**-130  # an fp32 subnormal
    return x.to(dtype=dtype, device=device)


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes (NaN compares equal to the same NaN, -0.0 differs from +0.0)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def _assert_identical(a: torch.Tensor, b: torch.Tensor, what: str = "") -> None:
    assert (a.dtype, a.shape) == (b.dtype, b.shape), what
    bytes_a, bytes_b = _bytes(a), _bytes(b)
    if not torch.equal(bytes_a, bytes_b):  # say where: a GPU run is rare and its log is all there is
        width = a.element_size()
        differ = (bytes_a != bytes_b).reshape(-1, width).any(dim=1).nonzero().flatten()
        first = int(differ[0])
        flat_a, flat_b = a.detach().cpu().reshape(-1), b.detach().cpu().reshape(-1)
        raise AssertionError(f"{what}: {differ.numel()} of {a.numel()} elements differ; first at {first}: "
                             f"reference {flat_a[first].item()!r} vs fast {flat_b[first].item()!r}")


def _assert_same_values(a: torch.Tensor, b: torch.Tensor) -> None:
    """Dequantized values: bit for bit, except the bits of a NaN (payload and sign are not specified).

    Eager widens the FP8 NaN 0x7F to fp32 0x7FF00000; inductor's vectorised CPU code gives the
    canonical 0x7FC00000, or the x86 default NaN 0xFFC00000 after a masked load. All are the same
    quiet NaN. Codes and scales are compared with every bit, NaN codes included.
    """
    assert (a.dtype, a.shape) == (b.dtype, b.shape)
    a, b = a.detach().cpu(), b.detach().cpu()
    nan = torch.isnan(a)
    assert torch.equal(nan, torch.isnan(b))
    _assert_identical(a[~nan], b[~nan])


def _check_tensor(x: torch.Tensor, fmt, backend: str) -> None:
    ref, fast = quantize_reference(x, fmt, "tensor"), quant.quantize_tensor(x, fmt, backend=backend)
    where = f"per-tensor {fmt.name} {x.dtype} {tuple(x.shape)} on {x.device.type} ({backend})"
    _assert_identical(ref.scale, fast.scale, f"{where}, scale")
    _assert_identical(ref.data, fast.data, f"{where}, codes (scale {ref.scale.item()!r})")
    _assert_same_values(dequantize_reference(ref), quant.dequantize(fast, backend=backend))


def _check_group(x: torch.Tensor, fmt, group: int, backend: str) -> None:
    ref = quantize_reference(x, fmt, "group", group, pow2_scales=True)
    fast = quant.quantize_group_pow2(x, fmt, group, backend=backend)
    where = f"group-{group} {fmt.name} {x.dtype} {tuple(x.shape)} on {x.device.type} ({backend})"
    _assert_identical(ref.scale, fast.scale, f"{where}, exponents")
    _assert_identical(ref.data, fast.data, f"{where}, codes")
    _assert_same_values(dequantize_reference(ref), quant.dequantize(fast, backend=backend))
    _assert_same_values(dequantize_reference(ref, torch.float32), quant.dequantize(fast, torch.float32, backend=backend))


def _check_all(device: str, backend: str, dtypes: tuple[torch.dtype, ...],
               shapes: list[tuple[int, ...]] = SHAPES, groups: tuple[int, ...] = (16, 32),
               group_formats: tuple = tuple(FORMATS)) -> None:
    for dtype in dtypes:
        for shape in shapes:
            x = _input(shape, dtype, device)
            for fmt in FORMATS:
                _check_tensor(x, fmt, backend)
                for group in groups if fmt in group_formats else ():
                    _check_group(x, fmt, group, backend)


def test_traced_graph_matches_reference_on_cpu():
    """The traced graphs through AOT autograd, fp32: the inductor test below runs both dtypes compiled."""
    _check_all("cpu", "aot_eager", (torch.float32,))


def test_tensor_of_tiny_values_and_zeros_gives_no_nan():
    # amax / max underflows to 0 in fp32 for E5M2: both paths must use scale 1 (0/0 would make the
    # zeros NaN). For E4M3 the quotient of 2**-140 is the smallest subnormal, a scale of its own.
    x = torch.tensor([0.0, 1e-44, -1e-44, 0.0, 2.0**-140])
    for fmt in FORMATS:
        ref = quantize_reference(x, fmt, "tensor")
        assert not torch.isnan(dequantize_reference(ref, torch.float32)).any()
        _check_tensor(x, fmt, "aot_eager")


@pytest.mark.slow
def test_inductor_cpu_matches_reference():
    """Inductor's C++ for both dtypes: per tensor in both formats, per group of 16 in E4M3 (COAT's
    activations), with rows a multiple of the group and rows that are not. Each further format,
    group size, rank or a one-element tensor compiles every kernel again (93 s cold on 2 cores for
    the whole matrix): those run in the ``aot_eager`` test above, the graphs inductor compiles here."""
    _check_all("cpu", "inductor", (torch.float32, torch.bfloat16), SHAPES[:2], (16,), (E4M3,))


def test_pow2_exponent_from_bits_matches_log2_reference():
    """The bit formula gives the reference's exponents at and around every binade boundary."""
    k = torch.arange(-140, 120, dtype=torch.float32)
    for fmt in FORMATS:
        edges = fmt.max * torch.exp2(k)
        amax = torch.cat([edges, torch.nextafter(edges, torch.tensor(0.0)), torch.nextafter(edges, torch.tensor(1e38)),
                          torch.rand(5000) * torch.exp2(torch.randint(-149, 127, (5000,)).float()),
                          torch.tensor([0.0, 1.4e-45, torch.finfo(torch.float32).max])])
        amax = amax[torch.isfinite(amax)]
        expected = formats.pow2_exponent(formats.scale_from_amax(amax, fmt, pow2=True))
        assert torch.equal(quant._pow2_exponent_of(amax, fmt.max).to(torch.int8), expected)


def test_pow2_is_exact_eager_and_compiled():
    k = torch.arange(-127, 128, dtype=torch.int32)
    expected = torch.exp2(k.double()).float()
    assert torch.equal(quant._pow2(k), expected)
    compiled = torch.compile(quant._pow2, backend="inductor", fullgraph=True, options=quant._inductor_options())
    assert torch.equal(compiled(k), expected)


@pytest.mark.gpu
@needs_cuda
def test_pow2_is_exact_on_cuda_eager_and_compiled():
    """Every exponent on the device: CUDA does not promise ``exp2f`` exact at integers."""
    k = torch.arange(-127, 128, dtype=torch.int32, device="cuda")
    expected = torch.exp2(k.cpu().double()).float()
    assert torch.equal(quant._pow2(k).cpu(), expected)
    compiled = torch.compile(quant._pow2, backend="inductor", fullgraph=True, options=quant._inductor_options())
    assert torch.equal(compiled(k).cpu(), expected)


def test_compiled_kernels_keep_sizes_symbolic_and_the_group_constant():
    """One graph for every shape, with the group size traced as the number it is, not as a symbol."""
    seen = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        seen.append([v for v in example_inputs if isinstance(v, torch.SymInt)])
        return gm.forward

    compiled = quant.compile_kernel(quant._quantize_group_fn(E4M3, 16), "test_group_constant", backend)
    for shape in [(8, 40), (5, 72)]:
        x = torch.randn(shape)
        ref = quantize_reference(x, E4M3, "group", 16, pow2_scales=True)
        codes, exponent = compiled(x)
        _assert_identical(ref.data, codes)
        _assert_identical(ref.scale, exponent)
    assert len(seen) == 1  # the second shape reused the graph
    assert len(seen[0]) == 2  # the two sizes of the rows; a symbolic group would be a third


def test_dispatch_rule(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(formats, "fast_path_available", lambda device_type: True)
    monkeypatch.delenv(formats.REFERENCE_ENV, raising=False)
    assert formats.uses_fast_path(cuda) and not formats.uses_fast_path(cpu)
    assert not formats.uses_fast_path(cuda, reference=True)
    monkeypatch.setenv(formats.REFERENCE_ENV, "1")
    assert not formats.uses_fast_path(cuda)
    monkeypatch.setenv(formats.REFERENCE_ENV, "0")
    assert formats.uses_fast_path(cuda)


def test_quantize_routes_supported_layouts_only(monkeypatch):
    calls = []
    monkeypatch.setattr(formats, "uses_fast_path", lambda device, reference=False: not reference)
    monkeypatch.setattr(quant, "quantize_tensor", lambda x, fmt: calls.append("tensor") or quantize_reference(x, fmt))
    monkeypatch.setattr(quant, "quantize_group_pow2",
                        lambda x, fmt, g: calls.append("group") or quantize_reference(x, fmt, "group", g, True))
    x = torch.randn(4, 32)
    formats.quantize(x, E4M3, "tensor")
    formats.quantize(x, E4M3, "group", 16, pow2_scales=True)
    formats.quantize(x, E4M3, "group", 16)  # fp32 group scales: reference
    formats.quantize(x, E4M3, "block", 16, pow2_scales=True)  # blocks: reference
    formats.quantize(x, E4M3, "tensor", reference=True)
    assert calls == ["tensor", "group"]


def test_cpu_uses_reference_without_compiling():
    assert not formats.uses_fast_path(torch.device("cpu"))
    assert quant.supports("tensor") and quant.supports("group", pow2=True) and not quant.supports("group")


@pytest.mark.gpu
@needs_cuda
def test_cuda_fast_path_is_available():
    ok, reason = quant.available("cuda")
    assert ok, reason
    assert formats.uses_fast_path(torch.device("cuda"))


@pytest.mark.gpu
@needs_cuda
def test_cuda_inductor_matches_reference():
    # bf16 only (what FLUX runs): each dtype is another ~20 Triton compilations, and the GPU check has 60 s
    _check_all("cuda", "inductor", (torch.bfloat16,))


@pytest.mark.gpu
@needs_cuda
def test_cuda_dispatch_matches_reference():
    """``formats.quantize``/``dequantize`` (the fast path on CUDA) on a FLUX-sized activation."""
    x = _input((2, 4096, 3072), torch.bfloat16, "cuda", seed=1)
    for args in [(E4M3, "tensor"), (E5M2, "tensor"), (E4M3, "group", 16, True)]:
        ref, fast = quantize_reference(x, *args), formats.quantize(x, *args)
        _assert_identical(ref.data, fast.data)
        _assert_identical(ref.scale, fast.scale)
        _assert_same_values(dequantize_reference(ref), formats.dequantize(fast))


def test_per_tensor_scale_over_several_amax_blocks():
    """Two full blocks of partial maxima and a padded tail; the largest finite value in the tail."""
    x = torch.randn(3, 2900) * 0.01  # 8700 elements: blocks of 4096, 4096 and 508
    x.view(-1)[8699] = -7.5
    x.view(-1)[5] = float("inf")  # ignored by the scale, saturated in the codes
    for dtype in (torch.float32, torch.bfloat16):
        _check_tensor(x.to(dtype), E4M3, "inductor")
    assert quant.AMAX_BLOCK < x.numel() < 3 * quant.AMAX_BLOCK


def test_scale_divided_in_fp64_is_the_fp32_quotient():
    """``_quantize_tensor`` divides ``amax`` in fp64 and rounds to fp32, so that no backend's fp32
    division (Triton's approximate ``div.full``, a reciprocal multiply) can change the scale. That
    relies on double rounding being harmless for division (53 >= 2 * 24 + 2): checked here on
    random amax over the whole fp32 range, subnormal quotients included."""
    gen = torch.Generator().manual_seed(3)
    bits = torch.randint(0, 0x7F800000, (1_000_000,), generator=gen, dtype=torch.int32)
    amax = bits.view(torch.float32)
    for fmt in FORMATS:
        exact = amax / fmt.max
        via_fp64 = (amax.double() / torch.tensor(fmt.max, dtype=torch.float32).double()).float()
        assert torch.equal(exact.view(torch.int32), via_fp64.view(torch.int32))


def test_maximum_of_quotients_is_the_quotient_of_the_maximum():
    """``_codes_and_scale`` divides each part's maximum before the last maximum: rounding by a
    positive divisor keeps the order, so that is the reference's scale bit for bit. Checked on
    random magnitudes over the whole finite fp32 range, subnormal quotients and ties included."""
    gen = torch.Generator().manual_seed(4)
    bits = torch.randint(0, 0x7F800000, (20_000, 64), generator=gen, dtype=torch.int32)
    bits[::7, 1] = bits[::7, 0] + 1  # neighbours: quotients that round to the same fp32 value
    maxima = bits.view(torch.float32)
    for fmt in FORMATS:
        divisor = torch.tensor(fmt.max, dtype=torch.float32).double()
        after = (maxima.amax(dim=1).double() / divisor).float()
        before = (maxima.double() / divisor).float().amax(dim=1)
        assert torch.equal(after.view(torch.int32), before.view(torch.int32))


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_tensor_scale_ops_scale_of_tiny_values_and_zeros_is_one(fmt):
    """Maxima whose quotient underflows to 0, and all zeros: scale 1, as the reference's."""
    for x in (torch.tensor([[0.0, 1e-44], [-1e-44, 0.0]]), torch.zeros(3, 4)):
        codes, scale = quant.tensor_scale_ops(x, fmt)
        reference = formats.quantize_reference(x, fmt, "tensor")
        assert torch.equal(scale, reference.scale.reshape(())) and scale.item() == 1.0
        assert torch.equal(codes.view(torch.uint8), reference.data.view(torch.uint8))


@pytest.mark.parametrize("width", [1024, 1000])  # a multiple of the chunk, and not (maxima per row then)
def test_tensor_scale_ops_gives_the_same_scale_and_codes_by_chunk_or_by_row(width):
    gen = torch.Generator().manual_seed(width)
    x = (torch.randn(33, width, generator=gen) * torch.exp2(torch.randint(-8, 8, (33, width), generator=gen).float()))
    x = x.to(torch.bfloat16)
    x[3, 7] = float("inf")  # not finite: left out of the maximum either way
    by_row = quant.tensor_scale_ops(x, "e5m2")
    by_chunk = quant.tensor_scale_ops(x, "e5m2", chunk=256)
    assert torch.equal(by_chunk[1], by_row[1])
    assert torch.equal(by_chunk[0].view(torch.uint8), by_row[0].view(torch.uint8))
    reference = formats.quantize_reference(x, "e5m2", "tensor")
    assert torch.equal(by_row[1], reference.scale.reshape(()))
