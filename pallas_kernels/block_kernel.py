"""Flash attention for the Fast-dLLM v2 masks, forward and backward, in Pallas (Triton on GPU).

``block_attention(q, k, v, kind=..., block_size=...)`` computes grouped-query softmax attention
with one of three structured masks over *sequence indices* (query t has index t, key s has
index s):

* ``"causal"``:        ``k <= q``
* ``"block_causal"``:  ``k // B <= q // B`` (spec section 2, inference)
* ``"training"``:      the x_t ++ x_0 mask of spec section 2, T = S = 2L, L = T // 2
* ``"training_shared"``: the same over x_t^A ++ x_t^B ++ x_0 (both views' noisy streams and
  one shared clean stream, ``masks.Training(..., num_noisy_streams=2)``), T = S = 3L

Work skipping. For every query tile, ``key_tile_segments`` returns one *segment* per key
stream (noisy x_t keys and clean x_0 keys for "training", each noisy stream and the clean one
for "training_shared", a single one for the others),
each a range of key tiles ``[lo, hi)`` with a sub-range ``[full_lo, full_hi)`` of tiles the mask
shows entirely. The kernels loop over exactly these ranges: hidden tiles are never loaded,
fully visible tiles skip the mask arithmetic, and only the tiles on a mask edge compute it.
``query_tile_segments`` is the transposed logic used by the dK/dV kernel. Both are pure
functions of (traced or concrete) int32 tile indices, closed-form from the mask definition;
``visited_tiles`` evaluates them over all tiles so tests can compare with the dense mask.

Kernels and grids: forward and dQ run one program per (query tile, query head, batch row),
heaviest query tiles first; dK/dV runs one program per (key tile, KV head, batch row) and loops
over the query heads that share the KV head inside each query tile, so dK/dV are summed over the
group without atomics or a second pass.

Numerics: scores, softmax statistics and accumulators in float32; scores are kept in the
base-2 domain (``exp2``, scale folded with log2 e); probabilities are cast to the value
dtype before the P @ V matmul, as in the xla reference. Residuals for the backward are
O in float32 (a second output of the forward for low-precision inputs) and the per-row
log-sum-exp (base 2).

Shapes: q [B, T, Hq, D], k/v [B, S, Hkv, D], Hq a multiple of Hkv (query head h uses kv head
h // (Hq // Hkv)). T and S need not be multiples of the tiles: inputs are zero-padded to the
tile grid (and D to a power of two >= 16) and the result is sliced back.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
import numpy as np

from pallas_kernels import _common as cm

KINDS = ("causal", "block_causal", "training", "training_shared")
TRAINING_KINDS = {"training": 1, "training_shared": 2}  # kind -> number of noisy streams


def stream_length(kind: str, num_queries: int) -> int | None:
  """L, one stream's length, for the training kinds (T = (noisy streams + 1) * L); else None."""
  if kind not in TRAINING_KINDS:
    return None
  return num_queries // (TRAINING_KINDS[kind] + 1)


# ----------------------------------------------------------------------------------------------
# The mask, as the kernels evaluate it on edge tiles.


def _same(x):
  return x


