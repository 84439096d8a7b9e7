"""The engine: graph walking, accumulation, freeing, no_grad, devices and dtypes."""

import numpy as np
import pytest

import minillm as mm
from minillm import functional as F


def test_backward_accumulates_reused_tensor():
    x = mm.Tensor(np.array([2.0, -3.0]), requires_grad=True)
    y = x * x + x * 3.0          # dy/dx = 2x + 3
    y.sum().backward()
    np.testing.assert_allclose(x.grad, 2 * np.array([2.0, -3.0]) + 3)


def test_grad_accumulates_across_backward_calls():
    x = mm.Tensor(np.ones(3), requires_grad=True)
    (x * 2.0).sum().backward()
    (x * 5.0).sum().backward()
    np.testing.assert_allclose(x.grad, np.full(3, 7.0))


def test_leaf_gradients_do_not_alias():
    a = mm.Tensor(np.ones(3), requires_grad=True)
    b = mm.Tensor(np.ones(3), requires_grad=True)
    (a + b).sum().backward()
    a.grad *= 10
    np.testing.assert_allclose(b.grad, np.ones(3))


def test_chain_of_100k_ops_has_no_recursion_limit():
    x = mm.Tensor(np.array([1.5]), requires_grad=True)
    y = x
    for _ in range(50_000):
        y = y * 1.0001 + 0.0
    y.sum().backward()
    np.testing.assert_allclose(x.grad, [1.0001 ** 50_000], rtol=1e-6)


def test_second_backward_through_freed_graph_raises():
    x = mm.Tensor(np.ones(2), requires_grad=True)
    y = (x.exp() * 2.0).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="already freed"):
        y.backward()


def test_retain_graph_allows_second_backward():
    x = mm.Tensor(np.ones(2), requires_grad=True)
    y = (x.exp() * 2.0).sum()
    y.backward(retain_graph=True)
    y.backward()
    np.testing.assert_allclose(x.grad, 4 * np.e * np.ones(2))


def test_backward_frees_saved_arrays():
    x = mm.Tensor(np.ones(4), requires_grad=True)
    e = x.exp()
    y = e.sum()
    node = e._ctx
    assert node.saved
    y.backward()
    assert node.saved == () and node.freed


def test_no_grad_records_nothing():
    x = mm.Tensor(np.ones(2), requires_grad=True)
    with mm.no_grad():
        y = x * 2.0
    assert not y.requires_grad and y._ctx is None
    assert mm.is_grad_enabled()


def test_backward_needs_scalar_or_gradient():
    x = mm.Tensor(np.ones(3), requires_grad=True)
    with pytest.raises(RuntimeError, match="one-element"):
        (x * 2.0).backward()
    (x * 2.0).backward(np.ones(3))
    np.testing.assert_allclose(x.grad, 2 * np.ones(3))


def test_wrong_gradient_shape_from_an_op_is_caught():
    class Bad(mm.Function):
        def forward(self, x):
            return x * 2

        def backward(self, grad):
            return (grad.sum(axis=0),)

    x = mm.Tensor(np.ones((2, 3)), requires_grad=True)
    with pytest.raises(RuntimeError, match=r"Bad.backward produced a gradient of shape \(3,\)"):
        Bad.apply(x).sum().backward()


def test_integer_tensor_cannot_require_grad():
    with pytest.raises(TypeError, match="floating-point"):
        mm.Tensor(np.arange(3), requires_grad=True)


def test_dtype_rules():
    assert mm.Tensor([1.0, 2.0]).dtype == np.float32           # Python floats -> default dtype
    assert mm.Tensor(np.ones(2)).dtype == np.float64           # arrays keep their dtype
    a32 = mm.Tensor(np.ones(2, np.float32), requires_grad=True)
    assert (a32 * 2.5).dtype == np.float32                     # numbers take the tensor's dtype
    assert (a32 * np.float64(2.5)).dtype == np.float32
    assert (a32 + np.ones(2)).dtype == np.float32              # non-tensor arrays are cast
    with pytest.raises(TypeError, match="mixed float dtypes"):
        a32 + mm.Tensor(np.ones(2))
    b = a32.to(dtype=np.float64)
    assert b.dtype == np.float64
    b.sum().backward()
    assert a32.grad.dtype == np.float32


