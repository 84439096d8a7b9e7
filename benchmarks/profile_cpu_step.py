"""Where a CPU training step spends its time: per op family, forward and backward.

The ``minillm bench train`` configuration (6 layers, 6 heads, 384 wide, T=256,
B=8, vocab 65, fp32, AdamW with clipping) by default. Every ``Function``
subclass's ``forward`` and ``backward`` is wrapped with a timer, and so are the
gradient clip and the optimizer step; what is left of the step's wall time is
the autograd engine and Python glue between the ops. Beside each wall time
stands the process's CPU time (all threads): on a shared machine it is the
steadier figure of the work an op does. Inside fused attention the softmax
passes (elementwise) are timed apart from its matrix products (BLAS), by the
CPU time of the threads that run them. The last line sums the CPU time by
kind of work: BLAS products, elementwise passes, copies, engine and Python.

    python benchmarks/profile_cpu_step.py                 # 8 timed steps after 2 warm-up
    python benchmarks/profile_cpu_step.py --steps 20 --batch-size 4

The timers add a few microseconds per op call (~0.5 ms per step); the plain
step time (no timers) is measured first and printed too.
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import minillm  # noqa: E402
from minillm import backend, optim, tensor  # noqa: E402
from minillm.data.dataset import TokenDataset  # noqa: E402
from minillm.models import GPT, GPTConfig  # noqa: E402
from minillm.ops import attention  # noqa: E402
from minillm.train.trainer import Trainer, TrainConfig  # noqa: E402

# The op families reported: the first matching name prefix wins.
FAMILIES = {
    "Linear": "linear (BLAS)", "MatMul": "linear (BLAS)",
    "ScaledDotProductAttention": "attention (BLAS + softmax)",
    "LayerNorm": "layer norm", "GELU": "GELU", "CrossEntropy": "cross-entropy",
    "Embedding": "embedding", "Add": "residual add", "Dropout": "dropout",
}


def build_trainer(args):
    """The bench-train model and trainer (random tokens), with the CPU allocator tuned."""
    backend.tune_cpu_allocator()
    minillm.manual_seed(0)
    config = GPTConfig(n_layer=args.n_layer, n_head=args.n_head, d_model=args.d_model,
                       context_length=args.context, vocab_size=args.vocab_size, dropout=0.0)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, size=max(16 * args.context, 4096))
    dataset = TokenDataset(tokens, args.context, stride=1, val_fraction=0.0, seed=0)
    train = TrainConfig(steps=10_000, batch_size=args.batch_size, warmup=0, progress=False)
    return Trainer(GPT(config), train, dataset)


def time_steps(trainer, steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - start)
    return times


def install_timers(totals, cpu_totals, counts):
    """Wrap forward/backward of every Function subclass, clip and AdamW.step with timers.

    Ops are timed on the calling (main) thread: wall time, and the process's CPU
    time (all threads, so an op's pool threads count). The softmax passes inside
    attention run on pool threads, concurrently: they get that thread's own CPU
    time (``time.thread_time``) and no wall time.
    """
    def timed(key, method, per_thread=False):
        clock = time.thread_time if per_thread else time.process_time

        @functools.wraps(method)
        def wrapper(*a, **k):
            start, cpu = time.perf_counter(), clock()
            try:
                return method(*a, **k)
            finally:
                if not per_thread:
                    totals[key] += time.perf_counter() - start
                cpu_totals[key] += clock() - cpu
                counts[key] += 1
        return wrapper

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    for cls in set(subclasses(tensor.Function)):
        family = FAMILIES.get(cls.__name__, f"other ({cls.__name__})")
        for phase in ("forward", "backward"):
            if phase in cls.__dict__:
                setattr(cls, phase, timed((family, phase), cls.__dict__[phase]))
    optim.clip_grad_norm_ = timed(("gradient clip", "step"), optim.clip_grad_norm_)
    optim.AdamW.step = timed(("AdamW", "step"), optim.AdamW.step)
    # inside attention: the softmax passes (elementwise, in threads) apart from the products
    for name, phase in (("_softmax_rows_cpu_", "forward"), ("_softmax_rows_backward_cpu_", "backward")):
        setattr(attention, name, timed((SOFTMAX, phase), getattr(attention, name), per_thread=True))


SOFTMAX = "  of which softmax passes (CPU of threads)"
ELEMENTWISE_FAMILIES = ("layer norm", "GELU", "cross-entropy", "embedding", "residual add", "dropout",
                        "AdamW", "gradient clip")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-layer", type=int, default=6)
    parser.add_argument("--n-head", type=int, default=6)
    parser.add_argument("--d-model", type=int, default=384)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--vocab-size", type=int, default=65)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)

    print(f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}; cpus {os.cpu_count()}")
    trainer = build_trainer(args)
    time_steps(trainer, args.warmup)
    plain = time_steps(trainer, args.steps)
    totals: dict = collections.defaultdict(float)
    cpu_totals: dict = collections.defaultdict(float)
    counts: dict = collections.defaultdict(int)
    install_timers(totals, cpu_totals, counts)
    cpu_start = time.process_time()
    profiled = time_steps(trainer, args.steps)
    step = sum(profiled) / args.steps
    cpu_step = (time.process_time() - cpu_start) / args.steps
    tokens = args.batch_size * args.context
    print(f"plain step {1000 * np.median(plain):.1f} ms median ({tokens / np.median(plain):,.0f} tokens/s); "
          f"profiled {1000 * step:.1f} ms mean, CPU time {1000 * cpu_step:.1f} ms; peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB")
    print(f"{'op family':42s} {'phase':9s} {'wall ms':>8s} {'share':>6s} {'CPU ms':>7s} {'calls':>6s}")
    accounted = cpu_accounted = 0.0
    rows = sorted(totals.items(), key=lambda kv: (kv[0][0] == SOFTMAX, -kv[1]))
    attention_rows = [(k, v) for k, v in rows if k[0].startswith("attention")]
    rows = [(k, v) for k, v in rows if not k[0].startswith("attention")]
    for family, phase in [k for k, _ in attention_rows] + sorted(
            ((SOFTMAX, p) for p in ("forward", "backward")), key=str) + [k for k, _ in rows]:
        key = (family, phase)
        per_step, cpu = totals[key] / args.steps, cpu_totals[key] / args.steps
        if family != SOFTMAX:
            accounted += per_step
            cpu_accounted += cpu
        wall = f"{1000 * per_step:8.1f} {100 * per_step / step:5.1f}%" if family != SOFTMAX else f"{'-':>8s} {'':6s}"
        print(f"{family:42s} {phase:9s} {wall} {1000 * cpu:7.1f} {counts[key] // args.steps:6d}")
    rest, cpu_rest = step - accounted, cpu_step - cpu_accounted
    print(f"{'engine + Python glue (the rest)':42s} {'':9s} {1000 * rest:8.1f} {100 * rest / step:5.1f}% "
          f"{1000 * cpu_rest:7.1f}")

    # CPU time by kind of work: products in BLAS, elementwise NumPy passes, Python
    cpu = {key: value / args.steps for key, value in cpu_totals.items()}
    softmax = sum(v for (f, _), v in cpu.items() if f == SOFTMAX)
    blas = sum(v for (f, _), v in cpu.items() if f.startswith(("linear", "attention"))) - softmax
    elementwise = softmax + sum(v for (f, _), v in cpu.items() if f in ELEMENTWISE_FAMILIES)
    other = sum(v for (f, _), v in cpu.items() if f.startswith("other"))
    print(f"CPU time by kind: BLAS products {1000 * blas:.0f} ms ({100 * blas / cpu_step:.0f}%), elementwise "
          f"passes {1000 * elementwise:.0f} ms ({100 * elementwise / cpu_step:.0f}%), reshapes/copies "
          f"{1000 * other:.0f} ms ({100 * other / cpu_step:.0f}%), engine + Python "
          f"{1000 * cpu_rest:.0f} ms ({100 * cpu_rest / cpu_step:.0f}%) of {1000 * cpu_step:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
