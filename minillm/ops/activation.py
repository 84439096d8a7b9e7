"""Activations: relu, gelu (tanh | exact), silu, sigmoid, softmax, log_softmax.

Each is one fused op with a hand-derived backward. ``gelu_composed``,
``softmax_composed`` and ``log_softmax_composed`` build the same functions from
primitive ops (exp, tanh, sum, max, ...) and have no backward of their own:
they are the readable definition, the fused ops are what runs, and the tests
check that the two agree, values and gradients.

Softmax and log-softmax subtract the row maximum first. softmax(x) =
softmax(x - c) for any constant c, and with c = max(x) every exponent is <= 0,
so nothing overflows even for logits of 1e4.

The exact GELU needs the error function, which NumPy lacks: ``erf_array`` /
``erfc_array`` below evaluate W. J. Cody's rational Chebyshev approximations
(Math. Comp. 23, 1969), accurate to float64 rounding.
"""

from __future__ import annotations

import math

from ..kernels import activation as kernels
from ..backend import array_module
from ..tensor import Function, Tensor
from .common import elementwise_in_threads

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)      # 0.7978845608...
INV_SQRT_2 = 1.0 / math.sqrt(2.0)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)  # the standard normal density at 0
TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)
GELU_CUBIC = 0.044715                          # the cubic coefficient of GELU's tanh form


# ================================================================ erf for arrays
#
# Cody's three rational approximations, each written as P(t) / Q(t) with the
# coefficients listed highest power first (Q is monic):
#
#   |x| <= 0.46875:      erf(x)  = x · P1(x²) / Q1(x²)
#   0.46875 < y <= 4:    erfc(y) = exp(-y²) · P2(y) / Q2(y)
#   y > 4:               erfc(y) = exp(-y²) / y · (1/√π - z · P3(z) / Q3(z)),  z = 1/y²
#
# exp(-y²) is evaluated as exp(-s²) · exp(-(y - s)(y + s)) with s = y rounded
# down to a multiple of 1/16, so that the rounding error of y² (large when y
# is large) does not reach the result.

_ERF_P = (1.85777706184603153e-1, 3.16112374387056560e0, 1.13864154151050156e2,
          3.77485237685302021e2, 3.20937758913846947e3)
_ERF_Q = (1.0, 2.36012909523441209e1, 2.44024637934444173e2, 1.28261652607737228e3,
          2.84423683343917062e3)
_ERFC_MID_P = (2.15311535474403846e-8, 5.64188496988670089e-1, 8.88314979438837594e0,
               6.61191906371416295e1, 2.98635138197400131e2, 8.81952221241769090e2,
               1.71204761263407058e3, 2.05107837782607147e3, 1.23033935479799725e3)
_ERFC_MID_Q = (1.0, 1.57449261107098347e1, 1.17693950891312499e2, 5.37181101862009858e2,
               1.62138957456669019e3, 3.29079923573345963e3, 4.36261909014324716e3,
               3.43936767414372164e3, 1.23033935480374942e3)
_ERFC_TAIL_P = (1.63153871373020978e-2, 3.05326634961232344e-1, 3.60344899949804439e-1,
                1.25781726111229246e-1, 1.60837851487422766e-2, 6.58749161529837803e-4)
_ERFC_TAIL_Q = (1.0, 2.56852019228982242e0, 1.87295284992346725e0, 5.27905102951428412e-1,
                6.05183413124413191e-2, 2.33520497626869185e-3)
_ERF_SMALL = 0.46875
_ERFC_MID_END = 4.0
_INV_SQRT_PI = 1.0 / math.sqrt(math.pi)


def _polynomial(coefficients, t):
    """c0·tⁿ + c1·tⁿ⁻¹ + ... + cn by Horner's rule (Python-float coefficients keep t's dtype)."""
    result = coefficients[0] * t
    for c in coefficients[1:-1]:
        result += c
        result *= t
    result += coefficients[-1]
    return result


def _exp_minus_square(y):
    """exp(-y²) without the rounding error of y² (see above)."""
    xp = array_module(y)
    s = xp.floor(y * 16.0) / 16.0
    return xp.exp(-s * s) * xp.exp(-(y - s) * (y + s))


def _erfc_of_abs(y):
    """erfc(y) for y >= 0.46875 (either of Cody's two erfc ranges), y an array."""
    xp = array_module(y)
    out = xp.empty_like(y)
    mid = y <= _ERFC_MID_END
    tail = ~mid                                # also takes NaN, which stays NaN
    y_mid = y[mid]
    out[mid] = _exp_minus_square(y_mid) * _polynomial(_ERFC_MID_P, y_mid) / _polynomial(_ERFC_MID_Q, y_mid)
    y_tail = xp.minimum(y[tail], 40.0)         # erfc(40) underflows even in float64; keeps inf finite
    z = 1.0 / (y_tail * y_tail)
    rational = z * _polynomial(_ERFC_TAIL_P, z) / _polynomial(_ERFC_TAIL_Q, z)
    out[tail] = _exp_minus_square(y_tail) * (_INV_SQRT_PI - rational) / y_tail
    return out


