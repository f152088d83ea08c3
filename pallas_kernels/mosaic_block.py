"""``block_attention`` on Hopper's tensor cores: Pallas' Mosaic GPU backend (wgmma).

The same masks, tile skipping, numerics and residuals as ``block_kernel`` (which lowers
through Pallas' Triton backend, deprecated from JAX 0.11 on): the tile segments of
``block_kernel.key_tile_segments`` / ``query_tile_segments`` are the loop bounds, hidden tiles
are never loaded, fully visible tiles skip the mask, edge tiles evaluate
``block_kernel.mask_allowed``. Three kernels, each with two compute warpgroups of 64 rows and
one memory warpgroup that streams tiles by TMA into ``num_stages`` shared-memory slots (a slot
is refilled once both compute warpgroups have released it); matmuls on wgmma, softmax in
registers (the structure of ``mosaic_window``'s split kernel, whose ``accumulate_pv`` and
register split this reuses):

* forward: one program per (128 query rows, query head, batch row), heaviest tiles first; the
  visited 64-key K/V tiles streamed. Writes O, the base-2 log-sum-exp and, under ``jax.vjp``,
  O in float32 (the backward's delta = rowsum(O dO)).
* dQ: the forward's layout, K/V streamed: dQ += dS K with dS = P (dP - delta), dP = dO V^T.
* dK/dV: one program per (128 keys, KV head, batch row), keys as rows; (Q, dO, lse, delta) of
  64 query rows streamed for each visited query tile and, inside it, each query head of the
  KV head (dK and dV summed over the group, no atomics): S^T = K Q^T, dV += P^T dO,
  dP^T = V dO^T, dK += dS^T Q.

``backward="pallas"`` takes ``block_kernel``'s dQ and dK/dV kernels instead (same residuals).
Runs compiled on a Hopper GPU, and in Mosaic GPU's interpreter on CPU (``interpret=True``,
JAX >= 0.11; the tests). Compiled for sm_90a by ptxas (``ptxas_report``): the forward and dQ
without spills; dK/dV spills some registers (README, "Attention implementations"). Untimed: no
GPU has run it yet.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _common as cm
from pallas_kernels import block_kernel as bk
from pallas_kernels import mosaic_window as mw

ROWS = mw.ROWS_PER_WARPGROUP   # 64 query rows per compute warpgroup (wgmma's M)
COMPUTE_WARPGROUPS = 2
TILE_Q = ROWS * COMPUTE_WARPGROUPS
TILE_K = 64
QUERY_TILE_DKV = 64   # query rows per step of the dK/dV kernel (its keys: TILE_Q per program)
DEFAULT_NUM_STAGES = 2
BACKWARDS = ("mosaic", "pallas")


def supports(q, k) -> str | None:
  """Why the kernel cannot take these inputs (None when it can): 16-bit inputs (wgmma), D a
  power of two >= 64 (128-byte swizzled rows, and ``block_kernel``'s backward padding)."""
  if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype:
    return f"takes bfloat16 or float16 q, k, v (wgmma); got {q.dtype} / {k.dtype}"
  d = q.shape[-1]
  if d < 64 or not cm.is_pow2(d):
    return f"needs head_dim a power of two >= 64; got {d}"
  return None


def _visit(segments, tile_body, carry, *, counts_itself=False):
  """Runs ``tile_body(tile, count, carry, masked)`` over the segments' tiles in order: edge
  tiles masked, the rest not; ``count`` numbers the pipeline's steps from 0 (their slot is
  count % num_stages). Returns (steps, carry). ``counts_itself``: ``tile_body`` returns
  (count after it, carry) (several steps per tile); else one step per tile."""
  def run(lo, hi, masked, state):
    def step(j, state):
      count, inner = state
      if counts_itself:
        return tile_body(j, count, inner, masked)
      return count + 1, tile_body(j, count, inner, masked)
    return lax.fori_loop(lo, hi, step, state)

  state = (jnp.int32(0), carry)
  for seg in segments:
    state = run(seg.lo, seg.full_lo, True, state)
    state = run(seg.full_lo, seg.full_hi, False, state)
    state = run(seg.full_hi, seg.hi, True, state)
  return state


def _drain(released, num_stages, steps):
  """The memory warpgroup waits for the releases its fetches did not wait for (every phase
  of a barrier it uses, as Mosaic GPU requires)."""
  def wait(count, _):
    plgpu.barrier_wait(released.at[lax.rem(count, num_stages)])
    return ()
  lax.fori_loop(jnp.maximum(steps - num_stages, 0), steps, wait, ())


def _stream_key_tiles(visit, k_ref, v_ref, k_smem, v_smem, k_bar, v_bar, released,
                      num_stages):
  """The memory warpgroup of the forward and dQ kernels: the visited 64-key K/V tiles of one
  row and KV head (``k_ref``, ``v_ref``: [S, D]) into the slots, in ``visit``'s order."""
  plgpu.set_max_registers(mw.MEMORY_REGISTERS, action="decrease")

  def fetch(j, count, _, masked):
    del masked
    slot = lax.rem(count, num_stages)

    @pl.when(count >= num_stages)
    def _():
      plgpu.barrier_wait(released.at[slot])

    keys = pl.ds(pl.multiple_of(j * TILE_K, TILE_K), TILE_K)
    plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[slot], k_bar.at[slot])
    plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], v_bar.at[slot])
    return ()

  _drain(released, num_stages, visit(fetch, ())[0])


