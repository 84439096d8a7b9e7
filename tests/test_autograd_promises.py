"""docs/autograd.md's promises about the engine, each checked against a hand-worked
number, a NumPy formula or the engine's own bookkeeping (the § is the doc's section).

Promises already covered elsewhere: tests/test_tensor.py (accumulation, 100k-op chains,
freed graphs, retain_graph, no_grad, dtype rules, hooks), tests/test_gradcheck.py and
tests/ops/ (every op's forward against NumPy and backward against gradcheck).
"""

import inspect
import re

import numpy as np
import pytest

import minillm as mm
from minillm import functional as F
from minillm.tensor import Function

RNG = np.random.default_rng(0)
COND = np.array([[True, False, True], [False, True, True]])


def _ids(shape):
    return np.arange(int(np.prod(shape))).reshape(shape) % 3


def _attention_with_dropout(q, k, v):
    mm.manual_seed(3)
    return F.scaled_dot_product_attention(q, k, v, causal=True, dropout_p=0.3)


def _dropout(x):
    mm.manual_seed(3)
    return F.dropout(x, 0.5)


# name -> (function of tensors, the input shapes, whether inputs must be positive)
OPS = {
    "add": (F.add, [(2, 3), (3,)], False),
    "sub": (F.sub, [(2, 3), (2, 1)], False),
    "mul": (F.mul, [(2, 3), (3,)], False),
    "div": (F.div, [(2, 3), (2, 3)], True),
    "neg": (F.neg, [(2, 3)], False),
    "pow_constant": (lambda a: a ** 3, [(2, 3)], False),
    "pow_tensors": (F.pow, [(2, 3), (3,)], True),
    "exp": (F.exp, [(2, 3)], False),
    "log": (F.log, [(2, 3)], True),
    "tanh": (F.tanh, [(2, 3)], False),
    "sqrt": (F.sqrt, [(2, 3)], True),
    "abs": (F.abs, [(2, 3)], False),
    "maximum": (F.maximum, [(2, 3), (2, 3)], False),
    "minimum": (F.minimum, [(2, 3), (3,)], False),
    "where": (lambda a, b: mm.where(COND, a, b), [(2, 3), (2, 3)], False),
    "clip": (lambda a: a.clip(-0.5, 0.5), [(2, 3)], False),
    "sum": (lambda a: a.sum(axis=0), [(2, 3)], False),
    "mean": (lambda a: a.mean(axis=1), [(2, 3)], False),
    "max": (lambda a: a.max(axis=1), [(2, 3)], False),
    "var": (lambda a: a.var(axis=1, keepdims=True), [(2, 3)], False),
    "sum_all": (lambda a: a.sum(), [(2, 3)], False),
    "reshape": (lambda a: a.reshape(3, 2), [(2, 3)], False),
    "transpose": (lambda a: a.T, [(2, 3)], False),
    "getitem": (lambda a: a[:, 1:], [(2, 3)], False),
    "getitem_repeated": (lambda a: a[np.array([0, 0, 1])], [(2, 3)], False),
    "concat": (lambda a, b: mm.concat([a, b, a], axis=0), [(2, 3), (1, 3)], False),
    "stack": (lambda a, b: mm.stack([a, b], axis=1), [(2, 3), (2, 3)], False),
    "split": (lambda a: mm.split(a, [1], axis=1)[1], [(2, 3)], False),
    "expand": (lambda a: a.expand(4, 2, 3), [(2, 1)], False),
    "matmul": (F.matmul, [(2, 2, 3), (3, 4)], False),
    "linear": (F.linear, [(2, 3), (4, 3), (4,)], False),
    "relu": (F.relu, [(2, 3)], False),
    "sigmoid": (F.sigmoid, [(2, 3)], False),
    "silu": (F.silu, [(2, 3)], False),
    "gelu_tanh": (lambda a: F.gelu(a, approximate="tanh"), [(2, 3)], False),
    "gelu_exact": (lambda a: F.gelu(a, approximate="none"), [(2, 3)], False),
    "softmax": (F.softmax, [(2, 3)], False),
    "log_softmax": (lambda a: F.log_softmax(a, axis=0), [(2, 3)], False),
    "layer_norm": (F.layer_norm, [(2, 3), (3,), (3,)], False),
    "rms_norm": (F.rms_norm, [(2, 3), (3,)], False),
    "cross_entropy_none": (lambda z: F.cross_entropy(z, np.array([0, 2]), reduction="none"), [(2, 3)], False),
    "cross_entropy_mean": (lambda z: F.cross_entropy(z, np.array([[1, -100], [2, 0]])), [(2, 2, 3)], False),
    "attention": (F.scaled_dot_product_attention, [(1, 2, 3, 4)] * 3, False),
    "attention_dropout": (_attention_with_dropout, [(2, 3, 4)] * 3, False),
    "embedding": (lambda w: F.embedding(_ids((2, 3)), w), [(4, 3)], False),
    "dropout": (_dropout, [(2, 3)], False),
    "rope": (lambda x: F.rope(x, np.arange(3)), [(2, 3, 4)], False),
    "swiglu": (F.swiglu, [(2, 4)], False),
}


