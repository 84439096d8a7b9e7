"""The autograd engine's host overhead per op call: Python time that does not depend on array sizes.

On a GPU the gpt2-124m step is host-bound in TF32 and bf16 (docs/performance.md):
Python issues ~423 op calls per step and the GPU waits for them. This script
builds the same graph - gpt2-124m's 12 layers, every op - with tiny dimensions on
the CPU (d_model 8, 2 heads, context 8, batch 1, vocab 64), so the arithmetic is
negligible and what is timed is the engine: ``Function.apply``, tensor
construction, dtype and device checks, the backward walk, and the optimizer's
per-parameter loop.

    python benchmarks/host_overhead.py                 # 200 timed reps, then a profile
    python benchmarks/host_overhead.py --reps 500 --profile-top 30
    PYTHONPATH=. python benchmarks/host_overhead.py --device cuda   # on a GPU machine

On a GPU the arrays are as tiny, so the GPU idles and each phase's time (up to
a synchronize at its end) is the host's: Python plus CuPy's kernel launches.

Printed: the number of op calls (forward ``Function.apply`` calls, backward
nodes), the median time of the forward, the backward and the AdamW step, each
divided by its count (µs per op call; per parameter for the optimizer), and a
cProfile of ``--profile-reps`` whole steps, top functions by own time. Medians
of many reps: still, check ``uptime`` on a shared machine.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import minillm  # noqa: E402
from minillm import backend, optim, tensor  # noqa: E402
from minillm.models import GPT, GPTConfig  # noqa: E402


def build(args):
    """gpt2-124m's layer count and op graph, tiny dimensions; AdamW with weight-decay groups."""
    minillm.manual_seed(0)
    config = GPTConfig.from_preset("gpt2-124m", d_model=args.d_model, n_head=args.n_head,
                                   context_length=args.context, vocab_size=args.vocab_size)
    model = GPT(config).to(args.device)
    groups = optim.weight_decay_groups(model.named_parameters(), 0.1)
    optimizer = optim.AdamW(groups, lr=1e-4)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.vocab_size, size=(args.batch_size, args.context))
    targets = rng.integers(0, config.vocab_size, size=(args.batch_size, args.context))
    return model, optimizer, backend.to_device(ids, args.device), backend.to_device(targets, args.device)


def forward(model, ids, targets):
    _, loss = model(ids, targets)
    return loss


def count_ops(model, optimizer, ids, targets) -> tuple[int, int, int]:
    """(forward op calls, backward nodes, parameters updated) of one step.

    Forward: every ``Function.apply`` (wrapped for this one step). Backward: the
    functions the engine walks (the graph's nodes reachable from the loss).
    """
    calls = 0
    original = tensor.Function.apply.__func__

    def counting_apply(cls, *inputs, **params):
        nonlocal calls
        calls += 1
        return original(cls, *inputs, **params)

    tensor.Function.apply = classmethod(counting_apply)
    try:
        loss = forward(model, ids, targets)
    finally:
        tensor.Function.apply = classmethod(original)
    nodes = len(tensor._topological_order(loss._ctx))
    loss.backward()
    updated = sum(1 for group in optimizer.param_groups for p in group["params"] if p.grad is not None)
    optimizer.zero_grad()
    return calls, nodes, updated


def time_phases(model, optimizer, ids, targets, reps: int, device: str) -> dict[str, list[float]]:
    """Seconds of each phase, per rep: forward, backward, optimizer step (zero_grad untimed).
    Each phase ends with a synchronize (a no-op on the CPU)."""
    times: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": []}

    def clock():
        backend.synchronize(device)
        return time.perf_counter()

    for _ in range(reps):
        t0 = clock()
        loss = forward(model, ids, targets)
        t1 = clock()
        loss.backward()
        t2 = clock()
        optimizer.step()
        t3 = clock()
        optimizer.zero_grad()
        times["forward"].append(t1 - t0)
        times["backward"].append(t2 - t1)
        times["optimizer"].append(t3 - t2)
    return times


def profile_steps(model, optimizer, ids, targets, reps: int, top: int) -> None:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(reps):
        forward(model, ids, targets).backward()
        optimizer.step()
        optimizer.zero_grad()
    profiler.disable()
    print(f"\ncProfile of {reps} steps, top {top} by own time (tottime):")
    pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(top)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=200, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first")
    parser.add_argument("--profile-reps", type=int, default=50, help="steps under cProfile (0: no profile)")
    parser.add_argument("--profile-top", type=int, default=20, help="functions listed from the profile")
    parser.add_argument("--d-model", type=int, default=8, help="width (tiny: arithmetic negligible)")
    parser.add_argument("--n-head", type=int, default=2, help="attention heads")
    parser.add_argument("--context", type=int, default=8, help="sequence length T")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per step")
    parser.add_argument("--vocab-size", type=int, default=64, help="vocabulary size")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    args.device = backend.parse_device(args.device)

    model, optimizer, ids, targets = build(args)
    n_forward, n_backward, n_params = count_ops(model, optimizer, ids, targets)
    time_phases(model, optimizer, ids, targets, args.warmup, args.device)
    times = time_phases(model, optimizer, ids, targets, args.reps, args.device)
    median = {phase: statistics.median(values) for phase, values in times.items()}

    print(f"gpt2-124m graph, tiny dims (d_model {args.d_model}, {args.n_head} heads, T {args.context}, "
          f"B {args.batch_size}, vocab {args.vocab_size}) on {args.device}; median of {args.reps} reps")
    print(f"{'phase':<10} {'count':>6} {'ms':>8} {'µs each':>9}")
    rows = [("forward", n_forward, "op calls"), ("backward", n_backward, "nodes"),
            ("optimizer", n_params, "parameters")]
    for phase, count, what in rows:
        ms = median[phase] * 1e3
        print(f"{phase:<10} {count:>6} {ms:>8.2f} {median[phase] * 1e6 / count:>9.1f}   (per {what[:-1]})")
    total = sum(median.values())
    print(f"{'step':<10} {n_forward:>6} {total * 1e3:>8.2f} {total * 1e6 / n_forward:>9.1f}   "
          f"(whole step per forward op call)")
    if args.profile_reps:
        profile_steps(model, optimizer, ids, targets, args.profile_reps, args.profile_top)


if __name__ == "__main__":
    main()