def _scores(rows_smem, cols_smem):
  """rows @ cols^T on wgmma, float32 [64, tile]."""
  def matmul(acc_ref):
    plgpu.wgmma(acc_ref, rows_smem, cols_smem.transpose((1, 0)))
    return acc_ref[...]
  return pl.run_scoped(matmul, plgpu.ACC((rows_smem.shape[0], cols_smem.shape[0]), jnp.float32))


def _index_vector(start, shape, axis):
  """start + arange along ``axis`` of a [rows, columns] wgmma tile, as a vector in the layout
  that ``_to_tile(..., axis)`` broadcasts: per-index work is done once per thread's rows or
  columns (2 or 16 values), not per tile element (32)."""
  layout = plgpu.Layout.WGMMA.reduce(1 - axis)
  return start + plgpu.broadcasted_iota(jnp.int32, (shape[axis],), 0, layout=layout)


def _to_tile(shape, axis):
  return lambda x: lax.broadcast_in_dim(x, shape, [axis])


def _allowed(geom, row0, col0, shape):
  """The mask on a [query rows, key columns] tile starting at (row0, col0)."""
  return geom.allowed(_index_vector(row0, shape, 0), _index_vector(col0, shape, 1),
                      _to_tile(shape, 0), _to_tile(shape, 1))


