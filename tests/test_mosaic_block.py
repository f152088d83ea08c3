"""pallas_kernels.mosaic_block: block_attention's forward and backward on Mosaic GPU (wgmma).

Forward and gradients run in Mosaic GPU's interpreter on JAX >= 0.11 (the 3.12+ environments of
README "Tests"); on JAX 0.10 (Python 3.11, CI) those tests skip, and the tile logic, the
refusals, the routing and the lowering for an H100 (layout inference, shared-memory check)
still run.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fdllm_jax import attention as attn
from fdllm_jax import masks
from pallas_kernels import _common as cm
from pallas_kernels import block_kernel as bk
from pallas_kernels import mosaic_block as mb
from pallas_kernels import mosaic_window as mw
from tests.test_block_kernel import dense_tile_classes, lower_for_gpu
from tests.test_mosaic_window import _rel, deadlock_guard, needs_interpreter  # noqa: F401


def _inputs(seed, batch, t, hq, hkv, d, dtype=jnp.bfloat16):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(keys[0], (batch, t, hq, d)).astype(dtype)
  k = jax.random.normal(keys[1], (batch, t, hkv, d)).astype(dtype)
  v = jax.random.normal(keys[2], (batch, t, hkv, d)).astype(dtype)
  cot = jax.random.normal(keys[3], q.shape).astype(dtype)
  return q, k, v, cot


def _reference(q, k, v, **kw):
  f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
  return bk.block_attention_reference(f32(q), f32(k), f32(v), **kw)


@pytest.mark.parametrize("kind,t,block_size", [
    ("causal", 300, 1), ("block_causal", 320, 32), ("training", 512, 32),
    ("training", 192, 16),         # L = 96: query tiles straddle x_t / x_0
    ("training_shared", 384, 32),  # L = 128
    ("training_shared", 96, 8)])   # L = 32: one query tile spans all three streams
def test_kernel_tiles_visit_exactly_the_visible_tiles(kind, t, block_size):
  """The kernel's loop bounds (key_tile_segments at 128 x 64 tiles) visit every tile with a
  visible element and no other, and skip the mask only on fully visible tiles."""
  ref = dense_tile_classes(kind, t, t, block_size, mb.TILE_Q, mb.TILE_K)
  got = bk.visited_tiles(kind, num_queries=t, num_keys=t, block_size=block_size,
                         tile_q=mb.TILE_Q, tile_k=mb.TILE_K)
  np.testing.assert_array_equal(got > 0, ref > 0)
  assert not np.any((got == 2) & (ref != 2))


@needs_interpreter
@pytest.mark.usefixtures("deadlock_guard")
@pytest.mark.parametrize("kind,batch,t,hq,hkv,d,block_size", [
    ("causal", 1, 100, 2, 1, 64, 1),            # T below one query tile
    ("block_causal", 2, 300, 4, 2, 64, 32),     # ragged T, GQA 2, three query tiles
    ("training", 1, 256, 7, 1, 64, 32),         # GQA 7
    ("training", 2, 128, 2, 2, 128, 16),        # L = 64: one tile over both streams, D 128
    ("training_shared", 1, 192, 2, 1, 64, 32),  # L = 64
    ("training_shared", 1, 96, 2, 2, 64, 8)])   # L = 32, GQA 1
def test_forward_matches_the_reference(kind, batch, t, hq, hkv, d, block_size):
  """Every output element is written (the interpreter fills fresh buffers with NaN)."""
  q, k, v, _ = _inputs(t + hq, batch, t, hq, hkv, d)
  out = mb.mosaic_block_attention(q, k, v, kind=kind, block_size=block_size, interpret=True)
  ref = _reference(q, k, v, kind=kind, block_size=block_size)
  assert out.shape == q.shape and out.dtype == q.dtype
  assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
  assert _rel(out, ref) <= 1e-2


@needs_interpreter
@pytest.mark.usefixtures("deadlock_guard")
def test_forward_residuals_are_block_kernels():
  """o in float32 and the base-2 log-sum-exp: what block_kernel's backward reads."""
  q, k, v, _ = _inputs(4, 1, 256, 4, 2, 64)
  geom = bk.Geometry(kind="training", block_size=32, num_queries=256, num_keys=256, t_pad=256,
                     s_pad=256, head_dim_pad=64, num_heads=4, num_kv_heads=2, scale=0.125,
                     tiling=bk.default_tiling(64), interpret=True, poison=False)
  o, lse, o32 = mb.mosaic_forward(q, k, v, geom, float32_out=True, interpret=True)
  o_ref, lse_ref, o32_ref = bk._forward(q, k, v, geom, float32_out=True)
  np.testing.assert_allclose(np.asarray(lse), np.asarray(lse_ref), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(o32), np.asarray(o32_ref), rtol=1e-4, atol=1e-4)
  assert _rel(o, o_ref) <= 1e-2