def make_inputs(name, dtype):
    _, shapes, positive = OPS[name]
    arrays = [RNG.uniform(0.5, 2.0, s) if positive else RNG.standard_normal(s) for s in shapes]
    return [mm.Tensor(a.astype(dtype), requires_grad=True) for a in arrays]


# ------------------------------------------------------------------ §1 the graph


def test_an_op_records_its_graph_only_when_an_input_requires_grad():
    """§1: the result remembers its op (and the op its inputs) only when at least one input
    requires a gradient."""
    a, b = mm.Tensor(np.ones(2)), mm.Tensor(np.full(2, 2.0))
    out = (a * b).exp().sum()
    assert out._ctx is None and not out.requires_grad
    c = mm.Tensor(np.ones(2), requires_grad=True)
    out = a * c
    assert out.requires_grad and out._ctx.inputs == (a, c)


@pytest.mark.parametrize("name", list(OPS))
def test_backward_leaves_the_incoming_gradient_untouched(name):
    """§1: `backward` must never modify `grad` in place (the same array may be handed to
    several ops). y.backward(g) hands g itself to the last op: it must come back unchanged."""
    inputs = make_inputs(name, np.float64)
    y = OPS[name][0](*inputs)
    g = RNG.standard_normal(y.shape)
    before = g.copy()
    y.backward(g)
    np.testing.assert_array_equal(g, before)
    assert any(x.grad is not None for x in inputs)


# ------------------------------------------------------------------ §2 broadcasting


def test_broadcast_gradient_is_the_sum_over_the_copies():
    """§2's example: a (3, 1) added to b (2, 3, 4) is used 2 × 4 times per element; its
    gradient sums the gradients of those copies and keeps the shape (3, 1)."""
    a, b = RNG.standard_normal((3, 1)), RNG.standard_normal((2, 3, 4))
    g = RNG.standard_normal((2, 3, 4))
    ta, tb = mm.Tensor(a, requires_grad=True), mm.Tensor(b, requires_grad=True)
    (ta + tb).backward(g)
    assert ta.grad.shape == (3, 1)
    expected = [[sum(g[i, row, j] for i in range(2) for j in range(4))] for row in range(3)]
    np.testing.assert_allclose(ta.grad, expected, rtol=1e-12)
    np.testing.assert_allclose(tb.grad, g, rtol=0)
    ta.grad = tb.grad = None
    (ta * tb).backward(g)                                    # d(ab)/da = b, summed over a's copies
    expected = [[sum(g[i, row, j] * b[i, row, j] for i in range(2) for j in range(4))] for row in range(3)]
    np.testing.assert_allclose(ta.grad, expected, rtol=1e-12)
    np.testing.assert_allclose(tb.grad, g * a, rtol=1e-15)
    ones = mm.Tensor(np.zeros((3, 1)), requires_grad=True)
    (ones + tb).sum().backward()
    np.testing.assert_array_equal(ones.grad, np.full((3, 1), 8.0))   # "used 2 × 4 times"