def _forward_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *o32_ref, geom: bk.Geometry,
                    num_stages: int, p_from_registers: bool):
  d = geom.head_dim_pad
  n_q_tiles = geom.t_pad // TILE_Q
  swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

  def body(q_smem, k_smem, v_smem, p_smem, o_smem, o32_smem, lse_smem, q_bar, k_bar, v_bar,
           released):
    i = n_q_tiles - 1 - lax.axis_index("q_tile")   # heaviest tiles (last rows) first
    h, b, wg = lax.axis_index("head"), lax.axis_index("row"), lax.axis_index("wg")
    kv_head = cm.idiv(h, geom.group)
    visit = functools.partial(_visit, geom.key_segments(i, TILE_Q, TILE_K))

    @pl.when(wg == COMPUTE_WARPGROUPS)
    def _memory():
      _stream_key_tiles(visit, k_ref.at[b, :, kv_head], v_ref.at[b, :, kv_head], k_smem,
                        v_smem, k_bar, v_bar, released, num_stages)

    @pl.when(wg < COMPUTE_WARPGROUPS)
    def _compute():
      plgpu.set_max_registers(mw.compute_registers(COMPUTE_WARPGROUPS), action="increase")
      row0 = pl.multiple_of(i * TILE_Q + wg * ROWS, ROWS)
      rows = pl.ds(row0, ROWS)
      my_q = q_smem.at[wg]
      plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], my_q, q_bar.at[wg])
      plgpu.barrier_wait(q_bar.at[wg])
      scale2 = geom.scale * cm.LOG2E

      def tile(j, count, carry, masked):
        acc, m, l = carry
        slot = lax.rem(count, num_stages)
        plgpu.barrier_wait(k_bar.at[slot])

        s = _scores(my_q, k_smem.at[slot]) * scale2
        if masked:
          s = jnp.where(_allowed(geom, row0, j * TILE_K, s.shape), s, cm.MASK_VALUE)
        m_new = jnp.maximum(m, s.max(axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
        l = l * alpha + p.sum(axis=1)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        plgpu.barrier_wait(v_bar.at[slot])
        acc = mw.accumulate_pv(acc, p.astype(v_smem.dtype), v_smem.at[slot],
                               None if p_from_registers else p_smem.at[wg])
        plgpu.barrier_arrive(released.at[slot])
        return acc, m_new, l

      acc = plgpu.layout_cast(jnp.zeros((ROWS, d), jnp.float32), plgpu.Layout.WGMMA)
      m = plgpu.layout_cast(jnp.full((ROWS,), cm.MASK_VALUE, jnp.float32),
                            plgpu.Layout.WGMMA.reduce(1))
      l = plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1))
      _, (acc, m, l) = visit(tile, (acc, m, l))
      visited = l > 0.0   # false only for the rows of a tile without any valid query
      l_safe = jnp.where(visited, l, 1.0)
      out = acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])
      lse_smem.at[wg][...] = jnp.where(visited, m + jnp.log2(l_safe), 0.0)
      o_smem.at[wg][...] = out.astype(o_smem.dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem.at[wg], o_ref.at[b, rows, h])
      plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, rows])
      if o32_ref:   # the backward's residual
        mw.store_float32_rows(out, o32_smem.at[wg], o32_ref[0].at[b, rows, h])
      plgpu.wait_smem_to_gmem(0)

  dtype = q_ref.dtype
  n_wg = COMPUTE_WARPGROUPS
  pl.run_scoped(
      body,
      plgpu.SMEM((n_wg, ROWS, d), dtype, transforms=swizzled),
      plgpu.SMEM((num_stages, TILE_K, d), dtype, transforms=swizzled),
      plgpu.SMEM((num_stages, TILE_K, d), dtype, transforms=swizzled),
      None if p_from_registers else
      plgpu.SMEM((n_wg, ROWS, TILE_K), dtype, transforms=swizzled),
      plgpu.SMEM((n_wg, ROWS, d), dtype, transforms=swizzled),
      plgpu.SMEM((n_wg, ROWS, 64), jnp.float32) if o32_ref else None,
      plgpu.SMEM((n_wg, ROWS), jnp.float32),
      plgpu.Barrier(num_barriers=n_wg),
      plgpu.Barrier(num_barriers=num_stages),
      plgpu.Barrier(num_barriers=num_stages),
      plgpu.Barrier(num_arrivals=n_wg, num_barriers=num_stages),
      collective_axes="wg",
  )


