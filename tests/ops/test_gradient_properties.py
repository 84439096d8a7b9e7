"""Every differentiable op of the public API, property-tested on shapes and memory layouts
that Hypothesis draws.

For each op (``CASES``, one entry per public name: ``test_every_public_op_has_a_case``
keeps the table complete) a drawn example is run three ways:

* its backward against float64 central differences (``mm.gradcheck``: random
  directions, element by element, and the full Jacobian for small examples);
* against the same function composed from primitive ops, where the API has one
  (``*_composed``, or an obvious composition such as mean = sum / n), values and
  gradients;
* with every input in a drawn memory layout (Fortran order, a transposed or
  strided or reversed leaf, or a non-contiguous view made by a transpose or a
  slicing op inside the graph), and the incoming gradient too (the output read
  through a transpose, or the zero-stride ones of out.sum()'s backward), against the all-contiguous run: the
  same values and gradients. (This is how cross_entropy's CPU backward was found to return an
  unwritten buffer for non-contiguous (B, T, C) logits.)

Shapes include size-1 and size-0 axes and 0-d tensors where the op allows them,
broadcasting in both directions, negative axes and keepdims. Kinks (relu, abs,
clip, max, maximum) are kept away from, where central differences mean nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import minillm as mm
from minillm import functional as F
from minillm.ops.embedding import dropout_keep_mask

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)


# ------------------------------------------------------------------ what one example is


@dataclass
class Case:
    fn: Callable                            # tensors -> Tensor, the op under test
    arrays: list                            # float64 values of its tensor inputs
    composed: Callable | None = None        # the same function from primitives, if any
    grad_of: tuple | None = None            # indices of the inputs that require grad (default: all)

    def __post_init__(self):
        self.arrays = [np.array(a, dtype=np.float64, order="C") for a in self.arrays]   # 0-d stays 0-d


def _rng(data) -> np.random.Generator:
    return np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))


def _shape(data, min_dims=0, max_dims=3, min_side=0, max_side=3):
    return data.draw(hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=min_side, max_side=max_side),
                     label="shape")


def _axis_pattern(data, ndim):
    """None, one axis (negative allowed) or a tuple of distinct axes (negatives mixed in)."""
    if ndim == 0:
        return data.draw(st.sampled_from([None, ()]), label="axis")
    one = st.integers(-ndim, ndim - 1)
    several = st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim, unique=True).flatmap(
        lambda axes: st.tuples(*[st.sampled_from([a, a - ndim]) for a in axes]))
    return data.draw(st.none() | one | several, label="axis")


def _apart(values, minimum=0.05):
    """Values moved at least ``minimum`` away from 0 (kinks at 0: abs, relu)."""
    return np.where(np.abs(values) < minimum, np.sign(values + 1e-300) * minimum + values, values)


def _distinct(values):
    """All values distinct by at least ~1e-3 (max has a kink at ties)."""
    flat = values.reshape(-1)
    order = np.argsort(flat, kind="stable")
    out = np.empty_like(flat)
    out[order] = np.sort(flat) + 1e-2 * np.arange(flat.size)
    return out.reshape(values.shape)


# ------------------------------------------------------------------ the cases, one per public op


def binary(op, kind="any"):
    def build(data):
        shapes = data.draw(hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=3, min_side=0,
                                                             max_side=3), label="shapes").input_shapes
        rng = _rng(data)
        a, b = rng.standard_normal(shapes[0]), rng.standard_normal(shapes[1])
        if kind == "div":
            b = _apart(b, 0.5)
        elif kind == "pow":
            a = rng.uniform(0.5, 2.0, shapes[0])
        elif kind == "ties":                      # maximum / minimum: no ties (|a - b| >= 0.025)
            a, b = np.round(a, 1) + 0.025, np.round(b, 1)
        return Case(op, [a, b])
    return build


def where_case(data):
    shapes = data.draw(hnp.mutually_broadcastable_shapes(num_shapes=3, min_dims=0, max_dims=3, min_side=0,
                                                         max_side=3), label="shapes").input_shapes
    rng = _rng(data)
    condition = rng.random(shapes[2]) < 0.5
    a, b = rng.standard_normal(shapes[0]), rng.standard_normal(shapes[1])
    return Case(lambda x, y: mm.where(condition, x, y), [a, b],
                composed=lambda x, y: x * condition.astype(np.float64) + y * (~condition).astype(np.float64))


def unary(op, domain="any", composed=None):
    def build(data):
        shape = _shape(data)
        rng = _rng(data)
        x = rng.standard_normal(shape) * 2
        if domain == "positive":
            x = rng.uniform(0.3, 3.0, shape)
        elif domain == "kink0":
            x = _apart(x)
        return Case(op, [x], composed=composed)
    return build


def clip_case(data):
    shape = _shape(data)
    rng = _rng(data)
    low, high = data.draw(st.sampled_from([(-0.5, 0.7), (None, 0.3), (-0.2, None)]), label="bounds")
    x = rng.standard_normal(shape)
    for bound in (low, high):
        if bound is not None:
            x = np.where(np.abs(x - bound) < 0.05, bound + 0.1, x)

    def composed(a):
        a = a if low is None else mm.maximum(a, low)
        return a if high is None else mm.minimum(a, high)
    return Case(lambda a: a.clip(low, high), [x], composed=composed)


def pow_scalar_case(data):
    shape = _shape(data)
    exponent = data.draw(st.sampled_from([2, 3, 0.5, -1, 1, 1.7, 0, -2.5, 2.0]), label="exponent")
    x = _rng(data).uniform(0.4, 2.5, shape)
    return Case(lambda a: a ** exponent, [x], composed=lambda a: (a.log() * float(exponent)).exp())


def scalar_left_case(data):
    shape = _shape(data)
    x = _rng(data).uniform(0.4, 2.5, shape)
    which = data.draw(st.sampled_from(["radd", "rsub", "rmul", "rdiv", "rpow", "array_left"]), label="operator")
    ops = {
        "radd": (lambda a: 1.5 + a, lambda a: a + 1.5),
        "rsub": (lambda a: 1.5 - a, lambda a: -a + 1.5),
        "rmul": (lambda a: 1.5 * a, lambda a: a * 1.5),
        "rdiv": (lambda a: 1.5 / a, lambda a: a ** -1 * 1.5),
        "rpow": (lambda a: 1.5 ** a, lambda a: (a * float(np.log(1.5))).exp()),
        "array_left": (lambda a: np.full(shape, 2.0) * a - np.ones(shape), lambda a: a * 2.0 - 1.0),
    }
    op, composed = ops[which]
    return Case(op, [x], composed=composed)


def reduction(name):
    def build(data):
        shape = _shape(data, min_side=1 if name in ("var", "mean") else 0)
        axis = _axis_pattern(data, len(shape))
        keepdims = data.draw(st.booleans(), label="keepdims")
        axes = range(len(shape)) if axis is None or not shape else ((axis,) if isinstance(axis, int) else axis)
        count = int(np.prod([shape[a] for a in axes]))
        if name == "max" and count == 0:             # nothing to take the maximum of (other axes may be 0)
            with pytest.raises(ValueError, match="max over an empty axis"):
                mm.Tensor(np.zeros(shape)).max(axis=axis, keepdims=keepdims)
            shape, axis, count = (2,), None, 2
        x = _rng(data).standard_normal(shape)
        if name == "max":
            x = _distinct(x)
        composed = {
            "sum": None,
            "mean": lambda a: a.sum(axis=axis, keepdims=keepdims) * (1.0 / count),
            "var": lambda a: ((a - a.mean(axis=axis, keepdims=True)) ** 2).mean(axis=axis, keepdims=keepdims),
            "max": None,
        }[name]
        return Case(lambda a: getattr(a, name)(axis=axis, keepdims=keepdims), [x], composed=composed)
    return build


def reshape_case(data):
    shape = _shape(data, max_dims=4)
    size = int(np.prod(shape))
    target = data.draw(st.sampled_from([(-1,), (size, 1), (1, -1, 1), tuple(reversed(shape)), shape]), label="target")
    method = data.draw(st.sampled_from(["reshape", "view", "flatten", "F"]), label="method")
    ops = {"reshape": lambda a: a.reshape(*target), "view": lambda a: a.view(target),
           "flatten": lambda a: a.flatten(), "F": lambda a: F.reshape(a, target)}
    return Case(ops[method], [_rng(data).standard_normal(shape)])


def transpose_case(data):
    shape = _shape(data, min_dims=1, max_dims=4)
    ndim = len(shape)
    perm = data.draw(st.permutations(range(ndim)), label="perm")
    perm = tuple(p - ndim if i % 2 else p for i, p in enumerate(perm))      # some negative
    pair = data.draw(st.tuples(st.integers(-ndim, ndim - 1), st.integers(-ndim, ndim - 1)), label="pair")
    method = data.draw(st.sampled_from(["permute", "transpose_all", "T", "pair", "F"]), label="method")
    ops = {"permute": lambda a: a.permute(*perm), "transpose_all": lambda a: a.transpose(perm),
           "T": lambda a: a.T, "F": lambda a: F.permute(a, *perm),
           "pair": (lambda a: a.transpose(*pair)) if ndim > 2 else (lambda a: a.T)}
    return Case(ops[method], [_rng(data).standard_normal(shape)])


def _basic_index(data, shape):
    """Per axis: an int (negative allowed), a slice (any start, stop, step incl. negative), all, or a
    new axis before it; optionally the leading axes left to an Ellipsis."""
    per_axis = []
    for n in shape:
        kind = data.draw(st.sampled_from(["slice", "int", "all", "newaxis"]), label="index kind")
        if kind == "int":
            per_axis.append((data.draw(st.integers(-n, n - 1), label="int"),))
        elif kind == "slice":
            start = data.draw(st.none() | st.integers(-n - 1, n + 1), label="start")
            stop = data.draw(st.none() | st.integers(-n - 1, n + 1), label="stop")
            step = data.draw(st.sampled_from([None, 1, 2, -1, -2]), label="step")
            per_axis.append((slice(start, stop, step),))
        elif kind == "newaxis":
            per_axis.append((None, slice(None)))
        else:
            per_axis.append((slice(None),))
    if data.draw(st.booleans(), label="ellipsis"):
        keep = data.draw(st.integers(0, len(shape)), label="axes after the ellipsis")
        per_axis = [(Ellipsis,)] + per_axis[len(shape) - keep:]
    return tuple(part for parts in per_axis for part in parts)


def getitem_case(data):
    shape = _shape(data, min_dims=1, min_side=1)
    x = _rng(data).standard_normal(shape)
    kind = data.draw(st.sampled_from(["basic", "int_array", "bool_mask", "F"]), label="kind")
    if kind in ("basic", "F"):
        index = _basic_index(data, shape)
        op = (lambda a: a[index]) if kind == "basic" else (lambda a: F.getitem(a, index))
        return Case(op, [x])
    if kind == "int_array":                      # repeats and negative ids: gradients accumulate
        ids = np.asarray(data.draw(st.lists(st.integers(-shape[0], shape[0] - 1), min_size=0, max_size=6),
                                   label="ids"), dtype=np.int64)
        return Case(lambda a: a[ids], [x])
    mask = _rng(data).random(shape) < 0.5
    return Case(lambda a: a[mask], [x])


def concat_case(data):
    shape = _shape(data, min_dims=1, min_side=1)
    ndim = len(shape)
    axis = data.draw(st.integers(-ndim, ndim - 1), label="axis")
    sizes = data.draw(st.lists(st.integers(0, 3), min_size=1, max_size=3), label="sizes")
    rng = _rng(data)
    arrays = []
    for n in sizes:
        s = list(shape)
        s[axis] = n
        arrays.append(rng.standard_normal(s))
    return Case(lambda *xs: mm.concat(list(xs), axis=axis), arrays)


def stack_case(data):
    shape = _shape(data)
    ndim = len(shape)
    axis = data.draw(st.integers(-ndim - 1, ndim), label="axis")
    count = data.draw(st.integers(1, 3), label="count")
    rng = _rng(data)
    return Case(lambda *xs: mm.stack(list(xs), axis=axis), [rng.standard_normal(shape) for _ in range(count)],
                composed=lambda *xs: mm.concat([x.unsqueeze(axis) for x in xs], axis=axis))


def split_case(data):
    shape = _shape(data, min_dims=1, min_side=1, max_side=4)
    ndim = len(shape)
    axis = data.draw(st.integers(-ndim, ndim - 1), label="axis")
    n = shape[axis]
    sections = data.draw(st.sampled_from([d for d in range(1, n + 1) if n % d == 0]) |
                         st.lists(st.integers(0, n), max_size=3).map(sorted), label="sections")
    weights = [float(i + 1) for i in range(8)]

    def op(a):                                   # every piece used, with different weights
        pieces = mm.split(a, sections, axis=axis)
        return mm.concat([p * w for p, w in zip(pieces, weights)], axis=axis)
    return Case(op, [_rng(data).standard_normal(shape)])


def expand_case(data):
    shape = _shape(data, max_dims=2, min_side=1)
    shape = tuple(data.draw(st.sampled_from([1, n]), label="size-1") for n in shape)
    lead = data.draw(st.lists(st.integers(0, 2), max_size=2), label="lead")
    target = tuple(lead) + tuple(data.draw(st.sampled_from([-1, 3]), label="to") if n == 1 else
                                 data.draw(st.sampled_from([-1, n]), label="keep") for n in shape)
    resolved = tuple(s if n == -1 else n for n, s in zip(target, (1,) * len(lead) + shape))
    zeros = np.zeros(resolved)
    return Case(lambda a: a.expand(*target), [_rng(data).standard_normal(shape)],
                composed=lambda a: a + zeros)


def squeeze_case(data):
    shape = _shape(data, max_dims=4)
    ndim = len(shape)
    ones = [i for i, n in enumerate(shape) if n == 1]
    which = data.draw(st.sampled_from(["all", "one", "unsqueeze"] if ones else ["all", "unsqueeze"]), label="which")
    if which == "all":
        op = (lambda a: a.squeeze()) if data.draw(st.booleans()) else (lambda a: F.squeeze(a))
    elif which == "one":
        axis = data.draw(st.sampled_from(ones), label="axis")
        axis = axis - ndim if data.draw(st.booleans(), label="negative") else axis
        op = lambda a: a.squeeze(axis)  # noqa: E731
    else:
        axis = data.draw(st.integers(-ndim - 1, ndim), label="axis")
        op = (lambda a: a.unsqueeze(axis)) if data.draw(st.booleans()) else (lambda a: F.unsqueeze(a, axis))
    return Case(op, [_rng(data).standard_normal(shape)])


def matmul_case(data):
    m, k, n = (data.draw(st.integers(0 if i == 0 else 1, 3), label="mkn") for i in range(3))
    batch_a = tuple(data.draw(st.lists(st.sampled_from([1, 2]), max_size=2), label="batch a"))
    batch_b = tuple(data.draw(st.lists(st.sampled_from([1, 2]), max_size=2), label="batch b"))
    shape_a = batch_a + (m, k) if batch_a or data.draw(st.booleans()) else (k,)
    shape_b = batch_b + (k, n) if batch_b or data.draw(st.booleans()) else (k,)
    try:
        np.matmul(np.ones(shape_a), np.ones(shape_b))
    except ValueError:
        shape_a, shape_b = (m, k), (k, n)
    rng = _rng(data)
    method = data.draw(st.sampled_from(["@", "F", "rmatmul"]), label="method")
    if method == "rmatmul":                          # a plain array on the left: Tensor.__rmatmul__
        left = rng.standard_normal(shape_a)
        return Case(lambda b: left @ b, [rng.standard_normal(shape_b)])
    op = (lambda a, b: a @ b) if method == "@" else F.matmul
    composed = None
    if len(shape_a) == 2 and len(shape_b) == 2:      # (m, k) @ (k, n) = Σ_k a[:, k, None] * b[None, k, :]
        composed = lambda a, b: (a.unsqueeze(-1) * b.unsqueeze(0)).sum(axis=1)  # noqa: E731
    return Case(op, [rng.standard_normal(shape_a), rng.standard_normal(shape_b)], composed=composed)


def linear_case(data):
    lead = tuple(data.draw(st.lists(st.integers(0, 3), max_size=2), label="lead"))
    n_in, n_out = data.draw(st.integers(0, 4), label="in"), data.draw(st.integers(0, 4), label="out")
    bias = data.draw(st.booleans(), label="bias")
    rng = _rng(data)
    arrays = [rng.standard_normal(lead + (n_in,)), rng.standard_normal((n_out, n_in))]
    if bias:
        arrays.append(rng.standard_normal(n_out))
    grad_of = data.draw(st.sampled_from([None, (0,), (1,), (1, 2) if bias else (1,)]), label="grad of")
    composed = (lambda x, w, *b: x @ w.T + b[0] if b else x @ w.T)
    return Case(lambda x, w, *b: F.linear(x, w, b[0] if b else None), arrays, composed=composed, grad_of=grad_of)


def activation(name):
    fused, composed = {
        "relu": (F.relu, lambda a: mm.maximum(a, 0.0)),
        "sigmoid": (F.sigmoid, lambda a: 1.0 / (1.0 + (-a).exp())),
        "silu": (F.silu, lambda a: a / (1.0 + (-a).exp())),
        "gelu_tanh": (lambda a: F.gelu(a, approximate="tanh"), lambda a: F.gelu_composed(a, "tanh")),
        "gelu_none": (lambda a: F.gelu(a, approximate="none"), lambda a: F.gelu_composed(a, "none")),
        "relu_method": (lambda a: a.relu(), lambda a: mm.maximum(a, 0.0)),
        "sigmoid_method": (lambda a: a.sigmoid(), lambda a: 1.0 / (1.0 + (-a).exp())),
    }[name]
    return unary(fused, "kink0" if "relu" in name else "any", composed=composed)


def softmax_case(log: bool, method: bool = False):
    def build(data):
        shape = _shape(data, min_dims=1, max_dims=3, min_side=1, max_side=4)
        axis = data.draw(st.integers(-len(shape), len(shape) - 1), label="axis")
        x = _rng(data).standard_normal(shape) * data.draw(st.sampled_from([0.3, 3.0]), label="scale")
        if method:
            op = (lambda a: a.log_softmax(axis)) if log else (lambda a: a.softmax(axis))
        else:
            op = (lambda a: F.log_softmax(a, axis=axis)) if log else (lambda a: F.softmax(a, axis=axis))
        composed = (lambda a: F.log_softmax_composed(a, axis)) if log else (lambda a: F.softmax_composed(a, axis))
        return Case(op, [x], composed=composed)
    return build


def cross_entropy_case(data):
    lead = tuple(data.draw(st.lists(st.integers(1, 3), max_size=2), label="lead"))
    classes = data.draw(st.integers(1, 5), label="classes")
    rng = _rng(data)
    logits = rng.standard_normal(lead + (classes,)) * data.draw(st.sampled_from([0.5, 4.0]), label="scale")
    targets = np.asarray(rng.integers(0, classes, lead))
    ignore_index = data.draw(st.sampled_from([-100, 0]), label="ignore") if classes > 1 else -100
    if data.draw(st.booleans(), label="some ignored"):
        targets = np.where(rng.random(lead) < 0.3, ignore_index, targets)
    if (targets == ignore_index).all():                          # keep one target that counts
        targets.flat[0] = 1 if ignore_index == 0 else 0
    reduction = data.draw(st.sampled_from(["mean", "sum", "none"]), label="reduction")
    kw = dict(ignore_index=ignore_index, reduction=reduction)
    return Case(lambda z: F.cross_entropy(z, targets, **kw), [logits],
                composed=lambda z: F.cross_entropy_composed(z, targets, **kw))


def norm_case(kind):
    def build(data):
        shape = _shape(data, min_dims=1, max_dims=3, min_side=1, max_side=4)
        if data.draw(st.booleans(), label="no rows"):
            shape = (0,) + shape[1:] if len(shape) > 1 else (0, shape[0])
        rng = _rng(data)
        x = rng.standard_normal(shape) * data.draw(st.sampled_from([0.5, 3.0]), label="scale") + 1.0
        w, b = rng.standard_normal(shape[-1]), rng.standard_normal(shape[-1])
        eps = data.draw(st.sampled_from([1e-5, 1e-2]), label="eps")
        if kind == "layer_norm":
            return Case(lambda x_, w_, b_: F.layer_norm(x_, w_, b_, eps=eps), [x, w, b],
                        composed=lambda x_, w_, b_: F.layer_norm_composed(x_, w_, b_, eps=eps))
        if kind == "layer_norm_no_bias":
            return Case(lambda x_, w_: F.layer_norm(x_, w_, eps=eps), [x, w],
                        composed=lambda x_, w_: F.layer_norm_composed(x_, w_, eps=eps))
        return Case(lambda x_, w_: F.rms_norm(x_, w_, eps=eps), [x, w],
                    composed=lambda x_, w_: F.rms_norm_composed(x_, w_, eps=eps))
    return build


def attention_case(data):
    lead = tuple(data.draw(st.lists(st.integers(0, 2), max_size=1), label="batch"))
    hkv = data.draw(st.integers(1, 2), label="kv heads")
    group = data.draw(st.sampled_from([1, 1, 2]), label="group")
    tk = data.draw(st.integers(1, 4), label="tk")
    tq = tk - data.draw(st.integers(0, tk), label="tk - tq")       # the queries are the last tq positions
    d, dv = data.draw(st.integers(1, 3), label="d"), data.draw(st.integers(1, 3), label="dv")
    causal = data.draw(st.booleans(), label="causal")
    p = data.draw(st.sampled_from([0.0, 0.0, 0.3]), label="dropout")
    scale = data.draw(st.sampled_from([None, 0.7]), label="scale")
    rng = _rng(data)
    q = rng.standard_normal(lead + (hkv * group, tq, d))
    k, v = rng.standard_normal(lead + (hkv, tk, d)), rng.standard_normal(lead + (hkv, tk, dv))

    def seeded(fn):
        def run(q_, k_, v_):
            mm.manual_seed(11)                    # the same dropout mask on every call
            return fn(q_, k_, v_, causal=causal, dropout_p=p, scale=scale)
        return run
    return Case(seeded(F.scaled_dot_product_attention), [q, k, v],
                composed=seeded(F.scaled_dot_product_attention_composed))


def embedding_case(data):
    vocab, dim = data.draw(st.integers(1, 4), label="vocab"), data.draw(st.integers(1, 3), label="dim")
    ids_shape = _shape(data, max_dims=2, max_side=4)
    rng = _rng(data)
    ids = rng.integers(0, vocab, ids_shape)
    as_tensor = data.draw(st.booleans(), label="ids as tensor")
    ids_in = mm.Tensor(ids) if as_tensor else ids
    one_hot = np.eye(vocab)[ids]                                    # (*S, V): embedding = one_hot @ W
    return Case(lambda w: F.embedding(ids_in, w), [rng.standard_normal((vocab, dim))],
                composed=lambda w: mm.Tensor(one_hot) @ w)


def dropout_case(data):
    shape = _shape(data)
    p = data.draw(st.sampled_from([0.2, 0.5, 0.9]), label="p")

    def op(a):
        mm.manual_seed(5)
        return F.dropout(a, p)

    def composed(a):
        mm.manual_seed(5)
        return a * dropout_keep_mask(a.shape, p, "cpu").astype(np.float64) * (1.0 / (1.0 - p))
    return Case(op, [_rng(data).standard_normal(shape)], composed=composed)


def rope_case(data):
    lead = tuple(data.draw(st.lists(st.integers(1, 2), max_size=2), label="lead"))
    rows, half = data.draw(st.integers(1, 4), label="rows"), data.draw(st.integers(1, 3), label="half")
    rng = _rng(data)
    positions = rng.integers(0, 50, data.draw(st.sampled_from([(rows,), (1, rows)]), label="positions shape"))
    if len(lead) == 0:
        positions = positions.reshape(rows)
    theta = data.draw(st.sampled_from([10000.0, 100.0]), label="theta")
    return Case(lambda x: F.rope(x, positions, theta), [rng.standard_normal(lead + (rows, 2 * half))],
                composed=lambda x: F.rope_composed(x, positions, theta))


def swiglu_case(data):
    shape = _shape(data, min_dims=1, max_dims=3)
    shape = shape[:-1] + (2 * max(shape[-1], 1),)
    return Case(F.swiglu, [_rng(data).standard_normal(shape) * 2], composed=F.swiglu_composed)


CASES = {
    # elementwise, binary (broadcasting both ways, size-0 and 0-d shapes)
    "add": binary(F.add), "sub": binary(F.sub), "mul": binary(F.mul), "div": binary(F.div, "div"),
    "operators": binary(lambda a, b: (a + b) * a - b / (1.5 + b * b)),
    "maximum": binary(F.maximum, "ties"), "minimum": binary(F.minimum, "ties"),
    "pow": binary(F.pow, "pow"), "where": where_case,
    "scalar_on_the_left": scalar_left_case, "pow_scalar": pow_scalar_case,
    # elementwise, unary
    "neg": unary(F.neg, composed=lambda a: a * -1.0), "exp": unary(F.exp),
    "log": unary(F.log, "positive"), "tanh": unary(F.tanh, composed=lambda a: 1.0 - 2.0 / ((2.0 * a).exp() + 1.0)),
    "sqrt": unary(F.sqrt, "positive", composed=lambda a: a ** 0.5),
    "abs": unary(F.abs, "kink0", composed=lambda a: mm.maximum(a, -a)), "clip": clip_case,
    "methods": unary(lambda a: a.exp() + a.tanh() - abs(a) + (a * a + 1.0).sqrt().log()),
    # reductions
    "sum": reduction("sum"), "mean": reduction("mean"), "max": reduction("max"), "var": reduction("var"),
    # shape
    "reshape": reshape_case, "transpose": transpose_case, "getitem": getitem_case, "concat": concat_case,
    "stack": stack_case, "split": split_case, "expand": expand_case, "squeeze": squeeze_case,
    # products
    "matmul": matmul_case, "linear": linear_case,
    # activations and fused ops
    "relu": activation("relu"), "sigmoid": activation("sigmoid"), "silu": activation("silu"),
    "gelu_tanh": activation("gelu_tanh"), "gelu_none": activation("gelu_none"),
    "relu_method": activation("relu_method"), "sigmoid_method": activation("sigmoid_method"),
    "softmax": softmax_case(False), "log_softmax": softmax_case(True),
    "softmax_method": softmax_case(False, method=True), "log_softmax_method": softmax_case(True, method=True),
    "cross_entropy": cross_entropy_case,
    "layer_norm": norm_case("layer_norm"), "layer_norm_no_bias": norm_case("layer_norm_no_bias"),
    "rms_norm": norm_case("rms_norm"),
    "scaled_dot_product_attention": attention_case, "embedding": embedding_case, "dropout": dropout_case,
    "rope": rope_case, "swiglu": swiglu_case,
}

# each public name of F (and each Tensor method that runs an op) -> the case above that checks it
COVERAGE = {
    "abs": "abs", "add": "add", "clip": "clip", "div": "div", "exp": "exp", "log": "log", "maximum": "maximum",
    "minimum": "minimum", "mul": "mul", "neg": "neg", "pow": "pow", "sqrt": "sqrt", "sub": "sub", "tanh": "tanh",
    "where": "where", "max": "max", "mean": "mean", "sum": "sum", "var": "var", "concat": "concat",
    "expand": "expand", "getitem": "getitem", "permute": "transpose", "reshape": "reshape", "split": "split",
    "squeeze": "squeeze", "stack": "stack", "transpose": "transpose", "unsqueeze": "squeeze", "linear": "linear",
    "matmul": "matmul", "gelu": "gelu_tanh", "gelu_composed": "gelu_none", "log_softmax": "log_softmax",
    "log_softmax_composed": "log_softmax", "relu": "relu", "sigmoid": "sigmoid", "silu": "silu",
    "softmax": "softmax", "softmax_composed": "softmax", "cross_entropy": "cross_entropy",
    "cross_entropy_composed": "cross_entropy", "layer_norm": "layer_norm", "layer_norm_composed": "layer_norm",
    "rms_norm": "rms_norm", "rms_norm_composed": "rms_norm",
    "scaled_dot_product_attention": "scaled_dot_product_attention",
    "scaled_dot_product_attention_composed": "scaled_dot_product_attention", "dropout": "dropout",
    "embedding": "embedding", "rope": "rope", "rope_composed": "rope", "swiglu": "swiglu",
    "swiglu_composed": "swiglu",
}
TENSOR_METHODS = {
    "__add__": "operators", "__radd__": "scalar_on_the_left", "__sub__": "operators",
    "__rsub__": "scalar_on_the_left", "__mul__": "operators", "__rmul__": "scalar_on_the_left",
    "__truediv__": "operators", "__rtruediv__": "scalar_on_the_left", "__neg__": "neg",
    "__pow__": "pow_scalar", "__rpow__": "scalar_on_the_left", "__matmul__": "matmul", "__rmatmul__": "matmul",
    "__getitem__": "getitem", "__abs__": "methods", "exp": "methods", "log": "methods", "tanh": "methods",
    "sqrt": "methods", "abs": "abs", "relu": "relu_method", "sigmoid": "sigmoid_method", "clip": "clip",
    "sum": "sum", "mean": "mean", "max": "max", "var": "var", "reshape": "reshape", "view": "reshape",
    "transpose": "transpose", "permute": "transpose", "squeeze": "squeeze", "unsqueeze": "squeeze",
    "expand": "expand", "flatten": "reshape", "softmax": "softmax_method", "log_softmax": "log_softmax_method",
    "T": "transpose",
}


def test_every_public_op_has_a_case():
    """A new op in F (or a new Tensor method calling one) must get a case here."""
    public = {name for name in dir(F) if not name.startswith("_") and callable(getattr(F, name))}
    assert public == set(COVERAGE), f"add cases for {sorted(public - set(COVERAGE))}"
    assert set(COVERAGE.values()) <= set(CASES)
    methods = {name for name, value in vars(mm.Tensor).items()
               if (callable(value) or isinstance(value, property)) and "F." in _source(value)}
    assert methods == set(TENSOR_METHODS), f"add cases for {sorted(methods ^ set(TENSOR_METHODS))}"
    assert set(TENSOR_METHODS.values()) <= set(CASES)


def _source(value) -> str:
    import inspect
    try:
        return inspect.getsource(value.fget if isinstance(value, property) else value)
    except (OSError, TypeError):
        return ""


# ------------------------------------------------------------------ layouts


LAYOUTS = ("c", "fortran", "transposed", "strided", "reversed", "op_transposed", "op_strided")


def _strided_index(ndim):
    """Every other element along every axis (and a 0-d view, not a scalar, for 0-d arrays)."""
    return tuple(slice(1, None, 2) for _ in range(ndim)) + (Ellipsis,)


def make_input(values, layout, rng):
    """(leaf, view): a float64 leaf that requires grad, and the function that turns it into an
    input holding ``values`` in the given layout. The op_* layouts make the non-contiguous
    input with an op of the graph (a transpose, or a strided slice of a larger leaf, whose
    other elements must get a zero gradient)."""
    if layout == "op_transposed":
        return mm.Tensor(values.T.copy(), requires_grad=True), (lambda x: x.T)
    if layout == "op_strided":
        big = rng.standard_normal(tuple(2 * n + 1 for n in values.shape))
        index = _strided_index(values.ndim)
        big[index] = values
        return mm.Tensor(big, requires_grad=True), (lambda x: x[index])
    if values.ndim == 0:
        data = values.copy()                        # one element: every layout is the same
    elif layout == "fortran":
        data = np.asfortranarray(values)
    elif layout == "transposed":
        data = np.ascontiguousarray(values.T).T
    elif layout == "strided":                       # NaN between the elements: a read off them shows
        big = np.full(tuple(2 * n + 1 for n in values.shape), np.nan)
        big[_strided_index(values.ndim)] = values
        data = big[_strided_index(values.ndim)]
    elif layout == "reversed":
        data = np.flip(np.flip(values).copy())      # negative strides on every axis
    else:
        data = values.copy()
    assert data.shape == values.shape and np.array_equal(data, values, equal_nan=True)
    return mm.Tensor(data, requires_grad=True), (lambda x: x)


def _run(fn, tensors, cotangent_seed=0, grad_layout="c"):
    """Output values and the gradient of <v, fn(...)> for every tensor (v random, seeded; all
    ones for grad_layout "ones" and "broadcast").

    ``grad_layout`` "transposed": the output goes through a transpose before the backward, so
    that the op's backward receives v as an F-ordered view (the same numbers); "broadcast": the
    backward of ``out.sum()``, so that it receives ones as a read-only view with zero strides."""
    for t in tensors:
        t.grad = None
    out = fn(*tensors)
    v = np.random.default_rng(cotangent_seed).standard_normal(out.shape)
    if grad_layout in ("ones", "broadcast"):
        v = np.ones(out.shape)
    if out.requires_grad:
        if grad_layout == "transposed" and out.ndim >= 2:
            out.T.backward(v.T.copy())                       # out's backward gets (v.T).T: F-ordered
        elif grad_layout == "broadcast":
            out.sum().backward()                             # Sum's backward: broadcast_to(1, shape)
        else:
            out.backward(v)
    return out.numpy(), [None if not t.requires_grad else np.zeros(t.shape) if t.grad is None else np.array(t.grad)
                         for t in tensors]


def _close(a, b, what, rtol=1e-9, atol=1e-11):
    if a is None or b is None:                   # an input that does not require grad
        assert a is None and b is None, what
        return
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=what)


@pytest.mark.parametrize("name", sorted(CASES))
@SETTINGS
@given(data=st.data())
def test_backward_gradcheck_composed_and_layouts(name, data):
    case = CASES[name](data)
    grad_of = range(len(case.arrays)) if case.grad_of is None else case.grad_of
    layouts = [data.draw(st.sampled_from(LAYOUTS), label=f"layout {i}") for i in range(len(case.arrays))]
    grad_layout = data.draw(st.sampled_from(["c", "transposed", "broadcast"]), label="incoming gradient layout")
    rng = np.random.default_rng(0)

    # 1. the contiguous run: central differences
    plain = [mm.Tensor(a, requires_grad=i in grad_of) for i, a in enumerate(case.arrays)]
    out = case.fn(*plain)
    if out.requires_grad and any(t.requires_grad for t in plain):
        mm.gradcheck(case.fn, *plain)
    expected_out, expected_grads = _run(case.fn, plain)

    # 2. the composition from primitives: same values, same gradients
    if case.composed is not None:
        composed_out, composed_grads = _run(case.composed, plain)
        _close(composed_out, expected_out, f"{name}: composed value")
        for i, (g, c) in enumerate(zip(expected_grads, composed_grads)):
            _close(g, c, f"{name}: gradient of input {i} against the composed version")

    # 3. inputs in the drawn layouts (leaves or views made in the graph): the same function
    made = [make_input(a, layout, rng) for a, layout in zip(case.arrays, layouts)]
    leaves = [leaf.requires_grad_(i in grad_of) for i, (leaf, _) in enumerate(made)]
    views = [view for _, view in made]

    def through_layouts(*xs):
        return case.fn(*[view(x) for view, x in zip(views, xs)])

    got_out, got_grads = _run(through_layouts, leaves, grad_layout=grad_layout)
    layouts.append(f"incoming gradient {grad_layout}")
    if grad_layout == "broadcast":                  # the reference for a cotangent of ones
        expected_out, expected_grads = _run(case.fn, plain, grad_layout="ones")
    _close(got_out, expected_out, f"{name}: value with layouts {layouts}", rtol=1e-12, atol=1e-14)
    for i, ((leaf, view), layout) in enumerate(zip(made, layouts)):
        if i not in grad_of:
            continue
        grad = got_grads[i]
        if layout == "op_transposed":
            grad = grad.T
        elif layout == "op_strided":
            index = _strided_index(case.arrays[i].ndim)
            rest = grad.copy()
            rest[index] = 0
            assert not rest.any(), f"{name}: elements the slice never read got a gradient"
            grad = grad[index]
        _close(grad, expected_grads[i], f"{name}: gradient of input {i} with layouts {layouts}",
               rtol=1e-12, atol=1e-13)


# ------------------------------------------------------------------ integer and boolean inputs


def _float_only_calls():
    """Every op whose math needs floats, as a call on an integer/boolean tensor ``a`` of shape (2, 4)."""
    w = mm.Tensor(np.ones(4), requires_grad=True)
    return {
        "gelu": lambda a: F.gelu(a), "gelu_none": lambda a: F.gelu(a, approximate="none"),
        "sigmoid": F.sigmoid, "silu": F.silu, "softmax": F.softmax, "log_softmax": F.log_softmax,
        "cross_entropy": lambda a: F.cross_entropy(a, np.array([0, 1])),
        "layer_norm": lambda a: F.layer_norm(a, w, w), "rms_norm": lambda a: F.rms_norm(a, w),
        "attention": lambda a: F.scaled_dot_product_attention(a, a, a),
        "dropout": lambda a: F.dropout(a, 0.3), "rope": lambda a: F.rope(a, np.arange(2)), "swiglu": F.swiglu,
    }


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8, np.bool_])
@pytest.mark.parametrize("name", sorted(_float_only_calls()))
def test_float_only_ops_reject_integer_and_boolean_tensors(name, dtype):
    """Before: rope and dropout on integers returned silently truncated values (dropout's 1/(1 - p)
    became int 1), attention and swiglu/sigmoid/silu on booleans failed inside NumPy."""
    a = mm.Tensor(np.arange(8).reshape(2, 4).astype(dtype))
    with pytest.raises(TypeError, match=r"needs floating-point tensors, got dtype"):
        _float_only_calls()[name](a)


@pytest.mark.parametrize("dtype", [np.int64, np.bool_])
def test_integer_tensors_cannot_require_grad(dtype):
    with pytest.raises(TypeError, match="floating-point"):
        mm.Tensor(np.ones(3, dtype=dtype), requires_grad=True)
    with pytest.raises(TypeError, match="floating-point"):
        mm.Tensor(np.ones(3, dtype=dtype)).requires_grad_()


MIXED = {                                   # an integer/boolean constant tensor c meeting a float tensor x
    "add": lambda c, x: c + x, "sub": lambda c, x: x - c, "mul": lambda c, x: c * x,
    "div": lambda c, x: x / (c + x * x + 1), "maximum": lambda c, x: mm.maximum(c, x * 3),
    "where": lambda c, x: mm.where(np.array([True, False, True, True]), c, x), "pow": lambda c, x: (x * x + 1) ** c,
    "matmul_left": lambda c, x: c.reshape(2, 2) @ x.reshape(2, 2),
    "matmul_right": lambda c, x: x.reshape(2, 2) @ c.reshape(2, 2),
    "linear": lambda c, x: F.linear(c.reshape(2, 2), x.reshape(2, 2)),
    "concat": lambda c, x: mm.concat([c, x, c]) * x.sum(),
}


@pytest.mark.parametrize("dtype", [np.int64, np.bool_])
@pytest.mark.parametrize("name", sorted(MIXED))
@pytest.mark.parametrize("float_dtype", [np.float32, np.float64])
def test_integer_tensor_meeting_a_float_one_is_a_constant_of_its_dtype(name, dtype, float_dtype):
    """Before: int64 * float32 promoted to float64 (a float64 gradient for a float32 parameter),
    and matmul's backward cast the gradient to the integer operand's dtype (an int64 or bool
    gradient: truncated values)."""
    c_values = np.array([1, 0, 2, 3]).astype(dtype)
    x_values = np.array([0.3, -1.2, 0.7, 2.1])
    c = mm.Tensor(c_values)
    x = mm.Tensor(x_values.astype(float_dtype), requires_grad=True)
    out = MIXED[name](c, x)
    assert out.dtype == float_dtype
    out.backward(np.full(out.shape, 0.5))
    assert x.grad.dtype == float_dtype
    c_float = mm.Tensor(c_values.astype(np.float64))
    x64 = mm.Tensor(x_values, requires_grad=True)
    expected = MIXED[name](c_float, x64)
    expected.backward(np.full(out.shape, 0.5))
    tol = dict(rtol=1e-6, atol=1e-6) if float_dtype == np.float32 else dict(rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(out.numpy(), expected.numpy(), **tol)
    np.testing.assert_allclose(x.grad, x64.grad, **tol)
    if float_dtype == np.float64:
        mm.gradcheck(lambda x_: MIXED[name](c, x_), mm.Tensor(x_values, requires_grad=True))


# ------------------------------------------------------------------ one tensor used several times


REUSED = {          # f(x) using x in several inputs of one op, or along several paths
    "add": lambda x: x + x, "mul": lambda x: x * x, "div": lambda x: x / (x * x + 1.0),
    "pow": lambda x: (x * x + 0.5) ** (x * 0.3), "maximum_tie": lambda x: mm.maximum(x, x) * x,
    "where": lambda x: mm.where(x.data > 0, x, x * x),
    "matmul": lambda x: x @ x, "matmul_T": lambda x: x @ x.T,
    "linear": lambda x: F.linear(x, x, x[0]), "concat": lambda x: mm.concat([x, x.T, x], axis=-1),
    "stack": lambda x: mm.stack([x, x * 2.0, x]), "split_rejoin": lambda x: mm.split(x, 3, axis=1)[0] * x[:, 1:2],
    "getitem_overlap": lambda x: x[0:2] * x[1:3] + x[np.array([2, 0])] + x[np.array([[1], [1]])],
    "layer_norm": lambda x: F.layer_norm(x, x[0], x[1]) + F.layer_norm(x.T, x[2], x[0]).T,
    "rms_norm": lambda x: F.rms_norm(x, x[1]) * x,
    "attention": lambda x: F.scaled_dot_product_attention(x[None], x[None], x[None]),
    "attention_qk": lambda x: F.scaled_dot_product_attention(x[None], x[None], x[None] * 2.0, causal=False),
    "softmax_log_softmax": lambda x: F.softmax(x, axis=0) * F.log_softmax(x) + F.gelu(x) * F.silu(x),
    "cross_entropy_both": lambda x: F.cross_entropy(x, np.array([0, 2, 1])) * F.cross_entropy(x.T, np.array([1, 1, 0])),
    "swiglu": lambda x: F.swiglu(mm.concat([x, x], axis=-1)),
    "rope": lambda x: F.rope(mm.concat([x, x * x], axis=-1), np.arange(3)) * mm.concat([x, x], axis=-1),
    "reductions": lambda x: x.sum(axis=0) * x.mean(axis=-1) + x.max(axis=1) * x.var(axis=0),
    "chain": lambda x: (x.exp() * x).tanh() + x.sigmoid() * x.abs() - x.clip(-0.5, 0.5),
}


@pytest.mark.parametrize("name", sorted(REUSED))
def test_a_tensor_used_several_times_gets_the_sum_of_its_gradients(name):
    """gradcheck, and the same function with each use its own leaf (equal values): the reused
    tensor's gradient must be the sum of theirs (the engine's accumulation, dense and
    IndexedGradient parts alike, across the fused ops that take one tensor twice)."""
    fn = REUSED[name]
    x_values = np.array([[0.3, -1.2, 0.7], [2.1, -0.4, 1.3], [-0.9, 0.55, -1.6]])   # no kink hit
    mm.gradcheck(fn, mm.Tensor(x_values, requires_grad=True))
    x = mm.Tensor(x_values, requires_grad=True)
    out = fn(x)
    v = np.random.default_rng(1).standard_normal(out.shape)
    out.backward(v)
    copies = []
    import minillm.tensor as tensor_module
    real_as_tensors = tensor_module._as_tensors

    def split_uses(inputs, op_name):                 # each use of x (each op input) a new leaf
        tensors, device = real_as_tensors(inputs, op_name)
        fresh = []
        for t_ in tensors:
            if t_ is shared:
                t_ = mm.Tensor(x_values, requires_grad=True)
                copies.append(t_)
            fresh.append(t_)
        return tuple(fresh), device

    shared = mm.Tensor(x_values, requires_grad=True)
    tensor_module._as_tensors = split_uses
    try:
        out2 = fn(shared)
    finally:
        tensor_module._as_tensors = real_as_tensors
    assert len(copies) >= 2, "x should be used at least twice"
    out2.backward(v)
    np.testing.assert_allclose(out2.numpy(), out.numpy(), rtol=1e-14)
    summed = sum(c.grad if c.grad is not None else 0 for c in copies)
    np.testing.assert_allclose(x.grad, summed, rtol=1e-12, atol=1e-13)


# ------------------------------------------------------------------ no double backward


def test_there_is_no_double_backward_and_asking_for_one_is_an_error():
    """Gradients are plain arrays, outside any graph: there is nothing to differentiate twice,
    and PyTorch's create_graph is refused rather than silently ignored. A second backward through
    a freed graph raises (tests/test_tensor.py); with retain_graph it accumulates the same numbers."""
    x = mm.Tensor(np.array([0.5, -1.0, 2.0]), requires_grad=True)
    y = (x * x * x).sum()
    with pytest.raises(TypeError, match="create_graph"):
        y.backward(create_graph=True)
    y.backward(retain_graph=True)
    assert type(x.grad) is np.ndarray and not isinstance(x.grad, mm.Tensor)
    np.testing.assert_allclose(x.grad, 3 * x.data ** 2)
    y.backward()
    np.testing.assert_allclose(x.grad, 6 * x.data ** 2)           # accumulated, not d²y/dx²
    with pytest.raises(RuntimeError, match="already freed"):
        y.backward()
    g = mm.Tensor(x.grad)                                          # a gradient made a tensor is a constant
    assert not g.requires_grad and g._ctx is None


def test_cast_and_detach_gradients():
    """x.to(dtype) (and float(), double()) passes the gradient back cast to x's dtype; detach cuts it."""
    x = mm.Tensor(np.array([0.25, -1.5, 3.0]), requires_grad=True)
    y = x.float() * mm.Tensor(np.array([1.0, 2.0, 3.0], np.float32))
    assert y.dtype == np.float32
    (y.double().sum() + (x.detach() * x).sum()).backward()
    assert x.grad.dtype == np.float64
    np.testing.assert_allclose(x.grad, [1.0 + 0.25, 2.0 - 1.5, 3.0 + 3.0])
    assert x.to(dtype=np.float64) is x                             # same dtype: no op


