"""Parameter: a Tensor that a Module owns and an optimizer updates.

It is an ordinary leaf tensor with ``requires_grad=True`` (a layer's weight,
bias, embedding table). Assigning one to a Module attribute registers it, which
is how ``model.parameters()`` finds every weight without a list kept by hand.
Only floating-point arrays can be parameters: a gradient needs a continuum.
"""

from __future__ import annotations

import numpy as np

from ..tensor import Tensor


class Parameter(Tensor):
    """A float tensor that requires grad, registered when assigned to a Module attribute.

    >>> w = Parameter(np.zeros((3, 2), dtype=np.float32))
    >>> w.requires_grad, w.is_leaf
    (True, True)
    """

    __slots__ = ()

    def __init__(self, data, device=None, dtype=None, name: str | None = None):
        if isinstance(data, Tensor):
            data = data.data
        if dtype is not None:
            kind = np.dtype(dtype).kind
        else:
            kind = np.dtype(data.dtype).kind if hasattr(data, "dtype") else np.asarray(data).dtype.kind
        if kind != "f":
            shown = dtype if dtype is not None else getattr(data, "dtype", type(data).__name__)
            raise TypeError(f"a Parameter must be floating point (it gets a gradient), got {shown}")
        super().__init__(data, requires_grad=True, device=device, dtype=dtype, name=name)

    def __repr__(self) -> str:
        return "Parameter containing:\n" + super().__repr__()
