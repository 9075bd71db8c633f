"""Measure the COAT core: optimizer-state bytes, moment quantization error, saved-activation bytes.

Prints, in one run, three tables (every number measured here, nothing estimated):

1. optimizer state bytes per parameter for ``torch.optim.AdamW``, ``FP8AdamW`` (with and without
   DRE) and, where installed, bitsandbytes ``AdamW8bit`` and torchao ``AdamWFp8``;
2. the mean squared error of ``m / sqrt(v)`` for first/second moments taken from a real AdamW run,
   quantized with E4M3/E5M2, with and without Dynamic Range Expansion (the paper's Table 1);
3. the bytes one FLUX double block and one single block (diffusers, real width 3072, all linears
   trainable) save for backward in bf16 versus with COAT, plus the SQNR of the block output and
   input gradient against bf16.

Run: ``python benchmarks/core_memory.py [--tokens 512] [--text-tokens 128]``.
"""

from __future__ import annotations

import argparse
import copy
import platform
import warnings

import torch

from coatflux import COATConfig, FP8AdamW, FP8QuantizationConfig, apply_coat, saved_activation_bytes
from coatflux.core.accounting import optimizer_state_bytes_per_param
from coatflux.core.dre import dre_dequantize, dre_quantize
from coatflux.core.formats import dequantize, quantize, sqnr_db


def machine() -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, {gpu}, torch {torch.__version__}"