def mask_allowed(kind: str, q_idx, k_idx, *, block_size: int, seq_len: int | None = None,
                 q_to_tile=_same, k_to_tile=_same):
  """Boolean ``allowed[q, k]`` for broadcastable non-negative int32 index arrays.

  ``seq_len`` is L (one stream's length) for the training kinds. Written with ``lax.div`` and
  comparisons so the same code lowers to Triton; tests check it against ``fdllm_jax.masks``.
  ``q_to_tile`` / ``k_to_tile`` map per-index quantities onto the tile: a kernel that passes
  index vectors (and broadcasts here) computes each index's stream and block once, not once
  per tile element.
  """
  q_idx = jnp.asarray(q_idx, jnp.int32)
  k_idx = jnp.asarray(k_idx, jnp.int32)
  b = block_size
  if kind == "causal":
    return k_to_tile(k_idx) <= q_to_tile(q_idx)
  if kind == "block_causal":
    return k_to_tile(cm.idiv(k_idx, b)) <= q_to_tile(cm.idiv(q_idx, b))
  if kind in TRAINING_KINDS:
    length, n_noisy = seq_len, TRAINING_KINDS[kind]

    def stream(idx):  # 0 .. n_noisy (clean); indices past the end count as clean
      return sum((idx >= j * length).astype(jnp.int32) for j in range(1, n_noisy + 1))

    q_stream, k_stream = stream(q_idx), stream(k_idx)
    q_blk = q_to_tile(cm.idiv(q_idx - q_stream * length, b))
    k_blk = k_to_tile(cm.idiv(k_idx - k_stream * length, b))
    q_stream, k_stream = q_to_tile(q_stream), k_to_tile(k_stream)
    q_clean, k_clean = q_stream == n_noisy, k_stream == n_noisy
    same = (q_blk == k_blk) & (q_stream == k_stream)
    # (q_stream < n_noisy, not ~q_clean: Mosaic GPU cannot negate 1-bit registers)
    noisy_sees_clean = (q_stream < n_noisy) & k_clean & (q_blk > k_blk)
    clean_causal = q_clean & k_clean & (q_blk >= k_blk)
    return same | noisy_sees_clean | clean_causal
  raise ValueError(f"block_attention kind={kind!r} is unknown; use one of {KINDS}")


# ----------------------------------------------------------------------------------------------
# Tile-visiting logic (used by the kernels for their loop bounds, and by the tests).

_BIG = 2**30


@dataclasses.dataclass(frozen=True)
class Segment:
  """Tiles ``[lo, hi)`` are visited; ``[full_lo, full_hi)`` among them need no mask."""

  lo: jax.Array
  hi: jax.Array
  full_lo: jax.Array
  full_hi: jax.Array


def _like(x, value):
  """``value`` with ``x``'s shape, by arithmetic on ``x`` (inside Mosaic GPU kernels JAX 0.12
  may turn ``jnp.full_like`` of a scalar into a constant the kernel lowering refuses)."""
  return x * 0 + value


def _stream_intervals(kind, direction, r, subset, *, block_size, length, n_queries):
  """Visible column interval per column stream for row index ``r`` in row ``subset``.

  Returns a list (one entry per column stream) of ``(lo, hi)`` or None (stream not visible from
  this row subset). ``direction`` "fwd": rows are queries, columns keys; "bwd": the transpose.
  Training kinds: ``subset`` is a stream number, 0 .. n-1 noisy and n clean.
  Every interval has ``lo <= hi`` and both ends are non-decreasing in ``r`` (what makes the
  union / intersection over a row tile a function of the tile's first and last row).
  """
  b = block_size
  if kind == "causal":
    if direction == "fwd":
      return [(_like(r, 0), r + 1)]
    return [(r, _like(r, n_queries))]
  if kind == "block_causal":
    if direction == "fwd":
      return [(_like(r, 0), (cm.idiv(r, b) + 1) * b)]
    return [(cm.idiv(r, b) * b, _like(r, n_queries))]
  # training kinds: column stream s covers [s L, (s + 1) L); streams 0 .. n-1 are noisy (x_t,
  # one per view), stream n is the clean x_0
  n = TRAINING_KINDS[kind]
  clean_start = n * length
  intervals = [None] * (n + 1)
  if subset < n:
    start = subset * length
    blk = cm.idiv(r - start, b)
    intervals[subset] = (start + blk * b, start + blk * b + b)
    if direction == "fwd":  # noisy query: its own noisy block, and clean blocks before it
      intervals[n] = (_like(r, clean_start), clean_start + blk * b)
    return intervals       # noisy key: seen by the noisy queries of its block only
  blk = cm.idiv(r - clean_start, b)
  if direction == "fwd":   # clean query: clean blocks up to its own
    intervals[n] = (_like(r, clean_start), clean_start + (blk + 1) * b)
    return intervals
  # clean key: every noisy stream's queries of later blocks, clean queries of its block and later
  for s in range(n):
    intervals[s] = (s * length + (blk + 1) * b, _like(r, (s + 1) * length))
  intervals[n] = (clean_start + blk * b, _like(r, clean_start + length))
  return intervals


