"""FLUX.1's attention, forward and backward, on each ``scaled_dot_product_attention`` backend.

What: for every backend named (flash, efficient, cudnn, math) a child process builds the same
random q, k, v of FLUX.1-dev's joint attention (24 heads of 128, 4,608 tokens at 1024 px: 4,096
image + 512 text), runs forward and backward under ``torch.nn.attention.sdpa_kernel`` with only
that backend allowed, and reports the median forward+backward time over ``--repeats`` (CUDA
events on a GPU), the rate at the bench's FLOP count (forward 4·B·H·L²·D, backward twice that) and
the SQNR of the output and of dq, dk, dv against an fp32 math-backend reference of the same inputs.
A backend that fails says how, and the others still run.

Why: on an H100 (2026-11-27, `docs/runs/h100-2026-11-27-0114.md`) FlashAttention-2's kernels took
170 ms of compiled COAT's 490 ms step at 1024 px, about 263 TFLOP/s, a third of the card's
measured bf16 matmul rate. PyTorch's cuDNN backend is faster, but in FLUX its backward failed
on an H200 (torch 2.11 + CUDA 13) and left the process unable to use CUDA; the layouts below
showed why (2026-11-27 06:10, `docs/runs/h200-2026-11-27-0610-attention.log`,
`coatflux/flux/attention.py`). Each backend runs in a process of its own, so a failure of that
kind cannot spoil the others' figures.

Layouts (``--layouts``, run in the order given, in one process per backend): the same values
with the strides each place hands SDPA. ``contiguous``: q, k, v and the output gradient as
contiguous (batch, heads, tokens, dim) tensors, what the 2026-11-27 H200 run measured.
``flux-double``: as FLUX's attention makes them in diffusers, (batch, tokens, heads, dim) tensors
seen through a permute, and the gradient likewise (a double block). ``flux-single``: the same q, k
and v, but the gradient is a column slice of a tensor five times as wide, as in a single block,
which concatenates the attention output with its MLP branch. ``flux-single-fixed``: that gradient
made contiguous first, as ``coatflux.flux.attention.keep_attention_grads_contiguous`` does in the
trainer. PyTorch caches cuDNN's backward graph by q, k and v alone, so ``--layouts flux-single
flux-double`` is the order in which a FLUX backward meets them; each layout's result is saved as it
finishes, so a crash loses only the layouts after it.

    python benchmarks/attention_backends.py [--backends flash efficient cudnn] [--tokens 4608]
        [--heads 24] [--head-dim 128] [--repeats 20] [--device cuda]
        [--layouts contiguous flux-double flux-single flux-single-fixed]

On a CPU (``--device cpu``, small sizes) it checks this script, not a GPU's speed.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from coatflux.atomic import atomic_write
from coatflux.core.gemm import median_ms

BACKENDS = ("flash", "efficient", "cudnn", "math")


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]


LAYOUTS = ("contiguous", "flux-double", "flux-single", "flux-single-fixed")
_SINGLE_BLOCK_WIDTH = 5  # a FLUX single block's concatenation: attention output + 4x wider MLP branch


def _inputs(args: argparse.Namespace, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch, args.heads, args.tokens, args.head_dim)
    q, k, v, grad = (torch.randn(shape, generator=gen) for _ in range(4))
    return tuple(t.to(args.device, dtype) for t in (q, k, v, grad))


def _tokens_major(t: torch.Tensor) -> torch.Tensor:
    """The same values stored (batch, tokens, heads, dim), seen as (batch, heads, tokens, dim)."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def _column_slice(t: torch.Tensor) -> torch.Tensor:
    """The same values as the first columns of a (batch, tokens, 5 x heads x dim) tensor."""
    b, h, n, d = t.shape
    wide = t.new_zeros(b, n, _SINGLE_BLOCK_WIDTH * h * d)
    wide[:, :, : h * d] = t.transpose(1, 2).reshape(b, n, h * d)
    return wide[:, :, : h * d].unflatten(-1, (h, d)).transpose(1, 2)


def in_layout(layout: str, q, k, v, grad) -> tuple[torch.Tensor, ...]:
    """q, k, v and the output gradient with the strides ``layout`` stands for (values unchanged)."""
    if layout == "contiguous":
        return q, k, v, grad
    q, k, v = (_tokens_major(t) for t in (q, k, v))
    if layout == "flux-double":
        return q, k, v, _tokens_major(grad)
    if layout == "flux-single":
        return q, k, v, _column_slice(grad)
    if layout == "flux-single-fixed":
        return q, k, v, _tokens_major(_column_slice(grad))  # what .contiguous() on the block's output gives
    raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")


def _forward_backward(q, k, v, grad) -> tuple[torch.Tensor, ...]:
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    out.backward(grad)
    return out.detach(), q.grad, k.grad, v.grad


