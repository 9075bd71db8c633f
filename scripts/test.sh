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
.venv/bin/python -m pytest -q "$@"
