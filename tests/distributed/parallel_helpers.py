"""A tiny GPT run, the same on one process and on any mesh, for the equality tests.

Every run (the single-process reference too) happens in forked ranks: the
parent process never computes, so no BLAS or worker-thread state is forked.
"""

import numpy as np

import minillm as mm
from minillm.data.dataset import TokenDataset
from minillm.models import GPT, GPTConfig
from minillm.train.trainer import TrainConfig, Trainer

MODEL = dict(vocab_size=64, context_length=16, n_layer=2, n_head=4, d_model=32)
TOKENS = np.random.default_rng(0).integers(0, 64, 4096)
STEPS = 20


def tiny_run(dtype="float64", steps=STEPS, batch_size=8, grad_accum=1, **model):
    """(model, dataset, TrainConfig), built identically on every rank from fixed seeds."""
    mm.backend.set_default_dtype(dtype)
    mm.manual_seed(3)
    gpt = GPT(GPTConfig(**{**MODEL, **model}))
    data = TokenDataset(TOKENS, MODEL["context_length"], stride=1, seed=5)
    # clip 0.5: the gradient norm here is 0.37 .. 0.73, so about half the steps are clipped (a wrong
    # global norm across ranks then changes the update, and the equality tests see it)
    config = TrainConfig(steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=3e-3, warmup=2, clip=0.5,
                         progress=False, eval_interval=0, checkpoint_interval=0)
    return gpt, data, config


def single_process(group, dtype="float64", steps=STEPS, batch_size=8, grad_accum=1):
    """Losses and final parameters of the ordinary Trainer (run on a 1-rank spawn)."""
    model, data, config = tiny_run(dtype, steps, batch_size, grad_accum)
    trainer = Trainer(model, config, data)
    losses = [trainer.train_step()[0] for _ in range(steps)]
    return losses, {name: value.copy() for name, value in model.state_dict().items()}


def max_relative(a, b) -> float:
    """max |a - b| / max |b| (per array), the worst over a list or dict of arrays."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        return max(max_relative(a[k], b[k]) for k in a)
    if np.ndim(a) == 0 or isinstance(a, list):
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        return float(np.max(np.abs(a - b) / np.abs(b)))
    return float(np.abs(a - b).max() / np.abs(b).max())