# ------------------------------------------------------------------ one op applied twice


TWICE = {                      # f: (…, 4) -> (…, 4), so that f(f(x)) is defined
    "gelu": F.gelu, "gelu_none": lambda a: F.gelu(a, approximate="none"), "silu": F.silu, "sigmoid": F.sigmoid,
    "softmax": F.softmax, "log_softmax": F.log_softmax, "tanh": F.tanh, "exp": lambda a: F.exp(a * 0.3),
    "layer_norm": lambda a: F.layer_norm(a, mm.Tensor(np.linspace(0.5, 2, 4)), mm.Tensor(np.linspace(-1, 1, 4))),
    "rms_norm": lambda a: F.rms_norm(a, mm.Tensor(np.linspace(0.5, 2, 4))),
    "attention": lambda a: F.scaled_dot_product_attention(a, a * 0.5, a),
    "rope": lambda a: F.rope(a, np.arange(3)), "swiglu": lambda a: F.swiglu(mm.concat([a, a * 0.7], axis=-1)),
    "linear": lambda a: F.linear(a, mm.Tensor(np.eye(4) * 0.9 + 0.1), mm.Tensor(np.full(4, 0.2))),
    "var": lambda a: a - a.var(axis=-1, keepdims=True), "max": lambda a: a * a.max(axis=-1, keepdims=True),
    "transpose": lambda a: a.transpose(1, 0, 2)[:, ::-1], "dropout": lambda a: F.dropout(a, 0.3),
}


