"""Fused ops against their compositions, forward + backward, float32 (``minillm bench ops``).

    minillm bench ops                              # CPU: all four cases
    minillm bench ops --case attention --repeat 10
    minillm bench ops --device cuda

Cases (GPT-2-124M sizes):
    layer_norm     x (8192, 768), weight and bias (768,)
    cross_entropy  logits (8192, 50257), int targets (8192,)   (~6.6 GB of RAM for the composed run)
    gelu           x (8192, 3072), approximate="tanh"
    attention      q, k, v (8, 12, 256, 64), causal

Each variant runs in blocks of one warm-up and ``--repeat`` timed runs, two
blocks each, fused and composed taking turns (so both see the same drift in
machine load, and neither starts while BLAS threads of the other still spin);
the figures are the best wall-clock time of each. With ``--memory``, the peak memory of one forward +
backward is measured for each variant in a fresh process (so the two do not
share allocator state): on the CPU with ``tracemalloc`` (NumPy reports its
arrays to it), on a GPU as the growth of CuPy's memory pool; both net of the
inputs.
"""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np

from .. import backend
from .. import functional as F
from ..tensor import Tensor

V_GPT2 = 50257


def _layer_norm(device, rng):
    arrays = [rng.standard_normal(s, dtype=np.float32) for s in ((8192, 768), 768, 768)]
    return arrays, F.layer_norm, F.layer_norm_composed


def _cross_entropy(device, rng):
    targets = rng.integers(0, V_GPT2, 8192)
    arrays = [rng.standard_normal((8192, V_GPT2), dtype=np.float32)]
    return arrays, (lambda z: F.cross_entropy(z, targets)), (lambda z: F.cross_entropy_composed(z, targets))


def _gelu(device, rng):
    return [rng.standard_normal((8192, 3072), dtype=np.float32)], F.gelu, F.gelu_composed


def _attention(device, rng):
    arrays = [rng.standard_normal((8, 12, 256, 64), dtype=np.float32) for _ in range(3)]
    return arrays, F.scaled_dot_product_attention, F.scaled_dot_product_attention_composed


CASES = {"layer_norm": _layer_norm, "cross_entropy": _cross_entropy, "gelu": _gelu, "attention": _attention}


def _step(fn, inputs, device) -> float:
    """One forward + backward (upstream gradient of ones); wall-clock seconds."""
    backend.synchronize(device)
    start = time.perf_counter()
    out = fn(*inputs)
    out.backward(None if out.size == 1 else backend.module_for(device).ones_like(out.data))
    backend.synchronize(device)
    return time.perf_counter() - start


def time_case(name: str, device: str = "cpu", repeat: int = 5) -> dict:
    """Best forward+backward time of the fused and the composed version of one case."""
    arrays, fused, composed = CASES[name](device, np.random.default_rng(0))
    inputs = [Tensor(a, requires_grad=True, device=device) for a in arrays]
    best = {"fused": float("inf"), "composed": float("inf")}
    for _ in range(2):                              # two rounds: both variants see the same drift in load
        for variant, fn in (("fused", fused), ("composed", composed)):
            for i in range(repeat + 1):             # the first run of each block is a warm-up
                seconds = _step(fn, inputs, device)
                for t in inputs:
                    t.grad = None
                if i:
                    best[variant] = min(best[variant], seconds)
    return {"case": name, "device": device, "fused_ms": best["fused"] * 1e3,
            "composed_ms": best["composed"] * 1e3, "speedup": best["composed"] / best["fused"]}


def peak_memory_here(name: str, variant: str, device: str) -> int:
    """Peak bytes allocated by one forward + backward beyond the inputs (call in a fresh process)."""
    arrays, fused, composed = CASES[name](device, np.random.default_rng(0))
    fn = fused if variant == "fused" else composed
    inputs = [Tensor(a, requires_grad=True, device=device) for a in arrays]
    if device == "cpu":
        import tracemalloc  # noqa: PLC0415

        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        _step(fn, inputs, device)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return peak - base
    import cupy  # noqa: PLC0415

    _step(fn, inputs, device)                      # compile kernels outside the measurement
    for t in inputs:
        t.grad = None
    pool = cupy.get_default_memory_pool()
    pool.free_all_blocks()
    base = pool.total_bytes()
    _step(fn, inputs, device)
    return pool.total_bytes() - base


def peak_memory(name: str, variant: str, device: str) -> int:
    command = [sys.executable, "-m", "minillm.bench.ops", "--measure-memory", name, variant, device]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return int(result.stdout.strip().splitlines()[-1])


if __name__ == "__main__":  # the fresh process of peak_memory()
    _, flag, case, variant, device = sys.argv
    backend.tune_cpu_allocator()
    print(peak_memory_here(case, variant, device))
