#!/usr/bin/env bash
# The one GPU command: quantization-kernel micro-benchmark, GPU tests, then `coatflux bench --preset flux-dev`.
#
# Run from the repository root on a CUDA box whose python3 has torch (+CUDA, Triton), transformers, peft,
# safetensors and huggingface_hub but not diffusers: the wheels listed in scripts/gpu_wheels.txt
# travel in .whl/. Files land in $OUT (default /tmp/coatflux_out): env.txt, {quant,nonlinear}_kernels.{log,json},
# gpu_tests.log, bench.{log,json}, benchmarks.md; copy $OUT/benchmarks.md to docs/benchmarks.md as it is.
# Expected wall time under 390 s on an H100/H200: kernels <= 85 s (mostly compilation), tests <= 60 s,
# bench budget 200 s (capped at 225 s: one step of overshoot plus start-up).
set -u -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD/src || exit 1
OUT=${OUT:-/tmp/coatflux_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

{
  nvidia-smi
  python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
  python3 -c "import diffusers, peft; print('diffusers', diffusers.__version__, 'peft', peft.__version__)"
  python3 -c "import torchao; print('torchao', torchao.__version__)" || echo "torchao: not importable"
} 2>&1 | tee "$OUT/env.txt"

# Quantization kernels, reference vs fused, on a 4608x3072 bf16 tensor (also fills inductor's cache for the tests).
timeout 45 python3 benchmarks/quant_kernels.py --json "$OUT/quant_kernels.json" 2>&1 | tee "$OUT/quant_kernels.log"
echo "quant kernels exit status: ${PIPESTATUS[0]}" | tee -a "$OUT/quant_kernels.log"

# Fused non-linear kernels (LayerNorm+AdaLN, QK RMSNorm, GELU-tanh with the FP8 save), reference vs fused.
timeout 40 python3 benchmarks/nonlinear_kernels.py --json "$OUT/nonlinear_kernels.json" 2>&1 | tee "$OUT/nonlinear_kernels.log"
echo "nonlinear kernels exit status: ${PIPESTATUS[0]}" | tee -a "$OUT/nonlinear_kernels.log"

# GPU kernel and FP8 tests (tests/test_kernels_quant.py, tests/test_kernels.py, ...); bounded so the bench always runs.
timeout 90 python3 -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors -rs tests 2>&1 \
  | tee "$OUT/gpu_tests.log"
echo "gpu tests exit status: ${PIPESTATUS[0]}" | tee -a "$OUT/gpu_tests.log"

# The benchmark, run directly: it disables cuDNN attention itself (--allow-cudnn-attention keeps it) and
# writes bench.json / benchmarks.md after every config, so a kill keeps what ran.
# One FLUX block at width 3072 and 1024x1024 tokens: saved-for-backward bytes, bf16 vs COAT, on the GPU.
timeout 40 python3 benchmarks/core_memory.py --device cuda --tokens 4096 --text-tokens 512 > "$OUT/core_memory.txt" 2>&1
echo "core memory exit status: $?" >> "$OUT/core_memory.txt"

timeout 200 python3 -m coatflux.bench --preset flux-dev --resolutions 512 1024 --steps 10 --warmup 2 \
  --max-batch-steps 2 --budget-s 165 --json "$OUT/bench.json" --markdown "$OUT/benchmarks.md" 2>&1 \
  | grep -v "should be kept in float32" | tee "$OUT/bench.log"
echo "bench exit status: ${PIPESTATUS[0]}" | tee -a "$OUT/bench.log"

# The trainer on CUDA: the example clothing LoRA on a tiny random FLUX, 20 steps (it has never run on a GPU).
timeout 45 bash -c 'python3 -m coatflux make-tiny-flux /tmp/tiny-flux > /dev/null \
  && python3 -m coatflux train examples/tiny_flux_lora.yaml --device cuda --steps 20 --overwrite \
       --set model.name_or_path=/tmp/tiny-flux --set training_folder=/tmp/coatflux_train' > "$OUT/trainer_cuda.log" 2>&1
echo "trainer exit status: $?" >> "$OUT/trainer_cuda.log"
