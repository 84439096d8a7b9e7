#!/bin/bash
# One GPU session: the whole suite on CUDA, PyTorch/HF vs minillm (training and decoding),
# host-vs-GPU time of a step, long-context memory. Logs under $OUT (default .).
export PYTHONPATH=. NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
OUT=${OUT:-.}
nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv,noheader
timeout ${TEST_LIMIT:-100} python3 -m pytest --device cuda -q -n 16 -p no:cacheprovider > $OUT/tests.log 2>&1
echo "tests rc=$?"; grep -E "passed|failed" $OUT/tests.log | tail -2
grep -E "^(FAILED|ERROR)" $OUT/tests.log | head -25 | cut -c1-200
timeout ${COMPARE_LIMIT:-90} python3 benchmarks/torch_gpu_compare.py --steps 5 2>&1 | grep -v "^\s*$" | grep -v Warning | cut -c1-300
timeout ${LONG_LIMIT:-45} python3 benchmarks/gpu_quick.py host long 2>&1 | grep -v "^\s*$" | cut -c1-300
