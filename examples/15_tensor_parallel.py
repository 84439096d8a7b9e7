"""Example 15: tensor parallelism (Megatron-LM) — every block's matrices split over two ranks.

1. The split of GPT-2's fused c_attn: rank r keeps whole heads of q, of k and of v (the rows of
   each of the three blocks), not a plain half of the rows.
2. f and g, the two conjugate ops (identity / all-reduce, swapped between forward and backward),
   pass gradcheck through the CPU transport: an MLP whose first matrix is split by columns and
   second by rows gives the unsplit MLP's output and input gradient.
3. TP=2 on a tiny GPT: 20 steps equal one process's, with each rank holding about half the
   block parameters; the checkpoint it gathers is an ordinary one.

    python examples/15_tensor_parallel.py
    minillm launch --nproc-per-node 2 -- train --tp 2 --device cuda ...      # the same on GPUs
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
from minillm import functional as F  # noqa: E402
from minillm.data.dataset import TokenDataset  # noqa: E402
from minillm.distributed.mesh import DeviceMesh, MeshShape  # noqa: E402
from minillm.distributed.parallel_trainer import ParallelTrainer  # noqa: E402
from minillm.distributed.spawn import spawn  # noqa: E402
from minillm.distributed.tensor_parallel import (  # noqa: E402
    ShardSpec, copy_to_tensor_parallel, reduce_from_tensor_parallel)
from minillm.models import GPT, GPTConfig  # noqa: E402
from minillm.train import TrainConfig, Trainer  # noqa: E402

TINY = dict(vocab_size=64, context_length=16, n_layer=2, n_head=4, d_model=32)


def qkv_rows(heads: int = 4, head_dim: int = 2, ranks: int = 2) -> list[list[int]]:
    """For each rank, which rows of c_attn (3 blocks of heads*head_dim rows: q, k, v) it keeps."""
    rows = np.arange(3 * heads * head_dim)[:, None]
    spec = ShardSpec(axis=0, blocks=(heads, heads, heads))
    return [spec.shard(rows, r, ranks)[:, 0].tolist() for r in range(ranks)]


def mlp_check(group):
    """y = g(gelu(f(x) W1_rᵀ) W2_rᵀ) on this rank's pieces, its gradcheck, and the unsplit MLP's values."""
    comm = group.comm
    rng = np.random.default_rng(0)                                   # the same full matrices on every rank
    W1, W2 = rng.standard_normal((8, 4)), rng.standard_normal((4, 8))
    W1_r = mm.Tensor(ShardSpec(0).shard(W1, comm.rank, comm.size))   # (8/T, 4): rows of W1
    W2_r = mm.Tensor(ShardSpec(1).shard(W2, comm.rank, comm.size))   # (4, 8/T): columns of W2
    x = mm.Tensor(rng.standard_normal((3, 4)), requires_grad=True)

    def mlp(x):
        h = F.gelu(F.linear(copy_to_tensor_parallel(x, comm), W1_r))
        return reduce_from_tensor_parallel(F.linear(h, W2_r), comm)

    y = mlp(x)
    y.backward(np.ones(y.shape))
    full_x = mm.Tensor(x.data, requires_grad=True)
    full_y = F.linear(F.gelu(F.linear(full_x, mm.Tensor(W1))), mm.Tensor(W2))   # the unsplit MLP
    full_y.backward(np.ones(full_y.shape))
    errors = float(np.abs(y.data - full_y.data).max()), float(np.abs(x.grad - full_x.grad).max())
    return (mm.gradcheck(mlp, x), *errors)


def run(group, steps: int, tp: int):
    mm.manual_seed(3)
    model = GPT(GPTConfig(**TINY))
    data = TokenDataset(np.random.default_rng(0).integers(0, 64, 4096), 16, stride=1, seed=5)
    config = TrainConfig(steps=steps, batch_size=8, lr=3e-3, warmup=2, progress=False, eval_interval=0)
    if tp == 1:
        trainer = Trainer(model, config, data)
        return [trainer.train_step()[0] for _ in range(steps)], model.num_parameters(), None
    trainer = ParallelTrainer(model, config, data, DeviceMesh(group.comm, MeshShape(tp=tp)))
    losses = [trainer.train_step()[0] for _ in range(steps)]
    state, _ = trainer.full_state()
    return losses, trainer.model.num_parameters(), {k: v.shape for k, v in state.items()}


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=positive_int, default=20, help="optimizer steps (default 20)")
    args = parser.parse_args(argv)
    if "fork" not in multiprocessing.get_all_start_methods():   # Windows: the CPU ranks cannot be forked
        raise SystemExit("this example runs its ranks as forked processes, which needs Linux or macOS "
                         "(on Windows: WSL)")

    print(f"1. c_attn rows kept, 4 heads of 2 dims, 2 ranks: rank 0 {qkv_rows()[0]}, rank 1 {qkv_rows()[1]}")
    checks = spawn(mlp_check, 2)                                     # float64 arrays: gradcheck's precision
    passed, forward_error, grad_error = checks[0]
    print(f"2. f/g MLP on 2 ranks: gradcheck {'passed' if passed else 'FAILED'}; vs the unsplit MLP: output "
          f"{forward_error:.1e}, input gradient {grad_error:.1e}")

    one, full_count, _ = spawn(run, 1, args=(args.steps, 1))[0]
    (two, shard_count, shapes), _ = spawn(run, 2, args=(args.steps, 2))
    difference = max(abs(a - b) / abs(a) for a, b in zip(one, two))
    print(f"3. {args.steps} steps: one process {one[0]:.5f} -> {one[-1]:.5f}, TP=2 {two[0]:.5f} -> {two[-1]:.5f}; "
          f"largest relative loss difference {difference:.1e}")
    print(f"   parameters per rank {shard_count:,} of {full_count:,}; gathered c_attn weight "
          f"{shapes['h.0.attn.c_attn.weight']} (the whole model's shape)")
    return difference


if __name__ == "__main__":
    main()