# ------------------------------------------------------------------ §3 the backward pass


def _graph_nodes(tensor):
    nodes, stack = [], [tensor._ctx]
    while stack:
        fn = stack.pop()
        if fn is not None and fn not in nodes:
            nodes.append(fn)
            stack.extend(x._ctx for x in fn.inputs)
    return nodes


def test_backward_frees_every_ops_saved_arrays_and_inputs():
    """§3 Free: once an op has run, its saved arrays and its references to its inputs are
    dropped (so the activations can go) and it is marked freed; retain_graph keeps them."""
    x = mm.Tensor(np.array([0.5, -1.0, 2.0]), requires_grad=True)
    y = F.layer_norm((x.exp() * x).reshape(1, 3), mm.Tensor(np.ones(3))).tanh().sum()
    nodes = _graph_nodes(y)
    assert len(nodes) == 6 and all(fn.inputs for fn in nodes)
    y.backward(retain_graph=True)
    assert all(fn.inputs and not fn.freed for fn in nodes)
    first = x.grad.copy()
    y.backward()
    np.testing.assert_allclose(x.grad, 2 * first, rtol=1e-14)
    assert all(fn.inputs == () and fn.saved == () and fn.freed for fn in nodes)


def test_activations_are_released_during_backward_and_the_peak_is_the_forward_one():
    """§3 Free: activations disappear during backward, from the top of the network down, and
    peak memory stays at the end of the forward pass. A chain of 10 + 10 tanh (each keeps its
    256 KB output) with a probe in the middle: when the probe's backward runs, the top half's
    outputs are gone."""
    import tracemalloc

    seen = []

    class Probe(Function):                    # identity; its backward notes the memory in use
        def forward(self, x):
            return x

        def backward(self, grad):
            seen.append(tracemalloc.get_traced_memory()[0])
            return (grad,)

    size = 8 << 15                            # bytes of one activation
    tracemalloc.start()
    try:
        x = mm.Tensor(RNG.standard_normal(1 << 15), requires_grad=True)
        y = x
        for _ in range(10):
            y = y.tanh()
        y = Probe.apply(y)
        for _ in range(10):
            y = y.tanh()
        loss = y.sum()
        del y                                 # the user keeps only the loss
        end_of_forward = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        loss.backward()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seen[0] <= end_of_forward - 7 * size       # 10 top outputs freed, a few gradients alive
    assert peak <= end_of_forward + 4 * size          # a gradient and the temporaries of one op


def test_first_leaf_gradient_never_aliases_the_incoming_gradient():
    """§3: a leaf's first gradient is copied when it might alias another array (a view of the
    incoming gradient, or that gradient itself), so in-place updates (clipping) are safe."""
    g = np.arange(6.0)
    a = mm.Tensor(np.ones((2, 3)), requires_grad=True)
    a.reshape(6).backward(g)                  # Reshape's backward returns a view of g
    a.grad *= 10.0                            # what clip_grad_norm_ does
    np.testing.assert_array_equal(g, np.arange(6.0))
    np.testing.assert_array_equal(a.grad, 10.0 * np.arange(6.0).reshape(2, 3))
    b = mm.Tensor(np.ones((3, 2)), requires_grad=True)
    g2 = np.arange(6.0).reshape(2, 3)
    b.T.backward(g2)                          # Transpose's backward: a view as well
    b.grad[0, 0] = -1.0
    assert g2[0, 0] == 0.0


# ------------------------------------------------------------------ §4 dtypes


MULTI_INPUT = [name for name, (_, shapes, _) in OPS.items() if len(shapes) > 1]


