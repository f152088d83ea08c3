"""pallas_kernels.block_kernel: masks, tile skipping, forward and gradients (interpret mode)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from fdllm_jax import masks
from pallas_kernels import _common as cm
from pallas_kernels import block_kernel as bk
from pallas_kernels.ptxas_report import lower_for_hopper

@pytest.fixture(autouse=True)
def _full_float32_matmuls():
  """Interpreted kernels run XLA dots: keep them float32 on a GPU backend too (no TF32)."""
  with jax.default_matmul_precision("float32"):
    yield


# Small tiles so that small problems still span several tiles (and every loop kind runs).
SMALL = bk.Tiling(fwd_q=32, fwd_k=16, dq_q=16, dq_k=32, dkv_q=32, dkv_k=16)


def _mask_object(kind, block_size, num_queries):
  if kind in bk.TRAINING_KINDS:
    return masks.Training(block_size, bk.stream_length(kind, num_queries),
                          bk.TRAINING_KINDS[kind])
  return {"causal": masks.Causal(), "block_causal": masks.BlockCausal(block_size)}[kind]


def dense_tile_classes(kind, num_queries, num_keys, block_size, tile_q, tile_k):
  """0 hidden / 1 partly visible / 2 fully visible (complete tiles only), from the dense mask."""
  allowed = masks.dense(_mask_object(kind, block_size, num_queries), num_queries, num_keys)
  nq, nk = cm.cdiv(num_queries, tile_q), cm.cdiv(num_keys, tile_k)
  out = np.zeros((nq, nk), np.int8)
  for i in range(nq):
    for j in range(nk):
      tile = allowed[i * tile_q:(i + 1) * tile_q, j * tile_k:(j + 1) * tile_k]
      complete = (i + 1) * tile_q <= num_queries and (j + 1) * tile_k <= num_keys
      out[i, j] = 2 if (tile.all() and complete) else int(tile.any())
  return out


@pytest.mark.parametrize("kind", bk.KINDS)
def test_mask_allowed_matches_masks_module(kind):
  t = 144 if kind == "training_shared" else 96   # L = 48 for both training kinds
  for block_size in (8, 16, 48):
    got = np.asarray(bk.mask_allowed(kind, np.arange(t)[:, None], np.arange(t)[None, :],
                                     block_size=block_size, seq_len=bk.stream_length(kind, t)))
    np.testing.assert_array_equal(got, masks.dense(_mask_object(kind, block_size, t), t, t))


@pytest.mark.parametrize("kind", bk.KINDS)
def test_mask_allowed_from_index_vectors_matches_the_tile_form(kind):
  """The Mosaic kernels pass index vectors and broadcast each index's stream and block onto
  the tile (``q_to_tile`` / ``k_to_tile``); the padding checks of ``Geometry.allowed`` too."""
  t, s = (144, 150) if kind == "training_shared" else (96, 100)
  geom = bk.Geometry(kind=kind, block_size=16, num_queries=t, num_keys=t - 3, t_pad=t,
                     s_pad=s, head_dim_pad=64, num_heads=1, num_kv_heads=1, scale=1.0,
                     tiling=None, interpret=True, poison=False)
  q_vec, k_vec = jnp.arange(t, dtype=jnp.int32), jnp.arange(s, dtype=jnp.int32)
  tile_form = geom.allowed(q_vec[:, None], k_vec[None, :])
  vector_form = geom.allowed(q_vec, k_vec, lambda x: jnp.broadcast_to(x[:, None], (t, s)),
                             lambda x: jnp.broadcast_to(x[None, :], (t, s)))
  assert vector_form.shape == (t, s)
  np.testing.assert_array_equal(vector_form, tile_form)
  assert not np.asarray(tile_form)[:, t - 3:].any()   # keys past num_keys hidden


CASES = [
    # kind, T, S, block size, tile_q, tile_k
    ("causal", 50, 50, 8, 16, 16), ("causal", 64, 40, 8, 32, 16), ("causal", 33, 70, 8, 16, 32),
    ("block_causal", 96, 96, 32, 32, 16), ("block_causal", 40, 96, 8, 16, 64),
    ("block_causal", 128, 128, 16, 64, 32),
    ("training", 128, 128, 16, 16, 32), ("training", 128, 128, 32, 64, 16),
    ("training", 96, 96, 16, 32, 32),   # L=48: tiles straddle the x_t / x_0 boundary
    ("training", 112, 112, 8, 16, 64),  # L=56
    ("training_shared", 192, 192, 32, 64, 16),  # L=64: tiles inside the streams
    ("training_shared", 144, 144, 16, 16, 32),  # L=48: tiles straddle stream boundaries
    ("training_shared", 168, 168, 8, 16, 64),   # L=56
    ("training_shared", 96, 96, 8, 64, 64),     # L=32: the first tile spans two noisy streams
]


@pytest.mark.parametrize("kind,t,s,block_size,tile_q,tile_k", CASES)
def test_visited_tiles_match_dense_mask(kind, t, s, block_size, tile_q, tile_k):
  ref = dense_tile_classes(kind, t, s, block_size, tile_q, tile_k)
  length = bk.stream_length(kind, t)
  aligned = length is None or (length % tile_q == 0 and length % tile_k == 0)
  for direction in ("fwd", "bwd"):
    got = bk.visited_tiles(kind, num_queries=t, num_keys=s, block_size=block_size,
                           tile_q=tile_q, tile_k=tile_k, direction=direction)
    # Exactly the tiles with a visible element are visited: no hidden tile is ever loaded.
    np.testing.assert_array_equal(got > 0, ref > 0, err_msg=direction)
    # A tile run without masking is really fully visible.
    assert not np.any((got == 2) & (ref != 2)), direction
    if aligned:  # tiles inside one stream: every fully visible tile skips the mask arithmetic
      np.testing.assert_array_equal(got, ref, err_msg=direction)


def test_training_mask_at_4096_skips_three_quarters():
  """2L = 4096, block 32, the GPU default tiles (64 x 64 in every pass)."""
  t, block_size = 4096, 32
  tiling = bk.Tiling()
  allowed = masks.dense(masks.Training(block_size, t // 2), t, t)
  for direction, tq, tk in (("fwd", tiling.fwd_q, tiling.fwd_k),
                            ("bwd", tiling.dkv_q, tiling.dkv_k)):
    got = bk.visited_tiles("training", num_queries=t, num_keys=t, block_size=block_size,
                           tile_q=tq, tile_k=tk, direction=direction)
    tiles = allowed.reshape(t // tq, tq, t // tk, tk)
    expected_visited = int(tiles.any(axis=(1, 3)).sum())
    expected_full = int(tiles.all(axis=(1, 3)).sum())
    assert int((got > 0).sum()) == expected_visited
    assert int((got == 2).sum()) == expected_full
    skipped = 1 - expected_visited / got.size
    assert 0.70 < skipped < 0.76, skipped   # dense visibility: (n + 1) / (4 n), n = L / B
    if direction == "fwd":
      per_q_tile = bk.visited_key_tiles("training", t, t, block_size, tq, tk)
      np.testing.assert_array_equal(per_q_tile, tiles.any(axis=(1, 3)).sum(axis=1))
  assert 0.24 < allowed.mean() < 0.26


def test_shared_clean_stream_visits_three_quarters_of_two_views_tiles():
  """x_t^A ++ x_t^B ++ x_0 (3L) against two x_t ++ x_0 sequences (2L each): L = 1024, B = 32,
  64 x 64 tiles. Both noisy streams read the one clean stream, so a quarter of the tiles go."""
  length, block_size = 1024, 32
  for direction in ("fwd", "bwd"):
    shared = bk.visited_tiles("training_shared", num_queries=3 * length, num_keys=3 * length,
                              block_size=block_size, tile_q=64, tile_k=64, direction=direction)
    two = bk.visited_tiles("training", num_queries=2 * length, num_keys=2 * length,
                           block_size=block_size, tile_q=64, tile_k=64, direction=direction)
    ratio = int((shared > 0).sum()) / (2 * int((two > 0).sum()))
    assert 0.73 < ratio < 0.77, (direction, ratio)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _inputs(seed, batch, t, s, hq, hkv, d, dtype):
  kq, kk, kv, kc = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(kq, (batch, t, hq, d), jnp.float32).astype(dtype)
  k = jax.random.normal(kk, (batch, s, hkv, d), jnp.float32).astype(dtype)
  v = jax.random.normal(kv, (batch, s, hkv, d), jnp.float32).astype(dtype)
  cot = jax.random.normal(kc, (batch, t, hq, d), jnp.float32).astype(dtype)
  return q, k, v, cot


KERNEL_CASES = [
    # kind, T, S, Hq, Hkv, D, block, dtype   (lengths off the tile grid, GQA 2 / 1 / 7)
    ("causal", 50, 50, 4, 2, 32, 8, jnp.float32),
    ("block_causal", 40, 56, 2, 2, 24, 8, jnp.float32),
    ("training", 48, 48, 7, 1, 16, 8, jnp.float32),
    ("training", 64, 64, 4, 2, 32, 16, jnp.bfloat16),
    ("training_shared", 72, 72, 7, 1, 16, 8, jnp.float32),    # L=24
    ("training_shared", 96, 96, 4, 2, 32, 16, jnp.bfloat16),  # L=32
]


@pytest.mark.parametrize("kind,t,s,hq,hkv,d,block_size,dtype", KERNEL_CASES)
def test_forward_and_gradients_match_reference(kind, t, s, hq, hkv, d, block_size, dtype):
  seed = hash((kind, t, s, hq)) % 2**31   # fresh inputs per case
  q, k, v, cot = _inputs(seed, 2, t, s, hq, hkv, d, dtype)
  tol = 1e-5 if dtype == jnp.float32 else 1e-2

  def kernel(q, k, v):
    return bk.block_attention(q, k, v, kind=kind, block_size=block_size, interpret=True,
                              tiling=SMALL, poison_outputs=True)

  def reference(q, k, v):
    return bk.block_attention_reference(q, k, v, kind=kind, block_size=block_size)

  out, vjp = jax.vjp(kernel, q, k, v)
  ref_out, ref_vjp = jax.vjp(reference, q, k, v)
  assert out.dtype == dtype and out.shape == q.shape
  assert np.all(np.isfinite(np.asarray(out, np.float32)))
  assert _rel(out, ref_out) <= tol
  for name, g, g_ref in zip("qkv", vjp(cot), ref_vjp(cot)):
    assert g.shape == g_ref.shape and g.dtype == dtype, name
    assert np.all(np.isfinite(np.asarray(g, np.float32))), name
    assert _rel(g, g_ref) <= tol, (name, _rel(g, g_ref))


def test_kernels_run_with_jax_enable_x64():
  """Index maps mixed int32 program ids with Python ints, int64 under 64-bit JAX."""
  q, k, v, cot = _inputs(4, 1, 40, 40, 4, 2, 16, jnp.float32)
  fn = lambda q, k, v: bk.block_attention(q, k, v, kind="training", block_size=4,  # noqa: E731
                                          interpret=True, tiling=SMALL)
  with jax.enable_x64(True):
    out, vjp = jax.vjp(fn, q, k, v)
    grads = vjp(cot)
  ref_out, ref_vjp = jax.vjp(lambda q, k, v: bk.block_attention_reference(
      q, k, v, kind="training", block_size=4), q, k, v)
  assert _rel(out, ref_out) <= 1e-5
  for g, g_ref in zip(grads, ref_vjp(cot)):
    assert _rel(g, g_ref) <= 1e-5


def test_padded_outputs_are_all_written():
  """The raw (padded) kernel outputs hold no poison: every element of every tile is written."""
  kind, t, block_size = "training", 48, 8
  q, k, v, cot = _inputs(3, 1, t, t, 2, 1, 16, jnp.float32)
  geom = bk.Geometry(kind=kind, block_size=block_size, num_queries=t, num_keys=t, t_pad=64,
                     s_pad=64, head_dim_pad=16, num_heads=2, num_kv_heads=1, scale=0.25,
                     tiling=SMALL, interpret=True, poison=True)
  pad = lambda x: cm.pad_axis(x, 1, 64)  # noqa: E731
  o, lse = bk._forward(pad(q), pad(k), pad(v), geom)
  grads = bk.backward(pad(q), pad(k), pad(v), o, lse, pad(cot), geom)
  for x in (o, lse, *grads):
    assert np.all(np.isfinite(np.asarray(x)))
  *_, o32 = bk._forward(pad(q), pad(k), pad(v), geom, float32_out=True)  # bf16's residual
  np.testing.assert_array_equal(np.asarray(o32), np.asarray(o))


def _float64_gradients(q, k, v, cot, kind, block_size):
  """dq, dk, dv of the masked attention in float64 numpy, from the spec's mask."""
  q, k, v, cot = (np.asarray(x, np.float64) for x in (q, k, v, cot))
  (_, t, hq, d), (s, hkv) = q.shape, k.shape[1:3]
  k, v = np.repeat(k, hq // hkv, axis=2), np.repeat(v, hq // hkv, axis=2)
  allowed = np.asarray(bk.mask_allowed(kind, np.arange(t)[:, None], np.arange(s)[None, :],
                                       block_size=block_size, seq_len=bk.stream_length(kind, t)))
  scores = np.where(allowed, np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(d), -np.inf)
  p = np.exp(scores - scores.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  dp = np.einsum("bthd,bshd->bhts", cot, v)
  ds = p * (dp - (p * dp).sum(-1, keepdims=True)) / np.sqrt(d)
  per_head = lambda x: x.reshape(*x.shape[:2], hkv, hq // hkv, d).sum(3)  # noqa: E731
  return (np.einsum("bhts,bshd->bthd", ds, k),
          per_head(np.einsum("bhts,bthd->bshd", ds, q)),
          per_head(np.einsum("bhts,bthd->bshd", p, cot)))


@pytest.mark.parametrize("t", [2, 8])
def test_bfloat16_gradients_are_as_accurate_as_the_reference(t):
  """At tiny T the backward's delta = rowsum(o * do) cancels against dP; from a bfloat16 o
  (FlashAttention-2's residual) dq / dk were 2-3x less accurate than xla's. Float64 truth."""
  errors = {"kernel": [], "xla": []}
  for seed in range(6):
    q, k, v, cot = _inputs(seed, 1, t, t, 2, 1, 16, jnp.bfloat16)
    truth = _float64_gradients(q, k, v, cot, "causal", 1)
    for name, fn in (("kernel", functools.partial(bk.block_attention, interpret=True)),
                     ("xla", bk.block_attention_reference)):
      _, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, kind="causal", block_size=1), q, k, v)
      errors[name].append([_rel(g, g_true) for g, g_true in zip(vjp(cot), truth)])
  kernel, xla = np.max(errors["kernel"], axis=0), np.max(errors["xla"], axis=0)
  assert np.all(kernel <= 1.5 * xla + 1e-3), (kernel, xla)


def test_poisoning_exposes_an_unwritten_element():
  """Negative control: a kernel that skips a row leaves the poison (NaN) visible."""
  geom = bk.Geometry(kind="causal", block_size=1, num_queries=16, num_keys=16, t_pad=16,
                     s_pad=16, head_dim_pad=16, num_heads=1, num_kv_heads=1, scale=1.0,
                     tiling=SMALL, interpret=True, poison=True)

  def lazy_kernel(x_ref, o_ref):
    o_ref[pl.ds(0, 8), :] = x_ref[pl.ds(0, 8), :]   # rows 8.. never written

  spec = pl.BlockSpec((16, 16), lambda i: (0, 0))
  x = jnp.ones((16, 16), jnp.float32)
  [out] = bk._call(lazy_kernel, geom, grid=(1,), in_specs=[spec], out_specs=[spec],
                   out_shape=[jax.ShapeDtypeStruct((16, 16), jnp.float32)], args=(x,),
                   num_warps=4, name="lazy")
  out = np.asarray(out)
  assert np.all(out[:8] == 1) and np.all(np.isnan(out[8:]))


def test_rejects_bad_arguments():
  q = jnp.zeros((1, 48, 2, 16))
  k = jnp.zeros((1, 48, 1, 16))
  with pytest.raises(ValueError, match="kind"):
    bk.block_attention(q, k, k, kind="sliding", block_size=8, interpret=True)
  with pytest.raises(ValueError, match="2L"):
    bk.block_attention(q, k, k, kind="training", block_size=16, interpret=True)  # L=24
  with pytest.raises(ValueError, match="3L"):
    bk.block_attention(q, k, k, kind="training_shared", block_size=32, interpret=True)  # L=16
  with pytest.raises(ValueError, match="power of two"):
    bk.Tiling(fwd_q=48)
  with pytest.raises(ValueError, match="multiple"):
    bk.block_attention(jnp.zeros((1, 8, 3, 16)), jnp.zeros((1, 8, 2, 16)),
                       jnp.zeros((1, 8, 2, 16)), kind="causal", block_size=1, interpret=True)
  for q_shape, k_shape in [((0, 8, 2, 16), (0, 8, 1, 16)), ((1, 0, 2, 16), (1, 8, 1, 16)),
                           ((1, 8, 2, 16), (1, 0, 1, 16)), ((1, 8, 2, 0), (1, 8, 1, 0))]:
    with pytest.raises(ValueError, match="must have no empty axis"):
      bk.block_attention(jnp.zeros(q_shape), jnp.zeros(k_shape), jnp.zeros(k_shape),
                         kind="causal", block_size=1, interpret=True)


def test_segments_work_on_traced_indices():
  """The kernels call the tile logic on traced program ids: it must trace and agree."""
  kw = dict(num_queries=96, num_keys=96, block_size=16, tile_q=32, tile_k=16)
  traced = jax.jit(lambda i: [tuple(vars(s).values())
                              for s in bk.key_tile_segments("training", i, **kw)])
  for i in range(3):
    eager = [tuple(int(x) for x in vars(s).values())
             for s in bk.key_tile_segments("training", i, **kw)]
    assert [tuple(int(x) for x in seg) for seg in traced(jnp.int32(i))] == eager


def lower_for_gpu(fn, *args):
  """StableHLO text of ``fn`` lowered for CUDA from this (CPU) machine: runs the Pallas ->
  Triton lowering (catches unsupported ops and non-power-of-two tiles) without a GPU."""
  return lower_for_hopper(fn, *args).as_text()


@pytest.mark.parametrize("kind", bk.KINDS)
def test_forward_and_backward_lower_to_triton(kind):
  t = 384 if kind == "training_shared" else 320
  q = jnp.zeros((1, t, 12, 128), jnp.bfloat16)
  k = jnp.zeros((1, t, 2, 128), jnp.bfloat16)

  def fwd_bwd(q, k, v):
    out, vjp = jax.vjp(lambda *a: bk.block_attention(*a, kind=kind, block_size=32), q, k, v)
    return out, vjp(out)

  text = lower_for_gpu(fwd_bwd, q, k, k)
  assert text.count("xla.gpu.triton") == 3   # forward, dQ, dK/dV: all three are kernels
