"""``2**k`` of the per-group scales in three formulations, compiled where COAT compiles them: does each compile, is it exact, how fast.

What: ``kernels.quant._pow2`` turns an integer exponent into the fp32 ``2**k`` that scales a group
of 16 values. The library takes ``exp2`` of the integer as fp32, with ``2**-127`` (a subnormal)
selected apart (``exp2``); before, it built the product of seven exact power-of-two factors
selected bit by bit (``product``); ``bits`` builds the float from its bits, ``(k + 127) * 2**23``
viewed as fp32. For each formulation, with ``quant._pow2`` replaced by it while this script
compiles (every compiled function and dynamo's caches made anew around it):

* ``pow2``: the formulation alone, compiled on the device, against ``exp2`` for every exponent;
* ``quantizer``: the standalone per-group quantizer and dequantizer (``quantize_group_pow2``,
  ``dequantize``) at the GPU tests' shapes and FLUX's (1 x 3072, 512 x 4096, 4608 x 3072), byte for
  byte against the reference;
* ``gelu_backward``: the single block's GELU backward from its FP8 saved input with the gradient's
  per-tensor scale, as ``scale_fusion.py``'s ``coat-row`` times it: median ms per call.

Each cell says ``ok`` (with the time) or the error the compiler raised.

Why: ``benchmarks/kernel_sass.py`` counts a 1024 px COAT step's inductor kernels at 45.1 ms at the
issue rate with ``product``, 41.7 with ``exp2`` and 41.3 with ``bits`` (its ``--pow2``; 2026-11-27,
this CPU compiling for sm_90 with inductor's alignment hints; 85.6, 71.5 and 70.9 without them and
before two later changes to the quantizers). ``bits`` failed to compile for CUDA twice where a CPU
compiled it: as ``(k + 127) << 23`` the integer reached Triton as int64 (H200, 2026-11-26), and as
a product of int32 tensors inductor's CUDA tiling raised ``CantSplit`` in the standalone quantizer,
whose group size was then a symbol (H200, 2026-11-27 14:35; a constant since). ``exp2`` is exact only where the device's ``exp2`` is exact at
integers, which CUDA does not promise (the reference's scales use ``torch.exp2`` as well). Only a
GPU can say which compile, which are exact there, and what each costs.

    python benchmarks/pow2_formulations.py [--tokens 4608] [--repeats 30] [--json FILE]

On a CPU (``--device cpu``, small sizes) it checks this script, not a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from coatflux.core.compiled import coat_compile_options
from coatflux.core.formats import E4M3, dequantize_reference, quantize_reference
from coatflux.kernels import nonlinear, quant
from scale_fusion import GROUP, add_shape_arguments, card_header, gelu_inputs, time_call, variants, write_json

FLUX_SHAPES = [(1, 3072), (512, 4096), (4608, 3072)]
TEST_SHAPES = [(64, 48), (3, 5, 21), (1,)]


def pow2_from_bits(exponent: torch.Tensor) -> torch.Tensor:
    """``2.0 ** exponent`` (integer exponent in [-127, 127]) as fp32, from its bits; int32 constants."""
    k = exponent.to(torch.int32)
    normal = ((k + torch.full_like(k, 127)) * torch.full_like(k, 1 << 23)).view(torch.float32)
    return torch.where(k == -127, torch.full_like(normal, 2.0**-127), normal)


def pow2_from_factors(exponent: torch.Tensor) -> torch.Tensor:
    """``2.0 ** exponent`` as the product of ``2**(+-2**b)`` over the set bits ``b`` of ``|exponent|``:
    every partial product a power of two no smaller than the result, so every multiplication exact."""
    magnitude = exponent.abs()
    negative = exponent < 0
    one = torch.ones_like(exponent, dtype=torch.float32)
    result = one
    for bit in range(7):
        factor = torch.where(negative, one * 2.0 ** -(2**bit), one * 2.0 ** (2**bit))
        result = result * torch.where(((magnitude >> bit) & 1) == 1, factor, one)
    return result


FORMULATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "exp2": quant._pow2, "product": pow2_from_factors, "bits": pow2_from_bits}


def _fresh_compilers() -> None:
    torch._dynamo.reset()
    quant._compiled.cache_clear()
    nonlinear._compiled.cache_clear()


@contextlib.contextmanager
def formulation(pow2: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """``quant._pow2`` is ``pow2`` for what compiles inside; the library's again after."""
    library = quant._pow2
    quant._pow2 = pow2
    _fresh_compilers()
    try:
        yield
    finally:
        quant._pow2 = library
        _fresh_compilers()


def _error(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


def check_pow2(pow2: Callable, device: torch.device) -> str:
    k = torch.arange(-127, 128, dtype=torch.int32, device=device)
    compiled = torch.compile(pow2, fullgraph=True, options=quant._inductor_options())
    return "ok" if torch.equal(compiled(k).cpu(), torch.exp2(k.cpu().double()).float()) else "differs from exp2"


def check_quantizer(shapes: list[tuple[int, ...]], device: torch.device) -> str:
    gen = torch.Generator().manual_seed(0)
    for shape in shapes:
        x = (torch.randn(shape, generator=gen) * 10).to(device, torch.bfloat16)
        ref = quantize_reference(x, E4M3, "group", GROUP, pow2_scales=True)
        fast = quant.quantize_group_pow2(x, E4M3, GROUP)
        same = [torch.equal(a.cpu().view(torch.uint8), b.cpu().view(torch.uint8))
                for a, b in ((ref.data, fast.data), (ref.scale, fast.scale))]
        values = torch.equal(dequantize_reference(ref).cpu(), quant.dequantize(fast).cpu())
        if not (all(same) and values):
            return f"differs from the reference at {shape}"
    return "ok"


def time_gelu_backward(args: argparse.Namespace, device: torch.device) -> float:
    _, grad_wide, codes, exponent = gelu_inputs(args, device)
    compiled = torch.compile(variants([])["coat-row"], dynamic=True, options=coat_compile_options({})["options"])
    return time_call(compiled, (codes, exponent, grad_wide), args.repeats, device)


def measure(pow2: Callable, args: argparse.Namespace, device: torch.device) -> dict[str, str | float]:
    row: dict[str, str | float] = {}
    with formulation(pow2):
        for name, check in (("pow2", lambda: check_pow2(pow2, device)),
                            ("quantizer", lambda: check_quantizer(args.shapes, device))):
            try:
                row[name] = check()
            except Exception as exc:  # a compiler error is this script's finding, not its failure
                row[name] = _error(exc)
        try:
            row["gelu_backward_ms"] = time_gelu_backward(args, device)
            row["gelu_backward"] = "ok"
        except Exception as exc:
            row["gelu_backward"] = _error(exc)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(parser, repeats=30)
    parser.add_argument("--small", action="store_true", help="one small shape (for a CPU check of the script)")
    args = parser.parse_args()
    args.shapes = TEST_SHAPES[:1] if args.small else TEST_SHAPES + FLUX_SHAPES
    device = torch.device(args.device)
    card = card_header("pow2_formulations", args, device)
    rows = []
    for name, pow2 in FORMULATIONS.items():
        row = {"formulation": name, **measure(pow2, args, device)}
        rows.append(row)
        timing = f"{row['gelu_backward_ms']:.3f} ms" if "gelu_backward_ms" in row else row["gelu_backward"]
        print(f"  {name:8s} pow2: {row['pow2']}; quantizer: {row['quantizer']}; GELU backward: {timing}")
    write_json(args, card, rows)


if __name__ == "__main__":
    main()
