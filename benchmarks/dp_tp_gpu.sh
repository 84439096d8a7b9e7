#!/usr/bin/env bash
# The 2-GPU must-shows of data and tensor parallel (issue 10), logs and a summary under $OUT.
#   on an nvidia-h200-x2:  OUT=/tmp/out bash benchmarks/dp_tp_gpu.sh
#   rehearsal on the CPU:  OUT=/tmp/out bash benchmarks/dp_tp_gpu.sh cpu      (tiny models)
#   only tensor parallel:  OUT=/tmp/out bash benchmarks/dp_tp_gpu.sh cuda tp  (steps 1, 3, 4 without DP; no kill)
set -u
export NCCL_NVLS_ENABLE=0 PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/dp_tp_out}
mkdir -p "$OUT"
DEV=${1:-cuda}
WHAT=${2:-all}
PY=${PYTHON:-python3}
S="$PY benchmarks/dp_tp_gpu.py"
L="$PY -m minillm launch --device $DEV"
if [ "$DEV" = cpu ]; then
  SMALL_BENCH="--preset tiny --context 64 --device cpu --steps 3 --warmup 1"
  LARGE_BENCH="--preset tiny --n-layer 4 --d-model 64 --n-head 4 --context 64 --device cpu --steps 3 --warmup 1"
  LOSSES="--preset tiny --context 64 --device cpu"
  KILL="--preset tiny --context 64 --device cpu --steps 50 --timeout 10"
  GPU0=""; GPU1=""
else
  SMALL_BENCH="--preset gpt2-124m --context 1024 --device cuda --steps 8 --warmup 2"
  LARGE_BENCH="--preset gpt2-large --context 1024 --device cuda --steps 4 --warmup 1"
  LOSSES="--preset gpt2-124m --context 1024 --device cuda"
  KILL="--preset tiny --context 64 --device cuda --steps 50 --timeout 10"
  GPU0="CUDA_VISIBLE_DEVICES=0"; GPU1="CUDA_VISIBLE_DEVICES=1"
fi
t() { date +%s.%N; }
say() { echo "== $*" | tee -a "$OUT/summary.txt"; }
[ "$DEV" = cuda ] && nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a "$OUT/summary.txt"

say "1. one GPU each, side by side: gpt2-124m B=8 (GPU 0) and gpt2-large B=8 (GPU 1), T=1024; then 20-step losses on GPU 0"
( [ "$WHAT" = all ] && env $GPU0 $PY -m minillm bench train $SMALL_BENCH --batch-size 8 --json > "$OUT/bench_124m_1gpu.json" 2> "$OUT/bench_124m_1gpu.log"
  env $GPU0 $S losses $LOSSES --batch-size 8 --out "$OUT/losses_1gpu.json" > "$OUT/losses_1gpu.log" 2>&1 ) &
env $GPU1 $PY -m minillm bench train $LARGE_BENCH --batch-size 8 --json > "$OUT/bench_large_1gpu.json" 2> "$OUT/bench_large_1gpu.log"
wait

say "2. DP=2, gpt2-124m, B=8 per GPU (16 global)"
[ "$WHAT" = all ] && timeout 120 $L --master-port 29631 --nproc-per-node 2 -- bench train $SMALL_BENCH --batch-size 16 --dp 2 > "$OUT/bench_124m_dp2.log" 2>&1
[ "$WHAT" = all ] && echo "rc=$?" >> "$OUT/bench_124m_dp2.log"

say "3. TP=2, gpt2-large, B=8"
timeout 150 $L --master-port 29632 --nproc-per-node 2 -- bench train $LARGE_BENCH --batch-size 8 --tp 2 > "$OUT/bench_large_tp2.log" 2>&1
echo "rc=$?" >> "$OUT/bench_large_tp2.log"

say "4. 20-step losses, gpt2-124m B=8 global: DP=2 and TP=2 against one GPU"
[ "$WHAT" = all ] && timeout 90 $L --master-port 29633 --nproc-per-node 2 -- $S losses $LOSSES --batch-size 8 --dp 2 --out "$OUT/losses_dp2.json" > "$OUT/losses_dp2.log" 2>&1
timeout 90 $L --master-port 29634 --nproc-per-node 2 -- $S losses $LOSSES --batch-size 8 --tp 2 --out "$OUT/losses_tp2.json" > "$OUT/losses_tp2.log" 2>&1
$S compare "$OUT/losses_1gpu.json" $(ls "$OUT"/losses_dp2.json 2>/dev/null) "$OUT/losses_tp2.json" 2>&1 | tee -a "$OUT/summary.txt"

say "5. kill: rank 1 SIGKILLs itself at step 3 (DP=2, then TP=2); two launchers (one per 'node'), so the survivor must find out itself"
for layout in $([ "$WHAT" = all ] && echo "dp tp"); do
  layout="--$layout 2"
  s=$(t)
  env $GPU0 timeout 90 $L --nproc-per-node 1 --nnodes 2 --node-rank 0 --master-port 29641 -- $S kill $KILL --batch-size 8 $layout > "$OUT/kill_node0.log" 2>&1 &
  P0=$!
  env $GPU1 timeout 90 $L --nproc-per-node 1 --nnodes 2 --node-rank 1 --master-port 29641 -- $S kill $KILL --batch-size 8 $layout > "$OUT/kill_node1.log" 2>&1
  rc1=$?; wait $P0; rc0=$?; e=$(t)
  echo "$layout: killed node exit $rc1; survivor's launcher exit $rc0; $(python3 -c "print(round($e - $s, 1))") s in all" | tee -a "$OUT/summary.txt"
  grep -h "stopped after\|step 3 begins" "$OUT/kill_node0.log" | tail -2 | tee -a "$OUT/summary.txt"
  cat "$OUT/kill_node0.log" "$OUT/kill_node1.log" >> "$OUT/kill_all.log"
done

say "figures"
$PY - "$OUT" <<'PY' | tee -a "$OUT/summary.txt"
import json, re, sys
out = sys.argv[1]
def last_json(path):
    for line in reversed(open(path).read().splitlines()):
        line = re.sub(r"^\[rank \d+\] ", "", line)
        if line.startswith("{"):
            return json.loads(line)
def text_tokens(path):
    m = re.search(r"([\d,]+) tokens/s", open(path).read())
    return float(m.group(1).replace(",", "")) if m else float("nan")
import os
big = last_json(f"{out}/bench_large_1gpu.json"); tp2 = text_tokens(f"{out}/bench_large_tp2.log")
if os.path.exists(f"{out}/bench_124m_dp2.log"):
    one = last_json(f"{out}/bench_124m_1gpu.json"); dp2 = text_tokens(f"{out}/bench_124m_dp2.log")
    print(f"gpt2-124m: 1 GPU {one['tokens_per_s']:,.0f} tok/s, DP=2 {dp2:,.0f} tok/s: {dp2 / one['tokens_per_s']:.2f}x")
print(f"gpt2-large: 1 GPU {big['tokens_per_s']:,.0f} tok/s, TP=2 {tp2:,.0f} tok/s: {tp2 / big['tokens_per_s']:.2f}x")
print(f"  1-GPU peak {big.get('gpu_peak_in_use_gib', float('nan')):.1f} GiB, parameters {big['parameters'] * 4 / 2**30:.2f} GiB")
for line in open(f"{out}/bench_large_tp2.log"):
    if re.search(r"\] +rank \d+: ", line):
        print("  TP=2" + line.split("]", 1)[1].rstrip())
PY
