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
only float32 multiplies. On the CPU the update is 13 in-place NumPy passes (12 without weight decay)
over the parameter with one shared scratch buffer and no other temporary, made
block by block (each block in cache for all the passes) by the CPU's threads; on
the GPU it is one fused CUDA kernel per parameter
(:func:`minillm.kernels.optim.adamw_update_`).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np

from .. import backend
from ..kernels.optim import adamw_update_
from ..ops.common import elementwise_in_threads
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
            for p, grad in params_with_grad(group):
                state = self.state.get(id(p))
                if state is None:
                    xp = backend.array_module(p.data)
                    state = self.state[id(p)] = {
                        "step": 0, "exp_avg": xp.zeros_like(p.data), "exp_avg_sq": xp.zeros_like(p.data)}
                state["step"] += 1
                t = state["step"]
                bias_correction1 = 1.0 - beta1**t  # Python floats: no float64 array promotion
                bias_correction2_sqrt = math.sqrt(1.0 - beta2**t)
                step_size = lr * bias_correction2_sqrt / bias_correction1
                eps_hat = eps * bias_correction2_sqrt
                decay = 1.0 - lr * weight_decay
                if isinstance(p.data, np.ndarray):
                    self._update_cpu(p.data, grad, state["exp_avg"], state["exp_avg_sq"],
                                     beta1, beta2, step_size, eps_hat, decay)
                else:
                    with backend.device_context(backend.device_of(p.data)):
                        adamw_update_(p.data, grad, state["exp_avg"], state["exp_avg_sq"],
                                      beta1, beta2, step_size, eps_hat, decay)

    def _update_cpu(self, param, grad, exp_avg, exp_avg_sq, beta1, beta2, step_size, eps_hat, decay) -> None:
        """The AdamW update in place, in NumPy passes over memory (the elementwise cost on a CPU):
        shared out between the CPU's threads, in blocks that stay in cache for all 13 passes."""
        arrays = (param, grad, exp_avg, exp_avg_sq, self.scratch_like(param))
        elementwise_in_threads(_adamw_passes, arrays, beta1, beta2, step_size, eps_hat, decay)


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