@needs_interpreter
@pytest.mark.usefixtures("deadlock_guard")
@pytest.mark.parametrize("kind,batch,t,hq,hkv,block_size,backward", [
    ("training", 2, 256, 4, 2, 32, "mosaic"),
    ("training", 1, 192, 2, 2, 16, "mosaic"),        # L = 96: tiles straddle the streams
    ("training_shared", 1, 384, 7, 1, 32, "mosaic"),  # GQA 7: dK/dV sum seven heads
    ("block_causal", 1, 200, 2, 1, 32, "mosaic"),    # ragged T: padded queries and keys
    ("causal", 1, 130, 2, 2, 1, "mosaic"),
    ("training", 2, 256, 4, 2, 32, "pallas")])       # block_kernel's backward kernels
def test_gradients_match_the_reference(kind, batch, t, hq, hkv, block_size, backward):
  """Every gradient element is written (fresh buffers are NaN in the interpreter)."""
  q, k, v, cot = _inputs(7 + t, batch, t, hq, hkv, 64)

  def grads(fn):
    out, vjp = jax.vjp(fn, q, k, v)
    return vjp(cot.astype(out.dtype))

  got = grads(lambda *a: mb.mosaic_block_attention(*a, kind=kind, block_size=block_size,
                                                   interpret=True, backward=backward))
  ref = grads(lambda *a: _reference(*a, kind=kind, block_size=block_size))
  for name, g, r in zip(("dq", "dk", "dv"), got, ref):
    assert g.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(g.astype(jnp.float32))))
    assert _rel(g, r) <= 1e-2, name


@needs_interpreter
@pytest.mark.usefixtures("deadlock_guard")
def test_backward_on_the_shared_memory_path_and_race_detector():
  """dS and P^T through shared memory (``p_from_registers=False``, what the interpreter runs),
  three stages, JAX's race detector on the backward kernels."""
  from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
  q, k, v, cot = _inputs(21, 1, 256, 2, 1, 64)
  fn = lambda *a: mb.mosaic_block_attention(   # noqa: E731
      *a, kind="training", block_size=32, num_stages=3,
      interpret=InterpretGPUParams(detect_races=True))
  got = jax.vjp(fn, q, k, v)[1](cot)
  assert not interpret_pallas_call.get_races().races_found
  ref = jax.vjp(lambda *a: _reference(*a, kind="training", block_size=32),
                q, k, v)[1](cot.astype(jnp.float32))
  for g, r in zip(got, ref):
    assert _rel(g, r) <= 1e-2


@needs_interpreter
@pytest.mark.usefixtures("deadlock_guard")
def test_float16_scale_three_stages_and_race_detector():
  from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
  q, k, v, _ = _inputs(9, 1, 200, 2, 1, 64, jnp.float16)
  out = mb.mosaic_block_attention(q, k, v, kind="causal", block_size=1, sm_scale=0.3,
                                  num_stages=3, interpret=InterpretGPUParams(detect_races=True))
  assert not interpret_pallas_call.get_races().races_found
  ref = _reference(q, k, v, kind="causal", block_size=1, sm_scale=0.3)
  assert out.dtype == jnp.float16 and _rel(out, ref) <= 1e-2


def test_unsupported_inputs_are_refused():
  q, k, v, _ = _inputs(0, 1, 64, 2, 1, 64, jnp.float32)
  with pytest.raises(ValueError, match="bfloat16 or float16.*float32"):
    mb.mosaic_block_attention(q, k, v, kind="causal", block_size=1)
  for d in (32, 96):
    q, k, v, _ = _inputs(0, 1, 64, 2, 1, d)
    with pytest.raises(ValueError, match=f"power of two >= 64; got {d}"):
      mb.mosaic_block_attention(q, k, v, kind="causal", block_size=1)
  q, k, v, _ = _inputs(0, 1, 64, 2, 1, 64)
  with pytest.raises(ValueError, match="unknown"):
    mb.mosaic_block_attention(q, k, v, kind="sliding", block_size=1)
  with pytest.raises(ValueError, match="p_from_registers=True needs the compiled kernel"):
    mb.mosaic_block_attention(q, k, v, kind="causal", block_size=1, interpret=True,
                              p_from_registers=True)
  with pytest.raises(ValueError, match="backward='triton'; use one of"):
    mb.mosaic_block_attention(q, k, v, kind="causal", block_size=1, backward="triton")


