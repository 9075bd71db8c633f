"""``coatflux train CONFIG``: run an ai-toolkit FLUX LoRA job file with coatflux's trainer.

Overrides: ``--steps N`` is shorthand for ``--set train.steps=N``; ``--set KEY=VALUE`` sets any
dotted key relative to ``config.process[0]`` (or absolute under ``config.``/``meta.``), the value
parsed as YAML so ``--set train.lr=1e-4`` is a number and ``--set coat.enabled=false`` a bool.
Heavy imports (torch, diffusers) happen inside :func:`run`, so ``coatflux --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from coatflux.core.config import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, metavar="CONFIG", help="ai-toolkit job file (.yaml or .json)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a finished run's outputs in the output folder instead of stopping")
    parser.add_argument("--device", default=None, help="torch device (default: the config's, e.g. cuda)")
    parser.add_argument("--steps", type=int, default=None, help="override train.steps (for quick runs)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.lr=1e-4 (repeatable)")


def parse_overrides(items: list[str], steps: int | None = None) -> dict[str, Any]:
    """``["train.lr=1e-4", ...]`` -> ``{"train.lr": 0.0001}`` (values read as YAML)."""
    import yaml

    from coatflux.trainer.config import _Loader  # the same float rule as the config files

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.steps=100")
        out[key.strip()] = yaml.load(value, Loader=_Loader)
    if steps is not None:
        out["train.steps"] = steps
    return out


def run(args: argparse.Namespace) -> int:
    from coatflux.trainer.checkpoint import CheckpointError
    from coatflux.trainer.config import load_config
    from coatflux.trainer.faults import NonFiniteError, TrainingOutOfMemory
    from coatflux.trainer.loop import train

    cfg = load_config(args.config, parse_overrides(args.overrides, args.steps))
    try:
        result = train(cfg, overwrite=args.overwrite, device=args.device)
    except (NonFiniteError, TrainingOutOfMemory, CheckpointError) as error:
        print(f"coatflux train: error: {error}", file=sys.stderr)
        return 1
    if result.rank != 0:
        return 0  # the main process reports for the run
    if result.stopped_by is not None:
        print(f"Stopped by {result.stopped_by} at step {result.steps}; checkpoint {result.checkpoint}. "
              f"Resume with the same command: coatflux train {args.config}")
        return 130 if result.stopped_by == "SIGINT" else 143
    print(f"{'LoRA' if cfg.network.type == 'lora' else 'Transformer'}: {result.lora_path}")
    if result.samples:
        print(f"Samples: {result.samples[0].parent} ({len(result.samples)} images, last {result.samples[-1].name})")
    if result.skipped_steps:
        print(f"Skipped steps (non-finite loss or gradient): {result.skipped_steps}")
    print(f"Checkpoint: {result.checkpoint} (run again with more train.steps to continue)")
    return 0