def _segments(kind, direction, row_tile, *, n_rows, n_cols, block_size, tile_r, tile_c,
              n_queries, length):
  r0 = jnp.asarray(row_tile, jnp.int32) * tile_r
  valid = r0 < n_rows
  r1 = jnp.minimum(r0 + tile_r, n_rows) - 1           # last valid row of the tile
  complete_rows = r0 + tile_r <= n_rows
  if kind in TRAINING_KINDS:
    n = TRAINING_KINDS[kind]
    subsets = [(s, jnp.maximum(r0, s * length), jnp.minimum(r1, (s + 1) * length - 1),
                valid & (r0 < (s + 1) * length) & (r1 >= s * length)) for s in range(n)]
    subsets.append((n, jnp.maximum(r0, n * length), r1, valid & (r1 >= n * length)))
    n_streams = n + 1
  else:
    subsets = [("all", r0, r1, valid)]
    n_streams = 1
  kw = dict(block_size=block_size, length=length, n_queries=n_queries)
  first = {name: _stream_intervals(kind, direction, a, name, **kw) for name, a, _, _ in subsets}
  last = {name: _stream_intervals(kind, direction, z, name, **kw) for name, _, z, _ in subsets}

  segments = []
  for s in range(n_streams):
    u_lo, u_hi = _like(r0, _BIG), _like(r0, 0)     # union of visible columns
    v_lo, v_hi = _like(r0, 0), _like(r0, _BIG)     # intersection
    for name, _, _, present in subsets:
      a, z = first[name][s], last[name][s]
      if a is None:   # this row subset sees nothing of stream s: the intersection is empty
        v_hi = jnp.where(present, 0, v_hi)
        continue
      u_lo = jnp.where(present, jnp.minimum(u_lo, a[0]), u_lo)
      u_hi = jnp.where(present, jnp.maximum(u_hi, z[1]), u_hi)
      v_lo = jnp.where(present, jnp.maximum(v_lo, z[0]), v_lo)
      v_hi = jnp.where(present, jnp.minimum(v_hi, a[1]), v_hi)
    u_hi = jnp.minimum(u_hi, n_cols)
    nonempty = valid & (u_hi > u_lo)
    lo = jnp.where(nonempty, cm.idiv(jnp.minimum(u_lo, n_cols), tile_c), 0)
    hi = jnp.where(nonempty, cm.icdiv(u_hi, tile_c), 0)
    # Fully visible tiles: inside the intersection, no padded column, no padded row.
    f_lo = cm.icdiv(v_lo, tile_c)
    f_hi = cm.idiv(jnp.minimum(v_hi, n_cols), tile_c)
    has_full = nonempty & complete_rows & (f_hi > f_lo)
    f_lo = jnp.where(has_full, jnp.clip(f_lo, lo, hi), lo)
    f_hi = jnp.where(has_full, jnp.clip(f_hi, f_lo, hi), lo)
    segments.append([lo, hi, f_lo, f_hi])
  # A column tile straddling two streams may be in both unions: visit it once, in the earlier
  # segment (masked there: a straddling tile is never inside one stream's intersection).
  # Earlier segments lie in earlier columns, so only their last tile can be shared.
  visited_hi = _like(r0, 0)
  for s in range(n_streams):
    lo, hi, f_lo, f_hi = segments[s]
    if s:
      lo = jnp.maximum(lo, visited_hi)
      hi = jnp.maximum(hi, lo)
      f_lo = jnp.clip(f_lo, lo, hi)
      f_hi = jnp.clip(f_hi, f_lo, hi)
      segments[s] = [lo, hi, f_lo, f_hi]
    visited_hi = jnp.where(hi > lo, jnp.maximum(visited_hi, hi), visited_hi)
  return [Segment(*seg) for seg in segments]


def key_tile_segments(kind, q_tile, *, num_queries, num_keys, block_size, tile_q, tile_k):
  """Key-tile segments visited by query tile ``q_tile`` (int32, any shape, traced or not)."""
  length = stream_length(kind, num_queries)
  return _segments(kind, "fwd", q_tile, n_rows=num_queries, n_cols=num_keys,
                   block_size=block_size, tile_r=tile_q, tile_c=tile_k,
                   n_queries=num_queries, length=length)


