"""Decode-window attention as a hand-written Triton kernel called through ``jax_triton``.

Same algorithm, plan, query packing and combine step as ``window_kernel.py`` (the Pallas
version); only the split kernel is Triton. ``triton`` and ``jax_triton`` are imported lazily,
on first use: ``jax_triton`` imports only with a GPU jaxlib, so this module itself imports
anywhere, and its pure launch logic (``launch_grid``, ``kernel_meta``) is tested on CPU. The
kernel body is also tested on CPU through Triton's interpreter (``TRITON_INTERPRET=1``) with
torch tensors, where triton is installed.

Launch grid: (row tiles x splits, KV heads, batch), row tiles fastest, so the programs that
read the same K/V chunk run side by side and share it through L2.

Compatibility: jax-triton 0.4.1 (the release for jax >= 0.11) declares triton >= 3.7 but
works with triton 3.6 except for one module-level import (``TMA_TF32``, used only by TMA
descriptors, which this kernel does not use); ``import_jax_triton`` supplies that constant
when triton lacks it instead of letting jax-triton silently disable its CUDA backend.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import _common as cm
from pallas_kernels import window_kernel as wk


def import_jax_triton():
  """Imports jax_triton (GPU jaxlib required); raises ImportError with what to do otherwise."""
  try:
    import triton.backends.nvidia.driver as nvidia_driver
    if not hasattr(nvidia_driver, "TMA_TF32"):
      nvidia_driver.TMA_TF32 = -1  # only read for TMA descriptors with round_f32_to_tf32
  except ImportError:
    pass
  try:
    import jax_triton
  except ImportError as e:
    raise ImportError(
        "attention implementation 'triton' needs the jax-triton package and a GPU jaxlib "
        f"(import failed: {e}). Install jax-triton (pip install jax-triton) on a CUDA machine, "
        "or use implementation='pallas'.") from e
  return jax_triton


def launch_grid(plan: wk.DecodePlan):
  """Triton grid: (row tiles * splits, KV heads, batch)."""
  return (plan.num_row_tiles * plan.num_splits, plan.num_kv_heads, plan.batch)


def program_coords(pid0, plan: wk.DecodePlan):
  """(row tile, split) of a program's first grid coordinate, as the kernel decodes it."""
  return pid0 % plan.num_row_tiles, pid0 // plan.num_row_tiles


def kernel_meta(plan: wk.DecodePlan, scale: float, dtype, cache_len: int | None = None) -> dict:
  """The kernel's compile-time (constexpr) arguments (``cache_len``: the K/V arrays' length
  axis as passed, if padded beyond ``plan.max_len``)."""
  return dict(
      SCALE2=float(scale * cm.LOG2E), SMAX=cache_len or plan.max_len, HKV=plan.num_kv_heads,
      NSPLIT=plan.num_splits, NRT=plan.num_row_tiles, ROWS_PAD=plan.rows_pad,
      CHUNK=plan.chunk, TILE_R=plan.tile_r, TILE_K=plan.tile_k, D=plan.head_dim_pad,
      PRECISION="ieee" if jnp.dtype(dtype) == jnp.float32 else "tf32",
  )