def _saved(save: str, layout: str) -> Path:
    return Path(f"{save}.{layout}")


def run_child(args: argparse.Namespace) -> None:
    """One backend (``--child NAME``): times each layout in turn, saving each one's output and gradients."""
    from torch.nn.attention import sdpa_kernel

    base = _inputs(args, getattr(torch, args.dtype))
    with sdpa_kernel([_sdpa_backend(args.child)]):
        for layout in args.layouts:
            tensors = in_layout(layout, *base)
            ms = median_ms(lambda t=tensors: _forward_backward(*t), torch.device(args.device), args.repeats)
            results = _forward_backward(*tensors)
            if tensors[0].is_cuda:
                torch.cuda.synchronize()  # an asynchronous fault belongs to this layout, not the next
            torch.save({"ms": ms, "tensors": [t.float().cpu() for t in results]}, _saved(args.save, layout))


def reference(args: argparse.Namespace) -> list[torch.Tensor]:
    """fp32 math-backend output and gradients of the same inputs (the accuracy yardstick)."""
    from torch.nn.attention import sdpa_kernel

    q, k, v, grad = (t.float() for t in _inputs(args, getattr(torch, args.dtype)))
    with sdpa_kernel([_sdpa_backend("math")]):
        return [t.cpu() for t in _forward_backward(q, k, v, grad)]


def _child_args(args: argparse.Namespace, backend: str, save: Path) -> list[str]:
    return [sys.executable, __file__, "--child", backend, "--save", str(save), "--device", args.device,
            "--dtype", args.dtype, "--batch", str(args.batch), "--heads", str(args.heads),
            "--tokens", str(args.tokens), "--head-dim", str(args.head_dim), "--repeats", str(args.repeats),
            "--layouts", *args.layouts]


def measure(args: argparse.Namespace, backend: str, ref: list[torch.Tensor], flops: float) -> list[dict]:
    """Run one backend in a child process; per layout its time, rate and SQNRs, or how it failed."""
    from coatflux.core.formats import sqnr_db

    with tempfile.TemporaryDirectory() as tmp:
        save = Path(tmp) / "result.pt"
        try:
            done = subprocess.run(_child_args(args, backend, save), capture_output=True, text=True,
                                  timeout=args.child_timeout)
            failure = None
            if done.returncode != 0:
                last = [line for line in done.stderr.strip().splitlines() if line.strip()][-1:] or ["(no message)"]
                failure = f"exit status {done.returncode}: {last[0][:300]}"
        except subprocess.TimeoutExpired:
            failure = f"no result within {args.child_timeout:g} s"
        results = {layout: torch.load(_saved(str(save), layout))
                   for layout in args.layouts if _saved(str(save), layout).exists()}
    rows = []
    for layout in args.layouts:
        row = {"backend": backend, "layout": layout}
        if layout not in results:
            rows.append({**row, "error": failure or "no result saved"})
            continue
        result = results[layout]
        names = ("out", "dq", "dk", "dv")
        sqnr = {n: round(sqnr_db(r, t), 1) for n, r, t in zip(names, ref, result["tensors"], strict=True)}
        rows.append({**row, "ms": result["ms"], "tflops": flops / (result["ms"] / 1000.0) / 1e12, "sqnr_db": sqnr})
    return rows


def _machine(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    return f"{platform.machine()} CPU, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=["flash", "efficient", "cudnn"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--tokens", type=int, default=4608, help="4,608 at 1024 px, 1,536 at 512 px")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=["contiguous"],
                        help="strides of q, k, v and the output gradient, run in this order (see above)")
    parser.add_argument("--child-timeout", type=float, default=120.0)
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--child", choices=BACKENDS, help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args)
        return
    flops = 3 * 4 * args.batch * args.heads * args.tokens**2 * args.head_dim  # forward + twice for backward
    print(f"attention fwd+bwd, B={args.batch} H={args.heads} L={args.tokens} D={args.head_dim} {args.dtype}, "
          f"{flops / 1e12:.2f} TFLOP; {_machine(args.device)}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    ref = reference(args)
    rows = []
    for backend in args.backends:
        for row in measure(args, backend, ref, flops):
            rows.append(row)
            name = f"{backend:10s} {row['layout']:18s}"
            if "error" in row:
                print(f"{name} failed: {row['error']}", flush=True)
                continue
            sqnr = " ".join(f"{k} {v:.1f}" for k, v in row["sqnr_db"].items())
            print(f"{name} {row['ms']:9.3f} ms  {row['tflops']:7.1f} TFLOP/s  SQNR dB vs fp32: {sqnr}", flush=True)
    if args.json:
        text = json.dumps({"machine": _machine(args.device), "args": vars(args), "rows": rows}, indent=1)
        atomic_write(Path(args.json), lambda tmp: Path(tmp).write_text(text))


if __name__ == "__main__":
    main()
