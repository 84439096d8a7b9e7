"""Embedding lookup (scatter-add backward) and inverted dropout.

Embedding. A table ``weight`` (V, C) and integer ids of any shape S:

    out[s, :] = weight[ids[s], :]                       out: (*S, C)

Each output row is a copy of one table row, so dL/dweight[v] is the sum of
the output gradients of every position that looked ``v`` up:

    dL/dweight[v, :] = Σ_{s : ids[s] = v} dL/dout[s, :]      (a scatter-add)

A plain ``grad_w[ids] += g`` would keep only one of the repeated ids; the
scatter-add (``xp.add.at``, on NumPy and CuPy alike) accumulates all of them.

Dropout (inverted). With a keep mask m, m[i] ~ Bernoulli(1 - p):

    out = x ⊙ m / (1 - p)            so E[out] = x, and eval needs no rescaling
    dL/dx = dL/dout ⊙ m / (1 - p)    (only the mask, 1 byte per element, is saved)

The mask comes from ``backend.random_uniform`` (always drawn in float32, so the
same seed gives the same mask for every dtype): ``mm.manual_seed`` makes it
reproducible, and fused attention draws its dropout mask with the same
``dropout_keep_mask`` so that it matches ``dropout`` applied to the
probabilities draw for draw.
"""

from __future__ import annotations


import numpy as np

from .. import backend
from ..backend import array_module
from ..tensor import Function, Tensor
from .common import as_int_array
from .shape import scatter_add
from ..checks import is_real


# ------------------------------------------------------------------ embedding


class Embedding(Function):
    """out = weight[ids]  (ids a constant integer array of any shape, weight (V, C)).

    dweight = scatter-add of ``grad`` rows into the rows named by ``ids``:
    ``dweight[ids[s]] += grad[s]`` for every position s, repeats accumulating.
    """

    def __init__(self, ids):
        self.ids = ids

    def forward(self, weight):
        self.save(weight.shape)
        return array_module(weight).take(weight, self.ids, axis=0)  # (*ids.shape, C)

    def backward(self, grad):
        (weight_shape,) = self.saved
        grad_weight = array_module(grad).zeros(weight_shape, dtype=grad.dtype)   # (V, C)
        scatter_add(grad_weight, self.ids.reshape(-1), grad.reshape(-1, weight_shape[1]))
        return (grad_weight,)


def _check_ids(ids, vocab_size: int):
    """``ids`` as an integer array; TypeError for non-integers, IndexError for ids outside [0, V)."""
    ids = as_int_array(ids, "embedding", "ids")
    if ids.size and not backend.ids_checked():   # checked on the host already (backend.ids_checked_on_host)
        xp = array_module(ids)
        lowest, highest = backend.to_numpy(xp.stack([ids.min(), ids.max()])).tolist()  # one sync on a GPU
        if lowest < 0 or highest >= vocab_size:
            bad = lowest if lowest < 0 else highest
            raise IndexError(
                f"embedding: id {bad} is out of range for a vocabulary of {vocab_size} "
                f"(ids must lie in [0, {vocab_size - 1}])"
            )
    return ids


def embedding(ids, weight: Tensor) -> Tensor:
    """Rows of ``weight`` (V, C) picked by integer ``ids`` (array, list or Tensor, any shape S).

    Returns a (*S, C) tensor. Ids outside [0, V) raise IndexError (negative ids
    do not wrap around); non-integer ids raise TypeError.
    """
    if not isinstance(weight, Tensor):
        raise TypeError("embedding: weight must be a Tensor of shape (vocab_size, dim)")
    if weight.ndim != 2:
        raise ValueError(f"embedding: weight must be 2-D (vocab_size, dim), got shape {weight.shape}")
    ids = _check_ids(ids, weight.shape[0])
    ids = backend.to_device(ids, weight.device)
    return Embedding.apply(weight, ids=ids)


# ------------------------------------------------------------------ dropout


def dropout_keep_mask(shape, p: float, device: str):
    """Boolean mask of ``shape``, True (keep) with probability 1 - p.

    Drawn as ``random_uniform(shape) >= p`` in float32 on ``device``: the one
    place dropout randomness comes from (used by ``dropout`` and by fused
    attention), so a seed fixes every mask.
    """
    return backend.random_uniform(shape, device=device, dtype=np.float32) >= p


class Dropout(Function):
    """out = x ⊙ m / (1 - p), m ~ Bernoulli(1 - p).   dx = grad ⊙ m / (1 - p)."""

    float_only = True     # integer or boolean inputs: TypeError in the user's words

    def __init__(self, p: float):
        self.p = p

    def forward(self, x):
        keep = dropout_keep_mask(x.shape, self.p, backend.device_of(x))
        self.scale = x.dtype.type(1.0 / (1.0 - self.p))
        out = x * keep               # bool mask: dropped elements become 0
        out *= self.scale
        self.save(keep)
        return out

    def backward(self, grad):
        (keep,) = self.saved
        grad_x = grad * keep
        grad_x *= self.scale
        return (grad_x,)


def _check_p(p, op_name: str) -> float:
    if not is_real(p) or not 0.0 <= p < 1.0:
        raise ValueError(f"{op_name}: dropout probability must be a number in [0, 1), got {p!r}")
    return float(p)


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Inverted dropout: zero each element with probability ``p`` and scale the rest by 1/(1-p).

    With ``p == 0`` or ``training=False`` it returns ``x`` itself. ``p`` must
    lie in [0, 1) (ValueError otherwise). Seed with ``mm.manual_seed``.
    """
    p = _check_p(p, "dropout")
    if p == 0.0 or not training:
        return x
    return Dropout.apply(x, p=p)