def _erf_small(x):
    """erf(x) for |x| <= 0.46875."""
    t = x * x
    return x * _polynomial(_ERF_P, t) / _polynomial(_ERF_Q, t)


def erf_array(x):
    """The error function erf(x) = (2/√π) ∫₀ˣ exp(-t²) dt of a float array, to its dtype's precision."""
    xp = array_module(x)
    out = xp.empty_like(x)
    small = xp.abs(x) <= _ERF_SMALL
    large = ~small
    out[small] = _erf_small(x[small])
    x_large = x[large]
    out[large] = xp.copysign(1.0 - _erfc_of_abs(xp.abs(x_large)), x_large)
    return out


def erfc_array(x):
    """erfc(x) = 1 - erf(x), accurate also where it is tiny (x large): relative error ~1e-16 in float64."""
    xp = array_module(x)
    out = xp.empty_like(x)
    small = xp.abs(x) <= _ERF_SMALL
    large = ~small
    out[small] = 1.0 - _erf_small(x[small])
    x_large = x[large]
    tail = _erfc_of_abs(xp.abs(x_large))
    out[large] = xp.where(x_large > 0, tail, 2.0 - tail)
    return out


def normal_cdf_array(x):
    """Φ(x) = P(N(0, 1) <= x) = erfc(-x/√2) / 2, accurate in both tails."""
    return 0.5 * erfc_array(x * -INV_SQRT_2)


# ================================================================ elementwise activations


class ReLU(Function):
    """y = max(x, 0).   dy/dx = 1 where x > 0, else 0 (0 at x = 0, like PyTorch)."""

    def forward(self, x):
        out = array_module(x).maximum(x, 0)
        self.save(out)
        return out

    def backward(self, grad):
        (out,) = self.saved
        return (grad * (out > 0),)


def _sigmoid_array(x):
    """σ(x) = 1 / (1 + e⁻ˣ), from e = exp(-|x|) <= 1, so no exp ever overflows:
    σ(x) = 1 / (1 + e) for x >= 0 and e / (1 + e) for x < 0 (accurate in both tails)."""
    xp = array_module(x)
    e = xp.exp(-xp.abs(x))
    one_over = 1.0 / (1.0 + e)
    return xp.where(x >= 0, one_over, e * one_over)


class Sigmoid(Function):
    """y = σ(x) = 1 / (1 + e⁻ˣ).   dy/dx = e⁻ˣ / (1 + e⁻ˣ)² = σ(x)(1 - σ(x)) = y(1 - y)."""

    float_only = True     # integer or boolean inputs: TypeError in the user's words

    def forward(self, x):
        out = _sigmoid_array(x)
        self.save(out)
        return out

    def backward(self, grad):
        (out,) = self.saved
        return (grad * out * (1.0 - out),)


class SiLU(Function):
    """y = x · σ(x) (also called swish).

    dy/dx = σ + x · σ(1 - σ) = σ · (1 + x(1 - σ)).   Saves x and σ(x).
    """

    float_only = True     # integer or boolean inputs: TypeError in the user's words

    def forward(self, x):
        s = _sigmoid_array(x)
        self.save(x, s)
        return x * s

    def backward(self, grad):
        x, s = self.saved
        d = 1.0 - s
        d *= x
        d += 1.0
        d *= s
        d *= grad
        return (d,)


