"""Dynamic loss scaling for fp16 mixed precision (PyTorch's ``GradScaler`` recipe).

fp16 has 5 exponent bits: its smallest normal number is 6.1e-5 and its smallest
subnormal 6.0e-8, so under ``mm.autocast("fp16")`` the small gradients that the
products see in backward flush to zero. Scaling the loss by S scales every
gradient by S (backward is linear in its seed), lifting them into range; the
float32 master gradients are then divided by S before the optimizer sees them:

    scaler = optim.GradScaler()                 # S = 2^16
    with mm.autocast("fp16"):
        loss = model_loss(...)
    scaler.scale(loss).backward()               # gradients of S · loss
    scaler.unscale_(opt)                        # g <- g / S  (optional: before clipping)
    optim.clip_grad_norm_(params, 1.0)
    scaler.step(opt)                            # opt.step(), unless a gradient is inf/NaN
    scaler.update()                             # adapt S

S is chosen dynamically: too large and some gradient overflows (65504 is
fp16's largest number) to inf or NaN; then the step is skipped and S halved.
After ``growth_interval`` (2,000) steps in a row without overflow, S doubles,
so it stays near the largest safe value. bf16 has float32's exponent range and
needs none of this (``enabled=False`` makes every method a pass-through).

The check for inf/NaN costs one host sync per step and device (the gradients
are unscaled, then their sum of squares is read: it is finite exactly when
every gradient is, barring a norm above 1e19). The state (S and the count of
good steps) goes into checkpoints through ``state_dict``.
"""

from __future__ import annotations

import math
from typing import Any

from .. import backend
from .clip import _scale_, _sum_of_squares


class GradScaler:
    """GradScaler(init_scale=2**16, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000, enabled=True)"""

    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000, enabled: bool = True) -> None:
        if not init_scale > 0:
            raise ValueError(f"init_scale must be > 0, got {init_scale}")
        if not growth_factor > 1.0:
            raise ValueError(f"growth_factor must be > 1, got {growth_factor}")
        if not 0.0 < backoff_factor < 1.0:
            raise ValueError(f"backoff_factor must be in (0, 1), got {backoff_factor}")
        if int(growth_interval) < 1:
            raise ValueError(f"growth_interval must be >= 1, got {growth_interval}")
        self.enabled = bool(enabled)
        self.growth_factor, self.backoff_factor = float(growth_factor), float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self._scale = float(init_scale)
        self._growth_tracker = 0                    # good steps since the scale last changed
        self._found_inf: dict[int, bool] = {}       # id(optimizer) -> unscaled this step, found inf/NaN?

    def is_enabled(self) -> bool:
        return self.enabled

    def get_scale(self) -> float:
        """The current loss scale S (1.0 when disabled)."""
        return self._scale if self.enabled else 1.0

    def scale(self, loss):
        """S · loss (a tensor); backward from it gives S times the gradients."""
        return loss * self._scale if self.enabled else loss

    def unscale_(self, optimizer) -> bool:
        """Divide the optimizer's gradients by S in place and record whether any is inf/NaN.

        At most once per optimizer between ``update()`` calls. Returns True when an
        inf/NaN was found (the coming ``step`` will be skipped).
        """
        if not self.enabled:
            return False
        if id(optimizer) in self._found_inf:
            raise RuntimeError("unscale_() was already called on this optimizer since the last update()")
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        by_device: dict[str, list] = {}
        for g in grads:
            by_device.setdefault(backend.device_of(g), []).append(g)
        found_inf = False
        for device, arrays in by_device.items():
            with backend.device_context(device):
                _scale_(arrays, 1.0 / self._scale)
                found_inf = found_inf or not math.isfinite(float(_sum_of_squares(arrays)))   # host sync
        self._found_inf[id(optimizer)] = found_inf
        return found_inf

    def step(self, optimizer) -> bool:
        """``optimizer.step()`` with unscaled gradients, or nothing when one is inf/NaN.
        Returns whether the step was taken."""
        if not self.enabled:
            optimizer.step()
            return True
        if id(optimizer) not in self._found_inf:
            self.unscale_(optimizer)
        if self._found_inf[id(optimizer)]:
            return False
        optimizer.step()
        return True

    def update(self) -> None:
        """Adapt S after a step: halve it if this step overflowed, double it after
        ``growth_interval`` good steps in a row."""
        if not self.enabled:
            return
        if not self._found_inf:
            raise RuntimeError("update() without a step: call scaler.step(optimizer) first")
        if any(self._found_inf.values()):
            self._scale *= self.backoff_factor
            self._growth_tracker = 0
        else:
            self._growth_tracker += 1
            if self._growth_tracker == self.growth_interval:
                self._scale *= self.growth_factor
                self._growth_tracker = 0
        self._found_inf.clear()

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self._scale, "growth_factor": self.growth_factor, "backoff_factor": self.backoff_factor,
                "growth_interval": self.growth_interval, "growth_tracker": self._growth_tracker,
                "enabled": self.enabled}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._scale = float(state["scale"])
        self.growth_factor = float(state["growth_factor"])
        self.backoff_factor = float(state["backoff_factor"])
        self.growth_interval = int(state["growth_interval"])
        self._growth_tracker = int(state["growth_tracker"])
        self.enabled = bool(state.get("enabled", self.enabled))
        self._found_inf.clear()