def test_an_op_records_its_tensor_inputs_and_lifts_the_rest_to_constants():
    a = mm.Tensor(np.ones(2), requires_grad=True)              # float64
    b = mm.Tensor(np.ones(2))
    out = F.add(a, b)                                          # all tensors: recorded as they are
    assert out._ctx.inputs == (a, b) and out._ctx.needs_input_grad == (True, False)
    out = F.mul(np.full(2, 3, dtype=np.float32), a)            # a constant array takes a's dtype
    constant = out._ctx.inputs[0]
    assert constant is not a and constant.dtype == np.float64 and not constant.requires_grad
    assert out._ctx.inputs[1] is a and out.tolist() == [3.0, 3.0]
    with mm.no_grad():
        out = F.add(a, b)
    assert out._ctx is None and not out.requires_grad
    with pytest.raises(TypeError, match="at least one Tensor"):
        F.add(np.ones(2), 1.0)


def test_properties_and_conversions():
    x = mm.Tensor(np.arange(6.0).reshape(2, 3), requires_grad=True)
    assert x.shape == (2, 3) and x.ndim == 2 and x.device == "cpu" and x.is_leaf
    assert x.sum().item() == 15.0
    assert isinstance(x.numpy(), np.ndarray)
    d = x.detach()
    assert not d.requires_grad and d.data is x.data
    assert "requires_grad=True" in repr(x)
    assert x.T.shape == (3, 2)


def test_comparisons_give_masks():
    x = mm.Tensor(np.array([-1.0, 0.0, 2.0]))
    assert (x > 0).numpy().tolist() == [False, False, True]
    assert (x <= 0).dtype == bool


def test_bad_device_string():
    with pytest.raises(ValueError, match="bad device"):
        mm.Tensor([1.0], device="tpu")


def test_mixed_devices_raise_naming_both(device):
    if device == "cpu":
        pytest.skip("needs a GPU to mix devices")
    a = mm.Tensor(np.ones(2), device="cpu")
    b = mm.Tensor(np.ones(2), device=device)
    with pytest.raises(RuntimeError, match="different devices.*cpu.*cuda"):
        a + b


def test_to_device_round_trip_keeps_gradient(device):
    x = mm.Tensor(np.arange(3.0), requires_grad=True)
    y = x.to(device) * 3.0
    y.to("cpu").sum().backward()
    np.testing.assert_allclose(x.grad, [3.0, 3.0, 3.0])


def test_manual_seed_reproducible(device):
    mm.manual_seed(123)
    a = mm.backend.random_normal((4,), device)
    mm.manual_seed(123)
    b = mm.backend.random_normal((4,), device)
    np.testing.assert_array_equal(mm.backend.to_numpy(a), mm.backend.to_numpy(b))


def test_rng_state_round_trip():
    mm.manual_seed(7)
    mm.backend.random_uniform((3,))
    state = mm.backend.get_rng_state()
    a = mm.backend.random_uniform((5,))
    mm.backend.set_rng_state(state)
    np.testing.assert_array_equal(a, mm.backend.random_uniform((5,)))


def test_draw_graph_text_and_dot():
    x = mm.Tensor(np.ones((2, 3)), requires_grad=True, name="x")
    w = mm.Tensor(np.ones((4, 3)), requires_grad=True, name="w")
    y = F.linear(x, w).tanh().sum()
    text = mm.draw_graph(y)
    assert text.splitlines()[0] == "Sum -> () float64"
    assert "Tanh -> (2, 4) float64" in text and "Linear -> (2, 4) float64" in text
    assert "x (2, 3) float64  [requires grad]" in text
    dot = mm.draw_graph(y, format="dot")
    assert dot.startswith("digraph") and dot.count("->") >= 3 + 3  # 3 edges + labels with arrows
    with pytest.raises(ValueError):
        mm.draw_graph(y, format="png")