@pytest.mark.parametrize("name", sorted(TWICE))
def test_an_op_applied_twice_and_two_calls_backpropagated_in_either_order(name):
    """f(f(x)) against central differences; and two calls f(x1), f(x2) whose backward passes run
    in the reverse order (graphs retained, run twice): each call keeps its own saved state (no
    buffer, cache or scratch shared between calls that a later call or backward overwrites)."""
    f = TWICE[name]
    rng = np.random.default_rng(5)
    x_values = [rng.standard_normal((2, 3, 4)) + 0.1 * k for k in range(2)]
    mm.manual_seed(2)
    if name != "dropout":
        mm.gradcheck(lambda a: f(f(a)), mm.Tensor(x_values[0], requires_grad=True))
    expected = []
    for values in x_values:                                 # each call alone
        x = mm.Tensor(values, requires_grad=True)
        mm.manual_seed(2)
        f(f(x)).backward(np.ones((2, 3, 4)))
        expected.append(x.grad)
    xs = [mm.Tensor(values, requires_grad=True) for values in x_values]
    outs = []
    for x in xs:                                            # both graphs alive at once
        mm.manual_seed(2)
        outs.append(f(f(x)))
    for _ in range(2):
        for out in reversed(outs):
            out.backward(np.ones((2, 3, 4)), retain_graph=True)
    for x, grad in zip(xs, expected):
        np.testing.assert_allclose(x.grad, 2 * grad, rtol=1e-12, atol=1e-14)
