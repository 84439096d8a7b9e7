"""Example 13: pipeline parallelism — a GPT cut into stages, GPipe and 1F1B, and the bubble.

1. The cut: the blocks split into P contiguous stages balanced by cost (the output head counts
   as several blocks), embeddings on the first stage, final norm and head on the last.
2. P stages on the CPU test transport (forked processes) train a tiny GPT for a few steps with
   GPipe and with 1F1B; the losses equal one process's with the same global batch (M micro-
   batches of gradient accumulation), and 1F1B holds at most P - s micro-batches on stage s.
3. The schedule as run: each stage's forward, backward and send/recv on a time axis
   (``--timeline out.png``, needs matplotlib), and the measured idle share beside (P-1)/(M+P-1).

    python examples/13_pipeline.py                       # P=2, M=8, a tiny GPT (seconds)
    python examples/13_pipeline.py --stages 4 --timeline pipe.png
    minillm launch --nproc-per-node 2 -- train --pp 2 --micro-batches 8 --device cuda ...   # the same on GPUs
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import minillm as mm  # noqa: E402
from minillm.commands.argtypes import positive_int  # noqa: E402
from minillm.data.dataset import TokenDataset  # noqa: E402
from minillm.distributed.pipeline import build_stage, stage_bounds  # noqa: E402
from minillm.distributed.pipeline_trainer import PipelineTrainer  # noqa: E402
from minillm.distributed.spawn import spawn  # noqa: E402
from minillm.distributed.timeline import draw_timeline, ideal_bubble  # noqa: E402
from minillm.models import GPT, GPTConfig  # noqa: E402
from minillm.train import TrainConfig, Trainer  # noqa: E402

TINY = dict(vocab_size=64, context_length=32, n_layer=4, n_head=2, d_model=64)


def make_model() -> GPT:
    mm.manual_seed(0)
    return GPT(GPTConfig(**TINY))


def make_data() -> TokenDataset:
    rng = np.random.default_rng(0)
    tokens = np.tile(rng.integers(0, TINY["vocab_size"], 50), 200).astype(np.uint16)
    return TokenDataset(tokens, TINY["context_length"], stride=1, val_fraction=0.1, seed=0)


def train_config(steps: int, micro_batches: int) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=2, grad_accum=micro_batches, lr=3e-3, warmup=1, eval_interval=0,
                       checkpoint_interval=0, progress=False)


def pipeline_rank(group, schedule: str, steps: int, micro_batches: int):
    """One stage's run: its losses, the most micro-batches it held, and the last step's timeline."""
    mm.manual_seed(0)   # only this rank's stage is built, its weights make_model()'s (the same seed and stream)
    stage = build_stage(GPTConfig(**TINY), group.rank, group.world_size)
    trainer = PipelineTrainer(stage, train_config(steps, micro_batches), make_data(), group.comm, schedule,
                              timeline=True)
    losses = [trainer.train_step()[0] for _ in range(steps)]
    engine = trainer.engine
    return losses, engine.max_in_flight, engine.events, engine.bubble_fraction()


def main(argv=None) -> float:
    parser = argparse.ArgumentParser(description="pipeline parallel on the CPU test transport")
    parser.add_argument("--stages", type=positive_int, default=2,
                        help=f"pipeline stages P (processes), at most the {TINY['n_layer']} blocks")
    parser.add_argument("--micro-batches", type=positive_int, default=8, help="micro-batches per step M")
    parser.add_argument("--steps", type=positive_int, default=5, help="optimizer steps")
    parser.add_argument("--timeline", metavar="PNG",
                        help="draw the last 1F1B step's schedule into a .png or .svg (needs matplotlib)")
    args = parser.parse_args(argv)
    if "fork" not in multiprocessing.get_all_start_methods():   # Windows: the CPU ranks cannot be forked
        raise SystemExit("this example runs its ranks as forked processes, which needs Linux or macOS "
                         "(on Windows: WSL)")
    P, M = args.stages, args.micro_batches
    if P > TINY["n_layer"]:                    # checked before any process starts
        parser.error(f"--stages {P}: the tiny GPT has {TINY['n_layer']} blocks to cut, so at most {TINY['n_layer']}")
    if args.timeline:
        if importlib.util.find_spec("matplotlib") is None:
            parser.error("--timeline needs matplotlib: python3 -m pip install -e '.[plot]'")
        if Path(args.timeline).suffix.lower() not in (".png", ".svg") or not Path(args.timeline).parent.is_dir():
            parser.error(f"--timeline {args.timeline}: give a .png or .svg file in an existing folder")

    print(f"1. stages of a {TINY['n_layer']}-block GPT over {P}: {stage_bounds(GPTConfig(**TINY), P)}"
          f"   (gpt2-124m over 2: {stage_bounds(GPTConfig.from_preset('gpt2-124m'), 2)})")

    single = Trainer(make_model(), train_config(args.steps, M), make_data())
    reference = [single.train_step()[0] for _ in range(args.steps)]
    worst = 0.0
    for schedule in ("gpipe", "1f1b"):
        results = spawn(pipeline_rank, P, args=(schedule, args.steps, M))
        losses = results[0][0]
        difference = max(abs(a - b) / b for a, b in zip(losses, reference))
        worst = max(worst, difference)
        print(f"2. {schedule:5s}: losses {[round(x, 4) for x in losses]}; vs one process: max rel diff "
              f"{difference:.1e}; micro-batches held per stage: {[r[1] for r in results]}")
    measured = float(np.mean([r[3] for r in results]))
    print(f"3. 1F1B bubble: measured idle share {measured:.2f} (CPU ranks share cores: rough) vs "
          f"(P-1)/(M+P-1) = {ideal_bubble(P, M):.2f}")
    if args.timeline:
        draw_timeline([r[2] for r in results], args.timeline, f"1F1B, P={P}, M={M}")
        print(f"   timeline drawn to {args.timeline}")
    return worst


if __name__ == "__main__":
    main()