def mosaic_forward(q, k, v, geom: bk.Geometry, *, float32_out: bool = False,
                   interpret: Any = False, num_stages: int = DEFAULT_NUM_STAGES,
                   p_from_registers: bool | None = None):
  """``block_kernel._forward`` on Mosaic GPU: (o, lse[, o in float32]) for inputs already
  padded to ``geom`` (T and S to the tiles, D to ``geom.head_dim_pad``)."""
  p_from_registers = mw.use_p_from_registers(p_from_registers, interpret)
  b, t_pad, hq, d = q.shape
  out_type = [jax.ShapeDtypeStruct(q.shape, q.dtype),
              jax.ShapeDtypeStruct((b, hq, t_pad), jnp.float32)]
  if float32_out:
    out_type.append(jax.ShapeDtypeStruct(q.shape, jnp.float32))
  kernel = plgpu.kernel(
      functools.partial(_forward_kernel, geom=geom, num_stages=num_stages,
                        p_from_registers=p_from_registers),
      out_type=out_type,
      grid=(t_pad // TILE_Q, hq, b),
      grid_names=("q_tile", "head", "row"),
      num_threads=COMPUTE_WARPGROUPS + 1, thread_name="wg",
      interpret=mw.interpret_params(interpret),
  )
  return kernel(q, k, v)


def load_vector(ref, layout):
  """``plgpu.load`` of a whole shared-memory vector in ``layout`` (its index argument is
  required on JAX 0.10, optional on 0.11, gone on 0.12)."""
  if "idx" in inspect.signature(plgpu.load).parameters:
    return plgpu.load(ref, (), layout=layout)
  return plgpu.load(ref, layout=layout)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, geom: bk.Geometry,
               num_stages: int, p_from_registers: bool):
  """dQ = scale * sum over visited key tiles of dS K, dS = P (dP - delta), dP = dO V^T: the
  forward's program layout (128 query rows, two compute warpgroups), K/V streamed."""
  d = geom.head_dim_pad
  n_q_tiles = geom.t_pad // TILE_Q
  swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

  def body(q_smem, do_smem, k_smem, v_smem, ds_smem, lse_smem, delta_smem, row_bar, k_bar,
           v_bar, released):
    i = n_q_tiles - 1 - lax.axis_index("q_tile")
    h, b, wg = lax.axis_index("head"), lax.axis_index("row"), lax.axis_index("wg")
    kv_head = cm.idiv(h, geom.group)
    visit = functools.partial(_visit, geom.key_segments(i, TILE_Q, TILE_K))

    @pl.when(wg == COMPUTE_WARPGROUPS)
    def _memory():
      _stream_key_tiles(visit, k_ref.at[b, :, kv_head], v_ref.at[b, :, kv_head], k_smem,
                        v_smem, k_bar, v_bar, released, num_stages)

    @pl.when(wg < COMPUTE_WARPGROUPS)
    def _compute():
      plgpu.set_max_registers(mw.compute_registers(COMPUTE_WARPGROUPS), action="increase")
      row0 = pl.multiple_of(i * TILE_Q + wg * ROWS, ROWS)
      rows = pl.ds(row0, ROWS)
      my_q, my_do = q_smem.at[wg], do_smem.at[wg]
      sources = ((q_ref.at[b, rows, h], my_q), (do_ref.at[b, rows, h], my_do),
                 (lse_ref.at[b, h, rows], lse_smem.at[wg]),
                 (delta_ref.at[b, h, rows], delta_smem.at[wg]))
      for n, (src, dst) in enumerate(sources):
        plgpu.copy_gmem_to_smem(src, dst, row_bar.at[wg * len(sources) + n])
      for n in range(len(sources)):
        plgpu.barrier_wait(row_bar.at[wg * len(sources) + n])
      lse = load_vector(lse_smem.at[wg], plgpu.Layout.WGMMA.reduce(1))
      delta = load_vector(delta_smem.at[wg], plgpu.Layout.WGMMA.reduce(1))
      scale2 = geom.scale * cm.LOG2E
      scratch = None if p_from_registers else ds_smem.at[wg]

      def tile(j, count, dq, masked):
        slot = lax.rem(count, num_stages)
        plgpu.barrier_wait(k_bar.at[slot])
        s = _scores(my_q, k_smem.at[slot]) * scale2
        if masked:
          s = jnp.where(_allowed(geom, row0, j * TILE_K, s.shape), s, cm.MASK_VALUE)
        p = jnp.exp2(s - lax.broadcast_in_dim(lse, s.shape, [0]))
        plgpu.barrier_wait(v_bar.at[slot])
        dp = _scores(my_do, v_smem.at[slot])
        ds = p * (dp - lax.broadcast_in_dim(delta, s.shape, [0]))
        dq = mw.accumulate_pv(dq, ds.astype(k_smem.dtype), k_smem.at[slot], scratch)
        plgpu.barrier_arrive(released.at[slot])
        return dq

      dq = plgpu.layout_cast(jnp.zeros((ROWS, d), jnp.float32), plgpu.Layout.WGMMA)
      _, dq = visit(tile, dq)
      my_q[...] = (dq * geom.scale).astype(my_q.dtype)   # q is no longer needed
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(my_q, dq_ref.at[b, rows, h])
      plgpu.wait_smem_to_gmem(0)

  dtype, n_wg = q_ref.dtype, COMPUTE_WARPGROUPS
  pl.run_scoped(
      body,
      plgpu.SMEM((n_wg, ROWS, d), dtype, transforms=swizzled),
      plgpu.SMEM((n_wg, ROWS, d), dtype, transforms=swizzled),
      plgpu.SMEM((num_stages, TILE_K, d), dtype, transforms=swizzled),
      plgpu.SMEM((num_stages, TILE_K, d), dtype, transforms=swizzled),
      None if p_from_registers else
      plgpu.SMEM((n_wg, ROWS, TILE_K), dtype, transforms=swizzled),
      plgpu.SMEM((n_wg, ROWS), jnp.float32),
      plgpu.SMEM((n_wg, ROWS), jnp.float32),
      plgpu.Barrier(num_barriers=n_wg * 4),
      plgpu.Barrier(num_barriers=num_stages),
      plgpu.Barrier(num_barriers=num_stages),
      plgpu.Barrier(num_arrivals=n_wg, num_barriers=num_stages),
      collective_axes="wg",
  )


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                geom: bk.Geometry, num_stages: int, p_from_registers: bool):
  """dK, dV of 128 keys (two compute warpgroups of 64), summed over the query tiles that see
  them (``query_tile_segments``) and the query heads of their KV head, with keys as rows:
  S^T = K Q^T, dV += P^T dO, dP^T = V dO^T, dK += dS^T Q. The memory warpgroup streams
  (Q, dO, lse, delta) of 64 query rows per step."""
  d = geom.head_dim_pad
  n_k_tiles = geom.s_pad // TILE_Q
  swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

  def body(k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, scratch_smem, kv_bar, q_bar,
           do_bar, lse_bar, delta_bar, released):
    j = n_k_tiles - 1 - lax.axis_index("k_tile")   # (their cost is even: any order)
    kv_head, b, wg = lax.axis_index("head"), lax.axis_index("row"), lax.axis_index("wg")
    group = geom.group

    def visit(step_body, carry):
      """``step_body(q_tile, head, count, carry, masked)`` over the visited query tiles and,
      inside each, the query heads of this KV head."""
      def tile_body(i, count, carry, masked):
        def head(g, state):
          n, inner = state
          return n + 1, step_body(i, kv_head * group + g, n, inner, masked)
        return lax.fori_loop(0, group, head, (count, carry))

      segments = geom.query_segments(j, QUERY_TILE_DKV, TILE_Q)
      return _visit(segments, tile_body, carry, counts_itself=True)

    @pl.when(wg == COMPUTE_WARPGROUPS)
    def _memory():
      plgpu.set_max_registers(mw.MEMORY_REGISTERS, action="decrease")

      def fetch(i, h, count, _, masked):
        del masked
        slot = lax.rem(count, num_stages)

        @pl.when(count >= num_stages)
        def _():
          plgpu.barrier_wait(released.at[slot])

        rows = pl.ds(pl.multiple_of(i * QUERY_TILE_DKV, QUERY_TILE_DKV), QUERY_TILE_DKV)
        plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_smem.at[slot], q_bar.at[slot])
        plgpu.copy_gmem_to_smem(do_ref.at[b, rows, h], do_smem.at[slot], do_bar.at[slot])
        plgpu.copy_gmem_to_smem(lse_ref.at[b, h, rows], lse_smem.at[slot], lse_bar.at[slot])
        plgpu.copy_gmem_to_smem(delta_ref.at[b, h, rows], delta_smem.at[slot],
                                delta_bar.at[slot])
        return ()

      _drain(released, num_stages, visit(fetch, ())[0])

    @pl.when(wg < COMPUTE_WARPGROUPS)
    def _compute():
      plgpu.set_max_registers(mw.compute_registers(COMPUTE_WARPGROUPS), action="increase")
      key0 = pl.multiple_of(j * TILE_Q + wg * ROWS, ROWS)
      keys = pl.ds(key0, ROWS)
      my_k, my_v = k_smem.at[wg], v_smem.at[wg]
      plgpu.copy_gmem_to_smem(k_ref.at[b, keys, kv_head], my_k, kv_bar.at[2 * wg])
      plgpu.copy_gmem_to_smem(v_ref.at[b, keys, kv_head], my_v, kv_bar.at[2 * wg + 1])
      plgpu.barrier_wait(kv_bar.at[2 * wg])
      plgpu.barrier_wait(kv_bar.at[2 * wg + 1])
      scale2 = geom.scale * cm.LOG2E
      scratch = None if p_from_registers else scratch_smem.at[wg]

      def step(i, h, count, carry, masked):
        del h
        dk, dv = carry
        slot = lax.rem(count, num_stages)
        plgpu.barrier_wait(q_bar.at[slot])
        plgpu.barrier_wait(lse_bar.at[slot])
        s_t = _scores(my_k, q_smem.at[slot]) * scale2          # [keys, queries]
        if masked:
          shape = s_t.shape
          q_idx = _index_vector(i * QUERY_TILE_DKV, shape, 1)
          q_to_tile = _to_tile(shape, 1)
          ok = (geom.allowed(q_idx, _index_vector(key0, shape, 0), q_to_tile, _to_tile(shape, 0))
                & q_to_tile(q_idx < geom.num_queries))
          s_t = jnp.where(ok, s_t, cm.MASK_VALUE)
        lse = load_vector(lse_smem.at[slot], plgpu.Layout.WGMMA.reduce(0))
        p_t = jnp.exp2(s_t - lax.broadcast_in_dim(lse, s_t.shape, [1]))
        plgpu.barrier_wait(do_bar.at[slot])
        dv = mw.accumulate_pv(dv, p_t.astype(my_v.dtype), do_smem.at[slot], scratch)
        plgpu.barrier_wait(delta_bar.at[slot])
        dp_t = _scores(my_v, do_smem.at[slot])
        delta = load_vector(delta_smem.at[slot], plgpu.Layout.WGMMA.reduce(0))
        ds_t = p_t * (dp_t - lax.broadcast_in_dim(delta, s_t.shape, [1]))
        dk = mw.accumulate_pv(dk, ds_t.astype(my_k.dtype), q_smem.at[slot], scratch)
        plgpu.barrier_arrive(released.at[slot])
        return dk, dv

      zeros = plgpu.layout_cast(jnp.zeros((ROWS, d), jnp.float32), plgpu.Layout.WGMMA)
      _, (dk, dv) = visit(step, (zeros, zeros))
      for grad, buffer, out in ((dk * geom.scale, my_k, dk_ref), (dv, my_v, dv_ref)):
        buffer[...] = grad.astype(buffer.dtype)   # K and V are no longer needed
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(buffer, out.at[b, keys, kv_head])
      plgpu.wait_smem_to_gmem(0)

  dtype, n_wg = k_ref.dtype, COMPUTE_WARPGROUPS
  tq = QUERY_TILE_DKV
  pl.run_scoped(
      body,
      plgpu.SMEM((n_wg, ROWS, d), dtype, transforms=swizzled),
      plgpu.SMEM((n_wg, ROWS, d), dtype, transforms=swizzled),
      plgpu.SMEM((num_stages, tq, d), dtype, transforms=swizzled),
      plgpu.SMEM((num_stages, tq, d), dtype, transforms=swizzled),
      plgpu.SMEM((num_stages, tq), jnp.float32),
      plgpu.SMEM((num_stages, tq), jnp.float32),
      None if p_from_registers else plgpu.SMEM((n_wg, ROWS, tq), dtype, transforms=swizzled),
      plgpu.Barrier(num_barriers=n_wg * 2),
      *(plgpu.Barrier(num_barriers=num_stages) for _ in range(4)),
      plgpu.Barrier(num_arrivals=n_wg, num_barriers=num_stages),
      collective_axes="wg",
  )


