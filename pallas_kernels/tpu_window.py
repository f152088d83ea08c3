"""Pallas TPU kernel: a window of queries attending to a ragged KV cache (decoding, prefill).

``window_attention(q [B, T, H, D], k/v [B, S, K, D], kv_lengths [B], q_offset [B])``: query
``t`` of row ``b`` has index ``q_offset[b] + t`` and sees key ``s`` when ``s < kv_lengths[b]``
and ``mask_fn(q_index, s)`` holds. ``window_attention_reference`` is the same in plain jnp.

Why a kernel (the XLA path computes scores against all S slots of every row):

* **Ragged lengths cost what they hold.** The grid walks key tiles ``j``; the K/V index map
  clamps ``j`` to the row's last needed tile, so tiles past ``kv_lengths[b]`` (or past the last
  key the mask lets the window see, ``key_bound_fn``) are never copied from HBM (a repeated
  block index skips the DMA) and their compute is skipped (``pl.when``). A decoding step is
  memory-bound: bytes read follow the real lengths instead of the bucketed cache size.
* **GQA reads K/V once per KV head.** The G query heads that share a KV head are stacked into
  one ``[G * bt, D]`` query tile, so each K/V tile feeds all of them in one MXU matmul.
* **No [B, H, T, S] scores in HBM**: online softmax in VMEM scratch (flash attention).

The grid is (batch, kv head, query tile, key tile); the first three are parallel (megacore
splits them), the key axis carries the softmax state. The cache is read as [B, S, K * D] (a
free reshape of the model's [B, S, K, D] layout): one KV head's tile is a lane-aligned column
block when D is a multiple of 128; for other D a grid step takes all K heads' columns and
loops over them (TPU blocks must be (8, 128)-aligned or span a whole dimension). Key tiles are up to 512 keys and must
divide S (a multiple of 128 keeps them lane-aligned). Index arithmetic inside the kernel uses
only adds, shifts, ands and compares (no vector integer division on the TPU's VPU):
the query tile length ``bt`` is a power of two, rows are ordered ``g * bt + t``.

Forward only: decoding needs no gradient (training uses splash attention).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import _common as cm

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # as the xla reference: finite
NUM_LANES = 128
_MAX_QUERY_ROWS = 512  # rows (G * bt) of one query tile


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _next_pow2(n: int) -> int:
  return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def choose_tiles(num_queries: int, group: int, num_keys: int, block_kv: int | None = None):
  """(bt, nq, bk): query tile length (power of two >= 8), query tiles, key tile width.

  Key tiles: 512, 384, 256 or 128 keys when one divides S (lane-aligned); otherwise the
  largest multiple of 8 up to 512 that divides S (legal, but the score tile then wastes lanes:
  bucket cache lengths to multiples of 128 on TPU).
  """
  bt = max(8, _next_pow2(num_queries))
  while bt > 8 and group * bt > _MAX_QUERY_ROWS:
    bt //= 2
  nq = -(-num_queries // bt)
  if block_kv is None:
    block_kv = next((b for b in (512, 384, 256, 128) if num_keys % b == 0), None)
    if block_kv is None:
      block_kv = next((b for b in range(min(512, num_keys) // 8 * 8, 7, -8)
                       if num_keys % b == 0), None)
  if block_kv is None or num_keys % block_kv or block_kv % 8:
    raise ValueError(f"window_attention: the cache length {num_keys} must be a multiple of 8 "
                     f"(key tiles are multiples of 8 that divide it); got block_kv={block_kv}")
  return bt, nq, block_kv


def _compiler_params(semantics):
  cls = getattr(pltpu, "CompilerParams", None) or getattr(pltpu, "TPUCompilerParams")
  return cls(dimension_semantics=semantics)


def _kernel(kv_len_ref, limit_ref, q_off_ref,  # scalar prefetch (SMEM)
            q_ref, k_ref, v_ref,  # VMEM tiles
            *refs, mask_fn, bt, bk, group, heads, head_dim, num_q_tiles, scale, count_visits):
  if count_visits:
    o_ref, visits_ref, m_ref, l_ref, acc_ref = refs
  else:
    (o_ref, m_ref, l_ref, acc_ref), visits_ref = refs, None
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  rows = group * bt

  @pl.when(j == 0)
  def _init():
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)
    if visits_ref is not None:
      visits_ref[...] = jnp.zeros(visits_ref.shape, jnp.int32)

  key_start = j * bk
  kv_len = kv_len_ref[b]

  @pl.when(key_start < limit_ref[b * num_q_tiles + i])
  def _compute():
    if visits_ref is not None:  # test instrumentation: key tiles this (row, head, tile) ran
      visits_ref[...] = visits_ref[...] + 1
    k_idx = key_start + jax.lax.broadcasted_iota(jnp.int32, (rows, bk), 1)
    t_idx = jax.lax.broadcasted_iota(jnp.int32, (rows, bk), 0) & (bt - 1)
    q_idx = q_off_ref[b] + i * bt + t_idx
    allowed = k_idx < kv_len
    if mask_fn is not None:
      allowed = allowed & mask_fn(q_idx, k_idx)
    # Keys past the row's length may hold anything (stale slots): zero them so 0 * v stays 0.
    v_valid = (key_start + jax.lax.broadcasted_iota(jnp.int32, (bk, head_dim), 0)) < kv_len
    for h in range(heads):  # static: 1 head per step, or all KV heads when D % 128 != 0
      cols = slice(h * head_dim, (h + 1) * head_dim)
      q = q_ref[h].reshape(rows, head_dim)
      k = k_ref[:, cols]
      v = v_ref[:, cols]
      s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                              preferred_element_type=jnp.float32) * scale
      s = jnp.where(allowed, s, MASK_VALUE)
      v = jnp.where(v_valid, v, jnp.zeros_like(v))
      m_prev = m_ref[h]
      m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
      alpha = jnp.exp(m_prev - m_new)
      p = jnp.exp(s - m_new)
      l_ref[h] = alpha * l_ref[h] + jnp.sum(p, axis=1, keepdims=True)
      acc_ref[h] = alpha * acc_ref[h] + jax.lax.dot_general(
          p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
      m_ref[h] = m_new

  @pl.when(j == pl.num_programs(3) - 1)
  def _finish():
    for h in range(heads):
      l = l_ref[h]
      out = acc_ref[h] / jnp.where(l == 0.0, 1.0, l)  # a row with no visible key gives 0
      o_ref[h] = out.reshape(o_ref.shape[1:]).astype(o_ref.dtype)


def key_limits(kv_lengths_B, q_offset_B, *, num_queries: int, bt: int, nq: int,
               key_bound_fn: Callable | None = None):
  """int32 [B * nq]: keys each query tile must visit (past it, tiles are neither read nor run)."""
  kv_lengths_B = jnp.asarray(kv_lengths_B, jnp.int32)
  last_q = jnp.minimum((jnp.arange(nq, dtype=jnp.int32) + 1) * bt, num_queries) - 1
  limits = jnp.broadcast_to(kv_lengths_B[:, None], (kv_lengths_B.shape[0], nq))
  if key_bound_fn is not None:
    bound = key_bound_fn(jnp.asarray(q_offset_B, jnp.int32)[:, None] + last_q[None, :])
    limits = jnp.minimum(limits, bound)
  return jnp.maximum(limits, 0).reshape(-1).astype(jnp.int32)


def visited_key_tiles(kv_lengths_B, q_offset_B, *, num_queries: int, num_heads: int,
                      num_kv_heads: int, num_keys: int, key_bound_fn=None, block_kv=None):
  """int [B, nq]: key tiles the kernel reads and computes per (row, query tile), by its own
  index logic (the same ``key_limits`` the kernel's index map clamps with)."""
  bt, nq, bk = choose_tiles(num_queries, num_heads // num_kv_heads, num_keys, block_kv)
  limits = key_limits(kv_lengths_B, q_offset_B, num_queries=num_queries, bt=bt, nq=nq,
                      key_bound_fn=key_bound_fn)
  return (-(-limits // bk)).reshape(-1, nq)


def kv_block_index(j, limit, bk: int):
  """The K/V tile fetched at key step ``j``: clamped to the last tile below ``limit``, so
  steps past it revisit the same block index (Pallas skips the copy)."""
  last = jnp.maximum(cm.icdiv(limit, bk) - 1, 0)
  return jnp.minimum(j, last)


@functools.partial(jax.jit, static_argnames=("mask_fn", "key_bound_fn", "sm_scale", "block_kv",
                                             "interpret", "count_visits"))
def window_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, kv_lengths_B, q_offset_B=None, *,
                     mask_fn: Callable | None = None, key_bound_fn: Callable | None = None,
                     sm_scale: float | None = None, block_kv: int | None = None,
                     interpret: bool = False, count_visits: bool = False):
  """Attention of a window of queries over a ragged cache; see the module docstring.

  Args:
    q_BxTxHxD: queries; H a multiple of K.
    k_BxSxKxD, v_BxSxKxD: the cache (S a multiple of 128).
    kv_lengths_B: int32 [B], valid keys per row.
    q_offset_B: int32 [B], index of each row's first query (default 0).
    mask_fn: ``f(q_idx, k_idx) -> bool`` on int32 arrays, traced inside the kernel (shifts and
      compares only); None: no mask beyond the lengths.
    key_bound_fn: ``f(q_idx) -> exclusive bound`` on the keys queries ``<= q_idx`` can see
      (jnp, outside the kernel), so whole tiles past it are skipped; None: the lengths only.
    sm_scale: softmax scale (default 1/sqrt(D)).
    block_kv: key tile width (default: 512, 256 or 128, whichever divides S first).
    interpret: run in Pallas' interpret mode (CPU tests).
    count_visits: also return int32 [B, K / heads_per_step, nq]: the key tiles each grid cell
      computed, counted inside the kernel (tests of the skipping).
  """
  batch, num_q, num_heads, head_dim = q_BxTxHxD.shape
  num_k, num_kv_heads = k_BxSxKxD.shape[1], k_BxSxKxD.shape[2]
  if num_heads % num_kv_heads:
    raise ValueError(f"query heads ({num_heads}) must be a multiple of kv heads ({num_kv_heads})")
  group = num_heads // num_kv_heads
  bt, nq, bk = choose_tiles(num_q, group, num_k, block_kv)
  nk = num_k // bk
  scale = head_dim ** -0.5 if sm_scale is None else sm_scale
  if q_offset_B is None:
    q_offset_B = jnp.zeros((batch,), jnp.int32)
  q_offset_B = jnp.broadcast_to(jnp.asarray(q_offset_B, jnp.int32), (batch,))
  kv_lengths_B = jnp.broadcast_to(jnp.asarray(kv_lengths_B, jnp.int32), (batch,))
  limits = key_limits(kv_lengths_B, q_offset_B, num_queries=num_q, bt=bt, nq=nq,
                      key_bound_fn=key_bound_fn)

  # [B, T, K*G, D] -> [B, K, G, Tp, D]: the G heads of one KV head form one query tile.
  tp = nq * bt
  q = q_BxTxHxD.reshape(batch, num_q, num_kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
  q = jnp.pad(q, ((0, 0), (0, 0), (0, 0), (0, tp - num_q), (0, 0)))
  # The cache as [B, S, K*D] (a free reshape): a tile of one KV head is a lane-aligned column
  # block when D is a multiple of 128; otherwise a step takes all KV heads' columns at once.
  heads = 1 if head_dim % NUM_LANES == 0 else num_kv_heads
  k = k_BxSxKxD.reshape(batch, num_k, num_kv_heads * head_dim)
  v = v_BxSxKxD.reshape(batch, num_k, num_kv_heads * head_dim)

  def q_map(b, h, i, j, kv_len_ref, limit_ref, q_off_ref):
    return b, h, 0, i, 0

  def kv_map(b, h, i, j, kv_len_ref, limit_ref, q_off_ref):
    return b, kv_block_index(j, limit_ref[b * nq + i], bk), h

  squeezed = pl.Squeezed() if hasattr(pl, "Squeezed") else None
  q_spec = pl.BlockSpec((squeezed, heads, group, bt, head_dim), q_map)
  kv_spec = pl.BlockSpec((squeezed, bk, heads * head_dim), kv_map)
  rows = group * bt
  kernel = functools.partial(_kernel, mask_fn=mask_fn, bt=bt, bk=bk, group=group, heads=heads,
                             head_dim=head_dim, num_q_tiles=nq, scale=scale,
                             count_visits=count_visits)
  out_shape = jax.ShapeDtypeStruct(q.shape, q_BxTxHxD.dtype)
  out_specs = q_spec
  if count_visits:
    out_shape = [out_shape, jax.ShapeDtypeStruct((batch, num_kv_heads // heads, nq, 8, NUM_LANES),
                                                 jnp.int32)]
    out_specs = [q_spec, pl.BlockSpec((squeezed, squeezed, squeezed, 8, NUM_LANES),
                                      lambda b, h, i, j, *_: (b, h, i, 0, 0))]
  out = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3,
          grid=(batch, num_kv_heads // heads, nq, nk),
          in_specs=[q_spec, kv_spec, kv_spec],
          out_specs=out_specs,
          scratch_shapes=[pltpu.VMEM((heads, rows, 1), jnp.float32),
                          pltpu.VMEM((heads, rows, 1), jnp.float32),
                          pltpu.VMEM((heads, rows, head_dim), jnp.float32)]),
      out_shape=out_shape,
      compiler_params=_compiler_params(("parallel", "parallel", "parallel", "arbitrary")),
      interpret=interpret,
      name="fdllm_tpu_window_attention",
  )(kv_lengths_B, limits, q_offset_B, q, k, v)
  visits = None
  if count_visits:
    out, visits = out
    visits = visits[:, :, :, 0, 0]
  out = out[:, :, :, :num_q].transpose(0, 3, 1, 2, 4)
  out = out.reshape(batch, num_q, num_heads, head_dim)
  return (out, visits) if count_visits else out


def window_attention_reference(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, kv_lengths_B, q_offset_B=None,
                               *, mask_fn=None, sm_scale=None):
  """Plain-jnp reference of :func:`window_attention` (float32 softmax)."""
  batch, num_q, num_heads, head_dim = q_BxTxHxD.shape
  num_k, num_kv_heads = k_BxSxKxD.shape[1], k_BxSxKxD.shape[2]
  group = num_heads // num_kv_heads
  scale = head_dim ** -0.5 if sm_scale is None else sm_scale
  if q_offset_B is None:
    q_offset_B = jnp.zeros((batch,), jnp.int32)
  q = q_BxTxHxD.reshape(batch, num_q, num_kv_heads, group, head_dim)
  s = jnp.einsum("btkgd,bskd->bkgts", q, k_BxSxKxD, preferred_element_type=jnp.float32) * scale
  q_idx = jnp.asarray(q_offset_B, jnp.int32)[:, None, None] + jnp.arange(num_q)[None, :, None]
  k_idx = jnp.arange(num_k)[None, None, :]
  allowed = k_idx < jnp.asarray(kv_lengths_B, jnp.int32)[:, None, None]
  if mask_fn is not None:
    allowed = allowed & mask_fn(q_idx, k_idx)
  s = jnp.where(allowed[:, None, None], s, MASK_VALUE)
  p = jax.nn.softmax(s, axis=-1).astype(v_BxSxKxD.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", p, v_BxSxKxD, preferred_element_type=jnp.float32)
  return out.reshape(batch, num_q, num_heads, head_dim).astype(q_BxTxHxD.dtype)
