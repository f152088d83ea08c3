"""``block_attention``'s forward on Hopper's tensor cores: Pallas' Mosaic GPU backend (wgmma).

The same masks, tile skipping and outputs as ``block_kernel``'s forward (which lowers through
Pallas' Triton backend, deprecated from JAX 0.11 on): the key-tile segments of
``block_kernel.key_tile_segments`` are the loop bounds, hidden tiles are never loaded, fully
visible tiles skip the mask, edge tiles evaluate ``block_kernel.mask_allowed``. The backward
stays ``block_kernel``'s (dQ and dK/dV kernels), fed with this forward's float32 output and
base-2 log-sum-exp, the residuals its own forward writes.

One program per (query tile of 128 rows, query head, batch row), heaviest tiles first, as
``block_kernel``: two compute warpgroups of 64 query rows each and one memory warpgroup that
streams the visited 64-key K/V tiles by TMA into ``num_stages`` shared-memory slots, in the
segments' order; a slot is refilled once both compute warpgroups have released it. The compute
warpgroups run S = Q K^T and O += P V on wgmma with the online softmax in registers (the
structure of ``mosaic_window``'s split kernel, whose ``accumulate_pv`` and register split this
reuses).

Runs compiled on a Hopper GPU, and in Mosaic GPU's interpreter on CPU (``interpret=True``,
JAX >= 0.11; the tests). Untimed: no GPU has run it yet.
"""

from __future__ import annotations

import functools
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
DEFAULT_NUM_STAGES = 2


def supports(q, k) -> str | None:
  """Why the kernel cannot take these inputs (None when it can): 16-bit inputs (wgmma), D a
  power of two >= 64 (128-byte swizzled rows, and ``block_kernel``'s backward padding)."""
  if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype:
    return f"takes bfloat16 or float16 q, k, v (wgmma); got {q.dtype} / {k.dtype}"
  d = q.shape[-1]
  if d < 64 or not cm.is_pow2(d):
    return f"needs head_dim a power of two >= 64; got {d}"
  return None


