#!/usr/bin/env bash
# The 2-GPU must-shows of pipeline parallel (issue 9), in sequence, logs under $OUT.
#   on an nvidia-h200-x2:  OUT=/tmp/out bash benchmarks/pipeline_gpu.sh
#   rehearsal on the CPU:  OUT=/tmp/out bash benchmarks/pipeline_gpu.sh cpu      (tiny models)
#   some parts only:       ONLY="equality big" bash benchmarks/pipeline_gpu.sh   (collectives equality nodes faults big)
set -u
ONLY=${ONLY:-"collectives equality nodes faults big"}
want() { case " $ONLY " in *" $1 "*) return 0;; *) return 1;; esac; }
export NCCL_NVLS_ENABLE=0 PYTHONPATH=.
OUT=${OUT:-/tmp/pipeline_out}
mkdir -p "$OUT"
DEV=${1:-cuda}
PY=${PYTHON:-python3}
B="$PY benchmarks/pipeline_gpu.py"
L="$PY -m minillm launch --device $DEV"
if [ "$DEV" = cpu ]; then
  GPT2="--preset tiny --context 64 --batch 8 --micro-batches 4 --device cpu"
  SMALL="$GPT2"
  BIG="--preset tiny --layers 4 --d-model 64 --heads 4 --context 64 --batch 8 --micro-batches 8 --device cpu"
  GPU0=""; GPU1=""
else
  GPT2="--preset gpt2-124m --context 1024 --batch 16 --micro-batches 8"
  SMALL="--preset gpt2-124m --layers 4 --d-model 256 --heads 4 --context 256 --batch 8 --micro-batches 4"
  BIG="--preset gpt2-124m --layers 48 --d-model 4096 --heads 32 --context 1024 --batch 8 --micro-batches 8 --precision tf32"
  GPU0="CUDA_VISIBLE_DEVICES=0"; GPU1="CUDA_VISIBLE_DEVICES=1"
fi
t() { date +%s.%N; }
say() { echo "== $*" | tee -a "$OUT/summary.txt"; }

if want collectives; then
say "1. NCCL collectives (fp32, fp16, bf16), split, 256 MB all-reduce"
$L --nproc-per-node 2 -- $B collectives --device $DEV > "$OUT/01_collectives.log" 2>&1; echo "rc=$?" >> "$OUT/01_collectives.log"
grep -c "^\[rank .\] ok" "$OUT/01_collectives.log" | sed 's/^/checks ok: /' | tee -a "$OUT/summary.txt"
grep -E "FAIL|split|256 MB|rc=" "$OUT/01_collectives.log" | tee -a "$OUT/summary.txt"

fi
if want equality; then
say "2. gpt2-124m B=16 T=1024, 20 steps: one GPU (8 accumulated micro-batches) vs PP=2 1F1B vs PP=2 GPipe"
env $GPU0 timeout 150 $B train $GPT2 --steps 20 --init-cpu --out "$OUT/one_gpu.json" > "$OUT/02_one_gpu.log" 2>&1; echo "rc=$?" >> "$OUT/02_one_gpu.log"
timeout 120 $L --nproc-per-node 2 -- $B train $GPT2 --steps 20 --init-cpu --schedule 1f1b --out "$OUT/pp2_1f1b.json" > "$OUT/03_pp2_1f1b.log" 2>&1; echo "rc=$?" >> "$OUT/03_pp2_1f1b.log"
timeout 90 $L --nproc-per-node 2 -- $B train $GPT2 --steps 20 --stop-at 6 --init-cpu --schedule gpipe --out "$OUT/pp2_gpipe.json" > "$OUT/04_pp2_gpipe.log" 2>&1; echo "rc=$?" >> "$OUT/04_pp2_gpipe.log"

fi
if want nodes; then
say "3. two 'nodes' (one GPU each, separate launchers) vs one node, 5 steps"
env $GPU0 $L --nproc-per-node 1 --nnodes 2 --node-rank 0 --master-addr 127.0.0.1 --master-port 29611 -- \
  $B train $GPT2 --steps 20 --stop-at 5 --init-cpu --out "$OUT/two_nodes.json" > "$OUT/05_node0.log" 2>&1 &
env $GPU1 $L --nproc-per-node 1 --nnodes 2 --node-rank 1 --master-addr 127.0.0.1 --master-port 29611 -- \
  $B train $GPT2 --steps 20 --stop-at 5 --init-cpu --out "$OUT/two_nodes.json" > "$OUT/05_node1.log" 2>&1
wait

fi
if want faults; then
say "4. faults: SIGKILL rank 1 at step 7 (checkpoints every 3 steps), timeout 15 s"
rm -rf "$OUT/fault_run" "$OUT/fault_run2"
s=$(t); $L --nproc-per-node 2 -- $B train $SMALL --steps 10 --save-every 3 --run-dir "$OUT/fault_run" \
  --kill-rank 1 --kill-step 7 --timeout 15 > "$OUT/06_fault_one_launcher.log" 2>&1; rc=$?; e=$(t)
echo "one launcher: exit $rc after $($PY -c "print(round($e - $s, 1))") s" | tee -a "$OUT/summary.txt"
s=$(t)
env $GPU0 $L --nproc-per-node 1 --nnodes 2 --node-rank 0 --master-port 29622 -- $B train $SMALL --steps 10 --save-every 3 \
  --run-dir "$OUT/fault_run2" --kill-rank 1 --kill-step 7 --timeout 15 > "$OUT/07_fault_node0.log" 2>&1 &
