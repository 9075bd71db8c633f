"""Reference vs fused FP8 quantize/dequantize on one FLUX.1-dev-sized activation (GPU).

What: times :func:`coatflux.core.formats.quantize_reference` / ``dequantize_reference`` against
the compiled kernels of :mod:`coatflux.kernels.quant` on a 4608 x 3072 bf16 tensor (4096 image +
512 text tokens at hidden size 3072: one linear input at 1024 px, batch 1), per tensor (E4M3,
linear inputs; E5M2, gradients) and per 1 x 16 group with power-of-two scales (saved
activations). Each figure is the median of CUDA-event timings after warm-up (which includes the
compilation, reported separately); the bytes of both paths are compared first. Prints the card,
torch version and a table; ``--json PATH`` also writes the figures.

Usage: ``python3 benchmarks/quant_kernels.py [--rows 4608 --cols 3072 --repeats 50]``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch

from coatflux.core.formats import E4M3, E5M2, dequantize_reference, quantize_reference
from coatflux.core.gemm import cuda_event_time
from coatflux.kernels import quant


def _median_ms(fn: Callable[[], object], repeats: int) -> float:
    return cuda_event_time(fn, torch.device("cuda"), repeats, warmup=3)


def _compile_s(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    as_bytes = [t.contiguous().reshape(-1).view(torch.uint8) for t in (a, b)]
    return a.shape == b.shape and torch.equal(*as_bytes)


def _cases(x: torch.Tensor) -> dict[str, tuple[Callable, Callable]]:
    return {
        "quantize tensor e4m3": (lambda: quantize_reference(x, E4M3, "tensor"), lambda: quant.quantize_tensor(x, E4M3)),
        "quantize tensor e5m2": (lambda: quantize_reference(x, E5M2, "tensor"), lambda: quant.quantize_tensor(x, E5M2)),
        "quantize group16 pow2": (lambda: quantize_reference(x, E4M3, "group", 16, True),
                                  lambda: quant.quantize_group_pow2(x, E4M3, 16)),
    }


def run(rows: int, cols: int, repeats: int) -> list[dict]:
    x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    results = []
    for name, (ref_fn, fast_fn) in _cases(x).items():
        compile_s = _compile_s(fast_fn)
        ref_q, fast_q = ref_fn(), fast_fn()
        exact = _same(ref_q.data, fast_q.data) and _same(ref_q.scale, fast_q.scale)
        results.append({"op": name, "reference_ms": _median_ms(ref_fn, repeats),
                        "fast_ms": _median_ms(fast_fn, repeats), "compile_s": compile_s, "identical": exact})
        dq_name = name.replace("quantize", "dequantize")
        dq_compile_s = _compile_s(lambda q=fast_q: quant.dequantize(q))
        exact = _same(dequantize_reference(ref_q), quant.dequantize(fast_q))
        results.append({"op": dq_name, "reference_ms": _median_ms(lambda q=ref_q: dequantize_reference(q), repeats),
                        "fast_ms": _median_ms(lambda q=fast_q: quant.dequantize(q), repeats),
                        "compile_s": dq_compile_s, "identical": exact})
    gb = x.numel() * x.element_size() / 1e9
    for r in results:  # bytes read as bf16 (or written, for dequantize) per ms, a lower bound on traffic
        r["fast_gb_per_s"] = gb / (r["fast_ms"] / 1e3)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4608)
    parser.add_argument("--cols", type=int, default=3072)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("quant_kernels: needs a CUDA GPU; nothing measured")
        return
    ok, reason = quant.available("cuda")
    machine = (f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}; "
               f"tensor {args.rows}x{args.cols} bf16, median of {args.repeats}")
    print(f"quant_kernels: {machine}")
    if not ok:
        print(f"quant_kernels: fast path unavailable: {reason}")
        return
    results = run(args.rows, args.cols, args.repeats)
    print("| op | reference ms | fused ms | speed-up | fused GB/s (bf16 side) | compile s | identical |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['op']} | {r['reference_ms']:.3f} | {r['fast_ms']:.3f} | {r['reference_ms'] / r['fast_ms']:.1f}x | "
              f"{r['fast_gb_per_s']:.0f} | {r['compile_s']:.1f} | {r['identical']} |")
    if args.json_path:
        with open(args.json_path, "w") as fh:
            json.dump({"machine": machine, "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