@functools.cache
def build_kernel():
  """The @triton.jit kernel (built on first use; honours TRITON_INTERPRET at that time)."""
  import triton
  import triton.language as tl

  @triton.jit
  def window_attention_kernel(len_ptr, q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
                              SCALE2: tl.constexpr, SMAX: tl.constexpr, HKV: tl.constexpr,
                              NSPLIT: tl.constexpr, NRT: tl.constexpr,
                              ROWS_PAD: tl.constexpr, CHUNK: tl.constexpr,
                              TILE_R: tl.constexpr, TILE_K: tl.constexpr, D: tl.constexpr,
                              PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    rt = pid % NRT
    split = pid // NRT
    length = tl.load(len_ptr + b)
    lo = split * CHUNK
    hi = tl.minimum(lo + CHUNK, length)
    n = tl.maximum(hi - lo, 0)
    full_end = lo + (n // TILE_K) * TILE_K

    rows = rt * TILE_R + tl.arange(0, TILE_R)
    cols = tl.arange(0, D)
    bh = b.to(tl.int64) * HKV + h
    q = tl.load(q_ptr + bh * (ROWS_PAD * D) + rows[:, None] * D + cols[None, :])
    # 64-bit pointers to the chunk's first tile, advanced tile by tile (32-bit steps).
    row_stride = HKV * D
    first = (b.to(tl.int64) * SMAX + lo) * row_stride + h * D
    tile_offs = tl.arange(0, TILE_K)[:, None] * row_stride + cols[None, :]
    k_tile = k_ptr + first + tile_offs
    v_tile = v_ptr + first + tile_offs

    m = tl.full([TILE_R], float("-inf"), tl.float32)
    l = tl.zeros([TILE_R], tl.float32)
    acc = tl.zeros([TILE_R, D], tl.float32)
    for _ in range(lo, full_end, TILE_K):        # full tiles: no masking at all
      k = tl.load(k_tile)
      v = tl.load(v_tile)
      s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * SCALE2
      m_new = tl.maximum(m, tl.max(s, 1))
      alpha = tl.math.exp2(m - m_new)
      p = tl.math.exp2(s - m_new[:, None])
      l = l * alpha + tl.sum(p, 1)
      acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
      m = m_new
      k_tile += TILE_K * row_stride
      v_tile += TILE_K * row_stride
    if full_end < hi:                             # the tail tile: masked loads and scores
      ok = full_end + tl.arange(0, TILE_K) < hi
      k = tl.load(k_tile, mask=ok[:, None], other=0.0)
      v = tl.load(v_tile, mask=ok[:, None], other=0.0)
      s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * SCALE2
      s = tl.where(ok[None, :], s, float("-inf"))
      m_new = tl.maximum(m, tl.max(s, 1))
      alpha = tl.math.exp2(m - m_new)
      p = tl.math.exp2(s - m_new[:, None])
      l = l * alpha + tl.sum(p, 1)
      acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
      m = m_new
    nonempty = l > 0.0
    l_safe = tl.where(nonempty, l, 1.0)
    part = (bh * NSPLIT + split) * ROWS_PAD
    tl.store(o_ptr + part * D + rows[:, None] * D + cols[None, :], acc / l_safe[:, None])
    tl.store(lse_ptr + part + rows, tl.where(nonempty, m + tl.math.log2(l_safe), float("-inf")))

  return window_attention_kernel


def triton_window_attention(q, k, v, kv_lengths, *, sm_scale: float | None = None,
                            plan: wk.DecodePlan | None = None,
                            num_warps: int | None = None, num_stages: int | None = None):
  """``window_kernel.window_attention`` with the split kernel written in Triton (GPU only)."""
  jt = import_jax_triton()
  kv_lengths = wk.validate_inputs(q, k, v, kv_lengths)
  batch, window, hq, d = q.shape
  smax, hkv = k.shape[1], k.shape[2]
  plan = plan or wk.decode_plan(batch, window, hq, hkv, d, smax)
  wk.check_plan(plan, q, k)
  num_warps = num_warps or wk.default_num_warps(plan)
  num_stages = num_stages or wk.default_num_stages(plan)
  scale = float(d ** -0.5 if sm_scale is None else sm_scale)
  kv_lengths = jnp.clip(kv_lengths, 0, smax)   # the kernel never reads past the cache
  qp = wk.pack_queries(q, plan)
  k, v = wk.pad_cache(k, v, plan)
  o_shape = jax.ShapeDtypeStruct(
      (batch, hkv, plan.num_splits, plan.rows_pad, plan.head_dim_pad), jnp.float32)
  lse_shape = jax.ShapeDtypeStruct((batch, hkv, plan.num_splits, plan.rows_pad), jnp.float32)
  o_part, lse_part = jt.triton_call(
      kv_lengths, qp, k, v, kernel=build_kernel(), out_shape=[o_shape, lse_shape],
      grid=launch_grid(plan), num_warps=num_warps, num_stages=num_stages,
      name="window_attention_triton", **kernel_meta(plan, scale, q.dtype, k.shape[1]))
  return wk.combine_partials(o_part, lse_part, q.shape, q.dtype)
