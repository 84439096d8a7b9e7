"""Example 14: data parallelism — two replicas, each on half of every batch, take one process's steps.

1. The gradient hook: the engine calls a leaf's hook the moment its gradient is final in the
   backward walk; the printed order (final norm and last block first, embeddings last) is the order in
   which the data-parallel buckets fill and their all-reduces start, while the backward goes on.
2. DP=2 on the CPU test transport (two forked processes): rank r trains on rows r·B/2 … of every
   global batch of B windows, gradients averaged bucket by bucket; the losses and the final
   weights equal one process's with the same global batch.

    python examples/14_data_parallel.py                  # 2 ranks, 20 steps, a tiny GPT (seconds)
    minillm launch --nproc-per-node 2 -- train --dp 2 --device cuda ...   # the same on GPUs
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import minillm as mm  # noqa: E402
from minillm.commands.argtypes import positive_int  # noqa: E402
from minillm.data.dataset import TokenDataset  # noqa: E402
from minillm.distributed.mesh import DeviceMesh, MeshShape  # noqa: E402
from minillm.distributed.parallel_trainer import ParallelTrainer  # noqa: E402
from minillm.distributed.spawn import spawn  # noqa: E402
from minillm.models import GPT, GPTConfig  # noqa: E402
from minillm.train import TrainConfig, Trainer  # noqa: E402

TINY = dict(vocab_size=64, context_length=16, n_layer=2, n_head=4, d_model=32)


def gradient_order() -> list[str]:
    """Names of the parameters in the order their gradients become final during one backward."""
    mm.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    names = {id(p): name for name, p in model.named_parameters()}
    order: list[str] = []
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(lambda t: order.append(names[id(t)]))
    ids = np.random.default_rng(0).integers(0, 64, (2, 16))
    _, loss = model(ids, ids)
    loss.backward()
    return order


def run(group, steps: int, dp: int):
    """``steps`` steps of the same tiny run: the ordinary Trainer (dp=1) or ParallelTrainer."""
    mm.manual_seed(3)
    model = GPT(GPTConfig(**TINY))
    data = TokenDataset(np.random.default_rng(0).integers(0, 64, 4096), 16, stride=1, seed=5)
    config = TrainConfig(steps=steps, batch_size=8, lr=3e-3, warmup=2, progress=False, eval_interval=0)
    trainer = (Trainer(model, config, data) if dp == 1
               else ParallelTrainer(model, config, data, DeviceMesh(group.comm, MeshShape(dp=dp))))
    return [trainer.train_step()[0] for _ in range(steps)]


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=positive_int, default=20, help="optimizer steps (default 20)")
    args = parser.parse_args(argv)
    if "fork" not in multiprocessing.get_all_start_methods():   # Windows: the CPU ranks cannot be forked
        raise SystemExit("this example runs its ranks as forked processes, which needs Linux or macOS "
                         "(on Windows: WSL)")

    # every run in forked processes first (a process forked after this one computed could inherit
    # busy BLAS / worker threads), the single-process reference too: the same arithmetic
    one = spawn(run, 1, args=(args.steps, 1))[0]
    two = spawn(run, 2, args=(args.steps, 2))

    order = gradient_order()
    print(f"1. gradients become final in this order ({len(order)} parameters): {order[0]}, {order[1]}, ... "
          f"{order[-2]}, {order[-1]}")
    difference = max(abs(a - b) / abs(a) for a, b in zip(one, two[0]))
    print(f"2. {args.steps} steps, global batch 8: one process {one[0]:.5f} -> {one[-1]:.5f}; "
          f"DP=2 (4 rows per rank) {two[0][0]:.5f} -> {two[0][-1]:.5f}")
    print(f"   largest relative loss difference {difference:.1e} (float32 rounding: the halves are summed "
          f"in another order); both replicas report {two[1][-1]:.5f}")
    return difference


if __name__ == "__main__":
    main()