def test_attention_routes_block_masks_to_the_kernel():
  q = jnp.zeros((1, 128, 4, 64), jnp.bfloat16)
  kv = q[:, :, :2]
  for mask in (masks.Causal(), masks.BlockCausal(32), masks.Training(32, 64)):
    chosen = attn.route("mosaic", mask, q, kv)
    assert chosen.path == "mosaic_block" and not chosen.fallback, mask
  # the pallas block kernel where wgmma does not apply (it is a kernel too: no warning)
  assert attn.route("mosaic", masks.Causal(), q.astype(jnp.float32),
                    kv.astype(jnp.float32)).path == "block"
  assert attn.route("mosaic", masks.Causal(), q[..., :32], kv[..., :32]).path == "block"
  assert attn.route("pallas", masks.Causal(), q, kv).path == "block"


@needs_interpreter
@pytest.mark.usefixtures("deadlock_guard")
def test_attention_runs_the_kernel():
  q, k, v, _ = _inputs(11, 1, 192, 4, 2, 64)
  mask = masks.BlockCausal(32)
  out = attn.attention(q, k, v, mask=mask, implementation="mosaic", interpret=True)
  ref = attn.xla_attention(q, k, v, mask=mask)
  assert _rel(out, ref) <= 1e-2


@pytest.mark.parametrize("kind,t,stages,backward", [
    ("training", 8192, 2, "mosaic"), ("training", 8192, 3, "mosaic"),
    ("training_shared", 6144, 2, "mosaic"), ("block_causal", 2048, 3, "mosaic"),
    ("causal", 4096, 2, "mosaic"), ("training", 8192, 2, "pallas")])
def test_lowers_for_hopper_within_shared_memory(kind, t, stages, backward):
  """Qwen2.5-1.5B's training shapes (12 query / 2 KV heads, D 128): forward, dQ and dK/dV are
  three Mosaic GPU kernels (with backward="pallas", the last two block_kernel's Triton)."""
  q = jnp.zeros((1, t, 12, 128), jnp.bfloat16)
  k = jnp.zeros((1, t, 2, 128), jnp.bfloat16)

  def fwd_bwd(q, k, v):
    out, vjp = jax.vjp(lambda *a: mb.mosaic_block_attention(
        *a, kind=kind, block_size=32, num_stages=stages, backward=backward), q, k, v)
    return out, vjp(out)

  text = lower_for_gpu(fwd_bwd, q, k, k)
  mosaic, triton = (1, 2) if backward == "pallas" else (3, 0)
  assert text.count("stablehlo.custom_call @mosaic_gpu") == mosaic
  assert text.count("xla.gpu.triton") == triton


def test_lowering_refuses_a_pipeline_beyond_shared_memory():
  """4 K/V stages fit the forward alone; with the backward's float32 output (training) the
  kernel is 112 bytes over an H100's 227 KiB, and Mosaic GPU says so while lowering."""
  q = jnp.zeros((1, 1024, 12, 128), jnp.bfloat16)
  k = jnp.zeros((1, 1024, 2, 128), jnp.bfloat16)
  lower_for_gpu(lambda q, k, v: mb.mosaic_block_attention(
      q, k, v, kind="causal", block_size=1, num_stages=4), q, k, k)
  with pytest.raises(ValueError, match="exceeds available shared memory"):
    lower_for_gpu(lambda q, k, v: jax.vjp(lambda *a: mb.mosaic_block_attention(
        *a, kind="causal", block_size=1, num_stages=4), q, k, v)[0], q, k, k)


def test_tiles_are_whole_warpgroups():
  assert mb.TILE_Q == mb.COMPUTE_WARPGROUPS * mw.ROWS_PER_WARPGROUP == 128
  assert cm.is_pow2(mb.TILE_K) and mb.TILE_K == 64
