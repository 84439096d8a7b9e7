#!/usr/bin/env bash
# The GPU checks behind the figures in the issues' closing notes.
# Run from the repo root on a CUDA machine: OUT=/some/dir bash benchmarks/gpu_check.sh [tests|bench|all]
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
OUT=${OUT:-/tmp/minillm-gpu}; mkdir -p "$OUT"
what=${1:-all}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import cupy, numpy; print('cupy', cupy.__version__, 'numpy', numpy.__version__)" | tee -a "$OUT/gpu.txt"
if [ "$what" = tests ] || [ "$what" = all ]; then
  python3 -m pytest --device cuda -q -p no:cacheprovider -p no:warnings tests > "$OUT/pytest_cuda.log" 2>&1
  tail -3 "$OUT/pytest_cuda.log"
fi
if [ "$what" = bench ] || [ "$what" = all ]; then
  {
    python3 -m minillm bench train --preset gpt2-124m --batch-size 8 --context 1024 --device cuda --steps 10 --warmup 3
    for preset in gpt2-124m gpt2-medium; do
      for batch in 1 8; do
        python3 -m minillm bench generate --preset "$preset" --batch-size "$batch" --new-tokens 128 --device cuda --cache-only
      done
    done
    python3 -m minillm train --device cuda --steps 300 --out /tmp/minillm-gpu-run --quiet --samples 1
  } 2>&1 | tee "$OUT/bench_gpu.log"
fi
