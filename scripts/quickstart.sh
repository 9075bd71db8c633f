#!/usr/bin/env bash
# Install coatflux into .venv (CPU PyTorch) and run the main job on the CPU: build a tiny random
# FLUX pipeline, then train a clothing LoRA on examples/clothing with COAT and FP8AdamW.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e .
[ -f output/tiny-flux/model_index.json ] || .venv/bin/coatflux make-tiny-flux output/tiny-flux
.venv/bin/coatflux train examples/tiny_flux_lora.yaml "$@"
