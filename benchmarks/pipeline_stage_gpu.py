"""One stage of the ~10B pipeline on ONE GPU: the memory and time a rank of PP=2 with 1F1B needs.

Issue 9's "too big for one GPU" run (48 layers, d_model 4096, 32 heads, T = 1024; fp32
weights, gradients and AdamW state ≈ 158 GB, more than one H200) needs two GPUs. What one
rank of it holds and does can be measured on one: this script builds stage s of 2 the way
``benchmarks/pipeline_gpu.sh``'s big part does (``build_stage(..., own_stream=True)``: only
the stage, drawn by the GPU's own stream), then runs per step exactly the stage's share of
a 1F1B step with M micro-batches of 1 × 1024 tokens — stage 0 keeps two micro-batches'
activations in flight (warm-up P − s = 2), the last stage one — with random activations
and gradients standing in for what the other stage would send, then one AdamW step (TF32
products). It prints the stage's parameters, the pool's peak, the activations per
micro-batch, the GPU time of a forward and a backward, and what GPipe (M in flight) would
hold. The time of a PP = 2 step follows: about (M + P − 1)·(F + B) of the slower stage.

    PYTHONPATH=. python3 benchmarks/pipeline_stage_gpu.py --stage 0 --stage 1 [--steps 3] [--micro-batches 8]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402

from minillm import backend, optim, precision  # noqa: E402
from minillm.distributed.pipeline import build_stage  # noqa: E402
from minillm.models import GPTConfig  # noqa: E402
from minillm.tensor import Tensor  # noqa: E402

GIB = 2**30


def measure_stage(cfg: GPTConfig, stage_index: int, stages: int, micro_batches: int, steps: int) -> dict:
    import cupy

    pool = cupy.get_default_memory_pool()
    pool.free_all_blocks()
    start = time.perf_counter()
    stage = build_stage(cfg, stage_index, stages, device="cuda", own_stream=True)
    backend.synchronize("cuda")
    built_s = time.perf_counter() - start
    params = list(stage.parameters())
    n_params = sum(p.data.size for p in params)
    opt = optim.AdamW(params, lr=1e-4, weight_decay=0.1)
    T, C = cfg.context_length, cfg.d_model
    in_flight = stages - stage_index                      # 1F1B: warm-up of P − s micro-batches on stage s
    rng = cupy.random.default_rng(stage_index)
    peak = {"used": 0}

    def note():
        peak["used"] = max(peak["used"], pool.used_bytes())

    def timed(fn):
        begin, end = cupy.cuda.Event(), cupy.cuda.Event()
        begin.record()
        out = fn()
        end.record()
        end.synchronize()
        note()
        return out, cupy.cuda.get_elapsed_time(begin, end)

    def forward():
        if stage.is_first:
            ids = cupy.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (1, T)))
            with backend.ids_checked_on_host():
                return stage(ids)
        x = Tensor(rng.standard_normal((1, T, C), dtype=np.float32), requires_grad=True)
        targets = cupy.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (1, T)))
        with backend.ids_checked_on_host():
            return stage(x, targets)[1]

    def backward(out):
        if stage.is_last:
            out.backward(cupy.asarray(1.0 / micro_batches, dtype=np.float32))
        else:
            out.backward(rng.standard_normal(out.shape, dtype=np.float32))

    records = []
    with precision.use_precision("tf32"):
        for step in range(steps):
            for p in params:
                p.grad = None
            backend.synchronize("cuda")
            step_start = time.perf_counter()
            before = pool.used_bytes()
            pending, f_ms, b_ms, activations = [], [], [], []
            for mb in range(micro_batches):               # 1F1B on this stage: keep `in_flight` forwards
                used = pool.used_bytes()
                out, ms = timed(forward)
                f_ms.append(ms)
                activations.append(pool.used_bytes() - used)
                pending.append(out)
                if len(pending) == in_flight:             # the oldest one's gradient "arrives"
                    b_ms.append(timed(lambda: backward(pending.pop(0)))[1])
            while pending:                                # cool-down
                b_ms.append(timed(lambda: backward(pending.pop(0)))[1])
            _, opt_ms = timed(opt.step)
            records.append(dict(step_s=time.perf_counter() - step_start, forward_ms=float(np.median(f_ms)),
                                backward_ms=float(np.median(b_ms)), optimizer_ms=opt_ms,
                                activation_gib=float(np.median(activations)) / GIB, start_gib=before / GIB))
    last = records[-1]
    grads = sum(p.grad.nbytes for p in params if p.grad is not None)
    result = dict(stage=stage_index, stages=stages, blocks=[stage.start, stage.end], parameters=n_params, built_s=round(built_s, 1), weights_gib=n_params * 4 / GIB,
                  grads_gib=grads / GIB, adamw_gib=2 * n_params * 4 / GIB, peak_used_gib=peak["used"] / GIB,
                  pool_total_gib=pool.total_bytes() / GIB, in_flight=in_flight, micro_batches=micro_batches,
                  gpipe_estimate_gib=peak["used"] / GIB + (micro_batches - in_flight) * last["activation_gib"],
                  device_total_gib=cupy.cuda.runtime.memGetInfo()[1] / GIB, steps=records)
    del stage, params, opt
    pool.free_all_blocks()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", type=int, action="append", help="stage(s) of 2 to measure (default: 0 and 1)")
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--layers", type=int, default=48)
    parser.add_argument("--d-model", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    cfg = GPTConfig.from_preset("gpt2-124m", n_layer=args.layers, d_model=args.d_model, n_head=args.heads,
                                context_length=1024)
    results = []
    for s in args.stage or [0, 1]:
        r = measure_stage(cfg, s, args.stages, args.micro_batches, args.steps)
        results.append(r)
        last = r["steps"][-1]
        print(f"stage {s} of {args.stages}: {r['parameters'] / 1e9:.2f} B parameters (built in {r['built_s']} s); "
              f"weights {r['weights_gib']:.1f} + grads {r['grads_gib']:.1f} + AdamW {r['adamw_gib']:.1f} GiB; "
              f"peak in use {r['peak_used_gib']:.1f} GiB of {r['device_total_gib']:.0f} (pool {r['pool_total_gib']:.1f}); "
              f"activations {last['activation_gib']:.2f} GiB per micro-batch, {r['in_flight']} in flight; "
              f"GPipe with M={args.micro_batches} in flight ~{r['gpipe_estimate_gib']:.0f} GiB", flush=True)
        for i, rec in enumerate(r["steps"]):
            print(f"  step {i}: {rec['step_s'] * 1e3:.0f} ms; forward {rec['forward_ms']:.1f} ms, backward "
                  f"{rec['backward_ms']:.1f} ms per micro-batch, AdamW {rec['optimizer_ms']:.1f} ms", flush=True)
        f, b = last["forward_ms"], last["backward_ms"]
        print(f"  a PP={args.stages} 1F1B step bounded by this stage: ~(M+P-1)(F+B) + AdamW = "
              f"{(args.micro_batches + args.stages - 1) * (f + b) + last['optimizer_ms']:.0f} ms", flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    main()
