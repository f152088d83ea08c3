"""Numerical parity of the NNX model against transformers' Qwen2 / Llama (torch, CPU)."""

import numpy as np
import pytest

import fdllm_jax
from fdllm_jax import masks
from fdllm_jax.cache import KVCache
from tests import hf_models

CASES = {
    # name: (model_type, config overrides)
    "qwen2_gqa2_untied": ("qwen2", dict()),
    "qwen2_mha_tied": ("qwen2", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "qwen2_gqa3_oddsizes": ("qwen2", dict(hidden_size=72, num_attention_heads=6,
                                         num_key_value_heads=2, vocab_size=389,
                                         intermediate_size=100, rope_theta=1e6)),
    "llama_gqa2_tied": ("llama", dict(tie_word_embeddings=True)),
    "llama_mha_headdim": ("llama", dict(num_key_value_heads=4, head_dim=32)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
  model_type, overrides = CASES[request.param]
  config = hf_models.tiny_config(model_type, **overrides)
  directory = str(tmp_path_factory.mktemp(request.param))
  torch_model = hf_models.save_random_model(directory, config, seed=len(request.param))
  return torch_model, directory, config


def _rel_err(a, b):
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _ids(vocab, shape, seed=0):
  return np.random.RandomState(seed).randint(0, vocab, shape)


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_causal_parity(case, dtype, tol):
  torch_model, directory, config = case
  ids = _ids(config.vocab_size, (2, 37))
  ref = hf_models.torch_logits(torch_model, ids)
  ours = np.asarray(fdllm_jax.compute_logits(fdllm_jax.load_model(directory, dtype=dtype), ids))
  assert ours.dtype == np.float32
  assert _rel_err(ours, ref) <= tol


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 2e-2)])
def test_block_causal_parity_against_4d_mask(case, dtype, tol):
  torch_model, directory, config = case
  ids = _ids(config.vocab_size, (2, 40), seed=1)
  block = 8
  allowed = masks.dense(masks.BlockCausal(block), 40, 40)
  ref = hf_models.torch_logits(torch_model, ids, np.broadcast_to(allowed, (2, 1, 40, 40)).copy())
  model = fdllm_jax.load_model(directory, dtype=dtype)
  ours = np.asarray(fdllm_jax.compute_logits(model, ids, attention="block_causal",
                                             block_size=block))
  assert _rel_err(ours, ref) <= tol
  # and it really differs from causal: the mask reaches the model
  causal = np.asarray(fdllm_jax.compute_logits(model, ids))
  assert _rel_err(ours, causal) > 2 * tol


def test_cache_path_equals_full_sequence(case):
  """Prefill into a cache then decode a chunk == one full causal pass (the call decode uses)."""
  _, directory, config = case
  model = fdllm_jax.load_model(directory)
  ids = _ids(config.vocab_size, (2, 24), seed=2)
  full, _ = model(np.asarray(ids, np.int32), mask=masks.Causal())
  cache = KVCache.init(model.config, batch_size=2, max_len=32)
  first, cache = model(np.asarray(ids[:, :16], np.int32), mask=masks.Causal(), cache=cache,
                       write_start=0)
  cache = cache.with_lengths(16)
  rest, cache = model(np.asarray(ids[:, 16:], np.int32), mask=masks.Causal(), cache=cache)
  np.testing.assert_allclose(np.concatenate([first, rest], axis=1), full, rtol=1e-5, atol=1e-5)
  # per-row write starts (ragged rows) give the same as a shared start
  cache2 = KVCache.init(model.config, batch_size=2, max_len=32)
  _, cache2 = model(np.asarray(ids[:, :16], np.int32), mask=masks.Causal(), cache=cache2,
                    write_start=np.array([0, 0], np.int32))
  rest2, _ = model(np.asarray(ids[:, 16:], np.int32), mask=masks.Causal(),
                   cache=cache2.with_lengths(np.array([16, 16])))
  np.testing.assert_allclose(rest2, rest, rtol=1e-6, atol=1e-6)


def test_training_mask_call_matches_explicit_mask(case):
  """The Training mask object and the same mask as an explicit array agree."""
  _, directory, config = case
  model = fdllm_jax.load_model(directory)
  ids = np.asarray(_ids(config.vocab_size, (1, 32), seed=3), np.int32)
  positions = np.concatenate([np.arange(16), np.arange(16)])[None]
  mask = masks.Training(block_size=8, seq_len=16)
  by_fn, _ = model(ids, positions, mask=mask)
  by_array, _ = model(ids, positions, mask=masks.Explicit(masks.dense(mask, 32, 32)))
  np.testing.assert_allclose(by_fn, by_array, rtol=1e-6, atol=1e-6)


def test_remat_gives_same_gradients(tiny_qwen_dir):
  import jax
  import jax.numpy as jnp
  from flax import nnx
  model = fdllm_jax.load_model(tiny_qwen_dir)
  ids = jnp.asarray(_ids(517, (1, 16), seed=4), jnp.int32)

  def loss(m):
    return jnp.mean(m(ids)[0] ** 2)

  plain = nnx.grad(loss)(model)
  model.remat = True
  rematted = nnx.grad(loss)(model)
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(rematted)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_dense_is_nnx_linear_on_flattened_tokens():
  """``model.Dense`` keeps nnx.Linear's parameters and result; only the matmul's shape changes."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from fdllm_jax import model as model_lib
  dense = model_lib.Dense(6, 5, use_bias=True, rngs=nnx.Rngs(0))
  linear = nnx.Linear(6, 5, use_bias=True, rngs=nnx.Rngs(0))
  assert set(nnx.state(dense, nnx.Param)) == {"kernel", "bias"}
  nnx.update(linear, nnx.state(dense))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 4, 6))
  got, want = dense(x), linear(x)
  assert got.shape == (2, 3, 4, 5)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(dense(x[0, 0, 0])), np.asarray(want[0, 0, 0]),
                             rtol=1e-6, atol=1e-6)
  grads = jax.grad(lambda m: jnp.sum(jnp.sin(m(x))))
  for g, w in zip(jax.tree.leaves(nnx.state(grads(dense))),
                  jax.tree.leaves(nnx.state(grads(linear)))):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6)
