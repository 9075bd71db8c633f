"""GPU diagnostic: one FLUX.1-dev LoRA step per recipe, with tracebacks (run with CUDA_LAUNCH_BLOCKING=1)."""

from __future__ import annotations

import sys
import time
import traceback

import torch

from coatflux.bench.configs import CONFIGS, SetupOptions
from coatflux.bench.model import PRESETS, build_transformer, loss_of, make_batch


def step(model, opt, batch):
    opt.zero_grad(set_to_none=True)
    loss_of(model, batch).backward()
    opt.step()


def main() -> None:
    preset = PRESETS["flux-dev"]
    res = int(sys.argv[1]) if len(sys.argv) > 1 else 512
    for name in sys.argv[2:] or ["bf16", "coat"]:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        try:
            model = build_transformer(preset, "cuda")
            opt = CONFIGS[name].setup(model, 16, SetupOptions(fused_optimizer=name.startswith("coat")))
            batch = make_batch(preset, res, 1, "cuda")
            step(model, opt, batch)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(3):
                step(model, opt, batch)
            torch.cuda.synchronize()
            dt = (time.perf_counter() - t) / 3
            print(f"{name} @{res}: {dt:.3f} s/step, peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
        except Exception:
            print(f"{name} @{res}: FAILED", flush=True)
            traceback.print_exc()
        finally:
            model = opt = batch = None


if __name__ == "__main__":
    main()