@pytest.mark.parametrize("name", MULTI_INPUT)
def test_mixed_float_dtypes_raise_for_every_op_with_several_tensor_inputs(name):
    """§4: all floating tensor inputs of an op share a dtype, or the op raises TypeError."""
    inputs = make_inputs(name, np.float32)
    inputs[-1] = inputs[-1].to(dtype=np.float64).detach().requires_grad_()
    with pytest.raises(TypeError, match="mixed float dtypes"):
        OPS[name][0](*inputs)


@pytest.mark.parametrize("name", list(OPS))
def test_float32_stays_float32_through_forward_and_backward(name):
    """§4: Python numbers and constants take the tensors' dtype, so a float32 op gives a
    float32 output and float32 gradients (NumPy 2 would promote to float64 otherwise)."""
    inputs = make_inputs(name, np.float32)
    y = OPS[name][0](*inputs)
    assert y.dtype == np.float32
    y.backward(RNG.standard_normal(y.shape).astype(np.float32))
    assert all(x.grad is None or x.grad.dtype == np.float32 for x in inputs)
    assert any(x.grad is not None for x in inputs)


# ------------------------------------------------------------------ §5 gradcheck


class _OffByOne(Function):
    """y = 3x, with a backward wrong by 1.5 in element 2 only."""

    def forward(self, x):
        return 3 * x

    def backward(self, grad):
        g = 3 * grad
        g[2] += 1.5
        return (g,)


def test_gradcheck_uses_central_differences():
    """§5: the numeric gradient is (L(x + εd) − L(x − εd)) / 2ε, error O(ε²). For x³ it is
    3x² + ε² exactly (a forward difference would be off by 3xε), so with ε = 1e-3 a
    relative tolerance of 1e-5 passes a correct backward."""
    x = mm.Tensor(np.array([2.0, -1.0, 1.5]), requires_grad=True)
    assert mm.gradcheck(lambda a: a * a * a, x, eps=1e-3, atol=0.0, rtol=1e-5)


def test_gradcheck_report_names_input_errors_and_index():
    """§5: a mismatch raises GradcheckError naming the input, the largest absolute and relative
    errors and the index where it is worst."""
    ok = mm.Tensor(np.ones(4), requires_grad=True)
    bad = mm.Tensor(np.arange(4.0), requires_grad=True)
    with pytest.raises(mm.GradcheckError) as info:
        mm.gradcheck(lambda a, b: a * 2.0 + _OffByOne.apply(b), ok, bad, n_directions=0)
    message = str(info.value)
    assert "input 1" in message and "(shape (4,))" in message
    abs_error, rel_error = (float(v) for v in re.search(r"max abs error (\S+), max rel error (\S+)", message).groups())
    # L = <v, y> with v the gradcheck's cotangent: dL/db = 3v, and entry 2 comes back 1.5 too large
    v = np.random.default_rng(0).standard_normal(4)
    assert abs_error == pytest.approx(1.5, rel=1e-3)                  # printed to 4 digits
    assert rel_error == pytest.approx(1.5 / abs(3 * v[2]), rel=1e-3)
    assert "worst at index (2,)" in message


# ------------------------------------------------------------------ §6-8 what the fused ops keep


def _saved_arrays(fn):
    """Every array an op holds on to: in ``saved`` or in any other attribute."""
    out, stack = [], list(vars(fn).values())
    while stack:
        item = stack.pop()
        if isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, np.ndarray):
            out.append(item)
    return out


@pytest.mark.parametrize("rms", [False, True])
def test_norms_keep_only_their_inputs_and_per_row_statistics(rms):
    """§7 Layer norm, 'What is saved': x and w (alive anyway as the op's inputs) and per-row μ
    and r (N, 1); backward rebuilds x̂, so no other (N, C) array is kept."""
    x = mm.Tensor(RNG.standard_normal((6, 16)), requires_grad=True)
    w, b = mm.Tensor(RNG.standard_normal(16), requires_grad=True), mm.Tensor(RNG.standard_normal(16))
    y = F.rms_norm(x, w) if rms else F.layer_norm(x, w, b)
    for array in _saved_arrays(y._ctx):
        assert any(np.shares_memory(array, t.data) for t in (x, w, b)) or array.size <= 6, array.shape


