"""Reference vs fused non-linear ops that save FP8 (LayerNorm+AdaLN, RMSNorm, GELU-tanh), forward and backward.

What: times the plain-PyTorch reference of :mod:`coatflux.core.nonlinear` (the norm / GELU op, the
affine and modulation as separate ops, and ``formats.quantize_reference`` of the saved input;
backward: ``dequantize_reference`` plus the written-out formula) against the compiled kernels of
:mod:`coatflux.kernels.nonlinear`, on one FLUX.1-dev-sized activation (default 4608 tokens x 3072,
bf16; GELU on the 4x wider MLP hidden). On CUDA each figure is the median of CUDA-event timings
(:func:`coatflux.core.gemm.median_ms`); on CPU the median of ``perf_counter`` timings of a
smaller default tensor. Compilation is timed separately (first call). Prints device, torch
version, date and a table; ``--json PATH`` also writes the figures.

Usage: ``python3 benchmarks/nonlinear_kernels.py [--tokens 4608 --dim 3072 --repeats 20 --device cuda]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from coatflux.core.formats import E4M3, dequantize_reference, quantize_reference
from coatflux.core.gemm import median_ms
from coatflux.kernels import nonlinear as kn


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _first_call_s(fn: Callable[[], object], device: torch.device) -> float:
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _adaln_reference(x, scale, shift):
    """Reference forward: quantize the saved input, norm (fp32 stats), cast, modulate in bf16."""
    q = quantize_reference(x, E4M3, "group", 16, pow2_scales=True)
    xf = x.float()
    mean = xf.mean(-1, keepdim=True)
    rstd = torch.rsqrt((xf - mean).pow(2).mean(-1, keepdim=True) + 1e-6)
    y = ((xf - mean) * rstd).to(x.dtype) * (1 + scale[:, None]) + shift[:, None]
    return y, q, mean, rstd


def _adaln_reference_backward(g, q, mean, rstd, scale):
    xhat = (dequantize_reference(q, torch.float32) - mean) * rstd
    gz = g.float() * (1 + scale.float()[:, None])
    d_scale, d_shift = (g.float() * xhat).sum(1), g.float().sum(1)
    dx = rstd * (gz - gz.mean(-1, keepdim=True) - xhat * (gz * xhat).mean(-1, keepdim=True))
    return dx.to(g.dtype), d_scale, d_shift


def _rms_reference(x, w):
    q = quantize_reference(x, E4M3, "group", 16, pow2_scales=True)
    rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
    return (x.float() * rstd).to(x.dtype) * w, q, rstd


def _rms_reference_backward(g, q, rstd, w):
    xhat = dequantize_reference(q, torch.float32) * rstd
    gw = g.float() * w.float()
    return (rstd * (gw - xhat * (gw * xhat).mean(-1, keepdim=True))).to(g.dtype)


def _gelu_reference(x):
    return F.gelu(x, approximate="tanh"), quantize_reference(x, E4M3, "group", 16, pow2_scales=True)


def run(tokens: int, dim: int, repeats: int, device: torch.device) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(0)
    bf16 = torch.bfloat16

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, generator=gen).to(bf16)

    x, g, scale, shift = randn(1, tokens, dim), randn(1, tokens, dim), randn(1, dim), randn(1, dim)
    heads = randn(1, tokens * dim // 128, 128)  # QK-norm: rows of head_dim 128
    hg, w = randn(*heads.shape), randn(128)
    h4, g4 = randn(tokens, 4 * dim), randn(tokens, 4 * dim)
    ada, rms, gelu_q = _adaln_reference(x, scale, shift), _rms_reference(heads, w), _gelu_reference(h4)[1]
    # the fused forwards' first calls compile them: timed here, reported with their rows
    compile_s = {"layernorm+adaln fwd": _first_call_s(lambda: kn.norm_forward(x, None, None, scale, shift, eps=1e-6),
                                                      device),
                 "rmsnorm(qk) fwd": _first_call_s(lambda: kn.norm_forward(heads, w, eps=1e-6, center=False), device)}
    ada_fast = kn.norm_forward(x, None, None, scale, shift, eps=1e-6)
    rms_fast = kn.norm_forward(heads, w, eps=1e-6, center=False)
    cases = {
        "layernorm+adaln fwd": (lambda: _adaln_reference(x, scale, shift),
                                lambda: kn.norm_forward(x, None, None, scale, shift, eps=1e-6)),
        "layernorm+adaln bwd": (lambda: _adaln_reference_backward(g, ada[1], ada[2], ada[3], scale),
                                lambda: kn.norm_backward(g, ada_fast[1], ada_fast[2], ada_fast[3], None, None, scale,
                                                         needs=(False, False, True, True))),
        "rmsnorm(qk) fwd": (lambda: _rms_reference(heads, w), lambda: kn.norm_forward(heads, w, eps=1e-6, center=False)),
        "rmsnorm(qk) bwd": (lambda: _rms_reference_backward(hg, rms[1], rms[2], w),
                            lambda: kn.norm_backward(hg, rms_fast[1], rms_fast[2], rms_fast[3], w, center=False)),
        "gelu-tanh fwd": (lambda: _gelu_reference(h4), lambda: kn.gelu_forward(h4, "tanh")),
        "gelu-tanh bwd": (lambda: torch.ops.aten.gelu_backward(g4, dequantize_reference(gelu_q, bf16),
                                                               approximate="tanh"),
                          lambda: kn.gelu_backward(g4, gelu_q, "tanh")),
    }
    results = []
    for name, (ref_fn, fast_fn) in cases.items():
        first_s = compile_s.get(name) or _first_call_s(fast_fn, device)
        results.append({"op": name, "reference_ms": median_ms(ref_fn, device, repeats, warmup=3),
                        "fused_ms": median_ms(fast_fn, device, repeats, warmup=3), "compile_s": first_s})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=None, help="default 4608 on CUDA, 512 on CPU")
    parser.add_argument("--dim", type=int, default=None, help="default 3072 on CUDA, 1024 on CPU")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    tokens = args.tokens or (4608 if cuda else 512)
    dim = args.dim or (3072 if cuda else 1024)
    ok, reason = kn.available(device)
    name = torch.cuda.get_device_name(device) if cuda else f"CPU {platform.processor() or platform.machine()} " \
        f"({torch.get_num_threads()} threads)"
    machine = (f"{name}, torch {torch.__version__}, {datetime.date.today().isoformat()}; "
               f"activation {tokens}x{dim} bf16, median of {args.repeats}")
    print(f"nonlinear_kernels: {machine}")
    if not ok:
        print(f"nonlinear_kernels: fused path unavailable: {reason}")
        return
    results = run(tokens, dim, args.repeats, device)
    print("| op | reference ms | fused ms | speed-up | compile s |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['op']} | {r['reference_ms']:.3f} | {r['fused_ms']:.3f} | "
              f"{r['reference_ms'] / r['fused_ms']:.1f}x | {r['compile_s']:.1f} |")
    if args.json_path:
        with open(args.json_path, "w") as fh:
            json.dump({"machine": machine, "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
