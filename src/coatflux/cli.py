"""The ``coatflux`` command: a thin dispatcher to the layers below.

Each subcommand lives with the code it drives and exposes ``add_arguments(parser)`` and
``run(args) -> int``; this module only registers them, imports them lazily (so ``coatflux
--help`` does not import diffusers), and turns configuration errors into one readable line and
exit code 2 instead of a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from coatflux.core.config import ConfigError

# name -> (module, help). Modules expose add_arguments(parser) and run(args) -> int.
_COMMANDS = {
    "demo": ("coatflux.demo", "train a small model on CPU with FP8AdamW and COAT activations; print memory"),
    "train": ("coatflux.trainer.cli", "train a FLUX LoRA from an ai-toolkit YAML config"),
    "make-tiny-flux": ("coatflux.flux.cli", "write a small random-weight FLUX pipeline (diffusers layout)"),
    "convert-lora": ("coatflux.flux.convert_cli", "convert a FLUX LoRA between diffusers and kohya layouts"),
    "ai-toolkit": ("coatflux.integrations.aitoolkit.cli", "install or uninstall the ai-toolkit extension"),
    "bench": ("coatflux.bench.cli", "benchmark FLUX LoRA training steps: bf16, FP8 storage, torchao, COAT"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coatflux", description="COAT FP8 memory-efficient training for FLUX LoRAs.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except (ConfigError, OSError, ValueError) as exc:
        if args.verbose:
            raise
        print(f"coatflux {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
