"""FLUX.1-dev's FP8 GEMMs with and without cuBLAS's fast accumulation: time and error per step.

What: for every FP8 GEMM shape of a FLUX.1-dev LoRA step (batch 1; the frozen linears of 19 double
and 38 single blocks), it runs ``torch._scaled_mm`` as COAT's FP8 linear does -- forward E4M3 x
E4M3, input gradient E5M2 x E4M3, per-tensor scales, bf16 output -- with ``use_fast_accum`` off
(PyTorch's default) and on (coatflux's default, ``activation.fp8_fast_accumulation``). Per shape it prints the median time of each
(CUDA-graph replays, :func:`coatflux.core.gemm.graph_replay_time`) and the SQNR of each output
against the fp32 product of the same FP8 operands, then the sums over a step (time x GEMMs per
step). The AdaLN linears (one row per sample) are left out: a compiled block multiplies them in
bf16 (their row plan).

Why: on Hopper, cuBLASLt's FP8 GEMMs either promote the tensor cores' partial sums to fp32 at
intervals or, with fast accumulation, keep the tensor cores' own accumulator to the end: faster,
and less exact over a long K (FLUX's ``proj_out`` sums 15,360 products). torchao's float8 training
turns it on for the forward GEMM by default, and COAT's own Triton GEMMs accumulate this way on
Hopper. The H200 profile of 2026-11-27 06:10 (promoted accumulation) spent 146 ms of COAT's 385 ms
step at 1024 px in GEMMs. This script measures what fast accumulation saves there and what it costs
in error at FLUX's shapes: the evidence for coatflux's default, or against it.

    python benchmarks/fp8_accumulation.py [--resolution 1024] [--repeats 20] [--json FILE]

On a CPU (``--device cpu --width 64``) it checks this script, not a GPU's speed.
"""

from __future__ import annotations

import argparse
import json
import platform
from collections import defaultdict

import torch

from coatflux.core.formats import E4M3, E5M2, quantize, sqnr_db
from coatflux.core.gemm import graph_replay_time, median_ms

TEXT_TOKENS = 512
DOUBLE_BLOCKS, SINGLE_BLOCKS = 19, 38


def flux_gemms(resolution: int, width: int) -> dict[tuple[str, int, int, int], int]:
    """``(pass, m, n, k) -> GEMMs per step`` for ``torch._scaled_mm(a (m x k), b (n x k).T)``.

    Forward multiplies the input (tokens x in) with the weight (out x in); the input gradient
    multiplies the output gradient (tokens x out) with the transposed weight (in x out).
    """
    image = (resolution // 16) ** 2  # 2x2 patches of the VAE's 8x downsampled latent
    mlp = 4 * width
    # (tokens, out, in, linears of this shape per block, blocks)
    linears = [
        (image, width, width, 4, DOUBLE_BLOCKS),  # to_q, to_k, to_v, to_out
        (image, mlp, width, 1, DOUBLE_BLOCKS), (image, width, mlp, 1, DOUBLE_BLOCKS),  # ff
        (TEXT_TOKENS, width, width, 4, DOUBLE_BLOCKS),  # add_{q,k,v}_proj, to_add_out
        (TEXT_TOKENS, mlp, width, 1, DOUBLE_BLOCKS), (TEXT_TOKENS, width, mlp, 1, DOUBLE_BLOCKS),  # ff_context
        (image + TEXT_TOKENS, width, width, 3, SINGLE_BLOCKS),  # to_q, to_k, to_v
        (image + TEXT_TOKENS, mlp, width, 1, SINGLE_BLOCKS),  # proj_mlp
        (image + TEXT_TOKENS, width, width + mlp, 1, SINGLE_BLOCKS),  # proj_out (attention and MLP concatenated)
    ]
    counts: dict[tuple[str, int, int, int], int] = defaultdict(int)
    for tokens, out, inp, per_block, blocks in linears:
        counts[("forward", tokens, out, inp)] += per_block * blocks
        counts[("input grad", tokens, inp, out)] += per_block * blocks
    return dict(counts)


def operands(pass_: str, m: int, n: int, k: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """FP8 operands as COAT's linear makes them: activations or gradients with a few outliers."""
    a = torch.randn(m, k, device=device)
    a[torch.rand(m, k, device=device) < 1e-3] *= 20  # sparse outliers, as in activations
    if pass_ == "input grad":
        a = a * 1e-4
    b = torch.randn(n, k, device=device) * 0.02
    qa = quantize(a.to(torch.bfloat16), E5M2 if pass_ == "input grad" else E4M3, "tensor")
    qb = quantize(b.to(torch.bfloat16), E4M3, "tensor")
    return qa.data, qa.scale.float(), qb.data, qb.scale.float()


def measure(pass_: str, m: int, n: int, k: int, device: torch.device, repeats: int) -> dict:
    a, sa, b, sb = operands(pass_, m, n, k, device)
    bt = b.t()  # column-major, as _scaled_mm wants its second operand

    def gemm(fast: bool) -> torch.Tensor:
        return torch._scaled_mm(a, bt, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16, use_fast_accum=fast)

    reference = (a.float() * sa) @ (b.float() * sb).t()
    row = {"pass": pass_, "m": m, "n": n, "k": k}
    time_fn = graph_replay_time if device.type == "cuda" else median_ms
    for name, fast in (("precise", False), ("fast", True)):
        row[f"ms_{name}"] = time_fn(lambda fast=fast: gemm(fast), device, repeats, 2)
        row[f"sqnr_{name}"] = sqnr_db(reference, gemm(fast).float())
    row["sqnr_bf16_rounding"] = sqnr_db(reference, reference.to(torch.bfloat16).float())
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--width", type=int, default=3072, help="hidden size (FLUX.1-dev: 3072)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write the rows and sums here")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference in full fp32
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU"
    print(f"fp8_accumulation: {name}, torch {torch.__version__}, FLUX width {args.width}, {args.resolution} px, "
          f"batch 1; ms are medians of {args.repeats} {'CUDA-graph replays' if device.type == 'cuda' else 'calls'}")
    print(f"{'pass':10s} {'m':>5s} {'n':>6s} {'k':>6s} {'per step':>8s}  {'ms precise':>10s} {'ms fast':>8s}"
          f"  {'dB precise':>10s} {'dB fast':>8s} {'dB bf16':>8s}")
    rows, sums = [], {"precise": 0.0, "fast": 0.0}
    for (pass_, m, n, k), count in flux_gemms(args.resolution, args.width).items():
        row = {**measure(pass_, m, n, k, device, args.repeats), "per_step": count}
        rows.append(row)
        for variant in sums:
            sums[variant] += count * row[f"ms_{variant}"]
        print(f"{pass_:10s} {m:5d} {n:6d} {k:6d} {count:8d}  {row['ms_precise']:10.4f} {row['ms_fast']:8.4f}"
              f"  {row['sqnr_precise']:10.1f} {row['sqnr_fast']:8.1f} {row['sqnr_bf16_rounding']:8.1f}")
    print(f"per step: {sums['precise']:.1f} ms precise, {sums['fast']:.1f} ms fast "
          f"({sums['precise'] - sums['fast']:+.1f} ms)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "resolution": args.resolution,
                       "width": args.width, "rows": rows, "step_ms": sums}, f, indent=1)


if __name__ == "__main__":
    main()
