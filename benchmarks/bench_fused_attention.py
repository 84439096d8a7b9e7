"""Fused vs composed scaled dot-product attention: forward+backward time and peak memory.

    python benchmarks/bench_fused_attention.py                  # CPU, B=8 H=12 T=256 Dh=64 float32
    python benchmarks/bench_fused_attention.py --device cuda --seq 1024

Time is the best of ``--repeat`` forward+backward passes after one warm-up,
the two variants taking turns.
Peak memory is measured in a fresh subprocess per variant, so the two runs do
not share allocator state: on the CPU with ``tracemalloc`` (NumPy reports its
array allocations to it), on a GPU as the CuPy memory pool's size (the pool
only grows when live arrays need more), both net of the inputs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np

import minillm as mm
from minillm import functional as F

VARIANTS = {
    "fused": F.scaled_dot_product_attention,
    "composed": F.scaled_dot_product_attention_composed,
}


def make_inputs(args):
    rng = np.random.default_rng(0)
    shape = (args.batch, args.heads, args.seq, args.head_dim)
    return [mm.Tensor(rng.standard_normal(shape, dtype=np.float32), requires_grad=True, device=args.device)
            for _ in range(3)]


def step(fn, q, k, v, args):
    """One forward + backward; gradients are dropped afterwards."""
    out = fn(q, k, v, causal=True, dropout_p=args.dropout)
    out.backward(mm.backend.module_for(args.device).ones_like(out.data))
    for x in (q, k, v):
        x.grad = None


def time_variants(args) -> dict[str, float]:
    """Best forward+backward time of each variant, the variants interleaved so that
    a busy machine slows both alike."""
    q, k, v = make_inputs(args)
    for fn in VARIANTS.values():
        step(fn, q, k, v, args)                   # warm-up (kernel compilation, page faults)
    best = dict.fromkeys(VARIANTS, float("inf"))
    for _ in range(args.repeat):
        for name, fn in VARIANTS.items():
            mm.backend.synchronize(args.device)
            start = time.perf_counter()
            step(fn, q, k, v, args)
            mm.backend.synchronize(args.device)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def peak_memory_here(name, args) -> int:
    """Peak bytes allocated during one forward+backward, beyond the inputs (run in a fresh process)."""
    q, k, v = make_inputs(args)
    fn = VARIANTS[name]
    if args.device == "cpu":
        import tracemalloc  # noqa: PLC0415

        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        step(fn, q, k, v, args)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak - base
    import cupy  # noqa: PLC0415

    step(fn, q, k, v, args)                       # compile kernels outside the measurement
    pool = cupy.get_default_memory_pool()
    pool.free_all_blocks()
    base = pool.total_bytes()
    step(fn, q, k, v, args)
    mm.backend.synchronize(args.device)
    return pool.total_bytes() - base


def peak_memory(name, args) -> int:
    command = [sys.executable, __file__, "--measure-memory", name, "--device", args.device,
               "--batch", str(args.batch), "--heads", str(args.heads), "--seq", str(args.seq),
               "--head-dim", str(args.head_dim), "--dropout", str(args.dropout)]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_bytes"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--measure-memory", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.measure_memory:
        print(json.dumps({"peak_bytes": peak_memory_here(args.measure_memory, args)}))
        return

    print(f"attention forward+backward, B={args.batch} H={args.heads} T={args.seq} Dh={args.head_dim} "
          f"float32 causal dropout={args.dropout} on {args.device}")
    times = time_variants(args)
    rows = {name: (times[name], peak_memory(name, args)) for name in VARIANTS}
    print(f"{'variant':<10} {'time (ms)':>10} {'peak (MiB)':>11}")
    for name, (seconds, peak) in rows.items():
        print(f"{name:<10} {seconds * 1e3:>10.1f} {peak / 2**20:>11.1f}")
    (t_fused, m_fused), (t_composed, m_composed) = rows["fused"], rows["composed"]
    print(f"fused is {t_composed / t_fused:.2f}x faster and uses {m_fused / m_composed:.2f}x the memory")


if __name__ == "__main__":
    main()