def query_tile_segments(kind, k_tile, *, num_queries, num_keys, block_size, tile_q, tile_k):
  """Query-tile segments that see key tile ``k_tile`` (the dK/dV kernel's loop bounds)."""
  length = stream_length(kind, num_queries)
  return _segments(kind, "bwd", k_tile, n_rows=num_keys, n_cols=num_queries,
                   block_size=block_size, tile_r=tile_k, tile_c=tile_q,
                   n_queries=num_queries, length=length)


def visited_tiles(kind, *, num_queries, num_keys, block_size, tile_q, tile_k,
                  direction="fwd") -> np.ndarray:
  """int8 [num_q_tiles, num_k_tiles]: 0 skipped, 1 visited with masking, 2 visited unmasked.

  ``direction="fwd"`` evaluates ``key_tile_segments`` (forward and dQ kernels), ``"bwd"``
  evaluates ``query_tile_segments`` (dK/dV kernel) and transposes, so both read [q, k].
  """
  nq, nk = cm.cdiv(num_queries, tile_q), cm.cdiv(num_keys, tile_k)
  kw = dict(num_queries=num_queries, num_keys=num_keys, block_size=block_size,
            tile_q=tile_q, tile_k=tile_k)
  if direction == "fwd":
    rows, n_cols = nq, nk
    segments = key_tile_segments(kind, jnp.arange(nq, dtype=jnp.int32), **kw)
  elif direction == "bwd":
    rows, n_cols = nk, nq
    segments = query_tile_segments(kind, jnp.arange(nk, dtype=jnp.int32), **kw)
  else:
    raise ValueError(f"direction must be 'fwd' or 'bwd'; got {direction!r}")
  out = np.zeros((rows, n_cols), np.int8)
  for seg in segments:
    lo, hi, f_lo, f_hi = (np.asarray(x) for x in (seg.lo, seg.hi, seg.full_lo, seg.full_hi))
    for r in range(rows):
      if np.any(out[r, lo[r]:hi[r]]):
        raise AssertionError(f"tile row {r}: segments overlap")
      out[r, lo[r]:hi[r]] = 1
      out[r, f_lo[r]:f_hi[r]] = 2
  return out if direction == "fwd" else out.T


def visited_key_tiles(kind, num_queries, num_keys, block_size, tile_q, tile_k) -> np.ndarray:
  """int [num_q_tiles]: key tiles the forward / dQ kernels load for each query tile."""
  return (visited_tiles(kind, num_queries=num_queries, num_keys=num_keys,
                        block_size=block_size, tile_q=tile_q, tile_k=tile_k) > 0).sum(axis=1)


# ----------------------------------------------------------------------------------------------
# Static configuration.


@dataclasses.dataclass(frozen=True)
class Tiling:
  """Tile sizes (powers of two >= 16) and Triton launch parameters for the three passes.

  The defaults were measured on an H200 (bf16, 12q/2kv heads, D 128, training mask at 8k
  tokens, benchmarks/gpu_attention.py): 64 x 64 tiles with 4 warps in every pass ran the
  forward + backward 1.71x faster than 128-query forward tiles with 8 warps (2.97 ms vs
  5.08 ms; 3.16x the cudnn path).
  """

  fwd_q: int = 64
  fwd_k: int = 64
  dq_q: int = 64
  dq_k: int = 64
  dkv_q: int = 64
  dkv_k: int = 64
  fwd_warps: int = 4
  bwd_warps: int = 4
  num_stages: int = 2

  def __post_init__(self):
    for f in ("fwd_q", "fwd_k", "dq_q", "dq_k", "dkv_q", "dkv_k"):
      cm.check_tile(f"Tiling.{f}", getattr(self, f))


def default_tiling(head_dim: int) -> Tiling:
  """Defaults for bf16 on Hopper-class GPUs; one tiling for every head size today (the 4-warp
  64 x 64 tiles measured best at D 128 were already the choice for D <= 64)."""
  del head_dim
  return Tiling()


