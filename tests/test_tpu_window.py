"""The Pallas TPU window kernel (decoding over a ragged cache) in TPU interpret mode, and the
decoding engine with implementation="splash" against "xla"."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

import fdllm_jax
from fdllm_jax import attention, masks, splash
from fdllm_jax.config import ModelConfig
from fdllm_jax.model import Transformer
from pallas_kernels import tpu_window


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _case(seed, batch, num_q, num_k, heads, kv_heads, head_dim, lengths, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.standard_normal((batch, num_q, heads, head_dim)), dtype)
  k = rng.standard_normal((batch, num_k, kv_heads, head_dim))
  v = rng.standard_normal((batch, num_k, kv_heads, head_dim))
  clean = jnp.asarray(k, dtype), jnp.asarray(v, dtype)
  stale = np.arange(num_k)[None, :, None, None] >= np.asarray(lengths)[:, None, None, None]
  poisoned = tuple(jnp.asarray(np.where(stale, np.nan, x), dtype) for x in (k, v))
  return q, clean, poisoned


CASES = [
    # id, mask, T, S, heads, kv heads, D, q offsets, kv lengths
    ("decode-window-full", masks.Full(), 32, 256, 4, 2, 64, (0, 96, 224), (32, 128, 256)),
    ("sub-block-gqa7-d128", masks.Full(), 8, 512, 14, 2, 128, (0, 200, 504), (1, 300, 512)),
    ("ar-step-causal-mqa", masks.Causal(), 1, 384, 4, 1, 64, (0, 200, 383), (1, 201, 384)),
    ("prefill-block-causal", masks.BlockCausal(32), 96, 256, 4, 2, 64, (0, 0, 0), (96, 96, 64)),
    ("window-block-causal-s160", masks.BlockCausal(32), 24, 160, 4, 4, 32, (0, 64, 128),
     (24, 88, 152)),
]


@pytest.mark.parametrize("name,mask,num_q,num_k,heads,kv_heads,head_dim,offsets,lengths", CASES,
                         ids=[c[0] for c in CASES])
def test_kernel_matches_reference_and_ignores_stale_slots(name, mask, num_q, num_k, heads,
                                                          kv_heads, head_dim, offsets, lengths):
  q, (k, v), (k_stale, v_stale) = _case(len(name), 3, num_q, num_k, heads, kv_heads, head_dim,
                                        lengths)
  offsets, lengths = jnp.asarray(offsets, jnp.int32), jnp.asarray(lengths, jnp.int32)
  fn = splash.kernel_mask_fn(mask)
  got = tpu_window.window_attention(q, k_stale, v_stale, lengths, offsets, mask_fn=fn,
                                    key_bound_fn=splash.key_bound_fn(mask), interpret=True)
  want = tpu_window.window_attention_reference(q, k, v, lengths, offsets, mask_fn=fn)
  assert not np.isnan(np.asarray(got)).any()
  assert _rel(got, want) <= 1e-5
  # The same call through the attention entry point against the xla reference.
  via_entry = attention.attention(q, k, v, mask=mask, q_offset_B=offsets, kv_lengths_B=lengths,
                                  implementation="splash")
  ref = attention.xla_attention(q, k, v, mask=mask, q_offset_B=offsets, kv_lengths_B=lengths)
  assert _rel(via_entry, ref) <= 1e-5


@pytest.mark.parametrize("mask", [masks.Full(), masks.BlockCausal(32)])
def test_kernel_runs_with_jax_enable_x64(mask):
  """The K/V index map divided an int32 length by a Python int, int64 under 64-bit JAX."""
  q, (k, v), _ = _case(7, 2, 24, 160, 4, 2, 32, (24, 150))
  offsets, lengths = jnp.asarray([0, 128], jnp.int32), jnp.asarray([24, 150], jnp.int32)
  fn = splash.kernel_mask_fn(mask)
  with jax.enable_x64(True):
    got = tpu_window.window_attention(q, k, v, lengths, offsets, mask_fn=fn,
                                      key_bound_fn=splash.key_bound_fn(mask), interpret=True)
  want = tpu_window.window_attention_reference(q, k, v, lengths, offsets, mask_fn=fn)
  assert _rel(got, want) <= 1e-5


def test_bfloat16_close_to_reference():
  q, (k, v), _ = _case(7, 2, 32, 256, 4, 2, 64, (64, 256), dtype=jnp.bfloat16)
  lengths, offsets = jnp.asarray([64, 256]), jnp.asarray([32, 224])
  got = tpu_window.window_attention(q, k, v, lengths, offsets, interpret=True)
  want = tpu_window.window_attention_reference(q.astype(jnp.float32), k.astype(jnp.float32),
                                               v.astype(jnp.float32), lengths, offsets)
  assert _rel(got.astype(jnp.float32), want) <= 1e-2


def _derived_key_tiles(mask, offsets, lengths, num_q, bt, bk):
  """Key tiles a query tile needs: up to its row's length and the last key its mask shows."""
  tiles = []
  for off, length in zip(offsets, lengths):
    row = []
    for i in range(-(-num_q // bt)):
      last_q = off + min((i + 1) * bt, num_q) - 1
      limit = length
      if isinstance(mask, masks.BlockCausal):
        limit = min(limit, (last_q // mask.block_size + 1) * mask.block_size)
      elif isinstance(mask, masks.Causal):
        limit = min(limit, last_q + 1)
      row.append(-(-limit // bk))
    tiles.append(row)
  return np.asarray(tiles)


@pytest.mark.parametrize("mask,num_q,offsets,lengths", [
    (masks.Full(), 32, (0, 480, 1504, 0), (32, 512, 1536, 2048)),
    (masks.BlockCausal(32), 64, (0, 0, 960, 1984), (64, 2048, 1024, 2048)),
    (masks.Causal(), 1, (0, 511, 512, 2047), (1, 512, 513, 2048)),
], ids=["full", "block-causal", "causal"])
def test_key_tiles_visited_and_copied_match_derivation(mask, num_q, offsets, lengths):
  """Tiles the kernel computes (counted inside it) and copies (its K/V index map, unrolled over
  the grid) equal the derived count: nothing past a row's length or its mask's reach."""
  num_k, heads, kv_heads, head_dim = 2048, 4, 2, 128
  q, (k, v), _ = _case(1, len(offsets), num_q, num_k, heads, kv_heads, head_dim, lengths)
  offsets_B, lengths_B = jnp.asarray(offsets, jnp.int32), jnp.asarray(lengths, jnp.int32)
  bound = splash.key_bound_fn(mask)
  _, visits = tpu_window.window_attention(
      q, k, v, lengths_B, offsets_B, mask_fn=splash.kernel_mask_fn(mask), key_bound_fn=bound,
      interpret=True, count_visits=True)
  bt, nq, bk = tpu_window.choose_tiles(num_q, heads // kv_heads, num_k)
  derived = _derived_key_tiles(mask, offsets, lengths, num_q, bt, bk)
  visits = np.asarray(visits)  # [B, kv-head steps, nq]: every head step visits the same tiles
  for h in range(visits.shape[1]):
    np.testing.assert_array_equal(visits[:, h], derived)
  limits = np.asarray(tpu_window.key_limits(lengths_B, offsets_B, num_queries=num_q, bt=bt,
                                            nq=nq, key_bound_fn=bound)).reshape(-1, nq)
  copies = np.zeros_like(derived)
  for b in range(len(offsets)):
    for i in range(nq):
      fetched = [int(tpu_window.kv_block_index(j, limits[b, i], bk)) for j in range(num_k // bk)]
      copies[b, i] = len(set(fetched))  # a repeated block index is not copied again
  np.testing.assert_array_equal(copies, np.maximum(derived, 1))
  total = len(offsets) * nq * (num_k // bk)
  assert derived.sum() < total  # the ragged batch really skips work


@pytest.mark.parametrize("head_dim", [64, 128])
def test_window_kernel_lowers_to_mosaic_for_tpu(head_dim):
  q = jax.ShapeDtypeStruct((2, 32, 14, head_dim), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((2, 1024, 2, head_dim), jnp.bfloat16)
  rows = jax.ShapeDtypeStruct((2,), jnp.int32)
  mask = masks.BlockCausal(32)
  fn = lambda q, k, v, n, o: tpu_window.window_attention(
      q, k, v, n, o, mask_fn=splash.kernel_mask_fn(mask), key_bound_fn=splash.key_bound_fn(mask))
  text = jax.jit(fn).trace(q, kv, kv, rows, rows).lower(lowering_platforms=("tpu",)).as_text()
  assert "tpu_custom_call" in text


# ----------------------------------------------------------------------------- decoding engine

VOCAB, MASK, STOP = 517, 516, 515
CONFIG = ModelConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     rope_theta=10000.0)


@pytest.fixture(scope="module")
def confident_model():
  """Output head scaled up so that many tokens pass the threshold in one step."""
  model = Transformer(CONFIG, rngs=nnx.Rngs(2))
  model.lm_head.kernel[...] = model.lm_head.kernel[...] * 80.0
  return model


@pytest.fixture
def kernel_calls(monkeypatch):
  """Counts traces of the TPU window kernel, to show the engine really went through it."""
  calls = []
  original = tpu_window.window_attention

  def counting(*args, **kwargs):
    calls.append(args[0].shape)
    return original(*args, **kwargs)

  monkeypatch.setattr(tpu_window, "window_attention", counting)
  return calls


def _prompts():
  # 40 and 70 tokens: prefill of one block, rows of different lengths sharing the window;
  # caches of 128 and 160 slots (160: key tiles that are not a multiple of 128).
  return [np.random.RandomState(n).randint(0, STOP, n).tolist() for n in (40, 70)]


@pytest.mark.parametrize("dual_cache", [False, pytest.param(True, marks=pytest.mark.slow)],
                         ids=["window", "dual-cache"])
def test_generate_with_splash_equals_xla(confident_model, kernel_calls, dual_cache):
  config = fdllm_jax.DecodeConfig(block_size=32, sub_block_size=8, threshold=0.9,
                                  max_new_tokens=60, mask_id=MASK, stop_ids=(STOP,),
                                  use_dual_cache=dual_cache)
  want = fdllm_jax.generate(confident_model, _prompts(), config, attention_impl="xla")
  got = fdllm_jax.generate(confident_model, _prompts(), config, attention_impl="splash")
  assert got.tokens == want.tokens
  assert got.num_forwards == want.num_forwards
  assert got.num_forwards < sum(len(t) for t in want.tokens)  # parallel unmasking happened
  assert kernel_calls  # prefill (block-causal over the cache) and window steps
  assert any(shape[1] == 32 for shape in kernel_calls)


def test_generate_ar_with_splash_equals_xla(confident_model, kernel_calls):
  kwargs = dict(max_new_tokens=24, stop_ids=(STOP,))
  want = fdllm_jax.generate_ar(confident_model, _prompts(), attention_impl="xla", **kwargs)
  got = fdllm_jax.generate_ar(confident_model, _prompts(), attention_impl="splash", **kwargs)
  assert got.tokens == want.tokens
  assert kernel_calls
