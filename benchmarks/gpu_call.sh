#!/bin/bash
# One device call: tests on CUDA then quick figures. Logs under $OUT.
export PYTHONPATH=. NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
OUT=${OUT:-.}
nvidia-smi --query-gpu=name,memory.used,clocks.sm --format=csv,noheader
python3 -c "import cupy, ml_dtypes; print('cupy', cupy.__version__, 'ml_dtypes', ml_dtypes.__version__)"
TESTS=${TESTS:-"tests/ops/test_attention_gpu.py tests/test_precision.py tests/ops/test_attention.py tests/ops/test_matmul.py tests/optim"}
timeout ${TEST_LIMIT:-120} python3 -m pytest --device cuda -q -x -p no:cacheprovider $TESTS > $OUT/tests.log 2>&1
echo "tests rc=$?"; grep -E "passed|failed|error" $OUT/tests.log | tail -3
grep -E "^(E |FAILED)" $OUT/tests.log | head -30
timeout ${BENCH_LIMIT:-150} python3 benchmarks/gpu_quick.py $SECTIONS 2>&1 | grep -v "^\s*$" | cut -c1-600
