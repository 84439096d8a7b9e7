"""AdamW: Adam with decoupled weight decay (Loshchilov & Hutter, 2019).

For each parameter p with gradient g, at step t = 1, 2, ... (per parameter):

    p  <- p - lr * wd * p                      decoupled weight decay
    m  <- beta1 * m + (1 - beta1) * g          running mean of g      (1st moment)
    v  <- beta2 * v + (1 - beta2) * g * g      running mean of g^2    (2nd moment)
    m_hat = m / (1 - beta1^t)                  bias corrections: m and v start at 0,
    v_hat = v / (1 - beta2^t)                  so early averages are too small
    p  <- p - lr * m_hat / (sqrt(v_hat) + eps)

This is PyTorch's ``torch.optim.AdamW`` formula. The decay is *decoupled*:
it shrinks p directly instead of adding ``wd * p`` to g (which Adam would then
divide by sqrt(v), so that weights with large gradients would hardly be
decayed). As in PyTorch, AdamW decays every parameter it is given; build
groups with :func:`~minillm.optim.weight_decay_groups` to spare biases, norm
weights and embeddings.

Implementation: the two bias corrections are folded into two Python floats,

    lr * m_hat / (sqrt(v_hat) + eps) = step_size * m / (sqrt(v) + eps_hat)
    step_size = lr * sqrt(1 - beta2^t) / (1 - beta1^t),  eps_hat = eps * sqrt(1 - beta2^t)

(multiply numerator and denominator by sqrt(1 - beta2^t)), so the arrays see
only float32 multiplies, and the decay into one, decay = 1 - lr * wd:

    m <- beta1 * m + (1 - beta1) * g
    v <- beta2 * v + (1 - beta2) * g * g
    p <- decay * p - step_size * m / (sqrt(v) + eps_hat)

The three coefficients depend on the group's hyper-parameters and on t alone,
so parameters of one group with one step count share them. (Step counts
differ when a parameter had no gradient at some step: it did not advance.)
``step`` therefore sorts a group's parameters into buckets by (device, dtype,
t) (:func:`buckets_by_device_dtype_step`) and updates each bucket with one set
of coefficients:

* CPU (NumPy) parameters, the whole bucket in one split of the CPU's threads:
  where the compiled CPU loops are at hand (minillm/kernels/cpu.py), one pass
  per parameter piece running the CUDA kernel's body
  (:func:`minillm.kernels.optim.adamw_update_`); otherwise 13 in-place NumPy
  passes (12 without weight decay) with one shared scratch buffer and no other
  temporary, made block by block (each block in cache for all the passes).
* GPU (CuPy) parameters: one launch of a multi-tensor CUDA kernel for the
  whole bucket (:func:`minillm.kernels.optim.multi_adamw_`), which reads p, g,
  m, v once and writes p, m, v once. With one weight-decay group and one
  without, that is two launches per step instead of one per parameter (~150
  for GPT-2 small; a launch costs more host time than its arithmetic). A
  bucket the kernel does not take (a non-contiguous array, or a dtype other
  than float32/float64) is updated one parameter at a time by the same
  arithmetic in a per-parameter kernel (:func:`minillm.kernels.optim.adamw_update_`).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np

from .. import backend
from ..kernels.optim import adamw_cpu_fusable, adamw_update_, multi_adamw_, multi_tensor_fusable
from ..ops.common import elementwise_groups_in_threads
from .optimizer import Optimizer, finite_at_least, finite_in_unit_interval, params_with_grad


class AdamW(Optimizer):
    """AdamW(params_or_groups, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)

    Per-parameter state: ``step`` (int), ``exp_avg`` (m), ``exp_avg_sq`` (v),
    created at the parameter's first update. Parameters whose ``.grad`` is
    None are skipped (their step count does not advance).
    """

    constraints = {
        "lr": (finite_at_least(0.0), "a finite number >= 0"),
        "betas": (lambda b: isinstance(b, (tuple, list)) and len(b) == 2 and all(map(finite_in_unit_interval, b)),
                  "two numbers in [0, 1)"),
        "eps": (finite_at_least(0.0), "a finite number >= 0"),
        "weight_decay": (finite_at_least(0.0), "a finite number >= 0"),
    }

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01) -> None:
        betas = tuple(betas) if isinstance(betas, (tuple, list)) else betas
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def step(self) -> None:
        """One update of every parameter that has a gradient."""
        for group in self.param_groups:
            lr, eps, weight_decay = float(group["lr"]), float(group["eps"]), float(group["weight_decay"])
            beta1, beta2 = (float(b) for b in group["betas"])
            updates = []  # (t, param, grad, exp_avg, exp_avg_sq) of every parameter with a gradient
            for p, grad in params_with_grad(group):
                state = self.state.get(id(p))
                if state is None:
                    xp = backend.array_module(p.data)
                    state = self.state[id(p)] = {
                        "step": 0, "exp_avg": xp.zeros_like(p.data), "exp_avg_sq": xp.zeros_like(p.data)}
                state["step"] += 1
                updates.append((state["step"], p.data, grad, state["exp_avg"], state["exp_avg_sq"]))
            for (device, _, t), columns in buckets_by_device_dtype_step(updates).items():
                step_size, eps_hat, decay = adamw_coefficients(lr, beta1, beta2, eps, weight_decay, t)
                coefficients = (beta1, beta2, step_size, eps_hat, decay)
                if device == "cpu":     # every parameter of the bucket in one split of the threads
                    groups = list(zip(*columns))
                    compiled = [adamw_cpu_fusable(arrays) for arrays in groups]   # one compiled pass each
                    if any(compiled):
                        elementwise_groups_in_threads(adamw_update_, [g for g, c in zip(groups, compiled) if c],
                                                      *coefficients, blocks=False)
                    if not all(compiled):
                        elementwise_groups_in_threads(_adamw_passes, [g for g, c in zip(groups, compiled) if not c],
                                                      *coefficients, scratch=True)
                    continue
                with backend.device_context(device):
                    if multi_tensor_fusable([a for column in columns for a in column]):
                        multi_adamw_(*columns, *coefficients)  # the whole bucket in one launch
                    else:
                        for arrays in zip(*columns):
                            adamw_update_(*arrays, *coefficients)


def adamw_coefficients(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                       t: int) -> tuple[float, float, float]:
    """``(step_size, eps_hat, decay)`` of step t (see the module docstring), as Python floats
    (no float64 array promotion when they meet float32 arrays)."""
    bias_correction1 = 1.0 - beta1**t
    bias_correction2_sqrt = math.sqrt(1.0 - beta2**t)
    return lr * bias_correction2_sqrt / bias_correction1, eps * bias_correction2_sqrt, 1.0 - lr * weight_decay


def buckets_by_device_dtype_step(updates) -> dict[tuple[str, Any, int], tuple[list, list, list, list]]:
    """Sort parameter updates into buckets that share a device, a dtype and a step count.

    ``updates``: ``(t, param, grad, exp_avg, exp_avg_sq)`` tuples of arrays, t
    the parameter's step count. Returns ``{(device, dtype, t): (params, grads,
    exp_avgs, exp_avg_sqs)}``, buckets in order of first appearance and each
    bucket's lists in the order given: one bucket is one set of AdamW
    coefficients and, on a GPU, one multi-tensor launch. For example
    ``[(3, a, ...), (2, b, ...), (3, c, ...)]`` with float32 NumPy arrays gives
    ``{("cpu", float32, 3): ([a, c], ...), ("cpu", float32, 2): ([b], ...)}``.
    """
    buckets: dict[tuple[str, Any, int], tuple[list, list, list, list]] = {}
    for t, *arrays in updates:
        param = arrays[0]
        columns = buckets.setdefault((backend.device_of(param), param.dtype, t), ([], [], [], []))
        for column, array in zip(columns, arrays):
            column.append(array)
    return buckets


def _adamw_passes(param, grad, exp_avg, exp_avg_sq, scratch, beta1, beta2, step_size, eps_hat, decay) -> None:
    """One block of the CPU update: p, m, v updated in place, ``scratch`` the one temporary."""
    if decay != 1.0:
        param *= decay                           # p <- (1 - lr wd) p
    np.multiply(grad, 1.0 - beta1, out=scratch)  # m <- beta1 m + (1 - beta1) g
    exp_avg *= beta1
    exp_avg += scratch
    np.multiply(grad, 1.0 - beta2, out=scratch)  # v <- beta2 v + (1 - beta2) g^2
    scratch *= grad
    exp_avg_sq *= beta2
    exp_avg_sq += scratch
    np.sqrt(exp_avg_sq, out=scratch)             # p <- p - step_size m / (sqrt(v) + eps_hat)
    scratch += eps_hat
    np.divide(exp_avg, scratch, out=scratch)
    scratch *= step_size
    param -= scratch
