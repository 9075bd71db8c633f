#!/usr/bin/env bash
# The one GPU command: `coatflux bench --preset flux-dev`, the GPU tests, the trainer on CUDA.
#
# Run from the repository root on a CUDA box whose python3 has torch (+CUDA, Triton), transformers, peft,
# safetensors and huggingface_hub but not diffusers: the wheels listed in scripts/gpu_wheels.txt
# travel in .whl/. Files land in $OUT (default /tmp/coatflux_out), six of them: env.txt,
# bench.{log,json}, benchmarks.md, gpu_tests.log, trainer_cuda.log.
# Copy $OUT/benchmarks.md to docs/benchmarks.md as it is (and bench.json to docs/bench-<card>.json, from
# which `coatflux bench --render` writes it again in a later layout).
#
# Order and bounds: the bench first, so that a cut run still has its table. One bench run, config by
# config (--order config): each config's model runs 1024 px then 512 px, and a compiled config compiles
# once (dynamic shapes, the trainer's default) for both resolutions and the batch search (its fresh
# models share the saved-tensor hooks, which dynamo guards on).
# The configs the targets name come first: bf16, the compiled COAT (coat-compiled), bf16 with
# checkpointing, torchao's float8 with compiled blocks; then bf16-compiled (the compiler's own share),
# eager COAT and the rest. A compiled config's first step compiles; the bench's budget cannot predict
# it (the "first step s" column and the log's "first step" lines say what it cost).
# Earlier runs (H200, 2026-11-26): compiling COAT's blocks did not finish in 236 s at 1024 px when the
# first block of each class compiled a second graph (four graphs; two since 521de71); one double plus
# one single block took over 50 s. Since then each graph is traced once (not twice) and a new resolution
# does not recompile; leaving batch 1 does, once per block class, so coat-compiled's batch search runs
# last. Expected wall time under 560 s (give the device call timeout_s 575):
# bench <= 450 s (budget 380 s), tests <= 60 s, trainer <= 40 s.
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
# writes bench.json / benchmarks.md after every config, so a kill keeps what ran.
timeout 450 python3 -m coatflux.bench --preset flux-dev --resolutions 1024 512 --steps 10 --warmup 2 \
  --configs bf16 coat-compiled bf16+ckpt torchao-compiled bf16-compiled coat coat+ckpt torchao-float8 fp8-storage \
  --order config --max-batch-configs bf16 coat-compiled --max-batch-steps 2 --budget-s 380 \
  --json "$OUT/bench.json" --markdown "$OUT/benchmarks.md" 2>&1 \
  | grep -v "should be kept in float32" | tee "$OUT/bench.log"
echo "bench exit status: ${PIPESTATUS[0]}" | tee -a "$OUT/bench.log"

# GPU kernel and FP8 tests (quantization, non-linear kernels, fused FP8AdamW, _scaled_mm, FP8Linear,
# the compiled blocks' traced FP8 linear and inlined hooks).
timeout 60 python3 -m pytest -m gpu -q -p no:cacheprovider -p no:logging --continue-on-collection-errors -rs \
  tests/test_compiled.py tests/test_linear.py tests/test_kernels_quant.py tests/test_kernels.py tests/test_kernels_nonlinear.py \
  2>&1 | tee "$OUT/gpu_tests.log"
echo "gpu tests exit status: ${PIPESTATUS[0]}" | tee -a "$OUT/gpu_tests.log"

# The trainer on CUDA: the example clothing LoRA on a tiny random FLUX, 20 steps.
timeout 40 bash -c 'python3 -m coatflux make-tiny-flux /tmp/tiny-flux > /dev/null \
  && python3 -m coatflux train examples/tiny_flux_lora.yaml --device cuda --steps 20 --overwrite \
       --set model.name_or_path=/tmp/tiny-flux --set training_folder=/tmp/coatflux_train' > "$OUT/trainer_cuda.log" 2>&1
echo "trainer exit status: $?" >> "$OUT/trainer_cuda.log"
