"""The single block's GELU backward with its gradient's FP8 scale, compiled as COAT compiles it, in each formulation.

What: at FLUX.1-dev's single-block shapes (4,608 tokens at 1024 px, MLP width 12,288, the gradient
a column slice of a 15,360-wide one) it compiles and times, with COAT's inductor options:

* ``bf16``: the GELU backward alone from a bf16 saved input: what compiled bf16 runs;
* ``coat-row``: decode the FP8 saved input (per-group power-of-two scales), the GELU backward, and
  the per-tensor E5M2 scale and codes of the result with row maxima first (what COAT's FP8 linear
  traces now: ``kernels.quant.tensor_scale_ops``);
* ``coat-chunk-N``: the same with the first maxima over chunks of N elements of a row.

Each returns what the block's backward keeps (the bf16 gradient for the LoRA branch, the codes
and scale for the FP8 GEMM). It prints the median time per call over ``--repeats`` (CUDA events on
a GPU), the bytes of the inputs and outputs over that time, and, for each COAT variant, the SQNR
of its dequantized codes against the eager bf16 gradient and whether its scale is eager's. (Where
inductor fuses the maximum into the GELU backward, it takes it from the unrounded fp32 values, so
the scale and some codes may differ from eager's by a bf16 rounding.)

Why: compiled COAT's GELU backward took 0.105 ms per call on an H100 (2026-11-27 01:14) while its
scale's maximum was a separate pass, and 0.37-0.40 ms on an H200 (04:44, 06:10) once the row
maxima were computed in it, which made it a looped reduction kernel. ``benchmarks/kernel_sass.py``
counts instructions, not latency: fused it issues fewer (74.5 against 64 + 52 per element, the
chunks' maxima recomputing the GELU backward; counted before the count took inductor's alignment
hints), so only a GPU can say which formulation is faster.

    python benchmarks/scale_fusion.py [--tokens 4608] [--width 12288] [--repeats 50] [--json FILE]

On a CPU (``--device cpu``, small sizes) it checks this script, not a GPU's speed.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch

from coatflux.core.compiled import coat_compile_options
from coatflux.core.formats import sqnr_db
from coatflux.kernels.quant import group_pow2_ops, group_pow2_values_ops, tensor_scale_ops

GROUP = 16  # COAT's per-group size for saved activations (ActivationConfig.group_size)


def variants(chunks: list[int]) -> dict[str, Callable]:
    def bf16(saved: torch.Tensor, grad_wide: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten.gelu_backward(grad_wide[:, grad_wide.shape[1] - saved.shape[1]:], saved,
                                            approximate="tanh")

    def coat(chunk: int | None) -> Callable:
        def fn(codes: torch.Tensor, exponent: torch.Tensor, grad_wide: torch.Tensor) -> tuple[torch.Tensor, ...]:
            saved = group_pow2_values_ops(codes, exponent, GROUP, torch.bfloat16)
            grad = torch.ops.aten.gelu_backward(grad_wide[:, grad_wide.shape[1] - codes.shape[1]:], saved,
                                                approximate="tanh")
            grad_codes, scale = tensor_scale_ops(grad, "e5m2", chunk)
            return grad, grad_codes, scale

        return fn

    return {"bf16": bf16, "coat-row": coat(None), **{f"coat-chunk-{n}": coat(n) for n in chunks}}


def time_call(fn: Callable, args: tuple, repeats: int, device: torch.device) -> float:
    """Median milliseconds per call (after two warm-up calls, which also compile)."""
    for _ in range(2):
        fn(*args)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            begin = time.perf_counter()
            fn(*args)
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def moved_bytes(args: tuple, out: object) -> int:
    outs = out if isinstance(out, tuple) else (out,)
    return sum(t.numel() * t.element_size() for t in (*args, *outs))


def add_shape_arguments(parser: argparse.ArgumentParser, repeats: int) -> None:
    """The single block's GELU-backward shape, the repeats, the device and the JSON file (shared with
    ``pow2_formulations.py``)."""
    parser.add_argument("--tokens", type=int, default=4608)
    parser.add_argument("--width", type=int, default=12288, help="the MLP's width (a multiple of 16)")
    parser.add_argument("--wide", type=int, default=15360, help="the width of the gradient it is a slice of")
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None)


def gelu_inputs(args: argparse.Namespace, device: torch.device) -> tuple[torch.Tensor, ...]:
    """``(saved, grad_wide, codes, exponent)``: a bf16 GELU input, the wide gradient it takes a slice
    of, and the input's per-group FP8 codes and exponents."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    saved = torch.randn(args.tokens, args.width, generator=gen).to(device, torch.bfloat16)
    grad_wide = torch.randn(args.tokens, args.wide, generator=gen).to(device, torch.bfloat16)
    return saved, grad_wide, *group_pow2_ops(saved, "e4m3", GROUP)


def card_header(script: str, args: argparse.Namespace, device: torch.device) -> str:
    """Print what and where this run measures; returns the card (or CPU) name."""
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"{script}: {card}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
          f"GELU backward {args.tokens} tokens x {args.width} (slice of {args.wide}), median of {args.repeats}")
    return card


def write_json(args: argparse.Namespace, card: str, rows: list[dict]) -> None:
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"card": card, "torch": torch.__version__, "tokens": args.tokens, "width": args.width,
                       "wide": args.wide, "rows": rows}, f, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_shape_arguments(parser, repeats=50)
    parser.add_argument("--chunks", type=int, nargs="*", default=[256, 1024])
    args = parser.parse_args()
    device = torch.device(args.device)
    saved, grad_wide, codes, exponent = gelu_inputs(args, device)
    card = card_header("scale_fusion", args, device)
    options = coat_compile_options({})["options"]
    grad_ref, _, scale_ref = variants([])["coat-row"](codes, exponent, grad_wide)  # eager
    rows = []
    for name, fn in variants(args.chunks).items():
        compiled = torch.compile(fn, dynamic=True, options=options)
        inputs = (saved, grad_wide) if name == "bf16" else (codes, exponent, grad_wide)
        out = compiled(*inputs)
        ms = time_call(compiled, inputs, args.repeats, device)
        row = {"variant": name, "ms": ms, "gb_per_s": moved_bytes(inputs, out) / (ms * 1e-3) / 1e9}
        note = ""
        if name != "bf16":
            row["sqnr_db"] = sqnr_db(grad_ref.float(), out[1].float() * out[2])
            row["scale_as_eager"] = bool(torch.equal(out[2], scale_ref))
            note = f"codes {row['sqnr_db']:5.1f} dB, scale {'as' if row['scale_as_eager'] else 'unlike'} eager"
        rows.append(row)
        print(f"  {name:16s} {ms:8.3f} ms  {row['gb_per_s']:7.0f} GB/s  {note}")
    write_json(args, card, rows)


if __name__ == "__main__":
    main()
