"""fdllm_jax.checks: the type predicates the validations share."""

import numpy as np

from fdllm_jax import checks


def test_integers_but_not_booleans():
  assert all(checks.is_int(v) for v in (0, -3, 2**40, np.int32(5), np.int64(-1)))
  assert not any(checks.is_int(v) for v in (True, False, np.bool_(True), 1.0, "1", None))


def test_reals_but_not_booleans():
  assert all(checks.is_real(v) for v in (0, 1.5, float("nan"), np.float32(2), np.int8(1)))
  assert not any(checks.is_real(v) for v in (True, "1.5", None, 1j))
