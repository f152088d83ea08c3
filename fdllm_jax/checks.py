"""Type predicates the validations share: integers and real numbers, booleans excluded (Python
counts ``True`` as the integer 1, which a config field must not accept)."""

from __future__ import annotations

import numbers


def is_int(value) -> bool:
  """A Python or NumPy integer, not a bool."""
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
  """A Python or NumPy integer or float (NaN and infinities included), not a bool."""
  return isinstance(value, numbers.Real) and not isinstance(value, bool)