def _forward_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *o32_ref, geom: bk._Geometry,
                    num_stages: int, p_from_registers: bool):
  d = geom.head_dim_pad
  n_q_tiles = geom.t_pad // TILE_Q
  swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

  def body(q_smem, k_smem, v_smem, p_smem, o_smem, o32_smem, lse_smem, q_bar, k_bar, v_bar,
           released):
    i = n_q_tiles - 1 - lax.axis_index("q_tile")   # heaviest tiles (last rows) first
    h, b, wg = lax.axis_index("head"), lax.axis_index("row"), lax.axis_index("wg")
    kv_head = cm.idiv(h, geom.group)
    segments = geom.key_segments(i, TILE_Q, TILE_K)

    def visit(tile_body, carry):
      """Runs ``tile_body(tile, count, carry, masked)`` over the visited key tiles in order;
      ``count`` numbers them from 0 (their K/V slot is count % num_stages)."""
      def run(lo, hi, masked, count_carry):
        def step(j, state):
          count, inner = state
          return count + 1, tile_body(j, count, inner, masked)
        return lax.fori_loop(lo, hi, step, count_carry)

      state = (jnp.int32(0), carry)
      for seg in segments:
        state = run(seg.lo, seg.full_lo, True, state)
        state = run(seg.full_lo, seg.full_hi, False, state)
        state = run(seg.full_hi, seg.hi, True, state)
      return state

    @pl.when(wg == COMPUTE_WARPGROUPS)
    def _memory():
      plgpu.set_max_registers(mw.MEMORY_REGISTERS, action="decrease")

      def fetch(j, count, _, masked):
        del masked
        slot = lax.rem(count, num_stages)

        @pl.when(count >= num_stages)
        def _():
          plgpu.barrier_wait(released.at[slot])

        keys = pl.ds(pl.multiple_of(j * TILE_K, TILE_K), TILE_K)
        plgpu.copy_gmem_to_smem(k_ref.at[b, keys, kv_head], k_smem.at[slot], k_bar.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[b, keys, kv_head], v_smem.at[slot], v_bar.at[slot])
        return ()

      n_tiles, _ = visit(fetch, ())

      def drain(count, _):   # the releases fetch did not wait for
        plgpu.barrier_wait(released.at[lax.rem(count, num_stages)])
        return ()

      lax.fori_loop(jnp.maximum(n_tiles - num_stages, 0), n_tiles, drain, ())

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

        def qk(acc_ref):
          plgpu.wgmma(acc_ref, my_q, k_smem.at[slot].transpose((1, 0)))
          return acc_ref[...]

        s = pl.run_scoped(qk, plgpu.ACC((ROWS, TILE_K), jnp.float32)) * scale2
        if masked:
          q_idx = row0 + plgpu.broadcasted_iota(jnp.int32, s.shape, 0,
                                                layout=plgpu.Layout.WGMMA)
          k_idx = j * TILE_K + plgpu.broadcasted_iota(jnp.int32, s.shape, 1,
                                                      layout=plgpu.Layout.WGMMA)
          s = jnp.where(geom.allowed(q_idx, k_idx), s, cm.MASK_VALUE)
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
      if o32_ref:   # the backward's residual, through a [64, 64] float32 buffer
        my_o32 = o32_smem.at[wg]
        for half in range(d // 64):
          plgpu.wait_smem_to_gmem(0)
          my_o32[...] = out[:, half * 64:(half + 1) * 64]
          plgpu.commit_smem()
          plgpu.copy_smem_to_gmem(my_o32, o32_ref[0].at[b, rows, h, pl.ds(half * 64, 64)])
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


def mosaic_forward(q, k, v, geom: bk._Geometry, *, float32_out: bool = False,
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _flash(q, k, v, geom, options):
  return mosaic_forward(q, k, v, geom, **dict(options))[0]


def _flash_fwd(q, k, v, geom, options):
  o, lse, o32 = mosaic_forward(q, k, v, geom, float32_out=True, **dict(options))
  return o, (q, k, v, o32, lse)


def _flash_bwd(geom, options, residuals, do):
  del options
  q, k, v, o32, lse = residuals
  return bk._backward(q, k, v, o32, lse, do, geom)


_flash.defvjp(_flash_fwd, _flash_bwd)


def mosaic_block_attention(q, k, v, *, kind: str, block_size: int,
                           sm_scale: float | None = None, interpret: Any = False,
                           num_stages: int = DEFAULT_NUM_STAGES,
                           p_from_registers: bool | None = None):
  """``block_attention`` with its forward on wgmma (Hopper); see the module docstring.

  Args:
    q: [B, T, Hq, D]; k, v: [B, S, Hkv, D]; bfloat16 or float16, D a power of two >= 64.
    kind: "causal", "block_causal", "training" or "training_shared".
    block_size: the diffusion block size of the mask (ignored by "causal").
    sm_scale: softmax scale, default D ** -0.5.
    interpret: False (compile for a Hopper GPU), True (the interpreters: Mosaic GPU's for the
      forward, JAX >= 0.11, Pallas' for the backward), or Mosaic GPU's ``InterpretGPUParams``.
    num_stages: K/V shared-memory slots of the forward's pipeline.
    p_from_registers: as ``mosaic_window_attention``'s (None: registers when compiled).

  Returns:
    [B, T, Hq, D] in q's dtype; differentiable (``block_kernel``'s backward kernels).
  """
  bk._validate(q, k, v, kind, block_size)
  reason = supports(q, k)
  if reason:
    raise ValueError(f"mosaic_block_attention {reason}")
  batch, t, hq, d = q.shape
  s, hkv = k.shape[1], k.shape[2]
  t_pad, s_pad = cm.cdiv(t, TILE_Q) * TILE_Q, cm.cdiv(s, TILE_K) * TILE_K
  scale = float(d ** -0.5 if sm_scale is None else sm_scale)
  geom = bk._Geometry(kind=kind, block_size=int(block_size), num_queries=t, num_keys=s,
                      t_pad=t_pad, s_pad=s_pad, head_dim_pad=d, num_heads=hq, num_kv_heads=hkv,
                      scale=scale, tiling=bk.default_tiling(d), interpret=bool(interpret),
                      poison=False)
  options = (("interpret", interpret), ("num_stages", num_stages),
             ("p_from_registers", p_from_registers))
  qp = cm.pad_axis(q, 1, t_pad)
  kp, vp = cm.pad_axis(k, 1, s_pad), cm.pad_axis(v, 1, s_pad)
  return _flash(qp, kp, vp, geom, options)[:, :t]