def test_cross_entropy_keeps_one_logits_sized_buffer_and_turns_it_into_the_gradient():
    """§7 Cross-entropy, Memory: the forward keeps E = exp(z − m) in one (N, C) buffer ("one
    full-size array beyond the logits") with per-row numbers; the backward turns that buffer
    into the gradient in place, which is (softmax − onehot) / n_valid."""
    logits = RNG.standard_normal((6, 7))
    targets = np.array([0, 6, 3, -100, 2, 2])
    z = mm.Tensor(logits, requires_grad=True)
    loss = F.cross_entropy(z, targets)
    big = [a for a in _saved_arrays(loss._ctx) if a.size >= z.size]
    others = [a for a in big if not np.shares_memory(a, z.data)]
    assert len(others) == 1 and all(a.size <= 6 for a in _saved_arrays(loss._ctx) if not any(a is b for b in big))
    buffer = others[0]
    loss.backward()
    assert np.shares_memory(z.grad, buffer)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    valid = targets != -100
    p[np.flatnonzero(valid), targets[valid]] -= 1
    np.testing.assert_allclose(z.grad, p * valid[:, None] / valid.sum(), rtol=1e-12, atol=1e-15)


def test_rms_norm_and_log_softmax_backward_are_the_documented_formulas():
    """§7: RMS norm dx = r (h − x̂ ⊙ mean(h ⊙ x̂)), h = g ⊙ w, dL/dw = Σ_rows g ⊙ x̂; log-softmax
    dx = g − softmax(x) Σ_i g_i (each in plain NumPy, against the ops' gradients)."""
    x, w, g = RNG.standard_normal((4, 6)), RNG.standard_normal(6), RNG.standard_normal((4, 6))
    tx, tw = mm.Tensor(x, requires_grad=True), mm.Tensor(w, requires_grad=True)
    F.rms_norm(tx, tw, eps=1e-6).backward(g)
    r = 1 / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6)
    x_hat, h = x * r, g * w
    np.testing.assert_allclose(tx.grad, r * (h - x_hat * (h * x_hat).mean(-1, keepdims=True)), rtol=1e-12)
    np.testing.assert_allclose(tw.grad, (g * x_hat).sum(0), rtol=1e-12)
    tx = mm.Tensor(x, requires_grad=True)
    F.log_softmax(tx).backward(g)
    softmax = np.exp(x) / np.exp(x).sum(-1, keepdims=True)
    np.testing.assert_allclose(tx.grad, g - softmax * g.sum(-1, keepdims=True), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("p", [0.0, 0.4])
def test_attention_backward_is_the_documented_formulas(p):
    """§8 Backward, in plain NumPy from the doc: dV = P̃ᵀ dO, dP̃ = dO Vᵀ, dP = dP̃ ⊙ M/(1 − p),
    dS = P ⊙ (dP − rowsum(dP ⊙ P)), dQ = s dS K, dK = s dSᵀ Q, with the causal mask for
    Tq < Tk (query i at position i + Tk − Tq); and rowsum(dP ⊙ P)_i = dO_i · O_i."""
    tq, tk, d = 3, 5, 4
    q, k, v = RNG.standard_normal((2, tq, d)), RNG.standard_normal((2, tk, d)), RNG.standard_normal((2, tk, 3))
    g = RNG.standard_normal((2, tq, 3))
    tensors = [mm.Tensor(a, requires_grad=True) for a in (q, k, v)]
    mm.manual_seed(11)
    out = F.scaled_dot_product_attention(*tensors, causal=True, dropout_p=p)
    out.backward(g)
    mm.manual_seed(11)
    keep = mm.backend.random_uniform((2, tq, tk), dtype=np.float32) >= p     # §8 Dropout's M
    s = 1 / np.sqrt(d)
    scores = s * q @ k.transpose(0, 2, 1)
    scores[:, np.arange(tk)[None, :] > np.arange(tq)[:, None] + (tk - tq)] = -np.inf
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    dropped = probs * keep / (1 - p)                                       # P̃
    np.testing.assert_allclose(out.data, dropped @ v, rtol=1e-12)
    d_dropped = g @ v.transpose(0, 2, 1)
    d_probs = d_dropped * keep / (1 - p)
    rowsum = (d_probs * probs).sum(-1, keepdims=True)
    np.testing.assert_allclose(rowsum[..., 0], (g * out.data).sum(-1), rtol=1e-12)   # the Δ identity
    d_scores = probs * (d_probs - rowsum)
    np.testing.assert_allclose(tensors[2].grad, dropped.transpose(0, 2, 1) @ g, rtol=1e-12)
    np.testing.assert_allclose(tensors[0].grad, s * d_scores @ k, rtol=1e-12)
    np.testing.assert_allclose(tensors[1].grad, s * d_scores.transpose(0, 2, 1) @ q, rtol=1e-12)


def test_layer_norm_gradient_ignores_shifts_and_scales_of_a_row():
    """§7's sanity checks on dx: Σ_j dx_j = 0 (adding a constant to a row changes nothing) and
    Σ_j dx_j x̂_j = r (h·x̂) ε/(σ² + ε) ≈ 0 (nor does scaling it, up to ε)."""
    x, w, g = RNG.standard_normal((5, 8)) * 2 + 3, RNG.standard_normal(8), RNG.standard_normal((5, 8))
    eps = 1e-5
    tx = mm.Tensor(x, requires_grad=True)
    F.layer_norm(tx, mm.Tensor(w), eps=eps).backward(g)
    var = x.var(-1, keepdims=True)
    x_hat = (x - x.mean(-1, keepdims=True)) / np.sqrt(var + eps)
    np.testing.assert_allclose(tx.grad.sum(-1), 0, atol=1e-13)
    expected = ((g * w) * x_hat).sum(-1) / np.sqrt(var[:, 0] + eps) * eps / (var[:, 0] + eps)
    np.testing.assert_allclose((tx.grad * x_hat).sum(-1), expected, rtol=1e-6, atol=1e-13)


def test_softmax_composed_detaches_the_max():
    """§7 Softmax, stability: the shift by the row max does not change the function, so
    `softmax_composed` (and log_softmax_composed) detach it: no Max op in their graphs."""
    x = mm.Tensor(RNG.standard_normal((2, 5)), requires_grad=True)
    for fn in (F.softmax_composed, F.log_softmax_composed):
        names = [node.name for node in _graph_nodes(fn(x))]
        assert "Max" not in names and "Exp" in names


def test_gelu_tanh_backward_needs_no_transcendental_function(monkeypatch):
    """§7 GELU: on the CPU the tanh form's forward saves x and t = tanh(u), so its backward
    calls no tanh, exp or erf; its value is ½(1 + t) + ½x(1 − t²)k(1 + 3cx²)."""
    from minillm.ops import activation

    x = np.linspace(-4, 4, 33)
    tx = mm.Tensor(x, requires_grad=True)
    y = F.gelu(tx, approximate="tanh")

    def forbidden(*args, **kwargs):
        raise AssertionError("a transcendental function in GELU's backward")

    for name in ("tanh", "exp", "expm1", "log", "cosh"):
        monkeypatch.setattr(np, name, forbidden)
    monkeypatch.setattr(activation, "erf_array", forbidden)
    y.backward(np.ones(33))
    monkeypatch.undo()
    k, c = np.sqrt(2 / np.pi), 0.044715
    t = np.tanh(k * (x + c * x ** 3))
    np.testing.assert_allclose(tx.grad, 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * k * (1 + 3 * c * x * x),
                               rtol=1e-12, atol=1e-14)


def test_causal_cpu_tiles_skip_a_quarter_of_the_scores_at_t_256():
    """§8: a causal tile of queries r0..r1−1 computes only keys < r1 (+ Tk − Tq): "at T = 256,
    1/4 of the matmul and softmax work is skipped", and every needed score is computed once."""
    from minillm.ops import attention

    n, T = 12, 256
    covered = np.zeros((n, T, T), int)
    for b0, b1, r0, r1, k_end in attention._tiles(n, T, T, True, "cpu"):
        covered[b0:b1, r0:r1, :k_end] += 1
    assert covered.max() == 1 and covered[:, ~attention.causal_mask(T, T)].min() == 1
    assert covered.sum() == n * T * T * 3 // 4


def test_masked_attention_entries_are_exactly_zero():
    """§8: masked entries of P become exactly 0 (e^{−∞}), so they send no gradient at all: with
    dO = 0 on the last query, the last key (seen by that query only) gets dK = dV = 0 exactly."""
    q, k, v = (mm.Tensor(RNG.standard_normal((2, 3, 5, 4)) * 3, requires_grad=True) for _ in range(3))
    out = F.scaled_dot_product_attention(q, k, v, causal=True)
    g = RNG.standard_normal(out.shape)
    g[..., -1, :] = 0.0
    out.backward(g)
    assert (k.grad[..., -1, :] == 0).all() and (v.grad[..., -1, :] == 0).all()
    assert (v.grad[..., -2, :] != 0).all()                  # the key before is seen by a query with dO ≠ 0


def test_draw_graph_prints_the_documented_tree():
    """§1: `mm.draw_graph(loss)` prints the graph x, w -> Linear -> GELU -> Sum as a text tree."""
    x = mm.Tensor(np.ones((4, 8)), requires_grad=True, name="x")
    w = mm.Tensor(np.ones((3, 8)), requires_grad=True, name="w")
    assert mm.draw_graph(F.gelu(F.linear(x, w)).sum()).splitlines() == [
        "Sum -> () float64",
        "└── GELU -> (4, 3) float64",
        "    └── Linear -> (4, 3) float64",
        "        ├── x (4, 8) float64  [requires grad]",
        "        └── w (3, 8) float64  [requires grad]",
    ]


def test_dropout_keeps_only_the_boolean_mask():
    """§8 Dropout: only M (bool) is saved."""
    x = mm.Tensor(RNG.standard_normal((4, 5)), requires_grad=True)
    y = F.dropout(x, 0.5)
    saved = _saved_arrays(y._ctx)
    assert len(saved) == 1 and saved[0].dtype == bool and saved[0].shape == (4, 5)


# ------------------------------------------------------------------ README: the derivations live in ops/


def test_every_op_documents_its_derivative():
    """README: "read minillm/ops/ to learn backpropagation one op at a time, with the derivation
    in each docstring": every Function in minillm/ops with a backward states its derivative
    (dz/da, dx = ..., ∂...) or points to its module docstring, which does."""
    import importlib
    import pkgutil

    import minillm.ops

    derivative = re.compile(r"d\w*\s*/\s*d|∂|\bd[A-Za-zx]\w*\s*=|dL/d|backward")
    found = 0
    for info in pkgutil.iter_modules(minillm.ops.__path__):
        module = importlib.import_module(f"minillm.ops.{info.name}")
        for cls in vars(module).values():
            if inspect.isclass(cls) and issubclass(cls, Function) and "backward" in vars(cls):
                found += 1
                doc = inspect.getdoc(cls) or ""
                if "module docstring" in doc:
                    doc = module.__doc__ or ""
                assert derivative.search(doc), f"{module.__name__}.{cls.__name__}: no derivative in its docstring"
    assert found >= 40
