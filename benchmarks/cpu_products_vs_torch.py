"""The matrix products of one CPU training step, one by one: NumPy's OpenBLAS against PyTorch's MKL.

The ``minillm bench train`` configuration (6 layers x 384, T=256, B=8: N = 2,048
rows) runs per layer four linear layers (qkv 384->1152, attention projection
384->384, MLP 384->1536 and 1536->384), each with three products: forward
y = x Wᵀ, and backward dx = dy W and dW = dyᵀ x. This script times each of them,
on the same float32 arrays, several ways, interleaved (round robin, median of
``--reps``), so that a load change hits every column alike:

- ``openblas 1t``: NumPy's ``@`` with the BLAS single-threaded (the work itself);
- ``minillm 2t``: the way a training step runs it (``ops/common.py``:
  ``cpu_matmul`` cuts the forward into one block of rows per thread;
  ``cpu_matmul_pair`` runs dx and dW at once, one per thread: that pair is timed
  once, on the dW row);
- ``openblas 2t``: NumPy's ``@`` with OpenBLAS splitting it between its own 2 threads;
- ``torch 1t`` and ``torch 2t``: the same product in PyTorch (MKL), 1 and 2 threads.

It also times attention's products per layer at causal tiles of 128 query rows
(minillm's CPU tiling: Q Kᵀ over the keys a tile can see, then P V; 48 = B·H
matrices) against PyTorch's ``scaled_dot_product_attention`` forward + backward.

PyTorch comes from a throwaway environment (see benchmarks/cpu_vs_torch.py):

    /tmp/refenv/bin/python benchmarks/cpu_products_vs_torch.py --reps 15
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

try:
    import torch  # noqa: E402
    import torch.nn.functional as TF  # noqa: E402
except ImportError:  # pragma: no cover - a hint, not a failure mode of the package
    sys.exit("cpu_products_vs_torch.py needs PyTorch: see benchmarks/cpu_vs_torch.py's docstring for the venv")

from minillm import backend  # noqa: E402
from minillm.ops import common  # noqa: E402

LAYERS = [("qkv", 384, 1152), ("attn proj", 384, 384), ("mlp fc", 384, 1536), ("mlp proj", 1536, 384)]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def torch_threads(n: int):
    def run(fn):
        def wrapped():
            torch.set_num_threads(n)
            return fn()
        return wrapped
    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15, help="timed rounds (default 15), after 2 warm-up")
    parser.add_argument("--rows", type=int, default=2048, help="N = B·T rows (default 2048)")
    args = parser.parse_args(argv)
    backend.tune_cpu_threads()                    # the BLAS single-threaded, as in training
    rng = np.random.default_rng(0)
    cases = {}                                    # (product, way) -> callable
    for name, fan_in, fan_out in LAYERS:
        x = rng.standard_normal((args.rows, fan_in), dtype=np.float32)
        w = rng.standard_normal((fan_out, fan_in), dtype=np.float32)
        dy = rng.standard_normal((args.rows, fan_out), dtype=np.float32)
        tx, tw, tdy = (torch.from_numpy(a) for a in (x, w, dy))
        products = {"y = x Wᵀ": ((x, w.T), (tx, tw.T)), "dx = dy W": ((dy, w), (tdy, tw)),
                    "dW = dyᵀ x": ((dy.T, x), (tdy.T, tx))}
        for product, ((a, b), (ta, tb)) in products.items():
            key = f"{name:9s} {product}"

            def one_thread(a=a, b=b):
                with backend.blas_threads(1):
                    a @ b

            def blas_two(a=a, b=b):
                with backend.blas_threads(2):
                    a @ b

            cases[(key, "openblas 1t")] = one_thread
            cases[(key, "openblas 2t")] = blas_two
            cases[(key, "torch 1t")] = torch_threads(1)(lambda ta=ta, tb=tb: ta @ tb)
            cases[(key, "torch 2t")] = torch_threads(2)(lambda ta=ta, tb=tb: ta @ tb)
        cases[(f"{name:9s} y = x Wᵀ", "minillm 2t")] = lambda x=x, w=w: common.cpu_matmul(x, w.T)
        cases[(f"{name:9s} dW = dyᵀ x", "minillm 2t")] = (
            lambda dy=dy, w=w, x=x: common.cpu_matmul_pair((dy, w), (dy.T, x)))   # dx and dW at once

    # attention, one layer: 48 matrices of T=256, D=64, causal tiles of 128 query rows
    n, t, d, rows = 48, 256, 64, 128
    q, k, v = (rng.standard_normal((n, t, d), dtype=np.float32) for _ in range(3))
    probs = rng.random((n, t, t), dtype=np.float32)

    def tile_products(s):                         # forward 2 + backward 4 products per tile
        for r0 in range(0, t, rows):
            k_end = r0 + rows                       # causal: this tile's queries see keys 0 .. k_end - 1
            qt, kt, vt, pt = q[s, r0:k_end], k[s, :k_end], v[s, :k_end], probs[s, r0:k_end, :k_end]
            qt @ kt.swapaxes(-1, -2)                # S = Q Kᵀ        (and dP = dO Vᵀ: the same shapes)
            pt @ vt                                 # O = P V
            qt.swapaxes(-1, -2) @ pt                # dVᵀ = dOᵀ P     (and dKᵀ = Qᵀ dS)
            qt @ kt.swapaxes(-1, -2)
            pt @ kt                                 # dQ = dS K
            qt.swapaxes(-1, -2) @ pt

    def attention_one_thread():
        with backend.blas_threads(1):
            tile_products(slice(None))

    def attention_two_threads():                  # as the op shares them: half the matrices each
        common.run_parallel(tile_products, [slice(0, n // 2), slice(n // 2, n)])

    tq, tk, tv = (torch.from_numpy(a.reshape(8, 6, t, d)).requires_grad_() for a in (q, k, v))
    tg = torch.from_numpy(rng.standard_normal((8, 6, t, d), dtype=np.float32))

    def torch_attention():
        out = TF.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
        out.backward(tg)

    key = "attention products (6 per tile) / torch SDPA fwd+bwd"
    cases[(key, "openblas 1t")] = attention_one_thread
    cases[(key, "minillm 2t")] = attention_two_threads
    cases[(key, "torch 1t")] = torch_threads(1)(torch_attention)
    cases[(key, "torch 2t")] = torch_threads(2)(torch_attention)

    times = {case: [] for case in cases}
    for rep in range(args.reps + 2):
        for case, fn in cases.items():
            elapsed = timed(fn)
            if rep >= 2:
                times[case].append(elapsed)
    ways = ["openblas 1t", "torch 1t", "minillm 2t", "openblas 2t", "torch 2t"]
    print(f"load average {os.getloadavg()[0]:.2f}; N = {args.rows}; median of {args.reps} (ms); torch {torch.__version__}")
    print(f"{'product':58s}" + "".join(f"{w:>13s}" for w in ways))
    totals = dict.fromkeys(ways, 0.0)
    for product in dict.fromkeys(c[0] for c in cases):
        row = f"{product:58s}"
        for way in ways:
            if (product, way) in times:
                ms = statistics.median(times[(product, way)]) * 1e3
                totals[way] += ms if not product.startswith("attention") else 0.0
                row += f"{ms:13.2f}"
            else:
                row += f"{'(pair)' if way == 'minillm 2t' else '-':>13s}"
        print(row)
    print(f"{'the 12 linear products of a layer':58s}" + "".join(f"{totals[w]:13.2f}" for w in ways))
    return 0


if __name__ == "__main__":
    sys.exit(main())
