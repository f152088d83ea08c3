"""TPU attention: splash attention for full-sequence passes, a Pallas window kernel for decoding.

``fdllm_jax.attention.attention(..., implementation="splash")`` lands in :func:`attention` here.

* **No cache** (training over x_t ++ x_0 or x_t^A ++ x_t^B ++ x_0, a forward without cache): JAX's
  splash attention (``jax.experimental.pallas.ops.tpu.splash_attention``), forward and backward
  through splash's own custom VJP. Our mask objects become splash masks (:func:`splash_mask`):
  causal, block-causal and the training mask are *computed inside the kernel* from the query and
  key indices (shifts and compares only, when the block size is a power of two), so no [T, S]
  array is ever built; other masks are evaluated lazily per tile and only the tiles the mask cuts
  are stored. Splash's mask info, which lists the tiles to visit, costs a Python pass over every
  tile to build: kernels are cached per (mask, shape, heads, block sizes) (:func:`splash_kernel`).
  GQA uses splash's grouped MHA form (MQA form for one KV head); the batch is a ``vmap``. Lengths
  that are not a multiple of the splash block are padded, the padded keys hidden by the mask, the
  padded queries dropped.
* **With a cache** (``q_offset_B`` given: decoding windows, the AR step, prefill into a cache):
  the window kernel of ``pallas_kernels.tpu_window``, which reads each row's K/V only up to its
  own length (and up to the last key the mask lets the window see), or the XLA reference
  (``window_impl="xla"``). See the README's TPU section for the choice.
* **Sharding**: under a mesh (``jax.set_mesh`` / ``jax.sharding.use_mesh`` / ``with mesh:``),
  both paths run inside ``jax.shard_map``, batch split over the mesh's batch axes
  (``data``, ``fsdp``) and heads over ``tensor``, so the kernels see only their local shards
  (a Pallas call cannot be partitioned by XLA's SPMD pass).

Off TPU every kernel runs in Pallas' interpret mode (slow, exact): this is how the tests check
them on CPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fdllm_jax import masks as masks_lib
from fdllm_jax import sharding

try:  # splash lives in jax's experimental Pallas ops (jax 0.4.2x .. 0.11.x)
  from jax.experimental.pallas.ops.tpu import splash_attention as _sa
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as _sa_mask
  _SPLASH_IMPORT_ERROR = None
except ImportError as _err:  # pragma: no cover - depends on the installed jax
  _sa = _sa_mask = None
  _SPLASH_IMPORT_ERROR = _err

NUM_LANES = 128  # splash tiles are multiples of the TPU lane width
HEAD_AXIS = sharding.HEAD_AXIS

# Block-size cost model (per visited tile: MXU time + fixed grid-step overhead). Order-of-
# magnitude figures for a v5p TensorCore; only their ratio matters. Re-fit them from
# benchmarks/ on a real TPU.
_PEAK_FLOPS = 4.59e14
_STEP_OVERHEAD_S = 0.35e-6
_BLOCK_Q_CANDIDATES = (128, 256, 512)
_BLOCK_KV_CANDIDATES = (128, 256, 512, 1024)
_MAX_BLOCK_KV_COMPUTE = 512


def _require_splash():
  if _sa is None:
    raise ImportError(
        "implementation='splash' needs jax.experimental.pallas.ops.tpu.splash_attention, which "
        f"this jax ({jax.__version__}) does not provide: {_SPLASH_IMPORT_ERROR}")


def on_tpu() -> bool:
  return jax.default_backend() == "tpu"


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _is_pow2(n: int) -> bool:
  return n >= 1 and (n & (n - 1)) == 0


# ----------------------------------------------------------------------------- mask functions

@functools.lru_cache(maxsize=256)
def kernel_mask_fn(mask, num_keys: int | None = None) -> Callable | None:
  """``f(q_idx, k_idx) -> bool`` for ``mask`` using only shifts, compares and logic.

  The function works on numpy arrays (splash builds its tile lists with it), on jnp arrays and
  inside a TPU kernel (no integer division). Keys ``>= num_keys`` (padding) are hidden when
  ``num_keys`` is given. Returns None when the mask cannot be written that way (a block size
  that is not a power of two, an explicit array). Cached, so the same function object (a
  static argument of jitted kernels) comes back for the same mask.
  """
  if isinstance(mask, masks_lib.Explicit):
    return None
  keep = (lambda q, k: (q >= 0) & (k < num_keys)) if num_keys is not None else None

  def with_keys(fn):
    if keep is None:
      return fn
    return lambda q, k: fn(q, k) & (k < num_keys)

  if isinstance(mask, masks_lib.Full):
    return keep if keep is not None else (lambda q, k: (q >= 0) & (k >= 0))
  if isinstance(mask, masks_lib.Causal):
    return with_keys(lambda q, k: q >= k)
  if isinstance(mask, masks_lib.BlockCausal) and _is_pow2(mask.block_size):
    shift = mask.block_size.bit_length() - 1
    return with_keys(lambda q, k: (q >> shift) >= (k >> shift))
  if isinstance(mask, masks_lib.Training) and _is_pow2(mask.block_size):
    shift = mask.block_size.bit_length() - 1
    n = mask.seq_len // mask.block_size  # blocks per stream
    clean_start = mask.num_noisy_streams * n  # global blocks >= this are clean

    def training(q, k):
      gq, gk = q >> shift, k >> shift
      q_clean, k_clean = gq >= clean_start, gk >= clean_start
      # a noisy query's block within its own stream (no division: streams are few)
      q_own = gq - n * sum((gq >= j * n) * 1 for j in range(1, mask.num_noisy_streams))
      # same block (hence same stream) | noisy block sees earlier clean blocks
      # | clean stream block-causal
      return ((gq == gk) | (k_clean & ~q_clean & (q_own > gk - clean_start))
              | (k_clean & q_clean & (gq >= gk)))
    return with_keys(training)
  return None


def key_bound(mask, q_idx):
  """Exclusive upper bound on the keys any query ``<= q_idx`` may see (jnp), or None."""
  if isinstance(mask, masks_lib.Causal):
    return q_idx + 1
  if isinstance(mask, masks_lib.BlockCausal):
    b = mask.block_size
    return (q_idx // b + 1) * b
  return None


@functools.lru_cache(maxsize=256)
def key_bound_fn(mask) -> Callable | None:
  """``key_bound`` bound to ``mask`` (one cached function object per mask), or None."""
  if not isinstance(mask, (masks_lib.Causal, masks_lib.BlockCausal)):
    return None
  return functools.partial(key_bound, mask)


# ----------------------------------------------------------------------------- splash masks

# Splash's base class for masks computed in the kernel from indices (private: checked here, the
# tile mask below serves every mask if a jax release drops it).
_COMPUTABLE_BASE = getattr(_sa_mask, "_ComputableMask", None) if _sa_mask is not None else None

if _COMPUTABLE_BASE is not None:

  class _ComputedMask(_COMPUTABLE_BASE):
    """A splash mask whose kernel computes it from indices (nothing stored per tile)."""

    def __init__(self, mask, shape, num_keys):
      self.source = mask
      self.num_keys = num_keys
      fn = kernel_mask_fn(mask, num_keys if num_keys < shape[1] else None)
      super().__init__(shape=shape, mask_function=fn)

    def __eq__(self, other):
      return (isinstance(other, _ComputedMask) and self.source == other.source
              and self.shape == other.shape and self.num_keys == other.num_keys)

    def __hash__(self):
      return hash((_ComputedMask, self.source, self.shape, self.num_keys))

if _sa_mask is not None:

  class _TileMask(_sa_mask.Mask):
    """A splash mask evaluated tile by tile from our mask (partial tiles stored, deduplicated)."""

    def __init__(self, mask, shape, num_keys, dense=None):
      self.source = mask
      self._shape = tuple(shape)
      self.num_keys = num_keys
      self.dense = dense  # numpy [T, S] for Explicit masks

    @property
    def shape(self):
      return self._shape

    def __getitem__(self, idx):
      q_slice, k_slice = idx
      q = np.arange(*q_slice.indices(self._shape[0]))[:, None]
      k = np.arange(*k_slice.indices(self._shape[1]))[None, :]
      if self.dense is not None:
        t, s = self.dense.shape
        allowed = np.zeros((q.shape[0], k.shape[1]), bool)
        qq, kk = q[:, 0], k[0]
        rows, cols = qq[qq < t], kk[kk < s]
        allowed[:len(rows), :len(cols)] = self.dense[rows[:, None], cols[None, :]]
        allowed[len(rows):, 0] = True  # padded queries: see key 0 (output dropped)
        return allowed
      allowed = np.broadcast_to(np.asarray(self.source(q, k)), (q.shape[0], k.shape[1]))
      return allowed & (k < self.num_keys)

    def __eq__(self, other):
      return (isinstance(other, _TileMask) and self.source == other.source
              and self._shape == other._shape and self.num_keys == other.num_keys
              and self.dense is other.dense)

    def __hash__(self):
      return hash((_TileMask, id(self.source) if self.dense is not None else self.source,
                   self._shape, self.num_keys))


def splash_mask(mask, num_queries: int, num_keys: int, padded_queries: int | None = None,
                padded_keys: int | None = None):
  """The splash mask [padded_queries, padded_keys] for our ``mask`` over ``num_keys`` real keys."""
  _require_splash()
  shape = (padded_queries or num_queries, padded_keys or num_keys)
  if isinstance(mask, masks_lib.Full) and shape[1] == num_keys:
    return _sa.FullMask(shape)
  if isinstance(mask, masks_lib.Explicit):
    dense = explicit_dense(mask, num_queries, num_keys)
    if dense is None:
      raise ValueError(
          f"splash attention takes an Explicit mask of shape [T, S] = [{num_queries}, "
          f"{num_keys}] shared by the batch, known at trace time; got "
          f"{tuple(np.shape(mask.allowed))}")
    return _TileMask(mask, shape, num_keys, dense=dense)
  if _COMPUTABLE_BASE is not None and kernel_mask_fn(mask) is not None:
    return _ComputedMask(mask, shape, num_keys)
  return _TileMask(mask, shape, num_keys)


def explicit_dense(mask, num_queries: int, num_keys: int):
  """An Explicit mask as a numpy [T, S] array, or None (traced, per-row or other shape)."""
  try:
    dense = np.asarray(mask.allowed)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None
  if math.prod(dense.shape[:-2]) != 1 or dense.shape[-2:] != (num_queries, num_keys):
    return None
  return dense.reshape(num_queries, num_keys)


# ----------------------------------------------------------------------------- block sizes

def tile_visibility(mask, num_queries: int, num_keys: int, block_q: int, block_kv: int):
  """bool [Tp / block_q, Sp / block_kv]: which tiles hold at least one visible (q, k) pair.

  Tp, Sp are the lengths padded to the blocks; padded queries count (splash computes their
  rows), padded keys are hidden. Evaluated on a coarse grid of cells on which the mask is
  constant, so it stays cheap for long sequences.
  """
  tp, sp = _round_up(num_queries, block_q), _round_up(num_keys, block_kv)
  nq, nk = tp // block_q, sp // block_kv
  if isinstance(mask, masks_lib.Causal):
    i, j = np.arange(nq)[:, None], np.arange(nk)[None, :]
    return (j * block_kv <= (i + 1) * block_q - 1) & (j * block_kv < num_keys)
  if isinstance(mask, (masks_lib.BlockCausal, masks_lib.Training)):
    cell = math.gcd(mask.block_size, block_q, block_kv, num_keys)
  elif isinstance(mask, masks_lib.Full):
    cell = math.gcd(block_q, block_kv, num_keys)
  else:
    cell = 1
  if isinstance(mask, masks_lib.Explicit):
    dense = np.zeros((tp, sp), bool)
    dense[:num_queries, :num_keys] = explicit_dense(mask, num_queries, num_keys)
    dense[num_queries:, 0] = True
  else:
    fn = kernel_mask_fn(mask) or mask  # the predicate the kernel sees, padded queries included
    q = (np.arange(tp // cell) * cell)[:, None]
    k = (np.arange(sp // cell) * cell)[None, :]
    dense = np.broadcast_to(np.asarray(fn(q, k)), (q.shape[0], k.shape[1])) & (k < num_keys)
  return dense.reshape(nq, block_q // cell, nk, block_kv // cell).any(axis=(1, 3))


@dataclasses.dataclass(frozen=True)
class SplashBlocks:
  """Splash tile sizes (used for forward, dq and dkv alike) and the padded lengths."""
  block_q: int
  block_kv: int
  block_kv_compute: int

  def splash(self):
    _require_splash()
    return _sa.BlockSizes(
        block_q=self.block_q, block_kv=self.block_kv, block_kv_compute=self.block_kv_compute,
        block_q_dkv=self.block_q, block_kv_dkv=self.block_kv,
        block_kv_dkv_compute=self.block_kv_compute, block_q_dq=self.block_q,
        block_kv_dq=self.block_kv)


def choose_block_sizes(mask, num_queries: int, num_keys: int, head_dim: int = 128) -> SplashBlocks:
  """Tile sizes minimising (visited tiles) x (MXU time per tile + grid-step overhead).

  Larger tiles pay less fixed overhead per step; smaller ones skip more of a block-sparse mask
  and waste less padding. The training mask at 2L = 4096 skips ~72% of 128x128 tiles but only
  ~62% of 512x512 ones; on a TPU the overhead term still favours the larger tiles.
  """
  if isinstance(mask, masks_lib.Explicit):  # hashed by identity: keep it out of the cache
    return _choose_block_sizes(mask, num_queries, num_keys, head_dim)
  return _cached_block_sizes(mask, num_queries, num_keys, head_dim)


def _choose_block_sizes(mask, num_queries, num_keys, head_dim):
  best = None
  max_q, max_kv = _round_up(num_queries, NUM_LANES), _round_up(num_keys, NUM_LANES)
  for bq in _BLOCK_Q_CANDIDATES:
    if bq > max_q and bq != _BLOCK_Q_CANDIDATES[0]:
      continue
    for bkv in _BLOCK_KV_CANDIDATES:
      if bkv > max_kv and bkv != _BLOCK_KV_CANDIDATES[0]:
        continue
      if isinstance(mask, masks_lib.Explicit):
        visited = _round_up(num_queries, bq) // bq * (_round_up(num_keys, bkv) // bkv)
      else:
        visited = int(tile_visibility(mask, num_queries, num_keys, bq, bkv).sum())
      cost = visited * (4.0 * bq * bkv * head_dim / _PEAK_FLOPS + _STEP_OVERHEAD_S)
      if best is None or cost < best[0] - 1e-15:
        best = (cost, bq, bkv)
  _, bq, bkv = best
  return SplashBlocks(bq, bkv, min(bkv, _MAX_BLOCK_KV_COMPUTE))


_cached_block_sizes = functools.lru_cache(maxsize=256)(_choose_block_sizes)


# ----------------------------------------------------------------------------- kernels

def _build_kernel(mask, num_queries, num_keys, num_heads, num_kv_heads, blocks, interpret):
  tp, sp = _round_up(num_queries, blocks.block_q), _round_up(num_keys, blocks.block_kv)
  head_mask = splash_mask(mask, num_queries, num_keys, tp, sp)
  multi = _sa.MultiHeadMask([head_mask] * num_heads)
  make = _sa.make_splash_mqa if num_kv_heads == 1 else _sa.make_splash_mha
  with jax.ensure_compile_time_eval():  # concrete mask-info arrays, safe to cache across traces
    return make(multi, block_sizes=blocks.splash(), head_shards=1, q_seq_shards=1,
                interpret=interpret)


@functools.lru_cache(maxsize=64)
def _cached_kernel(mask, num_queries, num_keys, num_heads, num_kv_heads, blocks, interpret):
  return _build_kernel(mask, num_queries, num_keys, num_heads, num_kv_heads, blocks, interpret)


def splash_kernel(mask, num_queries: int, num_keys: int, num_heads: int, num_kv_heads: int,
                  blocks: SplashBlocks | None = None, head_dim: int = 128,
                  interpret: bool | None = None):
  """The splash kernel (``SplashAttentionKernel``) for one batch row; cached per shape.

  Call it as ``kernel(q_HxTpxD, k_KxSpxD, v_KxSpxD)`` (``k_SpxD`` when ``num_kv_heads == 1``).
  """
  _require_splash()
  blocks = blocks or choose_block_sizes(mask, num_queries, num_keys, head_dim)
  interpret = (not on_tpu()) if interpret is None else interpret
  args = (mask, num_queries, num_keys, num_heads, num_kv_heads, blocks, bool(interpret))
  if isinstance(mask, masks_lib.Explicit):  # hashed by identity: do not pin it in a cache
    return _build_kernel(*args)
  return _cached_kernel(*args)


def clear_cache():
  _cached_kernel.cache_clear()
  _cached_block_sizes.cache_clear()


@dataclasses.dataclass(frozen=True)
class SkipStats:
  """Tiles of the forward pass: how many the kernel visits, out of the full grid."""
  visited: int
  total: int
  block_q: int
  block_kv: int

  @property
  def skipped_fraction(self) -> float:
    return 1.0 - self.visited / self.total


def skip_stats(kernel, num_queries_padded: int, num_keys_padded: int) -> SkipStats:
  """Counts the forward tiles splash visits, from the kernel's own mask info.

  ``block_mask`` holds 0 (skip), 1 (partial: masked) or 2 (full) per tile; splash may shrink
  its grid by dropping all-zero columns, which keeps the number of non-zero entries.
  """
  info = kernel.fwd_mask_info
  blocks = kernel.kwargs["block_sizes"]
  total = (num_queries_padded // blocks.block_q) * (num_keys_padded // blocks.block_kv)
  if info.block_mask is None:
    return SkipStats(total, total, blocks.block_q, blocks.block_kv)
  visited = int(np.count_nonzero(np.asarray(info.block_mask)[0]))
  return SkipStats(visited, total, blocks.block_q, blocks.block_kv)


def _traced_without_x64(fn):
  """``fn`` (differentiable) traced with 64-bit types off, its backward too.

  JAX's splash kernel divides an int32 grid index by a Python int with ``lax.div``, which
  fails under ``jax_enable_x64`` (the int becomes int64). The kernel's inputs are 16/32-bit
  anyway; a context manager alone would not reach the backward, which JAX traces later, so
  the VJP is taken here and replayed inside the same context.
  """
  @jax.custom_vjp
  def call(*args):
    with jax.enable_x64(False):
      return fn(*args)

  def forward(*args):
    with jax.enable_x64(False):
      return jax.vjp(fn, *args)

  def backward(vjp, cotangent):
    with jax.enable_x64(False):
      return vjp(cotangent)

  call.defvjp(forward, backward)
  return call


def splash_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, *, mask, kv_lengths_B=None,
                     sm_scale=None, blocks: SplashBlocks | None = None,
                     interpret: bool | None = None):
  """Splash attention on local (unsharded) arrays, same conventions as ``xla_attention``.

  Query ``t`` has index ``t`` (no offset). ``kv_lengths_B`` (optional) hides keys
  ``>= kv_lengths_B[b]`` through splash's segment ids.
  """
  _require_splash()
  batch, num_q, num_heads, head_dim = q_BxTxHxD.shape
  num_k, num_kv_heads = k_BxSxKxD.shape[1], k_BxSxKxD.shape[2]
  blocks = blocks or choose_block_sizes(mask, num_q, num_k, head_dim)
  kernel = splash_kernel(mask, num_q, num_k, num_heads, num_kv_heads, blocks, head_dim,
                         interpret)
  tp, sp = _round_up(num_q, blocks.block_q), _round_up(num_k, blocks.block_kv)
  scale = head_dim ** -0.5 if sm_scale is None else sm_scale
  q = (q_BxTxHxD * jnp.asarray(scale, q_BxTxHxD.dtype)).transpose(0, 2, 1, 3)
  k, v = k_BxSxKxD.transpose(0, 2, 1, 3), v_BxSxKxD.transpose(0, 2, 1, 3)
  q = jnp.pad(q, ((0, 0), (0, 0), (0, tp - num_q), (0, 0)))
  k = jnp.pad(k, ((0, 0), (0, 0), (0, sp - num_k), (0, 0)))
  v = jnp.pad(v, ((0, 0), (0, 0), (0, sp - num_k), (0, 0)))
  if num_kv_heads == 1:
    k, v = k[:, 0], v[:, 0]
  if kv_lengths_B is None:
    run, segments = jax.vmap(kernel), ()
  else:
    lengths = jnp.asarray(kv_lengths_B, jnp.int32)
    q_seg = jnp.zeros((batch, tp), jnp.int32)
    kv_seg = (jnp.arange(sp, dtype=jnp.int32)[None, :] >= lengths[:, None]).astype(jnp.int32)
    segments = (_sa.SegmentIds(q=q_seg, kv=kv_seg),)
    run = jax.vmap(lambda q, k, v, s: kernel(q, k, v, segment_ids=s))
  if jax.config.jax_enable_x64:
    run = _traced_without_x64(run)
  out = run(q, k, v, *segments)
  return out[:, :, :num_q].transpose(0, 2, 1, 3).astype(q_BxTxHxD.dtype)


# ----------------------------------------------------------------------------- decode windows

def window_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, *, mask, q_offset_B, kv_lengths_B=None,
                     sm_scale=None, window_impl: str = "pallas", interpret: bool | None = None):
  """Attention of T queries (indices ``q_offset_B[b] + t``) over a ragged cache.

  ``window_impl="pallas"`` runs ``pallas_kernels.tpu_window`` (falls back to the XLA path for
  masks it cannot compute in-kernel, e.g. ``Explicit``, or a cache length not a multiple of 8);
  ``"xla"`` runs the reference.
  """
  from fdllm_jax import attention as attention_lib  # the reference; imported lazily (cycle)
  if window_impl not in ("pallas", "xla"):
    raise ValueError(f"window_impl must be 'pallas' or 'xla'; got {window_impl!r}")
  batch, _, _, _ = q_BxTxHxD.shape
  num_k = k_BxSxKxD.shape[1]
  fn = kernel_mask_fn(mask)
  use_kernel = window_impl == "pallas" and fn is not None and num_k % 8 == 0
  if not use_kernel:
    return attention_lib.xla_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask=mask,
                                       q_offset_B=q_offset_B, kv_lengths_B=kv_lengths_B,
                                       sm_scale=sm_scale)
  from pallas_kernels import tpu_window
  if kv_lengths_B is None:
    kv_lengths_B = jnp.full((batch,), num_k, jnp.int32)
  return tpu_window.window_attention(
      q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, kv_lengths_B, q_offset_B, mask_fn=fn,
      key_bound_fn=key_bound_fn(mask), sm_scale=sm_scale,
      interpret=(not on_tpu()) if interpret is None else interpret)


# ----------------------------------------------------------------------------- sharding

def attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, *, mask, q_offset_B=None, kv_lengths_B=None,
              sm_scale=None, mesh=None, window_impl: str = "pallas",
              interpret: bool | None = None, blocks: SplashBlocks | None = None,
              head_axis: str = HEAD_AXIS):
  """The ``"splash"`` implementation of ``fdllm_jax.attention.attention``.

  Under a mesh (``mesh`` or the context mesh) the work is split with ``jax.shard_map``: batch
  over the mesh's ``data``/``fsdp`` axes, query heads over ``head_axis``. KV heads are split
  the same way when the axis divides them, otherwise each shard picks the KV head its query
  heads share (the axis size must then be a multiple of the KV-head count)
  (``fdllm_jax.sharding.shard_attention``).
  """
  num_q, num_k = q_BxTxHxD.shape[1], k_BxSxKxD.shape[1]
  if isinstance(mask, masks_lib.Explicit) and (
      q_offset_B is not None or explicit_dense(mask, num_q, num_k) is None):
    _warn_once("splash attention: an Explicit mask that is per-row, traced or used with a "
               "cache has no kernel form; running the xla reference")
    from fdllm_jax import attention as attention_lib  # imported lazily (cycle)
    return attention_lib.xla_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask=mask,
                                       q_offset_B=q_offset_B, kv_lengths_B=kv_lengths_B,
                                       sm_scale=sm_scale)
  mesh = mesh if mesh is not None else sharding.context_mesh()

  def local(q, k, v, q_offset, kv_lengths):
    if q_offset is None:
      return splash_attention(q, k, v, mask=mask, kv_lengths_B=kv_lengths, sm_scale=sm_scale,
                              blocks=blocks, interpret=interpret)
    return window_attention(q, k, v, mask=mask, q_offset_B=q_offset, kv_lengths_B=kv_lengths,
                            sm_scale=sm_scale, window_impl=window_impl, interpret=interpret)

  if mesh is None and on_tpu() and jax.device_count() > 1:
    _warn_once("splash attention was traced without a mesh context on a multi-device TPU: "
               "XLA cannot partition a Pallas kernel, so its inputs get gathered. Trace the "
               "step under `with jax.set_mesh(mesh):` (or pass mesh=...)")
  return sharding.shard_attention(local, q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, q_offset_B,
                                  kv_lengths_B, mesh=mesh, head_axis=head_axis)


_WARNED: set = set()


def _warn_once(message: str):
  if message not in _WARNED:
    _WARNED.add(message)
    warnings.warn(message, stacklevel=3)


def describe_sharding(mesh, batch: int, num_heads: int, num_kv_heads: int,
                      head_axis: str = HEAD_AXIS) -> dict:
  """How :func:`attention` splits work on ``mesh`` (for logs and the README recipe)."""
  return sharding.describe_attention_sharding(mesh, batch, num_heads, num_kv_heads, head_axis)
