#!/bin/bash
# Device call 2: CUDA tests (parallel), decode and training figures, a profile. Logs under $OUT.
export PYTHONPATH=. NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
OUT=${OUT:-.}
timeout 110 python3 -m pytest --device cuda -q -n 16 -p no:cacheprovider tests/ops tests/test_precision.py \
  tests/test_generate_graph.py tests/test_generate.py tests/optim tests/test_backend.py tests/models tests/nn \
  > $OUT/tests.log 2>&1
echo "tests rc=$?"; grep -E "passed|failed" $OUT/tests.log | tail -2
grep -E "^(FAILED|ERROR)" $OUT/tests.log | head -20
grep -E "^E  " $OUT/tests.log | head -30 | cut -c1-300
timeout 75 python3 benchmarks/gpu_quick.py gemm decode train 2>&1 | grep -v "^\s*$" | cut -c1-400
timeout 40 python3 benchmarks/profile_gpu_step.py bf16 tf32 2>&1 | tail -60
