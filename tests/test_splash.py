"""Splash attention (the TPU path) in Pallas' TPU interpret mode, against the xla reference.

Forward and gradients for every mask kind, lengths that are multiples of the splash tile and
lengths padded to it, GQA/MQA/MHA; the tiles splash skips (from its own mask info) against the
count derived here; the shard_map wrapper on 8 simulated devices; and a TPU lowering check
(Pallas -> Mosaic, no TPU needed) so shape rules a CPU interpreter ignores are caught here.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from fdllm_jax import attention, masks, sharding, splash

TILE_128 = splash.SplashBlocks(128, 128, 128)


def _inputs(seed, batch, num_q, num_k, heads, kv_heads, head_dim=32, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((batch, num_q, heads, head_dim))
  k = rng.standard_normal((batch, num_k, kv_heads, head_dim))
  v = rng.standard_normal((batch, num_k, kv_heads, head_dim))
  ct = rng.standard_normal((batch, num_q, heads, head_dim))
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v, ct))


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _value_and_grads(fn, q, k, v, ct):
  out, vjp = jax.vjp(fn, q, k, v)
  return (out,) + vjp(ct)


CASES = [
    # id, mask, T (== S), heads, kv heads, blocks, kv_lengths
    ("causal-aligned-gqa2", masks.Causal(), 256, 4, 2, TILE_128, None),
    ("block-causal-padded-mqa", masks.BlockCausal(32), 200, 4, 1, TILE_128, None),
    ("training-aligned-gqa2", masks.Training(32, 128), 256, 4, 2, TILE_128, None),
    ("training-padded-gqa3", masks.Training(8, 120), 240, 6, 2, TILE_128, None),
    ("training-shared-padded-gqa2", masks.Training(16, 80, 2), 240, 4, 2, TILE_128, None),
    ("full-padded-mha-lengths", masks.Full(), 200, 2, 2, TILE_128, (200, 77)),
    ("block-causal-24-tiles", masks.BlockCausal(24), 240, 4, 2, TILE_128, None),
    ("block-causal-default-blocks", masks.BlockCausal(32), 384, 2, 1, None, None),
]


@pytest.mark.parametrize("name,mask,length,heads,kv_heads,blocks,lengths", CASES,
                         ids=[c[0] for c in CASES])
def test_forward_and_gradients_match_xla(name, mask, length, heads, kv_heads, blocks, lengths):
  q, k, v, ct = _inputs(len(name), 2, length, length, heads, kv_heads)
  kv_lengths = None if lengths is None else jnp.asarray(lengths, jnp.int32)
  ours = jax.jit(lambda *a: _value_and_grads(
      lambda q, k, v: splash.splash_attention(q, k, v, mask=mask, kv_lengths_B=kv_lengths,
                                              blocks=blocks, interpret=True), *a))
  ref = jax.jit(lambda *a: _value_and_grads(
      lambda q, k, v: attention.xla_attention(q, k, v, mask=mask, kv_lengths_B=kv_lengths), *a))
  for got, want, what in zip(ours(q, k, v, ct), ref(q, k, v, ct), ("out", "dq", "dk", "dv")):
    assert got.shape == want.shape, what
    assert _rel(got, want) <= 1e-5, (what, _rel(got, want))


def test_bfloat16_close_to_xla():
  q, k, v, ct = _inputs(3, 1, 256, 256, 2, 1, dtype=jnp.bfloat16)
  mask = masks.Training(32, 128)
  got = splash.splash_attention(q, k, v, mask=mask, blocks=TILE_128, interpret=True)
  want = attention.xla_attention(q, k, v, mask=mask)
  assert _rel(got, want) <= 1e-2


@pytest.mark.parametrize("mask", [masks.Causal(), masks.BlockCausal(32), masks.BlockCausal(16),
                                  masks.Training(32, 96), masks.Training(32, 64, 2),
                                  masks.Training(16, 48, 2), masks.Full()], ids=repr)
def test_kernel_mask_function_equals_mask(mask):
  """The shift/compare form the kernel evaluates equals the mask, on numpy and jnp inputs."""
  fn = splash.kernel_mask_fn(mask)
  n = mask.total_len if isinstance(mask, masks.Training) else 192
  want = masks.dense(mask, n, n)
  q, k = np.arange(n)[:, None], np.arange(n)[None, :]
  np.testing.assert_array_equal(np.broadcast_to(fn(q, k), (n, n)), want)
  np.testing.assert_array_equal(np.asarray(fn(jnp.asarray(q), jnp.asarray(k))), want)
  hidden_keys = splash.kernel_mask_fn(mask, n - 42)(q, k)
  np.testing.assert_array_equal(hidden_keys, want & (k < n - 42))
  assert splash.kernel_mask_fn(mask) is fn  # cached: one static kernel argument per mask
  assert splash.kernel_mask_fn(masks.BlockCausal(24)) is None  # not a power of two: tile mask


# ----------------------------------------------------------------------------- block sparsity

def _training_visited_square(seq_len, tile, block):
  """Tiles of the 2L x 2L training mask a (tile x tile) kernel visits, derived by hand.

  With m = L / tile tiles per stream: noisy->noisy only the m diagonal tiles (a block sees
  itself); noisy->clean the tiles on or below the diagonal when a tile holds more than one
  block (some query block is later than some key block inside a diagonal tile), strictly below
  it when tile == block; clean->clean block-causal, on or below the diagonal; clean->noisy none.
  """
  m = seq_len // tile
  lower_with_diagonal = m * (m + 1) // 2
  noisy_clean = lower_with_diagonal if tile > block else m * (m - 1) // 2
  return m + noisy_clean + lower_with_diagonal, (2 * m) ** 2


def _block_causal_visited_square(length, tile):
  m = length // tile
  return m * (m + 1) // 2, m * m


def _dense_tile_count(mask, length, bq, bkv):
  allowed = masks.dense(mask, length, length)
  tiles = allowed.reshape(length // bq, bq, length // bkv, bkv).any(axis=(1, 3))
  return int(tiles.sum()), tiles.size


def test_training_mask_skips_three_quarters_at_4096():
  """2L = 4096, B = 32: splash's own mask info against the hand derivation and the dense mask."""
  seq_len, block = 2048, 32
  mask = masks.Training(block, seq_len)
  kernel = splash.splash_kernel(mask, 2 * seq_len, 2 * seq_len, 1, 1, TILE_128, interpret=True)
  stats = splash.skip_stats(kernel, 2 * seq_len, 2 * seq_len)
  visited, total = _training_visited_square(seq_len, 128, block)
  assert (stats.visited, stats.total) == (visited, total)
  assert (stats.visited, stats.total) == _dense_tile_count(mask, 2 * seq_len, 128, 128)
  assert stats.skipped_fraction == pytest.approx(0.75 - 1 / (2 * (seq_len // 128)))  # 0.71875
  # At the granularity of the mask's own blocks (B x B tiles) the skip is 3/4 - 1/(4 L/B).
  visited_b, total_b = _training_visited_square(seq_len, block, block)
  assert 1 - visited_b / total_b == pytest.approx(0.75 - 1 / (4 * (seq_len // block)))  # 0.746
  # The backward's dK/dV pass walks the transposed mask: the same number of tiles.
  assert int(np.count_nonzero(np.asarray(kernel.dkv_mask_info.block_mask)[0])) == visited


@pytest.mark.parametrize("mask,length,blocks", [
    (masks.BlockCausal(32), 2048, TILE_128),
    (masks.Causal(), 2048, splash.SplashBlocks(256, 256, 256)),
    (masks.Training(32, 1024), 2048, splash.SplashBlocks(256, 256, 256)),
    (masks.Training(32, 1024), 2048, splash.SplashBlocks(128, 512, 512)),
    (masks.BlockCausal(24), 1536, splash.SplashBlocks(256, 512, 512)),
], ids=["block-causal-128", "causal-256", "training-256", "training-128x512",
        "block-causal-24-rect"])
def test_skipped_tiles_match_derivation(mask, length, blocks):
  kernel = splash.splash_kernel(mask, length, length, 2, 1, blocks, interpret=True)
  stats = splash.skip_stats(kernel, length, length)
  assert (stats.visited, stats.total) == _dense_tile_count(mask, length, blocks.block_q,
                                                           blocks.block_kv)
  assert stats.visited == int(splash.tile_visibility(mask, length, length, blocks.block_q,
                                                     blocks.block_kv).sum())
  if blocks.block_q == blocks.block_kv and isinstance(mask, masks.Training):
    assert (stats.visited, stats.total) == _training_visited_square(
        mask.seq_len, blocks.block_q, mask.block_size)
  elif blocks.block_q == blocks.block_kv:
    assert (stats.visited, stats.total) == _block_causal_visited_square(length, blocks.block_q)


def test_padded_lengths_count_padded_queries_and_hide_padded_keys():
  mask, length = masks.BlockCausal(32), 1000  # padded to 1024 with 128-tiles
  kernel = splash.splash_kernel(mask, length, length, 1, 1, TILE_128, interpret=True)
  stats = splash.skip_stats(kernel, 1024, 1024)
  visibility = splash.tile_visibility(mask, length, length, 128, 128)
  assert stats.visited == int(visibility.sum()) == 8 * 9 // 2


def test_kernels_are_cached_per_shape():
  mask = masks.Training(32, 128)
  a = splash.splash_kernel(mask, 256, 256, 4, 2, TILE_128, interpret=True)
  assert splash.splash_kernel(masks.Training(32, 128), 256, 256, 4, 2, TILE_128,
                              interpret=True) is a
  assert splash.splash_kernel(mask, 256, 256, 8, 2, TILE_128, interpret=True) is not a
  explicit = masks.Explicit(jnp.asarray(masks.dense(mask, 256, 256)))
  assert splash.splash_kernel(explicit, 256, 256, 4, 2, TILE_128, interpret=True) is not \
      splash.splash_kernel(explicit, 256, 256, 4, 2, TILE_128, interpret=True)


def test_block_choice_prefers_few_large_tiles_and_limits_padding():
  for mask, length in [(masks.Training(32, 2048), 4096), (masks.BlockCausal(32), 4000),
                       (masks.Causal(), 200), (masks.Full(), 96)]:
    blocks = splash.choose_block_sizes(mask, length, length, 128)
    for b in (blocks.block_q, blocks.block_kv, blocks.block_kv_compute):
      assert b % 128 == 0
    assert blocks.block_kv % blocks.block_kv_compute == 0
    padded = -(-length // blocks.block_q) * blocks.block_q
    assert padded - length < blocks.block_q
  assert splash.choose_block_sizes(masks.Training(32, 2048), 4096, 4096, 128).block_q >= 256
  assert splash.choose_block_sizes(masks.Causal(), 200, 200, 128).block_q == 256


def test_explicit_mask_runs_as_tile_mask():
  q, k, v, _ = _inputs(5, 2, 160, 160, 2, 1)
  allowed = masks.dense(masks.BlockCausal(32), 160, 160) & (np.arange(160)[None] % 7 != 3)
  mask = masks.Explicit(jnp.asarray(allowed))
  got = splash.splash_attention(q, k, v, mask=mask, blocks=TILE_128, interpret=True)
  want = attention.xla_attention(q, k, v, mask=mask)
  assert _rel(got, want) <= 1e-5


def test_per_row_explicit_mask_falls_back_to_xla():
  q, k, v, _ = _inputs(6, 2, 64, 64, 2, 1)
  rows = np.stack([masks.dense(masks.Causal(), 64, 64), masks.dense(masks.BlockCausal(16), 64, 64)])
  mask = masks.Explicit(jnp.asarray(rows))
  with pytest.warns(UserWarning, match="Explicit"):
    got = splash.attention(q, k, v, mask=mask, interpret=True)
  assert _rel(got, attention.xla_attention(q, k, v, mask=mask)) <= 1e-6


# ----------------------------------------------------------------------------- sharding

@pytest.mark.parametrize("heads,kv_heads,expect", [
    (4, 2, "q and kv heads split"),
    (4, 1, "q heads split, one kv head picked per shard"),
    (3, 1, "heads replicated"),
])
def test_shard_map_on_8_devices_matches_xla(heads, kv_heads, expect):
  if jax.device_count() < 8:
    pytest.skip("needs 8 (simulated) devices")
  mesh = sharding.make_mesh((2, 2, 2))
  assert splash.describe_sharding(mesh, 4, heads, kv_heads)["heads"] == expect
  mask = masks.Training(32, 128)
  q, k, v, ct = _inputs(heads, 4, 256, 256, heads, kv_heads)
  fn = lambda q, k, v: splash.attention(q, k, v, mask=mask, blocks=TILE_128, interpret=True)
  step = jax.jit(lambda *a: _value_and_grads(fn, *a))
  with jax.set_mesh(mesh):
    q_sharded = jax.device_put(q, NamedSharding(mesh, P(("data", "fsdp"))))
    assert "shard_map" in str(jax.make_jaxpr(fn)(q_sharded, k, v))
    got = step(q_sharded, k, v, ct)
  want = jax.jit(lambda *a: _value_and_grads(
      lambda q, k, v: attention.xla_attention(q, k, v, mask=mask), *a))(q, k, v, ct)
  for g, w, what in zip(got, want, ("out", "dq", "dk", "dv")):
    assert _rel(g, w) <= 1e-5, (what, _rel(g, w))


def test_without_mesh_no_shard_map():
  q, k, v, _ = _inputs(0, 1, 128, 128, 2, 1)
  fn = lambda q, k, v: splash.attention(q, k, v, mask=masks.Causal(), interpret=True)
  assert "shard_map" not in str(jax.make_jaxpr(fn)(q, k, v))


# ----------------------------------------------------------------------------- TPU lowering

def _lower_for_tpu(fn, *args):
  return jax.jit(fn).trace(*args).lower(lowering_platforms=("tpu",)).as_text()


@pytest.mark.parametrize("mask", [masks.Training(32, 256), masks.BlockCausal(24)], ids=repr)
def test_splash_lowers_to_mosaic_for_tpu(mask):
  """Pallas -> Mosaic lowering for a TPU target runs here (no TPU needed): block-shape and
  layout rules that the CPU interpreter does not enforce are checked."""
  q = jax.ShapeDtypeStruct((2, 512, 4, 128), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, 512, 2, 128), jnp.bfloat16)
  fn = lambda q, k, v: splash.splash_attention(q, k, v, mask=mask, interpret=False)
  grads = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32)), (0, 1, 2))
  assert "tpu_custom_call" in _lower_for_tpu(grads, q, kv, kv)


# ----------------------------------------------------------------------------- training step

def test_training_step_splash_equals_xla_on_8_devices(tmp_path):
  """The trainer's jitted step on a (2 data, 2 fsdp, 2 tensor) mesh: same loss and gradient
  norm with implementation="splash" (interpret mode, inside shard_map) as with "xla"."""
  if jax.device_count() < 8:
    pytest.skip("needs 8 (simulated) devices")
  from fdllm_jax.training import make_sample_data
  from fdllm_jax.training import trainer as trainer_lib

  mesh = sharding.make_mesh((2, 2, 2))
  results = {}
  for impl in ("xla", "splash"):
    config = trainer_lib.TrainConfig(
        data_files=make_sample_data.CHAT_FILE, tokenizer=make_sample_data.TOKENIZER_DIR,
        seq_len=64, block_size=16, init="scratch",
        model=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   rope_theta=10000.0),
        global_batch_size=8, learning_rate=3e-3, warmup_steps=0, checkpoint_every=100,
        export=False, progress_bar=False, async_checkpointing=False, attention_impl=impl)
    trainer = trainer_lib.Trainer(config, str(tmp_path / impl), mesh=mesh)
    state = trainer.initial_state()
    params, opt_state = state["params"], state["opt_state"]
    data = trainer.data_iterator()
    losses = []
    with jax.set_mesh(mesh):  # the context splash's shard_map takes the mesh from
      for step in range(2):
        input_ids, labels = trainer.device_batch(next(data))
        if impl == "splash" and step == 0:
          jaxpr = str(jax.make_jaxpr(trainer.train_step)(params, opt_state, input_ids, labels,
                                                         np.int32(step)))
          assert "shard_map" in jaxpr and "pallas_call" in jaxpr
        params, opt_state, metrics = trainer.train_step(params, opt_state, input_ids, labels,
                                                        np.int32(step))
        losses.append((float(metrics["loss"]), float(metrics["grad_norm"])))
    trainer.close()
    results[impl] = losses
  for (loss_x, norm_x), (loss_s, norm_s) in zip(results["xla"], results["splash"]):
    assert loss_s == pytest.approx(loss_x, rel=1e-5)
    assert norm_s == pytest.approx(norm_x, rel=1e-5)


@pytest.mark.parametrize("lengths", [None, (200, 77)])
def test_forward_and_gradients_under_x64(lengths):
  """JAX's splash kernel fails to trace with 64-bit types on (its index maps divide an int32 by
  an int64); the wrapper traces it, and its backward, with them off."""
  mask = masks.BlockCausal(32)
  with jax.enable_x64(True):
    q, k, v, ct = _inputs(5, 2, 200, 200, 4, 2)
    kv_lengths = None if lengths is None else jnp.asarray(lengths, jnp.int32)
    ours = jax.jit(lambda *a: _value_and_grads(
        lambda q, k, v: splash.splash_attention(q, k, v, mask=mask, kv_lengths_B=kv_lengths,
                                                blocks=TILE_128, interpret=True), *a))
    ref = jax.jit(lambda *a: _value_and_grads(
        lambda q, k, v: attention.xla_attention(q, k, v, mask=mask, kv_lengths_B=kv_lengths),
        *a))
    for got, want, what in zip(ours(q, k, v, ct), ref(q, k, v, ct), ("out", "dq", "dk", "dv")):
      assert got.dtype == want.dtype == jnp.float32, what
      assert _rel(got, want) <= 1e-5, (what, _rel(got, want))
