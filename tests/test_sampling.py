"""Greedy / temperature / top-p choice and its confidence, on hand-made distributions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdllm_jax import sampling

# Powers of two: cumulative sums are exact in float32, so the top-p boundaries are sharp.
PROBS = np.array([0.0625, 0.5, 0.0625, 0.25, 0.125], np.float32)  # sorted: 1, 3, 4, then 0 / 2


@pytest.mark.parametrize("top_p,kept", [
    (0.3, {1}),            # 0.5 alone already exceeds 0.3
    (0.5, {1, 3}),         # 0.5 is not > 0.5: the next token is needed
    (0.7, {1, 3}),
    (0.75, {1, 3, 4}),     # 0.75 is not > 0.75
    (0.8, {1, 3, 4}),      # 0.875 > 0.8
    (0.9, {1, 3, 4, 0, 2}),  # 0.875 is not > 0.9: one 0.0625 is needed, its tie comes along
    (1.0, {0, 1, 2, 3, 4}),
])
def test_top_p_keeps_the_smallest_prefix_exceeding_top_p(top_p, kept):
  filtered = np.asarray(sampling.top_p_filter(jnp.asarray(PROBS), top_p))
  assert set(np.flatnonzero(filtered)) == kept
  expected = np.where(np.isin(np.arange(5), list(kept)), PROBS, 0)
  np.testing.assert_allclose(filtered, expected / expected.sum(), rtol=1e-6)


def test_top_p_rows_and_traced_top_p():
  probs = jnp.asarray(np.stack([PROBS, PROBS[::-1]]))
  filtered = jax.jit(sampling.top_p_filter)(probs, jnp.float32(0.7))
  assert set(np.flatnonzero(filtered[0])) == {1, 3}
  assert set(np.flatnonzero(filtered[1])) == {3, 1}  # reversed: ids 4-1=3 and 4-3=1


def test_sample_draws_only_the_nucleus_in_proportion():
  logits = jnp.log(jnp.asarray(PROBS))
  draw = jax.jit(jax.vmap(lambda k: sampling.sample(logits, k, temperature=1.0, top_p=0.7)))
  ids, conf = draw(jax.random.split(jax.random.key(0), 4000))
  ids, conf = np.asarray(ids), np.asarray(conf)
  assert set(ids) == {1, 3}
  assert abs((ids == 1).mean() - 2 / 3) < 0.03
  np.testing.assert_allclose(conf, np.where(ids == 1, 2 / 3, 1 / 3), rtol=1e-5)


def test_a_one_token_nucleus_has_probability_exactly_one():
  # p / p is 1 - 2**-24 for some p in XLA's division; at threshold 1.0 that made the commit
  # order of equally sure tokens depend on the batch (the softmax of the nucleus' logits, as
  # in the reference, is exactly 1).
  logits = jax.random.normal(jax.random.key(0), (2000, 97)) * 4.0
  keys = jax.random.split(jax.random.key(1), 2000)
  single = np.asarray(jnp.max(jax.nn.softmax(logits / 0.7, axis=-1), axis=-1) > 0.3)
  assert single.sum() > 1000
  for run in (sampling.sample, jax.jit(sampling.sample, static_argnames=("exclude_id",))):
    ids, conf = run(logits, keys, temperature=0.7, top_p=0.3)
    assert (np.asarray(conf)[single] == 1.0).all()
    np.testing.assert_array_equal(np.asarray(ids)[single], np.argmax(logits, -1)[single])


def test_temperature_sharpens_and_flattens():
  logits = jnp.log(jnp.asarray(PROBS))
  keys = jax.random.split(jax.random.key(1), 3000)
  draw = lambda t: np.asarray(jax.vmap(
      lambda k: sampling.sample(logits, k, temperature=t, top_p=1.0)[0])(keys))
  assert (draw(0.05) == 1).mean() > 0.99
  hot = draw(10.0)
  assert set(hot) == {0, 1, 2, 3, 4} and (hot == 1).mean() < 0.35


def test_each_row_samples_its_own_distribution():
  # The reference draws every row from row 0's distribution (its issue #64).
  logits = jnp.asarray(np.where(np.eye(4, 6, 0, bool), 5.0, -5.0), jnp.float32)
  ids, conf = sampling.sample(logits, jax.random.key(3), temperature=1.0, top_p=0.95)
  assert np.asarray(ids).tolist() == [0, 1, 2, 3]
  np.testing.assert_allclose(np.asarray(conf), 1.0)


def test_greedy_excludes_mask_but_keeps_full_softmax_confidence():
  logits = jnp.asarray([[0.0, 3.0, 1.0, 2.5]], jnp.float32)  # id 1 is "MASK" and on top
  ids, conf = sampling.greedy(logits, exclude_id=1)
  full = np.exp([0.0, 3.0, 1.0, 2.5]) / np.exp([0.0, 3.0, 1.0, 2.5]).sum()
  assert int(ids[0]) == 3
  np.testing.assert_allclose(float(conf[0]), full[3], rtol=1e-6)
  ids, conf = sampling.greedy(logits)
  assert int(ids[0]) == 1
  np.testing.assert_allclose(float(conf[0]), full[1], rtol=1e-6)


def test_sample_never_draws_the_excluded_id():
  logits = jnp.log(jnp.asarray([0.1, 0.6, 0.2, 0.1], jnp.float32))
  keys = jax.random.split(jax.random.key(4), 2000)
  ids = np.asarray(jax.vmap(lambda k: sampling.sample(logits, k, temperature=1.0, top_p=1.0,
                                                      exclude_id=1)[0])(keys))
  assert 1 not in set(ids) and set(ids) == {0, 2, 3}
  # MASK alone in the nucleus: the most probable other token is taken.
  ids, conf = sampling.sample(logits, jax.random.key(5), temperature=1.0, top_p=0.5,
                              exclude_id=1)
  assert int(ids) == 2 and float(conf) == 0.0


def test_row_keys_depend_on_seed_row_and_step():
  data = lambda k: np.asarray(jax.random.key_data(k)).tolist()
  a = sampling.row_keys(jnp.uint32(7), jnp.asarray([0, 0, 3], jnp.int32))
  b = sampling.row_keys(jnp.uint32(7), jnp.asarray([0, 1], jnp.int32))
  assert data(a[0]) == data(b[0])  # the same (seed, row, step)
  assert data(a[0]) != data(a[1]) and data(b[0]) != data(b[1])
  assert data(sampling.row_keys(jnp.uint32(8), jnp.asarray([0], jnp.int32))[0]) != data(a[0])
  # an explicit row index (the prompt a row decodes) replaces the position in the batch
  c = sampling.row_keys(jnp.uint32(7), jnp.asarray([3, 0], jnp.int32), jnp.asarray([2, 1]))
  assert data(c[0]) == data(a[2]) and data(c[1]) == data(a[1])


def test_choose_dispatches():
  logits = jnp.asarray([[0.0, 2.0, 1.0]], jnp.float32)
  ids, _ = sampling.choose(logits, None, greedy_only=True)
  assert int(ids[0]) == 1
  ids, _ = sampling.choose(logits, jax.random.key(0), greedy_only=False, temperature=1.0,
                           top_p=0.01)
  assert int(ids[0]) == 1


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.99])
def test_top_k_shortcut_equals_the_full_sort(top_p):
  # Peaked rows use the top-k prefix, broad rows force the full sort: same nucleus either way.
  rng = np.random.RandomState(0)
  logits = rng.randn(6, 300).astype(np.float32) * np.array([[8.0], [8.0], [4.0], [1.0], [0.3],
                                                           [0.0]], np.float32)
  probs = jax.nn.softmax(jnp.asarray(logits), axis=-1)
  fast = np.asarray(sampling.top_p_filter(probs, top_p, prefix=16))
  exact = np.asarray(sampling.top_p_filter(probs, top_p, prefix=300))
  np.testing.assert_array_equal(fast > 0, exact > 0)
  np.testing.assert_allclose(fast, exact, rtol=1e-6)
  peaked = np.asarray(sampling.top_p_filter(probs[:2], top_p, prefix=16))
  np.testing.assert_allclose(peaked, exact[:2], rtol=1e-6)
