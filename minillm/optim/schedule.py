"""Learning-rate schedule: linear warmup, then cosine decay to a floor.

    step < warmup:          lr = max_lr * (step + 1) / warmup_steps
    warmup <= step < total: lr = min_lr + (max_lr - min_lr) * (1 + cos(pi * progress)) / 2,
                            progress = (step - warmup_steps) / (total_steps - warmup_steps)
    step >= total:          lr = min_lr

Steps count from 0. Warmup climbs to max_lr at step ``warmup_steps - 1`` (step
0 already moves the weights a little), the cosine starts at max_lr at step
``warmup_steps`` and reaches min_lr at ``total_steps``.

The schedule is a plain function of the step, so a resumed run gets the
right lr from the step counter alone; :func:`apply_lr` writes it into an
optimizer.
"""

from __future__ import annotations

import math


def cosine_schedule(step: int, warmup_steps: int, total_steps: int, max_lr: float, min_lr: float = 0.0) -> float:
    """The learning rate at ``step`` (0-based): linear warmup, cosine decay, then ``min_lr``.

    >>> [round(cosine_schedule(s, 2, 6, 1.0, 0.0), 3) for s in range(8)]
    [0.5, 1.0, 1.0, 0.854, 0.5, 0.146, 0.0, 0.0]
    """
    if warmup_steps < 0 or total_steps < 0 or step < 0:
        raise ValueError(f"step={step}, warmup_steps={warmup_steps}, total_steps={total_steps} must be >= 0")
    if min_lr > max_lr:
        raise ValueError(f"min_lr={min_lr} is above max_lr={max_lr}")
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + (max_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def apply_lr(optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group to ``lr`` (call it before each step)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
