"""Tiny runs for the trainer, checkpoint and CLI tests: a 2-layer GPT on a learnable token stream."""

import numpy as np
import minillm as mm
from minillm.data.dataset import TokenDataset
from minillm.models import GPT, GPTConfig
from minillm.train import TrainConfig, Trainer

VOCAB = 32
CONTEXT = 16


def token_stream(n: int = 3000, seed: int = 0) -> np.ndarray:
    """A stream with structure to learn: a repeating 12-token phrase, with 10% random tokens mixed in."""
    rng = np.random.default_rng(seed)
    tokens = np.tile(np.arange(12), n // 12 + 1)[:n]
    noise = rng.random(n) < 0.1
    tokens[noise] = rng.integers(0, VOCAB, noise.sum())
    return tokens.astype(np.uint16)


def make_model(seed: int = 0, dropout: float = 0.0, **overrides) -> GPT:
    mm.manual_seed(seed)
    cfg = dict(vocab_size=VOCAB, context_length=CONTEXT, n_layer=2, n_head=2, d_model=16, dropout=dropout)
    return GPT(GPTConfig(**{**cfg, **overrides}))


def make_dataset(seed: int = 0) -> TokenDataset:
    return TokenDataset(token_stream(), CONTEXT, stride=1, val_fraction=0.1, seed=seed)


def make_config(**overrides) -> TrainConfig:
    values = dict(steps=12, batch_size=4, lr=1e-2, min_lr=1e-3, warmup=3, eval_interval=4, eval_batches=3,
                  checkpoint_interval=4, seed=7, progress=False)
    return TrainConfig(**{**values, **overrides})


def make_trainer(run_dir=None, model_seed: int = 0, dropout: float = 0.0, **config) -> Trainer:
    """A fresh model, dataset and trainer, as a new process would build them."""
    return Trainer(make_model(model_seed, dropout), make_config(**config), make_dataset(), run_dir=run_dir)

