"""``coatflux convert-lora IN OUT --to kohya|diffusers``: convert a FLUX LoRA file between layouts.

``diffusers`` is the PEFT layout ai-toolkit and coatflux write (``transformer.<path>.lora_A.weight``);
``kohya`` is the ``lora_unet_*`` layout with fused qkv that kohya's sd-scripts and some UIs expect.
The input layout is detected from its keys; metadata is carried over.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", type=Path, metavar="IN", help="LoRA .safetensors to read")
    parser.add_argument("output", type=Path, metavar="OUT", help="LoRA .safetensors to write")
    parser.add_argument("--to", required=True, choices=("kohya", "diffusers"), help="target layout")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def run(args: argparse.Namespace) -> int:
    from coatflux.flux.convert import convert_lora_file

    if not args.input.is_file():
        raise FileNotFoundError(f"{args.input}: no such LoRA file")
    path = convert_lora_file(args.input, args.output, args.to, overwrite=args.overwrite)
    print(f"Wrote {args.to} LoRA to {path}")
    return 0
