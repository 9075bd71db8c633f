"""Saved-activation bytes of FLUX.1-dev's blocks at full width, per block class and summed over the model.

What: builds the FLUX.1-dev transformer architecture (hidden 3072, random weights) with one or two
blocks of each class -- (1 double, 1 single), (2, 1) and (1, 2) -- on the CPU, puts the bench's
rank-16 LoRA on ai-toolkit's targets, runs one forward at the given resolution (batch 1, 512 text
tokens) and counts the bytes autograd keeps for backward (:func:`coatflux.saved_activation_bytes`:
each storage once, weights and parameters excluded). The differences between the three models give
the bytes of one double block and of one single block; the rest (embedders, final layer) is what
is left. It then adds them up for FLUX.1-dev's 19 double and 38 single blocks and puts the frozen
weights beside them (bf16, or FP8 plus one scale per linear).

Why: a GPU run measures the peak of a whole step; this shows where the saved bytes go, per block
and per recipe, on a machine without a GPU. The sum is saved activations plus weights only: no
allocator rounding, workspaces, gradients or optimizer state, so it is not a GPU peak and is not
written into docs/benchmarks.md.

Recipes: ``bf16`` (plain linears), ``coat`` (eager COAT: FP8 linears, fused norm/GELU, compressed
saved activations) and ``coat-compiled`` (COAT's compiled blocks; the graphs are partitioned as
inductor partitions them: ``aot_eager_decomp_partition`` by default, ``--compiled-backend inductor``
to generate the code as well, minutes per model on a CPU).

    python benchmarks/flux_block_memory.py [--resolution 1024] [--recipes bf16 coat coat-compiled]

``--width tiny`` runs the same on the bench's tiny FLUX (hidden 64), in seconds: a check of this
script, not a figure.
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings

import torch

from coatflux.bench.model import FLUX_DEV_CONFIG, TINY_CONFIG, Preset, build_transformer, loss_of, make_batch
from coatflux.core.accounting import saved_activation_bytes
from coatflux.core.api import apply_coat
from coatflux.core.config import ActivationConfig, COATConfig
from coatflux.flux.lora import find_lora_targets, inject_lora

RECIPES = ("bf16", "coat", "coat-compiled")
LAYOUTS = ((1, 1), (2, 1), (1, 2))  # (double, single) blocks
MIB = 2**20
WIDTHS = {"flux-dev": FLUX_DEV_CONFIG, "tiny": TINY_CONFIG}


def _model(recipe: str, doubles: int, singles: int, backend: str, config: dict) -> tuple[torch.nn.Module, Preset]:
    preset = Preset("blocks", {**config, "num_layers": doubles, "num_single_layers": singles}, 512, ())
    model = build_transformer(preset, "cpu").requires_grad_(False)
    if recipe != "bf16":
        activation = ActivationConfig(compile_blocks=recipe == "coat-compiled")
        apply_coat(model, COATConfig(activation=activation), compile_options={"backend": backend, "dynamic": True})
    inject_lora(model, 16, 16.0, find_lora_targets(model))
    return model, preset


def saved_bytes(recipe: str, doubles: int, singles: int, resolution: int, backend: str,
                config: dict = FLUX_DEV_CONFIG) -> int:
    model, preset = _model(recipe, doubles, singles, backend, config)
    batch = make_batch(preset, resolution, 1, "cpu")
    torch._dynamo.reset()  # each model compiles its own graphs
    return saved_activation_bytes(model, lambda: loss_of(model, batch))


def weight_bytes(recipe: str, config: dict = FLUX_DEV_CONFIG) -> tuple[int, int]:
    """(frozen weight bytes of the model in this recipe, number of linears), from the meta model."""
    from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    linear_params = sum(m.weight.numel() for m in linears)
    other = sum(p.numel() for p in model.parameters()) - linear_params
    if recipe == "bf16":
        return 2 * (linear_params + other), len(linears)
    return linear_params + 4 * len(linears) + 2 * other, len(linears)  # FP8 codes + fp32 scale each


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--recipes", nargs="+", choices=RECIPES, default=RECIPES)
    parser.add_argument("--compiled-backend", default="aot_eager_decomp_partition")
    parser.add_argument("--width", choices=tuple(WIDTHS), default="flux-dev")
    args = parser.parse_args()
    config = WIDTHS[args.width]
    print(f"flux_block_memory: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{args.width} width, LoRA rank 16, {args.resolution} px, batch 1, 512 text tokens; "
          f"coat-compiled partitioned by {args.compiled_backend}")
    blocks = f"{config['num_layers']} + {config['num_single_layers']} blocks"
    print(f"{'recipe':14s} {'double':>8s} {'single':>8s} {'rest':>6s} {blocks:>15s} "
          f"{'+ weights':>10s}  (MiB; saved activations, weights excluded unless added)")
    for recipe in args.recipes:
        weights, _ = weight_bytes(recipe, config)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "FP8 GEMMs need a CUDA GPU", diffusers' float32 note
            sizes = {layout: saved_bytes(recipe, *layout, args.resolution, args.compiled_backend, config)
                     for layout in LAYOUTS}
        double = sizes[(2, 1)] - sizes[(1, 1)]
        single = sizes[(1, 2)] - sizes[(1, 1)]
        rest = sizes[(1, 1)] - double - single
        total = config["num_layers"] * double + config["num_single_layers"] * single + rest
        print(f"{recipe:14s} {double / MIB:8.1f} {single / MIB:8.1f} {rest / MIB:6.1f} {total / MIB:15.0f} "
              f"{(total + weights) / MIB:10.0f}  ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