P0=$!
env $GPU1 $L --nproc-per-node 1 --nnodes 2 --node-rank 1 --master-port 29622 -- $B train $SMALL --steps 10 --save-every 3 \
  --run-dir "$OUT/fault_run2" --kill-rank 1 --kill-step 7 --timeout 15 > "$OUT/07_fault_node1.log" 2>&1
k=$(t); wait $P0; rc0=$?; e=$(t)
echo "two launchers: node 1 exit after the kill; node 0 (the survivor) exit $rc0, $($PY -c "print(round($e - $k, 1))") s after the kill" | tee -a "$OUT/summary.txt"
grep -hE "CommError|closed its connection|timed out|did not complete|NCCL reported" "$OUT/07_fault_node0.log" | tail -2 | tee -a "$OUT/summary.txt"
env $GPU0 $B train $SMALL --steps 10 --run-dir "$OUT/fault_run" --resume --out "$OUT/resumed.json" > "$OUT/08_resume.log" 2>&1; echo "rc=$?" >> "$OUT/08_resume.log"
env $GPU0 $B train $SMALL --steps 10 --init-cpu --out "$OUT/small_ref.json" > "$OUT/08_small_ref.log" 2>&1

fi
$PY - "$OUT" <<'EOF' | tee -a "$OUT/summary.txt"
import json, sys, os
out = sys.argv[1]
def load(name):
    path = os.path.join(out, name)
    return json.load(open(path)) if os.path.exists(path) else None
one, pp, gp, two = load("one_gpu.json"), load("pp2_1f1b.json"), load("pp2_gpipe.json"), load("two_nodes.json")
def rel(a, b):
    return max(abs(x - y) / abs(y) for x, y in zip(a, b))
if one and pp:
    print(f"losses one GPU : {[round(x, 4) for x in one['losses'][:3]]} ... {one['losses'][-1]:.6f}")
    print(f"losses PP=2    : {[round(x, 4) for x in pp['losses'][:3]]} ... {pp['losses'][-1]:.6f}")
    print(f"max relative loss difference over {len(pp['losses'])} steps: {rel(pp['losses'], one['losses']):.2e}")
    t1 = sorted(one["step_s"][3:])[len(one["step_s"][3:]) // 2]
    tp = sorted(pp["step_s"][3:])[len(pp["step_s"][3:]) // 2]
    M, P = 8, 2
    ideal = t1 * (M + P - 1) / (M * P)
    print(f"step time: one GPU t1 = {t1*1e3:.0f} ms, PP=2 M=8 = {tp*1e3:.0f} ms, ideal t1(M+P-1)/(MP) = "
          f"{ideal*1e3:.0f} ms -> {tp/ideal:.3f} x ideal")
    for m in pp["memory"]:
        print(f"  1F1B rank {m['rank']}: blocks {m['stage_blocks']}, peak pool {m['pool_peak_gib']} GiB, "
              f"activations {m['activation_peak_gib']:.2f} GiB, in flight {m['max_in_flight']}")
if gp and pp:
    for a, b in zip(gp["memory"], pp["memory"]):
        ratio = b["activation_peak_gib"] / a["activation_peak_gib"] if a["activation_peak_gib"] else float("nan")
        print(f"  stage {a['rank']}: GPipe activations {a['activation_peak_gib']:.2f} GiB (in flight "
              f"{a['max_in_flight']}), 1F1B {b['activation_peak_gib']:.2f} GiB: ratio {ratio:.3f} (P/M = {2/8:.3f})")
if two and pp:
    print(f"two nodes vs one node, 5 steps: max rel diff {rel(two['losses'], pp['losses'][:5]):.2e}")
res, ref = load("resumed.json"), load("small_ref.json")
if res and ref:
    k = len(ref["losses"]) - len(res["losses"])
    print(f"resumed on one GPU from the step-{k} checkpoint of the killed PP=2 run: steps {k+1}..10 "
          f"max rel diff vs uninterrupted one-GPU run {rel(res['losses'], ref['losses'][k:]):.2e}")
EOF

if want big; then
say "5. ~10B GPT (48 layers, d_model 4096, 32 heads, T=1024), PP=2 1F1B, M=8, TF32"
timeout ${BIG_TIMEOUT:-200} $L --nproc-per-node 2 -- $B train $BIG --steps ${BIG_STEPS:-5} --schedule 1f1b --out "$OUT/big.json" > "$OUT/09_big.log" 2>&1; echo "rc=$?" >> "$OUT/09_big.log"
tail -4 "$OUT/09_big.log" | tee -a "$OUT/summary.txt"
$PY -c "
import json; r = json.load(open('$OUT/big.json'))
print('10B: params', sum(m['parameters'] for m in r['memory']) - 0, 'build', round(r['build_s'], 1), 's; step s', [round(x, 2) for x in r['step_s']])
for m in r['memory']: print('  rank', m['rank'], 'blocks', m['stage_blocks'], 'params', m['parameters'], 'peak pool GiB', m['pool_peak_gib'] and round(m['pool_peak_gib'], 1), 'activations GiB', m['activation_peak_gib'] and round(m['activation_peak_gib'], 2), 'in flight', m['max_in_flight'])
" 2>&1 | tee -a "$OUT/summary.txt"
fi
nvidia-smi --query-gpu=name,memory.total --format=csv >> "$OUT/summary.txt" 2>/dev/null
