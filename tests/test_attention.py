"""fdllm_jax.attention: routing, and every implementation against the xla reference.

On CPU the Pallas kernels run in interpret mode (``interpret=None`` picks it) and "cudnn" runs
``jax.nn.dot_product_attention``'s xla implementation with the same mapped arguments; "triton"
needs a GPU with jax-triton and is skipped elsewhere.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdllm_jax import attention as attn
from fdllm_jax import masks

ON_CPU = jax.default_backend() == "cpu"
# Compiled Pallas kernels multiply float32 in TF32 on a GPU (like XLA's default there).
F32_TOL = 1e-5 if ON_CPU else 5e-3


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _qkv(seed, batch, t, s, hq, hkv, d, dtype=jnp.float32):
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
  return (jax.random.normal(kq, (batch, t, hq, d), jnp.float32).astype(dtype),
          jax.random.normal(kk, (batch, s, hkv, d), jnp.float32).astype(dtype),
          jax.random.normal(kv, (batch, s, hkv, d), jnp.float32).astype(dtype))


def test_default_implementation_is_xla_blocks_on_cpu():
  assert attn.default_implementation() == "xla_blocks"


def test_routes():
  q, k = jnp.zeros((2, 16, 4, 16)), jnp.zeros((2, 16, 2, 16))
  window_q = jnp.zeros((2, 8, 4, 16))
  lengths = jnp.asarray([3, 16])
  r = attn.route("pallas", masks.Causal(), q, k)
  assert (r.path, r.kind, r.fallback) == ("block", "causal", False)
  r = attn.route("pallas", masks.BlockCausal(4), q, k, q_offset_B=np.zeros(2, np.int32))
  assert (r.path, r.kind, r.block_size) == ("block", "block_causal", 4)
  r = attn.route("pallas", masks.Training(4, 8), q, k)
  assert (r.path, r.kind, r.block_size) == ("block", "training", 4)
  shared_q, shared_k = jnp.zeros((2, 24, 4, 16)), jnp.zeros((2, 24, 2, 16))
  r = attn.route("pallas", masks.Training(4, 8, num_noisy_streams=2), shared_q, shared_k)
  assert (r.path, r.kind, r.block_size) == ("block", "training_shared", 4)
  assert attn.route("pallas", masks.Full(), window_q, k, kv_lengths_B=lengths).path == "window"
  assert attn.route("triton", masks.Full(), window_q, k,
                    kv_lengths_B=lengths).path == "triton_window"
  assert attn.route("triton", masks.Causal(), q, k).path == "block"
  assert attn.route("cudnn", masks.Training(4, 8), q, k).path == "cudnn"
  assert attn.route("xla", masks.Causal(), q, k) == attn.Route("xla")
  assert attn.route("xla", masks.Training(4, 8), q, k) == attn.Route("xla")
  assert attn.route("xla_blocks", masks.Training(4, 8), q, k) == attn.Route(
      "xla_training", kind="training", block_size=4)
  assert attn.route("xla_blocks", masks.Training(4, 8, 2), shared_q, shared_k) == attn.Route(
      "xla_training", kind="training_shared", block_size=4)
  # Everything else is the xla reference itself, not a fallback.
  for mask, kwargs in [(masks.Causal(), {}), (masks.Training(4, 4), {}),
                       (masks.Training(4, 8), dict(kv_lengths_B=lengths)),
                       (masks.Full(), dict(kv_lengths_B=lengths))]:
    assert attn.route("xla_blocks", mask, q, k, **kwargs) == attn.Route("xla"), mask
  assert attn.route("splash", masks.Training(4, 8), q, k) == attn.Route("splash")  # TPU path
  # No kernel: explicit fallbacks.
  for mask, kwargs in [(masks.BlockCausal(4), dict(kv_lengths_B=lengths)),
                       (masks.Training(4, 4), {}),                   # T != 2 * seq_len
                       (masks.Training(4, 8, 2), {}),                # T != 3 * seq_len
                       (masks.Explicit(jnp.ones((16, 16), bool)), {}),
                       (masks.Full(), dict(kv_lengths_B=lengths))]:  # T=16 is fine, see below
    r = attn.route("pallas", mask, q, k, **kwargs)
    assert r.path == ("window" if isinstance(mask, masks.Full) else "xla"), mask
    assert r.fallback == (r.path == "xla")
  long_q = jnp.zeros((2, 65, 4, 16))
  assert attn.route("pallas", masks.Full(), long_q, k, kv_lengths_B=lengths).fallback
  traced = jax.jit(lambda off: attn.route("pallas", masks.BlockCausal(4), q, k,
                                          q_offset_B=off).fallback)
  assert traced(jnp.zeros(2, jnp.int32))  # traced offsets are unknown: no kernel


def test_fallback_warns_and_matches_xla():
  q, k, v = _qkv(0, 2, 8, 24, 4, 2, 16)
  kwargs = dict(mask=masks.BlockCausal(4), q_offset_B=jnp.asarray([8, 16]),
                kv_lengths_B=jnp.asarray([16, 24]))
  with pytest.warns(UserWarning, match="no kernel"):
    out = attn.attention(q, k, v, implementation="pallas", **kwargs)
  np.testing.assert_array_equal(out, attn.attention(q, k, v, implementation="xla", **kwargs))


BLOCK_CASES = [
    (masks.Causal(), 40, 40, 4, 2),
    (masks.BlockCausal(8), 40, 40, 2, 2),
    (masks.Training(8, 24), 48, 48, 7, 1),
    (masks.Training(8, 16, num_noisy_streams=2), 48, 48, 4, 2),
]


@pytest.mark.parametrize("implementation", ["pallas", "cudnn"])
@pytest.mark.parametrize("mask,t,s,hq,hkv", BLOCK_CASES)
def test_block_masks_match_xla(implementation, mask, t, s, hq, hkv):
  # cuDNN takes 16-bit inputs only (float32 would fall back to xla, with a warning).
  dtype = jnp.bfloat16 if (implementation == "cudnn" and not ON_CPU) else jnp.float32
  q, k, v = _qkv(t + hq, 2, t, s, hq, hkv, 32, dtype)
  ref = attn.attention(q, k, v, mask=mask, implementation="xla")
  with warnings.catch_warnings():
    warnings.simplefilter("error")   # a fallback warns: make it fail here
    out = attn.attention(q, k, v, mask=mask, implementation=implementation)
  assert out.shape == ref.shape and out.dtype == ref.dtype
  assert _rel(out, ref) <= (F32_TOL if dtype == jnp.float32 else 1e-2)


TRAINING_CASES = [  # (mask, query heads, kv heads)
    (masks.Training(8, 24), 7, 1),
    (masks.Training(8, 16, num_noisy_streams=2), 4, 2),
    (masks.Training(16, 16, num_noisy_streams=2), 4, 4),   # one block per stream
    (masks.Training(4, 32, num_noisy_streams=2), 6, 2),    # eight blocks per stream
]


@pytest.mark.parametrize("mask,hq,hkv", TRAINING_CASES)
def test_xla_blocks_training_mask_matches_xla_with_gradients(mask, hq, hkv):
  t = mask.total_len
  q, k, v = _qkv(t + hq, 2, t, t, hq, hkv, 16)
  cot = jax.random.normal(jax.random.PRNGKey(hq), q.shape)

  def loss(implementation):
    return lambda q, k, v: jnp.sum(cot * attn.attention(
        q, k, v, mask=mask, sm_scale=0.3, implementation=implementation))

  assert attn.route("xla_blocks", mask, q, k).path == "xla_training"
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    out = attn.attention(q, k, v, mask=mask, sm_scale=0.3, implementation="xla_blocks")
  ref = attn.attention(q, k, v, mask=mask, sm_scale=0.3, implementation="xla")
  assert out.shape == ref.shape and out.dtype == ref.dtype
  assert _rel(out, ref) <= 1e-6
  got = jax.grad(loss("xla_blocks"), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    assert _rel(g, w) <= 1e-5


def test_xla_blocks_training_mask_in_bfloat16_matches_xla():
  mask = masks.Training(8, 32, num_noisy_streams=2)
  q, k, v = _qkv(21, 2, 96, 96, 4, 2, 32, jnp.bfloat16)
  out = attn.attention(q, k, v, mask=mask, implementation="xla_blocks")
  ref = attn.attention(q, k, v, mask=mask, implementation="xla")
  assert out.dtype == jnp.bfloat16 and _rel(out, ref) <= 1e-2


def test_xla_training_attention_refuses_a_partial_span():
  q, k, v = _qkv(0, 1, 16, 16, 2, 2, 16)
  with pytest.raises(ValueError, match="T == S == mask.total_len=24; got T=16, S=16"):
    attn.xla_training_attention(q, k, v, mask=masks.Training(4, 8, num_noisy_streams=2))


@pytest.mark.parametrize("implementation", ["pallas", "cudnn"])
def test_decode_window_matches_xla(implementation):
  dtype = jnp.bfloat16 if (implementation == "cudnn" and not ON_CPU) else jnp.float32
  q, k, v = _qkv(5, 3, 8, 40, 6, 2, 16, dtype)
  lengths = jnp.asarray([1, 40, 23], jnp.int32)
  offsets = lengths - 1   # ignored by Full(): present as in the model's decode call
  kwargs = dict(mask=masks.Full(), q_offset_B=offsets, kv_lengths_B=lengths)
  ref = attn.attention(q, k, v, implementation="xla", **kwargs)
  out = attn.attention(q, k, v, implementation=implementation, **kwargs)
  assert _rel(out, ref) <= (F32_TOL if dtype == jnp.float32 else 1e-2)


@pytest.mark.parametrize("implementation", ["xla", "pallas", "cudnn"])
def test_stale_slots_past_the_lengths_never_reach_the_output(implementation):
  """A cache's slots past a row's length hold what an earlier step or prompt left there;
  NaN there must not reach the output (0 * NaN is NaN: the xla path once let it through)."""
  dtype = jnp.bfloat16 if (implementation == "cudnn" and not ON_CPU) else jnp.float32
  q, k, v = _qkv(6, 3, 8, 40, 6, 2, 16, dtype)
  lengths = jnp.asarray([1, 40, 23], jnp.int32)
  kwargs = dict(mask=masks.Full(), q_offset_B=lengths - 1, kv_lengths_B=lengths)
  stale = (jnp.arange(40)[None, :] >= lengths[:, None])[:, :, None, None]
  clean = attn.attention(q, k, v, implementation=implementation, **kwargs)
  poisoned = attn.attention(q, jnp.where(stale, jnp.nan, k), jnp.where(stale, jnp.nan, v),
                            implementation=implementation, **kwargs)
  np.testing.assert_array_equal(np.asarray(poisoned), np.asarray(clean))


def test_pallas_gradients_match_xla():
  mask = masks.Training(8, 16)
  q, k, v = _qkv(11, 1, 32, 32, 4, 2, 16)
  cot = jax.random.normal(jax.random.PRNGKey(12), q.shape)

  def loss(implementation):
    return lambda q, k, v: jnp.sum(attn.attention(q, k, v, mask=mask,
                                                  implementation=implementation) * cot)

  grads = jax.grad(loss("pallas"), argnums=(0, 1, 2))(q, k, v)
  ref = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
  for g, r in zip(grads, ref):
    assert _rel(g, r) <= F32_TOL


def test_bfloat16_pallas_matches_xla():
  mask = masks.BlockCausal(16)
  q, k, v = _qkv(13, 1, 48, 48, 4, 2, 32, jnp.bfloat16)
  out = attn.attention(q, k, v, mask=mask, implementation="pallas")
  ref = attn.attention(q, k, v, mask=mask, implementation="xla")
  assert out.dtype == jnp.bfloat16 and _rel(out, ref) <= 1e-2


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="jax-triton needs a GPU backend")
def test_triton_decode_window_matches_xla():
  q, k, v = _qkv(5, 3, 32, 256, 12, 2, 128, jnp.bfloat16)
  lengths = jnp.asarray([1, 256, 100], jnp.int32)
  kwargs = dict(mask=masks.Full(), kv_lengths_B=lengths)
  out = attn.attention(q, k, v, implementation="triton", **kwargs)
  ref = attn.attention(q, k, v, implementation="xla", **kwargs)
  assert _rel(out, ref) <= 1e-2


@pytest.mark.parametrize("implementation", ["pallas", "cudnn"])
def test_gradients_through_a_decode_window_equal_the_reference(implementation):
  """The window kernel is forward only; its gradient is the xla reference's."""
  q, k, v = _qkv(3, 2, 5, 24, 4, 2, 16)
  lengths = jnp.asarray([24, 7], jnp.int32)
  weights = jax.random.normal(jax.random.PRNGKey(9), q.shape)
  def loss(impl):
    return lambda q, k, v: jnp.sum(weights * attn.attention(
        q, k, v, mask=masks.Full(), kv_lengths_B=lengths, implementation=impl))
  assert attn.route(implementation, masks.Full(), q, k, kv_lengths_B=lengths).path in (
      "window", "cudnn")
  got = jax.grad(loss(implementation), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    assert _rel(g, w) <= 1e-5


@pytest.mark.parametrize("kwargs,message", [
    (dict(kv_lengths_B=jnp.asarray(16)), r"kv_lengths_B must be integers of shape \[B\]=\(2,\)"),
    (dict(kv_lengths_B=jnp.asarray([3.5, 16.0])), "dtype float32"),
    (dict(q_offset_B=np.zeros(3, np.int32)), r"q_offset_B must be integers of shape \[B\]"),
])
def test_per_row_indices_must_be_integers_of_shape_b(kwargs, message):
  q, k, v = _qkv(0, 2, 4, 16, 2, 2, 16)
  for implementation in ("xla", "pallas"):
    with pytest.raises(ValueError, match=message):
      attn.attention(q, k, v, mask=masks.Full(), implementation=implementation, **kwargs)


def test_a_training_mask_longer_than_its_span_is_refused():
  q, k, v = _qkv(0, 1, 24, 24, 2, 2, 16)
  for implementation in ("xla", "splash"):
    with pytest.raises(ValueError, match="Training mask spans 16 indices .* got T=24"):
      attn.attention(q, k, v, mask=masks.Training(4, 8), implementation=implementation)


def test_unknown_implementation():
  q, k, v = _qkv(0, 1, 4, 4, 2, 2, 16)
  with pytest.raises(ValueError, match="unknown"):
    attn.attention(q, k, v, implementation="flash")


# ----------------------------------------------------------------------------- kernels on a mesh

def _value_and_grads(fn, q, k, v, ct):
  out, vjp = jax.vjp(fn, q, k, v)
  return (out, *vjp(ct))


@pytest.mark.parametrize("mesh_shape,heads,kv_heads", [
    ((2, 2, 2), 4, 2),   # batch over data x fsdp, q and KV heads over tensor
    ((1, 4, 2), 4, 1),   # one KV head: each tensor shard picks it
    ((4, 1, 2), 3, 1)])  # heads the axis does not divide: batch only
def test_kernels_run_per_shard_under_a_mesh(mesh_shape, heads, kv_heads):
  """XLA's SPMD pass cannot partition a kernel call (it would gather its inputs onto every
  device): under a mesh the kernel paths run inside shard_map, with the reference's values
  and gradients; the xla path stays plain jnp for XLA to partition."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from fdllm_jax import sharding
  if jax.device_count() < 8:
    pytest.skip("needs 8 (simulated) devices")
  mesh = sharding.make_mesh(mesh_shape)
  q, k, v = _qkv(heads, 4, 128, 128, heads, kv_heads, 32)
  ct = jax.random.normal(jax.random.PRNGKey(1), q.shape)
  mask = masks.Training(16, 64)
  kernel = lambda q, k, v: attn.attention(q, k, v, mask=mask, implementation="pallas",  # noqa
                                          interpret=True)
  reference = lambda q, k, v: attn.xla_attention(q, k, v, mask=mask)  # noqa: E731
  lengths = jnp.asarray([128, 1, 77, 40], jnp.int32)
  window = lambda q, k, v: attn.attention(q[:, :8], k, v, mask=masks.Full(),  # noqa: E731
                                          kv_lengths_B=lengths, implementation="pallas",
                                          interpret=True)
  with jax.set_mesh(mesh):
    q_sharded = jax.device_put(q, NamedSharding(mesh, P(("data", "fsdp"))))
    assert "shard_map" in str(jax.make_jaxpr(kernel)(q_sharded, k, v))
    assert "shard_map" in str(jax.make_jaxpr(window)(q_sharded, k, v))
    assert "shard_map" not in str(jax.make_jaxpr(reference)(q_sharded, k, v))
    got = jax.jit(lambda *a: _value_and_grads(kernel, *a))(q_sharded, k, v, ct)
    got_window = jax.jit(window)(q_sharded, k, v)
  want = _value_and_grads(reference, q, k, v, ct)
  for g, w, what in zip(got, want, ("out", "dq", "dk", "dv")):
    assert _rel(g, w) <= 1e-5, what
  want_window = attn.xla_attention(q[:, :8], k, v, mask=masks.Full(), kv_lengths_B=lengths)
  assert _rel(got_window, want_window) <= 1e-5


def test_kernels_without_a_mesh_run_as_they_are():
  q, k, v = _qkv(0, 2, 64, 64, 2, 1, 32)
  fn = lambda q, k, v: attn.attention(q, k, v, mask=masks.Causal(),  # noqa: E731
                                      implementation="pallas", interpret=True)
  assert "shard_map" not in str(jax.make_jaxpr(fn)(q, k, v))
