"""COAT vs plain bf16 on the tiny FLUX model: same seed, same data, compare the training losses.

Runs ``examples/tiny_flux_lora.yaml`` once per recipe on the CPU -- ``COAT`` as written (COAT
activations and FP8 linears, FP8AdamW), ``COAT-compiled`` the same with ``model.compile: true``
(each block one inductor graph with the FP8 linears and the activation compression inside it),
``bf16`` with ``coat.enabled: false`` and torch AdamW (plain bf16 LoRA training) -- and prints the
mean loss of the last 20 steps of each, its relative difference from bf16's, the wall time and
the machine. COAT changes numerics (FP8 weights, inputs and moments), so the curves are not
identical; what matters is that they end at the same loss.

    python benchmarks/coat_vs_bf16_tiny.py --steps 100 [--recipes COAT COAT-compiled bf16]

Runs on the CPU by default (``--device cuda`` for a GPU); writes into a temporary folder. The
compiled recipe's wall time includes its compilation.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


RECIPES: dict[str, dict[str, object]] = {
    "COAT": {},
    "COAT-compiled": {"model.compile": True},
    "bf16": {"coat.enabled": False, "train.optimizer": "adamw"},
}


def run(workdir: Path, steps: int, recipe: str, device: str) -> tuple[list[float], float]:
    from coatflux.trainer.config import load_config
    from coatflux.trainer.loop import train

    overrides = {"train.steps": steps, "config.name": recipe.lower(), "train.disable_sampling": True,
                 "performance_log_every": 0, "model.name_or_path": str(workdir / "tiny-flux"),
                 "training_folder": str(workdir / "output"),
                 "datasets[0].folder_path": str(REPO / "examples" / "clothing"), **RECIPES[recipe]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = load_config(REPO / "examples" / "tiny_flux_lora.yaml", overrides)
        started = time.perf_counter()
        result = train(cfg, device=device)
    return result.losses, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=["COAT", "bf16"])
    args = parser.parse_args()
    from coatflux.flux.tiny import make_tiny_flux

    recipes = list(dict.fromkeys([*args.recipes, "bf16"]))  # bf16 is the reference
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        make_tiny_flux(workdir / "tiny-flux")
        results = {name: run(workdir, args.steps, name, args.device) for name in recipes}
    tail = min(20, args.steps)
    means = {name: sum(losses[-tail:]) / tail for name, (losses, _) in results.items()}
    gpu = f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs{gpu}, torch {torch.__version__}")
    for name, (_, seconds) in results.items():
        difference = abs(means[name] - means["bf16"]) / means["bf16"]
        print(f"{name:>13}: mean loss of the last {tail} of {args.steps} steps {means[name]:.5f} "
              f"({seconds:.1f} s), {difference:.2%} from bf16")


if __name__ == "__main__":
    main()
