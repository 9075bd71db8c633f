#!/usr/bin/env bash
# The one GPU command of a session: the bench rows that test the host-bound explanation first, then
# the GPU tests that failed or never finished.
#
# Run from the repository root on a CUDA box whose python3 has torch (+CUDA, Triton), transformers, peft,
# safetensors and huggingface_hub but not diffusers: the wheels listed in scripts/gpu_wheels.txt
# travel in .whl/ (device call: carry [".whl"], timeout_s 575). Files land in $OUT (default
# /tmp/coatflux_out): env.txt, bench.{log,json}, benchmarks.md, gpu_tests.log.
#
# What the last run (H200, 2026-11-26 23:43, docs/runs/2026-11-26-h200.md) taught, and what this one does:
# * Compiling COAT's blocks takes 100-160 s at 1024 px on an H200 (cache warm or cold), 60 s more
#   for 512 px: the old script's separate profiling pass compiled again and ran out of time, and
#   11 GPU tests took over 130 s. So the bench comes first and profiles the models it has just
#   timed (--profile), and only two test files run, each under its own limit.
# * coat-compiled took 0.526 s at 1024 px on both an H100 and an H200, while eager bf16 went
#   0.611 -> 0.554 s: the compiled step does not follow the GPU. On the H100 the two compiled recipes
#   at 512 px cost the same ~45 us per Triton launch (0.447 s / 9,937 launches, 0.216 s / 4,883).
#   The +cudagraphs rows (mode reduce-overhead) replay each block as CUDA graphs: if the step is
#   host time, they show it. The profiles give GPU busy time against wall time.
# * test_kernels_quant.py::test_cuda_inductor_matches_reference failed (its message was lost with
#   the killed pytest); its assertions now say what differs, and this run keeps the message.
# * Row plans are now timed as CUDA-graph replays (the GPU's work, not Python's launches) and kept
#   in ~/.cache/coatflux/gemm_row_plans.json; test_linear.py checks the replay timer.
# Expected wall time under 560 s: env <= 15 s, bench <= 370 s, tests <= 145 s.
set -u -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD/src || exit 1
OUT=${OUT:-/tmp/coatflux_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import sys, torch, diffusers, peft; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), 'diffusers', diffusers.__version__, 'peft', peft.__version__)"
  date -u
} 2>&1 | tee "$OUT/env.txt"

# 1024 px only: 512 px costs each compiled recipe a recompilation (~60 s; a row-plan boundary lies
# between their row counts), and a fresh model per cell would time its row plans again. The bench
# writes bench.json / benchmarks.md after every config, so a kill keeps what ran.
TORCH_LOGS=recompiles,cudagraphs timeout 370 python3 -m coatflux.bench --preset flux-dev --resolutions 1024 \
  --steps 10 --warmup 2 --order config \
  --configs bf16 coat-compiled+cudagraphs bf16-compiled+cudagraphs coat-compiled bf16-compiled \
  --profile coat-compiled+cudagraphs coat-compiled --no-max-batch-search --budget-s 350 \
  --json "$OUT/bench.json" --markdown "$OUT/benchmarks.md" 2>&1 \
  | grep -v "should be kept in float32" | tee "$OUT/bench.log"
echo "bench exit status: ${PIPESTATUS[0]}" | tee -a "$OUT/bench.log"

# GPU tests, one file at a time so that a slow one cannot hide another's result; -rfE keeps each
# failure's message in the log.
for spec in "tests/test_kernels_quant.py 75" "tests/test_linear.py 70"; do
  set -- $spec
  timeout "$2" python3 -m pytest -m gpu -q -p no:cacheprovider -rfE --tb=short "$1" 2>&1 | tee -a "$OUT/gpu_tests.log"
  echo "$1 exit status: ${PIPESTATUS[0]}" | tee -a "$OUT/gpu_tests.log"
done
