"""``coatflux ai-toolkit install|uninstall PATH``: put the COAT extension into an ai-toolkit checkout."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("install", "uninstall"))
    parser.add_argument("path", type=Path, help="the ai-toolkit checkout (the folder with run.py)")
    parser.add_argument("--force", action="store_true", help="replace an extensions/coatflux folder we did not write")


def run(args: argparse.Namespace) -> int:
    from coatflux.integrations.aitoolkit.install import install, uninstall

    if args.action == "install":
        target = install(args.path, force=args.force)
        print(f"installed the coatflux extension into {target}")
        print("use `type: coat_sd_trainer` (or coat_diffusion_trainer) and `optimizer: coat_fp8_adamw` in your config")
    else:
        uninstall(args.path)
        print(f"removed the coatflux extension from {args.path / 'extensions' / 'coatflux'}")
    return 0
