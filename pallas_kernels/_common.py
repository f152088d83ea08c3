"""Helpers shared by the attention kernels: backend checks, padding, tile arithmetic.

Index arithmetic that runs *inside* kernels (tile ranges, masks) uses ``lax.div`` / ``lax.rem``
on non-negative int32 values: jnp's floor division adds sign corrections that Triton does not
need, and every index here is non-negative.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

# exp(x) = exp2(x * log2(e)): the kernels keep scores in the base-2 domain (one multiply folded
# into the softmax scale, exp2 is the native instruction).
LOG2E = math.log2(math.e)
# Finite, like the xla reference: a query whose visited tiles hide every key gets a finite
# (discarded) value instead of NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def next_pow2(n: int) -> int:
  return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def is_pow2(n: int) -> bool:
  return n >= 1 and (n & (n - 1)) == 0


def on_gpu() -> bool:
  """True when the default backend is a GPU (so kernels can be compiled, not interpreted)."""
  return jax.default_backend() in ("gpu", "cuda", "rocm")


def padded_head_dim(head_dim: int) -> int:
  """Triton loads need power-of-two tiles and dots need K >= 16: pad D up to that."""
  return max(16, next_pow2(head_dim))


def pad_axis(x, axis: int, size: int, value=0):
  """Pads ``x`` with ``value`` along ``axis`` up to ``size`` (no-op when already that size)."""
  extra = size - x.shape[axis]
  if extra < 0:
    raise ValueError(f"cannot pad axis {axis} of shape {x.shape} down to {size}")
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def check_tile(name: str, tile: int):
  if not isinstance(tile, int) or tile < 16 or not is_pow2(tile):
    raise ValueError(f"{name} must be a power of two >= 16 (Triton tiles and dots); got {tile!r}")


def check_nonempty(kernel: str, q, k) -> None:
  """Every axis of q [B, T, Hq, D] and k [B, S, Hkv, D] must hold at least one element."""
  if 0 in q.shape or 0 in k.shape:
    raise ValueError(f"{kernel}: q {tuple(q.shape)} and k {tuple(k.shape)} must have no empty "
                     f"axis (B, T / S, heads and D all >= 1)")


def idiv(a, b):
  """Floor division of non-negative int32 scalars/arrays (traced or not)."""
  return lax.div(jnp.asarray(a, jnp.int32), jnp.asarray(b, jnp.int32))


def icdiv(a, b):
  return idiv(jnp.asarray(a, jnp.int32) + (b - 1), b)


def compiler_params(num_warps: int, num_stages: int):
  """Triton compiler parameters: always given, so a GPU lowering picks the Triton backend
  (not Mosaic GPU); interpret mode ignores them."""
  from jax.experimental.pallas import triton as plgpu
  return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def poison_like(shape, dtype):
  """NaN-filled (floats) or minimum-valued (ints) buffer: an unwritten element surfaces."""
  if jnp.issubdtype(dtype, jnp.floating):
    return jnp.full(shape, jnp.nan, dtype)
  return jnp.full(shape, jnp.iinfo(dtype).min, dtype)
