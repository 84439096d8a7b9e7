#!/usr/bin/env bash
# Mixed precision keeps the quality (issue 8): the same 2,000-step GPU run of a gpt2-124m-shaped model on
# tinyshakespeare with the GPT-2 tokenizer, in fp32, bf16 and fp16 (with the loss scaler), and each
# run's final validation loss side by side (relative difference to fp32).
#
#   OUT=/some/dir DATA=../shared/data STEPS=2000 bash benchmarks/gpu_quality.sh
#
# Every run starts from the same weights (seed 1337) and sees the same batches; --cuda-graph replays
# the step (it gives the same numbers as the uncaptured step: tests/train/test_graph_step.py).
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
OUT=${OUT:-/tmp/minillm-quality}; DATA=${DATA:-../shared/data}; STEPS=${STEPS:-2000}
mkdir -p "$OUT"
for precision in ${PRECISIONS:-fp32 bf16 fp16}; do
  start=$(date +%s)
  timeout ${RUN_LIMIT:-200} python3 -m minillm train --data "$DATA/tinyshakespeare.txt" --tokenizer "gpt2:$DATA/gpt2" \
    --preset gpt2-124m --context 256 --dropout 0 --batch-size 8 --steps "$STEPS" --lr 3e-4 --min-lr 3e-5 \
    --warmup 100 --eval-interval 500 --eval-batches 40 --checkpoint-interval 0 --device cuda \
    --precision "$precision" --cuda-graph --samples 0 --quiet --out "/tmp/quality-$precision" > "$OUT/quality-$precision.log" 2>&1
  echo "$precision: exit $? in $(( $(date +%s) - start )) s"
done
python3 - "$STEPS" <<'EOF'
import json, sys
from pathlib import Path
final = {}
for precision in ("fp32", "bf16", "fp16"):
    path = Path(f"/tmp/quality-{precision}/metrics.jsonl")
    if not path.exists():
        continue
    evals = [r for r in map(json.loads, path.read_text().splitlines()) if "val_loss" in r]
    if evals:
        final[precision] = evals[-1]
        print(precision, "val loss by step:", [(r["step"], round(r["val_loss"], 4)) for r in evals])
reference = final.get("fp32")
for precision, r in final.items():
    diff = "" if reference is None else f"  ({100 * (r['val_loss'] / reference['val_loss'] - 1):+.2f}% vs fp32)"
    print(f"| {precision} | step {r['step']} | val loss {r['val_loss']:.4f}{diff} |")
EOF
