"""SGD: stochastic gradient descent, with optional (Nesterov) momentum.

For each parameter p with gradient g (PyTorch's ``torch.optim.SGD`` with no
dampening):

    d   = g + wd * p                       L2 weight decay, added to the gradient
    buf <- momentum * buf + d              (buf = d at the first step)
    d   = d + momentum * buf  if nesterov  look ahead along the velocity
          buf                 otherwise
    p   <- p - lr * d

Unlike AdamW's decoupled decay, this ``weight_decay`` is the classic L2
penalty (wd/2)·|p|² folded into the gradient: for plain SGD the two are the
same thing, with momentum the decay is carried in the velocity too.
"""

from __future__ import annotations

from typing import Any, Iterable

from .. import backend
from .optimizer import Optimizer, finite_at_least, params_with_grad


class SGD(Optimizer):
    """SGD(params_or_groups, lr=1e-2, momentum=0.0, nesterov=False, weight_decay=0.0)

    Per-parameter state (with momentum): ``momentum_buffer``.
    """

    constraints = {
        "lr": (finite_at_least(0.0), "a finite number >= 0"),
        "momentum": (finite_at_least(0.0), "a finite number >= 0"),
        "weight_decay": (finite_at_least(0.0), "a finite number >= 0"),
        "nesterov": (lambda v: isinstance(v, bool), "True or False"),
    }

    def __init__(self, params: Iterable[Any], lr: float = 1e-2, momentum: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0) -> None:
        if nesterov and momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay))

    def step(self) -> None:
        """One update of every parameter that has a gradient."""
        for group in self.param_groups:
            lr, momentum, weight_decay = float(group["lr"]), float(group["momentum"]), float(group["weight_decay"])
            for p, grad in params_with_grad(group):
                xp = backend.array_module(p.data)
                scratch = self.scratch_like(p.data)
                direction = grad
                if weight_decay != 0:
                    xp.multiply(p.data, weight_decay, out=scratch)  # d = g + wd p
                    scratch += grad
                    direction = scratch
                if momentum != 0:
                    state = self.state.setdefault(id(p), {})
                    buffer = state.get("momentum_buffer")
                    if buffer is None:
                        buffer = state["momentum_buffer"] = direction.copy()
                    else:
                        buffer *= momentum
                        buffer += direction
                    if group["nesterov"]:  # p -= lr (d + momentum buf), in two in-place steps
                        _add_scaled(p.data, -lr, direction, scratch)
                        _add_scaled(p.data, -lr * momentum, buffer, scratch)
                        continue
                    direction = buffer
                _add_scaled(p.data, -lr, direction, scratch)


def _add_scaled(target, alpha: float, x, scratch) -> None:
    """target += alpha * x, in place, through ``scratch`` (which may be x itself)."""
    xp = backend.array_module(target)
    xp.multiply(x, alpha, out=scratch)
    target += scratch
