#!/usr/bin/env bash
# The one GPU command of a session: FLUX's attention per SDPA backend and layout, then the bench at
# 1024 px with cuDNN attention if it is sound in FLUX's layouts, then the GPU tests of the FP8 GEMM
# and of the hooked FLUX on cuDNN.
#
# Run from the repository root on a CUDA box whose python3 has torch (+CUDA, Triton), transformers, peft,
# safetensors and huggingface_hub but not diffusers: the wheels listed in scripts/gpu_wheels.txt
# travel in .whl/. Device call: carry [".whl"] on EVERY call (a carry list without it removes .whl/
# on the machine), timeout_s 575. At most 8 files come back, so $OUT (default /tmp/coatflux_out) gets
# seven: env.txt, attention.{log,json}, bench.log (every bench's log), bench_flash.json and
# bench.json (or bench512.json), gpu_tests.log. Render a JSON's markdown here with
# `coatflux bench --render FILE.json --markdown FILE.md`.
#
# What the last run (H200, 2026-11-27 04:44, docs/runs/h200-2026-11-27-0444*) taught, and what this
# one does:
# * 1024 px, ten steps: bf16 0.547 s / 53.9 GiB, compiled COAT with CUDA graphs 0.465 s / 26.5 GiB,
#   compiled torchao 0.485 s / 51.5 GiB, compiled bf16 with graphs 0.441 s. FlashAttention-2 is
#   175 ms of COAT's step; cuDNN's attention alone ran FLUX's shape in 1.69 ms against flash's
#   3.25 ms, correct (contiguous tensors), but in the model its backward hit an illegal memory
#   access. The likely cause (coatflux/flux/attention.py): PyTorch caches cuDNN's backward graph by
#   the q/k/v strides only, and FLUX's single blocks hand SDPA a gradient with other strides than the
#   double blocks do. First the attention script checks that in isolation: cuDNN with the single
#   block's gradient, then the double block's (the order of a FLUX backward), expected to fail; then
#   with the gradient made contiguous (what keep_attention_grads_contiguous does), expected to pass.
# * If that passes, the bench runs bf16 (FlashAttention, the baseline as users run it), then bf16,
#   compiled COAT and compiled bf16 (both with CUDA graphs) with cuDNN allowed, COAT profiled.
#   If it fails, the bench runs the 512 px rows instead (flash), unmeasured on the current code.
# * The compile cache (.cache/compile-cache.bin) was 102 MB at 1024 px: too big to come back from
#   the machine, so it only helps a second stage on the same warm machine. COAT's first step
#   compiles for ~110 s on an H200, torchao ~42 s, compiled bf16 ~30 s.
# Expected wall time: env <= 15 s, attention <= 60 s, benches <= 400 s, tests <= 60 s.
set -u -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site:$PWD/src || exit 1
OUT=${OUT:-/tmp/coatflux_out}
mkdir -p "$OUT" .cache
CACHE=.cache/compile-cache.bin
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c "import sys, torch, diffusers, peft; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), torch.cuda.get_device_name(0), 'diffusers', diffusers.__version__, 'peft', peft.__version__)"
  date -u
} 2>&1 | tee "$OUT/env.txt"

# bench NAME TIMEOUT ARGS...: one coatflux bench run into $OUT/NAME.json; its log, without diffusers'
# fp32 advice, appended to bench.log line by line (a buffered grep lost a killed run's whole log on
# 2026-11-27).
bench() {
  local name=$1 limit=$2
  shift 2
  echo "=== $name: $*" | tee -a "$OUT/bench.log"
  timeout "$limit" python3 -m coatflux.bench --preset flux-dev --steps 10 --warmup 2 --order config \
    --no-max-batch-search --compile-cache "$CACHE" --json "$OUT/$name.json" --markdown "/tmp/$name.md" "$@" 2>&1 \
    | grep --line-buffered -v "should be kept in float32" | tee -a "$OUT/bench.log"
  echo "$name exit status: ${PIPESTATUS[0]}" | tee -a "$OUT/bench.log"
}

# Second stage, for the minutes a session has left on the warm machine (device call:
# "OUT=$OUT bash scripts/gpu_check.sh 512", carry [".whl"], timeout_s 240).
if [ "${1:-}" = "512" ]; then
  bench bench512 220 --resolutions 512 --configs bf16 coat-compiled+cudagraphs bf16-compiled+cudagraphs --budget-s 200
  exit 0
fi

attention() {  # attention JSON ARGS...: both runs' output goes to attention.log
  local json=$1
  shift
  timeout 40 python3 benchmarks/attention_backends.py --repeats 20 --child-timeout 15 --json "$json" "$@" 2>&1 \
    | tee -a "$OUT/attention.log"
}
attention /tmp/attention_bug.json --backends cudnn --layouts flux-single flux-double
attention "$OUT/attention.json" --backends flash cudnn --layouts flux-single-fixed flux-double flux-single

if python3 - "$OUT/attention.json" <<'EOF'
import json, sys
rows = [r for r in json.load(open(sys.argv[1]))["rows"] if r["backend"] == "cudnn"]
sys.exit(0 if rows and all("error" not in r and min(r["sqnr_db"].values()) > 40 for r in rows[:2]) else 1)
EOF
then
  bench bench_flash 60 --resolutions 1024 --configs bf16 --budget-s 50
  TORCH_LOGS=recompiles bench bench 330 --resolutions 1024 --allow-cudnn-attention \
    --configs bf16 coat-compiled+cudagraphs bf16-compiled+cudagraphs --profile coat-compiled+cudagraphs --budget-s 310
else
  echo "cuDNN attention failed or was inaccurate in FLUX's layouts: 512 px rows with FlashAttention instead" | tee -a "$OUT/bench.log"
  bench bench512 330 --resolutions 512 --configs bf16 coat-compiled+cudagraphs bf16-compiled+cudagraphs --budget-s 310
fi

# The FP8 GEMM's tests, then the hooked tiny FLUX through cuDNN's attention against flash (last:
# a cuDNN fault would spoil the process for anything after it).
timeout 60 python3 -m pytest -m gpu -q -p no:cacheprovider -rfE --tb=short tests/test_linear.py \
  tests/test_flux_attention.py 2>&1 | tee "$OUT/gpu_tests.log"
echo "GPU tests exit status: ${PIPESTATUS[0]}" | tee -a "$OUT/gpu_tests.log"