def test_post_accumulate_grad_hook_sees_the_final_gradient_once_per_backward():
    """The hook fires after the LAST edge into a leaf: a tensor used at both ends of the graph
    (like GPT's tied embedding) is reported once, with both contributions summed."""
    w = mm.Tensor(np.array([0.5, -1.0]), requires_grad=True)
    x = mm.Tensor(np.array([2.0, 3.0]), requires_grad=False)
    seen = []
    w.register_post_accumulate_grad_hook(lambda t: seen.append(t.grad.copy()))
    y = ((x * w).tanh() * w).sum()          # w feeds the first and the last op
    y.backward()
    assert len(seen) == 1
    np.testing.assert_array_equal(seen[0], w.grad)
    t = np.tanh(np.array([2.0, 3.0]) * w.data)
    np.testing.assert_allclose(w.grad, t + w.data * (1 - t * t) * np.array([2.0, 3.0]))
    (x * w).sum().backward()                 # a second pass: fires again, with the accumulated grad
    assert len(seen) == 2
    np.testing.assert_array_equal(seen[1], w.grad)


def test_post_accumulate_grad_hooks_fire_in_backward_order_before_the_walk_ends():
    """Leaves near the output are final first: the later layer's hook runs while the earlier
    layer's backward has not run yet (what lets data parallelism overlap its all-reduce)."""
    a = mm.Tensor(np.ones(3), requires_grad=True)   # first layer
    b = mm.Tensor(np.ones(3), requires_grad=True)   # last layer
    events = []
    a.register_post_accumulate_grad_hook(lambda t: events.append(("a", t.grad is not None)))
    b.register_post_accumulate_grad_hook(lambda t: events.append(("b", a.grad is None)))
    x = mm.Tensor(np.arange(3.0))
    ((x * a).exp() * b).sum().backward()
    assert events == [("b", True), ("a", True)]


def test_post_accumulate_grad_hook_fires_for_a_leaf_no_gradient_reached():
    """A node that got no gradient still counts its edges down, so the hook is never left waiting."""
    from minillm.tensor import Function

    class StopGradient(Function):          # identity forward, no gradient backward
        def forward(self, x):
            return x.copy()

        def backward(self, grad):
            return (None,)

    w = mm.Tensor(np.ones(2), requires_grad=True)
    v = mm.Tensor(np.ones(2), requires_grad=True)
    fired = []
    w.register_post_accumulate_grad_hook(lambda t: fired.append(t.grad))
    out = StopGradient.apply(w * 2.0).sum() + (v * 1.0).sum()   # (w * 2.0) is reached by no gradient
    out.backward()
    assert fired == [None] and w.grad is None
    np.testing.assert_array_equal(v.grad, np.ones(2))
    with pytest.raises(RuntimeError, match="leaf"):
        (w * 2.0).register_post_accumulate_grad_hook(print)


def test_backward_on_a_leaf_copies_the_given_gradient():
    """leaf.backward(g) used to store the caller's g as leaf.grad, so the next accumulation
    (``grad += ...``) wrote into the caller's array."""
    x = mm.Tensor(np.zeros(3), requires_grad=True)
    g = np.array([1.0, 2.0, 3.0])
    x.backward(g)
    x.backward(g)
    np.testing.assert_array_equal(g, [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(x.grad, [2.0, 4.0, 6.0])
    assert not np.shares_memory(x.grad, g)
    given = mm.Tensor(np.ones(3))
    x.grad = None
    x.backward(given)
    x.backward(given)
    np.testing.assert_array_equal(given.data, np.ones(3))
