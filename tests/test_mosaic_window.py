"""pallas_kernels.mosaic_window: plan, forward in Mosaic GPU's interpreter, lowering for Hopper.

The interpreter runs the kernel on JAX >= 0.11 (the 3.12+ environments of README "Tests"); on
JAX 0.10 (Python 3.11, CI) those tests skip and the lowering tests, which run Mosaic GPU's
layout inference and shared-memory check for an H100, still run.
"""

import faulthandler

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import mosaic_window as mw
from pallas_kernels import window_kernel as wk
from tests.test_block_kernel import lower_for_gpu

needs_interpreter = pytest.mark.skipif(
    not mw.interpreter_supported(),
    reason=f"JAX {jax.__version__}'s Mosaic GPU interpreter cannot run a transposed wgmma "
           "operand (JAX >= 0.11 can)")


@pytest.fixture
def deadlock_guard():
  """A synchronisation bug deadlocks the interpreter's threads: dump and exit, do not hang."""
  faulthandler.dump_traceback_later(600, exit=True)
  yield
  faulthandler.cancel_dump_traceback_later()


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _inputs(seed, batch, window, hq, hkv, d, smax, dtype=jnp.bfloat16):
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
  q = jax.random.normal(kq, (batch, window, hq, d), jnp.float32).astype(dtype)
  k = jax.random.normal(kk, (batch, smax, hkv, d), jnp.float32).astype(dtype)
  v = jax.random.normal(kv, (batch, smax, hkv, d), jnp.float32).astype(dtype)
  return q, k, v


@pytest.mark.parametrize("batch,window,hq,hkv,smax", [
    (8, 32, 12, 2, 16384), (1, 32, 12, 2, 16384), (8, 8, 12, 2, 16384), (8, 1, 12, 2, 16384),
    (4, 16, 16, 2, 4096), (4, 32, 14, 2, 1000), (2, 64, 4, 4, 100), (1, 1, 7, 1, 30)])
