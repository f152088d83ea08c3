"""The decode-window split kernel on Hopper's tensor cores: Pallas' Mosaic GPU backend (wgmma).

Same contract, plan, query packing and split combine as ``window_kernel.window_attention``;
only the split kernel differs. Pallas' Triton backend cannot emit wgmma (Hopper's asynchronous
warpgroup matrix multiply), which is what a 32-query window at GQA 6 (192 packed rows per K/V
byte) needs to run at memory speed, and JAX deprecates that backend from 0.11 on.

One program per (split, KV head, batch row), as in the Pallas kernel, with ``tile_r / 64``
compute warpgroups (64 packed query rows each) and one memory warpgroup:

* the memory warpgroup streams the split's K/V tiles into ``num_stages`` shared-memory slots
  with TMA copies; a slot is refilled once every compute warpgroup has released it;
* each compute warpgroup computes S = Q K^T and O += P V with wgmma, keeping the online
  softmax (base 2) in registers, and writes its rows' partial output and log-sum-exp. The
  memory warpgroup hands its registers to the compute warpgroups (``set_max_registers``).

Compiled, P stays in registers and P V accumulates in place (``run_state``). Mosaic GPU's
interpreter takes neither, so interpreted P goes through shared memory into a fresh
accumulator that is then added (``accumulate_pv``): the CPU tests check everything else
(tiles, masks, the pipeline's barriers); lowering tests check the compiled form, and the
check section of ``benchmarks/gpu_attention.py`` its numbers on a GPU. The interpreted form
also compiles (``p_from_registers=False``): the GPU benchmarks check and time both, so that a
fault of the register form alone still leaves a checked kernel.

Key tiles: the split's keys ``[lo, hi)`` (``split_tiles``) are whole 64-key tiles from ``lo``,
the last one masked when ``hi - lo`` is not a multiple of 64. That tail reads cache slots past
``hi`` (past Smax too, which TMA fills with zeros): they may hold anything, NaN included, and
a NaN in V survives a zero probability, so compute warpgroup 0 zeroes the tail's V rows past
``hi`` before any compute warpgroup multiplies by it (K's are masked in S).

Runs compiled on a Hopper GPU, and in Mosaic GPU's interpreter on CPU (``interpret=True``,
JAX >= 0.11; the tests). Lowering for an H100 (layout inference, the shared-memory check) is
tested on every JAX; compiling for sm_90a (ptxas: registers, spills) wherever
``pallas_kernels.ptxas_report``'s toolchain is installed. Untimed: no GPU has run it yet
(README, "Decoding speed").
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _common as cm
from pallas_kernels import window_kernel as wk

ROWS_PER_WARPGROUP = 64   # wgmma's M
MAX_COMPUTE_WARPGROUPS = 3  # 192 rows: a 32-query window at GQA 6
DEFAULT_NUM_STAGES = 2      # K/V shared-memory slots; 3 also fits 192 rows (lowering checks)


def interpreter_supported() -> bool:
  """Whether this JAX's Mosaic GPU interpreter runs the kernel on CPU (JAX >= 0.11; 0.10's
  cannot take a transposed shared-memory operand of wgmma)."""
  return jax.__version_info__ >= (0, 11)


def interpret_params(interpret):
  """``interpret`` as ``plgpu.kernel`` takes it: None (compile for the GPU) or the
  interpreter's parameters (``True``: the defaults, which fill fresh buffers with NaN)."""
  if interpret is False or interpret is None:
    return None
  if not interpreter_supported():
    raise NotImplementedError(
        f"mosaic_window_attention(interpret=...) needs JAX >= 0.11 (this is {jax.__version__}, "
        "whose Mosaic GPU interpreter cannot run a transposed wgmma operand); "
        "window_kernel.window_attention is the same computation in Pallas' interpreter")
  from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
  return InterpretGPUParams() if interpret is True else interpret