@dataclasses.dataclass(frozen=True)
class Geometry:
  kind: str
  block_size: int
  num_queries: int     # T (valid)
  num_keys: int        # S (valid)
  t_pad: int
  s_pad: int
  head_dim_pad: int
  num_heads: int
  num_kv_heads: int
  scale: float
  tiling: Tiling
  interpret: bool
  poison: bool

  @property
  def group(self):
    return self.num_heads // self.num_kv_heads

  def allowed(self, q_idx, k_idx, q_to_tile=_same, k_to_tile=_same):
    ok = mask_allowed(self.kind, q_idx, k_idx, block_size=self.block_size,
                      seq_len=stream_length(self.kind, self.num_queries),
                      q_to_tile=q_to_tile, k_to_tile=k_to_tile)
    return ok & k_to_tile(k_idx < self.num_keys)

  def key_segments(self, q_tile, tile_q, tile_k):
    return key_tile_segments(self.kind, q_tile, num_queries=self.num_queries,
                             num_keys=self.num_keys, block_size=self.block_size,
                             tile_q=tile_q, tile_k=tile_k)

  def query_segments(self, k_tile, tile_q, tile_k):
    return query_tile_segments(self.kind, k_tile, num_queries=self.num_queries,
                               num_keys=self.num_keys, block_size=self.block_size,
                               tile_q=tile_q, tile_k=tile_k)


def _loop_segments(segments, body, carry):
  """Runs ``body(tile, carry, masked)`` over each segment: edge tiles masked, the rest not."""
  for seg in segments:
    carry = lax.fori_loop(seg.lo, seg.full_lo, functools.partial(body, masked=True), carry)
    carry = lax.fori_loop(seg.full_lo, seg.full_hi, functools.partial(body, masked=False), carry)
    carry = lax.fori_loop(seg.full_hi, seg.hi, functools.partial(body, masked=True), carry)
  return carry