class GELU(Function):
    """Gaussian error linear unit, y = x · Φ(x), Φ the standard normal CDF.

    Exact (``approximate="none"``):  Φ(x) = ½ (1 + erf(x/√2)),
        dy/dx = Φ(x) + x · φ(x),   φ(x) = exp(-x²/2) / √(2π)   (Φ' = φ).

    tanh form (``approximate="tanh"``, GPT-2's):
        y = ½ x (1 + t),   t = tanh(u),   u = k (x + c x³),   k = √(2/π), c = 0.044715
        dy/dx = ½ (1 + t) + ½ x · (1 - t²) · du/dx,   du/dx = k (1 + 3c x²)

    On the CPU the forward saves x and s = ½ (1 + t) (or Φ: s plays its part,
    y = x s), so the tanh form's backward needs no transcendental function at all
    (the exact form's, one exp for φ): with ds/du = ½ (1 - t²) = 2 s (1 - s),

        dy/dx = s + x · 2 s (1 - s) · du/dx = s · (1 + B (1 - s)),   B = 2 x du/dx,

    9 passes over memory (11 from t before). Measured in ``minillm bench train``'s
    step (medians of 4 alternating processes of 10 steps, load 1.0–1.6): GELU
    backward 34.8 -> 32.4 ms, forward 26.2 -> 27.1 ms (the same 8 passes, ordered
    differently), together 61.0 -> 59.5 ms.
    On a GPU one CUDA kernel computes y, and one computes dx from (grad, x),
    recomputing t: 2 launches, nothing extra saved. On the CPU, where a C++
    compiler is at hand (minillm/kernels/cpu.py), the same two kernel bodies run
    as compiled loops, one pass each way: those NumPy passes are what runs
    without one.
    """

    float_only = True

    def __init__(self, approximate: str = "tanh"):
        if approximate not in ("tanh", "none"):
            raise ValueError(f"gelu: approximate must be 'tanh' or 'none', got {approximate!r}")
        self.approximate = approximate

    def forward(self, x):
        if kernels.gelu_fusable(x, self.approximate):
            self.save(x, None)
            return kernels.gelu_forward(x, self.approximate)
        xp = array_module(x)
        t, out = xp.empty_like(x), xp.empty_like(x)
        elementwise_in_threads(_gelu_forward_into, (x, t, out), self.approximate)
        self.save(x, t)
        return out

    def backward(self, grad):
        x, t = self.saved
        if t is None:
            return (kernels.gelu_backward(grad, x, self.approximate),)
        d = array_module(x).empty_like(x)
        elementwise_in_threads(_gelu_backward_into, (x, t, grad, d), self.approximate)
        return (d,)


def _gelu_forward_into(x, t, out, approximate: str) -> None:
    """t, out <- s = ½ (1 + tanh(u)) (or Φ(x)) and y = GELU(x) = x s, written into the given arrays."""
    xp = array_module(x)
    if approximate == "tanh":
        xp.multiply(x, x, out=t)                     # x²
        t *= SQRT_2_OVER_PI * GELU_CUBIC
        t += SQRT_2_OVER_PI
        t *= x                                       # u = k x (1 + c x²)
        xp.tanh(t, out=t)                            # tanh(u)
        t *= 0.5
        t += 0.5                                     # s = ½ (1 + tanh(u))
        xp.multiply(x, t, out=out)                   # y = x s
    else:
        t[...] = normal_cdf_array(x)                 # Φ(x)
        xp.multiply(x, t, out=out)                   # y = x Φ(x)


def _gelu_backward_into(x, t, grad, d, approximate: str) -> None:
    """d <- dL/dx from x and the saved s (or Φ): no transcendental function in the tanh form."""
    xp = array_module(x)
    if approximate == "tanh":
        xp.multiply(x, x, out=d)
        d *= 6 * SQRT_2_OVER_PI * GELU_CUBIC
        d += 2 * SQRT_2_OVER_PI
        d *= x                                       # B = 2 x du/dx = 2 k x (1 + 3c x²)
        one_minus_s = xp.subtract(1.0, t)
        d *= one_minus_s
        d += 1.0
        d *= t                                       # s (1 + B (1 - s))
    else:
        xp.multiply(x, x, out=d)
        d *= -0.5
        xp.exp(d, out=d)
        d *= INV_SQRT_2PI                            # φ(x)
        d *= x
        d += t                                       # Φ + x φ
    d *= grad


class Erf(Function):
    """y = erf(x).   dy/dx = (2/√π) exp(-x²).   A primitive, for ``gelu_composed``."""

    float_only = True

    def forward(self, x):
        self.save(x)
        return erf_array(x)

    def backward(self, grad):
        (x,) = self.saved
        xp = array_module(x)
        d = xp.asarray(x * x)                 # an array also for a 0-d x (NumPy's x * x is a scalar)
        d *= -1.0
        xp.exp(d, out=d)
        d *= TWO_OVER_SQRT_PI
        d *= grad
        return (d,)


# ================================================================ softmax / log-softmax


def _check_axis(axis, ndim: int, op: str) -> int:
    if not isinstance(axis, int) or isinstance(axis, bool):
        raise TypeError(f"{op}: axis must be an int, got {axis!r}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{op}: axis {axis} is out of range for a tensor with {ndim} dimensions")
    return axis % ndim


