"""Module: the base class of every layer and model.

A Module is a tree. Assigning a ``Parameter`` or another ``Module`` to an
attribute registers it, in insertion order:

    class Tiny(Module):
        def __init__(self):
            super().__init__()
            self.fc = Linear(4, 2)              # a submodule, named "fc"
            self.scale = Parameter(np.ones(2))  # a parameter, named "scale"

        def forward(self, x):
            return self.fc(x) * self.scale

    Tiny().named_parameters()  ->  ("scale", ...), ("fc.weight", ...), ("fc.bias", ...)

(a module's own parameters first, then each submodule's, depth first, as in
PyTorch, so state dicts list keys in the same order).

Dotted names are the paths through the tree; they are what ``state_dict``
uses, so GPT's names (``h.0.attn.c_attn.weight``) match GPT-2's checkpoints.
A Module never writes a backward pass: ``forward`` composes ops, and the
autograd engine differentiates the composition.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np

from .. import backend
from ..tensor import Tensor
from .parameter import Parameter


class LoadResult(NamedTuple):
    """What ``load_state_dict`` did not match (both empty after a strict load)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


class Module:
    """Base class: registers parameters and submodules, walks the tree, moves it, saves it."""

    training: bool

    def __init__(self) -> None:
        # object.__setattr__: these three must exist before our __setattr__ can run
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    # ------------------------------------------------------------ registration
    def __setattr__(self, name: str, value: Any) -> None:
        registries = self.__dict__.get("_parameters"), self.__dict__.get("_modules")
        if registries[0] is None and isinstance(value, (Parameter, Module)):
            raise AttributeError(
                f"cannot assign {type(value).__name__} '{name}' before Module.__init__() "
                f"(call super().__init__() first in {type(self).__name__}.__init__)"
            )
        if isinstance(value, Parameter):
            target = registries[0]
        elif isinstance(value, Module):
            target = registries[1]
        else:
            target = None
        if registries[0] is not None:
            for registry in registries:  # a name lives in one place only
                if registry is not target:
                    registry.pop(name, None)
            self.__dict__.pop(name, None)
        if target is not None:
            target[name] = value  # a re-assigned name keeps its place in the order
        # registered values are plain attributes too: ``self.fc`` in a forward is an ordinary
        # lookup (no __getattr__ call per access); the registries give the order and the names
        object.__setattr__(self, name, value)

    def __getattr__(self, name: str) -> Any:
        # only called when normal lookup fails (a name that was never assigned, or put
        # into a registry by hand): parameters and submodules live in the registries
        registries = self.__dict__
        if name in registries.get("_parameters", ()):
            return registries["_parameters"][name]
        if name in registries.get("_modules", ()):
            return registries["_modules"][name]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def __delattr__(self, name: str) -> None:
        self._parameters.pop(name, None)
        self._modules.pop(name, None)
        object.__delattr__(self, name)

    def add_module(self, name: str, module: "Module") -> None:
        """Register ``module`` under ``name`` (for names that are not identifiers, like "0")."""
        if not isinstance(module, Module):
            raise TypeError(f"add_module: {name!r} must be a Module, got {type(module).__name__}")
        setattr(self, name, module)

    # ------------------------------------------------------------ calling
    def forward(self, *args, **kwargs):  # pragma: no cover - interface
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # ------------------------------------------------------------ walking the tree
    def named_children(self) -> Iterator[tuple[str, "Module"]]:
        yield from self._modules.items()

    def children(self) -> Iterator["Module"]:
        for _, module in self.named_children():
            yield module

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, "Module"]]:
        """Every module of the tree, this one first (named ``prefix``, "" by default), depth first."""
        seen: set[int] = set()
        stack = [(prefix, self)]
        while stack:
            name, module = stack.pop()
            if id(module) in seen:
                continue
            seen.add(id(module))
            yield name, module
            children = [(f"{name}.{child}" if name else child, m) for child, m in module._modules.items()]
            stack.extend(reversed(children))

    def modules(self) -> Iterator["Module"]:
        for _, module in self.named_modules():
            yield module

    def named_parameters(self, prefix: str = "", recurse: bool = True) -> Iterator[tuple[str, Parameter]]:
        """(dotted name, parameter) in registration order; a shared parameter appears once."""
        seen: set[int] = set()
        modules = self.named_modules(prefix) if recurse else iter([(prefix, self)])
        for module_name, module in modules:
            for name, param in module._parameters.items():
                if id(param) in seen:
                    continue
                seen.add(id(param))
                yield (f"{module_name}.{name}" if module_name else name), param

    def parameters(self, recurse: bool = True) -> Iterator[Parameter]:
        for _, param in self.named_parameters(recurse=recurse):
            yield param

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Total number of scalars in the parameters (each shared parameter counted once)."""
        return sum(p.size for p in self.parameters() if p.requires_grad or not trainable_only)

    def apply(self, fn: Callable[["Module"], None]) -> "Module":
        """Call ``fn`` on every module of the tree, children before their parent (as in PyTorch)."""
        for child in self.children():
            child.apply(fn)
        fn(self)
        return self

    # ------------------------------------------------------------ modes, devices, dtypes
    def train(self, mode: bool = True) -> "Module":
        """Training mode (dropout active) for the whole tree; returns self."""
        for module in self.modules():
            object.__setattr__(module, "training", bool(mode))
        return self

    def eval(self) -> "Module":
        """Evaluation mode (dropout off) for the whole tree; returns self."""
        return self.train(False)

    def to(self, device=None, dtype=None) -> "Module":
        """Move every parameter (and its gradient) to ``device`` and/or cast it to a float ``dtype``.

        In place: the Parameter objects stay the same (an optimizer holding them
        keeps working), only their arrays change. ``model.to(np.float64)`` is
        read as a dtype, ``model.to("cuda")`` as a device. Returns self.
        """
        if device is not None and not isinstance(device, str):
            try:  # model.to(np.float64), as in PyTorch
                dtype, device = np.dtype(device), None
            except TypeError:
                raise TypeError(f"to(): expected a device string or a dtype, got {device!r}") from None
        if dtype is not None:
            dtype = np.dtype(dtype)
            if dtype.kind != "f":
                raise TypeError(f"to(): parameters must stay floating point, got dtype {dtype}")
        if device is not None:
            device = backend.parse_device(device)
        for param in self.parameters():
            param.data = _convert(param.data, device, dtype)
            if param.grad is not None:
                param.grad = _convert(param.grad, device, dtype)
        return self

    def zero_grad(self) -> None:
        """Forget every parameter's gradient (set to None, so the next backward allocates it)."""
        for param in self.parameters():
            param.grad = None

    # ------------------------------------------------------------ saving and loading
    def state_dict(self) -> "OrderedDict[str, Any]":
        """{dotted name: array} for every parameter, in registration order.

        The arrays are the parameters' LIVE data (NumPy or CuPy), not copies:
        training after this call changes them. Copy them (``{k: v.copy() ...}``,
        or ``backend.to_numpy``) to keep a snapshot.
        """
        return OrderedDict((name, param.data) for name, param in self.named_parameters())

    def load_state_dict(self, state_dict, strict: bool = True) -> LoadResult:
        """Copy arrays (or Tensors) from ``state_dict`` into the parameters, in place.

        Each value is moved to its parameter's device and cast to its dtype.
        Everything is checked before anything is copied: a shape mismatch always
        raises (naming both shapes); with ``strict`` so do missing and unexpected
        keys. Returns ``LoadResult(missing_keys, unexpected_keys)``.
        """
        params = dict(self.named_parameters())
        missing = [name for name in params if name not in state_dict]
        unexpected = [name for name in state_dict if name not in params]
        mismatched = []
        for name, param in params.items():
            if name in state_dict:
                shape = tuple(_array_of(state_dict[name]).shape)
                if shape != tuple(param.shape):
                    mismatched.append(f"{name}: checkpoint has shape {shape}, model has {tuple(param.shape)}")
        problems = []
        if strict and missing:
            problems.append("missing keys: " + ", ".join(missing))
        if strict and unexpected:
            problems.append("unexpected keys: " + ", ".join(unexpected))
        if mismatched:
            problems.append("size mismatch for " + "; ".join(mismatched))
        if problems:
            raise RuntimeError(
                f"error loading state_dict into {type(self).__name__}:\n  " + "\n  ".join(problems)
            )
        for name, param in params.items():
            if name in state_dict:
                value = backend.to_device(_array_of(state_dict[name]), param.device)
                param.data[...] = value  # in place, cast to the parameter's dtype
        return LoadResult(missing, unexpected)

    # ------------------------------------------------------------ printing
    def extra_repr(self) -> str:
        """The part inside the parentheses of this module's own line (layers override it)."""
        return ""

    def __repr__(self) -> str:
        extra = self.extra_repr()
        lines = extra.split("\n") if extra else []
        for names, child_repr in _group_repeats(self._modules):
            lines.append(f"({names}): " + child_repr.replace("\n", "\n  "))
        head = type(self).__name__ + "("
        if not self._modules:
            return head + extra + ")"
        return head + "\n  " + "\n  ".join(lines) + "\n)"


def _group_repeats(modules) -> list[tuple[str, str]]:
    """Children as (name, repr), with runs of identical numbered ones folded: ("0-11", "12 x Block(...)")."""
    grouped: list[tuple[str, str]] = []
    items = [(name, repr(m)) for name, m in modules.items()]
    i = 0
    while i < len(items):
        j = i
        while (j + 1 < len(items) and items[j + 1][1] == items[i][1]
               and items[j][0].isdigit() and items[j + 1][0].isdigit()
               and int(items[j + 1][0]) == int(items[j][0]) + 1):
            j += 1
        if j > i:
            grouped.append((f"{items[i][0]}-{items[j][0]}", f"{j - i + 1} x {items[i][1]}"))
        else:
            grouped.append(items[i])
        i = j + 1
    return grouped


def _array_of(value):
    """The array inside a state_dict value (an array, a Tensor, or anything NumPy can read)."""
    if isinstance(value, Tensor):
        return value.data
    return value if hasattr(value, "shape") else np.asarray(value)


def _convert(array, device, dtype):
    if device is not None:
        array = backend.to_device(array, device)
    if dtype is not None and array.dtype != dtype:
        array = array.astype(dtype)
    return array
