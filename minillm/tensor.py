"""Tensor and the autograd engine.

A ``Tensor`` wraps an array (``.data``, NumPy or CuPy) and, when it was made by
an op on tensors that need gradients, remembers that op (``._ctx``, a
``Function``). The ops form a graph; ``backward()`` walks it once, from the
output back to the leaves, in reverse topological order:

    for fn in reverse_topological_order(output):
        grad_out = grads.pop(fn)               # dL/d(output of fn), fully accumulated
        grad_ins = fn.backward(grad_out)       # chain rule, one array per input
        for input, g in zip(fn.inputs, grad_ins):
            accumulate g into grads[input]     # a tensor used twice gets the sum

A leaf can ask to be told when its gradient is final for this backward pass:
``t.register_post_accumulate_grad_hook(hook)`` calls ``hook(t)`` right after
the last edge into ``t`` has been accumulated (the engine counts the edges into
each hooked leaf before the walk and counts them down). Data parallelism uses
it to start all-reducing a bucket of gradients while the backward still runs.

Every edge's gradient is checked to have its input's shape. A node's saved
arrays and gradient are dropped as soon as it has run, so memory falls during
backward; running backward a second time through the freed graph raises.
The walk is iterative, so a chain of 100,000 ops is fine.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import numpy as np

from . import backend
from .checks import is_integer

_grad_enabled = True


@contextlib.contextmanager
def no_grad() -> Iterator[None]:
    """Within this block ops record no graph (inference, optimizer updates)."""
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = previous


def is_grad_enabled() -> bool:
    return _grad_enabled


# ================================================================ Function


class Function:
    """One op: ``forward`` on raw arrays, ``backward`` giving one gradient per input.

    Subclasses take their non-tensor arguments (axis, eps, ...) in ``__init__``
    and call ``self.save(...)`` in ``forward`` with exactly what ``backward``
    needs; ``self.saved`` returns it. ``self.needs_input_grad[i]`` tells
    ``backward`` whether input ``i`` wants a gradient (return None otherwise).
    """

    inputs: tuple["Tensor", ...] = ()
    needs_input_grad: tuple[bool, ...] = ()
    saved: tuple = ()
    freed: bool = False
    float_only: bool = False      # True: every tensor input must be floating point (fused math ops)

    def forward(self, *arrays):  # pragma: no cover - interface
        raise NotImplementedError

    def backward(self, grad):  # pragma: no cover - interface
        raise NotImplementedError

    def save(self, *arrays) -> None:
        self.saved = arrays

    @property
    def name(self) -> str:
        return type(self).__name__

    @classmethod
    def apply(cls, *inputs, **params) -> "Tensor":
        """Run the op on tensors (or numbers/arrays, lifted to constants) and record it."""
        fn = cls(**params)
        tensors, device = _as_tensors(inputs, cls.__name__)
        if cls.float_only:                     # the tensors as given (before integer ones are cast)
            _check_floating([x for x in inputs if isinstance(x, Tensor)], cls.__name__)
        if _grad_enabled:
            fn.needs_input_grad = tuple([t.requires_grad for t in tensors])
            requires_grad = any(fn.needs_input_grad)
        else:
            fn.needs_input_grad = (False,) * len(tensors)
            requires_grad = False
        arrays = [t.data for t in tensors]
        if device == "cpu":
            out = fn.forward(*arrays)
        else:
            with backend.device_context(device):
                out = fn.forward(*arrays)
        if isinstance(out, np.generic):  # NumPy turns 0-d results into scalars
            out = np.asarray(out)
        result = Tensor._from_op(out, requires_grad)
        if requires_grad:
            fn.inputs = tensors
            result._ctx = fn
        return result


def _check_floating(tensors: Sequence["Tensor"], op_name: str) -> None:
    """TypeError in the user's words (not NumPy's casting rules) for an integer or bool input
    (bfloat16, whose NumPy kind is "V", counts as floating point)."""
    for t in tensors:
        if t.data.dtype.kind in "iub":
            raise TypeError(f"{op_name.lower()}: needs floating-point tensors, got dtype {t.data.dtype}; "
                            f"convert first, e.g. x.to(dtype='float32')")


def _as_tensors(inputs: Sequence[Any], op_name: str) -> tuple[tuple["Tensor", ...], str]:
    """Lift numbers/arrays to constant tensors; check one device and one float dtype.

    Returns the tensors and their device. Runs once per op call, so the usual
    case (every input a tensor, nothing to lift) costs one pass over the inputs.
    """
    device = float_dtype = None
    all_tensors = True
    integer_tensors = False
    for x in inputs:
        if not isinstance(x, Tensor):
            all_tensors = False
            continue
        x_device = backend.device_of(x.data)
        if device is None:
            device = x_device
        elif x_device != device:
            raise RuntimeError(
                f"{op_name}: tensors on different devices ({device} and {x_device}); "
                f"move them with .to(device) first"
            )
        dtype = x.data.dtype
        if dtype.kind == "f":
            if float_dtype is None:
                float_dtype = dtype
            elif dtype != float_dtype:
                raise TypeError(
                    f"{op_name}: mixed float dtypes ({float_dtype} and {dtype}); "
                    f"minillm never promotes silently - convert one with .to(dtype=...)"
                )
        elif dtype.kind in "iub":
            integer_tensors = True
    if device is None:
        raise TypeError(f"{op_name}: expected at least one Tensor input")
    # An integer or boolean tensor that meets a float one is a constant like any other: it takes
    # the float dtype (else int64 * float32 would promote to float64, and matmul's backward would
    # cast the float gradient to the integer operand's dtype).
    cast_integers = integer_tensors and float_dtype is not None
    if all_tensors and not cast_integers:
        return inputs, device
    float_dtype = float_dtype or backend.get_default_dtype()
    out = []
    xp = backend.module_for(device)
    for x in inputs:
        if isinstance(x, Tensor):
            out.append(Tensor._from_op(x.data.astype(float_dtype), False)
                       if cast_integers and x.data.dtype.kind in "iub" else x)
            continue
        if hasattr(x, "dtype") and not isinstance(x, np.generic):  # an array
            if backend.device_of(x) != device:
                raise RuntimeError(f"{op_name}: array on {backend.device_of(x)} used with a tensor on {device}")
            arr = xp.asarray(x)
        else:  # a Python number, list or NumPy scalar
            arr = xp.asarray(np.asarray(x))
        if arr.dtype.kind in "fiu" and arr.dtype != float_dtype:
            arr = arr.astype(float_dtype)  # constants take the dtype of the tensors they meet
        out.append(Tensor._from_op(arr, False))
    return tuple(out), device


# ================================================================ Tensor


class Tensor:
    """An n-dimensional array that can carry a gradient.

    >>> x = Tensor(np.ones((2, 3)), requires_grad=True)
    >>> (x * x).sum().backward(); x.grad
    array([[2., 2., 2.], [2., 2., 2.]])
    """

    __slots__ = ("data", "grad", "requires_grad", "_ctx", "name", "_grad_hooks", "__weakref__")
    __array_priority__ = 1000  # numpy_array + tensor -> Tensor.__radd__

    def __init__(self, data, requires_grad: bool = False, device=None, dtype=None, name: str | None = None):
        if isinstance(data, Tensor):
            data = data.data
        if device is None:
            device = backend.device_of(data)
        device = backend.parse_device(device)
        xp = backend.module_for(device)
        if backend.device_of(data) != device:
            data = backend.to_device(data, device) if hasattr(data, "shape") else data
        if not hasattr(data, "dtype") or isinstance(data, np.generic):
            data = np.asarray(data)
            if data.dtype.kind == "f":
                data = data.astype(backend.get_default_dtype())
        with backend.device_context(device):
            data = xp.asarray(data, dtype=dtype)
        if requires_grad and data.dtype.kind != "f":
            raise TypeError(f"only floating-point tensors can require gradients; got dtype {data.dtype}")
        self.data = data
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self._ctx: Function | None = None
        self.name = name
        self._grad_hooks: list | None = None

    @classmethod
    def _from_op(cls, data, requires_grad: bool) -> "Tensor":
        t = object.__new__(cls)
        t.data, t.grad, t.requires_grad, t._ctx, t.name = data, None, requires_grad, None, None
        t._grad_hooks = None
        return t

    # ------------------------------------------------------------ properties
    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> int:
        return self.data.size

    @property
    def device(self) -> str:
        return backend.device_of(self.data)

    @property
    def is_leaf(self) -> bool:
        return self._ctx is None

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        extra = ""
        if self.device != "cpu":
            extra += f", device='{self.device}'"
        if self._ctx is not None:
            extra += f", grad_fn={self._ctx.name}"
        elif self.requires_grad:
            extra += ", requires_grad=True"
        body = np.array2string(self.numpy(), separator=", ", prefix="Tensor(", threshold=20)
        return f"Tensor({body}, dtype={self.dtype}{extra})"

    # ------------------------------------------------------------ conversions
    def numpy(self) -> np.ndarray:
        """The data as a NumPy array (copied from the GPU when needed)."""
        return backend.to_numpy(self.data)

    def item(self):
        if self.data.size != 1:
            raise ValueError(f"item() needs a tensor with one element, got shape {self.shape}")
        return self.data.reshape(()).item()

    def tolist(self):
        return self.numpy().tolist()

    def detach(self) -> "Tensor":
        """The same data, cut from the graph."""
        return Tensor._from_op(self.data, False)

    def to(self, device=None, dtype=None) -> "Tensor":
        """Copy to another device and/or dtype (a differentiable copy when this needs grad)."""
        from .ops.elementwise import Cast, ToDevice  # noqa: PLC0415

        out = self
        if dtype is not None and np.dtype(dtype) != self.dtype:
            out = Cast.apply(out, dtype=np.dtype(dtype))
        if device is not None and backend.parse_device(device) != self.device:
            out = ToDevice.apply(out, device=backend.parse_device(device))
        return out

    def float(self) -> "Tensor":
        return self.to(dtype=np.float32)

    def double(self) -> "Tensor":
        return self.to(dtype=np.float64)

    def requires_grad_(self, flag: bool = True) -> "Tensor":
        if flag and self.dtype.kind != "f":
            raise TypeError(f"only floating-point tensors can require gradients; got dtype {self.dtype}")
        self.requires_grad = flag
        return self

    # ------------------------------------------------------------ autograd
    def backward(self, grad=None, retain_graph: bool = False) -> None:
        """Accumulate d(self)/d(leaf) into every leaf's ``.grad``.

        ``grad`` is d(loss)/d(self); it defaults to 1 for a one-element tensor.
        """
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad (nothing to differentiate)")
        xp = backend.array_module(self.data)
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(f"backward() without a gradient needs a one-element output, got shape {self.shape}")
            grad = xp.ones_like(self.data)
        else:
            grad = grad.data if isinstance(grad, Tensor) else xp.asarray(grad, dtype=self.dtype)
            if grad.shape != self.shape:
                raise ValueError(f"backward(): gradient shape {grad.shape} != tensor shape {self.shape}")
        if self._ctx is None:
            _accumulate_leaf(self, grad, grad)       # the caller's array: copied, never aliased
            _run_grad_hooks(self)
            return
        with backend.device_context(self.device):
            _run_backward(self._ctx, grad, retain_graph)

    def register_post_accumulate_grad_hook(self, hook) -> None:
        """Call ``hook(self)`` each time a backward pass has finished accumulating into ``self.grad``.

        Only for leaves that require grad (parameters). The hook runs during
        the backward, as soon as no edge that is still to run leads to this
        leaf, so ``self.grad`` is final for this pass (PyTorch's name).
        """
        if self._ctx is not None or not self.requires_grad:
            raise RuntimeError("gradient hooks are for leaf tensors that require grad")
        if self._grad_hooks is None:
            self._grad_hooks = []
        self._grad_hooks.append(hook)

    def graph(self, format: str = "text") -> str:
        """This tensor's computation graph as a text tree or Graphviz DOT (see ``draw_graph``)."""
        from .graph import draw_graph  # noqa: PLC0415

        return draw_graph(self, format=format)

    # ------------------------------------------------------------ operators
    def __add__(self, other): return F.add(self, other)
    def __radd__(self, other): return F.add(other, self)
    def __sub__(self, other): return F.sub(self, other)
    def __rsub__(self, other): return F.sub(other, self)
    def __mul__(self, other): return F.mul(self, other)
    def __rmul__(self, other): return F.mul(other, self)
    def __truediv__(self, other): return F.div(self, other)
    def __rtruediv__(self, other): return F.div(other, self)
    def __neg__(self): return F.neg(self)
    def __pow__(self, exponent): return F.pow(self, exponent)
    def __rpow__(self, base): return F.pow(base, self)
    def __matmul__(self, other): return F.matmul(self, other)
    def __rmatmul__(self, other): return F.matmul(other, self)
    def __getitem__(self, index): return F.getitem(self, index)
    def __abs__(self): return F.abs(self)

    # comparisons give constant boolean tensors (masks), never a graph
    def __lt__(self, other): return _compare(np.less, self, other)
    def __le__(self, other): return _compare(np.less_equal, self, other)
    def __gt__(self, other): return _compare(np.greater, self, other)
    def __ge__(self, other): return _compare(np.greater_equal, self, other)

    __hash__ = object.__hash__  # tensors are identities (dict keys, sets), like PyTorch

    # ------------------------------------------------------------ methods (all ops live in F)
    def exp(self): return F.exp(self)
    def log(self): return F.log(self)
    def tanh(self): return F.tanh(self)
    def sqrt(self): return F.sqrt(self)
    def abs(self): return F.abs(self)
    def relu(self): return F.relu(self)
    def sigmoid(self): return F.sigmoid(self)
    def clip(self, min=None, max=None): return F.clip(self, min, max)
    def sum(self, axis=None, keepdims=False): return F.sum(self, axis, keepdims)
    def mean(self, axis=None, keepdims=False): return F.mean(self, axis, keepdims)
    def max(self, axis=None, keepdims=False): return F.max(self, axis, keepdims)
    def var(self, axis=None, keepdims=False): return F.var(self, axis, keepdims)
    def reshape(self, *shape): return F.reshape(self, *shape)
    def view(self, *shape): return F.reshape(self, *shape)
    def transpose(self, *axes): return F.transpose(self, *axes)
    def permute(self, *axes): return F.permute(self, *axes)
    def squeeze(self, axis=None): return F.squeeze(self, axis)
    def unsqueeze(self, axis): return F.unsqueeze(self, axis)
    def expand(self, *shape): return F.expand(self, *shape)
    def flatten(self): return F.reshape(self, -1)
    def softmax(self, axis=-1): return F.softmax(self, axis)
    def log_softmax(self, axis=-1): return F.log_softmax(self, axis)

    @property
    def T(self): return F.transpose(self)


def _compare(ufunc, a, b) -> Tensor:
    a_data = a.data if isinstance(a, Tensor) else a
    b_data = b.data if isinstance(b, Tensor) else b
    xp = backend.array_module(a_data if isinstance(a, Tensor) else b_data)
    result = getattr(xp, ufunc.__name__)(a_data, b_data)
    return Tensor._from_op(result, False)


# ================================================================ backward


def _topological_order(root: Function) -> list[Function]:
    """Functions reachable from ``root``, each after every function that consumes it.

    Iterative depth-first search (post-order), then reversed: no recursion limit.
    Each stack entry is a function and an iterator over its inputs, so every
    edge is looked at once; a function is finished when its iterator runs out.
    """
    _check_not_freed(root)
    order: list[Function] = []
    visited: set[Function] = {root}
    stack: list[tuple[Function, Iterator[Tensor]]] = [(root, iter(root.inputs))]
    while stack:
        fn, inputs = stack[-1]
        for tensor in inputs:
            parent = tensor._ctx
            if parent is not None and parent not in visited:
                _check_not_freed(parent)
                visited.add(parent)
                stack.append((parent, iter(parent.inputs)))
                break                        # go down first; this iterator resumes later
        else:                                # every input done: fn comes after its consumers
            stack.pop()
            order.append(fn)
    order.reverse()
    return order


def _check_not_freed(fn: Function) -> None:
    if fn.freed:
        raise RuntimeError(
            "backward() through a graph that was already freed: a previous backward() "
            "released its saved arrays. Call backward(retain_graph=True) the first time "
            "if you need to go through it twice."
        )


def _hooked_leaf_edges(order: list[Function]) -> dict[int, int]:
    """For each leaf with a grad hook: how many edges of ``order`` lead into it."""
    pending: dict[int, int] = {}
    for fn in order:
        for tensor in fn.inputs:
            if tensor._grad_hooks and tensor._ctx is None:
                pending[id(tensor)] = pending.get(id(tensor), 0) + 1
    return pending


def _count_down_hooked_leaves(fn: Function, pending: dict[int, int]) -> None:
    """``fn`` has run (or been skipped): its edges into hooked leaves are done; fire the finished ones."""
    for tensor in fn.inputs:
        key = id(tensor)
        if key in pending:
            pending[key] -= 1
            if pending[key] == 0:
                del pending[key]
                _run_grad_hooks(tensor)


def _run_grad_hooks(tensor: Tensor) -> None:
    for hook in tensor._grad_hooks or ():
        hook(tensor)


class IndexedGradient:
    """A gradient that is zero except where ``x[index]`` read ``x``: what GetItem's backward gives.

    It stays a list of (index, values) parts until it is used, so the gradients
    of several reads of one array, like attention's ``q, k, v = qkv[0], qkv[1],
    qkv[2]``, fill one zeroed buffer when their sum is needed, instead of each
    read making a full-size array of zeros and the engine adding them up (on a
    CPU step of a 6-layer model: three 9 MB zero arrays and two 9 MB sums per
    layer, one zeroed array now). Basic indices only (ints, slices): each reads
    an element at most once, so a part is written with ``+=`` on its region.
    """

    __slots__ = ("shape", "parts", "axes")

    def __init__(self, shape: tuple[int, ...], index, values, axes: tuple[int, ...] | None = None) -> None:
        self.shape, self.parts, self.axes = tuple(shape), [(index, values)], axes

    def dense(self):
        """The gradient as one array: zeros, plus every part on its region (parts may overlap).

        With ``axes`` (the order of the read array's axes in memory, when it was a
        transposed view) the buffer is laid out like that array, so the backward of
        the transpose that made it gives a contiguous gradient (no copy for a reshape).
        """
        first_index, first_values = self.parts[0]
        xp = backend.array_module(first_values)
        whole = self._covers_first_axis()      # q, k, v = qkv[0], qkv[1], qkv[2]: no zeros needed
        allocate = xp.empty if whole else xp.zeros
        if self.axes is None:
            out = allocate(self.shape, dtype=first_values.dtype)
        else:
            out = allocate(tuple(self.shape[a] for a in self.axes), dtype=first_values.dtype)
            out = out.transpose(inverse_permutation(self.axes))
        if whole and xp is np and out.size >= (1 << 18) and first_values.ndim:
            from .ops.common import CPU_THREADS, run_parallel  # noqa: PLC0415 (ops import this module)

            def copy(thread):                  # each thread its share of every part's first axis
                for index, values in self.parts:
                    rows = values.shape[0] if values.ndim else 1
                    part = slice(rows * thread // CPU_THREADS, rows * (thread + 1) // CPU_THREADS)
                    out[index][part] = values[part]

            run_parallel(copy, list(range(CPU_THREADS)))
            return out
        out[first_index] = first_values
        for index, values in self.parts[1:]:
            if whole:                          # disjoint parts: each region is written once
                out[index] = values
            else:
                out[index] += values
        return out

    def _covers_first_axis(self) -> bool:
        """Whether the parts are integer reads ``x[i]`` of every i along the first axis, each once."""
        if not self.shape:
            return False
        n, seen = self.shape[0], set()
        for index, _ in self.parts:
            if isinstance(index, tuple) and len(index) == 1:
                index = index[0]
            if not is_integer(index) or not -n <= index < n:
                return False
            seen.add(int(index) % n)
        return len(seen) == len(self.parts) == n


def inverse_permutation(axes: Sequence[int]) -> tuple[int, ...]:
    """The axes that undo ``transpose(axes)``: ``p`` with ``p[axes[i]] = i`` (``np.argsort(axes)``
    without making an array: this runs in the backward of every transpose).

    >>> inverse_permutation((2, 0, 1))
    (1, 2, 0)
    """
    return tuple(sorted(range(len(axes)), key=axes.__getitem__))


def _add_gradients(previous, g):
    """previous + g for two gradients of one node (IndexedGradient parts are only collected)."""
    if isinstance(previous, IndexedGradient) and isinstance(g, IndexedGradient):
        previous.parts.extend(g.parts)
        return previous
    return _dense(previous) + _dense(g)


def _dense(g):
    return g.dense() if isinstance(g, IndexedGradient) else g


def _run_backward(root: Function, grad, retain_graph: bool) -> None:
    order = _topological_order(root)
    pending = _hooked_leaf_edges(order)       # usually empty: then the walk below is unchanged
    grads: dict[Function, Any] = {root: grad}  # gradient w.r.t. each function's output, summed so far
    for fn in order:
        grad_out = grads.pop(fn, None)
        if grad_out is None:  # no gradient reached this node
            if pending:
                _count_down_hooked_leaves(fn, pending)
            continue
        grad_out = _dense(grad_out)
        grad_ins = fn.backward(grad_out)
        if not isinstance(grad_ins, tuple):
            grad_ins = (grad_ins,)
        inputs = fn.inputs
        if len(grad_ins) != len(inputs):
            raise RuntimeError(f"{fn.name}.backward returned {len(grad_ins)} gradients for {len(inputs)} inputs")
        for tensor, g in zip(inputs, grad_ins):
            if g is None or not tensor.requires_grad:
                continue
            if isinstance(g, np.generic):
                g = np.asarray(g)
            if g.shape != tensor.data.shape:
                raise RuntimeError(
                    f"{fn.name}.backward produced a gradient of shape {g.shape} "
                    f"for an input of shape {tensor.shape}"
                )
            parent = tensor._ctx
            if parent is None:
                _accumulate_leaf(tensor, _dense(g), grad_out)
            else:
                previous = grads.get(parent)
                grads[parent] = g if previous is None else _add_gradients(previous, g)
        if pending:
            _count_down_hooked_leaves(fn, pending)
        if not retain_graph:
            fn.saved = ()
            fn.inputs = ()
            fn.freed = True


def _accumulate_leaf(tensor: Tensor, g, grad_out) -> None:
    if tensor.grad is None:
        # own the array: backward may hand the same array (or a view of it) to several inputs
        owned = g is not grad_out and getattr(g, "base", None) is None
        tensor.grad = g if owned else g.copy()
    else:
        tensor.grad += g


# functional is imported last: it imports the ops, which import this module.
from . import functional as F  # noqa: E402
