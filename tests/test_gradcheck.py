"""gradcheck itself: it must pass correct backwards and catch wrong ones, readably."""

import numpy as np
import pytest

import minillm as mm


class WrongSquare(mm.Function):
    """x² with a backward that is wrong in one element (the kind of bug gradcheck exists for)."""

    def forward(self, x):
        self.save(x)
        return x * x

    def backward(self, grad):
        (x,) = self.saved
        g = 2 * x * grad
        g.flat[1] *= 1.1
        return (g,)


def test_passes_correct_backward():
    x = mm.Tensor(np.random.default_rng(0).standard_normal((3, 2)), requires_grad=True)
    assert mm.gradcheck(lambda a: (a * a).sum(axis=0), x)


def test_report_names_input_and_location():
    x = mm.Tensor(np.array([[1.0, 2.0], [3.0, 4.0]]), requires_grad=True)
    y = mm.Tensor(np.ones((2, 2)), requires_grad=True)
    with pytest.raises(mm.GradcheckError) as info:
        mm.gradcheck(lambda a, b: WrongSquare.apply(a) + b, y, x, n_directions=0)
    message = str(info.value)
    assert "input 0" in message and "max abs error" in message
    assert "(0, 1)" in message  # the broken element


def test_random_directions_catch_errors_on_large_inputs():
    x = mm.Tensor(np.random.default_rng(1).standard_normal(2000), requires_grad=True)
    with pytest.raises(mm.GradcheckError, match="random direction"):
        mm.gradcheck(lambda a: WrongSquare.apply(a) * 100.0, x, elementwise_max=0)


def test_full_jacobian_is_checked_for_small_functions():
    x = mm.Tensor(np.array([0.5, -1.0, 2.0]), requires_grad=True)
    with pytest.raises(mm.GradcheckError, match="full Jacobian"):
        mm.gradcheck(lambda a: WrongSquare.apply(a), x, n_directions=0, elementwise_max=0)


def test_rejects_float32_and_no_grad_inputs():
    with pytest.raises(TypeError, match="float64"):
        mm.gradcheck(lambda a: a * 2.0, mm.Tensor(np.ones(2, np.float32), requires_grad=True))
    with pytest.raises(ValueError, match="no input requires grad"):
        mm.gradcheck(lambda a: a * 2.0, mm.Tensor(np.ones(2)))


def test_a_function_that_is_not_deterministic_is_reported_not_compared():
    """Dropout without a re-seed inside fn: the differences would compare two different functions."""
    x = mm.Tensor(np.random.default_rng(2).standard_normal((4, 5)), requires_grad=True)
    with pytest.raises(mm.GradcheckError, match="different outputs for the same inputs.*re-seed"):
        mm.gradcheck(lambda a: mm.functional.dropout(a, 0.5), x)

    def seeded(a):
        mm.manual_seed(1)
        return mm.functional.dropout(a, 0.5)

    assert mm.gradcheck(seeded, x)


class ScalesItsInputInBackward(mm.Function):
    """y = 2x with a correct gradient, but backward doubles the saved input in place."""

    def forward(self, x):
        self.save(x)
        return 2 * x

    def backward(self, grad):
        (x,) = self.saved
        x *= 2.0
        return (2 * grad,)


def test_an_input_changed_in_place_by_backward_is_reported():
    x = mm.Tensor(np.array([0.5, -1.0]), requires_grad=True)
    with pytest.raises(mm.GradcheckError, match=r"input 0 \(shape \(2,\)\) was changed in place"):
        mm.gradcheck(ScalesItsInputInBackward.apply, x)


def test_fn_must_return_a_tensor():
    x = mm.Tensor(np.ones(2), requires_grad=True)
    with pytest.raises(TypeError, match="must return a Tensor"):
        mm.gradcheck(lambda a: a.numpy(), x)
