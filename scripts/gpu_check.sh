#!/usr/bin/env bash
# The one GPU command of a session: the GELU backward's scale formulations timed alone, FLUX's FP8
# GEMMs with and without fast accumulation, FLUX's attention on flash and cuDNN in the hooked
# layouts, then the bench at 1024 px (bf16 with flash; every recipe with cuDNN and the hook if that
# check passed), then the GPU tests of the FP8 GEMM and of the compiled quantizers.
#
# Run from the repository root on a CUDA box whose python3 has torch (+CUDA, Triton), transformers, peft,
# safetensors and huggingface_hub but not diffusers: the wheels listed in scripts/gpu_wheels.txt
# travel in .whl/. Device call: carry [".whl"] on EVERY call (a carry list without it removes .whl/
# on the machine), timeout_s 595. At most 8 files come back, so $OUT (default /tmp/coatflux_out) gets
# eight: env.txt, scale_fusion.json, attention.{log,json}, bench.log (every bench's log and
# scale_fusion's), bench_flash.json, bench.json, gpu_tests.log (the 512 stage: bench512_flash.json,
# bench512.json, bench.log). Render the JSONs' markdown here with
# `coatflux bench --render A.json B.json ... --markdown FILE.md`.
#
# What the last GPU session (H200, 2026-11-27 06:10-06:24, docs/runs/h200-2026-11-27-06*) taught,
# what changed since (CPU only), and what this run does:
# * cuDNN's attention breaks FLUX's backward unless coatflux's hook makes the attention gradients
#   contiguous (coatflux/flux/attention.py): confirmed in isolation, and with the hook it ran FLUX's
#   attention 1.85x faster than flash. 1024 px with cuDNN: bf16 0.504 s, compiled COAT with CUDA
#   graphs 0.376 s / 26.6 GiB, compiled bf16 0.364 s; bf16 with flash 0.556 s.
# * Since then kernels/quant._pow2 builds 2**k from its bits (int32 tensor constants): 71.5 against
#   88.8 ms of inductor's kernels at the issue rate (benchmarks/kernel_sass.py, CPU). Its first
#   try at this, on 2026-11-26, did not compile for CUDA under torch 2.11: if it fails again, the
#   COAT rows and test_kernels_quant.py say so.
# * benchmarks/scale_fusion.py times the single block's GELU backward with its gradient's FP8 scale
#   with the maximum per row (fused into a looped reduction kernel, now) and per chunk of 256
#   (a separate reduction): 0.37 ms per call at 06:10 against 0.105 on the H100 before the fusion.
# * Since then the compiled blocks add the LoRA up-projection into the FP8 GEMM's output in place
#   (coatflux::lora_addmm_): 418 of the 494 memcpy128 copies of the 06:10 profile (7.1 ms in all)
#   should be gone from the COAT profile; and backward adds grad_h @ A into the FP8 input gradient
#   in place, so the other 76 (double blocks' backward) should be gone too.
# * The FP8 GEMMs now use fast accumulation by default (activation.fp8_fast_accumulation, as COAT's
#   Triton GEMMs on Hopper): the COAT rows measure it. benchmarks/fp8_accumulation.py times every
#   FP8 GEMM shape of the step with use_fast_accum off and on, with the error of each; the GPU
#   tests check both against the reference at K = 4096.
# * FusedFP8AdamW now compiles its update over the flat buffers (185 eager operations, 38.8 GB of
#   traffic for the bench's 85.9 M LoRA elements) into one or two kernels on a GPU and reuses its
#   grouping of the tensors between steps: COAT's optimizer column was 13 ms at 06:10. The GPU test of
#   tests/test_kernels.py checks the compiled step against the reference.
# * The checkpointing and torchao rows have not run with cuDNN yet. This run measures every 1024 px
#   recipe in one process with cuDNN and the hook (the trainer's default), COAT profiled, after
#   bf16 with flash (the bench's default) as the other baseline; first a short check that cuDNN is
#   still correct in FLUX's layouts with the hook, and the bench with flash only if it is not.
# * The compile cache (.cache/compile-cache.bin) is too big to come back from the machine (64-102
#   MB), so it only helps a second stage on the same warm machine. First steps on an H200: COAT
#   ~120 s, torchao ~42 s, compiled bf16 ~33 s.
# Expected wall time: env <= 15 s, scale_fusion <= 50 s, fp8_accumulation <= 30 s, attention <= 40 s,
# benches <= 375 s, tests <= 80 s (590 s at most, in a 595 s device call).
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
# "OUT=$OUT bash scripts/gpu_check.sh 512", carry [".whl"], timeout_s 240): bf16 with flash, then
# bf16, compiled COAT and compiled bf16 with cuDNN and the hook.
if [ "${1:-}" = "512" ]; then
  bench bench512_flash 40 --resolutions 512 --configs bf16 --budget-s 30
  bench bench512 190 --resolutions 512 --allow-cudnn-attention --configs bf16 coat-compiled+cudagraphs \
    bf16-compiled+cudagraphs --budget-s 180
  exit 0
fi

timeout 50 python3 benchmarks/scale_fusion.py --repeats 30 --chunks 256 --json "$OUT/scale_fusion.json" 2>&1 \
  | tee -a "$OUT/bench.log"

# fast accumulation in FLUX's FP8 GEMM shapes: time and error (its table goes to bench.log only)
timeout 30 python3 benchmarks/fp8_accumulation.py --repeats 20 2>&1 | tee -a "$OUT/bench.log"

timeout 40 python3 benchmarks/attention_backends.py --repeats 20 --child-timeout 15 --json "$OUT/attention.json" \
  --backends flash cudnn --layouts flux-single-fixed flux-double 2>&1 | tee "$OUT/attention.log"

bench bench_flash 60 --resolutions 1024 --configs bf16 --budget-s 50
if python3 - "$OUT/attention.json" <<'EOF'
import json, sys
rows = [r for r in json.load(open(sys.argv[1]))["rows"] if r["backend"] == "cudnn"]
sys.exit(0 if len(rows) == 2 and all("error" not in r and min(r["sqnr_db"].values()) > 40 for r in rows) else 1)
EOF
then
  CUDNN=--allow-cudnn-attention
else
  CUDNN=
  echo "cuDNN attention failed or was inaccurate in FLUX's layouts with the hook: the bench runs with flash" \
    | tee -a "$OUT/bench.log"
fi
TORCH_LOGS=recompiles bench bench 315 --resolutions 1024 $CUDNN --configs bf16 bf16+ckpt coat-compiled+cudagraphs \
  torchao-compiled bf16-compiled+cudagraphs --profile coat-compiled+cudagraphs --budget-s 295

# The FP8 GEMM's tests, the compiled quantizers' against the reference byte for byte, the fused
# FP8AdamW's compiled step against the reference (the
# hooked tiny FLUX on cuDNN passed at 06:10 and is left out for time).
timeout 80 python3 -m pytest -m gpu -q -p no:cacheprovider -rfE --tb=short tests/test_linear.py \
  tests/test_kernels_quant.py tests/test_kernels.py 2>&1 | tee "$OUT/gpu_tests.log"
echo "GPU tests exit status: ${PIPESTATUS[0]}" | tee -a "$OUT/gpu_tests.log"