def mosaic_plan(batch: int, window: int, num_heads: int, num_kv_heads: int, head_dim: int,
                max_len: int, *, num_splits: int | None = None) -> wk.DecodePlan:
  """A ``decode_plan`` for this kernel: 64-key tiles, row tiles of 64, 128 or 192 rows.

  As in ``decode_plan``, one row tile holds every packed row when batch x KV heads >= 8 (K/V
  read once), else 64-row tiles add parallelism; rows above 192 take 128-row tiles. The
  splits are ``decode_plan``'s for the power-of-two tile above (one wave of programs for
  tiles above 128 rows), so a 192-row tile gets the splits of a 256-row one.
  """
  rows = window * (num_heads // num_kv_heads)
  if batch * num_kv_heads < 8 or rows <= ROWS_PER_WARPGROUP:
    tile_r = ROWS_PER_WARPGROUP
  else:
    tile_r = 192 if 128 < rows <= 192 else 128
  plan = wk.decode_plan(batch, window, num_heads, num_kv_heads, head_dim, max_len, tile_k=64,
                        tile_r=cm.next_pow2(tile_r), num_splits=num_splits)
  # decode_plan shortens the key tile below a cache of < 64 slots (one tile, one split); this
  # kernel keeps 64 and pads such a cache (a copy of < 64 slots).
  return dataclasses.replace(plan, tile_r=tile_r, rows_pad=cm.cdiv(rows, tile_r) * tile_r,
                             tile_k=64, chunk=max(plan.chunk, 64))


def _check_supported(q, plan: wk.DecodePlan):
  if q.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError(f"mosaic_window_attention takes bfloat16 or float16 (wgmma); got {q.dtype}")
  if q.shape[3] % 64:   # 128-byte swizzled rows; padding D would copy the whole cache
    raise ValueError(f"mosaic_window_attention needs head_dim a multiple of 64; got "
                     f"{q.shape[3]}")
  if plan.tile_r not in (64, 128, 192):
    raise ValueError(f"plan.tile_r must be 64, 128 or 192 (whole warpgroups); got "
                     f"{plan.tile_r}")
  if plan.tile_k != 64:
    raise ValueError(f"plan.tile_k must be 64; got {plan.tile_k}")


# setmaxnreg (registers per thread, multiples of 8): the compute warpgroups share what the
# memory warpgroup gives up of the SM's 64K registers (512 per thread of one warpgroup), as
# FlashAttention-3 and JAX's own warp-specialised pipeline do: 256 / 232 / 152 for 1 / 2 / 3.
MEMORY_REGISTERS = 40


def compute_registers(num_compute_warpgroups: int) -> int:
  return min(256, (512 - MEMORY_REGISTERS) // num_compute_warpgroups // 8 * 8)


def _split_kernel(len_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, plan: wk.DecodePlan,
                  scale: float, num_stages: int, p_from_registers: bool):
  tk, d = plan.tile_k, plan.head_dim_pad
  n_wg = plan.tile_r // ROWS_PER_WARPGROUP
  swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))

  def body(q_smem, k_smem, v_smem, p_smem, o_smem, lse_smem, q_bar, k_bar, v_bar, clean_bar,
           released):
    split, h, b = lax.axis_index("split"), lax.axis_index("head"), lax.axis_index("row")
    r_tile = lax.axis_index("row_tile")
    wg = lax.axis_index("wg")
    lo, hi, _, n_tiles = wk.split_tiles(plan, split, len_ref[b])
    # The last tile reads slots past the split's end (an empty split has no tiles).
    has_tail = lax.rem(jnp.maximum(hi - lo, 0), tk) != 0

    def tile_start(t):
      return pl.multiple_of(lo + t * tk, tk)

    # Every thread that waits on a barrier waits on each of its phases, in order (Mosaic GPU
    # tracks a barrier's phase per thread; JAX 0.11's interpreter checks it at exit).
    # The memory warpgroup waits on `released` only; the compute warpgroups on the others.
    @pl.when(wg == n_wg)
    def _memory():
      plgpu.set_max_registers(MEMORY_REGISTERS, action="decrease")

      def fetch(t, _):
        slot = lax.rem(t, num_stages)

        @pl.when(t >= num_stages)
        def _():
          plgpu.barrier_wait(released.at[slot])

        keys = pl.ds(tile_start(t), tk)
        plgpu.copy_gmem_to_smem(k_ref.at[b, keys, h], k_smem.at[slot], k_bar.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[b, keys, h], v_smem.at[slot], v_bar.at[slot])
        return ()

      def drain(t, _):   # the releases fetch did not wait for
        plgpu.barrier_wait(released.at[lax.rem(t, num_stages)])
        return ()

      lax.fori_loop(0, n_tiles, fetch, ())
      lax.fori_loop(jnp.maximum(n_tiles - num_stages, 0), n_tiles, drain, ())

    @pl.when(wg < n_wg)
    def _compute():
      rows = pl.ds(pl.multiple_of(r_tile * plan.tile_r + wg * ROWS_PER_WARPGROUP,
                                  ROWS_PER_WARPGROUP), ROWS_PER_WARPGROUP)
      plgpu.set_max_registers(compute_registers(n_wg), action="increase")
      my_q = q_smem.at[wg]
      plgpu.copy_gmem_to_smem(q_ref.at[b, h, rows], my_q, q_bar.at[wg])
      plgpu.barrier_wait(q_bar.at[wg])
      scale2 = scale * cm.LOG2E

      def step(t, carry):
        acc, m, l = carry
        slot = lax.rem(t, num_stages)
        plgpu.barrier_wait(k_bar.at[slot])

        def qk(acc_ref):
          plgpu.wgmma(acc_ref, my_q, k_smem.at[slot].transpose((1, 0)))
          return acc_ref[...]

        s = pl.run_scoped(qk, plgpu.ACC((ROWS_PER_WARPGROUP, tk), jnp.float32)) * scale2
        key = tile_start(t) + plgpu.broadcasted_iota(
            jnp.int32, s.shape, 1, layout=plgpu.Layout.WGMMA)
        s = jnp.where(key < hi, s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        alpha = jnp.exp2(m - m_safe)
        p = jnp.exp2(s - lax.broadcast_in_dim(m_safe, s.shape, [0]))
        l = l * alpha + p.sum(axis=1)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])

        plgpu.barrier_wait(v_bar.at[slot])

        @pl.when(has_tail & (t == n_tiles - 1))
        def _zero_v_past_the_end():   # (K's are masked in S)
          @pl.when(wg == 0)
          def _():
            tile = plgpu.layout_cast(v_smem.at[slot][...], plgpu.Layout.WGMMA)
            key = tile_start(t) + plgpu.broadcasted_iota(jnp.int32, tile.shape, 0,
                                                         layout=plgpu.Layout.WGMMA)
            v_smem.at[slot][...] = jnp.where(key < hi, tile, jnp.zeros_like(tile))
            plgpu.commit_smem()   # visible to wgmma (the async proxy)
            plgpu.barrier_arrive(clean_bar)

          plgpu.barrier_wait(clean_bar)

        acc = accumulate_pv(acc, p.astype(v_smem.dtype), v_smem.at[slot],
                             None if p_smem is None else p_smem.at[wg])
        plgpu.barrier_arrive(released.at[slot])
        return acc, m_new, l

      acc = plgpu.layout_cast(jnp.zeros((ROWS_PER_WARPGROUP, d), jnp.float32),
                              plgpu.Layout.WGMMA)
      m = plgpu.layout_cast(jnp.full((ROWS_PER_WARPGROUP,), -jnp.inf, jnp.float32),
                            plgpu.Layout.WGMMA.reduce(1))
      l = plgpu.layout_cast(jnp.zeros((ROWS_PER_WARPGROUP,), jnp.float32),
                            plgpu.Layout.WGMMA.reduce(1))
      acc, m, l = lax.fori_loop(0, n_tiles, step, (acc, m, l))
      nonempty = l > 0.0
      l_safe = jnp.where(nonempty, l, 1.0)
      out = acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])
      lse_smem.at[wg][...] = jnp.where(nonempty, m + jnp.log2(l_safe), -jnp.inf)
      store_float32_rows(out, o_smem.at[wg], o_ref.at[b, h, split, rows])
      plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, split, rows])
      plgpu.wait_smem_to_gmem(0)

  dtype = q_ref.dtype
  pl.run_scoped(
      body,
      plgpu.SMEM((n_wg, ROWS_PER_WARPGROUP, d), dtype, transforms=swizzled),
      plgpu.SMEM((num_stages, tk, d), dtype, transforms=swizzled),
      plgpu.SMEM((num_stages, tk, d), dtype, transforms=swizzled),
      None if p_from_registers else
      plgpu.SMEM((n_wg, ROWS_PER_WARPGROUP, tk), dtype, transforms=swizzled),
      plgpu.SMEM((n_wg, ROWS_PER_WARPGROUP, 64), jnp.float32),
      plgpu.SMEM((n_wg, ROWS_PER_WARPGROUP), jnp.float32),
      plgpu.Barrier(num_barriers=n_wg),
      plgpu.Barrier(num_barriers=num_stages),
      plgpu.Barrier(num_barriers=num_stages),
      plgpu.Barrier(num_arrivals=1),
      plgpu.Barrier(num_arrivals=n_wg, num_barriers=num_stages),
      collective_axes="wg",
  )


