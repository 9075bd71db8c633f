#!/usr/bin/env bash
# The one GPU command: `coatflux bench --preset flux-dev`, the GPU tests, the trainer on CUDA.
#
# Run from the repository root on a CUDA box whose python3 has torch (+CUDA, Triton), transformers, peft,
# safetensors and huggingface_hub but not diffusers: the wheels listed in scripts/gpu_wheels.txt
# travel in .whl/. Files land in $OUT (default /tmp/coatflux_out): env.txt, bench-{1024,512}.{log,json},
# benchmarks-{1024,512}.md and both in benchmarks.md, gpu_tests.log, trainer_cuda.log.
# Copy $OUT/benchmarks.md to docs/benchmarks.md as it is.
#
# Order and bounds: the bench first, so that a cut run still has its tables. Two bench runs, 1024 px
# then 512 px, each with its own budget, so that the 512 px comparison (bf16 against the compiled COAT)
# is measured even when compiling at 1024 px takes longer than planned. Within each, the configs the
# targets name come first: bf16, the compiled COAT (coat-compiled), bf16 with checkpointing, torchao's
# float8 with compiled blocks; then bf16-compiled (the compiler's own share), torchao eager, eager COAT.
# A compiled config spends its first warm-up step compiling (not predicted by the budget; its timing
# loop stops between steps once the budget is spent). No largest-batch search: every new batch size
# recompiles a compiled config. Expected wall time under 545 s (give the device call timeout_s 570):
# bench 1024 <= 260 s (budget 200 s), bench 512 <= 130 s (budget 90 s), tests <= 80 s, trainer <= 50 s.
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
  date -u
} 2>&1 | tee "$OUT/env.txt"

# The benchmark, run directly: it disables cuDNN attention itself (--allow-cudnn-attention keeps it) and
# writes its JSON and markdown after every config, so a kill keeps what ran.
bench() {  # bench RES TIMEOUT BUDGET CONFIG...
  local res=$1 limit=$2 budget=$3; shift 3
  timeout "$limit" python3 -m coatflux.bench --preset flux-dev --resolutions "$res" --steps 10 --warmup 2 \
    --configs "$@" --no-max-batch-search --budget-s "$budget" \
    --json "$OUT/bench-$res.json" --markdown "$OUT/benchmarks-$res.md" 2>&1 \
    | grep -v "should be kept in float32" | tee "$OUT/bench-$res.log"
  echo "bench $res exit status: ${PIPESTATUS[0]}" | tee -a "$OUT/bench-$res.log"
}
bench 1024 260 200 bf16 coat-compiled bf16+ckpt torchao-compiled bf16-compiled torchao-float8 coat coat+ckpt fp8-storage
bench 512 130 90 bf16 coat-compiled bf16-compiled coat
# docs/benchmarks.md: both generated tables, one after the other, unedited.
{ cat "$OUT/benchmarks-1024.md"; printf '\n---\n\n'; cat "$OUT/benchmarks-512.md"; } > "$OUT/benchmarks.md"

# GPU kernel and FP8 tests (quantization, non-linear kernels, fused FP8AdamW, _scaled_mm, FP8Linear,
# the compiled blocks' traced FP8 linear and inlined hooks).
timeout 80 python3 -m pytest -m gpu -q -p no:cacheprovider -p no:logging --continue-on-collection-errors -rs \
  tests/test_compiled.py tests/test_linear.py tests/test_kernels_quant.py tests/test_kernels.py tests/test_kernels_nonlinear.py \
  2>&1 | tee "$OUT/gpu_tests.log"
echo "gpu tests exit status: ${PIPESTATUS[0]}" | tee -a "$OUT/gpu_tests.log"

# The trainer on CUDA: the example clothing LoRA on a tiny random FLUX, 20 steps.
timeout 50 bash -c 'python3 -m coatflux make-tiny-flux /tmp/tiny-flux > /dev/null \
  && python3 -m coatflux train examples/tiny_flux_lora.yaml --device cuda --steps 20 --overwrite \
       --set model.name_or_path=/tmp/tiny-flux --set training_folder=/tmp/coatflux_train' > "$OUT/trainer_cuda.log" 2>&1
echo "trainer exit status: $?" >> "$OUT/trainer_cuda.log"
