"""Fused vs composed: layer_norm, cross_entropy and gelu, forward + backward, float32.

    python benchmarks/bench_fused_norm_loss.py                       # CPU, the three default cases
    python benchmarks/bench_fused_norm_loss.py --case layer_norm --repeat 10
    python benchmarks/bench_fused_norm_loss.py --device cuda

Cases (GPT-2-124M sizes, B·T = 8192 rows):
    layer_norm     x (8192, 768), weight and bias (768,)
    cross_entropy  logits (8192, 50257), int targets (8192,)      (6.6 GB of RAM for the composed run)
    gelu           x (8192, 3072), approximate="tanh"

Each variant runs once to warm up, then ``--repeat`` times, fused and composed
interleaved so that both see the same machine load; the figures are the best
wall-clock time and the best CPU time of the process (on the CPU, where other
programs share the cores, CPU time is the steadier of the two). ``run(report)``
is the entry point for ``minillm bench``: ``report`` gets one dict per case.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import minillm as mm  # noqa: E402
from minillm import functional as F  # noqa: E402

V_GPT2 = 50257


def _layer_norm_case(device, rng):
    x = rng.standard_normal((8192, 768), dtype=np.float32)
    w = rng.standard_normal(768, dtype=np.float32)
    b = rng.standard_normal(768, dtype=np.float32)
    arrays = [x, w, b]

    def make():
        return [mm.Tensor(a, requires_grad=True, device=device) for a in arrays]

    return make, (lambda x, w, b: F.layer_norm(x, w, b)), (lambda x, w, b: F.layer_norm_composed(x, w, b))


def _cross_entropy_case(device, rng):
    logits = rng.standard_normal((8192, V_GPT2), dtype=np.float32)
    targets = rng.integers(0, V_GPT2, 8192)

    def make():
        return [mm.Tensor(logits, requires_grad=True, device=device)]

    return make, (lambda z: F.cross_entropy(z, targets)), (lambda z: F.cross_entropy_composed(z, targets))


def _gelu_case(device, rng):
    x = rng.standard_normal((8192, 3072), dtype=np.float32)

    def make():
        return [mm.Tensor(x, requires_grad=True, device=device)]

    return make, (lambda x: F.gelu(x)), (lambda x: F.gelu_composed(x))


CASES = {"layer_norm": _layer_norm_case, "cross_entropy": _cross_entropy_case, "gelu": _gelu_case}


def _step(fn, inputs, device) -> tuple[float, float]:
    """One forward + backward (upstream gradient of ones); returns (wall, cpu) seconds."""
    mm.backend.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*inputs)
    out.backward(None if out.size == 1 else mm.backend.module_for(device).ones_like(out.data))
    mm.backend.synchronize(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def run(report=print, device: str = "cpu", cases=tuple(CASES), repeat: int = 5) -> list[dict]:
    """Time each case fused and composed; ``report(result)`` for each, results returned too."""
    results = []
    for name in cases:
        make, fused, composed = CASES[name](device, np.random.default_rng(0))
        best = {v: [float("inf"), float("inf")] for v in ("fused", "composed")}
        for i in range(repeat + 1):
            for variant, fn in (("fused", fused), ("composed", composed)):
                inputs = make()
                wall, cpu = _step(fn, inputs, device)
                del inputs
                if i:                                           # the first round is the warm-up
                    best[variant] = [min(best[variant][0], wall), min(best[variant][1], cpu)]
        result = {
            "case": name, "device": device,
            "fused_ms": best["fused"][0] * 1e3, "composed_ms": best["composed"][0] * 1e3,
            "fused_cpu_ms": best["fused"][1] * 1e3, "composed_cpu_ms": best["composed"][1] * 1e3,
        }
        result["speedup"] = result["composed_ms"] / result["fused_ms"]
        result["speedup_cpu_time"] = result["composed_cpu_ms"] / result["fused_cpu_ms"]
        report(result)
        results.append(result)
    return results


def _print_result(r: dict) -> None:
    print(f"{r['case']:14s} {r['device']:6s} fused {r['fused_ms']:8.1f} ms  composed {r['composed_ms']:8.1f} ms  "
          f"speedup {r['speedup']:.2f}x   (CPU time: {r['fused_cpu_ms']:.1f} vs {r['composed_cpu_ms']:.1f} ms, "
          f"{r['speedup_cpu_time']:.2f}x)", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--case", action="append", choices=list(CASES), help="repeatable; default: all")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    run(_print_result, device=mm.backend.parse_device(args.device), cases=args.case or tuple(CASES),
        repeat=args.repeat)


if __name__ == "__main__":
    main()
