"""SGD (plain, momentum, Nesterov, L2 weight decay) against a NumPy transcription of PyTorch's formula."""

import numpy as np
import pytest

import minillm as mm
from minillm import backend, optim


def sgd_reference(param, grads, lr, momentum, nesterov, weight_decay):
    p = np.array(param, dtype=np.float64)
    buffer = None
    for g in grads:
        d = np.asarray(g, dtype=np.float64) + weight_decay * p
        if momentum:
            buffer = d.copy() if buffer is None else momentum * buffer + d
            d = d + momentum * buffer if nesterov else buffer
        p = p - lr * d
    return p


@pytest.mark.parametrize("momentum, nesterov, weight_decay", [
    (0.0, False, 0.0), (0.0, False, 0.1), (0.9, False, 0.0), (0.9, False, 0.05), (0.8, True, 0.0), (0.8, True, 0.1)])
@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_matches_reference(device, momentum, nesterov, weight_decay, dtype, rtol):
    rng = np.random.default_rng(0)
    init = rng.standard_normal((4, 5))
    grads = [rng.standard_normal((4, 5)) for _ in range(5)]
    p = mm.Tensor(np.array(init, dtype=dtype), requires_grad=True, device=device)
    data = p.data
    opt = optim.SGD([p], lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    for g in grads:
        p.grad = backend.to_device(g.astype(dtype), device)
        opt.step()
    assert p.data is data and p.dtype == dtype
    np.testing.assert_allclose(p.numpy(), sgd_reference(init, grads, 0.1, momentum, nesterov, weight_decay),
                               rtol=rtol, atol=rtol)


def test_groups_and_state_round_trip():
    rng = np.random.default_rng(1)
    inits = [rng.standard_normal(3), rng.standard_normal((2, 2))]
    grads = [[rng.standard_normal(x.shape) for x in inits] for _ in range(4)]

    def fresh():
        params = [mm.Tensor(np.array(x), requires_grad=True) for x in inits]
        return params, optim.SGD([{"params": params[:1], "lr": 0.5}, {"params": params[1:]}], lr=0.1, momentum=0.9)

    params_a, opt_a = fresh()
    for step_grads in grads[:2]:
        for p, g in zip(params_a, step_grads):
            p.grad = g.copy()
        opt_a.step()
    params_b, opt_b = fresh()
    for p, q in zip(params_b, params_a):
        p.data[...] = q.data
    opt_b.load_state_dict(opt_a.state_dict())
    for step_grads in grads[2:]:
        for params, opt in ((params_a, opt_a), (params_b, opt_b)):
            for p, g in zip(params, step_grads):
                p.grad = g.copy()
            opt.step()
    for k, (p, q) in enumerate(zip(params_a, params_b)):
        assert np.array_equal(p.data, q.data)
        lr = 0.5 if k == 0 else 0.1
        expected = sgd_reference(inits[k], [s[k] for s in grads], lr, 0.9, False, 0.0)
        np.testing.assert_allclose(p.data, expected, rtol=1e-12)


def test_grad_is_not_modified_and_none_is_skipped():
    a = mm.Tensor(np.ones(3), requires_grad=True)
    b = mm.Tensor(np.ones(3), requires_grad=True)
    grad = np.array([1.0, 2.0, 3.0])
    a.grad = grad.copy()
    optim.SGD([a, b], lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1).step()
    assert np.array_equal(a.grad, grad)
    assert np.array_equal(b.data, np.ones(3))


def test_nesterov_needs_momentum():
    with pytest.raises(ValueError, match="momentum"):
        optim.SGD([mm.Tensor(np.ones(2), requires_grad=True)], nesterov=True)