def test_plan_row_tiles_are_whole_warpgroups(batch, window, hq, hkv, smax):
  plan = mw.mosaic_plan(batch, window, hq, hkv, 128, smax)
  rows = window * (hq // hkv)
  assert plan.rows == rows and plan.tile_k == 64
  assert plan.tile_r in (64, 128, 192) and plan.rows_pad % plan.tile_r == 0
  assert rows <= plan.rows_pad < rows + plan.tile_r
  if batch * hkv < 8 or rows <= 64:   # small batches: more row tiles fill the GPU
    assert plan.tile_r == 64
  elif rows <= 192:                   # every packed row in one tile: K/V read once
    assert plan.num_row_tiles == 1
  assert (plan.num_splits - 1) * plan.chunk < smax <= plan.num_splits * plan.chunk
  if (batch, window) == (8, 32):      # Qwen2.5-1.5B's block at batch 8: one wave on an H100
    assert (plan.tile_r, plan.num_programs) == (192, 8 * 2 * 8)


CASES = [
    # batch, W, Hq, Hkv, D, Smax, lengths, splits     (row tiles: 64 / 128 / 192 rows)
    (2, 8, 4, 2, 64, 200, [150, 37], None),           # one split, a tail, a row < one tile
    (2, 1, 7, 1, 64, 100, [1, 100], None),            # GQA 7, an AR step, length 1 and Smax
    (2, 8, 4, 2, 64, 300, [130, 250], 3),             # splits, one of them empty for row 0
    (1, 16, 8, 8, 128, 70, [70], None),               # GQA 1, Smax not a multiple of 64
    (2, 4, 2, 1, 64, 40, [40, 7], None),              # Smax < 64: the cache is padded
    (4, 32, 8, 2, 64, 200, [200, 1, 65, 128], 2),     # 128-row tiles (two warpgroups)
    (4, 32, 12, 2, 128, 130, [129, 5, 64, 100], None),  # 192-row tile: Qwen's block
    (4, 32, 14, 2, 64, 70, [70, 3, 63, 64], None),    # 224 rows: two 128-row tiles
]


@needs_interpreter
@pytest.mark.usefixtures("deadlock_guard")
@pytest.mark.parametrize("batch,window,hq,hkv,d,smax,lengths,splits", CASES)
def test_matches_the_reference_on_a_poisoned_cache(batch, window, hq, hkv, d, smax, lengths,
                                                    splits):
  q, k, v = _inputs(sum(lengths) + smax, batch, window, hq, hkv, d, smax)
  lengths = jnp.asarray(lengths, jnp.int32)
  # Slots past a row's length hold NaN: reading one into the softmax or P V shows up as NaN.
  beyond = (jnp.arange(smax)[None, :] >= lengths[:, None])[:, :, None, None]
  k_dirty, v_dirty = jnp.where(beyond, jnp.nan, k), jnp.where(beyond, jnp.nan, v)
  plan = mw.mosaic_plan(batch, window, hq, hkv, d, smax, num_splits=splits)
  o_part, lse_part = mw.mosaic_window_partials(q, k_dirty, v_dirty, lengths, plan=plan,
                                               interpret=True)
  # The interpreter fills fresh buffers with NaN: every partial element was written.
  assert np.all(np.isfinite(np.asarray(o_part)))
  assert not np.any(np.isnan(np.asarray(lse_part)))
  out = wk.combine_partials(o_part, lse_part, q.shape, q.dtype)
  ref = wk.window_attention_reference(q, k, v, lengths)
  assert out.shape == q.shape and out.dtype == q.dtype
  assert _rel(out, ref) <= 1e-2
  # As accurate as the Pallas kernel (bf16 P V in both); neither is exact in bf16.
  pallas = wk.window_attention(q, k_dirty, v_dirty, lengths, interpret=True)
  assert _rel(out, ref) <= 1.5 * _rel(pallas, ref) + 1e-3


@needs_interpreter
@pytest.mark.usefixtures("deadlock_guard")
def test_float16_scale_and_race_detector():
  from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
  q, k, v = _inputs(3, 4, 32, 12, 2, 64, 300, jnp.float16)
  lengths = jnp.asarray([300, 1, 130, 250], jnp.int32)
  plan = mw.mosaic_plan(4, 32, 12, 2, 64, 300, num_splits=2)
  out = mw.mosaic_window_attention(q, k, v, lengths, sm_scale=0.3, plan=plan,
                                   interpret=InterpretGPUParams(detect_races=True))
  # JAX's detector sees the TMA copies and shared-memory stores, not wgmma's operands.
  assert not interpret_pallas_call.get_races().races_found
  ref = wk.window_attention_reference(q, k, v, lengths, sm_scale=0.3)
  assert out.dtype == jnp.float16 and _rel(out, ref) <= 1e-2


@needs_interpreter
@pytest.mark.usefixtures("deadlock_guard")
def test_attention_routes_decode_windows_to_the_kernel():
  from fdllm_jax import attention as attn
  from fdllm_jax import masks
  q, k, v = _inputs(5, 2, 8, 4, 2, 64, 96)
  lengths = jnp.asarray([96, 40], jnp.int32)
  assert attn.route("mosaic", masks.Full(), q, k, kv_lengths_B=lengths).path == "mosaic_window"
  out = attn.attention(q, k, v, mask=masks.Full(), kv_lengths_B=lengths,
                       implementation="mosaic", interpret=True)
  ref = attn.xla_attention(q, k, v, mask=masks.Full(), kv_lengths_B=lengths)
  assert _rel(out, ref) <= 1e-2


def test_attention_falls_back_where_the_kernel_does_not_apply():
  from fdllm_jax import attention as attn
  from fdllm_jax import masks
  lengths = jnp.asarray([5])
  f32 = attn.route("mosaic", masks.Full(), jnp.zeros((1, 8, 4, 64)), jnp.zeros((1, 16, 2, 64)),
                   kv_lengths_B=lengths)
  assert f32.fallback and "float32" in f32.reason
  odd_d = attn.route("mosaic", masks.Full(), jnp.zeros((1, 8, 4, 80), jnp.bfloat16),
                     jnp.zeros((1, 16, 2, 80), jnp.bfloat16), kv_lengths_B=lengths)
  assert odd_d.fallback and "D=80" in odd_d.reason
  q = jnp.zeros((1, 64, 4, 64), jnp.bfloat16)   # block masks: tests/test_mosaic_block.py
  assert attn.route("mosaic", masks.Causal(), q, q[:, :, :2]).path == "mosaic_block"


def test_unsupported_inputs_are_refused():
  q, k, v = _inputs(0, 1, 4, 2, 1, 64, 64, jnp.float32)
  with pytest.raises(ValueError, match="bfloat16 or float16.*float32"):
    mw.mosaic_window_attention(q, k, v, jnp.asarray([64]))
  q, k, v = _inputs(0, 1, 4, 2, 1, 96, 64)
  with pytest.raises(ValueError, match="head_dim a multiple of 64; got 96"):
    mw.mosaic_window_attention(q, k, v, jnp.asarray([64]))
  q, k, v = _inputs(0, 1, 4, 2, 1, 64, 64)
  with pytest.raises(ValueError, match="tile_k must be 64"):
    mw.mosaic_window_attention(q, k, v, jnp.asarray([64]),
                               plan=wk.decode_plan(1, 4, 2, 1, 64, 64, tile_k=32, tile_r=64))
  if not mw.interpreter_supported():
    with pytest.raises(NotImplementedError, match="needs JAX >= 0.11"):
      mw.mosaic_window_attention(q, k, v, jnp.asarray([64]), interpret=True)
  with pytest.raises(ValueError, match="p_from_registers=True needs the compiled kernel"):
    mw.mosaic_window_attention(q, k, v, jnp.asarray([64]), interpret=True,
                               p_from_registers=True)


@pytest.mark.parametrize("batch,window,smax,stages", [
    (8, 32, 16384, 2), (8, 32, 16384, 3), (1, 32, 16384, 2), (8, 8, 16384, 3),
    (8, 1, 32768, 3), (1, 1, 1000, 2)])
def test_lowers_for_hopper_within_shared_memory(batch, window, smax, stages):
  """Qwen2.5-1.5B's decode shapes (12 query / 2 KV heads, D 128) lower to one Mosaic GPU
  kernel; Mosaic GPU refuses, while lowering, a kernel above the H100's shared memory."""
  q = jnp.zeros((batch, window, 12, 128), jnp.bfloat16)
  k = jnp.zeros((batch, smax, 2, 128), jnp.bfloat16)
  lengths = jnp.full((batch,), smax - 3, jnp.int32)
  text = lower_for_gpu(
      lambda q, k, v: mw.mosaic_window_attention(q, k, v, lengths, num_stages=stages), q, k, k)
  assert text.count("stablehlo.custom_call @mosaic_gpu") == 1   # the split kernel; XLA the rest


@pytest.mark.parametrize("p_from_registers", [True, False])
def test_both_forms_of_p_v_lower_for_hopper(p_from_registers):
  """P in registers (the compiled default) and P through shared memory (what the interpreter
  runs; the GPU benchmarks' fallback) both lower, the second with one more buffer."""
  q = jnp.zeros((8, 32, 12, 128), jnp.bfloat16)
  k = jnp.zeros((8, 4096, 2, 128), jnp.bfloat16)
  lengths = jnp.full((8,), 4000, jnp.int32)
  text = lower_for_gpu(lambda q, k, v: mw.mosaic_window_attention(
      q, k, v, lengths, p_from_registers=p_from_registers), q, k, k)
  assert text.count("stablehlo.custom_call @mosaic_gpu") == 1


def test_lowering_refuses_a_plan_beyond_shared_memory():
  q = jnp.zeros((8, 32, 12, 128), jnp.bfloat16)
  k = jnp.zeros((8, 4096, 2, 128), jnp.bfloat16)
  lengths = jnp.full((8,), 4000, jnp.int32)
  with pytest.raises(ValueError, match="exceeds available shared memory"):
    lower_for_gpu(lambda q, k, v: mw.mosaic_window_attention(q, k, v, lengths, num_stages=6),
                  q, k, k)