def mosaic_backward(q, k, v, o32, lse, do, geom: bk.Geometry, *, interpret: Any = False,
                    num_stages: int = DEFAULT_NUM_STAGES, p_from_registers: bool | None = None):
  """``block_kernel.backward`` on Mosaic GPU: (dq, dk, dv) of padded inputs, from the
  forward's float32 output and base-2 log-sum-exp."""
  p_from_registers = mw.use_p_from_registers(p_from_registers, interpret)
  b, t_pad, hq, d = q.shape
  hkv = k.shape[2]
  delta = jnp.einsum("bthd,bthd->bht", o32.astype(jnp.float32), do.astype(jnp.float32))
  options = dict(geom=geom, num_stages=num_stages, p_from_registers=p_from_registers)
  common = dict(num_threads=COMPUTE_WARPGROUPS + 1, thread_name="wg",
                interpret=mw.interpret_params(interpret))
  dq = plgpu.kernel(functools.partial(_dq_kernel, **options),
                    out_type=jax.ShapeDtypeStruct(q.shape, q.dtype),
                    grid=(t_pad // TILE_Q, hq, b), grid_names=("q_tile", "head", "row"),
                    **common)(q, k, v, do, lse, delta)
  dk, dv = plgpu.kernel(functools.partial(_dkv_kernel, **options),
                        out_type=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                                  jax.ShapeDtypeStruct(v.shape, v.dtype)],
                        grid=(geom.s_pad // TILE_Q, hkv, b), grid_names=("k_tile", "head", "row"),
                        **common)(q, k, v, do, lse, delta)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _flash(q, k, v, geom, options):
  return mosaic_forward(q, k, v, geom, **_kernel_options(options))[0]


def _kernel_options(options):
  return {key: value for key, value in options if key != "backward"}


def _flash_fwd(q, k, v, geom, options):
  o, lse, o32 = mosaic_forward(q, k, v, geom, float32_out=True, **_kernel_options(options))
  return o, (q, k, v, o32, lse)


def _flash_bwd(geom, options, residuals, do):
  q, k, v, o32, lse = residuals
  if dict(options)["backward"] == "pallas":
    return bk.backward(q, k, v, o32, lse, do, geom)
  return mosaic_backward(q, k, v, o32, lse, do, geom, **_kernel_options(options))


_flash.defvjp(_flash_fwd, _flash_bwd)


def mosaic_block_attention(q, k, v, *, kind: str, block_size: int,
                           sm_scale: float | None = None, interpret: Any = False,
                           num_stages: int = DEFAULT_NUM_STAGES,
                           p_from_registers: bool | None = None, backward: str = "mosaic"):
  """``block_attention`` on wgmma (Hopper); see the module docstring.

  Args:
    q: [B, T, Hq, D]; k, v: [B, S, Hkv, D]; bfloat16 or float16, D a power of two >= 64.
    kind: "causal", "block_causal", "training" or "training_shared".
    block_size: the diffusion block size of the mask (ignored by "causal").
    sm_scale: softmax scale, default D ** -0.5.
    interpret: False (compile for a Hopper GPU), True (the interpreters: Mosaic GPU's,
      JAX >= 0.11, and Pallas' for ``backward="pallas"``), or Mosaic GPU's
      ``InterpretGPUParams``.
    num_stages: shared-memory slots of each kernel's pipeline.
    p_from_registers: as ``mosaic_window_attention``'s (None: registers when compiled); the
      backward's dS and P^T take the same path.
    backward: "mosaic" (this module's dQ and dK/dV kernels) or "pallas" (``block_kernel``'s,
      through Pallas' Triton backend).

  Returns:
    [B, T, Hq, D] in q's dtype; differentiable.
  """
  bk.validate_inputs(q, k, v, kind, block_size)
  reason = supports(q, k)
  if reason:
    raise ValueError(f"mosaic_block_attention {reason}")
  if backward not in BACKWARDS:
    raise ValueError(f"mosaic_block_attention backward={backward!r}; use one of {BACKWARDS}")
  batch, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  t_pad, s_pad = cm.cdiv(t, TILE_Q) * TILE_Q, cm.cdiv(s, TILE_Q) * TILE_Q   # dK/dV: 128 keys
  scale = float(d ** -0.5 if sm_scale is None else sm_scale)
  geom = bk.Geometry(kind=kind, block_size=int(block_size), num_queries=t, num_keys=s,
                     t_pad=t_pad, s_pad=s_pad, head_dim_pad=d, num_heads=hq, num_kv_heads=hkv,
                     scale=scale, tiling=bk.default_tiling(d), interpret=bool(interpret),
                     poison=False)
  options = (("interpret", interpret), ("num_stages", num_stages),
             ("p_from_registers", p_from_registers), ("backward", backward))
  qp = cm.pad_axis(q, 1, t_pad)
  kp, vp = cm.pad_axis(k, 1, s_pad), cm.pad_axis(v, 1, s_pad)
  return _flash(qp, kp, vp, geom, options)[:, :t]
