"""Decode-window attention over a ragged KV cache (flash-decoding), in Pallas (Triton on GPU).

``window_attention(q, k, v, kv_lengths)``: q [B, W, Hq, D] is a window of W <= 64 queries per
row, k/v [B, Smax, Hkv, D] the cache; row b attends to keys ``[0, kv_lengths[b])`` with no
other mask (the window's own keys are the last W of them).

Layout of the work:

* Query heads sharing a KV head are processed together: the window's W x G queries of one KV
  head become the rows of one matrix (``pack_queries``), so every K/V tile loaded feeds all of
  them (read once per row tile; one row tile unless W x G > 64).
* The key axis is split into ``num_splits`` chunks (``DecodePlan``), one program per
  (row tile, chunk, KV head, batch row), so a single long row still fills the GPU. Each program
  writes a partial result (output normalised by its own softmax sum, and its log-sum-exp);
  ``combine_partials`` merges the chunks (a small XLA fusion).
* A program loops only over key tiles below its row's length: full tiles without any masking,
  then at most one masked tail tile whose loads are masked too (cache slots beyond the length
  may hold anything, NaN included). Chunks entirely beyond the length do no work and write an
  empty partial (log-sum-exp -inf).

The same plan, packing and combine are used by the Triton version (``triton_window.py``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import numpy as np

from pallas_kernels import _common as cm

MAX_WINDOW = 64
DEFAULT_NUM_SMS = 132  # H100 / H200


@dataclasses.dataclass(frozen=True)
class DecodePlan:
  """How a decode step is cut into programs (pure function of static shapes)."""

  batch: int
  num_kv_heads: int
  rows: int          # W * G query rows per KV head
  rows_pad: int      # rows rounded up to tile_r
  tile_r: int
  tile_k: int
  head_dim_pad: int
  max_len: int       # Smax
  chunk: int         # keys per split, a multiple of tile_k
  num_splits: int

  @property
  def num_row_tiles(self):
    return self.rows_pad // self.tile_r

  @property
  def grid(self):
    """Pallas grid (row tiles, splits, kv heads, batch)."""
    return (self.num_row_tiles, self.num_splits, self.num_kv_heads, self.batch)

  @property
  def num_programs(self):
    return int(np.prod(self.grid))



def split_tiles(plan: DecodePlan, split, length):
  """The key tiles chunk ``split`` visits for a row of ``length`` keys.

  Returns ``(lo, hi, n_full, n_tiles)``: keys ``[lo, hi)``; tiles ``[0, n_full)`` (starting at
  ``lo``) are entirely below ``hi`` and run unmasked, tiles ``[n_full, n_tiles)`` (at most one)
  are masked. Works on traced scalars (the kernel's loop bounds) and on concrete arrays (tests).
  """
  lo = jnp.asarray(split, jnp.int32) * plan.chunk
  hi = jnp.minimum(lo + plan.chunk, jnp.asarray(length, jnp.int32))
  n = jnp.maximum(hi - lo, 0)
  return lo, hi, cm.idiv(n, plan.tile_k), cm.icdiv(n, plan.tile_k)


def _num_sms() -> int:
  """Streaming multiprocessors of the local GPU (132 on H100/H200; the default elsewhere)."""
  try:
    device = jax.local_devices()[0]
    if device.platform == "gpu":
      return int(getattr(device, "core_count", DEFAULT_NUM_SMS) or DEFAULT_NUM_SMS)
  except Exception:  # noqa: BLE001  (no device info: plan for an H100-class GPU)
    pass
  return DEFAULT_NUM_SMS


MAX_TILE_R = 256  # all 192 packed rows of a 32-query window at GQA 6 in one tile


def _pick_tile_r(rows: int, batch: int, num_kv_heads: int) -> int:
  """The smallest power-of-two tile holding every packed row, so each program reads its K/V
  tiles once for all of them; at most 64 rows when batch x KV heads < 8, where more row tiles
  are the parallelism that fills the GPU.

  Measured on an H200 (benchmarks/gpu_decode_sweep.py, 16k cache, 12q/2kv heads, D 128): a
  32-query window at batch 8 runs 1.65x faster with one 256-row tile than with three 64-row
  tiles, an 8-query window 1.7x faster with one 64-row tile than with three of 16; at batch 1
  three 64-row tiles beat one 256-row tile by 1.7x.
  """
  cap = MAX_TILE_R if batch * num_kv_heads >= 8 else 64
  tile = 16
  while tile < rows and tile < cap:
    tile *= 2
  return tile


def decode_plan(batch: int, window: int, num_heads: int, num_kv_heads: int, head_dim: int,
                max_len: int, *, tile_k: int | None = None, tile_r: int | None = None,
                num_splits: int | None = None, target_programs: int | None = None) -> DecodePlan:
  """Chooses row tile, key chunk and number of splits.

  Row tile: ``_pick_tile_r``. Key tile: 128 keys for row tiles above 128 rows (fewer loop
  iterations for the big tiles), else 64. The number of splits aims at ``target_programs``
  programs (default two per SM) but is capped so the float32 partials (num_splits x rows_pad
  per KV head, written once and read once) stay under the cache bytes they summarise
  (max_len / (2 * rows_pad) splits). Row tiles above 128 rows take a whole SM each, so their
  programs are kept to one wave, at most one per SM: on an H200 at batch 8, 9 splits (144
  programs on 132 SMs) ran 1.34x slower than 8 splits (128 programs).
  """
  if window < 1 or window > MAX_WINDOW:
    raise ValueError(f"window_attention supports 1 <= W <= {MAX_WINDOW} queries; got W={window}")
  rows = window * (num_heads // num_kv_heads)
  tile_r = tile_r or _pick_tile_r(rows, batch, num_kv_heads)
  cm.check_tile("tile_r", tile_r)
  tile_k = tile_k or (128 if tile_r > 128 else 64)
  cm.check_tile("tile_k", tile_k)
  while tile_k > 16 and tile_k > max_len:  # no tile longer than the cache
    tile_k //= 2
  rows_pad = cm.cdiv(rows, tile_r) * tile_r
  n_key_tiles = cm.cdiv(max_len, tile_k)
  if num_splits is None:
    base = batch * num_kv_heads * (rows_pad // tile_r)
    if tile_r > 128:  # one wave of whole-SM programs
      wanted = (target_programs or _num_sms()) // base
    else:
      wanted = cm.cdiv(target_programs or 2 * _num_sms(), base)
    cap = max(1, max_len // (2 * rows_pad))
    num_splits = max(1, min(wanted, cap, n_key_tiles))
  if isinstance(num_splits, bool) or int(num_splits) != num_splits or num_splits < 1:
    raise ValueError(f"num_splits must be a positive integer or None; got {num_splits!r}")
  num_splits = min(int(num_splits), n_key_tiles)
  tiles_per_split = cm.cdiv(n_key_tiles, num_splits)
  num_splits = cm.cdiv(n_key_tiles, tiles_per_split)
  return DecodePlan(batch=batch, num_kv_heads=num_kv_heads, rows=rows, rows_pad=rows_pad,
                    tile_r=tile_r, tile_k=tile_k, head_dim_pad=cm.padded_head_dim(head_dim),
                    max_len=max_len, chunk=tiles_per_split * tile_k, num_splits=num_splits)


def default_num_warps(plan: DecodePlan) -> int:
  """8 warps for row tiles above 64 rows, 4 up to 64 (H200 sweep: 4 warps were faster or
  within 5% at every shape with tiles of at most 64 rows)."""
  return 8 if plan.tile_r > 64 else 4


def default_num_stages(plan: DecodePlan) -> int:
  """3 pipeline stages of K/V loads for tiles up to 64 rows (H200 sweep: up to 1.4x faster at
  batch 1); 2 for larger tiles, whose accumulators leave no shared memory for a third."""
  return 2 if plan.tile_r > 64 else 3


def pack_queries(q, plan: DecodePlan):
  """[B, W, Hq, D] -> [B, Hkv, rows_pad, D_pad]: the W x G queries of each KV head as rows."""
  batch, window, hq, d = q.shape
  hkv = plan.num_kv_heads
  q = q.reshape(batch, window, hkv, hq // hkv, d).transpose(0, 2, 1, 3, 4)
  q = q.reshape(batch, hkv, window * (hq // hkv), d)
  return cm.pad_axis(cm.pad_axis(q, 2, plan.rows_pad), 3, plan.head_dim_pad)


def combine_partials(o_part, lse_part, q_shape, dtype):
  """Merges per-split partials [B, Hkv, splits, rows_pad, D_pad] / [..., rows_pad] (base-2 lse).

  A row with no key at all (length 0) has no defined attention; it gets zeros.
  """
  batch, window, hq, d = q_shape
  hkv = o_part.shape[1]
  lse_max = jnp.max(lse_part, axis=2, keepdims=True)
  lse_max = jnp.where(jnp.isfinite(lse_max), lse_max, 0.0)
  w = jnp.exp2(lse_part - lse_max)                                   # 0 for empty splits
  total = jnp.sum(w, axis=2)
  out = jnp.sum(w[..., None] * o_part, axis=2) / jnp.where(total > 0, total, 1.0)[..., None]
  out = out[:, :, :window * (hq // hkv), :d].reshape(batch, hkv, window, hq // hkv, d)
  return out.transpose(0, 2, 1, 3, 4).reshape(batch, window, hq, d).astype(dtype)


def validate_inputs(q, k, v, kv_lengths) -> jax.Array:
  """Raises on shapes the kernel does not take; returns ``kv_lengths`` as int32."""
  kv_lengths = jnp.asarray(kv_lengths)
  if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
    raise ValueError(f"window_attention expects q [B,W,Hq,D], k/v [B,Smax,Hkv,D]; got q "
                     f"{q.shape}, k {k.shape}, v {v.shape}")
  cm.check_nonempty("window_attention", q, k)
  if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[2] % k.shape[2]:
    raise ValueError(f"q {q.shape} and k {k.shape}: batch and head_dim must match and Hq must "
                     "be a multiple of Hkv")
  if kv_lengths.shape != (q.shape[0],):
    raise ValueError(f"kv_lengths must have shape [B]=({q.shape[0]},); got {kv_lengths.shape}")
  if not jnp.issubdtype(kv_lengths.dtype, jnp.integer):
    raise ValueError(f"kv_lengths must be integers; got dtype {kv_lengths.dtype}")
  return kv_lengths.astype(jnp.int32)


def pad_cache(k, v, plan):
  """Copies the cache only when D is not a power of two >= 16 or Smax < 16 (never for Qwen)."""
  if k.shape[3] != plan.head_dim_pad:
    k, v = cm.pad_axis(k, 3, plan.head_dim_pad), cm.pad_axis(v, 3, plan.head_dim_pad)
  if k.shape[1] < plan.tile_k:
    k, v = cm.pad_axis(k, 1, plan.tile_k), cm.pad_axis(v, 1, plan.tile_k)
  return k, v


def _window_kernel(len_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, plan: DecodePlan,
                   scale: float):
  tk = plan.tile_k
  split, b = pl.program_id(1), pl.program_id(3)
  lo, hi, n_full, n_all = split_tiles(plan, split, len_ref[b])
  scale2 = scale * cm.LOG2E
  q = q_ref[...]

  def body(t, carry, masked):
    acc, m, l = carry
    start = lo + t * tk
    if masked:
      row_ok = start + lax.broadcasted_iota(jnp.int32, (tk, q.shape[1]), 0) < hi
      k = plgpu.load(k_ref.at[pl.ds(start, tk), :], mask=row_ok, other=0.0)
      v = plgpu.load(v_ref.at[pl.ds(start, tk), :], mask=row_ok, other=0.0)
    else:
      start = pl.multiple_of(start, tk)
      k = k_ref[pl.ds(start, tk), :]
      v = v_ref[pl.ds(start, tk), :]
    s = lax.dot_general(q, k, (((1,), (1,)), ((), ())),
                        preferred_element_type=jnp.float32) * scale2
    if masked:
      col_ok = start + lax.broadcasted_iota(jnp.int32, s.shape, 1) < hi
      s = jnp.where(col_ok, s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - m_new[:, None])
    l = alpha * l + jnp.sum(p, axis=1)
    acc = acc * alpha[:, None] + lax.dot_general(
        p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return acc, m_new, l

  carry = (jnp.zeros(q.shape, jnp.float32), jnp.full((q.shape[0],), -jnp.inf, jnp.float32),
           jnp.zeros((q.shape[0],), jnp.float32))
  carry = lax.fori_loop(0, n_full, functools.partial(body, masked=False), carry)
  acc, m, l = lax.fori_loop(n_full, n_all, functools.partial(body, masked=True), carry)
  nonempty = l > 0.0
  l_safe = jnp.where(nonempty, l, 1.0)
  o_ref[...] = acc / l_safe[:, None]
  lse_ref[...] = jnp.where(nonempty, m + jnp.log2(l_safe), -jnp.inf)


def window_attention(q, k, v, kv_lengths, *, sm_scale: float | None = None,
                     interpret: bool = False, plan: DecodePlan | None = None,
                     num_warps: int | None = None, num_stages: int | None = None,
                     poison_outputs: bool = False):
  """Attention of a decode window over a ragged cache; see the module docstring.

  Args:
    q: [B, W, Hq, D], W <= 64; k, v: [B, Smax, Hkv, D] (q's dtype).
    kv_lengths: int32 [B], keys visible to row b (1 <= kv_lengths[b] <= Smax).
    sm_scale: softmax scale, default D ** -0.5.
    interpret: run the Pallas interpreter (CPU) instead of compiling for the GPU.
    plan: a ``decode_plan(...)`` to override tiles / splits.
    num_warps, num_stages: Triton launch parameters (GPU); default to
      ``default_num_warps(plan)`` and ``default_num_stages(plan)``.
    poison_outputs: NaN-fill the partial outputs before the kernel (tests, GPU checks).

  Returns:
    [B, W, Hq, D] in q's dtype.
  """
  o_part, lse_part = window_partials(q, k, v, kv_lengths, sm_scale=sm_scale,
                                     interpret=interpret, plan=plan, num_warps=num_warps,
                                     num_stages=num_stages, poison_outputs=poison_outputs)
  return combine_partials(o_part, lse_part, q.shape, q.dtype)


def window_partials(q, k, v, kv_lengths, *, sm_scale=None, interpret=False, plan=None,
                    num_warps=None, num_stages=None, poison_outputs=False):
  """The split kernel alone: per-chunk outputs [B, Hkv, splits, rows_pad, D_pad] (float32,
  normalised within the chunk) and base-2 log-sum-exps [B, Hkv, splits, rows_pad]."""
  kv_lengths = validate_inputs(q, k, v, kv_lengths)
  batch, window, hq, d = q.shape
  smax, hkv = k.shape[1], k.shape[2]
  plan = plan or decode_plan(batch, window, hq, hkv, d, smax)
  check_plan(plan, q, k)
  num_warps = num_warps or default_num_warps(plan)
  num_stages = num_stages or default_num_stages(plan)
  scale = float(d ** -0.5 if sm_scale is None else sm_scale)
  kv_lengths = jnp.clip(kv_lengths, 0, smax)   # the kernel never reads past the cache
  qp = pack_queries(q, plan)
  k, v = pad_cache(k, v, plan)
  dp, tr = plan.head_dim_pad, plan.tile_r
  o_shape = jax.ShapeDtypeStruct((batch, hkv, plan.num_splits, plan.rows_pad, dp), jnp.float32)
  lse_shape = jax.ShapeDtypeStruct((batch, hkv, plan.num_splits, plan.rows_pad), jnp.float32)
  in_specs = [
      pl.BlockSpec((batch,), lambda r, s, h, b: (0,)),
      pl.BlockSpec((None, None, tr, dp), lambda r, s, h, b: (b, h, r, 0)),
      pl.BlockSpec((None, k.shape[1], None, dp), lambda r, s, h, b: (b, 0, h, 0)),
      pl.BlockSpec((None, k.shape[1], None, dp), lambda r, s, h, b: (b, 0, h, 0)),
  ]
  out_specs = [pl.BlockSpec((None, None, None, tr, dp), lambda r, s, h, b: (b, h, s, r, 0)),
               pl.BlockSpec((None, None, None, tr), lambda r, s, h, b: (b, h, s, r))]
  args = [kv_lengths, qp, k, v]
  aliases = {}
  kernel = functools.partial(_window_kernel, plan=plan, scale=scale)
  if poison_outputs:
    aliases = {4: 0, 5: 1}
    in_specs += out_specs
    args += [cm.poison_like(o_shape.shape, o_shape.dtype),
             cm.poison_like(lse_shape.shape, lse_shape.dtype)]
    inner = kernel
    kernel = lambda l, q_, k_, v_, _o, _l, o, lse: inner(l, q_, k_, v_, o, lse)  # noqa: E731
  return pl.pallas_call(
      kernel, grid=plan.grid, in_specs=in_specs, out_specs=out_specs,
      out_shape=[o_shape, lse_shape], input_output_aliases=aliases, interpret=interpret,
      name="window_attention", compiler_params=cm.compiler_params(num_warps, num_stages),
  )(*args)


def check_plan(plan: DecodePlan, q, k):
  batch, window, hq, d = q.shape
  expected = (batch, k.shape[2], window * (hq // k.shape[2]), k.shape[1],
              cm.padded_head_dim(d))
  got = (plan.batch, plan.num_kv_heads, plan.rows, plan.max_len, plan.head_dim_pad)
  if got != expected:
    raise ValueError(f"decode plan was made for (batch, kv heads, rows, Smax, D_pad)={got}, "
                     f"but the inputs need {expected}")


def window_attention_reference(q, k, v, kv_lengths, *, sm_scale: float | None = None):
  """Pure-jnp reference: keys ``[0, kv_lengths[b])`` visible, float32 softmax."""
  kv_lengths = validate_inputs(q, k, v, kv_lengths)
  batch, window, hq, d = q.shape
  smax, hkv = k.shape[1], k.shape[2]
  scale = d ** -0.5 if sm_scale is None else sm_scale
  qg = q.reshape(batch, window, hkv, hq // hkv, d)
  scores = jnp.einsum("bwkgd,bskd->bkgws", qg, k, preferred_element_type=jnp.float32,
                      precision=lax.Precision.HIGHEST) * scale
  visible = jnp.arange(smax)[None, :] < kv_lengths[:, None]
  scores = jnp.where(visible[:, None, None, None, :], scores, -jnp.inf)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgws,bskd->bwkgd", probs, v, preferred_element_type=jnp.float32,
                   precision=lax.Precision.HIGHEST)
  return out.reshape(batch, window, hq, d).astype(q.dtype)