class Softmax(Function):
    """y_i = exp(x_i - m) / Σ_j exp(x_j - m) along ``axis``, m = max_j x_j (for stability).

    Jacobian: dy_i/dx_j = y_i (δ_ij - y_j), so for an upstream gradient g
        dx_j = Σ_i g_i y_i (δ_ij - y_j) = y_j (g_j - Σ_i g_i y_i)
    (shape of x throughout; the sum is over ``axis`` with keepdims). Saves y.
    """

    float_only = True

    def __init__(self, axis: int = -1, log: bool = False):
        self.axis, self.log = axis, log

    def forward(self, x):
        axis = _check_axis(self.axis, x.ndim, "softmax")
        if x.shape[axis] == 0:
            out = x.copy()
        elif axis == x.ndim - 1 and kernels.fusable(x):
            out = kernels.softmax_forward(x, log=self.log)
        else:
            out = _softmax_array(x, axis, self.log)
        self.save(out)
        return out

    def backward(self, grad):
        (out,) = self.saved
        axis = self.axis % out.ndim
        if out.shape[axis] == 0:
            return (grad.copy(),)
        if axis == out.ndim - 1 and kernels.fusable(out):
            return (kernels.softmax_backward(grad, out, log=self.log),)
        if self.log:
            return (_log_softmax_backward_array(grad, out, axis),)
        g_dot_y = (grad * out).sum(axis=axis, keepdims=True)
        dx = grad - g_dot_y
        dx *= out
        return (dx,)


def _softmax_array(x, axis: int, log: bool):
    """softmax (or log-softmax) along ``axis`` with one new full-size array."""
    xp = array_module(x)
    row_max = x.max(axis=axis, keepdims=True)
    out = xp.subtract(x, row_max)                   # x - m <= 0
    if log:
        sum_exp = xp.exp(out).sum(axis=axis, keepdims=True)
        out -= xp.log(sum_exp)                      # (x - m) - log Σ exp(x - m)
    else:
        xp.exp(out, out=out)
        out /= out.sum(axis=axis, keepdims=True)
    return out


def _log_softmax_backward_array(grad, out, axis: int):
    """y = log softmax(x):  dy_i/dx_j = δ_ij - softmax_j,  so  dx_j = g_j - softmax_j Σ_i g_i."""
    xp = array_module(out)
    dx = xp.exp(out)                                # softmax, recovered from the saved output
    dx *= grad.sum(axis=axis, keepdims=True)
    xp.subtract(grad, dx, out=dx)
    return dx


# ================================================================ public functions


def relu(x: Tensor) -> Tensor:
    """max(x, 0) elementwise."""
    return ReLU.apply(x)


def sigmoid(x: Tensor) -> Tensor:
    """1 / (1 + exp(-x)), evaluated without overflow for any x."""
    return Sigmoid.apply(x)


def silu(x: Tensor) -> Tensor:
    """x · sigmoid(x)."""
    return SiLU.apply(x)


def gelu(x: Tensor, approximate: str = "tanh") -> Tensor:
    """x · Φ(x); ``approximate="tanh"`` (GPT-2's) uses ½x(1 + tanh(√(2/π)(x + 0.044715x³)))."""
    return GELU.apply(x, approximate=approximate)


def erf(x: Tensor) -> Tensor:
    """The error function, elementwise (a primitive op with its own backward)."""
    return Erf.apply(x)


def softmax(x: Tensor, axis: int = -1) -> Tensor:
    """exp(x) / Σ exp(x) along ``axis``, computed as exp(x - max) / Σ exp(x - max)."""
    return Softmax.apply(x, axis=axis, log=False)


def log_softmax(x: Tensor, axis: int = -1) -> Tensor:
    """x - log Σ exp(x) along ``axis``, computed as (x - max) - log Σ exp(x - max)."""
    return Softmax.apply(x, axis=axis, log=True)


# ================================================================ composed from primitives
#
# The same functions written with primitive ops only. Autograd differentiates
# them through the graph it records; they have no backward of their own.


def gelu_composed(x: Tensor, approximate: str = "tanh") -> Tensor:
    """GELU from primitives: ½ x (1 + tanh(√(2/π)(x + 0.044715 x³))), or ½ x (1 + erf(x/√2))."""
    if approximate == "tanh":
        inner = SQRT_2_OVER_PI * (x + GELU_CUBIC * (x * x * x))
        return 0.5 * x * (1.0 + inner.tanh())
    if approximate == "none":
        return 0.5 * x * (1.0 + erf(x * INV_SQRT_2))
    raise ValueError(f"gelu: approximate must be 'tanh' or 'none', got {approximate!r}")


def softmax_composed(x: Tensor, axis: int = -1) -> Tensor:
    """exp(x - m) / Σ exp(x - m). The shift m = max(x) is a constant (detached): softmax is
    unchanged by it, so no gradient needs to flow through the max."""
    shifted = x - x.max(axis=axis, keepdims=True).detach()
    e = shifted.exp()
    return e / e.sum(axis=axis, keepdims=True)


def log_softmax_composed(x: Tensor, axis: int = -1) -> Tensor:
    """(x - m) - log Σ exp(x - m), m = max(x) detached (log-softmax is shift invariant too)."""
    shifted = x - x.max(axis=axis, keepdims=True).detach()
    return shifted - shifted.exp().sum(axis=axis, keepdims=True).log()
