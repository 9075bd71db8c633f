"""``coatflux make-tiny-flux DIR``: write a tiny random FLUX.1 pipeline for smoke tests and CPU demos.

The folder loads with ``FluxPipeline.from_pretrained`` and as ``model.name_or_path`` of a training
config (see ``examples/tiny_flux_lora.yaml``); it is built from code, so no download is needed.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", type=Path, metavar="DIR", help="folder to create (diffusers layout)")
    parser.add_argument("--seed", type=int, default=0, help="weight initialization seed (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace DIR if it is not empty")


def run(args: argparse.Namespace) -> int:
    from coatflux.flux.tiny import make_tiny_flux

    path = make_tiny_flux(args.dir, seed=args.seed, overwrite=args.overwrite)
    print(f"Tiny FLUX pipeline written to {path}")
    return 0