def store_float32_rows(rows, buffer, dst):
  """Float32 [64, D] registers to global ``dst`` [64, D] through a [64, 64] shared-memory
  ``buffer`` (a whole float32 row is wider than TMA's 128-byte box), 64 columns at a time;
  the copies may still be in flight when it returns."""
  for half in range(rows.shape[1] // 64):
    plgpu.wait_smem_to_gmem(0)   # the buffer's previous copy has left
    buffer[...] = rows[:, half * 64:(half + 1) * 64]
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(buffer, dst.at[:, pl.ds(half * 64, 64)])


def accumulate_pv(acc, p, v_tile, p_smem):
  """acc + P V on wgmma. ``p_smem`` None: P from registers, accumulated in place
  (``run_state``; compiled only). Else P through shared memory into a fresh accumulator,
  added (the interpreter takes only this form; the GPU check of
  ``benchmarks/gpu_attention.py`` covers both)."""
  if p_smem is None:
    def pv_in_place(acc_ref):
      plgpu.wgmma(acc_ref, p, v_tile)
    return pl.run_state(pv_in_place)(plgpu.ACC.init(acc))
  p_smem[...] = p
  plgpu.commit_smem()

  def pv(acc_ref):
    plgpu.wgmma(acc_ref, p_smem, v_tile)
    return acc_ref[...]
  return acc + pl.run_scoped(pv, plgpu.ACC(acc.shape, jnp.float32))


def use_p_from_registers(p_from_registers: bool | None, interpret) -> bool:
  interpreted = bool(interpret)
  if p_from_registers is None:
    return not interpreted
  if p_from_registers and interpreted:
    raise ValueError("p_from_registers=True needs the compiled kernel: Mosaic GPU's interpreter "
                     "takes P V only from shared memory (p_from_registers None or False)")
  return bool(p_from_registers)


def mosaic_window_partials(q, k, v, kv_lengths, *, sm_scale: float | None = None,
                           interpret: Any = False, plan: wk.DecodePlan | None = None,
                           num_stages: int = DEFAULT_NUM_STAGES,
                           p_from_registers: bool | None = None):
  """The split kernel: per-chunk outputs [B, Hkv, splits, rows_pad, D_pad] (float32,
  normalised within the chunk) and base-2 log-sum-exps [B, Hkv, splits, rows_pad]."""
  kv_lengths = wk.validate_inputs(q, k, v, kv_lengths)
  p_from_registers = use_p_from_registers(p_from_registers, interpret)
  batch, window, hq, d = q.shape
  smax, hkv = k.shape[1], k.shape[2]
  plan = plan or mosaic_plan(batch, window, hq, hkv, d, smax)
  wk.check_plan(plan, q, k)
  _check_supported(q, plan)
  scale = float(d ** -0.5 if sm_scale is None else sm_scale)
  kv_lengths = jnp.clip(kv_lengths, 0, smax)
  qp = wk.pack_queries(q, plan)
  k, v = wk.pad_cache(k, v, plan)
  dp = plan.head_dim_pad
  out_type = [
      jax.ShapeDtypeStruct((batch, hkv, plan.num_splits, plan.rows_pad, dp), jnp.float32),
      jax.ShapeDtypeStruct((batch, hkv, plan.num_splits, plan.rows_pad), jnp.float32),
  ]
  kernel = plgpu.kernel(
      functools.partial(_split_kernel, plan=plan, scale=scale, num_stages=num_stages,
                        p_from_registers=p_from_registers),
      out_type=out_type,
      grid=(plan.num_row_tiles, plan.num_splits, hkv, batch),
      grid_names=("row_tile", "split", "head", "row"),
      num_threads=plan.tile_r // ROWS_PER_WARPGROUP + 1, thread_name="wg",
      interpret=interpret_params(interpret),
  )
  return kernel(kv_lengths, qp, k, v)


def mosaic_window_attention(q, k, v, kv_lengths, *, sm_scale: float | None = None,
                            interpret: Any = False, plan: wk.DecodePlan | None = None,
                            num_stages: int = DEFAULT_NUM_STAGES,
                            p_from_registers: bool | None = None):
  """``window_attention`` with its split kernel on wgmma (Hopper); see the module docstring.

  Args:
    q: [B, W, Hq, D], W <= 64, bfloat16 or float16, D a multiple of 64; k, v: [B, Smax, Hkv,
      D] (q's dtype).
    kv_lengths: int [B], keys visible to row b (clipped to [0, Smax]; 0 gives zeros).
    sm_scale: softmax scale, default D ** -0.5.
    interpret: False (compile for a Hopper GPU), True (Mosaic GPU's interpreter, JAX >= 0.11),
      or the interpreter's ``InterpretGPUParams`` (e.g. ``detect_races=True``).
    plan: a ``mosaic_plan(...)`` to override the splits.
    num_stages: K/V shared-memory slots of the pipeline.
    p_from_registers: P V with P in registers, accumulated in place (None: when compiled),
      or with P through shared memory (False; the only form the interpreter runs).

  Returns:
    [B, W, Hq, D] in q's dtype.
  """
  o_part, lse_part = mosaic_window_partials(q, k, v, kv_lengths, sm_scale=sm_scale,
                                            interpret=interpret, plan=plan,
                                            num_stages=num_stages,
                                            p_from_registers=p_from_registers)
  return wk.combine_partials(o_part, lse_part, q.shape, q.dtype)
