"""minillm/checks.py: one rule for 'an integer' and 'a real number' in argument checks."""

import fractions

import numpy as np
import pytest

from minillm.checks import is_integer, is_real


@pytest.mark.parametrize("value, integer, real", [
    (3, True, True), (0, True, True), (-7, True, True), (np.int64(3), True, True), (np.uint8(3), True, True),
    (True, False, False), (False, False, False), (np.bool_(True), False, False),
    (3.0, False, True), (np.float32(0.5), False, True), (float("inf"), False, True), (fractions.Fraction(1, 2), False, True),
    (1 + 2j, False, False), ("3", False, False), (None, False, False), (np.array(3), False, False), ([3], False, False),
])
def test_what_counts(value, integer, real):
    assert is_integer(value) is integer
    assert is_real(value) is real


def test_the_checks_refuse_flags_where_numbers_belong():
    """Two of the places that use them: a bool is refused, a NumPy integer accepted."""
    import minillm as mm
    from minillm.nn import Dropout

    with pytest.raises(ValueError, match="probability"):
        Dropout(True)
    assert Dropout(np.float32(0.25)).p == pytest.approx(0.25)
    t = mm.Tensor(np.arange(6.0).reshape(2, 3))
    assert t[np.int64(1)].shape == (3,)
