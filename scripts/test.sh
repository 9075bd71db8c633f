#!/usr/bin/env bash
# Install coatflux with its test tools into .venv and run the linter and the test suite.
# The CPU build of PyTorch is installed first: a plain `torch` requirement would pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/ruff check src tests benchmarks examples scripts
# Two workers (pytest-xdist), one per core and one compute thread each (tests/conftest.py). On 2
# cores with cold compiler caches (2026-11-27) the suite took 706 s in one process, then 358 s with
# two workers after two inductor tests were trimmed. "-n 0" as an argument runs it in one process.
.venv/bin/python -m pytest -q -n 2 "$@"
