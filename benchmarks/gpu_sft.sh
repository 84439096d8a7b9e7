#!/usr/bin/env bash
# SFT of a gpt2-124m-sized model on one GPU: its loss curve (instruction data, GPT-2 tokenizer).
# Run from the repo root on a CUDA machine:
#   DATA=../shared/data OUT=/tmp/minillm-sft bash benchmarks/gpu_sft.sh
# No published weights are downloaded: the model is gpt2-124m's shape after one pretraining step
# (nearly random), so the curve shows SFT learning the Alpaca format and the responses from scratch.
# With real GPT-2 weights in a Hugging Face folder, replace --from "$OUT/base" by --hf DIR.
set -euo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
DATA=${DATA:-../shared/data}; OUT=${OUT:-/tmp/minillm-sft}; rm -rf "$OUT"; mkdir -p "$OUT"
python3 -m minillm train --preset gpt2-124m --tokenizer "gpt2:$DATA/gpt2" --data "$DATA/the-verdict.txt" \
    --steps 1 --samples 0 --device cuda --out "$OUT/base" --quiet
time python3 -m minillm finetune sft --from "$OUT/base" --data "$DATA/instruction-data.json" --out "$OUT/sft" \
    --device cuda --epochs 3 --batch-size 8 --lr 3e-4 --eval-interval 25 --max-new-tokens 32 --quiet
python3 - "$OUT/sft/metrics.jsonl" <<'PY'
import json, sys
records = [json.loads(line) for line in open(sys.argv[1])]
train = {r["step"]: r["loss"] for r in records if r["kind"] == "train"}
print("step  train_loss  val_loss  (train loss: mean of the 25 steps up to here)")
for r in (r for r in records if r["kind"] == "eval"):
    window = [train[s] for s in range(max(1, r["step"] - 24), r["step"] + 1) if s in train]
    mean = sum(window) / len(window) if window else float("nan")
    print(f"{r['step']:4d}  {mean:10.4f}  {r['val_loss']:8.4f}")
seconds = max(r.get("time_s", 0) for r in records if r["kind"] == "train")
tokens = max(r.get("tokens", 0) for r in records if r["kind"] == "train")
print(f"training time {seconds:.1f} s, {tokens / seconds:,.0f} tokens/s (padded batch tokens)")
PY
python3 -m minillm generate --run "$OUT/sft" --instruction "Name three primary colors." --temperature 0 \
    --max-new-tokens 32 --device cuda
