"""``python -m coatflux.bench``: the bench subcommand alone (the other subcommands are not imported)."""

from __future__ import annotations

import argparse
import faulthandler
import logging
import signal
import sys

from coatflux.bench.cli import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coatflux.bench", description="benchmark FLUX LoRA steps")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # A run stopped from outside (a device call's time limit) says where it was: in a compile, a
    # step, or a kernel.
    faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
