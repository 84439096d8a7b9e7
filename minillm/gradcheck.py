"""Numerical gradient checking: the hand-written backward against central differences.

For ``y = fn(*inputs)`` pick a random cotangent ``v`` (same shape as ``y``) and
look at the scalar ``L(x) = <v, fn(x)>``. Backprop gives ``dL/dx_i = J_iᵀ v``
for every input at once. Central differences give the same numbers:

    dL/dx · d  ≈  (L(x + εd) − L(x − εd)) / 2ε        error O(ε²)

``gradcheck`` compares the two (in float64) along random directions ``d`` for
every input, and, for small inputs, element by element (d = each unit vector),
which checks the whole vector ``J_iᵀ v``. For small functions it also builds
the full Jacobian both ways (one backward per output element). On mismatch it
raises ``GradcheckError`` saying which input, how large the error is and where.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from . import backend
from .tensor import Tensor, no_grad


class GradcheckError(AssertionError):
    """Raised by ``gradcheck`` with a readable report of the mismatch."""


def _scalar_objective(fn, inputs, cotangent) -> float:
    with no_grad():
        out = fn(*inputs)
    return float((backend.to_numpy(out.data).astype(np.float64) * cotangent).sum())


def _analytic(fn, inputs, cotangent):
    for t in inputs:
        t.grad = None
    out = fn(*inputs)
    if not isinstance(out, Tensor):
        raise TypeError("gradcheck: fn must return a Tensor")
    if not out.requires_grad:
        raise GradcheckError("gradcheck: the output does not depend on any input that requires grad")
    xp = backend.array_module(out.data)
    out.backward(xp.asarray(cotangent, dtype=out.dtype))
    grads = []
    for t in inputs:
        g = t.grad
        grads.append(np.zeros(t.shape) if g is None else backend.to_numpy(g).astype(np.float64))
        t.grad = None
    return out, grads


def _report(which: int, shape, what: str, analytic, numeric, where=None) -> str:
    error = np.abs(np.asarray(analytic) - np.asarray(numeric))
    scale = np.maximum(np.abs(np.asarray(numeric)), 1e-12)
    lines = [
        f"gradcheck failed for input {which} (shape {tuple(shape)}), {what}:",
        f"  max abs error {error.max():.3e}, max rel error {(error / scale).max():.3e}",
    ]
    if where is not None:
        lines.append(f"  worst at index {where}: analytic {np.asarray(analytic)[where]:.6g} "
                     f"vs numeric {np.asarray(numeric)[where]:.6g}")
    else:
        lines.append(f"  analytic {np.asarray(analytic).ravel()[:4]} vs numeric {np.asarray(numeric).ravel()[:4]}")
    return "\n".join(lines)


def gradcheck(
    fn: Callable[..., Tensor],
    *inputs: Tensor,
    eps: float = 1e-6,
    atol: float = 1e-5,
    rtol: float = 1e-3,
    n_directions: int = 3,
    elementwise_max: int = 512,
    jacobian_max: int = 4096,
    seed: int = 0,
) -> bool:
    """Check ``fn``'s backward against float64 central differences; True or ``GradcheckError``.

    Inputs are float64 Tensors; those with ``requires_grad`` are checked.
    ``fn`` must be deterministic (re-seed inside it if it draws random numbers): two calls
    giving different outputs raise ``GradcheckError``, and so does an input that fn or its
    backward changed in place (an op writing into a saved input would corrupt the next step).
    An input with at most ``elementwise_max`` elements is checked element by
    element; the full Jacobian is built when outputs × inputs ≤ ``jacobian_max``.
    """
    checked = [i for i, t in enumerate(inputs) if isinstance(t, Tensor) and t.requires_grad]
    if not checked:
        raise ValueError("gradcheck: no input requires grad")
    for i in checked:
        if inputs[i].dtype != np.float64:
            raise TypeError(f"gradcheck: input {i} is {inputs[i].dtype}; use float64 for central differences")
    rng = np.random.default_rng(seed)
    with no_grad():
        first, again = fn(*inputs), fn(*inputs)
    if not isinstance(first, Tensor):
        raise TypeError("gradcheck: fn must return a Tensor")
    out_shape = first.shape
    if not np.allclose(backend.to_numpy(first.data), backend.to_numpy(again.data), rtol=1e-10, atol=1e-12,
                       equal_nan=True):
        raise GradcheckError("gradcheck: fn gave different outputs for the same inputs, so differences of "
                             "its outputs mean nothing; if it draws random numbers (dropout), re-seed "
                             "inside it (mm.manual_seed(0))")
    before = [backend.to_numpy(t.data).copy() if isinstance(t, Tensor) else None for t in inputs]
    cotangent = rng.standard_normal(out_shape)
    _, grads = _analytic(fn, inputs, cotangent)
    for i, (t, values) in enumerate(zip(inputs, before)):
        if values is not None and not np.array_equal(backend.to_numpy(t.data), values, equal_nan=True):
            raise GradcheckError(f"gradcheck: input {i} (shape {tuple(t.shape)}) was changed in place by fn "
                                 f"or by its backward pass")

    def perturbed(i: int, direction: np.ndarray) -> float:
        """Central difference of <v, fn> at input i along ``direction``."""
        t = inputs[i]
        original = t.data
        xp = backend.array_module(original)
        step = xp.asarray(eps * direction, dtype=original.dtype)
        try:
            t.data = original + step
            plus = _scalar_objective(fn, inputs, cotangent)
            t.data = original - step
            minus = _scalar_objective(fn, inputs, cotangent)
        finally:
            t.data = original
        return (plus - minus) / (2 * eps)

    def close(a, n) -> np.ndarray:
        return np.abs(a - n) <= atol + rtol * np.abs(n)

    for i in checked:
        t, grad = inputs[i], grads[i]
        for k in range(n_directions):
            direction = rng.standard_normal(t.shape)
            numeric = perturbed(i, direction)
            analytic = float((grad * direction).sum())
            if not close(np.array(analytic), np.array(numeric)).all():
                raise GradcheckError(_report(i, t.shape, f"random direction {k}", analytic, numeric))
        if 0 < t.size <= elementwise_max:
            numeric = np.zeros(t.shape)
            for index in np.ndindex(*t.shape):
                unit = np.zeros(t.shape)
                unit[index] = 1.0
                numeric[index] = perturbed(i, unit)
            ok = close(grad, numeric)
            if not ok.all():
                worst = np.unravel_index(np.argmax(np.abs(grad - numeric) - rtol * np.abs(numeric)), t.shape)
                raise GradcheckError(_report(i, t.shape, "element by element", grad, numeric, tuple(int(w) for w in worst)))

    out_size = int(np.prod(out_shape))
    for i in checked:
        t = inputs[i]
        if 0 < out_size * t.size <= jacobian_max and out_size > 1:
            _check_full_jacobian(fn, inputs, i, out_shape, eps, atol, rtol)
    return True


def _check_full_jacobian(fn, inputs, i, out_shape, eps, atol, rtol) -> None:
    """J[o, j] = d out[o] / d x_i[j], by backprop (one row per output) and by differences."""
    t = inputs[i]
    out_size, in_size = int(np.prod(out_shape)), t.size
    analytic = np.zeros((out_size, in_size))
    for o in range(out_size):
        one_hot = np.zeros(out_size)
        one_hot[o] = 1.0
        _, grads = _analytic(fn, inputs, one_hot.reshape(out_shape))
        analytic[o] = grads[i].ravel()
    numeric = np.zeros((out_size, in_size))
    original = t.data
    xp = backend.array_module(original)
    try:
        for j in range(in_size):
            step = np.zeros(in_size)
            step[j] = eps
            step = xp.asarray(step.reshape(t.shape))
            with no_grad():
                t.data = original + step
                plus = backend.to_numpy(fn(*inputs).data).ravel()
                t.data = original - step
                minus = backend.to_numpy(fn(*inputs).data).ravel()
            numeric[:, j] = (plus - minus) / (2 * eps)
    finally:
        t.data = original
    bad = np.abs(analytic - numeric) > atol + rtol * np.abs(numeric)
    if bad.any():
        o, j = np.unravel_index(np.argmax(np.abs(analytic - numeric)), analytic.shape)
        raise GradcheckError(
            _report(i, t.shape, f"full Jacobian (output element {o}, input element {j})",
                    analytic, numeric, (int(o), int(j)))
        )