def _dot_nt(a, b):
  """a @ b.T with float32 accumulation."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_nn(a, b):
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a, b):
  """a.T @ b with float32 accumulation."""
  return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _call(kernel, geom: Geometry, *, grid, in_specs, out_specs, out_shape, args, num_warps,
          name):
  """pallas_call with optional output poisoning (NaN buffers aliased to the outputs)."""
  in_specs = list(in_specs)
  args = list(args)
  aliases = {}
  if geom.poison:
    for i, (spec, shape) in enumerate(zip(out_specs, out_shape)):
      aliases[len(args)] = i
      in_specs.append(spec)
      args.append(cm.poison_like(shape.shape, shape.dtype))
    n_poison = len(out_shape)
    inner = kernel

    def kernel(*refs):  # drop the poisoned input refs; they alias the outputs
      n_in = len(refs) - 2 * n_poison
      return inner(*refs[:n_in], *refs[n_in + n_poison:])

  return pl.pallas_call(
      kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
      input_output_aliases=aliases, interpret=geom.interpret, name=name,
      compiler_params=cm.compiler_params(num_warps, geom.tiling.num_stages),
  )(*args)


# ----------------------------------------------------------------------------------------------
# Forward kernel: grid (query tiles, query heads, batch).


def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *o32_ref, geom: Geometry):
  tq, tk = geom.tiling.fwd_q, geom.tiling.fwd_k
  n_q_tiles = geom.t_pad // tq
  i = n_q_tiles - 1 - pl.program_id(0)  # heaviest tiles (last rows) first
  scale2 = geom.scale * cm.LOG2E
  q = q_ref[...]
  d = q.shape[-1]

  def body(j, carry, masked):
    acc, m, l = carry
    start = pl.multiple_of(j * tk, tk)
    k = k_ref[pl.ds(start, tk), :]
    s = _dot_nt(q, k) * scale2
    if masked:
      q_idx = i * tq + lax.broadcasted_iota(jnp.int32, (tq, 1), 0)    # broadcast only in
      k_idx = start + lax.broadcasted_iota(jnp.int32, (1, tk), 1)      # the final compare
      s = jnp.where(geom.allowed(q_idx, k_idx), s, cm.MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - m_new[:, None])
    l = alpha * l + jnp.sum(p, axis=1)
    v = v_ref[pl.ds(start, tk), :]
    acc = acc * alpha[:, None] + _dot_nn(p.astype(v.dtype), v)
    return acc, m_new, l

  carry = (jnp.zeros((tq, d), jnp.float32), jnp.full((tq,), cm.MASK_VALUE, jnp.float32),
           jnp.zeros((tq,), jnp.float32))
  acc, m, l = _loop_segments(geom.key_segments(i, tq, tk), body, carry)
  visited = l > 0.0   # false only for rows of a tile that has no valid query at all
  l_safe = jnp.where(visited, l, 1.0)
  o = acc / l_safe[:, None]
  o_ref[...] = o.astype(o_ref.dtype)
  lse_ref[...] = jnp.where(visited, m + jnp.log2(l_safe), 0.0)
  if o32_ref:  # the backward's residual (see _flash_fwd)
    o32_ref[0][...] = o


def _forward(q, k, v, geom: Geometry, *, float32_out: bool = False):
  """(o, lse), and o in float32 as a third output with ``float32_out``."""
  b, t_pad, hq, d = q.shape
  tq = geom.tiling.fwd_q
  nq, group = t_pad // tq, geom.group
  rev = lambda i: nq - 1 - i  # noqa: E731  (same order as the kernel's program ids)
  q_spec = pl.BlockSpec((None, tq, None, d), lambda i, h, bb: (bb, rev(i), h, 0))
  kv_spec = pl.BlockSpec((None, geom.s_pad, None, d),
                         lambda i, h, bb: (bb, 0, cm.idiv(h, group), 0))
  lse_spec = pl.BlockSpec((None, None, tq), lambda i, h, bb: (bb, h, rev(i)))
  out_shape = [jax.ShapeDtypeStruct(q.shape, q.dtype),
               jax.ShapeDtypeStruct((b, hq, t_pad), jnp.float32)]
  out_specs = [q_spec, lse_spec]
  if float32_out:
    out_shape.append(jax.ShapeDtypeStruct(q.shape, jnp.float32))
    out_specs.append(q_spec)
  return _call(functools.partial(_fwd_kernel, geom=geom), geom, grid=(nq, hq, b),
               in_specs=[q_spec, kv_spec, kv_spec], out_specs=out_specs,
               out_shape=out_shape, args=(q, k, v), num_warps=geom.tiling.fwd_warps,
               name=f"block_attention_fwd_{geom.kind}")


# ----------------------------------------------------------------------------------------------
# Backward: dQ kernel (grid over query tiles) and dK/dV kernel (grid over key tiles).


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, geom: Geometry):
  tq, tk = geom.tiling.dq_q, geom.tiling.dq_k
  i = geom.t_pad // tq - 1 - pl.program_id(0)
  scale2 = geom.scale * cm.LOG2E
  q = q_ref[...]
  do = do_ref[...]
  lse = lse_ref[...]
  delta = delta_ref[...]

  def body(j, dq, masked):
    start = pl.multiple_of(j * tk, tk)
    k = k_ref[pl.ds(start, tk), :]
    v = v_ref[pl.ds(start, tk), :]
    s = _dot_nt(q, k) * scale2
    if masked:
      q_idx = i * tq + lax.broadcasted_iota(jnp.int32, (tq, 1), 0)    # broadcast only in
      k_idx = start + lax.broadcasted_iota(jnp.int32, (1, tk), 1)      # the final compare
      s = jnp.where(geom.allowed(q_idx, k_idx), s, cm.MASK_VALUE)
    p = jnp.exp2(s - lse[:, None])
    dp = _dot_nt(do, v)
    ds = p * (dp - delta[:, None])
    return dq + _dot_nn(ds.astype(k.dtype), k)

  dq = _loop_segments(geom.key_segments(i, tq, tk), body,
                      jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * geom.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                geom: Geometry):
  tq, tk = geom.tiling.dkv_q, geom.tiling.dkv_k
  j = geom.s_pad // tk - 1 - pl.program_id(0)
  scale2 = geom.scale * cm.LOG2E
  k = k_ref[...]
  v = v_ref[...]

  def body(i, carry, masked):
    start = pl.multiple_of(i * tq, tq)
    if masked:
      q_idx = start + lax.broadcasted_iota(jnp.int32, (1, tq), 1)
      k_idx = j * tk + lax.broadcasted_iota(jnp.int32, (tk, 1), 0)
      ok = geom.allowed(q_idx, k_idx) & (q_idx < geom.num_queries)

    def head(g, carry):   # the query heads sharing this KV head, inside the tile loop
      dk, dv = carry
      q = q_ref[pl.ds(start, tq), g, :]
      do = do_ref[pl.ds(start, tq), g, :]
      lse = lse_ref[g, pl.ds(start, tq)]
      delta = delta_ref[g, pl.ds(start, tq)]
      s = _dot_nt(k, q) * scale2                      # [tk, tq]: keys are rows here
      if masked:
        s = jnp.where(ok, s, cm.MASK_VALUE)
      p = jnp.exp2(s - lse[None, :])
      dv = dv + _dot_nn(p.astype(do.dtype), do)
      dp = _dot_nt(v, do)
      ds = p * (dp - delta[None, :])
      dk = dk + _dot_nn(ds.astype(q.dtype), q)
      return dk, dv

    if geom.group == 1:
      return head(0, carry)
    return lax.fori_loop(0, geom.group, head, carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = _loop_segments(geom.query_segments(j, tq, tk), body, (zeros, zeros))
  dk_ref[...] = (dk * geom.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(q, k, v, o, lse, do, geom: Geometry):
  b, t_pad, hq, d = q.shape
  s_pad, hkv, group = geom.s_pad, geom.num_kv_heads, geom.group
  delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))

  tq, tk = geom.tiling.dq_q, geom.tiling.dq_k
  nq = t_pad // tq
  rev = lambda i: nq - 1 - i  # noqa: E731
  q_spec = pl.BlockSpec((None, tq, None, d), lambda i, h, bb: (bb, rev(i), h, 0))
  kv_spec = pl.BlockSpec((None, s_pad, None, d), lambda i, h, bb: (bb, 0, cm.idiv(h, group), 0))
  row_spec = pl.BlockSpec((None, None, tq), lambda i, h, bb: (bb, h, rev(i)))
  [dq] = _call(functools.partial(_dq_kernel, geom=geom), geom, grid=(nq, hq, b),
               in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec],
               out_specs=[q_spec], out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype)],
               args=(q, k, v, do, lse, delta), num_warps=geom.tiling.bwd_warps,
               name=f"block_attention_dq_{geom.kind}")

  tq, tk = geom.tiling.dkv_q, geom.tiling.dkv_k
  nk = s_pad // tk
  rev = lambda j: nk - 1 - j  # noqa: E731
  qg_spec = pl.BlockSpec((None, t_pad, group, d), lambda j, h, bb: (bb, 0, h, 0))
  kt_spec = pl.BlockSpec((None, tk, None, d), lambda j, h, bb: (bb, rev(j), h, 0))
  rowg_spec = pl.BlockSpec((None, group, t_pad), lambda j, h, bb: (bb, h, 0))
  out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
  dk, dv = _call(functools.partial(_dkv_kernel, geom=geom), geom, grid=(nk, hkv, b),
                 in_specs=[qg_spec, kt_spec, kt_spec, qg_spec, rowg_spec, rowg_spec],
                 out_specs=[kt_spec, kt_spec], out_shape=out_shape,
                 args=(q, k, v, do, lse, delta), num_warps=geom.tiling.bwd_warps,
                 name=f"block_attention_dkv_{geom.kind}")
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _flash(q, k, v, geom):
  return _forward(q, k, v, geom)[0]


def _flash_fwd(q, k, v, geom):
  # dS = P (dP - delta) subtracts delta = rowsum(o * do) from dP's values of about its size:
  # from a bfloat16 o the rounding dominated the bf16 dq / dk error (2-6x xla's at T = 2, ~10%
  # above it at T >= 56; FlashAttention-2 and cuDNN keep the low-precision o). The float32 o
  # costs 4 bytes per output element, written once per query tile.
  if q.dtype == jnp.float32:
    o, lse = _forward(q, k, v, geom)
    return o, (q, k, v, o, lse)
  o, lse, o32 = _forward(q, k, v, geom, float32_out=True)
  return o, (q, k, v, o32, lse)


def _flash_bwd(geom, residuals, do):
  q, k, v, o, lse = residuals
  return backward(q, k, v, o, lse, do, geom)


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------------------------
# Public entry point and reference.


def validate_inputs(q, k, v, kind, block_size):
  if kind not in KINDS:
    raise ValueError(f"block_attention kind={kind!r} is unknown; use one of {KINDS}")
  if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
    raise ValueError(f"block_attention expects q [B,T,Hq,D], k/v [B,S,Hkv,D]; got q {q.shape}, "
                     f"k {k.shape}, v {v.shape}")
  cm.check_nonempty("block_attention", q, k)
  if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[2] % k.shape[2]:
    raise ValueError(f"q {q.shape} and k {k.shape}: batch and head_dim must match and Hq must "
                     "be a multiple of Hkv")
  if not isinstance(block_size, (int, np.integer)) or block_size < 1:
    raise ValueError(f"block_size must be a positive integer; got {block_size!r}")
  if kind in TRAINING_KINDS:
    t, s, streams = q.shape[1], k.shape[1], TRAINING_KINDS[kind] + 1
    if t != s or t % streams or (t // streams) % block_size:
      raise ValueError(f"kind={kind!r} needs T == S == {streams}L with L a multiple of "
                       f"block_size={block_size}; got T={t}, S={s}")


def block_attention(q, k, v, *, kind: str, block_size: int, sm_scale: float | None = None,
                    interpret: bool = False, tiling: Tiling | None = None,
                    poison_outputs: bool = False):
  """Fused masked attention; see the module docstring.

  Args:
    q: [B, T, Hq, D]; k, v: [B, S, Hkv, D] (same dtype as q).
    kind: "causal", "block_causal", "training" or "training_shared".
    block_size: the diffusion block size B of the mask (ignored by "causal").
    sm_scale: softmax scale, default D ** -0.5.
    interpret: run the Pallas interpreter (CPU tests) instead of compiling for the GPU.
    tiling: tile sizes and launch parameters (default ``default_tiling(D)``).
    poison_outputs: fill every kernel output (including the backward's) with NaN before the
      kernel runs, so an element the kernel fails to write shows up (tests, GPU checks).

  Returns:
    [B, T, Hq, D] in q's dtype; differentiable (both backward passes are kernels).
  """
  validate_inputs(q, k, v, kind, block_size)
  batch, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  tiling = tiling or default_tiling(d)
  scale = float(d ** -0.5 if sm_scale is None else sm_scale)
  q_mult = max(tiling.fwd_q, tiling.dq_q, tiling.dkv_q)
  k_mult = max(tiling.fwd_k, tiling.dq_k, tiling.dkv_k)
  t_pad, s_pad = cm.cdiv(t, q_mult) * q_mult, cm.cdiv(s, k_mult) * k_mult
  d_pad = cm.padded_head_dim(d)
  geom = Geometry(kind=kind, block_size=int(block_size), num_queries=t, num_keys=s, t_pad=t_pad,
                  s_pad=s_pad, head_dim_pad=d_pad, num_heads=hq, num_kv_heads=hkv, scale=scale,
                  tiling=tiling, interpret=bool(interpret), poison=bool(poison_outputs))
  qp = cm.pad_axis(cm.pad_axis(q, 1, t_pad), 3, d_pad)
  kp = cm.pad_axis(cm.pad_axis(k, 1, s_pad), 3, d_pad)
  vp = cm.pad_axis(cm.pad_axis(v, 1, s_pad), 3, d_pad)
  out = _flash(qp, kp, vp, geom)
  return out[:, :t, :, :d]


def block_attention_reference(q, k, v, *, kind: str, block_size: int,
                              sm_scale: float | None = None):
  """Pure-jnp reference: dense mask, float32 softmax, probabilities cast to v's dtype."""
  validate_inputs(q, k, v, kind, block_size)
  batch, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  scale = d ** -0.5 if sm_scale is None else sm_scale
  qg = q.reshape(batch, t, hkv, hq // hkv, d)
  scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32,
                      precision=lax.Precision.HIGHEST) * scale
  allowed = mask_allowed(kind, jnp.arange(t)[:, None], jnp.arange(s)[None, :],
                         block_size=block_size, seq_len=stream_length(kind, t))
  scores = jnp.where(allowed, scores, cm.MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32,
                   precision=lax.Precision.HIGHEST)
  return out.reshape(batch, t, hq, d).astype(q.dtype)
