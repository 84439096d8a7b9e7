"""cross_entropy: forward against a NumPy log-sum-exp reference, the gradient against
(softmax - onehot)/n_valid and gradcheck, fused against composed, ignore_index,
reductions, stability for logits of 1e4, bad targets, and the CUDA kernels."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import minillm as mm
from minillm import functional as F

from helpers import as_np, t

SETTINGS = settings(max_examples=25, deadline=None)
IGNORE = -100


def reference(logits, targets, ignore_index=IGNORE, reduction="mean"):
    """Loss and d(loss)/d(logits) (for an upstream gradient of ones) in plain float64 NumPy."""
    z = logits.reshape(-1, logits.shape[-1]).astype(np.float64)
    tt = targets.reshape(-1)
    valid = tt != ignore_index
    m = z.max(axis=1, keepdims=True)
    log_probs = z - m - np.log(np.exp(z - m).sum(axis=1, keepdims=True))
    losses = np.zeros(len(tt))
    losses[valid] = -log_probs[valid, tt[valid]]
    onehot = np.zeros_like(z)
    onehot[np.flatnonzero(valid), tt[valid]] = 1.0
    grad = (np.exp(log_probs) - onehot) * valid[:, None]
    if reduction == "none":
        return losses.reshape(targets.shape), grad.reshape(logits.shape)
    if reduction == "sum":
        return losses.sum(), grad.reshape(logits.shape)
    return losses.sum() / valid.sum(), (grad / valid.sum()).reshape(logits.shape)


@st.composite
def problems(draw, min_rows=1):
    """logits (N, C) or (B, T, C) and targets with some ignored entries."""
    lead = draw(st.sampled_from([(draw(st.integers(min_rows, 6)),),
                                 (draw(st.integers(1, 3)), draw(st.integers(max(min_rows, 1), 3)))]))
    n_classes = draw(st.integers(1, 7))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    logits = rng.standard_normal(lead + (n_classes,)) * draw(st.sampled_from([0.1, 1.0, 5.0]))
    targets = rng.integers(0, n_classes, lead)
    ignored = rng.random(lead) < draw(st.sampled_from([0.0, 0.3]))
    targets[ignored] = IGNORE
    if (targets == IGNORE).all():
        targets.flat[0] = 0
    return logits, targets


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@SETTINGS
@given(problem=problems())
def test_forward_and_gradient_match_reference(device, reduction, problem):
    logits, targets = problem
    z = t(logits, device)
    loss = F.cross_entropy(z, targets, reduction=reduction)
    expected_loss, expected_grad = reference(logits, targets, reduction=reduction)
    np.testing.assert_allclose(as_np(loss), expected_loss, rtol=1e-12, atol=1e-14)
    loss.backward(mm.backend.module_for(device).ones_like(loss.data))
    np.testing.assert_allclose(as_np(z.grad), expected_grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@SETTINGS
@given(problem=problems())
def test_gradcheck(device, reduction, problem):
    logits, targets = problem
    mm.gradcheck(lambda z: F.cross_entropy(z, targets, reduction=reduction), t(logits, device))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@SETTINGS
@given(problem=problems())
def test_fused_equals_composed(device, reduction, problem):
    logits, targets = problem
    a, b = t(logits, device), t(logits, device)
    la = F.cross_entropy(a, targets, reduction=reduction)
    lb = F.cross_entropy_composed(b, targets, reduction=reduction)
    np.testing.assert_allclose(as_np(la), as_np(lb), rtol=1e-12, atol=1e-14)
    g = np.random.default_rng(0).standard_normal(la.shape)
    la.backward(g)
    lb.backward(g)
    np.testing.assert_allclose(as_np(a.grad), as_np(b.grad), rtol=1e-11, atol=1e-14)


def test_ignored_rows_get_zero_gradient_and_do_not_count(device):
    logits = np.random.default_rng(1).standard_normal((4, 5))
    targets = np.array([1, IGNORE, 3, IGNORE])
    z = t(logits, device)
    loss = F.cross_entropy(z, targets)
    only_valid = F.cross_entropy(t(logits[[0, 2]], device), targets[[0, 2]])
    np.testing.assert_allclose(as_np(loss), as_np(only_valid), rtol=1e-14)
    loss.backward()
    grad = as_np(z.grad)
    assert (grad[[1, 3]] == 0).all()
    np.testing.assert_allclose(grad.sum(axis=1), 0, atol=1e-15)   # each row: softmax sums to 1, minus one-hot
    custom = F.cross_entropy(t(logits, device), np.array([1, 7, 3, 7]) % 5, ignore_index=2)
    np.testing.assert_allclose(as_np(custom), reference(logits, np.array([1, 2, 3, 2]), ignore_index=2)[0])


def test_targets_as_tensor_and_3d_logits(device):
    rng = np.random.default_rng(2)
    logits, targets = rng.standard_normal((2, 3, 6)), rng.integers(0, 6, (2, 3))
    loss = F.cross_entropy(t(logits, device), mm.Tensor(targets, device=device))
    np.testing.assert_allclose(as_np(loss), reference(logits, targets)[0], rtol=1e-13)
    per_position = F.cross_entropy(t(logits, device), targets, reduction="none")
    assert per_position.shape == (2, 3)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_stable_for_logits_of_1e4(device, dtype):
    logits = np.array([[1e4, -1e4, 0.0, 1e4 - 3], [-1e4, -1e4 + 5, -1e4, -1e4]], dtype=dtype)
    targets = np.array([3, 1])
    z = mm.Tensor(logits, requires_grad=True, device=device)
    loss = F.cross_entropy(z, targets)
    assert loss.dtype == dtype
    expected_loss, expected_grad = reference(logits, targets)
    # ℓ = log Σ exp(z − m) − (z_t − m) (docs/autograd.md): z_t − m is exact and log Σ is O(1), so float32
    # keeps the loss to ~1e-7; (m + log Σ) − z_t would first round m + log Σ to 1e4's spacing (~1e-3)
    loss_tol = dict(rtol=1e-6) if dtype == np.float32 else dict(rtol=1e-12)
    np.testing.assert_allclose(as_np(loss), expected_loss, **loss_tol)
    loss.backward()
    assert z.grad.dtype == dtype
    np.testing.assert_allclose(as_np(z.grad), expected_grad, rtol=1e-5, atol=1e-7)
    composed = F.cross_entropy_composed(mm.Tensor(logits, device=device), targets)
    np.testing.assert_allclose(as_np(composed), expected_loss, **loss_tol)


def test_float32_stays_float32(device):
    logits = np.random.default_rng(3).standard_normal((5, 9)).astype(np.float32)
    z = mm.Tensor(logits, requires_grad=True, device=device)
    loss = F.cross_entropy(z, np.arange(5))
    assert loss.dtype == np.float32 and loss.shape == ()
    loss.backward()
    assert z.grad.dtype == np.float32
    np.testing.assert_allclose(as_np(z.grad), reference(logits, np.arange(5))[1], rtol=1e-5, atol=1e-7)


def test_backward_twice_with_retain_graph(device):
    """The first backward turns the saved buffer into the gradient in place; a second one
    (retain_graph=True) must rebuild it and give the same gradient again."""
    logits = np.random.default_rng(4).standard_normal((3, 4))
    z = t(logits, device)
    loss = F.cross_entropy(z, np.array([0, 3, 1]))
    loss.backward(retain_graph=True)
    first = as_np(z.grad).copy()
    loss.backward()
    np.testing.assert_allclose(as_np(z.grad), 2 * first, rtol=1e-14)


def test_all_ignored_and_empty_batches(device):
    logits = np.random.default_rng(5).standard_normal((2, 3))
    z = t(logits, device)
    loss = F.cross_entropy(z, np.array([IGNORE, IGNORE]))
    assert np.isnan(as_np(loss))                                  # a mean over no targets, like PyTorch
    loss.backward()
    assert (as_np(z.grad) == 0).all()
    empty = t(np.zeros((0, 4)), device)
    assert as_np(F.cross_entropy(empty, np.zeros(0, dtype=np.int64), reduction="sum")) == 0
    assert F.cross_entropy(empty, np.zeros(0, dtype=np.int64), reduction="none").shape == (0,)


def test_bad_targets_raise_clear_errors(device):
    z = t(np.zeros((3, 5)), device)
    with pytest.raises(ValueError, match=r"target id 5 is out of range for 5 classes.*vocab size 5"):
        F.cross_entropy(z, np.array([0, 5, 1]))
    with pytest.raises(ValueError, match=r"target id -3 "):
        F.cross_entropy(z, np.array([0, -3, 1]))
    with pytest.raises(ValueError, match=r"target id -100 "):
        F.cross_entropy(z, np.array([0, -100, 1]), ignore_index=-1)
    with pytest.raises(ValueError, match="target id 9"):
        F.cross_entropy_composed(z, np.array([9, 0, 1]))
    with pytest.raises(TypeError, match="integer"):
        F.cross_entropy(z, np.array([0.0, 1.0, 2.0]))
    with pytest.raises(TypeError, match="integer"):
        F.cross_entropy(z, mm.Tensor(np.array([0.0, 1.0, 2.0])))
    with pytest.raises(ValueError, match="do not match"):
        F.cross_entropy(z, np.array([0, 1]))
    with pytest.raises(ValueError, match="reduction"):
        F.cross_entropy(z, np.array([0, 1, 2]), reduction="max")


def test_cuda_kernels_equal_numpy_path(gpu):
    rng = np.random.default_rng(6)
    for dtype, tol in ((np.float64, dict(rtol=1e-12, atol=1e-14)), (np.float32, dict(rtol=2e-5, atol=1e-7))):
        for reduction in ("mean", "sum", "none"):
            logits = (rng.standard_normal((37, 1500)) * 3).astype(dtype)
            logits[0, :10] = 1e4                                   # stability inside the kernel too
            targets = rng.integers(0, 1500, 37)
            targets[5] = IGNORE
            results = []
            for dev in ("cpu", "cuda"):
                z = mm.Tensor(logits, requires_grad=True, device=dev)
                loss = F.cross_entropy(z, targets, reduction=reduction)
                loss.backward(mm.backend.module_for(dev).ones_like(loss.data))
                results.append((as_np(loss), as_np(z.grad)))
            np.testing.assert_allclose(results[1][0], results[0][0], **tol)
            np.testing.assert_allclose(results[1][1], results[0][1], **tol)


def test_cuda_kernels_read_padded_rows_in_place(gpu):
    """Logits whose rows lie further apart than their length (the LM head's padded product,
    ops/matmul.py) give the loss and gradient of the same logits made contiguous, exactly, and
    are read without a copy (the gradient comes back contiguous in the logits' shape)."""
    import cupy

    rng = np.random.default_rng(8)
    full = cupy.asarray((rng.standard_normal((2, 5, 16)) * 3).astype(np.float32))
    padded = full[..., :13]                                        # rows 16 apart, 13 long
    targets = rng.integers(0, 13, (2, 5))
    results = []
    for logits in (padded, cupy.ascontiguousarray(padded)):
        z = mm.Tensor(logits, requires_grad=True)
        loss = F.cross_entropy(z, targets)
        loss.backward()
        assert z.grad.shape == (2, 5, 13) and z.grad.flags.c_contiguous
        results.append((as_np(loss), as_np(z.grad)))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])


