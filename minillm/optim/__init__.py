"""Optimizers, gradient clipping and the learning-rate schedule.

    from minillm import optim
    groups = optim.weight_decay_groups(model.named_parameters(), weight_decay=0.1)
    opt = optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.95))
    for step in range(total_steps):
        optim.apply_lr(opt, optim.cosine_schedule(step, warmup, total_steps, 3e-4, 3e-5))
        loss = ...; opt.zero_grad(); loss.backward()
        optim.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

Optimizers only read ``.grad`` and update ``.data`` in place (NumPy or CuPy
arrays); they know nothing of modules.
"""

from __future__ import annotations

from typing import Any, Iterable

from .adamw import AdamW
from .clip import clip_grad_norm_
from .grad_scaler import GradScaler
from .optimizer import Optimizer
from .schedule import apply_lr, cosine_schedule
from .sgd import SGD

__all__ = ["Optimizer", "AdamW", "SGD", "GradScaler", "clip_grad_norm_", "cosine_schedule", "apply_lr", "weight_decay_groups"]

EMBEDDING_NAME_MARKERS = ("wte", "wpe", "emb")


def weight_decay_groups(named_parameters: Iterable[tuple[str, Any]], weight_decay: float,
                        embedding_markers: Iterable[str] = EMBEDDING_NAME_MARKERS) -> list[dict[str, Any]]:
    """Split parameters into a decayed and a non-decayed group, for AdamW.

    The rule: a parameter is decayed when it is a matrix (2-D or more) and is
    not an embedding table. Everything else gets no decay:

    - biases and LayerNorm/RMSNorm weights (1-D): they set offsets and scales,
      not the strength of a learned interaction; pulling norm gains toward 0
      fights the normalisation, and there are few of them to overfit with;
    - embeddings (2-D, but rows are looked up, not multiplied): each row gets a
      gradient only when its token occurs, yet decoupled decay shrinks every
      row at every step, so rare tokens would be worn down to nothing.

    An embedding is recognised by its name: a component of the module path
    (the dotted name without its last part, e.g. ``wte`` in ``wte.weight``)
    contains one of ``embedding_markers`` ("wte", "wpe", "emb"), case-insensitive.
    A tensor shared under several names (tied input/output embeddings) is
    listed once and counts as an embedding if any of its names does.
    Parameters with ``requires_grad`` False (frozen) are left out.

    Returns ``[{"params": decayed, "weight_decay": weight_decay},
    {"params": not_decayed, "weight_decay": 0.0}]``, leaving out an empty group.

    >>> import numpy as np, minillm as mm
    >>> w = mm.Tensor(np.ones((3, 2)), requires_grad=True)
    >>> b = mm.Tensor(np.ones(3), requires_grad=True)
    >>> e = mm.Tensor(np.ones((5, 2)), requires_grad=True)
    >>> groups = weight_decay_groups([("fc.weight", w), ("fc.bias", b), ("wte.weight", e)], 0.1)
    >>> [len(g["params"]) for g in groups], [g["weight_decay"] for g in groups]
    ([1, 2], [0.1, 0.0])
    """
    markers = tuple(m.lower() for m in embedding_markers)
    tensors: dict[int, Any] = {}
    is_embedding: dict[int, bool] = {}
    for name, p in named_parameters:
        if not getattr(p, "requires_grad", True):
            continue
        module_path = name.lower().split(".")[:-1]
        named_as_embedding = any(marker in part for part in module_path for marker in markers)
        tensors.setdefault(id(p), p)
        is_embedding[id(p)] = is_embedding.get(id(p), False) or named_as_embedding
    decay, no_decay = [], []
    for key, p in tensors.items():
        (decay if p.data.ndim >= 2 and not is_embedding[key] else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": float(weight_decay)}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
