"""Mask functions against the spec's formulas, element by element."""

import numpy as np
import pytest

from fdllm_jax import masks


def test_block_causal_formula():
  got = masks.dense(masks.BlockCausal(4), 13, 13)
  want = np.array([[q // 4 >= k // 4 for k in range(13)] for q in range(13)])
  np.testing.assert_array_equal(got, want)


def test_causal_with_offset():
  got = masks.dense(masks.Causal(), 3, 8, q_offset=5)
  np.testing.assert_array_equal(got, np.arange(8)[None] <= (np.arange(3) + 5)[:, None])


def _spec_training(q, k, L, B):
  clean_q, clean_k = q >= L, k >= L
  bq, bk = (q % L) // B, (k % L) // B
  return ((bq == bk and clean_q == clean_k) or (not clean_q and clean_k and bq > bk)
          or (clean_q and clean_k and bq >= bk))


@pytest.mark.parametrize("L,B", [(16, 4), (12, 3), (8, 8)])
def test_training_mask_is_the_spec_formula(L, B):
  got = masks.dense(masks.Training(B, L), 2 * L, 2 * L)
  want = np.array([[_spec_training(q, k, L, B) for k in range(2 * L)] for q in range(2 * L)])
  np.testing.assert_array_equal(got, want)


def test_training_mask_never_lets_noisy_see_its_own_clean_block():
  got = masks.dense(masks.Training(4, 8), 16, 16)
  assert not got[:4, 8:12].any()  # x_t block 0 must not see x_0 block 0 (it would leak labels)
  assert got[4:8, 8:12].all()     # x_t block 1 sees clean block 0


@pytest.mark.parametrize("bad", [0, -1, 2.5])
def test_bad_block_size(bad):
  with pytest.raises(ValueError, match="block_size must be a positive integer"):
    masks.BlockCausal(bad)


def test_training_length_must_be_block_multiple():
  with pytest.raises(ValueError, match="seq_len=10 must be a multiple of block_size=4"):
    masks.Training(4, 10)


def test_masks_are_hashable_static_values():
  assert hash(masks.BlockCausal(32)) == hash(masks.BlockCausal(32))
  assert masks.Training(32, 64) == masks.Training(32, 64)


def test_by_name():
  assert masks.by_name("block_causal", 8) == masks.BlockCausal(8)
  with pytest.raises(ValueError, match="attention='sliding'"):
    masks.by_name("sliding", 8)
