#!/usr/bin/env bash
# The 2-GPU must-shows of pipeline parallel (issue 9), in ONE call of < 9 minutes on an nvidia-h200-x2:
#   export NCCL_NVLS_ENABLE=0; OUT=$OUT bash benchmarks/pipeline_gpu.sh
#   rehearsal on the CPU (tiny models, CPU ranks):   OUT=/tmp/out bash benchmarks/pipeline_gpu.sh cpu
#   some parts only:   ONLY="equality faults" bash benchmarks/pipeline_gpu.sh    (equality nodes faults big)
#   gpt2-124m in another precision:   GPT2_EXTRA="--precision tf32" ONLY=equality bash benchmarks/pipeline_gpu.sh
# Parts, in order, each command under its own `timeout` (a failure or a timeout in one does not stop
# the others; the whole call keeps to BUDGET seconds, the 10B run gets what is left, at most 240 s):
#   equality  gpt2-124m B=16 T=1024 M=8, 20 steps: one GPU (8 accumulated micro-batches) vs PP=2 1F1B,
#             6 steps of PP=2 GPipe: losses (max relative difference), step times vs t1 and the ideal
#             t1(M+P-1)/(MP), per-stage GPU time from CUDA events, activation memory GPipe vs 1F1B
#   nodes     two launchers (--nnodes 2 --node-rank 0|1 --master-addr 127.0.0.1), one GPU each, 5 steps
#   faults    SIGKILL of rank 1 at step 7 (checkpoints every 3 steps, --timeout 15): one launcher, then
#             one launcher per "node" (the survivor must exit non-zero by itself); the step-6 checkpoint
#             of the killed run resumed on one GPU vs an uninterrupted one-GPU run
#   big       ~10B GPT (48 layers, d_model 4096, 32 heads, T=1024), PP=2 1F1B, B=8 M=8, TF32, 10 steps,
#             each rank building only its stage on its GPU (--stage-init)
# What comes back: $OUT/pipeline_gpu.log (everything every rank printed), $OUT/results.json (the
# numbers), $OUT/summary.txt (the table printed at the end).
set -u
ONLY=${ONLY:-"equality nodes faults big"}
want() { case " $ONLY " in *" $1 "*) return 0;; *) return 1;; esac; }
export NCCL_NVLS_ENABLE=0 PYTHONPATH=.
OUT=${OUT:-/tmp/pipeline_out}
mkdir -p "$OUT"
LOG="$OUT/pipeline_gpu.log"; : > "$LOG"
W=$(mktemp -d /tmp/pipeline_gpu.XXXXXX)          # JSONs, run folders: not brought back
DEV=${1:-cuda}
PY=${PYTHON:-python3}
B="$PY benchmarks/pipeline_gpu.py"
L="$PY -m minillm launch --device $DEV"
BUDGET=${BUDGET:-530}
START=$(date +%s)
RUN_ID="pgpu$$"                                    # marks every process a part starts (see reap)
if [ "$DEV" = cpu ]; then
  GPT2="--preset tiny --context 64 --batch 8 --micro-batches 4 --device cpu"
  SMALL="$GPT2"
  BIG="--preset tiny --layers 4 --d-model 64 --heads 4 --context 64 --batch 8 --micro-batches 8 --device cpu"
  GPU0=""; GPU1=""
else
  GPT2="--preset gpt2-124m --context 1024 --batch 16 --micro-batches 8 ${GPT2_EXTRA:-}"   # e.g. GPT2_EXTRA="--precision tf32"
  SMALL="--preset gpt2-124m --layers 4 --d-model 256 --heads 4 --context 256 --batch 8 --micro-batches 4"
  BIG="--preset gpt2-124m --layers 48 --d-model 4096 --heads 32 --context 1024 --batch 8 --micro-batches 8 --precision tf32"
  GPU0="CUDA_VISIBLE_DEVICES=0"; GPU1="CUDA_VISIBLE_DEVICES=1"
