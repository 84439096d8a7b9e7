"""What counts as an integer or a real number where the package checks its arguments.

``bool`` is a subclass of ``int`` in Python (``isinstance(True, int)`` holds), but a flag passed
where a count, an index or a rate belongs is a mistake, so these refuse it. NumPy's scalars count
(``np.int64(3)`` is an integer, ``np.float32(0.5)`` a real number); ``np.bool_`` does not.

>>> is_integer(3), is_integer(True), is_integer(3.0), is_real(0.5), is_real(False)
(True, False, False, True, False)
"""

from __future__ import annotations

import numbers


def is_integer(value) -> bool:
    """An int or NumPy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """An int, float or NumPy integer/float, not a bool (nor a complex number)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