@pytest.mark.parametrize("layout", ["transposed_view", "fortran_leaf", "strided_leaf"])
def test_non_contiguous_logits_get_the_gradient_of_contiguous_ones(layout):
    """The CPU keeps exp(z - m) in one buffer of the logits' shape, written and turned into the
    gradient through its (N, C) view. That buffer was ``empty_like(logits)``: for (B, T, C) logits
    in another layout (a transposed view, a Fortran-ordered leaf) the (N, C) reshape was a copy,
    so the gradient came back as the never-written buffer. Both backwards (the first in place,
    the second of a retained graph rebuilt) against the contiguous run."""
    rng = np.random.default_rng(7)
    values = rng.standard_normal((2, 3, 5)) * 2
    targets = np.array([[0, 4, IGNORE], [2, 2, 1]])
    if layout == "transposed_view":
        leaf = mm.Tensor(values.transpose(1, 0, 2).copy(), requires_grad=True)
        logits, to_values = leaf.transpose(1, 0, 2), (lambda g: g.transpose(1, 0, 2))
    elif layout == "fortran_leaf":
        leaf = logits = mm.Tensor(np.asfortranarray(values), requires_grad=True)
        to_values = lambda g: g  # noqa: E731
    else:
        big = np.zeros((2, 3, 10))
        big[..., ::2] = values
        leaf = logits = mm.Tensor(big[..., ::2], requires_grad=True)
        to_values = lambda g: g  # noqa: E731
    loss = F.cross_entropy(logits, targets)
    expected_loss, expected_grad = reference(values, targets)
    np.testing.assert_allclose(loss.item(), expected_loss, rtol=1e-12)
    loss.backward(retain_graph=True)
    np.testing.assert_allclose(to_values(leaf.grad), expected_grad, rtol=1e-12, atol=1e-14)
    loss.backward()
    np.testing.assert_allclose(to_values(leaf.grad), 2 * expected_grad, rtol=1e-12, atol=1e-14)
