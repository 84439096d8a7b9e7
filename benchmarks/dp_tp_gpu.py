"""Data / tensor parallel measurements, one rank per process (run it under ``minillm launch``).

    python benchmarks/dp_tp_gpu.py losses --out one.json                       # one process
    python -m minillm launch --nproc-per-node 2 -- python benchmarks/dp_tp_gpu.py losses --dp 2 --out dp2.json
    python -m minillm launch --nproc-per-node 2 -- python benchmarks/dp_tp_gpu.py kill --dp 2
    python benchmarks/dp_tp_gpu.py compare one.json dp2.json tp2.json

``losses`` trains ``--steps`` steps on random tokens (the same on every layout)
and writes, from rank 0, the losses and the step times; ``compare`` prints the
largest relative difference of each layout's losses from the first file's.
``kill`` trains until rank 1 kills itself (SIGKILL) at step 3; the survivors
must stop with a CommError. benchmarks/dp_tp_gpu.sh runs the whole 2-GPU set.
``--device cpu`` with ``--preset tiny`` runs the same code on the CPU backend.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import minillm as mm  # noqa: E402
from minillm import backend  # noqa: E402
from minillm.data.dataset import TokenDataset  # noqa: E402
from minillm.models import GPT, GPTConfig  # noqa: E402
from minillm.train import TrainConfig, Trainer  # noqa: E402


def build(args):
    """(trainer, mesh or None, device): the same model, data and schedule on every layout."""
    from minillm.distributed.mesh import MeshShape, init_mesh

    shape = MeshShape(dp=args.dp, tp=args.tp)
    mesh, device = (None, args.device) if shape.size == 1 else init_mesh(shape, args.device, args.timeout)
    config = GPTConfig.from_preset(args.preset, context_length=args.context)
    mm.manual_seed(0)
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, size=64 * config.context_length)
    data = TokenDataset(tokens, config.context_length, stride=1, val_fraction=0.0, seed=0)
    train = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=6e-4, min_lr=6e-5, warmup=2,
                        device=device, progress=False, precision=args.precision, eval_interval=0)
    model = GPT(config)
    if mesh is None:
        return Trainer(model, train, data), None, device
    from minillm.distributed.parallel_trainer import ParallelTrainer

    return ParallelTrainer(model, train, data, mesh), mesh, device


def losses(args) -> None:
    trainer, mesh, device = build(args)
    values, times = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        values.append(trainer.train_step()[0])
        backend.synchronize(device)
        times.append(time.perf_counter() - start)
    if mesh is None or mesh.world.rank == 0:
        layout = "1 process" if mesh is None else f"dp={mesh.shape.dp} tp={mesh.shape.tp}"
        result = {"layout": layout, "losses": values, "step_s": times, "batch_size": args.batch_size,
                  "preset": args.preset, "context": args.context, "precision": args.precision}
        with open(args.out, "w") as f:
            json.dump(result, f)
        print(f"{layout}: losses {values[0]:.6f} .. {values[-1]:.6f}, median step {np.median(times) * 1000:.1f} ms")


def kill(args) -> None:
    trainer, mesh, _ = build(args)
    start = None
    for step in range(args.steps):
        if step == 3:
            start = time.time()
            print(f"rank {mesh.world.rank}: step 3 begins at {start:.3f}", flush=True)
            if mesh.world.rank == 1:
                os.kill(os.getpid(), signal.SIGKILL)
        try:
            trainer.train_step()
        except Exception as error:  # the point: a clear error, soon
            print(f"rank {mesh.world.rank}: stopped after {time.time() - start:.1f} s with "
                  f"{type(error).__name__}: {error}", flush=True)
            raise SystemExit(3) from None


def compare(args) -> None:
    runs = [json.load(open(path)) for path in args.files]
    reference = np.asarray(runs[0]["losses"], dtype=np.float64)
    for run in runs[1:]:
        values = np.asarray(run["losses"], dtype=np.float64)
        rel = np.abs(values - reference) / np.abs(reference)
        print(f"{run['layout']} vs {runs[0]['layout']}: {len(values)} steps, max relative loss difference "
              f"{rel.max():.2e} (step {int(rel.argmax()) + 1}); final {values[-1]:.6f} vs {reference[-1]:.6f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("losses", "kill", "compare"))
    parser.add_argument("files", nargs="*", help="compare: JSON files from losses, the reference first")
    parser.add_argument("--dp", type=int, default=1)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--preset", default="gpt2-124m")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8, help="global batch")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="losses.json")
    parser.add_argument("--timeout", type=float, default=60.0, help="communicator timeout, seconds")
    args = parser.parse_args()
    {"losses": losses, "kill": kill, "compare": compare}[args.mode](args)


if __name__ == "__main__":
    main()
