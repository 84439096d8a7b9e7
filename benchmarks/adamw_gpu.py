"""AdamW on the GPU: one multi-tensor launch per bucket against one launch per parameter.

gpt2-124m's parameters (``--preset``; weight-decay groups as the trainer builds them), random
gradients, ``--steps`` AdamW steps timed per path after ``--warmup`` steps:

  host   time for ``opt.step()`` to return (the Python and launch cost a
         host-bound training step pays; the GPU may still be working)
  total  time per step with a synchronize after each (host and GPU)

The per-parameter path is the multi-tensor code with ``multi_tensor_fusable``
made to answer False, so both run the same ``AdamW.step``. Both paths start
from the same weights and gradients; the largest difference of the weights
after all steps is printed (float32 rounding: ~1e-7 of weights O(0.02-1)).

    PYTHONPATH=. python3 benchmarks/adamw_gpu.py [--steps 50] [--warmup 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import minillm  # noqa: E402
from minillm import backend, optim  # noqa: E402
from minillm.models import GPT, GPTConfig  # noqa: E402
from minillm.optim import adamw as adamw_module  # noqa: E402


def run(preset: str, per_parameter: bool, steps: int, warmup: int, device: str):
    """Medians of ``steps`` AdamW steps: (host seconds, total seconds, final weights, number of arrays)."""
    model = GPT(GPTConfig.from_preset(preset)).to(device)  # seeded by the caller: same weights each run
    params = [p for _, p in model.named_parameters()]
    rng = np.random.default_rng(0)
    for p in params:
        p.grad = backend.to_device((rng.standard_normal(p.shape) * 1e-2).astype(p.dtype), device)
    opt = optim.AdamW(optim.weight_decay_groups(model.named_parameters(), 0.1), lr=3e-4, betas=(0.9, 0.95))
    real = adamw_module.multi_tensor_fusable
    if per_parameter:
        adamw_module.multi_tensor_fusable = lambda arrays: False
    try:
        host, total = [], []
        for i in range(warmup + steps):
            backend.synchronize(device)
            start = time.perf_counter()
            opt.step()
            returned = time.perf_counter()
            backend.synchronize(device)
            if i >= warmup:
                host.append(returned - start)
                total.append(time.perf_counter() - start)
    finally:
        adamw_module.multi_tensor_fusable = real
    return statistics.median(host), statistics.median(total), [p.numpy() for p in params], len(params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50, help="timed steps per path (default 50)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first, compiling the kernels (default 5)")
    parser.add_argument("--device", default="cuda", help="a CUDA device (default cuda; cpu only to smoke-test)")
    parser.add_argument("--preset", default="gpt2-124m", help="model preset (default gpt2-124m)")
    args = parser.parse_args()
    results = {}
    for name, per_parameter in (("per-parameter", True), ("multi-tensor", False)):
        minillm.manual_seed(0)
        results[name] = run(args.preset, per_parameter, args.steps, args.warmup, args.device)
    n = results["multi-tensor"][3]
    print(f"{args.preset}, {n} parameter arrays, AdamW, median of {args.steps} steps on {args.device}")
    for name, (host, total, _, _) in results.items():
        print(f"  {name:14s} host {host * 1e3:6.2f} ms   total {total * 1e3:6.2f} ms")
    diff = max(float(np.max(np.abs(a - b), initial=0.0))
               for a, b in zip(results["multi-tensor"][2], results["per-parameter"][2]))
    print(f"  largest weight difference between the paths after {args.warmup + args.steps} steps: {diff:.2e}")


if __name__ == "__main__":
    main()