def _one_step_state(make_opt, numel: int = 4 * 1024 * 1024, device: str = "cpu") -> float:
    p = torch.nn.Parameter(torch.randn(numel // 1024, 1024, device=device))
    opt = make_opt([p])
    p.grad = torch.randn_like(p)
    opt.step()
    return optimizer_state_bytes_per_param(opt)


def optimizer_table() -> list[tuple[str, str]]:
    rows = [
        ("torch.optim.AdamW (fp32 states)", f"{_one_step_state(lambda p: torch.optim.AdamW(p)):.4f}"),
        ("FP8AdamW, DRE (E4M3/E4M3)", f"{_one_step_state(lambda p: FP8AdamW(p)):.4f}"),
        ("FP8AdamW, DRE (E4M3/E5M2)",
         f"{_one_step_state(lambda p: FP8AdamW(p, fp8_config=FP8QuantizationConfig(m2_format='e5m2'))):.4f}"),
        ("FP8AdamW, no DRE",
         f"{_one_step_state(lambda p: FP8AdamW(p, fp8_config=FP8QuantizationConfig(use_dynamic_range_expansion=False))):.4f}"),
        ("NVlabs/COAT reference (3 fp32 per block per moment, computed)", f"{2 + 2 * 3 * 4 / 128:.4f}"),
    ]
    try:
        import bitsandbytes as bnb

        device = "cuda" if torch.cuda.is_available() else "cpu"
        rows.append(("bitsandbytes AdamW8bit", f"{_one_step_state(lambda p: bnb.optim.AdamW8bit(p), device=device):.4f}"))
    except Exception as exc:
        rows.append(("bitsandbytes AdamW8bit", f"not available ({type(exc).__name__})"))
    try:
        from torchao.optim import AdamWFp8

        device = "cuda" if torch.cuda.is_available() else "cpu"
        rows.append(("torchao AdamWFp8", f"{_one_step_state(lambda p: AdamWFp8(p), device=device):.4f}"))
    except Exception as exc:
        rows.append(("torchao AdamWFp8", f"not available ({type(exc).__name__})"))
    return rows


def real_moments(steps: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 512), torch.nn.GELU(), torch.nn.Linear(512, 128))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(1024, 128)
    y = torch.sin(x @ torch.randn(128, 128) / 8)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    state = opt.state[model[0].weight]
    return state["exp_avg"], state["exp_avg_sq"]


def moment_error_table() -> list[list[str]]:
    m, v = real_moments()
    ref = m / (v.sqrt() + 1e-8)

    def coded(x, fmt, dre):
        if dre:
            return dre_dequantize(dre_quantize(x, fmt, 128), 128)
        return dequantize(quantize(x, fmt, "block", 128, pow2_scales=True))

    columns = [(f, d) for f in ("e4m3", "e5m2") for d in (False, True)]
    rows = []
    for f1, d1 in columns:
        row = [f"m: {f1}{' + DRE' if d1 else ''}"]
        for f2, d2 in columns:
            est = coded(m, f1, d1) / (coded(v, f2, d2).sqrt() + 1e-8)
            row.append(f"{((est - ref) ** 2).mean().item():.3e}")
        rows.append(row)
    header = ["", *[f"v: {f}{' + DRE' if d else ''}" for f, d in columns]]
    return [header, *rows]


def _run_block(block, inputs):
    hidden, encoder, temb = (t.clone().requires_grad_(True) for t in inputs)
    out = block(hidden_states=hidden, encoder_hidden_states=encoder, temb=temb, image_rotary_emb=None)
    return torch.cat(out, dim=1) if isinstance(out, tuple) else out, hidden


def block_table(tokens: int, text_tokens: int, device: str = "cpu") -> list[list[str]]:
    from diffusers.models.transformers.transformer_flux import (
        FluxSingleTransformerBlock,
        FluxTransformerBlock,
    )

    rows = [["block", "bf16 saved MiB", "COAT saved MiB", "ratio", "output SQNR dB", "input-grad SQNR dB"]]
    for name, cls in (("double", FluxTransformerBlock), ("single", FluxSingleTransformerBlock)):
        torch.manual_seed(0)
        ref = cls(3072, 24, 128).to(device=device, dtype=torch.bfloat16)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            coat = apply_coat(copy.deepcopy(ref), COATConfig())
        inputs = (torch.randn(1, tokens, 3072, dtype=torch.bfloat16, device=device),
                  torch.randn(1, text_tokens, 3072, dtype=torch.bfloat16, device=device),
                  torch.randn(1, 3072, dtype=torch.bfloat16, device=device))
        base = saved_activation_bytes(ref, lambda block=ref, x=inputs: _run_block(block, x)[0])
        ours = saved_activation_bytes(coat, lambda block=coat, x=inputs: _run_block(block, x)[0])
        y0, h0 = _run_block(ref, inputs)
        y1, h1 = _run_block(coat, inputs)
        g = torch.randn_like(y0)
        y0.backward(g)
        y1.backward(g)
        rows.append([name, f"{base / 2**20:.1f}", f"{ours / 2**20:.1f}", f"{ours / base:.3f}",
                     f"{sqnr_db(y0.float(), y1.float()):.1f}", f"{sqnr_db(h0.grad.float(), h1.grad.float()):.1f}"])
    return rows


def print_table(title: str, rows: list[list[str]] | list[tuple[str, str]]) -> None:
    print(f"\n## {title}\n")
    rows = [list(r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512, help="image tokens (1024 at 512x512, 4096 at 1024x1024)")
    parser.add_argument("--text-tokens", type=int, default=128)
    parser.add_argument("--skip-blocks", action="store_true", help="skip the FLUX block table (slow on CPU)")
    parser.add_argument("--device", default="cpu", help="device for the FLUX block table (cpu or cuda)")
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print_table("Optimizer state, bytes per parameter (4M-element tensor, after one step)",
                [("optimizer", "bytes/param"), *optimizer_table()])
    print_table("MSE of m/sqrt(v), moments of a real AdamW run (200 steps, 128x512 MLP layer), block 128",
                moment_error_table())
    if not args.skip_blocks:
        print_table(f"Saved for backward by one FLUX block at width 3072 on {args.device} ({args.tokens} image + "
                    f"{args.text_tokens} text tokens, batch 1, all linears trainable)",
                    block_table(args.tokens, args.text_tokens, args.device))


if __name__ == "__main__":
    main()
