#!/usr/bin/env bash
# Install coatflux into .venv (CPU PyTorch) and run the main job on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e .
.venv/bin/coatflux demo
