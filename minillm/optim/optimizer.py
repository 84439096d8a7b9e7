"""Optimizer: the parameter groups, per-parameter state, and its (de)serialisation.

An optimizer holds ``param_groups``, a list of dicts, each with ``"params"``
(a list of tensors) and that group's hyper-parameters; PyTorch's convention:

    opt = AdamW(model.parameters(), lr=3e-4)                   # one group
    opt = AdamW([{"params": decay, "weight_decay": 0.1},       # several groups;
                 {"params": no_decay, "weight_decay": 0.0}],   # a key a group
                lr=3e-4)                                       # lacks takes the default
    opt.param_groups[0]["lr"] = 1e-4                           # schedules write here

An optimizer only touches a tensor's ``.data`` (a NumPy or CuPy array, updated
in place) and reads its ``.grad`` (an array, or None: then the parameter is
skipped). It never builds a graph.

``state_dict()`` is a snapshot: the hyper-parameters of each group, and each
parameter's state (step count, moment buffers) as NumPy arrays keyed by the
parameter's position (0, 1, 2, ... counted through the groups in order).
``load_state_dict`` copies it back onto each parameter's device and dtype after
checking that it fits: same number of groups, of parameters per group, same
shapes.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Iterable

import numpy as np

from .. import backend


def finite_at_least(low: float):
    """A hyper-parameter check: a real, finite number >= ``low`` (NaN and infinity fail every comparison
    we care about, so they are refused here rather than turning the weights to NaN later)."""
    return lambda v: _is_real(v) and math.isfinite(v) and v >= low


def finite_in_unit_interval(v) -> bool:
    """A check for one beta: a real number in [0, 1)."""
    return _is_real(v) and 0.0 <= v < 1.0


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


class Optimizer:
    """Base class: subclasses set the defaults, their ``constraints`` and write ``step()``."""

    # hyper-parameter name -> (accept(value), what it must be): checked for the defaults and for
    # every group added, so a group cannot bring a NaN learning rate either
    constraints: dict[str, tuple[Callable[[Any], bool], str]] = {}

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        self._check_hyperparameters(defaults)
        self.defaults = dict(defaults)
        self.param_groups: list[dict[str, Any]] = []
        self.state: dict[int, dict[str, Any]] = {}  # id(param) -> that parameter's state
        self._scratch: dict[tuple[str, Any], Any] = {}  # (device, dtype) -> flat work buffer
        params = list(params)
        if not params:
            raise ValueError(f"{type(self).__name__} got an empty parameter list")
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        for group in groups:
            self.add_param_group(group)

    def add_param_group(self, group: dict[str, Any]) -> None:
        """Add a group (a dict with "params"); missing hyper-parameters take the defaults."""
        if not isinstance(group, dict) or "params" not in group:
            raise TypeError('a parameter group is a dict with a "params" entry')
        params = group["params"]
        params = [params] if hasattr(params, "data") else list(params)
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        for p in params:
            _check_parameter(p)
            if id(p) in seen:
                raise ValueError("a parameter appears twice (in one group or in two groups)")
            seen.add(id(p))
        unknown = set(group) - set(self.defaults) - {"params"}
        if unknown:
            raise ValueError(f"unknown hyper-parameter(s) {sorted(unknown)} for {type(self).__name__}; "
                             f"it has {sorted(self.defaults)}")
        merged = {**self.defaults, **group, "params": params}
        self._check_hyperparameters(merged, where=f" (parameter group {len(self.param_groups)})")
        self.param_groups.append(merged)

    def _check_hyperparameters(self, values: dict[str, Any], where: str = "") -> None:
        for name, (accept, expected) in self.constraints.items():
            if name in values and not accept(values[name]):
                raise ValueError(f"{type(self).__name__}: {name} must be {expected}, got {values[name]!r}{where}")

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget the gradients: ``p.grad = None`` (or zero them in place)."""
        for group in self.param_groups:
            for p in group["params"]:
                if set_to_none:
                    p.grad = None
                elif p.grad is not None:
                    p.grad.fill(0)

    def step(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def scratch_like(self, array):
        """A work array of ``array``'s shape and dtype, for in-place update chains.

        It is a view into one flat buffer per (device, dtype), as large as the
        largest parameter, shared by all parameters: the update of one
        parameter is finished before the next one starts. Its content is garbage.
        """
        key = (backend.device_of(array), array.dtype)
        buffer = self._scratch.get(key)
        if buffer is None or buffer.size < array.size:
            xp = backend.array_module(array)
            with backend.device_context(key[0]):
                buffer = self._scratch[key] = xp.empty(array.size, dtype=array.dtype)
        return buffer[: array.size].reshape(array.shape)

    # ------------------------------------------------------------ saving and loading

    def state_dict(self) -> dict[str, Any]:
        """``{"state": {index: {name: value}}, "param_groups": [{hyper-parameters, "params": [indices]}]}``

        Arrays are NumPy copies (from the GPU when needed): later steps do not
        change a snapshot, and it saves with ``np.savez`` or pickle.
        """
        state, groups, index = {}, [], 0
        for group in self.param_groups:
            indices = []
            for p in group["params"]:
                if id(p) in self.state:
                    state[index] = {k: _snapshot(v) for k, v in self.state[id(p)].items()}
                indices.append(index)
                index += 1
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": indices})
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore ``state_dict()``: hyper-parameters and per-parameter state.

        Raises ValueError, before changing anything, when the saved optimizer
        does not match this one (groups, parameters per group, array shapes).
        """
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"optimizer state has {len(saved_groups)} parameter group(s), "
                             f"this optimizer has {len(self.param_groups)}")
        by_index: dict[int, Any] = {}
        for g, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"optimizer state: group {g} has {len(saved['params'])} parameter(s), "
                                 f"this optimizer's group {g} has {len(group['params'])}")
            by_index.update(zip(saved["params"], group["params"]))
        new_state = {}
        for index, values in state_dict["state"].items():
            p = by_index.get(int(index))
            if p is None:
                raise ValueError(f"optimizer state for parameter {index}, which no group lists")
            restored = {}
            for name, value in values.items():
                if hasattr(value, "shape") and value.ndim > 0:
                    if tuple(value.shape) != p.data.shape:
                        raise ValueError(f"optimizer state {name!r} of parameter {index} has shape "
                                         f"{tuple(value.shape)}, the parameter has shape {p.data.shape}")
                    value = np.array(backend.to_numpy(value), dtype=p.data.dtype)  # a copy: never alias the dict
                    value = backend.to_device(value, backend.device_of(p.data))
                elif hasattr(value, "item"):  # a NumPy scalar (e.g. the step count after np.load)
                    value = value.item()
                restored[name] = value
            new_state[id(p)] = restored
        for saved, group in zip(saved_groups, self.param_groups):
            group.update({k: v for k, v in saved.items() if k != "params"})
        self.state = new_state


def _check_parameter(p) -> None:
    if isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], str):
        raise TypeError("got (name, tensor) pairs: pass model.parameters(), or groups from "
                        "optim.weight_decay_groups(model.named_parameters(), weight_decay)")
    if not hasattr(p, "data") or not hasattr(p, "grad"):
        raise TypeError(f"optimizers update tensors, got {type(p).__name__}")
    if p.data.dtype.kind != "f":
        raise TypeError(f"can only optimize floating-point tensors, got dtype {p.data.dtype}")


def _snapshot(value):
    return backend.to_numpy(value).copy() if hasattr(value, "shape") else value


def params_with_grad(group: dict[str, Any]):
    """The (param, grad) pairs of a group whose grad is set, checked to fit."""
    for p in group["params"]:
        g = p.grad
        if g is None:
            continue
        if g.shape != p.data.shape or g.dtype != p.data.dtype:
            raise ValueError(f"gradient {g.dtype}{tuple(g.shape)} does not match its parameter "
                             f"{p.data.dtype}{tuple(p.data.shape)}")
        yield p, g
