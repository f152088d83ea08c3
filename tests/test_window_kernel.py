"""pallas_kernels.window_kernel: decode plan, ragged key tiles, forward (interpret mode)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _common as cm
from pallas_kernels import window_kernel as wk


@pytest.fixture(autouse=True)
def _full_float32_matmuls():
  """Interpreted kernels run XLA dots: keep them float32 on a GPU backend too (no TF32)."""
  with jax.default_matmul_precision("float32"):
    yield


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("batch,window,hq,hkv,smax", [
    (1, 32, 12, 2, 16384), (8, 32, 12, 2, 16384), (1, 32, 12, 2, 1024), (8, 32, 12, 2, 32768),
    (3, 5, 7, 1, 100), (2, 64, 16, 2, 40), (1, 1, 4, 4, 7)])
def test_decode_plan_covers_the_cache(batch, window, hq, hkv, smax):
  plan = wk.decode_plan(batch, window, hq, hkv, 128, smax)
  assert plan.rows == window * (hq // hkv) <= plan.rows_pad
  assert plan.rows_pad % plan.tile_r == 0 and cm.is_pow2(plan.tile_r)
  # One row tile holds every packed row (K/V read once), up to 256 rows; at most 64 rows when
  # batch x KV heads is too small to fill the GPU without more row tiles.
  cap = wk.MAX_TILE_R if batch * hkv >= 8 else 64
  assert plan.tile_r == min(max(16, 1 << (plan.rows - 1).bit_length()), cap)
  assert plan.num_row_tiles == -(-plan.rows // plan.tile_r)
  assert plan.tile_k == (128 if plan.tile_r > 128 else 64) or plan.tile_k > smax // 2
  assert plan.chunk % plan.tile_k == 0
  # The splits tile [0, Smax) exactly: none empty by construction, none missing.
  assert (plan.num_splits - 1) * plan.chunk < smax <= plan.num_splits * plan.chunk
  # Partials (float32, rows_pad per split) stay below the cache they summarise.
  assert plan.num_splits == 1 or plan.num_splits * plan.rows_pad <= smax // 2 + plan.rows_pad
  if smax >= 16384:  # a long cache fills an H100/H200 even for one row
    assert plan.num_programs >= wk.DEFAULT_NUM_SMS // 2


def test_decode_plan_rejects_large_windows():
  with pytest.raises(ValueError, match="W <= 64"):
    wk.decode_plan(1, 65, 2, 2, 64, 128)


@pytest.mark.parametrize("smax,tile_k,num_splits", [(100, 16, 3), (4096, 64, 7), (64, 16, 1)])
def test_key_tiles_stop_at_each_rows_length(smax, tile_k, num_splits):
  """The kernel's own loop bounds (split_tiles) visit ceil(len / tile_k) tiles per row."""
  plan = wk.decode_plan(1, 4, 2, 1, 64, smax, tile_k=tile_k, num_splits=num_splits)
  lengths = sorted({1, 2, tile_k - 1, tile_k, tile_k + 1, plan.chunk, plan.chunk + 1,
                    smax // 2, smax - 1, smax} & set(range(1, smax + 1)))
  for length in lengths:
    splits = np.arange(plan.num_splits)
    lo, hi, n_full, n_all = (np.asarray(x) for x in wk.split_tiles(plan, splits, length))
    assert int(n_all.sum()) == cm.cdiv(length, tile_k), length   # nothing beyond the length
    assert np.all(n_all - n_full <= 1)                            # at most one masked tile
    assert np.all(lo + n_full * tile_k <= np.maximum(hi, lo))     # unmasked tiles in range
    covered = np.zeros(smax + tile_k, bool)
    for s in splits:
      covered[lo[s]:lo[s] + n_all[s] * tile_k] = True
    assert covered[:length].all()
    assert not covered[cm.cdiv(length, tile_k) * tile_k:].any()


def _inputs(seed, batch, window, hq, hkv, d, smax, dtype):
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
  q = jax.random.normal(kq, (batch, window, hq, d), jnp.float32).astype(dtype)
  k = jax.random.normal(kk, (batch, smax, hkv, d), jnp.float32).astype(dtype)
  v = jax.random.normal(kv, (batch, smax, hkv, d), jnp.float32).astype(dtype)
  return q, k, v


CASES = [
    # batch, W, Hq, Hkv, D, Smax, lengths, tile_k, splits, dtype  (GQA 2 / 7 / 1)
    (3, 5, 4, 2, 32, 100, [1, 100, 37], 16, 3, jnp.float32),
    (2, 8, 7, 1, 16, 64, [64, 17], 16, 2, jnp.float32),
    (2, 3, 2, 2, 24, 40, [40, 1], 16, None, jnp.float32),
    (2, 32, 6, 2, 64, 160, [160, 33], 32, 2, jnp.bfloat16),
]


@pytest.mark.parametrize("batch,window,hq,hkv,d,smax,lengths,tile_k,splits,dtype", CASES)
def test_window_attention_matches_reference(batch, window, hq, hkv, d, smax, lengths, tile_k,
                                            splits, dtype):
  q, k, v = _inputs(sum(lengths) + smax, batch, window, hq, hkv, d, smax, dtype)
  lengths = jnp.asarray(lengths, jnp.int32)
  # Cache slots beyond a row's length hold NaN: a kernel reading them would produce NaN.
  beyond = (jnp.arange(smax)[None, :] >= lengths[:, None])[:, :, None, None]
  k_dirty, v_dirty = jnp.where(beyond, jnp.nan, k), jnp.where(beyond, jnp.nan, v)
  plan = wk.decode_plan(batch, window, hq, hkv, d, smax, tile_k=tile_k, num_splits=splits)
  o_part, lse_part = wk.window_partials(q, k_dirty, v_dirty, lengths, interpret=True,
                                        plan=plan, poison_outputs=True)
  # Every partial element was written (the poison is NaN): outputs finite, lse finite or -inf.
  assert np.all(np.isfinite(np.asarray(o_part)))
  assert not np.any(np.isnan(np.asarray(lse_part)))
  out = wk.combine_partials(o_part, lse_part, q.shape, q.dtype)
  ref = wk.window_attention_reference(q, k, v, lengths)
  assert out.shape == q.shape and out.dtype == dtype
  assert _rel(out, ref) <= (1e-5 if dtype == jnp.float32 else 1e-2)


def test_bad_lengths_splits_and_empty_axes_are_refused():
  q, k, v = _inputs(0, 2, 4, 2, 1, 16, 32, jnp.float32)
  with pytest.raises(ValueError, match="kv_lengths must be integers; got dtype float32"):
    wk.window_attention(q, k, v, jnp.asarray([3.7, 32.0]), interpret=True)
  with pytest.raises(ValueError, match=r"kv_lengths must have shape \[B\]=\(2,\)"):
    wk.window_attention(q, k, v, jnp.asarray(32), interpret=True)
  for splits in (0, -2, 1.5):
    with pytest.raises(ValueError, match="num_splits must be a positive integer or None"):
      wk.decode_plan(2, 4, 2, 1, 16, 32, num_splits=splits)
  with pytest.raises(ValueError, match="must have no empty axis"):
    wk.window_attention(q, k[:, :0], v[:, :0], jnp.asarray([0, 0]), interpret=True)


def test_window_attention_default_plan_and_jit():
  q, k, v = _inputs(7, 2, 4, 4, 2, 32, 48, jnp.float32)
  lengths = jnp.asarray([48, 20], jnp.int32)
  fn = jax.jit(lambda q, k, v, n: wk.window_attention(q, k, v, n, interpret=True))
  assert _rel(fn(q, k, v, lengths), wk.window_attention_reference(q, k, v, lengths)) <= 1e-5


def test_plan_must_match_inputs():
  q, k, v = _inputs(0, 1, 4, 2, 1, 32, 64, jnp.float32)
  plan = wk.decode_plan(1, 4, 2, 1, 32, 128)
  with pytest.raises(ValueError, match="decode plan"):
    wk.window_attention(q, k, v, jnp.asarray([64]), plan=plan, interpret=True)


def test_window_kernel_lowers_to_triton():
  from tests.test_block_kernel import lower_for_gpu
  q = jnp.zeros((8, 32, 12, 128), jnp.bfloat16)
  k = jnp.zeros((8, 4096, 2, 128), jnp.bfloat16)
  lengths = jnp.full((8,), 1000, jnp.int32)
  text = lower_for_gpu(lambda q, k, v: wk.window_attention(q, k, v, lengths), q, k, k)
  assert text.count("xla.gpu.triton") == 1


def test_lengths_are_clipped_to_the_cache():
  """A length above Smax reads no further than the cache; length 0 gives zeros (no keys)."""
  q, k, v = _inputs(9, 2, 4, 2, 1, 16, 32, jnp.float32)
  out = wk.window_attention(q, k, v, jnp.asarray([1000, 0], jnp.int32), interpret=True,
                            poison_outputs=True)
  ref = wk.window_attention_reference(q[:1], k[:1], v[:1], jnp.asarray([32], jnp.int32))
  assert _rel(out[:1], ref) <= 1e-5
  np.testing.assert_array_equal(np.asarray(out[1]), 0.0)