fi
now() { date +%s.%N; }
elapsed() { echo $(( $(date +%s) - START )); }
note() { echo "$*" >> "$W/parts.tsv"; }            # name<TAB>rc<TAB>seconds (for the summary)
say() { echo "[$(elapsed) s] $*"; echo "===== [$(elapsed) s] $*" >> "$LOG"; }
reap() {  # processes of a part that outlived it (a launcher killed by timeout leaves its ranks): by pid
  for f in /proc/[0-9]*/environ; do
    if tr '\0' '\n' 2>/dev/null < "$f" | grep -qx "PIPELINE_GPU_RUN=$RUN_ID"; then
      p=${f#/proc/}; p=${p%/environ}; kill -9 "$p" 2>/dev/null && echo "reaped leftover process $p" >> "$LOG"
    fi
  done
}
left() { echo $(( BUDGET - $(elapsed) )); }
cap() {  # cap SECONDS: the time a command may take, cut to what is left of the budget (0: skip it)
  local l=$(( $(left) - 10 )); [ "$1" -lt "$l" ] && l=$1; [ "$l" -lt 30 ] && l=0; echo $l
}
# run NAME SECONDS COMMAND...: one command of a part, its output into the log, rc and time noted
run() {
  local name=$1 limit=$(cap $2); shift 2
  if [ "$limit" -eq 0 ]; then say "$name: skipped, $(left) s of the budget left"; note "$name	skipped	0"; return 1; fi
  say "$name (timeout $limit s): $*"
  local s=$(now)
  env PIPELINE_GPU_RUN=$RUN_ID timeout -k 15 "$limit" "$@" >> "$LOG" 2>&1; local rc=$?
  local took=$($PY -c "print(round($(now) - $s, 1))")
  echo "----- $name: exit $rc after $took s" >> "$LOG"; echo "    exit $rc after $took s"
  note "$name	$rc	$took"; reap
  return $rc
}

say "pipeline_gpu.sh on $DEV: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | tr '\n' ';')"

if want equality; then
  # the one-GPU reference and (for the fault part) the small model's uninterrupted one-GPU run, side by side
  say "equality: one GPU (GPU 0) and the small reference (GPU 1) side by side"
  s=$(now)
  env PIPELINE_GPU_RUN=$RUN_ID $GPU0 timeout -k 15 $(cap 150) $B train $GPT2 --steps 20 --init-cpu --out "$W/one_gpu.json" \
    > "$W/one_gpu.log" 2>&1 & P0=$!
  if want faults; then
    env PIPELINE_GPU_RUN=$RUN_ID $GPU1 timeout -k 15 $(cap 150) $B train $SMALL --steps 10 --init-cpu --out "$W/small_ref.json" \
      > "$W/small_ref.log" 2>&1; note "small_ref	$?	$($PY -c "print(round($(now) - $s, 1))")"
  fi
  wait $P0; note "one_gpu	$?	$($PY -c "print(round($(now) - $s, 1))")"
  cat "$W/one_gpu.log" >> "$LOG"; [ -f "$W/small_ref.log" ] && cat "$W/small_ref.log" >> "$LOG"; reap
  run pp2_1f1b 120 $L --nproc-per-node 2 --master-port 29601 -- $B train $GPT2 --steps 20 --init-cpu --schedule 1f1b \
    --out "$W/pp2_1f1b.json"
  run pp2_gpipe 90 $L --nproc-per-node 2 --master-port 29602 -- $B train $GPT2 --steps 20 --stop-at 6 --init-cpu \
    --schedule gpipe --out "$W/pp2_gpipe.json"
fi

if want nodes && [ "$(cap 100)" -ge 60 ]; then
  say "nodes: two launchers, one GPU each, 5 steps (PP=2 1F1B)"
  s=$(now)
  limit=$(cap 100)
  env PIPELINE_GPU_RUN=$RUN_ID $GPU0 timeout -k 15 $limit $L --nproc-per-node 1 --nnodes 2 --node-rank 0 \
    --master-addr 127.0.0.1 --master-port 29611 -- $B train $GPT2 --steps 20 --stop-at 5 --init-cpu \
    --out "$W/two_nodes.json" > "$W/node0.log" 2>&1 & P0=$!
  env PIPELINE_GPU_RUN=$RUN_ID $GPU1 timeout -k 15 $limit $L --nproc-per-node 1 --nnodes 2 --node-rank 1 \
    --master-addr 127.0.0.1 --master-port 29611 -- $B train $GPT2 --steps 20 --stop-at 5 --init-cpu \
    --out "$W/two_nodes.json" > "$W/node1.log" 2>&1; rc1=$?
  wait $P0; rc0=$?
  note "two_nodes	$rc0/$rc1	$($PY -c "print(round($(now) - $s, 1))")"
  { echo "--- node 0"; cat "$W/node0.log"; echo "--- node 1"; cat "$W/node1.log"; } >> "$LOG"; reap
fi

if want faults && [ "$(cap 200)" -ge 150 ]; then
  if [ ! -f "$W/small_ref.json" ]; then   # the uninterrupted one-GPU run the resumed one is compared with
    run small_ref 90 env $GPU0 $B train $SMALL --steps 10 --init-cpu --out "$W/small_ref.json"
  fi
  run fault_one_launcher 90 $L --nproc-per-node 2 --master-port 29621 -- $B train $SMALL --steps 10 --save-every 3 \
    --run-dir "$W/fault_run" --kill-rank 1 --kill-step 7 --timeout 15
  say "fault, one launcher per node: rank 1 (node 1) kills itself at step 7; rank 0 (node 0) must exit by itself"
  limit=$(cap 100)
  env PIPELINE_GPU_RUN=$RUN_ID $GPU0 timeout -k 15 $limit $L --nproc-per-node 1 --nnodes 2 --node-rank 0 \
    --master-addr 127.0.0.1 --master-port 29622 -- $B train $SMALL --steps 10 --save-every 3 \
    --run-dir "$W/fault_run2" --kill-rank 1 --kill-step 7 --timeout 15 > "$W/fault_node0.log" 2>&1 & P0=$!
  env PIPELINE_GPU_RUN=$RUN_ID $GPU1 timeout -k 15 $limit $L --nproc-per-node 1 --nnodes 2 --node-rank 1 \
    --master-addr 127.0.0.1 --master-port 29622 -- $B train $SMALL --steps 10 --save-every 3 \
    --run-dir "$W/fault_run2" --kill-rank 1 --kill-step 7 --timeout 15 > "$W/fault_node1.log" 2>&1; rc1=$?
  k=$(now); wait $P0; rc0=$?
  note "fault_two_launchers	$rc0/$rc1	$($PY -c "print(round($(now) - $k, 1))")"
  { echo "--- node 0 (the survivor)"; cat "$W/fault_node0.log"; echo "--- node 1 (killed)"; cat "$W/fault_node1.log"; } >> "$LOG"
  grep -hE "minillm: error|Timeout|did not complete|NCCL reported" "$W/fault_node0.log" | head -3 > "$W/survivor_message.txt"
  reap
  run resume 60 env $GPU0 $B train $SMALL --steps 10 --run-dir "$W/fault_run" --resume --out "$W/resumed.json"
fi

if want big; then
  if [ "$(cap 240)" -ge 90 ]; then
    run big 240 $L --nproc-per-node 2 --master-port 29631 -- $B train $BIG --steps 10 --schedule 1f1b \
      --stage-init --timeout 120 --out "$W/big.json"
  else
    say "big: skipped, only $(left) s of the budget left"; note "big	skipped	0"
  fi
fi

$PY - "$W" "$OUT" "$DEV" <<'EOF' | tee "$OUT/summary.txt"
import json, os, sys
work, out, dev = sys.argv[1:4]
def load(name):
    path = os.path.join(work, name)
    try:
        return json.load(open(path))
    except (OSError, ValueError):
        return None
parts = {}
for line in open(os.path.join(work, "parts.tsv")) if os.path.exists(os.path.join(work, "parts.tsv")) else []:
    name, rc, took = line.rstrip("\n").split("\t")
    parts[name] = (rc, took)
R = {name: load(name + ".json") for name in ("one_gpu", "pp2_1f1b", "pp2_gpipe", "two_nodes", "small_ref", "resumed", "big")}
rows = []
def row(what, text):
    rows.append((what, text))
def rel(a, b):
    return max(abs(x - y) / abs(y) for x, y in zip(a, b)) if a and b else float("nan")
def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else float("nan")
def f(x, spec=".2f"):
    return "-" if x is None else format(x, spec)
def ran(name):
    rc, took = parts.get(name, ("not run", "-"))
    return f"exit {rc}, {took} s"
json.dump({"parts": parts, **R}, open(os.path.join(out, "results.json"), "w"), indent=1)
one, pp, gp, two, big = R["one_gpu"], R["pp2_1f1b"], R["pp2_gpipe"], R["two_nodes"], R["big"]
M, P = (pp or gp or one or {}).get("micro_batches", 8), 2
sections = []
def section(fn):   # a section that fails (a missing field, a None) leaves one line, not a traceback
    sections.append(fn)
    return fn

@section
def equality():
    for name, run in (("equality 1F1B", pp), ("equality GPipe", gp)):
        if one and run:
            n = min(len(one["losses"]), len(run["losses"]))
            row(name, f"{n} steps, max rel loss diff vs one GPU {rel(run['losses'][:n], one['losses'][:n]):.2e} "
                f"(step {n}: {run['losses'][n-1]:.6f} vs {one['losses'][n-1]:.6f})")

@section
def timing():
    if not one:
        return
    t1 = median(one["step_s"][3:])
    ideal = t1 * (M + P - 1) / (M * P)
    row("t1, ideal", f"one GPU t1 = {t1*1e3:.0f} ms (median of steps 4..), ideal t1(M+P-1)/(MP) = {ideal*1e3:.0f} ms")
    for name, run in ((f"PP=2 M={M} 1F1B", pp), (f"PP=2 M={M} GPipe", gp)):
        if run and len(run["step_s"]) > 3:
            t = median(run["step_s"][3:])
            row(name, f"{t*1e3:.0f} ms = {t/ideal:.3f} x ideal (target <= 1.10), {t1/t:.2f}x one GPU")

@section
def stages():
    for name, run in (("1F1B", pp), ("GPipe", gp)):
        for r in (run or {}).get("ranks", []):
            if not r.get("gpu_span_ms"):
                continue
            row(f"  {name} stage {r['rank']}", f"blocks {r['stage_blocks']}: GPU per step F {r['gpu_forward_ms']:.0f} + "
                f"B {r['gpu_backward_ms']:.0f} ms, send/recv+waits {r['gpu_exchange_ms']:.0f} ms, span {r['gpu_span_ms']:.0f} ms, "
                f"bubble {f(r['bubble'], '.3f')} (ideal {(P-1)/(M+P-1):.3f}); host issued the schedule in "
                f"{f(r['host_issue_ms'], '.0f')} ms")
    if pp and pp.get("ranks") and all(r.get("gpu_span_ms") for r in pp["ranks"]) and one:
        c = [r["gpu_forward_ms"] + r["gpu_backward_ms"] for r in pp["ranks"]]
        bound = (M - 1) * max(c) / M + sum(c) / M
        row("  stage balance", f"F+B per stage {[round(x) for x in c]} ms; with these stages the schedule cannot beat "
            f"{bound:.0f} ms (+ optimizer); t1/2 = {median(one['step_s'][3:])*500:.0f} ms")

@section
def activations():
    if not (pp and gp):
        return
    for a, b in zip(gp["ranks"], pp["ranks"]):
        if a.get("activation_peak_gib") is None:
            continue
        ratio = b["activation_peak_gib"] / a["activation_peak_gib"] if a["activation_peak_gib"] else float("nan")
        row(f"activations stage {a['rank']}", f"GPipe {a['activation_peak_gib']:.3f} GiB ({a['max_in_flight']} in flight), "
            f"1F1B {b['activation_peak_gib']:.3f} GiB ({b['max_in_flight']}): ratio {ratio:.3f} "
            f"(target <= P/M x 1.1 = {P/M*1.1:.3f})")
        row(f"  memory stage {a['rank']}", f"params {b['params_gib']:.2f} + grads {b['grads_gib']:.2f} + AdamW "
            f"{b['optimizer_gib']:.2f} GiB; peak pool GPipe {f(a['pool_peak_gib'])} / 1F1B {f(b['pool_peak_gib'])} GiB")

@section
def nodes():
    if two and (pp or one):
        ref = pp or one
        n = len(two["losses"])
        row("two nodes", f"{n} steps, max rel diff vs one node {rel(two['losses'], ref['losses'][:n]):.2e} ({ran('two_nodes')})")
    elif "two_nodes" in parts:
        row("two nodes", f"no result ({ran('two_nodes')})")

@section
def faults():
    if "fault_one_launcher" in parts:
        row("fault, 1 launcher", f"launcher {ran('fault_one_launcher')} (want non-zero, well under the timeout)")
    if "fault_two_launchers" in parts:
        rc, took = parts["fault_two_launchers"]
        path = os.path.join(work, "survivor_message.txt")
        message = open(path).read().strip().replace("\n", " | ")[:300] if os.path.exists(path) else ""
        row("fault, 2 launchers", f"exit codes survivor's launcher/killed's launcher {rc}; survivor gone {took} s after "
            f"the kill: {message}")
    res, ref = R["resumed"], R["small_ref"]
    if res and ref:
        k = len(ref["losses"]) - len(res["losses"])
        row("resume", f"one GPU from the step-{k} checkpoint of the killed PP=2 run: steps {k+1}..{len(ref['losses'])} "
            f"max rel diff vs the uninterrupted one-GPU run {rel(res['losses'], ref['losses'][k:]):.2e}")
    elif "resume" in parts:
        row("resume", f"no result ({ran('resume')}, reference {'present' if ref else 'missing'})")

@section
def ten_billion():
    if not big:
        if "big" in parts:
            row("10B", f"no result ({ran('big')})")
        return
    m = big.get("micro_batches", M)
    steps = big["step_s"]
    row("10B", f"{sum(r['parameters'] for r in big['ranks']):,} parameters over 2 GPUs (the tied embedding on both); "
        f"built in {big['build_s']:.0f} s; step {median(steps[2:])*1e3:.0f} ms (median of steps 3..{len(steps)}; "
        f"first {steps[0]:.1f} s); losses {big['losses'][0]:.3f} -> {big['losses'][-1]:.3f}")
    for r in big["ranks"]:
        if r.get("activation_peak_gib") is None:
            continue
        per_mb = r["activation_peak_gib"] / max(r["max_in_flight"], 1)
        base = r["pool_peak_gib"] if r["pool_peak_gib"] is not None else \
            r["params_gib"] + r["grads_gib"] + r["optimizer_gib"] + r["activation_peak_gib"]
        gpipe = base + (m - r["max_in_flight"]) * per_mb
        row(f"  10B stage {r['rank']}", f"params {r['params_gib']:.1f} + grads {r['grads_gib']:.1f} + AdamW "
            f"{r['optimizer_gib']:.1f} GiB; activations {r['activation_peak_gib']:.2f} GiB ({r['max_in_flight']} "
            f"micro-batches, {per_mb:.2f} each); peak pool {f(r['pool_peak_gib'], '.1f')} GiB, device in use "
            f"{f(r['device_used_gib'], '.1f')} GiB; GPipe (M={m} in flight) would need ~{gpipe:.1f} GiB "
            f"(the peak + {m - r['max_in_flight']} more micro-batches)")

for fn in sections:
    try:
        fn()
    except Exception as error:  # noqa: BLE001
        row("(summary)", f"{fn.__name__}: {type(error).__name__}: {error}")
width = max((len(w) for w, _ in rows), default=10)
print("\n".join(f"{w:<{width}}  {t}" for w, t in rows))
print(f"parts (exit, seconds): " + ", ".join(f"{n} {rc}/{t}" for n, (rc, t) in parts.items()))
EOF
echo "total $(elapsed) s; logs in $OUT (pipeline_gpu.log, results.json, summary.txt)"
rm -rf "$W"
