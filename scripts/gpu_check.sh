#!/usr/bin/env bash
# The one GPU command: kernel tests on the GPU, then `coatflux bench --preset flux-dev`.
#
# Run from the repository root on a CUDA box whose python3 has torch (+CUDA), transformers, peft,
# safetensors and huggingface_hub but not diffusers: the wheels listed in scripts/gpu_wheels.txt
# travel in .whl/. Logs, bench.json and benchmarks.md land in $OUT (default /tmp/coatflux_out);
# copy $OUT/benchmarks.md to docs/benchmarks.md as it is. Expected wall time: about 5 minutes
# (tests <= 60 s, bench budget 240 s plus one step of overshoot and start-up).
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

# GPU kernel and FP8 tests (tests/test_kernels.py, tests/test_linear.py, ...); bounded so the bench always runs.
timeout 60 python3 -m pytest -m gpu -q -p no:cacheprovider --continue-on-collection-errors -rs tests 2>&1 \
  | tee "$OUT/gpu_tests.log"
echo "gpu tests exit status: ${PIPESTATUS[0]}" | tee -a "$OUT/gpu_tests.log"

# The benchmark. It writes bench.json / benchmarks.md after every config, so a kill keeps what ran.
timeout 330 python3 -m coatflux.bench --preset flux-dev --resolutions 512 1024 --steps 10 --warmup 2 \
  --max-batch-steps 2 --budget-s 240 --json "$OUT/bench.json" --markdown "$OUT/benchmarks.md" 2>&1 \
  | grep -v "should be kept in float32" | tee "$OUT/bench.log"
echo "bench exit status: ${PIPESTATUS[0]}" | tee -a "$OUT/bench.log"
